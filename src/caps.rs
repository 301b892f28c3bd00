//! What a device can do, read once per device, or described by hand for simulated devices.

use std::fmt;

use crate::arch::{self, ArchSpec, ImageMatch};
pub use crate::arch::ComputeCapability;
use crate::reason::Reason;

/// When kernels are compiled at run time with NVRTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum JitMode {
    /// Use the kernels nvcc embedded at build time; compile with NVRTC only when they hold no
    /// image for the device (or were not built at all).
    #[default]
    Auto,
    /// Always compile with NVRTC for the device's exact arch, ignoring embedded images.
    Always,
    /// Never compile at run time: a device without an embedded image gets no GPU backend.
    Never,
}

impl JitMode {
    /// The setting's spelling.
    pub const fn name(self) -> &'static str {
        match self {
            JitMode::Auto => "auto",
            JitMode::Always => "always",
            JitMode::Never => "never",
        }
    }
}

impl std::fmt::Display for JitMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How this build of the crate carries its kernels.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct KernelBuild {
    /// nvcc compiled fatbins ahead of time (else only sources are embedded, for NVRTC).
    pub built_with_nvcc: bool,
    /// nvcc's version, "" without nvcc.
    pub nvcc_version: String,
    /// The arches the fatbins hold (also set, as requested, without nvcc).
    pub arch_list: Vec<ArchSpec>,
    /// Where the list came from (`ATTN_CUDA_ARCH_LIST`, `TORCH_CUDA_ARCH_LIST` or `default`).
    pub arch_list_source: String,
}

impl KernelBuild {
    /// What this build of the crate embeds.
    pub fn embedded() -> Self {
        use crate::gpu::embedded as e;
        KernelBuild {
            built_with_nvcc: e::BUILT_WITH_NVCC,
            nvcc_version: e::NVCC_VERSION.to_string(),
            arch_list: arch::parse_arch_list(e::ARCH_LIST).unwrap_or_default(),
            arch_list_source: e::ARCH_LIST_SOURCE.to_string(),
        }
    }

    /// A build made by nvcc for `list` (PyTorch format), for simulations.
    pub fn nvcc(list: &str) -> Self {
        KernelBuild {
            built_with_nvcc: true,
            nvcc_version: "simulated".into(),
            arch_list: arch::parse_arch_list(list).unwrap_or_default(),
            arch_list_source: "simulated".into(),
        }
    }

    /// A build without nvcc (sources only), for simulations.
    pub fn jit_only() -> Self {
        KernelBuild {
            built_with_nvcc: false,
            nvcc_version: String::new(),
            arch_list: arch::parse_arch_list(arch::DEFAULT_ARCH_LIST).unwrap_or_default(),
            arch_list_source: "default".into(),
        }
    }

    /// The normalised arch list, or "" without nvcc.
    pub fn built_for(&self) -> String {
        if self.built_with_nvcc {
            arch::format_arch_list(&self.arch_list)
        } else {
            String::new()
        }
    }
}

/// Whether NVRTC (run-time compilation) can be used, and its version.
#[derive(Clone, Debug, PartialEq)]
pub enum Nvrtc {
    /// libnvrtc loaded; its version.
    Available {
        /// (major, minor), e.g. (13, 0).
        version: (u32, u32),
    },
    /// Not usable, and why.
    Missing(String),
}

impl Nvrtc {
    /// The oldest arch this NVRTC can compile for: CUDA 13 dropped everything before Turing.
    pub fn min_arch(&self) -> Option<ComputeCapability> {
        match self {
            Nvrtc::Available { version } if version.0 >= 13 => Some(ComputeCapability::new(7, 5)),
            Nvrtc::Available { version } if version.0 >= 12 => Some(ComputeCapability::new(5, 0)),
            Nvrtc::Available { .. } => Some(ComputeCapability::new(3, 5)),
            Nvrtc::Missing(_) => None,
        }
    }
}

/// What a device can do. Read once per device by `select()`; build one by hand with
/// [`DeviceCaps::simulated`] to see what the crate would choose on a GPU you do not have.
///
/// ```
/// use attention::{DeviceCaps, SimulatedGpu};
/// let t4 = DeviceCaps::simulated(SimulatedGpu::T4);
/// assert_eq!(t4.cc.to_string(), "7.5");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DeviceCaps {
    /// CUDA device ordinal (after `CUDA_VISIBLE_DEVICES`).
    pub ordinal: usize,
    /// The device's name.
    pub name: String,
    /// Compute capability.
    pub cc: ComputeCapability,
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Shared memory a block can opt in to, in bytes.
    pub smem_per_block_optin: usize,
    /// Total device memory, bytes.
    pub total_mem: usize,
    /// Free device memory when probed, bytes.
    pub free_mem: usize,
    /// The driver's CUDA version (major, minor), e.g. (13, 0).
    pub driver_version: (u32, u32),
    /// The kernels this build of the crate carries.
    pub kernels: KernelBuild,
    /// NVRTC availability.
    pub nvrtc: Nvrtc,
    /// True for a hand-built description (no device behind it).
    pub simulated: bool,
    /// Set under `ATTN_EMULATE_ARCH`: the real device's compute capability, while `cc` and
    /// the shared-memory limit describe the emulated one.
    pub emulated_from: Option<ComputeCapability>,
}

/// GPUs whose capabilities can be simulated, for tests and `explain` on hardware you lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimulatedGpu {
    /// Tesla P100 (Pascal, 6.0).
    P100,
    /// Tesla V100 (Volta, 7.0).
    V100,
    /// Tesla T4 (Turing, 7.5).
    T4,
    /// A100 (Ampere, 8.0).
    A100,
    /// A10 (Ampere, 8.6); the RTX 3090 has the same capability.
    A10,
    /// RTX 4090 (Ada, 8.9).
    Rtx4090,
    /// H100 SXM (Hopper, 9.0).
    H100,
    /// B200 (Blackwell, 10.0).
    B200,
    /// RTX 5090 (Blackwell consumer, 12.0).
    Rtx5090,
}

impl SimulatedGpu {
    /// Every preset.
    pub const ALL: [SimulatedGpu; 9] = [
        SimulatedGpu::P100,
        SimulatedGpu::V100,
        SimulatedGpu::T4,
        SimulatedGpu::A100,
        SimulatedGpu::A10,
        SimulatedGpu::Rtx4090,
        SimulatedGpu::H100,
        SimulatedGpu::B200,
        SimulatedGpu::Rtx5090,
    ];
}

const GIB: usize = 1 << 30;

impl DeviceCaps {
    /// A simulated device with this crate's embedded kernels and NVRTC 13.0 available.
    pub fn simulated(gpu: SimulatedGpu) -> Self {
        let (name, cc, sms, smem_kib, mem_gib) = match gpu {
            SimulatedGpu::P100 => ("Tesla P100-PCIE-16GB", (6, 0), 56, 48, 16),
            SimulatedGpu::V100 => ("Tesla V100-SXM2-32GB", (7, 0), 80, 96, 32),
            SimulatedGpu::T4 => ("Tesla T4", (7, 5), 40, 64, 16),
            SimulatedGpu::A100 => ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 163, 80),
            SimulatedGpu::A10 => ("NVIDIA A10", (8, 6), 72, 99, 24),
            SimulatedGpu::Rtx4090 => ("NVIDIA GeForce RTX 4090", (8, 9), 128, 99, 24),
            SimulatedGpu::H100 => ("NVIDIA H100 80GB HBM3", (9, 0), 132, 227, 80),
            SimulatedGpu::B200 => ("NVIDIA B200", (10, 0), 148, 227, 180),
            SimulatedGpu::Rtx5090 => ("NVIDIA GeForce RTX 5090", (12, 0), 170, 99, 32),
        };
        DeviceCaps {
            ordinal: 0,
            name: name.to_string(),
            cc: ComputeCapability::new(cc.0, cc.1),
            sm_count: sms,
            smem_per_block_optin: smem_kib * 1024,
            total_mem: mem_gib * GIB,
            free_mem: mem_gib * GIB - GIB / 2,
            driver_version: (13, 0),
            kernels: KernelBuild::embedded(),
            nvrtc: Nvrtc::Available { version: (13, 0) },
            simulated: true,
            emulated_from: None,
        }
    }

    /// These capabilities as a device of compute capability `arch` would have them (for
    /// `ATTN_EMULATE_ARCH`): `cc` becomes `arch` and the shared-memory limit that arch's
    /// (the smaller of the two). `None` when `arch` is newer than the device.
    pub fn emulating(&self, arch: ComputeCapability) -> Option<Self> {
        if arch > self.cc {
            return None;
        }
        // Opt-in shared memory per block by arch (CUDA programming guide, compute capabilities).
        let limit_kib = match (arch.major, arch.minor) {
            (7, 0) | (7, 2) => 96,
            (7, _) => 64,
            (8, 0) => 163,
            (8, 7) => 163,
            (8, _) => 99,
            (9, _) | (10, _) => 227,
            _ => 99,
        };
        let mut caps = self.clone();
        caps.emulated_from = Some(self.cc);
        caps.name = format!("{} (emulating sm_{}{})", self.name, arch.major, arch.minor);
        caps.cc = arch;
        caps.smem_per_block_optin = self.smem_per_block_optin.min(limit_kib * 1024);
        Some(caps)
    }

    /// Replace the kernel build (e.g. [`KernelBuild::nvcc`]`("8.0")`) of a simulated device.
    #[must_use]
    pub fn with_kernels(mut self, kernels: KernelBuild) -> Self {
        self.kernels = kernels;
        self
    }

    /// Replace the NVRTC availability of a simulated device.
    #[must_use]
    pub fn with_nvrtc(mut self, nvrtc: Nvrtc) -> Self {
        self.nvrtc = nvrtc;
        self
    }

    /// True when a real device stands behind these capabilities.
    pub fn is_real(&self) -> bool {
        !self.simulated
    }

    /// How a kernel module would get an image on this device under `jit`: from the embedded
    /// fatbin, by NVRTC, or not at all (with the reason, naming the fix).
    pub fn kernel_source(&self, jit: JitMode, min_arch: ComputeCapability) -> Result<ImageSource, Reason> {
        self.module_source(jit, &ArchSpec::new(min_arch.major, min_arch.minor))
    }

    /// [`DeviceCaps::kernel_source`] for a module whose minimum arch may be arch-specific
    /// (`9.0a`: flash's Hopper module): such a module runs only on exactly that compute
    /// capability, from an image built for its arch-specific target (an embedded `9.0a` entry,
    /// or NVRTC, which compiles sm_90 as sm_90a), never from emulation's PTX.
    pub(crate) fn module_source(&self, jit: JitMode, min: &ArchSpec) -> Result<ImageSource, Reason> {
        // Names for messages only: formatted where a message is made (not on every lookup).
        let device = || self.cc.sm();
        let min_arch = ComputeCapability::new(min.major, min.minor);
        if self.cc < min_arch {
            return Err(Reason::ComputeCapability { needed: min_arch, found: self.cc });
        }
        if min.suffix != arch::ArchSuffix::None {
            let device_spec = ArchSpec { suffix: min.suffix, ..ArchSpec::new(self.cc.major, self.cc.minor) };
            if !device_spec.provides(min) {
                return Err(Reason::Unusable {
                    why: format!("the kernels are built for {} only, and the device is {}", min.sm(), device()),
                });
            }
            if self.emulated_from.is_some() {
                return Err(Reason::Jit {
                    why: format!("ATTN_EMULATE_ARCH runs {} PTX, which cannot hold {} code", ArchSpec::new(self.cc.major, self.cc.minor).compute(), min.sm()),
                });
            }
        }
        if self.emulated_from.is_some() {
            // Emulation runs the older arch's PTX, which only NVRTC makes.
            return match &self.nvrtc {
                Nvrtc::Available { .. } => Ok(ImageSource::EmulatedPtx(self.cc)),
                Nvrtc::Missing(why) => Err(Reason::Jit {
                    why: format!("ATTN_EMULATE_ARCH needs NVRTC to compile {} PTX, and {why}", device()),
                }),
            };
        }
        let nvrtc_why = || -> Option<String> {
            match (&self.nvrtc, self.nvrtc.min_arch()) {
                (Nvrtc::Missing(why), _) => Some(format!("NVRTC is unavailable ({why})")),
                (Nvrtc::Available { version }, Some(min)) if self.cc < min => Some(format!(
                    "NVRTC {}.{} cannot compile for {} (oldest: {})",
                    version.0,
                    version.1,
                    device(),
                    min.sm()
                )),
                _ => None,
            }
        };
        if jit == JitMode::Always {
            return match nvrtc_why() {
                None => Ok(ImageSource::Jit),
                Some(why) => Err(Reason::Jit {
                    why: format!("ATTN_JIT=always, but {why}"),
                }),
            };
        }
        if self.kernels.built_with_nvcc {
            let usable: Vec<ArchSpec> = self
                .kernels
                .arch_list
                .iter()
                .copied()
                .filter(|a| a.provides(min))
                .collect();
            match arch::best_image(&usable, (self.cc.major, self.cc.minor)) {
                ImageMatch::None => {}
                m => return Ok(ImageSource::Embedded(m)),
            }
        }
        let jit_why = if jit == JitMode::Never {
            Some("JIT is off (ATTN_JIT=never)".to_string())
        } else {
            nvrtc_why()
        };
        match jit_why {
            None => Ok(ImageSource::Jit),
            Some(jit) => Err(Reason::NoKernelImage {
                built_for: self.kernels.built_for(),
                device: device(),
                jit,
            }),
        }
    }
}

/// Where a kernel module's image comes from on a device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ImageSource {
    /// The fatbin nvcc embedded: native code or PTX the driver compiles.
    Embedded(ImageMatch),
    /// Compiled by NVRTC for the device's exact arch (cached on disk).
    Jit,
    /// `ATTN_EMULATE_ARCH`: PTX for this older arch from NVRTC, compiled by the driver.
    EmulatedPtx(ComputeCapability),
}

impl ImageSource {
    /// The arch the image's code was compiled for (its `__CUDA_ARCH__`) on a device of
    /// compute capability `device`: what decides which instructions a kernel holds, e.g.
    /// whether a consumer waits for a programmatic dependent launch's producer.
    pub fn compiled_for(&self, device: ComputeCapability) -> ComputeCapability {
        match self {
            ImageSource::Embedded(ImageMatch::Sass(a) | ImageMatch::Ptx(a)) => ComputeCapability::new(a.major, a.minor),
            ImageSource::Embedded(ImageMatch::None) | ImageSource::Jit => device,
            ImageSource::EmulatedPtx(cc) => *cc,
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Embedded(ImageMatch::Sass(a)) => write!(f, "embedded {} cubin", a.sm()),
            ImageSource::Embedded(ImageMatch::Ptx(a)) => {
                write!(f, "embedded PTX for {}, compiled by the driver", a)
            }
            ImageSource::Embedded(ImageMatch::None) => write!(f, "none"),
            ImageSource::Jit => write!(f, "NVRTC"),
            ImageSource::EmulatedPtx(cc) => {
                write!(f, "NVRTC PTX for compute_{}{} (ATTN_EMULATE_ARCH), compiled by the driver", cc.major, cc.minor)
            }
        }
    }
}
