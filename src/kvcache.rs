//! KV-cache calls: a few query rows per sequence against keys and values already in a cache,
//! contiguous or paged, each sequence with its own length (FlashAttention's
//! `flash_attn_with_kvcache`, vLLM's paged attention).

use std::marker::PhantomData;

use cudarc::driver::DevicePtr;

use crate::dtype::Element;
use crate::error::Error;
use crate::options::Options;
use crate::problem::{KvCacheKind, Problem};
use crate::tensor::{
    byte_range, call_memory, check_disjoint, check_f32_or_i32_pointer, check_memory_like_q, check_operand, check_options,
    four_byte_range, lse_operand, operand, order_on_launch_stream, peek_in, peek_out, shape_str, vector_aligned, Call,
    InMem, KvPart, LseMut, Tensor, TensorMut, MAX_DIM,
};

/// Each sequence's cache length: int32 `[batch]`, the number of keys of that sequence in the
/// cache, the rows of this call's queries included (vLLM's `seq_lens`). Device lengths are
/// never read on the host (no synchronisation: CUDA-graph replays may change them); the kernels
/// clamp them to the cache's capacity.
#[derive(Debug)]
pub struct CacheLens<'a> {
    pub(crate) mem: InMem<'a, i32>,
}

impl<'a> CacheLens<'a> {
    /// Lengths in host memory (for host caches: the CPU backend).
    pub fn host(lens: &'a [i32]) -> Self {
        CacheLens { mem: InMem::Host(lens) }
    }
    /// Lengths in a cudarc device slice.
    pub fn cuda<S: DevicePtr<i32>>(slice: &'a S) -> Self {
        CacheLens { mem: InMem::Cuda(slice) }
    }
    /// Lengths in device memory owned elsewhere (a PyTorch int32 tensor's `data_ptr()`).
    ///
    /// # Safety
    /// As [`Tensor::from_raw_device`], for `len` i32 values.
    pub unsafe fn from_raw_device(ptr: u64, len: usize) -> Self {
        CacheLens { mem: InMem::raw(ptr, len) }
    }
    fn len(&self) -> usize {
        self.mem.len()
    }
}

/// A paged cache's block table: int32 page ids, one row of `pages_per_seq` per sequence, rows
/// `row_stride` elements apart (vLLM's `block_tables`). Sequence `b`'s key `j` is in page
/// `table[b * row_stride + j / page_size]`, slot `j % page_size`. Device tables are never read
/// on the host; the kernels clamp page ids to the pages given.
#[derive(Debug)]
pub struct BlockTable<'a> {
    pub(crate) mem: InMem<'a, i32>,
    pub(crate) pages_per_seq: usize,
    pub(crate) row_stride: usize,
}

impl<'a> BlockTable<'a> {
    /// A table in host memory, `[batch, pages_per_seq]` with rows `row_stride` apart.
    pub fn host(table: &'a [i32], pages_per_seq: usize, row_stride: usize) -> Self {
        BlockTable { mem: InMem::Host(table), pages_per_seq, row_stride }
    }
    /// A table in a cudarc device slice.
    pub fn cuda<S: DevicePtr<i32>>(slice: &'a S, pages_per_seq: usize, row_stride: usize) -> Self {
        BlockTable { mem: InMem::Cuda(slice), pages_per_seq, row_stride }
    }
    /// A table in device memory owned elsewhere.
    ///
    /// # Safety
    /// As [`Tensor::from_raw_device`], for `len` i32 values.
    pub unsafe fn from_raw_device(ptr: u64, len: usize, pages_per_seq: usize, row_stride: usize) -> Self {
        BlockTable { mem: InMem::raw(ptr, len), pages_per_seq, row_stride }
    }
    fn len(&self) -> usize {
        self.mem.len()
    }
}

/// The keys and values a KV-cache call reads: contiguous `[batch, max_len, kv_heads, head_dim]`
/// or pages `[num_pages, page_size, kv_heads, head_dim]` (any page size, any strides, so vLLM's
/// K and V views of one `(2, num_blocks, block_size, kv_heads, d)` tensor and FlashInfer's HND
/// `[pages, kv_heads, page_size, d]` work without copies), with each sequence's length.
///
/// ```
/// use attention::{CacheLens, KvCache, Layout, Options, Tensor, TensorMut};
/// // Two sequences with 5 and 3 cached keys, room for 8; one new query row each.
/// let (b, cap, h, hk, d) = (2, 8, 4, 2, 16);
/// let lc = Layout::contiguous(b, cap, hk, d);
/// let kv: Vec<f32> = (0..lc.numel()).map(|i| (i as f32 * 0.1).sin()).collect();
/// let lq = Layout::contiguous(b, 1, h, d);
/// let q: Vec<f32> = (0..lq.numel()).map(|i| (i as f32 * 0.3).cos()).collect();
/// let mut out = vec![0.0f32; lq.numel()];
/// let lens = [5, 3];
/// let cache = KvCache::contiguous(Tensor::host(&kv, lc), Tensor::host(&kv, lc), CacheLens::host(&lens));
/// let attn = attention::Selector::from_env().unwrap().select().unwrap();
/// attn.forward_kvcache(&Tensor::host(&q, lq), &cache, &mut TensorMut::host(&mut out, lq), None, &Options::default())
///     .unwrap();
/// ```
#[derive(Debug)]
pub struct KvCache<'a, T: Element> {
    pub(crate) k: Tensor<'a, T>,
    pub(crate) v: Tensor<'a, T>,
    pub(crate) lens: CacheLens<'a>,
    pub(crate) table: Option<BlockTable<'a>>,
}

impl<'a, T: Element> KvCache<'a, T> {
    /// A contiguous cache: k and v `[batch, max_len, kv_heads, head_dim]` (any strides).
    pub fn contiguous(k: Tensor<'a, T>, v: Tensor<'a, T>, lens: CacheLens<'a>) -> Self {
        KvCache { k, v, lens, table: None }
    }
    /// A paged cache: k and v pages `[num_pages, page_size, kv_heads, head_dim]` (any strides)
    /// and the block table mapping each sequence's keys to pages.
    pub fn paged(k_pages: Tensor<'a, T>, v_pages: Tensor<'a, T>, table: BlockTable<'a>, lens: CacheLens<'a>) -> Self {
        KvCache { k: k_pages, v: v_pages, lens, table: Some(table) }
    }
}

/// Validates a KV-cache call: one check per constraint, each naming the argument. q and out
/// are `[batch, q_len, heads, head_dim]`; query row `i` of sequence `b` sits at position
/// `lens[b] - q_len + i`, so causal masks and windows align bottom-right per sequence.
pub(crate) fn validate_kvcache<'c, T: Element>(
    q: &'c Tensor<'_, T>,
    cache: &'c KvCache<'_, T>,
    out: &'c mut TensorMut<'_, T>,
    mut lse: Option<&'c mut LseMut<'_>>,
    opts: &Options,
) -> Result<Call<'c>, Error> {
    // The q/out/lse/options rules are those of every call: reuse them on a stand-in whose
    // keys are the cache (its batch checked separately below).
    let elem = std::mem::size_of::<T>();
    let (qa, qn, qm) = peek_in(&q.mem);
    let (ka, kn, km) = peek_in(&cache.k.mem);
    let (va, vn, vm) = peek_in(&cache.v.mem);
    let (qo, ko, vo) = (operand(qa, qn, q.layout), operand(ka, kn, cache.k.layout), operand(va, vn, cache.v.layout));
    check_operand("q", &qo, elem, false)?;
    check_operand("k_cache", &ko, elem, false)?;
    check_operand("v_cache", &vo, elem, false)?;
    let [b, q_len, h, d] = qo.layout.shape();
    let [kb, ks, hk, kd] = ko.layout.shape();
    if vo.layout.shape() != ko.layout.shape() {
        return Err(Error::invalid(
            "v_cache",
            format!("shape {}", shape_str(&vo.layout)),
            format!("k_cache's shape {}", shape_str(&ko.layout)),
        ));
    }
    if kd != d {
        return Err(Error::invalid("k_cache", format!("head_dim {kd}"), format!("q's head_dim {d}")));
    }
    if h % hk != 0 {
        return Err(Error::invalid("k_cache", format!("{hk} heads"), format!("a number of key/value heads that divides q's {h} heads")));
    }
    for (name, m) in [("k_cache", km), ("v_cache", vm)] {
        check_memory_like_q(name, m, qm)?;
    }
    // Lengths: one per sequence, in q's memory; host ones are checked in full.
    let (la, _, lm) = peek_in(&cache.lens.mem);
    if cache.lens.len() != b {
        return Err(Error::invalid("cache_lens", format!("{} entries", cache.lens.len()), format!("one per sequence: q's batch {b}")));
    }
    check_memory_like_q("cache_lens", lm, qm)?;
    let (kind, max_len, table, table_stride, table_entries) = match &cache.table {
        None => {
            if kb != b {
                return Err(Error::invalid("k_cache", format!("batch {kb}"), format!("q's batch {b} (a contiguous cache has one row per sequence)")));
            }
            (KvCacheKind::Contiguous, ks, None, 0, 0)
        }
        Some(t) => {
            let (ta, _, tm) = peek_in(&t.mem);
            check_memory_like_q("block_table", tm, qm)?;
            if t.pages_per_seq == 0 || t.row_stride < t.pages_per_seq {
                return Err(Error::invalid(
                    "block_table",
                    format!("{} pages per sequence, rows {} apart", t.pages_per_seq, t.row_stride),
                    "at least one page per sequence and rows at least that far apart",
                ));
            }
            let need = (b - 1).checked_mul(t.row_stride).and_then(|x| x.checked_add(t.pages_per_seq));
            let entries = match need {
                Some(n) if n <= t.len() => n,
                _ => {
                    return Err(Error::invalid(
                        "block_table",
                        format!("{} entries", t.len()),
                        format!("(batch - 1) * row_stride + pages_per_seq = {} entries", need.map_or("overflow".into(), |n| n.to_string())),
                    ))
                }
            };
            let max_len = t.pages_per_seq.checked_mul(ks).filter(|&n| n <= MAX_DIM).ok_or_else(|| {
                Error::invalid("block_table", format!("{} pages of {ks} keys", t.pages_per_seq), format!("at most {MAX_DIM} keys per sequence"))
            })?;
            if let (InMem::Host(tab), InMem::Host(lens)) = (&t.mem, &cache.lens.mem) {
                // Only the pages a sequence's keys reach are read: check exactly those.
                for (s, &len) in lens.iter().enumerate() {
                    let used = (len.max(0) as usize).min(max_len).div_ceil(ks);
                    for i in 0..used {
                        let page = tab[s * t.row_stride + i];
                        if page < 0 || page as usize >= kb {
                            return Err(Error::invalid(
                                "block_table",
                                format!("page {page} at sequence {s}, entry {i}"),
                                format!("page ids in 0..{kb} (the pages of k_cache)"),
                            ));
                        }
                    }
                }
            }
            (KvCacheKind::Paged { page_size: ks }, max_len, Some(ta), t.row_stride, entries)
        }
    };
    if let InMem::Host(lens) = &cache.lens.mem {
        if let Some((i, &l)) = lens.iter().enumerate().find(|&(_, &l)| l < 0 || l as usize > max_len) {
            return Err(Error::invalid("cache_lens", format!("entry {i} = {l}"), format!("lengths in 0..={max_len} (the cache's capacity)")));
        }
    }
    let (oa, on, om) = peek_out(&mut out.mem);
    let oo = operand(oa, on, out.layout);
    check_operand("out", &oo, elem, true)?;
    if oo.layout.shape() != qo.layout.shape() {
        return Err(Error::invalid("out", format!("shape {}", shape_str(&oo.layout)), format!("q's shape {}", shape_str(&qo.layout))));
    }
    check_memory_like_q("out", om, qm)?;
    let lse_op = match lse.as_deref_mut() {
        None => None,
        Some(l) => Some(lse_operand(l, (b, q_len, h), "q_len", qm)?),
    };
    check_options(opts)?;
    check_f32_or_i32_pointer("cache_lens", la)?;
    if let Some(t) = table {
        check_f32_or_i32_pointer("block_table", t)?;
    }
    let others = [
        ("q", byte_range(&qo, elem)),
        ("k_cache", byte_range(&ko, elem)),
        ("v_cache", byte_range(&vo, elem)),
        ("cache_lens", four_byte_range(la, b)),
        ("block_table", table.and_then(|t| four_byte_range(t, table_entries))),
    ];
    let lse_range = lse_op.as_ref().and_then(|l| byte_range(l, 4));
    let mut with_lse = others.to_vec();
    with_lse.push(("lse", lse_range));
    check_disjoint(("out", byte_range(&oo, elem)), &with_lse)?;
    check_disjoint(("lse", lse_range), &others)?;

    let memory = call_memory(qm, [km, vm, om]);
    let mut problem = Problem::new(T::DTYPE, b, q_len, max_len, h, hk, d)
        .causal(opts.causal)
        .with_lse(lse_op.is_some())
        .kv_cache(kind);
    problem.window = (opts.window_left, opts.window_right);
    problem.softcap = opts.softcap;
    problem.memory = memory;
    problem.vector_aligned = [&qo, &ko, &vo, &oo].iter().all(|o| vector_aligned(o, elem));
    let raw_stream = crate::tensor::launch_stream(&out.mem);
    let order = order_on_launch_stream(
        [&q.mem, &cache.k.mem, &cache.v.mem],
        [Some(&cache.lens.mem), cache.table.as_ref().map(|t| &t.mem)],
        &mut out.mem,
        lse.map(|l| &mut l.mem),
        raw_stream,
    )?;
    Ok(Call {
        problem,
        scale: opts.scale_for(d),
        mask: crate::options::Mask::of(opts),
        softcap: opts.softcap,
        q: qo,
        k: ko,
        v: vo,
        out: oo,
        lse: lse_op,
        varlen: None,
        allow_tf32: opts.allow_tf32,
        stream: raw_stream,
        kv: Some(KvPart {
            lens: la,
            table,
            table_stride,
            table_entries,
            page_size: ks,
            num_pages: kb,
            max_len,
        }),
        _order: order,
        _borrows: PhantomData,
    })
}
