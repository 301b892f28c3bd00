//! K/V append cases shared by the CPU (tests/append.rs) and GPU (tests/gpu_append.rs) suites,
//! included there with `#[path]` next to `mod common`. A case is a [`KvCase`] whose cache is one
//! buffer (K in `[0, n)`, V in `[n, 2n)`) poisoned with NaN everywhere but the rows sequences
//! held before this step; new rows for each sequence's last `new_len` positions; the slots a
//! paged cache's table gives them (-1 for padding sequences, length 0); and the cache expected
//! after the append, computed here row by row, independently of the crate.
#![allow(dead_code)]

use attention::{Element, Layout};

use crate::common::gpu::lse_error;
use crate::common::kv::{KvCase, Store};
use crate::common::reference::{rel_err, RefMask};
use crate::common::rng::Rng;

/// How the new rows are laid out: `[batch, new_len, kv_heads, d]` or, for pages, any view
/// whose row-major (batch, seqlen) order is the tokens'.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NewLayout {
    /// `[batch, new_len, kv_heads, d]` contiguous.
    Contiguous,
    /// `[batch, kv_heads, new_len, d]` in memory.
    HeadsFirst,
    /// vLLM's `[num_tokens, kv_heads, d]` as `[num_tokens, 1, kv_heads, d]` (pages only).
    Tokens,
    /// `[1, num_tokens, kv_heads, d]` (pages only).
    OneRow,
    /// `[batch, new_len, kv_heads, d]` with 8 elements of padding after every token row.
    Padded,
}

pub struct AppendCase<T> {
    /// The reference problem; its k and v are the cache after the append (V at `v_offset = n`).
    pub kv: KvCase<T>,
    pub paged: bool,
    pub new_len: usize,
    /// Elements of one of K or V.
    pub n: usize,
    /// The cache before and after the append: K then V.
    pub before: Vec<T>,
    pub after: Vec<T>,
    /// The new rows in their layout `ln` (NaN in any padding).
    pub k_new: Vec<T>,
    pub v_new: Vec<T>,
    pub ln: Layout,
    pub new_layout: NewLayout,
    /// Paged: one slot per token.
    pub slots: Vec<i64>,
}

pub fn nan<T: Element>() -> T {
    T::from_f32(f32::NAN)
}

impl<T: Element> AppendCase<T> {
    /// The case in one line, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{} {:?} new {:?} b={} new_len={} h={}/{} d={} lens={:?} slots={:?}",
            T::DTYPE,
            self.kv.store,
            self.new_layout,
            self.kv.batch,
            self.new_len,
            self.kv.heads,
            self.kv.kv_heads,
            self.kv.d,
            self.kv.lens,
            self.slots
        )
    }

    /// A case: `batch` sequences of at most `max_len` keys (`max_len >= new_len`), the first at
    /// exactly `max_len` (a contiguous cache's capacity), `new_len` new rows each.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rng: &mut Rng,
        store: Store,
        batch: usize,
        new_len: usize,
        (h, hk, d): (usize, usize, usize),
        max_len: usize,
        mask: RefMask,
        new_layout: NewLayout,
    ) -> Self {
        assert!(max_len >= new_len);
        let mut kv = KvCase::<T>::new(rng, store, batch, new_len, h, hk, d, max_len, mask);
        let paged = matches!(store, Store::PagedVllm { .. } | Store::PagedHnd { .. });
        for l in kv.lens.iter_mut() {
            if (*l as usize) < new_len {
                // Pages: a padding sequence (length 0, its tokens' slots -1); contiguous: the
                // shortest length that holds the new rows.
                *l = if paged { 0 } else { new_len as i32 };
            }
        }
        let n = kv.lk.numel();
        let mut before = vec![nan::<T>(); 2 * n];
        for b in 0..batch {
            let old = (kv.lens[b] as usize).saturating_sub(new_len);
            for j in 0..old {
                for kh in 0..hk {
                    let o = kv.key_offset(b, j, kh);
                    before[o..o + d].copy_from_slice(&kv.k[o..o + d]);
                    before[n + o..n + o + d].copy_from_slice(&kv.v[kv.v_offset + o..kv.v_offset + o + d]);
                }
            }
        }
        let mut case = AppendCase {
            kv,
            paged,
            new_len,
            n,
            before: before.clone(),
            after: before,
            k_new: vec![],
            v_new: vec![],
            ln: Layout::contiguous(1, 1, 1, 1),
            new_layout,
            slots: vec![],
        };
        case.write_new_rows(rng);
        case
    }

    fn layout(&self) -> Layout {
        let (b, s, hk, d) = (self.kv.batch, self.new_len, self.kv.kv_heads, self.kv.d);
        let t = b * s;
        match self.new_layout {
            NewLayout::Contiguous => Layout::contiguous(b, s, hk, d),
            NewLayout::HeadsFirst => Layout::heads_first(b, s, hk, d),
            NewLayout::Tokens => Layout::contiguous(t, 1, hk, d),
            NewLayout::OneRow => Layout::contiguous(1, t, hk, d),
            NewLayout::Padded => Layout::strided([b, s, hk, d], [s * (hk * d + 8), hk * d + 8, d]),
        }
    }

    /// Fresh new rows for the current lengths (`kv.lens`, the new rows included): the slots,
    /// and the expected cache (`after`, from `before`); `kv`'s K/V become `after`.
    pub fn write_new_rows(&mut self, rng: &mut Rng) {
        let (batch, new_len, hk, d, n) = (self.kv.batch, self.new_len, self.kv.kv_heads, self.kv.d, self.n);
        let tokens = batch * new_len;
        let ln = self.layout();
        let [_, ls, _, _] = ln.shape();
        let (mut k_new, mut v_new) = (vec![nan::<T>(); ln.span().unwrap()], vec![nan::<T>(); ln.span().unwrap()]);
        let mut after = self.before.clone();
        let mut slots = Vec::with_capacity(tokens);
        for t in 0..tokens {
            let (b, i) = (t / new_len, t % new_len);
            let mut rows = Vec::with_capacity(hk);
            for kh in 0..hk {
                let o = ln.offset(t / ls, t % ls, kh);
                for e in 0..d {
                    k_new[o + e] = T::from_f32(rng.f32_normal());
                    v_new[o + e] = T::from_f32(rng.f32_normal());
                }
                rows.push(o);
            }
            let len = self.kv.lens[b] as usize;
            if self.paged && len == 0 {
                slots.push(-1);
                continue;
            }
            let pos = len - new_len + i;
            for (kh, &o) in rows.iter().enumerate() {
                let c = self.kv.key_offset(b, pos, kh);
                after[c..c + d].copy_from_slice(&k_new[o..o + d]);
                after[n + c..n + c + d].copy_from_slice(&v_new[o..o + d]);
            }
            if let Store::PagedVllm { page_size } | Store::PagedHnd { page_size } = self.kv.store {
                let page = self.kv.table[b * self.kv.table_stride + pos / page_size] as i64;
                slots.push(page * page_size as i64 + (pos % page_size) as i64);
            }
        }
        self.ln = ln;
        self.k_new = k_new;
        self.v_new = v_new;
        self.slots = slots;
        self.kv.k = after.clone();
        self.kv.v = after.clone();
        self.kv.v_offset = n;
        self.after = after;
    }

    /// The next decode step: the cache after this one is the one before the next; each
    /// sequence grows by `new_len` (within `max_len`) or, given in `padding`, becomes a
    /// padding slot (length 0; pages only).
    pub fn next_step(&mut self, rng: &mut Rng, max_len: usize, padding: Option<usize>) {
        self.before = self.after.clone();
        for (b, l) in self.kv.lens.iter_mut().enumerate() {
            let grown = (*l as usize + self.new_len).min(max_len).max(self.new_len);
            *l = if Some(b) == padding { 0 } else { grown as i32 };
        }
        self.write_new_rows(rng);
    }

    /// The reference output for the cache after the append.
    pub fn reference(&self) -> Vec<f64> {
        KvCase::recompute(&self.kv)
    }
}

/// A case's append as packed rows (`KvCacheMut::with_varlen_queries`, vLLM v1's mixed
/// batches): sequence `b` appends only the last `rows[b]` of the case's `new_len` new rows (the
/// ones before them count as cached already), and its query rows are those same positions. The
/// cache after is the case's own `after`.
pub struct Packed<T> {
    /// Each sequence's packed rows (the asked counts, 0 for a sequence holding no keys).
    pub rows: Vec<usize>,
    /// `batch + 1` prefix sums over `rows`.
    pub cu: Vec<i32>,
    /// The most rows of any sequence (at least 1).
    pub max_q: usize,
    /// The cache before: the case's, plus every new row that is not packed.
    pub before: Vec<T>,
    /// The packed new rows in `ln` (`[1, total_q, ..]`, `[total_q, 1, ..]` or padded rows).
    pub k_new: Vec<T>,
    pub v_new: Vec<T>,
    pub ln: Layout,
    /// Paged: the packed rows' slots.
    pub slots: Vec<i64>,
    /// q `[1, total_q, heads, d]` and the reference out and lse (`[heads, total_q]`).
    pub q: Vec<T>,
    pub lq: Layout,
    pub ref_out: Vec<f64>,
    pub ref_lse: Vec<f64>,
}

impl<T: Element> AppendCase<T> {
    /// The case's append as packed rows: `rows[b]` (at most `new_len`) of sequence `b`, in
    /// `layout` (`OneRow`, `Tokens`, or `Padded`: `[1, total_q]` with 8 elements after each
    /// token row). Refreshes the case's stored reference.
    pub fn packed(&mut self, rows: &[usize], layout: NewLayout) -> Packed<T> {
        let (batch, new_len, hk, d, n) = (self.kv.batch, self.new_len, self.kv.kv_heads, self.kv.d, self.n);
        assert_eq!(rows.len(), batch);
        let rows: Vec<usize> = rows.iter().zip(&self.kv.lens).map(|(&r, &l)| {
            assert!(r <= new_len);
            if l == 0 { 0 } else { r }
        }).collect();
        self.kv.refresh();
        let (cu, q, lq, ref_out, ref_lse) = self.kv.packed(&rows);
        let total = *cu.last().unwrap() as usize;
        assert!(total > 0, "a call has at least one packed row");
        let ln = match layout {
            NewLayout::OneRow => Layout::contiguous(1, total, hk, d),
            NewLayout::Tokens => Layout::contiguous(total, 1, hk, d),
            NewLayout::Padded => Layout::strided([1, total, hk, d], [total * (hk * d + 8), hk * d + 8, d]),
            other => panic!("{other:?} is not a packed layout"),
        };
        let [_, ls, _, _] = ln.shape();
        let mut before = self.before.clone();
        let (mut k_new, mut v_new) = (vec![nan::<T>(); ln.span().unwrap()], vec![nan::<T>(); ln.span().unwrap()]);
        let mut slots = Vec::with_capacity(total);
        let [_, bs, _, _] = self.ln.shape();
        let mut p = 0;
        for (b, &packed) in rows.iter().enumerate() {
            let len = self.kv.lens[b] as usize;
            for i in 0..new_len {
                let t = b * new_len + i;
                if i + packed < new_len {
                    // Not packed: cached already.
                    if len > 0 {
                        for kh in 0..hk {
                            let c = self.kv.key_offset(b, len - new_len + i, kh);
                            before[c..c + d].copy_from_slice(&self.after[c..c + d]);
                            before[n + c..n + c + d].copy_from_slice(&self.after[n + c..n + c + d]);
                        }
                    }
                    continue;
                }
                for kh in 0..hk {
                    let (from, to) = (self.ln.offset(t / bs, t % bs, kh), ln.offset(p / ls, p % ls, kh));
                    k_new[to..to + d].copy_from_slice(&self.k_new[from..from + d]);
                    v_new[to..to + d].copy_from_slice(&self.v_new[from..from + d]);
                }
                if self.paged {
                    slots.push(self.slots[t]);
                }
                p += 1;
            }
        }
        let max_q = rows.iter().copied().max().unwrap_or(0).max(1);
        Packed { rows, cu, max_q, before, k_new, v_new, ln, slots, q, lq, ref_out, ref_lse }
    }
}

/// What one way of appending and attending left: the cache, out and lse.
pub struct Run<'a, T> {
    pub cache: &'a [T],
    pub out: &'a [T],
    pub lse: &'a [f32],
}

impl<T: Element> AppendCase<T> {
    /// The case in one line, with its packed rows if any.
    pub fn describe_rows(&self, p: Option<&Packed<T>>) -> String {
        match p {
            None => self.describe(),
            Some(p) => format!("{} packed rows {:?} in {:?}", self.describe(), p.rows, p.ln),
        }
    }

    /// Checks a fused call against `append_kv` then `forward_kvcache` from the same cache (the
    /// case's before, or its packed rows'): both caches are the case's after, out and lse agree
    /// bit for bit, out has no NaN and is within `tol` of the f64 reference, and for packed
    /// rows so is the lse.
    pub fn check_fused(&self, p: Option<&Packed<T>>, separate: Run<'_, T>, fused: Run<'_, T>, tol: f64, seed: u64) {
        let (what, mask) = (self.describe_rows(p), self.kv.mask);
        assert_eq!(first_difference(separate.cache, &self.after), None, "{what}: appended cache (seed {seed:#x})");
        assert_eq!(first_difference(fused.cache, &self.after), None, "{what}: fused cache (seed {seed:#x})");
        assert_eq!(first_difference(fused.out, separate.out), None, "{what}: fused output differs from append + forward_kvcache (seed {seed:#x})");
        assert_eq!(first_difference(fused.lse, separate.lse), None, "{what}: fused lse differs (seed {seed:#x})");
        let got: Vec<f64> = fused.out.iter().map(|x| x.to_f32() as f64).collect();
        assert!(got.iter().all(|x| x.is_finite()), "{what}: NaN in the output (seed {seed:#x})");
        let err = rel_err(&got, &p.map_or_else(|| self.reference(), |p| p.ref_out.clone()));
        assert!(err < tol, "{what} {mask:?}: rel {err:.2e} against the reference (seed {seed:#x})");
        if let Some(p) = p {
            let lse_err = lse_error(fused.lse.iter().map(|&x| x as f64), p.ref_lse.iter().copied());
            assert!(lse_err < 1e-3, "{what} {mask:?}: lse off by {lse_err:.2e} (seed {seed:#x})");
        }
    }
}

/// The first element whose bits differ (NaN payloads included), if any.
pub fn first_difference<T: Element>(got: &[T], want: &[T]) -> Option<usize> {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).position(|(a, b)| bytemuck::bytes_of(a) != bytemuck::bytes_of(b))
}

/// The stores the sweeps cover: contiguous (both orders), vLLM and HND pages of 1, 16, 256.
pub const STORES: [Store; 7] = [
    Store::Contiguous,
    Store::ContiguousHeadsFirst,
    Store::PagedVllm { page_size: 1 },
    Store::PagedVllm { page_size: 16 },
    Store::PagedHnd { page_size: 16 },
    Store::PagedVllm { page_size: 256 },
    Store::PagedHnd { page_size: 256 },
];

/// The new-row layouts that fit a store.
pub fn new_layouts(store: Store) -> &'static [NewLayout] {
    match store {
        Store::Contiguous | Store::ContiguousHeadsFirst => &[NewLayout::Contiguous, NewLayout::HeadsFirst, NewLayout::Padded],
        _ => &[NewLayout::Tokens, NewLayout::OneRow, NewLayout::Contiguous, NewLayout::Padded],
    }
}

/// Packed row counts per sequence (vLLM v1's mixed batches): decodes, idle sequences (0 rows),
/// speculative and chunked-prefill rows; the last mix holds a 300-row chunk. Sequence 0 holds
/// the most keys (a paged case gives sequences shorter than its rows none), so it has rows.
pub const PACKED_ROWS: [&[usize]; 3] = [&[1, 0, 7, 3], &[5, 0, 1], &[300, 1, 0, 16]];
/// The packed layouts of the new rows: `[1, total_q]`, vLLM's `[total_q, 1]`, padded rows.
pub const PACKED_LAYOUTS: [NewLayout; 3] = [NewLayout::OneRow, NewLayout::Tokens, NewLayout::Padded];
