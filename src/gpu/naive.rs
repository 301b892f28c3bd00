//! The naive CUDA backend: S = scale·QKᵀ into an f32 workspace, a masked row softmax, O = P·V.
//!
//! It runs on every arch the crate builds for, any head_dim and all three dtypes. Its
//! workspace is bounded: (batch·head) pairs and, if need be, query rows are processed in chunks
//! that fit `ATTN_NAIVE_WORKSPACE_MB` (default 256 MiB) and half the free memory, so a large
//! problem runs slower instead of failing with out-of-memory.

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::{CUfunction, CUresult, CUstream};

use super::device::{cuda_error, device_addr, driver_error_text, is_sticky, launch_failure, GpuDevice, Kernels};
use super::elem;
use super::params::{strides, window_arg};
use crate::backend::{Backend, BackendKind, Capabilities, Reason, RunError, MAX_GRID_YZ};
use crate::caps::{ComputeCapability, DeviceCaps};
use crate::dtype::DType;
use crate::problem::Problem;
use crate::registry::{self, Elem, Family, Kernel, Module};
use crate::settings::JitMode;
use crate::call::Call;

/// Mirrors `struct NaiveParams` in cuda/common.cuh (the kernel checks its size is 160).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct NaiveParams {
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    o_stride: [i64; 3],
    /// 64-bit: batch·heads may exceed `i32::MAX` although each factor fits.
    bh_start: i64,
    heads: i32,
    kv_group: i32,
    seqlen_q: i32,
    seqlen_k: i32,
    head_dim: i32,
    bh_count: i32,
    row_start: i32,
    row_count: i32,
    scale: f32,
    causal: i32,
    window_left: i32,
    window_right: i32,
    softcap: f32,
}
const _: () = {
    assert!(std::mem::size_of::<NaiveParams>() == 160);
    assert!(std::mem::offset_of!(NaiveParams, bh_start) == 96);
    assert!(std::mem::offset_of!(NaiveParams, heads) == 104);
    assert!(std::mem::offset_of!(NaiveParams, scale) == 136);
    assert!(std::mem::offset_of!(NaiveParams, causal) == 140);
    assert!(std::mem::offset_of!(NaiveParams, softcap) == 152);
};

/// Every entry point of cuda/naive.cu, from the kernel registry.
const FUNCTIONS: [&str; registry::count(Module::Naive)] = registry::names(Module::Naive);

/// The three kernels that run `dtype`: scores, softmax, P·V.
fn kernels(dtype: DType) -> [&'static Kernel; 3] {
    let get = |family, dtype| registry::lookup(family, dtype, 0).expect("the registry has every naive kernel");
    [get(Family::NaiveScores, elem(dtype)), get(Family::NaiveSoftmax, Elem::F32), get(Family::NaivePv, elem(dtype))]
}

/// A kernel, its grid and block, and pointers to its arguments.
type Launch = (CUfunction, (u32, u32, u32), (u32, u32, u32), Vec<*mut c_void>);

/// The naive backend on one device.
pub(crate) struct NaiveBackend {
    kernels: Kernels,
    workspace_bytes: usize,
}

impl NaiveBackend {
    pub(crate) fn new(
        device: Option<Arc<GpuDevice>>,
        jit: JitMode,
        cache_dir: Option<PathBuf>,
        workspace_mb: usize,
    ) -> Self {
        NaiveBackend {
            kernels: Kernels::new(device, Module::Naive.name(), &FUNCTIONS, jit, cache_dir),
            workspace_bytes: workspace_mb.saturating_mul(1 << 20),
        }
    }

    /// How the module was (or would be) loaded on the device, for diagnostics.
    pub(crate) fn image_description(&self) -> Option<String> {
        self.kernels.image_description()
    }
}

/// Query rows and (batch·head) pairs per chunk for a workspace of `budget` bytes, with
/// `rows_per_block` query rows per block on the grid's y axis.
fn plan_chunks(bh: usize, sq: usize, sk: usize, budget: usize, rows_per_block: usize) -> (usize, usize) {
    let row_bytes = sk.max(1) * 4;
    let max_rows = MAX_GRID_YZ * rows_per_block;
    let rows = (budget / row_bytes).clamp(1, sq.min(max_rows));
    let bh_chunk = if rows == sq {
        (budget / (row_bytes * sq)).clamp(1, bh.min(MAX_GRID_YZ))
    } else {
        1
    };
    (bh_chunk, rows)
}

/// What naive runs: every arch the crate carries, every dtype and head_dim, any alignment; not
/// packed batches (the workspace is sized per (batch, head) from fixed lengths, and a packed
/// batch's lengths live on the device, never read on the host).
const CAPABILITIES: Capabilities = Capabilities {
    min_cc: ComputeCapability::new(0, 0),
    dtypes: &[
        (DType::F16, ComputeCapability::new(0, 0)),
        (DType::BF16, ComputeCapability::new(0, 0)),
        (DType::F32, ComputeCapability::new(0, 0)),
    ],
    dtypes_text: "f16, bf16, f32",
    max_head_dim: |_| usize::MAX,
    head_dim_multiple: |_| 1,
    needs_alignment: false,
    varlen: false,
    max_query_rows: None,
    heads_and_batch_on_the_grid: false,
};

impl Backend for NaiveBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Naive
    }

    fn check(&self, caps: &DeviceCaps, problem: &Problem) -> Vec<Reason> {
        let mut reasons = CAPABILITIES.reasons(caps, problem);
        reasons.extend(self.kernels.unavailable(caps));
        reasons
    }

    fn forward(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        let (dev, module) = self.kernels.loaded()?;
        dev.prepare(call)?;
        let p = &call.problem;
        let f = |k: &Kernel| module.launchable(k.name).map(|f| f.cu_function());
        let [k_scores, k_softmax, k_pv] = kernels(p.dtype);
        let (scores, softmax, pv) = (f(k_scores)?, f(k_softmax)?, f(k_pv)?);
        // Query rows per block of the scores and P·V grids (y), keys and columns per block (x).
        let tile = k_scores.block_m() as usize;
        debug_assert!(k_pv.block_m() as usize == tile && k_scores.block_n() as usize == tile);

        let bh_total = p.batch * p.heads;
        let (_, free) = dev.ctx.mem_get_info().unwrap_or((0, dev.caps.free_mem));
        let mut budget = self.workspace_bytes.min((free / 2).max(1 << 20));
        let stream: CUstream = call.stream;
        // Allocate the workspace, halving the plan on out-of-memory down to a single row.
        let (bh_chunk, rows, ws) = loop {
            let (bh_chunk, rows) = plan_chunks(bh_total, p.seqlen_q, p.seqlen_k, budget, tile);
            let bytes = bh_chunk * rows * p.seqlen_k.max(1) * 4;
            // SAFETY: stream-ordered allocation on the caller's stream; freed below on it.
            match unsafe { result::malloc_async(stream, bytes) } {
                Ok(ptr) => break (bh_chunk, rows, ptr),
                Err(e) if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY && bh_chunk * rows > 1 => {
                    budget = bytes / 2;
                }
                Err(e) if is_sticky(e.0) => return Err(RunError::Fatal(cuda_error("cuMemAllocAsync", e.0))),
                Err(e) => {
                    return Err(RunError::Recoverable(Reason::Unusable {
                        why: format!("workspace of {bytes} bytes: {}", driver_error_text(e.0)),
                    }))
                }
            }
        };
        let lse_ptr = call.lse.as_ref().map(device_addr).unwrap_or(0);
        let mut params = NaiveParams {
            q_stride: strides(&call.q),
            k_stride: strides(&call.k),
            v_stride: strides(&call.v),
            o_stride: strides(&call.out),
            heads: p.heads as i32,
            kv_group: (p.heads / p.kv_heads) as i32,
            seqlen_q: p.seqlen_q as i32,
            seqlen_k: p.seqlen_k as i32,
            head_dim: p.head_dim as i32,
            scale: call.scale,
            causal: p.causal as i32,
            window_left: window_arg(call.mask.left),
            window_right: window_arg(call.mask.right),
            softcap: call.softcap.unwrap_or(0.0),
            ..Default::default()
        };
        let (mut q, mut k, mut v, mut o, mut s, mut l) =
            (device_addr(&call.q), device_addr(&call.k), device_addr(&call.v), device_addr(&call.out), ws, lse_ptr);
        let ceil = |a: usize, b: usize| a.div_ceil(b) as u32;
        let mut wrote_output = false;
        let mut outcome = Ok(());
        'chunks: for bh0 in (0..bh_total).step_by(bh_chunk) {
            for r0 in (0..p.seqlen_q).step_by(rows) {
                params.bh_start = bh0 as i64; // bh0 < batch·heads ≤ numel(q) ≤ isize::MAX
                params.bh_count = bh_chunk.min(bh_total - bh0) as i32;
                params.row_start = r0 as i32;
                params.row_count = rows.min(p.seqlen_q - r0) as i32;
                let (bhc, rc) = (params.bh_count as u32, params.row_count as usize);
                let pp = &mut params as *mut NaiveParams as *mut c_void;
                let launches: [Launch; 3] = [
                    (scores, (ceil(p.seqlen_k, tile), ceil(rc, tile), bhc), k_scores.block_dim(),
                     vec![pp, &mut q as *mut u64 as _, &mut k as *mut u64 as _, &mut s as *mut u64 as _]),
                    (softmax, (ceil(rc, k_softmax.block_m() as usize), bhc, 1), k_softmax.block_dim(),
                     vec![pp, &mut s as *mut u64 as _, &mut l as *mut u64 as _]),
                    (pv, (ceil(p.head_dim, tile), ceil(rc, tile), bhc), k_pv.block_dim(),
                     vec![pp, &mut s as *mut u64 as _, &mut v as *mut u64 as _, &mut o as *mut u64 as _]),
                ];
                for (i, (func, grid, block, mut args)) in launches.into_iter().enumerate() {
                    // SAFETY: the argument list matches the kernel's signature in naive.cu;
                    // every pointer was range-checked against its allocation above, and the
                    // parameters are copied by the driver at launch.
                    let r = unsafe { result::launch_kernel(func, grid, block, 0, stream, &mut args) };
                    if let Err(e) = r {
                        outcome = Err((e.0, wrote_output || i == 2));
                        break 'chunks;
                    }
                    wrote_output |= i == 2;
                }
            }
        }
        // SAFETY: allocated above on this stream; kernels using it are ordered before the free.
        let freed = unsafe { result::free_async(ws, stream) };
        match outcome {
            Ok(()) => freed.map_err(|e| RunError::Fatal(cuda_error("cuMemFreeAsync", e.0))),
            Err((code, wrote_output)) => Err(launch_failure(code, wrote_output)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn chunks_fit_the_budget() {
        // Everything fits: all pairs, all rows.
        assert_eq!(plan_chunks(16, 128, 128, 1 << 30, 16), (16, 128));
        // One pair's scores exceed the budget: one pair, rows that fit.
        let (bh, rows) = plan_chunks(4, 8192, 8192, 64 << 20, 16);
        assert_eq!(bh, 1);
        assert!(rows * 8192 * 4 <= 64 << 20 && rows >= 1);
        // A single row larger than the budget still runs one row at a time.
        assert_eq!(plan_chunks(1, 10, 1 << 30, 1 << 20, 16), (1, 1));
        // Grid limits hold.
        assert!(plan_chunks(1 << 20, 1, 1, usize::MAX, 16).0 <= 65535);
    }

    /// The launch shapes the header of cuda/naive.cu describes.
    #[test]
    fn launch_shapes() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let [scores, softmax, pv] = kernels(dtype);
            assert_eq!((scores.block_dim(), scores.block_m(), scores.block_n()), ((16, 16, 1), 16, 16));
            assert_eq!((softmax.block_dim(), softmax.block_m()), ((256, 1, 1), 8));
            assert_eq!((pv.block_dim(), pv.block_m()), ((16, 16, 1), 16));
            assert!(scores.name.ends_with(dtype.name()) && pv.name.ends_with(dtype.name()));
        }
    }
}
