//! The decode backend: FlashDecoding-style kernels (cuda/decode.cu) for a few query rows per
//! sequence against long keys, the main inference workload. GQA-packed (the query heads of a KV
//! head share every K/V read), split-KV with a log-sum-exp combine when batch × kv_heads cannot
//! fill the GPU, contiguous or paged caches with per-sequence lengths read only on the device.
//! Memory-bound: two kernel families read K/V with plain 16-byte loads straight into registers.
//! On sm_80+ for f16/bf16 the products run on mma.sync (cuda/decode_tc.cu: 8 packed rows per
//! block, few instructions per byte); elsewhere (sm_75, f32) on f32 FMAs (cuda/decode.cu).
//!
//! It ranks first: every dense problem with at most [`MAX_QUERY_ROWS`] query rows per sequence runs
//! here, `forward` (dense K/V, every sequence `seqlen_k` long) as well as `forward_kvcache`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use cudarc::driver::{result, CudaFunction};
use cudarc::driver::sys::CUresult;

use super::device::{cuda_error, device_addr, driver_error_text, is_sticky, GpuDevice, Kernels};
use super::params::{active_clusters, launch, launch_clustered, launch_dependent, resident_blocks, strides, window_arg};
use crate::backend::{Backend, BackendKind, Capabilities, Reason, RunError, MAX_GRID_YZ};
use crate::caps::{ComputeCapability, DeviceCaps};
use crate::dtype::DType;
use crate::problem::Problem;
use crate::settings::JitMode;
use crate::call::{Addr, Call};
use crate::registry::{self, Kernel, Module};
use super::elem;

/// The most query rows per sequence of a dense problem the decode kernels take (speculative
/// decoding sends up to about 16); longer dense queries are prefills, which the tiled backends
/// run. KV-cache calls run here at any query length (chunked prefill against a cache): every
/// group of 8 packed rows reads its sequence's keys, correct but not a tiled prefill.
pub(crate) const MAX_QUERY_ROWS: usize = 16;
/// The largest head_dim a kernel is specialised for (the CUDA-core module has every dtype): a
/// K/V row is one warp's 16-byte loads at most, 256 columns of a 16-bit type, 128 of f32.
fn max_head_dim(dtype: DType) -> usize {
    let e = elem(dtype);
    Module::Decode.kernels().filter(|k| k.dtype == e).map(|k| k.head_dim as usize).max().unwrap_or(0)
}
/// Warps per block of the main kernels, unless a plan takes the tensor-core family's two-warp
/// kernels.
const WARPS: usize = registry::DECODE_WARPS as usize;
/// Threads per block of the combine.
const COMBINE_THREADS: usize = registry::DECODE_COMBINE_THREADS as usize;
/// Fewest keys a split takes (`min_chunk`): below it a split costs more than it saves.
const MIN_CHUNK: usize = 64;
/// Most splits of one sequence: bounds the workspace, and the combine reads one split's lse per
/// thread.
const MAX_SPLITS: usize = COMBINE_THREADS;
/// Waves of blocks a split grid aims for: one. Measured on the H200 (bf16 GQA 32/8 d128, the
/// decode bench's waves table), one wave of long blocks beats 2, 3 and 4 waves of shorter ones at
/// every split shape: batch 1 at 8k/32k/128k keys 1.95/2.96/4.02 TB/s against 1.55/2.53/3.82 at
/// two waves, batch 16 at 8k 4.09 against 3.95 (fewer block starts and tails, a shorter combine).
const WAVES: usize = 1;
// Bench-only switches, set through `attention::testing` to measure grid shapes and the
// combine's share on one device; process-wide. A count of 0 means the default.
/// Overrides [`WAVES`].
static WAVES_OVERRIDE: AtomicUsize = AtomicUsize::new(0);
/// Caps the split count below [`MAX_SPLITS`].
static SPLITS_CAP: AtomicUsize = AtomicUsize::new(0);
/// Launches split grids without their combine (wrong outputs), to time the main kernel alone.
static SKIP_COMBINE: AtomicBool = AtomicBool::new(false);
/// Runs the tensor-core family on its two-warp kernels where built (d64, d128).
static TWO_WARP_BLOCKS: AtomicBool = AtomicBool::new(false);
/// How split grids merge (`crate::testing::DecodeMerge` as its index): 0 the plan's rule.
static MERGE: AtomicUsize = AtomicUsize::new(0);
/// Streamed K/V loads (`crate::testing::DecodeLoads` as its index): 0 the plan's rule.
static LOADS: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn set_waves(waves: usize) {
    WAVES_OVERRIDE.store(waves, Ordering::Relaxed);
}

pub(crate) fn set_max_splits(splits: usize) {
    SPLITS_CAP.store(splits, Ordering::Relaxed);
}

pub(crate) fn set_skip_combine(skip: bool) {
    SKIP_COMBINE.store(skip, Ordering::Relaxed);
}

pub(crate) fn set_two_warp_blocks(two: bool) {
    TWO_WARP_BLOCKS.store(two, Ordering::Relaxed);
}

pub(crate) fn set_merge(merge: crate::testing::DecodeMerge) {
    MERGE.store(merge as usize, Ordering::Relaxed);
}

pub(crate) fn set_loads(loads: crate::testing::DecodeLoads) {
    LOADS.store(loads as usize, Ordering::Relaxed);
}

/// Most K/V bytes a call reads for which the tensor-core kernels stream them (evict-first in L2,
/// not kept in L1): a short call then leaves the L2's other lines (dirty ones included) where
/// they are; a long one that streams far more than L2 holds measured slower with the hint.
const STREAM_MAX_BYTES: usize = 192 << 20;

/// Whether `p` runs on the streamed (`_ef`) kernels, by [`STREAM_MAX_BYTES`] or the bench switch.
fn wants_streamed(p: &Problem) -> bool {
    use crate::testing::DecodeLoads;
    match LOADS.load(Ordering::Relaxed) {
        l if l == DecodeLoads::Plain as usize => false,
        l if l == DecodeLoads::Streamed as usize => true,
        _ => {
            // Saturating: a KV cache's capacity is checked against its pages, not this product.
            let bytes = [p.batch, p.kv_heads, p.seqlen_k, p.head_dim, p.dtype.size_bytes()].iter().fold(2usize, |b, &x| b.saturating_mul(x));
            bytes <= STREAM_MAX_BYTES
        }
    }
}

/// A switch's count, or `default` where it is 0.
fn count_or(switch: &AtomicUsize, default: usize) -> usize {
    match switch.load(Ordering::Relaxed) {
        0 => default,
        n => n,
    }
}

fn waves() -> usize {
    count_or(&WAVES_OVERRIDE, WAVES)
}

fn splits_cap() -> usize {
    count_or(&SPLITS_CAP, MAX_SPLITS).min(MAX_SPLITS)
}

/// Most split blocks of one thread block cluster (sm_90's non-portable cluster size).
const MAX_CLUSTER: usize = registry::DECODE_MAX_CLUSTER as usize;
/// Most keys per split for which a split grid larger than one cluster is cut down to one
/// cluster instead of merging by the combine. Measured on the H200 (bf16 GQA 32/8 d128, batch
/// 1, the decode bench's merge table): 16 splits in a cluster against 33 and the combine, +12%
/// at 4k keys (256 per split), equal at 8k (512), 15% slower at 32k.
const CLUSTER_CAP_KEYS: usize = 512;

/// How many clusters of each size (index: blocks per cluster, up to [`MAX_CLUSTER`]) the device
/// runs at once for one kernel; all 0 where clusters are not available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ClusterRoom([usize; MAX_CLUSTER + 1]);

impl ClusterRoom {
    /// The room for clusters of both kernels, size by size.
    fn min(mut self, other: ClusterRoom) -> ClusterRoom {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = (*a).min(b);
        }
        self
    }

    /// Whether `clusters` clusters of `size` blocks all run at once: a grid that needed a
    /// second wave of clusters measured far slower than the combine (1.1 against 1.9 TB/s).
    fn holds(&self, size: usize, clusters: usize) -> bool {
        size >= 2 && size <= MAX_CLUSTER && clusters <= self.0[size]
    }
}

/// Blocks of a decode kernel one SM holds, where the driver has not said (a simulated device,
/// `explain` before the module is loaded): what ~220 registers per thread allow.
const DEFAULT_RESIDENT_PER_SM: usize = 2;

const MODULE: &str = Module::Decode.name();
/// Every entry point of cuda/decode.cu, from the kernel registry.
const FUNCTIONS: [&str; registry::count(Module::Decode)] = registry::names(Module::Decode);
/// The tensor-core family's module (sm_80+): 8 packed rows per block, and the same combine.
const TC_MODULE: &str = Module::DecodeTc.name();
const TC_FUNCTIONS: [&str; registry::count(Module::DecodeTc)] = registry::names(Module::DecodeTc);
/// Packed rows per block of the tensor-core kernels (the n of mma m16n8k16).
const TC_ROWS: usize = registry::DECODE_TC_ROWS as usize;

/// Mirrors `struct DecodeParams` in cuda/decode.cuh (the kernel checks its size is 256).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DecodeParams {
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    o_stride: [i64; 3],
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    lens: u64,
    block_table: u64,
    part_o: u64,
    part_lse: u64,
    table_stride: i64,
    batch: i32,
    heads: i32,
    kv_group: i32,
    q_len: i32,
    head_dim: i32,
    max_len: i32,
    page_size: i32,
    num_pages: i32,
    splits: i32,
    min_chunk: i32,
    window_left: i32,
    window_right: i32,
    causal: i32,
    scale: f32,
    softcap: f32,
    rows_per_block: i32,
    cu_seqlens_q: u64,
    total_q: i32,
    cluster_merge: i32,
}
const _: () = {
    assert!(std::mem::size_of::<DecodeParams>() == 256);
    assert!(std::mem::offset_of!(DecodeParams, cu_seqlens_q) == 240);
    assert!(std::mem::offset_of!(DecodeParams, lse) == 128);
    assert!(std::mem::offset_of!(DecodeParams, table_stride) == 168);
    assert!(std::mem::offset_of!(DecodeParams, batch) == 176);
    assert!(std::mem::offset_of!(DecodeParams, scale) == 228);
    assert!(std::mem::offset_of!(DecodeParams, rows_per_block) == 236);
};

/// Which kernel family runs a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    /// cuda/decode_tc.cu: mma.sync, sm_80+, f16 and bf16.
    TensorCore,
    /// cuda/decode.cu: f32 FMAs, every arch and dtype.
    Simt,
}

impl Family {
    /// The family's main kernels in the registry.
    const fn registry(self) -> registry::Family {
        match self {
            Family::TensorCore => registry::Family::DecodeTc,
            Family::Simt => registry::Family::DecodeSimt,
        }
    }
}

/// How one problem runs: the kernel and its grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    family: Family,
    /// The head_dim the kernel is built for (64, 128, 256; smaller ones run zero-filled).
    head_dim: usize,
    /// Packed rows (query heads of a KV head × query positions) per block: 4 or 8.
    rows: usize,
    /// Blocks along the rows of one KV head.
    row_groups: usize,
    /// Blocks sharing one sequence's keys (1: no workspace, no combine).
    splits: usize,
    /// Warps per block.
    warps: usize,
    /// Whether K/V loads stream (the `_ef` kernels: evict-first in L2, not kept in L1).
    streamed: bool,
    /// Whether the splits of a sequence are one thread block cluster that merges through
    /// distributed shared memory (sm_90+: no workspace, no combine kernel).
    cluster: bool,
}

impl Plan {
    /// The plan for a problem on a device with `sm_count` SMs, on the given kernel family
    /// whose kernel fits `per_sm` blocks on an SM. The split count fills [`WAVES`] whole waves
    /// (rounding down): a grid a fraction of a wave past whole waves leaves SMs idle for that
    /// fraction's time, since a memory-bound kernel's blocks all take about as long.
    pub(crate) fn of(p: &Problem, sm_count: usize, family: Family, per_sm: usize) -> Plan {
        let packed = (p.heads / p.kv_heads.max(1)) * p.seqlen_q;
        let rows = match family {
            Family::TensorCore => TC_ROWS,
            Family::Simt if packed <= 4 => 4,
            Family::Simt => 8,
        };
        let row_groups = packed.div_ceil(rows).max(1);
        let blocks = p.batch * p.kv_heads * row_groups;
        // Four-warp blocks; two-warp ones (where built: d64, d128) only by the bench switch so
        // far. Candidate rule, not yet adopted: two warps when four-warp blocks need no split and
        // more than one wave (twice as many fit an SM, so one block's start and drain overlap
        // others' streaming). Measured +1-3% at batch 64 and 128 and 5-14% slower at batch 1,
        // but only in builds whose loop also read bench switches and ran 5-7% slow; it needs a
        // measurement against the plain kernel before it becomes the plan's.
        let two = family == Family::TensorCore
            && TWO_WARP_BLOCKS.load(Ordering::Relaxed)
            && Self::kernel_of(family, p.dtype, p.head_dim, rows, 2, false).is_some();
        let warps = if two { 2 } else { WARPS };
        // The smallest bucket at or above head_dim (validation keeps it within the largest).
        let head_dim = Self::kernel_of(family, p.dtype, p.head_dim, rows, warps, false)
            .map(|k| k.head_dim as usize)
            .unwrap_or(max_head_dim(p.dtype));
        let streamed = wants_streamed(p) && Self::kernel_of(family, p.dtype, head_dim, rows, warps, true).is_some();
        let wanted = (sm_count * per_sm.max(1) * waves()) / blocks.max(1);
        let most = p.seqlen_k.div_ceil(MIN_CHUNK).clamp(1, splits_cap());
        Plan { family, head_dim, rows, row_groups, splits: wanted.clamp(1, most), warps, streamed, cluster: false }
    }

    /// The plan with its splits merged inside one thread block cluster (sm_90+), where the
    /// device runs every cluster of the grid at once (`room`): the second launch, its workspace
    /// and the round trips through L2 that the combine costs a short call are gone. A split
    /// count above the largest cluster is capped to it where each split then takes at most
    /// [`CLUSTER_CAP_KEYS`] keys. (Bench switch: always the combine, or always capped.)
    fn merged_in_cluster(mut self, p: &Problem, room: &ClusterRoom) -> Plan {
        use crate::testing::DecodeMerge;
        let capable = Self::kernel_of(self.family, p.dtype, self.head_dim, self.rows, self.warps, self.streamed)
            .is_some_and(|k| k.merges_in_cluster());
        if !capable || self.splits < 2 {
            return self;
        }
        let groups = p.batch * p.kv_heads * self.row_groups; // clusters in the grid
        let fits = |splits: usize| room.holds(splits, groups);
        let capped = self.splits.min(MAX_CLUSTER);
        let (splits, cluster) = match MERGE.load(Ordering::Relaxed) {
            m if m == DecodeMerge::Combine as usize => (self.splits, false),
            m if m == DecodeMerge::ClusterCapped as usize => (capped, fits(capped)),
            _ if self.splits <= MAX_CLUSTER => (self.splits, fits(self.splits)),
            _ => (capped, fits(capped) && p.seqlen_k.div_ceil(capped) <= CLUSTER_CAP_KEYS),
        };
        if cluster {
            self.splits = splits;
            self.cluster = true;
        }
        self
    }

    /// The registry's kernel of `family` for `dtype` with `rows` packed rows, `warps` warps per
    /// block and streamed loads or not whose head_dim bucket is the smallest at or above
    /// `head_dim`.
    fn kernel_of(family: Family, dtype: DType, head_dim: usize, rows: usize, warps: usize, streamed: bool) -> Option<&'static Kernel> {
        let (e, f) = (elem(dtype), family.registry());
        let fits = |k: &&Kernel| {
            k.family == f
                && k.dtype == e
                && k.head_dim as usize >= head_dim
                && k.block_m() as usize == rows
                && k.warps() as usize == warps
                && k.streams_loads() == streamed
        };
        registry::KERNELS.iter().filter(fits).min_by_key(|k| k.head_dim)
    }

    /// The main kernel's entry name.
    fn function(&self, dtype: DType) -> &'static str {
        self.kernel(dtype, self.streamed)
    }

    /// The entry name of the plan's kernel with streamed loads or not.
    fn kernel(&self, dtype: DType, streamed: bool) -> &'static str {
        Self::kernel_of(self.family, dtype, self.head_dim, self.rows, self.warps, streamed).map_or("(no decode kernel)", |k| k.name)
    }

    /// What `explain` shows: the kernel, its grid and the split count.
    fn describe(&self, p: &Problem) -> String {
        let combine = match (self.splits > 1, self.cluster) {
            (false, _) => "",
            (true, false) => " + combine",
            (true, true) => " merged in one cluster",
        };
        format!(
            "kernel {} grid {}x{}x{}, {} split{} of each sequence's keys{combine}",
            self.function(p.dtype),
            self.splits,
            p.kv_heads * self.row_groups,
            p.batch,
            self.splits,
            if self.splits == 1 { "" } else { "s" }
        )
    }

    /// Workspace bytes: a normalised f32 partial output and an lse per split and row.
    fn workspace_bytes(&self, p: &Problem) -> usize {
        if self.splits == 1 || self.cluster {
            return 0;
        }
        self.splits * self.split_bytes(p)
    }

    /// Workspace bytes of one split.
    fn split_bytes(&self, p: &Problem) -> usize {
        p.batch * p.heads * p.seqlen_q * (p.head_dim + 1) * 4
    }
}

/// Elements per 16-byte vector: the head_dim must be a multiple of it.
fn vector_elems(dtype: DType) -> usize {
    16 / dtype.size_bytes()
}

/// A kernel pair resolved once per kind of problem: what the hot path launches without a
/// module lookup, a name formatted or a lock held beyond one read.
#[derive(Clone)]
struct Resolved {
    family: Family,
    main: CudaFunction,
    combine: CudaFunction,
    /// `main`'s twin with streamed K/V loads, where built.
    streamed: Option<CudaFunction>,
    /// Blocks of `main` an SM holds (the driver's occupancy).
    per_sm: usize,
    /// Whether the combine may be a programmatic dependent launch (code for sm_90+).
    programmatic: bool,
    /// Clusters of n blocks of `main` the device runs at once, by n (code for sm_90+; all 0:
    /// no clusters).
    clusters: ClusterRoom,
}

impl Resolved {
    /// The plan for `p` on these kernels: split count by their occupancy, merged in a cluster
    /// where the device has room for the grid's clusters.
    fn plan(&self, p: &Problem, sm_count: usize) -> Plan {
        Plan::of(p, sm_count, self.family, self.per_sm).merged_in_cluster(p, &self.clusters)
    }
}

/// What chooses the kernels: dtype, the head_dim bucket, whether packed rows fit 4, and whether
/// the tensor-core family runs two-warp blocks (the bench switch).
type KernelKey = (DType, usize, bool, bool);

/// The decode backend on one device.
pub(crate) struct DecodeBackend {
    simt: Kernels,
    tc: Kernels,
    /// Kernels per kind of problem, resolved on first use.
    resolved: RwLock<HashMap<KernelKey, Resolved>>,
}

impl DecodeBackend {
    pub(crate) fn new(device: Option<Arc<GpuDevice>>, jit: JitMode, cache_dir: Option<PathBuf>) -> Self {
        DecodeBackend {
            simt: Kernels::new(device.clone(), MODULE, &FUNCTIONS, jit, cache_dir.clone()),
            tc: Kernels::new(device, TC_MODULE, &TC_FUNCTIONS, jit, cache_dir),
            resolved: RwLock::new(HashMap::new()),
        }
    }

    /// How the modules were (or would be) loaded on the device, for diagnostics.
    pub(crate) fn image_description(&self) -> Option<String> {
        let simt = self.simt.image_description()?;
        let tc = self.tc.image_description()?;
        Some(format!("{tc} (tensor cores); {simt} (CUDA cores)"))
    }

    /// The family that runs `problem`: tensor cores for 16-bit types where their module can be
    /// had (sm_80+), else the CUDA-core kernels.
    fn family(&self, caps: &DeviceCaps, problem: &Problem) -> Family {
        if problem.dtype != DType::F32 && self.tc.unavailable(caps).is_none() {
            Family::TensorCore
        } else {
            Family::Simt
        }
    }

    /// The kernels that run `p` on the device: a read of the cache after the first call.
    fn resolve(&self, caps: &DeviceCaps, p: &Problem) -> Result<Resolved, RunError> {
        let probe = Plan::of(p, caps.sm_count as usize, Family::Simt, DEFAULT_RESIDENT_PER_SM);
        let key = (p.dtype, probe.head_dim, probe.rows == 4, TWO_WARP_BLOCKS.load(Ordering::Relaxed));
        if let Some(r) = self.resolved.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(r.clone());
        }
        let family = self.family(caps, p);
        let (dev, module) = self.kernels(family).loaded()?;
        // The kernel's name and warps do not depend on the split count: name it, then ask its
        // occupancy.
        let plan = Plan::of(p, caps.sm_count as usize, family, DEFAULT_RESIDENT_PER_SM);
        let main = module.launchable(plan.kernel(p.dtype, false))?.clone();
        let streamed = match Plan::kernel_of(family, p.dtype, plan.head_dim, plan.rows, plan.warps, true) {
            Some(k) => Some(module.launchable(k.name)?.clone()),
            None => None,
        };
        let combine = registry::lookup(registry::Family::DecodeCombine, elem(p.dtype), 0).map_or("(no combine)", |k| k.name);
        let combine = module.launchable(combine)?.clone();
        let per_sm = resident_blocks(&main, plan.warps * 32, 0).unwrap_or(DEFAULT_RESIDENT_PER_SM);
        let programmatic = module.source.compiled_for(dev.caps.cc) >= ComputeCapability::new(9, 0);
        // Asked of both kernels a plan may launch in clusters (which also lets each take sizes
        // above the portable 8), where they hold the merge: the room of the one with fewer.
        let mut clusters = ClusterRoom::default();
        let merges = Plan::kernel_of(family, p.dtype, plan.head_dim, plan.rows, plan.warps, false).is_some_and(|k| k.merges_in_cluster());
        if programmatic && merges {
            clusters = ClusterRoom([usize::MAX; MAX_CLUSTER + 1]);
            for f in std::iter::once(&main).chain(&streamed) {
                let mut room = ClusterRoom::default();
                active_clusters(f, plan.warps * 32, &mut room.0);
                clusters = clusters.min(room);
            }
        }
        let r = Resolved { family, main, combine, streamed, per_sm, programmatic, clusters };
        self.resolved.write().unwrap_or_else(|e| e.into_inner()).insert(key, r.clone());
        Ok(r)
    }

    /// The plan `forward` would make: on a real device, sized by the occupancy of the kernel
    /// that would run; elsewhere by [`DEFAULT_RESIDENT_PER_SM`].
    fn plan(&self, caps: &DeviceCaps, problem: &Problem) -> Plan {
        let sm_count = caps.sm_count as usize;
        match self.simt.device().map(|_| self.resolve(caps, problem)) {
            Some(Ok(r)) => r.plan(problem, sm_count),
            _ => Plan::of(problem, sm_count, self.family(caps, problem), DEFAULT_RESIDENT_PER_SM),
        }
    }

    fn kernels(&self, family: Family) -> &Kernels {
        match family {
            Family::TensorCore => &self.tc,
            Family::Simt => &self.simt,
        }
    }
}

/// What decode runs: at most [`MAX_QUERY_ROWS`] query rows per sequence of a dense problem
/// (KV-cache calls at any length), every arch from sm_75
/// and every dtype (16-byte loads and f32 FMAs, no tensor cores), head_dim a multiple of one
/// 16-byte vector and at most one warp's worth of them, 16-byte aligned tensors.
const CAPABILITIES: Capabilities = Capabilities {
    min_cc: ComputeCapability::new(7, 5),
    dtypes: &[
        (DType::F16, ComputeCapability::new(7, 5)),
        (DType::BF16, ComputeCapability::new(7, 5)),
        (DType::F32, ComputeCapability::new(7, 5)),
    ],
    dtypes_text: "f16, bf16, f32",
    max_head_dim: max_head_dim,
    head_dim_multiple: vector_elems,
    needs_alignment: true,
    varlen: false,
    max_query_rows: Some(MAX_QUERY_ROWS),
    heads_and_batch_on_the_grid: false,
};

impl Backend for DecodeBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Decode
    }

    fn runs_kv_cache(&self) -> bool {
        true
    }

    /// One check per constraint; a prefill is not a fallback from here (not applicable).
    fn check(&self, caps: &DeviceCaps, problem: &Problem) -> Vec<Reason> {
        let mut reasons = CAPABILITIES.reasons(caps, problem);
        if reasons.iter().any(|r| matches!(r, Reason::NotADecode { .. } | Reason::ComputeCapability { .. })) {
            return reasons; // not for this problem or device: nothing else applies
        }
        // The grid is (splits, kv heads x row groups, batch).
        let family = self.family(caps, problem);
        let plan = Plan::of(problem, caps.sm_count as usize, family, DEFAULT_RESIDENT_PER_SM);
        for (dim, found) in [("batch", problem.batch), ("kv heads x row groups", problem.kv_heads * plan.row_groups)] {
            if found > MAX_GRID_YZ {
                reasons.push(Reason::GridLimit { dim, found, max: MAX_GRID_YZ });
            }
        }
        reasons.extend(self.kernels(family).unavailable(caps));
        reasons
    }

    fn plan_summary(&self, caps: &DeviceCaps, problem: &Problem) -> Option<String> {
        Some(self.plan(caps, problem).describe(problem))
    }

    fn workspace_bytes(&self, caps: &DeviceCaps, problem: &Problem) -> usize {
        if !self.check(caps, problem).is_empty() {
            return 0;
        }
        self.plan(caps, problem).workspace_bytes(problem)
    }

    fn forward(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        let dev = self.simt.device().ok_or_else(|| {
            RunError::Recoverable(Reason::NoDevice { why: "no device was probed".into() })
        })?;
        let r = self.resolve(&dev.caps, &call.problem)?;
        dev.prepare(call)?;
        let p = &call.problem;
        let mut plan = r.plan(p, dev.caps.sm_count as usize);
        // A caller's workspace bounds the split count of a grid that needs one (none at all
        // below two splits' worth).
        let given = call.kv.as_ref().and_then(|kv| kv.workspace);
        if let (Some((_, bytes)), false) = (given, plan.cluster) {
            plan.splits = plan.splits.min(bytes / plan.split_bytes(p).max(1)).max(1);
        }
        let (lens, table, table_stride, page_size, num_pages, max_len) = match &call.kv {
            Some(kv) => (kv.lens.device_or_null(), kv.table.map(Addr::device_or_null).unwrap_or(0), kv.table_stride, kv.page_size, kv.num_pages, kv.max_len),
            // Dense K/V: every sequence is seqlen_k long (no length array).
            None => (0, 0, 0, p.seqlen_k, 0, p.seqlen_k),
        };
        let mut params = DecodeParams {
            q_stride: strides(&call.q),
            k_stride: strides(&call.k),
            v_stride: strides(&call.v),
            o_stride: strides(&call.out),
            q: device_addr(&call.q),
            k: device_addr(&call.k),
            v: device_addr(&call.v),
            o: device_addr(&call.out),
            lse: call.lse.as_ref().map(device_addr).unwrap_or(0),
            lens,
            block_table: table,
            part_o: 0,
            part_lse: 0,
            table_stride: table_stride as i64,
            batch: p.batch as i32,
            heads: p.heads as i32,
            kv_group: (p.heads / p.kv_heads) as i32,
            q_len: p.seqlen_q as i32,
            head_dim: p.head_dim as i32,
            max_len: max_len as i32,
            page_size: page_size as i32,
            num_pages: num_pages as i32,
            splits: plan.splits as i32,
            min_chunk: MIN_CHUNK as i32,
            window_left: window_arg(call.mask.left),
            window_right: window_arg(call.mask.right),
            causal: p.causal as i32,
            scale: call.scale,
            softcap: call.softcap.unwrap_or(0.0),
            rows_per_block: plan.rows as i32,
            cu_seqlens_q: call.kv.as_ref().and_then(|kv| kv.query_starts).map(Addr::device_or_null).unwrap_or(0),
            total_q: call.q.layout.seqlen() as i32,
            cluster_merge: plan.cluster as i32,
        };
        let stream = call.stream;
        let bytes = plan.workspace_bytes(p);
        let workspace = if bytes == 0 {
            None
        } else if let Some((addr, _)) = given {
            // Fits: the split count was bounded by it above.
            params.part_o = addr.device_or_null();
            None
        } else {
            // SAFETY: stream-ordered allocation on the call's stream, freed below on it after
            // the kernels that use it (capturable in a CUDA graph as allocation nodes).
            match unsafe { result::malloc_async(stream, bytes) } {
                Ok(ptr) => Some(ptr),
                Err(e) if is_sticky(e.0) => return Err(RunError::Fatal(cuda_error("cuMemAllocAsync", e.0))),
                Err(e) if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                    return Err(RunError::Recoverable(Reason::Unusable {
                        why: format!("split-KV workspace of {bytes} bytes: {}", driver_error_text(e.0)),
                    }))
                }
                Err(e) => return Err(RunError::Fatal(cuda_error("cuMemAllocAsync", e.0))),
            }
        };
        if let Some(ws) = workspace {
            params.part_o = ws;
        }
        if bytes != 0 {
            let per_row = plan.splits * p.batch * p.heads * p.seqlen_q;
            params.part_lse = params.part_o + (per_row * p.head_dim * 4) as u64;
        }
        let grid = (plan.splits as u32, (p.kv_heads * plan.row_groups) as u32, p.batch as u32);
        let mut args = [&mut params as *mut DecodeParams as *mut c_void];
        // The plan streams only where the twin exists; the main kernel otherwise.
        let main = if plan.streamed { r.streamed.as_ref().unwrap_or(&r.main) } else { &r.main };
        let mut outcome = if plan.cluster {
            launch_clustered(main, call, grid, plan.warps * 32, &mut args, plan.splits as u32)
        } else {
            launch(main, call, grid, plan.warps * 32, 0, &mut args)
        };
        if outcome.is_ok() && plan.splits > 1 && !plan.cluster && !SKIP_COMBINE.load(Ordering::Relaxed) {
            let grid = ((p.batch * p.heads * p.seqlen_q) as u32, 1, 1);
            // Code for sm_90 on: the combine is set up while the main kernel's last blocks run
            // (its griddepcontrol.wait exists only in code compiled for sm_90+).
            outcome = launch_dependent(&r.combine, call, grid, COMBINE_THREADS, &mut args, r.programmatic);
        }
        if let Some(ws) = workspace {
            // SAFETY: allocated above on this stream; the kernels using it are ordered before.
            if let Err(e) = unsafe { result::free_async(ws, stream) } {
                return Err(outcome.err().unwrap_or(RunError::Fatal(cuda_error("cuMemFreeAsync", e.0))));
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_split_only_when_the_grid_is_small() {
        // Batch 1, GQA 32/8, one token: 8 blocks before splitting; 132 SMs want ~528.
        let p = Problem::new(DType::BF16, 1, 1, 131072, 32, 8, 128);
        let plan = Plan::of(&p, 132, Family::Simt, 2);
        assert_eq!((plan.head_dim, plan.rows, plan.row_groups), (128, 4, 1));
        assert_eq!(plan.splits, 33);
        // One wave of 2 blocks per SM over 8 heads' blocks.
        assert_eq!(Plan::of(&p, 132, Family::TensorCore, 2).splits, 33);
        // Batch 16: 128 blocks, two splits fill 256 of 264 slots (not 3: 1.45 waves).
        assert_eq!(Plan::of(&Problem::new(DType::BF16, 16, 1, 8192, 32, 8, 128), 132, Family::TensorCore, 2).splits, 2);
        // Short keys cap the split count at one split per MIN_CHUNK keys.
        assert_eq!(Plan::of(&Problem::new(DType::BF16, 1, 1, 100, 32, 8, 128), 132, Family::Simt, 4).splits, 2);
        // Four-warp blocks unless the bench switch asks for two (where built).
        let big = Problem::new(DType::BF16, 128, 1, 8192, 32, 8, 128);
        assert_eq!(Plan::of(&big, 132, Family::TensorCore, 2).warps, 4);
        assert_eq!(Plan::of(&p, 132, Family::TensorCore, 2).warps, 4);
        // A large batch fills the GPU without splitting.
        assert_eq!(Plan::of(&Problem::new(DType::BF16, 128, 1, 8192, 32, 8, 128), 132, Family::Simt, 4).splits, 1);
        // Speculative decoding: 4 heads x 5 rows = 20 packed rows, 3 groups of 8.
        let plan = Plan::of(&Problem::new(DType::F16, 2, 5, 4096, 32, 8, 64), 132, Family::Simt, 4);
        assert_eq!((plan.rows, plan.row_groups, plan.head_dim), (8, 3, 64));
    }

    #[test]
    fn merges_in_a_cluster_only_where_every_cluster_runs_at_once() {
        // What an H200 answers for these kernels: about 208 blocks in clusters of any size.
        let mut room = ClusterRoom::default();
        for n in 2..=MAX_CLUSTER {
            room.0[n] = 208 / n;
        }
        let plan_in = |room: &ClusterRoom, b, sk, h, hk| {
            let p = Problem::new(DType::BF16, b, 1, sk, h, hk, 128);
            Plan::of(&p, 132, Family::TensorCore, 2).merged_in_cluster(&p, room)
        };
        let plan = |b, sk, h, hk| plan_in(&room, b, sk, h, hk);
        // Batch 1 over 1k keys: 16 splits of 64 keys, 8 clusters: merged in them, no workspace.
        let p = plan(1, 1024, 32, 8);
        assert!(p.cluster && p.splits == 16);
        assert_eq!(p.workspace_bytes(&Problem::new(DType::BF16, 1, 1, 1024, 32, 8, 128)), 0);
        // 4k keys: 33 splits cut to one cluster of 16 (256 keys each); 32k: 33 and the combine.
        assert_eq!((plan(1, 4096, 32, 8).cluster, plan(1, 4096, 32, 8).splits), (true, 16));
        assert_eq!((plan(1, 32768, 32, 8).cluster, plan(1, 32768, 32, 8).splits), (false, 33));
        // Batch 16: two splits per sequence, 128 clusters of 2 (room for 104): the combine.
        assert!(!plan(16, 8192, 32, 8).cluster);
        let mut roomier = room;
        roomier.0[2] = 132;
        assert!(plan_in(&roomier, 16, 8192, 32, 8).cluster);
        // MHA at batch 1: 8 splits x 32 heads, 32 clusters of 8 where 26 fit: the combine.
        assert!(!plan(1, 32768, 32, 32).cluster);
        // head_dim 256: its kernels hold no cluster merge (registers): the combine.
        let p256 = Problem::new(DType::BF16, 1, 1, 1024, 32, 8, 256);
        assert!(!Plan::of(&p256, 132, Family::TensorCore, 2).merged_in_cluster(&p256, &room).cluster);
        // No clusters on the device (before sm_90): always the combine.
        let p = Problem::new(DType::BF16, 1, 1, 1024, 32, 8, 128);
        assert!(!Plan::of(&p, 132, Family::TensorCore, 2).merged_in_cluster(&p, &ClusterRoom::default()).cluster);
    }

    #[test]
    fn every_plan_names_a_kernel_of_the_module() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for d in (vector_elems(dtype)..=max_head_dim(dtype)).step_by(vector_elems(dtype)) {
                for (h, hk, sq) in [(32, 8, 1), (8, 8, 16), (64, 1, 16)] {
                    let problem = Problem::new(dtype, 1, sq, 1000, h, hk, d);
                    let plan = Plan::of(&problem, 80, Family::Simt, 2);
                    assert!(FUNCTIONS.contains(&plan.function(dtype)), "{dtype} d={d}");
                    assert!(plan.head_dim >= d);
                    if dtype != DType::F32 {
                        let plan = Plan::of(&problem, 80, Family::TensorCore, 2);
                        assert!(TC_FUNCTIONS.contains(&plan.function(dtype)), "{dtype} d={d}");
                        assert_eq!(plan.rows, TC_ROWS);
                    }
                }
            }
        }
    }

    #[test]
    fn prefills_are_not_applicable_not_fallbacks() {
        use crate::caps::SimulatedGpu;
        let be = DecodeBackend::new(None, JitMode::Auto, None);
        let h100 = DeviceCaps::simulated(SimulatedGpu::H100);
        let r = be.check(&h100, &Problem::new(DType::BF16, 1, 1024, 1024, 8, 8, 128));
        assert_eq!(r, vec![Reason::NotADecode { seqlen_q: 1024, max: MAX_QUERY_ROWS }]);
        assert!(!crate::reason::is_fallback(&r));
        let r = be.check(&h100, &Problem::new(DType::F16, 1, 1, 1024, 8, 8, 100));
        assert!(r.contains(&Reason::HeadDimMultiple { multiple: 8, found: 100 }));
    }
}
