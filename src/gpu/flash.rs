//! The FlashAttention-2-style backend: tiled online softmax on tensor cores (mma.sync
//! m16n8k16), for f16/bf16 on sm_80 and newer. Kernels are specialised for head_dim 64, 128 and
//! 256; other multiples of 8 run in the next specialisation up with zero-filled columns.
//! `forward` allocates nothing and never synchronises, so it can be captured in a CUDA graph.
//!
//! Two modules: `flash` (cuda/flash.cu, every sm_80+ arch) and, on sm_90, `flash_hopper`
//! (cuda/flash_hopper.cu, sm_90a only: wgmma, and the warp-specialised TMA kernels). Their kernels,
//! launch shapes and shared memory come from the kernel registry (src/registry.rs).

use std::path::PathBuf;
use std::sync::Arc;

use super::device::{GpuDevice, Kernels, LoadedModule};
use super::elem;
use super::params::{launch_fused, launch_persistent};
use super::tma::{tile_map, TensorMap};
use crate::backend::{Backend, BackendKind, Capabilities, Reason, RunError};
use crate::caps::{ComputeCapability, DeviceCaps};
use crate::dtype::DType;
use crate::problem::Problem;
use crate::registry::{self, Family, Kernel, Module};
use crate::settings::JitMode;
use crate::call::Call;

/// cuda/flash.cu: the mma.sync kernels, for every sm_80+ arch.
const FUNCTIONS: [&str; registry::count(Module::Flash)] = registry::names(Module::Flash);
/// cuda/flash_hopper.cu: the wgmma kernels (cp.async and warp-specialised), sm_90a only.
const HOPPER_FUNCTIONS: [&str; registry::count(Module::FlashHopper)] = registry::names(Module::FlashHopper);
/// The largest head_dim a kernel is specialised for.
pub(crate) const MAX_HEAD_DIM: usize = registry::max_head_dim(Module::Flash);

/// The kernel of `family` (a flash family of the registry) that runs `head_dim` in `dtype`.
fn specialisation(family: Family, dtype: DType, head_dim: usize) -> Option<&'static Kernel> {
    registry::lookup(family, elem(dtype), head_dim)
}

/// The flash backend on one device: two modules, the mma.sync one every sm_80+ device runs and
/// the Hopper one an sm_90 device runs instead where it can have it.
pub(crate) struct FlashBackend {
    kernels: Kernels,
    hopper_kernels: Kernels,
    /// `ATTN_FLASH_HOPPER`: use the wgmma family where the device can have it.
    hopper: bool,
    /// `ATTN_FLASH_TMA`: within it, the warp-specialised TMA kernels where they apply.
    tma: bool,
}

impl FlashBackend {
    pub(crate) fn new(
        device: Option<Arc<GpuDevice>>,
        jit: JitMode,
        cache_dir: Option<PathBuf>,
        hopper: bool,
        tma: bool,
    ) -> Self {
        FlashBackend {
            kernels: Kernels::new(device.clone(), Module::Flash.name(), &FUNCTIONS, jit, cache_dir.clone()),
            hopper_kernels: Kernels::new(device, Module::FlashHopper.name(), &HOPPER_FUNCTIONS, jit, cache_dir),
            hopper,
            tma,
        }
    }

    /// The Hopper module, where this device runs it: when allowed, on sm_90, and when the module
    /// can be had (an embedded sm_90a image, or NVRTC, which builds sm_90 as sm_90a; not under
    /// emulation). On a real device it is loaded here, once per process: `Some(Some(module))`;
    /// on a simulated one, `Some(None)`.
    fn hopper_module(&self, caps: &DeviceCaps) -> Option<Option<Arc<LoadedModule>>> {
        if !self.hopper || caps.cc != ComputeCapability::new(9, 0) {
            return None;
        }
        self.hopper_kernels.availability(caps).ok()
    }

    /// The kernel for a problem in a family (`FlashMmaSync`, or `FlashHopper` where the Hopper
    /// module runs). Within the Hopper family: the warp-specialised kernel for fixed-length
    /// batches at the head_dims it has (when allowed); else the cp.async kernels.
    fn kernel_for(&self, family: Family, problem: &Problem) -> Option<&'static Kernel> {
        if family == Family::FlashHopper && self.tma && !problem.varlen {
            if let Some(k) = specialisation(Family::FlashHopperWs, problem.dtype, problem.head_dim) {
                return Some(k);
            }
        }
        self.cp_async_kernel(family, problem)
    }

    /// The kernel for a problem among those that load with cp.async: within the Hopper family,
    /// the three-warpgroup ("wide") kernel of the same head_dim bucket where it measured faster
    /// (unmasked rows, 2048 queries or more), else the two-warpgroup one.
    fn cp_async_kernel(&self, family: Family, problem: &Problem) -> Option<&'static Kernel> {
        let k = specialisation(family, problem.dtype, problem.head_dim)?;
        let unmasked = !problem.causal && problem.window == (None, None);
        if family == Family::FlashHopper && unmasked && problem.seqlen_q >= 2048 {
            let wide = specialisation(Family::FlashHopperWide, problem.dtype, problem.head_dim);
            if let Some(wide) = wide.filter(|w| w.head_dim == k.head_dim) {
                return Some(wide);
            }
        }
        Some(k)
    }

    /// The family this device runs: Hopper's where the Hopper module runs, else mma.sync.
    fn family(&self, caps: &DeviceCaps) -> Family {
        match self.hopper_module(caps) {
            Some(_) => Family::FlashHopper,
            None => Family::FlashMmaSync,
        }
    }

    /// The warp-specialised kernel's grid (blocks) and Q, K, V tensor maps, or why it cannot
    /// run the call (a tensor the copy engine cannot address, or more tiles than the kernel counts
    /// in an int): the caller then runs the cp.async kernel.
    fn ws_launch_args(call: &Call<'_>, k: &Kernel, sm_count: u32) -> Result<(u32, [TensorMap; 3]), String> {
        let p = &call.problem;
        let (block_m, block_n) = (k.block_m() as usize, k.block_n() as usize);
        let tiles = p.seqlen_q.div_ceil(block_m) * p.heads * p.batch;
        // The kernel counts tiles (and rounds of gridDim.x tiles) in an int.
        if tiles > (i32::MAX / 2) as usize {
            return Err(format!("{tiles} tiles"));
        }
        let map = |op, box_rows: usize| {
            tile_map(op, p.dtype, box_rows as u32).map_err(|e| format!("cuTensorMapEncodeTiled: {e:?}"))
        };
        let maps = [map(&call.q, block_m)?, map(&call.k, block_n)?, map(&call.v, block_n)?];
        Ok((tiles.min(sm_count as usize).max(1) as u32, maps))
    }

    /// How the modules were (or would be) loaded on the device, and which family runs, for
    /// diagnostics.
    pub(crate) fn image_description(&self) -> Option<String> {
        let image = self.kernels.image_description()?;
        let dev = self.kernels.device()?;
        if self.kernels.loaded().is_err() {
            return Some(image);
        }
        let sm90 = dev.caps.cc == ComputeCapability::new(9, 0);
        Some(match self.family(&dev.caps) {
            Family::FlashHopper => {
                let hopper = self.hopper_kernels.image_description().unwrap_or_default();
                let ws = if self.tma { " (warp-specialised TMA kernels for head_dim <= 128)" } else { "" };
                format!("{image}; Hopper wgmma kernels{ws}: module flash_hopper, {hopper}")
            }
            _ if self.hopper && sm90 => format!(
                "{image}; mma.sync kernels (the Hopper module is unavailable: {}; add 9.0a to \
                 ATTN_CUDA_ARCH_LIST for the Hopper kernels)",
                self.hopper_kernels.unavailable(&dev.caps).map(|r| r.to_string()).unwrap_or_default()
            ),
            _ => format!("{image}; mma.sync kernels"),
        })
    }
}

/// What flash runs: sm_80+ tensor cores, 16-bit types, head_dim a multiple of 8 up to
/// [`MAX_HEAD_DIM`], 16-byte vector loads.
const CAPABILITIES: Capabilities = Capabilities {
    min_cc: ComputeCapability::new(8, 0),
    dtypes: &[(DType::F16, ComputeCapability::new(8, 0)), (DType::BF16, ComputeCapability::new(8, 0))],
    dtypes_text: "f16, bf16",
    max_head_dim: |_| MAX_HEAD_DIM,
    head_dim_multiple: |_| 8,
    needs_alignment: true,
    varlen: true,
    max_query_rows: None,
    heads_and_batch_on_the_grid: true,
};

impl Backend for FlashBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Flash
    }

    /// One check per constraint, as PyTorch SDPA does, each reason naming what would change it.
    fn check(&self, caps: &DeviceCaps, problem: &Problem) -> Vec<Reason> {
        let mut reasons = CAPABILITIES.reasons(caps, problem);
        if caps.cc < CAPABILITIES.min_cc {
            return reasons;
        }
        // On a real device the modules are loaded here (once per process), and they decide the
        // family forward will run.
        let module = self.kernels.availability(caps);
        if !Capabilities::head_dim_rejected(&reasons) {
            if let Some(k) = self.kernel_for(self.family(caps), problem) {
                let needed = k.shared_bytes() as usize;
                if needed > caps.smem_per_block_optin {
                    reasons.push(Reason::SharedMemory { needed, available: caps.smem_per_block_optin });
                }
            }
        }
        reasons.extend(module.err());
        reasons
    }

    fn forward(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        let Some(dev) = self.kernels.device() else {
            return Err(RunError::Recoverable(Reason::NoDevice { why: "no device was probed".into() }));
        };
        // One module lookup: the Hopper module where it runs, else the mma.sync one.
        let (family, module) = match self.hopper_module(&dev.caps) {
            Some(Some(m)) => (Family::FlashHopper, m),
            _ => (Family::FlashMmaSync, self.kernels.loaded()?.1),
        };
        dev.prepare(call)?;
        let p = &call.problem;
        let no_kernel = || {
            RunError::Recoverable(Reason::Unusable { why: format!("no flash kernel for head_dim {}", p.head_dim) })
        };
        let mut k = self.kernel_for(family, p).ok_or_else(no_kernel)?;
        if k.family == Family::FlashHopperWs {
            match Self::ws_launch_args(call, k, dev.caps.sm_count) {
                Ok((blocks, maps)) => {
                    let func = module.launchable(k.name)?;
                    return launch_persistent(func, call, blocks, k.threads() as usize, k.dynamic_smem() as usize, maps);
                }
                Err(why) => {
                    log::debug!("flash: warp-specialised kernel not used ({why}); running the cp.async one");
                    k = self.cp_async_kernel(Family::FlashHopper, p).ok_or_else(no_kernel)?;
                }
            }
        }
        let func = module.launchable(k.name)?;
        launch_fused(func, call, k.block_m() as usize, k.threads() as usize, k.dynamic_smem() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::{KernelBuild, Nvrtc, SimulatedGpu};

    /// Which kernel each device and problem gets (no device: a simulated one, whose Hopper
    /// module comes from this build's sm_90a image or from its simulated NVRTC).
    #[test]
    fn kernel_choice_follows_device_problem_and_settings() {
        let (h100, a100) = (DeviceCaps::simulated(SimulatedGpu::H100), DeviceCaps::simulated(SimulatedGpu::A100));
        let all = FlashBackend::new(None, JitMode::Auto, None, true, true);
        let pick = |b: &FlashBackend, caps: &DeviceCaps, p: Problem| b.kernel_for(b.family(caps), &p).unwrap().family;
        let p = |d: usize, s: usize| Problem::new(DType::BF16, 2, s, s, 8, 2, d);
        // sm_90: the warp-specialised kernel for head_dim <= 128 on fixed-length batches, causal
        // or not; packed batches and d > 128 load with cp.async.
        for d in [8, 64, 72, 128] {
            assert_eq!(pick(&all, &h100, p(d, 300)), Family::FlashHopperWs, "d={d}");
            assert_eq!(pick(&all, &h100, p(d, 300).causal(true)), Family::FlashHopperWs, "d={d}");
            assert_eq!(pick(&all, &h100, p(d, 300).varlen(true)), Family::FlashHopper, "d={d}");
        }
        assert_eq!(pick(&all, &h100, p(128, 4096).varlen(true)), Family::FlashHopperWide);
        assert_eq!(pick(&all, &h100, p(64, 4096).varlen(true)), Family::FlashHopper);
        assert_eq!(pick(&all, &h100, p(256, 300)), Family::FlashHopper);
        assert_eq!(pick(&all, &h100, p(256, 4096)), Family::FlashHopper);
        // ATTN_FLASH_TMA=0 and ATTN_FLASH_HOPPER=0.
        let no_tma = FlashBackend::new(None, JitMode::Auto, None, true, false);
        assert_eq!(pick(&no_tma, &h100, p(128, 300)), Family::FlashHopper);
        assert_eq!(pick(&no_tma, &h100, p(128, 4096)), Family::FlashHopperWide);
        let no_hopper = FlashBackend::new(None, JitMode::Auto, None, false, true);
        assert_eq!(pick(&no_hopper, &h100, p(128, 300)), Family::FlashMmaSync);
        // Every other arch runs mma.sync.
        assert_eq!(pick(&all, &a100, p(128, 300)), Family::FlashMmaSync);
        // No sm_90a image and no NVRTC, or emulating sm_90 on a newer device: mma.sync.
        let no_image = h100.clone().with_kernels(KernelBuild::nvcc("8.0;9.0")).with_nvrtc(Nvrtc::Missing("test".into()));
        assert_eq!(pick(&all, &no_image, p(128, 300)), Family::FlashMmaSync);
        let with_image = h100.clone().with_kernels(KernelBuild::nvcc("8.0;9.0a")).with_nvrtc(Nvrtc::Missing("test".into()));
        assert_eq!(pick(&all, &with_image, p(128, 300)), Family::FlashHopperWs);
        let emulated = DeviceCaps::simulated(SimulatedGpu::B200).emulating(ComputeCapability::new(9, 0)).unwrap();
        assert_eq!(pick(&all, &emulated, p(128, 300)), Family::FlashMmaSync);
        // The shared memory every choice needs fits the H100's opt-in limit.
        for d in (8..=256).step_by(8) {
            for varlen in [false, true] {
                let q = p(d, 4096).varlen(varlen);
                let k = all.kernel_for(all.family(&h100), &q).unwrap();
                assert!(k.shared_bytes() as usize <= h100.smem_per_block_optin, "{k:?}");
            }
        }
    }

    #[test]
    fn specialisations_cover_every_multiple_of_8() {
        for family in [Family::FlashMmaSync, Family::FlashHopper, Family::FlashHopperWs] {
            for dtype in [DType::F16, DType::BF16] {
                for d in (8..=MAX_HEAD_DIM).step_by(8) {
                    let Some(k) = specialisation(family, dtype, d) else {
                        assert!(family == Family::FlashHopperWs && d > 128, "{family:?} d={d}");
                        continue;
                    };
                    assert!(k.head_dim as usize >= d && [64, 128, 256].contains(&k.head_dim) && k.block_m() == 128);
                    assert!(FUNCTIONS.contains(&k.name) || HOPPER_FUNCTIONS.contains(&k.name));
                }
            }
        }
        assert_eq!(specialisation(Family::FlashHopperWide, DType::F16, 128).unwrap().block_m(), 192);
        assert!(specialisation(Family::FlashMmaSync, DType::F16, MAX_HEAD_DIM + 8).is_none());
        // The d=256 kernels fit the A100/H100 opt-in limits but not a 64 KiB-limited part.
        assert_eq!(specialisation(Family::FlashMmaSync, DType::F16, 256).unwrap().shared_bytes(), 90112);
        assert!(specialisation(Family::FlashHopper, DType::BF16, 256).unwrap().shared_bytes() <= 227 * 1024);
        // Warp-specialised: 12 warps (one producer warpgroup).
        assert_eq!(specialisation(Family::FlashHopperWs, DType::F16, 128).unwrap().warps(), 12);
    }
}
