//! Every `ATTN_*` environment variable is read here, and only here.
//!
//! | variable | values | default | effect |
//! |---|---|---|---|
//! | `ATTN_BACKEND` | `flash`, `mem_efficient` (`xformers`), `naive`, `cpu` | ranked choice | use only this backend; if it cannot run a problem that is an error with its reasons |
//! | `ATTN_DISABLE` | comma-separated backend names | none | take these backends out of the chain |
//! | `ATTN_STRICT` | `0`/`1` (`true`/`false`, `yes`/`no`, `on`/`off`) | `0` | falling back below the best backend for the device is an error |
//! | `ATTN_JIT` | `auto`, `always`, `never` | `auto` | when NVRTC compiles kernels (see [`JitMode`]) |
//! | `ATTN_CACHE_DIR` | a directory | `$XDG_CACHE_HOME/attention` or `~/.cache/attention` | where JIT-compiled kernels are cached |
//! | `ATTN_DEVICE` | a CUDA device ordinal | `0` | which GPU `select()` probes (after `CUDA_VISIBLE_DEVICES`) |
//! | `ATTN_NAIVE_WORKSPACE_MB` | a positive integer | `256` | cap on the naive backend's score workspace |
//! | `ATTN_CPU_THREADS` | a positive integer | all cores | threads of the CPU backend |
//! | `ATTN_ALLOW_TF32` | `0`/`1` | `0` (or `1` when `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`) | f32 inputs may run on TF32 tensor cores, as PyTorch's `allow_tf32`; [`crate::Options::allow_tf32`] sets it per call |
//! | `ATTN_FLASH_HOPPER` | `0`/`1` | `1` | on sm_90 (H100, H200), run flash's Hopper (wgmma) kernels when the image has sm_90a code; `0` runs the mma.sync kernels every sm_80+ GPU runs |
//! | `ATTN_FLASH_TMA` | `0`/`1` | `1` | with the Hopper kernels, run head_dim ≤ 128 on fixed-length batches in flash's warp-specialised kernel (TMA loads, persistent grid); `0` keeps the cp.async wgmma kernels |
//! | `ATTN_EMULATE_ARCH` | a compute capability, e.g. `7.5` | unset | testing only: run every kernel as the named older arch's code (NVRTC PTX, compiled by the driver) and choose backends as on such a device; see [`Settings::emulate_arch`] |
//!
//! An empty value counts as unset. Any other invalid value is an [`Error::InvalidSetting`]
//! naming the variable, the value and what is accepted; nothing is silently ignored.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::backend::BackendKind;
use crate::error::Error;

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

/// The default cap on the naive backend's f32 score workspace, in MiB.
pub const DEFAULT_NAIVE_WORKSPACE_MB: usize = 256;

/// The configuration `select()` starts from: the `ATTN_*` variables, parsed and validated.
/// [`crate::Selector`] starts from this and lets code override each field.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `ATTN_DEVICE`.
    pub device: usize,
    /// `ATTN_BACKEND`.
    pub backend: Option<BackendKind>,
    /// `ATTN_DISABLE`.
    pub disabled: Vec<BackendKind>,
    /// `ATTN_STRICT`.
    pub strict: bool,
    /// `ATTN_JIT`.
    pub jit: JitMode,
    /// `ATTN_CACHE_DIR`, else the default under `$XDG_CACHE_HOME` or `~/.cache`; `None` when
    /// neither a cache dir nor a home directory is known (JIT then compiles every process).
    pub cache_dir: Option<PathBuf>,
    /// `ATTN_NAIVE_WORKSPACE_MB`.
    pub naive_workspace_mb: usize,
    /// `ATTN_CPU_THREADS`; `None` means all available cores.
    pub cpu_threads: Option<usize>,
    /// `ATTN_FLASH_HOPPER`: flash may run its Hopper (wgmma) kernels on sm_90.
    pub flash_hopper: bool,
    /// `ATTN_FLASH_TMA`: with the Hopper kernels, flash may run its warp-specialised TMA kernel.
    pub flash_tma: bool,
    /// `ATTN_ALLOW_TF32` (or PyTorch's `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE`): f32 may use TF32.
    pub allow_tf32: bool,
    /// `ATTN_EMULATE_ARCH`, for testing code paths of GPUs you do not have: the device is
    /// described to every backend with this (older or equal) compute capability and its
    /// shared-memory limit, and every kernel module is compiled by NVRTC to that arch's PTX,
    /// which the driver compiles for the real device. The exact code a T4 runs
    /// (`7.5`) then runs on an H100. Needs libnvrtc.
    pub emulate_arch: Option<crate::caps::ComputeCapability>,
}

impl Default for Settings {
    /// The settings with no variable set (and no cache directory).
    fn default() -> Self {
        Settings {
            device: 0,
            backend: None,
            disabled: Vec::new(),
            strict: false,
            jit: JitMode::Auto,
            cache_dir: None,
            naive_workspace_mb: DEFAULT_NAIVE_WORKSPACE_MB,
            cpu_threads: None,
            flash_hopper: true,
            flash_tma: true,
            allow_tf32: false,
            emulate_arch: None,
        }
    }
}

/// Names of the variables this module reads, for diagnostics.
pub const VARIABLES: [&str; 13] = [
    "ATTN_BACKEND",
    "ATTN_DISABLE",
    "ATTN_STRICT",
    "ATTN_JIT",
    "ATTN_CACHE_DIR",
    "ATTN_DEVICE",
    "ATTN_NAIVE_WORKSPACE_MB",
    "ATTN_CPU_THREADS",
    "ATTN_FLASH_HOPPER",
    "ATTN_FLASH_TMA",
    "ATTN_ALLOW_TF32",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "ATTN_EMULATE_ARCH",
];

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Parses settings from any variable lookup (a map in tests, the environment in
    /// [`Settings::from_env`]). `XDG_CACHE_HOME` and `HOME` are looked up for the cache default.
    ///
    /// ```
    /// use attention::{BackendKind, Settings};
    /// let s = Settings::from_lookup(|k| match k {
    ///     "ATTN_BACKEND" => Some("naive".into()),
    ///     "ATTN_DISABLE" => Some("flash, xformers".into()),
    ///     _ => None,
    /// }).unwrap();
    /// assert_eq!(s.backend, Some(BackendKind::Naive));
    /// assert_eq!(s.disabled, vec![BackendKind::Flash, BackendKind::MemEfficient]);
    /// let e = Settings::from_lookup(|k| (k == "ATTN_JIT").then(|| "sometimes".into())).unwrap_err();
    /// assert!(e.to_string().contains("ATTN_JIT") && e.to_string().contains("auto, always, never"));
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, Error> {
        let get = |var: &'static str| -> Result<Option<String>, Error> {
            match lookup(var) {
                None => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) if s.trim().is_empty() => Ok(None),
                    Ok(s) => Ok(Some(s.trim().to_string())),
                    Err(raw) => Err(Error::InvalidSetting {
                        var,
                        value: raw.to_string_lossy().into_owned(),
                        expected: "valid UTF-8".into(),
                    }),
                },
            }
        };
        let mut s = Settings::default();
        if let Some(v) = get("ATTN_DEVICE")? {
            s.device = parse_count("ATTN_DEVICE", &v, 0, "a CUDA device ordinal (0, 1, ...)")?;
        }
        if let Some(v) = get("ATTN_BACKEND")? {
            s.backend = Some(parse_backend("ATTN_BACKEND", &v)?);
        }
        if let Some(v) = get("ATTN_DISABLE")? {
            for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let kind = parse_backend("ATTN_DISABLE", name)?;
                if !s.disabled.contains(&kind) {
                    s.disabled.push(kind);
                }
            }
        }
        if let Some(v) = get("ATTN_STRICT")? {
            s.strict = parse_bool("ATTN_STRICT", &v)?;
        }
        if let Some(v) = get("ATTN_JIT")? {
            s.jit = parse_jit(&v)?;
        }
        s.cache_dir = match lookup("ATTN_CACHE_DIR").filter(|v| !v.is_empty()) {
            Some(dir) => Some(PathBuf::from(dir)),
            None => crate::gpu::cache::default_cache_dir(
                lookup("XDG_CACHE_HOME").as_deref(),
                lookup("HOME").as_deref(),
            ),
        };
        if let Some(v) = get("ATTN_NAIVE_WORKSPACE_MB")? {
            s.naive_workspace_mb = parse_count(
                "ATTN_NAIVE_WORKSPACE_MB",
                &v,
                1,
                "a positive number of MiB, e.g. 256",
            )?;
        }
        if let Some(v) = get("ATTN_CPU_THREADS")? {
            s.cpu_threads = Some(parse_count(
                "ATTN_CPU_THREADS",
                &v,
                1,
                "a positive number of threads",
            )?);
        }
        if let Some(v) = get("ATTN_FLASH_HOPPER")? {
            s.flash_hopper = parse_bool("ATTN_FLASH_HOPPER", &v)?;
        }
        if let Some(v) = get("ATTN_FLASH_TMA")? {
            s.flash_tma = parse_bool("ATTN_FLASH_TMA", &v)?;
        }
        if let Some(v) = get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")? {
            s.allow_tf32 = parse_bool("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", &v)?;
        }
        // Ours wins over PyTorch's when both are set.
        if let Some(v) = get("ATTN_ALLOW_TF32")? {
            s.allow_tf32 = parse_bool("ATTN_ALLOW_TF32", &v)?;
        }
        if let Some(v) = get("ATTN_EMULATE_ARCH")? {
            s.emulate_arch = Some(parse_cc("ATTN_EMULATE_ARCH", &v)?);
        }
        Ok(s)
    }

    /// The variables that are set, with their values, for diagnostics (`doctor`).
    pub fn environment() -> Vec<(&'static str, String)> {
        VARIABLES
            .iter()
            .filter_map(|&v| std::env::var_os(v).map(|x| (v, x.to_string_lossy().into_owned())))
            .collect()
    }
}

/// `7.5`, `75` or `sm_75`.
pub(crate) fn parse_cc(var: &'static str, v: &str) -> Result<crate::caps::ComputeCapability, Error> {
    let bad = || Error::InvalidSetting {
        var,
        value: v.to_string(),
        expected: "a compute capability such as 7.5 (or sm_75), at least 7.0".into(),
    };
    let t = v.trim().trim_start_matches("sm_");
    let (major, minor) = match t.split_once('.') {
        Some((a, b)) => (a.parse::<u32>().map_err(|_| bad())?, b.parse::<u32>().map_err(|_| bad())?),
        None if t.len() >= 2 && t.chars().all(|c| c.is_ascii_digit()) => {
            let (a, b) = t.split_at(t.len() - 1);
            (a.parse::<u32>().map_err(|_| bad())?, b.parse::<u32>().map_err(|_| bad())?)
        }
        None => return Err(bad()),
    };
    if major < 7 || minor > 9 {
        return Err(bad());
    }
    Ok(crate::caps::ComputeCapability::new(major, minor))
}

fn parse_backend(var: &'static str, v: &str) -> Result<BackendKind, Error> {
    v.parse::<BackendKind>().map_err(|_| Error::InvalidSetting {
        var,
        value: v.to_string(),
        expected: format!("a backend name: {}", BackendKind::VALID_NAMES),
    })
}

pub(crate) fn parse_bool(var: &'static str, v: &str) -> Result<bool, Error> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::InvalidSetting {
            var,
            value: v.to_string(),
            expected: "1 or 0 (also true/false, yes/no, on/off)".into(),
        }),
    }
}

pub(crate) fn parse_jit(v: &str) -> Result<JitMode, Error> {
    match v.to_ascii_lowercase().as_str() {
        "auto" => Ok(JitMode::Auto),
        "always" | "1" => Ok(JitMode::Always),
        "never" | "0" => Ok(JitMode::Never),
        _ => Err(Error::InvalidSetting {
            var: "ATTN_JIT",
            value: v.to_string(),
            expected: "auto, always, never".into(),
        }),
    }
}

fn parse_count(var: &'static str, v: &str, min: usize, expected: &str) -> Result<usize, Error> {
    match v.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(Error::InvalidSetting {
            var,
            value: v.to_string(),
            expected: expected.to_string(),
        }),
    }
}
