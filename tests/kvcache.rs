//! KV-cache calls on the CPU backend (host memory): contiguous and paged caches in the layouts
//! engines use, page sizes 1 to 256, GQA, 1 to 16 query rows, masks, soft-cap, lse, sequences
//! of length 0, against the f64 reference on a dense copy of each sequence.

mod common;

use attention::{BackendKind, BlockTable, CacheLens, Error, KvCache, Layout, LseMut, SeqLens, Selector, Settings, Tensor, TensorMut};
use common::gpu::tolerance;
use common::gpu::Place;
use common::kv::{cache_over, run_kv, KvCase, Store, SWEPT_STORES};
use common::reference::{rel_err, RefMask};
use common::rng::Rng;
use half::{bf16, f16};

fn cpu() -> attention::Attention {
    Selector::from_settings(Settings::default()).select().unwrap()
}

/// Runs a case on host memory, on the CPU backend; returns (rel. error of out, max |lse - ref|).
fn run<T: attention::Element + attention::cudarc::driver::DeviceRepr>(attn: &attention::Attention, c: &KvCase<T>) -> Result<(f64, f64), Error> {
    let (ran, err, lse) = run_kv(attn, &Place::Host, c)?;
    assert_eq!(ran, BackendKind::Cpu);
    Ok((err, lse))
}

fn sweep<T: attention::Element + attention::cudarc::driver::DeviceRepr>(dtype: attention::DType) {
    let attn = cpu();
    let mut rng = Rng::fresh();
    let masks = [
        RefMask::default(),
        RefMask { causal: true, ..RefMask::default() },
        RefMask { causal: true, left: Some(7), ..RefMask::default() },
        RefMask { softcap: Some(5.0), ..RefMask::default() },
    ];
    let mut n = 0;
    for (i, &store) in SWEPT_STORES.iter().enumerate() {
        for (h, hk) in [(8, 2), (4, 4), (6, 1)] {
            for q_len in [1, 3, 16] {
                let mask = masks[(i + q_len) % masks.len()];
                let max_len = [1, 37, 300][(i + h) % 3];
                let c = KvCase::<T>::new(&mut rng, store, 3, q_len, h, hk, 16, max_len, mask);
                let (err, lse) = run(&attn, &c).unwrap();
                assert!(err < tolerance(dtype) && lse < 1e-3, "{dtype} {store:?} h={h}/{hk} q_len={q_len} len={:?} {mask:?}: rel {err:.2e}, lse {lse:.2e} (seed {:#x})", c.lens, rng.get_seed());
                n += 1;
            }
        }
    }
    println!("{dtype}: {n} KV-cache cases match the reference");
}

/// Packed queries (`cu_seqlens_q`, vLLM v1's mixed batches): sequences with 0, 1, a few and
/// many query rows (chunked prefill) in one call, every cache layout, masks, lse `[heads,
/// total_q]`; rows match the same positions' rows of the fixed-length reference.
#[test]
fn packed_queries_of_different_lengths_match_the_reference() {
    let attn = cpu();
    let mut rng = Rng::fresh();
    let mut n = 0;
    for (i, store) in [Store::Contiguous, Store::PagedVllm { page_size: 16 }, Store::PagedHnd { page_size: 1 }, Store::ContiguousHeadsFirst]
        .into_iter()
        .enumerate()
    {
        for mask in [RefMask { causal: true, ..RefMask::default() }, RefMask::default(), RefMask { causal: true, left: Some(9), ..RefMask::default() }] {
            let c = KvCase::<f32>::new(&mut rng, store, 4, 40, 8, 2, 16, 300, mask);
            let rows = [[1, 0, 40, 7], [40, 3, 0, 1], [2, 40, 1, 0], [0, 1, 1, 40]][i];
            let (cu, q, lq, want, want_lse) = c.packed(&rows);
            let mut out = vec![f32::NAN; lq.numel()];
            let mut lse = vec![f32::NAN; want_lse.len()];
            let (k, v) = (Tensor::host(&c.k, c.lk), Tensor::host(&c.v[c.v_offset..], c.lk));
            let table = BlockTable::host(&c.table, c.pages_per_seq, c.table_stride);
            let cache = cache_over(&c, k, v, table, CacheLens::host(&c.lens)).with_varlen_queries(SeqLens::host(&cu), 40);
            attn.forward_kvcache(&Tensor::host(&q, lq), &cache, &mut TensorMut::host(&mut out, lq), Some(&mut LseMut::host(&mut lse)), &c.options()).unwrap();
            let got: Vec<f64> = out.iter().map(|&x| x as f64).collect();
            let err = rel_err(&got, &want);
            let lse_err = common::gpu::lse_error(lse.iter().map(|&x| x as f64), want_lse.iter().copied());
            assert!(err < 1e-5 && lse_err < 1e-3, "{store:?} {mask:?} rows {rows:?} lens {:?}: rel {err:.2e}, lse {lse_err:.2e}", c.lens);
            n += 1;
        }
    }
    // Bad prefix sums and bounds are typed errors that name the argument.
    let c = KvCase::<f32>::new(&mut rng, Store::Contiguous, 2, 4, 4, 2, 16, 20, RefMask::default());
    let (cu, q, lq, _, _) = c.packed(&[4, 2]);
    let mut out = vec![0f32; lq.numel()];
    let lens = CacheLens::host(&c.lens);
    for (bad, max, arg) in [(vec![0, 4, 5], 4, "cu_seqlens_q"), (vec![0, 5, 6], 4, "cu_seqlens_q"), (cu.clone(), 3, "cu_seqlens_q"), (cu.clone(), 0, "max_seqlen_q")] {
        let cache = KvCache::contiguous(Tensor::host(&c.k, c.lk), Tensor::host(&c.v, c.lk), CacheLens::host(&c.lens)).with_varlen_queries(SeqLens::host(&bad), max);
        let err = attn.forward_kvcache(&Tensor::host(&q, lq), &cache, &mut TensorMut::host(&mut out, lq), None, &c.options()).unwrap_err();
        assert!(err.to_string().contains(arg), "{bad:?} max {max}: {err}");
    }
    let batched = Layout::contiguous(2, 3, 4, 16);
    let cache = KvCache::contiguous(Tensor::host(&c.k, c.lk), Tensor::host(&c.v, c.lk), lens).with_varlen_queries(SeqLens::host(&cu), 4);
    let err = attn.forward_kvcache(&Tensor::host(&q, batched), &cache, &mut TensorMut::host(&mut out, batched), None, &c.options()).unwrap_err();
    assert!(err.to_string().contains("q"), "{err}");
    println!("{n} packed-query cases match the reference");
}

/// Long caches with few (sequence, kv head) blocks (one or two kv heads, or decode over four,
/// which one block takes together), so each one's keys are split into chunks on separate
/// threads and merged; a padding slot (length 0) in the same call gives zeros and -inf.
/// Contiguous and paged (page sizes 1, 16 and 48: pages that straddle chunk boundaries), every
/// mask.
#[test]
fn long_kv_cache_split_into_key_chunks_matches_the_reference() {
    let attn = cpu();
    let mut rng = Rng::fresh();
    let stores = [Store::Contiguous, Store::ContiguousHeadsFirst, Store::PagedVllm { page_size: 1 }, Store::PagedVllm { page_size: 16 }, Store::PagedHnd { page_size: 48 }];
    let masks = [
        RefMask::default(),
        RefMask { causal: true, left: Some(9), ..RefMask::default() },
        RefMask { softcap: Some(5.0), ..RefMask::default() },
    ];
    for (i, &store) in stores.iter().enumerate() {
        for (j, &mask) in masks.iter().enumerate() {
            let (h, hk, q_len) = [(4, 1, 1), (8, 2, 3), (16, 4, 1)][(i + j) % 3];
            let c = KvCase::<f32>::new(&mut rng, store, 3, q_len, h, hk, 16, 2600, mask);
            assert_eq!(c.lens[2], 0);
            let (err, lse) = run(&attn, &c).unwrap();
            assert!(err < 1e-5 && lse < 1e-4, "{store:?} h={h}/{hk} q_len={q_len} {mask:?} lens {:?}: rel {err:.2e}, lse {lse:.2e} (seed {:#x})", c.lens, rng.get_seed());
        }
    }
}

/// Head sizes that are not a multiple of any vector width (the CPU backend takes every
/// head_dim; the GPU decode kernels need multiples of 8): 1, 13 and 100, each cache layout.
#[test]
fn odd_head_dims_match_the_reference() {
    let attn = cpu();
    let mut rng = Rng::fresh();
    let stores = [Store::Contiguous, Store::PagedVllm { page_size: 16 }, Store::PagedHnd { page_size: 5 }];
    let mut n = 0;
    for (i, &store) in stores.iter().enumerate() {
        for (j, d) in [1, 13, 100].into_iter().enumerate() {
            let mask = [RefMask::default(), RefMask { causal: true, ..RefMask::default() }, RefMask { softcap: Some(5.0), ..RefMask::default() }][(i + j) % 3];
            let c = KvCase::<f32>::new(&mut rng, store, 3, [1, 2][(i + j) % 2], 8, 2, d, 70, mask);
            let (err, lse) = run(&attn, &c).unwrap();
            assert!(err < 1e-5 && lse < 1e-4, "{store:?} d={d} {mask:?} lens {:?}: rel {err:.2e}, lse {lse:.2e} (seed {:#x})", c.lens, rng.get_seed());
            let c = KvCase::<bf16>::new(&mut rng, store, 2, 1, 4, 4, d, 70, mask);
            let (err, lse) = run(&attn, &c).unwrap();
            assert!(err < tolerance(attention::DType::BF16) && lse < 1e-3, "bf16 {store:?} d={d} {mask:?}: rel {err:.2e}, lse {lse:.2e} (seed {:#x})", rng.get_seed());
            n += 2;
        }
    }
    println!("{n} odd-head_dim KV-cache cases match the reference");
}

/// One decode case of two sequences (one of `len` keys) against the reference.
#[allow(clippy::too_many_arguments)]
fn decode_case<T: attention::Element + attention::cudarc::driver::DeviceRepr>(attn: &attention::Attention, rng: &mut Rng, store: Store, (h, hk): (usize, usize), d: usize, len: usize, tol: f64, lse_tol: f64) {
    let c = KvCase::<T>::new(rng, store, 2, 1, h, hk, d, len, RefMask::default());
    let (err, lse) = run(attn, &c).unwrap();
    assert!(err < tol && lse < lse_tol, "{} {store:?} h={h}/{hk} d={d} lens {:?}: rel {err:.2e}, lse {lse:.2e} (seed {:#x})", T::DTYPE, c.lens, rng.get_seed());
}

/// Decode (one query row) at the shapes of the CPU's decode kernels: GQA 1, 4 and 8 (four
/// query heads per kv head take the AVX-512 kernels where the CPU has AVX-512F, which is
/// then what the default dispatch picks), head_dims with and without a tail of 16 elements,
/// 1 to 17 keys, contiguous caches and pages of 1, 16 and 64 keys, every element type.
#[test]
fn decode_at_odd_sizes_matches_the_reference() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        assert_eq!(attention::testing::cpu_isa(), "avx512");
    }
    let attn = cpu();
    let mut rng = Rng::fresh();
    let stores = [Store::Contiguous, Store::ContiguousHeadsFirst, Store::PagedVllm { page_size: 1 }, Store::PagedVllm { page_size: 16 }, Store::PagedHnd { page_size: 64 }];
    let mut n = 0;
    for (i, &store) in stores.iter().enumerate() {
        for (h, hk) in [(4, 4), (8, 2), (16, 2)] {
            for (j, d) in [8, 16, 72, 128, 256].into_iter().enumerate() {
                let len = 1 + (3 * i + 5 * j + h) % 17;
                decode_case::<f32>(&attn, &mut rng, store, (h, hk), d, len, 1e-5, 1e-4);
                decode_case::<bf16>(&attn, &mut rng, store, (h, hk), d, len, tolerance(attention::DType::BF16), 1e-3);
                decode_case::<f16>(&attn, &mut rng, store, (h, hk), d, len, tolerance(attention::DType::F16), 1e-3);
                n += 3;
            }
        }
    }
    println!("{n} decode cases match the reference");
}

#[test]
fn kv_cache_on_the_cpu_matches_the_reference_f32() {
    sweep::<f32>(attention::DType::F32);
}

#[test]
fn kv_cache_on_the_cpu_matches_the_reference_half() {
    sweep::<f16>(attention::DType::F16);
    sweep::<bf16>(attention::DType::BF16);
}

#[test]
fn kv_cache_arguments_are_checked() {
    let attn = cpu();
    let mut rng = Rng::seed(7);
    let c = KvCase::<f32>::new(&mut rng, Store::PagedVllm { page_size: 4 }, 2, 1, 4, 2, 8, 10, RefMask::default());
    let mut out = vec![0f32; c.lq.numel()];
    let q = Tensor::host(&c.q, c.lq);
    let k = || Tensor::host(&c.k[..], c.lk);
    let v = || Tensor::host(&c.v[c.v_offset..], c.lk);
    let expect = |r: Result<BackendKind, Error>, arg: &str, needle: &str| match r {
        Err(Error::InvalidArgument { arg: a, .. }) if a == arg => {
            let t = r.unwrap_err().to_string();
            assert!(t.contains(needle), "{t}");
        }
        other => panic!("expected InvalidArgument({arg}), got {other:?}"),
    };
    // A length past the capacity (3 pages of 4 keys).
    let lens = [13, 2];
    let cache = KvCache::paged(k(), v(), BlockTable::host(&c.table, c.pages_per_seq, c.table_stride), CacheLens::host(&lens));
    expect(attn.forward_kvcache(&q, &cache, &mut TensorMut::host(&mut out, c.lq), None, &c.options()), "cache_lens", "entry 0 = 13");
    // A page id outside the pages.
    let mut table = c.table.clone();
    table[0] = 10_000;
    let cache = KvCache::paged(k(), v(), BlockTable::host(&table, c.pages_per_seq, c.table_stride), CacheLens::host(&c.lens));
    expect(attn.forward_kvcache(&q, &cache, &mut TensorMut::host(&mut out, c.lq), None, &c.options()), "block_table", "page 10000");
    // One length per sequence.
    let cache = KvCache::paged(k(), v(), BlockTable::host(&c.table, c.pages_per_seq, c.table_stride), CacheLens::host(&c.lens[..1]));
    expect(attn.forward_kvcache(&q, &cache, &mut TensorMut::host(&mut out, c.lq), None, &c.options()), "cache_lens", "1 entries");
    // A table too short for the batch.
    let cache = KvCache::paged(k(), v(), BlockTable::host(&c.table[..2], c.pages_per_seq, c.table_stride), CacheLens::host(&c.lens));
    expect(attn.forward_kvcache(&q, &cache, &mut TensorMut::host(&mut out, c.lq), None, &c.options()), "block_table", "entries");
    // A contiguous cache with the wrong batch.
    let lc = Layout::contiguous(3, 10, 2, 8);
    let buf = vec![0f32; lc.numel()];
    let cache = KvCache::contiguous(Tensor::host(&buf, lc), Tensor::host(&buf, lc), CacheLens::host(&c.lens));
    expect(attn.forward_kvcache(&q, &cache, &mut TensorMut::host(&mut out, c.lq), None, &c.options()), "k_cache", "batch 3");
    assert!(out.iter().all(|&x| x == 0.0), "a failed call wrote the output");
}

/// What runs a KV-cache call: `explain` names decode (GPU) and cpu, and says why the prefill
/// backends are not candidates.
#[test]
fn kv_cache_problems_are_explained() {
    use attention::{DType, KvCacheKind, Problem};
    let attn = cpu();
    let p = Problem::new(DType::BF16, 4, 1, 4096, 32, 8, 128).kv_cache(KvCacheKind::Paged { page_size: 16 }).on_host();
    let e = attn.explain(&p);
    assert_eq!(e.chosen, Some(BackendKind::Cpu));
    let text = e.to_string();
    assert!(text.contains("KV-cache call"), "{text}");
}
