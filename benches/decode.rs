//! Decode bench: one query token per sequence, GQA 32/8, head_dim 128, bf16, the shapes of
//! `torch_sdpa.py --decode-only` (run it in the same device call to compare), as TB/s of K and
//! V read. Dense `[b, h, s, d]` K/V (PyTorch's layout, through `forward`) and a paged cache
//! (vLLM's layout, 16-key pages, through `forward_kvcache`). Also the host time to submit a
//! tiny decode call. Needs a GPU; prints "skipped" and exits 0 without one.
//!
//! `cargo bench --bench decode`

use std::time::Instant;

use attention::cudarc::driver::{CudaContext, CudaSlice};
use attention::{BlockTable, CacheLens, DType, KvCache, Layout, Options, Problem, Selector, SeqLens, Tensor, TensorMut};
use half::bf16;

/// Seconds per call on the two clocks of `time` in `main`.
#[derive(Clone, Copy)]
struct Timing {
    /// Median GPU time between events around one call, L2 flushed before (PyTorch's method).
    gpu: f64,
    /// Back-to-back calls on the host clock.
    wall: f64,
}

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
    // Two clocks per measurement. `gpu`: what `torch_sdpa.py` reports (Triton's `do_bench`):
    // for each repetition a 256 MB memset evicts L2, then CUDA events around one call; the
    // median. `wall`: back-to-back calls timed on the host, which includes our submit cost
    // where it exceeds the GPU's time (small shapes without a CUDA graph).
    let flush: std::cell::RefCell<CudaSlice<u8>> = std::cell::RefCell::new(s.alloc_zeros(256 << 20).unwrap());
    // Two helper kernels (NVRTC): an empty one (the launch floor, on both clocks) and a grid-wide
    // read of the flush buffer (an L2 flush that leaves clean lines).
    let helpers = attention::cudarc::nvrtc::compile_ptx(HELPERS).map(|ptx| ctx.load_module(ptx).unwrap());
    let (noop, reader) = match &helpers {
        Ok(m) => (Some(m.load_function("noop").unwrap()), Some(m.load_function("read_all").unwrap())),
        Err(e) => {
            println!("helper kernels not compiled (NVRTC: {e:?}): no launch floor, no read flush");
            (None, None)
        }
    };
    let flush_ptr = {
        use attention::cudarc::driver::DevicePtr;
        let buf = flush.borrow();
        let (ptr, _sync) = buf.device_ptr(&s);
        ptr
    };
    let read_flush = |f: &attention::cudarc::driver::CudaFunction| {
        let (mut p, mut n, mut sink) = (flush_ptr, (256u64 << 20) / 16, flush_ptr);
        let mut args = [&mut p as *mut _ as *mut std::ffi::c_void, &mut n as *mut _ as *mut std::ffi::c_void, &mut sink as *mut _ as *mut std::ffi::c_void];
        // SAFETY: read_all(const uint4*, unsigned long long, unsigned*) over the live flush buffer.
        unsafe { attention::cudarc::driver::result::launch_kernel(f.cu_function(), (1056, 1, 1), (256, 1, 1), 0, s.cu_stream(), &mut args) }.unwrap();
    };
    let event = || ctx.new_event(Some(attention::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    // How L2 is emptied before each timed call: a 256 MB memset (PyTorch's method, which leaves
    // L2 full of dirty lines that the call's reads then write back) or, where asked, a 256 MB
    // read (clean lines: the call pays only its own traffic).
    let flush_by_reading = std::cell::Cell::new(false);
    let time = |f: &mut dyn FnMut()| -> Timing {
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
        let wall = t.elapsed().as_secs_f64() / iters as f64;
        let reps = ((0.1 / wall) as usize).clamp(10, 200);
        let marks: Vec<_> = (0..reps).map(|_| (event(), event())).collect();
        for (start, end) in &marks {
            match (&reader, flush_by_reading.get()) {
                (Some(f), true) => read_flush(f),
                _ => s.memset_zeros(&mut *flush.borrow_mut()).unwrap(),
            }
            start.record(&s).unwrap();
            f();
            end.record(&s).unwrap();
        }
        s.synchronize().unwrap();
        let mut ms: Vec<f32> = marks.iter().map(|(a, b)| a.elapsed_ms(b).unwrap()).collect();
        ms.sort_by(f32::total_cmp);
        Timing { wall, gpu: ms[ms.len() / 2] as f64 * 1e-3 }
    };
    let pattern = |n: usize, seed: u32| -> Vec<bf16> {
        (0..n).map(|i| bf16::from_f32(((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0 - 0.5)).collect()
    };
    // Device tensors of up to several GB: a 4 Mi-element pseudo-random pattern copied over
    // them (generating every element on the host took minutes at the largest shapes).
    let fill = |n: usize, seed: u32| -> CudaSlice<bf16> {
        let chunk = pattern(n.min(1 << 22), seed);
        let mut dst: CudaSlice<bf16> = unsafe { s.alloc(n) }.unwrap();
        let mut at = 0;
        while at < n {
            let len = chunk.len().min(n - at);
            s.memcpy_htod(&chunk[..len], &mut dst.slice_mut(at..at + len)).unwrap();
            at += len;
        }
        dst
    };
    // One shape: dense `[b, h, s, d]` K/V through `forward` (q_len 1 only: PyTorch's shape),
    // a contiguous cache `[b, s, hk, d]` with device lengths and paged caches (vLLM's layout)
    // with 16- and 64-key pages through `forward_kvcache`. Seconds per call: (dense, cache,
    // paged16, paged64), and the plan `explain` reports.
    let measure = |b: usize, q_len: usize, sk: usize, h: usize, hk: usize, d: usize| -> ([Timing; 4], String) {
        let mut out: CudaSlice<bf16> = s.alloc_zeros(b * q_len * h * d).unwrap();
        let none = Timing { gpu: f64::NAN, wall: f64::NAN };
        let mut dense = none;
        if q_len == 1 {
            let (lq, lk) = (Layout::heads_first(b, 1, h, d), Layout::heads_first(b, sk, hk, d));
            let q = fill(lq.numel(), 1);
            let k = fill(lk.numel(), 2);
            let v = fill(lk.numel(), 3);
            dense = time(&mut || {
                attn.forward(&Tensor::cuda(&q, lq), &Tensor::cuda(&k, lk), &Tensor::cuda(&v, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default())
                    .unwrap();
            });
        }
        let lq = Layout::contiguous(b, q_len, h, d);
        let q = fill(lq.numel(), 1);
        let lens = s.clone_htod(&vec![sk as i32; b]).unwrap();
        let lc = Layout::contiguous(b, sk, hk, d);
        let (kc, vc) = (fill(lc.numel(), 2), fill(lc.numel(), 3));
        let cache = time(&mut || {
            let cache = KvCache::contiguous(Tensor::cuda(&kc, lc), Tensor::cuda(&vc, lc), CacheLens::cuda(&lens));
            attn.forward_kvcache(&Tensor::cuda(&q, lq), &cache, &mut TensorMut::cuda(&mut out, lq), None, &Options::default()).unwrap();
        });
        drop((kc, vc));
        let mut paged = [none; 2];
        for (i, page) in [16, 64].into_iter().enumerate() {
            let pages = b * sk.div_ceil(page);
            let lp = Layout::contiguous(pages, page, hk, d);
            let kp = fill(lp.numel(), 2);
            let vp = fill(lp.numel(), 3);
            let per = sk.div_ceil(page);
            // Pages of a sequence scattered (reversed in pairs), as an allocator leaves them.
            let table: Vec<i32> = (0..pages as i32).map(|p| p ^ 1).map(|p| p.min(pages as i32 - 1)).collect();
            let table = s.clone_htod(&table).unwrap();
            paged[i] = time(&mut || {
                let cache = KvCache::paged(Tensor::cuda(&kp, lp), Tensor::cuda(&vp, lp), BlockTable::cuda(&table, per, per), CacheLens::cuda(&lens));
                attn.forward_kvcache(&Tensor::cuda(&q, lq), &cache, &mut TensorMut::cuda(&mut out, lq), None, &Options::default()).unwrap();
            });
        }
        let plan = attn.explain(&Problem::new(DType::BF16, b, q_len, sk, h, hk, d)).plan.unwrap_or_default();
        ([dense, cache, paged[0], paged[1]], plan)
    };
    // Seconds per dense decode call (GQA 32/8, d128), once per setting `before` makes: the
    // inputs are made once.
    let measure_dense_each = |b: usize, sk: usize, settings: &[usize], before: &mut dyn FnMut(usize)| -> Vec<Timing> {
        let (lq, lk) = (Layout::heads_first(b, 1, 32, 128), Layout::heads_first(b, sk, 8, 128));
        let (q, k, v) = (fill(lq.numel(), 1), fill(lk.numel(), 2), fill(lk.numel(), 3));
        let mut out: CudaSlice<bf16> = s.alloc_zeros(lq.numel()).unwrap();
        settings
            .iter()
            .map(|&setting| {
                before(setting);
                time(&mut || {
                    attn.forward(&Tensor::cuda(&q, lq), &Tensor::cuda(&k, lk), &Tensor::cuda(&v, lk), &mut TensorMut::cuda(&mut out, lq), &Options::default())
                        .unwrap();
                })
            })
            .collect()
    };
    let measure_dense = |b: usize, sk: usize| -> Timing { measure_dense_each(b, sk, &[0], &mut |_| {})[0] };
    let tbs = |b: usize, sk: usize, hk: usize, d: usize, secs: f64| (2 * b * hk * sk * d * 2) as f64 / secs / 1e12;
    let (h, hk, d) = (32, 8, 128);
    println!("decode (TB/s of K+V read), GQA {h}/{hk}, d={d}, bf16 on {}", attn.device_summary());
    // `bench-decode --bench 1x1024 16x8192` runs only those shapes (e.g. under a profiler).
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted = |b: usize, sk: usize| only.is_empty() || only.contains(&format!("{b}x{sk}"));
    println!("TB/s from GPU time (events, L2 flushed: torch_sdpa.py's method); `wall`: back-to-back calls on the host clock");
    println!(
        "{:>5} {:>7} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9}  plan",
        "batch", "seqlen", "dense", "cache", "paged16", "paged64", "dense wall", "gpu µs", "wall µs"
    );
    for (b, sk) in SHAPES.into_iter().filter(|&(b, sk)| wanted(b, sk)) {
        let (t, plan) = measure(b, 1, sk, h, hk, d);
        println!(
            "{b:>5} {sk:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10.2} {:>9.1} {:>9.1}  {plan}",
            tbs(b, sk, hk, d, t[0].gpu),
            tbs(b, sk, hk, d, t[1].gpu),
            tbs(b, sk, hk, d, t[2].gpu),
            tbs(b, sk, hk, d, t[3].gpu),
            tbs(b, sk, hk, d, t[0].wall),
            t[0].gpu * 1e6,
            t[0].wall * 1e6
        );
    }
    if !only.is_empty() {
        return;
    }
    // K/V loads: plain against streamed (evict-first in L2, not allocated in L1), same inputs,
    // every shape, dense, GPU time (the plan streams calls that read at most 192 MiB).
    {
        use attention::testing::{set_decode_loads, DecodeLoads};
        println!("K/V loads (dense TB/s, GPU time): plain / streamed");
        println!("{:>5} {:>7} {:>8} {:>8}", "batch", "seqlen", "plain", "streamed");
        for (b, sk) in SHAPES {
            let t = measure_dense_each(b, sk, &[0, 1], &mut |i| set_decode_loads([DecodeLoads::Plain, DecodeLoads::Streamed][i]));
            set_decode_loads(DecodeLoads::Plan);
            println!("{b:>5} {sk:>7} {:>8.2} {:>8.2}", tbs(b, sk, hk, d, t[0].gpu), tbs(b, sk, hk, d, t[1].gpu));
        }
    }
    // How split grids merge: the combine kernel (partials through global memory), the plan's
    // rule (one thread block cluster where the splits fit one, sm_90+), and every split grid
    // capped to one cluster. Same inputs, dense, GPU time.
    {
        use attention::testing::{set_decode_merge, DecodeMerge};
        println!("split merge (dense TB/s, GPU time): combine kernel / plan / capped to one cluster");
        println!("{:>5} {:>7} {:>8} {:>8} {:>8}  plan; capped plan", "batch", "seqlen", "combine", "plan", "cluster");
        for (b, sk) in [(1, 1024), (1, 4096), (1, 8192), (1, 32768), (1, 131072), (16, 1024), (16, 8192), (16, 32768)] {
            let modes = [DecodeMerge::Combine, DecodeMerge::Plan, DecodeMerge::ClusterCapped];
            let mut plans = Vec::new();
            let t = measure_dense_each(b, sk, &[0, 1, 2], &mut |i| {
                set_decode_merge(modes[i]);
                if i > 0 {
                    plans.push(attn.explain(&Problem::new(DType::BF16, b, 1, sk, h, hk, d)).plan.unwrap_or_default());
                }
            });
            set_decode_merge(DecodeMerge::Plan);
            let row: Vec<f64> = t.iter().map(|t| tbs(b, sk, hk, d, t.gpu)).collect();
            println!("{b:>5} {sk:>7} {:>8.2} {:>8.2} {:>8.2}  {}; {}", row[0], row[1], row[2], plans[0], plans[1]);
        }
    }
    // What the timing method itself costs a short call: the GPU time of an empty kernel, and
    // the dense shapes timed after an L2 flush by reading (clean lines) beside the memset flush
    // (PyTorch's: the call's reads also write back the memset's dirty lines).
    if let Some(f) = &noop {
        // SAFETY: the empty kernel takes no parameters.
        let empty = time(&mut || unsafe { attention::cudarc::driver::result::launch_kernel(f.cu_function(), (1, 1, 1), (32, 1, 1), 0, s.cu_stream(), &mut []) }.unwrap());
        println!("empty kernel: {:.1} µs GPU time (events, memset flush), {:.1} µs wall", empty.gpu * 1e6, empty.wall * 1e6);
    }
    if reader.is_some() {
        println!("L2 flush before each timed call (dense µs and TB/s, GPU time): memset (PyTorch's method) / read");
        println!("{:>5} {:>7} {:>9} {:>9} {:>8} {:>8}", "batch", "seqlen", "memset µs", "read µs", "memset", "read");
        for (b, sk) in [(1, 1024), (1, 8192), (1, 32768), (1, 131072), (16, 1024), (16, 8192), (128, 32768)] {
            let t = measure_dense_each(b, sk, &[0, 1], &mut |i| flush_by_reading.set(i == 1));
            flush_by_reading.set(false);
            println!(
                "{b:>5} {sk:>7} {:>9.1} {:>9.1} {:>8.2} {:>8.2}",
                t[0].gpu * 1e6,
                t[1].gpu * 1e6,
                tbs(b, sk, hk, d, t[0].gpu),
                tbs(b, sk, hk, d, t[1].gpu)
            );
        }
    }
    // The grid tables (`--grid-tables`; settled questions, kept to measure them again): waves per
    // split grid, split counts, the combine's share, four- against two-warp blocks.
    let grid_tables = std::env::args().any(|a| a == "--grid-tables");
    if grid_tables {
        // How many waves of blocks a split grid should aim for (the default is 1): dense, the
        // split shapes, each wave count in turn.
        println!("split grids by waves (dense TB/s, GPU time)");
        println!("{:>5} {:>7} {:>8} {:>8} {:>8} {:>8}", "batch", "seqlen", "1", "2", "3", "4");
        for (b, sk) in [(1, 1024), (1, 8192), (1, 32768), (1, 131072), (16, 8192), (16, 32768)] {
            let t = measure_dense_each(b, sk, &[1, 2, 3, 4], &mut |waves| attention::testing::set_decode_waves(waves));
            attention::testing::set_decode_waves(0);
            println!("{b:>5} {sk:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2}", tbs(b, sk, hk, d, t[0].gpu), tbs(b, sk, hk, d, t[1].gpu), tbs(b, sk, hk, d, t[2].gpu), tbs(b, sk, hk, d, t[3].gpu));
        }
        // What the split-KV combine costs: small shapes with the split count capped (1: one
        // block per KV head, no workspace and no combine).
        println!("split count (dense TB/s, GPU time; `auto` is the plan's own)");
        println!("{:>5} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}", "batch", "seqlen", "1", "2", "4", "8", "16", "auto");
        for (b, sk) in [(1, 1024), (1, 4096), (1, 8192), (16, 1024), (16, 8192)] {
            let mut row = [0.0; 6];
            for (i, cap) in [1, 2, 4, 8, 16, 0].into_iter().enumerate() {
                attention::testing::set_decode_max_splits(cap);
                row[i] = tbs(b, sk, hk, d, measure_dense(b, sk).gpu);
            }
            attention::testing::set_decode_max_splits(0);
            println!("{b:>5} {sk:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}", row[0], row[1], row[2], row[3], row[4], row[5]);
        }
        // The combine's share: the same split grids without it (bench-only switch; wrong outputs).
        println!("main kernel alone (dense µs, GPU time): with combine / without");
        for (b, sk) in [(1, 1024), (1, 8192), (1, 32768), (16, 1024), (16, 8192)] {
            let with = measure_dense(b, sk).gpu;
            attention::testing::set_decode_skip_combine(true);
            let without = measure_dense(b, sk).gpu;
            attention::testing::set_decode_skip_combine(false);
            println!("{b:>5} {sk:>7} {:>8.1} {:>8.1}", with * 1e6, without * 1e6);
        }
        // Four-warp blocks (the plan's) against two-warp ones, same inputs, every shape.
        println!("warps per block (dense TB/s, GPU time)");
        println!("{:>5} {:>7} {:>8} {:>8}", "batch", "seqlen", "4", "2");
        for (b, sk) in SHAPES {
            let t = measure_dense_each(b, sk, &[0, 1], &mut |two| attention::testing::set_decode_two_warp_blocks(two == 1));
            attention::testing::set_decode_two_warp_blocks(false);
            println!("{b:>5} {sk:>7} {:>8.2} {:>8.2}", tbs(b, sk, hk, d, t[0].gpu), tbs(b, sk, hk, d, t[1].gpu));
        }
    }
    // The issue's other shapes: more query heads per KV head, MHA, head_dim 64 and 256, and
    // 4 query rows (speculative decoding: paged only).
    println!("variants (TB/s of K+V read, GPU time), bf16");
    println!("{:>5} {:>7} {:>7} {:>4} {:>5} {:>8} {:>8} {:>8} {:>8}  plan", "batch", "seqlen", "h/hk", "d", "q_len", "dense", "cache", "paged16", "paged64");
    for (b, sk, h, hk, d, q_len) in
        [(1, 32768, 64, 8, 128, 1), (16, 8192, 64, 8, 128, 1), (1, 32768, 32, 32, 128, 1), (16, 8192, 32, 32, 128, 1), (16, 8192, 32, 8, 64, 1), (16, 8192, 32, 8, 256, 1), (1, 32768, 32, 8, 128, 4), (16, 8192, 32, 8, 128, 4)]
    {
        let (t, plan) = measure(b, q_len, sk, h, hk, d);
        println!(
            "{b:>5} {sk:>7} {:>7} {d:>4} {q_len:>5} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {plan}",
            format!("{h}/{hk}"),
            tbs(b, sk, hk, d, t[0].gpu),
            tbs(b, sk, hk, d, t[1].gpu),
            tbs(b, sk, hk, d, t[2].gpu),
            tbs(b, sk, hk, d, t[3].gpu)
        );
    }
    // Host cost of submitting a tiny decode call (what a serving loop pays per layer): with
    // cudarc's event tracking (its default: every slice access records events), and without
    // (a single-stream engine turns it off), which isolates our own share.
    // A vLLM v1-style mixed batch: 4 prefill chunks of 512 tokens and 60 decode tokens, every
    // sequence at 4k keys in a paged cache (16-key pages), as one call with packed queries
    // (`cu_seqlens_q`) against the same work as two calls (the decodes; the chunks).
    {
        let (nseq, chunks, chunk, sk, page) = (64usize, 4usize, 512usize, 4096usize, 16usize);
        let rows: Vec<usize> = (0..nseq).map(|i| if i < chunks { chunk } else { 1 }).collect();
        let mut cu = vec![0i32];
        for &r in &rows {
            cu.push(cu.last().unwrap() + r as i32);
        }
        let total = *cu.last().unwrap() as usize;
        let per = sk / page;
        let lp = Layout::contiguous(nseq * per, page, hk, d);
        let (kp, vp) = (fill(lp.numel(), 2), fill(lp.numel(), 3));
        let table: Vec<i32> = (0..(nseq * per) as i32).map(|p| p ^ 1).collect();
        let table = s.clone_htod(&table).unwrap();
        let lens = s.clone_htod(&vec![sk as i32; nseq]).unwrap();
        let cu_d = s.clone_htod(&cu).unwrap();
        let lq = Layout::contiguous(1, total, h, d);
        let q = fill(lq.numel(), 1);
        let mut out: CudaSlice<bf16> = s.alloc_zeros(lq.numel()).unwrap();
        let opts = Options::default().causal(true);
        let mixed = time(&mut || {
            let cache = KvCache::paged(Tensor::cuda(&kp, lp), Tensor::cuda(&vp, lp), BlockTable::cuda(&table, per, per), CacheLens::cuda(&lens))
                .with_varlen_queries(SeqLens::cuda(&cu_d), chunk);
            attn.forward_kvcache(&Tensor::cuda(&q, lq), &cache, &mut TensorMut::cuda(&mut out, lq), None, &opts).unwrap();
        });
        // The same rows as two batched calls: q/out views of the packed tensor.
        let (lc, ld) = (Layout::contiguous(chunks, chunk, h, d), Layout::contiguous(nseq - chunks, 1, h, d));
        let (lc_o, ld_o) = (lc, ld);
        let split = chunks * chunk * h * d;
        let (t_c, t_d) = (table.slice(0..chunks * per), table.slice(chunks * per..));
        let (l_c, l_d) = (lens.slice(0..chunks), lens.slice(chunks..));
        let separate = time(&mut || {
            let (mut oc, mut od) = out.split_at_mut(split);
            let cache = KvCache::paged(Tensor::cuda(&kp, lp), Tensor::cuda(&vp, lp), BlockTable::cuda(&t_d, per, per), CacheLens::cuda(&l_d));
            attn.forward_kvcache(&Tensor::cuda(&q.slice(split..), ld), &cache, &mut TensorMut::cuda(&mut od, ld_o), None, &opts).unwrap();
            let cache = KvCache::paged(Tensor::cuda(&kp, lp), Tensor::cuda(&vp, lp), BlockTable::cuda(&t_c, per, per), CacheLens::cuda(&l_c));
            attn.forward_kvcache(&Tensor::cuda(&q.slice(0..split), lc), &cache, &mut TensorMut::cuda(&mut oc, lc_o), None, &opts).unwrap();
        });
        let plan = attn.explain(&Problem::new(DType::BF16, nseq, chunk, sk, h, hk, d).causal(true)).plan.unwrap_or_default();
        println!(
            "mixed batch (4 x 512-token chunks + 60 decodes, 4k keys each, paged 16, causal): one call {:.1} µs, two calls {:.1} µs (GPU time; wall {:.1} / {:.1})  ({plan})",
            mixed.gpu * 1e6,
            separate.gpu * 1e6,
            mixed.wall * 1e6,
            separate.wall * 1e6
        );
    }
    let submit = |what: &str| {
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
        let secs = t.elapsed().as_secs_f64() / n as f64;
        s.synchronize().unwrap();
        println!("host time to submit a tiny decode call ({what}): {:.2} µs", secs * 1e6);
    };
    // The floor: what the driver alone takes to submit one launch (an empty kernel, raw
    // cuLaunchKernel), so the table shows our own share of the submit time beside it.
    match &noop {
        Some(f) => {
            let raw = || unsafe { attention::cudarc::driver::result::launch_kernel(f.cu_function(), (1, 1, 1), (32, 1, 1), 0, s.cu_stream(), &mut []) }.unwrap();
            (0..100).for_each(|_| raw());
            s.synchronize().unwrap();
            let n = 500;
            let t = Instant::now();
            (0..n).for_each(|_| raw());
            let secs = t.elapsed().as_secs_f64() / n as f64;
            s.synchronize().unwrap();
            println!("host time to submit an empty kernel (cuLaunchKernel alone): {:.2} µs", secs * 1e6);
        }
        None => println!("launch floor not measured"),
    }
    submit("cudarc event tracking on");
    // SAFETY: every slice of this bench lives on the one stream `s`; nothing else uses them.
    unsafe { ctx.disable_event_tracking() };
    submit("event tracking off");
}

/// The bench's helper kernels: an empty one, and a grid-stride read of a buffer whose result is
/// kept only if it matches an unlikely value (so the loads stay) and never written in practice.
const HELPERS: &str = r#"
extern "C" __global__ void noop() {}
extern "C" __global__ void read_all(const uint4* p, unsigned long long n, unsigned* sink) {
    unsigned acc = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        const uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
"#;
