//! The memory-efficient (xFormers-style) backend: tiled forward attention with an online
//! softmax, so the score matrix never exists in memory. Unlike `flash` it runs from sm_75 up,
//! takes f32 (a SIMT kernel) as well as f16 and bf16 (tensor cores: mma.sync m16n8k16 on sm_80+,
//! m16n8k8 on sm_75, bf16 on sm_80+ only), any head_dim from 1 to 512 and tensors that are not
//! 16-byte aligned (element-wise loads). Every specialisation needs at most 64 KiB of shared
//! memory, so one binary serves Turing through Blackwell. `forward` allocates nothing and never
//! synchronises, so it can be captured in a CUDA graph.

use std::path::PathBuf;
use std::sync::Arc;


use super::device::{GpuDevice, Kernels};
use super::params::launch_fused;
use crate::backend::{Backend, BackendKind, Capabilities, Reason, RunError};
use crate::caps::{ComputeCapability, DeviceCaps};
use crate::dtype::DType;
use crate::problem::Problem;
use crate::settings::JitMode;
use crate::call::Call;

const MODULE: &str = "mem_efficient";
/// Every entry point of cuda/mem_efficient.cu (`_a`: 16-byte aligned loads, `_u`: element-wise).
const FUNCTIONS: [&str; 21] = [
    "attn_me_fwd_f16_d64_a",
    "attn_me_fwd_f16_d64_u",
    "attn_me_fwd_bf16_d64_a",
    "attn_me_fwd_bf16_d64_u",
    "attn_me_fwd_f16_d128_a",
    "attn_me_fwd_f16_d128_u",
    "attn_me_fwd_bf16_d128_a",
    "attn_me_fwd_bf16_d128_u",
    "attn_me_fwd_f16_d256_a",
    "attn_me_fwd_f16_d256_u",
    "attn_me_fwd_bf16_d256_a",
    "attn_me_fwd_bf16_d256_u",
    "attn_me_fwd_f16_d512_a",
    "attn_me_fwd_f16_d512_u",
    "attn_me_fwd_bf16_d512_a",
    "attn_me_fwd_bf16_d512_u",
    "attn_me_fwd_f32_d32",
    "attn_me_fwd_f32_d64",
    "attn_me_fwd_f32_d128",
    "attn_me_fwd_f32_d256",
    "attn_me_fwd_f32_d512",
];
/// The largest head_dim a kernel is specialised for.
pub(crate) const MAX_HEAD_DIM: usize = 512;

/// One kernel specialisation; mirrors the entry tables at the end of cuda/mem_efficient.cu.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spec {
    /// The head_dim the kernel is built for (smaller problems run with zero-filled columns).
    head_dim: usize,
    /// Query rows per block.
    block_m: usize,
    /// Threads per block.
    threads: usize,
    /// Dynamic shared memory per block, bytes.
    dynamic_smem: usize,
    /// Static shared memory per block, bytes (the f32 kernels' K/V tiles).
    static_smem: usize,
}

impl Spec {
    /// All the shared memory a block needs.
    fn shared_bytes(&self) -> usize {
        self.dynamic_smem + self.static_smem
    }
}

/// A tensor-core specialisation from the kernel's template arguments (D, BN, WM, WD, MT, KBUF):
/// Q [BM][D], KBUF K tiles and a V tile [BN][D] of 16-bit values, plus WD·BM·BN f32 partial
/// scores when warps split head_dim.
const fn tensor_core(d: usize, bn: usize, wm: usize, wd: usize, mt: usize, kbuf: usize) -> Spec {
    let bm = wm * 16 * mt;
    let red = if wd > 1 { wd * bm * bn * 4 } else { 0 };
    Spec {
        head_dim: d,
        block_m: bm,
        threads: wm * wd * 32,
        dynamic_smem: (bm + (kbuf + 1) * bn) * d * 2 + red,
        static_smem: 0,
    }
}

/// An f32 SIMT specialisation from (D, G lanes per row, BN keys per tile, threads).
const fn simt(d: usize, g: usize, bn: usize, threads: usize) -> Spec {
    Spec { head_dim: d, block_m: threads / g, threads, dynamic_smem: 0, static_smem: 2 * bn * d * 4 }
}

/// The specialisation that runs `head_dim` in `dtype`.
fn specialisation(dtype: DType, head_dim: usize) -> Spec {
    match (dtype, head_dim) {
        (DType::F32, 0..=32) => simt(32, 2, 32, 128),
        (DType::F32, 33..=64) => simt(64, 4, 32, 128),
        (DType::F32, 65..=128) => simt(128, 8, 32, 128),
        (DType::F32, 129..=256) => simt(256, 16, 16, 256),
        (DType::F32, _) => simt(512, 32, 8, 256),
        (_, 0..=64) => tensor_core(64, 64, 4, 1, 2, 2),
        (_, 65..=128) => tensor_core(128, 32, 4, 1, 2, 2),
        (_, 129..=256) => tensor_core(256, 16, 4, 1, 1, 2),
        (_, _) => tensor_core(512, 16, 1, 4, 1, 1),
    }
}

/// Whether the 16-byte-vector kernels can run the problem: every base and stride 16-byte
/// aligned, and rows a whole number of 16-byte chunks (so no vector crosses the row's end).
fn aligned(problem: &Problem) -> bool {
    problem.vector_aligned && (problem.head_dim * problem.dtype.size_bytes()) % 16 == 0
}

/// The entry point that runs `problem`.
fn kernel_name(problem: &Problem, spec: &Spec) -> String {
    match problem.dtype {
        DType::F32 => format!("attn_me_fwd_f32_d{}", spec.head_dim),
        d => format!(
            "attn_me_fwd_{}_d{}_{}",
            d.name(),
            spec.head_dim,
            if aligned(problem) { "a" } else { "u" }
        ),
    }
}

/// The memory-efficient backend on one device.
pub(crate) struct MemEfficientBackend {
    kernels: Kernels,
}

impl MemEfficientBackend {
    pub(crate) fn new(device: Option<Arc<GpuDevice>>, jit: JitMode, cache_dir: Option<PathBuf>) -> Self {
        MemEfficientBackend { kernels: Kernels::new(device, MODULE, &FUNCTIONS, jit, cache_dir) }
    }

    /// How the module was (or would be) loaded on the device, for diagnostics.
    pub(crate) fn image_description(&self) -> Option<String> {
        self.kernels.image_description()
    }
}

/// What mem_efficient runs: sm_75+, f16 and f32 everywhere, bf16 from sm_80 (its tensor-core
/// MMA), any head_dim up to [`MAX_HEAD_DIM`], any alignment, packed batches.
const CAPABILITIES: Capabilities = Capabilities {
    min_cc: ComputeCapability::new(7, 5),
    dtypes: &[
        (DType::F16, ComputeCapability::new(7, 5)),
        (DType::BF16, ComputeCapability::new(8, 0)),
        (DType::F32, ComputeCapability::new(7, 5)),
    ],
    dtypes_text: "f16, f32 (bf16 needs sm_80)",
    max_head_dim: |_| MAX_HEAD_DIM,
    head_dim_multiple: |_| 1,
    needs_alignment: false,
    varlen: true,
    max_query_rows: None,
    heads_and_batch_on_the_grid: true,
};

impl Backend for MemEfficientBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::MemEfficient
    }

    /// One check per constraint, as PyTorch SDPA does, each reason naming what would change it.
    fn check(&self, caps: &DeviceCaps, problem: &Problem) -> Vec<Reason> {
        let mut reasons = CAPABILITIES.reasons(caps, problem);
        if caps.cc < CAPABILITIES.min_cc {
            return reasons;
        }
        if !Capabilities::head_dim_rejected(&reasons) {
            let needed = specialisation(problem.dtype, problem.head_dim).shared_bytes();
            if needed > caps.smem_per_block_optin {
                reasons.push(Reason::SharedMemory { needed, available: caps.smem_per_block_optin });
            }
        }
        reasons.extend(self.kernels.unavailable(caps));
        reasons
    }

    fn forward(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        let (dev, module) = self.kernels.loaded()?;
        dev.prepare(call)?;
        let p = &call.problem;
        let spec = specialisation(p.dtype, p.head_dim);
        let func = module.launchable(&kernel_name(p, &spec))?;
        // Static shared memory (the f32 kernels) needs no opt-in; dynamic above 48 KiB does
        // (within sm_75's 64 KiB).
        launch_fused(func, call, spec.block_m, spec.threads, spec.dynamic_smem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_head_dim_has_a_kernel_within_64_kib() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for d in 1..=MAX_HEAD_DIM {
                let s = specialisation(dtype, d);
                assert!(s.head_dim >= d, "{dtype} d={d}: {s:?}");
                assert!(s.shared_bytes() <= 64 * 1024, "{dtype} d={d}: {s:?}");
                let p = Problem::new(dtype, 1, 1, 1, 1, 1, d);
                assert!(FUNCTIONS.contains(&kernel_name(&p, &s).as_str()), "{dtype} d={d}");
            }
        }
        // Mirrors the table in cuda/mem_efficient.cu.
        assert_eq!(specialisation(DType::F16, 64).dynamic_smem, 40960);
        assert_eq!(specialisation(DType::F16, 128).dynamic_smem, 57344);
        assert_eq!(specialisation(DType::BF16, 256).dynamic_smem, 57344);
        assert_eq!(specialisation(DType::F16, 512).dynamic_smem, 53248);
        assert_eq!(specialisation(DType::F16, 512).block_m, 16);
        assert_eq!(specialisation(DType::F32, 512).static_smem, 32768);
    }

    #[test]
    fn odd_head_dims_take_the_element_wise_kernels() {
        let p = |dtype, d| Problem::new(dtype, 1, 1, 1, 1, 1, d);
        let name = |q: Problem| kernel_name(&q, &specialisation(q.dtype, q.head_dim));
        assert_eq!(name(p(DType::F16, 64)), "attn_me_fwd_f16_d64_a");
        assert_eq!(name(p(DType::BF16, 3)), "attn_me_fwd_bf16_d64_u");
        assert_eq!(name(p(DType::F16, 300)), "attn_me_fwd_f16_d512_u");
        assert_eq!(name(p(DType::F32, 17)), "attn_me_fwd_f32_d32");
        let mut unaligned = p(DType::F16, 128);
        unaligned.vector_aligned = false;
        assert_eq!(name(unaligned), "attn_me_fwd_f16_d128_u");
    }

    #[test]
    fn check_gives_one_reason_per_constraint() {
        use crate::caps::SimulatedGpu;
        let be = MemEfficientBackend::new(None, JitMode::Auto, None);
        let t4 = DeviceCaps::simulated(SimulatedGpu::T4);
        let bf = Problem::new(DType::BF16, 1, 8, 8, 1, 1, 64);
        assert!(be.check(&t4, &bf).iter().any(|r| matches!(r, Reason::DType { .. })));
        assert!(!be.check(&t4, &Problem::new(DType::F16, 1, 8, 8, 1, 1, 3)).iter().any(|r| matches!(r, Reason::DType { .. } | Reason::HeadDim { .. })));
        let big = Problem::new(DType::F16, 1, 8, 8, 1, 1, 513);
        assert!(be.check(&t4, &big).contains(&Reason::HeadDim { max: 512, found: 513 }));
    }
}
