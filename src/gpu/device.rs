//! One CUDA device: probed once, its kernel modules loaded once per context.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::{embedded, nvrtc};
use crate::backend::{Reason, RunError};
use crate::call::{Addr, Call, Operand};
use crate::caps::{DeviceCaps, ImageSource, KernelBuild, Nvrtc};
use crate::error::Error;
use crate::log_once::warn_once;
use crate::settings::JitMode;

/// A loaded kernel module and where its image came from.
pub(crate) struct LoadedModule {
    _module: Arc<CudaModule>,
    functions: HashMap<&'static str, CudaFunction>,
    /// Embedded cubin, embedded PTX, or NVRTC.
    pub source: ImageSource,
}

impl LoadedModule {
    pub(crate) fn function(&self, name: &str) -> Option<&CudaFunction> {
        self.functions.get(name)
    }
}

/// One kernel module as a GPU backend uses it: the device, how its image is obtained (embedded
/// or JIT, cached where), and the functions it must hold. Both the `check` path (can the module
/// be had?) and the `forward` path (give me its functions) go through here.
pub(crate) struct Kernels {
    device: Option<Arc<GpuDevice>>,
    module: &'static str,
    functions: &'static [&'static str],
    jit: JitMode,
    cache_dir: Option<PathBuf>,
}

impl Kernels {
    pub(crate) fn new(
        device: Option<Arc<GpuDevice>>,
        module: &'static str,
        functions: &'static [&'static str],
        jit: JitMode,
        cache_dir: Option<PathBuf>,
    ) -> Self {
        Kernels { device, module, functions, jit, cache_dir }
    }

    /// The device this module is for, if one was probed.
    pub(crate) fn device(&self) -> Option<&GpuDevice> {
        self.device.as_deref()
    }

    fn load(&self, dev: &GpuDevice) -> Result<Arc<LoadedModule>, Reason> {
        dev.module(self.module, self.functions, self.jit, self.cache_dir.as_ref())
    }

    /// Whether the module can be had on the device `caps` describes: the reason if not; else the
    /// loaded module on a real device (loaded once, so a missing image is found at selection,
    /// not mid-call), `None` on a simulated one.
    pub(crate) fn availability(&self, caps: &DeviceCaps) -> Result<Option<Arc<LoadedModule>>, Reason> {
        caps.module_source(self.jit, &embedded::module_min_arch(self.module))?;
        self.device.as_ref().map(|dev| self.load(dev)).transpose()
    }

    /// Why the module cannot be had on the device `caps` describes, if it cannot.
    pub(crate) fn unavailable(&self, caps: &DeviceCaps) -> Option<Reason> {
        self.availability(caps).err()
    }

    /// The device and the loaded module, for `forward`.
    pub(crate) fn loaded(&self) -> Result<(&GpuDevice, Arc<LoadedModule>), RunError> {
        let dev = self.device.as_deref().ok_or_else(|| {
            RunError::Recoverable(Reason::NoDevice { why: "no device was probed".into() })
        })?;
        Ok((dev, self.load(dev).map_err(RunError::Recoverable)?))
    }

    /// How the module was (or would be) loaded on the device, for diagnostics.
    pub(crate) fn image_description(&self) -> Option<String> {
        let dev = self.device.as_ref()?;
        Some(match self.load(dev) {
            Ok(m) => m.source.to_string(),
            Err(r) => format!("unavailable: {r}"),
        })
    }
}

impl LoadedModule {
    /// A function the module was loaded with, as a launchable handle.
    pub(crate) fn launchable(&self, name: &str) -> Result<&CudaFunction, RunError> {
        self.function(name).ok_or_else(|| {
            RunError::Recoverable(Reason::Unusable { why: format!("kernel {name} missing from module") })
        })
    }
}

/// A probed device. Shared by every `Attention` handle for this ordinal.
pub(crate) struct GpuDevice {
    pub ctx: Arc<CudaContext>,
    pub caps: DeviceCaps,
    /// Loaded modules by (module, JIT mode): everything that changes the image on this device
    /// (an emulated arch is another `GpuDevice`; the cache directory only says where a JIT
    /// image is stored, so a module loaded through one directory serves handles of another).
    modules: Mutex<HashMap<(&'static str, JitMode), ModuleResult>>,
}

/// A module load's outcome, kept so a failure is explained, not retried, on every call.
type ModuleResult = Result<Arc<LoadedModule>, Reason>;
/// A probe's outcome per ordinal.
type ProbeResult = Result<Arc<GpuDevice>, String>;

static DEVICES: LazyLock<Mutex<HashMap<usize, ProbeResult>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Probes device `ordinal` once per process; later calls return the same result.
/// The error says why no GPU is usable (no driver, no device, bad ordinal...).
pub(crate) fn probe(ordinal: usize) -> Result<Arc<GpuDevice>, String> {
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    devices
        .entry(ordinal)
        .or_insert_with(|| {
            std::panic::catch_unwind(|| probe_uncached(ordinal))
                .unwrap_or_else(|_| Err(DRIVER_TOO_OLD.into()))
        })
        .clone()
}

/// Why no device can be had when the driver library itself misbehaves (cudarc panics).
const DRIVER_TOO_OLD: &str = "the CUDA driver library lacks an expected symbol (driver too old?)";

/// How many CUDA devices the driver shows this process (after `CUDA_VISIBLE_DEVICES`), asked
/// once per process (the driver reads `CUDA_VISIBLE_DEVICES` once, at `cuInit`); the error
/// says why it cannot say (no driver library, `cuInit` failed).
pub(crate) fn visible_device_count() -> Result<usize, String> {
    static COUNT: OnceLock<Result<usize, String>> = OnceLock::new();
    COUNT
        .get_or_init(|| std::panic::catch_unwind(count_uncached).unwrap_or_else(|_| Err(DRIVER_TOO_OLD.into())))
        .clone()
}

fn count_uncached() -> Result<usize, String> {
    // cudarc panics when libcuda is missing: check first.
    // SAFETY: only tries to dlopen the driver library by its known names.
    if !super::libs::driver_library_present() {
        return Err("libcuda.so (the NVIDIA driver) was not found".into());
    }
    result::init().map_err(|e| format!("cuInit failed: {}", driver_error_text(e.0)))?;
    let count = CudaContext::device_count().map_err(|e| driver_error_text(e.0))?;
    Ok(count.max(0) as usize)
}

/// `CUDA_VISIBLE_DEVICES` as the process sees it, for messages about device ordinals.
pub(crate) fn cuda_visible_devices() -> Option<String> {
    std::env::var_os("CUDA_VISIBLE_DEVICES").map(|v| v.to_string_lossy().into_owned())
}

/// What `select()` does with the device ordinal it was given.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum DeviceRequest {
    /// A visible device has the ordinal: probe it.
    Probe,
    /// Ordinal 0 on a machine with no usable device: a CPU-only handle, for this reason.
    CpuOnly(String),
}

/// The rule for the ordinal of `ATTN_DEVICE` / `Selector::device`, a pure function of the
/// ordinal, the driver's device count (or why there is none) and `CUDA_VISIBLE_DEVICES`:
///
/// - an ordinal below the count is probed;
/// - ordinal 0 (the default; an explicit 0 cannot be told from it) with no device or no driver
///   gives the CPU-only handle, as on any machine without a GPU;
/// - any other ordinal names a device that does not exist: an [`Error::InvalidSetting`]
///   naming `ATTN_DEVICE`, the ordinal, how many devices are visible and
///   `CUDA_VISIBLE_DEVICES`. Whoever asked for device 1 (a second shard, a pipeline stage)
///   meant that GPU; a CPU handle in its place would run the shard on the host or fail
///   later, far from the cause.
pub(crate) fn check_ordinal(
    ordinal: usize,
    visible: Result<usize, String>,
    cuda_visible_devices: Option<&str>,
) -> Result<DeviceRequest, Error> {
    match (&visible, ordinal) {
        (Ok(n), o) if o < *n => return Ok(DeviceRequest::Probe),
        (Ok(_), 0) => {
            return Ok(DeviceRequest::CpuOnly("the driver reports no CUDA device (check CUDA_VISIBLE_DEVICES)".into()))
        }
        (Err(why), 0) => return Ok(DeviceRequest::CpuOnly(why.clone())),
        _ => {}
    }
    let env = match cuda_visible_devices {
        Some(v) => format!("CUDA_VISIBLE_DEVICES={v:?}"),
        None => "CUDA_VISIBLE_DEVICES unset".into(),
    };
    let seen = match visible {
        Ok(0) => format!("the driver reports no visible device ({env})"),
        Ok(1) => format!("1 device is visible, ordinal 0 ({env})"),
        Ok(n) => format!("{n} devices are visible, ordinals 0 to {} ({env})", n - 1),
        Err(why) => format!("no device can be counted: {why} ({env})"),
    };
    Err(Error::InvalidSetting {
        var: "ATTN_DEVICE",
        value: ordinal.to_string(),
        expected: format!("the ordinal of a visible CUDA device (ATTN_DEVICE or Selector::device): {seen}"),
    })
}

fn probe_uncached(ordinal: usize) -> Result<Arc<GpuDevice>, String> {
    let count = visible_device_count()?;
    if count == 0 {
        return Err("the driver reports no CUDA device (check CUDA_VISIBLE_DEVICES)".into());
    }
    if ordinal >= count {
        return Err(format!(
            "device {ordinal} was requested (ATTN_DEVICE) but only {count} device(s) are visible (CUDA_VISIBLE_DEVICES)"
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| format!("creating a context: {}", driver_error_text(e.0)))?;
    let attr = |a: sys::CUdevice_attribute| ctx.attribute(a).map(|v| v.max(0) as u64).unwrap_or(0);
    use sys::CUdevice_attribute as A;
    let (free, total) = ctx.mem_get_info().unwrap_or((0, 0));
    let mut driver = 0i32;
    // SAFETY: out-parameter.
    unsafe { sys::cuDriverGetVersion(&mut driver) };
    let caps = DeviceCaps {
        ordinal,
        name: ctx.name().unwrap_or_else(|_| "unknown CUDA device".into()),
        cc: crate::caps::ComputeCapability::new(
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) as u32,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) as u32,
        ),
        sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) as u32,
        smem_per_block_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN) as usize,
        total_mem: total,
        free_mem: free,
        driver_version: ((driver / 1000) as u32, ((driver % 1000) / 10) as u32),
        kernels: KernelBuild::embedded(),
        nvrtc: nvrtc::probe(),
        simulated: false,
        emulated_from: None,
    };
    Ok(Arc::new(GpuDevice { ctx, caps, modules: Mutex::new(HashMap::new()) }))
}

/// `CUDA_ERROR_X (code): description`.
pub(crate) fn driver_error_text(code: CUresult) -> String {
    let e = result::DriverError(code);
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let msg = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{name} ({}): {msg}", code as i32)
}

/// A failed driver call as the crate's error.
pub(crate) fn cuda_error(op: &'static str, code: CUresult) -> Error {
    Error::cuda(op, code)
}

/// Errors after which the context is corrupt: they must reach the caller, never be hidden by
/// a fallback.
pub(crate) fn is_sticky(code: CUresult) -> bool {
    use CUresult::*;
    matches!(
        code,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_LAUNCH_TIMEOUT
            | CUDA_ERROR_CONTEXT_IS_DESTROYED
    )
}

/// A failed launch as a backend outcome: sticky errors and anything after the output was
/// touched are fatal; a refusal before that lets the next backend run the call.
pub(crate) fn launch_failure(code: CUresult, wrote_output: bool) -> RunError {
    if is_sticky(code) || wrote_output {
        RunError::Fatal(cuda_error("cuLaunchKernel", code))
    } else {
        RunError::Recoverable(Reason::Unusable { why: format!("kernel launch refused: {}", driver_error_text(code)) })
    }
}

/// The device address of a validated device operand (0 for host memory, which GPU backends
/// never receive: their `check` rejects it).
pub(crate) fn device_addr(o: &Operand) -> u64 {
    o.addr.device_or_null()
}

/// Module-load errors that mean "this image cannot run here" (repairable by JIT).
fn is_missing_image(code: CUresult) -> bool {
    use CUresult::*;
    matches!(
        code,
        CUDA_ERROR_NO_BINARY_FOR_GPU
            | CUDA_ERROR_INVALID_PTX
            | CUDA_ERROR_UNSUPPORTED_PTX_VERSION
            | CUDA_ERROR_INVALID_IMAGE
            | CUDA_ERROR_JIT_COMPILER_NOT_FOUND
            | CUDA_ERROR_INVALID_SOURCE
    )
}

/// Warnings that must appear once per process, not once per call.

impl GpuDevice {
    /// The module `name` (a `cuda/<name>.cu` file), loaded once per (context, JIT mode), with
    /// the listed functions resolved. A reason explains a module that cannot be had.
    pub(crate) fn module(
        &self,
        name: &'static str,
        functions: &[&'static str],
        jit: JitMode,
        cache_dir: Option<&PathBuf>,
    ) -> Result<Arc<LoadedModule>, Reason> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        modules
            .entry((name, jit))
            .or_insert_with(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.load(name, functions, jit, cache_dir)
                }))
                .unwrap_or_else(|_| {
                    Err(Reason::Unusable { why: format!("loading module {name} panicked") })
                })
                .map(Arc::new)
            })
            .clone()
    }

    fn load(
        &self,
        name: &'static str,
        functions: &[&'static str],
        jit: JitMode,
        cache_dir: Option<&PathBuf>,
    ) -> Result<LoadedModule, Reason> {
        let source = self.caps.module_source(jit, &embedded::module_min_arch(name))?;
        if let ImageSource::Embedded(m) = source {
            let image = embedded::fatbin(name).ok_or_else(|| Reason::Unusable {
                why: format!("module {name} has no embedded fatbin"),
            })?;
            match self.load_image(image.to_vec(), functions, source) {
                Ok(m) => return Ok(m),
                Err(code) if is_missing_image(code) => {
                    let why = format!(
                        "the embedded {m:?} image of module {name} does not load on {} ({})",
                        self.caps.cc.sm(),
                        driver_error_text(code)
                    );
                    if jit == JitMode::Never || !matches!(self.caps.nvrtc, Nvrtc::Available { .. }) {
                        return Err(Reason::NoKernelImage {
                            built_for: self.caps.kernels.built_for(),
                            device: self.caps.cc.sm(),
                            jit: format!("{why}, and JIT is unavailable"),
                        });
                    }
                    warn_once(format!("attention: {why}; compiling it with NVRTC instead"));
                }
                Err(code) => {
                    return Err(Reason::Unusable {
                        why: format!("loading module {name}: {}", driver_error_text(code)),
                    })
                }
            }
        }
        let target = match source {
            ImageSource::EmulatedPtx(cc) => nvrtc::JitTarget::Ptx(cc),
            _ => nvrtc::JitTarget::Cubin(self.caps.cc),
        };
        let image = self.jit_compile(name, target, cache_dir)?;
        let loaded_as = if matches!(source, ImageSource::EmulatedPtx(_)) { source } else { ImageSource::Jit };
        self.load_image(image, functions, loaded_as).map_err(|code| Reason::Jit {
            why: format!("the NVRTC image of {name} did not load: {}", driver_error_text(code)),
        })
    }

    fn load_image(
        &self,
        image: Vec<u8>,
        functions: &[&'static str],
        source: ImageSource,
    ) -> Result<LoadedModule, CUresult> {
        // cuModuleLoadData wants an aligned buffer; a Vec is allocated with malloc alignment.
        let module = self.ctx.load_module(Ptx::from_binary(image)).map_err(|e| e.0)?;
        let mut table = HashMap::new();
        for &f in functions {
            table.insert(f, module.load_function(f).map_err(|e| e.0)?);
        }
        Ok(LoadedModule { _module: module, functions: table, source })
    }

    /// NVRTC for `target`, through the on-disk cache.
    fn jit_compile(
        &self,
        name: &'static str,
        target: nvrtc::JitTarget,
        cache_dir: Option<&PathBuf>,
    ) -> Result<Vec<u8>, Reason> {
        let version = match self.caps.nvrtc {
            Nvrtc::Available { version } => version,
            Nvrtc::Missing(ref why) => return Err(Reason::Jit { why: why.clone() }),
        };
        nvrtc::compile_cached(name, target, version, cache_dir).map(|(image, _)| image)
    }

    /// This device described as an older `arch` (`ATTN_EMULATE_ARCH`): same context, the
    /// emulated capabilities, and a module table of its own (modules load as that arch's PTX).
    pub(crate) fn emulating(&self, arch: crate::caps::ComputeCapability) -> Option<Arc<GpuDevice>> {
        let caps = self.caps.emulating(arch)?;
        Some(Arc::new(GpuDevice { ctx: self.ctx.clone(), caps, modules: Mutex::new(HashMap::new()) }))
    }

    /// What every GPU backend does before its first launch: make the context current and check
    /// every operand against its allocation.
    pub(crate) fn prepare(&self, call: &Call<'_>) -> Result<(), RunError> {
        self.ctx.bind_to_thread().map_err(|e| RunError::Fatal(cuda_error("cuCtxSetCurrent", e.0)))?;
        let elem = call.problem.dtype.size_bytes() as u64;
        for (name, o) in [("q", &call.q), ("k", &call.k), ("v", &call.v), ("out", &call.out)] {
            self.check_addr(name, o.addr, o.layout.span().unwrap_or(0) as u64 * elem, "q")?;
        }
        if let Some(l) = &call.lse {
            self.check_addr("lse", l.addr, l.len as u64 * 4, "q")?;
        }
        if let Some(kv) = &call.kv {
            self.check_addr("cache_lens", kv.lens, call.problem.batch as u64 * 4, "q")?;
            if let Some(t) = kv.table {
                self.check_addr("block_table", t, kv.table_entries as u64 * 4, "q")?;
            }
            if let Some((w, bytes)) = kv.workspace {
                self.check_addr("workspace", w, bytes as u64, "q")?;
            }
            if let Some(cu) = kv.query_starts {
                self.check_addr("cu_seqlens_q", cu, (call.problem.batch as u64 + 1) * 4, "q")?;
            }
        }
        if let Some(v) = &call.varlen {
            let bytes = (call.problem.batch as u64 + 1) * 4;
            self.check_addr("cu_seqlens_q", v.cu_seqlens_q, bytes, "q")?;
            self.check_addr("cu_seqlens_k", v.cu_seqlens_k, bytes, "q")?;
        }
        Ok(())
    }

    /// Checks one device operand before a kernel gets it: a raw pointer against its allocation
    /// ([`GpuDevice::check_range`]); a cudarc slice passes, since validation already compared
    /// the layout with the slice's length and its device with the call's; host memory is an
    /// error (`like` names the operand whose memory it must share).
    pub(crate) fn check_addr(&self, arg: &'static str, addr: Addr, bytes: u64, like: &str) -> Result<(), Error> {
        match addr {
            Addr::Device(p) => self.check_range(arg, p, bytes),
            Addr::Slice(_) => Ok(()),
            Addr::Host(_) => Err(Error::invalid(arg, "host memory", format!("device memory like {like}"))),
        }
    }

    /// Checks that memory of device `ordinal` is this device's.
    pub(crate) fn check_device(&self, arg: &'static str, ordinal: usize) -> Result<(), Error> {
        if ordinal != self.caps.ordinal {
            return Err(Error::invalid(
                arg,
                format!("memory of device {ordinal}"),
                format!("memory of device {} (this handle's; see ATTN_DEVICE)", self.caps.ordinal),
            ));
        }
        Ok(())
    }

    /// Checks that `[ptr, ptr + bytes)` lies inside one allocation on this device, so no kernel
    /// can read or write past what the caller owns.
    pub(crate) fn check_range(&self, arg: &'static str, ptr: u64, bytes: u64) -> Result<(), Error> {
        let mut ordinal: i32 = -1;
        // SAFETY: out-parameters only; the driver validates the pointer.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                &mut ordinal as *mut i32 as *mut std::ffi::c_void,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        };
        if r != CUresult::CUDA_SUCCESS {
            return Err(Error::invalid(
                arg,
                format!("pointer {ptr:#x}"),
                format!("memory the CUDA driver knows ({})", driver_error_text(r)),
            ));
        }
        self.check_device(arg, ordinal as usize)?;
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: out-parameters only.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
        if r == CUresult::CUDA_SUCCESS && ptr + bytes > base + size as u64 {
            return Err(Error::invalid(
                arg,
                format!("{bytes} bytes from {ptr:#x}"),
                format!("a range inside its allocation ({size} bytes from {base:#x})"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(ordinal: usize, visible: Result<usize, String>, env: Option<&str>) -> String {
        match check_ordinal(ordinal, visible, env) {
            Err(Error::InvalidSetting { var: "ATTN_DEVICE", value, expected }) => {
                assert_eq!(value, ordinal.to_string());
                assert!(expected.contains("ATTN_DEVICE") && expected.contains("Selector::device"), "{expected}");
                assert!(expected.contains("CUDA_VISIBLE_DEVICES"), "{expected}");
                expected
            }
            other => panic!("ordinal {ordinal}: expected an ATTN_DEVICE setting error, got {other:?}"),
        }
    }

    #[test]
    fn visible_ordinals_are_probed() {
        assert_eq!(check_ordinal(0, Ok(1), None).unwrap(), DeviceRequest::Probe);
        assert_eq!(check_ordinal(1, Ok(2), Some("0,1")).unwrap(), DeviceRequest::Probe);
        assert_eq!(check_ordinal(7, Ok(8), None).unwrap(), DeviceRequest::Probe);
    }

    #[test]
    fn default_ordinal_without_a_gpu_is_a_cpu_handle() {
        match check_ordinal(0, Ok(0), Some("")).unwrap() {
            DeviceRequest::CpuOnly(why) => assert!(why.contains("no CUDA device") && why.contains("CUDA_VISIBLE_DEVICES"), "{why}"),
            other => panic!("{other:?}"),
        }
        let why = "libcuda.so (the NVIDIA driver) was not found".to_string();
        assert_eq!(check_ordinal(0, Err(why.clone()), None).unwrap(), DeviceRequest::CpuOnly(why));
    }

    #[test]
    fn missing_ordinal_is_an_attn_device_error_naming_the_count() {
        let e = rejected(1, Ok(1), None);
        assert!(e.contains("1 device is visible, ordinal 0") && e.contains("CUDA_VISIBLE_DEVICES unset"), "{e}");
        let e = rejected(2, Ok(2), Some("3,5"));
        assert!(e.contains("2 devices are visible, ordinals 0 to 1") && e.contains("CUDA_VISIBLE_DEVICES=\"3,5\""), "{e}");
        let e = rejected(1, Ok(0), Some(""));
        assert!(e.contains("no visible device") && e.contains("CUDA_VISIBLE_DEVICES=\"\""), "{e}");
        let e = rejected(3, Err("cuInit failed: CUDA_ERROR_NO_DEVICE".into()), None);
        assert!(e.contains("no device can be counted: cuInit failed: CUDA_ERROR_NO_DEVICE"), "{e}");
        let e = rejected(usize::MAX, Ok(8), None);
        assert!(e.contains("8 devices are visible, ordinals 0 to 7"), "{e}");
        // The whole error as the user sees it.
        let shown = check_ordinal(1, Ok(1), Some("0")).unwrap_err().to_string();
        assert_eq!(
            shown,
            "invalid setting ATTN_DEVICE=\"1\": expected the ordinal of a visible CUDA device (ATTN_DEVICE or \
             Selector::device): 1 device is visible, ordinal 0 (CUDA_VISIBLE_DEVICES=\"0\")"
        );
    }
}
