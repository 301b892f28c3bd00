#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod arch;
mod backend;
mod call;
mod reason;
mod registry;
#[cfg(feature = "candle")]
pub mod candle;
pub mod caps;
mod cpu;
mod cpu_backend;
mod cpu_kvcache;
pub mod dtype;
mod error;
mod flag;
mod gpu;
mod kvcache;
mod log_once;
pub mod layout;
pub mod options;
mod problem;
mod report;
mod select;
pub mod settings;
mod tensor;
pub mod testing;

pub use reason::{BackendKind, Reason};
/// The cudarc version this crate is built against: use it to allocate device tensors.
pub use cudarc;
/// The `half` crate this crate's `f16`/`bf16` element types come from (half 2): use
/// `attention::half::bf16` without adding the dependency yourself.
pub use half;
pub use caps::{ComputeCapability, DeviceCaps, ImageSource, KernelBuild, Nvrtc, SimulatedGpu};
pub use dtype::{DType, Element};
pub use error::{Error, Rejection, Result};
pub use kvcache::{BlockTable, CacheLens, KvCache, KvCacheMut, SlotMapping, Workspace};
pub use layout::Layout;
pub use options::Options;
pub use problem::{KvCacheKind, MemoryKind, Problem};
pub use report::{report, Report, RunReport};
pub use select::{select, Attention, Explanation, Selector};
pub use settings::{JitMode, Settings};
pub use tensor::{LseMut, SeqLens, Tensor, TensorMut, VarLen};
