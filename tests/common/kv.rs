//! KV-cache test cases shared by the CPU (tests/kvcache.rs) and GPU (tests/gpu_decode.rs,
//! tests/gpu_multi.rs) suites: a cache in one of the layouts engines use, filled with fresh
//! random values, each sequence's keys scattered over pages in random order, and the f64
//! reference computed on a dense copy of each sequence; and the one runner of a case
//! ([`run_kv`]), in host or device memory.

use std::sync::Arc;

use attention::cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr};
use attention::{Attention, BackendKind, BlockTable, CacheLens, Element, Error, KvCache, Layout, LseMut, Tensor, TensorMut};

use super::gpu::{lse_error, Place};
use super::reference::{attention_f64_masked, rel_err, RefInput, RefMask};
use super::rng::Rng;

/// How the cache is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Store {
    /// `[batch, capacity, kv_heads, d]` dense.
    Contiguous,
    /// `[batch, kv_heads, capacity, d]` (heads first, as PyTorch keeps it).
    ContiguousHeadsFirst,
    /// vLLM: pages `[num_pages, page_size, kv_heads, d]`, K and V two views of one
    /// `(2, num_pages, page_size, kv_heads, d)` buffer.
    PagedVllm { page_size: usize },
    /// FlashInfer HND: pages `[num_pages, kv_heads, page_size, d]`.
    PagedHnd { page_size: usize },
}

/// The stores the KV-cache sweeps run (CPU and GPU alike): both contiguous orders, vLLM and
/// HND pages from 1 to 256 rows.
pub const SWEPT_STORES: [Store; 7] = [
    Store::Contiguous,
    Store::ContiguousHeadsFirst,
    Store::PagedVllm { page_size: 1 },
    Store::PagedVllm { page_size: 16 },
    Store::PagedHnd { page_size: 32 },
    Store::PagedVllm { page_size: 64 },
    Store::PagedHnd { page_size: 256 },
];

/// One KV-cache problem and its data.
pub struct KvCase<T> {
    pub store: Store,
    pub batch: usize,
    pub q_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Keys each sequence holds (some 0: padding slots).
    pub lens: Vec<i32>,
    pub mask: RefMask,
    pub q: Vec<T>,
    pub lq: Layout,
    /// K and V storage: for vLLM one buffer holding both (V at `v_offset`).
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub v_offset: usize,
    pub lk: Layout,
    /// Paged: block table `[batch, pages_per_seq]`, rows `table_stride` apart.
    pub table: Vec<i32>,
    pub pages_per_seq: usize,
    pub table_stride: usize,
    /// Contiguous: capacity per sequence.
    pub capacity: usize,
    pub ref_out: Vec<f64>,
    pub ref_lse: Vec<f64>,
}

impl<T: Element> KvCase<T> {
    /// A random case; `max_len` bounds the lengths (at least one sequence gets exactly it).
    #[allow(clippy::too_many_arguments)]
    pub fn new(rng: &mut Rng, store: Store, batch: usize, q_len: usize, heads: usize, kv_heads: usize, d: usize, max_len: usize, mask: RefMask) -> Self {
        let mut lens: Vec<i32> = (0..batch).map(|_| rng.below(max_len as u64 + 1) as i32).collect();
        lens[0] = max_len as i32;
        if batch > 2 {
            lens[batch - 1] = 0; // a padding slot
        }
        let rand = |rng: &mut Rng, n: usize| {
            let mut v = vec![T::from_f32(0.0); n];
            rng.fill(&mut v, T::from_f32);
            v
        };
        let lq = Layout::contiguous(batch, q_len, heads, d);
        let q = rand(rng, lq.numel());
        let (lk, capacity, pages_per_seq, num_pages) = match store {
            Store::Contiguous => (Layout::contiguous(batch, max_len.max(1), kv_heads, d), max_len.max(1), 0, 0),
            Store::ContiguousHeadsFirst => (Layout::heads_first(batch, max_len.max(1), kv_heads, d), max_len.max(1), 0, 0),
            Store::PagedVllm { page_size } | Store::PagedHnd { page_size } => {
                let pps = max_len.div_ceil(page_size).max(1);
                // A few spare pages so ids are not simply 0..n.
                let pages = batch * pps + 3;
                let l = match store {
                    Store::PagedVllm { .. } => Layout::contiguous(pages, page_size, kv_heads, d),
                    _ => Layout::heads_first(pages, page_size, kv_heads, d),
                };
                (l, 0, pps, pages)
            }
        };
        let n = lk.numel();
        let (k, v, v_offset) = match store {
            Store::PagedVllm { .. } => {
                let both = rand(rng, 2 * n);
                (both.clone(), both, n)
            }
            _ => (rand(rng, n), rand(rng, n), 0),
        };
        // Pages dealt out in a random order.
        let table_stride = pages_per_seq + 2;
        let mut table = vec![-1i32; batch.saturating_sub(1) * table_stride + pages_per_seq];
        if pages_per_seq > 0 {
            let mut ids: Vec<i32> = (0..num_pages as i32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for s in 0..batch {
                for p in 0..pages_per_seq {
                    table[s * table_stride + p] = ids[s * pages_per_seq + p];
                }
            }
        }
        let mut case = KvCase {
            store, batch, q_len, heads, kv_heads, d, lens, mask, q, lq, k, v, v_offset, lk, table, pages_per_seq, table_stride,
            capacity, ref_out: vec![], ref_lse: vec![],
        };
        (case.ref_out, case.ref_lse) = case.reference();
        case
    }

    /// The reference output for the case's current lengths and table (after editing them).
    pub fn recompute(c: &KvCase<T>) -> Vec<f64> {
        c.reference().0
    }

    /// Recomputes the stored reference (`ref_out`, `ref_lse`, which [`KvCase::packed`] reads)
    /// for the case's current keys, values, lengths and table.
    pub fn refresh(&mut self) {
        (self.ref_out, self.ref_lse) = self.reference();
    }

    /// Element offset of key `j`, head `kh` of sequence `s` in k (or in v, plus `v_offset`).
    pub fn key_offset(&self, s: usize, j: usize, kh: usize) -> usize {
        match self.store {
            Store::Contiguous | Store::ContiguousHeadsFirst => self.lk.offset(s, j, kh),
            Store::PagedVllm { page_size } | Store::PagedHnd { page_size } => {
                let page = self.table[s * self.table_stride + j / page_size] as usize;
                self.lk.offset(page, j % page_size, kh)
            }
        }
    }

    fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let (b, sq, h, hk, d) = (self.batch, self.q_len, self.heads, self.kv_heads, self.d);
        let mut ref_out = vec![0.0; b * sq * h * d];
        let mut ref_lse = vec![f64::NEG_INFINITY; b * h * sq];
        for s in 0..b {
            let len = self.lens[s] as usize;
            let (mut kd, mut vd) = (Vec::with_capacity(len * hk * d), Vec::with_capacity(len * hk * d));
            for j in 0..len {
                for kh in 0..hk {
                    let o = self.key_offset(s, j, kh);
                    kd.extend_from_slice(&self.k[o..o + d]);
                    vd.extend_from_slice(&self.v[self.v_offset + o..self.v_offset + o + d]);
                }
            }
            let qs = &self.q[s * sq * h * d..(s + 1) * sq * h * d];
            let scale = 1.0 / (d as f64).sqrt();
            let (o, l) = attention_f64_masked(
                RefInput { data: qs, shape: [1, sq, h, d], strides: [sq * h * d, h * d, d] },
                RefInput { data: &kd, shape: [1, len, hk, d], strides: [len * hk * d, hk * d, d] },
                RefInput { data: &vd, shape: [1, len, hk, d], strides: [len * hk * d, hk * d, d] },
                |x: T| x.to_f32() as f64,
                scale,
                self.mask,
            );
            ref_out[s * sq * h * d..(s + 1) * sq * h * d].copy_from_slice(&o);
            for hh in 0..h {
                for i in 0..sq {
                    ref_lse[(s * h + hh) * sq + i] = l[hh * sq + i];
                }
            }
        }
        (ref_out, ref_lse)
    }

    /// The case as packed queries (`cu_seqlens_q`): sequence `b` keeps the last `rows[b]` of its
    /// `q_len` query rows, which sit at the same cache positions (`lens[b] - rows[b] + i`), so
    /// the reference is the matching rows of the case's own. Returns (cu_seqlens_q, q
    /// `[1, total, heads, d]`, its layout, reference out, reference lse `[heads, total]`).
    pub fn packed(&self, rows: &[usize]) -> (Vec<i32>, Vec<T>, Layout, Vec<f64>, Vec<f64>) {
        let (h, d, sq) = (self.heads, self.d, self.q_len);
        let mut cu = vec![0i32];
        let (mut q, mut out) = (Vec::new(), Vec::new());
        for (b, &n) in rows.iter().enumerate() {
            assert!(n <= sq);
            let first = b * sq + (sq - n);
            q.extend_from_slice(&self.q[first * h * d..(first + n) * h * d]);
            out.extend_from_slice(&self.ref_out[first * h * d..(first + n) * h * d]);
            cu.push(cu[b] + n as i32);
        }
        let total = *cu.last().unwrap() as usize;
        let mut lse = vec![0.0; h * total];
        for (b, &n) in rows.iter().enumerate() {
            for hh in 0..h {
                for i in 0..n {
                    lse[hh * total + cu[b] as usize + i] = self.ref_lse[(b * h + hh) * sq + sq - n + i];
                }
            }
        }
        (cu, q, Layout::contiguous(1, total, h, d), out, lse)
    }

    /// The options matching the mask.
    pub fn options(&self) -> attention::Options {
        super::gpu::options(&self.mask)
    }
}

/// The case's cache over K and V views, its block table (used only by paged stores) and lengths.
pub fn cache_over<'a, T: Element>(c: &KvCase<T>, k: Tensor<'a, T>, v: Tensor<'a, T>, table: BlockTable<'a>, lens: CacheLens<'a>) -> KvCache<'a, T> {
    match c.store {
        Store::Contiguous | Store::ContiguousHeadsFirst => KvCache::contiguous(k, v, lens),
        Store::PagedVllm { .. } | Store::PagedHnd { .. } => KvCache::paged(k, v, table, lens),
    }
}

/// Device copies of a case's buffers.
pub struct KvDev<T> {
    pub q: CudaSlice<T>,
    /// K, or for vLLM's layout K and V in one buffer.
    pub kv: CudaSlice<T>,
    /// V where it has a buffer of its own.
    pub v_sep: Option<CudaSlice<T>>,
    pub table: CudaSlice<i32>,
    pub lens: CudaSlice<i32>,
}

/// Copies a case's buffers to `s` (an empty block table as one entry: no empty device slice).
pub fn upload<T: Element + DeviceRepr>(s: &Arc<CudaStream>, c: &KvCase<T>) -> KvDev<T> {
    let table = if c.table.is_empty() { vec![0] } else { c.table.clone() };
    KvDev {
        q: s.clone_htod(&c.q).unwrap(),
        kv: s.clone_htod(&c.k).unwrap(),
        v_sep: (c.v_offset == 0).then(|| s.clone_htod(&c.v).unwrap()),
        table: s.clone_htod(&table).unwrap(),
        lens: s.clone_htod(&c.lens).unwrap(),
    }
}

impl<T: DeviceRepr> KvDev<T> {
    /// The case's K and V views of these buffers (vLLM's layout: two views of one buffer).
    pub fn views(&self, c: &KvCase<T>) -> (CudaView<'_, T>, CudaView<'_, T>) {
        let n = c.lk.numel();
        let v = match &self.v_sep {
            Some(v) => v.slice(0..n),
            None => self.kv.slice(c.v_offset..c.v_offset + n),
        };
        (self.kv.slice(0..n), v)
    }
}

/// Runs a case through `forward_kvcache` (with lse) in `place`'s memory, out and lse poisoned
/// with NaN first: (backend, rel. error of out, max |lse − ref|) against the case's reference.
pub fn run_kv<T: Element + DeviceRepr>(attn: &Attention, place: &Place, c: &KvCase<T>) -> Result<(BackendKind, f64, f64), Error> {
    let mut out = vec![T::from_f32(f32::NAN); c.lq.numel()];
    let mut lse = vec![f32::NAN; c.batch * c.heads * c.q_len];
    let table = |t| BlockTable::host(t, c.pages_per_seq, c.table_stride);
    let ran = match place {
        Place::Host => {
            let (k, v) = (Tensor::host(&c.k, c.lk), Tensor::host(&c.v[c.v_offset..], c.lk));
            let cache = cache_over(c, k, v, table(&c.table), CacheLens::host(&c.lens));
            let (q, mut o, mut l) = (Tensor::host(&c.q, c.lq), TensorMut::host(&mut out, c.lq), LseMut::host(&mut lse));
            attn.forward_kvcache(&q, &cache, &mut o, Some(&mut l), &c.options())?
        }
        Place::Device(s) => {
            let d = upload(s, c);
            let (mut dout, mut dlse) = (s.clone_htod(&out).unwrap(), s.clone_htod(&lse).unwrap());
            let (k, v) = d.views(c);
            let paged = BlockTable::cuda(&d.table, c.pages_per_seq, c.table_stride);
            let cache = cache_over(c, Tensor::cuda(&k, c.lk), Tensor::cuda(&v, c.lk), paged, CacheLens::cuda(&d.lens));
            let (q, mut o, mut l) = (Tensor::cuda(&d.q, c.lq), TensorMut::cuda(&mut dout, c.lq), LseMut::cuda(&mut dlse));
            let ran = attn.forward_kvcache(&q, &cache, &mut o, Some(&mut l), &c.options())?;
            (out, lse) = (s.clone_dtoh(&dout).unwrap(), s.clone_dtoh(&dlse).unwrap());
            ran
        }
        Place::Streams(_) => panic!("run_kv runs on one stream (Place::Device); three streams are the dense runner's"),
    };
    let got: Vec<f64> = out.iter().map(|x| x.to_f32() as f64).collect();
    Ok((ran, rel_err(&got, &c.ref_out), lse_error(lse.iter().map(|&x| x as f64), c.ref_lse.iter().copied())))
}
