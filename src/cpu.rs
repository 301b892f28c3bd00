//! The CPU backend: a blocked, multi-threaded online-softmax attention in f32.
//!
//! It is both the fallback when no GPU is usable and the reference the GPU kernels are tested
//! against, so it favours being obviously right, deterministic (the result does not depend on
//! the thread count) and fast, in that order.
//!
//! Structure: the work is split into items of (sequence, the query heads of one kv head, block
//! of query rows): all heads of a GQA group are in one item, so each K/V tile is read and
//! widened to f32 once for all of them. An item walks the keys its rows can see in tiles of up
//! to `BLOCK_K`. Per tile, `Sᵀ = K · Qᵀ` and `acc += P · V` run on one register-blocked
//! micro-kernel ([`kernels::gemm_block`]); the online softmax between them works on `Sᵀ`, whose
//! rows are keys and whose vector lanes are queries, so the running max, the sum and the
//! vectorised `exp` need no horizontal reductions. No `seqlen_q × seqlen_k` score matrix ever
//! exists. Items of at most eight query rows per kv head (decode: one token, the heads of a GQA
//! group) compute their scores as dot products straight from each bf16/f16/f32 key row instead,
//! as it is read, and (when all their rows see the same keys) take up to eight kv heads at
//! once, so a key's rows of all of them are read together (one contiguous run in `[seq,
//! kv_heads, d]` caches and vLLM's pages); with AVX-512F and query heads in fours per kv head,
//! four keys' scores at a time. The instruction set (AVX-512 matrix and decode kernels +
//! AVX2+FMA+F16C, AVX2+FMA+F16C, or the portable baseline, which is NEON on aarch64) is picked
//! once at run time ([`kernels::Isa`]).
//! Items run on a rayon pool (see [`Threads`]); everything that can fail (allocations) happens
//! before the first output element is written.
//!
//! The kernel reads K/V rows only through [`KvRows`] (runs of rows at fixed strides, such as a
//! page's), so a paged or KV-cache front end can call the same kernel with its own row
//! addressing.

mod kernels;

use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

use crate::dtype::Element;
use crate::error::Error;
use crate::layout::Layout;
use crate::options::Mask;

pub(crate) use kernels::Isa;
use kernels::{Simd, LANES};

/// Most query rows (over all heads of the item) per work item. Large enough to amortise
/// widening a K/V tile over many rows, small enough that causal and short inputs still give
/// every thread work.
const BLOCK_Q: usize = 64;
/// Most keys per tile. 64 keys × head_dim 128 × 4 bytes = 32 KiB each for K and V: both stay
/// in L1/L2 while the query block sweeps over them.
const BLOCK_K: usize = 64;
/// How many keys ahead of the one being read the K/V rows are prefetched (into L2, see
/// [`kernels::prefetch`]): enough misses in flight to stream from memory, few enough to stay
/// cached until used (32 bf16 K+V rows of d128: 16 KiB). 16 to 64 measured within noise.
const PREFETCH_KEYS: usize = 32;
/// Most keys whose scores a narrow item computes together ([`kernels::score_keys`]: the
/// AVX-512 kernel's four; the AVX2 kernel takes them one by one).
const SCORE_KEYS: usize = 4;
/// Most kv heads one decode work item takes ([`decode_kv_heads`]): a vLLM page row of 8 kv
/// heads is then read as one run; it also bounds the per-tile table of value rows.
const MAX_KV_HEADS: usize = 8;
/// Most f32 values one scratch block (query rows, keys, values or accumulators) holds before it
/// gets fewer rows than `BLOCK_Q`/`BLOCK_K`: 512 KiB. Blocks are full up to head_dim 2048 (so
/// results there do not depend on this), a thread's scratch stays within 3 MiB below that, and
/// beyond it is one row of each, under 96·head_dim bytes, however large head_dim is.
const BLOCK_FLOATS: usize = 1 << 17;
/// Most scratch all workers of one call hold together (unless a single worker needs more):
/// with a huge head_dim, fewer workers rather than memory in proportion to the thread count.
const SCRATCH_TOTAL_BYTES: usize = 256 << 20;
/// Most threads a dedicated pool gets, whatever was asked for: beyond this a request is a
/// mistake (the settings layer rejects it), and honouring it would exhaust the process's
/// threads rather than speed anything up.
pub(crate) const MAX_THREADS: usize = 1024;
/// Estimated multiply-adds below which waking another worker costs more than it saves (a
/// rayon hand-off is some microseconds; this is tens of microseconds of work).
const MIN_WORK_PER_WORKER: u64 = 1 << 17;
/// Calls with fewer (sequence, head block, query block) blocks than this split the keys of
/// their long blocks into chunks that run as separate work items (decode: batch 1 is one
/// block of all its kv heads). Fixed, not the thread count, so the result stays the same on any number
/// of threads; 64 leaves each of 16 threads several items to balance with.
const SPLIT_BLOCKS: usize = 64;
/// Keys per chunk of a split block (a multiple of `BLOCK_K`, so the key tiles are where they
/// would be unsplit): enough that a chunk's fixed costs (widening Q, storing and merging its
/// partial) stay a few percent of streaming its K/V, few enough that the threads walking
/// neighbouring chunks stay within a few MiB of each other (strided `[seq, kv_heads, d]`
/// caches then reuse their TLB entries and DRAM pages). Blocks of fewer than two chunks' keys
/// are not split. The same for decode blocks of several kv heads (2 MiB of bf16 K/V per chunk
/// of 8 kv heads of d128): 64-key chunks, as much K/V per item as one kv head's 512, were no
/// faster on 2 threads (within the noise of a shared 2-core machine), and the merge of their
/// 8× as many partials runs on one thread.
const SPLIT_KEYS: usize = 512;
/// Most chunks one block is split into: longer blocks get longer chunks.
const MAX_CHUNKS: usize = 64;
/// Most f32 values the partial states of one call may take (16 MiB); a call that would need
/// more is not split.
const MAX_PARTIAL_FLOATS: usize = 1 << 22;

/// One validated host input: `data[layout.offset(b,s,h) + d]` is element (b,s,h,d).
pub(crate) struct HostIn<'a, T> {
    /// The backing elements; every offset the layout produces is in bounds.
    pub data: &'a [T],
    /// Shape and strides of the tensor.
    pub layout: Layout,
}

/// How the rows of q and k pair up into sequences.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Seqs<'a> {
    /// Batch entry `b` of q against batch entry `b` of k and v, all rows; lse is
    /// `[batch, heads, seqlen_q]`.
    Dense,
    /// A packed batch (every tensor has batch 1): sequence `i` is rows `cu_q[i]..cu_q[i + 1]` of
    /// q and out against rows `cu_k[i]..cu_k[i + 1]` of k and v, masks aligned within it; lse
    /// is `[heads, total_q]`. Rows outside every sequence are not written.
    Packed {
        /// `batch + 1` prefix sums over q's rows: non-decreasing, within `0..=total_q`.
        cu_q: &'a [i32],
        /// `batch + 1` prefix sums over k's rows: non-decreasing, within `0..=total_k`.
        cu_k: &'a [i32],
    },
    /// A KV cache: batch entry `b` of q against the first `lens[b]` keys of batch entry `b` of
    /// the K/V rows (clamped to `0..=seqlen_k`), masks aligned to that length; lse is
    /// `[batch, heads, seqlen_q]` as for `Dense`.
    Cache {
        /// One length per batch entry.
        lens: &'a [i32],
    },
}

/// The threads the kernel runs on: the rayon pool the caller is in, the calling thread alone,
/// or a dedicated pool of a fixed size, built the first time a call needs it and then reused.
pub(crate) struct Threads {
    /// `None`: the ambient rayon pool. `Some(n)`: `n` threads, `1..=MAX_THREADS`.
    count: Option<usize>,
    /// The dedicated pool when `count > 1`; holds `None` once building it failed.
    pool: OnceLock<Option<rayon::ThreadPool>>,
}

impl Threads {
    /// `None`: rayon's global pool, or the pool of the rayon task that calls (so a call from
    /// inside candle's, gemm's or the application's pool shares its threads instead of adding
    /// more). `Some(n)`: `n` threads (0 counts as 1, more than [`MAX_THREADS`] as that many),
    /// from a dedicated pool when `n > 1`. No thread is started here.
    pub(crate) fn new(count: Option<usize>) -> Self {
        Threads { count: count.map(|n| n.clamp(1, MAX_THREADS)), pool: OnceLock::new() }
    }

    /// The thread count in effect (`None`: the ambient rayon pool's).
    #[cfg(test)]
    pub(crate) fn count(&self) -> Option<usize> {
        self.count
    }

    /// Where a call that wants parallelism runs. Never panics: when no pool can be had, the
    /// calling thread (the failure is logged once).
    fn workers(&self) -> Workers<'_> {
        match self.count {
            Some(1) => Workers::Inline,
            Some(n) => match self.pool.get_or_init(|| pool_or_warn(n, pool_builder(n).build())) {
                Some(pool) => Workers::Pool(pool),
                None => Workers::Inline,
            },
            None if ambient_pool_usable() => Workers::Ambient,
            None => Workers::Inline,
        }
    }

    /// A dedicated pool that could not be built, as when the process may start no more threads.
    #[cfg(test)]
    fn with_unbuildable_pool(count: usize) -> Self {
        let threads = Threads::new(Some(count));
        let refused = pool_builder(count)
            .spawn_handler(|_| Err(std::io::Error::other("thread spawn refused (test)")))
            .build();
        let _ = threads.pool.set(pool_or_warn(count, refused));
        threads
    }
}

fn pool_builder(n: usize) -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("attention-cpu-{i}"))
}

/// The pool, or `None` after logging why there is none.
fn pool_or_warn(
    n: usize,
    built: Result<rayon::ThreadPool, rayon::ThreadPoolBuildError>,
) -> Option<rayon::ThreadPool> {
    built
        .map_err(|e| {
            log::warn!(
                "attention: could not start the CPU backend's {n} threads ({e}); its calls run \
                 on the calling thread. Lower ATTN_CPU_THREADS or raise the process's thread limit"
            )
        })
        .ok()
}

/// Whether rayon's global pool can be used. Rayon starts it on first use and panics on that
/// and every later use if it could not start its threads, so it is tried once, here, where the
/// panic can be caught; without it calls run on the calling thread.
fn ambient_pool_usable() -> bool {
    if rayon::current_thread_index().is_some() {
        return true; // called from a rayon task: its pool is running
    }
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let usable = std::panic::catch_unwind(rayon::current_num_threads).is_ok();
        if !usable {
            log::warn!(
                "attention: rayon's global thread pool could not start; the CPU backend runs on \
                 the calling thread. Set ATTN_CPU_THREADS or raise the process's thread limit"
            );
        }
        usable
    })
}

/// Where one call's workers run.
enum Workers<'a> {
    /// The calling thread only.
    Inline,
    /// The rayon pool the caller is in (the global one outside any pool).
    Ambient,
    /// A dedicated pool.
    Pool(&'a rayon::ThreadPool),
}

impl Workers<'_> {
    /// How many workers can run at once.
    fn threads(&self) -> usize {
        match self {
            Workers::Inline => 1,
            Workers::Ambient => rayon::current_num_threads(),
            Workers::Pool(pool) => pool.current_num_threads(),
        }
    }

    /// Runs `job(w)` for every `w in 0..n`, concurrently where there are threads for it, and
    /// returns when all have finished (re-raising a panic of any of them).
    fn run(&self, n: usize, job: impl Fn(usize) + Sync + Send) {
        match self {
            _ if n <= 1 => (0..n).for_each(job),
            Workers::Inline => (0..n).for_each(job),
            Workers::Ambient => (0..n).into_par_iter().for_each(job),
            Workers::Pool(pool) => pool.install(|| (0..n).into_par_iter().for_each(job)),
        }
    }
}

/// A raw pointer to the output that may be shared between worker threads.
///
/// Wrapped in a struct (and read through [`OutPtr::get`]) because closures capture disjoint
/// fields in edition 2021: capturing `ptr.0` directly would capture a bare `*mut T`, which is
/// not `Send`.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);

// SAFETY: the pointer is only used to write the output rows of the work item a thread holds.
// Work items partition the (batch, query row, head) index space, and the caller guarantees the
// output layout maps distinct logical elements to distinct addresses, so no two threads ever
// touch the same element, and nothing reads `out` while the workers run (the `&mut [T]` it came
// from is borrowed for the whole call). `T: Send` because values of `T` are moved into it.
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as above; sharing `&OutPtr` only shares the address, never a reference to the data.
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The wrapped pointer (a method, so closures capture the whole `Send` wrapper).
    #[inline]
    fn get(self) -> *mut T {
        self.0
    }
}

/// One sequence: rows `q_base..q_base + sq` of q/out against rows `k_base..k_base + sk` of k/v,
/// in batch entry `batch`.
#[derive(Clone, Copy, Debug)]
struct Seq {
    batch: usize,
    q_base: usize,
    sq: usize,
    k_base: usize,
    sk: usize,
}


/// Where the K and V rows a work item reads live: the kernel's only view of K/V memory.
///
/// The dense/strided tensors of [`forward`] are one implementation ([`StridedKv`]); a paged or
/// KV-cache front end supplies another (rows looked up through a block table, say) and calls
/// the same kernel. A row is widened to f32 once per tile and then shared by every query head
/// of its GQA group. Rows come in runs ([`RowRun`]): the kernel looks a run up once (a page
/// through its block table, say) and steps through its keys, instead of addressing every row.
pub(crate) trait KvRows<T>: Sync {
    /// The key rows of kv heads `kv_head .. kv_head + heads` (all exist) for key `key` (row of
    /// batch entry `batch`, as the sequence's `k_base + position`) and as many following keys
    /// as lie at the same strides (to the end of a page, say): a run of at least key `key`.
    fn k_run(&self, batch: usize, key: usize, kv_head: usize, heads: usize) -> RowRun<'_, T>;
    /// The value rows of the same keys and heads.
    fn v_run(&self, batch: usize, key: usize, kv_head: usize, heads: usize) -> RowRun<'_, T>;
}

/// The rows of consecutive keys and kv heads of one tensor that lie at fixed strides: element
/// `e` of the run's `r`-th key and `p`-th kv head is `data[r · key_stride + p · head_stride +
/// e]`, for `r < keys` and the heads it was asked for.
pub(crate) struct RowRun<'a, T> {
    /// From the first row on, and no further than the last one (empty when head_dim is 0).
    data: &'a [T],
    /// Keys left in the run.
    keys: usize,
    key_stride: usize,
    head_stride: usize,
}

// By hand: a derive would ask for `T: Copy`, where only the slice is copied.
impl<T> Clone for RowRun<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for RowRun<'_, T> {}

impl<'a, T> RowRun<'a, T> {
    /// No rows: the state of a cursor before its first look-up.
    const EMPTY: Self = RowRun { data: &[], keys: 0, key_stride: 0, head_stride: 0 };

    /// The run of `keys` (at least 1) keys × `heads` (at least 1) kv heads of `d` elements from
    /// `data[first]` at these strides. Panics unless `data` holds all of them.
    #[inline]
    pub(crate) fn new(data: &'a [T], first: usize, keys: usize, heads: usize, d: usize, [key_stride, head_stride]: [usize; 2]) -> Self {
        if d == 0 {
            // No element exists, and the tensor may be empty: address nothing.
            return RowRun { data: &[], keys, key_stride: 0, head_stride: 0 };
        }
        let len = (keys - 1) * key_stride + (heads - 1) * head_stride + d;
        RowRun { data: &data[first..first + len], keys, key_stride, head_stride }
    }

    /// The `p`-th kv head's row of the first key.
    #[inline]
    fn row(&self, p: usize, d: usize) -> &'a [T] {
        &self.data[p * self.head_stride..][..d]
    }

    /// The run from the next key on (empty after the last).
    #[inline]
    fn advance(&mut self) {
        self.keys -= 1;
        self.data = if self.keys == 0 { &[] } else { &self.data[self.key_stride..] };
    }
}

/// Steps through the runs of one tensor key by key, looking a run up only when the key does
/// not continue the last one (the first key, the end of a page, a gap).
struct RowCursor<'a, T> {
    /// The key the run starts at now.
    key: usize,
    run: RowRun<'a, T>,
}

impl<'a, T> RowCursor<'a, T> {
    fn new() -> Self {
        RowCursor { key: 0, run: RowRun::EMPTY }
    }

    /// Key `key`'s rows: the current run's, or `lookup()`'s when it has no such key.
    #[inline]
    fn at(&mut self, key: usize, lookup: impl FnOnce() -> RowRun<'a, T>) -> RowRun<'a, T> {
        if self.run.keys == 0 || self.key != key {
            self.run = lookup();
        }
        let here = self.run;
        self.run.advance();
        self.key = key + 1;
        here
    }
}

/// K and V as validated strided host tensors.
pub(crate) struct StridedKv<'a, T> {
    /// The keys, `[b, sk, hk, d]`.
    pub k: HostIn<'a, T>,
    /// The values, `[b, sk, hk, d]`.
    pub v: HostIn<'a, T>,
}

impl<'a, T> HostIn<'a, T> {
    /// The rows of kv heads `kv_head .. kv_head + heads` from key `key` to the last of batch
    /// entry `batch`: all at the layout's strides.
    #[inline]
    fn run(&self, batch: usize, key: usize, kv_head: usize, heads: usize) -> RowRun<'a, T> {
        let [_, sk, _, d] = self.layout.shape();
        let [_, key_stride, head_stride] = self.layout.strides();
        RowRun::new(self.data, self.layout.offset(batch, key, kv_head), sk - key, heads, d, [key_stride, head_stride])
    }
}

impl<T: Element> KvRows<T> for StridedKv<'_, T> {
    #[inline]
    fn k_run(&self, batch: usize, key: usize, kv_head: usize, heads: usize) -> RowRun<'_, T> {
        self.k.run(batch, key, kv_head, heads)
    }
    #[inline]
    fn v_run(&self, batch: usize, key: usize, kv_head: usize, heads: usize) -> RowRun<'_, T> {
        self.v.run(batch, key, kv_head, heads)
    }
}

/// One unit of parallel work: query rows `q0 .. q0 + rows` (within the sequence) of the
/// `heads` consecutive query heads from `head0`, which all share one kv head, over the keys
/// `keys.0 .. keys.1` of the sequence (all the rows see, unless the keys were split), and
/// where its results go.
struct WorkItem<'a> {
    /// The sequence the rows belong to.
    seq: Seq,
    /// The first query head.
    head0: usize,
    /// How many query heads: some of kv head `head0 / group`, or (`kv_heads > 1`) all of
    /// `kv_heads` consecutive kv heads from it.
    heads: usize,
    /// How many kv heads the query heads use: 1, or more for a decode item
    /// ([`Block::kv_heads`]).
    kv_heads: usize,
    /// The first query row, within the sequence.
    q0: usize,
    /// Query rows per head.
    rows: usize,
    /// The keys (sequence positions, end exclusive) this item covers: each row sees the
    /// intersection of this range with its mask's range.
    keys: (usize, usize),
    /// Which key chunk of its block this is (0 when the keys were not split): chunk-major
    /// order keeps the threads on nearby K/V memory.
    chunk: usize,
    /// Estimated multiply-adds, to start long items first and to size the worker count.
    cost: u64,
    /// The item's output.
    dest: Dest<'a>,
}

/// Where a work item's results go.
enum Dest<'a> {
    /// All the keys the rows see: normalised into `out`, and into these lse slices (one of
    /// `rows` values per head; empty when no lse was requested).
    Out(Vec<&'a mut [f32]>),
    /// One chunk of the keys: the rows' online-softmax state, laid out as [`Partial`] says,
    /// for [`merge_partials`] to combine once every chunk is done.
    Part(&'a mut [f32]),
}

/// A block of rows (sequence, heads, query rows) whose keys were split into chunks that run
/// as separate work items (FlashDecoding on the CPU: decode has too few (sequence, kv head)
/// blocks to share out, and too many keys per block); its chunks' partial states sit one
/// after another in the call's partial buffer, merged by log-sum-exp after all are done.
struct Split<'l> {
    /// The sequence the rows belong to.
    seq: Seq,
    /// The first query head.
    head0: usize,
    /// How many query heads.
    heads: usize,
    /// The first query row, within the sequence.
    q0: usize,
    /// Query rows per head.
    rows: usize,
    /// Offset of chunk 0's partial in the partial buffer, in f32 values.
    part0: usize,
    /// Chunks (partials), at least two.
    chunks: usize,
    /// As [`Dest::Out`]'s.
    lse: Vec<&'l mut [f32]>,
}

/// The layout of one chunk's partial state for `rows` query columns of head_dim `d`: the
/// running max `[rows]`, the running sum `[rows]`, then the unnormalised accumulators
/// `[rows, d]`.
#[derive(Clone, Copy, Debug)]
struct Partial {
    rows: usize,
    d: usize,
}

impl Partial {
    /// f32 values of one partial; `None` past `usize`.
    fn floats(self) -> Option<usize> {
        self.d.checked_add(2)?.checked_mul(self.rows)
    }

    /// Splits one partial (exactly [`Partial::floats`] values) into (max, sum, acc).
    fn parts(self, buf: &mut [f32]) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let (max, rest) = buf.split_at_mut(self.rows);
        let (sum, acc) = rest.split_at_mut(self.rows);
        (max, sum, acc)
    }
}

/// Rows per work item (over all its heads) and keys per tile for one head_dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Blocks {
    q: usize,
    k: usize,
}

/// `x` rounded up to a multiple of `m`.
const fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Columns of the P·V micro-kernel (two vectors of [`LANES`]): the accumulator and value rows
/// are padded to this many.
const PV_COLS: usize = 2 * LANES;

impl Blocks {
    /// `BLOCK_Q` and `BLOCK_K`, fewer once a block would hold more than `BLOCK_FLOATS` values,
    /// never fewer than one.
    fn for_head_dim(d: usize) -> Self {
        let rows = BLOCK_FLOATS / d.max(1);
        Blocks { q: rows.clamp(1, BLOCK_Q), k: rows.clamp(1, BLOCK_K) }
    }

    /// Query columns of `Qᵀ` and `Sᵀ`: the rows, padded to whole vectors.
    fn rows_padded(self) -> usize {
        round_up(self.q, LANES)
    }

    /// Rows of Q and of the accumulators the scratch holds: [`Blocks::rows_padded`], but
    /// exactly `q` when that fits one vector (then items take the narrow path, which never
    /// touches padding rows), so a huge head_dim costs `q` rows of it, not a vector's worth.
    fn rows_held(self) -> usize {
        if self.q <= LANES {
            self.q
        } else {
            self.rows_padded()
        }
    }

    /// The sizes, in f32 values, of the scratch buffers: `[Qᵀ, K, V, Sᵀ, acc, per-row]`;
    /// `None` past `usize`.
    fn scratch_floats(self, d: usize) -> Option<[usize; 6]> {
        let (rp, rh) = (self.rows_padded(), self.rows_held());
        let dp = d.checked_add(PV_COLS - 1)? / PV_COLS * PV_COLS;
        Some([d.checked_mul(rh)?, self.k.checked_mul(d)?, self.k.checked_mul(dp)?, self.k * rp, rh.checked_mul(dp)?, 5 * rp])
    }

    /// Bytes of one thread's [`Scratch`]; `None` past `usize`.
    fn scratch_bytes(self, d: usize) -> Option<usize> {
        self.scratch_floats(d)?
            .iter()
            .try_fold(0usize, |s, &n| s.checked_add(n))?
            .checked_mul(std::mem::size_of::<f32>())
    }
}

/// Per-worker scratch, allocated (zeroed) before any output is written so the loops never
/// allocate. `rp` is [`Blocks::rows_padded`], `dp` head_dim padded to [`PV_COLS`].
struct Scratch {
    /// The item's queries, widened and transposed: `[d, rp]`, padding columns zero; for items
    /// of at most [`LANES`] rows, row-major `[rows, d]` instead.
    qt: Vec<f32>,
    /// The current key tile, widened: `[blocks.k, d]`.
    k: Vec<f32>,
    /// The current value tile, widened: `[blocks.k, dp]`; the padding columns stay zero.
    v: Vec<f32>,
    /// Scores, then probabilities, of the current tile, transposed: `[blocks.k, rp]`.
    s: Vec<f32>,
    /// Unnormalised output accumulators: `[rows, dp]` (at least).
    acc: Vec<f32>,
    /// Per query column, five runs of `rp`: running max, running sum, the tile's rescale
    /// factor, and the first and one-past-last visible key within the tile (as f32).
    row: Vec<f32>,
}

impl Scratch {
    /// Allocates fallibly: a head_dim too large for the memory at hand is an error to report,
    /// not a process abort.
    fn try_new(d: usize, blocks: Blocks) -> Result<Self, Error> {
        let buf = |n: usize| -> Option<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).ok()?;
            v.resize(n, 0.0);
            Some(v)
        };
        let scratch = || {
            let [qt, k, v, s, acc, row] = blocks.scratch_floats(d)?;
            Some(Scratch { qt: buf(qt)?, k: buf(k)?, v: buf(v)?, s: buf(s)?, acc: buf(acc)?, row: buf(row)? })
        };
        scratch().ok_or_else(|| {
            let size = blocks
                .scratch_bytes(d)
                .map_or_else(|| "more than usize::MAX bytes".into(), |b| format!("{b} bytes"));
            Error::invalid(
                "q",
                format!("head_dim {d}, for which the CPU backend could not allocate its {size} of working memory"),
                "a head_dim whose CPU working memory (per thread at most 3 MiB or 96·head_dim bytes, \
                 whichever is larger) fits in free host memory; free some, or run it on a GPU backend",
            )
        })
    }
}

/// The read-only description of one call, shared by all workers.
struct Problem<'a, T, R> {
    q: HostIn<'a, T>,
    kv: R,
    out: OutPtr<T>,
    out_layout: Layout,
    scale: f32,
    mask: Mask,
    /// Logit soft-cap (`cap · tanh(x / cap)`), if any.
    softcap: Option<f32>,
    /// Query heads per kv head.
    group: usize,
    blocks: Blocks,
    /// The instruction set the kernels run with.
    isa: Isa,
}

/// Computes out = softmax(scale · q·kᵀ + mask) · v for every (sequence, head, query row).
/// Preconditions (checked by the caller, may be debug_assert!ed): all layouts in bounds of their
/// slices; q/out shape [b, sq, h, d]; k/v shape [b, sk, hk, d] with h % hk == 0 (GQA: query head
/// `h` uses kv head `h / (h_q / hk)`); out's layout has no two elements at the same address;
/// `lse`, if given, has exactly b*h*sq elements, natural log, laid out as `seqs` says; packed
/// `seqs` as its documentation says. Any dimension may be 0 (then nothing, or only lse, is
/// written).
///
/// `mask` says which keys each row sees (causal and sliding window, bottom-right aligned within
/// each sequence); `softcap` caps the scaled logits. Rows that see no key get exact zeros and
/// `lse = -inf`. NaN propagates as in PyTorch: a NaN in a query row, or in a key row the query
/// row sees, makes that row's output and lse NaN; a NaN in a value row it sees makes its
/// output NaN; keys a row does not see never affect it. An infinite logit gives a NaN row.
///
/// Work runs on `threads`, but a call too small to gain from more workers runs on the calling
/// thread; the result is bitwise the same for any thread count, because every row is computed
/// by one thread in a fixed order. An error (memory for the scratch or the work list could not
/// be allocated) is returned before anything is written.
// The signature mirrors the public call one-to-one; bundling the arguments would only move
// them into a struct literal at the call sites.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Element>(
    q: HostIn<'_, T>,
    k: HostIn<'_, T>,
    v: HostIn<'_, T>,
    out: &mut [T],
    out_layout: Layout,
    lse: Option<&mut [f32]>,
    seqs: Seqs<'_>,
    scale: f32,
    mask: Mask,
    softcap: Option<f32>,
    threads: &Threads,
) -> Result<(), Error> {
    let [b, _, _, d] = q.layout.shape();
    let [_, sk, hk, _] = k.layout.shape();
    debug_assert_eq!(k.layout.shape(), v.layout.shape());
    debug_assert_eq!(k.layout.batch(), b);
    debug_assert_eq!(k.layout.head_dim(), d);
    debug_assert!(k.layout.span().is_some_and(|s| s <= k.data.len()));
    debug_assert!(v.layout.span().is_some_and(|s| s <= v.data.len()));
    forward_rows(q, StridedKv { k, v }, sk, hk, out, out_layout, lse, seqs, scale, mask, softcap, threads)
}

/// [`forward`] over K/V rows of any storage (`kv`, e.g. pages through a block table): `sk` keys
/// per batch entry at most (a `Seqs::Cache` call shortens each), `hk` kv heads, every row
/// `kv` returns `head_dim` long. The preconditions on q, out and lse are `forward`'s.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_rows<T: Element, R: KvRows<T>>(
    q: HostIn<'_, T>,
    kv: R,
    sk: usize,
    hk: usize,
    out: &mut [T],
    out_layout: Layout,
    lse: Option<&mut [f32]>,
    seqs: Seqs<'_>,
    scale: f32,
    mask: Mask,
    softcap: Option<f32>,
    threads: &Threads,
) -> Result<(), Error> {
    let [b, sq, h, d] = q.layout.shape();
    debug_assert_eq!(out_layout.shape(), q.layout.shape());
    debug_assert!(h == 0 || (hk > 0 && h % hk == 0));
    debug_assert!(q.layout.span().is_some_and(|s| s <= q.data.len()));
    debug_assert!(out_layout.span().is_some_and(|s| s <= out.len()));
    // An empty tensor has no two elements at all (`overlaps` can still say yes for it, since
    // dense strides of an empty tensor are 0).
    debug_assert!(out_layout.numel() == 0 || !out_layout.overlaps());
    debug_assert!(lse.as_ref().map_or(true, |l| l.len() == b * h * sq));
    debug_assert!(!matches!(seqs, Seqs::Packed { .. }) || b == 1);

    if b == 0 || h == 0 || sq == 0 {
        return Ok(()); // no rows, so no output and no lse element exists
    }
    // hk == 0 with h > 0 breaks the precondition; treat it as "no keys" rather than dividing
    // by zero, so even a caller bug cannot panic here.
    let sk = if hk == 0 { 0 } else { sk };
    let blocks = Blocks::for_head_dim(d);
    let group = h.checked_div(hk).unwrap_or(1).max(1);
    let mut parts = Vec::new();
    let (items, splits) = work_items(b, sq, sk, h, d, group, lse, seqs, mask, blocks, &mut parts)?;
    if items.is_empty() {
        return Ok(());
    }

    let total: u64 = items.iter().fold(0, |s, it| s.saturating_add(it.cost));
    let wanted = (total / MIN_WORK_PER_WORKER).clamp(1, items.len() as u64) as usize;
    let workers = if wanted > 1 { threads.workers() } else { Workers::Inline };
    let scratch_bytes = blocks.scratch_bytes(d).unwrap_or(usize::MAX);
    let affordable = (SCRATCH_TOTAL_BYTES / scratch_bytes.max(1)).max(1);
    let n = wanted.min(workers.threads()).min(affordable).max(1);
    let mut scratch = Vec::new();
    scratch
        .try_reserve_exact(n)
        .map_err(|_| Error::invalid("q", format!("{n} CPU workers"), "fewer threads (ATTN_CPU_THREADS)"))?;
    scratch.push(Mutex::new(Scratch::try_new(d, blocks)?));
    for _ in 1..n {
        // Short of memory for every worker's scratch: fewer workers, the same result.
        match Scratch::try_new(d, blocks) {
            Ok(s) => scratch.push(Mutex::new(s)),
            Err(_) => break,
        }
    }

    let problem = Problem {
        q,
        kv,
        out: OutPtr(out.as_mut_ptr()),
        out_layout,
        scale,
        mask,
        softcap,
        group,
        blocks,
        isa: Isa::detect(),
    };
    let queue = Mutex::new(items);
    workers.run(scratch.len(), |w| {
        // Each worker has its own scratch; the lock is never contended (and a poisoned one
        // only means a worker panicked, which `run` re-raises).
        let mut sc = scratch[w].lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some(item) => run_item(&problem, item, &mut sc),
                None => break,
            }
        }
    });
    // Every item has run (and given back its slot of `parts`): merge the split blocks, on this
    // thread (a few multiply-adds per head_dim element and chunk, nothing to share out).
    drop(queue);
    for split in splits {
        merge_partials(&problem, split, &mut parts);
    }
    Ok(())
}

/// Combines the chunks' partial states of one split block, in chunk order, into chunk 0's
/// slot, and stores the result as an unsplit item would: the same log-sum-exp merge the
/// online softmax applies between key tiles, so a split row keeps every rule of an unsplit one
/// (a NaN state stays NaN, chunks whose keys the row does not see weigh nothing, a row with no
/// visible key at all gives zeros and -inf).
fn merge_partials<T: Element, R: KvRows<T>>(pb: &Problem<'_, T, R>, split: Split<'_>, parts: &mut [f32]) {
    let d = pb.q.layout.head_dim();
    let Split { seq, head0, heads, q0, rows: qrows, part0, chunks, mut lse } = split;
    let layout = Partial { rows: heads * qrows, d };
    // `work_items` checked these sizes and gave every chunk its slot, so neither fails.
    let floats = layout.floats().unwrap_or(0);
    let Some(slots) = floats.checked_mul(chunks).and_then(|n| parts.get_mut(part0..part0.checked_add(n)?)) else {
        debug_assert!(false, "partial slots out of bounds");
        return;
    };
    let (first, rest) = slots.split_at_mut(floats);
    let (max, sum, acc) = layout.parts(first);
    for chunk in rest.chunks_exact_mut(floats) {
        let (max_c, sum_c, acc_c) = layout.parts(chunk);
        for i in 0..layout.rows {
            let (m, a, b) = merge_weights(max[i], max_c[i]);
            sum[i] = sum[i] * a + sum_c[i] * b;
            for (x, &y) in acc[i * d..][..d].iter_mut().zip(&acc_c[i * d..][..d]) {
                *x = *x * a + y * b;
            }
            max[i] = m;
        }
    }
    store_rows(pb, seq, head0, q0, qrows, max, sum, acc, d, &mut lse);
}

/// The log-sum-exp merge of two online-softmax states with running maxima `m_a` and `m_b`:
/// the new maximum and the factors that rescale each state's sum and accumulators to it. The
/// rules are the tile loop's in [`run_item_on`]: a NaN maximum stays NaN (and makes both
/// factors NaN, so the row and its lse are NaN); where both are -inf nothing has weight yet,
/// and subtracting 0 instead gives factors 0 rather than the NaN of `-inf - -inf`.
#[inline]
fn merge_weights(m_a: f32, m_b: f32) -> (f32, f32, f32) {
    let m = if m_a.is_nan() || m_b.is_nan() { f32::NAN } else { m_a.max(m_b) };
    let m_sub = if m == f32::NEG_INFINITY { 0.0 } else { m };
    (m, (m_a - m_sub).exp(), (m_b - m_sub).exp())
}

/// Normalises and stores `rows = heads · qrows` finished query columns of one block (column
/// `i` is row `q0 + i % qrows` of head `head0 + i / qrows`): `out` gets `acc / sum` (`acc` rows
/// `stride` apart), each head's lse slice (if any) `max + ln sum`. The sum is 0 exactly when
/// no key had weight (each tile adds at least exp(max - max) = 1): zeros and -inf. A NaN sum
/// stays NaN in the row and its lse.
#[allow(clippy::too_many_arguments)]
fn store_rows<T: Element, R: KvRows<T>>(
    pb: &Problem<'_, T, R>,
    seq: Seq,
    head0: usize,
    q0: usize,
    qrows: usize,
    max: &[f32],
    sum: &[f32],
    acc: &[f32],
    stride: usize,
    lse: &mut [&mut [f32]],
) {
    let d = pb.q.layout.head_dim();
    for (i, (&s, &m)) in sum.iter().zip(max).enumerate() {
        let (head, r) = (head0 + i / qrows, i % qrows);
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        if d > 0 {
            let off = pb.out_layout.offset(seq.batch, seq.q_base + q0 + r, head);
            // SAFETY: `off .. off + d` is one (batch, row, head) output row: in bounds of `out`
            // (caller precondition), written for no other block (blocks partition the rows,
            // the layout does not overlap), and `out` is exclusively borrowed by `forward` for
            // the whole time the workers run.
            let dst = unsafe { std::slice::from_raw_parts_mut(pb.out.get().add(off), d) };
            for (o, &a) in dst.iter_mut().zip(&acc[i * stride..i * stride + d]) {
                *o = T::from_f32(a * inv);
            }
        }
        if let Some(l) = lse.get_mut(i / qrows) {
            l[r] = if s == 0.0 { f32::NEG_INFINITY } else { m + s.ln() };
        }
    }
}

/// The work items of a call, longest last (workers pop from the end, so the longest start
/// first and the short ones fill the gaps at the end), each with its own slices of `lse`, and
/// the blocks whose keys were split into several items ([`Split`]), whose partial states get
/// slots of `parts` (resized here).
///
/// The split depends on the problem's shape only, never on the thread count: that, each row
/// (or key chunk of a row) being computed by one item in a fixed order, and the chunks being
/// merged in a fixed order, is what makes the result bitwise the same on any number of threads.
// One argument per dimension of the problem; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
fn work_items<'l: 'p, 'p>(
    b: usize,
    sq: usize,
    sk: usize,
    h: usize,
    d: usize,
    group: usize,
    lse: Option<&'l mut [f32]>,
    seqs: Seqs<'_>,
    mask: Mask,
    blocks: Blocks,
    parts: &'p mut Vec<f32>,
) -> Result<(Vec<WorkItem<'p>>, Vec<Split<'l>>), Error> {
    // The sequences. Packed bounds are clamped to the tensors and q's made non-overlapping and
    // increasing (no-ops for validated prefix sums): items must partition out's rows, as the
    // unsynchronised writes rely on it, whatever the caller passed.
    let mut list = Vec::new();
    match seqs {
        Seqs::Dense => {
            list.try_reserve_exact(b).map_err(|_| work_list_error(b))?;
            list.extend((0..b).map(|batch| Seq { batch, q_base: 0, sq, k_base: 0, sk }));
        }
        Seqs::Cache { lens } => {
            list.try_reserve_exact(b).map_err(|_| work_list_error(b))?;
            let len = |batch: usize| lens.get(batch).map_or(0, |&l| (l.max(0) as usize).min(sk));
            list.extend((0..b).map(|batch| Seq { batch, q_base: 0, sq, k_base: 0, sk: len(batch) }));
        }
        Seqs::Packed { cu_q, cu_k } => {
            let n = cu_q.len().min(cu_k.len()).saturating_sub(1);
            list.try_reserve_exact(n).map_err(|_| work_list_error(n))?;
            let at = |cu: &[i32], i: usize, total: usize| (cu[i].max(0) as usize).min(total);
            let mut q_end = 0;
            for i in 0..n {
                let q0 = at(cu_q, i, sq).max(q_end);
                let q1 = at(cu_q, i + 1, sq).max(q0);
                let k0 = at(cu_k, i, sk);
                let k1 = at(cu_k, i + 1, sk).max(k0);
                q_end = q1;
                list.push(Seq { batch: 0, q_base: q0, sq: q1 - q0, k_base: k0, sk: k1 - k0 });
            }
        }
    }

    // The lse run of every (sequence, head), `runs[seq * h + head]`, cut off item by item below.
    let mut runs: Vec<Option<&'l mut [f32]>> = Vec::new();
    if let Some(lse) = lse {
        let n = list.len().saturating_mul(h);
        runs.try_reserve_exact(n).map_err(|_| work_list_error(n))?;
        runs.resize_with(n, || None);
        match seqs {
            // lse is [batch, heads, seqlen_q]: one run of sq values per (batch, head).
            Seqs::Dense | Seqs::Cache { .. } => {
                for (run, slot) in lse.chunks_mut(sq).zip(runs.iter_mut()) {
                    *slot = Some(run);
                }
            }
            // lse is [heads, total_q]: per head, each sequence's rows are a sub-run of it.
            Seqs::Packed { .. } => {
                for (head, mut rest) in lse.chunks_mut(sq).enumerate().take(h) {
                    let mut pos = 0;
                    for (i, seq) in list.iter().enumerate() {
                        let (_, from_seq) = std::mem::take(&mut rest).split_at_mut(seq.q_base - pos);
                        let (mine, after) = from_seq.split_at_mut(seq.sq);
                        rest = after;
                        pos = seq.q_base + seq.sq;
                        runs[i * h + head] = Some(mine);
                    }
                }
            }
        }
    }

    // All query heads of a kv head go into one block (up to `blocks.q` of them), so each K/V
    // tile is widened once for the whole GQA group; the block's rows are then shared out as
    // query rows per head.
    let heads_per_item = group.clamp(1, blocks.q);
    let rows_per_head = (blocks.q / heads_per_item).max(1);
    let count = list
        .iter()
        .fold(0usize, |n, s| n.saturating_add(s.sq.div_ceil(rows_per_head)))
        .saturating_mul(h.div_ceil(heads_per_item));
    let mut list_blocks = Vec::new();
    list_blocks.try_reserve_exact(count).map_err(|_| work_list_error(count))?;
    for (i, &seq) in list.iter().enumerate() {
        // Ranges are non-decreasing in the row: the union is first begin .. last end.
        let keys_of = |q0: usize, rows: usize| (mask.key_range(q0, seq.sq, seq.sk).0, mask.key_range(q0 + rows - 1, seq.sq, seq.sk).1);
        let kv_heads = decode_kv_heads(&seq, group, h, mask, blocks);
        if kv_heads > 1 {
            for head0 in (0..h).step_by(kv_heads * group) {
                let heads = (kv_heads * group).min(h - head0);
                let (q0, rows) = (0, seq.sq);
                list_blocks.push(Block { seq_index: i, seq, head0, heads, kv_heads: heads / group, q0, rows, keys: keys_of(q0, rows) });
            }
            continue;
        }
        for kv_first in (0..h).step_by(group) {
            for head0 in (kv_first..(kv_first + group).min(h)).step_by(heads_per_item) {
                let heads = heads_per_item.min(kv_first + group - head0).min(h - head0);
                for q0 in (0..seq.sq).step_by(rows_per_head) {
                    let rows = rows_per_head.min(seq.sq - q0);
                    list_blocks.push(Block { seq_index: i, seq, head0, heads, kv_heads: 1, q0, rows, keys: keys_of(q0, rows) });
                }
            }
        }
    }

    // Key chunks per block: one, unless the call has too few blocks to share out (decode).
    let chunking = |blk: &Block| -> (usize, usize) {
        let (begin, end) = blk.keys;
        if list_blocks.len() >= SPLIT_BLOCKS || end - begin < 2 * SPLIT_KEYS {
            return (end - begin, 1);
        }
        // Chunk boundaries at multiples of the chunk length (itself a multiple of the key tile).
        let len = round_up(SPLIT_KEYS.max((end - begin).div_ceil(MAX_CHUNKS)), blocks.k);
        (len, (end - begin / len * len).div_ceil(len))
    };
    let part_floats = |blk: &Block| Partial { rows: blk.rows * blk.heads, d }.floats();
    let total_parts = list_blocks.iter().try_fold(0usize, |n, blk| match chunking(blk) {
        (_, 1) => Some(n),
        (_, chunks) => n.checked_add(part_floats(blk)?.checked_mul(chunks)?),
    });
    let split = matches!(total_parts, Some(n) if n <= MAX_PARTIAL_FLOATS);
    if split {
        let n = total_parts.unwrap_or(0);
        parts.try_reserve_exact(n).map_err(|_| work_list_error(n))?;
        parts.resize(n, 0.0);
    }
    let count = list_blocks.iter().fold(0usize, |n, blk| n.saturating_add(if split { chunking(blk).1 } else { 1 }));
    let mut items = Vec::new();
    items.try_reserve_exact(count).map_err(|_| work_list_error(count))?;
    let mut splits = Vec::new();
    let mut free: &'p mut [f32] = parts;
    let mut part0 = 0;
    for blk in &list_blocks {
        let Block { seq_index: i, seq, head0, heads, kv_heads, q0, rows, keys } = *blk;
        let mut lse = Vec::new();
        if !runs.is_empty() {
            lse.try_reserve_exact(heads).map_err(|_| work_list_error(heads))?;
            for run in &mut runs[i * h + head0..i * h + head0 + heads] {
                let (mine, rest) = run.take().unwrap_or_default().split_at_mut(rows);
                *run = Some(rest);
                lse.push(mine);
            }
        }
        let cost = |keys: usize| ((rows * heads) as u64).saturating_mul(keys as u64 + 1).saturating_mul(d as u64 + 1);
        let (len, chunks) = if split { chunking(blk) } else { (0, 1) };
        if chunks == 1 {
            let dest = Dest::Out(lse);
            items.push(WorkItem { seq, head0, heads, kv_heads, q0, rows, keys, chunk: 0, cost: cost(keys.1 - keys.0), dest });
            continue;
        }
        // Bounded: `part_floats` and the sum over all chunks were checked above.
        let floats = part_floats(blk).unwrap_or(0);
        let first = keys.0 / len * len;
        for chunk in 0..chunks {
            let (slot, rest) = std::mem::take(&mut free).split_at_mut(floats);
            free = rest;
            // Within `first + chunks·len <= keys.1 + len`: no overflow for any key count.
            let range = (first + chunk * len, first + (chunk + 1) * len);
            let n = range.1.min(keys.1) - range.0.max(keys.0);
            let dest = Dest::Part(slot);
            items.push(WorkItem { seq, head0, heads, kv_heads, q0, rows, keys: range, chunk, cost: cost(n), dest });
        }
        splits.push(Split { seq, head0, heads, q0, rows, part0, chunks, lse });
        part0 += floats * chunks;
    }
    // Longest last, and among equals chunk 0 of every block last, so all threads start on the
    // first chunks and move through the caches together. A stable sort: the order, like the
    // split, depends on the shape only.
    items.sort_by_key(|it| (it.cost, std::cmp::Reverse(it.chunk)));
    Ok((items, splits))
}

/// A block of rows before its keys are (perhaps) split into chunks.
#[derive(Clone, Copy)]
struct Block {
    /// Index of `seq` in the call's sequence list (for its lse runs).
    seq_index: usize,
    seq: Seq,
    head0: usize,
    heads: usize,
    /// As [`WorkItem::kv_heads`]: more than one for the decode blocks of [`decode_kv_heads`].
    kv_heads: usize,
    q0: usize,
    rows: usize,
    /// The union of the rows' key ranges.
    keys: (usize, usize),
}

/// How many kv heads (with all their query heads) one block of `seq` takes: more than one
/// when each kv head's query columns fit one vector (the narrow kernels', `group · sq <=
/// LANES`: decode and short speculative drafts) and all of them see the same keys (one query
/// row, or no mask), else 1. The block then reads the rows of one key for all its kv heads
/// together: in a `[seq, kv_heads, d]` cache or page they are one contiguous run (vLLM's 8
/// heads of d128 bf16: 2 KiB), where per-kv-head blocks would make as many passes over the
/// cache, each reading one strided row in every run.
fn decode_kv_heads(seq: &Seq, group: usize, h: usize, mask: Mask, blocks: Blocks) -> usize {
    let cols = group.saturating_mul(seq.sq);
    let same_keys = seq.sq > 0 && mask.key_range(0, seq.sq, seq.sk) == mask.key_range(seq.sq - 1, seq.sq, seq.sk);
    if cols == 0 || cols > LANES || !h.is_multiple_of(group) || !same_keys {
        return 1;
    }
    (blocks.q / cols).clamp(1, MAX_KV_HEADS)
}

fn work_list_error(n: usize) -> Error {
    Error::invalid(
        "q",
        format!("a problem of {n} work items, whose list could not be allocated"),
        "a problem whose bookkeeping fits in free host memory",
    )
}


/// Computes one work item on the instruction set chosen for the call: its rows of `out` and,
/// if requested, of `lse`.
fn run_item<T: Element, R: KvRows<T>>(pb: &Problem<'_, T, R>, item: WorkItem<'_>, sc: &mut Scratch) {
    match pb.isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` returns `Avx512` only when the CPU has AVX2, FMA, F16C and
        // AVX-512F.
        Isa::Avx512 => unsafe { run_item_avx2::<T, R, true>(pb, item, sc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` returns `Avx2` only when the CPU has AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { run_item_avx2::<T, R, false>(pb, item, sc) },
        // SAFETY: the portable set needs nothing beyond the build target's baseline.
        Isa::Portable => unsafe { run_item_on::<kernels::Portable, T, R, false>(pb, item, sc) },
    }
}

/// [`run_item_on`] compiled for AVX2 + FMA + F16C: the one place those features are enabled;
/// everything it calls is `#[inline(always)]` and so compiled with them. `WIDE`: the matrix
/// products run on the AVX-512 micro-kernel where their panels are wide enough.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C, and AVX-512F if `WIDE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_item_avx2<T: Element, R: KvRows<T>, const WIDE: bool>(pb: &Problem<'_, T, R>, item: WorkItem<'_>, sc: &mut Scratch) {
    // SAFETY: the features `Avx2` needs are enabled in this function, and AVX-512F is present
    // if `WIDE` (the caller's contract).
    unsafe { run_item_on::<kernels::Avx2, T, R, WIDE>(pb, item, sc) }
}

/// The body of [`run_item`] for the instruction set `S`.
///
/// Per key tile: widen K and V once for all the item's rows (every head of the GQA group);
/// `Sᵀ = K · Qᵀ` on the micro-kernel; scale, cap and mask `Sᵀ`, then the online softmax along
/// its rows (keys) with queries in the vector lanes; rescale the accumulators; `acc += P · V`
/// on the micro-kernel. Finally normalise and store.
///
/// # Safety
/// `S`'s instruction set is enabled, and AVX-512F is present if `WIDE`.
#[inline(always)]
unsafe fn run_item_on<S: Simd, T: Element, R: KvRows<T>, const WIDE: bool>(pb: &Problem<'_, T, R>, item: WorkItem<'_>, sc: &mut Scratch) {
    let d = pb.q.layout.head_dim();
    let dp = round_up(d, PV_COLS);
    let bk = pb.blocks.k;
    let WorkItem { seq, head0, heads, kv_heads, q0, rows: qrows, keys: (chunk_begin, chunk_end), dest, .. } = item;
    let Seq { batch, q_base, sq, k_base, sk } = seq;
    let kv0 = head0 / pb.group;
    // Query column `i` of the item is row `q0 + i % qrows` of head `head0 + i / qrows`, so the
    // columns of kv head `kv0 + p` are the `part` from `p · part`.
    let rows = heads * qrows;
    let part = rows / kv_heads.max(1);
    let rp = round_up(rows, LANES);
    debug_assert!(rows <= pb.blocks.q && rp <= pb.blocks.rows_padded());
    // Keys [begin, end) of the sequence that column `i` may see, within the item's chunk (an
    // empty range may come out as begin > end; the tile loop treats it as empty). Clamping
    // keeps both ends non-decreasing in the row, as the mask makes them.
    let key_range = |i: usize| {
        let (b, e) = pb.mask.key_range(q0 + i % qrows, sq, sk);
        (b.max(chunk_begin), e.min(chunk_end))
    };

    let Scratch { qt, k: kt, v: vt, s: st, acc, row } = sc;
    let (max, rest) = row.split_at_mut(rp);
    let (sum, rest) = rest.split_at_mut(rp);
    let (alpha, rest) = rest.split_at_mut(rp);
    let (lo, hi) = rest.split_at_mut(rp);
    let (lo, hi) = (&mut lo[..rp], &mut hi[..rp]);

    // Qᵀ: each query row widened (into the first accumulator row, free until the sweep
    // starts), then scattered into its column. Padding columns are zero, so their scores are
    // finite and harmless; they are never stored. An item of at most eight rows per kv head
    // (decode) keeps Q row-major instead (`[rows, d]`) for the dot-product score kernel.
    let narrow = part <= LANES;
    // Items of several kv heads are narrow and every row sees the same keys (`work_items`
    // makes them only so): their tiles always take the uniform path below, the only one that
    // keeps each kv head's values apart.
    assert!(kv_heads == 1 || (narrow && kv_heads <= MAX_KV_HEADS), "a multi-kv-head item that is not narrow");
    if !narrow {
        // The padding columns must be zero; narrow items write all the `rows · d` they read.
        qt.fill(0.0);
    }
    // With d == 0 no element exists and q may be empty: address nothing.
    for i in (0..rows).filter(|_| d > 0) {
        let off = pb.q.layout.offset(batch, q_base + q0 + i % qrows, head0 + i / qrows);
        let src = &pb.q.data[off..off + d];
        if narrow {
            // SAFETY: `src` and row `i < rows` of `qt` (`[rows, d]`) hold `d` elements.
            unsafe { kernels::widen::<S, T>(qt.as_mut_ptr().add(i * d), src.as_ptr(), d) };
            continue;
        }
        // SAFETY: `src` and `acc` (at least `rows·dp >= d` values) hold `d` elements.
        unsafe { kernels::widen::<S, T>(acc.as_mut_ptr(), src.as_ptr(), d) };
        for (e, &x) in acc[..d].iter().enumerate() {
            qt[e * rp + i] = x;
        }
    }
    acc[..rows * dp].fill(0.0);
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);

    // Uniform narrow tiles: where each value row of each kv head lies, for `pv_narrow_rows`;
    // narrow tiles: where each key row lies, for `scores_keys`.
    let mut v_rows = [[std::ptr::null::<T>(); BLOCK_K]; MAX_KV_HEADS];
    let mut k_rows = [[std::ptr::null::<T>(); BLOCK_K]; MAX_KV_HEADS];
    // The K/V rows of the keys read, and of those prefetched ahead, run by run: a page is
    // looked up once, not once per row and kv head.
    let (mut k_cur, mut v_cur) = (RowCursor::new(), RowCursor::new());
    let (mut k_ahead, mut v_ahead) = (RowCursor::new(), RowCursor::new());
    // Both ends of the range are non-decreasing in the row: the first row has the lowest start,
    // the last row the highest end. A sequence without keys gives an empty range: no key row is
    // ever addressed.
    let block_begin = key_range(0).0 / bk * bk;
    let block_end = key_range(qrows - 1).1.max(block_begin);
    for k0 in (block_begin..block_end).step_by(bk) {
        let kn = bk.min(block_end - k0);
        // The tile's visible window per column, tile-relative, and the union over the item;
        // `uniform`: every row sees the whole union (decode), and the narrow kernels can read
        // the value rows in place.
        let (mut jlo, mut jhi) = (kn, 0);
        let (mut first, mut same) = (None, true);
        for i in 0..rp {
            let (b, e) = if i < rows { key_range(i) } else { (0, 0) };
            let (l, h) = (b.clamp(k0, k0 + kn) - k0, e.clamp(k0, k0 + kn) - k0);
            let (l, h) = if h > l { (l, h) } else { (0, 0) };
            if h > l {
                jlo = jlo.min(l);
                jhi = jhi.max(h);
            }
            // Exact: both are at most BLOCK_K.
            lo[i] = l as f32;
            hi[i] = h as f32;
            if i < rows {
                same &= *first.get_or_insert((l, h)) == (l, h);
            }
        }
        if jhi <= jlo {
            continue; // no row sees any key of this tile
        }
        // All windows equal and one is not empty: each is the union.
        let uniform = narrow && same;
        assert!(kv_heads == 1 || uniform, "a multi-kv-head item whose rows see different keys");

        // K and V rows of the visible window, widened once for every head of the item, with a
        // prefetch hint some keys ahead (strided rows, as in a `[seq, kv_heads, d]` cache or
        // pages, defeat the hardware prefetchers; contiguous ones measured faster with it too).
        // Narrow items score their keys in groups (four on AVX-512, else one by one), and each
        // head's prefetches go out just before its scores: a burst of every head's prefetches
        // of four keys stalls the core on full miss buffers with no arithmetic left to overlap.
        let group_keys = if narrow { kernels::score_keys::<WIDE>(part).min(SCORE_KEYS) } else { 1 };
        let mut ahead = [(RowRun::EMPTY, RowRun::EMPTY); SCORE_KEYS];
        let mut v_finite = true;
        for j in jlo..jhi {
            let key = k_base + k0 + j;
            let slot = (j - jlo) % group_keys;
            // Ahead within the sequence, not only the item: a key chunk's successor is the
            // next item's (often this thread's), and its first rows should not start cold.
            ahead[slot] = if k0 + j + PREFETCH_KEYS < sk {
                let next = key + PREFETCH_KEYS;
                let k = k_ahead.at(next, || pb.kv.k_run(batch, next, kv0, kv_heads));
                (k, v_ahead.at(next, || pb.kv.v_run(batch, next, kv0, kv_heads)))
            } else {
                (RowRun::EMPTY, RowRun::EMPTY)
            };
            let k_run = k_cur.at(key, || pb.kv.k_run(batch, key, kv0, kv_heads));
            let v_run = v_cur.at(key, || pb.kv.v_run(batch, key, kv0, kv_heads));
            for p in 0..kv_heads {
                let (kr, vr) = (k_run.row(p, d), v_run.row(p, d));
                // SAFETY: rows `j < bk` of the `[bk, d]` / `[bk, dp]` tiles hold `d` values, as
                // do `kr` and `vr`; not narrow or not uniform: `p == 0` (asserted above).
                unsafe {
                    if narrow {
                        k_rows[p][j] = kr.as_ptr();
                    } else {
                        kernels::widen::<S, T>(kt.as_mut_ptr().add(j * d), kr.as_ptr(), d);
                    }
                    if uniform {
                        v_rows[p][j] = vr.as_ptr();
                    } else {
                        v_finite &= kernels::widen_finite::<S, T>(vt.as_mut_ptr().add(j * dp), vr.as_ptr(), d);
                    }
                }
            }
            if slot + 1 < group_keys && j + 1 < jhi {
                continue;
            }
            // The group `g0 ..= j` is complete: per head, its prefetches, then (narrow) the
            // scores straight from the key rows, widened in registers.
            let g0 = j - slot;
            for (p, k) in k_rows[..kv_heads].iter().enumerate() {
                for (ka, va) in ahead[..=slot].iter().filter(|(ka, _)| ka.keys > 0) {
                    kernels::prefetch(ka.row(p, d));
                    kernels::prefetch(va.row(p, d));
                }
                if narrow && d > 0 {
                    // SAFETY: `k[g0 ..= j]` are kv head `p`'s key rows of `d` elements (set
                    // above); `qt` holds `rows` rows of `d`, of which kv head `p`'s are the
                    // `part` from `p · part`; rows `g0 ..= j < bk` of `st` (`[bk, rp]`) have
                    // `rp >= rows` columns.
                    unsafe {
                        let (q, out) = (qt.as_ptr().add(p * part * d), st.as_mut_ptr().add(g0 * rp + p * part));
                        kernels::scores_keys::<S, T, WIDE>(part, d, &k[g0..=j], q, out, rp);
                    }
                }
            }
        }

        // Sᵀ[j, i] = k_j · q_i for the window, in panels of 32, 16 or 8 query columns (narrow
        // items have theirs already, computed as each key row was read).
        let window = jhi - jlo;
        if d == 0 {
            st[jlo * rp..jhi * rp].fill(0.0);
        } else if !narrow {
            // SAFETY: A is `window` rows of `kt` (`d` each), B the `[d, rp]` `qt`, C rows
            // `jlo .. jhi` of `st` (`[bk, rp]`); `rp` is a multiple of LANES.
            unsafe {
                let (a, out) = (kt.as_ptr().add(jlo * d), st.as_mut_ptr().add(jlo * rp));
                kernels::gemm_block::<S, WIDE>(window, d, a, d, 1, qt.as_ptr(), rp, out, rp, false, rp);
            }
        }
        if let Some(cap) = pb.softcap {
            for x in &mut st[jlo * rp..jhi * rp] {
                *x = cap * (*x * pb.scale / cap).tanh();
            }
        }
        let scale = if pb.softcap.is_some() { 1.0 } else { pb.scale };

        // Online softmax, eight query columns at a time.
        for g in (0..rp).step_by(LANES) {
            // SAFETY: columns `g .. g + LANES <= rp` of rows `jlo .. jhi <= bk` of `st`, and of
            // the per-column runs of `rp`.
            unsafe {
                let (l, h) = (S::load(lo.as_ptr().add(g)), S::load(hi.as_ptr().add(g)));
                let m_old = S::load(max.as_ptr().add(g));
                let (neg_inf, vscale) = (S::splat(f32::NEG_INFINITY), S::splat(scale));
                let (mut m, mut nan) = (m_old, S::is_nan(m_old));
                for j in jlo..jhi {
                    let p = st.as_mut_ptr().add(j * rp + g);
                    let jv = S::splat(j as f32);
                    // A key the column does not see is -inf, whatever its score (even NaN).
                    let sees = S::and(S::ge(jv, l), S::lt(jv, h));
                    let x = S::select(sees, S::mul(S::load(p), vscale), neg_inf);
                    S::store(p, x);
                    nan = S::or(nan, S::is_nan(x));
                    m = S::max(m, x);
                }
                // A NaN score makes the max NaN, and with it every weight, the sum and the row.
                let m_new = S::select(nan, S::splat(f32::NAN), m);
                // Where every score so far is -inf nothing has weight yet: subtracting 0
                // instead keeps exp(-inf - -inf) from making a NaN, and gives weights 0.
                let m_sub = S::select(S::eq(m_new, neg_inf), S::zero(), m_new);
                // exp(-inf) = 0 drops the (empty) history on the first tile.
                let a = S::exp(S::sub(m_old, m_sub));
                let mut block_sum = S::zero();
                for j in jlo..jhi {
                    let p = st.as_mut_ptr().add(j * rp + g);
                    let e = S::exp(S::sub(S::load(p), m_sub));
                    S::store(p, e);
                    block_sum = S::add(block_sum, e);
                }
                S::store(max.as_mut_ptr().add(g), m_new);
                S::store(sum.as_mut_ptr().add(g), S::fma(S::load(sum.as_ptr().add(g)), a, block_sum));
                S::store(alpha.as_mut_ptr().add(g), a);
            }
        }

        if uniform {
            for (p, v) in v_rows[..kv_heads].iter().enumerate() {
                // SAFETY: `v[jlo .. jhi]` are kv head `kv0 + p`'s value rows of `d` elements
                // (set above); its columns `p · part ..` of P (rows `jlo .. jhi` of `st`,
                // `[bk, rp]`), of `alpha` and of `acc` (`rows` rows of `dp >= d`) are within
                // `rows <= rp`.
                unsafe {
                    let (c, s) = (p * part, st.as_ptr().add(jlo * rp + p * part));
                    let (a, o) = (alpha.as_ptr().add(c), acc.as_mut_ptr().add(c * dp));
                    kernels::pv_narrow_rows::<S, T, WIDE>(part, &v[jlo..jhi], s, rp, a, o, dp, d);
                }
            }
            continue;
        }
        // Rescale each row's history, then acc += P · V over the window.
        for i in 0..rows {
            let a = alpha[i];
            if a != 1.0 {
                for x in &mut acc[i * dp..i * dp + d] {
                    *x *= a;
                }
            }
        }
        if v_finite {
            // SAFETY: A(i, p) = Pᵀ[jlo + p, i] within `st` (`[bk, rp]`, i < rows <= rp), B value
            // rows `jlo .. jhi` of `vt` (`[bk, dp]`), C accumulator rows `0 .. rows` (`[rp, dp]`);
            // `dp` is a multiple of LANES.
            unsafe {
                let (a, b) = (st.as_ptr().add(jlo * rp), vt.as_ptr().add(jlo * dp));
                kernels::gemm_block::<S, WIDE>(rows, window, a, 1, rp, b, dp, acc.as_mut_ptr(), dp, true, dp);
            }
        } else {
            // A NaN or infinite value must reach exactly the rows that see it: 0 · NaN is NaN,
            // so each row takes only the keys in its own window here.
            for i in 0..rows {
                let (l, h) = (lo[i] as usize, hi[i] as usize);
                for j in l..h {
                    let p = st[j * rp + i];
                    for (x, &v) in acc[i * dp..i * dp + d].iter_mut().zip(&vt[j * dp..j * dp + d]) {
                        *x += p * v;
                    }
                }
            }
        }
    }

    match dest {
        Dest::Out(mut lse) => store_rows(pb, seq, head0, q0, qrows, &max[..rows], &sum[..rows], acc, dp, &mut lse),
        Dest::Part(part) => {
            // The state as it stands, for `merge_partials`.
            let (m, s, a) = Partial { rows, d }.parts(part);
            m.copy_from_slice(&max[..rows]);
            s.copy_from_slice(&sum[..rows]);
            for (dst, src) in a.chunks_exact_mut(d.max(1)).zip(acc.chunks_exact(dp.max(1))) {
                dst.copy_from_slice(&src[..dst.len()]);
            }
        }
    }
}

// The shared test helpers live with the integration tests; they only use plain types, so the
// unit tests can include them directly. Declared at file level so `#[path]` is relative to
// `src/` (inside an inline module it would be relative to `src/cpu/tests/`).
#[cfg(test)]
#[path = "../tests/common/reference.rs"]
mod reference;
#[cfg(test)]
#[path = "../tests/common/rng.rs"]
#[allow(dead_code)] // shared with the integration tests, which use more of it
mod rng;

#[cfg(test)]
mod tests {
    use super::reference::{attention_f64, attention_f64_masked, rel_err, RefInput, RefMask};
    use super::rng::Rng;
    use super::*;
    use half::{bf16, f16};

    /// How a test tensor is laid out in memory.
    #[derive(Clone, Copy, Debug)]
    enum Mem {
        /// `[b, s, h, d]` dense.
        Contig,
        /// `[b, h, s, d]` dense.
        HeadsFirst,
        /// `[b, s, h, d]` with gaps after every head, row and batch.
        Padded,
        /// `[b, h, s, d]` with gaps after every row, head and batch.
        PaddedHeadsFirst,
    }

    fn layout(mem: Mem, b: usize, s: usize, h: usize, d: usize) -> Layout {
        match mem {
            Mem::Contig => Layout::contiguous(b, s, h, d),
            Mem::HeadsFirst => Layout::heads_first(b, s, h, d),
            Mem::Padded => {
                let hs = d + 3;
                let ss = h * hs + 5;
                Layout::strided([b, s, h, d], [s * ss + 7, ss, hs])
            }
            Mem::PaddedHeadsFirst => {
                let ss = d + 2;
                let hs = s * ss + 3;
                Layout::strided([b, s, h, d], [h * hs + 11, ss, hs])
            }
        }
    }

    /// One test problem.
    #[derive(Clone, Copy, Debug)]
    struct Case {
        b: usize,
        sq: usize,
        sk: usize,
        h: usize,
        hk: usize,
        d: usize,
        causal: bool,
        mem: Mem,
        threads: usize,
    }

    const fn case(b: usize, sq: usize, sk: usize, h: usize, hk: usize, d: usize) -> Case {
        Case {
            b,
            sq,
            sk,
            h,
            hk,
            d,
            causal: false,
            mem: Mem::Contig,
            threads: 2,
        }
    }

    impl Case {
        const fn causal(mut self, causal: bool) -> Self {
            self.causal = causal;
            self
        }
        const fn mem(mut self, mem: Mem) -> Self {
            self.mem = mem;
            self
        }
        const fn threads(mut self, threads: usize) -> Self {
            self.threads = threads;
            self
        }
    }

    /// Random inputs of one case, rounded to `T`.
    struct Inputs<T> {
        q: Vec<T>,
        k: Vec<T>,
        v: Vec<T>,
        ql: Layout,
        kl: Layout,
        vl: Layout,
        ol: Layout,
    }

    fn inputs<T: Element>(c: &Case, rng: &mut Rng) -> Inputs<T> {
        let ql = layout(c.mem, c.b, c.sq, c.h, c.d);
        let kl = layout(c.mem, c.b, c.sk, c.hk, c.d);
        // v and out get other layouts than q/k, so mixed layouts are covered too.
        let vl = layout(Mem::Padded, c.b, c.sk, c.hk, c.d);
        let ol = layout(c.mem, c.b, c.sq, c.h, c.d);
        let mut buf = |l: Layout| {
            let mut x = vec![T::from_f32(0.0); l.span().unwrap()];
            rng.fill(&mut x, T::from_f32);
            x
        };
        Inputs {
            q: buf(ql),
            k: buf(kl),
            v: buf(vl),
            ql,
            kl,
            vl,
            ol,
        }
    }

    /// Runs `forward` on NaN-poisoned output; returns (out buffer, lse).
    fn run<T: Element>(c: &Case, x: &Inputs<T>, threads: usize) -> (Vec<T>, Vec<f32>) {
        let (out, lse) = run_lse(c, x, threads, true);
        (out, lse.expect("requested"))
    }

    /// As [`run`], on `threads`.
    fn run_on<T: Element>(c: &Case, x: &Inputs<T>, threads: &Threads) -> (Vec<T>, Vec<f32>) {
        let (out, lse) = run_lse_on(c, x, threads, true);
        (out, lse.expect("requested"))
    }

    /// As [`run`], with the lse output requested or not.
    fn run_lse<T: Element>(c: &Case, x: &Inputs<T>, threads: usize, with_lse: bool) -> (Vec<T>, Option<Vec<f32>>) {
        run_lse_on(c, x, &Threads::new(Some(threads)), with_lse)
    }

    /// As [`run_lse`], on `threads`.
    fn run_lse_on<T: Element>(c: &Case, x: &Inputs<T>, threads: &Threads, with_lse: bool) -> (Vec<T>, Option<Vec<f32>>) {
        let mut out = vec![T::from_f32(f32::NAN); x.ol.span().unwrap()];
        let mut lse = with_lse.then(|| vec![f32::NAN; c.b * c.h * c.sq]);
        forward(
            HostIn {
                data: &x.q,
                layout: x.ql,
            },
            HostIn {
                data: &x.k,
                layout: x.kl,
            },
            HostIn {
                data: &x.v,
                layout: x.vl,
            },
            &mut out,
            x.ol,
            lse.as_deref_mut(),
            Seqs::Dense,
            scale(c),
            Mask { causal: c.causal, ..Mask::default() },
            None,
            threads,
        )
        .expect("forward");
        (out, lse)
    }

    /// Runs `forward` on f32 inputs under `mask` (no lse poison check); returns (out, lse).
    fn run_mask(c: &Case, x: &Inputs<f32>, mask: Mask, threads: usize) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; x.ol.span().unwrap()];
        let mut lse = vec![f32::NAN; c.b * c.h * c.sq];
        forward(
            HostIn { data: &x.q, layout: x.ql },
            HostIn { data: &x.k, layout: x.kl },
            HostIn { data: &x.v, layout: x.vl },
            &mut out,
            x.ol,
            Some(&mut lse),
            Seqs::Dense,
            scale(c),
            mask,
            None,
            &Threads::new(Some(threads)),
        )
        .expect("forward");
        (out, lse)
    }

    fn scale(c: &Case) -> f32 {
        1.0 / (c.d.max(1) as f32).sqrt()
    }

    fn ref_in<T>(data: &[T], l: Layout) -> RefInput<'_, T> {
        RefInput {
            data,
            shape: l.shape(),
            strides: l.strides(),
        }
    }

    /// Checks one case against the f64 reference, with output relative tolerance `tol`.
    fn check<T: Element>(c: Case, tol: f64) {
        let mut rng = Rng::fresh();
        let seed = rng.get_seed();
        let ctx = format!("{} {c:?} seed {seed:#x}", T::DTYPE);
        let x = inputs::<T>(&c, &mut rng);
        let (out, lse) = run(&c, &x, c.threads);
        let to64 = |t: T| t.to_f32() as f64;
        let (want, want_lse) = attention_f64(
            ref_in(&x.q, x.ql),
            ref_in(&x.k, x.kl),
            ref_in(&x.v, x.vl),
            to64,
            scale(&c) as f64,
            c.causal,
        );

        // Gather the logical output; every element must have been written.
        let [b, sq, h, d] = x.ol.shape();
        let mut got = Vec::with_capacity(b * sq * h * d);
        let mut written = vec![false; out.len()];
        for bi in 0..b {
            for s in 0..sq {
                for hi in 0..h {
                    let off = x.ol.offset(bi, s, hi);
                    for e in 0..d {
                        got.push(to64(out[off + e]));
                        written[off + e] = true;
                    }
                }
            }
        }
        assert!(
            got.iter().all(|g| g.is_finite()),
            "{ctx}: unwritten or non-finite output"
        );
        // Padding must be left alone (still the NaN poison).
        for (i, w) in written.iter().enumerate() {
            assert!(
                *w || out[i].to_f32().is_nan(),
                "{ctx}: wrote padding element {i}"
            );
        }
        let err = rel_err(&got, &want);
        assert!(err < tol, "{ctx}: relative error {err:e} >= {tol:e}");

        for (i, (&l, &w)) in lse.iter().zip(&want_lse).enumerate() {
            if w == f64::NEG_INFINITY {
                assert_eq!(l, f32::NEG_INFINITY, "{ctx}: lse[{i}] of an empty row");
                // The row's output must be exact zeros.
                let (bh, s) = (i / sq, i % sq);
                let off = x.ol.offset(bh / h, s, bh % h);
                for e in 0..d {
                    assert_eq!(out[off + e].to_f32(), 0.0, "{ctx}: empty row {i} not zero");
                }
            } else {
                let e = (l as f64 - w).abs();
                assert!(e < 1e-4, "{ctx}: lse[{i}] = {l}, want {w} (err {e:e})");
            }
        }
    }

    const TOL_F32: f64 = 1e-5;
    const TOL_F16: f64 = 2e-3;
    const TOL_BF16: f64 = 1e-2;

    /// Runs every case for all three element types.
    fn check_all(cases: &[Case]) {
        for &c in cases {
            check::<f32>(c, TOL_F32);
            check::<f16>(c, TOL_F16);
            check::<bf16>(c, TOL_BF16);
        }
    }

    /// Each case with and without the causal mask.
    fn both_masks(cases: &[Case]) -> Vec<Case> {
        cases
            .iter()
            .flat_map(|&c| [c.causal(false), c.causal(true)])
            .collect()
    }

    #[test]
    fn square_multi_block() {
        // Several query and key blocks, with partial last blocks.
        check_all(&both_masks(&[
            case(2, 130, 130, 3, 3, 64),
            case(1, 64, 64, 2, 2, 32),
        ]));
    }

    #[test]
    fn seqlen_one() {
        check_all(&both_masks(&[
            case(2, 1, 1, 4, 4, 64),
            case(2, 1, 150, 4, 4, 64), // decoding: the single row sees every key
            case(1, 150, 1, 2, 2, 16),
        ]));
    }

    #[test]
    fn seqlen_q_differs_from_seqlen_k() {
        check_all(&both_masks(&[
            case(1, 70, 200, 2, 2, 32), // fewer queries than keys
            case(2, 200, 70, 2, 2, 32), // more queries than keys
            case(1, 65, 129, 1, 1, 64),
        ]));
    }

    #[test]
    fn causal_more_queries_than_keys_gives_empty_rows() {
        // The first sq - sk rows see no key: zeros and -inf (checked in `check`).
        check_all(&[
            case(1, 100, 30, 2, 2, 16).causal(true),
            case(1, 3, 1, 1, 1, 8).causal(true),
            case(1, 200, 130, 2, 1, 64).causal(true),
        ]);
    }

    #[test]
    fn no_keys() {
        check_all(&both_masks(&[
            case(2, 5, 0, 2, 2, 8),
            case(1, 70, 0, 4, 1, 64),
        ]));
    }

    #[test]
    fn gqa_and_mqa() {
        check_all(&both_masks(&[
            case(2, 33, 47, 8, 2, 64),  // GQA 8:2
            case(1, 100, 80, 8, 1, 32), // MQA
            case(1, 1, 90, 8, 2, 64),   // GQA decode
        ]));
    }

    #[test]
    fn strided_layouts() {
        let mut cases = Vec::new();
        for mem in [Mem::HeadsFirst, Mem::Padded, Mem::PaddedHeadsFirst] {
            cases.push(case(2, 40, 70, 4, 2, 24).mem(mem));
            cases.push(case(1, 70, 40, 2, 2, 64).mem(mem));
            cases.push(case(2, 1, 33, 8, 8, 16).mem(mem));
        }
        check_all(&both_masks(&cases));
    }

    #[test]
    fn head_dims() {
        let mut cases = Vec::new();
        for d in [1, 3, 7, 8, 9, 64, 130] {
            cases.push(case(1, 37, 71, 2, 1, d));
            cases.push(case(1, 71, 37, 2, 2, d).mem(Mem::Padded));
        }
        check_all(&both_masks(&cases));
    }

    #[test]
    fn empty_dimensions() {
        // Nothing to compute, but nothing may panic either; with d == 0 only lse exists and
        // equals ln(number of visible keys).
        check_all(&both_masks(&[
            case(0, 5, 5, 2, 2, 8),
            case(2, 0, 5, 2, 2, 8),
            case(2, 5, 5, 0, 1, 8),
            case(2, 5, 7, 2, 2, 0),
            case(1, 9, 4, 2, 1, 0),
        ]));
    }

    #[test]
    fn thread_count_does_not_change_bits() {
        fn same<T: Element>(c: Case) {
            let mut rng = Rng::fresh();
            let seed = rng.get_seed();
            let x = inputs::<T>(&c, &mut rng);
            let (o1, l1) = run(&c, &x, 1);
            for threads in [Some(2), Some(3), Some(4), Some(64), None] {
                let (o, l) = run_on(&c, &x, &Threads::new(threads));
                let ctx = format!("{} {c:?} threads {threads:?} seed {seed:#x}", T::DTYPE);
                assert_eq!(
                    bytemuck::cast_slice::<T, u8>(&o),
                    bytemuck::cast_slice::<T, u8>(&o1),
                    "{ctx}"
                );
                assert_eq!(
                    bytemuck::cast_slice::<f32, u32>(&l),
                    bytemuck::cast_slice::<f32, u32>(&l1),
                    "{ctx}"
                );
            }
        }
        for c in both_masks(&[
            case(2, 200, 150, 4, 2, 64),
            case(1, 150, 200, 3, 3, 9).mem(Mem::Padded),
        ]) {
            same::<f32>(c);
            same::<f16>(c);
            same::<bf16>(c);
        }
    }

    /// The split plan of a dense call without lse: (work items, split blocks, partial floats).
    fn plan(b: usize, sq: usize, sk: usize, h: usize, hk: usize, d: usize) -> (usize, usize, usize) {
        let mut parts = Vec::new();
        let (items, splits) =
            work_items(b, sq, sk, h, d, h / hk, None, Seqs::Dense, Mask::default(), Blocks::for_head_dim(d), &mut parts)
                .expect("plan");
        (items.len(), splits.len(), parts.len())
    }

    /// Decode over long keys with few (sequence, kv head) blocks splits each block's keys into
    /// chunks; many blocks, or short keys, are not split; the chunk count stays bounded however
    /// long the keys are. The split results match the reference (the merge included).
    #[test]
    fn long_decode_splits_its_keys() {
        // One block of all 8 kv heads (decode) over 4096 keys: 8 chunks, a partial of 32 rows
        // × (128 + 2) per chunk.
        assert_eq!(plan(1, 1, 4096, 32, 8, 128), (8, 1, 8 * 32 * 130));
        assert_eq!(plan(1, 1, 2 * SPLIT_KEYS - 1, 32, 8, 128), (1, 0, 0), "under two chunks of keys");
        assert_eq!(plan(64, 1, 4096, 32, 8, 128), (64, 0, 0), "enough blocks to share out");
        // Per kv head: 16 query heads a kv head (not narrow), or rows that see different keys.
        assert_eq!(plan(1, 1, 4096, 32, 2, 128), (16, 2, 16 * 16 * 130));
        let causal = Mask { causal: true, ..Mask::default() };
        let mut parts = Vec::new();
        let (items, _) = work_items(1, 2, 4096, 32, 128, 4, None, Seqs::Dense, causal, Blocks::for_head_dim(128), &mut parts).expect("plan");
        assert!(items.len() == 64 && items.iter().all(|it| it.kv_heads == 1 && it.heads == 4));
        let (items, splits, _) = plan(1, 1, 1 << 24, 4, 1, 8);
        assert!(splits == 1 && items > 2 && items <= MAX_CHUNKS + 1, "{items} chunks of 2^24 keys");
        // A partial buffer past its cap: not split at all (d = 2^20: 130 chunks × 4 rows ≫ 2^22).
        assert_eq!(plan(1, 1, 1 << 16, 4, 1, 1 << 20).1, 0);
        check_all(&both_masks(&[
            case(1, 1, 3000, 4, 1, 64),
            case(1, 2, 1100, 8, 2, 16).mem(Mem::Padded),
            case(1, 1, 1025, 2, 1, 9).mem(Mem::HeadsFirst),
            // Decode items of several kv heads: all 8, and 8 + 4 of 12 (MHA).
            case(1, 1, 2100, 32, 8, 64).mem(Mem::PaddedHeadsFirst),
            case(2, 1, 1100, 12, 12, 16),
        ]));
    }

    #[test]
    fn threads_zero_means_one() {
        check::<f32>(case(1, 70, 70, 2, 2, 16).threads(0), TOL_F32);
        check::<f32>(case(1, 70, 70, 2, 2, 16).threads(1), TOL_F32);
    }

    /// Runs f32 inputs holding NaN or infinities under `mask` and compares with the f64
    /// reference, which propagates NaN by itself: NaN exactly where the reference has it, the
    /// other values within tolerance. Returns (out as [b, sq, h, d], lse) for further checks.
    fn check_non_finite(c: &Case, x: &Inputs<f32>, mask: Mask) -> (Vec<f64>, Vec<f32>) {
        let ctx = format!("{c:?} {mask:?}");
        let (out, lse) = run_mask(c, x, mask, 2);
        let ref_mask = RefMask { causal: mask.causal, left: mask.left, right: mask.right, softcap: None };
        let (want, want_lse) = attention_f64_masked(
            ref_in(&x.q, x.ql),
            ref_in(&x.k, x.kl),
            ref_in(&x.v, x.vl),
            |t| t as f64,
            scale(c) as f64,
            ref_mask,
        );
        let [b, sq, h, d] = x.ol.shape();
        let mut got = Vec::with_capacity(b * sq * h * d);
        for bi in 0..b {
            for s in 0..sq {
                for hi in 0..h {
                    let off = x.ol.offset(bi, s, hi);
                    got.extend(out[off..off + d].iter().map(|&o| o as f64));
                }
            }
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.is_nan(), w.is_nan(), "{ctx}: out[{i}] = {g}, reference {w}");
        }
        for (i, (g, w)) in lse.iter().zip(&want_lse).enumerate() {
            assert_eq!(g.is_nan(), w.is_nan(), "{ctx}: lse[{i}] = {g}, reference {w}");
        }
        let finite = |v: &[f64]| v.iter().map(|x| if x.is_nan() { 0.0 } else { *x }).collect::<Vec<_>>();
        let err = rel_err(&finite(&got), &finite(&want));
        assert!(err < TOL_F32, "{ctx}: relative error {err:e} outside the NaN rows");
        (got, lse)
    }

    /// The masks the non-finite tests run under: none, causal, causal with a left window.
    fn nan_masks() -> [Mask; 3] {
        [
            Mask::default(),
            Mask { causal: true, ..Mask::default() },
            Mask { causal: true, left: Some(5), right: None },
        ]
    }

    /// Whether output row (row, head) of the [b, sq, h, d] `out` is all NaN / all finite.
    fn row_is(out: &[f64], c: &Case, row: usize, head: usize, f: fn(f64) -> bool) -> bool {
        out[(row * c.h + head) * c.d..][..c.d].iter().all(|&x| f(x))
    }

    #[test]
    fn nan_in_a_query_row_gives_a_nan_row() {
        let c = case(1, 70, 90, 2, 1, 16);
        for mask in nan_masks() {
            let mut x = inputs::<f32>(&c, &mut Rng::fresh());
            let (row, head) = (40, 1);
            x.q[x.ql.offset(0, row, head) + 3] = f32::NAN;
            let (out, lse) = check_non_finite(&c, &x, mask);
            for r in 0..c.sq {
                for hd in 0..c.h {
                    let poisoned = (r, hd) == (row, head);
                    let l = lse[hd * c.sq + r];
                    assert_eq!(row_is(&out, &c, r, hd, f64::is_nan), poisoned, "{mask:?}: row {r} head {hd}");
                    assert_eq!(l.is_nan(), poisoned, "{mask:?}: lse of row {r} head {hd} = {l}");
                    if !poisoned {
                        assert!(row_is(&out, &c, r, hd, f64::is_finite), "{mask:?}: row {r} head {hd}");
                    }
                }
            }
        }
    }

    /// A NaN in one key (or value) row reaches every output row that sees that key (all of it
    /// through k, its column through v), and no other: not the rows the mask hides it from,
    /// even when it sits in a key block they read.
    #[test]
    fn nan_in_a_key_or_value_row_reaches_only_the_rows_that_see_it() {
        let c = case(1, 70, 90, 2, 1, 16);
        let key = 30;
        for in_value in [false, true] {
            for mask in nan_masks() {
                let mut x = inputs::<f32>(&c, &mut Rng::fresh());
                if in_value {
                    x.v[x.vl.offset(0, key, 0) + 5] = f32::NAN;
                } else {
                    x.k[x.kl.offset(0, key, 0) + 5] = f32::NAN;
                }
                let (out, lse) = check_non_finite(&c, &x, mask);
                let ctx = format!("{mask:?} in_value={in_value}");
                let mut seen = 0;
                for r in 0..c.sq {
                    let (begin, end) = mask.key_range(r, c.sq, c.sk);
                    let sees = (begin..end).contains(&key);
                    seen += sees as usize;
                    for hd in 0..c.h {
                        let l = lse[hd * c.sq + r];
                        if sees && in_value {
                            // Only the NaN's own column: out = P·V.
                            let row = &out[(r * c.h + hd) * c.d..][..c.d];
                            for (e, o) in row.iter().enumerate() {
                                assert_eq!(o.is_nan(), e == 5, "{ctx}: row {r} element {e} = {o}");
                            }
                            // The lse depends on the scores only.
                            assert!(l.is_finite(), "{ctx}: lse of row {r} = {l}");
                        } else if sees {
                            assert!(row_is(&out, &c, r, hd, f64::is_nan), "{ctx}: row {r} sees the NaN key");
                            assert!(l.is_nan(), "{ctx}: lse of row {r} = {l}");
                        } else {
                            assert!(row_is(&out, &c, r, hd, f64::is_finite), "{ctx}: row {r} does not see the key");
                            assert!(!l.is_nan(), "{ctx}: lse of row {r} = {l}");
                        }
                    }
                }
                assert!(seen > 0 && seen < c.sq || mask == Mask::default(), "{ctx}: test sees {seen} rows");
            }
        }
    }

    /// Every instruction set this machine has gives results within the same tolerances, NaN
    /// rules included: the portable path is what aarch64 and older x86 run.
    #[test]
    fn every_isa_matches_the_reference() {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() != Isa::Portable {
            isas.push(Isa::Avx2); // on an AVX-512 machine the default runs Avx512
        }
        for isa in isas {
            kernels::with_isa(isa, || {
            assert_eq!(Isa::detect(), isa);
            check_all(&both_masks(&[
                case(2, 130, 130, 3, 3, 64),
                case(1, 70, 200, 8, 2, 24).mem(Mem::Padded),
                case(1, 1, 90, 8, 2, 64),
                case(1, 37, 71, 2, 1, 9),
                case(1, 1, 1100, 4, 1, 20), // split keys; value rows read in place, tail columns
            ]));
            nan_in_a_query_row_gives_a_nan_row();
            nan_in_a_key_or_value_row_reaches_only_the_rows_that_see_it();
            infinite_logits_give_nan_rows();
            });
        }
    }

    /// Decode items (one query row, every key seen) on a CPU with AVX-512F take the AVX-512
    /// score and P·V kernels exactly when each kv head has a multiple of four query heads, and
    /// match the reference at head_dims with and without tail chunks, 1 to 17 keys, GQA 1, 2,
    /// 4 and 8, all three element types and the layouts of `Mem`; the NaN rules hold there.
    #[test]
    fn decode_takes_the_avx512_kernels_and_matches_the_reference() {
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() == Isa::Avx512 {
            let calls = kernels::decode512_calls;
            for (h, hk) in [(8, 8), (8, 4), (8, 2), (16, 2)] {
                for d in [8, 16, 72, 128, 256] {
                    for sk in [1, 2, 3, 5, 8, 13, 17] {
                        let mem = [Mem::Contig, Mem::HeadsFirst, Mem::Padded, Mem::PaddedHeadsFirst][(d + sk) % 4];
                        // One thread: the items run on this one, where the calls are counted.
                        let c = case(2, 1, sk, h, hk, d).mem(mem).threads(1);
                        let before = calls();
                        check::<f32>(c, TOL_F32);
                        check::<f16>(c, TOL_F16);
                        check::<bf16>(c, TOL_BF16);
                        let taken = calls() > before;
                        assert_eq!(taken, (h / hk) % 4 == 0, "{c:?}: AVX-512 decode kernels taken: {taken}");
                    }
                }
            }
            // NaN in a query row, a key row or a value element of GQA group 1 of 2 (query
            // heads 4..8): it reaches that head, or that group (the value: that element).
            let c = case(1, 1, 13, 8, 2, 72).threads(1);
            for (what, at) in [("q", 5usize), ("k", 1), ("v", 1)] {
                let mut x = inputs::<f32>(&c, &mut Rng::fresh());
                match what {
                    "q" => x.q[x.ql.offset(0, 0, at) + 3] = f32::NAN,
                    "k" => x.k[x.kl.offset(0, 6, at) + 3] = f32::NAN,
                    _ => x.v[x.vl.offset(0, 6, at) + 3] = f32::NAN,
                }
                let (out, lse) = run(&c, &x, 1);
                for hd in 0..c.h {
                    let hit = if what == "q" { hd == at } else { hd / 4 == at };
                    let row = &out[x.ol.offset(0, 0, hd)..][..c.d];
                    for (e, o) in row.iter().enumerate() {
                        let nan = hit && (what != "v" || e == 3);
                        assert_eq!(o.is_nan(), nan, "NaN in {what}: head {hd} element {e} = {o}");
                    }
                    assert_eq!(lse[hd].is_nan(), hit && what != "v", "NaN in {what}: lse of head {hd}");
                }
            }
        }
    }

    /// An infinite logit makes its row NaN (inf - inf in the softmax), as in PyTorch; it is not
    /// turned into zeros.
    #[test]
    fn infinite_logits_give_nan_rows() {
        let c = case(1, 70, 90, 2, 1, 16);
        for mask in nan_masks() {
            for inf in [f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = inputs::<f32>(&c, &mut Rng::fresh());
                let (row, head) = (65, 0);
                x.q[x.ql.offset(0, row, head)] = inf;
                // Keys of both signs in column 0, so every row sees a +inf logit whichever sign
                // the infinity has. (A row whose every logit is -inf is the case no kernel can
                // tell from a fully masked row: it gives zeros, on the GPU too.)
                for j in 0..c.sk {
                    x.k[x.kl.offset(0, j, 0)] = if j % 2 == 0 { 0.5 } else { -0.5 };
                }
                let (out, lse) = check_non_finite(&c, &x, mask);
                assert!(row_is(&out, &c, row, head, f64::is_nan), "{mask:?} {inf}: row not NaN");
                assert!(lse[head * c.sq + row].is_nan(), "{mask:?} {inf}: lse not NaN");
            }
        }
    }

    #[test]
    fn lse_is_optional() {
        let c = case(1, 70, 90, 2, 1, 32).causal(true);
        let x = inputs::<f32>(&c, &mut Rng::fresh());
        let (with, _) = run(&c, &x, 2);
        let (out, lse) = run_lse(&c, &x, 2, false);
        assert!(lse.is_none());
        assert_eq!(
            bytemuck::cast_slice::<f32, u32>(&out),
            bytemuck::cast_slice::<f32, u32>(&with)
        );
    }

    /// Whether two runs gave the same bits.
    fn same_bits(a: &(Vec<f32>, Vec<f32>), b: &(Vec<f32>, Vec<f32>)) -> bool {
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        bits(&a.0) == bits(&b.0) && bits(&a.1) == bits(&b.1)
    }

    /// A case with enough work for several workers.
    const PARALLEL: Case = case(1, 256, 256, 4, 2, 64);

    #[test]
    fn scratch_is_bounded_for_any_head_dim() {
        for d in [0, 1, 64, 2048, 2049, 4096, 100_000, 1 << 20, 1 << 28, 1 << 40] {
            let blocks = Blocks::for_head_dim(d);
            let bytes = blocks.scratch_bytes(d).expect("fits usize");
            assert!(bytes <= (3 << 20).max(96 * d), "head_dim {d}: {bytes} bytes of scratch ({blocks:?})");
            assert!(blocks.q >= 1 && blocks.k >= 1);
        }
        // Up to 2048 the blocks, and so the results, are what they always were.
        for d in [1, 64, 128, 256, 2048] {
            assert_eq!(Blocks::for_head_dim(d), Blocks { q: BLOCK_Q, k: BLOCK_K }, "head_dim {d}");
        }
    }

    #[test]
    fn scratch_allocation_failure_is_an_error_not_an_abort() {
        // Past isize::MAX bytes, and past any address space.
        for d in [usize::MAX / 2, 1 << 60] {
            let err = Scratch::try_new(d, Blocks::for_head_dim(d)).err().expect("cannot be allocated");
            let msg = err.to_string();
            assert!(msg.contains(&format!("head_dim {d}")), "{msg}");
        }
    }

    /// A huge requested thread count is clamped, and a call too small to share out runs on the
    /// calling thread without starting the pool at all.
    #[test]
    fn small_calls_run_inline_without_starting_threads() {
        let threads = Threads::new(Some(1_000_000));
        assert_eq!(threads.count(), Some(MAX_THREADS));
        let c = case(1, 4, 4, 8, 2, 8);
        let x = inputs::<f32>(&c, &mut Rng::fresh());
        let t = std::time::Instant::now();
        let got = run_on(&c, &x, &threads);
        assert!(threads.pool.get().is_none(), "a pool was started for a small call");
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t.elapsed());
        assert!(same_bits(&got, &run(&c, &x, 1)));
    }

    #[test]
    fn dedicated_pool_is_built_once_and_reused() {
        let threads = Threads::new(Some(3));
        let x = inputs::<f32>(&PARALLEL, &mut Rng::fresh());
        let first = run_on(&PARALLEL, &x, &threads);
        let pool = threads.pool.get().expect("started").as_ref().expect("built") as *const rayon::ThreadPool;
        assert_eq!(unsafe { &*pool }.current_num_threads(), 3);
        let second = run_on(&PARALLEL, &x, &threads);
        let again = threads.pool.get().expect("started").as_ref().expect("built") as *const rayon::ThreadPool;
        assert_eq!(pool, again, "the pool was rebuilt");
        assert!(same_bits(&first, &second));
        assert!(same_bits(&first, &run(&PARALLEL, &x, 1)));
    }

    /// No thread can be started (a pid limit, say): the call runs on the calling thread, and
    /// gives the same bits, instead of panicking.
    #[test]
    fn a_pool_that_cannot_start_means_the_calling_thread() {
        let threads = Threads::with_unbuildable_pool(4);
        let x = inputs::<f32>(&PARALLEL, &mut Rng::fresh());
        let got = run_on(&PARALLEL, &x, &threads);
        assert!(matches!(threads.workers(), Workers::Inline));
        assert!(same_bits(&got, &run(&PARALLEL, &x, 1)));
    }

    /// From inside a rayon pool, the ambient setting uses that pool's threads.
    #[test]
    fn ambient_threads_are_the_callers_pool() {
        let x = inputs::<f32>(&PARALLEL, &mut Rng::fresh());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let threads = Threads::new(None);
        let got = pool.install(|| {
            assert_eq!(threads.workers().threads(), 2);
            run_on(&PARALLEL, &x, &threads)
        });
        assert!(same_bits(&got, &run(&PARALLEL, &x, 1)));
    }
}
