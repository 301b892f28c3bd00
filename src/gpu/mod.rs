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

/// The kernel registry's name for an element type (build.rs, which shares the registry, cannot
/// see `DType`).
pub(crate) const fn elem(dtype: crate::dtype::DType) -> crate::registry::Elem {
    use crate::dtype::DType;
    use crate::registry::Elem;
    match dtype {
        DType::F16 => Elem::F16,
        DType::BF16 => Elem::BF16,
        DType::F32 => Elem::F32,
    }
}
