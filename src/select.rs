//! Selection: probe once, rank the backends, apply the settings, pick per problem, log every
//! fallback once, and explain every decision.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use crate::reason::is_fallback;
use crate::backend::{Backend, BackendKind, Reason, RunError};
use crate::caps::DeviceCaps;
use crate::cpu_backend::CpuBackend;
use crate::dtype::Element;
use crate::error::{Error, Rejection};
use crate::gpu::device::{self, GpuDevice};
use crate::log_once::{log_once, log_once_keyed, warn_once};
use crate::gpu::flash::FlashBackend;
use crate::gpu::mem_efficient::MemEfficientBackend;
use crate::gpu::decode::DecodeBackend;
use crate::gpu::naive::NaiveBackend;
use crate::options::Options;
use crate::problem::{MemoryKind, Problem};
use crate::settings::{JitMode, Settings};
use crate::kvcache::{KvCache, KvCacheMut, Workspace};
use crate::tensor::{validate, LseMut, Tensor, TensorMut, VarLen};

/// Configures selection in code. It starts from the environment (`ATTN_*`); every explicit
/// call wins over the variable it mirrors.
///
/// ```
/// use attention::{BackendKind, Selector};
/// let attn = Selector::from_env().unwrap()
///     .disable(BackendKind::Naive)
///     .strict(false)
///     .select()
///     .unwrap();
/// # let _ = attn;
/// ```
#[derive(Clone, Debug)]
pub struct Selector {
    settings: Settings,
    backend_by: &'static str,
    disabled_by: Vec<(BackendKind, &'static str)>,
    simulated: Option<DeviceCaps>,
}

impl Selector {
    /// Starts from the `ATTN_*` environment variables; an invalid value is an error.
    pub fn from_env() -> Result<Self, Error> {
        Ok(Self::from_settings(Settings::from_env()?))
    }

    /// Starts from explicit settings (the environment is not read).
    pub fn from_settings(settings: Settings) -> Self {
        let disabled_by = settings.disabled.iter().map(|&k| (k, "ATTN_DISABLE")).collect();
        Selector { settings, backend_by: "ATTN_BACKEND", disabled_by, simulated: None }
    }

    /// Which CUDA device to use (ordinal after `CUDA_VISIBLE_DEVICES`), as `ATTN_DEVICE`. An
    /// ordinal that no visible device has is an [`Error::InvalidSetting`] at
    /// [`Selector::select`] naming `ATTN_DEVICE`, the ordinal and how many devices are visible;
    /// only ordinal 0 (the default) on a machine without a GPU gives the CPU-only handle.
    #[must_use]

    pub fn device(mut self, ordinal: usize) -> Self {
        self.settings.device = ordinal;
        self
    }
    /// Use only this backend; a problem it cannot run is an error with its reasons.
    #[must_use]

    pub fn backend(mut self, kind: BackendKind) -> Self {
        self.settings.backend = Some(kind);
        self.backend_by = "Selector::backend";
        self
    }
    /// Go back to ranked selection, whatever `ATTN_BACKEND` says.
    #[must_use]

    pub fn any_backend(mut self) -> Self {
        self.settings.backend = None;
        self
    }
    /// Take a backend out of the chain.
    #[must_use]

    pub fn disable(mut self, kind: BackendKind) -> Self {
        self.disabled_by.retain(|(k, _)| *k != kind);
        self.disabled_by.push((kind, "Selector::disable"));
        self
    }
    /// Falling back below the best backend for the device becomes an error.
    #[must_use]

    pub fn strict(mut self, strict: bool) -> Self {
        self.settings.strict = strict;
        self
    }
    /// When NVRTC compiles kernels.
    #[must_use]

    pub fn jit(mut self, mode: JitMode) -> Self {
        self.settings.jit = mode;
        self
    }
    /// Where JIT-compiled kernels are cached.
    #[must_use]

    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.settings.cache_dir = Some(dir.into());
        self
    }
    /// Cap on the naive backend's score workspace, MiB (1 to
    /// [`crate::settings::MAX_NAIVE_WORKSPACE_MB`], as `ATTN_NAIVE_WORKSPACE_MB`; checked by
    /// [`Selector::select`]).
    #[must_use]

    pub fn naive_workspace_mb(mut self, mb: usize) -> Self {
        self.settings.naive_workspace_mb = mb;
        self
    }
    /// Threads of the CPU backend (1 to [`crate::settings::MAX_CPU_THREADS`], as
    /// `ATTN_CPU_THREADS`; checked by [`Selector::select`]).
    #[must_use]

    pub fn cpu_threads(mut self, threads: usize) -> Self {
        self.settings.cpu_threads = Some(threads);
        self
    }
    /// Run every kernel as code for the older `arch` (testing only; see
    /// [`Settings::emulate_arch`]), e.g. `ComputeCapability::new(7, 5)` for a T4's code path.
    #[must_use]

    pub fn emulate_arch(mut self, arch: crate::caps::ComputeCapability) -> Self {
        self.settings.emulate_arch = Some(arch);
        self
    }
    /// Selects for a simulated device instead of probing one: `explain` then answers what
    /// would run there. GPU backends cannot run on it (there is no device behind it).
    #[must_use]

    pub fn simulate(mut self, caps: DeviceCaps) -> Self {
        self.simulated = Some(caps);
        self
    }

    /// The settings in effect.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Probes the device (once per process) and builds the handle. Never panics; with no
    /// usable GPU it returns a handle whose only runnable backend is the CPU, and logs why.
    /// A device ordinal ([`Selector::device`], `ATTN_DEVICE`) other than 0 that no visible
    /// device has is an [`Error::InvalidSetting`] naming `ATTN_DEVICE` and the visible count.
    /// Values set in code are held to the rules of the variables they mirror (an error names
    /// the variable), and unknown `ATTN_*` variables are warned about once.
    pub fn select(mut self) -> Result<Attention, Error> {
        if let Err(e) = self.settings.validate() {
            match e {
                // Nobody chose the default directory: a file in its place costs the cache, not
                // the handle.
                Error::InvalidSetting { var: "ATTN_CACHE_DIR", .. }
                    if self.settings.cache_dir == Settings::default_cache_dir() =>
                {
                    warn_once(format!("attention: JIT cache disabled: {e}"));
                    self.settings.cache_dir = None;
                }
                e => return Err(e),
            }
        }
        for w in crate::settings::unknown_variable_warnings() {
            warn_once(format!("attention: {w}"));
        }
        let s = &self.settings;
        let (device, caps, no_device) = match self.simulated.clone() {
            Some(caps) => (None, Some(caps), None),
            None => {
                let no_gpu = |why: String| {
                    warn_once(format!(
                        "attention: no usable CUDA device ({why}); using the CPU backend. \
                         Install the NVIDIA driver or check CUDA_VISIBLE_DEVICES / ATTN_DEVICE"
                    ));
                    (None, None, Some(why))
                };
                // An ordinal no visible device has is an error (0 without a GPU: CPU only).
                let visible = device::visible_device_count();
                match device::check_ordinal(s.device, visible, device::cuda_visible_devices().as_deref())? {
                    device::DeviceRequest::CpuOnly(why) => no_gpu(why),
                    device::DeviceRequest::Probe => match device::probe(s.device) {
                        Ok(dev) => {
                            let caps = dev.caps.clone();
                            (Some(dev), Some(caps), None)
                        }
                        Err(why) => no_gpu(why),
                    },
                }
            }
        };
        let (device, caps) = match s.emulate_arch {
            None => (device, caps),
            Some(arch) => {
                let newer = || Error::InvalidSetting {
                    var: "ATTN_EMULATE_ARCH",
                    value: arch.to_string(),
                    expected: format!(
                        "a compute capability no newer than the device's {}",
                        caps.as_ref().map(|c| c.cc.to_string()).unwrap_or_default()
                    ),
                };
                match (&device, &caps) {
                    (Some(dev), _) => {
                        let dev = dev.emulating(arch).ok_or_else(newer)?;
                        let caps = dev.caps.clone();
                        log_once(log::Level::Warn, format!("attention: ATTN_EMULATE_ARCH={arch}: running {}", caps.name));
                        (Some(dev), Some(caps))
                    }
                    (None, Some(c)) => (None, Some(c.emulating(arch).ok_or_else(newer)?)),
                    (None, None) => (None, None),
                }
            }
        };
        // Ranked fastest first. Only backends that exist in this version are registered.
        let chain: Vec<Box<dyn Backend>> = vec![
            Box::new(DecodeBackend::new(device.clone(), s.jit, s.cache_dir.clone())),
            Box::new(FlashBackend::new(device.clone(), s.jit, s.cache_dir.clone(), s.flash_hopper, s.flash_tma)),
            Box::new(MemEfficientBackend::new(device.clone(), s.jit, s.cache_dir.clone())),
            Box::new(NaiveBackend::new(device.clone(), s.jit, s.cache_dir.clone(), s.naive_workspace_mb)),
            // Unset: rayon's global pool (shared with candle, gemm and the caller's own tasks).
            Box::new(CpuBackend::new(s.cpu_threads)),
        ];
        Ok(Attention {
            inner: Arc::new(Inner {
                settings: self.settings,
                backend_by: self.backend_by,
                disabled_by: self.disabled_by,
                device,
                // The CPU backend's check reads no capability, but the trait passes some: without a
                // device it gets this stand-in, built once here rather than on every call.
                host_caps: caps.clone().unwrap_or_else(|| DeviceCaps::simulated(crate::caps::SimulatedGpu::T4)),
                caps,
                no_device,
                chain,
                unusable: RwLock::new(HashMap::new()),
                warned: RwLock::new(HashSet::new()),
                announced: AtomicU32::new(0),
                decisions: RwLock::new(HashMap::new()),
            }),
        })
    }
}

/// Probes the device once and returns a ready handle, configured by the `ATTN_*` variables.
///
/// ```
/// let attn = attention::select().unwrap();
/// println!("{}", attn.device_summary());
/// ```
pub fn select() -> Result<Attention, Error> {
    Selector::from_env()?.select()
}

struct Inner {
    settings: Settings,
    backend_by: &'static str,
    disabled_by: Vec<(BackendKind, &'static str)>,
    device: Option<Arc<GpuDevice>>,
    caps: Option<DeviceCaps>,
    /// `caps`, or a stand-in for the CPU backend's checks when there is no device.
    host_caps: DeviceCaps,
    no_device: Option<String>,
    chain: Vec<Box<dyn Backend>>,
    /// Backends that failed at run time on this device, per kernel class, with the reason.
    unusable: RwLock<HashMap<(BackendKind, KernelClass), Reason>>,
    /// Fallbacks already logged by this handle: (backend, reason kinds). Read on every call
    /// that falls back, so a read lock, and the global once-per-process log only on first sight.
    warned: RwLock<HashSet<FallbackKey>>,
    /// Backends already announced at info level: one bit per `BackendKind::ALL` index, so the
    /// hot path reads an atomic instead of taking a lock.
    announced: AtomicU32,
    /// Which backend each problem shape ran on, so a call seen before skips every backend's
    /// `check` (the hot path is a read lock and a lookup). Cleared when a backend fails at run
    /// time; bounded by [`DECISIONS_CAP`].
    decisions: RwLock<HashMap<ShapeKey, BackendKind>>,
}

/// The handle model code keeps: cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Attention {
    inner: Arc<Inner>,
}

/// Which backend runs a problem and why each higher-ranked one does not.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// The problem explained.
    pub problem: Problem,
    /// The backend that runs it, if any.
    pub chosen: Option<BackendKind>,
    /// Every backend ranked above the chosen one (all of them if none is chosen), with reasons.
    pub rejected: Vec<Rejection>,
    /// Backends ranked below the chosen one (not consulted).
    pub below: Vec<BackendKind>,
    /// How the chosen backend runs it (kernel, grid, split count), where it says.
    pub plan: Option<String>,
}

impl fmt::Debug for Attention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attention")
            .field("device", &self.device_summary())
            .field("backends", &self.backends())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "problem: {}", self.problem)?;
        for r in &self.rejected {
            writeln!(f, "  ✗ {r}")?;
        }
        match self.chosen {
            Some(k) => match &self.plan {
                Some(plan) => writeln!(f, "  ✓ {k} runs it: {plan}")?,
                None => writeln!(f, "  ✓ {k} runs it")?,
            },
            None => writeln!(f, "  no backend can run it")?,
        }
        for k in &self.below {
            writeln!(f, "  · {k} (ranked lower)")?;
        }
        Ok(())
    }
}

impl Attention {
    /// The capabilities of the probed (or simulated) device; `None` without a GPU.
    pub fn device_caps(&self) -> Option<&DeviceCaps> {
        self.inner.caps.as_ref()
    }

    /// Why no GPU is used, when none is.
    pub fn no_device_reason(&self) -> Option<&str> {
        self.inner.no_device.as_deref()
    }

    /// The settings in effect.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The registered backends, fastest first.
    pub fn backends(&self) -> Vec<BackendKind> {
        self.inner.chain.iter().map(|b| b.kind()).collect()
    }

    /// One line: device name and arch, or "cpu".
    pub fn device_summary(&self) -> String {
        match &self.inner.caps {
            Some(c) => format!("{} ({}){}", c.name, c.cc.sm(), if c.simulated { ", simulated" } else { "" }),
            None => "cpu".into(),
        }
    }

    /// How a GPU backend's kernels were loaded on this device (embedded cubin, embedded PTX,
    /// NVRTC), loading them if needed; `None` without a device or for the CPU backend.
    pub fn kernel_image(&self, kind: BackendKind) -> Option<String> {
        let dev = self.inner.device.as_ref()?;
        let s = &self.inner.settings;
        match kind {
            BackendKind::Naive => {
                NaiveBackend::new(Some(dev.clone()), s.jit, s.cache_dir.clone(), s.naive_workspace_mb)
                    .image_description()
            }
            BackendKind::Flash => FlashBackend::new(Some(dev.clone()), s.jit, s.cache_dir.clone(), s.flash_hopper, s.flash_tma).image_description(),
            BackendKind::MemEfficient => {
                MemEfficientBackend::new(Some(dev.clone()), s.jit, s.cache_dir.clone()).image_description()
            }
            BackendKind::Decode => DecodeBackend::new(Some(dev.clone()), s.jit, s.cache_dir.clone()).image_description(),
            _ => None,
        }
    }

    /// Every reason `kind` cannot run `problem` here (empty: it can), settings included.
    pub fn reasons(&self, kind: BackendKind, problem: &Problem) -> Vec<Reason> {
        let inner = &self.inner;
        let Some(backend) = inner.chain.iter().find(|b| b.kind() == kind) else {
            return vec![Reason::NotImplemented];
        };
        if let Some(forced) = inner.settings.backend {
            if forced != kind {
                return vec![Reason::NotForced { forced, by: inner.backend_by }];
            }
        }
        if let Some((_, by)) = inner.disabled_by.iter().find(|(k, _)| *k == kind) {
            return vec![Reason::Disabled { by }];
        }
        if problem.kv_cache.is_some() && !backend.runs_kv_cache() {
            return vec![Reason::KvCache];
        }
        let mut reasons = Vec::new();
        if let Some(r) = inner.unusable.read().unwrap_or_else(|e| e.into_inner()).get(&(kind, KernelClass::of(problem))) {
            reasons.push(r.clone());
        }
        match (&inner.caps, kind.is_gpu()) {
            (Some(caps), _) => reasons.extend(backend.check(caps, problem)),
            (None, true) => reasons.push(Reason::NoDevice {
                why: inner.no_device.clone().unwrap_or_default(),
            }),
            (None, false) => reasons.extend(backend.check(&inner.host_caps, problem)),
        }
        reasons
    }

    /// Which backend would run `problem`, and why every higher-ranked one would not.
    ///
    /// ```
    /// use attention::{DType, Problem};
    /// let attn = attention::select().unwrap();
    /// let e = attn.explain(&Problem::new(DType::F32, 1, 16, 16, 4, 4, 64).on_host());
    /// assert!(e.chosen.is_some());
    /// print!("{e}");
    /// ```
    pub fn explain(&self, problem: &Problem) -> Explanation {
        let mut rejected = Vec::new();
        let mut chosen = None;
        let mut below = Vec::new();
        for kind in self.backends() {
            if chosen.is_some() {
                below.push(kind);
                continue;
            }
            let reasons = self.reasons(kind, problem);
            if reasons.is_empty() {
                chosen = Some(kind);
            } else {
                rejected.push(Rejection { backend: kind, reasons });
            }
        }
        let plan = chosen.and_then(|kind| {
            let backend = self.inner.chain.iter().find(|b| b.kind() == kind)?;
            backend.plan_summary(self.inner.caps.as_ref().unwrap_or(&self.inner.host_caps), problem)
        });
        Explanation { problem: problem.clone(), chosen, rejected, below, plan }
    }

    /// Turns an explanation into the backend to run, applying forced and strict settings.
    fn decide(&self, e: &Explanation) -> Result<BackendKind, Error> {
        let s = &self.inner.settings;
        if let Some(forced) = s.backend {
            return match e.chosen {
                Some(k) if k == forced => Ok(k),
                _ => Err(Error::ForcedBackendUnavailable {
                    backend: forced,
                    by: self.inner.backend_by,
                    rejection: Rejection { backend: forced, reasons: self.reasons(forced, &e.problem) },
                }),
            };
        }
        let Some(chosen) = e.chosen else {
            return Err(Error::NoBackend { problem: e.problem.to_string(), rejections: e.rejected.clone() });
        };
        let fallbacks: Vec<Rejection> = e
            .rejected
            .iter()
            .filter(|r| is_fallback(&r.reasons))
            .cloned()
            .collect();
        if !fallbacks.is_empty() {
            if s.strict {
                return Err(Error::StrictFallback { chosen, passed_over: fallbacks });
            }
            for r in &fallbacks {
                self.warn_fallback(r, chosen, &e.problem);
            }
        }
        Ok(chosen)
    }

    /// Logs a fallback once per (backend, kinds of reason, device): a server whose lengths vary
    /// logs each cause once, not once per shape.
    fn warn_fallback(&self, r: &Rejection, chosen: BackendKind, problem: &Problem) {
        let key = FallbackKey::of(r);
        if self.inner.warned.read().unwrap_or_else(|e| e.into_inner()).contains(&key) {
            return;
        }
        if !self.inner.warned.write().unwrap_or_else(|e| e.into_inner()).insert(key.clone()) {
            return;
        }
        let device = self.device_summary();
        log_once_keyed(
            log::Level::Warn,
            format!("fallback {} {:?} on {device}", r.backend, key.kinds),
            || {
                format!(
                    "attention: `{}` passed over on {device} for {problem}, falling back to `{chosen}`: {} \
                     (logged once per backend and reason)",
                    r.backend,
                    r.reasons.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("; ")
                )
            },
        );
    }

    fn announce(&self, kind: BackendKind) {
        // A per-handle bit first, so the hot path takes no lock after the first call.
        let bit = 1u32 << BackendKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
        if self.inner.announced.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            let on = if kind.is_gpu() { self.device_summary() } else { "the CPU".into() };
            log_once(log::Level::Info, format!("attention: using {kind} attention on {on}"));
        }
    }

    /// The backend for a problem: the cached decision for its shape, or a full explanation
    /// (every backend's `check`, fallback warnings, strict and forced settings) on first sight.
    fn choose(&self, problem: &Problem) -> Result<BackendKind, Error> {
        let key = ShapeKey::of(problem);
        if let Some(&kind) = self.inner.decisions.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(kind);
        }
        let kind = self.decide(&self.explain(problem))?;
        let mut decisions = self.inner.decisions.write().unwrap_or_else(|e| e.into_inner());
        if decisions.len() >= DECISIONS_CAP {
            decisions.clear(); // many shapes: start over rather than grow without bound
        }
        decisions.insert(key, kind);
        Ok(kind)
    }

    /// Computes `out = softmax(scale · q kᵀ + mask) v` and returns the backend that ran it.
    ///
    /// q and out are `[batch, seqlen_q, heads, head_dim]`, k and v `[batch, seqlen_k,
    /// kv_heads, head_dim]` with `kv_heads` dividing `heads`. All in host memory (CPU backend)
    /// or all in device memory (GPU backends; the kernels run on `out`'s stream).
    ///
    /// ```
    /// use attention::{Layout, Options, Tensor, TensorMut};
    /// let attn = attention::select().unwrap();
    /// let (b, s, h, d) = (1, 8, 2, 16);
    /// let x: Vec<f32> = (0..b * s * h * d).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let mut out = vec![0.0f32; x.len()];
    /// let l = Layout::contiguous(b, s, h, d);
    /// let ran = attn.forward(&Tensor::host(&x, l), &Tensor::host(&x, l), &Tensor::host(&x, l),
    ///                        &mut TensorMut::host(&mut out, l), &Options::default().causal(true)).unwrap();
    /// assert_eq!(ran, attention::BackendKind::Cpu);
    /// ```
    pub fn forward<T: Element>(
        &self,
        q: &Tensor<'_, T>,
        k: &Tensor<'_, T>,
        v: &Tensor<'_, T>,
        out: &mut TensorMut<'_, T>,
        opts: &Options,
    ) -> Result<BackendKind, Error> {
        self.run(q, k, v, out, None, None, opts)
    }

    /// As [`Attention::forward`], also writing the log-sum-exp of each row (natural log, f32,
    /// `[batch, heads, seqlen_q]`, `-inf` for rows that see no key).
    pub fn forward_with_lse<T: Element>(
        &self,
        q: &Tensor<'_, T>,
        k: &Tensor<'_, T>,
        v: &Tensor<'_, T>,
        out: &mut TensorMut<'_, T>,
        lse: &mut LseMut<'_>,
        opts: &Options,
    ) -> Result<BackendKind, Error> {
        self.run(q, k, v, out, Some(lse), None, opts)
    }

    /// Attention over a packed variable-length batch (see [`VarLen`]): q/out are
    /// `[1, total_q, heads, head_dim]` and k/v `[1, total_k, kv_heads, head_dim]`.
    pub fn forward_varlen<T: Element>(
        &self,
        q: &Tensor<'_, T>,
        k: &Tensor<'_, T>,
        v: &Tensor<'_, T>,
        out: &mut TensorMut<'_, T>,
        varlen: &VarLen<'_>,
        opts: &Options,
    ) -> Result<BackendKind, Error> {
        self.run(q, k, v, out, None, Some(varlen), opts)
    }

    /// As [`Attention::forward_varlen`], also writing the log-sum-exp, `[heads, total_q]` f32
    /// (FlashAttention's varlen layout).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_varlen_with_lse<T: Element>(
        &self,
        q: &Tensor<'_, T>,
        k: &Tensor<'_, T>,
        v: &Tensor<'_, T>,
        out: &mut TensorMut<'_, T>,
        lse: &mut LseMut<'_>,
        varlen: &VarLen<'_>,
        opts: &Options,
    ) -> Result<BackendKind, Error> {
        self.run(q, k, v, out, Some(lse), Some(varlen), opts)
    }

    fn run<T: Element>(
        &self,
        q: &Tensor<'_, T>,
        k: &Tensor<'_, T>,
        v: &Tensor<'_, T>,
        out: &mut TensorMut<'_, T>,
        lse: Option<&mut LseMut<'_>>,
        varlen: Option<&VarLen<'_>>,
        opts: &Options,
    ) -> Result<BackendKind, Error> {
        let call = validate(q, k, v, out, lse, varlen, opts)?;
        self.dispatch(call)
    }

    /// Attention of `q` over a KV cache (see [`KvCache`]): decode (one query row per
    /// sequence), speculative decoding (a few), or a chunk of a prefill against what is cached.
    /// q and out are `[batch, q_len, heads, head_dim]`; query row `i` of sequence `b` is at
    /// position `lens[b] - q_len + i` of its cache, so causal masks and windows align
    /// bottom-right against each sequence's own length. `lse`, if given, is f32 `[batch,
    /// heads, q_len]`. Nothing is allocated on the host or read back: with device lengths and
    /// block tables the call can be captured in a CUDA graph and replayed with new ones.
    ///
    /// The cache must already hold the rows of this call's keys and values (write them with
    /// your own append, e.g. vLLM's `reshape_and_cache`, first).
    pub fn forward_kvcache<T: Element>(
        &self,
        q: &Tensor<'_, T>,
        cache: &KvCache<'_, T>,
        out: &mut TensorMut<'_, T>,
        lse: Option<&mut LseMut<'_>>,
        opts: &Options,
    ) -> Result<BackendKind, Error> {
        let call = crate::kvcache::validate_kvcache(q, cache, out, lse, opts, None)?;
        self.dispatch(call)
    }

    /// [`Attention::forward_kvcache`] with caller-provided scratch memory: a split-KV decode
    /// writes its partial results to `workspace` instead of allocating on the stream, so the
    /// call allocates nothing (a CUDA graph of it holds kernels only) and costs no allocator
    /// work per step. Size the workspace with [`Attention::kvcache_workspace_bytes`]; one too
    /// small for a call is still correct (fewer splits). See [`Workspace`] for its rules.
    pub fn forward_kvcache_with_workspace<T: Element>(
        &self,
        q: &Tensor<'_, T>,
        cache: &KvCache<'_, T>,
        out: &mut TensorMut<'_, T>,
        lse: Option<&mut LseMut<'_>>,
        opts: &Options,
        workspace: &mut Workspace<'_>,
    ) -> Result<BackendKind, Error> {
        let call = crate::kvcache::validate_kvcache(q, cache, out, lse, opts, Some(workspace))?;
        self.dispatch(call)
    }

    /// Bytes of [`Workspace`] a KV-cache call of `problem`'s shape uses at most on this
    /// handle's device (`Problem::new(dtype, batch, q_len, max_len, heads, kv_heads,
    /// head_dim)`, `max_len` the cache's capacity): the split-KV partial results of the plan
    /// the decode backend makes for it. 0 where no split is planned, and without a GPU.
    pub fn kvcache_workspace_bytes(&self, problem: &Problem) -> usize {
        let Some(caps) = self.inner.caps.as_ref() else { return 0 };
        self.inner.chain.iter().map(|b| b.workspace_bytes(caps, problem)).max().unwrap_or(0)
    }

    /// Runs a validated call on the best backend that takes it, falling back past recoverable
    /// run-time failures.
    fn dispatch(&self, mut call: crate::tensor::Call<'_>) -> Result<BackendKind, Error> {
        call.allow_tf32 |= self.inner.settings.allow_tf32;
        // Raw device pointers carry no ordinal: they are on this handle's device or rejected
        // by the range check.
        if let MemoryKind::Device { ordinal: usize::MAX } = call.problem.memory {
            call.problem.memory = MemoryKind::Device {
                ordinal: self.inner.caps.as_ref().map(|c| c.ordinal).unwrap_or(0),
            };
        }
        loop {
            let kind = self.choose(&call.problem)?;
            let backend = self
                .inner
                .chain
                .iter()
                .find(|b| b.kind() == kind)
                .expect("decide returns a registered backend");
            match backend.forward(&mut call) {
                Ok(()) => {
                    self.announce(kind);
                    return Ok(kind);
                }
                Err(RunError::Fatal(err)) => return Err(err),
                Err(RunError::Recoverable(reason)) => {
                    let class = KernelClass::of(&call.problem);
                    warn_once(format!(
                        "attention: `{kind}` failed on {} and is taken out of the chain for {class}: {reason}",
                        self.device_summary()
                    ));
                    self.inner
                        .unusable
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((kind, class), Reason::Unusable { why: reason.to_string() });
                    // Decisions made before the failure may name the backend that failed.
                    self.inner.decisions.write().unwrap_or_else(|e| e.into_inner()).clear();
                }
            }
        }
    }
}

/// What a run-time failure of a backend is scoped to: the properties of a problem that choose
/// its kernel. A launch that failed for one class says nothing about another (a different
/// head_dim runs a different kernel), so only the class that failed is taken out of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct KernelClass {
    dtype: crate::dtype::DType,
    head_dim: usize,
    varlen: bool,
    masked: bool,
    softcap: bool,
    vector_aligned: bool,
    kv_cache: Option<crate::problem::KvCacheKind>,
}

impl KernelClass {
    fn of(p: &Problem) -> Self {
        KernelClass {
            dtype: p.dtype,
            head_dim: p.head_dim,
            varlen: p.varlen,
            masked: p.causal || p.window != (None, None),
            softcap: p.softcap.is_some(),
            vector_aligned: p.vector_aligned,
            kv_cache: p.kv_cache,
        }
    }
}

impl fmt::Display for KernelClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} head_dim {}", self.dtype.name(), self.head_dim)?;
        for (on, what) in [(self.varlen, "varlen"), (self.masked, "masked"), (self.softcap, "softcap"), (!self.vector_aligned, "unaligned")] {
            if on {
                write!(f, " {what}")?;
            }
        }
        Ok(())
    }
}

/// Most problem shapes a handle remembers decisions for before it starts over.
const DECISIONS_CAP: usize = 4096;

/// Everything about a problem that a backend's `check` reads: the key of a cached decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ShapeKey {
    dtype: crate::dtype::DType,
    dims: [usize; 6],
    causal: bool,
    with_lse: bool,
    window: (Option<usize>, Option<usize>),
    softcap: Option<u32>,
    memory: MemoryKind,
    varlen: bool,
    vector_aligned: bool,
    kv_cache: Option<crate::problem::KvCacheKind>,
}

impl ShapeKey {
    fn of(p: &Problem) -> Self {
        ShapeKey {
            dtype: p.dtype,
            dims: [p.batch, p.seqlen_q, p.seqlen_k, p.heads, p.kv_heads, p.head_dim],
            causal: p.causal,
            with_lse: p.with_lse,
            window: p.window,
            softcap: p.softcap.map(f32::to_bits),
            memory: p.memory,
            varlen: p.varlen,
            vector_aligned: p.vector_aligned,
            kv_cache: p.kv_cache,
        }
    }
}

/// What makes two fallbacks the same for logging: the backend and the kinds of its reasons
/// (not their values, which name shapes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FallbackKey {
    backend: BackendKind,
    kinds: Vec<std::mem::Discriminant<Reason>>,
}

impl FallbackKey {
    fn of(r: &Rejection) -> Self {
        FallbackKey { backend: r.backend, kinds: r.reasons.iter().map(std::mem::discriminant).collect() }
    }
}


/// Appending to a KV cache ([`KvCacheMut`]), alone or fused with the attention over it.
impl Attention {
    /// Writes new keys and values into a KV cache (FlashAttention's in-call append, vLLM's
    /// `reshape_and_cache`). `k_new`/`v_new` are `[batch, new_len, kv_heads, head_dim]` with any
    /// strides, the element type, head_dim and kv_heads of the cache, in its memory.
    ///
    /// - Contiguous cache: row `i` of sequence `b` goes to position `lens[b] - new_len + i`
    ///   (`lens` counts the keys with the new rows, as `forward_kvcache` does).
    /// - Paged cache: the rows are the `batch × new_len` tokens in row-major order, token `t`
    ///   to slot `slots[t]` (a negative slot: a padding token, skipped). vLLM's `[num_tokens,
    ///   kv_heads, d]` is `Layout::contiguous(num_tokens, 1, kv_heads, d)` (or `(1, num_tokens,
    ///   ...)`: both flatten to the same tokens).
    /// - Packed rows ([`KvCacheMut::with_varlen_queries`], vLLM v1's mixed batches): `[1,
    ///   total_q, kv_heads, head_dim]`, sequence `b`'s `n` rows those its `cu_seqlens_q` give,
    ///   at positions `lens[b] - n + i` of a contiguous cache (pages: at their slots).
    ///
    /// Host caches are copied on the calling thread. Device caches are written by one kernel on
    /// k_cache's stream (cudarc slices are ordered there like every call's operands): no
    /// allocation, no host synchronisation and no host read of device lengths or slots, so it
    /// can be captured in a CUDA graph and replayed with new ones. The kernel skips a row whose
    /// destination is outside the cache (a device length below `new_len` or past `max_len`, a
    /// slot at or past `num_pages * page_size`): a wrong row, never a write outside the cache.
    /// Host lengths and slots are checked instead, and a bad one is an error that writes
    /// nothing. Two tokens given one slot: one of them is written. Not a backend choice: no
    /// `ATTN_BACKEND`/`ATTN_DISABLE` setting applies (the copy runs where the memory is).
    ///
    /// ```
    /// use attention::{KvCacheMut, Layout, SlotMapping, Tensor, TensorMut};
    /// // vLLM: 3 new tokens into 16-row pages, the middle one a padding token.
    /// let (pages, page, hk, d) = (8, 16, 2, 64);
    /// let lp = Layout::contiguous(pages, page, hk, d);
    /// let (mut k_pages, mut v_pages) = (vec![0.0f32; lp.numel()], vec![0.0f32; lp.numel()]);
    /// let ln = Layout::contiguous(3, 1, hk, d); // [num_tokens, kv_heads, d]
    /// let new: Vec<f32> = (0..ln.numel()).map(|i| i as f32).collect();
    /// let slots = [5 * 16 + 3, -1, 0i64];
    /// let mut cache = KvCacheMut::paged(TensorMut::host(&mut k_pages, lp), TensorMut::host(&mut v_pages, lp), SlotMapping::host(&slots));
    /// attention::select().unwrap().append_kv(&Tensor::host(&new, ln), &Tensor::host(&new, ln), &mut cache).unwrap();
    /// drop(cache);
    /// assert_eq!(k_pages[lp.offset(5, 3, 1)], new[ln.offset(0, 0, 1)]);
    /// assert_eq!(v_pages[lp.offset(0, 0, 0)], new[ln.offset(2, 0, 0)]);
    /// ```
    pub fn append_kv<T: Element>(&self, k_new: &Tensor<'_, T>, v_new: &Tensor<'_, T>, cache: &mut KvCacheMut<'_, T>) -> Result<(), Error> {
        crate::kvcache::append(&self.append_kernels(), k_new, v_new, cache)
    }

    /// [`Attention::append_kv`] then [`Attention::forward_kvcache`] over the cache it wrote, in
    /// one call: `lens` (and, for pages, the block table of
    /// [`KvCacheMut::with_block_table`]) serve both, so query row `i` of sequence `b` sits at
    /// position `lens[b] - q_len + i`, with the new rows the last `new_len` keys. Everything
    /// both parts check (and the choice of the attention's backend) is checked before anything
    /// is written: a bad argument is an error that leaves the cache and `out` as they were.
    /// On the device both kernels run on `out`'s stream, one after the other (two launches, no
    /// host synchronisation between them, graph-capturable); the cache must not share memory
    /// with q, k_new, v_new, out or lse. With packed rows
    /// ([`KvCacheMut::with_varlen_queries`]) q and out are `[1, total_q, heads, head_dim]`, one
    /// query row per new K/V row, and lse is `[heads, total_q]`.
    ///
    /// ```
    /// use attention::{CacheLens, KvCacheMut, Layout, Options, Tensor, TensorMut};
    /// // One decode step for two sequences holding 3 and 5 keys: the step's key makes 4 and 6.
    /// let (b, cap, h, hk, d) = (2, 8, 4, 2, 16);
    /// let lc = Layout::contiguous(b, cap, hk, d);
    /// let (mut k, mut v) = (vec![0.25f32; lc.numel()], vec![0.25f32; lc.numel()]);
    /// let (lq, ln) = (Layout::contiguous(b, 1, h, d), Layout::contiguous(b, 1, hk, d));
    /// let (q, new) = (vec![0.5f32; lq.numel()], vec![1.0f32; ln.numel()]);
    /// let mut out = vec![0.0f32; lq.numel()];
    /// let lens = [4, 6];
    /// let mut cache = KvCacheMut::contiguous(TensorMut::host(&mut k, lc), TensorMut::host(&mut v, lc), CacheLens::host(&lens));
    /// let attn = attention::select().unwrap();
    /// attn.forward_kvcache_append(&Tensor::host(&q, lq), &Tensor::host(&new, ln), &Tensor::host(&new, ln), &mut cache,
    ///     &mut TensorMut::host(&mut out, lq), None, &Options::default().causal(true)).unwrap();
    /// assert!(out.iter().all(|&x| x > 0.25 && x < 1.0));
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn forward_kvcache_append<T: Element>(
        &self,
        q: &Tensor<'_, T>,
        k_new: &Tensor<'_, T>,
        v_new: &Tensor<'_, T>,
        cache: &mut KvCacheMut<'_, T>,
        out: &mut TensorMut<'_, T>,
        lse: Option<&mut LseMut<'_>>,
        opts: &Options,
    ) -> Result<BackendKind, Error> {
        crate::kvcache::forward_append(self, &self.append_kernels(), q, k_new, v_new, cache, out, lse, opts)
    }

    /// The append kernels on this handle's device (loaded once per device, at first use).
    fn append_kernels(&self) -> crate::gpu::append::AppendKernels {
        let s = &self.inner.settings;
        crate::gpu::append::AppendKernels::new(self.inner.device.clone(), s.jit, s.cache_dir.clone())
    }
}

impl crate::kvcache::Dispatcher for Attention {
    fn backend_for(&self, call: &crate::tensor::Call<'_>) -> Result<BackendKind, Error> {
        let mut problem = call.problem.clone();
        if let MemoryKind::Device { ordinal: usize::MAX } = problem.memory {
            problem.memory = MemoryKind::Device { ordinal: self.inner.caps.as_ref().map(|c| c.ordinal).unwrap_or(0) };
        }
        self.choose(&problem)
    }

    fn dispatch_call(&self, call: crate::tensor::Call<'_>) -> Result<BackendKind, Error> {
        self.dispatch(call)
    }
}

// The handle is shared across model threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Attention>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::SimulatedGpu;
    use crate::cpu_backend::CpuBackend;
    use crate::tensor::Call;
    use crate::Layout;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A GPU-ranked stand-in whose behaviour each test scripts.
    struct Scripted {
        reasons: Vec<Reason>,
        fail: fn() -> RunError,
        calls: Arc<AtomicUsize>,
    }

    impl Backend for Scripted {
        fn kind(&self) -> BackendKind {
            BackendKind::Naive
        }
        fn check(&self, _: &DeviceCaps, _: &Problem) -> Vec<Reason> {
            self.reasons.clone()
        }
        fn forward(&self, _: &mut Call<'_>) -> Result<(), RunError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Err((self.fail)())
        }
    }

    fn handle(first: Scripted, strict: bool) -> Attention {
        Attention {
            inner: Arc::new(Inner {
                settings: Settings { strict, ..Settings::default() },
                backend_by: "ATTN_BACKEND",
                disabled_by: vec![],
                device: None,
                caps: Some(DeviceCaps::simulated(SimulatedGpu::H100)),
                host_caps: DeviceCaps::simulated(SimulatedGpu::H100),
                no_device: None,
                chain: vec![Box::new(first), Box::new(CpuBackend::new(2))],
                unusable: RwLock::new(HashMap::new()),
                warned: RwLock::new(HashSet::new()),
                announced: AtomicU32::new(0),
                decisions: RwLock::new(HashMap::new()),
            }),
        }
    }

    fn run(attn: &Attention) -> (Result<BackendKind, Error>, Vec<f32>) {
        let l = Layout::contiguous(1, 4, 2, 8);
        let x: Vec<f32> = (0..l.numel()).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut out = vec![f32::NAN; l.numel()];
        let r = attn.forward(
            &Tensor::host(&x, l),
            &Tensor::host(&x, l),
            &Tensor::host(&x, l),
            &mut TensorMut::host(&mut out, l),
            &Options::default(),
        );
        (r, out)
    }

    #[test]
    fn recoverable_failure_marks_the_backend_unusable_and_runs_the_next() {
        let calls = Arc::new(AtomicUsize::new(0));
        let attn = handle(
            Scripted {
                reasons: vec![],
                fail: || RunError::Recoverable(Reason::Unusable { why: "launch refused: too many resources".into() }),
                calls: calls.clone(),
            },
            false,
        );
        let (r, out) = run(&attn);
        assert_eq!(r.unwrap(), BackendKind::Cpu);
        assert!(out.iter().all(|x| x.is_finite()));
        let p = Problem::new(crate::DType::F32, 1, 4, 4, 2, 2, 8).on_host();
        assert!(matches!(&attn.reasons(BackendKind::Naive, &p)[0], Reason::Unusable { why } if why.contains("too many resources")));
        // Marked once: the next call does not try it again.
        run(&attn).0.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Only for what failed: another head_dim runs another kernel and is still tried.
        let other = Problem::new(crate::DType::F32, 1, 4, 4, 2, 2, 16).on_host();
        assert!(attn.reasons(BackendKind::Naive, &other).is_empty());
        let bf16 = Problem::new(crate::DType::BF16, 1, 4, 4, 2, 2, 8).on_host();
        assert!(attn.reasons(BackendKind::Naive, &bf16).is_empty());
    }

    /// A backend that counts how often it is checked and never runs.
    struct Counting(Arc<AtomicUsize>);
    impl Backend for Counting {
        fn kind(&self) -> BackendKind {
            BackendKind::Naive
        }
        fn check(&self, _: &DeviceCaps, _: &Problem) -> Vec<Reason> {
            self.0.fetch_add(1, Ordering::SeqCst);
            vec![Reason::HeadDim { max: 4, found: 8 }]
        }
        fn forward(&self, _: &mut Call<'_>) -> Result<(), RunError> {
            unreachable!("always rejected")
        }
    }

    #[test]
    fn a_shape_seen_before_skips_every_check() {
        let checks = Arc::new(AtomicUsize::new(0));
        let mut attn = handle(Scripted { reasons: vec![], fail: || unreachable!(), calls: Arc::new(AtomicUsize::new(0)) }, false);
        Arc::get_mut(&mut attn.inner).unwrap().chain[0] = Box::new(Counting(checks.clone()));
        for _ in 0..5 {
            assert_eq!(run(&attn).0.unwrap(), BackendKind::Cpu);
        }
        assert_eq!(checks.load(Ordering::SeqCst), 1, "checked on first sight only");
        // explain always answers in full.
        let p = Problem::new(crate::DType::F32, 1, 4, 4, 2, 2, 8).on_host();
        attn.explain(&p);
        assert_eq!(checks.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn fallbacks_are_logged_once_per_backend_and_reason_kind_not_per_shape() {
        let attn = handle(
            Scripted { reasons: vec![Reason::HeadDim { max: 4, found: 8 }], fail: || unreachable!(), calls: Arc::new(AtomicUsize::new(0)) },
            false,
        );
        let rej = |reasons| Rejection { backend: BackendKind::Naive, reasons };
        let (a, b) = (rej(vec![Reason::HeadDim { max: 4, found: 8 }]), rej(vec![Reason::HeadDim { max: 4, found: 96 }]));
        assert_eq!(FallbackKey::of(&a), FallbackKey::of(&b));
        assert_ne!(FallbackKey::of(&a), FallbackKey::of(&rej(vec![Reason::Unaligned])));
        // Many shapes, one cause: one entry, however many calls.
        for n in 1..50 {
            let p = Problem::new(crate::DType::F32, 1, n, n, 2, 2, 8).on_host();
            attn.warn_fallback(&a, BackendKind::Cpu, &p);
        }
        run(&attn).0.unwrap();
        assert_eq!(attn.inner.warned.read().unwrap().len(), 1);
    }

    #[test]
    fn fatal_errors_are_returned_not_hidden() {
        let attn = handle(
            Scripted {
                reasons: vec![],
                fail: || {
                    RunError::Fatal(Error::Cuda {
                        op: "cuLaunchKernel",
                        code: 700,
                        name: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
                        message: "an illegal memory access was encountered".into(),
                    })
                },
                calls: Arc::new(AtomicUsize::new(0)),
            },
            false,
        );
        let err = run(&attn).0.unwrap_err();
        assert!(matches!(err, Error::Cuda { code: 700, .. }), "{err}");
    }

    #[test]
    fn strict_mode_turns_a_fallback_into_an_error() {
        let scripted = |strict| {
            handle(
                Scripted {
                    reasons: vec![Reason::HeadDim { max: 4, found: 8 }],
                    fail: || unreachable!(),
                    calls: Arc::new(AtomicUsize::new(0)),
                },
                strict,
            )
        };
        // Not strict: the fallback runs (and is logged once).
        assert_eq!(run(&scripted(false)).0.unwrap(), BackendKind::Cpu);
        // Strict: an error naming the backend passed over and why; output untouched.
        let (r, out) = run(&scripted(true));
        let err = r.unwrap_err();
        match &err {
            Error::StrictFallback { chosen, passed_over } => {
                assert_eq!(*chosen, BackendKind::Cpu);
                assert_eq!(passed_over[0].backend, BackendKind::Naive);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("ATTN_STRICT") && err.to_string().contains("head_dim 8"));
        assert!(out.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn only_reasons_the_device_should_not_have_are_fallbacks() {
        assert!(is_fallback(&[Reason::HeadDim { max: 256, found: 320 }]));
        assert!(!is_fallback(&[]));
        assert!(!is_fallback(&[Reason::HostMemory, Reason::NoKernelImage { built_for: String::new(), device: "sm_90".into(), jit: String::new() }]));
        assert!(!is_fallback(&[Reason::Disabled { by: "ATTN_DISABLE" }]));
        assert!(!is_fallback(&[Reason::ComputeCapability {
            needed: crate::ComputeCapability::new(8, 0),
            found: crate::ComputeCapability::new(7, 5)
        }]));
    }
}
