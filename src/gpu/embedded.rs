//! What build.rs embedded: fatbins (when nvcc was found), kernel sources, and how they were built.
#![allow(dead_code)]

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The embedded fatbin of a module, if nvcc built one.
pub(crate) fn fatbin(module: &str) -> Option<&'static [u8]> {
    FATBINS
        .iter()
        .find(|(m, bytes)| *m == module && !bytes.is_empty())
        .map(|(_, b)| *b)
}

/// The source of a file under `cuda/`.
pub(crate) fn source(file: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(f, _)| *f == file).map(|(_, s)| *s)
}

/// The minimum arch of a module (from its `// attention: min-arch X.Y` marker).
pub(crate) fn min_arch(module: &str) -> crate::arch::ComputeCapability {
    let (major, minor) = MIN_ARCH
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, a)| *a)
        .unwrap_or((0, 0));
    crate::arch::ComputeCapability::new(major, minor)
}
