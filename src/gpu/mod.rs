//! Everything that touches the CUDA driver: probing, kernel images (embedded or JIT), backends.

pub(crate) mod append;
pub(crate) mod cache;
pub(crate) mod decode;
pub(crate) mod device;
pub(crate) mod embedded;
pub(crate) mod libs;
pub(crate) mod flash;
pub(crate) mod mem_efficient;
pub(crate) mod naive;
pub(crate) mod nvrtc;
pub(crate) mod params;
pub(crate) mod tma;
