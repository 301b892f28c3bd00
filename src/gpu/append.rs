//! Appending new keys and values to a KV cache on the device (cuda/append.cu): a bit-exact copy
//! of each (token, kv head) row of `k_new`/`v_new` to the row its sequence's length (contiguous
//! cache) or its slot (paged cache, vLLM's `reshape_and_cache`) names. Lengths and slots are read
//! only by the kernel, which skips rows whose destination is outside the cache, so a CUDA graph
//! replays with new ones and a bad one writes a wrong row, never outside the caller's buffers.
//!
//! Not a backend of the chain: a copy has nothing to select. [`crate::Attention::append_kv`]
//! runs it for device caches (the CPU copies host ones), on the handle's device.

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::CUstream;

use super::device::{cuda_error, GpuDevice, Kernels, LoadedModule};
use super::params::strides;
use crate::backend::{BackendKind, RunError};
use crate::call::{Addr, Operand};
use crate::dtype::DType;
use crate::problem::MemoryKind;
use crate::error::{Error, Rejection};
use crate::settings::JitMode;
use crate::registry::{self, Family, Module};

const MODULE: &str = Module::Append.name();
/// Element copies and 16-byte vector copies, per dtype, from the kernel registry.
const FUNCTIONS: [&str; registry::count(Module::Append)] = registry::names(Module::Append);
/// Most blocks along x; a grid-stride loop covers what is past them.
const MAX_BLOCKS: usize = 1 << 16;

/// Mirrors `struct AppendParams` in cuda/append.cu (the kernel checks its size is 200).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AppendParams {
    src_stride: [[i64; 3]; 2],
    dst_stride: [[i64; 3]; 2],
    src: [u64; 2],
    dst: [u64; 2],
    lens: u64,
    slots: u64,
    cu_seqlens: u64,
    tokens: i64,
    num_slots: i64,
    new_len: i32,
    kv_heads: i32,
    row_vecs: i32,
    max_len: i32,
    page_size: i32,
    paged: i32,
    seqs: i32,
    max_q: i32,
}
const _: () = {
    assert!(std::mem::size_of::<AppendParams>() == 200);
    assert!(std::mem::offset_of!(AppendParams, src) == 96);
    assert!(std::mem::offset_of!(AppendParams, lens) == 128);
    assert!(std::mem::offset_of!(AppendParams, cu_seqlens) == 144);
    assert!(std::mem::offset_of!(AppendParams, tokens) == 152);
    assert!(std::mem::offset_of!(AppendParams, new_len) == 168);
    assert!(std::mem::offset_of!(AppendParams, paged) == 188);
    assert!(std::mem::offset_of!(AppendParams, max_q) == 196);
};

/// Packed rows of a contiguous append (`KvCacheMut::with_varlen_queries`): sequence `s`'s new
/// rows are tokens `cu_seqlens[s]..cu_seqlens[s + 1]`, at most `max_q` of them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PackedRows {
    /// int32 `[seqs + 1]` prefix sums, in the cache's memory.
    pub cu_seqlens: Addr,
    pub seqs: usize,
    pub max_q: usize,
}

/// Where the new rows go.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AppendTarget {
    /// A contiguous cache `[batch, max_len, kv_heads, d]`: row `i` of sequence `b` goes to
    /// position `lens[b] - new_len + i` (int32 lengths, the new rows included), or with packed
    /// rows `lens[b] - n + i`, `n` the sequence's count of them.
    Lens { lens: Addr, max_len: usize, packed: Option<PackedRows> },
    /// Pages `[num_pages, page_size, kv_heads, d]`: token `t` goes to slot `slots[t]` (int64,
    /// page `slot / page_size`, row `slot % page_size`; negative: skipped).
    Slots { slots: Addr, page_size: usize, num_pages: usize },
}

/// A validated append, as the launcher takes it: every operand checked (bounds, no overlap
/// between what is written and anything else), all in one memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AppendCall {
    pub dtype: DType,
    /// `[batch, new_len, kv_heads, d]`.
    pub k_new: Operand,
    pub v_new: Operand,
    pub k_cache: Operand,
    pub v_cache: Operand,
    pub target: AppendTarget,
    /// `batch * new_len`: rows of k_new, one slot each when paged.
    pub tokens: usize,
}

impl AppendCall {
    /// Whether every row can move as 16-byte vectors: the row, every base and every stride
    /// are multiples of 16 bytes.
    pub(crate) fn vectorised(&self) -> bool {
        let elem = self.dtype.size_bytes();
        (self.k_new.layout.head_dim() * elem).is_multiple_of(16)
            && [&self.k_new, &self.v_new, &self.k_cache, &self.v_cache].iter().all(|o| {
                // Strides are canonical and their byte offsets fit in isize (checked).
                o.addr.device_or_null().is_multiple_of(16) && o.layout.strides().iter().all(|s| (s * elem).is_multiple_of(16))
            })
    }

    fn params(&self) -> AppendParams {
        let elem = self.dtype.size_bytes();
        let d = self.k_new.layout.head_dim();
        let row_vecs = if self.vectorised() { d * elem / 16 } else { d };
        let (lens, slots, max_len, page_size, num_slots, paged) = match self.target {
            AppendTarget::Lens { lens, max_len, .. } => (lens.device_or_null(), 0, max_len, 0, 0, 0),
            // num_pages * page_size is at most the pages' element count: it fits.
            AppendTarget::Slots { slots, page_size, num_pages } => (0, slots.device_or_null(), 0, page_size, num_pages * page_size, 1),
        };
        // Null prefix sums: the kernel's fixed-length path.
        let (cu_seqlens, seqs, max_q) = match self.target {
            AppendTarget::Lens { packed: Some(p), .. } => (p.cu_seqlens.device_or_null(), p.seqs, p.max_q),
            _ => (0, 0, 0),
        };
        AppendParams {
            src_stride: [strides(&self.k_new), strides(&self.v_new)],
            dst_stride: [strides(&self.k_cache), strides(&self.v_cache)],
            src: [self.k_new.addr.device_or_null(), self.v_new.addr.device_or_null()],
            dst: [self.k_cache.addr.device_or_null(), self.v_cache.addr.device_or_null()],
            lens,
            slots,
            cu_seqlens,
            tokens: self.tokens as i64,
            num_slots: num_slots as i64,
            new_len: self.k_new.layout.seqlen() as i32,
            kv_heads: self.k_new.layout.heads() as i32,
            row_vecs: row_vecs as i32,
            max_len: max_len as i32,
            page_size: page_size as i32,
            paged,
            // Validated: at most the cache's batch and MAX_DIM, both i32.
            seqs: seqs as i32,
            max_q: max_q as i32,
        }
    }

    /// A short description for errors: `bf16 append of 128 rows x 8 kv heads x d128 (paged)`.
    fn describe(&self) -> String {
        let kind = match self.target {
            AppendTarget::Lens { packed: None, .. } => "contiguous".to_string(),
            AppendTarget::Lens { packed: Some(p), .. } => format!("contiguous, {} sequences of packed rows", p.seqs),
            AppendTarget::Slots { page_size, .. } => format!("paged, {page_size} rows per page"),
        };
        format!(
            "{} K/V append of {} rows x {} kv heads x d{} ({kind})",
            self.dtype.name(),
            self.tokens,
            self.k_new.layout.heads(),
            self.k_new.layout.head_dim()
        )
    }
}

/// The append kernels on one device.
pub(crate) struct AppendKernels {
    kernels: Kernels,
}

impl AppendKernels {
    pub(crate) fn new(device: Option<Arc<GpuDevice>>, jit: JitMode, cache_dir: Option<PathBuf>) -> Self {
        AppendKernels { kernels: Kernels::new(device, MODULE, &FUNCTIONS, jit, cache_dir) }
    }

    /// The device and the loaded module; why not (no device, no kernel image) as the error a
    /// call that no backend can run gets.
    pub(crate) fn loaded(&self, call: &AppendCall) -> Result<(&GpuDevice, Arc<LoadedModule>), Error> {
        self.kernels.loaded().map_err(|e| unavailable(call, e))
    }

    /// Checks every operand against its allocation on `dev` and launches the copy on `stream`.
    /// Nothing is allocated and nothing waits on the host: capturable in a CUDA graph.
    /// `memory` is the validated operands' memory: a cudarc slice's device must be `dev` (raw
    /// pointers are asked of the driver below).
    pub(crate) fn launch(dev: &GpuDevice, module: &LoadedModule, call: &AppendCall, memory: MemoryKind, stream: CUstream) -> Result<(), Error> {
        if let MemoryKind::Device { ordinal } = memory {
            if ordinal != usize::MAX {
                dev.check_device("k_cache", ordinal)?;
            }
        }
        dev.ctx.bind_to_thread().map_err(|e| cuda_error("cuCtxSetCurrent", e.0))?;
        let elem = call.dtype.size_bytes() as u64;
        for (name, o) in [("k_new", &call.k_new), ("v_new", &call.v_new), ("k_cache", &call.k_cache), ("v_cache", &call.v_cache)] {
            dev.check_addr(name, o.addr, o.layout.span().unwrap_or(0) as u64 * elem, "k_cache")?;
        }
        match call.target {
            AppendTarget::Lens { lens, packed, .. } => {
                dev.check_addr("cache_lens", lens, call.k_cache.layout.batch() as u64 * 4, "k_cache")?;
                if let Some(p) = packed {
                    dev.check_addr("cu_seqlens_q", p.cu_seqlens, (p.seqs as u64 + 1) * 4, "k_cache")?;
                }
            }
            AppendTarget::Slots { slots, .. } => dev.check_addr("slot_mapping", slots, call.tokens as u64 * 8, "k_cache")?,
        }
        let family = if call.vectorised() { Family::AppendVec16 } else { Family::Append };
        let kernel = registry::lookup(family, super::elem(call.dtype), 0).expect("the registry has an append kernel per dtype");
        let func = module.launchable(kernel.name).map_err(|e| unavailable(call, e))?;
        let mut params = call.params();
        let items = call.tokens * call.k_new.layout.heads() * params.row_vecs as usize;
        let threads = kernel.threads() as usize;
        let blocks = items.div_ceil(threads).clamp(1, MAX_BLOCKS);
        let mut args = [&mut params as *mut AppendParams as *mut c_void];
        // SAFETY: one argument, a live AppendParams as the entry point declares it; every
        // pointer inside was checked against its allocation above, and the kernel writes only
        // rows of k_cache/v_cache inside their layouts (destinations outside are skipped).
        unsafe { result::launch_kernel(func.cu_function(), (blocks as u32, 2, 1), (threads as u32, 1, 1), 0, stream, &mut args) }
            .map_err(|e| cuda_error("cuLaunchKernel", e.0))
    }
}

/// A failure to have the append kernels (no device, no image, no function), as the error of a
/// call that no backend can run: fatal errors stay as they are.
fn unavailable(call: &AppendCall, e: RunError) -> Error {
    match e {
        RunError::Fatal(e) => e,
        RunError::Recoverable(reason) => Error::NoBackend {
            problem: call.describe(),
            // The append kernels ship with the decode backend's KV-cache kernels.
            rejections: vec![Rejection { backend: BackendKind::Decode, reasons: vec![reason] }],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    fn op(addr: u64, layout: Layout) -> Operand {
        Operand { addr: Addr::Device(addr), len: layout.span().unwrap(), layout: layout.canonical() }
    }

    #[test]
    fn vector_copies_need_16_byte_rows_bases_and_strides() {
        let (n, c) = (Layout::contiguous(2, 1, 8, 128), Layout::contiguous(2, 64, 8, 128));
        let call = |d: DType, new: Layout, cache: Layout, base: u64| AppendCall {
            dtype: d,
            k_new: op(base, new),
            v_new: op(1 << 20, new),
            k_cache: op(2 << 20, cache),
            v_cache: op(3 << 20, cache),
            target: AppendTarget::Lens { lens: Addr::Device(4 << 20), max_len: cache.seqlen(), packed: None },
            tokens: new.batch() * new.seqlen(),
        };
        assert!(call(DType::BF16, n, c, 0).vectorised());
        assert_eq!(call(DType::BF16, n, c, 0).params().row_vecs, 16);
        // A base 2 bytes off: element copies.
        assert!(!call(DType::BF16, n, c, 2).vectorised());
        assert_eq!(call(DType::BF16, n, c, 2).params().row_vecs, 128);
        // head_dim 36 f16 = 72 bytes: element copies; f32 36 = 144 bytes: vectors.
        let (n36, c36) = (Layout::contiguous(2, 1, 8, 36), Layout::contiguous(2, 64, 8, 36));
        assert!(!call(DType::F16, n36, c36, 0).vectorised());
        assert!(call(DType::F32, n36, c36, 0).vectorised());
        // Paged: slots and the pages' slot count reach the kernel.
        let mut paged = call(DType::F16, n, Layout::contiguous(10, 16, 8, 128), 0);
        paged.target = AppendTarget::Slots { slots: Addr::Device(8 << 20), page_size: 16, num_pages: 10 };
        let p = paged.params();
        assert_eq!((p.paged, p.num_slots, p.page_size, p.slots, p.lens), (1, 160, 16, 8 << 20, 0));
        assert_eq!((p.cu_seqlens, p.seqs, p.max_q), (0, 0, 0));
        // Packed rows: the prefix sums, the sequences and the bound reach the kernel.
        let mut packed = call(DType::BF16, Layout::contiguous(1, 5, 8, 128), c, 0);
        packed.target =
            AppendTarget::Lens { lens: Addr::Device(4 << 20), max_len: 64, packed: Some(PackedRows { cu_seqlens: Addr::Device(12 << 20), seqs: 2, max_q: 4 }) };
        let p = packed.params();
        assert_eq!((p.paged, p.cu_seqlens, p.seqs, p.max_q, p.tokens, p.new_len), (0, 12 << 20, 2, 4, 5, 5));
    }
}
