//! KV-cache calls: a few query rows per sequence against keys and values already in a cache,
//! contiguous or paged, each sequence with its own length (FlashAttention's
//! `flash_attn_with_kvcache`, vLLM's paged attention).

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaStream, DevicePtr, SyncOnDrop};

use crate::cpu_kvcache::{append_rows, HostTarget};
use crate::dtype::Element;
use crate::error::Error;
use crate::gpu::append::{AppendCall, AppendKernels, AppendTarget, PackedRows};
use crate::options::Options;
use crate::problem::{KvCacheKind, MemoryKind, Problem};
use crate::reason::BackendKind;
use crate::tensor::{
    join_before,
    byte_range, call_memory, check_disjoint, check_f32_or_i32_pointer, check_memory_like_q, check_operand, check_options,
    describe, four_byte_range, launch_stream, lse_operand, operand, order_on_launch_stream, peek_in, peek_out, same_memory,
    shape_str, vector_aligned, Addr, Call, InMem, KvPart, LseMut, Operand, OutMem, SeqLens, StreamOrder, Tensor, TensorMut, MAX_DIM,
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
    /// Packed queries: `cu_seqlens_q` and the most rows any sequence has.
    pub(crate) queries: Option<(SeqLens<'a>, usize)>,
}

impl<'a, T: Element> KvCache<'a, T> {
    /// A contiguous cache: k and v `[batch, max_len, kv_heads, head_dim]` (any strides).
    pub fn contiguous(k: Tensor<'a, T>, v: Tensor<'a, T>, lens: CacheLens<'a>) -> Self {
        KvCache { k, v, lens, table: None, queries: None }
    }
    /// A paged cache: k and v pages `[num_pages, page_size, kv_heads, head_dim]` (any strides)
    /// and the block table mapping each sequence's keys to pages.
    pub fn paged(k_pages: Tensor<'a, T>, v_pages: Tensor<'a, T>, table: BlockTable<'a>, lens: CacheLens<'a>) -> Self {
        KvCache { k: k_pages, v: v_pages, lens, table: Some(table), queries: None }
    }

    /// Packed queries of different lengths per sequence (vLLM v1's batches: chunks of prefills
    /// beside single decode tokens, in one call): q and out are `[1, total_q, heads,
    /// head_dim]` and sequence `b`'s query rows are rows `cu_seqlens_q[b]..cu_seqlens_q[b + 1]`
    /// (`batch + 1` int32 prefix sums, in q's memory), at the last positions of its cache:
    /// row `i` of `n` sits at `lens[b] - n + i`. `max_seqlen_q` bounds every sequence's rows
    /// (it sizes the grid; device prefix sums are clamped to it). lse, if asked for, is
    /// `[heads, total_q]`. Host prefix sums are checked as [`SeqLens::check_host`] says.
    ///
    /// ```
    /// use attention::{CacheLens, KvCache, Layout, Options, SeqLens, Tensor, TensorMut};
    /// // Sequence 0 decodes one token over 6 cached keys; sequence 1 prefills a 3-token chunk
    /// // after 2 cached ones (5 keys in all, the chunk's included).
    /// let (cap, h, hk, d) = (8, 4, 2, 16);
    /// let lc = Layout::contiguous(2, cap, hk, d);
    /// let kv: Vec<f32> = (0..lc.numel()).map(|i| (i as f32 * 0.1).sin()).collect();
    /// let lq = Layout::contiguous(1, 4, h, d);
    /// let q: Vec<f32> = (0..lq.numel()).map(|i| (i as f32 * 0.3).cos()).collect();
    /// let mut out = vec![0.0f32; lq.numel()];
    /// let (lens, cu) = ([6, 5], [0, 1, 4]);
    /// let cache = KvCache::contiguous(Tensor::host(&kv, lc), Tensor::host(&kv, lc), CacheLens::host(&lens))
    ///     .with_varlen_queries(SeqLens::host(&cu), 3);
    /// let attn = attention::Selector::from_env().unwrap().select().unwrap();
    /// attn.forward_kvcache(&Tensor::host(&q, lq), &cache, &mut TensorMut::host(&mut out, lq), None,
    ///                      &Options::default().causal(true)).unwrap();
    /// ```
    #[must_use]
    pub fn with_varlen_queries(mut self, cu_seqlens_q: SeqLens<'a>, max_seqlen_q: usize) -> Self {
        self.queries = Some((cu_seqlens_q, max_seqlen_q));
        self
    }
}

/// Device scratch memory for a KV-cache call (FlashInfer's `float_workspace_buffer`): with one,
/// a split-KV decode writes its partial results there instead of allocating per call, so the
/// call allocates nothing and a CUDA graph of it holds no allocation nodes. Size it with
/// [`crate::Attention::kvcache_workspace_bytes`] for the largest call it will serve; a smaller
/// one is still correct (the decode splits each sequence's keys into fewer parts, down to none).
/// It must be on the call's launch stream (out's), which orders its reuse from call to call:
/// one workspace serves one stream at a time. Unused by the CPU backend.
///
/// ```no_run
/// use attention::cudarc::driver::CudaContext;
/// use attention::{DType, Problem, Workspace};
/// let attn = attention::select().unwrap();
/// let stream = CudaContext::new(0).unwrap().default_stream();
/// // The largest decode step this buffer serves: 64 sequences, 1 token, 32k-key caches.
/// let bytes = attn.kvcache_workspace_bytes(&Problem::new(DType::BF16, 64, 1, 32768, 32, 8, 128));
/// let mut buf = stream.alloc_zeros::<u8>(bytes.max(1)).unwrap();
/// let workspace = Workspace::cuda(&mut buf);
/// # let _ = workspace;
/// ```
#[derive(Debug)]
pub struct Workspace<'a> {
    addr: Addr,
    bytes: usize,
    memory: MemoryKind,
    /// The cudarc slice's stream; `None` for raw memory (the caller orders it).
    stream: Option<CUstream>,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> Workspace<'a> {
    /// A workspace in a cudarc device slice (on the stream the calls run on).
    pub fn cuda(slice: &'a mut cudarc::driver::CudaSlice<u8>) -> Self {
        let stream = slice.stream().clone();
        let bytes = slice.len();
        let (ptr, _guard) = cudarc::driver::DevicePtrMut::device_ptr_mut(slice, &stream);
        Workspace {
            addr: Addr::Slice(ptr),
            bytes,
            memory: MemoryKind::Device { ordinal: stream.context().ordinal() },
            stream: Some(stream.cu_stream()),
            _borrow: PhantomData,
        }
    }

    /// A workspace in device memory owned elsewhere (a PyTorch uint8 tensor's `data_ptr()`).
    ///
    /// # Safety
    /// `ptr` must address `bytes` bytes of device memory that nothing else uses while the calls
    /// given this workspace run (the caller orders them, as for [`Tensor::from_raw_device`]).
    pub unsafe fn from_raw_device(ptr: u64, bytes: usize) -> Self {
        Workspace { addr: Addr::Device(ptr), bytes, memory: MemoryKind::Device { ordinal: usize::MAX }, stream: None, _borrow: PhantomData }
    }
}

/// Checks packed-query prefix sums (`cu_seqlens_q`, `max_seqlen_q`) against a packed tensor of
/// `rows` rows, by the rules the attention and the append share: at least one sequence, a
/// maximum in `1..=MAX_DIM`, memory that `memory_like` accepts, host sums in full
/// ([`SeqLens::check_host`]). Returns their address and the number of sequences.
fn check_packed(
    cu: &SeqLens<'_>,
    max_q: usize,
    rows: usize,
    memory_like: impl FnOnce(MemoryKind) -> Result<(), Error>,
) -> Result<(Addr, usize), Error> {
    if cu.len() < 2 {
        return Err(Error::invalid("cu_seqlens_q", format!("{} entries", cu.len()), "batch + 1 >= 2 prefix sums"));
    }
    if max_q == 0 || max_q > MAX_DIM {
        return Err(Error::invalid("max_seqlen_q", max_q.to_string(), format!("1..={MAX_DIM}")));
    }
    let (ca, _, cm) = peek_in(&cu.mem);
    memory_like(cm)?;
    if let InMem::Host(v) = &cu.mem {
        SeqLens::check_host(v, rows, max_q, "cu_seqlens_q")?;
    }
    Ok((ca, cu.len() - 1))
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
    workspace: Option<&'c mut Workspace<'_>>,
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
    let [qb, q_rows, h, d] = qo.layout.shape();
    // Packed queries: q is [1, total_q, heads, d]; the batch is the prefix sums' sequences and
    // the query length the stated maximum.
    let (b, q_len, starts) = match &cache.queries {
        None => (qb, q_rows, None),
        Some((cu, max_q)) => {
            if qb != 1 {
                return Err(Error::invalid("q", format!("batch {qb}"), "1 with packed queries (q is [1, total_q, heads, head_dim])"));
            }
            let (ca, batch) = check_packed(cu, *max_q, q_rows, |m| check_memory_like_q("cu_seqlens_q", m, qm))?;
            (batch, *max_q, Some(ca))
        }
    };
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
        // [batch, heads, q_len], or [heads, total_q] for packed queries.
        Some(l) => Some(match cache.queries {
            None => lse_operand(l, (b, q_len, h), "q_len", qm)?,
            Some(_) => lse_operand(l, (1, q_rows, h), "total_q", qm)?,
        }),
    };
    check_options(opts)?;
    check_f32_or_i32_pointer("cache_lens", la)?;
    if let Some(t) = table {
        check_f32_or_i32_pointer("block_table", t)?;
    }
    if let Some(a) = starts {
        check_f32_or_i32_pointer("cu_seqlens_q", a)?;
    }
    let others = [
        ("q", byte_range(&qo, elem)),
        ("k_cache", byte_range(&ko, elem)),
        ("v_cache", byte_range(&vo, elem)),
        ("cache_lens", four_byte_range(la, b)),
        ("block_table", table.and_then(|t| four_byte_range(t, table_entries))),
        ("cu_seqlens_q", starts.and_then(|a| four_byte_range(a, b + 1))),
    ];
    let lse_range = lse_op.as_ref().and_then(|l| byte_range(l, 4));
    let mut with_lse = others.to_vec();
    with_lse.push(("lse", lse_range));
    check_disjoint(("out", byte_range(&oo, elem)), &with_lse)?;
    check_disjoint(("lse", lse_range), &others)?;
    let raw_stream = crate::tensor::launch_stream(&out.mem);
    let workspace = match workspace {
        None => None,
        Some(w) => {
            check_memory_like_q("workspace", w.memory, qm)?;
            if let Some(s) = w.stream {
                if s != raw_stream {
                    return Err(Error::invalid("workspace", "a slice on another stream than out's", "a slice on out's stream, the call's launch stream (which orders the workspace's reuse)"));
                }
            }
            let p = w.addr.device_or_null();
            if qm != MemoryKind::Host && (p == 0 || p % 16 != 0) {
                return Err(Error::invalid("workspace", format!("device pointer {p:#x}"), "a non-null pointer aligned to 16 bytes"));
            }
            let range = (qm != MemoryKind::Host).then(|| (p, p.saturating_add(w.bytes as u64)));
            let mut all = with_lse.clone();
            all.push(("out", byte_range(&oo, elem)));
            check_disjoint(("workspace", range), &all)?;
            Some((w.addr, w.bytes))
        }
    };

    let memory = call_memory(qm, [km, vm, om]);
    let mut problem = Problem::new(T::DTYPE, b, q_len, max_len, h, hk, d)
        .causal(opts.causal)
        .with_lse(lse_op.is_some())
        .kv_cache(kind);
    problem.window = (opts.window_left, opts.window_right);
    problem.softcap = opts.softcap;
    problem.memory = memory;
    problem.vector_aligned = [&qo, &ko, &vo, &oo].iter().all(|o| vector_aligned(o, elem));
    let order = order_on_launch_stream(
        [&q.mem, &cache.k.mem, &cache.v.mem],
        [Some(&cache.lens.mem), cache.table.as_ref().map(|t| &t.mem), cache.queries.as_ref().map(|(cu, _)| &cu.mem)],
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
            workspace,
            query_starts: starts,
        }),
        _order: order,
        _borrows: PhantomData,
    })
}

/// Where each new token of a paged append goes: int64 `[tokens]`, one entry per row of `k_new`
/// in row-major `(batch, new_len)` order, `slot = page * page_size + row_in_page` (vLLM's
/// `slot_mapping`). A negative slot marks a padding token: nothing is written for it.
///
/// Host slots are checked before anything is written (a slot at or past `num_pages *
/// page_size` is an error naming its entry). Device slots are never read on the host (no
/// synchronisation: a CUDA graph replays with new ones); the kernel skips a slot outside the
/// pages, so a bad one leaves a row unwritten, never writes outside the cache.
///
/// ```
/// use attention::SlotMapping;
/// // Three tokens: page 2 row 5, a padding token, page 0 row 0 (16-row pages).
/// let slots = [2 * 16 + 5, -1, 0i64];
/// let slots = SlotMapping::host(&slots);
/// # let _ = slots;
/// ```
#[derive(Debug)]
pub struct SlotMapping<'a> {
    pub(crate) mem: InMem<'a, i64>,
}

impl<'a> SlotMapping<'a> {
    /// Slots in host memory (for host caches: the CPU path).
    pub fn host(slots: &'a [i64]) -> Self {
        SlotMapping { mem: InMem::Host(slots) }
    }
    /// Slots in a cudarc device slice.
    pub fn cuda<S: DevicePtr<i64>>(slice: &'a S) -> Self {
        SlotMapping { mem: InMem::Cuda(slice) }
    }
    /// Slots in device memory owned elsewhere (a PyTorch int64 tensor's `data_ptr()`).
    ///
    /// # Safety
    /// As [`Tensor::from_raw_device`], for `len` i64 values.
    pub unsafe fn from_raw_device(ptr: u64, len: usize) -> Self {
        SlotMapping { mem: InMem::raw(ptr, len) }
    }
    fn len(&self) -> usize {
        self.mem.len()
    }
}

/// A KV cache to append to: [`Attention::append_kv`](crate::Attention::append_kv) writes new
/// keys and values into it, [`Attention::forward_kvcache_append`](crate::Attention::forward_kvcache_append)
/// writes them and attends over the result in one call.
///
/// - Contiguous, `[batch, max_len, kv_heads, head_dim]` (any strides): row `i` of sequence
///   `b`'s new rows goes to position `lens[b] - new_len + i`. `lens` counts the keys of each
///   sequence with the new rows included, as [`KvCache`] and `forward_kvcache` count them, so
///   one lengths array serves the append and the attention.
/// - Paged, pages `[num_pages, page_size, kv_heads, head_dim]` (any strides: vLLM's K and V
///   views of one `(2, num_blocks, block_size, kv_heads, d)` tensor, FlashInfer's HND pages):
///   token `t` goes to the slot [`SlotMapping`] gives it (vLLM's `reshape_and_cache`). For
///   the fused call add the block table and lengths with [`KvCacheMut::with_block_table`].
///
/// ```
/// use attention::{CacheLens, KvCacheMut, Layout, Tensor, TensorMut};
/// // Two sequences, room for 8 keys each; each gets one new key, its 4th and 2nd.
/// let (b, cap, hk, d) = (2, 8, 2, 16);
/// let lc = Layout::contiguous(b, cap, hk, d);
/// let (mut k_cache, mut v_cache) = (vec![0.0f32; lc.numel()], vec![0.0f32; lc.numel()]);
/// let ln = Layout::contiguous(b, 1, hk, d);
/// let k_new = vec![1.0f32; ln.numel()];
/// let lens = [4, 2]; // the new key included
/// let mut cache = KvCacheMut::contiguous(
///     TensorMut::host(&mut k_cache, lc), TensorMut::host(&mut v_cache, lc), CacheLens::host(&lens));
/// let attn = attention::select().unwrap();
/// attn.append_kv(&Tensor::host(&k_new, ln), &Tensor::host(&k_new, ln), &mut cache).unwrap();
/// drop(cache);
/// assert_eq!(k_cache[lc.offset(0, 3, 1)], 1.0);
/// assert_eq!(k_cache[lc.offset(1, 1, 0)], 1.0);
/// assert_eq!(k_cache[lc.offset(0, 2, 0)], 0.0);
/// ```
#[derive(Debug)]
pub struct KvCacheMut<'a, T: Element> {
    pub(crate) k: TensorMut<'a, T>,
    pub(crate) v: TensorMut<'a, T>,
    /// Contiguous: where each sequence's new rows go. Paged: for the attention only.
    pub(crate) lens: Option<CacheLens<'a>>,
    /// Paged: where each new token goes.
    pub(crate) slots: Option<SlotMapping<'a>>,
    /// Paged: the block table the attention reads the pages through.
    pub(crate) table: Option<BlockTable<'a>>,
    /// Packed rows: `cu_seqlens_q` and the most rows any sequence has.
    pub(crate) queries: Option<(SeqLens<'a>, usize)>,
}

impl<'a, T: Element> KvCacheMut<'a, T> {
    /// A contiguous cache: k and v `[batch, max_len, kv_heads, head_dim]` (any strides) and each
    /// sequence's length, the rows about to be appended included.
    pub fn contiguous(k: TensorMut<'a, T>, v: TensorMut<'a, T>, lens: CacheLens<'a>) -> Self {
        KvCacheMut { k, v, lens: Some(lens), slots: None, table: None, queries: None }
    }

    /// A paged cache: k and v pages `[num_pages, page_size, kv_heads, head_dim]` (any strides)
    /// and the slot of each new token.
    pub fn paged(k_pages: TensorMut<'a, T>, v_pages: TensorMut<'a, T>, slots: SlotMapping<'a>) -> Self {
        KvCacheMut { k: k_pages, v: v_pages, lens: None, slots: Some(slots), table: None, queries: None }
    }

    /// Adds what attention over the pages reads: the block table and each sequence's length,
    /// the new rows included (as [`KvCache::paged`] takes them). Needed by
    /// [`Attention::forward_kvcache_append`](crate::Attention::forward_kvcache_append) on a paged
    /// cache; a contiguous cache given one is an error naming `block_table`.
    ///
    /// ```
    /// use attention::{BlockTable, CacheLens, KvCacheMut, Layout, Options, SlotMapping, Tensor, TensorMut};
    /// // vLLM's layout: 4 pages of 2 keys; one sequence on pages 3 then 1, holding 2 keys
    /// // before this step's new one, which lands in page 1, row 0.
    /// let (pages, page, hk, h, d) = (4, 2, 1, 2, 8);
    /// let lp = Layout::contiguous(pages, page, hk, d);
    /// let mut kv = vec![0.5f32; 2 * lp.numel()];
    /// let (k_pages, v_pages) = kv.split_at_mut(lp.numel());
    /// let (table, lens, slots) = ([3, 1], [3], [1 * 2 + 0i64]);
    /// let mut cache = KvCacheMut::paged(TensorMut::host(k_pages, lp), TensorMut::host(v_pages, lp), SlotMapping::host(&slots))
    ///     .with_block_table(BlockTable::host(&table, 2, 2), CacheLens::host(&lens));
    /// let ln = Layout::contiguous(1, 1, hk, d); // vLLM's [num_tokens, kv_heads, d]
    /// let new = vec![1.0f32; ln.numel()];
    /// let lq = Layout::contiguous(1, 1, h, d);
    /// let (q, mut out) = (vec![0.1f32; lq.numel()], vec![0.0f32; lq.numel()]);
    /// let attn = attention::select().unwrap();
    /// attn.forward_kvcache_append(&Tensor::host(&q, lq), &Tensor::host(&new, ln), &Tensor::host(&new, ln), &mut cache,
    ///     &mut TensorMut::host(&mut out, lq), None, &Options::default()).unwrap();
    /// // Two keys of 0.5 and the new one of 1.0: values average between them.
    /// assert!(out.iter().all(|&x| x > 0.5 && x < 1.0));
    /// ```
    #[must_use]
    pub fn with_block_table(mut self, table: BlockTable<'a>, lens: CacheLens<'a>) -> Self {
        self.table = Some(table);
        self.lens = Some(lens);
        self
    }

    /// Packed rows of different counts per sequence (vLLM v1's batches: prefill chunks beside
    /// single decode tokens), as [`KvCache::with_varlen_queries`] takes them: `k_new`/`v_new`
    /// are `[1, total_q, kv_heads, head_dim]` (or `[total_q, 1, kv_heads, head_dim]`), one new
    /// K/V row per query token, and sequence `b`'s rows are rows
    /// `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` (`batch + 1` int32 prefix sums, in the cache's
    /// memory). In a contiguous cache row `i` of sequence `b`'s `n` goes to position
    /// `lens[b] - n + i` (a sequence with no rows gets nothing); in pages each row goes to its
    /// slot as without packed rows. The fused
    /// [`Attention::forward_kvcache_append`](crate::Attention::forward_kvcache_append) reads q
    /// and out as `[1, total_q, heads, head_dim]` with the same prefix sums (lse
    /// `[heads, total_q]`), so q has exactly one row per new K/V row.
    ///
    /// Host prefix sums are checked before anything is written (as [`SeqLens::check_host`]
    /// says, and for a contiguous cache each sequence's rows at most its length). Device ones
    /// are never read on the host (a CUDA graph replays with new ones): the kernel clamps them
    /// to the rows given and `max_seqlen_q`, so a bad one writes a wrong row inside the cache,
    /// never outside it.
    ///
    /// ```
    /// use attention::{CacheLens, KvCacheMut, Layout, Options, SeqLens, Tensor, TensorMut};
    /// // Three sequences: 0 decodes one token (6 keys with it), 1 is idle this step (no rows),
    /// // 2 prefills a 3-token chunk after 2 cached keys (5 with it).
    /// let (b, cap, h, hk, d) = (3, 8, 4, 2, 16);
    /// let lc = Layout::contiguous(b, cap, hk, d);
    /// let (mut k, mut v) = (vec![0.25f32; lc.numel()], vec![0.25f32; lc.numel()]);
    /// let (lq, ln) = (Layout::contiguous(1, 4, h, d), Layout::contiguous(1, 4, hk, d));
    /// let (q, new) = (vec![0.5f32; lq.numel()], vec![1.0f32; ln.numel()]);
    /// let mut out = vec![0.0f32; lq.numel()];
    /// let (lens, cu) = ([6, 3, 5], [0, 1, 1, 4]);
    /// let mut cache = KvCacheMut::contiguous(TensorMut::host(&mut k, lc), TensorMut::host(&mut v, lc), CacheLens::host(&lens))
    ///     .with_varlen_queries(SeqLens::host(&cu), 3);
    /// let attn = attention::select().unwrap();
    /// attn.forward_kvcache_append(&Tensor::host(&q, lq), &Tensor::host(&new, ln), &Tensor::host(&new, ln), &mut cache,
    ///     &mut TensorMut::host(&mut out, lq), None, &Options::default().causal(true)).unwrap();
    /// drop(cache);
    /// assert_eq!(k[lc.offset(0, 5, 0)], 1.0); // sequence 0's token at position 6 - 1
    /// assert_eq!(k[lc.offset(1, 2, 1)], 0.25); // sequence 1 untouched
    /// assert!((2..5).all(|p| v[lc.offset(2, p, 1)] == 1.0)); // the chunk at 5 - 3 + i
    /// assert!(out.iter().all(|&x| x > 0.25 && x < 1.0));
    /// ```
    #[must_use]
    pub fn with_varlen_queries(mut self, cu_seqlens_q: SeqLens<'a>, max_seqlen_q: usize) -> Self {
        self.queries = Some((cu_seqlens_q, max_seqlen_q));
        self
    }
}

/// The same view of read-only memory, borrowed for `'b`.
fn reborrow<'b, U>(m: &'b InMem<'_, U>) -> InMem<'b, U> {
    match m {
        InMem::Host(s) => InMem::Host(s),
        InMem::Raw(r) => InMem::Raw(*r),
        InMem::Cuda(s) => InMem::Cuda(*s),
    }
}

/// An 8-byte-per-entry range at a device address (`None` for host memory).
fn eight_byte_range(addr: Addr, n: usize) -> Option<(u64, u64)> {
    match addr {
        Addr::Device(x) | Addr::Slice(x) => Some((x, x.saturating_add(n as u64 * 8))),
        Addr::Host(_) => None,
    }
}

/// Checks that an operand of an append lives in the cache's memory.
fn check_memory_like_cache(arg: &'static str, m: MemoryKind, cache: MemoryKind) -> Result<(), Error> {
    if same_memory(cache, m) {
        Ok(())
    } else {
        Err(Error::invalid(arg, describe(m), format!("{} like k_cache", describe(cache))))
    }
}

/// Validates an append: one check per constraint, each naming the argument, the value and what
/// is accepted. Nothing is ordered or written; the call's memory (host or a device) comes back
/// with it.
pub(crate) fn validate_append<T: Element>(
    k_new: &Tensor<'_, T>,
    v_new: &Tensor<'_, T>,
    cache: &mut KvCacheMut<'_, T>,
) -> Result<(AppendCall, MemoryKind), Error> {
    let elem = std::mem::size_of::<T>();
    let (kna, knn, knm) = peek_in(&k_new.mem);
    let (vna, vnn, vnm) = peek_in(&v_new.mem);
    let (kca, kcn, kcm) = peek_out(&mut cache.k.mem);
    let (vca, vcn, vcm) = peek_out(&mut cache.v.mem);
    let (kn, vn) = (operand(kna, knn, k_new.layout), operand(vna, vnn, v_new.layout));
    let (kc, vc) = (operand(kca, kcn, cache.k.layout), operand(vca, vcn, cache.v.layout));
    check_operand("k_new", &kn, elem, false)?;
    check_operand("v_new", &vn, elem, false)?;
    check_operand("k_cache", &kc, elem, true)?;
    check_operand("v_cache", &vc, elem, true)?;
    if vn.layout.shape() != kn.layout.shape() {
        return Err(Error::invalid("v_new", format!("shape {}", shape_str(&vn.layout)), format!("k_new's shape {}", shape_str(&kn.layout))));
    }
    if vc.layout.shape() != kc.layout.shape() {
        return Err(Error::invalid("v_cache", format!("shape {}", shape_str(&vc.layout)), format!("k_cache's shape {}", shape_str(&kc.layout))));
    }
    let [b, new_len, hk, d] = kn.layout.shape();
    let [cb, cs, chk, cd] = kc.layout.shape();
    if d != cd {
        return Err(Error::invalid("k_new", format!("head_dim {d}"), format!("k_cache's head_dim {cd}")));
    }
    if hk != chk {
        return Err(Error::invalid("k_new", format!("{hk} kv heads"), format!("k_cache's {chk} kv heads")));
    }
    for (name, m) in [("k_new", knm), ("v_new", vnm), ("v_cache", vcm)] {
        check_memory_like_cache(name, m, kcm)?;
    }
    // batch * new_len rows: at most k_new's element count, which fits.
    let tokens = b * new_len;
    // Packed rows: the tokens of every sequence in one row of k_new (or one token per batch
    // entry), sequence s's at cu_seqlens_q[s]..cu_seqlens_q[s + 1].
    let packed = match &cache.queries {
        None => None,
        Some((cu, max_q)) => {
            if b != 1 && new_len != 1 {
                return Err(Error::invalid(
                    "k_new",
                    format!("shape {}", shape_str(&kn.layout)),
                    "[1, total_q, kv_heads, head_dim] or [total_q, 1, kv_heads, head_dim] with packed queries (one new row per query token)",
                ));
            }
            let (addr, seqs) = check_packed(cu, *max_q, tokens, |m| check_memory_like_cache("cu_seqlens_q", m, kcm))?;
            check_f32_or_i32_pointer("cu_seqlens_q", addr)?;
            let host = match &cu.mem {
                InMem::Host(v) => Some(*v),
                _ => None,
            };
            Some((PackedRows { cu_seqlens: addr, seqs, max_q: *max_q }, host))
        }
    };
    let (target, index_range) = match &cache.slots {
        None => {
            if cache.table.is_some() {
                return Err(Error::invalid(
                    "block_table",
                    "a block table on a contiguous cache",
                    "none: KvCacheMut::with_block_table is for paged caches (KvCacheMut::paged)",
                ));
            }
            let lens = cache.lens.as_ref().ok_or_else(|| Error::invalid("cache_lens", "none", "one length per sequence"))?;
            let seqs = match &packed {
                None if b != cb => {
                    return Err(Error::invalid("k_new", format!("batch {b}"), format!("k_cache's batch {cb} (a contiguous cache has one row per sequence)")));
                }
                None if new_len > cs => {
                    return Err(Error::invalid("k_new", format!("{new_len} new rows per sequence"), format!("at most k_cache's max_len {cs}")));
                }
                None => b,
                Some((p, _)) if p.seqs != cb => {
                    return Err(Error::invalid(
                        "cu_seqlens_q",
                        format!("{} sequences", p.seqs),
                        format!("k_cache's batch {cb} (a contiguous cache has one row per sequence)"),
                    ));
                }
                Some((p, _)) => p.seqs,
            };
            let (la, _, lm) = peek_in(&lens.mem);
            if lens.len() != seqs {
                return Err(Error::invalid("cache_lens", format!("{} entries", lens.len()), format!("one per sequence: {seqs}")));
            }
            check_memory_like_cache("cache_lens", lm, kcm)?;
            match &lens.mem {
                InMem::Host(l) => {
                    // Host lengths come with host prefix sums (both in the cache's memory).
                    let rows = |s: usize| match &packed {
                        Some((_, Some(cu))) => (cu[s + 1] - cu[s]) as usize,
                        _ => new_len,
                    };
                    if let Some((i, &l)) = l.iter().enumerate().find(|&(i, &l)| l < 0 || (l as usize) < rows(i) || l as usize > cs) {
                        let n = rows(i);
                        return Err(Error::invalid(
                            "cache_lens",
                            format!("entry {i} = {l}"),
                            format!("lengths in {n}..={cs}: sequence {i}'s keys with its {n} new rows included, within the cache's capacity"),
                        ));
                    }
                }
                _ => check_f32_or_i32_pointer("cache_lens", la)?,
            }
            (AppendTarget::Lens { lens: la, max_len: cs, packed: packed.map(|(p, _)| p) }, ("cache_lens", four_byte_range(la, seqs)))
        }
        Some(slots) => {
            let (sa, _, sm) = peek_in(&slots.mem);
            if slots.len() != tokens {
                return Err(Error::invalid(
                    "slot_mapping",
                    format!("{} entries", slots.len()),
                    format!("one per new token: k_new's batch x seqlen = {b} x {new_len} = {tokens}"),
                ));
            }
            check_memory_like_cache("slot_mapping", sm, kcm)?;
            // num_pages * page_size is at most the pages' element count, which fits.
            let num_slots = cb * cs;
            match &slots.mem {
                InMem::Host(s) => {
                    if let Some((i, &s)) = s.iter().enumerate().find(|&(_, &s)| s >= 0 && s as u64 >= num_slots as u64) {
                        return Err(Error::invalid(
                            "slot_mapping",
                            format!("entry {i} = {s}"),
                            format!("slots in 0..{num_slots} (num_pages {cb} x page_size {cs}), or negative for a padding token"),
                        ));
                    }
                }
                _ => {
                    if let Addr::Device(p) | Addr::Slice(p) = sa {
                        if p == 0 || p % 8 != 0 {
                            return Err(Error::invalid("slot_mapping", format!("device pointer {p:#x}"), "a non-null pointer aligned to 8 bytes"));
                        }
                    }
                }
            }
            (AppendTarget::Slots { slots: sa, page_size: cs, num_pages: cb }, ("slot_mapping", eight_byte_range(sa, tokens)))
        }
    };
    // What the kernel writes must share no byte with anything it reads or with each other.
    let cu_range = packed.and_then(|(p, _)| four_byte_range(p.cu_seqlens, p.seqs + 1));
    let reads = [("k_new", byte_range(&kn, elem)), ("v_new", byte_range(&vn, elem)), index_range, ("cu_seqlens_q", cu_range)];
    let vc_range = byte_range(&vc, elem);
    check_disjoint(("k_cache", byte_range(&kc, elem)), &[reads[0], reads[1], reads[2], reads[3], ("v_cache", vc_range)])?;
    check_disjoint(("v_cache", vc_range), &reads)?;
    let memory = call_memory(kcm, [vcm, knm, vnm]);
    Ok((AppendCall { dtype: T::DTYPE, k_new: kn, v_new: vn, k_cache: kc, v_cache: vc, target, tokens }, memory))
}

/// Runs a validated append on host memory.
fn append_host<T: Element>(k_new: &Tensor<'_, T>, v_new: &Tensor<'_, T>, cache: &mut KvCacheMut<'_, T>, call: &AppendCall) -> Result<(), Error> {
    let host = |arg: &'static str| Error::invalid(arg, "device memory", "host memory like k_cache");
    let target = match call.target {
        AppendTarget::Lens { max_len, packed, .. } => {
            let cu = match (packed, cache.queries.as_ref().map(|(cu, _)| &cu.mem)) {
                (None, _) => None,
                (Some(_), Some(InMem::Host(cu))) => Some(*cu),
                (Some(_), _) => return Err(host("cu_seqlens_q")),
            };
            match cache.lens.as_ref().map(|l| &l.mem) {
                Some(InMem::Host(lens)) => HostTarget::Lens { lens, max_len, cu },
                _ => return Err(host("cache_lens")),
            }
        }
        AppendTarget::Slots { page_size, num_pages, .. } => match cache.slots.as_ref().map(|s| &s.mem) {
            Some(InMem::Host(slots)) => HostTarget::Slots { slots, page_size, num_slots: num_pages * page_size },
            _ => return Err(host("slot_mapping")),
        },
    };
    for (src, src_op, dst, dst_op) in [(k_new, &call.k_new, &mut cache.k, &call.k_cache), (v_new, &call.v_new, &mut cache.v, &call.v_cache)] {
        match (&src.mem, &mut dst.mem) {
            (InMem::Host(s), OutMem::Host(d)) => append_rows(s, src_op.layout, d, dst_op.layout, &target),
            _ => return Err(host("k_new")),
        }
    }
    Ok(())
}

/// Builds a [`StreamOrder`] one cudarc operand at a time, under the rules of the attention
/// calls: with a cudarc launch stream every operand is ordered on it (it waits for the pending
/// writes of what is read, and the pending reads and writes of what is written; the accesses
/// are recorded there when the order drops); with a raw one each operand's own stream is
/// joined both ways.
struct Orderer<'c> {
    order: StreamOrder<'c>,
    launch: Option<&'c CudaStream>,
}

impl<'c> Orderer<'c> {
    fn new(launch: Option<&'c CudaStream>, raw_launch: CUstream) -> Self {
        let mut order = StreamOrder::none();
        order.launch = raw_launch;
        Orderer { order, launch }
    }

    fn add(&mut self, own: &'c CudaStream, guard: SyncOnDrop<'c>) -> Result<(), Error> {
        self.order.guards.push(guard);
        if self.launch.is_none() && own.cu_stream() != self.order.launch {
            join_before(own, self.order.launch)?;
            self.order.joins.push(own);
        }
        Ok(())
    }

    fn read<U>(&mut self, m: &'c InMem<'_, U>) -> Result<(), Error> {
        if let InMem::Cuda(slice) = m {
            let own: &'c CudaStream = slice.stream();
            let guard = slice.device_ptr(self.launch.unwrap_or(own)).1;
            self.add(own, guard)?;
        }
        Ok(())
    }

    fn write<U>(&mut self, m: &'c mut OutMem<'_, U>) -> Result<(), Error> {
        if let OutMem::Cuda { slice, stream } = m {
            let own: &'c CudaStream = stream;
            let guard = slice.device_ptr_mut(self.launch.unwrap_or(own)).1;
            self.add(own, guard)?;
        }
        Ok(())
    }
}

/// Orders a valid append's cudarc operands on the stream its kernel runs on, for as long as the
/// returned order lives.
#[allow(clippy::too_many_arguments)]
fn order_append<'c, T: Element>(
    k_new: &'c InMem<'_, T>,
    v_new: &'c InMem<'_, T>,
    lens: Option<&'c InMem<'_, i32>>,
    cu_seqlens: Option<&'c InMem<'_, i32>>,
    slots: Option<&'c InMem<'_, i64>>,
    k_cache: &'c mut OutMem<'_, T>,
    v_cache: &'c mut OutMem<'_, T>,
    launch: Option<&'c CudaStream>,
    raw_launch: CUstream,
) -> Result<StreamOrder<'c>, Error> {
    let mut o = Orderer::new(launch, raw_launch);
    o.read(k_new)?;
    o.read(v_new)?;
    for l in [lens, cu_seqlens].into_iter().flatten() {
        o.read(l)?;
    }
    if let Some(s) = slots {
        o.read(s)?;
    }
    o.write(k_cache)?;
    o.write(v_cache)?;
    Ok(o.order)
}

/// The cudarc stream a view is written on, if it is a cudarc slice.
fn cudarc_stream<U>(m: &OutMem<'_, U>) -> Option<Arc<CudaStream>> {
    match m {
        OutMem::Cuda { stream, .. } => Some(stream.clone()),
        _ => None,
    }
}

/// [`crate::Attention::append_kv`]: validates, then copies on the host or launches the kernel
/// on k_cache's stream.
pub(crate) fn append<T: Element>(
    kernels: &AppendKernels,
    k_new: &Tensor<'_, T>,
    v_new: &Tensor<'_, T>,
    cache: &mut KvCacheMut<'_, T>,
) -> Result<(), Error> {
    let (call, memory) = validate_append(k_new, v_new, cache)?;
    if memory == MemoryKind::Host {
        return append_host(k_new, v_new, cache, &call);
    }
    let (dev, module) = kernels.loaded(&call)?;
    let launch = cudarc_stream(&cache.k.mem);
    let stream = launch_stream(&cache.k.mem);
    let order = order_append(
        &k_new.mem,
        &v_new.mem,
        cache.lens.as_ref().filter(|_| cache.slots.is_none()).map(|l| &l.mem),
        cache.queries.as_ref().filter(|_| cache.slots.is_none()).map(|(cu, _)| &cu.mem),
        cache.slots.as_ref().map(|s| &s.mem),
        &mut cache.k.mem,
        &mut cache.v.mem,
        launch.as_deref(),
        stream,
    )?;
    let ran = AppendKernels::launch(dev, &module, &call, memory, stream);
    drop(order);
    ran
}

/// The cache as attention reads it: device memory as raw views at the validated addresses
/// (ordered by the append's order, which outlives the attention's launch), host memory
/// reborrowed.
fn attention_view<'b, T: Element>(
    k: InMem<'b, T>,
    v: InMem<'b, T>,
    call: &AppendCall,
    lens: &'b Option<CacheLens<'_>>,
    table: &'b Option<BlockTable<'_>>,
    queries: &'b Option<(SeqLens<'_>, usize)>,
) -> Result<KvCache<'b, T>, Error> {
    let table = match call.target {
        AppendTarget::Lens { .. } => None,
        AppendTarget::Slots { .. } => Some(table.as_ref().ok_or_else(|| {
            Error::invalid("block_table", "none", "the pages' block table and lengths for the attention (KvCacheMut::with_block_table)")
        })?),
    };
    let lens = lens.as_ref().ok_or_else(|| Error::invalid("cache_lens", "none", "one length per sequence"))?;
    let lens = CacheLens { mem: reborrow(&lens.mem) };
    let (k, v) = (Tensor { mem: k, layout: call.k_cache.layout }, Tensor { mem: v, layout: call.v_cache.layout });
    let cache = match table {
        None => KvCache::contiguous(k, v, lens),
        Some(t) => KvCache::paged(k, v, BlockTable { mem: reborrow(&t.mem), pages_per_seq: t.pages_per_seq, row_stride: t.row_stride }, lens),
    };
    Ok(match queries {
        None => cache,
        Some((cu, max_q)) => cache.with_varlen_queries(SeqLens { mem: reborrow(&cu.mem) }, *max_q),
    })
}

/// A device operand as a raw read-only view (unordered: the caller orders it).
fn raw_view<'b, T>(o: &Operand) -> InMem<'b, T> {
    InMem::raw(o.addr.device_or_null(), o.len)
}

/// A written view read back: host memory reborrowed, device memory as [`raw_view`].
fn read_view<'b, T>(m: &'b OutMem<'_, T>, o: &Operand) -> InMem<'b, T> {
    match m {
        OutMem::Host(s) => InMem::Host(s),
        _ => raw_view(o),
    }
}

/// What the fused append-and-attend needs of the handle that runs it, so that this module does
/// not depend on the selector above it (the handle implements it).
pub(crate) trait Dispatcher {
    /// The backend a validated call would run on, or the error it would get, without running it.
    fn backend_for(&self, call: &Call<'_>) -> Result<BackendKind, Error>;
    /// Runs a validated call on the best backend that takes it.
    fn dispatch_call(&self, call: Call<'_>) -> Result<BackendKind, Error>;
}

/// [`crate::Attention::forward_kvcache_append`]: every check of both parts (and the choice of
/// the attention's backend) before anything is written, then the append and the attention on
/// the output's stream.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_append<T: Element>(
    attn: &impl Dispatcher,
    kernels: &AppendKernels,
    q: &Tensor<'_, T>,
    k_new: &Tensor<'_, T>,
    v_new: &Tensor<'_, T>,
    cache: &mut KvCacheMut<'_, T>,
    out: &mut TensorMut<'_, T>,
    mut lse: Option<&mut LseMut<'_>>,
    opts: &Options,
) -> Result<BackendKind, Error> {
    let (call, memory) = validate_append(k_new, v_new, cache)?;
    let host = memory == MemoryKind::Host;
    {
        let (k, v) = (read_view(&cache.k.mem, &call.k_cache), read_view(&cache.v.mem, &call.v_cache));
        let view = attention_view(k, v, &call, &cache.lens, &cache.table, &cache.queries)?;
        let checked = validate_kvcache(q, &view, out, lse.as_deref_mut(), opts, None)?;
        // One prefix-sum array splits both q and the new rows into sequences: host ones were
        // checked against each, device ones cannot be, so the counts must match here.
        if cache.queries.is_some() && q.layout.seqlen() != call.tokens {
            return Err(Error::invalid(
                "q",
                format!("{} packed rows", q.layout.seqlen()),
                format!("k_new's {} tokens: one new K/V row per query row with packed queries", call.tokens),
            ));
        }
        // The append writes the cache before q is read: they must not share a byte.
        let elem = std::mem::size_of::<T>();
        let q_range = [("q", byte_range(&checked.q, elem))];
        check_disjoint(("k_cache", byte_range(&call.k_cache, elem)), &q_range)?;
        check_disjoint(("v_cache", byte_range(&call.v_cache, elem)), &q_range)?;
        attn.backend_for(&checked)?;
    }
    if host {
        append_host(k_new, v_new, cache, &call)?;
        let (k, v) = (read_view(&cache.k.mem, &call.k_cache), read_view(&cache.v.mem, &call.v_cache));
        let view = attention_view(k, v, &call, &cache.lens, &cache.table, &cache.queries)?;
        let checked = validate_kvcache(q, &view, out, lse, opts, None)?;
        return attn.dispatch_call(checked);
    }
    let (dev, module) = kernels.loaded(&call)?;
    // Both launches on the output's stream, as every attention call's.
    let launch = cudarc_stream(&out.mem);
    let stream = launch_stream(&out.mem);
    let paged = cache.slots.is_some();
    let order = order_append(
        &k_new.mem,
        &v_new.mem,
        cache.lens.as_ref().filter(|_| !paged).map(|l| &l.mem),
        cache.queries.as_ref().filter(|_| !paged).map(|(cu, _)| &cu.mem),
        cache.slots.as_ref().map(|s| &s.mem),
        &mut cache.k.mem,
        &mut cache.v.mem,
        launch.as_deref(),
        stream,
    )?;
    AppendKernels::launch(dev, &module, &call, memory, stream)?;
    let view = attention_view(raw_view(&call.k_cache), raw_view(&call.v_cache), &call, &cache.lens, &cache.table, &cache.queries)?;
    let checked = validate_kvcache(q, &view, out, lse, opts, None)?;
    let ran = attn.dispatch_call(checked);
    // Recorded after both launches: a later writer of the cache waits for the attention's reads.
    drop(order);
    ran
}
