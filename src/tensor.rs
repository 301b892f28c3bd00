//! Typed views over the caller's memory, host or device, and their validation.
//!
//! Views never own or copy data. Host views borrow slices; device views borrow cudarc slices (or,
//! through an `unsafe` constructor, raw device pointers from candle, PyTorch or elsewhere).

use std::marker::PhantomData;

use cudarc::driver::{sys::CUstream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::dtype::Element;
use crate::error::Error;
use crate::layout::Layout;
use crate::options::Options;
use crate::problem::{MemoryKind, Problem};

/// Device memory borrowed for the duration of a view.
struct DeviceRef<'a> {
    ptr: u64,
    len: usize,
    ordinal: Option<usize>,
    stream: CUstream,
    /// cudarc's stream-ordering guard: held until the view drops, so the read/write events it
    /// records cover the kernels launched while the view was alive.
    _guard: Option<SyncOnDrop<'a>>,
}

impl<'a> DeviceRef<'a> {
    /// A cudarc slice as an input: its read event is recorded until the view drops.
    fn reading<T, S: DevicePtr<T>>(slice: &'a S) -> Self {
        let stream = slice.stream();
        let (ptr, guard) = slice.device_ptr(stream);
        DeviceRef {
            ptr,
            len: slice.len(),
            ordinal: Some(stream.context().ordinal()),
            stream: stream.cu_stream(),
            _guard: Some(guard),
        }
    }

    /// Device memory owned elsewhere: no ordinal known (the range check finds it), no guard.
    fn raw(ptr: u64, len: usize, stream: CUstream) -> Self {
        DeviceRef { ptr, len, ordinal: None, stream, _guard: None }
    }
}

/// A cudarc slice as an output: kernels run on the slice's own stream.
fn writable<'a, T, S: DevicePtrMut<T>>(slice: &'a mut S) -> DeviceRef<'a> {
    let len = slice.len();
    let stream = slice.stream().clone();
    let (ptr, guard) = slice.device_ptr_mut(&stream);
    // cudarc ties the write guard to a borrow of the stream handle cloned here, which cannot
    // outlive this function; the kernels are ordered on that same stream, so dropping the
    // guard (it records a write event in multi-stream mode) is all that is lost.
    drop(guard);
    DeviceRef { ptr, len, ordinal: Some(stream.context().ordinal()), stream: stream.cu_stream(), _guard: None }
}

enum InMem<'a> {
    Host(&'a [u8]),
    Device(DeviceRef<'a>),
}

enum OutMem<'a> {
    Host(&'a mut [u8]),
    Device(DeviceRef<'a>),
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
    mem: InMem<'a>,
    layout: Layout,
    _t: PhantomData<&'a [T]>,
}

/// The output: `[batch, seqlen_q, heads, head_dim]` elements of `T`, fully written by a
/// successful call and left untouched by a failed one.
pub struct TensorMut<'a, T: Element> {
    mem: OutMem<'a>,
    layout: Layout,
    _t: PhantomData<&'a mut [T]>,
}

/// The optional log-sum-exp output: f32, contiguous `[batch, heads, seqlen_q]`, natural log,
/// `-inf` for rows that see no key.
pub struct LseMut<'a> {
    mem: OutMem<'a>,
}

impl<'a, T: Element> Tensor<'a, T> {
    /// A view of host memory.
    pub fn host(data: &'a [T], layout: Layout) -> Self {
        Tensor {
            mem: InMem::Host(bytemuck::cast_slice(data)),
            layout,
            _t: PhantomData,
        }
    }

    /// A view of a cudarc device slice (`CudaSlice`, `CudaView`). Work is ordered on the
    /// slice's stream through cudarc's events while the view is alive.
    pub fn cuda<S: DevicePtr<T>>(slice: &'a S, layout: Layout) -> Self {
        Tensor { mem: InMem::Device(DeviceRef::reading(slice)), layout, _t: PhantomData }
    }

    /// A view of device memory owned elsewhere (candle, PyTorch's `data_ptr()`, ...).
    ///
    /// # Safety
    /// `ptr` must point to at least `len` elements of `T` in device memory of the current
    /// CUDA context's device (the primary context, which PyTorch and cudarc share), readable
    /// on the stream the output runs on, and stay valid until the work launched on it completes.
    pub unsafe fn from_raw_device(ptr: u64, len: usize, layout: Layout) -> Self {
        Tensor { mem: InMem::Device(DeviceRef::raw(ptr, len, std::ptr::null_mut())), layout, _t: PhantomData }
    }

    /// The view's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
}

impl<'a, T: Element> TensorMut<'a, T> {
    /// A view of host memory to write.
    pub fn host(data: &'a mut [T], layout: Layout) -> Self {
        TensorMut {
            mem: OutMem::Host(bytemuck::cast_slice_mut(data)),
            layout,
            _t: PhantomData,
        }
    }

    /// A view of a cudarc device slice to write. The kernels run on this slice's stream.
    pub fn cuda<S: DevicePtrMut<T>>(slice: &'a mut S, layout: Layout) -> Self {
        TensorMut { mem: OutMem::Device(writable(slice)), layout, _t: PhantomData }
    }

    /// A view of device memory owned elsewhere, written on `stream` (null: the legacy default
    /// stream).
    ///
    /// # Safety
    /// As [`Tensor::from_raw_device`], writable, and `stream` must be a live stream of the
    /// current context (or null).
    pub unsafe fn from_raw_device(ptr: u64, len: usize, layout: Layout, stream: CUstream) -> Self {
        TensorMut { mem: OutMem::Device(DeviceRef::raw(ptr, len, stream)), layout, _t: PhantomData }
    }

    /// The view's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
}

impl<'a> LseMut<'a> {
    /// Host memory for the log-sum-exp, `batch * heads * seqlen_q` floats.
    pub fn host(data: &'a mut [f32]) -> Self {
        LseMut {
            mem: OutMem::Host(bytemuck::cast_slice_mut(data)),
        }
    }

    /// A cudarc device slice for the log-sum-exp.
    pub fn cuda<S: DevicePtrMut<f32>>(slice: &'a mut S) -> Self {
        LseMut { mem: OutMem::Device(writable(slice)) }
    }

    /// Device memory owned elsewhere.
    ///
    /// # Safety
    /// As [`TensorMut::from_raw_device`], for `len` f32 values.
    pub unsafe fn from_raw_device(ptr: u64, len: usize) -> Self {
        LseMut { mem: OutMem::Device(DeviceRef::raw(ptr, len, std::ptr::null_mut())) }
    }
}

/// The sequence boundaries of a packed variable-length batch: `batch + 1` int32 prefix sums
/// (`cu_seqlens` in FlashAttention's varlen API and vLLM). Sequence `b` is rows
/// `cu[b]..cu[b + 1]` of the packed tensor.
///
/// Host prefix sums are checked in full before anything runs. Device prefix sums are not read
/// on the host (that would synchronise the stream and break CUDA-graph capture): the kernels
/// clamp every entry to the tensors and every length to the stated maximum, so malformed ones
/// give wrong rows, never an access outside the caller's buffers. Validate them on the host
/// with [`SeqLens::check_host`] when unsure.
pub struct SeqLens<'a> {
    mem: InMem<'a>,
}

impl<'a> SeqLens<'a> {
    /// Prefix sums in host memory (for host tensors: the CPU backend).
    pub fn host(cu_seqlens: &'a [i32]) -> Self {
        SeqLens { mem: InMem::Host(bytemuck::cast_slice(cu_seqlens)) }
    }

    /// Prefix sums in a cudarc device slice.
    pub fn cuda<S: DevicePtr<i32>>(slice: &'a S) -> Self {
        SeqLens { mem: InMem::Device(DeviceRef::reading(slice)) }
    }

    /// Prefix sums in device memory owned elsewhere (a PyTorch int32 tensor's `data_ptr()`).
    ///
    /// # Safety
    /// As [`Tensor::from_raw_device`], for `len` i32 values.
    pub unsafe fn from_raw_device(ptr: u64, len: usize) -> Self {
        SeqLens { mem: InMem::Device(DeviceRef::raw(ptr, len, std::ptr::null_mut())) }
    }

    /// Number of prefix sums (`batch + 1`).
    fn len(&self) -> usize {
        match &self.mem {
            InMem::Host(b) => b.len() / std::mem::size_of::<i32>(),
            InMem::Device(d) => d.len,
        }
    }

    /// Number of sequences (`len - 1`).
    pub fn batch(&self) -> usize {
        self.len().saturating_sub(1)
    }

    /// Checks host prefix sums against a packed tensor of `total` rows and a maximum length:
    /// non-decreasing, within `0..=total`, each length at most `max_seqlen`. The error names
    /// `arg`, the first bad entry and what is accepted.
    pub fn check_host(cu: &[i32], total: usize, max_seqlen: usize, arg: &'static str) -> Result<(), Error> {
        if cu.len() < 2 {
            return Err(Error::invalid(arg, format!("{} entries", cu.len()), "batch + 1 >= 2 prefix sums"));
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

/// The validated varlen part of a call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PackedSeqs {
    /// `batch + 1` i32 prefix sums each.
    pub cu_seqlens_q: Addr,
    pub cu_seqlens_k: Addr,
    /// Rows of the packed q/out and k/v tensors.
    pub total_q: usize,
    pub total_k: usize,
}

/// An address in host or device memory.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Addr {
    Host(*const u8),
    Device(u64),
}

/// One validated operand of a call: address, length in elements, layout.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    pub addr: Addr,
    pub len: usize,
    pub layout: Layout,
}

/// A validated call, as backends receive it. Built only by [`validate`] from live borrows, and
/// dropped before they end, so the raw addresses inside stay valid while a backend runs.
pub(crate) struct Call<'a> {
    pub problem: Problem,
    pub scale: f32,
    /// Which keys each row sees (causal, sliding window).
    pub mask: crate::options::Mask,
    /// Logit soft-cap, if any.
    pub softcap: Option<f32>,
    pub q: Operand,
    pub k: Operand,
    pub v: Operand,
    pub out: Operand,
    /// f32 `[batch, heads, seqlen_q]`.
    pub lse: Option<Operand>,
    /// A packed variable-length batch: the problem's batch is its number of sequences and its
    /// lengths the maxima.
    pub varlen: Option<PackedSeqs>,
    /// f32 kernels may use TF32 tensor cores.
    pub allow_tf32: bool,
    /// The stream device work is launched on (null for host calls or the legacy stream).
    pub stream: CUstream,
    _borrows: PhantomData<&'a mut ()>,
}

impl Call<'_> {
    /// Host slices of the operands, for the CPU backend.
    ///
    /// # Safety
    /// The call must be host memory (checked: returns None otherwise) and built by `validate`,
    /// whose borrows are still alive (they are, for as long as `self` is).
    pub(crate) unsafe fn host_slices<T: Element>(&mut self) -> Option<HostSlices<'_, T>> {
        let slice = |o: &Operand| match o.addr {
            Addr::Host(p) => Some(std::slice::from_raw_parts(p as *const T, o.len)),
            Addr::Device(_) => None,
        };
        let out = match self.out.addr {
            Addr::Host(p) => std::slice::from_raw_parts_mut(p as *mut T, self.out.len),
            Addr::Device(_) => return None,
        };
        let lse = match self.lse {
            Some(Operand { addr: Addr::Host(p), len, .. }) => {
                Some(std::slice::from_raw_parts_mut(p as *mut f32, len))
            }
            Some(_) => return None,
            None => None,
        };
        Some(HostSlices {
            q: slice(&self.q)?,
            k: slice(&self.k)?,
            v: slice(&self.v)?,
            out,
            lse,
        })
    }
}

/// The host slices of a call.
pub(crate) struct HostSlices<'c, T> {
    pub q: &'c [T],
    pub k: &'c [T],
    pub v: &'c [T],
    pub out: &'c mut [T],
    pub lse: Option<&'c mut [f32]>,
}

/// The largest size the kernels index with 32-bit integers.
const MAX_DIM: usize = i32::MAX as usize;

fn shape_str(l: &Layout) -> String {
    format!("{:?}", l.shape())
}

/// Checks one tensor on its own: sizes, bounds, overlap, alignment.
fn check_operand(
    name: &'static str,
    layout: &Layout,
    len: usize,
    addr: Addr,
    elem_size: usize,
) -> Result<(), Error> {
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
            format!("every dimension at most {MAX_DIM}"),
        ));
    }
    let span = layout.span().ok_or_else(|| {
        Error::invalid(
            name,
            format!("strides {:?} for shape {}", layout.strides(), shape_str(layout)),
            "strides whose largest offset fits in usize",
        )
    })?;
    if span > len {
        return Err(Error::invalid(
            name,
            format!(
                "a buffer of {len} elements for shape {} with strides {:?}",
                shape_str(layout),
                layout.strides()
            ),
            format!("a buffer of at least {span} elements (the layout's largest offset + 1)"),
        ));
    }
    if layout.overlaps() {
        return Err(Error::invalid(
            name,
            format!("strides {:?} for shape {}", layout.strides(), shape_str(layout)),
            "strides under which no two elements share memory (each of batch, seq, head steps over the ones inside it)",
        ));
    }
    if let Addr::Device(p) = addr {
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

fn in_operand<T: Element>(t: &Tensor<'_, T>) -> (Operand, MemoryKind, CUstream) {
    match &t.mem {
        InMem::Host(b) => (
            Operand {
                addr: Addr::Host(b.as_ptr()),
                len: b.len() / std::mem::size_of::<T>(),
                layout: t.layout,
            },
            MemoryKind::Host,
            std::ptr::null_mut(),
        ),
        InMem::Device(d) => (
            Operand { addr: Addr::Device(d.ptr), len: d.len, layout: t.layout },
            MemoryKind::Device { ordinal: d.ordinal.unwrap_or(usize::MAX) },
            d.stream,
        ),
    }
}

fn out_operand(mem: &mut OutMem<'_>, elem: usize, layout: Layout) -> (Operand, MemoryKind, CUstream) {
    match mem {
        OutMem::Host(b) => (
            Operand { addr: Addr::Host(b.as_mut_ptr()), len: b.len() / elem, layout },
            MemoryKind::Host,
            std::ptr::null_mut(),
        ),
        OutMem::Device(d) => (
            Operand { addr: Addr::Device(d.ptr), len: d.len, layout },
            MemoryKind::Device { ordinal: d.ordinal.unwrap_or(usize::MAX) },
            d.stream,
        ),
    }
}

fn same_memory(a: MemoryKind, b: MemoryKind) -> bool {
    match (a, b) {
        (MemoryKind::Host, MemoryKind::Host) => true,
        // usize::MAX: a raw pointer whose device is not known yet (checked by the GPU backend).
        (MemoryKind::Device { ordinal: x }, MemoryKind::Device { ordinal: y }) => {
            x == y || x == usize::MAX || y == usize::MAX
        }
        _ => false,
    }
}

fn describe(m: MemoryKind) -> String {
    match m {
        MemoryKind::Host => "host memory".into(),
        MemoryKind::Device { ordinal: usize::MAX } => "device memory".into(),
        MemoryKind::Device { ordinal } => format!("memory of device {ordinal}"),
    }
}

/// Whether 16-byte vector loads and stores of an operand's rows are aligned.
fn vector_aligned(o: &Operand, elem: usize) -> bool {
    let base = match o.addr {
        Addr::Device(p) => p as usize,
        Addr::Host(p) => p as usize,
    };
    base % 16 == 0 && o.layout.strides().iter().all(|s| (s * elem) % 16 == 0)
}

/// Byte range a device operand covers.
fn byte_range(o: &Operand, elem: usize) -> Option<(u64, u64)> {
    match o.addr {
        Addr::Device(p) => {
            let span = o.layout.span()? as u64 * elem as u64;
            Some((p, p + span))
        }
        Addr::Host(_) => None,
    }
}

/// Validates a call: one check per constraint, each error naming the argument, the value and
/// what is accepted. Nothing is written before this passes.
pub(crate) fn validate<'c, T: Element>(
    q: &'c Tensor<'_, T>,
    k: &'c Tensor<'_, T>,
    v: &'c Tensor<'_, T>,
    out: &'c mut TensorMut<'_, T>,
    lse: Option<&'c mut LseMut<'_>>,
    varlen: Option<&'c VarLen<'_>>,
    opts: &Options,
) -> Result<Call<'c>, Error> {
    let elem = std::mem::size_of::<T>();
    let (qo, qm, _) = in_operand(q);
    let (ko, km, _) = in_operand(k);
    let (vo, vm, _) = in_operand(v);
    let out_layout = out.layout;
    let (oo, om, stream) = out_operand(&mut out.mem, elem, out_layout);
    check_operand("q", &qo.layout, qo.len, qo.addr, elem)?;
    check_operand("k", &ko.layout, ko.len, ko.addr, elem)?;
    check_operand("v", &vo.layout, vo.len, vo.addr, elem)?;
    check_operand("out", &oo.layout, oo.len, oo.addr, elem)?;

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
    let lse_op = match lse {
        None => None,
        Some(l) => {
            let (lo, lm, _) = out_operand(&mut l.mem, 4, Layout::contiguous(b, sq, h, 1));
            let want = b * h * sq;
            if lo.len != want {
                return Err(Error::invalid(
                    "lse",
                    format!("{} elements", lo.len),
                    format!("exactly batch*heads*seqlen_q = {want} f32 values, [batch, heads, seqlen_q]"),
                ));
            }
            if !same_memory(qm, lm) {
                return Err(Error::invalid("lse", describe(lm), format!("{} like q", describe(qm))));
            }
            if let Addr::Device(p) = lo.addr {
                if p == 0 || p % 4 != 0 {
                    return Err(Error::invalid(
                        "lse",
                        format!("device pointer {p:#x}"),
                        "a non-null pointer aligned to 4 bytes",
                    ));
                }
            }
            Some(lo)
        }
    };
    // The output must not share memory with an input: kernels read q, k, v after writing out.
    // (Host slices cannot alias: the borrow checker forbids it.)
    if let Some((o0, o1)) = byte_range(&oo, elem) {
        for (name, op) in [("q", &qo), ("k", &ko), ("v", &vo)] {
            if let Some((a0, a1)) = byte_range(op, elem) {
                if a0 < o1 && o0 < a1 {
                    return Err(Error::invalid(
                        "out",
                        format!("device memory {o0:#x}..{o1:#x} overlapping {name} at {a0:#x}..{a1:#x}"),
                        "an output buffer separate from q, k and v",
                    ));
                }
            }
        }
        if let Some(lo) = &lse_op {
            if let Some((l0, l1)) = byte_range(lo, 4) {
                if l0 < o1 && o0 < l1 {
                    return Err(Error::invalid("lse", "memory overlapping out", "a buffer separate from out"));
                }
            }
        }
    }
    if let Some(s) = opts.softmax_scale {
        if !s.is_finite() {
            return Err(Error::invalid("options.softmax_scale", s, "a finite number"));
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
    let packed = match varlen {
        None => None,
        Some(vl) => Some(check_varlen(vl, &qo.layout, &ko.layout, qm)?),
    };
    let memory = match qm {
        MemoryKind::Device { ordinal: usize::MAX } => [km, vm, om]
            .into_iter()
            .find(|m| !matches!(m, MemoryKind::Device { ordinal: usize::MAX }))
            .unwrap_or(qm),
        m => m,
    };
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
        stream,
        _borrows: PhantomData,
    })
}

fn seqlens_addr(s: &SeqLens<'_>) -> (Addr, MemoryKind) {
    match &s.mem {
        InMem::Host(b) => (Addr::Host(b.as_ptr()), MemoryKind::Host),
        InMem::Device(d) => (Addr::Device(d.ptr), MemoryKind::Device { ordinal: d.ordinal.unwrap_or(usize::MAX) }),
    }
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
        if !same_memory(qm, m) {
            return Err(Error::invalid(arg, describe(m), format!("{} like q", describe(qm))));
        }
        match (&s.mem, addr) {
            (InMem::Host(b), _) => SeqLens::check_host(bytemuck::cast_slice(b), total, max, arg)?,
            (InMem::Device(_), Addr::Device(p)) if p == 0 || p % 4 != 0 => {
                return Err(Error::invalid(arg, format!("device pointer {p:#x}"), "a non-null pointer aligned to 4 bytes"));
            }
            _ => {}
        }
        addrs[i] = addr;
    }
    Ok(PackedSeqs { cu_seqlens_q: addrs[0], cu_seqlens_k: addrs[1], total_q, total_k })
}
