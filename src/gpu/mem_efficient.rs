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
use super::elem;
use super::params::launch_fused;
use crate::backend::{Backend, BackendKind, Capabilities, Reason, RunError};
use crate::caps::{ComputeCapability, DeviceCaps};
use crate::dtype::DType;
use crate::problem::Problem;
use crate::registry::{self, Family, Kernel, Module};
use crate::settings::JitMode;
use crate::call::Call;

/// Every entry point of cuda/mem_efficient.cu (`_a`: 16-byte aligned loads, `_u`: element-wise),
/// from the kernel registry.
const FUNCTIONS: [&str; registry::count(Module::MemEfficient)] = registry::names(Module::MemEfficient);
/// The largest head_dim a kernel is specialised for.
pub(crate) const MAX_HEAD_DIM: usize = registry::max_head_dim(Module::MemEfficient);

/// Whether the 16-byte-vector kernels can run the problem: every base and stride 16-byte
/// aligned, and rows a whole number of 16-byte chunks (so no vector crosses the row's end).
fn aligned(problem: &Problem) -> bool {
    problem.vector_aligned && (problem.head_dim * problem.dtype.size_bytes()) % 16 == 0
}

/// The kernel that runs `problem`: f32 on the SIMT kernels, 16-bit types on the tensor-core
/// ones with vector loads where the problem is aligned, element-wise loads where not; the
/// smallest head_dim bucket at or above the problem's.
fn kernel_for(problem: &Problem) -> Option<&'static Kernel> {
    let family = match problem.dtype {
        DType::F32 => Family::MemEfficientSimt,
        _ if aligned(problem) => Family::MemEfficientAligned,
        _ => Family::MemEfficientUnaligned,
    };
    registry::lookup(family, elem(problem.dtype), problem.head_dim)
}

/// The memory-efficient backend on one device.
pub(crate) struct MemEfficientBackend {
    kernels: Kernels,
}

impl MemEfficientBackend {
    pub(crate) fn new(device: Option<Arc<GpuDevice>>, jit: JitMode, cache_dir: Option<PathBuf>) -> Self {
        MemEfficientBackend { kernels: Kernels::new(device, Module::MemEfficient.name(), &FUNCTIONS, jit, cache_dir) }
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
        if let Some(k) = kernel_for(problem).filter(|_| !Capabilities::head_dim_rejected(&reasons)) {
            let needed = k.shared_bytes() as usize;
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
        let k = kernel_for(p).ok_or_else(|| {
            RunError::Recoverable(Reason::Unusable { why: format!("no mem_efficient kernel for head_dim {}", p.head_dim) })
        })?;
        let func = module.launchable(k.name)?;
        // Static shared memory (the f32 kernels) needs no opt-in; dynamic above 48 KiB does
        // (within sm_75's 64 KiB).
        launch_fused(func, call, k.block_m() as usize, k.threads() as usize, k.dynamic_smem() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_head_dim_has_a_kernel_within_64_kib() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for d in 1..=MAX_HEAD_DIM {
                let p = Problem::new(dtype, 1, 1, 1, 1, 1, d);
                let k = kernel_for(&p).unwrap_or_else(|| panic!("{dtype} d={d}"));
                assert!(k.head_dim as usize >= d, "{dtype} d={d}: {k:?}");
                assert!(k.shared_bytes() <= 64 * 1024, "{dtype} d={d}: {k:?}");
                assert!(FUNCTIONS.contains(&k.name), "{dtype} d={d}");
            }
        }
        // The table in cuda/mem_efficient.cu's comments.
        let k = |dtype, d| kernel_for(&Problem::new(dtype, 1, 1, 1, 1, 1, d)).unwrap();
        assert_eq!(k(DType::F16, 64).dynamic_smem(), 40960);
        assert_eq!(k(DType::F16, 128).dynamic_smem(), 57344);
        assert_eq!(k(DType::BF16, 256).dynamic_smem(), 57344);
        assert_eq!(k(DType::F16, 512).dynamic_smem(), 53248);
        assert_eq!(k(DType::F16, 512).block_m(), 16);
        assert_eq!(k(DType::F32, 512).static_smem(), 32768);
        assert_eq!(k(DType::F32, 512).threads(), 256);
        assert!(kernel_for(&Problem::new(DType::F16, 1, 1, 1, 1, 1, MAX_HEAD_DIM + 1)).is_none());
    }

    #[test]
    fn odd_head_dims_take_the_element_wise_kernels() {
        let p = |dtype, d| Problem::new(dtype, 1, 1, 1, 1, 1, d);
        let name = |q: Problem| kernel_for(&q).unwrap().name;
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
