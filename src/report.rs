//! [`report()`]: what a bug report needs, from inside the program that uses the crate (its
//! features, its arch list, its build), like `python -m torch.utils.collect_env`,
//! `vllm collect-env` and `python -m xformers.info`.
//!
//! ```no_run
//! let report = attention::report();
//! println!("{report}");              // human-readable
//! let json = report.to_json();       // one JSON object, for logs and issue templates
//! # let _ = json;
//! ```
//!
//! Nothing in it panics or fails: what cannot be found is reported as unknown, with why.

use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

use crate::{Attention, BackendKind, DType, Layout, MemoryKind, Nvrtc, Options, Problem, Selector, Tensor, TensorMut};

/// Everything [`report()`] gathers. Print it (`Display`) or serialise it ([`Report::to_json`]).
/// Fields are public to read; more will be added (`#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Report {
    /// `(section, entries)`, in print order; every entry a `(key, value)` pair of text.
    pub sections: Vec<(&'static str, Vec<(String, String)>)>,
    /// Each backend for a device and a host problem: `(backend, memory, reasons)`; no reasons
    /// means it can run that problem.
    pub backends: Vec<(BackendKind, &'static str, Vec<String>)>,
    /// The warm timing and check: `None` when selection failed.
    pub run: Option<RunReport>,
}

/// A small attention run on the selected backend, timed warm and checked.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RunReport {
    /// The problem run.
    pub problem: String,
    /// The backend that ran it.
    pub backend: BackendKind,
    /// Median time of one call after warm-up (kernels loaded, pools started).
    pub median: Duration,
    /// Calls timed.
    pub iterations: usize,
    /// Relative L2 error against the reference (the CPU backend for a GPU run, f64 loops for
    /// the CPU backend).
    pub relative_error: f64,
    /// Output elements that were NaN.
    pub nans: usize,
    /// Error, if the run failed.
    pub error: Option<String>,
}

impl RunReport {
    /// Whether the run matched its reference (bf16 tolerance).
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.nans == 0 && self.relative_error < 1e-2
    }
}

/// Gathers the [`Report`]: host, build, libraries, GPUs, settings, backends and a warm,
/// checked run. Takes well under a second without a GPU; with one it loads (or JIT-compiles)
/// the kernels it times.
pub fn report() -> Report {
    let mut sections = Vec::new();
    sections.push(("crate", crate_section()));
    sections.push(("host", host_section()));
    let selector = Selector::from_env();
    let attn = match &selector {
        Ok(s) => s.clone().select().map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    sections.push(("CUDA", cuda_section(attn.as_ref().ok())));
    sections.push(("settings", settings_section(selector.as_ref().ok())));
    let mut backends = Vec::new();
    let mut run = None;
    match &attn {
        Ok(attn) => {
            let device = Problem::new(DType::BF16, 1, 256, 256, 8, 2, 64)
                .causal(true)
                .on_device(attn.settings().device);
            let host = device.clone().on_host();
            for (label, p) in [("device", &device), ("host", &host)] {
                for kind in attn.backends() {
                    let reasons = if label == "host" && kind.is_gpu() {
                        // The real reason, whatever else is missing on this machine.
                        vec![crate::Reason::HostMemory.to_string()]
                    } else {
                        explain_reasons(attn.reasons(kind, p))
                    };
                    backends.push((kind, label, reasons));
                }
            }
            let p = if attn.device_caps().is_some() { device } else { host };
            run = Some(run_check(attn, &p));
        }
        Err(e) => sections.push(("selection", vec![("error".into(), e.clone())])),
    }
    Report { sections, backends, run }
}

/// Reasons as text; a host-memory or no-device reason stands alone (it is the real reason, and
/// the GPU-specific ones behind it would only bury it).
fn explain_reasons(reasons: Vec<crate::Reason>) -> Vec<String> {
    use crate::Reason as R;
    if let Some(r) = reasons.iter().find(|r| matches!(r, R::HostMemory | R::DeviceMemory | R::Disabled { .. } | R::NotForced { .. })) {
        return vec![r.to_string()];
    }
    if let Some(r) = reasons.iter().find(|r| matches!(r, R::NoDevice { .. })) {
        return vec![r.to_string()];
    }
    reasons.iter().map(|r| r.to_string()).collect()
}

fn kv(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_string(), v.into())
}

fn crate_section() -> Vec<(String, String)> {
    let mut features = Vec::new();
    if cfg!(feature = "candle") {
        features.push("candle");
    }
    if cfg!(feature = "candle-cuda") {
        features.push("candle-cuda");
    }
    let build = crate::KernelBuild::embedded();
    let bindings = cudarc::driver::sys::CUDA_VERSION;
    vec![
        kv("version", env!("CARGO_PKG_VERSION")),
        kv("features", if features.is_empty() { "(default)".to_string() } else { features.join(", ") }),
        kv("cudarc", format!("0.19 (CUDA {}.{} bindings)", bindings / 1000, bindings % 1000 / 10)),
        kv("rustc", rustc_version().unwrap_or_else(|| "unknown (not recorded in this binary)".into())),
        kv("target", target_triple()),
        kv("profile", if cfg!(debug_assertions) { "debug (debug assertions on)" } else { "release" }),
        kv(
            "kernels",
            if build.built_with_nvcc {
                format!("built by nvcc {}", build.nvcc_version)
            } else {
                "sources only (no nvcc at build time): compiled at first use by NVRTC".into()
            },
        ),
        kv("arch list", format!("{} (from {})", crate::arch::format_arch_list(&build.arch_list), build.arch_list_source)),
    ]
}

/// The target this binary was compiled for, from `cfg!` (the exact triple is only known to a
/// build script).
fn target_triple() -> String {
    let arch = std::env::consts::ARCH;
    let os = std::env::consts::OS;
    let env = if cfg!(target_env = "gnu") {
        "gnu"
    } else if cfg!(target_env = "musl") {
        "musl"
    } else if cfg!(target_env = "msvc") {
        "msvc"
    } else {
        ""
    };
    let mut simd = Vec::new();
    macro_rules! tf {
        ($($f:tt),*) => {$( if cfg!(target_feature = $f) { simd.push($f); } )*};
    }
    tf!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "neon", "sve");
    format!(
        "{arch}-{os}{}{env}; compiled-in target features: {}",
        if env.is_empty() { "" } else { "-" },
        if simd.is_empty() { "baseline".to_string() } else { simd.join(" ") }
    )
}

/// The rustc that compiled this binary, from the `rustc version ...` note rustc leaves in the
/// executable's `.comment` section (Linux, ELF).
fn rustc_version() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let exe = std::fs::read("/proc/self/exe").ok()?;
    // Built at run time so this function's own string constant is not what is found.
    let needle = [&b"rustc"[..], b" version ", b"1."].concat();
    let at = exe.windows(needle.len()).position(|w| w == needle.as_slice())?;
    let rest = &exe[at + needle.len() - 2..];
    let end = rest.iter().position(|&b| b == 0 || b == b'\n').unwrap_or(rest.len()).min(80);
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

fn host_section() -> Vec<(String, String)> {
    let mut v = Vec::new();
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let os = read("/etc/os-release")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|x| x.trim_matches('"').to_string()))
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    v.push(kv("OS", os));
    if let Some(k) = read("/proc/sys/kernel/osrelease") {
        v.push(kv("kernel", k.trim()));
    }
    v.push(kv("glibc", glibc_version().unwrap_or_else(|| "not glibc (or not found)".into())));
    let cpu = read("/proc/cpuinfo")
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|x| x.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| "unknown".into());
    v.push(kv("CPU", cpu));
    v.push(kv("SIMD (run time)", simd_features()));
    let cores = std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or_else(|_| "unknown".into());
    v.push(kv("logical cores", format!("{cores} available to this process")));
    if let Some(mem) = read("/proc/meminfo") {
        let field = |name: &str| {
            mem.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|x| x.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        if let (Some(total), Some(avail)) = (field("MemTotal:"), field("MemAvailable:")) {
            v.push(kv("memory", format!("{:.1} GiB total, {:.1} GiB available", total as f64 / 1048576.0, avail as f64 / 1048576.0)));
        }
    }
    v
}

/// glibc's version through `gnu_get_libc_version`, looked up at run time.
fn glibc_version() -> Option<String> {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return None;
    }
    // SAFETY: libc.so.6 is already loaded in every glibc process; gnu_get_libc_version takes
    // nothing and returns a static NUL-terminated string.
    unsafe {
        let lib = libloading::Library::new("libc.so.6").ok()?;
        let f: libloading::Symbol<unsafe extern "C" fn() -> *const std::ffi::c_char> = lib.get(b"gnu_get_libc_version\0").ok()?;
        let p = f();
        if p.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}

fn simd_features() -> String {
    #[allow(unused_mut)]
    let mut found: Vec<&str> = Vec::new();
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        macro_rules! x86 {
            ($($f:tt),*) => {$( if std::arch::is_x86_feature_detected!($f) { found.push($f); } )*};
        }
        x86!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512fp16");
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! arm {
            ($($f:tt),*) => {$( if std::arch::is_aarch64_feature_detected!($f) { found.push($f); } )*};
        }
        arm!("neon", "fp16", "bf16", "sve", "sve2");
    }
    if found.is_empty() {
        "none detected".into()
    } else {
        found.join(" ")
    }
}


/// The CUDA libraries mapped into this process, from `/proc/self/maps` (Linux).
fn loaded_cuda_libraries() -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            let file = p.rsplit('/').next().unwrap_or(p);
            ["libcuda.", "libnvrtc", "libcudart", "libcublas", "libnvidia-ptxjitcompiler"].iter().any(|n| file.starts_with(n))
        })
        .map(str::to_string)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// Every visible GPU: `ordinal: name, sm_XY, memory`. Only after the probe found the driver.
fn visible_gpus() -> Result<Vec<String>, String> {
    if !crate::gpu::libs::driver_library_present() {
        return Err("libcuda (the NVIDIA driver) was not found".into());
    }
    std::panic::catch_unwind(|| {
        use cudarc::driver::result::device;
        use cudarc::driver::sys::CUdevice_attribute as A;
        cudarc::driver::result::init().map_err(|e| format!("cuInit: {e:?}"))?;
        let n = device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
        let mut out = Vec::new();
        for i in 0..n {
            let dev = device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e:?}"))?;
            let name = device::get_name(dev).unwrap_or_else(|_| "unknown".into());
            // SAFETY: `dev` came from device::get.
            let (maj, min, mem) = unsafe {
                (
                    device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0),
                    device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).unwrap_or(0),
                    device::total_mem(dev).unwrap_or(0),
                )
            };
            out.push(format!("{i}: {name}, sm_{maj}{min}, {:.1} GiB", mem as f64 / (1u64 << 30) as f64));
        }
        Ok(out)
    })
    .unwrap_or_else(|_| Err("the CUDA driver library lacks an expected symbol".into()))
}

fn cuda_section(attn: Option<&Attention>) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let nvidia = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")));
    v.push(kv("kernel module", nvidia.unwrap_or_else(|| "none (/proc/driver/nvidia/version absent)".into())));
    match visible_gpus() {
        Ok(gpus) if gpus.is_empty() => v.push(kv("GPUs", "none visible")),
        Ok(gpus) => {
            for g in gpus {
                v.push(kv("GPU", g));
            }
        }
        Err(e) => v.push(kv("GPUs", format!("none: {e}"))),
    }
    match attn.and_then(|a| a.device_caps()) {
        Some(c) => {
            v.push(kv("selected", format!("device {}: {} ({}), {} SMs, {} KiB shared memory per block", c.ordinal, c.name, c.cc.sm(), c.sm_count, c.smem_per_block_optin / 1024)));
            v.push(kv("driver", format!("CUDA {}.{} (cuDriverGetVersion)", c.driver_version.0, c.driver_version.1)));
            v.push(kv("memory", format!("{:.1} GiB total, {:.1} GiB free", c.total_mem as f64 / (1u64 << 30) as f64, c.free_mem as f64 / (1u64 << 30) as f64)));
            if let Some(a) = attn {
                for kind in a.backends().into_iter().filter(|k| k.is_gpu()) {
                    if let Some(img) = a.kernel_image(kind) {
                        v.push(kv(&format!("{kind} kernels"), img));
                    }
                }
                // How a typical decode step runs here (one token, GQA 32/8, d128, 32k cache).
                let step = Problem::new(DType::BF16, 1, 1, 32768, 32, 8, 128);
                let e = a.explain(&step);
                let plan = match (e.chosen, e.plan) {
                    (Some(k), Some(p)) => format!("{k}: {p}"),
                    (Some(k), None) => k.to_string(),
                    (None, _) => "no backend".into(),
                };
                v.push(kv("decode step", format!("bf16 b=1 h=32/8 d=128 over 32k keys: {plan}")));
            }
        }
        None => v.push(kv(
            "selected",
            format!("none ({}); the CPU backend runs host tensors", attn.and_then(|a| a.no_device_reason()).unwrap_or("selection failed")),
        )),
    }
    v.push(kv(
        "NVRTC",
        match crate::gpu::nvrtc::probe() {
            Nvrtc::Available { version } => format!("available, {}.{}", version.0, version.1),
            Nvrtc::Missing(why) => format!("missing: {why}"),
        },
    ));
    let yes = |b: bool| if b { "yes" } else { "no" };
    v.push(kv("loadable", format!("libcuda: {}, libnvrtc: {}", yes(crate::gpu::libs::driver_library_present()), yes(crate::gpu::libs::nvrtc_library_present()))));
    let libs = loaded_cuda_libraries();
    v.push(kv("loaded libraries", if libs.is_empty() { "none".into() } else { libs.join(", ") }));
    for (name, value) in crate::settings::Settings::report_environment() {
        v.push(kv(name, value.unwrap_or_else(|| "(unset)".into())));
    }
    v
}

fn settings_section(selector: Option<&Selector>) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let env = crate::Settings::environment();
    v.push(kv(
        "ATTN_* set",
        if env.is_empty() { "none".into() } else { env.iter().map(|(k, x)| format!("{k}={x}")).collect::<Vec<_>>().join(" ") },
    ));
    let unknown = crate::settings::unknown_variable_warnings();
    v.push(kv("unknown ATTN_*", if unknown.is_empty() { "none".into() } else { unknown.join("; ") }));
    let Some(selector) = selector else {
        return v;
    };
    let s = selector.settings();
    v.push(kv(
        "in effect",
        format!(
            "device={} backend={} disabled=[{}] strict={} jit={} naive workspace={} MiB",
            s.device,
            s.backend.map(|b| b.to_string()).unwrap_or_else(|| "ranked".into()),
            s.disabled.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
            s.strict,
            s.jit,
            s.naive_workspace_mb,
        ),
    ));
    let threads = match s.cpu_threads {
        Some(n) => format!("{n} (ATTN_CPU_THREADS: a dedicated pool)"),
        None => format!("{} (rayon's pool; RAYON_NUM_THREADS or ATTN_CPU_THREADS change it)", rayon::current_num_threads()),
    };
    v.push(kv("CPU threads", threads));
    v.push(kv(
        "JIT cache",
        match &s.cache_dir {
            Some(dir) => match crate::gpu::cache::DiskCache::open(dir).and_then(|c| c.entries()) {
                Ok(e) => {
                    let bytes: u64 = e.iter().map(|x| x.bytes).sum();
                    let bad = e.iter().filter(|x| !x.valid).count();
                    format!("{} ({} entries, {} KiB, {bad} invalid)", dir.display(), e.len(), bytes / 1024)
                }
                Err(err) => format!("{} (not usable: {err})", dir.display()),
            },
            None => "none (no ATTN_CACHE_DIR and no cache directory)".into(),
        },
    ));
    v
}

/// Runs `p` on the backend `attn` picks: one warm-up call, then the median of timed calls,
/// checked against the CPU backend (GPU) or f64 loops (CPU).
fn run_check(attn: &Attention, p: &Problem) -> RunReport {
    let mut r = RunReport {
        problem: p.to_string(),
        backend: BackendKind::Cpu,
        median: Duration::ZERO,
        iterations: 0,
        relative_error: f64::NAN,
        nans: 0,
        error: None,
    };
    if let Err(e) = run_inner(attn, p, &mut r) {
        r.error = Some(e);
    }
    r
}

fn median(mut t: Vec<Duration>) -> Duration {
    t.sort();
    t.get(t.len() / 2).copied().unwrap_or_default()
}

fn run_inner(attn: &Attention, p: &Problem, r: &mut RunReport) -> Result<(), String> {
    use half::bf16;
    let (b, sq, sk, h, hk, d) = (p.batch, p.seqlen_q, p.seqlen_k, p.heads, p.kv_heads, p.head_dim);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bf16::from_f32((seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect()
    };
    let (lq, lk) = (Layout::contiguous(b, sq, h, d), Layout::contiguous(b, sk, hk, d));
    let (q, k, v) = (rand(lq.numel()), rand(lk.numel()), rand(lk.numel()));
    let opts = Options::default().causal(p.causal);
    let on_gpu = matches!((attn.device_caps(), p.memory), (Some(_), MemoryKind::Device { .. }));
    let iters = if on_gpu { 20 } else { 5 };
    let mut times = Vec::with_capacity(iters);
    let out: Vec<bf16> = match attn.device_caps().filter(|_| on_gpu) {
        Some(caps) => {
            let cuda = |e: cudarc::driver::DriverError| format!("CUDA: {e:?}");
            let ctx = cudarc::driver::CudaContext::new(caps.ordinal).map_err(cuda)?;
            let stream = ctx.default_stream();
            let (dq, dk, dv) = (stream.clone_htod(&q).map_err(cuda)?, stream.clone_htod(&k).map_err(cuda)?, stream.clone_htod(&v).map_err(cuda)?);
            let mut dout = stream.clone_htod(&vec![bf16::NAN; q.len()]).map_err(cuda)?;
            let mut launch = || {
                attn.forward(&Tensor::cuda(&dq, lq), &Tensor::cuda(&dk, lk), &Tensor::cuda(&dv, lk), &mut TensorMut::cuda(&mut dout, lq), &opts)
            };
            r.backend = launch().map_err(|e| e.to_string())?; // warm-up: loads or JIT-compiles
            stream.synchronize().map_err(cuda)?;
            for _ in 0..iters {
                let t = Instant::now();
                launch().map_err(|e| e.to_string())?;
                stream.synchronize().map_err(cuda)?;
                times.push(t.elapsed());
            }
            stream.clone_dtoh(&dout).map_err(cuda)?
        }
        None => {
            let mut out = vec![bf16::NAN; q.len()];
            let mut launch = || {
                attn.forward(&Tensor::host(&q, lq), &Tensor::host(&k, lk), &Tensor::host(&v, lk), &mut TensorMut::host(&mut out, lq), &opts)
            };
            r.backend = launch().map_err(|e| e.to_string())?; // warm-up: starts the pool
            for _ in 0..iters {
                let t = Instant::now();
                launch().map_err(|e| e.to_string())?;
                times.push(t.elapsed());
            }
            out
        }
    };
    r.iterations = iters;
    r.median = median(times);
    let reference: Vec<f64> = if on_gpu {
        let cpu = Selector::from_env().map_err(|e| e.to_string())?.backend(BackendKind::Cpu).select().map_err(|e| e.to_string())?;
        let mut o = vec![bf16::NAN; q.len()];
        cpu.forward(&Tensor::host(&q, lq), &Tensor::host(&k, lk), &Tensor::host(&v, lk), &mut TensorMut::host(&mut o, lq), &opts)
            .map_err(|e| e.to_string())?;
        o.iter().map(|x| x.to_f64()).collect()
    } else {
        reference_f64(&q, &k, &v, (b, sq, sk, h, hk, d), p.causal)
    };
    let (mut num, mut den) = (0f64, 0f64);
    for (o, &x) in out.iter().zip(&reference) {
        let o = o.to_f64();
        r.nans += o.is_nan() as usize;
        num += (o - x) * (o - x);
        den += x * x;
    }
    r.relative_error = (num / den.max(1e-30)).sqrt();
    Ok(())
}

/// Plain attention in f64 over contiguous `[b, s, h, d]` tensors, bottom-right causal.
fn reference_f64(q: &[half::bf16], k: &[half::bf16], v: &[half::bf16], dims: (usize, usize, usize, usize, usize, usize), causal: bool) -> Vec<f64> {
    let (b, sq, sk, h, hk, d) = dims;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; q.len()];
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / (h / hk);
            for i in 0..sq {
                let qi = &q[((bi * sq + i) * h + hi) * d..][..d];
                let visible = if causal { (i + 1 + sk).saturating_sub(sq).min(sk) } else { sk };
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let kj = &k[((bi * sk + j) * hk + kh) * d..][..d];
                        scale * qi.iter().zip(kj).map(|(a, b)| a.to_f64() * b.to_f64()).sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                let o = &mut out[((bi * sq + i) * h + hi) * d..][..d];
                for (j, w) in weights.iter().enumerate() {
                    let vj = &v[((bi * sk + j) * hk + kh) * d..][..d];
                    for (x, y) in o.iter_mut().zip(vj) {
                        *x += w / sum * y.to_f64();
                    }
                }
            }
        }
    }
    out
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (title, entries) in &self.sections {
            writeln!(f, "== {title}")?;
            for (k, v) in entries {
                writeln!(f, "{:<22}{v}", format!("{k}:"))?;
            }
            writeln!(f)?;
        }
        if !self.backends.is_empty() {
            writeln!(f, "== backends (fastest first), bf16 causal problem")?;
            // Backends with the same verdict for the same memory share a line.
            let mut groups: Vec<(Vec<String>, &str, &Vec<String>)> = Vec::new();
            for (kind, mem, reasons) in &self.backends {
                match groups.last_mut() {
                    Some((kinds, m, r)) if m == mem && *r == reasons => kinds.push(kind.to_string()),
                    _ => groups.push((vec![kind.to_string()], mem, reasons)),
                }
            }
            for (kinds, mem, reasons) in groups {
                let kinds = kinds.join(", ");
                if reasons.is_empty() {
                    writeln!(f, "  ✓ {mem:<6} {kinds}")?;
                } else {
                    writeln!(f, "  ✗ {mem:<6} {kinds}: {}", reasons.join("; "))?;
                }
            }
            writeln!(f)?;
        }
        if let Some(r) = &self.run {
            writeln!(f, "== run: {}", r.problem)?;
            match &r.error {
                Some(e) => writeln!(f, "error:                {e}")?,
                None => {
                    writeln!(f, "backend:              {}", r.backend)?;
                    writeln!(f, "time (warm):          {:.3} ms median of {} calls", r.median.as_secs_f64() * 1e3, r.iterations)?;
                    writeln!(
                        f,
                        "check:                relative error {:.2e} vs {} (tolerance 1e-2), {} NaN: {}",
                        r.relative_error,
                        if r.backend.is_gpu() { "the CPU backend" } else { "f64 loops" },
                        r.nans,
                        if r.ok() { "OK" } else { "MISMATCH" }
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl Report {
    /// The report as one JSON object: `{"sections": {"host": [["OS", "..."], ...], ...},
    /// "backends": [{"backend", "memory", "reasons"}], "run": {...} | null}`. Entries are
    /// `[key, value]` pairs because a section can repeat a key (one `GPU` per device).
    pub fn to_json(&self) -> String {
        let mut o = String::from("{\"sections\":{");
        for (i, (title, entries)) in self.sections.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            json_str(&mut o, title);
            o.push_str(":[");
            for (j, (k, v)) in entries.iter().enumerate() {
                if j > 0 {
                    o.push(',');
                }
                o.push('[');
                json_str(&mut o, k);
                o.push(',');
                json_str(&mut o, v);
                o.push(']');
            }
            o.push(']');
        }
        o.push_str("},\"backends\":[");
        for (i, (kind, mem, reasons)) in self.backends.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            o.push_str("{\"backend\":");
            json_str(&mut o, kind.name());
            o.push_str(",\"memory\":");
            json_str(&mut o, mem);
            o.push_str(",\"reasons\":[");
            for (j, r) in reasons.iter().enumerate() {
                if j > 0 {
                    o.push(',');
                }
                json_str(&mut o, r);
            }
            o.push_str("]}");
        }
        o.push_str("],\"run\":");
        match &self.run {
            None => o.push_str("null"),
            Some(r) => {
                o.push_str("{\"problem\":");
                json_str(&mut o, &r.problem);
                o.push_str(",\"backend\":");
                json_str(&mut o, r.backend.name());
                let num = |x: f64| if x.is_finite() { format!("{x:e}") } else { "null".into() };
                let _ = write!(
                    o,
                    ",\"median_ms\":{},\"iterations\":{},\"relative_error\":{},\"nans\":{},\"ok\":{},\"error\":",
                    num(r.median.as_secs_f64() * 1e3),
                    r.iterations,
                    num(r.relative_error),
                    r.nans,
                    r.ok()
                );
                match &r.error {
                    Some(e) => json_str(&mut o, e),
                    None => o.push_str("null"),
                }
                o.push('}');
            }
        }
        o.push('}');
        o
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_escapes() {
        let mut s = String::new();
        super::json_str(&mut s, "a\"b\\c\nd\u{1}");
        assert_eq!(s, r#""a\"b\\c\nd\u0001""#);
    }
}
