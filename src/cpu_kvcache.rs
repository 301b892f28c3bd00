//! KV-cache calls on the CPU: the reference for the decode kernels and the no-GPU path.
//!
//! They run on the CPU backend's blocked kernel ([`crate::cpu::forward_rows`]): each sequence
//! is a `Seqs::Cache` entry (its first `lens[b]` keys), and K/V rows come either straight from
//! the contiguous cache or through the block table ([`PagedKv`]). So a cache gets the same
//! SIMD kernels, GQA-shared K/V tiles and thread pool as dense attention.

use crate::backend::RunError;
use crate::call::{host_i32s, Call};
use crate::cpu::{forward_rows, HostIn, KvRows, Seqs, StridedKv, Threads};
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
}

impl<T> PagedKv<'_, T> {
    /// Element offset of (sequence, key, kv head) in a page layout. Page ids were checked
    /// against the pages for every key a length reaches; the clamp keeps even a wrong table
    /// inside the tensor.
    #[inline]
    fn offset(&self, layout: &Layout, batch: usize, key: usize, kv_head: usize) -> usize {
        let page = self.table[batch * self.stride + key / self.page_size].max(0) as usize;
        layout.offset(page.min(layout.batch() - 1), key % self.page_size, kv_head)
    }
}

impl<T: Element> KvRows<T> for PagedKv<'_, T> {
    #[inline]
    fn k_row(&self, batch: usize, key: usize, kv_head: usize) -> &[T] {
        let off = self.offset(&self.k.layout, batch, key, kv_head);
        &self.k.data[off..off + self.k.layout.head_dim()]
    }
    #[inline]
    fn v_row(&self, batch: usize, key: usize, kv_head: usize) -> &[T] {
        let off = self.offset(&self.v.layout, batch, key, kv_head);
        &self.v.data[off..off + self.v.layout.head_dim()]
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
    let seqs = Seqs::Cache { lens };
    let run = match table {
        None => forward_rows(q, StridedKv { k, v }, kv.max_len, p.kv_heads, s.out, ol, s.lse, seqs, scale, mask, softcap, threads),
        Some(table) => {
            let paged = PagedKv { k, v, table, stride: kv.table_stride, page_size: kv.page_size };
            forward_rows(q, paged, kv.max_len, p.kv_heads, s.out, ol, s.lse, seqs, scale, mask, softcap, threads)
        }
    };
    run.map_err(RunError::Fatal)
}
