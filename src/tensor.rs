//! Typed views over the caller's memory, host or device, and their validation.
//!
//! Views never own or copy data. Host views borrow slices; device views borrow cudarc slices (or,
//! through an `unsafe` constructor, raw device pointers from candle, PyTorch or elsewhere).

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{result, sys::CUstream, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

pub(crate) use crate::call::{Addr, Call, KvPart, Operand, PackedSeqs, StreamOrder};

use crate::dtype::Element;
use crate::error::Error;
use crate::layout::Layout;
use crate::options::Options;
use crate::problem::{MemoryKind, Problem};

/// Device memory owned elsewhere (candle, PyTorch): a pointer, a length, and for outputs the
/// stream to write on. Nothing orders it; the caller's `unsafe` contract does.
#[derive(Clone, Copy)]
pub(crate) struct RawDevice {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) stream: CUstream,
}

/// Where a read-only view's elements live.
pub(crate) enum InMem<'a, T> {
    Host(&'a [T]),
    Raw(RawDevice),
    /// A cudarc slice, kept as the slice (not a pointer) so the call can order it on the stream
    /// the kernels actually run on, which is only known once the output is seen.
    Cuda(&'a dyn DevicePtr<T>),
}

impl<T> InMem<'_, T> {
    /// Device memory owned elsewhere, read on the launch stream (no stream of its own).
    pub(crate) fn raw(ptr: u64, len: usize) -> Self {
        InMem::Raw(RawDevice { ptr, len, stream: std::ptr::null_mut() })
    }

    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            InMem::Host(b) => b.len(),
            InMem::Raw(r) => r.len,
            InMem::Cuda(slice) => slice.len(),
        }
    }
}

/// Where an output view's elements live.
pub(crate) enum OutMem<'a, T> {
    Host(&'a mut [T]),
    Raw(RawDevice),
    /// A cudarc slice and its stream, which becomes the launch stream (for the output) or is
    /// waited on there (for the lse).
    Cuda { slice: &'a mut dyn DevicePtrMut<T>, stream: Arc<CudaStream> },
}

/// A read-only input (q, k or v): `[batch, seqlen, heads, head_dim]` elements of `T`.
///
/// ```
/// use attention::{Layout, Tensor};
/// let q = vec![0.5f32; 1 * 4 * 2 * 8];
/// let q = Tensor::host(&q, Layout::contiguous(1, 4, 2, 8));
/// assert_eq!(q.layout().heads(), 2);
/// ```
pub struct Tensor<'a, T: Element> {
    pub(crate) mem: InMem<'a, T>,
    pub(crate) layout: Layout,
}

/// The output: `[batch, seqlen_q, heads, head_dim]` elements of `T`, fully written by a
/// successful call and left untouched by a failed one.
pub struct TensorMut<'a, T: Element> {
    pub(crate) mem: OutMem<'a, T>,
    pub(crate) layout: Layout,
}

/// The optional log-sum-exp output: f32, contiguous `[batch, heads, seqlen_q]`, natural log,
/// `-inf` for rows that see no key.
pub struct LseMut<'a> {
    pub(crate) mem: OutMem<'a, f32>,
}

impl<'a, T: Element> Tensor<'a, T> {
    /// A view of host memory.
    pub fn host(data: &'a [T], layout: Layout) -> Self {
        Tensor { mem: InMem::Host(data), layout }
    }

    /// A view of a cudarc device slice (`CudaSlice`, `CudaView`). With cudarc's multi-stream
    /// event tracking, the kernels' stream (the output's) waits for the slice's pending writes
    /// and the read is recorded there after the launch, whatever stream the slice belongs to.
    pub fn cuda<S: DevicePtr<T>>(slice: &'a S, layout: Layout) -> Self {
        Tensor { mem: InMem::Cuda(slice), layout }
    }

    /// A view of device memory owned elsewhere (candle, PyTorch's `data_ptr()`, ...).
    ///
    /// # Safety
    /// `ptr` must point to at least `len` elements of `T` in device memory of the current
    /// CUDA context's device (the primary context, which PyTorch and cudarc share), readable
    /// on the stream the output runs on, and stay valid until the work launched on it completes.
    pub unsafe fn from_raw_device(ptr: u64, len: usize, layout: Layout) -> Self {
        Tensor { mem: InMem::raw(ptr, len), layout }
    }

    /// The view's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
}

impl<'a, T: Element> TensorMut<'a, T> {
    /// A view of host memory to write.
    pub fn host(data: &'a mut [T], layout: Layout) -> Self {
        TensorMut { mem: OutMem::Host(data), layout }
    }

    /// A view of a cudarc device slice to write. The kernels run on this slice's stream; with
    /// cudarc's event tracking they wait there for the slice's pending reads and writes, and
    /// the write is recorded after the launch, so a consumer on another stream waits for it.
    pub fn cuda<S: DevicePtrMut<T>>(slice: &'a mut S, layout: Layout) -> Self {
        let stream = slice.stream().clone();
        TensorMut { mem: OutMem::Cuda { slice, stream }, layout }
    }

    /// A view of device memory owned elsewhere, written on `stream` (null: the legacy default
    /// stream).
    ///
    /// # Safety
    /// As [`Tensor::from_raw_device`], writable, and `stream` must be a live stream of the
    /// current context (or null).
    pub unsafe fn from_raw_device(ptr: u64, len: usize, layout: Layout, stream: CUstream) -> Self {
        TensorMut { mem: OutMem::Raw(RawDevice { ptr, len, stream }), layout }
    }

    /// The view's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
}

impl<'a> LseMut<'a> {
    /// Host memory for the log-sum-exp, `batch * heads * seqlen_q` floats.
    pub fn host(data: &'a mut [f32]) -> Self {
        LseMut { mem: OutMem::Host(data) }
    }

    /// A cudarc device slice for the log-sum-exp, ordered on the output's stream like the
    /// output itself.
    pub fn cuda<S: DevicePtrMut<f32>>(slice: &'a mut S) -> Self {
        let stream = slice.stream().clone();
        LseMut { mem: OutMem::Cuda { slice, stream } }
    }

    /// Device memory owned elsewhere.
    ///
    /// # Safety
    /// As [`TensorMut::from_raw_device`], for `len` f32 values.
    pub unsafe fn from_raw_device(ptr: u64, len: usize) -> Self {
        LseMut { mem: OutMem::Raw(RawDevice { ptr, len, stream: std::ptr::null_mut() }) }
    }
}

impl<T> std::fmt::Debug for InMem<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InMem::Host(b) => write!(f, "host[{}]", b.len()),
            InMem::Raw(r) => write!(f, "device {:#x}[{}] (raw)", r.ptr, r.len),
            InMem::Cuda(s) => write!(f, "device {}[{}] (cudarc)", s.stream().context().ordinal(), s.len()),
        }
    }
}

impl<T> std::fmt::Debug for OutMem<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutMem::Host(b) => write!(f, "host[{}]", b.len()),
            OutMem::Raw(r) => write!(f, "device {:#x}[{}] (raw)", r.ptr, r.len),
            OutMem::Cuda { slice, .. } => write!(f, "device {}[{}] (cudarc)", slice.stream().context().ordinal(), slice.len()),
        }
    }
}

impl<T: Element> std::fmt::Debug for Tensor<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor").field("dtype", &T::DTYPE).field("mem", &self.mem).field("layout", &self.layout).finish()
    }
}

impl<T: Element> std::fmt::Debug for TensorMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorMut").field("dtype", &T::DTYPE).field("mem", &self.mem).field("layout", &self.layout).finish()
    }
}

impl std::fmt::Debug for LseMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LseMut").field("mem", &self.mem).finish()
    }
}

/// The address, length in elements and memory of a view, read without ordering anything.
pub(crate) fn peek_in<T>(mem: &InMem<'_, T>) -> (Addr, usize, MemoryKind) {
    match mem {
        InMem::Host(b) => (Addr::Host(b.as_ptr() as *const u8), b.len(), MemoryKind::Host),
        InMem::Raw(r) => (Addr::Device(r.ptr), r.len, MemoryKind::Device { ordinal: usize::MAX }),
        InMem::Cuda(slice) => {
            let stream = slice.stream();
            // The pointer comes with a guard; dropping it at once, on the slice's own stream,
            // orders nothing new. The call orders the slice on the launch stream once valid.
            let (ptr, _guard) = slice.device_ptr(stream);
            (Addr::Slice(ptr), slice.len(), MemoryKind::Device { ordinal: stream.context().ordinal() })
        }
    }
}

pub(crate) fn peek_out<T>(mem: &mut OutMem<'_, T>) -> (Addr, usize, MemoryKind) {
    match mem {
        OutMem::Host(b) => (Addr::Host(b.as_mut_ptr() as *const u8), b.len(), MemoryKind::Host),
        OutMem::Raw(r) => (Addr::Device(r.ptr), r.len, MemoryKind::Device { ordinal: usize::MAX }),
        OutMem::Cuda { slice, stream } => {
            let len = slice.len();
            let (ptr, _guard) = slice.device_ptr_mut(stream);
            (Addr::Slice(ptr), len, MemoryKind::Device { ordinal: stream.context().ordinal() })
        }
    }
}


/// Builds the ordering of a valid call (see [`StreamOrder`]). `launch` is the output's cudarc
/// stream, or `raw_launch` when the output is raw memory.
pub(crate) fn order_on_launch_stream<'c, T: Element>(
    inputs: [&'c InMem<'_, T>; 3],
    seqlens: [Option<&'c InMem<'_, i32>>; 3],
    out: &'c mut OutMem<'_, T>,
    lse: Option<&'c mut OutMem<'_, f32>>,
    raw_launch: CUstream,
) -> Result<StreamOrder<'c>, Error> {
    let mut order = StreamOrder::none();
    order.launch = raw_launch;
    let (out_slice, launch): (Option<&'c mut dyn DevicePtrMut<T>>, Option<&'c CudaStream>) = match out {
        OutMem::Cuda { slice, stream } => (Some(&mut **slice), Some(&**stream)),
        _ => (None, None),
    };
    let mut read = |ptr: Option<(&'c CudaStream, SyncOnDrop<'c>)>| -> Result<(), Error> {
        if let Some((own, guard)) = ptr {
            order.guards.push(guard);
            if launch.is_none() && own.cu_stream() != raw_launch {
                join_before(own, raw_launch)?;
                order.joins.push(own);
            }
        }
        Ok(())
    };
    for m in inputs {
        if let InMem::Cuda(slice) = m {
            let on = launch.unwrap_or(slice.stream());
            read(Some((slice.stream(), slice.device_ptr(on).1)))?;
        }
    }
    for m in seqlens.into_iter().flatten() {
        if let InMem::Cuda(slice) = m {
            let on = launch.unwrap_or(slice.stream());
            read(Some((slice.stream(), slice.device_ptr(on).1)))?;
        }
    }
    if let Some(OutMem::Cuda { slice, stream }) = lse {
        let on: &'c CudaStream = launch.unwrap_or(stream);
        let guard = slice.device_ptr_mut(on).1;
        read(Some((stream, guard)))?;
    }
    if let (Some(slice), Some(stream)) = (out_slice, launch) {
        // The launch stream is this one: cudarc orders it and records the write on drop.
        order.guards.push(slice.device_ptr_mut(stream).1);
    }
    Ok(order)
}

/// Makes `launch` wait for everything enqueued on `own` so far.
pub(crate) fn join_before(own: &CudaStream, launch: CUstream) -> Result<(), Error> {
    let cuda = |op: &'static str| move |e: result::DriverError| Error::cuda(op, e.0);
    let event = own.record_event(None).map_err(cuda("cuEventRecord"))?;
    // SAFETY: a live event of the stream's context and a stream the caller vouched for; the
    // event may be destroyed (when `event` drops) once the wait is enqueued.
    unsafe {
        result::stream::wait_event(launch, event.cu_event(), cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
    }
    .map_err(cuda("cuStreamWaitEvent"))
}

/// The sequence boundaries of a packed variable-length batch: `batch + 1` int32 prefix sums
/// (`cu_seqlens` in FlashAttention's varlen API and vLLM). Sequence `b` is rows
/// `cu[b]..cu[b + 1]` of the packed tensor.
///
/// Host prefix sums are checked in full before anything runs: they start at 0, never decrease,
/// end at the packed tensor's row count and keep each length within the stated maximum. Device
/// prefix sums are not read on the host (that would synchronise the stream and break CUDA-graph
/// capture): the kernels clamp every entry to the tensors and every length to the stated
/// maximum, so malformed ones give wrong rows, never an access outside the caller's buffers,
/// and rows of `out` outside every sequence (before `cu[0]`, after `cu[batch]`) are left as
/// they were. Validate them on the host with [`SeqLens::check_host`] when unsure.
#[derive(Debug)]
pub struct SeqLens<'a> {
    pub(crate) mem: InMem<'a, i32>,
}

impl<'a> SeqLens<'a> {
    /// Prefix sums in host memory (for host tensors: the CPU backend).
    pub fn host(cu_seqlens: &'a [i32]) -> Self {
        SeqLens { mem: InMem::Host(cu_seqlens) }
    }

    /// Prefix sums in a cudarc device slice.
    pub fn cuda<S: DevicePtr<i32>>(slice: &'a S) -> Self {
        SeqLens { mem: InMem::Cuda(slice) }
    }

    /// Prefix sums in device memory owned elsewhere (a PyTorch int32 tensor's `data_ptr()`).
    ///
    /// # Safety
    /// As [`Tensor::from_raw_device`], for `len` i32 values.
    pub unsafe fn from_raw_device(ptr: u64, len: usize) -> Self {
        SeqLens { mem: InMem::raw(ptr, len) }
    }

    /// Number of prefix sums (`batch + 1`).
    pub(crate) fn len(&self) -> usize {
        self.mem.len()
    }

    /// Number of sequences (`len - 1`).
    pub fn batch(&self) -> usize {
        self.len().saturating_sub(1)
    }

    /// Checks host prefix sums against a packed tensor of `total` rows and a maximum length:
    /// starting at 0, non-decreasing, ending at `total` (so every row of the packed tensor
    /// belongs to a sequence and a successful call writes all of `out`), each length at most
    /// `max_seqlen`. The error names `arg`, the first bad entry and what is accepted.
    ///
    /// ```
    /// use attention::SeqLens;
    /// assert!(SeqLens::check_host(&[0, 3, 8], 8, 5, "cu_seqlens_q").is_ok());
    /// // Rows 8..10 would belong to no sequence and never be written.
    /// assert!(SeqLens::check_host(&[0, 3, 8], 10, 5, "cu_seqlens_q").is_err());
    /// ```
    pub fn check_host(cu: &[i32], total: usize, max_seqlen: usize, arg: &'static str) -> Result<(), Error> {
        if cu.len() < 2 {
            return Err(Error::invalid(arg, format!("{} entries", cu.len()), "batch + 1 >= 2 prefix sums"));
        }
        if cu[0] != 0 {
            return Err(Error::invalid(arg, format!("entry 0 = {}", cu[0]), "prefix sums starting at 0"));
        }
        let last = cu[cu.len() - 1];
        if last < 0 || last as usize != total {
            return Err(Error::invalid(
                arg,
                format!("last entry {} = {last}", cu.len() - 1),
                format!("the packed tensor's row count {total}: every row belongs to a sequence"),
            ));
        }
        for (i, &x) in cu.iter().enumerate() {
            if x < 0 || x as usize > total {
                return Err(Error::invalid(
                    arg,
                    format!("entry {i} = {x}"),
                    format!("offsets within the packed tensor's {total} rows"),
                ));
            }
        }
        for (i, w) in cu.windows(2).enumerate() {
            let len = w[1] as i64 - w[0] as i64;
            if len < 0 {
                return Err(Error::invalid(
                    arg,
                    format!("entries {i}..{} = {}, {}", i + 1, w[0], w[1]),
                    "non-decreasing prefix sums",
                ));
            }
            if len as usize > max_seqlen {
                return Err(Error::invalid(
                    arg,
                    format!("sequence {i} of length {len}"),
                    format!("lengths at most the stated maximum {max_seqlen}"),
                ));
            }
        }
        Ok(())
    }
}

/// A packed variable-length batch, as FlashAttention's `flash_attn_varlen_func` and vLLM's
/// prefill take it: q/out are `[1, total_q, heads, head_dim]`, k/v `[1, total_k, kv_heads,
/// head_dim]`, and sequence `b` is rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` of q against rows
/// `cu_seqlens_k[b]..cu_seqlens_k[b+1]` of k and v. Causal masks and windows align bottom-right
/// within each sequence. The maxima size the launch grid.
///
/// ```
/// use attention::{Layout, SeqLens, Tensor, TensorMut, VarLen, Options};
/// // Two sequences of 3 and 5 tokens, 2 heads of dim 8, packed.
/// let cu = [0, 3, 8];
/// let (h, d) = (2, 8);
/// let x: Vec<f32> = (0..8 * h * d).map(|i| (i as f32 * 0.1).cos()).collect();
/// let mut out = vec![0.0f32; x.len()];
/// let l = Layout::contiguous(1, 8, h, d);
/// let attn = attention::Selector::from_env().unwrap().backend(attention::BackendKind::Cpu).select().unwrap();
/// let varlen = VarLen::new(SeqLens::host(&cu), SeqLens::host(&cu), 5, 5);
/// attn.forward_varlen(&Tensor::host(&x, l), &Tensor::host(&x, l), &Tensor::host(&x, l),
///                     &mut TensorMut::host(&mut out, l), &varlen, &Options::default().causal(true))
///     .unwrap();
/// ```
#[derive(Debug)]
pub struct VarLen<'a> {
    cu_seqlens_q: SeqLens<'a>,
    cu_seqlens_k: SeqLens<'a>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
}

impl<'a> VarLen<'a> {
    /// A packed batch: the two prefix sums (same number of entries, same memory as the
    /// tensors) and the longest query and key sequence.
    pub fn new(cu_seqlens_q: SeqLens<'a>, cu_seqlens_k: SeqLens<'a>, max_seqlen_q: usize, max_seqlen_k: usize) -> Self {
        VarLen { cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k }
    }
    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.cu_seqlens_q.batch()
    }
}


/// The largest dimension accepted. Kernels index rows, heads and batches in 32-bit integers and
/// add a tile (at most a few hundred rows) to a row index before comparing it with the length;
/// the margin keeps every such sum below `i32::MAX` for any accepted shape.
pub(crate) const MAX_DIM: usize = (i32::MAX as usize) - (1 << 16);

use crate::options::MAX_SOFTMAX_SCALE;

pub(crate) fn shape_str(l: &Layout) -> String {
    format!("{:?}", l.shape())
}

/// Checks one tensor on its own: sizes, bounds, alignment, and for an output, no overlap.
pub(crate) fn check_operand(name: &'static str, o: &Operand, elem_size: usize, output: bool) -> Result<(), Error> {
    let layout = &o.layout;
    let shape = layout.shape();
    if shape.contains(&0) {
        return Err(Error::invalid(
            name,
            format!("shape {}", shape_str(layout)),
            "every dimension of [batch, seqlen, heads, head_dim] at least 1",
        ));
    }
    if let Some(&big) = shape.iter().find(|&&d| d > MAX_DIM) {
        return Err(Error::invalid(
            name,
            format!("dimension {big} in shape {}", shape_str(layout)),
            format!("every dimension at most {MAX_DIM} (kernels index with 32-bit integers)"),
        ));
    }
    if layout.checked_numel().is_none() {
        return Err(Error::invalid(
            name,
            format!("shape {}", shape_str(layout)),
            "a shape whose element count fits in usize",
        ));
    }
    // The span in bytes must fit in isize: no allocation is larger, and it keeps every stride
    // and offset representable in the kernels' 64-bit signed arithmetic.
    let span = layout
        .span()
        .filter(|&n| n.checked_mul(elem_size).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| {
            Error::invalid(
                name,
                format!("strides {:?} for shape {}", layout.strides(), shape_str(layout)),
                "strides whose largest byte offset fits in isize",
            )
        })?;
    if span > o.len {
        return Err(Error::invalid(
            name,
            format!("a buffer of {} elements for shape {} with strides {:?}", o.len, shape_str(layout), layout.strides()),
            format!("a buffer of at least {span} elements (the layout's largest offset + 1)"),
        ));
    }
    // Inputs are only read, so they may alias themselves (zero-stride broadcast K/V, views
    // into one packed QKV buffer); only an output must give every element its own address.
    if output && layout.overlaps() {
        return Err(Error::invalid(
            name,
            format!("strides {:?} for shape {}", layout.strides(), shape_str(layout)),
            "strides under which no two output elements share memory",
        ));
    }
    if let Addr::Device(p) | Addr::Slice(p) = o.addr {
        if p == 0 {
            return Err(Error::invalid(name, "a null device pointer", "a device allocation"));
        }
        if p % elem_size as u64 != 0 {
            return Err(Error::invalid(
                name,
                format!("device pointer {p:#x}"),
                format!("a pointer aligned to the element size ({elem_size} bytes)"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn operand(addr: Addr, len: usize, layout: Layout) -> Operand {
    // Canonical strides: a size-1 dimension's stride (which may be anything) never reaches
    // a kernel or an alignment check.
    Operand { addr, len, layout: layout.canonical() }
}

pub(crate) fn same_memory(a: MemoryKind, b: MemoryKind) -> bool {
    match (a, b) {
        (MemoryKind::Host, MemoryKind::Host) => true,
        // usize::MAX: a raw pointer whose device is not known yet (checked by the GPU backend).
        (MemoryKind::Device { ordinal: x }, MemoryKind::Device { ordinal: y }) => {
            x == y || x == usize::MAX || y == usize::MAX
        }
        _ => false,
    }
}

pub(crate) fn describe(m: MemoryKind) -> String {
    match m {
        MemoryKind::Host => "host memory".into(),
        MemoryKind::Device { ordinal: usize::MAX } => "device memory".into(),
        MemoryKind::Device { ordinal } => format!("memory of device {ordinal}"),
    }
}

/// Whether 16-byte vector loads and stores of an operand's rows are aligned.
pub(crate) fn vector_aligned(o: &Operand, elem: usize) -> bool {
    let base = match o.addr {
        Addr::Device(p) | Addr::Slice(p) => p as usize,
        Addr::Host(p) => p as usize,
    };
    // Strides are canonical and their byte offsets fit in isize (checked): no overflow.
    base % 16 == 0 && o.layout.strides().iter().all(|s| (s * elem) % 16 == 0)
}

/// Byte range `[start, end)` a device operand covers (checked operands only).
pub(crate) fn byte_range(o: &Operand, elem: usize) -> Option<(u64, u64)> {
    match o.addr {
        Addr::Device(p) | Addr::Slice(p) => {
            let bytes = o.layout.span()? as u64 * elem as u64;
            Some((p, p.saturating_add(bytes)))
        }
        Addr::Host(_) => None,
    }
}

/// Rejects a device output that shares bytes with another device operand of the call: kernels
/// read the inputs after writing the output, and write the output and lse in any order.
pub(crate) fn check_disjoint(out: (&'static str, Option<(u64, u64)>), others: &[(&'static str, Option<(u64, u64)>)]) -> Result<(), Error> {
    let (name, Some((o0, o1))) = out else { return Ok(()) };
    for &(other, range) in others {
        if let Some((a0, a1)) = range {
            if a0 < o1 && o0 < a1 {
                return Err(Error::invalid(
                    name,
                    format!("device memory {o0:#x}..{o1:#x} overlapping {other} at {a0:#x}..{a1:#x}"),
                    format!("a buffer separate from {other}"),
                ));
            }
        }
    }
    Ok(())
}

/// Checks that an operand lives in the same memory as q (host, or q's device): an error naming
/// `arg` otherwise.
pub(crate) fn check_memory_like_q(arg: &'static str, m: MemoryKind, q: MemoryKind) -> Result<(), Error> {
    if same_memory(q, m) {
        Ok(())
    } else {
        Err(Error::invalid(arg, describe(m), format!("{} like q", describe(q))))
    }
}

/// Checks a device pointer to f32 or i32 values (lse, prefix sums, lengths, block tables):
/// non-null and 4-byte aligned. Host addresses pass.
pub(crate) fn check_f32_or_i32_pointer(arg: &'static str, addr: Addr) -> Result<(), Error> {
    match addr {
        Addr::Device(p) | Addr::Slice(p) if p == 0 || p % 4 != 0 => {
            Err(Error::invalid(arg, format!("device pointer {p:#x}"), "a non-null pointer aligned to 4 bytes"))
        }
        _ => Ok(()),
    }
}

/// Byte range `[start, end)` of `n` 4-byte values at a device address (`None` for host memory).
pub(crate) fn four_byte_range(addr: Addr, n: usize) -> Option<(u64, u64)> {
    match addr {
        Addr::Device(x) | Addr::Slice(x) => Some((x, x.saturating_add(n as u64 * 4))),
        Addr::Host(_) => None,
    }
}

/// The lse view of a call: exactly `batch * heads * rows` f32 values, `[batch, heads, rows]`,
/// in q's memory. `rows` names the row dimension in the error (`seqlen_q`, `q_len`).
pub(crate) fn lse_operand(
    lse: &mut LseMut<'_>,
    (b, rows, h): (usize, usize, usize),
    rows_name: &str,
    qm: MemoryKind,
) -> Result<Operand, Error> {
    let (addr, len, lm) = peek_out(&mut lse.mem);
    // b·h·rows fits: it is q's element count divided by head_dim.
    let want = b * h * rows;
    if len != want {
        return Err(Error::invalid(
            "lse",
            format!("{len} elements"),
            format!("exactly batch*heads*{rows_name} = {want} f32 values, [batch, heads, {rows_name}]"),
        ));
    }
    check_memory_like_q("lse", lm, qm)?;
    check_f32_or_i32_pointer("lse", addr)?;
    Ok(Operand { addr, len, layout: Layout::contiguous(b, rows, h, 1) })
}

/// The device a call runs on: q's, or when q is a raw pointer (device unknown) the first
/// operand whose device is known.
pub(crate) fn call_memory(q: MemoryKind, others: [MemoryKind; 3]) -> MemoryKind {
    match q {
        MemoryKind::Device { ordinal: usize::MAX } => others
            .into_iter()
            .find(|m| !matches!(m, MemoryKind::Device { ordinal: usize::MAX }))
            .unwrap_or(q),
        m => m,
    }
}

/// Checks the options every call takes: scale, soft-cap, window.
pub(crate) fn check_options(opts: &Options) -> Result<(), Error> {
    if let Some(s) = opts.softmax_scale {
        if !(0.0..=MAX_SOFTMAX_SCALE).contains(&s) {
            return Err(Error::invalid("options.softmax_scale", s, format!("a number from 0 to {MAX_SOFTMAX_SCALE:e}")));
        }
    }
    if let Some(c) = opts.softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::invalid("options.softcap", c, "a finite number above 0"));
        }
    }
    for (arg, w) in [("options.window_left", opts.window_left), ("options.window_right", opts.window_right)] {
        if let Some(w) = w {
            if w > MAX_DIM {
                return Err(Error::invalid(arg, w, format!("at most {MAX_DIM}, or None for unlimited")));
            }
        }
    }
    Ok(())
}

/// The stream a call's kernels run on: the output's (null for host memory or the legacy stream).
pub(crate) fn launch_stream<T>(out: &OutMem<'_, T>) -> CUstream {
    match out {
        OutMem::Raw(r) => r.stream,
        OutMem::Cuda { stream, .. } => stream.cu_stream(),
        OutMem::Host(_) => std::ptr::null_mut(),
    }
}

/// Validates a call: one check per constraint, each error naming the argument, the value and
/// what is accepted. Nothing is written before this passes; once it has, the cudarc operands
/// are ordered on the launch stream for as long as the call lives.
pub(crate) fn validate<'c, T: Element>(
    q: &'c Tensor<'_, T>,
    k: &'c Tensor<'_, T>,
    v: &'c Tensor<'_, T>,
    out: &'c mut TensorMut<'_, T>,
    mut lse: Option<&'c mut LseMut<'_>>,
    varlen: Option<&'c VarLen<'_>>,
    opts: &Options,
) -> Result<Call<'c>, Error> {
    let elem = std::mem::size_of::<T>();
    let in_op = |t: &Tensor<'_, T>| {
        let (addr, len, m) = peek_in(&t.mem);
        (operand(addr, len, t.layout), m)
    };
    let (qo, qm) = in_op(q);
    let (ko, km) = in_op(k);
    let (vo, vm) = in_op(v);
    let (oo, om) = {
        let (addr, len, m) = peek_out(&mut out.mem);
        (operand(addr, len, out.layout), m)
    };
    let raw_stream = launch_stream(&out.mem);
    check_operand("q", &qo, elem, false)?;
    check_operand("k", &ko, elem, false)?;
    check_operand("v", &vo, elem, false)?;
    check_operand("out", &oo, elem, true)?;

    let [b, sq, h, d] = qo.layout.shape();
    let [kb, sk, hk, kd] = ko.layout.shape();
    if varlen.is_some() && b != 1 {
        return Err(Error::invalid(
            "q",
            format!("batch {b} with cu_seqlens"),
            "batch 1: a packed batch is [1, total_q, heads, head_dim]",
        ));
    }
    if kb != b {
        return Err(Error::invalid("k", format!("batch {kb}"), format!("q's batch {b}")));
    }
    if kd != d {
        return Err(Error::invalid("k", format!("head_dim {kd}"), format!("q's head_dim {d}")));
    }
    if vo.layout.shape() != ko.layout.shape() {
        return Err(Error::invalid(
            "v",
            format!("shape {}", shape_str(&vo.layout)),
            format!("k's shape {}", shape_str(&ko.layout)),
        ));
    }
    if h % hk != 0 {
        return Err(Error::invalid(
            "k",
            format!("{hk} heads"),
            format!("a number of key/value heads that divides q's {h} heads (MHA, GQA, MQA)"),
        ));
    }
    if oo.layout.shape() != qo.layout.shape() {
        return Err(Error::invalid(
            "out",
            format!("shape {}", shape_str(&oo.layout)),
            format!("q's shape {}", shape_str(&qo.layout)),
        ));
    }
    for (name, m) in [("k", km), ("v", vm), ("out", om)] {
        if !same_memory(qm, m) {
            return Err(Error::invalid(
                name,
                describe(m),
                format!("{} like q (all tensors in one kind of memory)", describe(qm)),
            ));
        }
    }
    let lse_op = match lse.as_deref_mut() {
        None => None,
        Some(l) => Some(lse_operand(l, (b, sq, h), "seqlen_q", qm)?),
    };
    check_options(opts)?;
    let packed = match varlen {
        None => None,
        Some(vl) => Some(check_varlen(vl, &qo.layout, &ko.layout, qm)?),
    };
    // Device outputs must not share bytes with anything else the kernels touch. (Host slices
    // cannot alias: the borrow checker forbids it.)
    let ranges = [
        ("q", byte_range(&qo, elem)),
        ("k", byte_range(&ko, elem)),
        ("v", byte_range(&vo, elem)),
    ];
    let lse_range = lse_op.as_ref().and_then(|l| byte_range(l, 4));
    let seqlen_ranges = match (&packed, varlen) {
        (Some(p), Some(vl)) => {
            let n = vl.batch() + 1;
            [("cu_seqlens_q", four_byte_range(p.cu_seqlens_q, n)), ("cu_seqlens_k", four_byte_range(p.cu_seqlens_k, n))]
        }
        _ => [("cu_seqlens_q", None), ("cu_seqlens_k", None)],
    };
    let out_range = byte_range(&oo, elem);
    check_disjoint(("out", out_range), &[ranges[0], ranges[1], ranges[2], ("lse", lse_range), seqlen_ranges[0], seqlen_ranges[1]])?;
    check_disjoint(("lse", lse_range), &[ranges[0], ranges[1], ranges[2], seqlen_ranges[0], seqlen_ranges[1]])?;

    let memory = call_memory(qm, [km, vm, om]);
    let (pb, psq, psk) = match (varlen, &packed) {
        (Some(vl), Some(_)) => (vl.batch(), vl.max_seqlen_q, vl.max_seqlen_k),
        _ => (b, sq, sk),
    };
    let mut problem = Problem::new(T::DTYPE, pb, psq, psk, h, hk, d)
        .causal(opts.causal)
        .with_lse(lse_op.is_some())
        .varlen(packed.is_some());
    problem.window = (opts.window_left, opts.window_right);
    problem.softcap = opts.softcap;
    problem.memory = memory;
    problem.vector_aligned = [&qo, &ko, &vo, &oo].iter().all(|o| vector_aligned(o, elem));
    let order = order_on_launch_stream(
        [&q.mem, &k.mem, &v.mem],
        [varlen.map(|vl| &vl.cu_seqlens_q.mem), varlen.map(|vl| &vl.cu_seqlens_k.mem), None],
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
        varlen: packed,
        allow_tf32: opts.allow_tf32,
        stream: raw_stream,
        kv: None,
        _order: order,
        _borrows: PhantomData,
    })
}

fn seqlens_addr(s: &SeqLens<'_>) -> (Addr, MemoryKind) {
    let (addr, _, m) = peek_in(&s.mem);
    (addr, m)
}

/// Checks a packed batch against the q and k layouts: one check per constraint.
fn check_varlen(vl: &VarLen<'_>, q: &Layout, k: &Layout, qm: MemoryKind) -> Result<PackedSeqs, Error> {
    debug_assert_eq!(q.batch(), 1, "checked in validate");
    let (nq, nk) = (vl.cu_seqlens_q.len(), vl.cu_seqlens_k.len());
    if nq < 2 {
        return Err(Error::invalid("cu_seqlens_q", format!("{nq} entries"), "batch + 1 >= 2 prefix sums"));
    }
    if nk != nq {
        return Err(Error::invalid(
            "cu_seqlens_k",
            format!("{nk} entries"),
            format!("as many as cu_seqlens_q ({nq}): one sequence of keys per sequence of queries"),
        ));
    }
    if nq - 1 > MAX_DIM {
        return Err(Error::invalid("cu_seqlens_q", format!("{nq} entries"), format!("at most {MAX_DIM} sequences")));
    }
    for (arg, m) in [("max_seqlen_q", vl.max_seqlen_q), ("max_seqlen_k", vl.max_seqlen_k)] {
        if m == 0 || m > MAX_DIM {
            return Err(Error::invalid(arg, m, format!("1..={MAX_DIM}, the longest sequence")));
        }
    }
    let (total_q, total_k) = (q.seqlen(), k.seqlen());
    let mut addrs = [Addr::Device(0); 2];
    for (i, (arg, s, total, max)) in [
        ("cu_seqlens_q", &vl.cu_seqlens_q, total_q, vl.max_seqlen_q),
        ("cu_seqlens_k", &vl.cu_seqlens_k, total_k, vl.max_seqlen_k),
    ]
    .into_iter()
    .enumerate()
    {
        let (addr, m) = seqlens_addr(s);
        check_memory_like_q(arg, m, qm)?;
        match &s.mem {
            InMem::Host(cu) => SeqLens::check_host(cu, total, max, arg)?,
            _ => check_f32_or_i32_pointer(arg, addr)?,
        }
        addrs[i] = addr;
    }
    Ok(PackedSeqs { cu_seqlens_q: addrs[0], cu_seqlens_k: addrs[1], total_q, total_k })
}
