//! Appending new keys and values to KV caches on host memory (`append_kv` and the fused
//! `forward_kvcache_append`): contiguous caches in both orders and vLLM / HND pages of 1, 16
//! and 256 rows, new rows in several layouts (vLLM's `[num_tokens, kv_heads, d]` included),
//! 1 and 7 new rows per sequence, padding tokens (slot -1), lengths at the cache's capacity,
//! and packed rows (`KvCacheMut::with_varlen_queries`: 0-row sequences, a 300-row chunk).
//! Every cache is NaN-poisoned outside the rows it held and compared bit for bit with the one
//! computed independently in tests/common/append.rs; the fused call equals append then
//! `forward_kvcache` and matches the f64 reference; every bad input is a typed error naming
//! its argument that leaves the cache as it was.

mod common;
#[path = "common/append.rs"]
mod append_case;

use std::fmt::Debug;

use append_case::{first_difference, nan, new_layouts, AppendCase, NewLayout, Packed, Run, PACKED_LAYOUTS, PACKED_ROWS, STORES};
use attention::{
    Attention, BackendKind, BlockTable, CacheLens, DType, Element, Error, KvCache, KvCacheMut, Layout, LseMut, Options, Selector,
    SeqLens, Settings, SlotMapping, Tensor, TensorMut,
};
use common::gpu::tolerance;
use common::kv::Store;
use common::reference::RefMask;
use common::rng::Rng;
use half::{bf16, f16};

fn cpu() -> Attention {
    Selector::from_settings(Settings::default()).select().unwrap()
}

/// The case's cache over `buf` (K then V), its new rows packed as `p` says when given; pages
/// get the block table and lengths when `with_table`.
fn cache_mut<'a, T: Element>(c: &'a AppendCase<T>, p: Option<&'a Packed<T>>, buf: &'a mut [T], with_table: bool) -> KvCacheMut<'a, T> {
    let (k, v) = buf.split_at_mut(c.n);
    let (k, v) = (TensorMut::host(k, c.kv.lk), TensorMut::host(v, c.kv.lk));
    let m = if !c.paged {
        KvCacheMut::contiguous(k, v, CacheLens::host(&c.kv.lens))
    } else {
        let m = KvCacheMut::paged(k, v, SlotMapping::host(p.map_or(&c.slots, |p| &p.slots)));
        if with_table {
            m.with_block_table(BlockTable::host(&c.kv.table, c.kv.pages_per_seq, c.kv.table_stride), CacheLens::host(&c.kv.lens))
        } else {
            m
        }
    };
    match p {
        None => m,
        Some(p) => m.with_varlen_queries(SeqLens::host(&p.cu), p.max_q),
    }
}

/// The new rows and q of the case, or of its packed rows: (k_new, v_new, q, q's layout).
fn rows_of<'a, T: Element>(c: &'a AppendCase<T>, p: Option<&'a Packed<T>>) -> (Tensor<'a, T>, Tensor<'a, T>, Tensor<'a, T>, Layout) {
    match p {
        None => (Tensor::host(&c.k_new, c.ln), Tensor::host(&c.v_new, c.ln), Tensor::host(&c.kv.q, c.kv.lq), c.kv.lq),
        Some(p) => (Tensor::host(&p.k_new, p.ln), Tensor::host(&p.v_new, p.ln), Tensor::host(&p.q, p.lq), p.lq),
    }
}

/// Out and lse for q of layout `lq`, NaN-poisoned: lse `[batch, heads, q_len]`, or for packed
/// queries `[heads, total_q]` (the same count).
fn poisoned<T: Element>(lq: Layout) -> (Vec<T>, Vec<f32>) {
    (vec![nan::<T>(); lq.numel()], vec![f32::NAN; lq.batch() * lq.heads() * lq.seqlen()])
}

/// `append_kv` of the case's (or its packed) new rows into the cache in `buf`.
fn append<T: Element>(attn: &Attention, c: &AppendCase<T>, p: Option<&Packed<T>>, buf: &mut [T]) -> Result<(), Error> {
    let (k_new, v_new, _, _) = rows_of(c, p);
    attn.append_kv(&k_new, &v_new, &mut cache_mut(c, p, buf, false))
}

/// `forward_kvcache` over the cache in `buf`: (out, lse).
fn attend<T: Element>(attn: &Attention, c: &AppendCase<T>, p: Option<&Packed<T>>, buf: &[T]) -> (Vec<T>, Vec<f32>) {
    let (k, v) = buf.split_at(c.n);
    let (k, v) = (Tensor::host(k, c.kv.lk), Tensor::host(v, c.kv.lk));
    let lens = CacheLens::host(&c.kv.lens);
    let cache = if c.paged {
        KvCache::paged(k, v, BlockTable::host(&c.kv.table, c.kv.pages_per_seq, c.kv.table_stride), lens)
    } else {
        KvCache::contiguous(k, v, lens)
    };
    let cache = match p {
        None => cache,
        Some(p) => cache.with_varlen_queries(SeqLens::host(&p.cu), p.max_q),
    };
    let (_, _, q, lq) = rows_of(c, p);
    let (mut out, mut lse) = poisoned::<T>(lq);
    let ran = attn.forward_kvcache(&q, &cache, &mut TensorMut::host(&mut out, lq), Some(&mut LseMut::host(&mut lse)), &c.kv.options()).unwrap();
    assert_eq!(ran, BackendKind::Cpu);
    (out, lse)
}

/// `forward_kvcache_append` on the cache in `buf` (out and lse NaN-poisoned first): (backend,
/// out, lse).
fn fuse<T: Element>(attn: &Attention, c: &AppendCase<T>, p: Option<&Packed<T>>, buf: &mut [T], opts: &Options) -> Result<(BackendKind, Vec<T>, Vec<f32>), Error> {
    let (k_new, v_new, q, lq) = rows_of(c, p);
    let (mut out, mut lse) = poisoned::<T>(lq);
    let ran = attn.forward_kvcache_append(&q, &k_new, &v_new, &mut cache_mut(c, p, buf, true), &mut TensorMut::host(&mut out, lq), Some(&mut LseMut::host(&mut lse)), opts)?;
    Ok((ran, out, lse))
}

fn append_sweep<T: Element>() -> usize {
    let attn = cpu();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    let mut n = 0;
    for (s, &store) in STORES.iter().enumerate() {
        for (l, &layout) in new_layouts(store).iter().enumerate() {
            for new_len in [1, 7] {
                let (batch, max_len) = [(3, 7), (4, 40), (2, 300)][(s + l + new_len) % 3];
                let c = AppendCase::<T>::new(&mut rng, store, batch, new_len, (8, 2, 16), max_len, RefMask::default(), layout);
                let mut buf = c.before.clone();
                append(&attn, &c, None, &mut buf).unwrap_or_else(|e| panic!("{}: {e} (seed {seed:#x})", c.describe()));
                if let Some(i) = first_difference(&buf, &c.after) {
                    panic!("{}: element {i} is {:?}, expected {:?} (seed {seed:#x})", c.describe(), buf[i], c.after[i]);
                }
                n += 1;
            }
        }
    }
    n
}

#[test]
fn appends_write_exactly_the_new_rows() {
    let n = append_sweep::<f32>() + append_sweep::<bf16>() + append_sweep::<f16>();
    println!("{n} host appends wrote exactly the expected rows");
}

/// The fused call and `append_kv` then `forward_kvcache` from the cache before (the case's, or
/// its packed rows' with `p`), checked as [`AppendCase::check_fused`] says.
fn check_fused<T: Element>(attn: &Attention, c: &AppendCase<T>, p: Option<&Packed<T>>, dtype: DType, seed: u64) {
    let what = c.describe_rows(p);
    let before = p.map_or(&c.before, |p| &p.before);
    let mut separate = before.clone();
    append(attn, c, p, &mut separate).unwrap_or_else(|e| panic!("{what}: {e} (seed {seed:#x})"));
    let (out1, lse1) = attend(attn, c, p, &separate);
    let mut fused = before.clone();
    let (ran, out2, lse2) = fuse(attn, c, p, &mut fused, &c.kv.options()).unwrap_or_else(|e| panic!("{what}: {e} (seed {seed:#x})"));
    assert_eq!(ran, BackendKind::Cpu, "{what}");
    c.check_fused(p, Run { cache: &separate, out: &out1, lse: &lse1 }, Run { cache: &fused, out: &out2, lse: &lse2 }, tolerance(dtype), seed);
}

const MASKS: [RefMask; 4] = [
    RefMask { causal: false, left: None, right: None, softcap: None },
    RefMask { causal: true, left: None, right: None, softcap: None },
    RefMask { causal: true, left: Some(9), right: None, softcap: None },
    RefMask { causal: false, left: None, right: None, softcap: Some(5.0) },
];

fn fused_sweep<T: Element>(dtype: DType) -> usize {
    let attn = cpu();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    let mut n = 0;
    for (s, &store) in STORES.iter().enumerate() {
        for new_len in [1, 7] {
            for (h, hk) in [(8, 2), (4, 4)] {
                let mask = MASKS[(s + new_len + h) % MASKS.len()];
                let (batch, max_len) = [(3, 7), (4, 40), (2, 300)][(s + h) % 3];
                let layout = new_layouts(store)[(s + new_len) % new_layouts(store).len()];
                let c = AppendCase::<T>::new(&mut rng, store, batch, new_len, (h, hk, 16), max_len, mask, layout);
                check_fused(&attn, &c, None, dtype, seed);
                n += 1;
            }
        }
    }
    n
}

#[test]
fn fused_append_and_attention_equals_the_two_calls_and_the_reference() {
    let n = fused_sweep::<f32>(DType::F32) + fused_sweep::<bf16>(DType::BF16) + fused_sweep::<f16>(DType::F16);
    println!("{n} fused host calls match append + forward_kvcache and the reference");
}

/// Packed rows over every store, each row mix and layout: `append_kv` writes exactly the
/// packed rows and the fused call equals append + `forward_kvcache` and the reference. The
/// 300-row chunk runs on one contiguous and one paged store (its reference is the slow part).
fn packed_sweep<T: Element>(dtype: DType) -> usize {
    let attn = cpu();
    let mut rng = Rng::fresh();
    let seed = rng.get_seed();
    let mut n = 0;
    for (s, &store) in STORES.iter().enumerate() {
        for (r, rows) in PACKED_ROWS.iter().enumerate() {
            if rows.contains(&300) && !matches!(store, Store::Contiguous | Store::PagedVllm { page_size: 16 }) {
                continue;
            }
            let new_len = *rows.iter().max().unwrap();
            // The first sequence at the cache's capacity, the others anywhere up to it.
            let max_len = new_len + [0, 9, 40][(s + r) % 3];
            let (h, hk) = [(8, 2), (4, 4)][(s + r) % 2];
            let mask = MASKS[(s + r) % MASKS.len()];
            let mut c = AppendCase::<T>::new(&mut rng, store, rows.len(), new_len, (h, hk, 16), max_len, mask, new_layouts(store)[0]);
            let p = c.packed(rows, PACKED_LAYOUTS[(s + r) % PACKED_LAYOUTS.len()]);
            check_fused(&attn, &c, Some(&p), dtype, seed);
            n += 1;
        }
    }
    n
}

#[test]
fn packed_rows_append_and_fuse_like_the_two_calls_and_the_reference() {
    let n = packed_sweep::<f32>(DType::F32) + packed_sweep::<bf16>(DType::BF16);
    println!("{n} packed-row host appends and fused calls match append + forward_kvcache and the reference");
}

/// Runs `f` on a copy of the cache (`before`) and expects an `InvalidArgument` naming `arg` whose message
/// contains `needle`, with the cache left exactly as it was.
fn rejected<T: Element, R: Debug>(before: &[T], arg: &str, needle: &str, f: impl FnOnce(&mut [T]) -> Result<R, Error>) {
    let mut buf = before.to_vec();
    let r = f(&mut buf);
    match r {
        Err(Error::InvalidArgument { arg: a, .. }) if a == arg => {
            let text = r.unwrap_err().to_string();
            assert!(text.contains(needle), "{arg}: {text:?} lacks {needle:?}");
        }
        other => panic!("expected InvalidArgument({arg}) containing {needle:?}, got {other:?}"),
    }
    assert_eq!(first_difference(&buf, before), None, "{arg} ({needle}): a failed call wrote the cache");
}

/// A fake device address: validation rejects it for its memory kind before anything reads it.
const FAKE_DEVICE: u64 = 0x7f00_0000_0000;

#[test]
fn bad_contiguous_appends_are_typed_errors_that_write_nothing() {
    let attn = cpu();
    let mut rng = Rng::seed(11);
    let c = AppendCase::<f32>::new(&mut rng, Store::Contiguous, 3, 2, (4, 2, 16), 10, RefMask::default(), NewLayout::Contiguous);
    let (lk, ln) = (c.kv.lk, c.ln);
    let (kn, vn) = (|| Tensor::host(&c.k_new, ln), || Tensor::host(&c.v_new, ln));
    let with_lens = |buf: &mut [f32], lens: &[i32], f: &dyn Fn(&mut KvCacheMut<'_, f32>) -> Result<(), Error>| {
        let (k, v) = buf.split_at_mut(c.n);
        f(&mut KvCacheMut::contiguous(TensorMut::host(k, lk), TensorMut::host(v, lk), CacheLens::host(lens)))
    };
    let append = |m: &mut KvCacheMut<'_, f32>| attn.append_kv(&kn(), &vn(), m);
    // Lengths: past the capacity, below the new rows, one per sequence.
    rejected(&c.before, "cache_lens", "entry 0 = 11", |b| with_lens(b, &[11, 5, 2], &append));
    rejected(&c.before, "cache_lens", "entry 1 = 1", |b| with_lens(b, &[10, 1, 2], &append));
    rejected(&c.before, "cache_lens", "entry 2 = -3", |b| with_lens(b, &[10, 2, -3], &append));
    rejected(&c.before, "cache_lens", "2 entries", |b| with_lens(b, &c.kv.lens[..2], &append));
    // New rows that do not fit the cache.
    let big = vec![0f32; 4096];
    let shaped = |shape: [usize; 4]| Layout::contiguous(shape[0], shape[1], shape[2], shape[3]);
    for (shape, arg, needle) in [
        ([3, 2, 1, 16], "k_new", "1 kv heads"),
        ([3, 2, 2, 8], "k_new", "head_dim 8"),
        ([2, 2, 2, 16], "k_new", "batch 2"),
        ([3, 11, 2, 16], "k_new", "11 new rows per sequence"),
    ] {
        let l = shaped(shape);
        rejected(&c.before, arg, needle, |b| with_lens(b, &c.kv.lens, &|m| attn.append_kv(&Tensor::host(&big, l), &Tensor::host(&big, l), m)));
    }
    rejected(&c.before, "v_new", "k_new's shape", |b| {
        with_lens(b, &c.kv.lens, &|m| attn.append_kv(&kn(), &Tensor::host(&big, shaped([3, 1, 2, 16])), m))
    });
    rejected(&c.before, "k_new", "a buffer of at least", |b| with_lens(b, &c.kv.lens, &|m| attn.append_kv(&Tensor::host(&c.k_new[..10], ln), &vn(), m)));
    rejected(&c.before, "k_new", "strides", |b| {
        let l = Layout::strided([3, 2, 2, 16], [usize::MAX / 2, 32, 16]);
        with_lens(b, &c.kv.lens, &|m| attn.append_kv(&Tensor::host(&big, l), &vn(), m))
    });
    // Caches: V's shape, an overlapping (self-aliasing) layout.
    rejected(&c.before, "v_cache", "k_cache's shape", |b| {
        let (k, v) = b.split_at_mut(c.n);
        attn.append_kv(&kn(), &vn(), &mut KvCacheMut::contiguous(TensorMut::host(k, lk), TensorMut::host(v, shaped([3, 9, 2, 16])), CacheLens::host(&c.kv.lens)))
    });
    rejected(&c.before, "k_cache", "no two output elements share memory", |b| {
        let (k, v) = b.split_at_mut(c.n);
        let overlapping = Layout::strided([3, 10, 2, 16], [320, 16, 16]);
        attn.append_kv(&kn(), &vn(), &mut KvCacheMut::contiguous(TensorMut::host(k, overlapping), TensorMut::host(v, lk), CacheLens::host(&c.kv.lens)))
    });
    // A block table is for pages.
    rejected(&c.before, "block_table", "paged caches", |b| {
        let (k, v) = b.split_at_mut(c.n);
        let table = [0i32; 8];
        let m = KvCacheMut::contiguous(TensorMut::host(k, lk), TensorMut::host(v, lk), CacheLens::host(&c.kv.lens))
            .with_block_table(BlockTable::host(&table, 2, 2), CacheLens::host(&c.kv.lens));
        attn.append_kv(&kn(), &vn(), &mut { m })
    });
    // Device memory next to a host cache.
    rejected(&c.before, "k_new", "device memory", |b| {
        let dev = unsafe { Tensor::<f32>::from_raw_device(FAKE_DEVICE, c.k_new.len(), ln) };
        with_lens(b, &c.kv.lens, &|m| attn.append_kv(&dev, &vn(), m))
    });
    rejected(&c.before, "cache_lens", "device memory", |b| {
        let (k, v) = b.split_at_mut(c.n);
        let lens = unsafe { CacheLens::from_raw_device(FAKE_DEVICE, 3) };
        attn.append_kv(&kn(), &vn(), &mut KvCacheMut::contiguous(TensorMut::host(k, lk), TensorMut::host(v, lk), lens))
    });
    // The fused call: the attention's own checks come before the append writes anything.
    let fused = |b: &mut [f32], q: &[f32], lq: Layout, lq_out: Layout| {
        with_lens(b, &c.kv.lens, &|m| {
            let mut out = vec![0f32; lq_out.numel()];
            attn.forward_kvcache_append(&Tensor::host(q, lq), &kn(), &vn(), m, &mut TensorMut::host(&mut out, lq_out), None, &Default::default())
                .map(|_| ())
        })
    };
    let lq = c.kv.lq;
    rejected(&c.before, "k_cache", "q's head_dim 8", |b| fused(b, &big, shaped([3, 2, 4, 8]), shaped([3, 2, 4, 8])));
    rejected(&c.before, "cache_lens", "q's batch 2", |b| fused(b, &big, shaped([2, 2, 4, 16]), shaped([2, 2, 4, 16])));
    rejected(&c.before, "out", "q's shape", |b| fused(b, &c.kv.q, lq, shaped([3, 1, 4, 16])));
    rejected(&c.before, "k_cache", "heads", |b| fused(b, &big, shaped([3, 2, 3, 16]), shaped([3, 2, 3, 16])));
    rejected(&c.before, "options.softcap", "above 0", |b| {
        with_lens(b, &c.kv.lens, &|m| {
            let mut out = vec![0f32; lq.numel()];
            let opts = attention::Options::default().softcap(-1.0);
            attn.forward_kvcache_append(&Tensor::host(&c.kv.q, lq), &kn(), &vn(), m, &mut TensorMut::host(&mut out, lq), None, &opts).map(|_| ())
        })
    });
    // And a good call after all of them writes exactly the new rows.
    let mut buf = c.before.clone();
    with_lens(&mut buf, &c.kv.lens, &append).unwrap();
    assert_eq!(first_difference(&buf, &c.after), None);
}

#[test]
fn bad_paged_appends_are_typed_errors_that_write_nothing() {
    let attn = cpu();
    let mut rng = Rng::seed(12);
    let c = AppendCase::<bf16>::new(&mut rng, Store::PagedVllm { page_size: 4 }, 3, 2, (4, 2, 16), 10, RefMask::default(), NewLayout::Tokens);
    let (lk, ln) = (c.kv.lk, c.ln);
    let num_slots = (lk.batch() * lk.seqlen()) as i64;
    let (kn, vn) = (Tensor::host(&c.k_new, ln), Tensor::host(&c.v_new, ln));
    let paged = |buf: &mut [bf16], slots: SlotMapping<'_>, f: &dyn Fn(&mut KvCacheMut<'_, bf16>) -> Result<(), Error>| {
        let (k, v) = buf.split_at_mut(c.n);
        f(&mut KvCacheMut::paged(TensorMut::host(k, lk), TensorMut::host(v, lk), slots))
    };
    let append = |m: &mut KvCacheMut<'_, bf16>| attn.append_kv(&kn, &vn, m);
    let mut slots = c.slots.clone();
    slots[1] = num_slots;
    rejected(&c.before, "slot_mapping", &format!("entry 1 = {num_slots}"), |b| paged(b, SlotMapping::host(&slots), &append));
    rejected(&c.before, "slot_mapping", &format!("0..{num_slots}"), |b| paged(b, SlotMapping::host(&slots), &append));
    rejected(&c.before, "slot_mapping", "5 entries", |b| paged(b, SlotMapping::host(&c.slots[..5]), &append));
    rejected(&c.before, "slot_mapping", "device memory", |b| paged(b, unsafe { SlotMapping::from_raw_device(FAKE_DEVICE, c.slots.len()) }, &append));
    // New rows whose token count is not the slots'.
    let l7 = Layout::contiguous(7, 1, 2, 16);
    let big = vec![bf16::ZERO; 4096];
    rejected(&c.before, "slot_mapping", "7 x 1 = 7", |b| paged(b, SlotMapping::host(&c.slots), &|m| attn.append_kv(&Tensor::host(&big, l7), &Tensor::host(&big, l7), m)));
    // Fused: pages need the table; the table and lengths are checked before anything is written.
    let lq = c.kv.lq;
    let table = |t: &[i32], lens: &[i32], b: &mut [bf16]| -> Result<BackendKind, Error> {
        let (k, v) = b.split_at_mut(c.n);
        let mut out = vec![bf16::ZERO; lq.numel()];
        let mut m = KvCacheMut::paged(TensorMut::host(k, lk), TensorMut::host(v, lk), SlotMapping::host(&c.slots))
            .with_block_table(BlockTable::host(t, c.kv.pages_per_seq, c.kv.table_stride), CacheLens::host(lens));
        attn.forward_kvcache_append(&Tensor::host(&c.kv.q, lq), &kn, &vn, &mut m, &mut TensorMut::host(&mut out, lq), None, &c.kv.options())
    };
    rejected(&c.before, "block_table", "KvCacheMut::with_block_table", |b| {
        let (k, v) = b.split_at_mut(c.n);
        let mut out = vec![bf16::ZERO; lq.numel()];
        let mut m = KvCacheMut::paged(TensorMut::host(k, lk), TensorMut::host(v, lk), SlotMapping::host(&c.slots));
        attn.forward_kvcache_append(&Tensor::host(&c.kv.q, lq), &kn, &vn, &mut m, &mut TensorMut::host(&mut out, lq), None, &c.kv.options())
    });
    let mut bad_table = c.kv.table.clone();
    bad_table[0] = 1000;
    rejected(&c.before, "block_table", "page 1000", |b| table(&bad_table, &c.kv.lens, b));
    let cap = (c.kv.pages_per_seq * lk.seqlen()) as i32;
    rejected(&c.before, "cache_lens", &format!("entry 0 = {}", cap + 1), |b| table(&c.kv.table, &[cap + 1, 0, 0], b));
    rejected(&c.before, "cache_lens", "2 entries", |b| table(&c.kv.table, &c.kv.lens[..2], b));
    // The same call with good arguments runs and writes the new rows.
    let mut buf = c.before.clone();
    assert_eq!(table(&c.kv.table, &c.kv.lens, &mut buf).unwrap(), BackendKind::Cpu);
    assert_eq!(first_difference(&buf, &c.after), None);
}

/// A device-length or slot error is impossible on the host (they are checked), so the skip
/// rules are the GPU suite's; here: negative slots (padding) are skipped, whatever their value.
#[test]
fn negative_slots_are_padding_tokens() {
    let attn = cpu();
    let mut rng = Rng::seed(13);
    let mut c = AppendCase::<f16>::new(&mut rng, Store::PagedHnd { page_size: 16 }, 4, 3, (4, 2, 16), 40, RefMask::default(), NewLayout::OneRow);
    // Sequence 1's tokens become padding: -1, -7, i64::MIN.
    for (i, s) in [-1, -7, i64::MIN].into_iter().enumerate() {
        c.slots[3 + i] = s;
    }
    let mut want = c.before.clone();
    let (d, n) = (c.kv.d, c.n);
    for b in [0, 2, 3] {
        let len = c.kv.lens[b] as usize;
        if len == 0 {
            continue;
        }
        for i in 0..3 {
            for kh in 0..2 {
                let o = c.kv.key_offset(b, len - 3 + i, kh);
                want[o..o + d].copy_from_slice(&c.after[o..o + d]);
                want[n + o..n + o + d].copy_from_slice(&c.after[n + o..n + o + d]);
            }
        }
    }
    let mut buf = c.before.clone();
    attn.append_kv(&Tensor::host(&c.k_new, c.ln), &Tensor::host(&c.v_new, c.ln), &mut cache_mut(&c, None, &mut buf, false)).unwrap();
    assert_eq!(first_difference(&buf, &want), None);
}

/// Every check packed rows add, each a typed error naming its argument that writes neither the
/// cache nor out; then the same call with good arguments runs.
#[test]
fn bad_packed_appends_are_typed_errors_that_write_nothing() {
    let attn = cpu();
    let mut rng = Rng::seed(14);
    let mut c = AppendCase::<f32>::new(&mut rng, Store::Contiguous, 3, 3, (4, 2, 16), 10, RefMask::default(), NewLayout::Contiguous);
    let p = c.packed(&[2, 0, 3], NewLayout::OneRow);
    let (lk, ln, lq) = (c.kv.lk, p.ln, p.lq);
    assert_eq!((p.cu.as_slice(), p.max_q), (&[0, 2, 2, 5][..], 3));
    let (kn, vn) = (Tensor::host(&p.k_new, ln), Tensor::host(&p.v_new, ln));
    // A contiguous cache with the given lengths and prefix sums (bound `max_q`), run by `f`.
    let packed = |buf: &mut [f32], lens: &[i32], cu: SeqLens<'_>, max_q: usize, f: &dyn Fn(&mut KvCacheMut<'_, f32>) -> Result<(), Error>| {
        let (k, v) = buf.split_at_mut(c.n);
        f(&mut KvCacheMut::contiguous(TensorMut::host(k, lk), TensorMut::host(v, lk), CacheLens::host(lens)).with_varlen_queries(cu, max_q))
    };
    let append = |m: &mut KvCacheMut<'_, f32>| attn.append_kv(&kn, &vn, m);
    let with_cu = |b: &mut [f32], cu: &[i32]| packed(b, &c.kv.lens, SeqLens::host(cu), 3, &append);
    let before = &p.before;
    // The new rows: one row of tokens (or one token per batch entry), not a [batch, new_len] grid.
    let grid = Layout::contiguous(3, 2, 2, 16);
    let big = vec![0f32; 4096];
    rejected(before, "k_new", "[1, total_q, kv_heads, head_dim]", |b| {
        packed(b, &c.kv.lens, SeqLens::host(&p.cu), 3, &|m| attn.append_kv(&Tensor::host(&big, grid), &Tensor::host(&big, grid), m))
    });
    // The prefix sums: count, bound, memory, and each rule of a host array.
    rejected(before, "cu_seqlens_q", "1 entries", |b| with_cu(b, &[0]));
    rejected(before, "max_seqlen_q", "1..=", |b| packed(b, &c.kv.lens, SeqLens::host(&p.cu), 0, &append));
    rejected(before, "cu_seqlens_q", "device memory", |b| {
        packed(b, &c.kv.lens, unsafe { SeqLens::from_raw_device(FAKE_DEVICE, 4) }, 3, &append)
    });
    rejected(before, "cu_seqlens_q", "entry 0 = 1", |b| with_cu(b, &[1, 2, 2, 5]));
    rejected(before, "cu_seqlens_q", "last entry 3 = 4", |b| with_cu(b, &[0, 2, 2, 4]));
    rejected(before, "cu_seqlens_q", "non-decreasing", |b| with_cu(b, &[0, 3, 2, 5]));
    rejected(before, "cu_seqlens_q", "sequence 2 of length 3", |b| packed(b, &c.kv.lens, SeqLens::host(&p.cu), 2, &append));
    // A contiguous cache has one row per sequence.
    rejected(before, "cu_seqlens_q", "k_cache's batch 3", |b| packed(b, &c.kv.lens[..2], SeqLens::host(&[0, 2, 5]), 3, &append));
    // Lengths: one per sequence, each at least its rows (an idle sequence may hold none).
    rejected(before, "cache_lens", "2 entries", |b| packed(b, &c.kv.lens[..2], SeqLens::host(&p.cu), 3, &append));
    rejected(before, "cache_lens", "entry 2 = 2", |b| packed(b, &[10, 0, 2], SeqLens::host(&p.cu), 3, &append));
    rejected(before, "cache_lens", "sequence 2's keys with its 3 new rows", |b| packed(b, &[10, 0, 2], SeqLens::host(&p.cu), 3, &append));
    rejected(before, "cache_lens", "entry 0 = 1", |b| packed(b, &[1, 0, 3], SeqLens::host(&p.cu), 3, &append));
    // The fused call: q is [1, total_q, ..] with the new rows' prefix sums; out stays as it was.
    let fused = |b: &mut [f32], q: &[f32], lq: Layout| {
        packed(b, &c.kv.lens, SeqLens::host(&p.cu), 3, &|m| {
            let mut out = vec![f32::NAN; lq.numel()];
            let r = attn.forward_kvcache_append(&Tensor::host(q, lq), &kn, &vn, m, &mut TensorMut::host(&mut out, lq), None, &Options::default());
            if r.is_err() {
                assert!(out.iter().all(|x| x.is_nan()), "a failed call wrote out");
            }
            r.map(|_| ())
        })
    };
    rejected(before, "q", "batch 5", |b| fused(b, &big, Layout::contiguous(5, 1, 4, 16)));
    rejected(before, "cu_seqlens_q", "row count 6", |b| fused(b, &big, Layout::contiguous(1, 6, 4, 16)));
    // And the good calls write exactly the packed rows, with an idle sequence of length 0.
    let mut buf = p.before.clone();
    packed(&mut buf, &c.kv.lens, SeqLens::host(&p.cu), 3, &append).unwrap();
    assert_eq!(first_difference(&buf, &c.after), None);
    let mut buf = p.before.clone();
    let lens = [c.kv.lens[0], 0, c.kv.lens[2]];
    packed(&mut buf, &lens, SeqLens::host(&p.cu), 3, &append).unwrap();
    assert_eq!(first_difference(&buf, &c.after), None, "sequence 1 has no rows: its length is free");
    let mut buf = p.before.clone();
    fused(&mut buf, &p.q, lq).unwrap();
    assert_eq!(first_difference(&buf, &c.after), None);
}

/// Paged packed rows: the slots are one per packed row, and the prefix sums are checked
/// against the rows (host) before anything is written.
#[test]
fn bad_packed_paged_appends_are_typed_errors_that_write_nothing() {
    let attn = cpu();
    let mut rng = Rng::seed(15);
    let mut c = AppendCase::<bf16>::new(&mut rng, Store::PagedVllm { page_size: 4 }, 3, 3, (4, 2, 16), 10, RefMask::default(), NewLayout::Tokens);
    let p = c.packed(&[1, 3, 0], NewLayout::Tokens);
    let total = p.slots.len();
    let (lk, ln) = (c.kv.lk, p.ln);
    let (kn, vn) = (Tensor::host(&p.k_new, ln), Tensor::host(&p.v_new, ln));
    let paged = |buf: &mut [bf16], slots: &[i64], cu: &[i32]| {
        let (k, v) = buf.split_at_mut(c.n);
        let mut m = KvCacheMut::paged(TensorMut::host(k, lk), TensorMut::host(v, lk), SlotMapping::host(slots)).with_varlen_queries(SeqLens::host(cu), 3);
        attn.append_kv(&kn, &vn, &mut m)
    };
    rejected(&p.before, "slot_mapping", &format!("{} entries", total - 1), |b| paged(b, &p.slots[..total - 1], &p.cu));
    let mut short = p.cu.clone();
    *short.last_mut().unwrap() -= 1;
    rejected(&p.before, "cu_seqlens_q", &format!("row count {total}"), |b| paged(b, &p.slots, &short));
    let mut buf = p.before.clone();
    paged(&mut buf, &p.slots, &p.cu).unwrap();
    assert_eq!(first_difference(&buf, &c.after), None);
}
