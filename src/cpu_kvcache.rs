//! KV-cache calls on the CPU: the reference for the decode kernels and the no-GPU path.
//!
//! They run on the CPU backend's blocked kernel ([`crate::cpu::forward_rows`]): each sequence
//! is a `Seqs::Cache` entry (its first `lens[b]` keys), and K/V rows come either straight from
//! the contiguous cache or through the block table ([`PagedKv`]). So a cache gets the same
//! SIMD kernels, GQA-shared K/V tiles and thread pool as dense attention.

use crate::backend::RunError;
use crate::call::{host_i32s, Call};
use crate::cpu::{forward_rows, HostIn, KvRows, RowRun, Seqs, StridedKv, Threads};
use crate::options::Mask;
use crate::dtype::Element;
use crate::error::Error;
use crate::layout::Layout;

/// K/V pages `[num_pages, page_size, kv_heads, d]` reached through a block table: key `key` of
/// sequence `batch` is slot `key % page_size` of page `table[batch * stride + key / page_size]`.
struct PagedKv<'a, T> {
    k: HostIn<'a, T>,
    v: HostIn<'a, T>,
    table: &'a [i32],
    stride: usize,
    page_size: usize,
    /// `log2(page_size)` when it is a power of two (vLLM's 16, FlashInfer's, most engines'):
    /// a shift and a mask cost a cycle each where a 64-bit division costs tens.
    page_shift: Option<u32>,
}

impl<'a, T> PagedKv<'a, T> {
    /// The pages, the table (`stride` entries per sequence) and the page size (at least 1).
    fn new(k: HostIn<'a, T>, v: HostIn<'a, T>, table: &'a [i32], stride: usize, page_size: usize) -> Self {
        let page_shift = page_size.is_power_of_two().then(|| page_size.trailing_zeros());
        PagedKv { k, v, table, stride, page_size, page_shift }
    }

    /// The rows of (sequence, key, kv heads `kv_head..kv_head + heads`) in `x` and of the
    /// keys after it on the same page. Page ids were checked against the pages for every key
    /// a length reaches; the clamp keeps even a wrong table inside the tensor.
    #[inline]
    fn run<'x>(&self, x: &HostIn<'x, T>, batch: usize, key: usize, kv_head: usize, heads: usize) -> RowRun<'x, T> {
        let (index, slot) = match self.page_shift {
            Some(shift) => (key >> shift, key & (self.page_size - 1)),
            None => (key / self.page_size, key % self.page_size),
        };
        let page = (self.table[batch * self.stride + index].max(0) as usize).min(x.layout.batch() - 1);
        let [_, key_stride, head_stride] = x.layout.strides();
        let first = x.layout.offset(page, slot, kv_head);
        RowRun::new(x.data, first, self.page_size - slot, heads, x.layout.head_dim(), [key_stride, head_stride])
    }
}

impl<T: Element> KvRows<T> for PagedKv<'_, T> {
    #[inline]
    fn k_run(&self, batch: usize, key: usize, kv_head: usize, heads: usize) -> RowRun<'_, T> {
        self.run(&self.k, batch, key, kv_head, heads)
    }
    #[inline]
    fn v_run(&self, batch: usize, key: usize, kv_head: usize, heads: usize) -> RowRun<'_, T> {
        self.run(&self.v, batch, key, kv_head, heads)
    }
}

/// Runs a validated host KV-cache call on `threads`.
pub(crate) fn forward<T: Element>(call: &mut Call<'_>, threads: &Threads) -> Result<(), RunError> {
    let kv = call.kv.ok_or_else(|| RunError::Fatal(Error::invalid("cache", "no KV cache", "a KV-cache call")))?;
    let p = call.problem.clone();
    // SAFETY: `validate_kvcache` checked `batch` lengths and the table's validated entry count,
    // borrowed while `call` lives.
    let lens = unsafe { host_i32s(kv.lens, p.batch, "cache_lens")? };
    let table = match kv.table {
        Some(t) => Some(unsafe { host_i32s(t, kv.table_entries, "block_table")? }),
        None => None,
    };
    let (scale, mask, softcap) = (call.scale, call.mask, call.softcap);
    let (ql, kl, vl, ol) = (call.q.layout, call.k.layout, call.v.layout, call.out.layout);
    // SAFETY: `validate_kvcache` accepted only host memory for every operand here.
    let s = unsafe { call.host_slices::<T>() }
        .ok_or_else(|| RunError::Fatal(Error::invalid("q", "device memory", "host memory for the CPU backend")))?;
    let q = HostIn { data: s.q, layout: ql };
    let (k, v) = (HostIn { data: s.k, layout: kl }, HostIn { data: s.v, layout: vl });
    let starts = match kv.query_starts {
        // SAFETY: validated as `batch + 1` host prefix sums within q's rows.
        Some(a) => Some(unsafe { host_i32s(a, p.batch + 1, "cu_seqlens_q")? }),
        None => None,
    };
    let run = match (table, starts) {
        (None, None) => {
            forward_rows(q, StridedKv { k, v }, kv.max_len, p.kv_heads, s.out, ol, s.lse, Seqs::Cache { lens }, scale, mask, softcap, threads)
        }
        (Some(table), None) => {
            let paged = PagedKv::new(k, v, table, kv.table_stride, kv.page_size);
            forward_rows(q, paged, kv.max_len, p.kv_heads, s.out, ol, s.lse, Seqs::Cache { lens }, scale, mask, softcap, threads)
        }
        // Each sequence's rows as batch entry 0 of a view of the same type (a cache row, the
        // table from the sequence's row), so the kernel is not instantiated again for them.
        (None, Some(cu)) => {
            let rows = |b: usize| StridedKv { k: batch_entry(&k, b), v: batch_entry(&v, b) };
            per_sequence(q, rows, kv.max_len, p.kv_heads, s.out, ol, s.lse, cu, lens, scale, mask, softcap, threads)
        }
        (Some(table), Some(cu)) => {
            let rows = |b: usize| {
                let (k, v) = (HostIn { data: k.data, layout: k.layout }, HostIn { data: v.data, layout: v.layout });
                PagedKv::new(k, v, table.get(b * kv.table_stride..).unwrap_or(&[]), kv.table_stride, kv.page_size)
            };
            per_sequence(q, rows, kv.max_len, p.kv_heads, s.out, ol, s.lse, cu, lens, scale, mask, softcap, threads)
        }
    };
    run.map_err(RunError::Fatal)
}

/// Batch entry `b` of a contiguous cache as a one-entry tensor (same strides).
fn batch_entry<'a, T>(x: &HostIn<'a, T>, b: usize) -> HostIn<'a, T> {
    let [_, sk, hk, d] = x.layout.shape();
    let data = x.data.get(x.layout.offset(b, 0, 0)..).unwrap_or(&[]);
    HostIn { data, layout: Layout::strided([1, sk, hk, d], x.layout.strides()) }
}

/// Packed queries (`cu_seqlens_q`): each sequence's rows of q `[1, total_q, heads, d]` against
/// its cache (`rows_of(b)`: its K/V rows as batch entry 0), one sequence at a time (each on the
/// whole pool); lse is `[heads, total_q]`.
/// The prefix sums were checked on the host (non-decreasing, within q, each at most the
/// stated maximum); the clamps mirror the kernels' all the same.
#[allow(clippy::too_many_arguments)]
fn per_sequence<T: Element, R: KvRows<T>>(
    q: HostIn<'_, T>,
    rows_of: impl Fn(usize) -> R,
    max_len: usize,
    kv_heads: usize,
    out: &mut [T],
    out_layout: Layout,
    mut lse: Option<&mut [f32]>,
    cu: &[i32],
    lens: &[i32],
    scale: f32,
    mask: Mask,
    softcap: Option<f32>,
    threads: &Threads,
) -> Result<(), Error> {
    let [_, total, heads, d] = q.layout.shape();
    let mut seq_lse = Vec::new();
    for (b, w) in cu.windows(2).enumerate() {
        let lo = (w[0].max(0) as usize).min(total);
        let n = (w[1].max(0) as usize).clamp(lo, total) - lo;
        if n == 0 {
            continue;
        }
        let sub = |l: Layout| Layout::strided([1, n, heads, d], l.strides());
        let (q_off, o_off) = (q.layout.offset(0, lo, 0), out_layout.offset(0, lo, 0));
        let qs = HostIn { data: &q.data[q_off..], layout: sub(q.layout) };
        let want_lse = lse.is_some();
        seq_lse.clear();
        seq_lse.resize(if want_lse { heads * n } else { 0 }, 0.0);
        forward_rows(
            qs,
            rows_of(b),
            max_len,
            kv_heads,
            &mut out[o_off..],
            sub(out_layout),
            want_lse.then_some(&mut seq_lse[..]),
            Seqs::Cache { lens: &lens[b..b + 1] },
            scale,
            mask,
            softcap,
            threads,
        )?;
        if let Some(l) = lse.as_deref_mut() {
            // [1, heads, n] for the sequence into [heads, total_q].
            for h in 0..heads {
                l[h * total + lo..h * total + lo + n].copy_from_slice(&seq_lse[h * n..(h + 1) * n]);
            }
        }
    }
    Ok(())
}

/// Where the rows of a host append go.
pub(crate) enum HostTarget<'a> {
    /// Contiguous cache: row `i` of sequence `b`'s `n` to position `lens[b] - n + i`, where `n`
    /// is `new_len` and the rows are `[batch, new_len]`, or with packed rows (`cu`, `batch + 1`
    /// prefix sums over the tokens) `cu[b + 1] - cu[b]`.
    Lens { lens: &'a [i32], max_len: usize, cu: Option<&'a [i32]> },
    /// Pages: token `t` to slot `slots[t]` (page `slot / page_size`, row `slot % page_size`).
    Slots { slots: &'a [i64], page_size: usize, num_slots: usize },
}

/// Copies each (token, kv head) row of `src` (`[batch, new_len, kv_heads, d]`, tokens in
/// row-major order) to the row of `dst` (the cache) that `target` names: the host side of
/// [`crate::Attention::append_kv`]. Validation checked host lengths (each sequence's new rows
/// up to `max_len`), prefix sums (from 0 to the tokens, non-decreasing) and slots (below
/// `num_slots`; negative ones mark padding tokens); a destination outside the cache is skipped,
/// as on the device.
pub(crate) fn append_rows<T: Copy>(src: &[T], src_layout: Layout, dst: &mut [T], dst_layout: Layout, target: &HostTarget<'_>) {
    let [batch, new_len, kv_heads, d] = src_layout.shape();
    for t in 0..batch * new_len {
        let (sb, si) = (t / new_len, t % new_len);
        let (page, row) = match *target {
            HostTarget::Lens { lens, max_len, cu } => {
                // The token's sequence, its count of new rows and this row's index among them.
                let (seq, n, i) = match cu {
                    None => (sb, new_len, si),
                    Some(cu) => {
                        // The last sequence starting at or before t (cu[0] = 0 <= t): the one
                        // holding it, past any empty ones that start there too.
                        let s = cu.partition_point(|&c| c as usize <= t) - 1;
                        (s, (cu[s + 1] - cu[s]) as usize, t - cu[s] as usize)
                    }
                };
                let pos = lens[seq] as i64 - n as i64 + i as i64;
                if pos < 0 || pos >= max_len as i64 {
                    continue;
                }
                (seq, pos as usize)
            }
            HostTarget::Slots { slots, page_size, num_slots } => {
                let slot = slots[t];
                if slot < 0 || slot as u64 >= num_slots as u64 {
                    continue;
                }
                (slot as usize / page_size, slot as usize % page_size)
            }
        };
        for h in 0..kv_heads {
            let (from, to) = (src_layout.offset(sb, si, h), dst_layout.offset(page, row, h));
            dst[to..to + d].copy_from_slice(&src[from..from + d]);
        }
    }
}
