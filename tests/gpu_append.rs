//! GPU tests of the K/V append kernel (cuda/append.cu) and the fused append + attention call:
//! contiguous caches in both orders and vLLM / HND pages of 1, 16 and 256 rows, new rows in
//! several layouts (vLLM's `[num_tokens, kv_heads, d]` included), 1 and 7 new rows, padding
//! tokens, lengths at the cache's capacity, 16-byte vector and element copies, all three
//! dtypes; caches NaN-poisoned outside the rows they held and compared bit for bit with the
//! one computed on the host; device slots and lengths outside the cache skipped without a
//! fault; a CUDA graph of append + attention replayed with new slots, lengths and rows. Packed
//! rows (`KvCacheMut::with_varlen_queries`) likewise, with device prefix sums: every store, a
//! graph replayed with new prefix sums, malformed sums that must write only inside the cache
//! (guard bytes around it). They need a CUDA device, so they are ignored unless the `gpu-tests`
//! feature is on; with it on and no device they fail (never pass by skipping).
//! `append_bandwidth` is a report (1000 appends of 128 tokens x 8 kv heads x d128 bf16, timed
//! with CUDA events): run it by name with `--ignored --nocapture`.

mod common;
#[path = "common/append.rs"]
mod append_case;

use std::sync::Arc;

use append_case::{first_difference, nan, new_layouts, AppendCase, NewLayout, Packed, Run, PACKED_LAYOUTS, PACKED_ROWS, STORES};
use attention::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use attention::{
    Attention, BackendKind, BlockTable, CacheLens, DType, Element, Error, KvCache, KvCacheMut, Layout, LseMut, Options,
    SeqLens, SlotMapping, Tensor, TensorMut,
};
use common::gpu::{gpu, tolerance};
use common::kv::Store;
use common::reference::{rel_err, RefMask};
use common::rng::Rng;
use half::{bf16, f16};


/// Device copies of a case or of its packed rows: the cache (K then V), the new rows, slots,
/// lengths, table, q, and for packed rows the prefix sums.
struct Dev<T> {
    cache: CudaSlice<T>,
    k_new: CudaSlice<T>,
    v_new: CudaSlice<T>,
    slots: CudaSlice<i64>,
    lens: CudaSlice<i32>,
    table: CudaSlice<i32>,
    q: CudaSlice<T>,
    cu: CudaSlice<i32>,
    /// The new rows' and q's layouts.
    ln: Layout,
    lq: Layout,
    /// Packed rows: `max_seqlen_q` (the calls then take `cu`).
    max_q: Option<usize>,
    /// Elements of `cache` before K (guard bytes around the cache; 0 but in one test).
    guard: usize,
}

fn upload<T: Element + DeviceRepr>(s: &Arc<CudaStream>, c: &AppendCase<T>) -> Dev<T> {
    upload_rows(s, c, None)
}

/// The device copies of the case, or of its packed rows `p`.
fn upload_rows<T: Element + DeviceRepr>(s: &Arc<CudaStream>, c: &AppendCase<T>, p: Option<&Packed<T>>) -> Dev<T> {
    let nonempty = |v: &[i32]| if v.is_empty() { vec![0] } else { v.to_vec() };
    let slots = p.map_or(&c.slots, |p| &p.slots);
    let slots = if slots.is_empty() { vec![0] } else { slots.clone() };
    let (before, k_new, v_new, q) = match p {
        None => (&c.before, &c.k_new, &c.v_new, &c.kv.q),
        Some(p) => (&p.before, &p.k_new, &p.v_new, &p.q),
    };
    Dev {
        cache: s.clone_htod(before).unwrap(),
        k_new: s.clone_htod(k_new).unwrap(),
        v_new: s.clone_htod(v_new).unwrap(),
        slots: s.clone_htod(&slots).unwrap(),
        lens: s.clone_htod(&c.kv.lens).unwrap(),
        table: s.clone_htod(&nonempty(&c.kv.table)).unwrap(),
        q: s.clone_htod(q).unwrap(),
        cu: s.clone_htod(&p.map_or(vec![0], |p| p.cu.clone())).unwrap(),
        ln: p.map_or(c.ln, |p| p.ln),
        lq: p.map_or(c.kv.lq, |p| p.lq),
        max_q: p.map(|p| p.max_q),
        guard: 0,
    }
}

/// Runs `f` on the device cache as `append_kv` and the fused call take it (pages with their
/// table when `with_table`; packed rows with their prefix sums), and the new rows and q:
/// `[k_new, v_new, q]`.
fn with_cache<T: Element + DeviceRepr, R>(
    c: &AppendCase<T>,
    d: &mut Dev<T>,
    with_table: bool,
    f: impl FnOnce(&mut KvCacheMut<'_, T>, [Tensor<'_, T>; 3]) -> R,
) -> R {
    let Dev { cache, k_new, v_new, slots, lens, table, q, cu, ln, lq, max_q, guard } = d;
    let mut kv = cache.slice_mut(*guard..*guard + 2 * c.n);
    let (mut k, mut v) = kv.split_at_mut(c.n);
    let (k, v) = (TensorMut::cuda(&mut k, c.kv.lk), TensorMut::cuda(&mut v, c.kv.lk));
    let m = match (c.paged, with_table) {
        (false, _) => KvCacheMut::contiguous(k, v, CacheLens::cuda(lens)),
        (true, false) => KvCacheMut::paged(k, v, SlotMapping::cuda(slots)),
        (true, true) => KvCacheMut::paged(k, v, SlotMapping::cuda(slots))
            .with_block_table(BlockTable::cuda(table, c.kv.pages_per_seq, c.kv.table_stride), CacheLens::cuda(lens)),
    };
    let mut m = match max_q {
        None => m,
        Some(max_q) => m.with_varlen_queries(SeqLens::cuda(cu), *max_q),
    };
    f(&mut m, [Tensor::cuda(k_new, *ln), Tensor::cuda(v_new, *ln), Tensor::cuda(q, *lq)])
}

/// `append_kv` on the device; the cache as it is afterwards.
fn append<T: Element + DeviceRepr>(attn: &Attention, s: &Arc<CudaStream>, c: &AppendCase<T>, d: &mut Dev<T>) -> Result<Vec<T>, Error> {
    with_cache(c, d, false, |m, [k_new, v_new, _]| attn.append_kv(&k_new, &v_new, m))?;
    Ok(s.clone_dtoh(&d.cache).unwrap())
}

/// Out and lse for q of layout `lq`, NaN-poisoned on the device: lse `[batch, heads, q_len]`,
/// or for packed queries `[heads, total_q]` (the same count).
fn poisoned<T: Element + DeviceRepr>(s: &Arc<CudaStream>, lq: Layout) -> (CudaSlice<T>, CudaSlice<f32>) {
    (s.clone_htod(&vec![nan::<T>(); lq.numel()]).unwrap(), s.clone_htod(&vec![f32::NAN; lq.batch() * lq.heads() * lq.seqlen()]).unwrap())
}

/// `forward_kvcache_append` on the device (out and lse NaN-poisoned first): (backend, cache
/// after, out, lse).
fn fused<T: Element + DeviceRepr>(attn: &Attention, s: &Arc<CudaStream>, c: &AppendCase<T>, d: &mut Dev<T>) -> (BackendKind, Vec<T>, Vec<T>, Vec<f32>) {
    let lq = d.lq;
    let (mut out, mut lse) = poisoned::<T>(s, lq);
    let ran = with_cache(c, d, true, |m, [k_new, v_new, q]| {
        attn.forward_kvcache_append(&q, &k_new, &v_new, m, &mut TensorMut::cuda(&mut out, lq), Some(&mut LseMut::cuda(&mut lse)), &c.kv.options())
    })
    .unwrap_or_else(|e| panic!("{}: {e}", c.describe()));
    (ran, s.clone_dtoh(&d.cache).unwrap(), s.clone_dtoh(&out).unwrap(), s.clone_dtoh(&lse).unwrap())
}

/// `forward_kvcache` over the device cache as it is: (out, lse).
fn attend<T: Element + DeviceRepr>(attn: &Attention, s: &Arc<CudaStream>, c: &AppendCase<T>, d: &Dev<T>) -> (Vec<T>, Vec<f32>) {
    let (mut out, mut lse) = poisoned::<T>(s, d.lq);
    let (k, v) = (d.cache.slice(d.guard..d.guard + c.n), d.cache.slice(d.guard + c.n..d.guard + 2 * c.n));
    let (k, v) = (Tensor::cuda(&k, c.kv.lk), Tensor::cuda(&v, c.kv.lk));
    let lens = CacheLens::cuda(&d.lens);
    let cache = if c.paged {
        KvCache::paged(k, v, BlockTable::cuda(&d.table, c.kv.pages_per_seq, c.kv.table_stride), lens)
    } else {
        KvCache::contiguous(k, v, lens)
    };
    let cache = match d.max_q {
        None => cache,
        Some(max_q) => cache.with_varlen_queries(SeqLens::cuda(&d.cu), max_q),
    };
    attn.forward_kvcache(&Tensor::cuda(&d.q, d.lq), &cache, &mut TensorMut::cuda(&mut out, d.lq), Some(&mut LseMut::cuda(&mut lse)), &c.kv.options())
        .unwrap();
    (s.clone_dtoh(&out).unwrap(), s.clone_dtoh(&lse).unwrap())
}

fn append_sweep<T: Element + DeviceRepr>(dims: &[usize]) -> usize {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    let mut n = 0;
    for (i, &store) in STORES.iter().enumerate() {
        for (l, &layout) in new_layouts(store).iter().enumerate() {
            for &d in dims {
                for new_len in [1, 7] {
                    let (batch, max_len) = [(3, 7), (5, 77), (2, 1000)][(i + l + new_len + d) % 3];
                    let c = AppendCase::<T>::new(&mut rng, store, batch, new_len, (8, 2, d), max_len, RefMask::default(), layout);
                    let mut dev = upload(&s, &c);
                    let got = append(&attn, &s, &c, &mut dev).unwrap_or_else(|e| panic!("{}: {e} (seed {seed:#x})", c.describe()));
                    if let Some(e) = first_difference(&got, &c.after) {
                        panic!("{}: element {e} is {:?}, expected {:?} (seed {seed:#x})", c.describe(), got[e], c.after[e]);
                    }
                    n += 1;
                }
            }
        }
    }
    println!("{}: {n} device appends wrote exactly the expected rows (seed {seed:#x})", T::DTYPE);
    n
}

/// head_dim 128 and 64 move as 16-byte vectors (Padded rows stay 16-byte aligned); 36 of a
/// 16-bit type (72-byte rows) takes the element copy, 36 of f32 (144 bytes) vectors.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn device_appends_write_exactly_the_new_rows() {
    append_sweep::<bf16>(&[128, 36]);
    append_sweep::<f16>(&[64, 36]);
    append_sweep::<f32>(&[128, 36]);
}

/// The element copy also runs for 16-byte rows whose base is not 16-byte aligned.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn unaligned_new_rows_take_the_element_copy() {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let c = AppendCase::<bf16>::new(&mut rng, Store::PagedVllm { page_size: 16 }, 4, 1, (8, 8, 128), 100, RefMask::default(), NewLayout::Tokens);
    let mut dev = upload(&s, &c);
    // The new rows one element into a larger buffer: 2-byte aligned only.
    let mut shifted = vec![bf16::ZERO];
    shifted.extend_from_slice(&c.k_new);
    let shifted = s.clone_htod(&shifted).unwrap();
    let view = shifted.slice(1..);
    {
        let (mut k, mut v) = dev.cache.split_at_mut(c.n);
        let mut cache = KvCacheMut::paged(TensorMut::cuda(&mut k, c.kv.lk), TensorMut::cuda(&mut v, c.kv.lk), SlotMapping::cuda(&dev.slots));
        attn.append_kv(&Tensor::cuda(&view, c.ln), &Tensor::cuda(&dev.v_new, c.ln), &mut cache).unwrap();
    }
    let got = s.clone_dtoh(&dev.cache).unwrap();
    assert_eq!(first_difference(&got, &c.after), None);
}

/// On the device, the fused call and `append_kv` then `forward_kvcache` from the cache before
/// (the case's, or its packed rows' with `p`; outputs NaN-poisoned first), checked as
/// [`AppendCase::check_fused`] says.
fn check_fused<T: Element + DeviceRepr>(attn: &Attention, s: &Arc<CudaStream>, c: &AppendCase<T>, p: Option<&Packed<T>>, dtype: DType, seed: u64) {
    let what = c.describe_rows(p);
    let mut separate = upload_rows(s, c, p);
    let cache1 = append(attn, s, c, &mut separate).unwrap_or_else(|e| panic!("{what}: {e} (seed {seed:#x})"));
    let (out1, lse1) = attend(attn, s, c, &separate);
    let mut one = upload_rows(s, c, p);
    let (ran, cache2, out2, lse2) = fused(attn, s, c, &mut one);
    assert_eq!(ran, BackendKind::Decode, "{what}");
    c.check_fused(p, Run { cache: &cache1, out: &out1, lse: &lse1 }, Run { cache: &cache2, out: &out2, lse: &lse2 }, tolerance(dtype), seed);
}

/// The masks the fused sweeps take in turn.
const MASKS: [RefMask; 4] = [
    RefMask { causal: false, left: None, right: None, softcap: None },
    RefMask { causal: true, left: None, right: None, softcap: None },
    RefMask { causal: true, left: Some(100), right: None, softcap: None },
    RefMask { causal: true, left: None, right: None, softcap: Some(20.0) },
];

fn fused_sweep<T: Element + DeviceRepr>(dtype: DType, dims: &[usize]) -> usize {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    let mut n = 0;
    for (i, &store) in STORES.iter().enumerate() {
        for &d in dims {
            for (batch, h, hk) in [(1, 32, 8), (3, 8, 8), (5, 16, 2)] {
                for new_len in [1, 7] {
                    let mask = MASKS[(i + new_len + h) % MASKS.len()];
                    let max_len = [7, 77, 1000, 3000][(i + n) % 4];
                    let layout = new_layouts(store)[(i + n) % new_layouts(store).len()];
                    let c = AppendCase::<T>::new(&mut rng, store, batch, new_len, (h, hk, d), max_len, mask, layout);
                    check_fused(&attn, &s, &c, None, dtype, seed);
                    n += 1;
                }
            }
        }
    }
    println!("{dtype}: {n} fused device calls match append + forward_kvcache and the reference (seed {seed:#x})");
    n
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn fused_append_and_attention_on_the_device_match_the_reference() {
    fused_sweep::<bf16>(DType::BF16, &[128, 64]);
    fused_sweep::<f16>(DType::F16, &[128]);
    fused_sweep::<f32>(DType::F32, &[128, 36]);
}

/// Packed rows (vLLM v1's mixed batches) over every store, device prefix sums and lengths: the
/// append writes exactly the packed rows (contiguous: each token's sequence found on the
/// device), and the fused call equals append + `forward_kvcache` bit for bit and matches the
/// reference, out and lse. The 300-row chunk runs on one contiguous and one paged store, at the
/// first head_dim (its f64 reference is the slow part).
fn packed_sweep<T: Element + DeviceRepr>(dtype: DType, dims: &[usize]) -> usize {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    let mut n = 0;
    for (i, &store) in STORES.iter().enumerate() {
        for (di, &d) in dims.iter().enumerate() {
            for (r, rows) in PACKED_ROWS.iter().enumerate() {
                let chunk = rows.contains(&300);
                if chunk && (di > 0 || !matches!(store, Store::Contiguous | Store::PagedVllm { page_size: 16 })) {
                    continue;
                }
                let new_len = *rows.iter().max().unwrap();
                let (h, hk) = if chunk { (8, 2) } else { [(32, 8), (8, 8), (16, 2)][(i + r + di) % 3] };
                let max_len = new_len + if chunk { 33 } else { [0, 77, 1000][(i + r + di) % 3] };
                let mask = MASKS[(i + r) % MASKS.len()];
                let mut c = AppendCase::<T>::new(&mut rng, store, rows.len(), new_len, (h, hk, d), max_len, mask, new_layouts(store)[0]);
                let p = c.packed(rows, PACKED_LAYOUTS[(i + r + di) % PACKED_LAYOUTS.len()]);
                check_fused(&attn, &s, &c, Some(&p), dtype, seed);
                n += 1;
            }
        }
    }
    println!("{dtype}: {n} packed-row device appends and fused calls match append + forward_kvcache and the reference (seed {seed:#x})");
    n
}

/// head_dim 36 of a 16-bit type takes the element copy, the others 16-byte vectors.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn packed_rows_on_the_device_append_and_fuse_like_the_two_calls_and_the_reference() {
    packed_sweep::<bf16>(DType::BF16, &[128, 40]); // d36 is no 16-bit GPU decode size (a multiple of 8 is)
    packed_sweep::<f16>(DType::F16, &[64]);
    packed_sweep::<f32>(DType::F32, &[128, 36]);
}

/// Fused append + attention with packed rows on a contiguous cache, captured once in a CUDA
/// graph and replayed step after step with new prefix sums (idle sequences of 0 rows
/// included), lengths, rows and queries, all in device memory: every replay writes exactly
/// the packed rows and matches the reference.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn packed_fused_graph_replays_with_new_prefix_sums_lengths_and_rows() {
    use attention::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let (attn, default_stream) = gpu();
    // SAFETY: every slice below lives on this one stream (see tests/gpu.rs's graph test).
    unsafe { default_stream.context().disable_event_tracking() };
    let s = default_stream.context().new_stream().unwrap();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    // 12 rows per step, at most 8 per sequence: the captured shapes and max_seqlen_q hold.
    let mixes = [[1, 0, 8, 3], [8, 3, 1, 0], [0, 1, 3, 8], [3, 8, 0, 1]];
    let capacity = 700;
    let causal = RefMask { causal: true, ..RefMask::default() };
    let mut c = AppendCase::<bf16>::new(&mut rng, Store::Contiguous, 4, 8, (32, 8, 128), capacity, causal, NewLayout::Contiguous);
    let mut p = c.packed(&mixes[0], NewLayout::OneRow);
    let mut dev = upload_rows(&s, &c, Some(&p));
    let lq = p.lq;
    let mut out: CudaSlice<bf16> = s.alloc_zeros(lq.numel()).unwrap();
    let run = |c: &AppendCase<bf16>, dev: &mut Dev<bf16>, out: &mut CudaSlice<bf16>| {
        with_cache(c, dev, true, |m, [k_new, v_new, q]| {
            attn.forward_kvcache_append(&q, &k_new, &v_new, m, &mut TensorMut::cuda(out, lq), None, &Options::default().causal(true))
        })
    };
    let check = |c: &AppendCase<bf16>, p: &Packed<bf16>, dev: &Dev<bf16>, out: &CudaSlice<bf16>, step: usize| {
        let cache = s.clone_dtoh(&dev.cache).unwrap();
        assert_eq!(first_difference(&cache, &c.after), None, "step {step}: cache (lens {:?}, rows {:?}, seed {seed:#x})", c.kv.lens, p.rows);
        let got: Vec<f64> = s.clone_dtoh(out).unwrap().iter().map(|x| x.to_f64()).collect();
        assert!(got.iter().all(|x| x.is_finite()), "step {step}: NaN in the output (seed {seed:#x})");
        let err = rel_err(&got, &p.ref_out);
        assert!(err < tolerance(DType::BF16), "step {step}: rel {err:.2e} (lens {:?}, rows {:?}, seed {seed:#x})", c.kv.lens, p.rows);
    };
    // Step 0 eagerly (loads the modules), then capture step 1's call.
    assert_eq!(run(&c, &mut dev, &mut out).unwrap(), BackendKind::Decode);
    s.synchronize().unwrap();
    check(&c, &p, &dev, &out, 0);
    let upload_step = |c: &AppendCase<bf16>, p: &Packed<bf16>, dev: &mut Dev<bf16>, out: &mut CudaSlice<bf16>| {
        assert_eq!((p.max_q, p.lq), (8, lq));
        s.memcpy_htod(&p.before, &mut dev.cache).unwrap();
        s.memcpy_htod(&p.cu, &mut dev.cu).unwrap();
        s.memcpy_htod(&c.kv.lens, &mut dev.lens).unwrap();
        s.memcpy_htod(&p.k_new, &mut dev.k_new).unwrap();
        s.memcpy_htod(&p.v_new, &mut dev.v_new).unwrap();
        s.memcpy_htod(&p.q, &mut dev.q).unwrap();
        s.memcpy_htod(&vec![bf16::NAN; lq.numel()], out).unwrap();
    };
    c.next_step(&mut rng, capacity, None);
    p = c.packed(&mixes[1], NewLayout::OneRow);
    upload_step(&c, &p, &mut dev, &mut out);
    s.synchronize().unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = run(&c, &mut dev, &mut out);
    let graph = s.end_capture(CUgraphInstantiate_flags(0)).unwrap();
    assert_eq!(captured.unwrap(), BackendKind::Decode);
    let graph = graph.expect("the capture recorded the call");
    for step in 1..8 {
        if step > 1 {
            c.next_step(&mut rng, capacity, None);
            p = c.packed(&mixes[step % mixes.len()], NewLayout::OneRow);
            upload_step(&c, &p, &mut dev, &mut out);
        }
        graph.launch().unwrap();
        s.synchronize().unwrap();
        check(&c, &p, &dev, &out, step);
    }
    println!("packed fused append + contiguous decode graph: 7 replays with new prefix sums, lengths and rows, all exact (seed {seed:#x})");
}

/// Device prefix sums are never read on the host: malformed ones (decreasing, negative, past
/// the rows, a sequence past max_seqlen_q, extremes) write wrong rows at worst, inside the
/// cache. The bytes around the cache stay as they were, every row that changed holds one of
/// the new rows of its head, and nothing faults, for the append and for the fused call.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn malformed_device_prefix_sums_write_only_inside_the_cache() {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let mut c = AppendCase::<f16>::new(&mut rng, Store::Contiguous, 4, 4, (8, 2, 64), 40, RefMask::default(), NewLayout::Contiguous);
    let p = c.packed(&[2, 1, 0, 3], NewLayout::OneRow);
    assert_eq!((p.cu.as_slice(), p.max_q), (&[0, 2, 3, 3, 6][..], 3));
    const GUARD: usize = 4096;
    let sentinel = f16::from_bits(0x7e5a); // a NaN with a payload no copy makes
    let mut guarded = vec![sentinel; GUARD];
    guarded.extend_from_slice(&p.before);
    guarded.extend(std::iter::repeat_n(sentinel, GUARD));
    let (n, hk, d) = (c.n, c.kv.kv_heads, c.kv.d);
    let new_row = |x: &[f16], t: usize, kh: usize| {
        let o = p.ln.offset(0, t, kh);
        x[o..o + d].to_vec()
    };
    let check = |got: &[f16], what: &str| {
        assert!(got[..GUARD].iter().chain(&got[GUARD + 2 * n..]).all(|x| x.to_bits() == sentinel.to_bits()), "{what}: a write outside the cache");
        for b in 0..c.kv.batch {
            for pos in 0..c.kv.lk.seqlen() {
                for kh in 0..hk {
                    let o = c.kv.lk.offset(b, pos, kh);
                    let (kr, vr) = (&got[GUARD + o..GUARD + o + d], &got[GUARD + n + o..GUARD + n + o + d]);
                    let (kb, vb) = (&p.before[o..o + d], &p.before[n + o..n + o + d]);
                    let ok = |row: &[f16], was: &[f16], x: &[f16]| {
                        first_difference(row, was).is_none() || (0..6).any(|t| first_difference(row, &new_row(x, t, kh)).is_none())
                    };
                    assert!(ok(kr, kb, &p.k_new) && ok(vr, vb, &p.v_new), "{what}: row ({b}, {pos}, {kh}) holds neither what it held nor a new row");
                }
            }
        }
    };
    let bad: [&[i32]; 6] = [
        &[0, 5, 2, 6, 6],
        &[-7, 1, 1, 3, 6],
        &[0, 3, 90, 4, 6],
        &[0, i32::MAX, i32::MIN, 6, 6],
        &[6, 0, 0, 0, 0],
        &[0, 6, 6, 6, 6], // sequence 0: 6 rows, past max_seqlen_q 3
    ];
    for cu in bad {
        for fused_call in [false, true] {
            let mut dev = upload_rows(&s, &c, Some(&p));
            dev.cache = s.clone_htod(&guarded).unwrap();
            dev.guard = GUARD;
            s.memcpy_htod(cu, &mut dev.cu).unwrap();
            let what = format!("cu_seqlens_q {cu:?}{}", if fused_call { ", fused" } else { "" });
            if fused_call {
                fused(&attn, &s, &c, &mut dev);
            } else {
                append(&attn, &s, &c, &mut dev).unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            s.synchronize().unwrap_or_else(|e| panic!("{what}: {e:?}"));
            check(&s.clone_dtoh(&dev.cache).unwrap(), &what);
        }
    }
    // The context is healthy: the well-formed call writes exactly the packed rows.
    let mut dev = upload_rows(&s, &c, Some(&p));
    assert_eq!(first_difference(&append(&attn, &s, &c, &mut dev).unwrap(), &c.after), None);
}

/// What only device prefix sums leave to the fused call's own check: q must have one packed
/// row per new K/V row (host sums are checked against both). Nothing is written.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn packed_q_rows_must_match_the_new_rows_on_the_device() {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let mut c = AppendCase::<bf16>::new(&mut rng, Store::PagedVllm { page_size: 16 }, 3, 4, (8, 2, 64), 50, RefMask::default(), NewLayout::Tokens);
    let p = c.packed(&[4, 1, 2], NewLayout::Tokens);
    let mut dev = upload_rows(&s, &c, Some(&p));
    let total = p.lq.seqlen();
    // q and out one row longer than the new rows.
    let lq = Layout::contiguous(1, total + 1, c.kv.heads, c.kv.d);
    dev.q = s.alloc_zeros(lq.numel()).unwrap();
    dev.lq = lq;
    let mut out: CudaSlice<bf16> = s.clone_htod(&vec![bf16::NAN; lq.numel()]).unwrap();
    let r = with_cache(&c, &mut dev, true, |m, [k_new, v_new, q]| {
        attn.forward_kvcache_append(&q, &k_new, &v_new, m, &mut TensorMut::cuda(&mut out, lq), None, &Options::default())
    });
    match r {
        Err(Error::InvalidArgument { arg: "q", ref value, .. }) if value.contains(&format!("{} packed rows", total + 1)) => {}
        other => panic!("expected InvalidArgument(q) naming {} packed rows, got {other:?}", total + 1),
    }
    assert_eq!(first_difference(&s.clone_dtoh(&dev.cache).unwrap(), &p.before), None, "a rejected call wrote the cache");
    assert!(s.clone_dtoh(&out).unwrap().iter().all(|x| x.is_nan()), "a rejected call wrote out");
}

/// The rule the kernel follows, spelled out here: each (token, kv head) row goes to the row of
/// `dest(b, i)` in the cache (K and V), nothing for `None`.
fn apply<T: Element>(c: &AppendCase<T>, dest: impl Fn(usize, usize) -> Option<(usize, usize)>) -> Vec<T> {
    let mut want = c.before.clone();
    let (hk, d, n) = (c.kv.kv_heads, c.kv.d, c.n);
    let [_, ls, _, _] = c.ln.shape();
    for t in 0..c.kv.batch * c.new_len {
        let Some((page, row)) = dest(t / c.new_len, t % c.new_len) else { continue };
        for kh in 0..hk {
            let (src, dst) = (c.ln.offset(t / ls, t % ls, kh), c.kv.lk.offset(page, row, kh));
            want[dst..dst + d].copy_from_slice(&c.k_new[src..src + d]);
            want[n + dst..n + dst + d].copy_from_slice(&c.v_new[src..src + d]);
        }
    }
    want
}

/// Device slots and lengths are never checked on the host: ones outside the cache leave their
/// rows unwritten, everything else is written, and nothing faults.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn out_of_range_device_slots_and_lengths_are_skipped() {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    // Pages: slots past the pages, far past, negative (padding) and valid ones mixed.
    let mut c = AppendCase::<bf16>::new(&mut rng, Store::PagedVllm { page_size: 16 }, 4, 3, (8, 2, 128), 100, RefMask::default(), NewLayout::Tokens);
    let num_slots = (c.kv.lk.batch() * c.kv.lk.seqlen()) as i64;
    // The last slot no other token writes.
    let spare = (0..num_slots).rev().find(|s| !c.slots.contains(s)).unwrap();
    for (t, bad) in [(0, num_slots), (1, num_slots + 17), (4, i64::MAX), (5, -1), (7, i64::MIN), (8, spare)] {
        c.slots[t] = bad;
    }
    let ps = c.kv.lk.seqlen();
    let want = apply(&c, |b, i| {
        let slot = c.slots[b * c.new_len + i];
        (0..num_slots).contains(&slot).then(|| (slot as usize / ps, slot as usize % ps))
    });
    let mut dev = upload(&s, &c);
    let got = append(&attn, &s, &c, &mut dev).unwrap();
    s.synchronize().expect("no fault");
    assert_eq!(first_difference(&got, &want), None, "paged, slots {:?}", c.slots);
    // Contiguous: lengths past the capacity, below the new rows (only the rows that land at
    // position 0 or later are written), negative, extreme.
    let cap = 20;
    let mut c = AppendCase::<f16>::new(&mut rng, Store::ContiguousHeadsFirst, 6, 7, (4, 2, 64), cap, RefMask::default(), NewLayout::Contiguous);
    c.kv.lens = vec![cap as i32 + 3, 3, -100, i32::MAX, i32::MIN, cap as i32];
    let lens = c.kv.lens.clone();
    let want = apply(&c, |b, i| {
        let pos = lens[b] as i64 - c.new_len as i64 + i as i64;
        (0..cap as i64).contains(&pos).then_some((b, pos as usize))
    });
    let mut dev = upload(&s, &c);
    let got = append(&attn, &s, &c, &mut dev).unwrap();
    s.synchronize().expect("no fault");
    assert_eq!(first_difference(&got, &want), None, "contiguous, lens {lens:?}");
    // The context is healthy: a good append still runs.
    let c = AppendCase::<f16>::new(&mut rng, Store::Contiguous, 2, 1, (4, 2, 64), 10, RefMask::default(), NewLayout::Contiguous);
    let mut dev = upload(&s, &c);
    assert_eq!(first_difference(&append(&attn, &s, &c, &mut dev).unwrap(), &c.after), None);
}

/// What validation rejects on the device: new rows or a V cache sharing bytes with the K cache,
/// q sharing bytes with the cache in the fused call. Nothing is written.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn overlapping_device_buffers_are_rejected() {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    let c = AppendCase::<bf16>::new(&mut rng, Store::Contiguous, 2, 1, (4, 2, 64), 16, RefMask::default(), NewLayout::Contiguous);
    let dev = upload(&s, &c);
    let (base, _guard) = dev.cache.device_ptr(&s);
    let (lk, ln, elem) = (c.kv.lk, c.ln, 2u64);
    let expect = |r: Result<(), Error>, arg: &str, needle: &str| match r {
        Err(Error::InvalidArgument { arg: a, ref value, .. }) if a == arg && value.contains(needle) => {}
        other => panic!("expected InvalidArgument({arg}) overlapping {needle}, got {other:?}"),
    };
    let lens = CacheLens::cuda(&dev.lens);
    // SAFETY: views of live allocations; every call below fails validation before any kernel.
    unsafe {
        let k_cache = || TensorMut::<bf16>::from_raw_device(base, c.n, lk, s.cu_stream());
        let v_cache = || TensorMut::<bf16>::from_raw_device(base + c.n as u64 * elem, c.n, lk, s.cu_stream());
        // k_new inside the K cache.
        let k_new = Tensor::<bf16>::from_raw_device(base + 64 * elem, ln.numel(), ln);
        let mut cache = KvCacheMut::contiguous(k_cache(), v_cache(), CacheLens::cuda(&dev.lens));
        expect(attn.append_kv(&k_new, &Tensor::cuda(&dev.v_new, ln), &mut cache), "k_cache", "overlapping k_new");
        // V cache over the K cache.
        let mut cache = KvCacheMut::contiguous(k_cache(), TensorMut::from_raw_device(base + 8 * elem, c.n, lk, s.cu_stream()), lens);
        expect(attn.append_kv(&Tensor::cuda(&dev.k_new, ln), &Tensor::cuda(&dev.v_new, ln), &mut cache), "k_cache", "overlapping v_cache");
        // q inside the V cache in the fused call.
        let q = Tensor::<bf16>::from_raw_device(base + (c.n as u64 + 128) * elem, c.kv.lq.numel(), c.kv.lq);
        let mut out: CudaSlice<bf16> = s.alloc_zeros(c.kv.lq.numel()).unwrap();
        let mut cache = KvCacheMut::contiguous(k_cache(), v_cache(), CacheLens::cuda(&dev.lens));
        let r = attn.forward_kvcache_append(&q, &Tensor::cuda(&dev.k_new, ln), &Tensor::cuda(&dev.v_new, ln), &mut cache, &mut TensorMut::cuda(&mut out, c.kv.lq), None, &Default::default());
        expect(r.map(|_| ()), "v_cache", "overlapping q");
    }
    drop(_guard);
    assert_eq!(first_difference(&s.clone_dtoh(&dev.cache).unwrap(), &c.before), None, "a rejected call wrote the cache");
}

/// Append + attention on pages, captured once in a CUDA graph and replayed step after step
/// with new slot mappings, lengths (a padding sequence included) and new rows: every replay
/// writes exactly the new rows and matches the reference.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn fused_graph_replays_with_new_slots_lengths_and_rows() {
    use attention::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let (attn, default_stream) = gpu();
    // SAFETY: every slice below lives on this one stream (see tests/gpu.rs's graph test).
    unsafe { default_stream.context().disable_event_tracking() };
    let s = default_stream.context().new_stream().unwrap();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    let mut c = AppendCase::<bf16>::new(&mut rng, Store::PagedVllm { page_size: 16 }, 4, 1, (32, 8, 128), 700, RefMask { causal: true, ..RefMask::default() }, NewLayout::Tokens);
    let capacity = c.kv.pages_per_seq * 16;
    let mut dev = upload(&s, &c);
    let mut out: CudaSlice<bf16> = s.alloc_zeros(c.kv.lq.numel()).unwrap();
    // What the captured call sees; everything else changes in device memory between replays.
    let (n, lk, lq, ln, pages_per_seq, table_stride) = (c.n, c.kv.lk, c.kv.lq, c.ln, c.kv.pages_per_seq, c.kv.table_stride);
    let run = |dev: &mut Dev<bf16>, out: &mut CudaSlice<bf16>| {
        let (mut k, mut v) = dev.cache.split_at_mut(n);
        let mut cache = KvCacheMut::paged(TensorMut::cuda(&mut k, lk), TensorMut::cuda(&mut v, lk), SlotMapping::cuda(&dev.slots))
            .with_block_table(BlockTable::cuda(&dev.table, pages_per_seq, table_stride), CacheLens::cuda(&dev.lens));
        attn.forward_kvcache_append(
            &Tensor::cuda(&dev.q, lq),
            &Tensor::cuda(&dev.k_new, ln),
            &Tensor::cuda(&dev.v_new, ln),
            &mut cache,
            &mut TensorMut::cuda(out, lq),
            None,
            &Options::default().causal(true),
        )
    };
    let check = |c: &AppendCase<bf16>, dev: &Dev<bf16>, out: &CudaSlice<bf16>, step: usize| {
        let cache = s.clone_dtoh(&dev.cache).unwrap();
        assert_eq!(first_difference(&cache, &c.after), None, "step {step}: cache (lens {:?}, slots {:?}, seed {seed:#x})", c.kv.lens, c.slots);
        let got: Vec<f64> = s.clone_dtoh(out).unwrap().iter().map(|x| x.to_f64()).collect();
        let err = rel_err(&got, &c.reference());
        assert!(err < tolerance(DType::BF16), "step {step}: rel {err:.2e} (lens {:?}, seed {seed:#x})", c.kv.lens);
    };
    // Step 0 eagerly (loads the modules), then capture step 1's call.
    assert_eq!(run(&mut dev, &mut out).unwrap(), BackendKind::Decode);
    s.synchronize().unwrap();
    check(&c, &dev, &out, 0);
    c.next_step(&mut rng, capacity, None);
    let upload_step = |c: &AppendCase<bf16>, dev: &mut Dev<bf16>, out: &mut CudaSlice<bf16>| {
        s.memcpy_htod(&c.slots, &mut dev.slots).unwrap();
        s.memcpy_htod(&c.kv.lens, &mut dev.lens).unwrap();
        s.memcpy_htod(&c.k_new, &mut dev.k_new).unwrap();
        s.memcpy_htod(&c.v_new, &mut dev.v_new).unwrap();
        s.memcpy_htod(&vec![bf16::NAN; c.kv.lq.numel()], out).unwrap();
    };
    upload_step(&c, &mut dev, &mut out);
    s.synchronize().unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = run(&mut dev, &mut out);
    let graph = s.end_capture(CUgraphInstantiate_flags(0)).unwrap();
    assert_eq!(captured.unwrap(), BackendKind::Decode);
    let graph = graph.expect("the capture recorded the call");
    for step in 1..8 {
        if step > 1 {
            // Sequence 2 becomes a padding slot at step 3 and grows again after.
            c.next_step(&mut rng, capacity, (step == 3).then_some(2));
            upload_step(&c, &mut dev, &mut out);
        }
        graph.launch().unwrap();
        s.synchronize().unwrap();
        check(&c, &dev, &out, step);
    }
    println!("fused append + paged decode graph: 7 replays with new slots, lengths and rows, all exact (seed {seed:#x})");
}

/// Small cases for compute-sanitizer (memcheck, racecheck): 1-row pages, padding tokens,
/// contiguous with lengths at capacity, vector and element copies.
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn append_small_cases_for_sanitizers() {
    let (attn, s) = gpu();
    let mut rng = Rng::fresh();
    for (store, batch, new_len, d, layout) in [
        (Store::PagedVllm { page_size: 1 }, 3, 2, 64, NewLayout::Tokens),
        (Store::PagedHnd { page_size: 16 }, 4, 1, 36, NewLayout::OneRow),
        (Store::Contiguous, 2, 7, 128, NewLayout::HeadsFirst),
    ] {
        let c = AppendCase::<f16>::new(&mut rng, store, batch, new_len, (8, 2, d), 40, RefMask::default(), layout);
        let mut dev = upload(&s, &c);
        assert_eq!(first_difference(&append(&attn, &s, &c, &mut dev).unwrap(), &c.after), None, "{store:?}");
    }
}

/// Report only: 1000 appends of 128 tokens x 8 kv heads x d128 bf16 into 16-row vLLM pages,
/// timed with CUDA events, eagerly (each call validated and launched from the host) and as a
/// CUDA graph of 100 appends replayed 10 times (the kernel alone). Bytes: K and V rows, each
/// read once and written once.
#[test]
#[ignore = "report: run with --ignored --nocapture on a GPU machine"]
fn append_bandwidth() {
    use attention::cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
    let (attn, default_stream) = gpu();
    unsafe { default_stream.context().disable_event_tracking() };
    let s = default_stream.context().new_stream().unwrap();
    let (tokens, hk, d, page_size, pages) = (128usize, 8usize, 128usize, 16usize, 4096usize);
    let lp = Layout::contiguous(pages, page_size, hk, d);
    let ln = Layout::contiguous(tokens, 1, hk, d);
    let mut rng = Rng::fresh();
    let mut slots: Vec<i64> = (0..(pages * page_size) as i64).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    slots.truncate(tokens);
    let mut cache: CudaSlice<bf16> = s.alloc_zeros(2 * lp.numel()).unwrap();
    let new: Vec<bf16> = (0..ln.numel()).map(|_| bf16::from_f32(rng.f32_normal())).collect();
    let (k_new, v_new) = (s.clone_htod(&new).unwrap(), s.clone_htod(&new).unwrap());
    let slots = s.clone_htod(&slots).unwrap();
    let one = |cache: &mut CudaSlice<bf16>| {
        let (mut k, mut v) = cache.split_at_mut(lp.numel());
        let mut m = KvCacheMut::paged(TensorMut::cuda(&mut k, lp), TensorMut::cuda(&mut v, lp), SlotMapping::cuda(&slots));
        attn.append_kv(&Tensor::cuda(&k_new, ln), &Tensor::cuda(&v_new, ln), &mut m).unwrap();
    };
    for _ in 0..10 {
        one(&mut cache);
    }
    s.synchronize().unwrap();
    let bytes = (2 * 2 * tokens * hk * d * 2) as f64; // K and V, read + write, 2-byte elements
    let timed = |what: &str, calls: usize, ms: f32| {
        let us = ms as f64 * 1e3 / calls as f64;
        println!("append {what}: {calls} appends of {tokens} tokens x {hk} kv heads x d{d} bf16: {us:.2} us each, {:.1} GB/s", bytes / (us * 1e-6) / 1e9);
    };
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = s.record_event(flags).unwrap();
    for _ in 0..1000 {
        one(&mut cache);
    }
    let end = s.record_event(flags).unwrap();
    timed("eager", 1000, start.elapsed_ms(&end).unwrap());
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    for _ in 0..100 {
        one(&mut cache);
    }
    let graph = s.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("captured");
    graph.launch().unwrap();
    s.synchronize().unwrap();
    let start = s.record_event(flags).unwrap();
    for _ in 0..10 {
        graph.launch().unwrap();
    }
    let end = s.record_event(flags).unwrap();
    timed("in a CUDA graph", 1000, start.elapsed_ms(&end).unwrap());
}

