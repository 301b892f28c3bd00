//! Throughput of every available backend, per device. Benchmark ids carry the GPU's name (or
//! "cpu"), so results from different machines never mix in criterion's history:
//! `<backend>/<device>/<dtype>/d<D>/<causal|full>/seq<S>`. `ATTN_BENCH_DTYPES` (default
//! `bf16,f16`) picks the dtypes.
//!
//! Shapes follow the PyTorch anchors (`shared/anchors/h100.md`): batch·seq = 16384 and
//! heads·head_dim = 2048, layout [batch, heads, seq, d]; FLOPs = 4·b·h·s²·d, halved when causal.
//! The CPU backend runs a smaller batch (one sequence) so a run stays short.

use std::sync::Arc;
use std::time::{Duration, Instant};

use attention::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};
use attention::{BackendKind, DType, Element, Layout, Options, Problem, Selector, Tensor, TensorMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};

const SEQS: [usize; 6] = [512, 1024, 2048, 4096, 8192, 16384];

fn random<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            T::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

fn device_id(name: &str) -> String {
    name.replace(' ', "_")
}

fn bench_gpu(c: &mut Criterion, kind: BackendKind, stream: &Arc<CudaStream>) {
    // Forced, so each backend is measured on every shape it can run, not only where it ranks first.
    let attn = &Selector::from_env().unwrap().backend(kind).select().unwrap();
    let dev = device_id(&attn.device_summary());
    eprintln!("{kind}: {}", attn.kernel_image(kind).unwrap_or_default());
    let mut group = c.benchmark_group(format!("{kind}/{dev}"));
    group.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_millis(1200));
    let dtypes = std::env::var("ATTN_BENCH_DTYPES").unwrap_or_else(|_| "bf16,f16".into());
    for dtype in dtypes.split(',').map(str::trim) {
        match dtype {
            "bf16" => bench_dtype::<bf16>(&mut group, attn, kind, stream),
            "f16" => bench_dtype::<f16>(&mut group, attn, kind, stream),
            "f32" => bench_dtype::<f32>(&mut group, attn, kind, stream),
            other => panic!("ATTN_BENCH_DTYPES: unknown dtype {other:?} (bf16, f16, f32)"),
        }
    }
    group.finish();
}

fn bench_dtype<T: Element + DeviceRepr>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    attn: &attention::Attention,
    kind: BackendKind,
    stream: &Arc<CudaStream>,
) {
    for d in [64usize, 128] {
        for causal in [false, true] {
            for seq in SEQS {
                let (b, h) = (16384 / seq, 2048 / d);
                let l = Layout::heads_first(b, seq, h, d);
                let problem = Problem::new(T::DTYPE, b, seq, seq, h, h, d).causal(causal);
                if attn.explain(&problem).chosen != Some(kind) {
                    continue;
                }
                let (q, k, v) = (random::<T>(l.numel(), 1), random::<T>(l.numel(), 2), random::<T>(l.numel(), 3));
                let (dq, dk, dv) = (stream.clone_htod(&q).unwrap(), stream.clone_htod(&k).unwrap(), stream.clone_htod(&v).unwrap());
                let mut out: CudaSlice<T> = stream.clone_htod(&vec![T::from_f32(0.0); l.numel()]).unwrap();
                let opts = Options::default().causal(causal);
                group.throughput(Throughput::Elements(problem.flops() as u64));
                let id = format!("{}/d{d}/{}/seq{seq}", T::DTYPE, if causal { "causal" } else { "full" });
                group.bench_function(BenchmarkId::from_parameter(id), |bencher| {
                    bencher.iter_custom(|iters| {
                        stream.synchronize().unwrap();
                        let t = Instant::now();
                        for _ in 0..iters {
                            attn.forward(&Tensor::cuda(&dq, l), &Tensor::cuda(&dk, l), &Tensor::cuda(&dv, l), &mut TensorMut::cuda(&mut out, l), &opts)
                                .unwrap();
                        }
                        stream.synchronize().unwrap();
                        t.elapsed()
                    })
                });
            }
        }
    }
}

fn bench_cpu(c: &mut Criterion) {
    let attn = Selector::from_env().unwrap().backend(BackendKind::Cpu).select().unwrap();
    let mut group = c.benchmark_group("cpu/cpu");
    group.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(2));
    for d in [64usize, 128] {
        for causal in [false, true] {
            for seq in [512usize, 1024] {
                let (b, h) = (1, 2048 / d);
                let l = Layout::heads_first(b, seq, h, d);
                let problem = Problem::new(DType::BF16, b, seq, seq, h, h, d).causal(causal).on_host();
                let (q, k, v) = (random::<bf16>(l.numel(), 1), random::<bf16>(l.numel(), 2), random::<bf16>(l.numel(), 3));
                let mut out = vec![bf16::ZERO; l.numel()];
                let opts = Options::default().causal(causal);
                group.throughput(Throughput::Elements(problem.flops() as u64));
                let id = format!("bf16/d{d}/{}/seq{seq}", if causal { "causal" } else { "full" });
                group.bench_function(BenchmarkId::from_parameter(id), |bencher| {
                    bencher.iter(|| {
                        attn.forward(&Tensor::host(&q, l), &Tensor::host(&k, l), &Tensor::host(&v, l), &mut TensorMut::host(&mut out, l), &opts)
                            .unwrap()
                    })
                });
            }
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let attn = attention::select().unwrap();
    if let Some(caps) = attn.device_caps() {
        let stream = CudaContext::new(caps.ordinal).unwrap().default_stream();
        for kind in attn.backends().into_iter().filter(|k| k.is_gpu()) {
            bench_gpu(c, kind, &stream);
        }
    } else {
        eprintln!("no CUDA device ({}): benchmarking the CPU backend only", attn.no_device_reason().unwrap_or("?"));
    }
    if std::env::var_os("ATTN_BENCH_SKIP_CPU").is_none() {
        bench_cpu(c);
    }
}

criterion_group!(attention_benches, benches);
criterion_main!(attention_benches);
