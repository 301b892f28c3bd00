//! The harness of the suites that check a forward against the f64 reference: one case type
//! ([`Case`]: dtype, sequences, heads, head_dim, mask, layout, offset, expected backend), one
//! runner ([`run`], [`check_all`]) with the dtype dispatch written once, and one tolerance table
//! ([`Tol::of`]). The runner works on device memory and on host memory alike, so `cargo test`
//! runs it on the CPU backend and a bug in it shows there, not first on the device. A case can
//! also ask for what the hardening suite checks: `forward` without lse, NaN inputs, K/V
//! broadcast over the batch (zero stride), and device memory on three streams ([`Streams`]).

use std::sync::Arc;

use attention::cudarc::driver::{CudaStream, DeviceRepr, ValidAsZeroBits};
use attention::{Attention, BackendKind, DType, Element, Error, Layout, LseMut, Options, SeqLens, Tensor, TensorMut, VarLen};
use half::{bf16, f16};

use super::reference::{attention_f64_masked, rel_err, varlen_f64, RefInput, RefMask};
use super::rng::Rng;

/// The handle the GPU suites test (from the environment, so `ATTN_EMULATE_ARCH` and friends
/// apply) and its device's default stream. Panics without a device: a GPU test never passes by
/// skipping.
pub fn gpu() -> (attention::Attention, Arc<CudaStream>) {
    let attn = attention::Selector::from_env().unwrap().select().unwrap();
    let caps = attn.device_caps().unwrap_or_else(|| panic!("no CUDA device: {}", attn.no_device_reason().unwrap_or("?")));
    let ctx = attention::cudarc::driver::CudaContext::new(caps.ordinal).unwrap();
    (attn, ctx.default_stream())
}

/// Tolerances on ‖out − ref‖/‖ref‖ against the f64 reference, per dtype: the rel column of
/// [`Tol::of`], and the bound of the suites that check other calls (KV cache, append).
pub fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}

/// A dense problem's sizes (see [`s`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub b: usize,
    pub sq: usize,
    pub sk: usize,
    pub h: usize,
    pub hk: usize,
    pub d: usize,
}

/// A shape: batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim.
pub const fn s(b: usize, sq: usize, sk: usize, h: usize, hk: usize, d: usize) -> Shape {
    Shape { b, sq, sk, h, hk, d }
}

/// Max |lse − ref| over finite reference values; infinite when a -inf reference is not -inf
/// exactly (rows that see no key) or a value is NaN.
pub fn lse_error(got: impl Iterator<Item = f64>, want: impl Iterator<Item = f64>) -> f64 {
    let mut err: f64 = 0.0;
    for (g, r) in got.zip(want) {
        if r.is_infinite() {
            if g != r {
                err = f64::INFINITY;
            }
        } else if g.is_nan() {
            err = f64::INFINITY;
        } else {
            err = err.max((g - r).abs());
        }
    }
    err
}

/// Fresh random values, standard normal (never all zeros: an unwritten or ignored input shows).
pub fn random<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    let mut v = vec![T::from_f32(0.0); n];
    rng.fill(&mut v, T::from_f32);
    v
}

/// The crate's options for a reference mask.
pub fn options(mask: &RefMask) -> Options {
    let opts = Options::default().causal(mask.causal).window(mask.left, mask.right);
    match mask.softcap {
        Some(c) => opts.softcap(c as f32),
        None => opts,
    }
}

/// The tolerances one case must meet, looked up by (backend, dtype, options) in [`Tol::of`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    /// Bound on ‖out − ref‖/‖ref‖.
    pub rel: f64,
    /// Bound on max |lse − ref| (see [`lse_error`]).
    pub lse: f64,
}

impl Tol {
    /// The one table of the suites that compare a forward with the f64 reference.
    ///
    /// - rel: by dtype alone ([`tolerance`]); soft-capping needs no wider one (the kernels'
    ///   tanh is within ~1e-7 absolute).
    /// - lse: 1e-3, except 2e-3 for flash and naive with a window or soft-cap, and for flash
    ///   on packed (varlen) batches: the bounds those suites were written and tuned with, kept
    ///   as they were (none widened). mem_efficient meets 1e-3 with every option.
    pub fn of(backend: BackendKind, dtype: DType, mask: &RefMask, varlen: bool) -> Tol {
        let shaped = mask.left.is_some() || mask.right.is_some() || mask.softcap.is_some();
        let lse = match backend {
            BackendKind::Flash if shaped || varlen => 2e-3,
            BackendKind::Naive if shaped => 2e-3,
            _ => 1e-3,
        };
        Tol { rel: tolerance(dtype), lse }
    }
}

/// A short text for a mask: `none`, `causal`, `window(37,5)`, `softcap=20`, combined.
pub fn mask_text(m: &RefMask) -> String {
    let mut parts = Vec::new();
    if m.causal {
        parts.push("causal".to_string());
    }
    if m.left.is_some() || m.right.is_some() {
        let side = |w: Option<usize>| w.map_or("-".to_string(), |w| w.to_string());
        parts.push(format!("window({},{})", side(m.left), side(m.right)));
    }
    if let Some(c) = m.softcap {
        parts.push(format!("softcap={c}"));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("+")
    }
}

/// The sequences of a case.
#[derive(Clone, Debug)]
pub enum Seqs {
    /// `b` sequences of `sq` queries and `sk` keys each (`forward_with_lse`).
    Dense { b: usize, sq: usize, sk: usize },
    /// One packed batch: sequence `i` has `q[i]` queries and `k[i]` keys
    /// (`forward_varlen_with_lse`, prefix sums in the case's memory).
    Packed { q: Vec<usize>, k: Vec<usize> },
}

/// One forward call to check against the f64 reference: dtype, sizes, mask, layout, and the
/// backend that must run it. The handle (ranked or forced) and the memory are the suite's.
#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    pub seqs: Seqs,
    /// Query heads and KV heads (`h % hk == 0`).
    pub h: usize,
    pub hk: usize,
    pub d: usize,
    pub mask: RefMask,
    /// `[b, h, s, d]` storage (PyTorch's) instead of `[b, s, h, d]`.
    pub heads_first: bool,
    /// Every tensor's base shifted by this many elements (misaligned on purpose).
    pub offset: usize,
    /// The backend that must run it; `None`: any (the tolerance is then the one of the backend
    /// that ran).
    pub expect: Option<BackendKind>,
    /// Whether the call asks for the lse (`forward_with_lse`) or not (`forward`).
    pub lse: bool,
    /// K and V stored once for the whole batch, batch stride 0 (read-only inputs may alias).
    pub broadcast_kv: bool,
    /// Input elements set to NaN after the random fill (see [`Case::nan`]).
    pub nan: Vec<NanAt>,
}

/// Which input a [`NanAt`] poisons.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Input {
    Q,
    K,
    V,
}

/// Input elements set to NaN: row `row` of batch entry 0 of `input`, one head or every head,
/// one element of the head's vector or all of it.
#[derive(Clone, Copy, Debug)]
pub struct NanAt {
    pub input: Input,
    pub row: usize,
    pub head: Option<usize>,
    pub dim: Option<usize>,
}

impl Case {
    /// A dense case of shape `sh`, aligned, any backend.
    pub fn dense(dtype: DType, sh: Shape, mask: RefMask, heads_first: bool) -> Case {
        let seqs = Seqs::Dense { b: sh.b, sq: sh.sq, sk: sh.sk };
        Case { dtype, seqs, h: sh.h, hk: sh.hk, d: sh.d, mask, heads_first, offset: 0, expect: None, lse: true, broadcast_kv: false, nan: Vec::new() }
    }

    /// A packed batch of per-sequence lengths, aligned, any backend.
    pub fn packed(dtype: DType, q: &[usize], k: &[usize], (h, hk, d): (usize, usize, usize), mask: RefMask, heads_first: bool) -> Case {
        let seqs = Seqs::Packed { q: q.to_vec(), k: k.to_vec() };
        Case { dtype, seqs, h, hk, d, mask, heads_first, offset: 0, expect: None, lse: true, broadcast_kv: false, nan: Vec::new() }
    }

    /// The same case, which `kind` must run.
    pub fn expect(self, kind: BackendKind) -> Case {
        Case { expect: Some(kind), ..self }
    }

    /// The same case with every base `offset` elements into its buffer.
    pub fn offset(self, offset: usize) -> Case {
        Case { offset, ..self }
    }

    /// The same case through `forward` (`forward_varlen`): no lse asked for, none compared.
    pub fn without_lse(self) -> Case {
        Case { lse: false, ..self }
    }

    /// The same case with K and V broadcast over the batch (batch stride 0).
    pub fn broadcast_kv(self) -> Case {
        Case { broadcast_kv: true, ..self }
    }

    /// The same case with more input elements set to NaN. The f64 reference propagates them,
    /// and the verdict then wants NaN exactly where the reference has it (out and lse), the
    /// rest compared as usual; the outputs are poisoned with a finite value instead (7.0), so
    /// an unwritten row fails either way.
    pub fn nan(mut self, input: Input, row: usize, head: Option<usize>, dim: Option<usize>) -> Case {
        self.nan.push(NanAt { input, row, head, dim });
        self
    }

    /// Multiply-adds of the reference's Q·Kᵀ (the case's cost on the host).
    pub fn cost(&self) -> usize {
        let pairs = match &self.seqs {
            Seqs::Dense { b, sq, sk } => b * sq * sk,
            Seqs::Packed { q, k } => q.iter().zip(k).map(|(a, b)| a * b).sum(),
        };
        pairs * self.h * self.d
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dtype)?;
        if let Some(kind) = self.expect {
            write!(f, " {kind}")?;
        }
        match &self.seqs {
            Seqs::Dense { b, sq, sk } => write!(f, " b={b} sq={sq} sk={sk}")?,
            Seqs::Packed { q, k } => write!(f, " packed q={q:?} k={k:?}")?,
        }
        write!(f, " h={}/{} d={} {} heads_first={}", self.h, self.hk, self.d, mask_text(&self.mask), self.heads_first)?;
        if self.offset != 0 {
            write!(f, " offset={}", self.offset)?;
        }
        if !self.lse {
            write!(f, " no-lse")?;
        }
        if self.broadcast_kv {
            write!(f, " broadcast-kv")?;
        }
        for n in &self.nan {
            write!(f, " nan({:?} row {} head {:?} dim {:?})", n.input, n.row, n.head, n.dim)?;
        }
        Ok(())
    }
}

/// What one run produced, compared with the reference.
#[derive(Debug)]
pub struct Outcome {
    pub rel: f64,
    pub lse_err: f64,
    /// Output elements that are not finite (NaN poison left unwritten, or overflow).
    pub nan: usize,
    pub ran: BackendKind,
    /// Output elements and lse entries whose reference is NaN (cases with NaN inputs only):
    /// each must be NaN, and is left out of `rel` and `lse_err`.
    pub want_nan: usize,
    /// Those of `want_nan` that are not NaN.
    pub missed_nan: usize,
}

impl Outcome {
    /// Whether the run meets its case: the expected backend, every output finite, and the
    /// errors within [`Tol::of`] the backend that ran. `Err` says what was off and the bounds.
    pub fn verdict(&self, case: &Case) -> Result<(), String> {
        let tol = Tol::of(self.ran, case.dtype, &case.mask, matches!(case.seqs, Seqs::Packed { .. }));
        let backend_ok = case.expect.is_none_or(|k| k == self.ran);
        if backend_ok && self.nan == 0 && self.missed_nan == 0 && self.rel < tol.rel && self.lse_err < tol.lse {
            return Ok(());
        }
        Err(format!(
            "rel {:.2e} lse {:.2e} nan {} missed nan {}/{} ran {} (bounds: rel {:.0e}, lse {:.0e})",
            self.rel, self.lse_err, self.nan, self.missed_nan, self.want_nan, self.ran, tol.rel, tol.lse
        ))
    }
}

/// Where a case's tensors live. Host memory runs the same runner on the CPU backend, so
/// `cargo test` exercises it without a GPU.
#[derive(Clone)]
pub enum Place {
    Host,
    Device(Arc<CudaStream>),
    Streams(Streams),
}

/// Work a [`Streams`] place queues (on the stream of the buffers it writes).
pub type Queue = Arc<dyn Fn() + Send + Sync>;

/// Device memory over three streams, as a pipeline has it: the inputs written on `inputs` over
/// stale zeros, behind slow work queued there; the call on `call` (out's and lse's stream),
/// behind slow work queued there; the results read on `read`. cudarc's event tracking must
/// order them: an input read before its write, or a result read before the kernels, gives
/// values that fail the comparison.
#[derive(Clone)]
pub struct Streams {
    pub inputs: Arc<CudaStream>,
    pub call: Arc<CudaStream>,
    pub read: Arc<CudaStream>,
    /// Queued on `inputs` before the inputs are written, and on `call` before the call.
    pub slow: [Queue; 2],
}

/// Runs one case through `attn` in `place`'s memory: fresh random inputs, outputs poisoned
/// with NaN, the call, and the comparison with the f64 reference (the one dtype dispatch).
pub fn run(attn: &Attention, place: &Place, rng: &mut Rng, case: &Case) -> Result<Outcome, Error> {
    match case.dtype {
        DType::F16 => run_typed::<f16>(attn, place, rng, case),
        DType::BF16 => run_typed::<bf16>(attn, place, rng, case),
        DType::F32 => run_typed::<f32>(attn, place, rng, case),
    }
}

/// Prefix sums of lengths (`cu_seqlens`).
fn prefix(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |s, &l| {
            *s += l;
            Some(*s as i32)
        }))
        .collect()
}

fn run_typed<T: Element + DeviceRepr + ValidAsZeroBits>(attn: &Attention, place: &Place, rng: &mut Rng, case: &Case) -> Result<Outcome, Error> {
    let (h, hk, d) = (case.h, case.hk, case.d);
    // Batch entries, rows checked per entry, and the stored sequence lengths. A packed batch is
    // one entry of all rows (a layout keeps at least one row, even when no sequence has any).
    let (b, rows, sq, sk, cu) = match &case.seqs {
        Seqs::Dense { b, sq, sk } => (*b, *sq, *sq, *sk, None),
        Seqs::Packed { q, k } => {
            let (cq, ck) = (prefix(q), prefix(k));
            let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
            (1, tq, tq.max(1), tk.max(1), Some((cq, ck)))
        }
    };
    let lay = |b, s, h| if case.heads_first { Layout::heads_first(b, s, h, d) } else { Layout::contiguous(b, s, h, d) };
    let lq = lay(b, sq, h);
    // Broadcast K/V: one batch entry's storage, read by every entry through a zero stride.
    let lk = if case.broadcast_kv {
        let [_, s, h] = lay(1, sk, hk).strides();
        Layout::strided([b, sk, hk, d], [0, s, h])
    } else {
        lay(b, sk, hk)
    };
    let kv = lk.span().unwrap();
    let (mut q, mut k, mut v) = (random::<T>(rng, lq.numel()), random::<T>(rng, kv), random::<T>(rng, kv));
    for n in &case.nan {
        let (x, l) = match n.input {
            Input::Q => (&mut q, lq),
            Input::K => (&mut k, lk),
            Input::V => (&mut v, lk),
        };
        for hi in n.head.map_or(0..l.heads(), |hi| hi..hi + 1) {
            let row = &mut x[l.offset(0, n.row, hi)..][..d];
            for c in n.dim.map_or(0..d, |c| c..c + 1) {
                row[c] = T::from_f32(f32::NAN);
            }
        }
    }
    // A NaN poison would pass for an expected NaN: with NaN inputs it is finite.
    let poison = if case.nan.is_empty() { f32::NAN } else { 7.0 };
    let (ran, out, lse) = execute(attn, place, case, [&q, &k, &v], (lq, lk), cu.as_ref(), poison)?;
    let to64 = |x: T| x.to_f32() as f64;
    let input = |data, l: Layout| RefInput { data, shape: l.shape(), strides: l.strides() };
    let scale = 1.0 / (d as f64).sqrt();
    // Both references in one order: out `[b, sq, h, d]`, lse `[b, h, sq]` (sq as stored).
    let (ref_out, ref_lse) = match &cu {
        None => attention_f64_masked(input(&q[..], lq), input(&k[..], lk), input(&v[..], lk), to64, scale, case.mask),
        Some((cq, ck)) => {
            let (o, l) = varlen_f64(input(&q[..], lq), input(&k[..], lk), input(&v[..], lk), cq, ck, to64, scale, case.mask);
            // Rows outside every sequence (only the kept row of an empty batch) are never read.
            let nan = |x: Vec<Option<f64>>| x.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect::<Vec<_>>();
            (nan(o), nan(l))
        }
    };
    // Our (possibly heads-first, offset) output gathered into the reference's order.
    let (mut got, mut want) = (Vec::with_capacity(ref_out.len()), Vec::with_capacity(ref_out.len()));
    let (mut got_lse, mut want_lse) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for i in 0..rows {
            for hi in 0..h {
                let o = case.offset + lq.offset(bi, i, hi);
                got.extend(out[o..o + d].iter().map(|&x| to64(x)));
                want.extend_from_slice(&ref_out[((bi * sq + i) * h + hi) * d..][..d]);
            }
        }
        if case.lse {
            for hi in 0..h {
                let row = (bi * h + hi) * sq;
                got_lse.extend(lse[row..row + rows].iter().map(|&x| x as f64));
                want_lse.extend_from_slice(&ref_lse[row..row + rows]);
            }
        }
    }
    let (mut want_nan, mut missed_nan) = (0, 0);
    if !case.nan.is_empty() {
        for (got, want) in [(&mut got, &mut want), (&mut got_lse, &mut want_lse)] {
            let (n, missed) = split_nan(got, want);
            (want_nan, missed_nan) = (want_nan + n, missed_nan + missed);
        }
    }
    let nan = got.iter().filter(|x| !x.is_finite()).count();
    let lse_err = lse_error(got_lse.into_iter(), want_lse.into_iter());
    Ok(Outcome { rel: rel_err(&got, &want), lse_err, nan, ran, want_nan, missed_nan })
}

/// Takes the pairs whose reference is NaN out of `got` and `want`; returns how many there were
/// and how many of them are not NaN in `got`.
fn split_nan(got: &mut Vec<f64>, want: &mut Vec<f64>) -> (usize, usize) {
    let (mut n, mut missed) = (0, 0);
    let pairs = std::mem::take(got).into_iter().zip(std::mem::take(want));
    (*got, *want) = pairs
        .filter(|&(g, w)| {
            if w.is_nan() {
                n += 1;
                missed += usize::from(!g.is_nan());
            }
            !w.is_nan()
        })
        .unzip();
    (n, missed)
}

/// The call itself, in `place`'s memory: inputs copied there (each base `case.offset`
/// elements into its buffer), out and lse (when asked for) filled with `poison`; returns both
/// as copied back (lse empty when not asked for).
fn execute<T: Element + DeviceRepr + ValidAsZeroBits>(
    attn: &Attention,
    place: &Place,
    case: &Case,
    [q, k, v]: [&[T]; 3],
    (lq, lk): (Layout, Layout),
    cu: Option<&(Vec<i32>, Vec<i32>)>,
    poison: f32,
) -> Result<(BackendKind, Vec<T>, Vec<f32>), Error> {
    let off = case.offset;
    let padded = |x: &[T]| [vec![T::from_f32(0.0); off], x.to_vec()].concat();
    let (q, k, v) = (padded(q), padded(k), padded(v));
    let mut out = vec![T::from_f32(poison); off + lq.numel()];
    let mut lse = vec![poison; if case.lse { lq.batch() * lq.heads() * lq.seqlen() } else { 0 }];
    let ([a, b, c], slow) = match place {
        Place::Host => {
            let seqlens = cu.map(|(a, b)| (SeqLens::host(a), SeqLens::host(b)));
            let (tq, tk, tv) = (Tensor::host(&q[off..], lq), Tensor::host(&k[off..], lk), Tensor::host(&v[off..], lk));
            let lse_mut = case.lse.then(|| LseMut::host(&mut lse));
            let ran = call(attn, case, [tq, tk, tv], TensorMut::host(&mut out[off..], lq), lse_mut, seqlens)?;
            return Ok((ran, out, lse));
        }
        Place::Device(s) => ([s, s, s], None),
        Place::Streams(st) => ([&st.inputs, &st.call, &st.read], Some(&st.slow)),
    };
    // Inputs over stale zeros on `a`, results poisoned on `b` (the call's stream), read on `c`.
    let zeros = |x: &[T]| a.alloc_zeros::<T>(x.len()).unwrap();
    let (mut dq, mut dk, mut dv) = (zeros(&q), zeros(&k), zeros(&v));
    let (mut dout, mut dlse) = (b.clone_htod(&out).unwrap(), case.lse.then(|| b.clone_htod(&lse).unwrap()));
    if let Some([before_inputs, _]) = slow {
        b.synchronize().unwrap();
        before_inputs();
    }
    for (x, dx) in [(&q, &mut dq), (&k, &mut dk), (&v, &mut dv)] {
        a.memcpy_htod(x, dx).unwrap();
    }
    let dcu = cu.map(|(x, y)| (a.clone_htod(x).unwrap(), a.clone_htod(y).unwrap()));
    if let Some([_, before_call]) = slow {
        before_call();
    }
    let ran = {
        let (vq, vk, vv) = (dq.slice(off..), dk.slice(off..), dv.slice(off..));
        let mut vo = dout.slice_mut(off..);
        let seqlens = dcu.as_ref().map(|(a, b)| (SeqLens::cuda(a), SeqLens::cuda(b)));
        let (tq, tk, tv) = (Tensor::cuda(&vq, lq), Tensor::cuda(&vk, lk), Tensor::cuda(&vv, lk));
        call(attn, case, [tq, tk, tv], TensorMut::cuda(&mut vo, lq), dlse.as_mut().map(LseMut::cuda), seqlens)?
    };
    let lse = dlse.map_or_else(Vec::new, |l| c.clone_dtoh(&l).unwrap());
    Ok((ran, c.clone_dtoh(&dout).unwrap(), lse))
}

/// The one API call of the runner: `forward_with_lse`, or `forward_varlen_with_lse` for a
/// packed case; `forward` and `forward_varlen` when the case asks for no lse.
fn call<T: Element>(
    attn: &Attention,
    case: &Case,
    [q, k, v]: [Tensor<T>; 3],
    mut out: TensorMut<T>,
    lse: Option<LseMut>,
    seqlens: Option<(SeqLens, SeqLens)>,
) -> Result<BackendKind, Error> {
    let opts = options(&case.mask);
    let varlen = match (&case.seqs, seqlens) {
        (Seqs::Packed { q: ql, k: kl }, Some((cq, ck))) => {
            let max = |l: &[usize]| l.iter().copied().max().unwrap_or(1).max(1);
            Some(VarLen::new(cq, ck, max(ql), max(kl)))
        }
        _ => None,
    };
    match (varlen, lse) {
        (Some(varlen), Some(mut lse)) => attn.forward_varlen_with_lse(&q, &k, &v, &mut out, &mut lse, &varlen, &opts),
        (Some(varlen), None) => attn.forward_varlen(&q, &k, &v, &mut out, &varlen, &opts),
        (None, Some(mut lse)) => attn.forward_with_lse(&q, &k, &v, &mut out, &mut lse, &opts),
        (None, None) => attn.forward(&q, &k, &v, &mut out, &opts),
    }
}

/// Up to `n` cases of `cases` costing at most `budget` (see [`Case::cost`]), spread evenly over
/// the list (so they differ in dtype, mask and layout): the sample a suite runs on the CPU.
pub fn spread(cases: Vec<Case>, n: usize, budget: usize) -> Vec<Case> {
    let cheap: Vec<Case> = cases.into_iter().filter(|c| c.cost() <= budget).collect();
    let step = cheap.len().div_ceil(n.max(1)).max(1);
    cheap.into_iter().step_by(step).collect()
}

/// Without a GPU: each named case list of a suite has its pinned count (so a case cannot drop
/// out unnoticed), and up to `n` cheap cases of each (at most `budget`, see [`spread`]) run
/// through the same runner on the CPU backend in host memory, so a bug in the runner or in a
/// list shows in `cargo test`, not first on the device.
pub fn check_lists_on_the_cpu(lists: Vec<(&str, Vec<Case>, usize)>, n: usize, budget: usize) {
    let mut sample = Vec::new();
    for (name, cases, count) in lists {
        assert_eq!(cases.len(), count, "{name}: cases generated");
        sample.extend(spread(cases, n, budget));
    }
    // Enough that every kind of case (dtype, layout, mask, packed, offset) shows up.
    assert!(sample.len() >= 25, "only {} cheap cases to sample", sample.len());
    let cpu = attention::Selector::from_settings(attention::Settings::default()).backend(BackendKind::Cpu).select().unwrap();
    check_all(&cpu, &Place::Host, "cpu", sample.into_iter().map(|c| c.expect(BackendKind::Cpu)));
}

/// A suite's run: fresh inputs from one generator (its seed printed first and with the
/// failures), cases run, worst errors per dtype, and every failure with its case.
pub struct Tally {
    label: String,
    rng: Rng,
    count: usize,
    /// Per dtype (`DType as usize`): worst rel error and its case, worst lse error.
    worst: [Option<(f64, String, f64)>; 3],
    failures: Vec<String>,
    start: std::time::Instant,
}

impl Tally {
    pub fn new(label: &str) -> Tally {
        let rng = Rng::fresh();
        eprintln!("[{label}] seed {:#x}", rng.get_seed());
        Tally { label: label.into(), rng, count: 0, worst: [None, None, None], failures: Vec::new(), start: std::time::Instant::now() }
    }

    /// Runs one case through `attn` in `place`'s memory and records it against its verdict.
    pub fn run(&mut self, attn: &Attention, place: &Place, case: &Case) {
        self.count += 1;
        match run(attn, place, &mut self.rng, case) {
            Ok(o) => {
                let w = self.worst[case.dtype as usize].get_or_insert((0.0, String::new(), 0.0));
                if o.rel >= w.0 {
                    (w.0, w.1) = (o.rel, case.to_string());
                }
                w.2 = w.2.max(o.lse_err);
                if let Err(why) = o.verdict(case) {
                    self.failures.push(format!("{case}: {why}"));
                }
            }
            Err(e) => self.failures.push(format!("{case}: {e}")),
        }
    }

    /// Prints the summary and fails listing every failed case; returns the number of cases.
    pub fn finish(self) -> usize {
        let label = &self.label;
        for (dtype, w) in [DType::F16, DType::BF16, DType::F32].iter().zip(&self.worst) {
            if let Some((rel, case, lse)) = w {
                eprintln!("[{label}] {dtype}: worst rel error {rel:.2e} ({case}), worst lse error {lse:.2e}");
            }
        }
        let secs = self.start.elapsed().as_secs_f64();
        eprintln!("[{label}] {} cases, {} failures in {secs:.1} s", self.count, self.failures.len());
        let seed = self.rng.get_seed();
        assert!(self.failures.is_empty(), "[{label}] failures (seed {seed:#x}):\n{}", self.failures.join("\n"));
        self.count
    }
}

/// Runs every case through `attn` on fresh inputs, then fails listing every failed one;
/// returns the number of cases.
pub fn check_all(attn: &Attention, place: &Place, label: &str, cases: impl IntoIterator<Item = Case>) -> usize {
    let mut tally = Tally::new(label);
    for case in cases {
        tally.run(attn, place, &case);
    }
    tally.finish()
}
