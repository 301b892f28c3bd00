//! Run-time compilation with NVRTC: the repair path for "no kernel image is available for
//! execution on the device", and the whole path when the crate was built without nvcc.

use std::ffi::{c_char, CString};
use std::ptr;

use cudarc::nvrtc::sys;

use std::path::PathBuf;

use super::cache::{fnv1a64, CacheKey, DiskCache, Outcome};
use crate::log_once::warn_once;
use super::embedded;
use crate::backend::Reason;
use crate::caps::{ComputeCapability, Nvrtc};

/// Whether libnvrtc can be loaded, and its version. Never panics: cudarc panics when the
/// library is missing, so presence is checked first and the calls are fenced.
pub(crate) fn probe() -> Nvrtc {
    // Only tries to dlopen the library by its known names, in every cudarc loading mode.
    if !super::libs::nvrtc_library_present() {
        return Nvrtc::Missing(
            "libnvrtc.so was not found on the library path (install the CUDA toolkit or the \
             nvidia-cuda-nvrtc wheel and add its lib directory to LD_LIBRARY_PATH)"
                .into(),
        );
    }
    let version = std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0i32, 0i32);
        // SAFETY: plain out-parameters.
        let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        (r == sys::nvrtcResult::NVRTC_SUCCESS).then_some((major as u32, minor as u32))
    });
    match version {
        Ok(Some(version)) => Nvrtc::Available { version },
        Ok(None) => Nvrtc::Missing("nvrtcVersion failed".into()),
        Err(_) => Nvrtc::Missing("libnvrtc lacks an expected symbol".into()),
    }
}

/// What NVRTC produces: a cubin for a real arch (the JIT repair), or PTX for a virtual one
/// (`ATTN_EMULATE_ARCH`: the driver compiles it for the device at hand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JitTarget {
    Cubin(ComputeCapability),
    Ptx(ComputeCapability),
}

impl JitTarget {
    /// `sm_90` or `compute_75`: the `--gpu-architecture` value, and part of the cache key.
    pub(crate) fn arch(&self) -> String {
        match self {
            // A cubin is built for exactly the device at hand, so sm_90 gets its arch-specific
            // features (wgmma: flash's Hopper kernels).
            JitTarget::Cubin(cc) if (cc.major, cc.minor) == (9, 0) => "sm_90a".to_string(),
            JitTarget::Cubin(cc) => format!("sm_{}{}", cc.major, cc.minor),
            JitTarget::Ptx(cc) => format!("compute_{}{}", cc.major, cc.minor),
        }
    }
}

/// The options every JIT compile uses (part of the cache key).
pub(crate) fn options(target: JitTarget) -> Vec<String> {
    std::iter::once(format!("--gpu-architecture={}", target.arch()))
        .chain(crate::arch::KERNEL_COMPILE_FLAGS.iter().map(|f| f.to_string()))
        .collect()
}

/// The `.cu` file of a module and every header under `cuda/`, with the registry modules'
/// generated entry-point headers (`<module>_entries.cuh`, the text nvcc compiled), which NVRTC
/// resolves by name.
pub(crate) fn module_sources(module: &str) -> Option<(&'static str, Vec<(&'static str, &'static str)>)> {
    let main = embedded::source(&format!("{module}.cu"))?;
    let headers = embedded::SOURCES
        .iter()
        .filter(|(f, _)| f.ends_with(".cuh"))
        .copied()
        .collect();
    Some((main, headers))
}

/// Compiles a module to a cubin (or PTX, NUL-terminated as cuModuleLoadData wants it) for
/// exactly `target`. Returns the compiler log on failure.
pub(crate) fn compile(module: &str, target: JitTarget) -> Result<Vec<u8>, String> {
    let (main, headers) =
        module_sources(module).ok_or_else(|| format!("no embedded source for module {module}"))?;
    let opts = options(target);
    let ptx = matches!(target, JitTarget::Ptx(_));
    std::panic::catch_unwind(|| compile_raw(module, main, &headers, &opts, ptx))
        .unwrap_or_else(|_| Err("libnvrtc lacks an expected symbol".into()))
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("embedded text contains a NUL byte: {s:.40}"))
}

fn compile_raw(
    module: &str,
    main: &str,
    headers: &[(&str, &str)],
    opts: &[String],
    ptx: bool,
) -> Result<Vec<u8>, String> {
    let src = cstring(main)?;
    let name = cstring(&format!("{module}.cu"))?;
    let header_src: Vec<CString> = headers.iter().map(|(_, s)| cstring(s)).collect::<Result<_, _>>()?;
    let header_names: Vec<CString> = headers.iter().map(|(n, _)| cstring(n)).collect::<Result<_, _>>()?;
    let header_src_ptrs: Vec<*const c_char> = header_src.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let opts_c: Vec<CString> = opts.iter().map(|o| cstring(o)).collect::<Result<_, _>>()?;
    let opt_ptrs: Vec<*const c_char> = opts_c.iter().map(|s| s.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated string alive for this whole function;
    // the program is destroyed on every path below.
    unsafe {
        check(
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                headers.len() as i32,
                header_src_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            ),
            "nvrtcCreateProgram",
        )?;
        let compiled = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let result = if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
            Err(format!("{compiled:?}:\n{}", program_log(prog)))
        } else if ptx {
            // The size NVRTC reports includes the terminating NUL, which the driver needs.
            let mut size = 0usize;
            check(sys::nvrtcGetPTXSize(prog, &mut size), "nvrtcGetPTXSize").and_then(|_| {
                let mut text = vec![0u8; size];
                check(sys::nvrtcGetPTX(prog, text.as_mut_ptr() as *mut c_char), "nvrtcGetPTX").map(|_| text)
            })
        } else {
            let mut size = 0usize;
            check(sys::nvrtcGetCUBINSize(prog, &mut size), "nvrtcGetCUBINSize").and_then(|_| {
                let mut cubin = vec![0u8; size];
                check(
                    sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char),
                    "nvrtcGetCUBIN",
                )
                .map(|_| cubin)
            })
        };
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

fn check(r: sys::nvrtcResult, op: &str) -> Result<(), String> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(format!("{op} failed: {r:?}"))
    }
}

unsafe fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    if sys::nvrtcGetProgramLogSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return String::new();
    }
    let mut log = vec![0u8; size];
    if sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char) != sys::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    String::from_utf8_lossy(&log).trim_end_matches('\0').trim().to_string()
}

/// Compiles module `name` for `cc` through the on-disk cache in `cache_dir` (or without one).
/// Returns the cubin and whether it came from the cache. A cache that cannot be opened or
/// written degrades to compiling in every process, with one warning.
pub(crate) fn compile_cached(
    name: &str,
    target: JitTarget,
    version: (u32, u32),
    cache_dir: Option<&PathBuf>,
) -> Result<(Vec<u8>, bool), Reason> {
    let (main, headers) = module_sources(name)
        .ok_or_else(|| Reason::Jit { why: format!("no embedded source for module {name}") })?;
    let compile = || {
        log::info!("attention: compiling module {name} for {} with NVRTC {}.{}", target.arch(), version.0, version.1);
        compile(name, target)
    };
    let jit_err = |log: String| Reason::Jit { why: format!("NVRTC failed on {name} for {}: {log}", target.arch()) };
    // Every byte that reaches the compiler is in the key, so an edited header is a new entry, and
    // so is an edited registry (through the generated entry-point headers among `headers`).
    let mut text = String::from(main);
    for (n, s) in &headers {
        text.push_str(n);
        text.push_str(s);
    }
    let key = CacheKey::module(name)
        .with("source", format!("{:016x}", fnv1a64(text.as_bytes())))
        .with("options", options(target).join(" "))
        .with("arch", target.arch())
        .with("nvrtc", format!("{}.{}", version.0, version.1))
        .with("crate", env!("CARGO_PKG_VERSION"));
    let cache = match cache_dir {
        None => {
            warn_once("attention: no JIT cache directory (set ATTN_CACHE_DIR or HOME); kernels are compiled in every process".into());
            None
        }
        Some(dir) => match DiskCache::open(dir) {
            Ok(c) => Some(c),
            Err(e) => {
                warn_once(format!(
                    "attention: JIT cache directory {} is not usable ({e}); kernels are compiled in every process. Set ATTN_CACHE_DIR to a writable directory",
                    dir.display()
                ));
                None
            }
        },
    };
    let Some(cache) = cache else {
        return compile().map(|image| (image, false)).map_err(jit_err);
    };
    let (image, outcome) = cache.get_or_compile(&key, compile).map_err(jit_err)?;
    match &outcome {
        Outcome::Hit => return Ok((image, true)),
        Outcome::Compiled { stored, replaced_corrupt } => {
            if let Err(e) = stored {
                warn_once(format!(
                    "attention: cannot write the JIT cache in {} ({e}); kernels are compiled in every process. Set ATTN_CACHE_DIR to a writable directory",
                    cache.dir().display()
                ));
            }
            if let Some(why) = replaced_corrupt {
                warn_once(format!("attention: rebuilt a corrupt JIT cache entry for {name}: {why}"));
            }
        }
    }
    Ok((image, false))
}

/// Every kernel module embedded in the crate (the `.cu` files under `cuda/`).
pub(crate) fn modules() -> Vec<&'static str> {
    embedded::SOURCES
        .iter()
        .filter_map(|(f, _)| f.strip_suffix(".cu"))
        .collect()
}
