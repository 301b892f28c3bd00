//! Helpers shared by the integration tests (CPU and GPU): an f64 reference and a tiny PRNG.
//!
//! Each integration test binary uses only part of this, so unused items are expected.
#![allow(dead_code)]

pub mod reference;
pub mod rng;
