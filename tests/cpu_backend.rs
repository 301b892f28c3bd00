//! The CPU backend through the public API against the plain f64 reference, on fresh random
//! inputs: seqlen 1, seqlen_q ≠ seqlen_k with causal (fully masked rows), GQA/MQA, strided
//! layouts, all three dtypes. (src/cpu.rs tests the kernel itself more widely.)

mod common;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;

use attention::{BackendKind, Element, Layout, LseMut, Options, SeqLens, Selector, Settings, Tensor, TensorMut, VarLen};
use common::reference::{attention_f64, attention_f64_masked, rel_err, varlen_f64, RefInput, RefMask};
use common::rng::Rng;
use half::{bf16, f16};

/// The system allocator, plus two per-thread knobs for the scratch tests: the largest single
/// allocation seen, and a size above which allocations fail. Per thread, so tests running in
/// parallel do not see each other's allocations; the CPU backend allocates its scratch on the
/// calling thread, which is what those tests watch.
struct Tracking;

thread_local! {
    static LARGEST_ALLOC: Cell<usize> = const { Cell::new(0) };
    static ALLOC_LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Records an allocation of `size` bytes; whether it may go ahead.
fn admit(size: usize) -> bool {
    // `try_with`: the allocator also runs while thread-locals are being torn down.
    let _ = LARGEST_ALLOC.try_with(|m| m.set(m.get().max(size)));
    ALLOC_LIMIT.try_with(|l| size <= l.get()).unwrap_or(true)
}

// SAFETY: every call forwards to `System` unchanged or fails with null, which `GlobalAlloc`
// allows for any request.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        if admit(layout.size()) { System.alloc(layout) } else { std::ptr::null_mut() }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        if admit(layout.size()) { System.alloc_zeroed(layout) } else { std::ptr::null_mut() }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        if admit(new_size) { System.realloc(ptr, layout, new_size) } else { std::ptr::null_mut() }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Makes allocations above `bytes` fail on this thread until dropped.
struct AllocLimit;

impl AllocLimit {
    fn set(bytes: usize) -> Self {
        ALLOC_LIMIT.with(|l| l.set(bytes));
        AllocLimit
    }
}

impl Drop for AllocLimit {
    fn drop(&mut self) {
        ALLOC_LIMIT.with(|l| l.set(usize::MAX));
    }
}

fn check<T: Element>(rng: &mut Rng, dims: [usize; 6], causal: bool, heads_first: bool, tol: f64) {
    let [b, sq, sk, h, hk, d] = dims;
    let lay = |s, h| if heads_first { Layout::heads_first(b, s, h, d) } else { Layout::contiguous(b, s, h, d) };
    let (lq, lk) = (lay(sq, h), lay(sk, hk));
    let gen = |rng: &mut Rng, n| {
        let mut v = vec![T::from_f32(0.0); n];
        rng.fill(&mut v, T::from_f32);
        v
    };
    let (q, k, v) = (gen(rng, lq.numel()), gen(rng, lk.numel()), gen(rng, lk.numel()));
    let mut out = vec![T::from_f32(f32::NAN); lq.numel()];
    let mut lse = vec![f32::NAN; b * h * sq];
    let attn = Selector::from_settings(Settings::default()).cpu_threads(3).select().unwrap();
    let ran = attn
        .forward_with_lse(
            &Tensor::host(&q, lq),
            &Tensor::host(&k, lk),
            &Tensor::host(&v, lk),
            &mut TensorMut::host(&mut out, lq),
            &mut LseMut::host(&mut lse),
            &Options::default().causal(causal),
        )
        .unwrap();
    assert_eq!(ran, BackendKind::Cpu);
    let to64 = |x: T| x.to_f32() as f64;
    let (ref_out, ref_lse) = attention_f64(input(&q, lq), input(&k, lk), input(&v, lk), to64, 1.0 / (d as f64).sqrt(), causal);
    let mut got = Vec::new();
    for bi in 0..b {
        for i in 0..sq {
            for hi in 0..h {
                let o = lq.offset(bi, i, hi);
                got.extend(out[o..o + d].iter().map(|&x| to64(x)));
            }
        }
    }
    let err = rel_err(&got, &ref_out);
    assert!(err < tol, "{dims:?} causal={causal} heads_first={heads_first}: rel err {err:.2e} (seed {:#x})", rng.get_seed());
    for (g, r) in lse.iter().zip(&ref_lse) {
        if r.is_infinite() {
            assert_eq!(*g as f64, *r, "masked row lse");
        } else {
            assert!((*g as f64 - r).abs() < 1e-4, "lse {g} vs {r}");
        }
    }
}

fn input<T>(data: &[T], l: Layout) -> RefInput<'_, T> {
    RefInput { data, shape: l.shape(), strides: l.strides() }
}

#[test]
fn cpu_backend_matches_f64_reference() {
    let mut rng = Rng::fresh();
    let cases: [[usize; 6]; 6] = [
        [1, 1, 1, 1, 1, 64],
        [2, 1, 37, 4, 2, 32],
        [1, 9, 4, 4, 4, 16],   // sq > sk: causal leaves the first 5 rows with no key
        [2, 33, 70, 8, 1, 24], // MQA
        [1, 65, 65, 6, 3, 7],  // GQA, odd head_dim
        [2, 17, 129, 2, 2, 128],
    ];
    for dims in cases {
        for causal in [false, true] {
            for heads_first in [false, true] {
                check::<f32>(&mut rng, dims, causal, heads_first, 1e-5);
                check::<f16>(&mut rng, dims, causal, heads_first, 2e-3);
                check::<bf16>(&mut rng, dims, causal, heads_first, 1e-2);
            }
        }
    }
}

/// The shapes the CPU benchmark compares with PyTorch, scaled to test time: decode (one query
/// token, GQA 32/8, d128, a cache of many key tiles, partial last tile) in both cache layouts,
/// and prefill with full-width micro-kernel panels plus remainder rows and keys.
#[test]
fn cpu_backend_matches_reference_on_the_bench_shapes() {
    let mut rng = Rng::fresh();
    let cases: [[usize; 6]; 4] = [
        [1, 1, 1000, 32, 8, 128], // decode
        [1, 3, 515, 32, 8, 128],  // a few new tokens against a cache
        [1, 130, 130, 16, 16, 64],
        [1, 97, 97, 4, 4, 128],
    ];
    for dims in cases {
        for causal in [false, true] {
            for heads_first in [false, true] {
                check::<f32>(&mut rng, dims, causal, heads_first, 1e-5);
                check::<f16>(&mut rng, dims, causal, heads_first, 2e-3);
                check::<bf16>(&mut rng, dims, causal, heads_first, 1e-2);
            }
        }
    }
}

/// Decode and prefill give the same bits on 1, 2, 3 and 8 threads (work is split by shape
/// only, each row computed by one thread in a fixed order).
#[test]
fn cpu_backend_bits_do_not_depend_on_the_thread_count() {
    let mut rng = Rng::fresh();
    // The third shape splits its keys into chunks (decode with few kv heads, a long cache).
    for [b, sq, sk, h, hk, d] in [[1usize, 1, 700, 32, 8, 128], [1, 150, 150, 4, 2, 64], [1, 2, 3000, 8, 2, 64]] {
        let (lq, lk) = (Layout::contiguous(b, sq, h, d), Layout::contiguous(b, sk, hk, d));
        let gen = |rng: &mut Rng, n| {
            let mut v = vec![bf16::ZERO; n];
            rng.fill(&mut v, bf16::from_f32);
            v
        };
        let (q, k, v) = (gen(&mut rng, lq.numel()), gen(&mut rng, lk.numel()), gen(&mut rng, lk.numel()));
        let run = |threads: usize| {
            let mut out = vec![bf16::ZERO; lq.numel()];
            let mut lse = vec![0.0f32; b * h * sq];
            let attn = Selector::from_settings(Settings::default()).cpu_threads(threads).select().unwrap();
            attn.forward_with_lse(
                &Tensor::host(&q, lq),
                &Tensor::host(&k, lk),
                &Tensor::host(&v, lk),
                &mut TensorMut::host(&mut out, lq),
                &mut LseMut::host(&mut lse),
                &Options::default().causal(true),
            )
            .unwrap();
            (out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert!(run(threads) == one, "{:?}: {threads} threads differ from 1", [b, sq, sk, h, hk, d]);
        }
    }
}

#[test]
fn fully_masked_rows_are_zero_with_minus_infinity_lse() {
    let (b, sq, sk, h, d) = (1, 6, 2, 2, 8);
    let (lq, lk) = (Layout::contiguous(b, sq, h, d), Layout::contiguous(b, sk, h, d));
    let x: Vec<f32> = (0..lq.numel()).map(|i| (i as f32).sin()).collect();
    let kv: Vec<f32> = (0..lk.numel()).map(|i| (i as f32).cos()).collect();
    let mut out = vec![f32::NAN; lq.numel()];
    let mut lse = vec![f32::NAN; b * h * sq];
    let attn = Selector::from_settings(Settings::default()).select().unwrap();
    attn.forward_with_lse(
        &Tensor::host(&x, lq),
        &Tensor::host(&kv, lk),
        &Tensor::host(&kv, lk),
        &mut TensorMut::host(&mut out, lq),
        &mut LseMut::host(&mut lse),
        &Options::default().causal(true),
    )
    .unwrap();
    // Bottom-right alignment: rows 0..4 see no key, row 4 sees key 0, row 5 both.
    for i in 0..sq {
        for hi in 0..h {
            let row = &out[lq.offset(0, i, hi)..][..d];
            let l = lse[hi * sq + i];
            if i < sq - sk {
                assert!(row.iter().all(|&v| v == 0.0), "row {i} should be zeros: {row:?}");
                assert_eq!(l, f32::NEG_INFINITY);
            } else {
                assert!(row.iter().all(|v| v.is_finite()) && l.is_finite());
            }
        }
    }
}

/// Sliding windows (one- and two-sided, with and without causal) and soft-capping against the
/// reference, which spells the rule out on its own.
#[test]
fn cpu_backend_windows_and_softcap_match_reference() {
    let mut rng = Rng::fresh();
    let windows = [(Some(0), Some(0)), (Some(3), None), (None, Some(2)), (Some(5), Some(1)), (Some(17), Some(0))];
    let shapes: [[usize; 6]; 3] = [[1, 33, 33, 2, 1, 16], [2, 9, 70, 4, 2, 8], [1, 70, 9, 2, 2, 24]];
    let attn = Selector::from_settings(Settings::default()).cpu_threads(2).select().unwrap();
    for (n, shape) in shapes.into_iter().enumerate() {
        for (w, &(left, right)) in windows.iter().enumerate() {
            for causal in [false, true] {
                let softcap = [None, Some(2.0f32)][(n + w) % 2];
                let [b, _, sk, _, hk, d] = shape;
                masked_case_matches_reference(&attn, &mut rng, shape, Layout::heads_first(b, sk, hk, d), (left, right), causal, softcap);
            }
        }
    }
}

/// One masked case against the f64 reference: random q/k/v (k and v in `lk`), NaN-poisoned
/// out and lse, output within 1e-5 (or both all zeros), lse within 1e-4 (exactly -inf where the
/// reference row sees no key).
fn masked_case_matches_reference(
    attn: &attention::Attention,
    rng: &mut Rng,
    [b, sq, sk, h, hk, d]: [usize; 6],
    lk: Layout,
    (left, right): (Option<usize>, Option<usize>),
    causal: bool,
    softcap: Option<f32>,
) {
    let lq = Layout::contiguous(b, sq, h, d);
    let gen = |rng: &mut Rng, n| {
        let mut v = vec![0f32; n];
        rng.fill(&mut v, |x| x * 2.0);
        v
    };
    let (q, k, v) = (gen(rng, lq.numel()), gen(rng, lk.numel()), gen(rng, lk.numel()));
    let mut out = vec![f32::NAN; lq.numel()];
    let mut lse = vec![f32::NAN; b * h * sq];
    let mut opts = Options::default().causal(causal).window(left, right);
    if let Some(c) = softcap {
        opts = opts.softcap(c);
    }
    attn.forward_with_lse(
        &Tensor::host(&q, lq),
        &Tensor::host(&k, lk),
        &Tensor::host(&v, lk),
        &mut TensorMut::host(&mut out, lq),
        &mut LseMut::host(&mut lse),
        &opts,
    )
    .unwrap();
    let mask = RefMask { causal, left, right, softcap: softcap.map(f64::from) };
    let (ref_out, ref_lse) = attention_f64_masked(input(&q, lq), input(&k, lk), input(&v, lk), |x| x as f64, 1.0 / (d as f64).sqrt(), mask);
    let got: Vec<f64> = out.iter().map(|&x| x as f64).collect();
    let err = rel_err(&got, &ref_out);
    let case = format!("{:?} window={left:?},{right:?} causal={causal} softcap={softcap:?} (seed {:#x})", [b, sq, sk, h, hk, d], rng.get_seed());
    assert!(err < 1e-5 || ref_out.iter().all(|x| *x == 0.0) && got.iter().all(|x| *x == 0.0), "{case}: rel {err:.2e}");
    for (g, r) in lse.iter().zip(&ref_lse) {
        if r.is_infinite() {
            assert_eq!(*g as f64, *r, "{case}: masked row lse");
        } else {
            assert!((*g as f64 - r).abs() < 1e-4, "{case}: lse {g} vs {r}");
        }
    }
}

/// A packed variable-length batch against the per-sequence f64 reference: lengths 0 and 1,
/// sq ≠ sk per sequence (including queries with no keys), GQA, causal and windowed, both
/// packed layouts, lse in `[heads, total_q]`.
#[test]
fn varlen_batches_match_the_per_sequence_reference() {
    let mut rng = Rng::fresh();
    let q_lens = [3usize, 0, 1, 17, 64, 5, 2];
    let k_lens = [5usize, 4, 1, 17, 30, 0, 9];
    let prefix = |lens: &[usize]| -> Vec<i32> {
        std::iter::once(0).chain(lens.iter().scan(0, |s, &l| { *s += l; Some(*s as i32) })).collect()
    };
    let (cu_q, cu_k) = (prefix(&q_lens), prefix(&k_lens));
    let (total_q, total_k) = (*cu_q.last().unwrap() as usize, *cu_k.last().unwrap() as usize);
    let (h, hk, d) = (4, 2, 24);
    let attn = Selector::from_settings(Settings::default()).cpu_threads(3).select().unwrap();
    for (mask, heads_first) in [
        (RefMask::default(), false),
        (RefMask { causal: true, ..RefMask::default() }, true),
        (RefMask { causal: true, left: Some(4), ..RefMask::default() }, false),
        (RefMask { left: Some(3), right: Some(2), softcap: Some(5.0), ..RefMask::default() }, true),
    ] {
        let lay = |s, h| if heads_first { Layout::heads_first(1, s, h, d) } else { Layout::contiguous(1, s, h, d) };
        let (lq, lk) = (lay(total_q, h), lay(total_k, hk));
        let gen = |rng: &mut Rng, n| {
            let mut v = vec![0f32; n];
            rng.fill(&mut v, |x| x);
            v
        };
        let (q, k, v) = (gen(&mut rng, lq.numel()), gen(&mut rng, lk.numel()), gen(&mut rng, lk.numel()));
        let mut out = vec![f32::NAN; lq.numel()];
        let mut lse = vec![f32::NAN; h * total_q];
        let mut opts = Options::default().causal(mask.causal).window(mask.left, mask.right);
        if let Some(c) = mask.softcap {
            opts = opts.softcap(c as f32);
        }
        let varlen = VarLen::new(SeqLens::host(&cu_q), SeqLens::host(&cu_k), 64, 30);
        let ran = attn
            .forward_varlen_with_lse(
                &Tensor::host(&q, lq),
                &Tensor::host(&k, lk),
                &Tensor::host(&v, lk),
                &mut TensorMut::host(&mut out, lq),
                &mut LseMut::host(&mut lse),
                &varlen,
                &opts,
            )
            .unwrap();
        assert_eq!(ran, BackendKind::Cpu);
        let (ref_out, ref_lse) =
            varlen_f64(input(&q, lq), input(&k, lk), input(&v, lk), &cu_q, &cu_k, |x| x as f64, 1.0 / (d as f64).sqrt(), mask);
        let mut got = Vec::new();
        for i in 0..total_q {
            for hi in 0..h {
                let o = lq.offset(0, i, hi);
                got.extend(out[o..o + d].iter().map(|&x| x as f64));
            }
        }
        let want: Vec<f64> = ref_out.iter().map(|x| x.expect("every row is in a sequence")).collect();
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "{mask:?} heads_first={heads_first}: rel err {err:.2e} (seed {:#x})", rng.get_seed());
        for (g, r) in lse.iter().zip(&ref_lse) {
            let r = r.unwrap();
            if r.is_infinite() {
                assert_eq!(*g as f64, r, "row with no key: lse");
            } else {
                assert!((*g as f64 - r).abs() < 1e-4, "lse {g} vs {r}");
            }
        }
    }
}

/// Prefix sums of sequence lengths.
fn prefix(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0).chain(lens.iter().scan(0, |s, &l| { *s += l; Some(*s as i32) })).collect()
}

/// The logical tensor of a view, copied into a dense `[b, s, h, d]` buffer.
fn dense<T: Copy>(data: &[T], l: Layout) -> Vec<T> {
    let [b, s, h, d] = l.shape();
    let mut x = Vec::with_capacity(l.numel());
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h {
                x.extend_from_slice(&data[l.offset(bi, si, hi)..][..d]);
            }
        }
    }
    x
}

/// One input view of a varlen test: its buffer and layout.
type View<'a> = (&'a [f32], Layout);

/// Runs a packed batch on arbitrary q/k/v views through a CPU handle with `threads` threads,
/// into an `out` buffer of `out_len` NaNs under `out_layout`; checks it against the
/// per-sequence f64 reference (on dense copies, so the reference never indexes the views) and
/// that nothing outside the sequences' rows was written. Returns (out, lse) for bit comparisons.
#[allow(clippy::too_many_arguments)]
fn check_varlen_views(
    q: View<'_>,
    k: View<'_>,
    v: View<'_>,
    out_layout: Layout,
    out_len: usize,
    cu: (&[i32], &[i32]),
    mask: RefMask,
    threads: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (cu_q, cu_k) = cu;
    let [_, total_q, h, d] = q.1.shape();
    let max_len = |cu: &[i32]| cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0).max(1);
    let varlen = VarLen::new(SeqLens::host(cu_q), SeqLens::host(cu_k), max_len(cu_q), max_len(cu_k));
    let mut opts = Options::default().causal(mask.causal).window(mask.left, mask.right);
    if let Some(c) = mask.softcap {
        opts = opts.softcap(c as f32);
    }
    let mut out = vec![f32::NAN; out_len];
    let mut lse = vec![f32::NAN; h * total_q];
    let attn = Selector::from_settings(Settings::default()).cpu_threads(threads).select().unwrap();
    let ran = attn
        .forward_varlen_with_lse(
            &Tensor::host(q.0, q.1),
            &Tensor::host(k.0, k.1),
            &Tensor::host(v.0, v.1),
            &mut TensorMut::host(&mut out, out_layout),
            &mut LseMut::host(&mut lse),
            &varlen,
            &opts,
        )
        .unwrap();
    assert_eq!(ran, BackendKind::Cpu);

    let (dq, dk, dv) = (dense(q.0, q.1), dense(k.0, k.1), dense(v.0, v.1));
    let contig = |l: Layout| Layout::contiguous(1, l.seqlen(), l.heads(), d);
    let (ref_out, ref_lse) = varlen_f64(
        input(&dq, contig(q.1)),
        input(&dk, contig(k.1)),
        input(&dv, contig(v.1)),
        cu_q,
        cu_k,
        |x| x as f64,
        1.0 / (d as f64).sqrt(),
        mask,
    );
    let ctx = format!("{mask:?} threads={threads} cu_q={cu_q:?} cu_k={cu_k:?}");
    let mut got = Vec::new();
    let mut want = Vec::new();
    let mut written = vec![false; out_len];
    for i in 0..total_q {
        for hi in 0..h {
            let o = out_layout.offset(0, i, hi);
            for e in 0..d {
                match ref_out[(i * h + hi) * d + e] {
                    Some(r) => {
                        want.push(r);
                        got.push(out[o + e] as f64);
                        written[o + e] = true;
                    }
                    None => assert!(out[o + e].is_nan(), "{ctx}: wrote row {i}, which is in no sequence"),
                }
            }
        }
    }
    let err = rel_err(&got, &want);
    assert!(err < 1e-5, "{ctx}: rel err {err:.2e}");
    for (i, w) in written.iter().enumerate() {
        assert!(*w || out[i].is_nan(), "{ctx}: wrote padding element {i} of out");
    }
    for (i, (g, r)) in lse.iter().zip(&ref_lse).enumerate() {
        match r {
            None => assert!(g.is_nan(), "{ctx}: wrote lse {i}, which is in no sequence"),
            Some(r) if r.is_infinite() => assert_eq!(*g as f64, *r, "{ctx}: lse {i} of a row with no key"),
            Some(r) => assert!((*g as f64 - r).abs() < 1e-4, "{ctx}: lse {i}: {g} vs {r}"),
        }
    }
    (out, lse)
}

/// The masks the varlen view tests run under.
fn varlen_masks() -> [RefMask; 4] {
    [
        RefMask::default(),
        RefMask { causal: true, ..RefMask::default() },
        RefMask { causal: true, left: Some(2), ..RefMask::default() },
        RefMask { left: Some(1), right: Some(3), softcap: Some(4.0), ..RefMask::default() },
    ]
}

/// Random values, with `NaN` in every element no view covers (`covered` false), so reading
/// padding shows up in the output.
fn random_with_nan_gaps(rng: &mut Rng, n: usize, views: &[(usize, Layout)]) -> Vec<f32> {
    let mut x = vec![f32::NAN; n];
    for &(base, l) in views {
        let [b, s, h, d] = l.shape();
        for bi in 0..b {
            for si in 0..s {
                for hi in 0..h {
                    let o = base + l.offset(bi, si, hi);
                    rng.fill(&mut x[o..o + d], |v| v);
                }
            }
        }
    }
    x
}

/// q, k and v as views into one packed QKV buffer `[total, h + 2·hk, d]` (as a fused QKV
/// projection leaves them), so k's and v's buffers end right after their last row: the key
/// sequence that is empty and last starts exactly at (k) or past (v) the end of its buffer,
/// while that sequence still has queries, which must get zeros and `-inf`.
#[test]
fn varlen_on_a_packed_qkv_view_with_an_empty_last_key_sequence() {
    let mut rng = Rng::fresh();
    let (h, hk, d) = (4, 2, 16);
    let cu_q = prefix(&[3, 0, 4, 2]);
    let cu_k = prefix(&[4, 2, 3, 0]);
    let total = *cu_q.last().unwrap() as usize;
    assert_eq!(total, *cu_k.last().unwrap() as usize, "one token buffer");
    let row = (h + 2 * hk) * d;
    let view = |heads| Layout::strided([1, total, heads, d], [total * row, row, d]);
    let (lq, lk) = (view(h), view(hk));
    let qkv = random_with_nan_gaps(&mut rng, total * row, &[(0, lq), (h * d, lk), ((h + hk) * d, lk)]);
    let (q, k, v) = (&qkv[..], &qkv[h * d..], &qkv[(h + hk) * d..]);
    let lo = Layout::contiguous(1, total, h, d);
    for mask in varlen_masks() {
        let one = check_varlen_views((q, lq), (k, lk), (v, lk), lo, lo.numel(), (&cu_q, &cu_k), mask, 1);
        let four = check_varlen_views((q, lq), (k, lk), (v, lk), lo, lo.numel(), (&cu_q, &cu_k), mask, 4);
        assert_eq!(bits(&one.0), bits(&four.0), "{mask:?}: out differs between 1 and 4 threads");
        assert_eq!(bits(&one.1), bits(&four.1), "{mask:?}: lse differs between 1 and 4 threads");
    }
}

/// Padded rows everywhere: q and out with gaps after each row (out's buffer ending right
/// after its last row), k and v as views into a KV buffer `[total_k, 2, hk, d]` with gaps,
/// ending right after the last v row. Key sequences empty first, in the middle and last, with
/// queries; query sequences empty too; padding poisoned with NaN.
#[test]
fn varlen_on_padded_rows_with_empty_key_sequences() {
    let mut rng = Rng::fresh();
    let (h, hk, d) = (4, 1, 8);
    let cu_q = prefix(&[2, 5, 0, 3, 4]);
    let cu_k = prefix(&[0, 6, 3, 2, 0]);
    let (total_q, total_k) = (*cu_q.last().unwrap() as usize, *cu_k.last().unwrap() as usize);
    let (qrow, orow, kvrow) = (h * d + 5, h * d + 3, 2 * hk * d + 7);
    let lq = Layout::strided([1, total_q, h, d], [total_q * qrow, qrow, d]);
    let lo = Layout::strided([1, total_q, h, d], [total_q * orow, orow, d]);
    let lk = Layout::strided([1, total_k, hk, d], [total_k * kvrow, kvrow, d]);
    let q = random_with_nan_gaps(&mut rng, lq.span().unwrap(), &[(0, lq)]);
    let kv_len = (total_k - 1) * kvrow + 2 * hk * d;
    let kv = random_with_nan_gaps(&mut rng, kv_len, &[(0, lk), (hk * d, lk)]);
    let (k, v) = (&kv[..], &kv[hk * d..]);
    for mask in varlen_masks() {
        let one = check_varlen_views((&q, lq), (k, lk), (v, lk), lo, lo.span().unwrap(), (&cu_q, &cu_k), mask, 1);
        let four = check_varlen_views((&q, lq), (k, lk), (v, lk), lo, lo.span().unwrap(), (&cu_q, &cu_k), mask, 4);
        assert_eq!(bits(&one.0), bits(&four.0), "{mask:?}: out differs between 1 and 4 threads");
        assert_eq!(bits(&one.1), bits(&four.1), "{mask:?}: lse differs between 1 and 4 threads");
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The thread count never changes a bit of the result (every row is computed by one thread in
/// a fixed order): 1, 2 and 4 threads on shapes with many work items, all dtypes' f32 path.
#[test]
fn thread_count_does_not_change_bits() {
    let mut rng = Rng::fresh();
    for (dims, causal) in [([2usize, 130, 200, 4, 2, 64], true), ([1, 300, 70, 3, 1, 24], false)] {
        let [b, sq, sk, h, hk, d] = dims;
        let (lq, lk) = (Layout::contiguous(b, sq, h, d), Layout::heads_first(b, sk, hk, d));
        let gen = |rng: &mut Rng, n| {
            let mut v = vec![0f32; n];
            rng.fill(&mut v, |x| x);
            v
        };
        let (q, k, v) = (gen(&mut rng, lq.numel()), gen(&mut rng, lk.numel()), gen(&mut rng, lk.numel()));
        let run = |threads| {
            let attn = Selector::from_settings(Settings::default()).cpu_threads(threads).select().unwrap();
            let mut out = vec![f32::NAN; lq.numel()];
            let mut lse = vec![f32::NAN; b * h * sq];
            attn.forward_with_lse(
                &Tensor::host(&q, lq),
                &Tensor::host(&k, lk),
                &Tensor::host(&v, lk),
                &mut TensorMut::host(&mut out, lq),
                &mut LseMut::host(&mut lse),
                &Options::default().causal(causal),
            )
            .unwrap();
            (bits(&out), bits(&lse))
        };
        let one = run(1);
        for threads in [2, 4] {
            assert!(run(threads) == one, "{dims:?} causal={causal}: {threads} threads differ from 1 (seed {:#x})", rng.get_seed());
        }
    }
}

/// A huge head_dim must not make the CPU backend allocate scratch in proportion to a whole
/// block of rows of it: with head_dim 2^20 the largest single allocation of the call stays
/// within two rows (it was 64 rows, 256 MiB per buffer; at 2^28 that aborted the process).
#[test]
fn cpu_scratch_stays_bounded_for_a_huge_head_dim() {
    let (sq, sk, d) = (1, 2, 1 << 20);
    let (lq, lk) = (Layout::contiguous(1, sq, 1, d), Layout::contiguous(1, sk, 1, d));
    let q: Vec<f32> = (0..lq.numel()).map(|i| ((i % 97) as f32 * 0.37).sin() * 1e-3).collect();
    // Every key row the same vector, so the output is that vector.
    let k: Vec<f32> = (0..lk.numel()).map(|i| ((i % d % 89) as f32 * 0.11).cos() * 1e-3).collect();
    let mut out = vec![f32::NAN; lq.numel()];
    // One thread: the work, and so every allocation of the call, is on this thread.
    let attn = Selector::from_settings(Settings::default()).cpu_threads(1).select().unwrap();
    LARGEST_ALLOC.with(|m| m.set(0));
    attn.forward(&Tensor::host(&q, lq), &Tensor::host(&k, lk), &Tensor::host(&k, lk), &mut TensorMut::host(&mut out, lq), &Options::default())
        .unwrap();
    let largest = LARGEST_ALLOC.with(|m| m.get());
    let bound = 2 * d * std::mem::size_of::<f32>();
    assert!(largest <= bound, "largest allocation {largest} bytes > {bound} (two f32 rows of head_dim {d})");
    assert!(out.iter().zip(&k).all(|(o, x)| (o - x).abs() <= 1e-6), "wrong output");
}

/// When the scratch cannot be allocated the call returns an error naming head_dim (it used to
/// abort the process), and neither out nor lse has been touched.
#[test]
fn cpu_scratch_allocation_failure_is_an_error_and_writes_nothing() {
    let d = 1 << 16;
    let l = Layout::contiguous(1, 3, 2, d);
    let x: Vec<f32> = (0..l.numel()).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut out = vec![f32::NAN; l.numel()];
    let mut lse = vec![f32::NAN; 2 * 3];
    let attn = Selector::from_settings(Settings::default()).cpu_threads(1).select().unwrap();
    let result = {
        // A row of head_dim 2^16 is 256 KiB of f32: any scratch holding one fails.
        let _limit = AllocLimit::set(128 << 10);
        attn.forward_with_lse(
            &Tensor::host(&x, l),
            &Tensor::host(&x, l),
            &Tensor::host(&x, l),
            &mut TensorMut::host(&mut out, l),
            &mut LseMut::host(&mut lse),
            &Options::default(),
        )
    };
    let err = result.expect_err("scratch allocation cannot succeed");
    assert!(err.to_string().contains("head_dim"), "error does not name head_dim: {err}");
    assert!(out.iter().all(|o| o.is_nan()), "out was written by a failed call");
    assert!(lse.iter().all(|o| o.is_nan()), "lse was written by a failed call");
    // The same handle still works once memory is available.
    attn.forward(&Tensor::host(&x, l), &Tensor::host(&x, l), &Tensor::host(&x, l), &mut TensorMut::host(&mut out, l), &Options::default())
        .unwrap();
    assert!(out.iter().all(|o| o.is_finite()));
}

/// Decode with few (sequence, kv head) blocks over long keys: each block's keys are split into
/// chunks that run as separate work items, merged by log-sum-exp. Against the f64 reference,
/// with windows that leave most chunks without a visible key, soft-capping, causal rows that
/// see different keys in the last tile, a last chunk of a single key, and both cache layouts.
#[test]
fn split_key_decode_matches_the_reference() {
    let mut rng = Rng::fresh();
    let shapes: [[usize; 6]; 5] = [
        [1, 1, 4099, 4, 1, 64],  // one kv head; the last chunk holds 3 keys
        [1, 1, 1025, 2, 1, 16],  // a last chunk of a single key
        [1, 3, 2048, 8, 2, 32],  // three query rows per head: causal rows differ in the last tile
        [2, 1, 1500, 4, 4, 8],   // two sequences, MHA
        [1, 16, 3000, 4, 1, 16], // speculative decoding: 16 rows, 64 per block
    ];
    let windows = [(None, None), (Some(5), None), (Some(700), Some(0)), (Some(1300), None)];
    let attn = Selector::from_settings(Settings::default()).cpu_threads(2).select().unwrap();
    for (n, shape) in shapes.into_iter().enumerate() {
        for (w, &(left, right)) in windows.iter().enumerate() {
            for causal in [false, true] {
                let softcap = [None, Some(3.0f32)][(n + w) % 2];
                let [b, _, sk, _, hk, d] = shape;
                let lk = if (n + w) % 2 == 0 { Layout::heads_first(b, sk, hk, d) } else { Layout::contiguous(b, sk, hk, d) };
                masked_case_matches_reference(&attn, &mut rng, shape, lk, (left, right), causal, softcap);
            }
        }
    }
}

/// NaN in a split decode: a NaN key reaches the row only when the row sees it, whichever chunk
/// holds it; a NaN value only its own column; neither reaches the heads of the other kv head,
/// computed in the same work item.
#[test]
fn split_key_decode_propagates_nan_only_from_visible_keys() {
    let (b, sq, sk, h, hk, d) = (1, 1, 3000, 8, 2, 16);
    let (lq, lk) = (Layout::contiguous(b, sq, h, d), Layout::contiguous(b, sk, hk, d));
    let mut rng = Rng::fresh();
    let gen = |rng: &mut Rng, n| {
        let mut v = vec![0f32; n];
        rng.fill(&mut v, |x| x);
        v
    };
    let (q, k0, v0) = (gen(&mut rng, lq.numel()), gen(&mut rng, lk.numel()), gen(&mut rng, lk.numel()));
    let attn = Selector::from_settings(Settings::default()).cpu_threads(2).select().unwrap();
    // (poisoned key, in the value?, left window) -> whether the row sees it.
    for (key, in_value, left) in [(100, false, None), (100, false, Some(50)), (2999, false, Some(50)), (1700, true, None), (1700, true, Some(1000))] {
        let (mut k, mut v) = (k0.clone(), v0.clone());
        // In kv head 1: query heads 4..8.
        if in_value {
            v[lk.offset(0, key, 1) + 3] = f32::NAN;
        } else {
            k[lk.offset(0, key, 1) + 3] = f32::NAN;
        }
        let mut out = vec![0f32; lq.numel()];
        let mut lse = vec![0f32; b * h * sq];
        attn.forward_with_lse(
            &Tensor::host(&q, lq),
            &Tensor::host(&k, lk),
            &Tensor::host(&v, lk),
            &mut TensorMut::host(&mut out, lq),
            &mut LseMut::host(&mut lse),
            &Options::default().window(left, None),
        )
        .unwrap();
        let sees_key = left.map_or(true, |l| key + l >= sk - 1);
        for hi in 0..h {
            let sees = sees_key && hi >= h / hk;
            let row = &out[lq.offset(0, 0, hi)..][..d];
            let ctx = format!("key {key} in_value={in_value} left={left:?} head {hi}");
            match (sees, in_value) {
                (false, _) => assert!(row.iter().all(|x| x.is_finite()) && lse[hi].is_finite(), "{ctx}: {row:?}"),
                (true, false) => assert!(row.iter().all(|x| x.is_nan()) && lse[hi].is_nan(), "{ctx}: {row:?}"),
                (true, true) => {
                    assert!(row.iter().enumerate().all(|(e, x)| x.is_nan() == (e == 3)), "{ctx}: {row:?}");
                    assert!(lse[hi].is_finite(), "{ctx}");
                }
            }
        }
    }
}
