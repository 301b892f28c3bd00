//! Every `ATTN_*` environment variable is read here, and only here.
//!
//! | variable | values | default | effect |
//! |---|---|---|---|
//! | `ATTN_BACKEND` | `flash`, `mem_efficient` (`xformers`), `naive`, `cpu` | ranked choice | use only this backend; if it cannot run a problem that is an error with its reasons |
//! | `ATTN_DISABLE` | comma-separated backend names | none | take these backends out of the chain |
//! | `ATTN_STRICT` | `0`/`1` (`true`/`false`, `yes`/`no`, `on`/`off`) | `0` | falling back below the best backend for the device is an error |
//! | `ATTN_JIT` | `auto`, `always`, `never` | `auto` | when NVRTC compiles kernels (see [`JitMode`]) |
//! | `ATTN_CACHE_DIR` | an absolute directory path (need not exist; not an existing file; any bytes but NUL) | `$XDG_CACHE_HOME/attention` or `~/.cache/attention` | where JIT-compiled kernels are cached |
//! | `ATTN_DEVICE` | a CUDA device ordinal | `0` | which GPU `select()` probes (after `CUDA_VISIBLE_DEVICES`); an ordinal no visible device has is an error at `select()`, except `0` on a machine without a GPU (CPU-only handle) |
//! | `ATTN_NAIVE_WORKSPACE_MB` | an integer from 1 to [`MAX_NAIVE_WORKSPACE_MB`] (1 TiB) | `256` | cap on the naive backend's score workspace |
//! | `ATTN_CPU_THREADS` | an integer from 1 to [`MAX_CPU_THREADS`] (1024) | all cores | threads of the CPU backend |
//! | `ATTN_ALLOW_TF32` | `0`/`1` | `0` (or `1` when `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`) | f32 inputs may run on TF32 tensor cores, as PyTorch's `allow_tf32`; [`crate::Options::allow_tf32`] sets it per call |
//! | `ATTN_FLASH_HOPPER` | `0`/`1` | `1` | on sm_90 (H100, H200), run flash's Hopper (wgmma) kernels (module flash_hopper: the build's 9.0a image, else NVRTC where JIT is allowed); `0` runs the mma.sync kernels every sm_80+ GPU runs |
//! | `ATTN_FLASH_TMA` | `0`/`1` | `1` | with the Hopper kernels, run head_dim ≤ 128 on fixed-length batches in flash's warp-specialised kernel (TMA loads, persistent grid); `0` keeps the cp.async wgmma kernels |
//! | `ATTN_EMULATE_ARCH` | a compute capability `M.m`, `Mm` or `sm_Mm`, major 7 to 12: `7.5`, `75`, `sm_75`, `12.0`, `sm_120` | unset | testing only: run every kernel as the named older arch's code (NVRTC PTX, compiled by the driver) and choose backends as on such a device; see [`Settings::emulate_arch`] |
//!
//! An empty or whitespace-only value counts as unset. Any other invalid value is an
//! [`Error::InvalidSetting`] naming the variable, the value (its first 64 characters and its
//! length, if longer) and what is accepted; nothing is silently ignored. Values set in code
//! through [`crate::Selector`] are held to the same rules by [`Settings::validate`].
//!
//! A variable named `ATTN_*` that is none of these (a typo such as `ATTN_BACKND`) would be
//! ignored, so [`unknown_variable_warnings`] names it, with the closest valid name, for
//! `select()` to log once. The build script's, tests' and CI scripts' own `ATTN_*` variables
//! are not warned about.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use crate::reason::BackendKind;
use crate::error::Error;
use crate::flag::{parse_flag, FLAG_FORMS};

pub use crate::caps::JitMode;

/// The default cap on the naive backend's f32 score workspace, in MiB.
pub const DEFAULT_NAIVE_WORKSPACE_MB: usize = 256;

/// The largest `ATTN_NAIVE_WORKSPACE_MB` (and [`Settings::naive_workspace_mb`]): 1 TiB, beyond
/// any GPU's memory, and small enough that the byte count cannot overflow a `usize` (it is
/// less on a 32-bit target, where 1 TiB of bytes would).
pub const MAX_NAIVE_WORKSPACE_MB: usize = if usize::MAX >> 20 < 1 << 20 {
    usize::MAX >> 20
} else {
    1 << 20
};

/// The largest `ATTN_CPU_THREADS` (and [`Settings::cpu_threads`]). Far above any host's
/// cores; a larger value is a typo or a unit mistake, and each thread costs a stack.
pub const MAX_CPU_THREADS: usize = 1024;

/// What `ATTN_CACHE_DIR` accepts, in its errors.
const CACHE_DIR_FORM: &str = "an absolute directory path";

/// Majors `ATTN_EMULATE_ARCH` accepts: Turing (the oldest arch the crate builds for) to the
/// newest the CUDA 13 toolchain knows (sm_12x). Raise the end when a newer arch ships.
const EMULATE_MAJORS: RangeInclusive<u32> = 7..=12;

/// What `ATTN_EMULATE_ARCH` accepts, in its errors.
const EMULATE_FORM: &str =
    "a compute capability M.m, Mm or sm_Mm with major 7 to 12, such as 7.5 (or 75, sm_75)";

/// How many characters of a bad value an error quotes: a value can be megabytes (a file
/// pasted into a variable), and an error message must stay readable.
const QUOTED_VALUE_CHARS: usize = 64;

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
    /// Absolute, and not an existing file ([`Settings::validate`]).
    pub cache_dir: Option<PathBuf>,
    /// `ATTN_NAIVE_WORKSPACE_MB`: 1 to [`MAX_NAIVE_WORKSPACE_MB`] ([`Settings::validate`]).
    pub naive_workspace_mb: usize,
    /// `ATTN_CPU_THREADS`, 1 to [`MAX_CPU_THREADS`] ([`Settings::validate`]); `None` means all
    /// available cores.
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

/// `ATTN_*` variables that are not settings but belong to the rest of the project, so an
/// `ATTN_*` name outside [`VARIABLES`] and this list is a typo worth a warning. `build.rs`
/// reads the arch list, nvcc and spill switches; `.ci/run` its venv; the device scripts the
/// CUDA library directories they search first; tests, benches and fuzz
/// targets their own `ATTN_TEST_*`, `ATTN_BENCH_*` and `ATTN_FUZZ_*` knobs (a trailing `*`
/// is a prefix). Add a name here when a script or test starts reading one.
const BUILD_AND_TEST_VARIABLES: [&str; 8] = [
    "ATTN_CUDA_ARCH_LIST",
    "ATTN_REQUIRE_NVCC",
    "ATTN_DENY_SPILLS",
    "ATTN_CI_VENV",
    "ATTN_CUDA_LIB_DIRS",
    "ATTN_TEST_*",
    "ATTN_BENCH_*",
    "ATTN_FUZZ_*",
];

/// Variables of CUDA, the loader and rayon that [`Settings::report_environment`] shows.
const REPORT_VARIABLES: [&str; 7] = [
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDARC_CUDA_VERSION",
    "RAYON_NUM_THREADS",
];

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
                        value: quoted(&raw.to_string_lossy()),
                        expected: "valid UTF-8".into(),
                    }),
                },
            }
        };
        let mut s = Settings::default();
        if let Some(v) = get("ATTN_DEVICE")? {
            s.device = parse_count("ATTN_DEVICE", &v, 0..=usize::MAX, "a CUDA device ordinal (0, 1, ...)")?;
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
        // Paths need not be UTF-8, so this one is not read through `get`; nor is it trimmed,
        // since spaces are legal in paths (a leading one makes it relative, hence an error).
        let cache_dir = lookup("ATTN_CACHE_DIR").filter(|v| !v.to_string_lossy().trim().is_empty());
        s.cache_dir = match cache_dir {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                check_cache_dir_form(&dir)?;
                Some(dir)
            }
            None => default_cache_dir_from(
                lookup("XDG_CACHE_HOME").as_deref(),
                lookup("HOME").as_deref(),
            )
            .or_else(platform_cache_dir),
        };
        if let Some(v) = get("ATTN_NAIVE_WORKSPACE_MB")? {
            s.naive_workspace_mb = parse_count(
                "ATTN_NAIVE_WORKSPACE_MB",
                &v,
                1..=MAX_NAIVE_WORKSPACE_MB,
                &naive_workspace_form(),
            )?;
        }
        if let Some(v) = get("ATTN_CPU_THREADS")? {
            s.cpu_threads = Some(parse_count(
                "ATTN_CPU_THREADS",
                &v,
                1..=MAX_CPU_THREADS,
                &cpu_threads_form(),
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

    /// Checks the values that code can set without parsing (through [`crate::Selector`] or
    /// by building a `Settings`) against the rules their variables obey, so that
    /// `cpu_threads(0)` is the same error as `ATTN_CPU_THREADS=0` instead of a silent clamp.
    /// The error names the variable a value mirrors.
    ///
    /// Unlike [`Settings::from_lookup`] this looks at the file system: a cache directory
    /// that exists (or has an ancestor that exists) as something other than a directory can
    /// never hold a cache, which is better said at `select()` than as a warning at the first
    /// JIT compile. That holds for the default directory too.
    ///
    /// ```
    /// use attention::Settings;
    /// assert!(Settings::default().validate().is_ok());
    /// let e = Settings { cpu_threads: Some(0), ..Settings::default() }.validate().unwrap_err();
    /// assert!(e.to_string().contains("ATTN_CPU_THREADS"));
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(threads) = self.cpu_threads {
            check_count("ATTN_CPU_THREADS", threads, 1..=MAX_CPU_THREADS, &cpu_threads_form())?;
        }
        check_count(
            "ATTN_NAIVE_WORKSPACE_MB",
            self.naive_workspace_mb,
            1..=MAX_NAIVE_WORKSPACE_MB,
            &naive_workspace_form(),
        )?;
        if let Some(dir) = &self.cache_dir {
            check_cache_dir_form(dir)?;
            check_cache_dir_on_disk(dir)?;
        }
        if let Some(cc) = self.emulate_arch {
            if !EMULATE_MAJORS.contains(&cc.major) || cc.minor > 9 {
                return Err(Error::InvalidSetting {
                    var: "ATTN_EMULATE_ARCH",
                    value: cc.to_string(),
                    expected: EMULATE_FORM.into(),
                });
            }
        }
        Ok(())
    }

    /// The cache directory used when `ATTN_CACHE_DIR` is not set, from `XDG_CACHE_HOME` or
    /// `HOME`: a bad default (a file in its place) degrades to no cache rather than failing
    /// `select()`, since nobody chose it.
    pub(crate) fn default_cache_dir() -> Option<PathBuf> {
        default_cache_dir_from(
            std::env::var_os("XDG_CACHE_HOME").as_deref(),
            std::env::var_os("HOME").as_deref(),
        )
        .or_else(platform_cache_dir)
    }

    /// Variables outside the crate's own that decide what it finds (devices, libraries,
    /// threads), with their values (`None`: unset), for [`crate::report()`].
    pub fn report_environment() -> Vec<(&'static str, Option<String>)> {
        REPORT_VARIABLES
            .iter()
            .map(|&v| (v, std::env::var_os(v).map(|x| x.to_string_lossy().into_owned())))
            .collect()
    }

    /// The variables that are set, with their values, for diagnostics (`doctor`).
    pub fn environment() -> Vec<(&'static str, String)> {
        VARIABLES
            .iter()
            .filter_map(|&v| std::env::var_os(v).map(|x| (v, x.to_string_lossy().into_owned())))
            .collect()
    }
}

/// A compute capability in one of exactly three spellings, so that a slip is an error rather
/// than another arch: `M.m` (`7.5`, `12.0`), `Mm` (`75`, `120`: the last digit is the minor)
/// or `sm_Mm` (`sm_75`, `sm_120`; `sm_` in any case). Majors have no leading zero and lie in
/// 7..=12, minors are one digit. The arch-specific suffixes (`sm_90a`, `sm_100f`) are refused:
/// emulation runs an arch's portable PTX, which those are not. So `700` (major 70) and
/// `sm_sm_75` are errors, not sm_700 or sm_75.
pub(crate) fn parse_cc(var: &'static str, v: &str) -> Result<crate::caps::ComputeCapability, Error> {
    let bad = || Error::InvalidSetting {
        var,
        value: quoted(v),
        expected: EMULATE_FORM.into(),
    };
    let number = |s: &str, max_len: usize| -> Option<u32> {
        let ok = (1..=max_len).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s.len() == 1 || !s.starts_with('0'));
        ok.then(|| s.parse().ok()).flatten()
    };
    let t = v.trim();
    let (major, minor) = match t.split_once('.') {
        Some((major, minor)) => (major, minor),
        None => {
            let digits = match t.get(..3) {
                Some(prefix) if prefix.eq_ignore_ascii_case("sm_") => &t[3..],
                _ => t,
            };
            if !(2..=3).contains(&digits.len()) || !digits.is_char_boundary(digits.len() - 1) {
                return Err(bad());
            }
            digits.split_at(digits.len() - 1)
        }
    };
    match (number(major, 2), number(minor, 1)) {
        (Some(major), Some(minor)) if EMULATE_MAJORS.contains(&major) => {
            Ok(crate::caps::ComputeCapability::new(major, minor))
        }
        _ => Err(bad()),
    }
}

fn parse_backend(var: &'static str, v: &str) -> Result<BackendKind, Error> {
    v.parse::<BackendKind>().map_err(|_| Error::InvalidSetting {
        var,
        value: quoted(v),
        expected: format!("a backend name: {}", BackendKind::VALID_NAMES),
    })
}

pub(crate) fn parse_bool(var: &'static str, v: &str) -> Result<bool, Error> {
    parse_flag(v).ok_or_else(|| Error::InvalidSetting {
        var,
        value: quoted(v),
        expected: FLAG_FORMS.into(),
    })
}

pub(crate) fn parse_jit(v: &str) -> Result<JitMode, Error> {
    match v.to_ascii_lowercase().as_str() {
        "auto" => Ok(JitMode::Auto),
        "always" | "1" => Ok(JitMode::Always),
        "never" | "0" => Ok(JitMode::Never),
        _ => Err(Error::InvalidSetting {
            var: "ATTN_JIT",
            value: quoted(v),
            expected: "auto, always, never".into(),
        }),
    }
}

/// `ATTN_CPU_THREADS`'s accepted values, in its errors.
fn cpu_threads_form() -> String {
    format!("a positive number of threads, at most {MAX_CPU_THREADS}")
}

/// `ATTN_NAIVE_WORKSPACE_MB`'s accepted values, in its errors.
fn naive_workspace_form() -> String {
    format!("a positive number of MiB, e.g. 256, at most {MAX_NAIVE_WORKSPACE_MB}")
}

fn parse_count(var: &'static str, v: &str, range: RangeInclusive<usize>, expected: &str) -> Result<usize, Error> {
    match v.parse::<usize>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(Error::InvalidSetting {
            var,
            value: quoted(v),
            expected: expected.to_string(),
        }),
    }
}

/// The check [`parse_count`] makes, for a number set in code.
fn check_count(var: &'static str, n: usize, range: RangeInclusive<usize>, expected: &str) -> Result<(), Error> {
    if range.contains(&n) {
        return Ok(());
    }
    Err(Error::InvalidSetting {
        var,
        value: n.to_string(),
        expected: expected.to_string(),
    })
}

/// The file-system-free part of the `ATTN_CACHE_DIR` rules. A relative path would resolve
/// against whatever directory each program happens to run in, scattering caches; a NUL
/// cannot reach the OS (every call on the path would fail later, far from the cause).
fn check_cache_dir_form(dir: &Path) -> Result<(), Error> {
    let problem = if dir.as_os_str().as_encoded_bytes().contains(&0) {
        "; it contains a NUL byte"
    } else if !dir.is_absolute() {
        "; it is relative"
    } else {
        return Ok(());
    };
    Err(Error::InvalidSetting {
        var: "ATTN_CACHE_DIR",
        value: quoted(&dir.to_string_lossy()),
        expected: format!("{CACHE_DIR_FORM}{problem}"),
    })
}

/// The `ATTN_CACHE_DIR` rule that needs the file system: the nearest existing ancestor (the
/// path itself included) must be a directory, or the cache can never be created. A missing
/// or unreadable path passes: the cache creates it, or says why it cannot, when it opens.
fn check_cache_dir_on_disk(dir: &Path) -> Result<(), Error> {
    for path in dir.ancestors() {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => {
                let what = if path == dir {
                    "it".to_owned()
                } else {
                    quoted(&path.to_string_lossy())
                };
                return Err(Error::InvalidSetting {
                    var: "ATTN_CACHE_DIR",
                    value: quoted(&dir.to_string_lossy()),
                    expected: format!("{CACHE_DIR_FORM}; {what} exists and is not a directory"),
                });
            }
            Err(_) => continue,
        }
    }
    Ok(())
}

/// `v` for an error message: whole if short, else its first [`QUOTED_VALUE_CHARS`]
/// characters and its full length.
fn quoted(v: &str) -> String {
    match v.char_indices().nth(QUOTED_VALUE_CHARS) {
        None => v.to_owned(),
        Some((cut, _)) => format!("{}… ({} bytes)", &v[..cut], v.len()),
    }
}

/// Warnings for the `ATTN_*` variables in `vars` that nothing reads, each naming the closest
/// valid variable, e.g. `unknown variable ATTN_BACKND is ignored; did you mean ATTN_BACKEND?`.
/// Sorted, one per name. The prefix is matched in any case (`attn_backend` is a typo too,
/// on systems where names are case-sensitive); values are never looked at.
///
/// ```
/// let w = attention::settings::unknown_variables_in([("ATTN_BACKND".into(), "cpu".into())]);
/// assert_eq!(w, ["unknown variable ATTN_BACKND is ignored; did you mean ATTN_BACKEND?"]);
/// ```
pub fn unknown_variables_in(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<String> {
    let unknown: BTreeSet<String> = vars
        .into_iter()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .filter(|name| name.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("ATTN_")))
        .filter(|name| !is_known_variable(name))
        .collect();
    unknown
        .into_iter()
        .map(|name| {
            // Compared by its head: every valid name is short, and a megabyte name must not
            // cost a megabyte-sized distance table per candidate.
            let upper = name.to_ascii_uppercase();
            let head = &upper.as_bytes()[..upper.len().min(QUOTED_VALUE_CHARS)];
            let closest = known_names()
                .min_by_key(|known| edit_distance(head, known.as_bytes()))
                .unwrap_or("ATTN_BACKEND");
            format!("unknown variable {} is ignored; did you mean {closest}?", quoted(&name))
        })
        .collect()
}

/// [`unknown_variables_in`] the process environment: what `select()` logs once.
pub fn unknown_variable_warnings() -> Vec<String> {
    unknown_variables_in(std::env::vars_os())
}

/// The full names a typo can be corrected to: the settings and the project's fixed-name
/// build and test variables (not the `*` prefixes, which name no variable).
fn known_names() -> impl Iterator<Item = &'static str> {
    VARIABLES
        .iter()
        .chain(BUILD_AND_TEST_VARIABLES.iter())
        .copied()
        .filter(|n| n.starts_with("ATTN_") && !n.ends_with('*'))
}

/// Whether something reads `name`. Windows matches environment names in any case, so there
/// `attn_backend` is `ATTN_BACKEND`; elsewhere it is another variable, which nothing reads.
fn is_known_variable(name: &str) -> bool {
    let same = |a: &str, b: &str| if cfg!(windows) { a.eq_ignore_ascii_case(b) } else { a == b };
    VARIABLES.iter().chain(BUILD_AND_TEST_VARIABLES.iter()).any(|known| match known.strip_suffix('*') {
        Some(prefix) => name.get(..prefix.len()).is_some_and(|p| same(p, prefix)),
        None => same(name, known),
    })
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbours each cost 1, so `ATTN_BAKCEND` is as close to `ATTN_BACKEND` as one typo.
fn edit_distance(a: &[u8], b: &[u8]) -> usize {
    // Three rows: a swap looks two rows back.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut last: Vec<usize> = (0..=b.len()).collect();
    let mut row: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        row[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (last[j] + 1).min(row[j - 1] + 1).min(last[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(before[j - 2] + 1);
            }
            row[j] = d;
        }
        std::mem::swap(&mut before, &mut last);
        std::mem::swap(&mut last, &mut row);
    }
    last[b.len()]
}


/// Default cache directory, resolved from the values of `XDG_CACHE_HOME` and `HOME` (the
/// caller reads the environment, so this stays pure and testable).
///
/// `$XDG_CACHE_HOME/attention` if that variable is set to an absolute path (the XDG spec
/// says relative values are invalid and must be ignored), else `$HOME/.cache/attention` if
/// `HOME` is an absolute path, else `None`. Relative paths are refused rather than resolved
/// against the current directory, which would scatter caches wherever programs run.
pub(crate) fn default_cache_dir_from(
    xdg_cache_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> Option<PathBuf> {
    fn absolute(value: Option<&OsStr>) -> Option<&Path> {
        value.map(Path::new).filter(|p| p.is_absolute())
    }
    if let Some(xdg) = absolute(xdg_cache_home) {
        return Some(xdg.join("attention"));
    }
    absolute(home).map(|home| home.join(".cache").join("attention"))
}

/// The platform's cache directory where `XDG_CACHE_HOME` and `HOME` give none: on Windows
/// `%LOCALAPPDATA%\attention` (through the `dirs` crate). `None` on Unix, where the XDG rule
/// above is the convention.
pub(crate) fn platform_cache_dir() -> Option<PathBuf> {
    #[cfg(not(unix))]
    {
        dirs::cache_dir().filter(|p| p.is_absolute()).map(|d| d.join("attention"))
    }
    #[cfg(unix)]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_one_per_typo() {
        let d = |a: &str, b: &str| edit_distance(a.as_bytes(), b.as_bytes());
        assert_eq!(d("", ""), 0);
        assert_eq!(d("", "abc"), 3);
        assert_eq!(d("abc", ""), 3);
        assert_eq!(d("ATTN_BACKEND", "ATTN_BACKEND"), 0);
        assert_eq!(d("ATTN_BACKND", "ATTN_BACKEND"), 1);
        assert_eq!(d("ATTN_BACKENDS", "ATTN_BACKEND"), 1);
        assert_eq!(d("ATTN_BACKEMD", "ATTN_BACKEND"), 1);
        assert_eq!(d("ATTN_BAKCEND", "ATTN_BACKEND"), 1);
        assert_eq!(d("kitten", "sitting"), 3);
    }

    #[test]
    fn quoted_cuts_long_values_between_characters() {
        assert_eq!(quoted("short"), "short");
        let exact = "x".repeat(QUOTED_VALUE_CHARS);
        assert_eq!(quoted(&exact), exact);
        let long = "ü".repeat(QUOTED_VALUE_CHARS + 1);
        assert_eq!(
            quoted(&long),
            format!("{}… ({} bytes)", "ü".repeat(QUOTED_VALUE_CHARS), long.len())
        );
    }

    #[test]
    fn build_and_test_variables_are_attn_names() {
        for name in BUILD_AND_TEST_VARIABLES {
            assert!(name.starts_with("ATTN_"), "{name}");
            assert!(!VARIABLES.contains(&name), "{name} is a setting, not a build or test variable");
        }
    }
}
