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

use attention::{BackendKind, ComputeCapability, DType, Problem, Reason, Selector};
use common::gpu::{check_all, check_lists_on_the_cpu, gpu, run, Case, Place, Shape};
use common::reference::RefMask;
use common::rng::Rng;

/// The device's default stream, as a place for cases; panics (fails the test) without a device.
fn device() -> Place {
    Place::Device(gpu().1)
}

/// The backend under test, forced; `turing` runs it as sm_75 code.
fn mem_efficient(turing: bool) -> attention::Attention {
    let mut sel = Selector::from_env().unwrap().backend(BackendKind::MemEfficient);
    if turing {
        sel = sel.emulate_arch(ComputeCapability::new(7, 5));
    }
    sel.select().unwrap()
}

/// The dtypes of a run: bf16 needs sm_80, so the sm_75 code path has none.
fn dtypes(turing: bool) -> &'static [DType] {
    if turing {
        &[DType::F16, DType::F32]
    } else {
        &[DType::F16, DType::BF16, DType::F32]
    }
}

const HEAD_DIMS: [usize; 14] = [1, 3, 8, 17, 33, 40, 64, 72, 96, 128, 160, 256, 300, 512];
/// Cases per head_dim and dtype in the sampled matrix.
const VARIANTS: usize = 10;
const LENS: [usize; 9] = [1, 7, 63, 64, 65, 127, 128, 129, 1000];
/// Budget of the f64 reference per case (multiply-adds of Q·Kᵀ): keeps the whole run short.
const REF_BUDGET: usize = 40_000_000;

fn masks() -> [RefMask; 5] {
    [
        RefMask::default(),
        RefMask { causal: true, ..RefMask::default() },
        RefMask { left: Some(37), right: Some(5), ..RefMask::default() },
        RefMask { causal: true, left: Some(64), ..RefMask::default() },
        RefMask { causal: true, softcap: Some(20.0), ..RefMask::default() },
    ]
}

/// A sampled cross-product: every head_dim × dtype, each against several (sq, sk) pairs with
/// sq ≠ sk both ways, every mask, MHA/GQA(8:1)/MQA and both layouts in rotation
/// (140 cases per dtype).
fn matrix_cases(dtypes: &[DType]) -> Vec<Case> {
    let masks = masks();
    let mut cases = Vec::new();
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
            let mask = masks[j % masks.len()];
            let heads_first = j % 3 == 1;
            for &dtype in dtypes {
                cases.push(Case::dense(dtype, sh, mask, heads_first).expect(BackendKind::MemEfficient));
            }
        }
    }
    cases
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn mem_efficient_matches_reference_across_head_dims_lengths_and_masks() {
    let place = device();
    let attn = mem_efficient(false);
    eprintln!(
        "device {} mem_efficient image {:?}",
        attn.device_summary(),
        attn.kernel_image(BackendKind::MemEfficient)
    );
    check_all(&attn, &place, "native", matrix_cases(dtypes(false)));
}

/// The same matrix on the sm_75 code path; bf16 must be refused there with a DType reason.
#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn mem_efficient_sm75_path_matches_reference() {
    let place = device();
    let attn = mem_efficient(true);
    eprintln!(
        "device {} (as sm_75) mem_efficient image {:?}",
        attn.device_summary(),
        attn.kernel_image(BackendKind::MemEfficient)
    );
    let bf = Problem::new(DType::BF16, 1, 64, 64, 2, 2, 64);
    let reasons = attn.reasons(BackendKind::MemEfficient, &bf);
    assert!(reasons.iter().any(|r| matches!(r, Reason::DType { .. })), "{reasons:?}");
    let sh = Shape { b: 1, sq: 8, sk: 8, h: 1, hk: 1, d: 64 };
    assert!(run(&attn, &place, &mut Rng::fresh(), &Case::dense(DType::BF16, sh, RefMask::default(), false)).is_err());
    check_all(&attn, &place, "sm_75", matrix_cases(dtypes(true)));
}

/// Base pointers off 16-byte alignment (head_dim a multiple of 8, so only the base is off):
/// 4 cases natively, 3 as sm_75 (no bf16).
fn unaligned_cases(turing: bool) -> Vec<Case> {
    let causal = RefMask { causal: true, ..RefMask::default() };
    [(DType::F16, 64), (DType::BF16, 128), (DType::F32, 96), (DType::F16, 512)]
        .into_iter()
        .filter(|(dtype, _)| dtypes(turing).contains(dtype))
        .map(|(dtype, d)| {
            let sh = Shape { b: 2, sq: 65, sk: 130, h: 4, hk: 2, d };
            Case::dense(dtype, sh, causal, false).offset(1).expect(BackendKind::MemEfficient)
        })
        .collect()
}

/// The element-wise kernels run on misaligned bases and never read or write outside the
/// tensors.
#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn mem_efficient_unaligned_base_pointers() {
    let place = device();
    for turing in [false, true] {
        check_all(&mem_efficient(turing), &place, &format!("unaligned turing={turing}"), unaligned_cases(turing));
    }
}

/// Packed batches with mixed lengths (0 and 1 included, queries with no keys, sq ≠ sk per
/// sequence): every kernel bucket and dtype, MHA/GQA/MQA, every mask, both layouts (54 cases
/// natively, 36 as sm_75).
fn varlen_cases(turing: bool) -> Vec<Case> {
    let batches: [(&[usize], &[usize]); 3] = [
        (&[1, 0, 7, 129, 64, 65], &[1, 5, 0, 129, 200, 63]),
        (&[300, 2], &[700, 1]),
        (&[0, 1, 1, 2, 127, 128], &[3, 1, 0, 2, 128, 127]),
    ];
    let masks = masks();
    let mut cases = Vec::new();
    for (i, d) in [3usize, 40, 64, 128, 200, 512].into_iter().enumerate() {
        for (j, (ql, kl)) in batches.iter().enumerate() {
            let (h, hk) = [(4, 4), (8, 1), (6, 2)][(i + j) % 3];
            let mask = masks[(i + j) % masks.len()];
            // The layout rotates with the dtype's place in the full list, as sm_75 skips bf16.
            for (k, dtype) in [DType::F16, DType::BF16, DType::F32].into_iter().enumerate() {
                if dtypes(turing).contains(&dtype) {
                    let hf = (i + j + k) % 2 == 0;
                    cases.push(Case::packed(dtype, ql, kl, (h, hk, d), mask, hf).expect(BackendKind::MemEfficient));
                }
            }
        }
    }
    cases
}

/// The varlen cases, native and as sm_75.
#[test]
#[cfg_attr(not(all(feature = "gpu-tests", feature = "nvrtc-tests")), ignore = "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests")]
fn mem_efficient_varlen_matches_reference() {
    let place = device();
    for turing in [false, true] {
        check_all(&mem_efficient(turing), &place, &format!("varlen turing={turing}"), varlen_cases(turing));
    }
}

/// A few small cases touching every code path (each dtype, aligned and element-wise loads, the
/// split-head_dim d=512 kernel, masks, fully masked rows), quick enough for compute-sanitizer.
fn small_cases() -> Vec<Case> {
    let causal = RefMask { causal: true, ..RefMask::default() };
    let m = masks();
    let cases: [(DType, Shape, RefMask, bool); 8] = [
        (DType::F16, Shape { b: 1, sq: 65, sk: 33, h: 2, hk: 1, d: 64 }, causal, false),
        (DType::BF16, Shape { b: 2, sq: 7, sk: 129, h: 2, hk: 2, d: 128 }, RefMask::default(), true),
        (DType::F16, Shape { b: 1, sq: 17, sk: 40, h: 3, hk: 1, d: 3 }, m[2], false),
        (DType::BF16, Shape { b: 1, sq: 20, sk: 31, h: 2, hk: 1, d: 200 }, m[4], true),
        (DType::F16, Shape { b: 1, sq: 33, sk: 20, h: 1, hk: 1, d: 512 }, causal, false),
        (DType::F32, Shape { b: 1, sq: 9, sk: 70, h: 2, hk: 2, d: 17 }, causal, true),
        (DType::F32, Shape { b: 1, sq: 40, sk: 5, h: 2, hk: 1, d: 300 }, causal, false),
        (DType::F32, Shape { b: 2, sq: 3, sk: 1, h: 1, hk: 1, d: 512 }, m[3], false),
    ];
    cases.into_iter().map(|(dtype, sh, mask, hf)| Case::dense(dtype, sh, mask, hf).expect(BackendKind::MemEfficient)).collect()
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn mem_efficient_small_cases_for_sanitizers() {
    check_all(&mem_efficient(false), &device(), "small", small_cases());
}

/// Without a GPU: the case lists whole, and cheap cases of each (a misaligned one included)
/// right on the CPU backend.
#[test]
fn case_lists_are_whole_and_run_on_the_cpu_backend() {
    let lists = vec![
        ("native", matrix_cases(dtypes(false)), 420),
        ("sm_75", matrix_cases(dtypes(true)), 280),
        ("unaligned", unaligned_cases(false), 4),
        ("unaligned sm_75", unaligned_cases(true), 3),
        ("varlen", varlen_cases(false), 54),
        ("varlen sm_75", varlen_cases(true), 36),
        ("small", small_cases(), 8),
    ];
    check_lists_on_the_cpu(lists, 5, 1 << 23);
}
