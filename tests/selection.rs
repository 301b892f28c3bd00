//! Selection on simulated devices: which backend runs, and the typed reasons for the others.
//! Runs everywhere (no GPU needed).

use attention::arch::{ArchSpec, ImageMatch, DEFAULT_ARCH_LIST};
use attention::{
    BackendKind, ComputeCapability, DType, DeviceCaps, Error, ImageSource, JitMode, KernelBuild, Nvrtc,
    Problem, Reason, Selector, Settings, SimulatedGpu,
};

fn handle(caps: DeviceCaps, settings: Settings) -> attention::Attention {
    Selector::from_settings(settings).simulate(caps).select().unwrap()
}

/// The reasons `kind` was passed over (the explanation lists every higher-ranked backend).
fn rejected(e: &attention::Explanation, kind: BackendKind) -> &[Reason] {
    &e.rejected.iter().find(|r| r.backend == kind).unwrap_or_else(|| panic!("{kind} not rejected: {e}")).reasons
}

fn device_problem() -> Problem {
    Problem::new(DType::BF16, 2, 512, 512, 16, 4, 128).causal(true)
}

fn sass(img: &ImageSource) -> Option<(u32, u32)> {
    match img {
        ImageSource::Embedded(ImageMatch::Sass(ArchSpec { major, minor, .. })) => Some((*major, *minor)),
        _ => None,
    }
}

/// The table for a crate built by nvcc with the default arch list (JIT on, NVRTC 13 present):
/// which backend runs a bf16 problem in device memory, and which image it loads.
#[test]
fn selection_table_default_build() {
    use BackendKind::{Flash, Naive};
    /// (device, backend that runs the problem, embedded cubin it loads)
    type Row = (SimulatedGpu, Option<BackendKind>, Option<(u32, u32)>);
    let expect: [Row; 9] = [
        (SimulatedGpu::P100, None, None),
        (SimulatedGpu::V100, None, None),
        // bf16 needs sm_80 tensor cores: mem_efficient says so, naive runs it.
        (SimulatedGpu::T4, Some(Naive), Some((7, 5))),
        (SimulatedGpu::A100, Some(Flash), Some((8, 0))),
        (SimulatedGpu::A10, Some(Flash), Some((8, 6))),
        (SimulatedGpu::Rtx4090, Some(Flash), Some((8, 9))),
        (SimulatedGpu::H100, Some(Flash), Some((9, 0))),
        (SimulatedGpu::B200, Some(Flash), Some((10, 0))),
        (SimulatedGpu::Rtx5090, Some(Flash), Some((12, 0))),
    ];
    for (gpu, backend, image) in expect {
        let caps = DeviceCaps::simulated(gpu).with_kernels(KernelBuild::nvcc(DEFAULT_ARCH_LIST));
        let attn = handle(caps.clone(), Settings::default());
        let e = attn.explain(&device_problem());
        assert_eq!(e.chosen, backend, "{gpu:?}: {e}");
        let flash = &e.rejected.iter().find(|r| r.backend == Flash);
        if caps.cc < ComputeCapability::new(8, 0) {
            // Flash is not for this device: its reason is the compute capability, not a fallback.
            let needed = ComputeCapability::new(8, 0);
            assert_eq!(flash.unwrap().reasons, vec![Reason::ComputeCapability { needed, found: caps.cc }], "{gpu:?}");
        }
        match image {
            Some(cc) => {
                let src = caps.kernel_source(JitMode::Auto, ComputeCapability::new(0, 0)).unwrap();
                assert_eq!(sass(&src), Some(cc), "{gpu:?} should run the embedded {cc:?} cubin");
            }
            None => {
                // Pre-Turing: no image, and NVRTC 13 cannot target it; device memory is never
                // handed to the CPU backend.
                let naive = e.rejected.iter().find(|r| r.backend == BackendKind::Naive).unwrap();
                assert!(
                    matches!(&naive.reasons[..], [Reason::NoKernelImage { device, jit, .. }]
                        if device == &caps.cc.sm() && jit.contains("oldest: sm_75")),
                    "{gpu:?}: {naive}"
                );
                let cpu = e.rejected.iter().find(|r| r.backend == BackendKind::Cpu).unwrap();
                assert_eq!(cpu.reasons, vec![Reason::DeviceMemory]);
            }
        }
    }
}

/// What flash rejects on an H100, each with its own typed reason; mem_efficient takes it.
#[test]
fn flash_rejects_what_it_cannot_run() {
    let attn = handle(DeviceCaps::simulated(SimulatedGpu::H100), Settings::default());
    let base = device_problem();
    let mut f32_problem = base.clone();
    f32_problem.dtype = DType::F32;
    let mut wide = base.clone();
    wide.head_dim = 320;
    let mut odd = base.clone();
    odd.head_dim = 36;
    let mut unaligned = base.clone();
    unaligned.vector_aligned = false;
    let cases: [(Problem, Reason); 4] = [
        (f32_problem, Reason::DType { found: DType::F32, supported: "f16, bf16" }),
        (wide, Reason::HeadDim { max: 256, found: 320 }),
        (odd, Reason::HeadDimMultiple { multiple: 8, found: 36 }),
        (unaligned, Reason::Unaligned),
    ];
    for (p, reason) in cases {
        let e = attn.explain(&p);
        assert_eq!(e.chosen, Some(BackendKind::MemEfficient), "{e}");
        assert_eq!(rejected(&e, BackendKind::Flash), vec![reason]);
    }
    // A device without enough shared memory for the d=256 kernel.
    let mut small = DeviceCaps::simulated(SimulatedGpu::A10);
    small.smem_per_block_optin = 64 * 1024;
    let mut d256 = base.clone();
    d256.head_dim = 256;
    let e = handle(small, Settings::default()).explain(&d256);
    assert_eq!(rejected(&e, BackendKind::Flash), vec![Reason::SharedMemory { needed: 90112, available: 65536 }]);
}

/// A build without nvcc compiles at first use on every device NVRTC 13 can target.
#[test]
fn selection_table_jit_only_build() {
    for gpu in SimulatedGpu::ALL {
        let caps = DeviceCaps::simulated(gpu).with_kernels(KernelBuild::jit_only());
        let jit_ok = caps.cc >= ComputeCapability::new(7, 5);
        let src = caps.kernel_source(JitMode::Auto, ComputeCapability::new(0, 0));
        assert_eq!(src.is_ok(), jit_ok, "{gpu:?}: {src:?}");
        if jit_ok {
            assert_eq!(src.unwrap(), ImageSource::Jit);
        }
        let e = handle(caps, Settings::default()).explain(&device_problem());
        assert_eq!(e.chosen.is_some(), jit_ok, "{gpu:?}: {e}");
    }
}

#[test]
fn missing_arch_is_repaired_by_jit_or_explained() {
    // Built for sm_80 only: no image for the H100.
    let caps = DeviceCaps::simulated(SimulatedGpu::H100).with_kernels(KernelBuild::nvcc("8.0"));
    assert_eq!(caps.kernel_source(JitMode::Auto, ComputeCapability::new(0, 0)), Ok(ImageSource::Jit));
    let never = Settings { jit: JitMode::Never, ..Settings::default() };
    let e = handle(caps.clone(), never).explain(&device_problem());
    assert_eq!(e.chosen, None);
    let r = &rejected(&e, BackendKind::Flash)[0];
    assert!(matches!(r, Reason::NoKernelImage { built_for, device, .. } if built_for == "8.0" && device == "sm_90"), "{r:?}");
    let text = r.to_string();
    for needle in ["[8.0]", "sm_90", "ATTN_CUDA_ARCH_LIST", "9.0", "ATTN_JIT"] {
        assert!(text.contains(needle), "reason should mention {needle}: {text}");
    }
    // +PTX on an older entry: the driver compiles it.
    let ptx = DeviceCaps::simulated(SimulatedGpu::H100).with_kernels(KernelBuild::nvcc("8.0+PTX"));
    assert!(matches!(
        ptx.kernel_source(JitMode::Never, ComputeCapability::new(0, 0)),
        Ok(ImageSource::Embedded(ImageMatch::Ptx(_)))
    ));
}

#[test]
fn jit_always_needs_nvrtc() {
    let caps = DeviceCaps::simulated(SimulatedGpu::A100).with_nvrtc(Nvrtc::Missing("not installed".into()));
    let always = Settings { jit: JitMode::Always, ..Settings::default() };
    let e = handle(caps.clone(), always).explain(&device_problem());
    assert_eq!(e.chosen, None);
    assert!(matches!(&rejected(&e, BackendKind::Flash)[0], Reason::Jit { why } if why.contains("ATTN_JIT=always") && why.contains("not installed")));
    // A JIT-only build without NVRTC has no image at all.
    let e = handle(caps.with_kernels(KernelBuild::jit_only()), Settings::default()).explain(&device_problem());
    assert!(matches!(&rejected(&e, BackendKind::Flash)[0], Reason::NoKernelImage { built_for, jit, .. } if built_for.is_empty() && jit.contains("NVRTC is unavailable")));
}

#[test]
fn host_tensors_run_on_the_cpu_without_a_fallback() {
    for gpu in SimulatedGpu::ALL {
        let e = handle(DeviceCaps::simulated(gpu), Settings::default()).explain(&device_problem().on_host());
        assert_eq!(e.chosen, Some(BackendKind::Cpu));
        assert!(e.rejected[0].reasons.contains(&Reason::HostMemory), "{e}");
    }
}

#[test]
fn disabled_and_forced_backends_say_which_setting() {
    let caps = DeviceCaps::simulated(SimulatedGpu::H100);
    let disabled = Settings { disabled: vec![BackendKind::Naive], ..Settings::default() };
    let disabled = Settings { disabled: vec![BackendKind::Flash, BackendKind::MemEfficient], ..disabled };
    let e = handle(caps.clone(), disabled).explain(&device_problem());
    assert_eq!(rejected(&e, BackendKind::Flash), vec![Reason::Disabled { by: "ATTN_DISABLE" }]);
    assert_eq!(rejected(&e, BackendKind::MemEfficient), vec![Reason::Disabled { by: "ATTN_DISABLE" }]);
    assert!(rejected(&e, BackendKind::Flash)[0].to_string().contains("ATTN_DISABLE"));

    let attn = Selector::from_settings(Settings::default()).disable(BackendKind::Flash).simulate(caps.clone()).select().unwrap();
    let e = attn.explain(&device_problem());
    assert_eq!(rejected(&e, BackendKind::Flash), vec![Reason::Disabled { by: "Selector::disable" }]);
    assert_eq!(e.chosen, Some(BackendKind::MemEfficient));

    let forced = Settings { backend: Some(BackendKind::Cpu), ..Settings::default() };
    let e = handle(caps.clone(), forced).explain(&device_problem().on_host());
    assert_eq!(e.chosen, Some(BackendKind::Cpu));
    assert_eq!(e.rejected[0].reasons, vec![Reason::NotForced { forced: BackendKind::Cpu, by: "ATTN_BACKEND" }]);

    // Forcing one backend explains every other by the setting.
    let xformers = Settings { backend: Some(BackendKind::MemEfficient), ..Settings::default() };
    let e = handle(caps, xformers).explain(&device_problem());
    assert_eq!(e.chosen, Some(BackendKind::MemEfficient));
    assert_eq!(e.rejected[0].reasons, vec![Reason::NotForced { forced: BackendKind::MemEfficient, by: "ATTN_BACKEND" }]);
}

#[test]
fn forced_backend_that_cannot_run_is_an_error_with_reasons() {
    let forced = Settings { backend: Some(BackendKind::Naive), ..Settings::default() };
    let attn = handle(DeviceCaps::simulated(SimulatedGpu::T4), forced);
    let x = vec![0.25f32; 2 * 3 * 4];
    let l = attention::Layout::contiguous(1, 3, 2, 4);
    let mut out = vec![f32::NAN; x.len()];
    let err = attn
        .forward(
            &attention::Tensor::host(&x, l),
            &attention::Tensor::host(&x, l),
            &attention::Tensor::host(&x, l),
            &mut attention::TensorMut::host(&mut out, l),
            &attention::Options::default(),
        )
        .unwrap_err();
    match &err {
        Error::ForcedBackendUnavailable { backend, by, rejection } => {
            assert_eq!(*backend, BackendKind::Naive);
            assert_eq!(*by, "ATTN_BACKEND");
            assert!(rejection.reasons.contains(&Reason::HostMemory));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("naive") && err.to_string().contains("host memory"));
    assert!(out.iter().all(|x| x.is_nan()), "a failed call must leave the output untouched");
}

#[test]
fn device_memory_never_falls_to_the_cpu() {
    // No GPU at all (the CI machine) and a problem in device memory: an error, not a copy.
    let e = handle(DeviceCaps::simulated(SimulatedGpu::P100), Settings::default()).explain(&device_problem());
    assert_eq!(e.chosen, None);
    assert!(e.rejected.iter().any(|r| r.backend == BackendKind::Cpu && r.reasons == vec![Reason::DeviceMemory]));
}

#[test]
fn backend_names_parse() {
    assert_eq!("flash".parse::<BackendKind>().unwrap(), BackendKind::Flash);
    assert_eq!("mem_efficient".parse::<BackendKind>().unwrap(), BackendKind::MemEfficient);
    assert_eq!("xformers".parse::<BackendKind>().unwrap(), BackendKind::MemEfficient);
    assert_eq!(" Naive ".parse::<BackendKind>().unwrap(), BackendKind::Naive);
    assert_eq!("cpu".parse::<BackendKind>().unwrap(), BackendKind::Cpu);
    let err = "cudnn".parse::<BackendKind>().unwrap_err().to_string();
    assert!(err.contains("cudnn") && err.contains("flash, mem_efficient (alias xformers), naive, cpu"), "{err}");
}

#[test]
fn select_without_a_gpu_never_panics_and_uses_the_cpu() {
    // On a machine without a driver this exercises the no-device path; with one, the real probe.
    let attn = attention::select().unwrap();
    let p = device_problem().on_host();
    assert_eq!(attn.explain(&p).chosen, Some(BackendKind::Cpu));
    if attn.device_caps().is_none() {
        assert!(attn.no_device_reason().is_some());
        let e = attn.explain(&device_problem());
        assert!(matches!(e.rejected[0].reasons[0], Reason::NoDevice { .. }));
    }
}

/// `ATTN_EMULATE_ARCH` describes the device as the older arch to every backend and loads
/// that arch's PTX; an arch newer than the device is a setting error.
#[test]
fn emulated_arch_is_chosen_for_as_that_device() {
    let h100 = DeviceCaps::simulated(SimulatedGpu::H100);
    let turing = ComputeCapability::new(7, 5);
    let attn = Selector::from_settings(Settings::default()).simulate(h100.clone()).emulate_arch(turing).select().unwrap();
    let caps = attn.device_caps().unwrap();
    assert_eq!((caps.cc, caps.smem_per_block_optin, caps.emulated_from), (turing, 64 * 1024, Some(h100.cc)));
    assert!(caps.name.contains("emulating sm_75"), "{}", caps.name);
    let e = attn.explain(&device_problem());
    let flash = e.rejected.iter().find(|r| r.backend == BackendKind::Flash).unwrap();
    assert_eq!(flash.reasons, vec![Reason::ComputeCapability { needed: ComputeCapability::new(8, 0), found: turing }]);
    assert_eq!(caps.kernel_source(JitMode::Auto, turing), Ok(ImageSource::EmulatedPtx(turing)));
    // Without NVRTC there is no PTX to run: said so, naming the setting.
    let no_nvrtc = h100.clone().with_nvrtc(Nvrtc::Missing("not installed".into()));
    let attn = Selector::from_settings(Settings::default()).simulate(no_nvrtc).emulate_arch(turing).select().unwrap();
    let e = attn.explain(&device_problem());
    let naive = e.rejected.iter().find(|r| r.backend == BackendKind::Naive).unwrap();
    assert!(naive.to_string().contains("ATTN_EMULATE_ARCH needs NVRTC"), "{naive}");
    // Newer than the device: an error naming the setting.
    let err = Selector::from_settings(Settings::default())
        .simulate(DeviceCaps::simulated(SimulatedGpu::A100))
        .emulate_arch(ComputeCapability::new(9, 0))
        .select()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidSetting { var: "ATTN_EMULATE_ARCH", .. }), "{err}");
}

/// Packed variable-length batches: flash runs them; naive says it cannot.
#[test]
fn varlen_problems_skip_the_naive_backend_with_a_reason() {
    let attn = handle(DeviceCaps::simulated(SimulatedGpu::H100), Settings::default());
    let p = device_problem().varlen(true);
    assert_eq!(attn.explain(&p).chosen, Some(BackendKind::Flash));
    let mut f32_problem = p.clone();
    f32_problem.dtype = DType::F32;
    assert_eq!(attn.explain(&f32_problem).chosen, Some(BackendKind::MemEfficient));
    assert!(attn.reasons(BackendKind::Naive, &f32_problem).contains(&Reason::VarLen));
    assert!(Reason::VarLen.to_string().contains("cu_seqlens"));
}

/// A T4 (sm_75) gets mem_efficient for f16 and f32, with flash's compute-capability reason in
/// the explanation (not a fallback: flash was never for this device); bf16 goes to naive with
/// mem_efficient's dtype reason, which is a fallback.
#[test]
fn turing_runs_mem_efficient_with_flash_explained() {
    let attn = handle(DeviceCaps::simulated(SimulatedGpu::T4).with_kernels(KernelBuild::nvcc(DEFAULT_ARCH_LIST)), Settings::default());
    let turing = ComputeCapability::new(7, 5);
    for dtype in [DType::F16, DType::F32] {
        let mut p = device_problem();
        p.dtype = dtype;
        for head_dim in [1, 40, 128, 300, 512] {
            p.head_dim = head_dim;
            let e = attn.explain(&p);
            assert_eq!(e.chosen, Some(BackendKind::MemEfficient), "{e}");
            let flash = e.rejected.iter().find(|r| r.backend == BackendKind::Flash).unwrap();
            assert_eq!(flash.reasons, vec![Reason::ComputeCapability { needed: ComputeCapability::new(8, 0), found: turing }]);
            assert!(!flash.is_fallback(), "{e}");
        }
    }
    let e = attn.explain(&device_problem());
    assert_eq!(e.chosen, Some(BackendKind::Naive));
    let me = e.rejected.iter().find(|r| r.backend == BackendKind::MemEfficient).unwrap();
    assert!(matches!(me.reasons[..], [Reason::DType { found: DType::BF16, .. }]) && me.is_fallback(), "{e}");
    // Past mem_efficient's head_dim limit: naive, with the reason.
    let mut wide = device_problem();
    wide.dtype = DType::F16;
    wide.head_dim = 640;
    assert_eq!(attn.reasons(BackendKind::MemEfficient, &wide), vec![Reason::HeadDim { max: 512, found: 640 }]);
}

/// Decode shapes (a few query rows against long keys) rank the decode backend first on every
/// arch it serves (bf16 included on Turing: it needs no tensor cores); prefills pass it by
/// without a fallback warning; KV-cache calls run on decode or, in host memory, cpu.
#[test]
fn decode_shapes_run_on_the_decode_backend() {
    let decode = Problem::new(DType::BF16, 4, 1, 8192, 32, 8, 128);
    for gpu in [SimulatedGpu::T4, SimulatedGpu::A100, SimulatedGpu::H100, SimulatedGpu::B200] {
        let attn = handle(DeviceCaps::simulated(gpu), Settings::default());
        let e = attn.explain(&decode);
        assert_eq!(e.chosen, Some(BackendKind::Decode), "{gpu:?}: {e}");
        let e = attn.explain(&device_problem());
        let r = e.rejected.iter().find(|r| r.backend == BackendKind::Decode).unwrap();
        assert_eq!(r.reasons, vec![Reason::NotADecode { seqlen_q: 512, max: 16 }]);
        assert!(!r.is_fallback(), "a prefill is not a fallback from decode");
        let kv = decode.clone().kv_cache(attention::KvCacheKind::Paged { page_size: 16 });
        assert_eq!(attn.explain(&kv).chosen, Some(BackendKind::Decode), "{gpu:?}");
    }
    // Without decode, a KV-cache call on the device has no backend: the prefill kernels say
    // why, and the CPU never copies device memory.
    let attn = Selector::from_settings(Settings::default()).disable(BackendKind::Decode).simulate(DeviceCaps::simulated(SimulatedGpu::H100)).select().unwrap();
    let kv = decode.kv_cache(attention::KvCacheKind::Contiguous);
    let e = attn.explain(&kv);
    assert_eq!(e.chosen, None);
    assert_eq!(rejected(&e, BackendKind::Flash), vec![Reason::KvCache]);
    // Too wide a head for one warp's row of 16-byte loads: a typed reason, then flash.
    let wide = Problem::new(DType::F32, 1, 1, 4096, 8, 8, 256);
    let e = handle(DeviceCaps::simulated(SimulatedGpu::H100), Settings::default()).explain(&wide);
    assert_eq!(rejected(&e, BackendKind::Decode), vec![Reason::HeadDim { max: 128, found: 256 }]);
}
