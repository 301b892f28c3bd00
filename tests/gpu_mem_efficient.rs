//! GPU tests of the memory-efficient backend, forced with `Selector::backend`. They need a CUDA
//! device (the sm_75 ones libnvrtc too), so they are ignored unless the `gpu-tests` (and
//! `nvrtc-tests`) features are on; on the GPU machine:
//!
//! ```text
//! cargo test --release --features gpu-tests,nvrtc-tests --test gpu_mem_efficient -- --nocapture
//! ```
//!
//! With the features on and no device they fail (they never pass by skipping). Each matrix runs twice:
//! on the device's own arch, and as sm_75 (`Selector::emulate_arch`: the module is compiled by
//! NVRTC as compute_75 PTX, so the Turing code path — m16n8k8, no cp.async — is what runs).

mod common;

use std::sync::Arc;

use attention::cudarc::driver::{CudaContext, CudaStream};
use attention::{BackendKind, ComputeCapability, DType, Error, Problem, Reason, Selector};
use common::gpu::{run_masked, run_varlen, tolerance, Outcome, Shape};
use common::reference::RefMask;
use common::rng::Rng;
use half::{bf16, f16};

/// The device's default stream; panics (fails the test) without a device.
fn stream() -> Arc<CudaStream> {
    let attn = attention::select().unwrap();
    let caps = attn
        .device_caps()
        .unwrap_or_else(|| panic!("no CUDA device: {}", attn.no_device_reason().unwrap_or("?")));
    CudaContext::new(caps.ordinal).unwrap().default_stream()
}

/// The backend under test, forced; `turing` runs it as sm_75 code.
fn mem_efficient(turing: bool) -> attention::Attention {
    let mut sel = Selector::from_env().unwrap().backend(BackendKind::MemEfficient);
    if turing {
        sel = sel.emulate_arch(ComputeCapability::new(7, 5));
    }
    sel.select().unwrap()
}

const LSE_TOL: f64 = 1e-3;

impl Outcome {
    fn ok(&self, dtype: DType) -> bool {
        self.nan == 0 && self.rel < tolerance(dtype) && self.lse_err < LSE_TOL && self.ran == BackendKind::MemEfficient
    }
}

#[allow(clippy::too_many_arguments)]
fn run_dtype(
    attn: &attention::Attention,
    stream: &Arc<CudaStream>,
    rng: &mut Rng,
    dtype: DType,
    sh: Shape,
    mask: RefMask,
    heads_first: bool,
    offset: usize,
) -> Result<Outcome, Error> {
    match dtype {
        DType::F16 => run_masked::<f16>(attn, stream, rng, sh, mask, heads_first, offset),
        DType::BF16 => run_masked::<bf16>(attn, stream, rng, sh, mask, heads_first, offset),
        DType::F32 => run_masked::<f32>(attn, stream, rng, sh, mask, heads_first, offset),
    }
}

const HEAD_DIMS: [usize; 14] = [1, 3, 8, 17, 33, 40, 64, 72, 96, 128, 160, 256, 300, 512];
/// Cases per head_dim and dtype in the sampled matrix.
const VARIANTS: usize = 10;
const LENS: [usize; 9] = [1, 7, 63, 64, 65, 127, 128, 129, 1000];
/// Budget of the f64 reference per case (multiply-adds of Q·Kᵀ): keeps the whole run short.
const REF_BUDGET: usize = 40_000_000;

fn masks() -> [(&'static str, RefMask); 5] {
    [
        ("none", RefMask::default()),
        ("causal", RefMask { causal: true, ..RefMask::default() }),
        ("window", RefMask { left: Some(37), right: Some(5), ..RefMask::default() }),
        ("causal+window", RefMask { causal: true, left: Some(64), ..RefMask::default() }),
        ("softcap", RefMask { causal: true, softcap: Some(20.0), ..RefMask::default() }),
    ]
}

/// A sampled cross-product: every head_dim × dtype, each against several (sq, sk) pairs with
/// sq ≠ sk both ways, every mask, MHA/GQA(8:1)/MQA and both layouts in rotation.
fn matrix(attn: &attention::Attention, stream: &Arc<CudaStream>, label: &str, dtypes: &[DType]) {
    let mut rng = Rng::fresh();
    eprintln!("[{label}] seed {:#x}", rng.get_seed());
    let masks = masks();
    let mut failures = Vec::new();
    // Per dtype: worst rel error, worst lse error, and the case with the worst rel error.
    let mut worst = [(0f64, 0f64); 3];
    let mut worst_case = [String::new(), String::new(), String::new()];
    let mut counts = [0usize; 3];
    let start = std::time::Instant::now();
    for (i, &d) in HEAD_DIMS.iter().enumerate() {
        for variant in 0..VARIANTS {
            let j = i * VARIANTS + variant;
            let sq = LENS[(j * 5 + 1) % LENS.len()];
            let mut sk = LENS[(j * 7 + 3) % LENS.len()];
            if sk == sq {
                sk = LENS[(j * 7 + 4) % LENS.len()];
            }
            let (h, hk) = [(4, 4), (8, 1), (8, 2), (3, 1)][j % 4];
            let mut sh = Shape { b: 1 + j % 2, sq, sk, h, hk, d };
            let cost = |s: &Shape| s.b * s.h * s.sq * s.sk * s.d;
            if cost(&sh) > REF_BUDGET {
                (sh.b, sh.h, sh.hk) = (1, 2, 1);
            }
            if cost(&sh) > REF_BUDGET {
                if sh.sq > sh.sk {
                    sh.sq = 129;
                } else {
                    sh.sk = 129;
                }
            }
            let (mname, mask) = masks[j % masks.len()];
            let heads_first = j % 3 == 1;
            for &dtype in dtypes {
                let r = run_dtype(attn, stream, &mut rng, dtype, sh, mask, heads_first, 0);
                let k = dtype as usize;
                counts[k] += 1;
                let case = format!("{dtype} {sh:?} {mname} heads_first={heads_first}");
                match r {
                    Ok(o) => {
                        if o.rel >= worst[k].0 {
                            worst[k].0 = o.rel;
                            worst_case[k] = case.clone();
                        }
                        worst[k].1 = worst[k].1.max(o.lse_err);
                        if !o.ok(dtype) {
                            failures.push(format!(
                                "{case}: rel {:.2e} lse {:.2e} nan {} ran {}",
                                o.rel, o.lse_err, o.nan, o.ran
                            ));
                        }
                    }
                    Err(e) => failures.push(format!("{case}: {e}")),
                }
            }
        }
    }
    for &dtype in dtypes {
        let k = dtype as usize;
        eprintln!(
            "[{label}] {dtype}: {} cases, worst rel error {:.2e} (tolerance {:.0e}; {}), worst lse error {:.2e}",
            counts[k],
            worst[k].0,
            tolerance(dtype),
            worst_case[k],
            worst[k].1
        );
    }
    eprintln!("[{label}] {} failures in {:.1} s", failures.len(), start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "[{label}] failures:\n{}", failures.join("\n"));
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn mem_efficient_matches_reference_across_head_dims_lengths_and_masks() {
    let stream = stream();
    let attn = mem_efficient(false);
    eprintln!(
        "device {} mem_efficient image {:?}",
        attn.device_summary(),
        attn.kernel_image(BackendKind::MemEfficient)
    );
    matrix(&attn, &stream, "native", &[DType::F16, DType::BF16, DType::F32]);
}

/// The same matrix on the sm_75 code path; bf16 must be refused there with a DType reason.
#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn mem_efficient_sm75_path_matches_reference() {
    let stream = stream();
    let attn = mem_efficient(true);
    eprintln!(
        "device {} (as sm_75) mem_efficient image {:?}",
        attn.device_summary(),
        attn.kernel_image(BackendKind::MemEfficient)
    );
    let bf = Problem::new(DType::BF16, 1, 64, 64, 2, 2, 64);
    let reasons = attn.reasons(BackendKind::MemEfficient, &bf);
    assert!(reasons.iter().any(|r| matches!(r, Reason::DType { .. })), "{reasons:?}");
    let mut rng = Rng::fresh();
    let sh = Shape { b: 1, sq: 8, sk: 8, h: 1, hk: 1, d: 64 };
    assert!(run_dtype(&attn, &stream, &mut rng, DType::BF16, sh, RefMask::default(), false, 0).is_err());
    matrix(&attn, &stream, "sm_75", &[DType::F16, DType::F32]);
}

/// Base pointers off 16-byte alignment (head_dim a multiple of 8, so only the base is off): the
/// element-wise kernels run and never read or write outside the tensors.
#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn mem_efficient_unaligned_base_pointers() {
    let stream = stream();
    for turing in [false, true] {
        let attn = mem_efficient(turing);
        let mut rng = Rng::fresh();
        let mut failures = Vec::new();
        for (dtype, d) in [(DType::F16, 64), (DType::BF16, 128), (DType::F32, 96), (DType::F16, 512)] {
            if turing && dtype == DType::BF16 {
                continue;
            }
            let sh = Shape { b: 2, sq: 65, sk: 130, h: 4, hk: 2, d };
            match run_dtype(&attn, &stream, &mut rng, dtype, sh, RefMask { causal: true, ..RefMask::default() }, false, 1) {
                Ok(o) if o.ok(dtype) => {}
                Ok(o) => failures.push(format!("{dtype} d={d}: rel {:.2e} lse {:.2e} nan {} ran {}", o.rel, o.lse_err, o.nan, o.ran)),
                Err(e) => failures.push(format!("{dtype} d={d}: {e}")),
            }
        }
        eprintln!("[unaligned turing={turing}] seed {:#x}, {} failures", rng.get_seed(), failures.len());
        assert!(failures.is_empty(), "turing={turing}:\n{}", failures.join("\n"));
    }
}

/// Packed batches with mixed lengths (0 and 1 included, queries with no keys, sq ≠ sk per
/// sequence): every kernel bucket and dtype, MHA/GQA/MQA, every mask, both layouts, native and
/// as sm_75.
#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn mem_efficient_varlen_matches_reference() {
    let stream = stream();
    let batches: [(&[usize], &[usize]); 3] = [
        (&[1, 0, 7, 129, 64, 65], &[1, 5, 0, 129, 200, 63]),
        (&[300, 2], &[700, 1]),
        (&[0, 1, 1, 2, 127, 128], &[3, 1, 0, 2, 128, 127]),
    ];
    let masks = masks();
    for turing in [false, true] {
        let attn = mem_efficient(turing);
        let mut rng = Rng::fresh();
        let mut failures = Vec::new();
        let mut count = 0;
        for (i, d) in [3usize, 40, 64, 128, 200, 512].into_iter().enumerate() {
            for (j, (ql, kl)) in batches.iter().enumerate() {
                let heads = [(4, 4), (8, 1), (6, 2)][(i + j) % 3];
                let (mname, mask) = masks[(i + j) % masks.len()];
                for (k, dtype) in [DType::F16, DType::BF16, DType::F32].into_iter().enumerate() {
                    if turing && dtype == DType::BF16 {
                        continue;
                    }
                    let hf = (i + j + k) % 2 == 0;
                    let shape = (heads.0, heads.1, d);
                    let r = match dtype {
                        DType::F16 => run_varlen::<f16>(&attn, &stream, &mut rng, ql, kl, shape, mask, hf),
                        DType::BF16 => run_varlen::<bf16>(&attn, &stream, &mut rng, ql, kl, shape, mask, hf),
                        DType::F32 => run_varlen::<f32>(&attn, &stream, &mut rng, ql, kl, shape, mask, hf),
                    };
                    count += 1;
                    let case = format!("{dtype} d={d} {ql:?}/{kl:?} {mname} heads {heads:?} heads_first={hf}");
                    match r {
                        Ok(o) if o.ok(dtype) => {}
                        Ok(o) => failures.push(format!("{case}: rel {:.2e} lse {:.2e} nan {} ran {}", o.rel, o.lse_err, o.nan, o.ran)),
                        Err(e) => failures.push(format!("{case}: {e}")),
                    }
                }
            }
        }
        eprintln!("[varlen turing={turing}] seed {:#x}: {count} cases, {} failures", rng.get_seed(), failures.len());
        assert!(failures.is_empty(), "[varlen turing={turing}] failures:\n{}", failures.join("\n"));
    }
}

/// A few small cases touching every code path (each dtype, aligned and element-wise loads, the
/// split-head_dim d=512 kernel, masks, fully masked rows), quick enough for compute-sanitizer.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn mem_efficient_small_cases_for_sanitizers() {
    let stream = stream();
    let attn = mem_efficient(false);
    let mut rng = Rng::fresh();
    let mut failures = Vec::new();
    let causal = RefMask { causal: true, ..RefMask::default() };
    let cases: [(DType, Shape, RefMask, bool); 8] = [
        (DType::F16, Shape { b: 1, sq: 65, sk: 33, h: 2, hk: 1, d: 64 }, causal, false),
        (DType::BF16, Shape { b: 2, sq: 7, sk: 129, h: 2, hk: 2, d: 128 }, RefMask::default(), true),
        (DType::F16, Shape { b: 1, sq: 17, sk: 40, h: 3, hk: 1, d: 3 }, masks()[2].1, false),
        (DType::BF16, Shape { b: 1, sq: 20, sk: 31, h: 2, hk: 1, d: 200 }, masks()[4].1, true),
        (DType::F16, Shape { b: 1, sq: 33, sk: 20, h: 1, hk: 1, d: 512 }, causal, false),
        (DType::F32, Shape { b: 1, sq: 9, sk: 70, h: 2, hk: 2, d: 17 }, causal, true),
        (DType::F32, Shape { b: 1, sq: 40, sk: 5, h: 2, hk: 1, d: 300 }, causal, false),
        (DType::F32, Shape { b: 2, sq: 3, sk: 1, h: 1, hk: 1, d: 512 }, masks()[3].1, false),
    ];
    for (dtype, sh, mask, hf) in cases {
        match run_dtype(&attn, &stream, &mut rng, dtype, sh, mask, hf, 0) {
            Ok(o) if o.ok(dtype) => {}
            Ok(o) => failures.push(format!("{dtype} {sh:?}: rel {:.2e} lse {:.2e} nan {} ran {}", o.rel, o.lse_err, o.nan, o.ran)),
            Err(e) => failures.push(format!("{dtype} {sh:?}: {e}")),
        }
    }
    eprintln!("[small] seed {:#x}: {} cases, {} failures", rng.get_seed(), cases.len(), failures.len());
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}
