//! Throughput of every available backend, per device. Benchmark ids carry the GPU's name (or
//! "cpu"), so results from different machines never mix in criterion's history:
//! `<backend>/<device>/<dtype>/d<D>/<causal|full>/seq<S>`. `ATTN_BENCH_DTYPES` (default
//! `bf16,f16`) picks the dtypes.
//!
//! Shapes follow the PyTorch anchors (`shared/anchors/h100.md`): batch·seq = 16384 and
//! heads·head_dim = 2048, layout [batch, heads, seq, d]; FLOPs = 4·b·h·s²·d, halved when causal.
//! The CPU backend has its own `cpu` group (`bench_cpu`): the prefill and decode shapes it is compared
//! with PyTorch on (`scripts/cpu_vs_torch.py`), plus the host's read bandwidth.

use std::sync::Arc;
use std::time::{Duration, Instant};

use attention::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};
use attention::{BackendKind, Element, Layout, Options, Problem, Selector, Tensor, TensorMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
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

/// Prefill shapes of the CPU comparison with PyTorch (issue 14): one sequence, 16 heads.
const CPU_SEQS: [usize; 3] = [512, 1024, 2048];
/// KV-cache lengths of the CPU decode bench: one query token, GQA 32 query / 8 kv heads, d128.
const CPU_DECODE_CACHE: [usize; 4] = [4096, 8192, 16384, 32768];

/// The `cpu` group: prefill (`cpu/<dtype>/d<D>/<causal|full>/seq<S>`, FLOP throughput), decode
/// (`cpu/decode/<dtype>/gqa32-8/d128/kv<S>`, throughput in K/V bytes read) and the host's
/// streaming read bandwidth on as many threads (`cpu/read_bandwidth/256MiB`), so one run gives
/// both the decode rate and the bandwidth it is judged against. Threads: `ATTN_CPU_THREADS`
/// (default all cores). `ATTN_BENCH_CPU_DTYPES` (default `bf16,f16,f32`) picks the dtypes.
fn bench_cpu(c: &mut Criterion) {
    let attn = Selector::from_env().unwrap().backend(BackendKind::Cpu).select().unwrap();
    let mut group = c.benchmark_group("cpu");
    // Flat sampling: ten samples of equal size, so a 0.2 s call costs seconds, not the
    // 55 iterations linear sampling needs at least.
    group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let dtypes = std::env::var("ATTN_BENCH_CPU_DTYPES").unwrap_or_else(|_| "bf16,f16,f32".into());
    for dtype in dtypes.split(',').map(str::trim) {
        match dtype {
            "bf16" => bench_cpu_dtype::<bf16>(&mut group, &attn),
            "f16" => bench_cpu_dtype::<f16>(&mut group, &attn),
            "f32" => bench_cpu_dtype::<f32>(&mut group, &attn),
            other => panic!("ATTN_BENCH_CPU_DTYPES: unknown dtype {other:?} (bf16, f16, f32)"),
        }
    }
    bench_cpu_decode::<bf16>(&mut group, &attn);
    bench_cpu_decode_paged::<bf16>(&mut group, &attn);
    bench_read_bandwidth(&mut group);
    group.finish();
}

fn bench_cpu_dtype<T: Element>(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, attn: &attention::Attention) {
    for d in [64usize, 128] {
        for causal in [false, true] {
            for seq in CPU_SEQS {
                let (b, h) = (1, 16);
                let l = Layout::heads_first(b, seq, h, d);
                let problem = Problem::new(T::DTYPE, b, seq, seq, h, h, d).causal(causal).on_host();
                let opts = Options::default().causal(causal);
                group.throughput(Throughput::Elements(problem.flops() as u64));
                let id = format!("{}/d{d}/{}/seq{seq}", T::DTYPE, if causal { "causal" } else { "full" });
                group.bench_function(BenchmarkId::from_parameter(id), |bencher| {
                    // Inputs made here, so shapes a filter skips cost nothing.
                    let (q, k, v) = (random::<T>(l.numel(), 1), random::<T>(l.numel(), 2), random::<T>(l.numel(), 3));
                    let mut out = vec![T::from_f32(0.0); l.numel()];
                    bencher.iter(|| {
                        attn.forward(&Tensor::host(&q, l), &Tensor::host(&k, l), &Tensor::host(&v, l), &mut TensorMut::host(&mut out, l), &opts)
                            .unwrap()
                    })
                });
            }
        }
    }
}

/// One query token against a KV cache, in two layouts: `[1, 8, cache, 128]` (heads first,
/// each head's rows contiguous: Hugging Face's cache, and what PyTorch is given) and
/// `.../seq-major`, `[1, cache, 8, 128]` (flash-attn's KV-cache layout, a head's rows 2 KiB
/// apart). Each iteration uses the next of several copies of the cache, together larger than
/// the last-level cache, so a short cache is read from memory as in a real decode step (where
/// the other layers' caches evict it).
fn bench_cpu_decode<T: Element>(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, attn: &attention::Attention) {
    let (h, hk, d) = (32usize, 8usize, 128usize);
    for seq_major in [false, true] {
        for cache in CPU_DECODE_CACHE {
            let ql = Layout::contiguous(1, 1, h, d);
            let kl = if seq_major { Layout::contiguous(1, cache, hk, d) } else { Layout::heads_first(1, cache, hk, d) };
            let kv_bytes = 2 * kl.numel() * std::mem::size_of::<T>();
            let copies = (512usize << 20).div_ceil(kv_bytes).clamp(1, 16);
            let opts = Options::default();
            group.throughput(Throughput::Bytes(kv_bytes as u64));
            let id = format!("decode/{}/gqa{h}-{hk}/d{d}/kv{cache}{}", T::DTYPE, if seq_major { "/seq-major" } else { "" });
            let mut next = 0;
            group.bench_function(BenchmarkId::from_parameter(id), |bencher| {
                let q = random::<T>(ql.numel(), 1);
                let kv: Vec<(Vec<T>, Vec<T>)> = (0..copies)
                    .map(|i| (random::<T>(kl.numel(), 2 + 2 * i as u64), random::<T>(kl.numel(), 3 + 2 * i as u64)))
                    .collect();
                let mut out = vec![T::from_f32(0.0); ql.numel()];
                bencher.iter(|| {
                    let (k, v) = &kv[next % copies];
                    next += 1;
                    attn.forward(&Tensor::host(&q, ql), &Tensor::host(k, kl), &Tensor::host(v, kl), &mut TensorMut::host(&mut out, ql), &opts)
                        .unwrap()
                })
            });
        }
    }
}

/// Decode over a paged KV cache (`forward_kvcache`): vLLM's layout, pages `[n, 16, 8, 128]`
/// (`cpu/decode/<dtype>/gqa32-8/d128/kv<S>/paged16`), the same lengths and copies as above.
fn bench_cpu_decode_paged<T: Element>(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, attn: &attention::Attention) {
    use attention::{BlockTable, CacheLens, KvCache};
    let (h, hk, d, page) = (32usize, 8usize, 128usize, 16usize);
    for cache in CPU_DECODE_CACHE {
        let ql = Layout::contiguous(1, 1, h, d);
        let pages = cache / page;
        let pl = Layout::contiguous(pages, page, hk, d);
        let kv_bytes = 2 * pl.numel() * std::mem::size_of::<T>();
        let copies = (512usize << 20).div_ceil(kv_bytes).clamp(1, 16);
        group.throughput(Throughput::Bytes(kv_bytes as u64));
        let id = format!("decode/{}/gqa{h}-{hk}/d{d}/kv{cache}/paged{page}", T::DTYPE);
        let mut next = 0;
        group.bench_function(BenchmarkId::from_parameter(id), |bencher| {
            let q = random::<T>(ql.numel(), 1);
            let kv: Vec<(Vec<T>, Vec<T>)> = (0..copies)
                .map(|i| (random::<T>(pl.numel(), 2 + 2 * i as u64), random::<T>(pl.numel(), 3 + 2 * i as u64)))
                .collect();
            let table: Vec<i32> = (0..pages as i32).collect();
            let lens = [cache as i32];
            let mut out = vec![T::from_f32(0.0); ql.numel()];
            bencher.iter(|| {
                let (k, v) = &kv[next % copies];
                next += 1;
                let cache = KvCache::paged(Tensor::host(k, pl), Tensor::host(v, pl), BlockTable::host(&table, pages, pages), CacheLens::host(&lens));
                attn.forward_kvcache(&Tensor::host(&q, ql), &cache, &mut TensorMut::host(&mut out, ql), None, &Options::default()).unwrap()
            })
        });
    }
}

/// Streaming read of 256 MiB (8× a large last-level cache) split over `ATTN_CPU_THREADS`
/// threads: the memory bandwidth the decode rate is compared with.
fn bench_read_bandwidth(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let threads = std::env::var("ATTN_CPU_THREADS").ok().and_then(|t| t.trim().parse().ok()).unwrap_or_else(num_cpus);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let words = (256usize << 20) / 8;
    group.throughput(Throughput::Bytes((words * 8) as u64));
    group.bench_function(BenchmarkId::from_parameter("read_bandwidth/256MiB"), |bencher| {
        let buf: Vec<u64> = (0..words as u64).collect();
        bencher.iter(|| {
            let chunk = words.div_ceil(threads);
            let sums: Vec<u64> = pool.install(|| {
                use rayon::prelude::*;
                buf.par_chunks(chunk)
                    .map(|part| {
                        // Eight independent lanes, so the loop vectorises and is bound by memory.
                        let mut acc = [0u64; 8];
                        for w in part.chunks_exact(8) {
                            for i in 0..8 {
                                acc[i] = acc[i].wrapping_add(w[i]);
                            }
                        }
                        acc.iter().fold(0u64, |s, &x| s.wrapping_add(x))
                    })
                    .collect()
            });
            std::hint::black_box(sums)
        })
    });
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
