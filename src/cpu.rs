//! The CPU backend: a blocked, multi-threaded online-softmax attention in f32.
//!
//! It is both the fallback when no GPU is usable and the reference the GPU kernels are tested
//! against, so it favours being obviously right, deterministic (the result does not depend on
//! the thread count) and reasonably fast, in that order.
//!
//! Structure: the work is split into items of (batch, query head, block of `BLOCK_Q` query
//! rows). An item walks the keys it can see in blocks of `BLOCK_K`; each K/V block is widened to
//! f32 once into a contiguous scratch buffer and reused by every row of the query block, so
//! the inner loops run on plain, cache-resident f32 slices. Each row keeps a running max, a
//! running sum and an f32 accumulator (the online softmax), so no `seqlen_q × seqlen_k` score
//! matrix ever exists; only one row's `BLOCK_K` scores at a time.

use std::sync::Mutex;

use crate::dtype::Element;
use crate::layout::Layout;
use crate::options::Mask;

/// Query rows per work item. Large enough to amortise widening a K/V block over many rows,
/// small enough that causal and short inputs still give every thread work.
const BLOCK_Q: usize = 64;
/// Keys per block. 64 keys × head_dim 64 × 4 bytes = 16 KiB each for K and V: both stay in L1/L2
/// while the query block sweeps over them.
const BLOCK_K: usize = 64;

/// One validated host input: `data[layout.offset(b,s,h) + d]` is element (b,s,h,d).
pub(crate) struct HostIn<'a, T> {
    /// The backing elements; every offset the layout produces is in bounds.
    pub data: &'a [T],
    /// Shape and strides of the tensor.
    pub layout: Layout,
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
// from is borrowed for the whole scope). `T: Send` because values of `T` are moved into it.
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

/// One unit of parallel work: query rows `q0 .. q0 + rows` of head `head` in batch `batch`,
/// plus the matching slice of the log-sum-exp output, if one was requested.
struct WorkItem<'a> {
    batch: usize,
    head: usize,
    q0: usize,
    rows: usize,
    lse: Option<&'a mut [f32]>,
}

/// Per-thread scratch, allocated once per worker so the loops never allocate.
struct Scratch {
    /// The query block, widened: `[BLOCK_Q, d]`.
    q: Vec<f32>,
    /// The current key block, widened: `[BLOCK_K, d]`.
    k: Vec<f32>,
    /// The current value block, widened: `[BLOCK_K, d]`.
    v: Vec<f32>,
    /// Unnormalised output accumulators: `[BLOCK_Q, d]`.
    acc: Vec<f32>,
    /// Running max of the scaled scores, per row.
    max: [f32; BLOCK_Q],
    /// Running sum of `exp(score - max)`, per row.
    sum: [f32; BLOCK_Q],
    /// Scores (then probabilities) of one row against the current key block.
    p: [f32; BLOCK_K],
}

impl Scratch {
    fn new(d: usize) -> Self {
        Scratch {
            q: vec![0.0; BLOCK_Q * d],
            k: vec![0.0; BLOCK_K * d],
            v: vec![0.0; BLOCK_K * d],
            acc: vec![0.0; BLOCK_Q * d],
            max: [f32::NEG_INFINITY; BLOCK_Q],
            sum: [0.0; BLOCK_Q],
            p: [0.0; BLOCK_K],
        }
    }
}

/// The read-only description of one call, shared by all workers.
struct Problem<'a, T> {
    q: HostIn<'a, T>,
    k: HostIn<'a, T>,
    v: HostIn<'a, T>,
    out: OutPtr<T>,
    out_layout: Layout,
    scale: f32,
    mask: Mask,
    /// Logit soft-cap (`cap · tanh(x / cap)`), if any.
    softcap: Option<f32>,
    /// Query heads per kv head.
    group: usize,
    /// Keys, forced to 0 when there are no kv heads, so such a call can never index `k`/`v`.
    seqlen_k: usize,
}

/// Computes out = softmax(scale · q·kᵀ + mask) · v for every (batch, head, query row).
/// Preconditions (checked by the caller, may be debug_assert!ed): all layouts in bounds of their
/// slices; q/out shape [b, sq, h, d]; k/v shape [b, sk, hk, d] with h % hk == 0 (GQA: query head
/// `h` uses kv head `h / (h_q / hk)`); out's layout has no two elements at the same address;
/// `lse`, if given, has exactly b*h*sq elements, contiguous [batch, heads, seqlen_q], natural log.
/// Any dimension may be 0 (then nothing, or only lse, is written).
///
/// `mask` says which keys each row sees (causal and sliding window, bottom-right aligned);
/// `softcap` caps the scaled logits.
/// Rows that see no key get exact zeros and `lse = -inf`. `threads` workers are used (clamped
/// to at least 1 and at most the number of work items); the result is bitwise the same for any
/// thread count, because every row is computed by one thread in a fixed order.
// The signature mirrors the public call one-to-one; bundling the arguments would only move
// them into a struct literal at the single call site.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Element>(
    q: HostIn<'_, T>,
    k: HostIn<'_, T>,
    v: HostIn<'_, T>,
    out: &mut [T],
    out_layout: Layout,
    lse: Option<&mut [f32]>,
    scale: f32,
    mask: Mask,
    softcap: Option<f32>,
    threads: usize,
) {
    let [b, sq, h, d] = q.layout.shape();
    let [_, sk, hk, _] = k.layout.shape();
    debug_assert_eq!(out_layout.shape(), q.layout.shape());
    debug_assert_eq!(k.layout.shape(), v.layout.shape());
    debug_assert_eq!(k.layout.batch(), b);
    debug_assert_eq!(k.layout.head_dim(), d);
    debug_assert!(h == 0 || (hk > 0 && h % hk == 0));
    debug_assert!(q.layout.span().is_some_and(|s| s <= q.data.len()));
    debug_assert!(k.layout.span().is_some_and(|s| s <= k.data.len()));
    debug_assert!(v.layout.span().is_some_and(|s| s <= v.data.len()));
    debug_assert!(out_layout.span().is_some_and(|s| s <= out.len()));
    // An empty tensor has no two elements at all (`overlaps` can still say yes for it, since
    // dense strides of an empty tensor are 0).
    debug_assert!(out_layout.numel() == 0 || !out_layout.overlaps());
    debug_assert!(lse.as_ref().map_or(true, |l| l.len() == b * h * sq));

    if b == 0 || h == 0 || sq == 0 {
        return; // no rows, so no output and no lse element exists
    }

    let problem = Problem {
        q,
        k,
        v,
        out: OutPtr(out.as_mut_ptr()),
        out_layout,
        scale,
        mask,
        softcap,
        // hk == 0 with h > 0 breaks the precondition; treat it as "no keys" rather than
        // dividing by zero, so even a caller bug cannot panic here.
        group: h.checked_div(hk).unwrap_or(1).max(1),
        seqlen_k: if hk == 0 { 0 } else { sk },
    };

    // Build the work items. Each (batch, head) owns a contiguous run of `sq` lse values, and each
    // query block a sub-run of that, so the lse slices can be handed out safely.
    let blocks_per_head = sq.div_ceil(BLOCK_Q);
    let mut items = Vec::with_capacity(b * h * blocks_per_head);
    let mut lse_heads = lse.map(|l| l.chunks_mut(sq));
    for batch in 0..b {
        for head in 0..h {
            let mut lse_blocks = lse_heads
                .as_mut()
                .and_then(|it| it.next())
                .map(|chunk| chunk.chunks_mut(BLOCK_Q));
            for blk in 0..blocks_per_head {
                let q0 = blk * BLOCK_Q;
                items.push(WorkItem {
                    batch,
                    head,
                    q0,
                    rows: BLOCK_Q.min(sq - q0),
                    lse: lse_blocks.as_mut().and_then(|it| it.next()),
                });
            }
        }
    }
    // Workers pop from the end. Under the causal mask later query blocks see more keys, so put
    // them last (= first to be taken): the longest items start first and the short ones fill
    // the gaps at the end. The stable sort keeps everything else in order.
    items.sort_by_key(|it| it.q0);

    let threads = threads.clamp(1, items.len());
    if threads == 1 {
        let mut scratch = Scratch::new(d);
        for item in items {
            run_item(&problem, item, &mut scratch);
        }
        return;
    }
    let queue = Mutex::new(items);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut scratch = Scratch::new(d);
                loop {
                    // A poisoned lock means another worker panicked; the scope re-raises that
                    // panic, so just keep draining.
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    match next {
                        Some(item) => run_item(&problem, item, &mut scratch),
                        None => break,
                    }
                }
            });
        }
    });
}

/// Widens the head-dim row at `offset` of `src` into `dst` (`dst.len()` elements).
#[inline]
fn widen<T: Element>(dst: &mut [f32], src: &[T], offset: usize) {
    let src = &src[offset..offset + dst.len()];
    for (x, &y) in dst.iter_mut().zip(src) {
        *x = y.to_f32();
    }
}

/// Computes one work item: its rows of `out` and, if requested, of `lse`.
fn run_item<T: Element>(pb: &Problem<'_, T>, item: WorkItem<'_>, sc: &mut Scratch) {
    let [_, sq, _, d] = pb.q.layout.shape();
    let sk = pb.seqlen_k;
    let WorkItem {
        batch,
        head,
        q0,
        rows,
        mut lse,
    } = item;
    let kv_head = head / pb.group;
    // Keys [begin, end) row `r` of this item may see.
    let key_range = |r: usize| pb.mask.key_range(q0 + r, sq, sk);

    // With d == 0 no element exists and the slices may be empty; skip every data access (the
    // scores are then all 0, which the code below handles like any other value).
    if d > 0 {
        for r in 0..rows {
            let off = pb.q.layout.offset(batch, q0 + r, head);
            widen(&mut sc.q[r * d..(r + 1) * d], pb.q.data, off);
        }
    }
    sc.acc[..rows * d].fill(0.0);
    sc.max[..rows].fill(f32::NEG_INFINITY);
    sc.sum[..rows].fill(0.0);

    // Both ends of the range are non-decreasing in the row: the first row has the lowest start,
    // the last row the highest end.
    let block_begin = key_range(0).0 / BLOCK_K * BLOCK_K;
    let block_end = key_range(rows - 1).1;
    for k0 in (block_begin..block_end).step_by(BLOCK_K) {
        let kn = BLOCK_K.min(block_end - k0);
        if d > 0 {
            for j in 0..kn {
                let off = pb.k.layout.offset(batch, k0 + j, kv_head);
                widen(&mut sc.k[j * d..(j + 1) * d], pb.k.data, off);
                let off = pb.v.layout.offset(batch, k0 + j, kv_head);
                widen(&mut sc.v[j * d..(j + 1) * d], pb.v.data, off);
            }
        }
        for r in 0..rows {
            let (begin, end) = key_range(r);
            let (lo, hi) = (begin.max(k0), end.min(k0 + kn));
            if hi <= lo {
                continue; // this row sees none of this block
            }
            let n = hi - lo;
            let kb = &sc.k[(lo - k0) * d..(hi - k0) * d];
            let vb = &sc.v[(lo - k0) * d..(hi - k0) * d];
            let p = &mut sc.p[..n];
            let qr = &sc.q[r * d..(r + 1) * d];
            scores(p, qr, kb, d, pb.scale);
            if let Some(cap) = pb.softcap {
                for x in p.iter_mut() {
                    *x = cap * (*x / cap).tanh();
                }
            }

            let old_max = sc.max[r];
            let new_max = p.iter().copied().fold(old_max, f32::max);
            if new_max == f32::NEG_INFINITY {
                // Every score so far is -inf (only possible with infinite inputs): nothing has
                // weight yet, and exp(-inf - -inf) would be NaN.
                continue;
            }
            // exp(-inf) = 0 drops the (empty) history on the first block.
            let alpha = (old_max - new_max).exp();
            let mut block_sum = 0.0f32;
            for x in p.iter_mut() {
                *x = (*x - new_max).exp();
                block_sum += *x;
            }
            sc.max[r] = new_max;
            sc.sum[r] = sc.sum[r] * alpha + block_sum;
            let acc = &mut sc.acc[r * d..(r + 1) * d];
            if alpha != 1.0 {
                for a in acc.iter_mut() {
                    *a *= alpha;
                }
            }
            accumulate(acc, p, vb, d);
        }
    }

    // Normalise and store. A row that saw no key has sum 0: it gets zeros and -inf.
    for r in 0..rows {
        let sum = sc.sum[r];
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        if d > 0 {
            let off = pb.out_layout.offset(batch, q0 + r, head);
            // SAFETY: `off .. off + d` is one (batch, row, head) output row: in bounds of `out`
            // (caller precondition), written by no other work item (items partition the rows,
            // the layout does not overlap), and `out` is exclusively borrowed by `forward` for
            // the whole time the workers run.
            let dst = unsafe { std::slice::from_raw_parts_mut(pb.out.get().add(off), d) };
            for (o, &a) in dst.iter_mut().zip(&sc.acc[r * d..(r + 1) * d]) {
                *o = T::from_f32(a * inv);
            }
        }
        if let Some(lse) = lse.as_deref_mut() {
            lse[r] = if sum > 0.0 {
                sc.max[r] + sum.ln()
            } else {
                f32::NEG_INFINITY
            };
        }
    }
}

/// `p[j] = scale · q·k_j` for the `p.len()` keys of the contiguous `[n, d]` block `k`.
///
/// Four keys at a time share each load of `q`, and each dot product keeps eight independent
/// partial sums: without them the compiler may not reorder the f32 additions and the loop would
/// be one long dependency chain instead of vector code.
#[inline]
fn scores(p: &mut [f32], q: &[f32], k: &[f32], d: usize, scale: f32) {
    if d == 0 {
        p.fill(0.0);
        return;
    }
    let mut quads = p.chunks_exact_mut(4);
    let mut rows = k.chunks_exact(4 * d);
    for (pj, kq) in (&mut quads).zip(&mut rows) {
        let (k0, rest) = kq.split_at(d);
        let (k1, rest) = rest.split_at(d);
        let (k2, k3) = rest.split_at(d);
        let s = dot4(q, [k0, k1, k2, k3]);
        for (x, y) in pj.iter_mut().zip(s) {
            *x = y * scale;
        }
    }
    for (x, kj) in quads
        .into_remainder()
        .iter_mut()
        .zip(rows.remainder().chunks_exact(d))
    {
        *x = dot(q, kj) * scale;
    }
}

/// Horizontal sum of eight partial sums, in a fixed order.
#[inline(always)]
fn hsum(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Dot products of `q` with four equally long rows.
#[inline(always)]
fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0.0f32; 8]; 4];
    let qc = q.chunks_exact(8);
    let tail = qc.remainder();
    let kc = k.map(|row| row.chunks_exact(8));
    let [c0, c1, c2, c3] = kc.clone();
    for ((((x, y0), y1), y2), y3) in qc.zip(c0).zip(c1).zip(c2).zip(c3) {
        for i in 0..8 {
            acc[0][i] += x[i] * y0[i];
            acc[1][i] += x[i] * y1[i];
            acc[2][i] += x[i] * y2[i];
            acc[3][i] += x[i] * y3[i];
        }
    }
    let mut out = acc.map(hsum);
    for (o, c) in out.iter_mut().zip(kc) {
        for (x, y) in tail.iter().zip(c.remainder()) {
            *o += x * y;
        }
    }
    out
}

/// Dot product of two equally long slices (same summation order as [`dot4`]).
#[inline(always)]
fn dot(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let qc = q.chunks_exact(8);
    let kc = k.chunks_exact(8);
    let (qt, kt) = (qc.remainder(), kc.remainder());
    for (x, y) in qc.zip(kc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = hsum(acc);
    for (x, y) in qt.iter().zip(kt) {
        s += x * y;
    }
    s
}

/// `acc += Σ_j p[j] · v_j` over the `p.len()` rows of the contiguous `[n, d]` block `v`.
///
/// Four value rows per pass, so each accumulator element is loaded and stored once per four
/// keys instead of once per key.
#[inline]
fn accumulate(acc: &mut [f32], p: &[f32], v: &[f32], d: usize) {
    if d == 0 {
        return;
    }
    let mut quads = p.chunks_exact(4);
    let mut rows = v.chunks_exact(4 * d);
    for (pj, vq) in (&mut quads).zip(&mut rows) {
        let (v0, rest) = vq.split_at(d);
        let (v1, rest) = rest.split_at(d);
        let (v2, v3) = rest.split_at(d);
        let (p0, p1, p2, p3) = (pj[0], pj[1], pj[2], pj[3]);
        for ((((a, &x0), &x1), &x2), &x3) in acc.iter_mut().zip(v0).zip(v1).zip(v2).zip(v3) {
            *a += (p0 * x0 + p1 * x1) + (p2 * x2 + p3 * x3);
        }
    }
    for (&pj, vj) in quads
        .remainder()
        .iter()
        .zip(rows.remainder().chunks_exact(d))
    {
        for (a, &x) in acc.iter_mut().zip(vj) {
            *a += pj * x;
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
    use super::reference::{attention_f64, rel_err, RefInput};
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

    /// As [`run`], with the lse output requested or not.
    fn run_lse<T: Element>(c: &Case, x: &Inputs<T>, threads: usize, with_lse: bool) -> (Vec<T>, Option<Vec<f32>>) {
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
            scale(c),
            Mask { causal: c.causal, ..Mask::default() },
            None,
            threads,
        );
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
            for threads in [2, 3, 4, 64] {
                let (o, l) = run(&c, &x, threads);
                let ctx = format!("{} {c:?} threads {threads} seed {seed:#x}", T::DTYPE);
                assert_eq!(
                    bytemuck::cast_slice::<T, u8>(&o),
                    bytemuck::cast_slice(&o1),
                    "{ctx}"
                );
                assert_eq!(
                    bytemuck::cast_slice::<f32, u32>(&l),
                    bytemuck::cast_slice(&l1),
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

    #[test]
    fn threads_zero_means_one() {
        check::<f32>(case(1, 70, 70, 2, 2, 16).threads(0), TOL_F32);
        check::<f32>(case(1, 70, 70, 2, 2, 16).threads(1), TOL_F32);
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
            bytemuck::cast_slice(&with)
        );
    }

    /// Throughput of the f32 path; run with
    /// `cargo test --release -- --ignored --nocapture cpu_throughput`.
    #[test]
    #[ignore]
    fn cpu_throughput() {
        let threads = std::env::var("CPU_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(2);
        for causal in [false, true] {
            let c = case(1, 1024, 1024, 8, 8, 64).causal(causal);
            let x = inputs::<f32>(&c, &mut Rng::fresh());
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                std::hint::black_box(run(&c, &x, threads));
                best = best.min(t.elapsed().as_secs_f64());
            }
            // Non-causal FLOPs (4·b·h·sq·sk·d) in both rows, as the brief defines them; the
            // causal row therefore shows an "effective" rate.
            let flops = 4.0 * 8.0 * 1024.0 * 1024.0 * 64.0;
            println!(
                "f32 b=1 h=8 s=1024 d=64 causal={causal} threads={threads}: {:.2} ms, {:.2} GFLOP/s",
                best * 1e3,
                flops / best / 1e9
            );
        }
    }
}
