//! KV-cache calls on the CPU: the reference for the decode kernels and the no-GPU path.
//!
//! One work item per (sequence, KV head): its query heads and rows share every K/V row, which
//! is widened to f32 once and used by all of them (GQA-shared reads). Rows keep an online
//! softmax in f32, as the dense CPU kernel does, with a NaN-propagating maximum. Items run on
//! rayon's pool; each writes only its own rows, so results do not depend on the thread count.

use rayon::prelude::*;

use crate::backend::RunError;
use crate::dtype::Element;
use crate::error::Error;
use crate::options::Mask;
use crate::call::{Addr, Call};

/// NaN-propagating maximum (`f32::max` drops NaN, which would hide a NaN input).
#[inline]
fn max_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// Runs a validated host KV-cache call.
pub(crate) fn forward<T: Element>(call: &mut Call<'_>) -> Result<(), RunError> {
    let kv = call.kv.ok_or_else(|| RunError::Fatal(Error::invalid("cache", "no KV cache", "a KV-cache call")))?;
    let host = |a: Addr, n: usize, what: &'static str| match a {
        // SAFETY: `validate_kvcache` checked this is host memory of at least `n` i32 values
        // (lens: batch; table: (batch - 1) * stride + pages_per_seq), borrowed while `call` lives.
        Addr::Host(p) => Ok(unsafe { std::slice::from_raw_parts(p as *const i32, n) }),
        Addr::Device(_) => Err(RunError::Fatal(Error::invalid(what, "device memory", "host memory for the CPU backend"))),
    };
    let p = call.problem.clone();
    let lens = host(kv.lens, p.batch, "cache_lens")?;
    let table = match kv.table {
        Some(t) => Some(host(t, (p.batch - 1) * kv.table_stride + kv.pages_per_seq, "block_table")?),
        None => None,
    };
    let (scale, mask, softcap) = (call.scale, call.mask, call.softcap);
    let (ql, kl, vl, ol) = (call.q.layout, call.k.layout, call.v.layout, call.out.layout);
    // SAFETY: `validate_kvcache` accepted only host memory for every operand here.
    let mut s = unsafe { call.host_slices::<T>() }
        .ok_or_else(|| RunError::Fatal(Error::invalid("q", "device memory", "host memory for the CPU backend")))?;
    let (b, q_len, h, d) = (p.batch, p.seqlen_q, p.heads, p.head_dim);
    let hk = p.kv_heads;
    let group = h / hk;
    // Key j of sequence `seq`: its row offset in k or v (head offset excluded).
    let row = |strides: [usize; 3], seq: usize, j: usize| -> usize {
        match table {
            None => seq * strides[0] + j * strides[1],
            Some(t) => {
                let page = t[seq * kv.table_stride + j / kv.page_size] as usize;
                page * strides[0] + (j % kv.page_size) * strides[1]
            }
        }
    };
    let out_ptr = SendPtr(s.out.as_mut_ptr());
    let lse_ptr = SendPtr(s.lse.as_mut().map_or(std::ptr::null_mut(), |l| l.as_mut_ptr()));
    let (q, k, v) = (s.q, s.k, s.v);
    (0..b * hk).into_par_iter().for_each(|item| {
        let (seq, kh) = (item / hk, item % hk);
        let len = (lens[seq].max(0) as usize).min(kv.max_len);
        let rows = group * q_len;
        // Per packed row (qi, g): query, running max, sum, accumulator.
        let mut qs = vec![0f32; rows * d];
        for qi in 0..q_len {
            for g in 0..group {
                let off = ql.offset(seq, qi, kh * group + g);
                for c in 0..d {
                    qs[(qi * group + g) * d + c] = q[off + c].to_f32();
                }
            }
        }
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut acc = vec![0f32; rows * d];
        let ranges: Vec<(usize, usize)> = (0..q_len).map(|qi| key_range(&mask, qi, q_len, len)).collect();
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let (mut kx, mut vx) = (vec![0f32; d], vec![0f32; d]);
        for j in lo..hi {
            let (ko, vo) = (row(kl.strides(), seq, j) + kh * kl.strides()[2], row(vl.strides(), seq, j) + kh * vl.strides()[2]);
            for c in 0..d {
                kx[c] = k[ko + c].to_f32();
                vx[c] = v[vo + c].to_f32();
            }
            for qi in 0..q_len {
                if j < ranges[qi].0 || j >= ranges[qi].1 {
                    continue;
                }
                for g in 0..group {
                    let r = qi * group + g;
                    let qr = &qs[r * d..(r + 1) * d];
                    let mut x = qr.iter().zip(&kx).map(|(a, b)| a * b).sum::<f32>() * scale;
                    if let Some(cap) = softcap {
                        x = cap * (x / cap).tanh();
                    }
                    let mn = max_nan(m[r], x);
                    let base = if mn == f32::NEG_INFINITY { 0.0 } else { mn };
                    let alpha = (m[r] - base).exp();
                    let pj = (x - base).exp();
                    l[r] = l[r] * alpha + pj;
                    for (a, &vv) in acc[r * d..(r + 1) * d].iter_mut().zip(&vx) {
                        *a = *a * alpha + pj * vv;
                    }
                    m[r] = mn;
                }
            }
        }
        for qi in 0..q_len {
            for g in 0..group {
                let (r, head) = (qi * group + g, kh * group + g);
                let inv = if l[r] == 0.0 { 0.0 } else { 1.0 / l[r] };
                let off = ol.offset(seq, qi, head);
                for c in 0..d {
                    // SAFETY: each (seq, qi, head) row belongs to exactly one work item (the
                    // item of its sequence and KV head), `out`'s layout has no overlapping
                    // elements (validated), and `out` is borrowed for the whole call.
                    unsafe { *out_ptr.get().add(off + c) = T::from_f32(if l[r] == 0.0 { 0.0 } else { acc[r * d + c] * inv }) };
                }
                if !lse_ptr.get().is_null() {
                    let lse = if l[r] == 0.0 { f32::NEG_INFINITY } else { m[r] + l[r].ln() };
                    // SAFETY: as above, one writer per [batch, heads, q_len] entry.
                    unsafe { *lse_ptr.get().add((seq * h + head) * q_len + qi) = lse };
                }
            }
        }
    });
    Ok(())
}

/// Keys `[begin, end)` query row `qi` of `q_len` sees in a sequence of `len` keys: the row sits
/// at position `len - q_len + qi` (bottom-right), which is the dense rule with seqlen_k = len.
fn key_range(mask: &Mask, qi: usize, q_len: usize, len: usize) -> (usize, usize) {
    mask.key_range(qi, q_len, len)
}

/// A raw pointer shared by the workers, each writing only its own rows.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: see the writes above: work items write disjoint elements and nothing reads the output
// while they run.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    #[inline]
    fn get(self) -> *mut T {
        self.0
    }
}
