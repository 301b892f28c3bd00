//! `cargo run --release --example doctor`: everything a bug report needs, like `vllm
//! collect-env`, then a small attention checked against the CPU backend.

use std::time::Instant;

use attention::{
    BackendKind, DType, Layout, MemoryKind, Nvrtc, Options, Problem, Selector, Settings, Tensor,
    TensorMut,
};
use half::bf16;

fn main() {
    // Show the crate's own warnings (fallbacks, JIT) unless the user chose a level.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "info");
    }
    init_logger();
    if let Err(e) = run() {
        eprintln!("\ndoctor: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn run() -> Result<()> {
    println!("attention {} doctor", env!("CARGO_PKG_VERSION"));
    println!("\n== build");
    let build = attention::KernelBuild::embedded();
    if build.built_with_nvcc {
        println!("kernels:        built ahead of time by nvcc {}", build.nvcc_version);
    } else {
        println!("kernels:        sources only (no nvcc at build time): compiled at first use by NVRTC");
    }
    println!(
        "arch list:      {} (from {})",
        attention::arch::format_arch_list(&build.arch_list),
        build.arch_list_source
    );
    match attention::testing::nvrtc() {
        Nvrtc::Available { version } => println!("NVRTC:          available, {}.{}", version.0, version.1),
        Nvrtc::Missing(why) => println!("NVRTC:          missing: {why}"),
    }

    println!("\n== settings");
    let env = Settings::environment();
    if env.is_empty() {
        println!("ATTN_* variables: none set");
    }
    for (k, v) in env {
        println!("{k}={v}");
    }
    let selector = Selector::from_env()?;
    let s = selector.settings().clone();
    println!(
        "in effect:      device={} backend={} disabled=[{}] strict={} jit={} naive workspace={} MiB cpu threads={}",
        s.device,
        s.backend.map(|b| b.to_string()).unwrap_or_else(|| "ranked".into()),
        s.disabled.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
        s.strict,
        s.jit,
        s.naive_workspace_mb,
        s.cpu_threads.map(|t| t.to_string()).unwrap_or_else(|| "all".into()),
    );
    match &s.cache_dir {
        Some(dir) => {
            let entries = attention::testing::cache_entries(dir);
            match entries {
                Ok(e) => {
                    let bytes: u64 = e.iter().map(|x| x.1).sum();
                    let bad = e.iter().filter(|x| !x.2).count();
                    println!("JIT cache:      {} ({} entries, {} KiB, {} invalid)", dir.display(), e.len(), bytes / 1024, bad);
                    for (name, b, ok) in e {
                        println!("                {name} {b} bytes{}", if ok { "" } else { " INVALID" });
                    }
                }
                Err(err) => println!("JIT cache:      {} (not usable: {err})", dir.display()),
            }
        }
        None => println!("JIT cache:      none (no ATTN_CACHE_DIR and no home directory)"),
    }

    println!("\n== device");
    let attn = selector.select()?;
    match attn.device_caps() {
        Some(c) => {
            println!("GPU:            {} (device {})", c.name, c.ordinal);
            println!("compute cap.:   {} ({})", c.cc, c.cc.sm());
            println!("driver:         CUDA {}.{}", c.driver_version.0, c.driver_version.1);
            println!("SMs:            {}", c.sm_count);
            println!("shared memory:  {} KiB per block (opt-in)", c.smem_per_block_optin / 1024);
            println!(
                "memory:         {:.1} GiB total, {:.1} GiB free",
                c.total_mem as f64 / (1u64 << 30) as f64,
                c.free_mem as f64 / (1u64 << 30) as f64
            );
            for kind in attn.backends().into_iter().filter(|k| k.is_gpu()) {
                if let Some(img) = attn.kernel_image(kind) {
                    println!("{:<15} {img}", format!("{kind} kernels:"));
                }
            }
        }
        None => println!(
            "GPU:            none ({}); the CPU backend runs host tensors",
            attn.no_device_reason().unwrap_or("unknown")
        ),
    }

    println!("\n== backends (fastest first) for a bf16 problem in device memory and in host memory");
    let (b, sq, sk, h, d) = (2, 257, 300, 8, 64);
    let device_problem = Problem::new(DType::BF16, b, sq, sk, h, h / 4, d).causal(true).on_device(s.device);
    let host_problem = device_problem.clone().on_host();
    for kind in attn.backends() {
        for (label, p) in [("device", &device_problem), ("host", &host_problem)] {
            let reasons = attn.reasons(kind, p);
            if reasons.is_empty() {
                println!("  ✓ {kind:<14} {label}");
            } else {
                let text: Vec<String> = reasons.iter().map(|r| r.to_string()).collect();
                println!("  ✗ {kind:<14} {label}: {}", text.join("; "));
            }
        }
    }

    println!("\n== run: {}", if attn.device_caps().is_some() { &device_problem } else { &host_problem });
    smoke_test(&attn, &device_problem)
}

/// Runs the problem on the chosen backend and compares with the CPU backend.
fn smoke_test(attn: &attention::Attention, problem: &Problem) -> Result<()> {
    let (b, sq, sk, h, hk, d) = (problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads, problem.kv_heads, problem.head_dim);
    let mut seed = 0x9e3779b97f4a7c15u64 ^ std::process::id() as u64;
    let mut rand = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bf16::from_f32((seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect()
    };
    let (lq, lk) = (Layout::contiguous(b, sq, h, d), Layout::contiguous(b, sk, hk, d));
    let (q, k, v) = (rand(lq.numel()), rand(lk.numel()), rand(lk.numel()));
    let opts = Options::default().causal(problem.causal);

    let on_gpu = matches!((attn.device_caps(), problem.memory), (Some(_), MemoryKind::Device { .. }));
    // The GPU is checked against the CPU backend; the CPU backend against plain f64 loops.
    let reference: Vec<f64> = if on_gpu {
        let cpu = Selector::from_env()?.backend(BackendKind::Cpu).select()?;
        let mut r = vec![bf16::NAN; q.len()];
        cpu.forward(&Tensor::host(&q, lq), &Tensor::host(&k, lk), &Tensor::host(&v, lk), &mut TensorMut::host(&mut r, lq), &opts)?;
        r.iter().map(|x| x.to_f64()).collect()
    } else {
        reference_f64(&q, &k, &v, (b, sq, sk, h, hk, d), problem.causal)
    };

    let (ran, out, ms) = match (attn.device_caps(), problem.memory) {
        (Some(caps), MemoryKind::Device { .. }) => {
            use attention::cudarc::driver::CudaContext;
            let cuda = |e: attention::cudarc::driver::DriverError| format!("CUDA error in doctor: {e:?}");
            let ctx = CudaContext::new(caps.ordinal).map_err(cuda)?;
            let stream = ctx.default_stream();
            let (dq, dk, dv) = (stream.clone_htod(&q).map_err(cuda)?, stream.clone_htod(&k).map_err(cuda)?, stream.clone_htod(&v).map_err(cuda)?);
            let mut dout = stream.clone_htod(&vec![bf16::NAN; q.len()]).map_err(cuda)?;
            let mut launch = || {
                attn.forward(&Tensor::cuda(&dq, lq), &Tensor::cuda(&dk, lk), &Tensor::cuda(&dv, lk), &mut TensorMut::cuda(&mut dout, lq), &opts)
            };
            let ran = launch()?; // warm-up: loads (or JIT-compiles) the kernels
            stream.synchronize().map_err(cuda)?;
            let t = Instant::now();
            let iters = 20;
            for _ in 0..iters {
                launch()?;
            }
            stream.synchronize().map_err(cuda)?;
            let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
            (ran, stream.clone_dtoh(&dout).map_err(cuda)?, ms)
        }
        _ => {
            let mut out = vec![bf16::NAN; q.len()];
            let t = Instant::now();
            let ran = attn.forward(&Tensor::host(&q, lq), &Tensor::host(&k, lk), &Tensor::host(&v, lk), &mut TensorMut::host(&mut out, lq), &opts)?;
            (ran, out, t.elapsed().as_secs_f64() * 1e3)
        }
    };
    let (mut num, mut den, mut nan) = (0f64, 0f64, 0usize);
    for (o, &r) in out.iter().zip(&reference) {
        let o = o.to_f64();
        nan += o.is_nan() as usize;
        num += (o - r) * (o - r);
        den += r * r;
    }
    let rel = (num / den.max(1e-30)).sqrt();
    let verdict = if nan == 0 && rel < 1e-2 { "OK" } else { "MISMATCH" };
    println!("backend:        {ran}");
    println!("time:           {ms:.3} ms per call ({:.1} GFLOP/s)", problem.flops() / ms / 1e6);
    println!("vs {}: relative error {rel:.2e} (bf16 tolerance 1e-2), {nan} NaN: {verdict}", if on_gpu { "CPU backend" } else { "f64 loops  " });
    if verdict != "OK" {
        return Err(format!("the {ran} backend disagrees with its reference: relative error {rel:.2e}, {nan} NaN").into());
    }
    Ok(())
}

/// Plain attention in f64 over contiguous [b, s, h, d] tensors, bottom-right causal.
fn reference_f64(q: &[bf16], k: &[bf16], v: &[bf16], dims: (usize, usize, usize, usize, usize, usize), causal: bool) -> Vec<f64> {
    let (b, sq, sk, h, hk, d) = dims;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; q.len()];
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / (h / hk);
            for i in 0..sq {
                let qi = &q[((bi * sq + i) * h + hi) * d..][..d];
                let visible = if causal { (i + 1 + sk).saturating_sub(sq).min(sk) } else { sk };
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let kj = &k[((bi * sk + j) * hk + kh) * d..][..d];
                        scale * qi.iter().zip(kj).map(|(a, b)| a.to_f64() * b.to_f64()).sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                let o = &mut out[((bi * sq + i) * h + hi) * d..][..d];
                for (j, w) in weights.iter().enumerate() {
                    let vj = &v[((bi * sk + j) * hk + kh) * d..][..d];
                    for (x, y) in o.iter_mut().zip(vj) {
                        *x += w / sum * y.to_f64();
                    }
                }
            }
        }
    }
    out
}

/// A minimal stderr logger so the crate's `log` output shows without another dependency.
fn init_logger() {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.0
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!("[{}] {}", r.level(), r.args());
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("RUST_LOG").unwrap_or_default().to_ascii_lowercase().as_str() {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        "off" => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    let _ = log::set_boxed_logger(Box::new(Stderr(level)));
    log::set_max_level(level);
}
