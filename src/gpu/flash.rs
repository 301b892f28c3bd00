//! The FlashAttention-2-style backend: tiled online softmax on tensor cores (mma.sync
//! m16n8k16), for f16/bf16 on sm_80 and newer. Kernels are specialised for head_dim 64, 128 and
//! 256; other multiples of 8 run in the next specialisation up with zero-filled columns.
//! `forward` allocates nothing and never synchronises, so it can be captured in a CUDA graph.

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::CUfunction_attribute;

use super::device::{launch_failure, GpuDevice, Kernels};
use super::params::AttnParams;
use crate::backend::{gpu_memory_reasons, Backend, BackendKind, Reason, RunError};
use crate::caps::{ComputeCapability, DeviceCaps};
use crate::dtype::DType;
use crate::problem::Problem;
use crate::settings::JitMode;
use crate::tensor::Call;

const MODULE: &str = "flash";
const FUNCTIONS: [&str; 6] = [
    "attn_flash_fwd_f16_d64",
    "attn_flash_fwd_bf16_d64",
    "attn_flash_fwd_f16_d128",
    "attn_flash_fwd_bf16_d128",
    "attn_flash_fwd_f16_d256",
    "attn_flash_fwd_bf16_d256",
];
/// The largest head_dim a kernel is specialised for.
pub(crate) const MAX_HEAD_DIM: usize = 256;
const MAX_GRID_YZ: usize = 65535;

/// One kernel specialisation; mirrors the `FLASH_ENTRY` table in cuda/flash.cu.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spec {
    /// The head_dim the kernel is built for (problems up to it run with zero-filled columns).
    head_dim: usize,
    /// Keys per K/V tile.
    block_n: usize,
    /// Warps per block.
    warps: usize,
    /// m16 tiles per warp.
    m_tiles: usize,
}

impl Spec {
    /// Query rows per block.
    fn block_m(&self) -> usize {
        self.warps * 16 * self.m_tiles
    }
    /// Dynamic shared memory: a Q tile, two K tiles (double-buffered) and a V tile of 16-bit
    /// values.
    fn shared_bytes(&self) -> usize {
        (self.block_m() + 3 * self.block_n) * self.head_dim * 2
    }
}

/// The specialisation that runs `head_dim`.
fn specialisation(head_dim: usize) -> Spec {
    let (head_dim, block_n, warps, m_tiles) = match head_dim {
        0..=64 => (64, 64, 4, 2),
        65..=128 => (128, 32, 4, 2),
        _ => (256, 16, 8, 1),
    };
    Spec { head_dim, block_n, warps, m_tiles }
}

fn shared_bytes(head_dim: usize) -> usize {
    specialisation(head_dim).shared_bytes()
}

/// The flash backend on one device.
pub(crate) struct FlashBackend {
    kernels: Kernels,
}

impl FlashBackend {
    pub(crate) fn new(device: Option<Arc<GpuDevice>>, jit: JitMode, cache_dir: Option<PathBuf>) -> Self {
        FlashBackend { kernels: Kernels::new(device, MODULE, &FUNCTIONS, jit, cache_dir) }
    }

    /// How the module was (or would be) loaded on the device, for diagnostics.
    pub(crate) fn image_description(&self) -> Option<String> {
        self.kernels.image_description()
    }
}

impl Backend for FlashBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Flash
    }

    /// One check per constraint, as PyTorch SDPA does, each reason naming what would change it.
    fn check(&self, caps: &DeviceCaps, problem: &Problem) -> Vec<Reason> {
        let mut reasons = gpu_memory_reasons(caps, problem);
        let needed = ComputeCapability::new(8, 0);
        if caps.cc < needed {
            // Nothing else matters on a device the kernel cannot run on.
            reasons.push(Reason::ComputeCapability { needed, found: caps.cc });
            return reasons;
        }
        if problem.dtype == DType::F32 {
            reasons.push(Reason::DType { found: problem.dtype, supported: "f16, bf16" });
        }
        if problem.head_dim > MAX_HEAD_DIM {
            reasons.push(Reason::HeadDim { max: MAX_HEAD_DIM, found: problem.head_dim });
        } else if problem.head_dim % 8 != 0 {
            reasons.push(Reason::HeadDimMultiple { multiple: 8, found: problem.head_dim });
        } else if shared_bytes(problem.head_dim) > caps.smem_per_block_optin {
            reasons.push(Reason::SharedMemory {
                needed: shared_bytes(problem.head_dim),
                available: caps.smem_per_block_optin,
            });
        }
        if !problem.vector_aligned {
            reasons.push(Reason::Unaligned);
        }
        for (dim, found) in [("heads", problem.heads), ("batch", problem.batch)] {
            if found > MAX_GRID_YZ {
                reasons.push(Reason::GridLimit { dim, found, max: MAX_GRID_YZ });
            }
        }
        reasons.extend(self.kernels.unavailable(caps));
        reasons
    }

    fn forward(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        let (dev, module) = self.kernels.loaded()?;
        dev.prepare(call)?;
        let p = &call.problem;
        let spec = specialisation(p.head_dim);
        let name = format!("attn_flash_fwd_{}_d{}", p.dtype.name(), spec.head_dim);
        let func = module.launchable(&name)?;
        let smem = spec.shared_bytes();
        // Above 48 KiB a kernel must opt in to its dynamic shared memory.
        func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| launch_failure(e.0, false))?;
        let mut params = AttnParams::of(call);
        let grid = (p.seqlen_q.div_ceil(spec.block_m()) as u32, p.heads as u32, p.batch as u32);
        let block = ((spec.warps * 32) as u32, 1, 1);
        let mut args = [&mut params as *mut AttnParams as *mut c_void];
        // SAFETY: one by-value AttnParams argument, as the kernel declares; every pointer in it
        // was checked against its allocation by `prepare`.
        unsafe { result::launch_kernel(func.cu_function(), grid, block, smem as u32, call.stream, &mut args) }
            .map_err(|e| launch_failure(e.0, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn specialisations_cover_every_multiple_of_8() {
        for d in (8..=256).step_by(8) {
            let s = specialisation(d);
            assert!(s.head_dim >= d && [64, 128, 256].contains(&s.head_dim) && s.block_m() == 128);
        }
        // The d=256 kernel fits the A100/H100 opt-in limit but not a 64 KiB-limited part.
        assert_eq!(shared_bytes(256), 90112);
        assert_eq!(shared_bytes(128), 57344);
        assert_eq!(shared_bytes(64), 40960);
    }
}
