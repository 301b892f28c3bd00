//! GPU tests of the hardening fixes: stream ordering across cudarc streams, many threads on one
//! handle, NaN propagation in every GPU backend, and a batch·heads past 2^31 on the naive
//! backend. They need a CUDA device, so they are ignored unless the `gpu-tests` feature is on;
//! with it on and no device they fail (never pass by skipping).
//!
//! Every case but the 2^31 one goes through the shared case runner of tests/common/gpu.rs
//! (random inputs, poisoned outputs, the f64 reference, [`common::gpu::Tol::of`]).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use attention::cudarc::driver::{CudaSlice, CudaStream};
use attention::{Attention, BackendKind, DType, Layout, Options, Selector, Tensor, TensorMut};
use common::gpu::{gpu, random, run, s as shape, Case, Input, Place, Queue, Shape, Streams};
use common::reference::RefMask;
use common::rng::Rng;
use half::{bf16, f16};

/// The GPU backends the NaN and zero-stride tests force one after the other.
const GPU_BACKENDS: [BackendKind; 3] = [BackendKind::Flash, BackendKind::MemEfficient, BackendKind::Naive];

/// A handle that must run every call on `kind`.
fn forced(kind: BackendKind) -> Attention {
    Selector::from_env().unwrap().backend(kind).select().unwrap()
}

fn causal_mask(causal: bool) -> RefMask {
    RefMask { causal, ..RefMask::default() }
}

/// Runs `case` (inputs from `rng`) and fails with `what` and the case unless the runner's
/// verdict (backend, NaN, [`common::gpu::Tol::of`]) passes; returns its rel. error and the
/// count of output elements and lse entries whose reference is NaN.
fn checked(attn: &Attention, place: &Place, rng: &mut Rng, case: &Case, what: &str) -> (f64, usize) {
    let o = run(attn, place, rng, case).unwrap_or_else(|e| panic!("{what}: {case}: {e}"));
    o.verdict(case).unwrap_or_else(|why| panic!("{what}: {case}: {why}"));
    (o.rel, o.want_nan)
}

/// Item 4 of the hardening issue: inputs written on stream A behind slow work, attention on
/// stream B (the output's), the output read on stream C ([`Streams`] in the shared runner).
/// With cudarc's event tracking (on as soon as a context has more than one stream) the call
/// must wait for A's writes and record its write after the kernels, so C never reads early.
/// Repeated with fresh inputs each time, through `forward` (no lse).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn inputs_outputs_and_consumers_on_three_streams() {
    let (attn, default_stream) = gpu();
    let ctx = default_stream.context();
    let (a, b, c) = (ctx.new_stream().unwrap(), ctx.new_stream().unwrap(), ctx.new_stream().unwrap());
    assert!(ctx.is_managing_stream_synchronization(), "several streams: cudarc tracks events");
    let mut rng = Rng::seed(0x3517_ea45);
    // Slow work: a large attention whose output nobody reads, queued before each step's real
    // work on the producer and on the attention stream (each with its output on that stream,
    // so neither waits for the other).
    let (bl, bk) = (Layout::contiguous(4, 4096, 32, 128), Layout::contiguous(4, 4096, 32, 128));
    let busy_in: Arc<CudaSlice<bf16>> = Arc::new(a.clone_htod(&random::<bf16>(&mut rng, bl.numel())).unwrap());
    let slow = |s: &Arc<CudaStream>| -> Queue {
        let (attn, busy_in) = (attn.clone(), busy_in.clone());
        let busy_out = Mutex::new(s.alloc_zeros::<bf16>(bl.numel()).unwrap());
        Arc::new(move || {
            let (q, kv) = (Tensor::cuda(&*busy_in, bl), Tensor::cuda(&*busy_in, bk));
            let mut out = busy_out.lock().unwrap();
            attn.forward(&q, &kv, &kv, &mut TensorMut::cuda(&mut *out, bl), &Options::default()).unwrap();
        })
    };
    let place = Place::Streams(Streams { inputs: a.clone(), call: b.clone(), read: c, slow: [slow(&a), slow(&b)] });
    let mut worst = 0.0f64;
    for step in 0..12 {
        let case = Case::dense(DType::BF16, shape(1, 256, 512, 8, 2, 64), causal_mask(step % 2 == 1), false).without_lse();
        let what = format!("step {step} (read too early, or inputs read before written?)");
        worst = worst.max(checked(&attn, &place, &mut rng, &case, &what).0);
    }
    println!("three streams: 12 steps, worst rel. error {worst:.3e}");
}

/// The case of call `i` of a worker thread: a random shape (its sizes drawn from `rng`),
/// causal every other call, through `forward` (no lse).
fn thread_case(rng: &mut Rng, t: usize, i: usize) -> Case {
    let sq = 1 + rng.below(200) as usize;
    let sk = 1 + rng.below(300) as usize;
    let (h, hk, d) = [(8, 8, 64), (8, 2, 128), (4, 1, 64)][(t + i) % 3];
    Case::dense(DType::BF16, shape(1, sq, sk, h, hk, d), causal_mask(i % 2 == 0), false).without_lse()
}

/// Many threads on one handle, each with its own stream and fresh shapes: every result right,
/// and the aggregate throughput compared with one thread (printed: no global lock serialises
/// the hot path).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn many_threads_many_streams_one_handle() {
    let (attn, stream) = gpu();
    let ctx = stream.context().clone();
    let threads = 16;
    let calls = 40;
    let throughput = |n_threads: usize| -> f64 {
        let start = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..n_threads {
                let (attn, ctx) = (attn.clone(), ctx.clone());
                scope.spawn(move || {
                    let place = Place::Device(ctx.new_stream().unwrap());
                    let mut rng = Rng::seed(0x7a11 + t as u64);
                    for i in 0..calls {
                        let case = thread_case(&mut rng, t, i);
                        checked(&attn, &place, &mut rng, &case, &format!("thread {t} call {i}"));
                    }
                });
            }
        });
        (n_threads * calls) as f64 / start.elapsed().as_secs_f64()
    };
    let one = throughput(1);
    let many = throughput(threads);
    println!("one handle: {one:.0} checked calls/s on 1 thread, {many:.0} on {threads} threads ({:.1}x)", many / one);
}

/// The NaN case: every head of query row [`NAN_Q_ROW`] and element 0 of head 0 of key row
/// [`NAN_K_ROW`] are NaN, causal, `sq = sk`.
const NAN_SHAPE: Shape = shape(1, 70, 70, 4, 4, 64);
const NAN_Q_ROW: usize = 5;
const NAN_K_ROW: usize = 40;

fn nan_case() -> Case {
    Case::dense(DType::F16, NAN_SHAPE, causal_mask(true), false).nan(Input::Q, NAN_Q_ROW, None, None).nan(Input::K, NAN_K_ROW, Some(0), Some(0))
}

/// The output elements and lse entries that must be NaN: all of query row 5 (every head), and
/// the causal rows ≥ 40 of head 0 (the only ones that see the NaN key).
fn nan_entries() -> usize {
    let Shape { sq, h, d, .. } = NAN_SHAPE;
    let rows = (0..sq).flat_map(|i| (0..h).map(move |hh| (i, hh))).filter(|&(i, hh)| i == NAN_Q_ROW || (hh == 0 && i >= NAN_K_ROW)).count();
    rows * (d + 1)
}

/// NaN in a q row gives NaN in that row (and its lse) on every GPU backend, and leaves the
/// other rows right; a NaN key row reaches only the rows that see it (causal). The runner
/// wants NaN exactly where the f64 reference has it (outputs poisoned with a finite value, so
/// an unwritten row fails), and compares the other rows and lse with the reference; the count
/// pins the reference's NaN rows to the ones named above.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn nan_inputs_give_nan_rows_on_every_gpu_backend() {
    let (_, stream) = gpu();
    let place = Place::Device(stream);
    for kind in GPU_BACKENDS {
        let (_, want_nan) = checked(&forced(kind), &place, &mut Rng::seed(0x4a4a), &nan_case().expect(kind), &kind.to_string());
        assert_eq!(want_nan, nan_entries(), "{kind}: NaN entries of the reference");
        println!("{kind}: NaN rows exactly where the inputs are NaN");
    }
}

/// Item 2: batch·heads above 2^31 − 1 (65536 × 32769, one query and one key each, MQA so K/V
/// are small). flash and mem_efficient reject it on their grids, so naive runs it; with one key
/// every output row equals that batch's value row exactly. Needs 9 GB of device memory.
///
/// Not on the shared runner: its f64 reference and host-side copies of 2^31 rows would need
/// some 100 GB of host memory and minutes, and the check here (every element bit-equal to v)
/// is exact, tighter than any tolerance of [`common::gpu::Tol::of`].
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn naive_indexes_batch_times_heads_past_2_pow_31() {
    let (attn, stream) = gpu();
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
/// shared prefix, say), on every GPU backend that takes the problem, against the reference
/// (which reads the same zero stride), through `forward` (no lse).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn zero_stride_broadcast_kv_on_the_gpu() {
    let (_, stream) = gpu();
    let place = Place::Device(stream);
    for kind in GPU_BACKENDS {
        let case = broadcast_case(shape(3, 130, 200, 8, 2, 128)).expect(kind);
        let (rel, _) = checked(&forced(kind), &place, &mut Rng::seed(0xb0ad), &case, &kind.to_string());
        println!("{kind}: broadcast K/V, rel. error {rel:.2e}");
    }
}

/// K/V of one sequence read by every batch entry, causal.
fn broadcast_case(sh: Shape) -> Case {
    Case::dense(DType::BF16, sh, causal_mask(true), false).broadcast_kv().without_lse()
}

/// Without a GPU: the cases of this suite (NaN inputs, broadcast K/V, `forward` without lse)
/// through the same runner on the CPU backend, so a bug in the runner's options shows in
/// `cargo test`, not first on the device.
#[test]
fn the_suites_cases_run_on_the_cpu_backend() {
    let cpu = attention::Selector::from_settings(attention::Settings::default()).backend(BackendKind::Cpu).select().unwrap();
    let (place, rng) = (Place::Host, &mut Rng::fresh());
    eprintln!("seed {:#x}", rng.get_seed());
    let (_, want_nan) = checked(&cpu, &place, rng, &nan_case().expect(BackendKind::Cpu), "cpu");
    assert_eq!(want_nan, nan_entries());
    for sh in [shape(3, 13, 20, 2, 1, 64), shape(2, 20, 7, 4, 2, 40)] {
        checked(&cpu, &place, rng, &broadcast_case(sh).expect(BackendKind::Cpu), "cpu");
    }
}
