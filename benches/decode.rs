//! Decode bench: one query token per sequence, GQA 32/8, head_dim 128, bf16, the shapes of
//! `torch_sdpa.py --decode-only` (run it in the same device call to compare), as TB/s of K and
//! V read. Dense `[b, h, s, d]` K/V (PyTorch's layout, through `forward`) and a paged cache
//! (vLLM's layout, 16-key pages, through `forward_kvcache`). Also the host time to submit a
//! tiny decode call. Needs a GPU; prints "skipped" and exits 0 without one.
//!
//! `cargo bench --bench decode`

use std::time::Instant;

use attention::cudarc::driver::{CudaContext, CudaSlice};
use attention::{BlockTable, CacheLens, KvCache, Layout, Options, Selector, Tensor, TensorMut};
use half::bf16;

const SHAPES: [(usize, usize); 13] = [
    (1, 1024),
    (1, 8192),
    (1, 32768),
    (1, 131072),
    (16, 1024),
    (16, 8192),
    (16, 32768),
    (64, 1024),
    (64, 8192),
    (64, 32768),
    (128, 1024),
    (128, 8192),
    (128, 32768),
];

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let attn = Selector::from_env().unwrap().select().unwrap();
    let Some(caps) = attn.device_caps() else {
        println!("decode bench skipped: no CUDA device ({})", attn.no_device_reason().unwrap_or("?"));
        return;
    };
    let ctx = CudaContext::new(caps.ordinal).unwrap();
    let s = ctx.default_stream();
    let (h, hk, d) = (32, 8, 128);
    let time = |f: &mut dyn FnMut()| -> f64 {
        for _ in 0..3 {
            f();
        }
        s.synchronize().unwrap();
        // Enough iterations for ~50 ms of work, at least 5.
        let t = Instant::now();
        f();
        s.synchronize().unwrap();
        let one = t.elapsed().as_secs_f64().max(1e-6);
        let iters = ((0.05 / one) as usize).clamp(5, 2000);
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        s.synchronize().unwrap();
        t.elapsed().as_secs_f64() / iters as f64
    };
    println!("decode (TB/s of K+V read), GQA {h}/{hk}, d={d}, bf16 on {}", attn.device_summary());
    println!("{:>5} {:>7} {:>10} {:>10} {:>12}", "batch", "seqlen", "dense", "paged16", "dense µs");
    for (b, sk) in SHAPES {
        let (lq, lk) = (Layout::heads_first(b, 1, h, d), Layout::heads_first(b, sk, hk, d));
        let fill = |n: usize, seed: u32| -> Vec<bf16> {
            (0..n).map(|i| bf16::from_f32(((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0 - 0.5)).collect()
        };
        let q = s.clone_htod(&fill(lq.numel(), 1)).unwrap();
        let k = s.clone_htod(&fill(lk.numel(), 2)).unwrap();
        let v = s.clone_htod(&fill(lk.numel(), 3)).unwrap();
        let mut out: CudaSlice<bf16> = s.alloc_zeros(lq.numel()).unwrap();
        let bytes = (2 * b * hk * sk * d * 2) as f64;
        let dense = time(&mut || {
            attn.forward(&Tensor::cuda(&q, lq), &Tensor::cuda(&k, lk), &Tensor::cuda(&v, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default())
                .unwrap();
        });
        // The same keys as a paged cache: pages [b * sk / 16, 16, hk, d] over the same memory
        // (heads-first within a sequence is not page-shaped, so it gets its own buffers).
        let page = 16;
        let pages = b * sk / page;
        let lp = Layout::contiguous(pages, page, hk, d);
        drop((k, v));
        let kp = s.clone_htod(&fill(lp.numel(), 2)).unwrap();
        let vp = s.clone_htod(&fill(lp.numel(), 3)).unwrap();
        let per = sk / page;
        let table: Vec<i32> = (0..pages as i32).collect();
        let table = s.clone_htod(&table).unwrap();
        let lens = s.clone_htod(&vec![sk as i32; b]).unwrap();
        let lq2 = Layout::contiguous(b, 1, h, d);
        let paged = time(&mut || {
            let cache = KvCache::paged(Tensor::cuda(&kp, lp), Tensor::cuda(&vp, lp), BlockTable::cuda(&table, per, per), CacheLens::cuda(&lens));
            attn.forward_kvcache(&Tensor::cuda(&q, lq2), &cache, &mut TensorMut::cuda(&mut out, lq2), None, &Options::default()).unwrap();
        });
        println!("{b:>5} {sk:>7} {:>10.2} {:>10.2} {:>12.1}", bytes / dense / 1e12, bytes / paged / 1e12, dense * 1e6);
    }
    // Host cost of submitting a tiny decode call (what a serving loop pays per layer).
    let (lq, lk) = (Layout::contiguous(1, 1, h, d), Layout::contiguous(1, 16, hk, d));
    let q: CudaSlice<bf16> = s.alloc_zeros(lq.numel()).unwrap();
    let k: CudaSlice<bf16> = s.alloc_zeros(lk.numel()).unwrap();
    let mut out: CudaSlice<bf16> = s.alloc_zeros(lq.numel()).unwrap();
    // Fewer calls than the launch queue holds, so the host is never throttled by the GPU.
    let n = 500;
    for _ in 0..100 {
        attn.forward(&Tensor::cuda(&q, lq), &Tensor::cuda(&k, lk), &Tensor::cuda(&k, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default()).unwrap();
    }
    s.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..n {
        attn.forward(&Tensor::cuda(&q, lq), &Tensor::cuda(&k, lk), &Tensor::cuda(&k, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default()).unwrap();
    }
    let submit = t.elapsed().as_secs_f64() / n as f64;
    s.synchronize().unwrap();
    println!("host time to submit a tiny decode call: {:.2} µs", submit * 1e6);
}
