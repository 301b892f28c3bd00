//! A randomized test of the public API on host memory (CPU backend).
//!
//! Every call is generated from a seed: a random dtype (f16/bf16/f32), small shapes with
//! 1-sized dimensions, seqlen_q ≠ seqlen_k, MHA/GQA/MQA, random layouts (contiguous,
//! heads-first, padded strides, views at an offset into a larger buffer, q/k/v views into one
//! packed QKV buffer or k/v views into one packed KV buffer that ends right after the last
//! row's used part, arbitrary strides on size-1 dimensions, zero-stride broadcast K/V),
//! options (scale, causal, sliding window, softcap), with and without lse, fixed-length and
//! varlen (cu_seqlens with empty sequences and an empty last key sequence), NaNs in q rows and
//! huge scales. The call is then either valid, or broken in exactly one way (a wrong shape, a
//! buffer too short, an overflowing layout, an output that overlaps itself, a bad option, lse
//! of the wrong length, bad cu_seqlens or maxima, ...).
//!
//! For every call:
//! - nothing panics (each call runs under `catch_unwind`),
//! - a broken call returns `Error::InvalidArgument` whose `arg` names the broken argument,
//! - after any error, `out` and `lse` are bit-identical to the sentinel they were filled with,
//! - a valid call returns `Ok(Cpu)`, writes every output row and lse entry, writes nothing of
//!   the output buffer outside the view, and matches the f64 reference: rows whose q has a
//!   NaN (and that see a key) are NaN, with NaN lse; rows that see no key are exact zeros
//!   with lse = -inf (a NaN q row that sees no key may be either zeros/-inf or NaN/NaN: the
//!   documentation does not decide between the two rules); every other value is finite and
//!   within a per-dtype tolerance.
//!
//! Valid softmax scales run from 0 to 1e6 (`attention::options::MAX_SOFTMAX_SCALE`): NaN,
//! ±inf, larger and negative scales are InvalidArgument `options.softmax_scale`. Scales of
//! 4 and more use q/k values in {-1, -0.5, 0, 0.5, 1}, so their result is well conditioned
//! (see `row_sensitivity`) and must still match the reference.
//!
//! Input padding (every element of an input buffer outside the logical tensor) is NaN, so a
//! read outside the view shows up as a NaN where a finite value is expected.
//!
//! Failures are grouped by kind and reported together at the end, each with its seed and case
//! number. Environment:
//! - `ATTN_FUZZ_SEED=<u64, decimal or 0x-hex>`: the seed (default: a fixed one),
//! - `ATTN_FUZZ_CALLS=<n>`: calls of `fuzz_api_calls` (default 5000, about 1 s in a debug
//!   build); the focused `fuzz_*` tests (one per contract: overflow, varlen views, cu_seqlens
//!   bounds, NaN/scale, broadcast K/V) run n/8 calls, at least 400,
//! - `ATTN_FUZZ_CASE=<n>`: replay only case n (prints the generated plan and the outcome).
//!
//! Replay a failure exactly as the report says, e.g.
//! `ATTN_FUZZ_SEED=0x5eed ATTN_FUZZ_CASE=17 cargo test --test api_fuzz fuzz_api_calls -- --exact --nocapture`
//! (each case has its own generator derived from the seed and its number, so it replays alone).

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, Once};
use std::thread::ThreadId;

use attention::{Attention, BackendKind, Element, Error, Layout, LseMut, Options, SeqLens, Tensor, TensorMut, VarLen};
use common::reference::{attention_f64_masked, RefInput, RefMask};
use common::rng::Rng;
use half::{bf16, f16};

/// Above every dimension, window and maximum the API accepts (`i32::MAX`; the library's own
/// limit is somewhat lower, i32::MAX - 2^16, so kernels can add a tile to an index).
const MAX_DIM: usize = i32::MAX as usize;
/// The largest softmax scale the API accepts (`attention::options::MAX_SOFTMAX_SCALE`).
/// Scales run from 0 to it: non-finite, larger and negative scales are InvalidArgument
/// `options.softmax_scale` (the library documents why negative ones are rejected).
const MAX_SCALE: f32 = 1e6;
const DEFAULT_SEED: u64 = 0x5EED_A77E_0000_0001;
const DEFAULT_CALLS: usize = 5000;
/// Calls of each focused test.
const FOCUSED_CALLS: usize = 400;

// ------------------------------------------------------------------------------------------
// Element types: a distinctive NaN-payload sentinel per dtype.
// ------------------------------------------------------------------------------------------

/// An element type with a sentinel bit pattern no computation produces (a NaN whose payload
/// is neither the canonical NaN nor one an input carries).
trait Elem: Element {
    fn sentinel() -> Self;
    fn bits(self) -> u32;
}

impl Elem for f32 {
    fn sentinel() -> Self {
        f32::from_bits(0x7FC5_A5A5)
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

impl Elem for f16 {
    fn sentinel() -> Self {
        f16::from_bits(0x7E5A)
    }
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

impl Elem for bf16 {
    fn sentinel() -> Self {
        bf16::from_bits(0x7FDA)
    }
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

/// The lse buffer's sentinel (differs from f32's output sentinel).
const LSE_SENTINEL: u32 = 0x7FE1_5E5E;

/// Tolerances per dtype: |got − ref| ≤ ATOL·max|v| + RTOL·|ref| (+ the logit-sensitivity term,
/// see `row_sensitivity`). The CPU backend computes in f32 from inputs that are exact in f64;
/// the output is rounded to the dtype (f16: ≤ 2⁻¹² relative, bf16: ≤ 2⁻⁹), so RTOL is about
/// 4× the output rounding, ATOL about 10× the f32 accumulation error. Compare with
/// tests/cpu_backend.rs (relative L2 over the whole output: f32 1e-5, f16 2e-3, bf16 1e-2).
fn tolerances(dt: Dt) -> (f64, f64) {
    match dt {
        Dt::F32 => (1e-5, 1e-5),
        Dt::F16 => (1e-5, 1e-3),
        Dt::Bf16 => (1e-5, 8e-3),
    }
}

// ------------------------------------------------------------------------------------------
// The plan of one call.
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dt {
    F16,
    Bf16,
    F32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Q,
    K,
    V,
    Out,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Q => "q",
            Which::K => "k",
            Which::V => "v",
            Which::Out => "out",
        }
    }
}

/// Overflowing layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ovf {
    /// The element count is a multiple of 2^64: `numel` wraps to exactly 0.
    WrapsToZero,
    /// The element count overflows to a non-zero value.
    WrapsNonZero,
    /// A huge (2^60) but representable element count, with a tiny buffer.
    HugeNoWrap,
    /// Small shape, strides whose largest offset overflows.
    SpanOverflow,
    /// A dimension above i32::MAX.
    DimTooBig,
}

/// The one way a call is broken.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mut {
    ShortBuf(Which),
    Overflow(Which, Ovf),
    OutOverlap,
    KBatch,
    KHeads,
    KDim,
    VShape,
    OutShape,
    ZeroDim(Which),
    VarlenBatch,
    Scale,
    Softcap,
    WindowLeft,
    WindowRight,
    LseLen,
    /// `true`: cu_seqlens_q, `false`: cu_seqlens_k.
    CuDecreasing(bool),
    CuOutOfRange(bool),
    CuStart(bool),
    CuEnd(bool),
    /// The packed tensor has rows after `cu[batch]`.
    CuExtraRows(bool),
    CuCountK,
    CuFewQ,
    MaxSeqZero(bool),
    MaxSeqHuge(bool),
    MaxSeqSmall(bool),
}

impl Mut {
    /// Whether it changes the shape of q, k or v (then q/k/v are not packed into one buffer).
    fn reshapes_inputs(self) -> bool {
        matches!(
            self,
            Mut::Overflow(Which::Q | Which::K | Which::V, _)
                | Mut::KBatch
                | Mut::KHeads
                | Mut::KDim
                | Mut::VShape
                | Mut::ZeroDim(Which::Q | Which::K | Which::V)
                | Mut::VarlenBatch
                | Mut::CuExtraRows(_)
        )
    }
}

/// How one operand's view is laid out in its buffer.
#[derive(Clone, Debug)]
struct Operand {
    layout: Layout,
    /// "contiguous", "heads-first", "padded", "packed-qkv", ...
    kind: String,
    /// Index of its buffer in the call's list (packed views share one).
    buf: usize,
    /// Start of the view within the buffer.
    start: usize,
    /// End of the view (exclusive) within the buffer.
    end: usize,
}

#[derive(Clone, Debug)]
struct Var {
    cu_q: Vec<i32>,
    cu_k: Vec<i32>,
    max_q: usize,
    max_k: usize,
}

/// Everything needed to make and check one call.
#[derive(Clone, Debug)]
struct Plan {
    dt: Dt,
    q: Operand,
    k: Operand,
    v: Operand,
    out: Operand,
    /// Lengths of the buffers (inputs first; `out` has its own).
    buf_lens: Vec<usize>,
    out_len: usize,
    varlen: Option<Var>,
    lse: Option<usize>,
    opts: Options,
    /// q and k take values in {-1, -0.5, 0, 0.5, 1} (exact dot products; used with huge scales).
    quantized: bool,
    /// Number of q rows to poison with NaN.
    nan_rows: usize,
    /// The broken argument(s): label and the accepted `arg` names.
    mutation: Option<(String, Vec<&'static str>)>,
    /// The kind of mutation, without its random values (for grouping failures).
    mutation_kind: Option<String>,
    /// Labels of what the call exercises (for grouping failures).
    features: Vec<&'static str>,
}

impl Plan {
    fn summary(&self) -> String {
        let mut s = format!("{:?}", self.dt);
        if let Some(v) = &self.varlen {
            let _ = write!(s, " varlen cu_q={:?} cu_k={:?} max=({}, {})", v.cu_q, v.cu_k, v.max_q, v.max_k);
        }
        for (name, o) in [("q", &self.q), ("k", &self.k), ("v", &self.v), ("out", &self.out)] {
            let _ = write!(
                s,
                " | {name}: {} shape {:?} strides {:?} view {}..{} of buffer {} (len {})",
                o.kind,
                o.layout.shape(),
                o.layout.strides(),
                o.start,
                o.end,
                o.buf,
                if name == "out" { self.out_len } else { self.buf_lens[o.buf] }
            );
        }
        match self.lse {
            Some(n) => {
                let _ = write!(s, " | lse len {n}");
            }
            None => s.push_str(" | no lse"),
        }
        let o = &self.opts;
        let _ = write!(
            s,
            " | scale {:?} causal {} window ({:?}, {:?}) softcap {:?}",
            o.softmax_scale, o.causal, o.window_left, o.window_right, o.softcap
        );
        if self.quantized {
            s.push_str(" | quantized q/k");
        }
        if self.nan_rows > 0 {
            let _ = write!(s, " | {} NaN q rows", self.nan_rows);
        }
        s
    }
}

// ------------------------------------------------------------------------------------------
// Generation.
// ------------------------------------------------------------------------------------------

/// What a test concentrates on (the generic fuzz uses `Any`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Focus {
    Any,
    Overflow,
    VarlenViews,
    CuBounds,
    NanScale,
    Broadcast,
}

fn chance(rng: &mut Rng, p: f32) -> bool {
    rng.f32_unit() < p
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len() as u64) as usize]
}

fn below(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}

/// One past the largest offset, computed here (independently of `Layout::span`); None on
/// overflow, 0 for an empty tensor.
fn span(l: &Layout) -> Option<usize> {
    let sh = l.shape();
    if sh.contains(&0) {
        return Some(0);
    }
    let st = l.strides();
    let mut last = sh[3] - 1;
    for i in 0..3 {
        last = last.checked_add((sh[i] - 1).checked_mul(st[i])?)?;
    }
    last.checked_add(1)
}

fn f32_next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1) // x > 0 finite
}

/// A standalone layout of `shape` (no packing): contiguous, heads-first, or either with padding.
fn standalone(rng: &mut Rng, shape: [usize; 4]) -> (Layout, String) {
    let [b, s, h, d] = shape;
    let pad = |rng: &mut Rng| if chance(rng, 0.5) { 0 } else { 1 + below(rng, 3) };
    match below(rng, 10) {
        0..=2 => (Layout::contiguous(b, s, h, d), "contiguous".into()),
        3..=4 => (Layout::heads_first(b, s, h, d), "heads-first".into()),
        5..=7 => {
            let hs = d + pad(rng);
            let rs = h * hs + pad(rng);
            let bs = s * rs + pad(rng);
            (Layout::strided(shape, [bs, rs, hs]), "padded".into())
        }
        _ => {
            let ss = d + pad(rng);
            let hs = s * ss + pad(rng);
            let bs = h * hs + pad(rng);
            (Layout::strided(shape, [bs, ss, hs]), "padded heads-first".into())
        }
    }
}

/// Gives some size-1 dimensions an arbitrary stride (never used to address anything).
fn wild_size1(rng: &mut Rng, l: Layout) -> Option<Layout> {
    let (sh, mut st) = (l.shape(), l.strides());
    let mut changed = false;
    for i in 0..3 {
        if sh[i] == 1 && chance(rng, 0.6) {
            st[i] = pick(rng, &[usize::MAX, 1 << 40, 12345, 7, u32::MAX as usize]);
            changed = true;
        }
    }
    changed.then(|| Layout::strided(sh, st))
}

/// A zero stride along batch (if > 1) or heads (if > 1): a broadcast read-only view.
fn broadcast(rng: &mut Rng, l: Layout) -> Option<(Layout, String)> {
    let (sh, mut st) = (l.shape(), l.strides());
    let dims: Vec<usize> = [0, 2].into_iter().filter(|&i| sh[i] > 1).collect();
    if dims.is_empty() {
        return None;
    }
    let i = pick(rng, &dims);
    st[i] = 0;
    if dims.len() == 2 && chance(rng, 0.3) {
        st[2 - i] = 0;
        return Some((Layout::strided(sh, st), "broadcast batch+heads (stride 0)".into()));
    }
    Some((Layout::strided(sh, st), format!("broadcast {} (stride 0)", if i == 0 { "batch" } else { "heads" })))
}

/// An overflowing layout.
fn overflowing(rng: &mut Rng, f: Ovf) -> Layout {
    let wrapping_contiguous = |sh: [usize; 4]| {
        Layout::strided(sh, [sh[1].wrapping_mul(sh[2]).wrapping_mul(sh[3]), sh[2].wrapping_mul(sh[3]), sh[3]])
    };
    match f {
        Ovf::WrapsToZero => {
            if chance(rng, 0.3) {
                return Layout::contiguous(1 << 16, 1 << 16, 1 << 16, 1 << 16);
            }
            // Four powers of two, each at most 2^30, whose exponents sum to at least 64.
            loop {
                let e: Vec<u32> = (0..4).map(|_| 10 + rng.below(21) as u32).collect();
                if e.iter().sum::<u32>() >= 64 {
                    return wrapping_contiguous([1 << e[0], 1 << e[1], 1 << e[2], 1 << e[3]]);
                }
            }
        }
        Ovf::WrapsNonZero => {
            let x = (1usize << 22) + 1 + 2 * below(rng, 100);
            wrapping_contiguous([x, x, x, 3 + 2 * below(rng, 10)])
        }
        Ovf::HugeNoWrap => Layout::contiguous(1 << 20, 1 << 20, 1 << 10, 1 << 10),
        Ovf::SpanOverflow => {
            let sh = [2, 3, 2, 4];
            Layout::strided(sh, pick(rng, &[[1 << 63, 8, 4], [16, usize::MAX / 2, 4], [usize::MAX / 3, usize::MAX / 5, usize::MAX / 7]]))
        }
        Ovf::DimTooBig => {
            let big = MAX_DIM + 1 + below(rng, 3);
            let mut sh = [1, 1, 1, 1];
            sh[below(rng, 4)] = big;
            Layout::strided(sh, [sh[1] * sh[2] * sh[3], sh[2] * sh[3], sh[3]])
        }
    }
}

fn prefix(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0usize, |s, &l| {
            *s += l;
            Some(*s as i32)
        }))
        .collect()
}

/// `total` rows split into `n` sequences at random, the last one empty if asked.
fn split(rng: &mut Rng, total: usize, n: usize, empty_last: bool) -> Vec<usize> {
    let parts = n - empty_last as usize;
    let mut cuts: Vec<usize> = (0..parts - 1).map(|_| below(rng, total + 1)).collect();
    cuts.sort_unstable();
    let mut lens = Vec::with_capacity(n);
    let mut prev = 0;
    for c in cuts.into_iter().chain([total]) {
        lens.push(c - prev);
        prev = c;
    }
    if empty_last {
        lens.push(0);
    }
    lens
}

fn choose_mutation(rng: &mut Rng, focus: Focus, varlen: bool, dims: [usize; 5], longest: (usize, usize)) -> Option<Mut> {
    let [b, sq, h, _hk, d] = dims;
    let which = |rng: &mut Rng| pick(rng, &[Which::Q, Which::K, Which::V, Which::Out]);
    let ovf = |rng: &mut Rng| {
        pick(rng, &[Ovf::WrapsToZero, Ovf::WrapsToZero, Ovf::WrapsNonZero, Ovf::HugeNoWrap, Ovf::SpanOverflow, Ovf::DimTooBig])
    };
    let qk = |rng: &mut Rng| chance(rng, 0.5);
    match focus {
        Focus::VarlenViews | Focus::Broadcast => return None,
        Focus::Overflow => return Some(Mut::Overflow(which(rng), ovf(rng))),
        Focus::CuBounds => {
            let q = qk(rng);
            return Some(pick(rng, &[Mut::CuStart(q), Mut::CuEnd(q), Mut::CuExtraRows(q)]));
        }
        Focus::NanScale => return chance(rng, 0.35).then_some(Mut::Scale),
        Focus::Any => {}
    }
    if !chance(rng, 0.45) {
        return None;
    }
    loop {
        let m = match below(rng, if varlen { 26 } else { 15 }) {
            0 | 1 => Mut::ShortBuf(which(rng)),
            2 | 3 => Mut::Overflow(which(rng), ovf(rng)),
            4 => Mut::OutOverlap,
            5 => {
                if varlen {
                    Mut::VarlenBatch
                } else {
                    Mut::KBatch
                }
            }
            6 => Mut::KHeads,
            7 => Mut::KDim,
            8 => Mut::VShape,
            9 => Mut::OutShape,
            10 => Mut::ZeroDim(which(rng)),
            11 => Mut::Scale,
            12 => Mut::Softcap,
            13 => pick(rng, &[Mut::WindowLeft, Mut::WindowRight]),
            14 => Mut::LseLen,
            15 => Mut::CuDecreasing(qk(rng)),
            16 => Mut::CuOutOfRange(qk(rng)),
            17 | 18 => Mut::CuStart(qk(rng)),
            19 | 20 => Mut::CuEnd(qk(rng)),
            21 => Mut::CuExtraRows(qk(rng)),
            22 => pick(rng, &[Mut::CuCountK, Mut::CuFewQ]),
            23 => Mut::MaxSeqZero(qk(rng)),
            24 => Mut::MaxSeqHuge(qk(rng)),
            _ => Mut::MaxSeqSmall(qk(rng)),
        };
        let ok = match m {
            // A single output row cannot overlap itself unless heads can (h > 1).
            Mut::OutOverlap => b > 1 || sq > 1 || (h > 1 && d > 1),
            Mut::MaxSeqSmall(q) => (if q { longest.0 } else { longest.1 }) >= 2,
            Mut::CuDecreasing(_) => varlen,
            _ => true,
        };
        if ok {
            return Some(m);
        }
    }
}

fn gen_plan(rng: &mut Rng, focus: Focus) -> Plan {
    let dt = pick(rng, &[Dt::F16, Dt::Bf16, Dt::F32]);
    let varlen = match focus {
        Focus::VarlenViews | Focus::CuBounds => true,
        Focus::Overflow => chance(rng, 0.3),
        _ => chance(rng, 0.35),
    };
    let mut features: Vec<&'static str> = Vec::new();
    let mut hk = pick(rng, &[1, 1, 2, 3]);
    let group = pick(rng, &[1, 1, 2, 3]);
    let d = pick(rng, &[1, 2, 3, 4, 5, 7, 8, 8, 16, 16]);
    // Mostly short; now and then past the CPU backend's 64-row and 64-key blocks.
    let len = |rng: &mut Rng| match below(rng, 100) {
        0..=24 => 1,
        25..=97 => 1 + below(rng, 9),
        _ => 60 + below(rng, 80),
    };
    let mut b = pick(rng, &[1, 1, 1, 2, 3]);
    if focus == Focus::Broadcast && !varlen && b == 1 && hk == 1 {
        b = 2 + below(rng, 2);
    }
    if focus == Focus::Broadcast && varlen && hk == 1 {
        hk = 2;
    }
    let h = hk * group;
    if hk == 1 && h > 1 {
        features.push("mqa");
    } else if hk < h {
        features.push("gqa");
    }
    let (mut lens_q, mut lens_k) = (Vec::new(), Vec::new());
    let (mut sq, mut sk) = (len(rng), len(rng));
    let mut empty_last = false;
    if varlen {
        b = 1;
        features.push("varlen");
        let mut n = 1 + below(rng, 4);
        empty_last = focus == Focus::VarlenViews || chance(rng, 0.4);
        if empty_last && n == 1 {
            n = 2;
        }
        let seq = |rng: &mut Rng| match below(rng, 100) {
            0..=24 => 0,
            25..=98 => 1 + below(rng, 6),
            _ => 50 + below(rng, 40),
        };
        lens_q = (0..n).map(|_| seq(rng)).collect();
        lens_k = (0..n).map(|_| seq(rng)).collect();
        if empty_last {
            lens_k[n - 1] = 0;
        }
        if lens_q.iter().sum::<usize>() == 0 {
            let i = below(rng, n);
            lens_q[i] = 1 + below(rng, 6);
        }
        if lens_k.iter().sum::<usize>() == 0 {
            let i = below(rng, n - empty_last as usize);
            lens_k[i] = 1 + below(rng, 6);
        }
    } else if chance(rng, 0.3) {
        sk = sq;
    }
    let longest = |l: &[usize]| l.iter().copied().max().unwrap_or(0);

    // Packing: q/k/v in one QKV buffer, or k/v in one KV buffer.
    #[derive(Clone, Copy, PartialEq)]
    enum Pack {
        None,
        Qkv,
        Kv,
    }
    let mut pack = match (focus, below(rng, 20)) {
        (Focus::Broadcast, _) => Pack::None,
        (Focus::VarlenViews, r) => [Pack::Qkv, Pack::Kv, Pack::None][r % 3],
        (_, 0..=3) => Pack::Qkv,
        (_, 4..=6) => Pack::Kv,
        _ => Pack::None,
    };
    if pack == Pack::Qkv {
        if varlen {
            let total: usize = lens_q.iter().sum();
            lens_k = split(rng, total, lens_q.len(), empty_last);
        } else {
            sk = sq;
        }
    }
    if varlen {
        sq = lens_q.iter().sum();
        sk = lens_k.iter().sum();
        if empty_last {
            features.push("empty-last-k");
        }
        if lens_q.contains(&0) || lens_k.contains(&0) {
            features.push("empty-seq");
        }
    }
    if sq != sk {
        features.push("sq!=sk");
    }
    let mutation = choose_mutation(rng, focus, varlen, [b, sq, h, hk, d], (longest(&lens_q), longest(&lens_k)));
    let valid = mutation.is_none();
    if mutation.is_some_and(|m| m.reshapes_inputs()) {
        pack = Pack::None;
    }

    // Shapes, then the shape mutations.
    let mut qs = [b, sq, h, d];
    let mut ks = [b, sk, hk, d];
    let mut vs = ks;
    let mut os = qs;
    let mut mutation_label: Option<(String, Vec<&'static str>)> = None;
    let mut set = |label: String, args: &[&'static str]| mutation_label = Some((label, args.to_vec()));
    match mutation {
        Some(Mut::KBatch) => {
            let kb = if b > 1 && chance(rng, 0.5) { b - 1 } else { b + 1 + below(rng, 2) };
            ks[0] = kb;
            vs[0] = kb;
            set(format!("k, v: batch {kb} ≠ q's {b}"), &["k", "v"]);
        }
        Some(Mut::KHeads) => {
            let x = h + 1 + below(rng, 2);
            ks[2] = x;
            vs[2] = x;
            set(format!("k, v: {x} kv heads do not divide q's {h}"), &["k", "v"]);
        }
        Some(Mut::KDim) => {
            let x = if d > 1 && chance(rng, 0.5) { d - 1 } else { d + 1 + below(rng, 3) };
            ks[3] = x;
            vs[3] = x;
            set(format!("k, v: head_dim {x} ≠ q's {d}"), &["k", "v"]);
        }
        Some(Mut::VShape) => {
            let i = pick(rng, &[1, 2, 3]);
            vs[i] += 1 + below(rng, 2);
            set(format!("v: shape {vs:?} ≠ k's {ks:?}"), &["v"]);
        }
        Some(Mut::OutShape) => {
            let i = below(rng, 4);
            os[i] = if os[i] > 1 && chance(rng, 0.5) { os[i] - 1 } else { os[i] + 1 };
            set(format!("out: shape {os:?} ≠ q's {qs:?}"), &["out"]);
        }
        Some(Mut::ZeroDim(w)) => {
            let i = below(rng, 4);
            let s = match w {
                Which::Q => &mut qs,
                Which::K => &mut ks,
                Which::V => &mut vs,
                Which::Out => &mut os,
            };
            s[i] = 0;
            set(format!("{}: dimension {i} is 0", w.name()), &[w.name()]);
        }
        Some(Mut::VarlenBatch) => {
            for s in [&mut qs, &mut ks, &mut vs, &mut os] {
                s[0] = 2;
            }
            set("q: batch 2 with cu_seqlens (packed tensors have batch 1)".into(), &["q"]);
        }
        Some(Mut::CuExtraRows(q)) => {
            let e = 1 + below(rng, 3);
            if q {
                qs[1] += e;
                os[1] += e;
                set(format!("cu_seqlens_q: ends at {sq}, q has {} rows", sq + e), &["cu_seqlens_q"]);
            } else {
                ks[1] += e;
                vs[1] += e;
                set(format!("cu_seqlens_k: ends at {sk}, k has {} rows", sk + e), &["cu_seqlens_k"]);
            }
        }
        _ => {}
    }

    // Layouts and buffers.
    let mut buf_lens = Vec::new();
    let place = |rng: &mut Rng, layout: Layout, kind: String, buf_lens: &mut Vec<usize>| {
        let sp = span(&layout).expect("finite layout");
        let start = if chance(rng, 0.3) { 1 + below(rng, 4) } else { 0 };
        let extra = if chance(rng, 0.3) { 1 + below(rng, 3) } else { 0 };
        buf_lens.push(start + sp + extra);
        Operand { layout, kind, buf: buf_lens.len() - 1, start, end: start + sp + extra }
    };
    let exotic = |rng: &mut Rng, l: Layout, kind: String, is_kv: bool, features: &mut Vec<&'static str>| -> (Layout, String) {
        // Contested but valid layouts only in otherwise valid calls, so an error they cause
        // is never mistaken for the error a mutation should cause.
        if !valid {
            return (l, kind);
        }
        let p = if focus == Focus::Broadcast { 0.7 } else { 0.07 };
        if is_kv && chance(rng, p) {
            if let Some((bl, bk)) = broadcast(rng, l) {
                features.push("broadcast-kv");
                return (bl, bk);
            }
        }
        if chance(rng, 0.1) {
            if let Some(w) = wild_size1(rng, l) {
                features.push("wild-size1-stride");
                return (w, format!("{kind} + arbitrary size-1 strides"));
            }
        }
        (l, kind)
    };
    let (q, k, v);
    match pack {
        Pack::Qkv => {
            features.push("packed-qkv");
            let pad = if chance(rng, 0.5) { 0 } else { 1 + below(rng, 3) };
            let used = (h + 2 * hk) * d;
            let rs = used + pad;
            let rows = b * sq; // sq == sk
            let len = (rows - 1) * rs + used;
            buf_lens.push(len);
            let lay = |heads| Layout::strided([b, sq, heads, d], [sq * rs, rs, d]);
            let (lq, lk) = (lay(h), lay(hk));
            let (sq_, sk_) = (span(&lq).unwrap(), span(&lk).unwrap());
            let q_end = if chance(rng, 0.5) { sq_ } else { len };
            let k_end = if chance(rng, 0.5) { h * d + sk_ } else { len };
            q = Operand { layout: lq, kind: format!("packed-qkv (row stride {rs})"), buf: 0, start: 0, end: q_end };
            k = Operand { layout: lk, kind: format!("packed-qkv (row stride {rs})"), buf: 0, start: h * d, end: k_end };
            v = Operand { layout: lk, kind: format!("packed-qkv (row stride {rs})"), buf: 0, start: (h + hk) * d, end: len };
        }
        Pack::Kv => {
            features.push("packed-kv");
            let (lq, kq) = standalone(rng, qs);
            let (lq, kq) = exotic(rng, lq, kq, false, &mut features);
            q = place(rng, lq, kq, &mut buf_lens);
            let pad = if chance(rng, 0.5) { 0 } else { 1 + below(rng, 3) };
            let used = 2 * hk * d;
            let rs = used + pad;
            let len = (b * sk - 1) * rs + used;
            buf_lens.push(len);
            let lk = Layout::strided([b, sk, hk, d], [sk * rs, rs, d]);
            let k_end = if chance(rng, 0.5) { span(&lk).unwrap() } else { len };
            let bi = buf_lens.len() - 1;
            k = Operand { layout: lk, kind: format!("packed-kv (row stride {rs})"), buf: bi, start: 0, end: k_end };
            v = Operand { layout: lk, kind: format!("packed-kv (row stride {rs})"), buf: bi, start: hk * d, end: len };
        }
        Pack::None => {
            let (lq, kq) = standalone(rng, qs);
            let (lq, kq) = exotic(rng, lq, kq, false, &mut features);
            q = place(rng, lq, kq, &mut buf_lens);
            let (lk, kk) = if focus == Focus::VarlenViews {
                let l = Layout::strided(ks, [0, hk * d + 1 + below(rng, 3), d]);
                (l, "padded rows".to_string())
            } else {
                standalone(rng, ks)
            };
            let (lk, kk) = exotic(rng, lk, kk, true, &mut features);
            k = place(rng, lk, kk, &mut buf_lens);
            let (lv, kv) = if focus == Focus::VarlenViews {
                (Layout::strided(vs, [0, hk * d + 1 + below(rng, 3), d]), "padded rows".to_string())
            } else {
                standalone(rng, vs)
            };
            let (lv, kv) = exotic(rng, lv, kv, true, &mut features);
            v = place(rng, lv, kv, &mut buf_lens);
        }
    }
    let (mut q, mut k, mut v) = (q, k, v);
    let (lo, ko) = standalone(rng, os);
    let (lo, ko) = exotic(rng, lo, ko, false, &mut features);
    let o_start = if chance(rng, 0.3) { 1 + below(rng, 4) } else { 0 };
    let o_extra = if chance(rng, 0.3) { 1 + below(rng, 3) } else { 0 };
    let mut out = Operand { layout: lo, kind: ko, buf: usize::MAX, start: o_start, end: 0 };
    if mutation == Some(Mut::OutOverlap) {
        let [ob, osq, oh, od] = os;
        let mut opts: Vec<(usize, &str)> = Vec::new();
        if ob > 1 {
            opts.push((0, "batch stride 0"));
        }
        if osq > 1 {
            opts.push((1, "seq stride 0"));
        }
        if oh > 1 {
            opts.push((2, "head stride 0"));
        }
        if oh > 1 && od > 1 {
            opts.push((3, "head stride < head_dim"));
        }
        let (i, what) = pick(rng, &opts);
        let mut st = Layout::contiguous(ob, osq, oh, od).strides();
        if i < 3 {
            st[i] = 0;
        } else {
            st[2] = od - 1;
        }
        out.layout = Layout::strided(os, st);
        out.kind = format!("overlapping ({what})");
        set(format!("out: layout overlaps itself ({what})"), &["out"]);
    }
    let mut out_len = out.start + span(&out.layout).expect("finite out layout") + o_extra;
    out.end = out_len;

    // Buffer mutations.
    match mutation {
        Some(Mut::ShortBuf(w)) => {
            let o = match w {
                Which::Q => &mut q,
                Which::K => &mut k,
                Which::V => &mut v,
                Which::Out => &mut out,
            };
            let sp = span(&o.layout).unwrap();
            let cut = 1 + below(rng, sp.min(3));
            o.end = o.start + sp - cut;
            set(
                format!("{}: view of {} elements, layout spans {sp}", w.name(), sp - cut),
                &[w.name()],
            );
        }
        Some(Mut::Overflow(w, f)) => {
            let tiny = 1 + below(rng, 16);
            let o = match w {
                Which::Q => &mut q,
                Which::K => &mut k,
                Which::V => &mut v,
                Which::Out => &mut out,
            };
            o.layout = overflowing(rng, f);
            o.kind = format!("overflowing ({f:?})");
            o.start = 0;
            o.end = tiny;
            if w == Which::Out {
                out_len = tiny;
            } else {
                buf_lens.push(tiny);
                o.buf = buf_lens.len() - 1;
            }
            set(format!("{}: overflowing layout ({f:?}) with a {tiny}-element buffer", w.name()), &[w.name()]);
        }
        _ => {}
    }

    // Options.
    let mut opts = Options::default();
    if chance(rng, 0.3) {
        opts = opts.causal(true);
        features.push("causal");
    }
    if chance(rng, 0.25) {
        let w = |rng: &mut Rng| match below(rng, 10) {
            0..=3 => None,
            4..=8 => Some(below(rng, 7)),
            _ => Some(1 << 30), // huge, within every limit
        };
        opts = opts.window(w(rng), w(rng));
        features.push("window");
    }
    if chance(rng, 0.2) {
        opts = opts.softcap(0.5 + rng.f32_unit() * 30.0);
        features.push("softcap");
    }
    let log_uniform = |rng: &mut Rng, lo: f32, hi: f32| (lo.ln() + rng.f32_unit() * (hi.ln() - lo.ln())).exp();
    let huge_p = if focus == Focus::NanScale { 0.5 } else { 0.12 };
    let mut quantized = chance(rng, 0.05);
    if chance(rng, huge_p) {
        // |scale| in [1e3, 1e6], q/k quantized so the result is well conditioned.
        let s = if chance(rng, 0.3) { MAX_SCALE } else { log_uniform(rng, 1e3, MAX_SCALE).min(MAX_SCALE) };
        opts = opts.scale(s);
        quantized = true;
        features.push("huge-scale");
    } else {
        match below(rng, 100) {
            0..=44 => {}
            45..=84 => {
                let s = match below(rng, 20) {
                    0..=13 => rng.f32_unit() * 2.0,
                    14 => 0.0,
                    15 => -0.0,
                    16 => pick(rng, &[1e-30, 1e-38, 1e-42]),
                    _ => 1.0 + rng.f32_unit() * 3.0,
                };
                opts = opts.scale(s);
            }
            _ => {
                opts = opts.scale(log_uniform(rng, 4.0, 1e3));
                quantized = true;
            }
        }
    }
    match mutation {
        Some(Mut::Scale) => {
            let s = pick(
                rng,
                &[
                    f32::NAN,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    f32_next_up(MAX_SCALE),
                    1.5e6,
                    1e7,
                    f32::MAX,
                    1e30,
                    -MAX_SCALE,
                    -1.0,
                    -0.125,
                    -1e-30,
                    f32::MIN,
                ],
            );
            opts.softmax_scale = Some(s);
            set(format!("options.softmax_scale = {s:e}"), &["options.softmax_scale"]);
        }
        Some(Mut::Softcap) => {
            let c = pick(rng, &[0.0, -0.0, -1.0, -1e-3, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
            opts.softcap = Some(c);
            set(format!("options.softcap = {c}"), &["options.softcap"]);
        }
        Some(Mut::WindowLeft) | Some(Mut::WindowRight) => {
            let w = pick(rng, &[MAX_DIM + 1, usize::MAX, 1 << 40]);
            if mutation == Some(Mut::WindowLeft) {
                opts.window_left = Some(w);
                set(format!("options.window_left = {w}"), &["options.window_left"]);
            } else {
                opts.window_right = Some(w);
                set(format!("options.window_right = {w}"), &["options.window_right"]);
            }
        }
        _ => {}
    }

    // Varlen prefix sums and their mutations.
    let var = varlen.then(|| {
        let (mut cu_q, mut cu_k) = (prefix(&lens_q), prefix(&lens_k));
        let extra = |rng: &mut Rng| if chance(rng, 0.2) { below(rng, 3) } else { 0 };
        let mut max_q = longest(&lens_q).max(1) + extra(rng);
        let mut max_k = longest(&lens_k).max(1) + extra(rng);
        let which = |q: bool| if q { "cu_seqlens_q" } else { "cu_seqlens_k" };
        let maxname = |q: bool| if q { "max_seqlen_q" } else { "max_seqlen_k" };
        match mutation {
            Some(Mut::CuDecreasing(isq)) => {
                let cu = if isq { &mut cu_q } else { &mut cu_k };
                let n = cu.len() - 1;
                let before = cu.clone();
                if n >= 2 {
                    let i = 1 + below(rng, n - 1);
                    if cu[i - 1] >= 1 {
                        cu[i] = cu[i - 1] - 1;
                    } else {
                        cu[i] = cu[i + 1] + 1;
                    }
                } else {
                    cu.swap(0, 1);
                    if cu[0] == cu[1] {
                        cu[1] = -1;
                    }
                }
                set(format!("{}: decreasing {before:?} -> {cu:?}", which(isq)), &[which(isq)]);
            }
            Some(Mut::CuOutOfRange(isq)) => {
                let (cu, total) = if isq { (&mut cu_q, sq) } else { (&mut cu_k, sk) };
                let i = below(rng, cu.len());
                let (above, negative) = (total as i32 + 1 + below(rng, 3) as i32, -1 - below(rng, 3) as i32);
                let x = pick(rng, &[above, negative, i32::MAX, i32::MIN]);
                cu[i] = x;
                set(format!("{}: entry {i} = {x} out of 0..={total} ({cu:?})", which(isq)), &[which(isq)]);
            }
            Some(Mut::CuStart(isq)) => {
                let cu = if isq { &mut cu_q } else { &mut cu_k };
                cu[0] = 1 + below(rng, (cu[1].max(1)) as usize) as i32;
                set(format!("{}: starts at {} ({cu:?})", which(isq), cu[0]), &[which(isq)]);
            }
            Some(Mut::CuEnd(isq)) => {
                let (cu, total) = if isq { (&mut cu_q, sq) } else { (&mut cu_k, sk) };
                let n = cu.len() - 1;
                let prev = cu[n - 1] as usize;
                cu[n] = if prev < total { (prev + below(rng, total - prev)) as i32 } else { total as i32 - 1 };
                set(format!("{}: ends at {} of {total} rows ({cu:?})", which(isq), cu[n]), &[which(isq)]);
            }
            Some(Mut::CuCountK) => {
                if chance(rng, 0.5) {
                    cu_k.push(sk as i32);
                } else {
                    cu_k.pop();
                }
                set(format!("cu_seqlens_k: {} entries, cu_seqlens_q {}", cu_k.len(), cu_q.len()), &["cu_seqlens_k"]);
            }
            Some(Mut::CuFewQ) => {
                cu_q = if chance(rng, 0.5) { vec![0] } else { vec![] };
                set(format!("cu_seqlens_q: {} entries", cu_q.len()), &["cu_seqlens_q"]);
            }
            Some(Mut::MaxSeqZero(isq)) => {
                *(if isq { &mut max_q } else { &mut max_k }) = 0;
                set(format!("{} = 0", maxname(isq)), &[maxname(isq)]);
            }
            Some(Mut::MaxSeqHuge(isq)) => {
                let x = pick(rng, &[MAX_DIM + 1, usize::MAX]);
                *(if isq { &mut max_q } else { &mut max_k }) = x;
                set(format!("{} = {x}", maxname(isq)), &[maxname(isq)]);
            }
            Some(Mut::MaxSeqSmall(isq)) => {
                let l = if isq { longest(&lens_q) } else { longest(&lens_k) };
                let x = 1 + below(rng, l - 1);
                *(if isq { &mut max_q } else { &mut max_k }) = x;
                // Either name is right: the maximum and the prefix sums disagree.
                set(format!("{} = {x} < longest sequence {l}", maxname(isq)), &[maxname(isq), which(isq)]);
            }
            _ => {}
        }
        Var { cu_q, cu_k, max_q, max_k }
    });

    // lse.
    let want_lse = qs[0] * qs[1] * qs[2];
    let mut lse = chance(rng, 0.5).then_some(want_lse);
    if mutation == Some(Mut::LseLen) {
        let mut cands = vec![want_lse + 1 + below(rng, 3), 0];
        if want_lse > 1 {
            cands.push(want_lse - 1 - below(rng, want_lse.min(3) - 1));
        }
        if b > 1 {
            cands.push(h * sq);
        }
        let n = pick(rng, &cands);
        lse = Some(n);
        set(format!("lse: {n} elements, batch*heads*seqlen_q = {want_lse}"), &["lse"]);
    }

    let nan_p = if focus == Focus::NanScale { 0.6 } else { 0.12 };
    let nan_rows = if chance(rng, nan_p) { 1 + below(rng, 2) } else { 0 };
    if nan_rows > 0 {
        features.push("nan-q");
    }
    if lse.is_some() {
        features.push("lse");
    }
    Plan {
        dt,
        q,
        k,
        v,
        out,
        buf_lens,
        out_len,
        varlen: var,
        lse,
        opts,
        quantized,
        nan_rows,
        mutation: mutation_label,
        mutation_kind: mutation.map(|m| format!("{m:?}").replace("(true)", "(q)").replace("(false)", "(k)")),
        features,
    }
}

// ------------------------------------------------------------------------------------------
// Execution and checks.
// ------------------------------------------------------------------------------------------

/// One failed check: a class (for grouping) and the details.
struct Failure {
    class: String,
    detail: String,
}

fn fail(class: impl Into<String>, detail: impl Into<String>) -> Result<(), Failure> {
    Err(Failure { class: class.into(), detail: detail.into() })
}

/// Calls every logical element of `l` (b, s, h, c) with its offset.
fn for_each_elem(l: &Layout, mut f: impl FnMut([usize; 4], usize)) {
    let [b, s, h, d] = l.shape();
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h {
                let o = l.offset(bi, si, hi);
                for c in 0..d {
                    f([bi, si, hi, c], o + c);
                }
            }
        }
    }
}

fn describe_err(r: &Result<BackendKind, Error>) -> String {
    match r {
        Ok(k) => format!("Ok({k:?})"),
        Err(e) => format!("Err({e:?})"),
    }
}

fn exec<T: Elem>(attn: &Attention, p: &Plan, rng: &mut Rng) -> Result<(), Failure> {
    // Input buffers: padding is NaN, logical elements random (or quantized for q/k).
    let mut bufs: Vec<Vec<T>> = p.buf_lens.iter().map(|&n| vec![T::from_f32(f32::NAN); n]).collect();
    let quant = [-1.0f32, -0.5, 0.0, 0.5, 1.0];
    for (o, quantize) in [(&p.q, p.quantized), (&p.k, p.quantized), (&p.v, false)] {
        if span(&o.layout).map_or(true, |s| o.start + s > p.buf_lens[o.buf]) {
            continue; // an overflowing layout with a tiny buffer: nothing to fill
        }
        let buf = &mut bufs[o.buf];
        for_each_elem(&o.layout, |_, off| {
            let x = if quantize { pick(rng, &quant) } else { rng.f32_normal() };
            buf[o.start + off] = T::from_f32(x);
        });
    }
    if p.nan_rows > 0 && span(&p.q.layout).is_some_and(|s| p.q.start + s <= p.buf_lens[p.q.buf]) {
        let [b, s, h, d] = p.q.layout.shape();
        for _ in 0..p.nan_rows {
            if b * s * h * d == 0 {
                break;
            }
            let (bi, si, hi) = (below(rng, b), below(rng, s), below(rng, h));
            let off = p.q.start + p.q.layout.offset(bi, si, hi);
            let all = chance(rng, 0.3);
            let c0 = below(rng, d);
            for c in 0..d {
                if all || c == c0 {
                    bufs[p.q.buf][off + c] = T::from_f32(f32::NAN);
                }
            }
        }
    }
    let mut out_buf = vec![T::sentinel(); p.out_len];
    let mut lse_buf: Option<Vec<f32>> = p.lse.map(|n| vec![f32::from_bits(LSE_SENTINEL); n]);

    let view = |o: &Operand| -> &[T] { &bufs[o.buf][o.start..o.end] };
    let (qv, kv, vv) = (view(&p.q), view(&p.k), view(&p.v));
    take_panics();
    let result = {
        let out_view = &mut out_buf[p.out.start..p.out.end];
        let lse_view = lse_buf.as_deref_mut();
        catch_unwind(AssertUnwindSafe(|| {
            let (qt, kt, vt) = (Tensor::host(qv, p.q.layout), Tensor::host(kv, p.k.layout), Tensor::host(vv, p.v.layout));
            let mut ot = TensorMut::host(out_view, p.out.layout);
            let opts = &p.opts;
            match (&p.varlen, lse_view) {
                (None, None) => attn.forward(&qt, &kt, &vt, &mut ot, opts),
                (None, Some(l)) => attn.forward_with_lse(&qt, &kt, &vt, &mut ot, &mut LseMut::host(l), opts),
                (Some(var), lse) => {
                    let vl = VarLen::new(SeqLens::host(&var.cu_q), SeqLens::host(&var.cu_k), var.max_q, var.max_k);
                    match lse {
                        None => attn.forward_varlen(&qt, &kt, &vt, &mut ot, &vl, opts),
                        Some(l) => attn.forward_varlen_with_lse(&qt, &kt, &vt, &mut ot, &mut LseMut::host(l), &vl, opts),
                    }
                }
            }
        }))
    };
    let result = match result {
        Ok(r) => r,
        Err(payload) => {
            // The first recorded panic is the original one (a worker's, if a worker panicked).
            let recorded = take_panics();
            let (msg, at) = match recorded.first() {
                Some((_, loc)) => (recorded.iter().map(|(m, l)| format!("{m} at {l}")).collect::<Vec<_>>().join("; then "), loc.clone()),
                None => (payload_str(&*payload), "?".into()),
            };
            return fail(format!("panicked at {at}"), format!("the call panicked: {msg}"));
        }
    };

    if let Err(e) = &result {
        // Nothing written on error.
        if let Some(i) = out_buf.iter().position(|x| x.bits() != T::sentinel().bits()) {
            return fail(
                "wrote out although it failed",
                format!("{}; out[{i}] = {:?} (bits {:#x}), sentinel bits {:#x}", describe_err(&result), out_buf[i], out_buf[i].bits(), T::sentinel().bits()),
            );
        }
        if let Some(l) = &lse_buf {
            if let Some(i) = l.iter().position(|x| x.to_bits() != LSE_SENTINEL) {
                return fail("wrote lse although it failed", format!("{}; lse[{i}] = {}", describe_err(&result), l[i]));
            }
        }
        if p.mutation.is_none() {
            let class = match e {
                Error::InvalidArgument { arg, .. } => format!("valid call rejected (InvalidArgument `{arg}`)"),
                _ => "valid call rejected".into(),
            };
            return fail(class, format!("{e}"));
        }
    }

    if let Some((label, args)) = &p.mutation {
        return match &result {
            Err(Error::InvalidArgument { arg, .. }) if args.contains(arg) => Ok(()),
            Err(Error::InvalidArgument { arg, .. }) => fail(
                format!("named `{arg}`"),
                format!("mutation `{label}`: expected InvalidArgument naming {args:?}, got {}", describe_err(&result)),
            ),
            Err(_) => fail(
                "not an InvalidArgument",
                format!("mutation `{label}`: expected InvalidArgument naming {args:?}, got {}", describe_err(&result)),
            ),
            Ok(_) => fail(
                "accepted (returned Ok)",
                format!("mutation `{label}`: expected InvalidArgument naming {args:?}, got {}", describe_err(&result)),
            ),
        };
    }
    match result {
        Ok(BackendKind::Cpu) => {}
        other => return fail("valid call did not run on the CPU", describe_err(&other)),
    }
    check_values(p, qv, kv, vv, &out_buf, lse_buf.as_deref())
}

/// Compares a valid call's output with the f64 reference.
fn check_values<T: Elem>(p: &Plan, qv: &[T], kv: &[T], vv: &[T], out_buf: &[T], lse: Option<&[f32]>) -> Result<(), Failure> {
    let to64 = |x: T| x.to_f32() as f64;
    let input = |data, o: &Operand| RefInput { data, shape: o.layout.shape(), strides: o.layout.strides() };
    let [b, sq, h, d] = p.q.layout.shape();
    let [_, sk, hk, _] = p.k.layout.shape();
    let group = h / hk;
    let scale = p.opts.softmax_scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let mask = RefMask {
        causal: p.opts.causal,
        left: p.opts.window_left,
        right: p.opts.window_right,
        softcap: p.opts.softcap.map(f64::from),
    };
    // (out [b, sq, h, d], lse [b, h, sq]); for varlen b = 1, so lse is [h, total_q] as the API's.
    let (ref_out, ref_lse) = match &p.varlen {
        None => attention_f64_masked(input(qv, &p.q), input(kv, &p.k), input(vv, &p.v), to64, scale, mask),
        Some(var) => varlen_reference(input(qv, &p.q), input(kv, &p.k), input(vv, &p.v), &var.cu_q, &var.cu_k, to64, scale, mask),
    };
    // The keys of query row `s`'s batch entry or sequence: (first, end).
    let keys_of = |s: usize| -> (usize, usize) {
        match &p.varlen {
            None => (0, sk),
            Some(var) => {
                let seq = (0..var.cu_q.len() - 1).find(|&i| (var.cu_q[i] as usize..var.cu_q[i + 1] as usize).contains(&s)).expect("row in a sequence");
                (var.cu_k[seq] as usize, var.cu_k[seq + 1] as usize)
            }
        }
    };
    let mut vmax = 0.0f64;
    for_each_elem(&p.v.layout, |_, off| vmax = vmax.max(to64(vv[off]).abs()));
    let (atol, rtol) = tolerances(p.dt);
    let mut covered = vec![false; out_buf.len()];
    for bi in 0..b {
        for s in 0..sq {
            for hi in 0..h {
                let at = format!("row (batch {bi}, seq {s}, head {hi})");
                let q_off = p.q.layout.offset(bi, s, hi);
                let q_row: Vec<f64> = (0..d).map(|c| to64(qv[q_off + c])).collect();
                let q_nan = q_row.iter().any(|x| x.is_nan());
                let o_off = p.out.start + p.out.layout.offset(bi, s, hi);
                let got: Vec<T> = out_buf[o_off..o_off + d].to_vec();
                for c in 0..d {
                    covered[o_off + c] = true;
                }
                let want = &ref_out[((bi * sq + s) * h + hi) * d..][..d];
                let li = (bi * h + hi) * sq + s;
                let want_lse = ref_lse[li];
                let got_lse = lse.map(|l| l[li]);
                if let Some(c) = got.iter().position(|x| x.bits() == T::sentinel().bits()) {
                    return fail("output row not written", format!("{at}: out element {c} still holds the sentinel"));
                }
                if got_lse.is_some_and(|x| x.to_bits() == LSE_SENTINEL) {
                    return fail("lse entry not written", format!("{at}: lse[{li}] still holds the sentinel"));
                }
                let got64: Vec<f64> = got.iter().map(|&x| to64(x)).collect();
                let all_nan = got64.iter().all(|x| x.is_nan());
                let all_zero = got64.iter().all(|&x| x == 0.0);
                if q_nan {
                    // The reference propagates the NaN through every key the row sees; a row
                    // that sees no key has no score at all.
                    assert!(want_lse.is_nan() || want_lse == f64::NEG_INFINITY, "reference: NaN q row with lse {want_lse}");
                    if want_lse.is_nan() {
                        if !all_nan {
                            return fail(
                                "NaN in q row did not give a NaN output row",
                                format!("{at}: q row {q_row:?} sees keys; expected all NaN, got {got64:?}"),
                            );
                        }
                        if let Some(l) = got_lse {
                            if !l.is_nan() {
                                return fail("NaN in q row did not give a NaN lse", format!("{at}: expected NaN lse, got {l}"));
                            }
                        }
                    } else {
                        // Sees no key: zeros and -inf (the masked-row rule) or NaN and NaN
                        // (the NaN rule) are both consistent; nothing else is.
                        let masked = all_zero && got_lse.map_or(true, |l| l == f32::NEG_INFINITY);
                        let nan = all_nan && got_lse.map_or(true, |l| l.is_nan());
                        if !(masked || nan) {
                            return fail(
                                "NaN q row that sees no key: neither zeros/-inf nor NaN",
                                format!("{at}: got {got64:?}, lse {got_lse:?}"),
                            );
                        }
                    }
                    continue;
                }
                assert!(want.iter().all(|x| x.is_finite()) && !want_lse.is_nan(), "reference not finite at {at}: {want:?} {want_lse}");
                if want_lse == f64::NEG_INFINITY {
                    if !all_zero {
                        return fail("row that sees no key is not zeros", format!("{at}: got {got64:?}"));
                    }
                    if let Some(l) = got_lse {
                        if l != f32::NEG_INFINITY {
                            return fail("row that sees no key: lse not -inf", format!("{at}: got lse {l}"));
                        }
                    }
                    continue;
                }
                let sens = row_sensitivity(p, &q_row, kv, bi, hi / group, keys_of(s), scale, to64);
                let extra = (2.0 * sens).exp_m1() * 2.0 * vmax;
                for c in 0..d {
                    let (g, r) = (got64[c], want[c]);
                    let tol = atol * vmax + rtol * r.abs() + extra;
                    if !g.is_finite() {
                        return fail("non-finite output where a finite one is expected", format!("{at} element {c}: got {g}, want {r}"));
                    }
                    note_ratio(0, (g - r).abs() / tol);
                    if (g - r).abs() > tol {
                        return fail(
                            "output differs from the reference",
                            format!("{at} element {c}: got {g}, want {r}, |diff| {:.3e} > tol {tol:.3e} (vmax {vmax:.3}, logit error bound {sens:.2e})", (g - r).abs()),
                        );
                    }
                }
                if let Some(l) = got_lse {
                    let l = l as f64;
                    let tol = 1e-4 + 1e-6 * want_lse.abs() + sens;
                    note_ratio(1, (l - want_lse).abs() / tol);
                    if !l.is_finite() || (l - want_lse).abs() > tol {
                        return fail("lse differs from the reference", format!("{at}: lse got {l}, want {want_lse}, tol {tol:.3e}"));
                    }
                }
            }
        }
    }
    if let Some(i) = (0..out_buf.len()).find(|&i| !covered[i] && out_buf[i].bits() != T::sentinel().bits()) {
        return fail(
            "wrote outside the output view",
            format!("out buffer element {i} (not an element of the view) = {:?}, was the sentinel", out_buf[i]),
        );
    }
    Ok(())
}

thread_local! {
    /// The largest |got − ref| / tolerance seen for outputs and lse (how much margin is left).
    static WORST: std::cell::Cell<[f64; 2]> = const { std::cell::Cell::new([0.0; 2]) };
}

fn note_ratio(i: usize, r: f64) {
    WORST.with(|w| {
        let mut x = w.get();
        if r > x[i] {
            x[i] = r;
            w.set(x);
        }
    });
}

/// An upper bound on the error of the f32 logits of one row (before the softmax), in nats.
///
/// The CPU backend's logit for key j is f32(scale · Σ q_c k_jc) (then softcapped and shifted
/// by the running max); with f32 dot products over d terms the error is at most about
/// (d + 6)·2⁻²⁴·|scale|·Σ|q_c k_jc| (the dot product, the scale and its f32 default
/// 1/√d, the max and the subtraction). With quantized q/k the dot products are exact in f32
/// (sums of at most 16 multiples of 0.25), so only the other roundings remain: 6·2⁻²⁴·….
/// With |scale| ≥ 1e3 and quantized inputs, keys with different dot products are at least
/// 0.25·|scale| ≥ 250 nats apart, far more than any rounding, so their weights are exactly 0
/// relative to the maximum in f32 (and < e⁻²⁴⁰ in f64), and keys with equal dot products get
/// bit-identical logits: the weights are exact and the bound is 0. Softcapping adds the f32
/// tanh error, ≈ cap·2⁻²⁰. A logit error δ changes each weight by at most a factor e^{±2δ},
/// so the output by at most (e^{2δ} − 1)·2·max|v| (added to the tolerance by the caller).
#[allow(clippy::too_many_arguments)]
fn row_sensitivity<T: Copy>(
    p: &Plan,
    q_row: &[f64],
    kv: &[T],
    bi: usize,
    kv_head: usize,
    (k0, k1): (usize, usize),
    scale: f64,
    to64: impl Fn(T) -> f64,
) -> f64 {
    let cap = p.opts.softcap.map_or(0.0, |c| c as f64 * 2f64.powi(-20));
    if p.quantized && scale.abs() >= 1e3 {
        return cap;
    }
    let d = q_row.len();
    let mut worst = 0.0f64;
    for j in k0..k1 {
        let off = p.k.layout.offset(bi, j, kv_head);
        let s: f64 = (0..d).map(|c| (q_row[c] * to64(kv[off + c])).abs()).sum();
        worst = worst.max(s);
    }
    let gamma = if p.quantized { 6.0 } else { d as f64 + 6.0 } * 2f64.powi(-24);
    scale.abs() * worst * gamma + cap
}

/// The f64 reference of a packed batch, sequence by sequence, as `(out [1, total_q, h, d],
/// lse [h, total_q])`. Unlike `common::reference::varlen_f64` it never slices a view at an
/// empty sequence's start (which may lie past the end of a view whose last row is shorter
/// than its row stride), and every row is in a sequence (the plan makes sure).
#[allow(clippy::too_many_arguments)]
fn varlen_reference<T: Copy>(
    q: RefInput<T>,
    k: RefInput<T>,
    v: RefInput<T>,
    cu_q: &[i32],
    cu_k: &[i32],
    to64: impl Fn(T) -> f64 + Copy,
    scale: f64,
    mask: RefMask,
) -> (Vec<f64>, Vec<f64>) {
    let [_, total_q, h, d] = q.shape;
    let mut out = vec![f64::NAN; total_q * h * d];
    let mut lse = vec![f64::NAN; h * total_q];
    fn sub<'a, T>(t: &RefInput<'a, T>, r0: usize, rows: usize) -> RefInput<'a, T> {
        let data = if rows == 0 { &t.data[..0] } else { &t.data[r0 * t.strides[1]..] };
        RefInput { data, shape: [1, rows, t.shape[2], t.shape[3]], strides: t.strides }
    }
    for bi in 0..cu_q.len() - 1 {
        let (q0, q1) = (cu_q[bi] as usize, cu_q[bi + 1] as usize);
        let (k0, k1) = (cu_k[bi] as usize, cu_k[bi + 1] as usize);
        if q1 == q0 {
            continue;
        }
        let (o, l) = attention_f64_masked(sub(&q, q0, q1 - q0), sub(&k, k0, k1 - k0), sub(&v, k0, k1 - k0), to64, scale, mask);
        out[q0 * h * d..q1 * h * d].copy_from_slice(&o);
        for hi in 0..h {
            lse[hi * total_q + q0..hi * total_q + q1].copy_from_slice(&l[hi * (q1 - q0)..(hi + 1) * (q1 - q0)]);
        }
    }
    (out, lse)
}

// ------------------------------------------------------------------------------------------
// Panics: recorded quietly (with their location) while a fuzz test runs.
// ------------------------------------------------------------------------------------------

/// Serialises the tests of this file (they share the panic hook's record).
static SERIAL: Mutex<()> = Mutex::new(());
/// While a fuzz test runs: its thread and the panics (message, location) recorded since the
/// last take.
static CAPTURE: Mutex<Option<(ThreadId, Vec<Recorded>)>> = Mutex::new(None);
/// A recorded panic: message and location.
type Recorded = (String, String);
static HOOK: Once = Once::new();

fn payload_str(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

/// Panics on the fuzzing thread and on unnamed threads (the CPU backend's workers) are
/// recorded, not printed; every other thread's go to the default hook.
fn install_hook() {
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let t = std::thread::current();
            {
                let mut cap = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((id, msgs)) = cap.as_mut() {
                    if t.id() == *id || t.name().is_none() {
                        let loc = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_else(|| "?".into());
                        msgs.push((payload_str(info.payload()), loc));
                        return;
                    }
                }
            }
            prev(info);
        }));
    });
}

fn take_panics() -> Vec<Recorded> {
    let mut cap = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
    cap.as_mut().map(|(_, m)| std::mem::take(m)).unwrap_or_default()
}

/// Stops recording when the fuzz ends, and prints what was recorded if the harness itself
/// panicked (a bug in this file).
struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        let rec = CAPTURE.lock().unwrap_or_else(|e| e.into_inner()).take();
        if std::thread::panicking() {
            if let Some((_, msgs)) = rec {
                for (m, loc) in msgs {
                    eprintln!("recorded panic: {m} at {loc}");
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The driver.
// ------------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let t = v.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => t.replace('_', "").parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?}: not a u64 ({e})")))
}

/// The generator of case `case` under `seed` (independent of every other case, so one case
/// replays alone).
fn case_rng(seed: u64, case: u64) -> Rng {
    let mut r = Rng::seed(seed ^ case.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    Rng::seed(r.next_u64())
}

fn fuzz(test: &str, focus: Focus, default_calls: usize) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install_hook();
    let seed = env_u64("ATTN_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let calls = match (env_u64("ATTN_FUZZ_CALLS"), focus) {
        (Some(n), Focus::Any) => n as usize,
        (Some(n), _) => (n as usize / 8).max(default_calls),
        (None, _) => default_calls,
    };
    let only = env_u64("ATTN_FUZZ_CASE");
    let attn = attention::Selector::from_env().unwrap().backend(BackendKind::Cpu).select().unwrap();
    *CAPTURE.lock().unwrap_or_else(|e| e.into_inner()) = Some((std::thread::current().id(), Vec::new()));
    let guard = CaptureGuard;

    let started = std::time::Instant::now();
    WORST.with(|w| w.set([0.0; 2]));
    let replay = |case: u64| format!("ATTN_FUZZ_SEED={seed:#x} ATTN_FUZZ_CASE={case} cargo test --test api_fuzz {test} -- --exact --nocapture");
    // Failures grouped by (what the call was, what went wrong).
    #[derive(Default)]
    struct Group {
        count: usize,
        cases: Vec<u64>,
        first: String,
        /// How many of the group's calls had each feature.
        features: BTreeMap<&'static str, usize>,
    }
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let (mut valid, mut mutated, mut failed) = (0usize, 0usize, 0usize);
    let cases: Vec<u64> = match only {
        Some(c) => vec![c],
        None => (0..calls as u64).collect(),
    };
    for &case in &cases {
        let mut rng = case_rng(seed, case);
        let plan = gen_plan(&mut rng, focus);
        if only.is_some() {
            eprintln!("[{test}] seed {seed:#x} case {case}:\n{plan:#?}\n{}", plan.summary());
        }
        if plan.mutation.is_some() {
            mutated += 1;
        } else {
            valid += 1;
        }
        let r = match plan.dt {
            Dt::F16 => exec::<f16>(&attn, &plan, &mut rng),
            Dt::Bf16 => exec::<bf16>(&attn, &plan, &mut rng),
            Dt::F32 => exec::<f32>(&attn, &plan, &mut rng),
        };
        if let Err(f) = r {
            failed += 1;
            let key = match &plan.mutation_kind {
                Some(kind) => format!("invalid call {kind}: {}", f.class),
                None => format!("valid call: {}", f.class),
            };
            let g = groups.entry(key).or_default();
            if g.count == 0 {
                g.first = format!("case {case}: {}\n        call: {}\n        replay: {}", f.detail, plan.summary(), replay(case));
            }
            g.count += 1;
            if g.cases.len() < 10 {
                g.cases.push(case);
            }
            let mut seen = plan.features.clone();
            seen.dedup();
            for feat in seen {
                *g.features.entry(feat).or_default() += 1;
            }
        } else if only.is_some() {
            eprintln!("case {case} passed");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(guard); // this thread's own panics (the report below) go to the default hook again
    let worst = WORST.with(|w| w.get());
    eprintln!(
        "[{test}] seed {seed:#x}: {} calls ({valid} valid, {mutated} invalid) in {secs:.1} s, {failed} failed; largest error/tolerance: out {:.3}, lse {:.3}",
        cases.len(),
        worst[0],
        worst[1]
    );
    if failed > 0 {
        let mut sorted: Vec<_> = groups.into_iter().collect();
        sorted.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
        let mut msg = format!(
            "[{test}] {failed} of {} calls failed (seed {seed:#x}; {valid} valid, {mutated} invalid), in {} groups:\n",
            cases.len(),
            sorted.len()
        );
        for (key, g) in &sorted {
            let mut feats: Vec<_> = g.features.iter().collect();
            feats.sort_by(|a, b| b.1.cmp(a.1));
            let feats: Vec<String> = feats.iter().map(|(f, n)| format!("{f} {n}")).collect();
            let _ = writeln!(
                msg,
                "  [{}x] {key}\n      cases {:?}{}\n      features of these calls (of {}): {}\n      first: {}",
                g.count,
                g.cases,
                if g.count > g.cases.len() { " ..." } else { "" },
                g.count,
                feats.join(", "),
                g.first
            );
        }
        panic!("{msg}");
    }
}

/// Generic: every kind of call and every kind of mutation.
#[test]
fn fuzz_api_calls() {
    fuzz("fuzz_api_calls", Focus::Any, DEFAULT_CALLS);
}

/// Contract 1: layouts whose element count or span overflows are InvalidArgument naming the
/// tensor, never accepted, never a panic or abort.
#[test]
fn fuzz_overflowing_layouts_are_invalid_arguments() {
    fuzz("fuzz_overflowing_layouts_are_invalid_arguments", Focus::Overflow, FOCUSED_CALLS);
}

/// Contract 3: varlen with an empty last key sequence over K/V views whose row stride is
/// longer than the last row's used part (padded rows, packed QKV / KV buffers that end right
/// after it): no panic, every output row written and correct.
#[test]
fn fuzz_varlen_views_with_an_empty_last_key_sequence() {
    fuzz("fuzz_varlen_views_with_an_empty_last_key_sequence", Focus::VarlenViews, FOCUSED_CALLS);
}

/// Contract 6: host cu_seqlens start at 0 and end at the packed tensor's row count.
#[test]
fn fuzz_cu_seqlens_must_start_at_0_and_end_at_the_total() {
    fuzz("fuzz_cu_seqlens_must_start_at_0_and_end_at_the_total", Focus::CuBounds, FOCUSED_CALLS);
}

/// Contract 7: a NaN in a q row gives a NaN output row (and lse); |softmax_scale| ≤ 1e6 and
/// finite, and huge scales within that range match the reference.
#[test]
fn fuzz_nan_queries_and_the_softmax_scale_range() {
    fuzz("fuzz_nan_queries_and_the_softmax_scale_range", Focus::NanScale, FOCUSED_CALLS);
}

/// Zero-stride (broadcast) K/V views along batch or heads are accepted and correct: the README
/// promises any strides, and read-only inputs may alias (only `out` may not overlap itself).
#[test]
fn fuzz_broadcast_kv_views_are_accepted_and_correct() {
    fuzz("fuzz_broadcast_kv_views_are_accepted_and_correct", Focus::Broadcast, FOCUSED_CALLS);
}

/// The same, spelled out: K broadcast over the batch, V over the kv heads, against the
/// reference; and the output may not do the same.
#[test]
fn broadcast_kv_views_explicit() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let attn = attention::Selector::from_env().unwrap().backend(BackendKind::Cpu).select().unwrap();
    let (b, sq, sk, h, hk, d) = (3, 5, 7, 4, 2, 8);
    let lq = Layout::contiguous(b, sq, h, d);
    let lk = Layout::strided([b, sk, hk, d], [0, hk * d, d]); // one K for every batch
    let lv = Layout::strided([b, sk, hk, d], [sk * d, d, 0]); // one V head for all kv heads
    let mut rng = Rng::seed(0xB40A_DCA5);
    let gen = |rng: &mut Rng, n: usize| (0..n).map(|_| rng.f32_normal()).collect::<Vec<f32>>();
    let q = gen(&mut rng, lq.numel());
    let k = gen(&mut rng, sk * hk * d);
    let v = gen(&mut rng, b * sk * d);
    let mut out = vec![<f32 as Elem>::sentinel(); lq.numel()];
    let mut lse = vec![f32::from_bits(LSE_SENTINEL); b * h * sq];
    let r = attn.forward_with_lse(
        &Tensor::host(&q, lq),
        &Tensor::host(&k, lk),
        &Tensor::host(&v, lv),
        &mut TensorMut::host(&mut out, lq),
        &mut LseMut::host(&mut lse),
        &Options::default().causal(true),
    );
    assert!(
        matches!(r, Ok(BackendKind::Cpu)),
        "K with batch stride 0 and V with head stride 0 must be accepted (read-only inputs may alias): {}",
        describe_err(&r)
    );
    let inp = |data, l: Layout| RefInput { data, shape: l.shape(), strides: l.strides() };
    let (ro, rl) = attention_f64_masked(inp(&q[..], lq), inp(&k[..], lk), inp(&v[..], lv), |x: f32| x as f64, 1.0 / (d as f64).sqrt(), RefMask { causal: true, ..RefMask::default() });
    for (i, (g, r)) in out.iter().zip(&ro).enumerate() {
        assert!((*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()), "out[{i}]: got {g}, want {r}");
    }
    for (i, (g, r)) in lse.iter().zip(&rl).enumerate() {
        assert!((*g as f64 - r).abs() <= 1e-4, "lse[{i}]: got {g}, want {r}");
    }
    // The output must not alias itself.
    let lo = Layout::strided([b, sq, h, d], [0, h * d, d]);
    let mut out2 = vec![<f32 as Elem>::sentinel(); sq * h * d];
    let r = attn.forward(&Tensor::host(&q, lq), &Tensor::host(&k, lk), &Tensor::host(&v, lv), &mut TensorMut::host(&mut out2, lo), &Options::default());
    match &r {
        Err(Error::InvalidArgument { arg: "out", .. }) => {}
        other => panic!("an output with batch stride 0 must be InvalidArgument naming `out`, got {}", describe_err(other)),
    }
    assert!(out2.iter().all(|x| x.to_bits() == <f32 as Elem>::sentinel().to_bits()), "a failed call wrote out");
}
