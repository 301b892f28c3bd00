//! A plain f64 attention reference, the obvious O(sq·sk·d) way.
//!
//! It depends on no crate types (only `T: Copy` and a `to_f64` closure, shapes and strides as
//! plain arrays) so it can be included both by integration tests (crate `attention`) and by
//! the crate's own unit tests via `#[path]` (crate `crate`). It deliberately spells out the
//! bottom-right causal rule itself instead of calling the crate's helper: it is the check on it.

/// One input tensor: logical shape `[batch, seqlen, heads, head_dim]`, element strides of
/// `[batch, seqlen, heads]`, head_dim contiguous. Element `(b, s, h, d)` is
/// `data[b*strides[0] + s*strides[1] + h*strides[2] + d]`.
pub struct RefInput<'a, T> {
    /// The backing elements.
    pub data: &'a [T],
    /// `[batch, seqlen, heads, head_dim]`.
    pub shape: [usize; 4],
    /// Element strides of `[batch, seqlen, heads]`.
    pub strides: [usize; 3],
}

impl<T: Copy> RefInput<'_, T> {
    /// Element `(b, s, h, d)`.
    fn at(&self, b: usize, s: usize, h: usize, d: usize) -> T {
        self.data[b * self.strides[0] + s * self.strides[1] + h * self.strides[2] + d]
    }
}

/// Plain f64 attention, materialising the scores of one row at a time (it is a reference).
///
/// `q` is `[b, sq, h, d]`, `k` and `v` are `[b, sk, hk, d]` with `h % hk == 0`; query head `i`
/// uses kv head `i / (h / hk)`. With `causal`, row `i` sees key `j` iff `j <= i + sk - sq`
/// (bottom-right aligned).
///
/// Returns `(out, lse)`: `out` contiguous `[b, sq, h, d]`, `lse` contiguous `[b, h, sq]` as a
/// natural log; rows that see no key get zeros and `lse = -inf`.
pub fn attention_f64<T: Copy>(
    q: RefInput<T>,
    k: RefInput<T>,
    v: RefInput<T>,
    to_f64: impl Fn(T) -> f64,
    scale: f64,
    causal: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mask = RefMask { causal, ..RefMask::default() };
    attention_f64_masked(q, k, v, to_f64, scale, mask)
}

/// Masking and logit options of the reference, spelled out independently of the crate.
#[derive(Clone, Copy, Debug, Default)]
pub struct RefMask {
    /// Row `i` sees no key `j > i + sk - sq`.
    pub causal: bool,
    /// Row `i` sees no key `j < i + sk - sq - left`.
    pub left: Option<usize>,
    /// Row `i` sees no key `j > i + sk - sq + right`.
    pub right: Option<usize>,
    /// Each scaled logit `x` becomes `cap · tanh(x / cap)`.
    pub softcap: Option<f64>,
}

/// As [`attention_f64`], with a sliding window and soft-capping.
pub fn attention_f64_masked<T: Copy>(
    q: RefInput<T>,
    k: RefInput<T>,
    v: RefInput<T>,
    to_f64: impl Fn(T) -> f64,
    scale: f64,
    mask: RefMask,
) -> (Vec<f64>, Vec<f64>) {
    let [b, sq, h, d] = q.shape;
    let [kb, sk, hk, kd] = k.shape;
    assert_eq!(k.shape, v.shape, "k and v shapes differ");
    assert_eq!(kb, b, "batch mismatch");
    assert_eq!(kd, d, "head_dim mismatch");
    let mut out = vec![0.0f64; b * sq * h * d];
    let mut lse = vec![f64::NEG_INFINITY; b * h * sq];
    if b * sq * h == 0 {
        return (out, lse);
    }
    assert!(
        hk > 0 && h % hk == 0,
        "query heads {h} not a multiple of kv heads {hk}"
    );
    let group = h / hk;
    let mut scores: Vec<(usize, f64)> = Vec::with_capacity(sk);
    for bi in 0..b {
        for hi in 0..h {
            let hkv = hi / group;
            for i in 0..sq {
                // The row's diagonal key, bottom-right aligned, in signed arithmetic.
                let diag = i as i64 + sk as i64 - sq as i64;
                let hidden = |j: i64| {
                    (mask.causal && j > diag)
                        || matches!(mask.right, Some(r) if j > diag + r as i64)
                        || matches!(mask.left, Some(l) if j < diag - l as i64)
                };
                scores.clear();
                for j in (0..sk).filter(|&j| !hidden(j as i64)) {
                    let mut dot = 0.0f64;
                    for c in 0..d {
                        dot += to_f64(q.at(bi, i, hi, c)) * to_f64(k.at(bi, j, hkv, c));
                    }
                    let x = dot * scale;
                    scores.push((j, mask.softcap.map_or(x, |cap| cap * (x / cap).tanh())));
                }
                if scores.is_empty() {
                    continue; // zeros and -inf already in place
                }
                let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0f64;
                for s in &mut scores {
                    s.1 = (s.1 - m).exp();
                    sum += s.1;
                }
                lse[(bi * h + hi) * sq + i] = m + sum.ln();
                let o = &mut out[((bi * sq + i) * h + hi) * d..][..d];
                for &(j, p) in &scores {
                    for (c, oc) in o.iter_mut().enumerate() {
                        *oc += p * to_f64(v.at(bi, j, hkv, c));
                    }
                }
                for oc in o.iter_mut() {
                    *oc /= sum;
                }
            }
        }
    }
    (out, lse)
}

/// Relative error `‖a − b‖₂ / max(‖b‖₂, tiny)`; `f64::INFINITY` if any `a` is NaN (so an
/// unwritten, NaN-poisoned output can never pass). Panics if the lengths differ.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: length mismatch");
    if a.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    num.sqrt() / den.sqrt().max(f64::MIN_POSITIVE)
}

/// The f64 reference of a packed variable-length batch: each sequence `b` (rows
/// `cu_q[b]..cu_q[b+1]` of `q`, `cu_k[b]..cu_k[b+1]` of `k`/`v`, all of batch 1) on its own,
/// masks aligned within the sequence.
///
/// Returns `(out, lse)`: `out` contiguous `[total_q, h, d]` (rows outside every sequence stay
/// `None`, as no backend writes them), `lse` `[h, total_q]` (FlashAttention's varlen layout).
#[allow(dead_code)] // the crate's unit tests include this file too, without a varlen test
pub fn varlen_f64<T: Copy>(
    q: RefInput<T>,
    k: RefInput<T>,
    v: RefInput<T>,
    cu_q: &[i32],
    cu_k: &[i32],
    to_f64: impl Fn(T) -> f64 + Copy,
    scale: f64,
    mask: RefMask,
) -> (Vec<Option<f64>>, Vec<Option<f64>>) {
    let [qb, total_q, h, d] = q.shape;
    assert_eq!((qb, k.shape[0]), (1, 1), "packed tensors have batch 1");
    let mut out = vec![None; total_q * h * d];
    let mut lse = vec![None; h * total_q];
    for b in 0..cu_q.len() - 1 {
        let (q0, q1) = (cu_q[b] as usize, cu_q[b + 1] as usize);
        let (k0, k1) = (cu_k[b] as usize, cu_k[b + 1] as usize);
        fn sub<'a, T>(t: &RefInput<'a, T>, r0: usize, rows: usize) -> RefInput<'a, T> {
            RefInput { data: &t.data[r0 * t.strides[1]..], shape: [1, rows, t.shape[2], t.shape[3]], strides: t.strides }
        }
        let (o, l) = attention_f64_masked(
            sub(&q, q0, q1 - q0),
            sub(&k, k0, k1 - k0),
            sub(&v, k0, k1 - k0),
            to_f64,
            scale,
            mask,
        );
        for (i, x) in o.into_iter().enumerate() {
            out[q0 * h * d + i] = Some(x);
        }
        for hi in 0..h {
            for i in 0..q1 - q0 {
                lse[hi * total_q + q0 + i] = Some(l[hi * (q1 - q0) + i]);
            }
        }
    }
    (out, lse)
}
