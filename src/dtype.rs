//! Element types the kernels accept: `f16`, `bf16` (from the `half` crate) and `f32`.

use std::fmt;

/// The element type of a tensor, as the kernels see it.
///
/// Frozen: exactly the three [`Element`] types (the trait is sealed to them), so matching on
/// all three variants is supported. A new element type would be a new major version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
    /// IEEE single precision.
    F32,
}

impl DType {
    /// Size of one element in bytes.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// Short name used in kernel symbols and benchmark ids (`f16`, `bf16`, `f32`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// An element type attention runs on. Implemented for `half::f16`, `half::bf16` and `f32`;
/// sealed, because every kernel is specialised for exactly these three.
pub trait Element: sealed::Sealed + bytemuck::Pod + Copy + Send + Sync + fmt::Debug + 'static {
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widen to f32 (exact for all three types).
    fn to_f32(self) -> f32;
    /// Round from f32 to nearest-even.
    fn from_f32(x: f32) -> Self;
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
}
