//! A validated call as backends receive it: addresses, lengths and layouts of every operand,
//! the problem, the options, and the stream ordering that stays in force until the call drops.
//! Built only by the validation of the public views (`tensor`, `kvcache`); the runtime and
//! the backends read it and import nothing above it.

use std::marker::PhantomData;

use cudarc::driver::{result, sys::CUstream, CudaStream, SyncOnDrop};

use crate::dtype::Element;
use crate::layout::Layout;
use crate::problem::Problem;

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
    /// Device memory given as a raw pointer: the GPU backend asks the driver which device
    /// holds it and that the call's bytes lie inside one allocation.
    Device(u64),
    /// Device memory of a cudarc slice: validation compared the layout with the slice's
    /// length and its stream's device with the call's, so the driver need not be asked (two
    /// driver calls per operand were most of a small call's host time).
    Slice(u64),
}

impl Addr {
    /// The device address as kernels take it; 0 for host memory, which no kernel is given.
    pub(crate) fn device_or_null(self) -> u64 {
        match self {
            Addr::Device(p) | Addr::Slice(p) => p,
            Addr::Host(_) => 0,
        }
    }
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
    /// A KV-cache call: where each sequence's length and pages are.
    pub kv: Option<KvPart>,
    /// Keeps the cudarc operands ordered on `stream` until the call drops (after the launch).
    pub(crate) _order: StreamOrder<'a>,
    pub(crate) _borrows: PhantomData<&'a mut ()>,
}

/// The validated KV-cache part of a call. For a contiguous cache k/v are `[batch, max_len,
/// kv_heads, d]`; for a paged one they are the pages `[num_pages, page_size, kv_heads, d]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvPart {
    /// int32 `[batch]`: keys in each sequence's cache, the new rows included.
    pub lens: Addr,
    /// Paged: int32 page ids, `batch` rows `table_stride` apart, `table_entries` in all (the
    /// validated `(batch - 1) * table_stride + pages_per_seq`).
    pub table: Option<Addr>,
    pub table_stride: usize,
    pub table_entries: usize,
    pub page_size: usize,
    pub num_pages: usize,
    /// Most keys a sequence can hold: lengths are clamped to it.
    pub max_len: usize,
    /// Caller-provided device scratch memory (address, bytes), validated: the decode's
    /// split-KV partials go there instead of a per-call allocation.
    pub workspace: Option<(Addr, usize)>,
    /// Packed queries: int32 `cu_seqlens_q`, `batch + 1` prefix sums over q's rows (q and out
    /// are `[1, total_q, heads, d]`, `problem.seqlen_q` the most rows of a sequence).
    pub query_starts: Option<Addr>,
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
            Addr::Device(_) | Addr::Slice(_) => None,
        };
        let out = match self.out.addr {
            Addr::Host(p) => std::slice::from_raw_parts_mut(p as *mut T, self.out.len),
            Addr::Device(_) | Addr::Slice(_) => return None,
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

/// `n` i32 values at a host address of a validated call (prefix sums, cache lengths, block
/// tables), for the CPU backend; device memory is an error naming `arg`.
///
/// # Safety
/// The address must come from a call built by validation that checked at least `n` values
/// there, and the borrow it came from must outlive the slice (it does while the call lives).
pub(crate) unsafe fn host_i32s<'a>(addr: Addr, n: usize, arg: &'static str) -> Result<&'a [i32], crate::error::Error> {
    match addr {
        Addr::Host(p) => Ok(std::slice::from_raw_parts(p as *const i32, n)),
        Addr::Device(_) | Addr::Slice(_) => Err(crate::error::Error::invalid(arg, "device memory", "host memory for the CPU backend")),
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

/// Orders a valid call's cudarc operands on the stream its kernels run on, for as long as the
/// call lives: the launch stream waits for each input's pending writes (and the outputs'
/// pending reads and writes) before the kernels, and the reads and writes are recorded after
/// them, when the call drops.
///
/// With a cudarc output, cudarc does both through its per-slice events on the output's stream.
/// With a raw output stream, which cudarc cannot wrap, each cudarc operand's own stream is
/// joined both ways with plain events: the launch stream waits for it before, and it waits for
/// the launch stream after (so the read cudarc records there covers the kernels).
pub(crate) struct StreamOrder<'c> {
    /// Streams to make wait for the launch stream before their guards record.
    pub(crate) joins: Vec<&'c CudaStream>,
    /// The raw launch stream the joins wait for.
    pub(crate) launch: CUstream,
    /// cudarc's guards: each records its read or write event when dropped, after `drop` ran.
    pub(crate) guards: Vec<SyncOnDrop<'c>>,
}

impl StreamOrder<'_> {
    pub(crate) fn none() -> Self {
        StreamOrder { joins: Vec::new(), launch: std::ptr::null_mut(), guards: Vec::new() }
    }
}

impl Drop for StreamOrder<'_> {
    fn drop(&mut self) {
        if self.joins.is_empty() {
            return;
        }
        // Errors here can only come from a broken context, which the next driver call reports;
        // a drop cannot return them.
        let done = (|| -> Result<(), result::DriverError> {
            self.joins[0].context().bind_to_thread()?;
            let event = result::event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
            // SAFETY: a live event and streams of the bound context; the event is destroyed
            // after the waits are enqueued, which CUDA allows (it is released when they finish).
            unsafe {
                let mut r = result::event::record(event, self.launch);
                for s in &self.joins {
                    if r.is_ok() {
                        r = result::stream::wait_event(s.cu_stream(), event, cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT);
                    }
                }
                let _ = result::event::destroy(event);
                r
            }
        })();
        if let Err(e) = done {
            log::warn!("attention: could not order an input's stream after the kernels: {e}");
        }
    }
}
