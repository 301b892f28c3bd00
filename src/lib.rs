#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod arch;
mod backend;
pub mod caps;
mod cpu;
mod cpu_backend;
pub mod dtype;
mod error;
mod gpu;
pub mod layout;
pub mod options;
mod problem;
mod select;
pub mod settings;
mod tensor;
pub mod testing;

pub use backend::{BackendKind, Reason};
/// The cudarc version this crate is built against: use it to allocate device tensors.
pub use cudarc;
pub use caps::{ComputeCapability, DeviceCaps, ImageSource, KernelBuild, Nvrtc, SimulatedGpu};
pub use dtype::{DType, Element};
pub use error::{Error, Rejection, Result};
pub use layout::Layout;
pub use options::Options;
pub use problem::{MemoryKind, Problem};
pub use select::{select, Attention, Explanation, Selector};
pub use settings::{JitMode, Settings};
pub use tensor::{LseMut, SeqLens, Tensor, TensorMut, VarLen};
