//! The build script's ptxas-report parser (build/ptxas.rs), on real ptxas output
//! (tests/data/ptxas/). No GPU and no toolkit needed.

#[allow(dead_code)]
#[path = "../build/ptxas.rs"]
mod ptxas;
