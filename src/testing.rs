//! Hooks for this crate's own tests and diagnostics. Not a stable API.
#![doc(hidden)]

use std::path::PathBuf;

use crate::caps::{ComputeCapability, Nvrtc};

/// NVRTC's availability on this machine (no GPU needed).
pub fn nvrtc() -> Nvrtc {
    crate::gpu::nvrtc::probe()
}

/// Every embedded kernel module.
pub fn kernel_modules() -> Vec<&'static str> {
    crate::gpu::nvrtc::modules()
}

/// The oldest compute capability a module's kernels target: the kernel registry's minimum for
/// its modules (without the suffix: flash_hopper's 9.0a is 9.0, for which NVRTC builds
/// sm_90a), else the module's `// attention: min-arch` marker.
pub fn min_arch(module: &str) -> ComputeCapability {
    crate::gpu::embedded::min_arch(module)
}

/// Compiles `module` for `cc` with NVRTC through the cache in `cache_dir`; returns the cubin
/// and whether it was a cache hit.
pub fn jit_compile(module: &str, cc: ComputeCapability, cache_dir: Option<PathBuf>) -> Result<(Vec<u8>, bool), String> {
    let version = match nvrtc() {
        Nvrtc::Available { version } => version,
        Nvrtc::Missing(why) => return Err(why),
    };
    crate::gpu::nvrtc::compile_cached(module, crate::gpu::nvrtc::JitTarget::Cubin(cc), version, cache_dir.as_ref()).map_err(|r| r.to_string())
}

/// The entries of a JIT cache directory: (file name, bytes, checksum valid).
pub fn cache_entries(dir: &std::path::Path) -> std::io::Result<Vec<(String, u64, bool)>> {
    let cache = crate::gpu::cache::DiskCache::open(dir)?;
    Ok(cache
        .entries()?
        .into_iter()
        .map(|e| {
            (
                e.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                e.bytes,
                e.valid,
            )
        })
        .collect())
}

/// The ptxas resource report of the nvcc build ("" without nvcc).
pub fn ptxas_report() -> &'static str {
    crate::gpu::embedded::PTXAS_REPORT
}

/// Benchmarks only: the number of waves of blocks a split-KV decode grid aims for (0: the
/// default), process-wide, to compare grid shapes on one device.
pub fn set_decode_waves(waves: usize) {
    crate::gpu::decode::set_waves(waves);
}

/// Benchmarks only: the most splits a decode grid takes (0: no cap), process-wide, to measure
/// what the split-KV combine costs against fewer, longer blocks.
pub fn set_decode_max_splits(splits: usize) {
    crate::gpu::decode::set_max_splits(splits);
}

/// Benchmarks only: split decode grids run without their combine kernel (their outputs are
/// wrong), to time the main kernel alone.
pub fn set_decode_skip_combine(skip: bool) {
    crate::gpu::decode::set_skip_combine(skip);
}

/// Benchmarks only: how split decode grids merge their splits, process-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeMerge {
    /// The plan's rule: in one thread block cluster where the split count fits one (sm_90+),
    /// else by the combine kernel.
    Plan = 0,
    /// Always by the combine kernel (partials through a workspace in global memory).
    Combine = 1,
    /// Always in one cluster (sm_90+): split counts above the largest cluster are capped to it.
    ClusterCapped = 2,
}

/// Benchmarks only: sets how split decode grids merge (see [`DecodeMerge`]).
pub fn set_decode_merge(merge: DecodeMerge) {
    crate::gpu::decode::set_merge(merge);
}

/// Benchmarks only: which K/V loads the tensor-core decode kernels make, process-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeLoads {
    /// The plan's rule: streamed for calls that read little K/V, plain otherwise.
    Plan = 0,
    /// Plain loads (cached in L1 and L2 as usual).
    Plain = 1,
    /// Streamed loads: evict-first in L2, not allocated in L1 (the `_ef` kernels).
    Streamed = 2,
}

/// Benchmarks only: sets which K/V loads the decode kernels make (see [`DecodeLoads`]).
pub fn set_decode_loads(loads: DecodeLoads) {
    crate::gpu::decode::set_loads(loads);
}

/// Benchmarks only: the tensor-core decode kernels run on two-warp blocks (where built: head_dim
/// up to 128) instead of four-warp ones, process-wide; the outputs are the same.
pub fn set_decode_two_warp_blocks(two: bool) {
    crate::gpu::decode::set_two_warp_blocks(two);
}

/// The instruction set CPU-backend calls run on (`"avx512"`, `"avx2"` or `"portable"`).
pub fn cpu_isa() -> &'static str {
    crate::cpu::Isa::detect().short_name()
}
