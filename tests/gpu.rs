//! GPU tests. They need a CUDA device (the JIT and emulated-arch ones libnvrtc too), so they
//! are ignored unless the `gpu-tests` (and `nvrtc-tests`) features are on; on the GPU machine:
//!
//! ```text
//! cargo test --release --features gpu-tests,nvrtc-tests --test gpu -- --nocapture
//! ```
//!
//! With the features on and no device they fail (they never pass by skipping).

mod common;

use std::sync::Arc;

use attention::cudarc::driver::{CudaSlice, CudaStream};
use attention::{
    BackendKind, DType, Error, JitMode, KernelBuild, Layout, LseMut, Options, Reason, Selector, SeqLens, Settings, Tensor,
    TensorMut, VarLen,
};
use common::gpu::{
    check_all, check_lists_on_the_cpu, gpu, lse_error, random, run, s, tolerance, Case, Outcome, Place, Shape, Tally, Tol,
};
use common::reference::{attention_f64_masked, rel_err, RefInput, RefMask};
use common::rng::Rng;
use half::{bf16, f16};

/// Odd sizes on purpose: seqlen 1, non-multiples of 16, sq ≠ sk both ways, GQA, MQA, odd d.
const SHAPES: [Shape; 10] = [
    s(1, 1, 1, 1, 1, 64),
    s(2, 7, 63, 4, 4, 40),
    s(1, 65, 129, 8, 2, 128),
    s(2, 128, 64, 8, 1, 72),
    s(1, 1, 1000, 8, 8, 256),
    s(1, 300, 300, 2, 2, 3),
    s(3, 127, 128, 4, 2, 8),
    s(1, 1000, 1000, 4, 4, 96),
    s(1, 4097, 127, 2, 2, 64),
    s(2, 64, 4097, 8, 1, 160),
];

/// Whether the decode backend (ranked first on every arch from sm_75) takes the case: at most
/// 16 query rows, head_dim a multiple of one 16-byte vector and at most 32 of them.
fn decodes(dtype: DType, sh: &Shape) -> bool {
    let vec = 16 / dtype.size_bytes();
    sh.sq <= 16 && sh.d % vec == 0 && sh.d <= 32 * vec
}

/// The backend the default ranking must pick on an sm_80+ device.
fn ranked(dtype: DType, sh: &Shape) -> BackendKind {
    let d = sh.d;
    if decodes(dtype, sh) {
        BackendKind::Decode
    } else if dtype != DType::F32 && d % 8 == 0 && d <= 256 {
        BackendKind::Flash
    } else if d <= 512 {
        BackendKind::MemEfficient
    } else {
        BackendKind::Naive
    }
}

/// Causal or not (bottom-right aligned), no window.
fn causal_mask(causal: bool) -> RefMask {
    RefMask { causal, ..RefMask::default() }
}

/// One matrix: every shape, causal or not, every dtype (60 cases); `expect` names the backend
/// that must run each.
fn matrix_cases(expect: impl Fn(DType, &Shape) -> BackendKind) -> Vec<Case> {
    let mut cases = Vec::new();
    for (si, sh) in SHAPES.iter().enumerate() {
        for causal in [false, true] {
            for dtype in [DType::F16, DType::BF16, DType::F32] {
                cases.push(Case::dense(dtype, *sh, causal_mask(causal), si % 2 == 1).expect(expect(dtype, sh)));
            }
        }
    }
    cases
}

fn matrix(attn: &attention::Attention, stream: &Arc<CudaStream>, label: &str, expect: impl Fn(DType, &Shape) -> BackendKind) {
    check_all(attn, &Place::Device(stream.clone()), label, matrix_cases(expect));
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn ranked_selection_matches_reference_on_every_shape_and_dtype() {
    let (attn, stream) = gpu();
    eprintln!(
        "device {} flash image {:?} naive image {:?}",
        attn.device_summary(),
        attn.kernel_image(BackendKind::Flash),
        attn.kernel_image(BackendKind::Naive)
    );
    matrix(&attn, &stream, "aot", ranked);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn naive_matches_reference_on_every_shape_and_dtype() {
    let (_, stream) = gpu();
    let attn = Selector::from_env().unwrap().backend(BackendKind::Naive).select().unwrap();
    matrix(&attn, &stream, "naive", |_, _| BackendKind::Naive);
}

/// Every head_dim flash takes (specialised and rounded up) against odd sequence lengths,
/// sq ≠ sk, MHA/GQA/MQA, causal or not, both layouts, f16 and bf16 (360 cases).
fn flash_sweep_cases() -> Vec<Case> {
    let lens = [1usize, 7, 63, 64, 65, 127, 128, 129, 1000, 4097];
    let mut cases = Vec::new();
    for (i, d) in [8usize, 40, 64, 72, 96, 128, 160, 192, 256].into_iter().enumerate() {
        for (j, &sq) in lens.iter().enumerate() {
            let sk = lens[(j * 3 + i) % lens.len()];
            let (h, hk) = [(4, 4), (8, 1), (8, 2)][(i + j) % 3];
            // Long-by-long cases keep one sequence and few heads: the f64 reference is slow.
            let big = sq * sk > 1 << 20;
            let sh = if big { s(1, sq, sk, 2, 1, d) } else { s(1 + (i + j) % 2, sq, sk, h, hk, d) };
            for causal in [false, true] {
                let heads_first = (i + j) % 2 == 0;
                for dtype in [DType::F16, DType::BF16] {
                    cases.push(Case::dense(dtype, sh, causal_mask(causal), heads_first).expect(BackendKind::Flash));
                }
            }
        }
    }
    cases
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn flash_matches_reference_across_head_dims_and_lengths() {
    let (_, stream) = gpu();
    let attn = Selector::from_env().unwrap().backend(BackendKind::Flash).select().unwrap();
    check_all(&attn, &Place::Device(stream), "flash", flash_sweep_cases());
}

#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn naive_through_jit_always_matches_reference() {
    let (_, stream) = gpu();
    let dir = std::env::temp_dir().join(format!("attn-jit-{}", std::process::id()));
    let attn = Selector::from_env().unwrap().jit(JitMode::Always).cache_dir(&dir).select().unwrap();
    for kind in [BackendKind::Flash, BackendKind::MemEfficient, BackendKind::Naive] {
        let image = attn.kernel_image(kind).unwrap();
        assert!(image.contains("NVRTC"), "ATTN_JIT=always must compile {kind} with NVRTC, got {image}");
    }
    // NVRTC builds sm_90 as sm_90a, so flash's Hopper kernels are there.
    if attn.device_caps().unwrap().cc == attention::ComputeCapability::new(9, 0) {
        let image = attn.kernel_image(BackendKind::Flash).unwrap();
        assert!(image.contains("Hopper"), "{image}");
    }
    matrix(&attn, &stream, "jit", ranked);
    let entries = attention::testing::cache_entries(&dir).unwrap();
    assert!(!entries.is_empty() && entries.iter().all(|e| e.2), "JIT cache entries: {entries:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Only meaningful in a build made without the device's arch: scripts/device-bundle.sh builds
/// one with ATTN_CUDA_ARCH_LIST=8.0, and scripts/device-run.sh runs it there with
/// ATTN_TEST_EXPECT_NO_IMAGE=1, which states "this build has no image for the device". That
/// variable is this test's own switch (a build property no feature can state); the features
/// only say what it needs to run at all (a GPU, and NVRTC for the repair).
///
/// The precondition (an nvcc build with neither a cubin nor PTX the device can run) is checked
/// against what the build really embeds, never assumed:
/// - ATTN_TEST_EXPECT_NO_IMAGE set and the build has an image (or is not an nvcc build): fails,
///   naming the build's arch list and the device, so the sm_80 step cannot pass vacuously.
/// - The precondition holds: the test runs, with or without the variable.
/// - Neither (the normal all-arch build, where the whole GPU suite runs):
///   prints "not applicable: ..." and passes; that build has nothing to repair.
#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn build_without_the_device_arch_repairs_itself_or_explains() {
    let (attn, stream) = gpu();
    let caps = attn.device_caps().unwrap().clone();
    let build = KernelBuild::embedded();
    let image = attention::arch::best_image(&build.arch_list, (caps.cc.major, caps.cc.minor));
    let lacks_arch = build.built_with_nvcc && image == attention::arch::ImageMatch::None;
    let expected = std::env::var_os("ATTN_TEST_EXPECT_NO_IMAGE").is_some();
    let state = format!(
        "build: built_with_nvcc={}, arch list {:?} (from {}), best image for the device {image:?}; device {} ({})",
        build.built_with_nvcc,
        build.built_for(),
        build.arch_list_source,
        caps.cc.sm(),
        caps.name
    );
    if !lacks_arch {
        assert!(
            !expected,
            "precondition violated: ATTN_TEST_EXPECT_NO_IMAGE is set, so this must be an nvcc build without any \
             image for the device, but it is not ({state}); the sm_80-only build did not happen as intended \
             (check ATTN_CUDA_ARCH_LIST=8.0 in scripts/device-bundle.sh)"
        );
        eprintln!("not applicable: this build has an image for the device or was not built with nvcc ({state}); it runs in the sm_80-only build");
        return;
    }
    eprintln!("[sm80 build] precondition holds: {state}");
    // JIT allowed: repaired by NVRTC, and correct.
    let dir = std::env::temp_dir().join(format!("attn-repair-{}", std::process::id()));
    let auto = Selector::from_env().unwrap().jit(JitMode::Auto).cache_dir(&dir).select().unwrap();
    assert!(auto.kernel_image(BackendKind::Naive).unwrap().contains("NVRTC"));
    assert!(auto.kernel_image(BackendKind::Flash).unwrap().contains("NVRTC"));
    assert!(auto.kernel_image(BackendKind::MemEfficient).unwrap().contains("NVRTC"));
    matrix(&auto, &stream, "repaired", ranked);
    // JIT off: an error naming the arches built and the setting that fixes it; never a copy
    // of device memory to the CPU backend.
    let never = Selector::from_settings(Settings { jit: JitMode::Never, ..Settings::from_env().unwrap() }).select().unwrap();
    let case = Case::dense(DType::BF16, SHAPES[1], RefMask::default(), false);
    let err = run(&never, &Place::Device(stream), &mut Rng::fresh(), &case).expect_err("must fail without an image");
    let text = err.to_string();
    eprintln!("[never] {text}");
    match &err {
        Error::NoBackend { rejections, .. } => {
            for kind in [BackendKind::Flash, BackendKind::MemEfficient, BackendKind::Naive] {
                assert!(rejections.iter().any(|r| r.backend == kind
                    && r.reasons.iter().any(|x| matches!(x, Reason::NoKernelImage { .. }))), "{kind}");
            }
            assert!(rejections.iter().any(|r| r.backend == BackendKind::Cpu && r.reasons == vec![Reason::DeviceMemory]));
        }
        other => panic!("unexpected error {other:?}"),
    }
    for needle in [build.built_for().as_str(), &caps.cc.sm(), "ATTN_CUDA_ARCH_LIST", "ATTN_JIT"] {
        assert!(text.contains(needle), "error should mention {needle}: {text}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn tiny_workspace_is_chunked_not_out_of_memory() {
    let (_, stream) = gpu();
    // 1 MiB holds 256 rows of 1024 keys: the call must chunk rows and heads.
    let attn = Selector::from_env().unwrap().backend(BackendKind::Naive).naive_workspace_mb(1).select().unwrap();
    check_all(&attn, &Place::Device(stream), "chunked", chunked_cases());
}

/// Two naive cases whose scores overflow a 1 MiB workspace many times over.
fn chunked_cases() -> Vec<Case> {
    let sh = s(2, 1500, 1024, 4, 2, 64);
    [false, true].map(|causal| Case::dense(DType::BF16, sh, causal_mask(causal), true).expect(BackendKind::Naive)).to_vec()
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn raw_pointers_outside_their_allocation_are_rejected() {
    let (attn, stream) = gpu();
    let l = Layout::contiguous(1, 64, 2, 64);
    let a: CudaSlice<f16> = stream.alloc_zeros(l.numel()).unwrap();
    // The output sits at the far end of a 64 MiB allocation, so an over-long claim on `a` can
    // never reach it whatever the allocator's placement (compute-sanitizer's differs), which
    // would be caught earlier, as an overlap.
    const OUT_ELEMS: usize = 32 << 20;
    let out: CudaSlice<f16> = stream.alloc_zeros(OUT_ELEMS).unwrap();
    let ptr = |s: &CudaSlice<f16>| {
        use attention::cudarc::driver::DevicePtr;
        let (p, _g) = s.device_ptr(&stream);
        p
    };
    let big_elems = Layout::contiguous(1, 128, 2, 64).numel();
    let (pa, po) = (ptr(&a), ptr(&out) + 2 * (OUT_ELEMS - big_elems) as u64);
    // q claims twice the elements its allocation holds: the range check must refuse it
    // before any kernel could read past the allocation.
    let big = Layout::contiguous(1, 128, 2, 64);
    let err = unsafe {
        attn.forward(
            &Tensor::<f16>::from_raw_device(pa, big.numel(), big),
            &Tensor::from_raw_device(pa, l.numel(), l),
            &Tensor::from_raw_device(pa, l.numel(), l),
            &mut TensorMut::from_raw_device(po, big.numel(), big, stream.cu_stream()),
            &Options::default(),
        )
    }
    .unwrap_err();
    eprintln!("[raw] {err}");
    assert!(matches!(err, Error::InvalidArgument { arg: "q", .. }), "{err}");
    // A host address is not device memory.
    let host = vec![f16::ZERO; l.numel()];
    let err = unsafe {
        attn.forward(
            &Tensor::<f16>::from_raw_device(host.as_ptr() as u64, l.numel(), l),
            &Tensor::from_raw_device(pa, l.numel(), l),
            &Tensor::from_raw_device(pa, l.numel(), l),
            &mut TensorMut::from_raw_device(po, l.numel(), l, stream.cu_stream()),
            &Options::default(),
        )
    }
    .unwrap_err();
    eprintln!("[raw] {err}");
    assert!(matches!(err, Error::InvalidArgument { arg: "q", .. }), "{err}");
    // And valid raw pointers run.
    let ran = unsafe {
        attn.forward(
            &Tensor::<f16>::from_raw_device(pa, l.numel(), l),
            &Tensor::from_raw_device(pa, l.numel(), l),
            &Tensor::from_raw_device(pa, l.numel(), l),
            &mut TensorMut::from_raw_device(po, l.numel(), l, stream.cu_stream()),
            &Options::default(),
        )
    }
    .unwrap();
    assert_eq!(ran, BackendKind::Flash);
    stream.synchronize().unwrap();
    // `out` stays alive until here: the raw pointers above borrowed its memory.
    drop((a, out));
}

/// A few flash cases that touch every masking and tail path: small enough to run under
/// compute-sanitizer (memcheck, racecheck) on the device.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn flash_small_cases_for_sanitizers() {
    let (_, stream) = gpu();
    let attn = Selector::from_env().unwrap().backend(BackendKind::Flash).select().unwrap();
    check_all(&attn, &Place::Device(stream), "flash small", flash_small_cases());
}

/// 16 flash cases: both dtypes and layouts, causal or not, tails on both lengths, GQA/MQA.
fn flash_small_cases() -> Vec<Case> {
    let shapes = [s(1, 65, 129, 4, 2, 40), s(2, 1, 300, 8, 1, 128), s(1, 130, 70, 2, 2, 256), s(1, 7, 7, 2, 2, 64)];
    let mut cases = Vec::new();
    for sh in shapes {
        for causal in [false, true] {
            cases.push(Case::dense(DType::BF16, sh, causal_mask(causal), true).expect(BackendKind::Flash));
            cases.push(Case::dense(DType::F16, sh, causal_mask(causal), false).expect(BackendKind::Flash));
        }
    }
    cases
}

/// Sliding windows and soft-capping on flash and naive (both dtypes flash takes; f32 on naive).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn windows_and_softcap_match_reference() {
    let (_, stream) = gpu();
    let place = Place::Device(stream);
    // One tally over both backends, so a failure on flash still shows naive's results.
    let mut tally = Tally::new("window");
    for kind in [BackendKind::Flash, BackendKind::Naive] {
        let attn = Selector::from_env().unwrap().backend(kind).select().unwrap();
        for case in window_cases(kind) {
            tally.run(&attn, &place, &case);
        }
    }
    tally.finish();
}

/// 80 cases for `kind` (flash or naive): every window (one-sided, both, zero-width, wider than
/// the keys), causal or not, soft-cap none/1.5/30 in rotation, on four shapes.
fn window_cases(kind: BackendKind) -> Vec<Case> {
    let windows = [(Some(0), Some(0)), (Some(31), None), (None, Some(5)), (Some(100), Some(0)), (Some(7), Some(130))];
    let shapes = [s(1, 200, 200, 4, 2, 64), s(2, 65, 300, 2, 1, 128), s(1, 300, 129, 2, 2, 256), s(1, 1, 500, 8, 1, 40)];
    let dtypes: &[DType] = if kind == BackendKind::Flash { &[DType::F16, DType::BF16] } else { &[DType::BF16, DType::F32] };
    let mut cases = Vec::new();
    for (i, sh) in shapes.iter().enumerate() {
        for (j, &(left, right)) in windows.iter().enumerate() {
            for causal in [false, true] {
                let softcap = [None, Some(1.5f64), Some(30.0)][(i + j) % 3];
                let mask = RefMask { causal, left, right, softcap };
                for &dtype in dtypes {
                    cases.push(Case::dense(dtype, *sh, mask, i % 2 == 0).expect(kind));
                }
            }
        }
    }
    cases
}

/// A forward of each fused backend captured into a CUDA graph (global capture mode: no
/// allocation, no sync, no host-side data-dependent branch inside `forward`), replayed after the
/// inputs change.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn flash_forward_is_graph_capturable() {
    graph_capture(BackendKind::Flash);
}

/// As `flash_forward_is_graph_capturable`, for mem_efficient.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn mem_efficient_forward_is_graph_capturable() {
    graph_capture(BackendKind::MemEfficient);
}

fn graph_capture(kind: BackendKind) {
    use attention::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let (attn, default_stream) = gpu();
    drop(attn);
    let attn = Selector::from_env().unwrap().backend(kind).select().unwrap();
    // Capture needs a stream other than the legacy default one. cudarc's cross-stream event
    // tracking would record waits on events from outside the capture: the caller owns ordering
    // here, as a model that captures its forward does.
    // SAFETY: every slice below lives on this one stream.
    unsafe { default_stream.context().disable_event_tracking() };
    let stream = default_stream.context().new_stream().unwrap();
    let mut rng = Rng::fresh();
    let sh = s(2, 300, 257, 8, 2, 128);
    let (lq, lk) = (Layout::contiguous(sh.b, sh.sq, sh.h, sh.d), Layout::contiguous(sh.b, sh.sk, sh.hk, sh.d));
    let gen = |rng: &mut Rng, n: usize| random::<bf16>(rng, n);
    let mut dq = stream.clone_htod(&gen(&mut rng, lq.numel())).unwrap();
    let mut dk = stream.clone_htod(&gen(&mut rng, lk.numel())).unwrap();
    let mut dv = stream.clone_htod(&gen(&mut rng, lk.numel())).unwrap();
    let mut dout: CudaSlice<bf16> = stream.alloc_zeros(lq.numel()).unwrap();
    let mut dlse: CudaSlice<f32> = stream.alloc_zeros(sh.b * sh.h * sh.sq).unwrap();
    let opts = Options::default().causal(true);
    let run = |dq: &CudaSlice<bf16>, dk: &CudaSlice<bf16>, dv: &CudaSlice<bf16>, dout: &mut CudaSlice<bf16>, dlse: &mut CudaSlice<f32>| {
        attn.forward_with_lse(&Tensor::cuda(dq, lq), &Tensor::cuda(dk, lk), &Tensor::cuda(dv, lk), &mut TensorMut::cuda(dout, lq), &mut LseMut::cuda(dlse), &opts)
    };
    // Warm-up outside the capture: loads the module once.
    run(&dq, &dk, &dv, &mut dout, &mut dlse).unwrap();
    stream.synchronize().unwrap();
    // Thread-local mode: the other tests of this binary run on other threads of the same
    // context, and global mode would make their (legitimately) uncapturable calls fail.
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = run(&dq, &dk, &dv, &mut dout, &mut dlse);
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap();
    assert_eq!(captured.unwrap(), kind);
    let graph = graph.expect("the capture recorded the forward");
    // New inputs in the same buffers, output poisoned: the replay must compute them afresh.
    let (q, k, v) = (gen(&mut rng, lq.numel()), gen(&mut rng, lk.numel()), gen(&mut rng, lk.numel()));
    stream.memcpy_htod(&q, &mut dq).unwrap();
    stream.memcpy_htod(&k, &mut dk).unwrap();
    stream.memcpy_htod(&v, &mut dv).unwrap();
    stream.memcpy_htod(&vec![bf16::NAN; lq.numel()], &mut dout).unwrap();
    stream.memcpy_htod(&vec![f32::NAN; sh.b * sh.h * sh.sq], &mut dlse).unwrap();
    for _ in 0..3 {
        graph.launch().unwrap();
    }
    stream.synchronize().unwrap();
    let out = stream.clone_dtoh(&dout).unwrap();
    let lse = stream.clone_dtoh(&dlse).unwrap();
    let (ref_out, ref_lse) = attention_f64_masked(
        RefInput { data: &q, shape: lq.shape(), strides: lq.strides() },
        RefInput { data: &k, shape: lk.shape(), strides: lk.strides() },
        RefInput { data: &v, shape: lk.shape(), strides: lk.strides() },
        |x: bf16| x.to_f64(),
        1.0 / (sh.d as f64).sqrt(),
        RefMask { causal: true, ..RefMask::default() },
    );
    let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
    let rel = rel_err(&got, &ref_out);
    // NaN-aware: an lse the replay never wrote (still NaN) makes the error infinite.
    let lse_err = lse_error(lse.iter().map(|&x| x as f64), ref_lse.iter().copied());
    eprintln!("[graph {kind}] replayed 3 times: rel {rel:.2e} lse {lse_err:.2e}");
    assert!(rel < tolerance(DType::BF16) && lse_err < 1e-3);
}

/// Packed batches with mixed lengths (0 and 1 included, queries with no keys, sq ≠ sk per
/// sequence) through flash: every specialisation, MHA/GQA(8:1)/MQA, causal, windowed and
/// soft-capped, both packed layouts, f16 and bf16.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn flash_varlen_matches_reference() {
    let (_, stream) = gpu();
    let attn = Selector::from_env().unwrap().backend(BackendKind::Flash).select().unwrap();
    check_all(&attn, &Place::Device(stream), "varlen", flash_varlen_cases());
}

/// 56 packed batches: every head_dim bucket × four batches × f16/bf16, heads, mask and layout
/// in rotation.
fn flash_varlen_cases() -> Vec<Case> {
    let batches: [(&[usize], &[usize]); 4] = [
        (&[1, 0, 7, 129, 64, 65], &[1, 5, 0, 129, 200, 63]),
        (&[300], &[1000]),
        (&[0, 1, 1, 2, 127, 128], &[3, 1, 0, 2, 128, 127]),
        (&[1000, 17, 4097 - 1017], &[63, 1000, 129]),
    ];
    let masks = [
        RefMask::default(),
        RefMask { causal: true, ..RefMask::default() },
        RefMask { causal: true, left: Some(40), ..RefMask::default() },
        RefMask { left: Some(9), right: Some(3), softcap: Some(20.0), ..RefMask::default() },
    ];
    let mut cases = Vec::new();
    for (i, d) in [8usize, 40, 64, 96, 128, 192, 256].into_iter().enumerate() {
        for (j, (ql, kl)) in batches.iter().enumerate() {
            let (h, hk) = [(4, 4), (8, 1), (8, 2)][(i + j) % 3];
            let mask = masks[(i + j) % masks.len()];
            for (k, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
                let hf = (i + j + k) % 2 == 0;
                cases.push(Case::packed(dtype, ql, kl, (h, hk, d), mask, hf).expect(BackendKind::Flash));
            }
        }
    }
    cases
}

/// Malformed prefix sums in device memory are never read on the host: the kernels clamp them,
/// so the call completes without a fault (memcheck runs this), the context stays healthy, and
/// a forced backend without varlen support says so.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn malformed_device_seqlens_never_fault() {
    let (_, stream) = gpu();
    let attn = Selector::from_env().unwrap().backend(BackendKind::Flash).select().unwrap();
    let (total, h, d) = (100, 2, 64);
    let l = Layout::contiguous(1, total, h, d);
    let x: CudaSlice<f16> = stream.clone_htod(&vec![f16::from_f32(0.25); l.numel()]).unwrap();
    let mut out: CudaSlice<f16> = stream.alloc_zeros(l.numel()).unwrap();
    for bad in [vec![0, 60, 30, 100], vec![-50, 10, 5000, 100], vec![0, 100, 100, i32::MAX]] {
        let cu = stream.clone_htod(&bad).unwrap();
        let varlen = VarLen::new(SeqLens::cuda(&cu), SeqLens::cuda(&cu), 64, 64);
        let ran = attn.forward_varlen(&Tensor::cuda(&x, l), &Tensor::cuda(&x, l), &Tensor::cuda(&x, l), &mut TensorMut::cuda(&mut out, l), &varlen, &Options::default());
        assert_eq!(ran.unwrap(), BackendKind::Flash, "{bad:?}");
        stream.synchronize().unwrap_or_else(|e| panic!("{bad:?} faulted: {e:?}"));
    }
    let case = Case::packed(DType::F16, &[5, 70], &[9, 3], (2, 2, 64), RefMask::default(), false);
    let place = Place::Device(stream);
    check_all(&attn, &place, "after malformed calls", [case.clone().expect(BackendKind::Flash)]);
    let naive = Selector::from_env().unwrap().backend(BackendKind::Naive).select().unwrap();
    let err = run(&naive, &place, &mut Rng::fresh(), &case).unwrap_err();
    assert!(err.to_string().contains("cu_seqlens"), "{err}");
}

/// `ATTN_EMULATE_ARCH=7.5` on a newer GPU: every module is NVRTC's compute_75 PTX compiled by
/// the driver, so the code a T4 runs is what runs here; selection is a T4's (no flash), and the
/// whole matrix still matches the reference.
#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn emulated_turing_runs_its_own_code_and_matches_reference() {
    let (_, stream) = gpu();
    let dir = std::env::temp_dir().join(format!("attn-emu-{}", std::process::id()));
    let turing = attention::ComputeCapability::new(7, 5);
    let attn = Selector::from_env().unwrap().emulate_arch(turing).cache_dir(&dir).select().unwrap();
    assert_eq!(attn.device_caps().unwrap().cc, turing);
    let has_mem_efficient = attn.backends().contains(&BackendKind::MemEfficient);
    let mut kinds = vec![BackendKind::Naive];
    if has_mem_efficient {
        kinds.push(BackendKind::MemEfficient);
    }
    for kind in kinds {
        let image = attn.kernel_image(kind).unwrap();
        assert!(image.contains("compute_75"), "{kind} must load compute_75 PTX, got {image}");
    }
    // A T4's ranking: decode (its CUDA-core kernels) for short queries, then mem_efficient
    // where it takes the dtype (bf16 needs sm_80), else naive.
    matrix(&attn, &stream, "emulated sm_75", |dtype, sh| {
        if decodes(dtype, sh) {
            BackendKind::Decode
        } else if has_mem_efficient && dtype != DType::BF16 && sh.d <= 512 {
            BackendKind::MemEfficient
        } else {
            BackendKind::Naive
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}

/// Without a GPU: the case lists whole, and cheap cases of each right on the CPU backend.
#[test]
fn case_lists_are_whole_and_run_on_the_cpu_backend() {
    let lists = vec![
        ("ranked", matrix_cases(ranked), 60),
        ("flash", flash_sweep_cases(), 360),
        ("window flash", window_cases(BackendKind::Flash), 80),
        ("window naive", window_cases(BackendKind::Naive), 80),
        ("varlen", flash_varlen_cases(), 56),
        ("flash small", flash_small_cases(), 16),
        ("chunked", chunked_cases(), 2),
    ];
    check_lists_on_the_cpu(lists, 6, 1 << 21);
}

/// The verdict fails what it must: another backend than the expected one, a non-finite output
/// element (the NaN poison left unwritten), a finite one where NaN inputs must give NaN, an
/// error at the bound; and the table's rows.
#[test]
fn the_verdict_refuses_a_wrong_backend_nan_and_errors_at_the_bound() {
    let case = Case::dense(DType::F16, s(1, 8, 8, 2, 2, 64), causal_mask(true), false).expect(BackendKind::Flash);
    let good = Outcome { rel: 1e-3, lse_err: 5e-4, nan: 0, ran: BackendKind::Flash, want_nan: 65, missed_nan: 0 };
    assert!(good.verdict(&case).is_ok());
    for bad in [
        Outcome { ran: BackendKind::Naive, ..good },
        Outcome { nan: 1, ..good },
        Outcome { missed_nan: 1, ..good },
        Outcome { rel: tolerance(DType::F16), ..good },
        Outcome { lse_err: 1e-3, ..good },
        Outcome { rel: f64::INFINITY, ..good },
    ] {
        assert!(bad.verdict(&case).is_err(), "{bad:?} passed");
    }
    let window = RefMask { left: Some(3), ..RefMask::default() };
    assert_eq!(Tol::of(BackendKind::Flash, DType::BF16, &causal_mask(true), false), Tol { rel: 1e-2, lse: 1e-3 });
    assert_eq!(Tol::of(BackendKind::Flash, DType::F16, &window, false).lse, 2e-3);
    assert_eq!(Tol::of(BackendKind::Flash, DType::F16, &RefMask::default(), true).lse, 2e-3);
    assert_eq!(Tol::of(BackendKind::Naive, DType::F32, &window, false), Tol { rel: 1e-4, lse: 2e-3 });
    assert_eq!(Tol::of(BackendKind::MemEfficient, DType::F16, &window, true).lse, 1e-3);
}
