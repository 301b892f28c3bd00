//! The CPU backend through the public API against the plain f64 reference, on fresh random
//! inputs: seqlen 1, seqlen_q ≠ seqlen_k with causal (fully masked rows), GQA/MQA, strided
//! layouts, all three dtypes. (src/cpu.rs tests the kernel itself more widely.)

mod common;

use attention::{BackendKind, Element, Layout, LseMut, Options, SeqLens, Selector, Settings, Tensor, TensorMut, VarLen};
use common::reference::{attention_f64, attention_f64_masked, rel_err, varlen_f64, RefInput, RefMask};
use common::rng::Rng;
use half::{bf16, f16};

fn check<T: Element>(rng: &mut Rng, dims: [usize; 6], causal: bool, heads_first: bool, tol: f64) {
    let [b, sq, sk, h, hk, d] = dims;
    let lay = |s, h| if heads_first { Layout::heads_first(b, s, h, d) } else { Layout::contiguous(b, s, h, d) };
    let (lq, lk) = (lay(sq, h), lay(sk, hk));
    let gen = |rng: &mut Rng, n| {
        let mut v = vec![T::from_f32(0.0); n];
        rng.fill(&mut v, T::from_f32);
        v
    };
    let (q, k, v) = (gen(rng, lq.numel()), gen(rng, lk.numel()), gen(rng, lk.numel()));
    let mut out = vec![T::from_f32(f32::NAN); lq.numel()];
    let mut lse = vec![f32::NAN; b * h * sq];
    let attn = Selector::from_settings(Settings::default()).cpu_threads(3).select().unwrap();
    let ran = attn
        .forward_with_lse(
            &Tensor::host(&q, lq),
            &Tensor::host(&k, lk),
            &Tensor::host(&v, lk),
            &mut TensorMut::host(&mut out, lq),
            &mut LseMut::host(&mut lse),
            &Options::default().causal(causal),
        )
        .unwrap();
    assert_eq!(ran, BackendKind::Cpu);
    let to64 = |x: T| x.to_f32() as f64;
    let (ref_out, ref_lse) = attention_f64(input(&q, lq), input(&k, lk), input(&v, lk), to64, 1.0 / (d as f64).sqrt(), causal);
    let mut got = Vec::new();
    for bi in 0..b {
        for i in 0..sq {
            for hi in 0..h {
                let o = lq.offset(bi, i, hi);
                got.extend(out[o..o + d].iter().map(|&x| to64(x)));
            }
        }
    }
    let err = rel_err(&got, &ref_out);
    assert!(err < tol, "{dims:?} causal={causal} heads_first={heads_first}: rel err {err:.2e} (seed {:#x})", rng.get_seed());
    for (g, r) in lse.iter().zip(&ref_lse) {
        if r.is_infinite() {
            assert_eq!(*g as f64, *r, "masked row lse");
        } else {
            assert!((*g as f64 - r).abs() < 1e-4, "lse {g} vs {r}");
        }
    }
}

fn input<T>(data: &[T], l: Layout) -> RefInput<'_, T> {
    RefInput { data, shape: l.shape(), strides: l.strides() }
}

#[test]
fn cpu_backend_matches_f64_reference() {
    let mut rng = Rng::fresh();
    let cases: [[usize; 6]; 6] = [
        [1, 1, 1, 1, 1, 64],
        [2, 1, 37, 4, 2, 32],
        [1, 9, 4, 4, 4, 16],   // sq > sk: causal leaves the first 5 rows with no key
        [2, 33, 70, 8, 1, 24], // MQA
        [1, 65, 65, 6, 3, 7],  // GQA, odd head_dim
        [2, 17, 129, 2, 2, 128],
    ];
    for dims in cases {
        for causal in [false, true] {
            for heads_first in [false, true] {
                check::<f32>(&mut rng, dims, causal, heads_first, 1e-5);
                check::<f16>(&mut rng, dims, causal, heads_first, 2e-3);
                check::<bf16>(&mut rng, dims, causal, heads_first, 1e-2);
            }
        }
    }
}

#[test]
fn fully_masked_rows_are_zero_with_minus_infinity_lse() {
    let (b, sq, sk, h, d) = (1, 6, 2, 2, 8);
    let (lq, lk) = (Layout::contiguous(b, sq, h, d), Layout::contiguous(b, sk, h, d));
    let x: Vec<f32> = (0..lq.numel()).map(|i| (i as f32).sin()).collect();
    let kv: Vec<f32> = (0..lk.numel()).map(|i| (i as f32).cos()).collect();
    let mut out = vec![f32::NAN; lq.numel()];
    let mut lse = vec![f32::NAN; b * h * sq];
    let attn = Selector::from_settings(Settings::default()).select().unwrap();
    attn.forward_with_lse(
        &Tensor::host(&x, lq),
        &Tensor::host(&kv, lk),
        &Tensor::host(&kv, lk),
        &mut TensorMut::host(&mut out, lq),
        &mut LseMut::host(&mut lse),
        &Options::default().causal(true),
    )
    .unwrap();
    // Bottom-right alignment: rows 0..4 see no key, row 4 sees key 0, row 5 both.
    for i in 0..sq {
        for hi in 0..h {
            let row = &out[lq.offset(0, i, hi)..][..d];
            let l = lse[hi * sq + i];
            if i < sq - sk {
                assert!(row.iter().all(|&v| v == 0.0), "row {i} should be zeros: {row:?}");
                assert_eq!(l, f32::NEG_INFINITY);
            } else {
                assert!(row.iter().all(|v| v.is_finite()) && l.is_finite());
            }
        }
    }
}

/// Sliding windows (one- and two-sided, with and without causal) and soft-capping against the
/// reference, which spells the rule out on its own.
#[test]
fn cpu_backend_windows_and_softcap_match_reference() {
    let mut rng = Rng::fresh();
    let windows = [(Some(0), Some(0)), (Some(3), None), (None, Some(2)), (Some(5), Some(1)), (Some(17), Some(0))];
    let shapes: [[usize; 6]; 3] = [[1, 33, 33, 2, 1, 16], [2, 9, 70, 4, 2, 8], [1, 70, 9, 2, 2, 24]];
    let attn = Selector::from_settings(Settings::default()).cpu_threads(2).select().unwrap();
    for (n, [b, sq, sk, h, hk, d]) in shapes.into_iter().enumerate() {
        for (w, &(left, right)) in windows.iter().enumerate() {
            for causal in [false, true] {
                let softcap = [None, Some(2.0f32)][(n + w) % 2];
                let (lq, lk) = (Layout::contiguous(b, sq, h, d), Layout::heads_first(b, sk, hk, d));
                let gen = |rng: &mut Rng, n| {
                    let mut v = vec![0f32; n];
                    rng.fill(&mut v, |x| x * 2.0);
                    v
                };
                let (q, k, v) = (gen(&mut rng, lq.numel()), gen(&mut rng, lk.numel()), gen(&mut rng, lk.numel()));
                let mut out = vec![f32::NAN; lq.numel()];
                let mut lse = vec![f32::NAN; b * h * sq];
                let mut opts = Options::default().causal(causal).window(left, right);
                if let Some(c) = softcap {
                    opts = opts.softcap(c);
                }
                attn.forward_with_lse(
                    &Tensor::host(&q, lq),
                    &Tensor::host(&k, lk),
                    &Tensor::host(&v, lk),
                    &mut TensorMut::host(&mut out, lq),
                    &mut LseMut::host(&mut lse),
                    &opts,
                )
                .unwrap();
                let mask = RefMask { causal, left, right, softcap: softcap.map(f64::from) };
                let (ref_out, ref_lse) =
                    attention_f64_masked(input(&q, lq), input(&k, lk), input(&v, lk), |x| x as f64, 1.0 / (d as f64).sqrt(), mask);
                let got: Vec<f64> = out.iter().map(|&x| x as f64).collect();
                let err = rel_err(&got, &ref_out);
                let case = format!("{:?} window={left:?},{right:?} causal={causal} softcap={softcap:?}", [b, sq, sk, h, hk, d]);
                assert!(err < 1e-5 || ref_out.iter().all(|x| *x == 0.0) && got.iter().all(|x| *x == 0.0), "{case}: rel {err:.2e}");
                for (g, r) in lse.iter().zip(&ref_lse) {
                    if r.is_infinite() {
                        assert_eq!(*g as f64, *r, "{case}: masked row lse");
                    } else {
                        assert!((*g as f64 - r).abs() < 1e-4, "{case}: lse {g} vs {r}");
                    }
                }
            }
        }
    }
}

/// A packed variable-length batch against the per-sequence f64 reference: lengths 0 and 1,
/// sq ≠ sk per sequence (including queries with no keys), GQA, causal and windowed, both
/// packed layouts, lse in `[heads, total_q]`.
#[test]
fn varlen_batches_match_the_per_sequence_reference() {
    let mut rng = Rng::fresh();
    let q_lens = [3usize, 0, 1, 17, 64, 5, 2];
    let k_lens = [5usize, 4, 1, 17, 30, 0, 9];
    let prefix = |lens: &[usize]| -> Vec<i32> {
        std::iter::once(0).chain(lens.iter().scan(0, |s, &l| { *s += l; Some(*s as i32) })).collect()
    };
    let (cu_q, cu_k) = (prefix(&q_lens), prefix(&k_lens));
    let (total_q, total_k) = (*cu_q.last().unwrap() as usize, *cu_k.last().unwrap() as usize);
    let (h, hk, d) = (4, 2, 24);
    let attn = Selector::from_settings(Settings::default()).cpu_threads(3).select().unwrap();
    for (mask, heads_first) in [
        (RefMask::default(), false),
        (RefMask { causal: true, ..RefMask::default() }, true),
        (RefMask { causal: true, left: Some(4), ..RefMask::default() }, false),
        (RefMask { left: Some(3), right: Some(2), softcap: Some(5.0), ..RefMask::default() }, true),
    ] {
        let lay = |s, h| if heads_first { Layout::heads_first(1, s, h, d) } else { Layout::contiguous(1, s, h, d) };
        let (lq, lk) = (lay(total_q, h), lay(total_k, hk));
        let gen = |rng: &mut Rng, n| {
            let mut v = vec![0f32; n];
            rng.fill(&mut v, |x| x);
            v
        };
        let (q, k, v) = (gen(&mut rng, lq.numel()), gen(&mut rng, lk.numel()), gen(&mut rng, lk.numel()));
        let mut out = vec![f32::NAN; lq.numel()];
        let mut lse = vec![f32::NAN; h * total_q];
        let mut opts = Options::default().causal(mask.causal).window(mask.left, mask.right);
        if let Some(c) = mask.softcap {
            opts = opts.softcap(c as f32);
        }
        let varlen = VarLen::new(SeqLens::host(&cu_q), SeqLens::host(&cu_k), 64, 30);
        let ran = attn
            .forward_varlen_with_lse(
                &Tensor::host(&q, lq),
                &Tensor::host(&k, lk),
                &Tensor::host(&v, lk),
                &mut TensorMut::host(&mut out, lq),
                &mut LseMut::host(&mut lse),
                &varlen,
                &opts,
            )
            .unwrap();
        assert_eq!(ran, BackendKind::Cpu);
        let (ref_out, ref_lse) =
            varlen_f64(input(&q, lq), input(&k, lk), input(&v, lk), &cu_q, &cu_k, |x| x as f64, 1.0 / (d as f64).sqrt(), mask);
        let mut got = Vec::new();
        for i in 0..total_q {
            for hi in 0..h {
                let o = lq.offset(0, i, hi);
                got.extend(out[o..o + d].iter().map(|&x| x as f64));
            }
        }
        let want: Vec<f64> = ref_out.iter().map(|x| x.expect("every row is in a sequence")).collect();
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "{mask:?} heads_first={heads_first}: rel err {err:.2e} (seed {:#x})", rng.get_seed());
        for (g, r) in lse.iter().zip(&ref_lse) {
            let r = r.unwrap();
            if r.is_infinite() {
                assert_eq!(*g as f64, r, "row with no key: lse");
            } else {
                assert!((*g as f64 - r).abs() < 1e-4, "lse {g} vs {r}");
            }
        }
    }
}
