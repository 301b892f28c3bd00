//! GPU tests of the decode backend: KV-cache calls (contiguous and paged, page sizes 1 to 256,
//! vLLM and FlashInfer layouts, GQA, 1 to 16 query rows, masks, soft-cap, lse, padding slots of
//! length 0, split and unsplit grids), dense decode-shaped `forward` calls, and a CUDA graph
//! replayed with new lengths and block tables. They need a CUDA device, so they are ignored
//! unless the `gpu-tests` feature is on; with it on and no device they fail (never pass by
//! skipping).

mod common;

use std::sync::{Arc, Mutex};

use attention::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use attention::{
    Attention, BackendKind, BlockTable, CacheLens, DType, Element, KvCache, Layout, LseMut, Options, Tensor, TensorMut,
};
use common::gpu::{check_all, gpu, lse_error, s as shape, tolerance, Case};
use common::gpu::Place;
use common::kv::{cache_over, run_kv, upload, KvCase, Store, SWEPT_STORES};
use common::reference::{rel_err, RefMask};
use common::rng::Rng;
use half::{bf16, f16};


/// Runs a case through `forward_kvcache` on the device; (backend, rel. error, lse error).
fn run<T: Element + DeviceRepr>(attn: &Attention, s: &Arc<CudaStream>, c: &KvCase<T>) -> (BackendKind, f64, f64) {
    run_kv(attn, &Place::Device(s.clone()), c).unwrap()
}

fn sweep<T: Element + DeviceRepr>(dtype: DType, dims: &[usize]) -> usize {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    let masks = [
        RefMask::default(),
        RefMask { causal: true, ..RefMask::default() },
        RefMask { causal: true, left: Some(100), ..RefMask::default() },
        RefMask { softcap: Some(20.0), causal: true, ..RefMask::default() },
    ];
    let mut n = 0;
    for (i, &store) in SWEPT_STORES.iter().enumerate() {
        for &d in dims {
            for (batch, h, hk) in [(1, 32, 8), (3, 8, 8), (5, 16, 2), (2, 8, 1)] {
                for q_len in [1, 2, 5, 16] {
                    let mask = masks[(i + q_len + h) % masks.len()];
                    // Short, tile-ragged and long (split) caches.
                    let max_len = [1, 77, 1000, 3000][(i + n) % 4];
                    let c = KvCase::<T>::new(&mut rng, store, batch, q_len, h, hk, d, max_len, mask);
                    let (ran, err, lse) = run(&attn, &s, &c);
                    assert_eq!(ran, BackendKind::Decode);
                    assert!(
                        err < tolerance(dtype) && lse < 2e-3,
                        "{dtype} {store:?} b={batch} h={h}/{hk} d={d} q_len={q_len} lens={:?} {mask:?}: rel {err:.2e}, lse {lse:.2e} (seed {seed:#x})",
                        c.lens
                    );
                    n += 1;
                }
            }
        }
    }
    println!("{dtype}: {n} KV-cache cases on the decode kernels match the reference (seed {seed:#x})");
    n
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn kv_cache_bf16_matches_reference() {
    sweep::<bf16>(DType::BF16, &[128, 64, 256]);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn kv_cache_f16_and_f32_match_reference() {
    sweep::<f16>(DType::F16, &[128, 40]);
    sweep::<f32>(DType::F32, &[128, 36]);
}

/// Held by a test while it sets the two-warp switch, and by one that checks which kernel the
/// plan names (the two-warp kernels have no streamed twin): the switches are process-wide.
static PLAN_SWITCHES: Mutex<()> = Mutex::new(());

/// The two-warp kernels (a bench switch) compute what the four-warp ones do: the sweep with
/// them switched on. (Tests running meanwhile in this process see them too, which they must
/// also pass with.)
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn two_warp_kernels_match_the_reference() {
    let _switches = PLAN_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    attention::testing::set_decode_two_warp_blocks(true);
    let n = sweep::<bf16>(DType::BF16, &[128, 64, 256]);
    attention::testing::set_decode_two_warp_blocks(false);
    assert!(n > 0);
}

/// The plan's alternatives to what the sweeps' small problems take: split grids merged by the
/// combine kernel (on sm_90 the plan merges up to 16 splits inside a thread block cluster) and
/// plain K/V loads (the plan streams them below a few hundred MB): the sweep with both forced.
/// (Tests running meanwhile see them too, which they must also pass with.) On sm_90 `explain`
/// names the plan's cluster merge and streamed kernel for a short batch-1 call.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn combine_merge_and_plain_loads_match_the_reference() {
    use attention::testing::{set_decode_loads, set_decode_merge, DecodeLoads, DecodeMerge};
    let (attn, _) = gpu();
    let plan = {
        let _switches = PLAN_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        attn.explain(&attention::Problem::new(DType::BF16, 1, 1, 1024, 32, 8, 128)).plan.unwrap_or_default()
    };
    let cc = attn.device_caps().map(|c| c.cc.major).unwrap_or(0);
    println!("batch 1 over 1024 keys on sm_{cc}x: {plan}");
    if cc == 9 {
        assert!(plan.contains("merged in one cluster"), "sm_90 merges 16 splits in a cluster: {plan}");
    }
    assert!(plan.contains("_ef "), "4 MB of K/V stream: {plan}");
    set_decode_merge(DecodeMerge::Combine);
    set_decode_loads(DecodeLoads::Plain);
    let n = sweep::<bf16>(DType::BF16, &[128, 64]);
    set_decode_merge(DecodeMerge::Plan);
    set_decode_loads(DecodeLoads::Plan);
    assert!(n > 0);
}

/// Dense decode-shaped `forward` calls (q_len ≤ 16) run on the decode kernels: GQA, MQA,
/// heads-first (PyTorch's) layout, causal. Through the shared case runner, as `forward` calls
/// (no lse asked for).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn dense_decode_shapes_run_on_the_decode_backend() {
    let (attn, s) = gpu();
    let cases = [(1, 1, 8192, 32, 8, 128, false), (16, 1, 1000, 32, 8, 128, true), (4, 4, 3000, 8, 1, 64, true), (2, 16, 300, 16, 16, 256, true)]
        .map(|(b, sq, sk, h, hk, d, causal)| {
            let mask = RefMask { causal, ..RefMask::default() };
            Case::dense(DType::BF16, shape(b, sq, sk, h, hk, d), mask, true).without_lse().expect(BackendKind::Decode)
        });
    check_all(&attn, &Place::Device(s), "dense decode", cases);
    println!("dense decode shapes: decode backend, all within tolerance");
}

/// A paged decode captured once in a CUDA graph and replayed with new lengths (padding slots of
/// length 0 included) and new block tables: every replay matches the reference.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn paged_decode_graph_replays_with_new_lengths_and_tables() {
    use attention::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let (attn, default_stream) = gpu();
    // SAFETY: every slice below lives on this one stream (see tests/gpu.rs's graph test).
    unsafe { default_stream.context().disable_event_tracking() };
    let s = default_stream.context().new_stream().unwrap();
    let mut rng = Rng::fresh();
    let mut c = KvCase::<bf16>::new(&mut rng, Store::PagedVllm { page_size: 16 }, 4, 1, 32, 8, 128, 3000, RefMask::default());
    let d = upload(&s, &c);
    let (mut lens_dev, mut table_dev) = (d.lens, d.table);
    let mut out: CudaSlice<bf16> = s.alloc_zeros(c.lq.numel()).unwrap();
    let n = c.lk.numel();
    let run = |lens: &CudaSlice<i32>, table: &CudaSlice<i32>, out: &mut CudaSlice<bf16>| {
        let (kv, vv) = (d.kv.slice(0..n), d.kv.slice(c.v_offset..c.v_offset + n));
        let cache = KvCache::paged(Tensor::cuda(&kv, c.lk), Tensor::cuda(&vv, c.lk), BlockTable::cuda(table, c.pages_per_seq, c.table_stride), CacheLens::cuda(lens));
        attn.forward_kvcache(&Tensor::cuda(&d.q, c.lq), &cache, &mut TensorMut::cuda(out, c.lq), None, &Options::default())
    };
    run(&lens_dev, &table_dev, &mut out).unwrap();
    s.synchronize().unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = run(&lens_dev, &table_dev, &mut out);
    let graph = s.end_capture(CUgraphInstantiate_flags(0)).unwrap();
    assert_eq!(captured.unwrap(), BackendKind::Decode);
    let graph = graph.expect("the capture recorded the call");
    for step in 0..4 {
        // New lengths (one padding slot), the same pages in a new order.
        c.lens = (0..c.batch).map(|i| if i == step % c.batch { 0 } else { 1 + rng.below(3000) as i32 }).collect();
        let mut rows: Vec<Vec<i32>> = (0..c.batch).map(|b| c.table[b * c.table_stride..b * c.table_stride + c.pages_per_seq].to_vec()).collect();
        rows.rotate_left(1);
        for (b, r) in rows.iter().enumerate() {
            c.table[b * c.table_stride..b * c.table_stride + c.pages_per_seq].copy_from_slice(r);
        }
        let fresh = KvCase::<bf16>::recompute(&c);
        s.memcpy_htod(&c.lens, &mut lens_dev).unwrap();
        s.memcpy_htod(&c.table, &mut table_dev).unwrap();
        s.memcpy_htod(&vec![bf16::NAN; c.lq.numel()], &mut out).unwrap();
        graph.launch().unwrap();
        s.synchronize().unwrap();
        let got: Vec<f64> = s.clone_dtoh(&out).unwrap().iter().map(|x| x.to_f64()).collect();
        let err = rel_err(&got, &fresh);
        assert!(err < tolerance(DType::BF16), "replay {step} lens {:?}: rel {err:.2e}", c.lens);
    }
    println!("paged decode graph: 4 replays with new lengths and tables, all within tolerance");
}

/// The same replays through a caller's workspace (sized by `kvcache_workspace_bytes`): the call
/// allocates nothing, so the graph holds kernels only; a workspace too small for the plan's
/// splits still gives the right rows (fewer splits); one on another stream is a typed error.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn decode_with_a_caller_workspace_replays_in_a_graph_and_tolerates_small_ones() {
    use attention::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use attention::{Problem, Workspace};
    let (attn, default_stream) = gpu();
    // SAFETY: every slice below lives on this one stream (see tests/gpu.rs's graph test).
    unsafe { default_stream.context().disable_event_tracking() };
    let s = default_stream.context().new_stream().unwrap();
    let mut rng = Rng::fresh();
    // 2 sequences x 4 KV heads over 9000 keys: more splits than one cluster holds (16), and cut
    // to 16 each would take over 512 keys, so even on sm_90 (where shorter split grids merge in
    // a cluster) the combine runs and needs a workspace, whatever switch other tests set.
    let mut c = KvCase::<bf16>::new(&mut rng, Store::PagedVllm { page_size: 16 }, 2, 1, 32, 4, 128, 9000, RefMask::default());
    let bytes = attn.kvcache_workspace_bytes(&Problem::new(DType::BF16, c.batch, c.q_len, c.pages_per_seq * 16, c.heads, 4, 128));
    assert!(bytes > 0, "batch 2 x 4 KV heads over 9000 keys splits: it needs a workspace");
    let d = upload(&s, &c);
    let (mut lens_dev, mut table_dev) = (d.lens, d.table);
    let mut out: CudaSlice<bf16> = s.alloc_zeros(c.lq.numel()).unwrap();
    let n = c.lk.numel();
    let run = |lens: &CudaSlice<i32>, table: &CudaSlice<i32>, out: &mut CudaSlice<bf16>, ws: &mut CudaSlice<u8>| {
        let (kv, vv) = (d.kv.slice(0..n), d.kv.slice(c.v_offset..c.v_offset + n));
        let cache = KvCache::paged(Tensor::cuda(&kv, c.lk), Tensor::cuda(&vv, c.lk), BlockTable::cuda(table, c.pages_per_seq, c.table_stride), CacheLens::cuda(lens));
        attn.forward_kvcache_with_workspace(&Tensor::cuda(&d.q, c.lq), &cache, &mut TensorMut::cuda(out, c.lq), None, &Options::default(), &mut Workspace::cuda(ws))
    };
    let check = |c: &KvCase<bf16>, out: &CudaSlice<bf16>, what: &str| {
        let fresh = KvCase::<bf16>::recompute(c);
        let got: Vec<f64> = s.clone_dtoh(out).unwrap().iter().map(|x| x.to_f64()).collect();
        let err = rel_err(&got, &fresh);
        assert!(err < tolerance(DType::BF16), "{what} lens {:?}: rel {err:.2e}", c.lens);
    };
    // Too small for every split (room for 1.5 of them, and none at all): still right.
    let split = c.batch * c.heads * c.q_len * (128 + 1) * 4; // one split's partial outputs and lse
    for small in [split * 3 / 2, 16] {
        let mut ws: CudaSlice<u8> = s.alloc_zeros(small).unwrap();
        s.memcpy_htod(&vec![bf16::NAN; c.lq.numel()], &mut out).unwrap();
        assert_eq!(run(&lens_dev, &table_dev, &mut out, &mut ws).unwrap(), BackendKind::Decode);
        check(&c, &out, &format!("{small}-byte workspace"));
    }
    // A workspace on another stream than out's is refused, naming it.
    let other = default_stream.context().new_stream().unwrap();
    let mut elsewhere: CudaSlice<u8> = other.alloc_zeros(bytes).unwrap();
    let err = run(&lens_dev, &table_dev, &mut out, &mut elsewhere).unwrap_err();
    assert!(err.to_string().contains("workspace"), "{err}");
    // Captured once with a full workspace, replayed with new lengths and tables.
    let mut ws: CudaSlice<u8> = s.alloc_zeros(bytes).unwrap();
    run(&lens_dev, &table_dev, &mut out, &mut ws).unwrap();
    s.synchronize().unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = run(&lens_dev, &table_dev, &mut out, &mut ws);
    let graph = s.end_capture(CUgraphInstantiate_flags(0)).unwrap();
    assert_eq!(captured.unwrap(), BackendKind::Decode);
    let graph = graph.expect("the capture recorded the call");
    for step in 0..4 {
        c.lens = (0..c.batch).map(|i| if i == step % c.batch { 0 } else { 1 + rng.below(9000) as i32 }).collect();
        let mut rows: Vec<Vec<i32>> = (0..c.batch).map(|b| c.table[b * c.table_stride..b * c.table_stride + c.pages_per_seq].to_vec()).collect();
        rows.rotate_left(1);
        for (b, r) in rows.iter().enumerate() {
            c.table[b * c.table_stride..b * c.table_stride + c.pages_per_seq].copy_from_slice(r);
        }
        s.memcpy_htod(&c.lens, &mut lens_dev).unwrap();
        s.memcpy_htod(&c.table, &mut table_dev).unwrap();
        s.memcpy_htod(&vec![bf16::NAN; c.lq.numel()], &mut out).unwrap();
        graph.launch().unwrap();
        s.synchronize().unwrap();
        check(&c, &out, &format!("replay {step}"));
    }
    println!("decode with a caller workspace of {bytes} bytes: small ones and 4 graph replays within tolerance");
}

/// A few small cases for compute-sanitizer (memcheck, racecheck): paged with 1- and 16-key
/// pages, contiguous, split and unsplit grids, 1 and 5 query rows, a padding slot.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn kv_cache_small_cases_for_sanitizers() {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    for (store, batch, q_len, max_len) in [
        (Store::PagedVllm { page_size: 1 }, 3, 1, 300),
        (Store::PagedHnd { page_size: 16 }, 1, 5, 2000),
        (Store::Contiguous, 4, 2, 90),
    ] {
        let c = KvCase::<bf16>::new(&mut rng, store, batch, q_len, 8, 2, 128, max_len, RefMask { causal: true, ..RefMask::default() });
        let (ran, err, lse) = run(&attn, &s, &c);
        assert_eq!(ran, BackendKind::Decode);
        assert!(err < tolerance(DType::BF16) && lse < 2e-3, "{store:?}: rel {err:.2e} lse {lse:.2e}");
    }
}

/// Packed queries (`cu_seqlens_q` in device memory): vLLM v1's mixed batches of decode tokens,
/// speculative rows and prefill chunks (40 rows, 160 packed rows per KV head) over contiguous
/// and paged caches, split and unsplit grids, f16/bf16 (tensor cores) and f32 (CUDA cores),
/// with lse `[heads, total_q]`; rows outside every sequence stay as they were (poison kept).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn packed_queries_of_different_lengths_match_the_reference() {
    fn case<T: Element + DeviceRepr>(attn: &Attention, s: &Arc<CudaStream>, rng: &mut Rng, store: Store, rows: &[usize], max_len: usize, mask: RefMask) {
        let c = KvCase::<T>::new(rng, store, rows.len(), 40, 8, 2, 128, max_len, mask);
        let (cu, q, lq, want, want_lse) = c.packed(rows);
        // One row past the last sequence that no sequence owns: it must keep its poison.
        let total = lq.seqlen();
        let lq1 = Layout::contiguous(1, total + 1, 8, 128);
        let mut qx = q.clone();
        qx.extend(std::iter::repeat_n(T::from_f32(0.5), 8 * 128));
        let d = upload(s, &c);
        let (qd, cud) = (s.clone_htod(&qx).unwrap(), s.clone_htod(&cu).unwrap());
        let mut out: CudaSlice<T> = s.clone_htod(&vec![T::from_f32(f32::NAN); lq1.numel()]).unwrap();
        let mut lse: CudaSlice<f32> = s.clone_htod(&vec![f32::NAN; 8 * (total + 1)]).unwrap();
        let (kview, vview) = d.views(&c);
        let (k, v) = (Tensor::cuda(&kview, c.lk), Tensor::cuda(&vview, c.lk));
        let table = BlockTable::cuda(&d.table, c.pages_per_seq, c.table_stride);
        let cache = cache_over(&c, k, v, table, CacheLens::cuda(&d.lens)).with_varlen_queries(attention::SeqLens::cuda(&cud), 40);
        let ran = attn
            .forward_kvcache(&Tensor::cuda(&qd, lq1), &cache, &mut TensorMut::cuda(&mut out, lq1), Some(&mut LseMut::cuda(&mut lse)), &c.options())
            .unwrap();
        assert_eq!(ran, BackendKind::Decode);
        let got = s.clone_dtoh(&out).unwrap();
        assert!(got[total * 8 * 128..].iter().all(|x| x.to_f32().is_nan()), "the row no sequence owns was written");
        let got: Vec<f64> = got[..total * 8 * 128].iter().map(|x| x.to_f32() as f64).collect();
        let l = s.clone_dtoh(&lse).unwrap();
        // lse is [heads, total_q + 1] here: compare each head's first total entries.
        let l: Vec<f64> = (0..8).flat_map(|h| l[h * (total + 1)..h * (total + 1) + total].to_vec()).map(|x| x as f64).collect();
        let (err, lerr) = (rel_err(&got, &want), lse_error(l.into_iter(), want_lse.iter().copied()));
        let dtype = T::DTYPE;
        assert!(err < tolerance(dtype) && lerr < 2e-3, "{dtype} {store:?} rows {rows:?} lens {:?} {mask:?}: rel {err:.2e}, lse {lerr:.2e}", c.lens);
    }
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let mut n = 0;
    let causal = RefMask { causal: true, ..RefMask::default() };
    for (store, rows, max_len) in [
        // Long caches and few sequences: split grids.
        (Store::PagedVllm { page_size: 16 }, vec![1, 40, 4, 0], 3000),
        (Store::Contiguous, vec![40, 1, 1, 7], 2500),
        (Store::PagedHnd { page_size: 1 }, vec![3, 0, 40], 700),
        // Many sequences: unsplit grids.
        (Store::PagedVllm { page_size: 64 }, (0..40).map(|i| [1, 1, 1, 40, 2][i % 5]).collect(), 300),
    ] {
        for mask in [causal, RefMask::default(), RefMask { causal: true, left: Some(100), softcap: Some(10.0), ..RefMask::default() }] {
            case::<bf16>(&attn, &s, &mut rng, store, &rows, max_len, mask);
            case::<f16>(&attn, &s, &mut rng, store, &rows, max_len, mask);
            case::<f32>(&attn, &s, &mut rng, store, &rows, max_len, mask);
            n += 3;
        }
    }
    println!("{n} packed-query cases match the reference");
}
