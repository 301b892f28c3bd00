//! The GPU test harness shared by tests/gpu.rs and tests/gpu_mem_efficient.rs: run one case on
//! the device (outputs poisoned with NaN first) and compare it with the f64 reference.

use std::sync::Arc;

use attention::cudarc::driver::{CudaSlice, CudaStream};
use attention::{BackendKind, DType, Element, Error, Layout, LseMut, Options, SeqLens, Tensor, TensorMut, VarLen};

use super::reference::{attention_f64_masked, rel_err, varlen_f64, RefInput, RefMask};
use super::rng::Rng;

/// Tolerances on ‖out − ref‖/‖ref‖ against the f64 reference, per dtype.
/// The handle the GPU suites test (from the environment, so `ATTN_EMULATE_ARCH` and friends
/// apply) and its device's default stream. Panics without a device: a GPU test never passes by
/// skipping.
pub fn gpu() -> (attention::Attention, Arc<CudaStream>) {
    let attn = attention::Selector::from_env().unwrap().select().unwrap();
    let caps = attn.device_caps().unwrap_or_else(|| panic!("no CUDA device: {}", attn.no_device_reason().unwrap_or("?")));
    let ctx = attention::cudarc::driver::CudaContext::new(caps.ordinal).unwrap();
    (attn, ctx.default_stream())
}

pub fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}
#[derive(Clone, Copy, Debug)]
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

/// What one run produced, compared with the reference.
#[derive(Debug)]
pub struct Outcome {
    pub rel: f64,
    pub lse_err: f64,
    pub nan: usize,
    pub ran: BackendKind,
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

/// Fresh random values in [-1, 1).
pub fn random<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    let mut v = vec![T::from_f32(0.0); n];
    rng.fill(&mut v, T::from_f32);
    v
}

/// Runs one case (outputs poisoned with NaN first) and compares with the f64 reference.
/// `offset` shifts every tensor's base by that many elements (misaligning it).
#[allow(clippy::too_many_arguments)]
pub fn run_masked<T: Element + attention::cudarc::driver::DeviceRepr>(
    attn: &attention::Attention,
    stream: &Arc<CudaStream>,
    rng: &mut Rng,
    sh: Shape,
    mask: RefMask,
    heads_first: bool,
    offset: usize,
) -> Result<Outcome, Error> {
    let lay = |s, h| {
        if heads_first {
            Layout::heads_first(sh.b, s, h, sh.d)
        } else {
            Layout::contiguous(sh.b, s, h, sh.d)
        }
    };
    let (lq, lk) = (lay(sh.sq, sh.h), lay(sh.sk, sh.hk));
    let (q, k, v) = (random::<T>(rng, lq.numel()), random::<T>(rng, lk.numel()), random::<T>(rng, lk.numel()));
    let padded = |x: &[T]| {
        let mut p = vec![T::from_f32(0.0); offset];
        p.extend_from_slice(x);
        stream.clone_htod(&p).unwrap()
    };
    let (dq, dk, dv) = (padded(&q), padded(&k), padded(&v));
    let mut dout: CudaSlice<T> = stream.clone_htod(&vec![T::from_f32(f32::NAN); q.len() + offset]).unwrap();
    let mut dlse: CudaSlice<f32> = stream.clone_htod(&vec![f32::NAN; sh.b * sh.h * sh.sq]).unwrap();
    let mut opts = Options::default().causal(mask.causal).window(mask.left, mask.right);
    if let Some(c) = mask.softcap {
        opts = opts.softcap(c as f32);
    }
    let ran = {
        let (vq, vk, vv) = (dq.slice(offset..), dk.slice(offset..), dv.slice(offset..));
        let mut vo = dout.slice_mut(offset..);
        let r = attn.forward_with_lse(
            &Tensor::cuda(&vq, lq),
            &Tensor::cuda(&vk, lk),
            &Tensor::cuda(&vv, lk),
            &mut TensorMut::cuda(&mut vo, lq),
            &mut LseMut::cuda(&mut dlse),
            &opts,
        );
        r?
    };
    let out = stream.clone_dtoh(&dout).unwrap();
    let lse = stream.clone_dtoh(&dlse).unwrap();
    let to64 = |x: T| x.to_f32() as f64;
    let (ref_out, ref_lse) = attention_f64_masked(
        RefInput { data: &q, shape: lq.shape(), strides: lq.strides() },
        RefInput { data: &k, shape: lk.shape(), strides: lk.strides() },
        RefInput { data: &v, shape: lk.shape(), strides: lk.strides() },
        to64,
        1.0 / (sh.d as f64).sqrt(),
        mask,
    );
    // Gather our (possibly heads-first) output into the reference's contiguous order.
    let mut got = Vec::with_capacity(ref_out.len());
    for b in 0..sh.b {
        for i in 0..sh.sq {
            for h in 0..sh.h {
                let o = offset + lq.offset(b, i, h);
                got.extend(out[o..o + sh.d].iter().map(|&x| to64(x)));
            }
        }
    }
    let nan = got.iter().filter(|x| !x.is_finite()).count();
    let lse_err = lse_error(lse.iter().map(|&x| x as f64), ref_lse.iter().copied());
    Ok(Outcome { rel: rel_err(&got, &ref_out), lse_err, nan, ran })
}

/// One packed variable-length batch against the per-sequence f64 reference.
#[allow(clippy::too_many_arguments)]
pub fn run_varlen<T: Element + attention::cudarc::driver::DeviceRepr>(
    attn: &attention::Attention,
    stream: &Arc<CudaStream>,
    rng: &mut Rng,
    q_lens: &[usize],
    k_lens: &[usize],
    (h, hk, d): (usize, usize, usize),
    mask: RefMask,
    heads_first: bool,
) -> Result<Outcome, Error> {
    let prefix = |lens: &[usize]| -> Vec<i32> {
        std::iter::once(0)
            .chain(lens.iter().scan(0, |s, &l| {
                *s += l;
                Some(*s as i32)
            }))
            .collect()
    };
    let (cu_q, cu_k) = (prefix(q_lens), prefix(k_lens));
    let (total_q, total_k) = (*cu_q.last().unwrap() as usize, *cu_k.last().unwrap() as usize);
    let lay = |s, h| if heads_first { Layout::heads_first(1, s, h, d) } else { Layout::contiguous(1, s, h, d) };
    let (lq, lk) = (lay(total_q.max(1), h), lay(total_k.max(1), hk));
    let (q, k, v) = (random::<T>(rng, lq.numel()), random::<T>(rng, lk.numel()), random::<T>(rng, lk.numel()));
    let (dq, dk, dv) = (stream.clone_htod(&q).unwrap(), stream.clone_htod(&k).unwrap(), stream.clone_htod(&v).unwrap());
    let (dcq, dck) = (stream.clone_htod(&cu_q).unwrap(), stream.clone_htod(&cu_k).unwrap());
    let mut dout: CudaSlice<T> = stream.clone_htod(&vec![T::from_f32(f32::NAN); q.len()]).unwrap();
    let mut dlse: CudaSlice<f32> = stream.clone_htod(&vec![f32::NAN; h * lq.seqlen()]).unwrap();
    let mut opts = Options::default().causal(mask.causal).window(mask.left, mask.right);
    if let Some(c) = mask.softcap {
        opts = opts.softcap(c as f32);
    }
    let max = |l: &[usize]| l.iter().copied().max().unwrap_or(1).max(1);
    let varlen = VarLen::new(SeqLens::cuda(&dcq), SeqLens::cuda(&dck), max(q_lens), max(k_lens));
    let ran = attn.forward_varlen_with_lse(
        &Tensor::cuda(&dq, lq),
        &Tensor::cuda(&dk, lk),
        &Tensor::cuda(&dv, lk),
        &mut TensorMut::cuda(&mut dout, lq),
        &mut LseMut::cuda(&mut dlse),
        &varlen,
        &opts,
    )?;
    let out = stream.clone_dtoh(&dout).unwrap();
    let lse = stream.clone_dtoh(&dlse).unwrap();
    let to64 = |x: T| x.to_f32() as f64;
    let input = |data, l: Layout| RefInput { data, shape: l.shape(), strides: l.strides() };
    let (ref_out, ref_lse) = varlen_f64(
        input(&q[..], lq),
        input(&k[..], lk),
        input(&v[..], lk),
        &cu_q,
        &cu_k,
        to64,
        1.0 / (d as f64).sqrt(),
        mask,
    );
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for i in 0..total_q {
        for hi in 0..h {
            let o = lq.offset(0, i, hi);
            got.extend(out[o..o + d].iter().map(|&x| to64(x)));
            want.extend(ref_out[(i * h + hi) * d..][..d].iter().map(|x| x.unwrap()));
        }
    }
    let nan = got.iter().filter(|x| !x.is_finite()).count();
    let (mut gl, mut wl) = (Vec::new(), Vec::new());
    for hi in 0..h {
        for i in 0..total_q {
            gl.push(lse[hi * lq.seqlen() + i] as f64);
            wl.push(ref_lse[hi * total_q + i].unwrap());
        }
    }
    let rel = if want.is_empty() { 0.0 } else { rel_err(&got, &want) };
    Ok(Outcome { rel, lse_err: lse_error(gl.into_iter(), wl.into_iter()), nan, ran })
}

