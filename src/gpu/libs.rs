//! Which CUDA libraries this process can load, asked in every cudarc loading mode (cudarc's
//! own `is_culib_present` exists only under dynamic loading).

/// Whether the driver library (libcuda / nvcuda) can be loaded. Unlike cudarc's
/// `sys::is_culib_present`, this exists in every cudarc loading mode (`dynamic-loading`,
/// `fallback-dynamic-loading`, `dynamic-linking`, `static-linking`).
pub(crate) fn driver_library_present() -> bool {
    library_present("cuda", &["nvcuda"])
}

/// Whether libnvrtc can be loaded (every cudarc loading mode; see [`driver_library_present`]).
pub(crate) fn nvrtc_library_present() -> bool {
    library_present("nvrtc", &[])
}

/// cudarc's candidate names for `name` (its `get_lib_name_candidates`, for the bindings'
/// version and the older majors it also accepts), tried with `dlopen`.
fn library_present(name: &str, extra: &[&str]) -> bool {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    let v = cudarc::driver::sys::CUDA_VERSION;
    let (major, minor) = (v / 1000, v % 1000 / 10);
    let mut names = Vec::new();
    for lib in std::iter::once(name).chain(extra.iter().copied()) {
        names.push(format!("{DLL_PREFIX}{lib}{DLL_SUFFIX}"));
        names.push(format!("{DLL_PREFIX}{lib}64{DLL_SUFFIX}"));
        for m in [format!("{major}"), format!("{major}{minor}"), format!("{major}{minor}_0"), format!("{major}0_{minor}"), format!("{major}0_0"), "12".into(), "11".into(), "10".into(), "9".into()] {
            names.push(format!("{DLL_PREFIX}{lib}64_{m}{DLL_SUFFIX}"));
        }
        for m in [major.to_string(), "12".into(), "11".into(), "10".into(), "9".into(), "1".into()] {
            names.push(format!("{DLL_PREFIX}{lib}{DLL_SUFFIX}.{m}"));
        }
    }
    // SAFETY: loading the CUDA driver or NVRTC runs no user-visible initialisers; the handle
    // is closed again (the library stays loaded if cudarc holds it).
    names.iter().any(|n| unsafe { libloading::Library::new(n) }.is_ok())
}
