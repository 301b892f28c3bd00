//! attention: fast, correct attention on whatever NVIDIA GPU it lands on.
#![warn(missing_docs)]

pub mod dtype;
pub mod layout;
pub mod options;

pub use dtype::{DType, Element};
pub use layout::Layout;
pub use options::Options;
