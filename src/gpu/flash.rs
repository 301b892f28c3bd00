//! The FlashAttention-2-style backend: tiled online softmax on tensor cores (mma.sync
//! m16n8k16), for f16/bf16 on sm_80 and newer. Kernels are specialised for head_dim 64, 128 and
//! 256; other multiples of 8 run in the next specialisation up with zero-filled columns.
//! `forward` allocates nothing and never synchronises, so it can be captured in a CUDA graph.

use std::path::PathBuf;
use std::sync::Arc;


use super::device::{GpuDevice, Kernels, LoadedModule};
use super::params::{launch_fused, launch_persistent};
use super::tma::{tile_map, TensorMap};
use crate::backend::{Backend, BackendKind, Capabilities, Reason, RunError};
use crate::caps::{ComputeCapability, DeviceCaps};
use crate::dtype::DType;
use crate::problem::Problem;
use crate::settings::JitMode;
use crate::call::Call;

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

/// The sm_90a-only kernels, present only in sm_90a images: cuda/flash_hopper.cuh's (the first
/// eight), then the warp-specialised ones of cuda/flash_hopper_ws.cuh (head_dim ≤ 128).
const HOPPER_FUNCTIONS: [&str; 12] = [
    "attn_flash_hopper_fwd_f16_d64",
    "attn_flash_hopper_fwd_bf16_d64",
    "attn_flash_hopper_fwd_f16_d128",
    "attn_flash_hopper_fwd_bf16_d128",
    "attn_flash_hopper_fwd_f16_d256",
    "attn_flash_hopper_fwd_bf16_d256",
    "attn_flash_hopper_wide_fwd_f16_d128",
    "attn_flash_hopper_wide_fwd_bf16_d128",
    "attn_flash_ws_fwd_f16_d64",
    "attn_flash_ws_fwd_bf16_d64",
    "attn_flash_ws_fwd_f16_d128",
    "attn_flash_ws_fwd_bf16_d128",
];
/// The first warp-specialised kernel in `HOPPER_FUNCTIONS`: whether the image has that kind.
const FIRST_WS_FUNCTION: &str = HOPPER_FUNCTIONS[8];

/// The kernel families: mma.sync for every sm_80+ arch, wgmma for sm_90a.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// `flash_fwd` in cuda/flash.cu.
    MmaSync,
    /// `flash_hopper_fwd` in cuda/flash_hopper.cuh: warpgroup MMAs, double-buffered K and V.
    Hopper,
    /// The same with three warpgroups (192-row tiles) at d=128: more warps to hide latency on
    /// long unmasked rows, more wasted rows and a longer causal tail on short ones.
    HopperWide,
    /// `flash_hopper_ws_fwd` in cuda/flash_hopper_ws.cuh: FlashAttention-3's structure, a
    /// producer warpgroup loading through the copy engine (TMA) for two consumer warpgroups that
    /// take turns on the tensor cores, on a persistent grid. Fixed-length batches, head_dim up to
    /// 128.
    HopperWs,
}

/// One kernel specialisation; mirrors the `FLASH_ENTRY` / `FLASH_HOPPER_ENTRY` tables.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spec {
    family: Family,
    /// The head_dim the kernel is built for (problems up to it run with zero-filled columns).
    head_dim: usize,
    /// Keys per K/V tile.
    block_n: usize,
    /// Warps per block.
    warps: usize,
    /// m16 tiles per warp (mma.sync family).
    m_tiles: usize,
}

impl Spec {
    /// Query rows per block.
    fn block_m(&self) -> usize {
        match self.family {
            Family::MmaSync => self.warps * 16 * self.m_tiles,
            // One warpgroup (4 warps) per 64 rows.
            Family::Hopper | Family::HopperWide => self.warps * 16,
            // The first warpgroup is the producer.
            Family::HopperWs => (self.warps - 4) * 16,
        }
    }
    /// Dynamic shared memory of 16-bit tiles. mma.sync: Q, two K buffers and one V. Hopper: Q,
    /// two K and two V buffers, plus 1 KiB to align the base to wgmma's 1024-byte swizzle atoms
    /// (and, warp-specialised, 256 bytes of mbarriers).
    fn shared_bytes(&self) -> usize {
        match self.family {
            Family::MmaSync => (self.block_m() + 3 * self.block_n) * self.head_dim * 2,
            Family::Hopper | Family::HopperWide => (self.block_m() + 4 * self.block_n) * self.head_dim * 2 + 1024,
            Family::HopperWs => (self.block_m() + 4 * self.block_n) * self.head_dim * 2 + 1024 + 256,
        }
    }
    /// The kernel's name for a dtype.
    fn function(&self, dtype: DType) -> String {
        match self.family {
            Family::MmaSync => format!("attn_flash_fwd_{}_d{}", dtype.name(), self.head_dim),
            Family::Hopper => format!("attn_flash_hopper_fwd_{}_d{}", dtype.name(), self.head_dim),
            Family::HopperWide => format!("attn_flash_hopper_wide_fwd_{}_d{}", dtype.name(), self.head_dim),
            Family::HopperWs => format!("attn_flash_ws_fwd_{}_d{}", dtype.name(), self.head_dim),
        }
    }
}

/// The specialisation of `family` that runs `head_dim`.
fn specialisation(head_dim: usize, family: Family) -> Spec {
    let (head_dim, block_n, warps, m_tiles) = match (family, head_dim) {
        (Family::MmaSync, 0..=64) => (64, 64, 4, 2),
        (Family::MmaSync, 65..=128) => (128, 32, 4, 2),
        (Family::MmaSync, _) => (256, 16, 8, 1),
        (Family::Hopper, 0..=64) => (64, 64, 8, 0),
        (Family::Hopper, 65..=128) => (128, 128, 8, 0),
        (Family::Hopper, _) => (256, 64, 8, 0),
        (Family::HopperWide, _) => (128, 64, 12, 0),
        (Family::HopperWs, 0..=64) => (64, 128, 12, 0),
        (Family::HopperWs, _) => (128, 128, 12, 0),
    };
    Spec { family, head_dim, block_n, warps, m_tiles }
}

/// Whether the loaded image has an optional function; with no module (a simulated device, or
/// before loading) the default arch list's image is assumed, which has every one.
fn image_has(module: Option<&LoadedModule>, function: &str) -> bool {
    module.map_or(true, |m| m.function(function).is_some())
}

/// The flash backend on one device.
pub(crate) struct FlashBackend {
    kernels: Kernels,
    /// `ATTN_FLASH_HOPPER`: use the wgmma family where the image has it.
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
            kernels: Kernels::new(device, MODULE, &FUNCTIONS, jit, cache_dir).with_optional(&HOPPER_FUNCTIONS),
            hopper,
            tma,
        }
    }

    /// The family this device runs: Hopper's when allowed, the device is sm_90 and the loaded
    /// image holds it (an sm_90a cubin, or NVRTC for sm_90a); mma.sync otherwise.
    fn family(&self, caps: &DeviceCaps, module: Option<&LoadedModule>) -> Family {
        let hopper = self.hopper
            && caps.cc == ComputeCapability::new(9, 0)
            && image_has(module, HOPPER_FUNCTIONS[0]);
        if hopper {
            Family::Hopper
        } else {
            Family::MmaSync
        }
    }

    /// The kernel for a problem. Within the Hopper family: the warp-specialised kernel for
    /// fixed-length batches at head_dim ≤ 128 (when allowed and in the image); else the
    /// three-warpgroup d=128 kernel where it measured faster (unmasked rows, 2048 queries or
    /// more); else the two-warpgroup one.
    fn spec_for(&self, caps: &DeviceCaps, module: Option<&LoadedModule>, problem: &Problem) -> Spec {
        let family = self.family(caps, module);
        let ws = family == Family::Hopper
            && self.tma
            && problem.head_dim <= 128
            && !problem.varlen
            && image_has(module, FIRST_WS_FUNCTION);
        if ws {
            return specialisation(problem.head_dim, Family::HopperWs);
        }
        self.cp_async_spec(family, problem)
    }

    /// The kernel for a problem among those that load with cp.async.
    fn cp_async_spec(&self, family: Family, problem: &Problem) -> Spec {
        let unmasked = !problem.causal && problem.window == (None, None);
        let wide = family == Family::Hopper && (65..=128).contains(&problem.head_dim) && unmasked && problem.seqlen_q >= 2048;
        specialisation(problem.head_dim, if wide { Family::HopperWide } else { family })
    }

    /// The warp-specialised kernel's grid (blocks) and Q, K, V tensor maps, or why it cannot
    /// run the call (a tensor the copy engine cannot address, or more tiles than the kernel counts
    /// in an int): the caller then runs the cp.async kernel.
    fn ws_launch_args(call: &Call<'_>, spec: Spec, sm_count: u32) -> Result<(u32, [TensorMap; 3]), String> {
        let p = &call.problem;
        let tiles = p.seqlen_q.div_ceil(spec.block_m()) * p.heads * p.batch;
        // The kernel counts tiles (and rounds of gridDim.x tiles) in an int.
        if tiles > (i32::MAX / 2) as usize {
            return Err(format!("{tiles} tiles"));
        }
        let map = |op, box_rows: usize| {
            tile_map(op, p.dtype, box_rows as u32).map_err(|e| format!("cuTensorMapEncodeTiled: {e:?}"))
        };
        let maps = [map(&call.q, spec.block_m())?, map(&call.k, spec.block_n)?, map(&call.v, spec.block_n)?];
        Ok((tiles.min(sm_count as usize).max(1) as u32, maps))
    }

    /// How the module was (or would be) loaded on the device, and which family runs, for
    /// diagnostics.
    pub(crate) fn image_description(&self) -> Option<String> {
        let image = self.kernels.image_description()?;
        let dev = self.kernels.device()?;
        let family = match self.kernels.loaded() {
            Ok((_, m)) => self.family(&dev.caps, Some(&m)),
            Err(_) => return Some(image),
        };
        Some(match family {
            Family::Hopper | Family::HopperWide | Family::HopperWs if self.tma => {
                format!("{image}; Hopper wgmma kernels (warp-specialised TMA kernels for head_dim <= 128)")
            }
            Family::Hopper | Family::HopperWide | Family::HopperWs => format!("{image}; Hopper wgmma kernels"),
            Family::MmaSync if self.hopper && dev.caps.cc == ComputeCapability::new(9, 0) => format!(
                "{image}; mma.sync kernels (this image has no sm_90a code: add 9.0a to ATTN_CUDA_ARCH_LIST for the Hopper kernels)"
            ),
            Family::MmaSync => format!("{image}; mma.sync kernels"),
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
        // On a real device the module is loaded here (once per process), and it decides the
        // family forward will run; a simulated sm_90 is assumed to have the Hopper image.
        let module = self.kernels.availability(caps);
        if !Capabilities::head_dim_rejected(&reasons) {
            let loaded = module.as_ref().ok().and_then(|m| m.as_deref());
            let needed = self.spec_for(caps, loaded, problem).shared_bytes();
            if needed > caps.smem_per_block_optin {
                reasons.push(Reason::SharedMemory { needed, available: caps.smem_per_block_optin });
            }
        }
        reasons.extend(module.err());
        reasons
    }

    fn forward(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        let (dev, module) = self.kernels.loaded()?;
        dev.prepare(call)?;
        let p = &call.problem;
        let mut spec = self.spec_for(&dev.caps, Some(&module), p);
        if spec.family == Family::HopperWs {
            match Self::ws_launch_args(call, spec, dev.caps.sm_count) {
                Ok((blocks, maps)) => {
                    let func = module.launchable(&spec.function(p.dtype))?;
                    return launch_persistent(func, call, blocks, spec.warps * 32, spec.shared_bytes(), maps);
                }
                Err(why) => {
                    log::debug!("flash: warp-specialised kernel not used ({why}); running the cp.async one");
                    spec = self.cp_async_spec(Family::Hopper, p);
                }
            }
        }
        let func = module.launchable(&spec.function(p.dtype))?;
        launch_fused(func, call, spec.block_m(), spec.warps * 32, spec.shared_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::SimulatedGpu;

    /// Which kernel each device and problem gets (no device: the simulated image is assumed to
    /// hold every function, as the default arch list builds it).
    #[test]
    fn kernel_choice_follows_device_problem_and_settings() {
        let (h100, a100) = (DeviceCaps::simulated(SimulatedGpu::H100), DeviceCaps::simulated(SimulatedGpu::A100));
        let all = FlashBackend::new(None, JitMode::Auto, None, true, true);
        let pick = |b: &FlashBackend, caps: &DeviceCaps, p: Problem| b.spec_for(caps, None, &p).family;
        let p = |d: usize, s: usize| Problem::new(DType::BF16, 2, s, s, 8, 2, d);
        // sm_90: the warp-specialised kernel for head_dim <= 128 on fixed-length batches, causal
        // or not; packed batches and d > 128 load with cp.async.
        for d in [8, 64, 72, 128] {
            assert_eq!(pick(&all, &h100, p(d, 300)), Family::HopperWs, "d={d}");
            assert_eq!(pick(&all, &h100, p(d, 300).causal(true)), Family::HopperWs, "d={d}");
            assert_eq!(pick(&all, &h100, p(d, 300).varlen(true)), Family::Hopper, "d={d}");
        }
        assert_eq!(pick(&all, &h100, p(128, 4096).varlen(true)), Family::HopperWide);
        assert_eq!(pick(&all, &h100, p(256, 300)), Family::Hopper);
        // ATTN_FLASH_TMA=0 and ATTN_FLASH_HOPPER=0.
        let no_tma = FlashBackend::new(None, JitMode::Auto, None, true, false);
        assert_eq!(pick(&no_tma, &h100, p(128, 300)), Family::Hopper);
        assert_eq!(pick(&no_tma, &h100, p(128, 4096)), Family::HopperWide);
        let no_hopper = FlashBackend::new(None, JitMode::Auto, None, false, true);
        assert_eq!(pick(&no_hopper, &h100, p(128, 300)), Family::MmaSync);
        // Every other arch runs mma.sync.
        assert_eq!(pick(&all, &a100, p(128, 300)), Family::MmaSync);
        // The shared memory every choice needs fits the H100's opt-in limit.
        for d in (8..=256).step_by(8) {
            for varlen in [false, true] {
                let spec = all.spec_for(&h100, None, &p(d, 4096).varlen(varlen));
                assert!(spec.shared_bytes() <= h100.smem_per_block_optin, "{spec:?}");
            }
        }
    }
    #[test]
    fn specialisations_cover_every_multiple_of_8() {
        for family in [Family::MmaSync, Family::Hopper, Family::HopperWs] {
            for d in (8..=256).step_by(8) {
                let s = specialisation(d, family);
                if family == Family::HopperWs && d > 128 {
                    continue; // the host never picks it there
                }
                assert!(s.head_dim >= d && [64, 128, 256].contains(&s.head_dim) && s.block_m() == 128);
            }
        }
        assert_eq!(specialisation(128, Family::HopperWide).block_m(), 192);
        // The d=256 kernel fits the A100/H100 opt-in limit but not a 64 KiB-limited part.
        assert_eq!(specialisation(256, Family::MmaSync).shared_bytes(), 90112);
        assert_eq!(specialisation(128, Family::MmaSync).shared_bytes(), 57344);
        assert_eq!(specialisation(64, Family::MmaSync).shared_bytes(), 40960);
        // Hopper: Q + 2 K + 2 V tiles + alignment; all within the H100's 227 KiB.
        assert_eq!(specialisation(64, Family::Hopper).shared_bytes(), 50176);
        assert_eq!(specialisation(128, Family::Hopper).shared_bytes(), 164864);
        assert_eq!(specialisation(128, Family::HopperWide).shared_bytes(), 115712);
        assert_eq!(specialisation(256, Family::Hopper).shared_bytes(), 197632);
        assert!(specialisation(256, Family::Hopper).shared_bytes() <= 227 * 1024);
        // Warp-specialised: 12 warps (one producer warpgroup), Q + 2 K + 2 V + barriers.
        assert_eq!(specialisation(128, Family::HopperWs).warps, 12);
        assert_eq!(specialisation(128, Family::HopperWs).shared_bytes(), 163840 + 1024 + 256);
        assert_eq!(specialisation(64, Family::HopperWs).shared_bytes(), 81920 + 1024 + 256);
    }
}
