//! Attention over [candle](https://docs.rs/candle-core) tensors (feature `candle`; add
//! `candle-cuda` for candle's CUDA device).
//!
//! One call from model code, like `candle_flash_attn::flash_attn`, but selected per problem,
//! explained, and with every [`Options`]:
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{DType, Device, Tensor};
//! use attention::Options;
//!
//! // [batch, seqlen, heads, head_dim]; a `[b, h, s, d]` tensor's `.transpose(1, 2)?` view works too.
//! let q = Tensor::randn(0f32, 1.0, (1, 5, 4, 16), &Device::Cpu)?;
//! let k = Tensor::randn(0f32, 1.0, (1, 7, 2, 16), &Device::Cpu)?; // GQA: 2 KV heads
//! let v = Tensor::randn(0f32, 1.0, (1, 7, 2, 16), &Device::Cpu)?;
//! let out = attention::candle::attention(&q, &k, &v, &Options::default().causal(true))?;
//! assert_eq!(out.dims(), q.dims());
//! # assert_eq!(out.dtype(), DType::F32);
//! # Ok(())
//! # }
//! ```
//!
//! * Tensors are `[batch, seqlen, heads, head_dim]` with any strides and start offset, as long
//!   as `head_dim` is contiguous: candle's layout is mapped to [`Layout`] and the storage is
//!   read in place, never copied. A layout that cannot be mapped (wrong rank, strided
//!   `head_dim`) is [`Error::Tensor`], with a [`TensorError`] that says which and why.
//! * Errors are this module's [`Error`] (typed: the tensor, the attention call, or candle);
//!   it converts into `candle_core::Error`, so `?` works in model code returning
//!   `candle_core::Result`.
//! * Element types `f16`, `bf16`, `f32`, the same for q, k and v.
//! * On candle's CPU device the crate's CPU backend runs; on its CUDA device (feature
//!   `candle-cuda`) the GPU backends run on the device's stream, and the output is allocated
//!   there. The output is a new contiguous `[batch, seqlen_q, heads, head_dim]` tensor.
//! * [`attention`] uses a process-wide handle per device ([`crate::select`], configured by the
//!   `ATTN_*` variables); [`attention_with`] takes your own [`Attention`] (built with a
//!   [`crate::Selector`]), and [`explain`] says which backend a call would use and why.
//! * No backward pass (inference only).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout as CandleLayout, Shape};

use crate::{
    Attention, BlockTable, CacheLens, Element, Explanation, KvCache, Layout, Options, Problem, SeqLens, Tensor, TensorMut, VarLen,
};

/// Why a candle tensor cannot be used as it is ([`Error::Tensor`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The tensor does not have the rank the call needs.
    #[error("{arg}: expected a rank-{expected} tensor {form}, got shape {dims:?}")]
    Rank {
        /// `q`, `k`, `v`, `cu_seqlens_q`, ...
        arg: &'static str,
        /// The rank accepted.
        expected: &'static str,
        /// The logical dimensions accepted.
        form: &'static str,
        /// The tensor's dimensions.
        dims: Vec<usize>,
    },
    /// `head_dim` is not contiguous in memory (stride ≠ 1): call `.contiguous()` first.
    #[error("{arg}: head_dim (last dimension, size {head_dim}) has stride {stride}; it must be 1 (call .contiguous() on the tensor)")]
    HeadDimStride {
        /// Which tensor.
        arg: &'static str,
        /// Its head_dim.
        head_dim: usize,
        /// Its stride.
        stride: usize,
    },
    /// An element type the kernels do not take, or q, k and v of different types.
    #[error("dtypes q={q:?}, k={k:?}, v={v:?}: expected all f16, all bf16 or all f32")]
    DType {
        /// q's dtype.
        q: candle_core::DType,
        /// k's dtype.
        k: candle_core::DType,
        /// v's dtype.
        v: candle_core::DType,
    },
    /// Prefix sums of another type than u32 or i32, or out of the i32 range.
    #[error("{arg}: cumulative sequence lengths must be u32 or i32 values below 2^31, got {detail}")]
    SeqLens {
        /// `cu_seqlens_q` or `cu_seqlens_k`.
        arg: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// q, k, v (and the prefix sums) are on different devices.
    #[error("q, k, v and the sequence lengths must be on one device: {0}")]
    Device(String),
    /// Selecting the process-wide handle failed (an invalid `ATTN_*` variable, say).
    #[error("attention::select() failed: {0}")]
    Select(String),
}

/// What the functions of this module return on failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor that cannot be used as it is (rank, strides, dtype, device).
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// The attention call refused the problem or failed (the crate's error, with the argument
    /// and value named).
    #[error(transparent)]
    Attention(#[from] crate::Error),
    /// A candle operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            e => candle_core::Error::wrap(e),
        }
    }
}

/// A `Result` with this module's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Maps candle's layout of a `[batch, seqlen, heads, head_dim]` tensor (or, with `packed`, a
/// `[total, heads, head_dim]` one, seen as batch 1) to the start offset and our [`Layout`].
pub fn map_layout(arg: &'static str, l: &CandleLayout, packed: bool) -> std::result::Result<(usize, Layout), TensorError> {
    let (dims, strides) = (l.dims(), l.stride());
    let (shape, st) = match (packed, dims.len()) {
        (false, 4) => ([dims[0], dims[1], dims[2], dims[3]], [strides[0], strides[1], strides[2], strides[3]]),
        (true, 3) => ([1, dims[0], dims[1], dims[2]], [dims[0] * strides[0], strides[0], strides[1], strides[2]]),
        (true, 4) if dims[0] == 1 => ([1, dims[1], dims[2], dims[3]], [strides[0], strides[1], strides[2], strides[3]]),
        _ => {
            return Err(TensorError::Rank {
                arg,
                expected: if packed { "3" } else { "4" },
                form: if packed { "[total, heads, head_dim] (or [1, total, heads, head_dim])" } else { "[batch, seqlen, heads, head_dim]" },
                dims: dims.to_vec(),
            })
        }
    };
    if st[3] != 1 && shape[3] > 1 {
        return Err(TensorError::HeadDimStride { arg, head_dim: shape[3], stride: st[3] });
    }
    Ok((l.start_offset(), Layout::strided(shape, [st[0], st[1], st[2]])))
}

/// The process-wide handle for `ordinal` (`None`: host tensors).
fn handle(ordinal: Option<usize>) -> std::result::Result<Attention, TensorError> {
    static HANDLES: OnceLock<Mutex<HashMap<Option<usize>, Attention>>> = OnceLock::new();
    let mut map = HANDLES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = map.get(&ordinal) {
        return Ok(h.clone());
    }
    let selector = crate::Selector::from_env().map_err(|e| TensorError::Select(e.to_string()))?;
    let selector = match ordinal {
        Some(o) => selector.device(o),
        None => selector,
    };
    let h = selector.select().map_err(|e| TensorError::Select(e.to_string()))?;
    map.insert(ordinal, h.clone());
    Ok(h)
}

fn device_ordinal(t: &candle_core::Tensor) -> Option<usize> {
    match t.device().location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Some(gpu_id),
        _ => None,
    }
}

/// Attention over `[batch, seqlen, heads, head_dim]` tensors with the process-wide handle:
/// returns `[batch, seqlen_q, heads, head_dim]` on q's device. See the [module docs](self).
pub fn attention(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    opts: &Options,
) -> Result<candle_core::Tensor> {
    let h = handle(device_ordinal(q))?;
    attention_with(&h, q, k, v, opts)
}

/// As [`attention`], with your own handle.
pub fn attention_with(
    attn: &Attention,
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    opts: &Options,
) -> Result<candle_core::Tensor> {
    check_same_device(&[q, k, v])?;
    Op::new(attn, opts, None).apply(q, k, v)
}

/// Attention over a packed variable-length batch (FlashAttention's `flash_attn_varlen`): q is
/// `[total_q, heads, head_dim]`, k/v `[total_k, kv_heads, head_dim]` (or the same with a
/// leading 1), `cu_seqlens_q`/`cu_seqlens_k` the `batch + 1` prefix sums (u32 or i32, on the
/// tensors' device). Returns `[total_q, heads, head_dim]`, rows outside every sequence zero.
#[allow(clippy::too_many_arguments)]
pub fn attention_varlen(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    cu_seqlens_q: &candle_core::Tensor,
    cu_seqlens_k: &candle_core::Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    opts: &Options,
) -> Result<candle_core::Tensor> {
    let h = handle(device_ordinal(q))?;
    attention_varlen_with(&h, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts)
}

/// As [`attention_varlen`], with your own handle.
#[allow(clippy::too_many_arguments)]
pub fn attention_varlen_with(
    attn: &Attention,
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    cu_seqlens_q: &candle_core::Tensor,
    cu_seqlens_k: &candle_core::Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    opts: &Options,
) -> Result<candle_core::Tensor> {
    check_same_device(&[q, k, v, cu_seqlens_q, cu_seqlens_k])?;
    for (arg, t) in [("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)] {
        if t.rank() != 1 {
            return Err(TensorError::Rank { arg, expected: "1", form: "[batch + 1]", dims: t.dims().to_vec() }.into());
        }
        if !matches!(t.dtype(), candle_core::DType::U32 | candle_core::DType::I32) {
            return Err(TensorError::SeqLens { arg, detail: format!("dtype {:?}", t.dtype()) }.into());
        }
    }
    let varlen = VarLenArgs {
        cu_q: cu_seqlens_q.contiguous()?,
        cu_k: cu_seqlens_k.contiguous()?,
        max_q: max_seqlen_q,
        max_k: max_seqlen_k,
    };
    Op::new(attn, opts, Some(varlen)).apply(q, k, v)
}

/// Attention of `q` over a KV cache (FlashAttention's `flash_attn_with_kvcache`, vLLM's paged
/// attention; see [`crate::KvCache`]): q `[batch, q_len, heads, head_dim]`; `k_cache`/`v_cache`
/// contiguous `[batch, max_len, kv_heads, head_dim]` (no `block_table`) or pages `[num_pages,
/// page_size, kv_heads, head_dim]` with `block_table` `[batch, pages_per_seq]`; `cache_lens`
/// `[batch]`, each sequence's keys including this call's rows (query row `i` of sequence `b`
/// sits at position `cache_lens[b] - q_len + i`). Lengths and tables are u32 or i32, on the
/// tensors' device, read only by the kernels there. Returns `[batch, q_len, heads, head_dim]`.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// let (q, cache) = (Tensor::randn(0f32, 1.0, (2, 1, 4, 16), &Device::Cpu)?, Tensor::randn(0f32, 1.0, (2, 8, 2, 16), &Device::Cpu)?);
/// let lens = Tensor::new(&[5u32, 8], &Device::Cpu)?; // keys held by each sequence
/// let out = attention::candle::attention_kvcache(&q, &cache, &cache, &lens, None, &attention::Options::default())?;
/// assert_eq!(out.dims(), q.dims());
/// # Ok(())
/// # }
/// ```
pub fn attention_kvcache(
    q: &candle_core::Tensor,
    k_cache: &candle_core::Tensor,
    v_cache: &candle_core::Tensor,
    cache_lens: &candle_core::Tensor,
    block_table: Option<&candle_core::Tensor>,
    opts: &Options,
) -> Result<candle_core::Tensor> {
    let h = handle(device_ordinal(q))?;
    attention_kvcache_with(&h, q, k_cache, v_cache, cache_lens, block_table, opts)
}

/// As [`attention_kvcache`], with your own handle.
pub fn attention_kvcache_with(
    attn: &Attention,
    q: &candle_core::Tensor,
    k_cache: &candle_core::Tensor,
    v_cache: &candle_core::Tensor,
    cache_lens: &candle_core::Tensor,
    block_table: Option<&candle_core::Tensor>,
    opts: &Options,
) -> Result<candle_core::Tensor> {
    let mut all = vec![q, k_cache, v_cache, cache_lens];
    all.extend(block_table);
    check_same_device(&all)?;
    for (arg, t, rank, form) in
        [("cache_lens", Some(cache_lens), 1, "[batch]"), ("block_table", block_table, 2, "[batch, pages_per_seq]")]
    {
        let Some(t) = t else { continue };
        if t.rank() != rank {
            return Err(TensorError::Rank { arg, expected: if rank == 1 { "1" } else { "2" }, form, dims: t.dims().to_vec() }.into());
        }
        if !matches!(t.dtype(), candle_core::DType::U32 | candle_core::DType::I32) {
            return Err(TensorError::SeqLens { arg, detail: format!("dtype {:?}", t.dtype()) }.into());
        }
    }
    let kv = KvArgs { lens: cache_lens.contiguous()?, table: block_table.map(|t| t.contiguous()).transpose()? };
    Op::new(attn, opts, None).with_kv(kv).apply(q, k_cache, v_cache)
}

/// Which backend [`attention_with`] would run these tensors on, and why each higher-ranked
/// one would not (without running anything).
pub fn explain(
    attn: &Attention,
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    opts: &Options,
) -> Result<Explanation> {
    let dtype = dtype_of(q.dtype(), k.dtype(), v.dtype())?;
    let (_, lq) = map_layout("q", q.layout(), false)?;
    let (_, lk) = map_layout("k", k.layout(), false)?;
    let mut p = Problem::new(dtype, lq.batch(), lq.seqlen(), lk.seqlen(), lq.heads(), lk.heads(), lq.head_dim())
        .causal(opts.is_causal());
    p.window = (opts.window_left, opts.window_right);
    p.softcap = opts.softcap;
    p = match device_ordinal(q) {
        Some(o) => p.on_device(o),
        None => p.on_host(),
    };
    Ok(attn.explain(&p))
}

fn dtype_of(q: candle_core::DType, k: candle_core::DType, v: candle_core::DType) -> std::result::Result<crate::DType, TensorError> {
    use candle_core::DType as C;
    match (q, k, v) {
        (C::F16, C::F16, C::F16) => Ok(crate::DType::F16),
        (C::BF16, C::BF16, C::BF16) => Ok(crate::DType::BF16),
        (C::F32, C::F32, C::F32) => Ok(crate::DType::F32),
        _ => Err(TensorError::DType { q, k, v }),
    }
}

fn check_same_device(ts: &[&candle_core::Tensor]) -> Result<()> {
    let first = ts[0].device();
    for t in &ts[1..] {
        if !first.same_device(t.device()) {
            return Err(TensorError::Device(format!("{:?} and {:?}", first.location(), t.device().location())).into());
        }
    }
    Ok(())
}

struct VarLenArgs {
    cu_q: candle_core::Tensor,
    cu_k: candle_core::Tensor,
    max_q: usize,
    max_k: usize,
}

/// The lengths and block table of [`attention_kvcache`] (contiguous, u32 or i32).
struct KvArgs {
    lens: candle_core::Tensor,
    table: Option<candle_core::Tensor>,
}

impl KvArgs {
    /// `(pages_per_seq, entries)` of the block table.
    fn table_shape(&self) -> Option<(usize, usize)> {
        self.table.as_ref().map(|t| (t.dims().get(1).copied().unwrap_or(0), t.elem_count()))
    }
}

/// The custom op: q, k, v (or the K/V cache) in, the output out.
struct Op {
    attn: Attention,
    opts: Options,
    varlen: Option<VarLenArgs>,
    kv: Option<KvArgs>,
    /// The typed error of a failed forward, which candle's error type cannot carry.
    failure: Mutex<Option<Error>>,
}

impl Op {
    fn new(attn: &Attention, opts: &Options, varlen: Option<VarLenArgs>) -> Self {
        Op { attn: attn.clone(), opts: opts.clone(), varlen, kv: None, failure: Mutex::new(None) }
    }

    fn with_kv(mut self, kv: KvArgs) -> Self {
        self.kv = Some(kv);
        self
    }

    /// Runs the op; a failure comes back typed.
    fn apply(self, q: &candle_core::Tensor, k: &candle_core::Tensor, v: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        // Reject what cannot be mapped before candle dispatches (typed, and names the tensor).
        let packed = self.varlen.is_some();
        dtype_of(q.dtype(), k.dtype(), v.dtype())?;
        for (arg, t) in [("q", q), ("k", k), ("v", v)] {
            map_layout(arg, t.layout(), packed)?;
        }
        q.apply_op3_no_bwd(k, v, &self).map_err(|e| {
            self.failure.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or(Error::Candle(e))
        })
    }

    /// Keeps `e` for [`Op::apply`] and gives candle its text.
    fn fail(&self, e: impl Into<Error>) -> candle_core::Error {
        let e = e.into();
        let text = e.to_string();
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        candle_core::Error::Msg(text)
    }
}

/// Host prefix sums as i32, checked to fit.
fn host_seqlens(arg: &'static str, t: &candle_core::Tensor) -> Result<Vec<i32>> {
    match t.dtype() {
        candle_core::DType::I32 => Ok(t.to_vec1::<i32>()?),
        _ => t
            .to_vec1::<u32>()?
            .into_iter()
            .map(|x| i32::try_from(x).map_err(|_| TensorError::SeqLens { arg, detail: format!("value {x}") }.into()))
            .collect(),
    }
}

impl Op {
    /// Output layout (contiguous, q's shape) and candle shape.
    fn out_shape(&self, lq: &Layout, q: &CandleLayout) -> (Layout, Shape) {
        (Layout::contiguous(lq.batch(), lq.seqlen(), lq.heads(), lq.head_dim()), q.shape().clone())
    }

    fn cpu<T: Element>(
        &self,
        (q, lq): (&[T], &CandleLayout),
        (k, lk): (&[T], &CandleLayout),
        (v, lv): (&[T], &CandleLayout),
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let packed = self.varlen.is_some();
        let (oq, mq) = map_layout("q", lq, packed).map_err(|e| self.fail(e))?;
        let (ok, mk) = map_layout("k", lk, packed).map_err(|e| self.fail(e))?;
        let (ov, mv) = map_layout("v", lv, packed).map_err(|e| self.fail(e))?;
        let (lo, shape) = self.out_shape(&mq, lq);
        let mut out = vec![<T as bytemuck::Zeroable>::zeroed(); lo.numel()];
        let (tq, tk, tv) = (Tensor::host(tail(q, oq)?, mq), Tensor::host(tail(k, ok)?, mk), Tensor::host(tail(v, ov)?, mv));
        let mut to = TensorMut::host(&mut out, lo);
        if let Some(kv) = &self.kv {
            let lens = host_seqlens("cache_lens", &kv.lens).map_err(|e| self.fail(e))?;
            let table = match &kv.table {
                Some(t) => host_seqlens("block_table", &t.flatten_all()?).map_err(|e| self.fail(e))?,
                None => Vec::new(),
            };
            let cache = match kv.table_shape() {
                None => KvCache::contiguous(tk, tv, CacheLens::host(&lens)),
                Some((per, _)) => KvCache::paged(tk, tv, BlockTable::host(&table, per, per), CacheLens::host(&lens)),
            };
            self.attn.forward_kvcache(&tq, &cache, &mut to, None, &self.opts).map_err(|e| self.fail(e))?;
            return Ok((out, shape));
        }
        match &self.varlen {
            None => self.attn.forward(&tq, &tk, &tv, &mut to, &self.opts),
            Some(vl) => {
                let cq = host_seqlens("cu_seqlens_q", &vl.cu_q).map_err(|e| self.fail(e))?;
                let ck = host_seqlens("cu_seqlens_k", &vl.cu_k).map_err(|e| self.fail(e))?;
                let varlen = VarLen::new(SeqLens::host(&cq), SeqLens::host(&ck), vl.max_q, vl.max_k);
                self.attn.forward_varlen(&tq, &tk, &tv, &mut to, &varlen, &self.opts)
            }
        }
        .map_err(|e| self.fail(e))?;
        Ok((out, shape))
    }
}

/// The elements of a candle CUDA storage from a tensor's start offset on.
#[cfg(feature = "candle-cuda")]
fn cuda_view<T>(s: &cudarc::driver::CudaSlice<T>, offset: usize) -> candle_core::Result<cudarc::driver::CudaView<'_, T>> {
    if offset > s.len() {
        return Err(candle_core::Error::Msg(format!("start offset {offset} beyond the storage ({} elements)", s.len())));
    }
    Ok(s.slice(offset..))
}

fn tail<T>(s: &[T], offset: usize) -> candle_core::Result<&[T]> {
    s.get(offset..).ok_or_else(|| candle_core::Error::Msg(format!("start offset {offset} beyond the storage ({} elements)", s.len())))
}

impl CustomOp3 for Op {
    fn name(&self) -> &'static str {
        match (&self.varlen, &self.kv) {
            (Some(_), _) => "attention-varlen",
            (_, Some(_)) => "attention-kvcache",
            _ => "attention",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CandleLayout,
        s2: &CpuStorage,
        l2: &CandleLayout,
        s3: &CpuStorage,
        l3: &CandleLayout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use CpuStorage as S;
        match (s1, s2, s3) {
            (S::F16(q), S::F16(k), S::F16(v)) => {
                self.cpu((q, l1), (k, l2), (v, l3)).map(|(o, s)| (S::F16(o), s))
            }
            (S::BF16(q), S::BF16(k), S::BF16(v)) => {
                self.cpu((q, l1), (k, l2), (v, l3)).map(|(o, s)| (S::BF16(o), s))
            }
            (S::F32(q), S::F32(k), S::F32(v)) => {
                self.cpu((q, l1), (k, l2), (v, l3)).map(|(o, s)| (S::F32(o), s))
            }
            _ => Err(self.fail(TensorError::DType { q: s1.dtype(), k: s2.dtype(), v: s3.dtype() })),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CandleLayout,
        s2: &candle_core::CudaStorage,
        l2: &CandleLayout,
        s3: &candle_core::CudaStorage,
        l3: &CandleLayout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        match (&s1.slice, &s2.slice, &s3.slice) {
            (S::F16(_), S::F16(_), S::F16(_)) => self.cuda::<half::f16>((s1, l1), (s2, l2), (s3, l3)),
            (S::BF16(_), S::BF16(_), S::BF16(_)) => self.cuda::<half::bf16>((s1, l1), (s2, l2), (s3, l3)),
            (S::F32(_), S::F32(_), S::F32(_)) => self.cuda::<f32>((s1, l1), (s2, l2), (s3, l3)),
            _ => Err(self.fail(TensorError::DType { q: s1.dtype(), k: s2.dtype(), v: s3.dtype() })),
        }
    }
}

#[cfg(feature = "candle-cuda")]
impl Op {
    fn cuda<T: Element + candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        (s1, lq): (&candle_core::CudaStorage, &CandleLayout),
        (s2, lk): (&candle_core::CudaStorage, &CandleLayout),
        (s3, lv): (&candle_core::CudaStorage, &CandleLayout),
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let packed = self.varlen.is_some();
        let (oq, mq) = map_layout("q", lq, packed).map_err(|e| self.fail(e))?;
        let (ok, mk) = map_layout("k", lk, packed).map_err(|e| self.fail(e))?;
        let (ov, mv) = map_layout("v", lv, packed).map_err(|e| self.fail(e))?;
        let (lo, shape) = self.out_shape(&mq, lq);
        let dev = s1.device().clone();
        // On the device's stream; zeroed so varlen rows outside every sequence read as zero.
        let mut out = dev.alloc_zeros::<T>(lo.numel())?;
        let (q, k, v) = (s1.as_cuda_slice::<T>()?, s2.as_cuda_slice::<T>()?, s3.as_cuda_slice::<T>()?);
        let (vq, vk, vv) = (cuda_view(q, oq)?, cuda_view(k, ok)?, cuda_view(v, ov)?);
        let (tq, tk, tv) = (Tensor::cuda(&vq, mq), Tensor::cuda(&vk, mk), Tensor::cuda(&vv, mv));
        // u32 or i32 `[n]` values of a candle device tensor: (address, count).
        let stream = dev.cuda_stream();
        let ints = |arg: &'static str, t: &candle_core::Tensor| -> candle_core::Result<(u64, usize)> {
            use candle_core::cuda_backend::CudaStorageSlice as S;
            let (g, l) = t.storage_and_layout();
            let candle_core::Storage::Cuda(s) = &*g else {
                return Err(self.fail(TensorError::Device(format!("{arg} not on the CUDA device"))));
            };
            let base = match &s.slice {
                S::U32(x) => cudarc::driver::DevicePtr::device_ptr(x, &stream).0,
                S::I32(x) => cudarc::driver::DevicePtr::device_ptr(x, &stream).0,
                _ => return Err(self.fail(TensorError::SeqLens { arg, detail: format!("dtype {:?}", s.dtype()) })),
            };
            Ok((base + 4 * l.start_offset() as u64, l.shape().elem_count()))
        };
        if let Some(kv) = &self.kv {
            let (pl, nl) = ints("cache_lens", &kv.lens)?;
            // SAFETY: live candle device tensors on this device (held by `kv`), written on
            // `stream`, the stream the kernels run on; u32 values below 2^31 read as i32 and
            // the kernels clamp any other length or page id.
            let lens = unsafe { CacheLens::from_raw_device(pl, nl) };
            let mut to = TensorMut::cuda(&mut out, lo);
            let cache = match (kv.table_shape(), &kv.table) {
                (Some((per, _)), Some(t)) => {
                    let (pt, nt) = ints("block_table", t)?;
                    // SAFETY: as for the lengths.
                    KvCache::paged(tk, tv, unsafe { BlockTable::from_raw_device(pt, nt, per, per) }, lens)
                }
                _ => KvCache::contiguous(tk, tv, lens),
            };
            self.attn.forward_kvcache(&tq, &cache, &mut to, None, &self.opts).map_err(|e| self.fail(e))?;
            drop(to);
            return Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), shape));
        }
        {
            let mut to = TensorMut::cuda(&mut out, lo);
            match &self.varlen {
                None => self.attn.forward(&tq, &tk, &tv, &mut to, &self.opts),
                Some(vl) => {
                    let ((pq, nq), (pk, nk)) = (ints("cu_seqlens_q", &vl.cu_q)?, ints("cu_seqlens_k", &vl.cu_k)?);
                    // SAFETY: the prefix sums are live candle device tensors (held by the
                    // op) on this device, written on `stream`, the stream the kernels run on
                    // (the output's). u32 values below 2^31 read as i32; the
                    // kernels clamp any other value.
                    let varlen = unsafe {
                        VarLen::new(SeqLens::from_raw_device(pq, nq), SeqLens::from_raw_device(pk, nk), vl.max_q, vl.max_k)
                    };
                    self.attn.forward_varlen(&tq, &tk, &tv, &mut to, &varlen, &self.opts)
                }
            }
            .map_err(|e| self.fail(e))?;
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}
