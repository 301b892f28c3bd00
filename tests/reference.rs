//! Checks on the shared f64 reference itself, against cases whose answer is known in closed
//! form, so the reference the CPU and GPU tests trust is not trusted blindly.

mod common;

use common::reference::{attention_f64, rel_err, RefInput};
use common::rng::Rng;

fn dense(data: &[f64], b: usize, s: usize, h: usize, d: usize) -> RefInput<'_, f64> {
    RefInput {
        data,
        shape: [b, s, h, d],
        strides: [s * h * d, h * d, d],
    }
}

#[test]
fn zero_queries_average_the_visible_values() {
    // q = 0: every score is 0, so each row averages the values it may see, and lse = ln(n).
    let (sq, sk, d) = (5, 3, 2);
    let q = vec![0.0; sq * d];
    let k: Vec<f64> = (0..sk * d).map(|i| i as f64).collect();
    let v: Vec<f64> = (0..sk * d).map(|i| (i * i) as f64).collect();
    for causal in [false, true] {
        let (out, lse) = attention_f64(
            dense(&q, 1, sq, 1, d),
            dense(&k, 1, sk, 1, d),
            dense(&v, 1, sk, 1, d),
            |x| x,
            0.5,
            causal,
        );
        for i in 0..sq {
            // Bottom-right: row i sees keys j <= i + sk - sq, i.e. i - 1 keys here (clamped).
            let n = if causal {
                (i + 1).saturating_sub(sq - sk).min(sk)
            } else {
                sk
            };
            if n == 0 {
                assert_eq!(lse[i], f64::NEG_INFINITY);
                assert_eq!(&out[i * d..(i + 1) * d], &[0.0, 0.0]);
                continue;
            }
            assert!((lse[i] - (n as f64).ln()).abs() < 1e-12);
            for c in 0..d {
                let want = (0..n).map(|j| v[j * d + c]).sum::<f64>() / n as f64;
                assert!(
                    (out[i * d + c] - want).abs() < 1e-12,
                    "row {i} causal {causal}"
                );
            }
        }
    }
}

#[test]
fn one_key_copies_its_value_and_gqa_picks_the_right_head() {
    // sk = 1: the output is that key's value row; lse is the single scaled score. Two query
    // heads share kv head 0 and two share kv head 1.
    let (h, hk, d) = (4, 2, 3);
    let mut rng = Rng::seed(7);
    let mut gen = |n: usize| {
        let mut x = vec![0.0f64; n];
        rng.fill(&mut x, |f| f as f64);
        x
    };
    let (q, k, v) = (gen(h * d), gen(hk * d), gen(hk * d));
    let (out, lse) = attention_f64(
        dense(&q, 1, 1, h, d),
        dense(&k, 1, 1, hk, d),
        dense(&v, 1, 1, hk, d),
        |x| x,
        0.25,
        true,
    );
    for hi in 0..h {
        let kv = hi / 2;
        assert_eq!(&out[hi * d..(hi + 1) * d], &v[kv * d..(kv + 1) * d]);
        let s: f64 = (0..d).map(|c| q[hi * d + c] * k[kv * d + c]).sum::<f64>() * 0.25;
        assert!((lse[hi] - s).abs() < 1e-12);
    }
}

#[test]
fn rel_err_rejects_nan_and_handles_zero() {
    assert_eq!(rel_err(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
    assert_eq!(rel_err(&[f64::NAN, 0.0], &[1.0, 0.0]), f64::INFINITY);
    assert!((rel_err(&[3.0, 4.0], &[0.0, 0.0])).is_infinite());
    assert!((rel_err(&[1.0, 1.0], &[1.0, 0.0]) - 1.0).abs() < 1e-15);
}

#[test]
fn rng_replays_from_its_seed() {
    let mut a = Rng::fresh();
    let mut b = Rng::seed(a.get_seed());
    for _ in 0..100 {
        assert_eq!(a.next_u64(), b.next_u64());
    }
    let mut r = Rng::seed(1);
    for _ in 0..1000 {
        let u = r.f32_uniform();
        assert!((-1.0..1.0).contains(&u));
        assert!(r.f32_normal().is_finite());
    }
}
