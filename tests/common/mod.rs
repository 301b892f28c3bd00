//! Helpers shared by the integration tests (CPU and GPU): an f64 reference, a tiny PRNG and the
//! GPU case runner.
//!
//! Each integration test binary uses only part of this, so unused items are expected.
#![allow(dead_code)]

pub mod gpu;
pub mod kv;
pub mod reference;
pub mod rng;
