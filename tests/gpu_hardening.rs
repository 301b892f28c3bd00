//! GPU tests of the hardening fixes: stream ordering across cudarc streams, many threads on one
//! handle, NaN propagation in every GPU backend, and a batch·heads past 2^31 on the naive
//! backend. They need a CUDA device, so they are ignored unless the `gpu-tests` feature is on;
//! with it on and no device they fail (never pass by skipping).

mod common;

use std::sync::Arc;
use std::time::Instant;

use attention::cudarc::driver::{CudaContext, CudaSlice};
use attention::{Attention, BackendKind, Layout, LseMut, Options, Selector, Tensor, TensorMut};
use common::gpu::{random, tolerance};
use common::reference::{attention_f64, rel_err, RefInput};
use common::rng::Rng;
use half::{bf16, f16};

fn handle(backend: Option<BackendKind>) -> (Attention, Arc<CudaContext>) {
    let mut sel = Selector::from_env().unwrap();
    if let Some(b) = backend {
        sel = sel.backend(b);
    }
    let attn = sel.select().unwrap();
    let caps = attn
        .device_caps()
        .unwrap_or_else(|| panic!("no CUDA device: {}", attn.no_device_reason().unwrap_or("?")));
    let ctx = CudaContext::new(caps.ordinal).unwrap();
    (attn, ctx)
}

/// The f64 reference of a contiguous problem, as f64 values in `[b, sq, h, d]` order.
fn reference(q: &[bf16], k: &[bf16], v: &[bf16], lq: Layout, lk: Layout, causal: bool) -> Vec<f64> {
    let inp = |data, l: Layout| RefInput { data, shape: l.shape(), strides: l.strides() };
    let d = lq.head_dim();
    attention_f64(inp(q, lq), inp(k, lk), inp(v, lk), |x: bf16| x.to_f64(), 1.0 / (d as f64).sqrt(), causal).0
}

/// Item 4 of the hardening issue: inputs written on stream A behind slow work, attention on
/// stream B (the output's), the output read on stream C. With cudarc's event tracking (on as
/// soon as a context has more than one stream) the call must wait for A's writes and record
/// its write after the kernels, so C never reads early. Repeated with fresh inputs each time.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn inputs_outputs_and_consumers_on_three_streams() {
    let (attn, ctx) = handle(None);
    let (a, b, c) = (ctx.new_stream().unwrap(), ctx.new_stream().unwrap(), ctx.new_stream().unwrap());
    assert!(ctx.is_managing_stream_synchronization(), "several streams: cudarc tracks events");
    let mut rng = Rng::seed(0x3517_ea45);
    let (lq, lk) = (Layout::contiguous(1, 256, 8, 64), Layout::contiguous(1, 512, 2, 64));
    // Slow work: a large attention whose output nobody reads, queued before each step's real
    // work on the producer and on the attention stream.
    let (bl, bk) = (Layout::contiguous(4, 4096, 32, 128), Layout::contiguous(4, 4096, 32, 128));
    let busy_in: CudaSlice<bf16> = a.clone_htod(&random::<bf16>(&mut rng, bl.numel())).unwrap();
    let mut busy_a: CudaSlice<bf16> = a.alloc_zeros(bl.numel()).unwrap();
    let mut busy_b: CudaSlice<bf16> = b.alloc_zeros(bl.numel()).unwrap();
    let mut worst = 0.0f64;
    for step in 0..12 {
        let (q, k, v) = (random::<bf16>(&mut rng, lq.numel()), random::<bf16>(&mut rng, lk.numel()), random::<bf16>(&mut rng, lk.numel()));
        // Stale contents first, so reading before the producer's writes gives a wrong answer.
        let mut dq: CudaSlice<bf16> = a.alloc_zeros(lq.numel()).unwrap();
        let mut dk: CudaSlice<bf16> = a.alloc_zeros(lk.numel()).unwrap();
        let mut dv: CudaSlice<bf16> = a.alloc_zeros(lk.numel()).unwrap();
        let mut out: CudaSlice<bf16> = b.clone_htod(&vec![bf16::NAN; lq.numel()]).unwrap();
        b.synchronize().unwrap();
        // Producer: slow attention on A, then the real inputs, still on A.
        let t = Tensor::cuda(&busy_in, bl);
        attn.forward(&t, &Tensor::cuda(&busy_in, bk), &Tensor::cuda(&busy_in, bk), &mut TensorMut::cuda(&mut busy_a, bl), &Options::default()).unwrap();
        a.memcpy_htod(&q, &mut dq).unwrap();
        a.memcpy_htod(&k, &mut dk).unwrap();
        a.memcpy_htod(&v, &mut dv).unwrap();
        // Attention stream: slow work first (so a write event recorded before the launch would
        // let C read too early), then the checked call.
        attn.forward(&t, &Tensor::cuda(&busy_in, bk), &Tensor::cuda(&busy_in, bk), &mut TensorMut::cuda(&mut busy_b, bl), &Options::default()).unwrap();
        attn.forward(&Tensor::cuda(&dq, lq), &Tensor::cuda(&dk, lk), &Tensor::cuda(&dv, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default().causal(step % 2 == 1))
            .unwrap();
        // Consumer on C: cudarc makes C wait for out's write event.
        let got: Vec<f64> = c.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f64()).collect();
        let want = reference(&q, &k, &v, lq, lk, step % 2 == 1);
        let err = rel_err(&got, &want);
        worst = worst.max(err);
        assert!(err < tolerance(attention::DType::BF16), "step {step}: rel. error {err:.3e} (read too early, or inputs read before written?)");
    }
    println!("three streams: 12 steps, worst rel. error {worst:.3e}");
}

/// Many threads on one handle, each with its own stream and fresh shapes: every result right,
/// and the aggregate throughput compared with one thread (printed: no global lock serialises
/// the hot path).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn many_threads_many_streams_one_handle() {
    let (attn, ctx) = handle(None);
    let threads = 16;
    let calls = 40;
    let run = |n_threads: usize| -> f64 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..n_threads {
                let (attn, ctx) = (attn.clone(), ctx.clone());
                s.spawn(move || {
                    let stream = ctx.new_stream().unwrap();
                    let mut rng = Rng::seed(0x7a11 + t as u64);
                    for i in 0..calls {
                        let sq = 1 + rng.below(200) as usize;
                        let sk = 1 + rng.below(300) as usize;
                        let (h, hk, d) = [(8, 8, 64), (8, 2, 128), (4, 1, 64)][(t + i) % 3];
                        let (lq, lk) = (Layout::contiguous(1, sq, h, d), Layout::contiguous(1, sk, hk, d));
                        let (q, k, v) = (random::<bf16>(&mut rng, lq.numel()), random::<bf16>(&mut rng, lk.numel()), random::<bf16>(&mut rng, lk.numel()));
                        let (dq, dk, dv) = (stream.clone_htod(&q).unwrap(), stream.clone_htod(&k).unwrap(), stream.clone_htod(&v).unwrap());
                        let mut out: CudaSlice<bf16> = stream.clone_htod(&vec![bf16::NAN; lq.numel()]).unwrap();
                        let causal = i % 2 == 0;
                        attn.forward(&Tensor::cuda(&dq, lq), &Tensor::cuda(&dk, lk), &Tensor::cuda(&dv, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default().causal(causal))
                            .unwrap();
                        let got: Vec<f64> = stream.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f64()).collect();
                        let err = rel_err(&got, &reference(&q, &k, &v, lq, lk, causal));
                        assert!(err < tolerance(attention::DType::BF16), "thread {t} call {i} ({sq}x{sk}, {h}/{hk}, d{d}): rel. error {err:.3e}");
                    }
                });
            }
        });
        (n_threads * calls) as f64 / start.elapsed().as_secs_f64()
    };
    let one = run(1);
    let many = run(threads);
    println!("one handle: {one:.0} checked calls/s on 1 thread, {many:.0} on {threads} threads ({:.1}x)", many / one);
}

/// NaN in a q row gives NaN in that row (and its lse) on every GPU backend, and leaves the
/// other rows right; a NaN key row reaches only the rows that see it (causal).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn nan_inputs_give_nan_rows_on_every_gpu_backend() {
    for kind in [BackendKind::Flash, BackendKind::MemEfficient, BackendKind::Naive] {
        let (attn, ctx) = handle(Some(kind));
        let stream = ctx.default_stream();
        let mut rng = Rng::seed(0x4a4a);
        let (sq, h, d) = (70, 4, 64);
        let l = Layout::contiguous(1, sq, h, d);
        let mut q = random::<f16>(&mut rng, l.numel());
        let mut k = random::<f16>(&mut rng, l.numel());
        let v = random::<f16>(&mut rng, l.numel());
        let nan_q_row = 5; // every head of query row 5
        for x in &mut q[nan_q_row * h * d..(nan_q_row + 1) * h * d] {
            *x = f16::NAN;
        }
        let nan_k_row = 40; // head 0 only: causal rows >= 40 of heads 0 see it
        k[nan_k_row * h * d] = f16::NAN;
        let (dq, dk, dv) = (stream.clone_htod(&q).unwrap(), stream.clone_htod(&k).unwrap(), stream.clone_htod(&v).unwrap());
        let mut out: CudaSlice<f16> = stream.clone_htod(&vec![f16::from_f32(7.0); l.numel()]).unwrap();
        let mut lse: CudaSlice<f32> = stream.clone_htod(&vec![7.0f32; h * sq]).unwrap();
        let ran = attn
            .forward_with_lse(&Tensor::cuda(&dq, l), &Tensor::cuda(&dk, l), &Tensor::cuda(&dv, l), &mut TensorMut::cuda(&mut out, l), &mut LseMut::cuda(&mut lse), &Options::default().causal(true))
            .unwrap();
        assert_eq!(ran, kind);
        let out = stream.clone_dtoh(&out).unwrap();
        let lse = stream.clone_dtoh(&lse).unwrap();
        for i in 0..sq {
            for hh in 0..h {
                let row = &out[(i * h + hh) * d..(i * h + hh + 1) * d];
                let expect_nan = i == nan_q_row || (hh == 0 && i >= nan_k_row);
                let l = lse[hh * sq + i];
                if expect_nan {
                    assert!(row.iter().all(|x| x.is_nan()), "{kind}: row {i} head {hh} should be NaN");
                    assert!(l.is_nan(), "{kind}: lse of row {i} head {hh} should be NaN, got {l}");
                } else {
                    assert!(row.iter().all(|x| x.is_finite()), "{kind}: row {i} head {hh} should be finite");
                    assert!(l.is_finite(), "{kind}: lse of row {i} head {hh} = {l}");
                }
            }
        }
        println!("{kind}: NaN rows exactly where the inputs are NaN");
    }
}

/// Item 2: batch·heads above 2^31 − 1 (65536 × 32769, one query and one key each, MQA so K/V
/// are small). flash and mem_efficient reject it on their grids, so naive runs it; with one key
/// every output row equals that batch's value row exactly. Needs 9 GB of device memory.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn naive_indexes_batch_times_heads_past_2_pow_31() {
    let (attn, ctx) = handle(None);
    let stream = ctx.default_stream();
    let (b, h, d) = (65536usize, 32769usize, 1usize);
    assert!(b * h > i32::MAX as usize);
    let (lq, lk) = (Layout::contiguous(b, 1, h, d), Layout::contiguous(b, 1, 1, d));
    let mut rng = Rng::seed(31);
    let v = random::<f16>(&mut rng, lk.numel());
    let k = random::<f16>(&mut rng, lk.numel());
    let q: CudaSlice<f16> = stream.alloc_zeros(lq.numel()).unwrap();
    let (dk, dv) = (stream.clone_htod(&k).unwrap(), stream.clone_htod(&v).unwrap());
    let mut out: CudaSlice<f16> = stream.alloc_zeros(lq.numel()).unwrap();
    // Poison with NaN, so an unwritten row fails the comparison.
    let nan = vec![f16::NAN; lq.numel()];
    stream.memcpy_htod(&nan, &mut out).unwrap();
    drop(nan);
    let ran = attn
        .forward(&Tensor::cuda(&q, lq), &Tensor::cuda(&dk, lk), &Tensor::cuda(&dv, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default())
        .unwrap();
    assert_eq!(ran, BackendKind::Naive);
    let got = stream.clone_dtoh(&out).unwrap();
    let mut bad = 0usize;
    for (bi, chunk) in got.chunks(h).enumerate() {
        bad += chunk.iter().filter(|x| x.to_bits() != v[bi].to_bits()).count();
    }
    assert_eq!(bad, 0, "{bad} of {} output rows differ from v", got.len());
    println!("naive: {} (batch, head) pairs, every row exact", b * h);
}

/// Read-only inputs may alias: K/V broadcast over the batch with a zero batch stride (one
/// shared prefix, say), on every GPU backend that takes the problem, against the reference on
/// materialised copies.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn zero_stride_broadcast_kv_on_the_gpu() {
    for kind in [BackendKind::Flash, BackendKind::MemEfficient, BackendKind::Naive] {
        let (attn, ctx) = handle(Some(kind));
        let stream = ctx.default_stream();
        let mut rng = Rng::seed(0xb0ad);
        let (b, sq, sk, h, hk, d) = (3, 130, 200, 8, 2, 128);
        let lq = Layout::contiguous(b, sq, h, d);
        let one = Layout::contiguous(1, sk, hk, d);
        let lk = Layout::strided([b, sk, hk, d], [0, hk * d, d]);
        let q = random::<bf16>(&mut rng, lq.numel());
        let (k, v) = (random::<bf16>(&mut rng, one.numel()), random::<bf16>(&mut rng, one.numel()));
        let (dq, dk, dv) = (stream.clone_htod(&q).unwrap(), stream.clone_htod(&k).unwrap(), stream.clone_htod(&v).unwrap());
        let mut out: CudaSlice<bf16> = stream.clone_htod(&vec![bf16::NAN; lq.numel()]).unwrap();
        let ran = attn
            .forward(&Tensor::cuda(&dq, lq), &Tensor::cuda(&dk, lk), &Tensor::cuda(&dv, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default().causal(true))
            .unwrap();
        assert_eq!(ran, kind);
        let got: Vec<f64> = stream.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f64()).collect();
        let rep = |x: &[bf16]| x.iter().copied().cycle().take(x.len() * b).collect::<Vec<_>>();
        let want = reference(&q, &rep(&k), &rep(&v), lq, Layout::contiguous(b, sk, hk, d), true);
        let err = rel_err(&got, &want);
        assert!(err < tolerance(attention::DType::BF16), "{kind}: rel. error {err:.3e}");
        println!("{kind}: broadcast K/V, rel. error {err:.2e}");
    }
}
