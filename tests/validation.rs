//! Bad input gets a typed error naming the argument, the value and what is accepted, and the
//! output is left as it was.

use attention::{Error, Layout, LseMut, Options, Selector, Settings, Tensor, TensorMut};

fn cpu() -> attention::Attention {
    Selector::from_settings(Settings::default()).backend(attention::BackendKind::Cpu).select().unwrap()
}

struct Case {
    q: Layout,
    k: Layout,
    v: Layout,
    out: Layout,
    /// Buffer lengths (elements) for q, k, v, out.
    lens: [usize; 4],
    lse: Option<usize>,
    opts: Options,
}

impl Case {
    fn good() -> Case {
        let q = Layout::contiguous(2, 5, 4, 8);
        let k = Layout::contiguous(2, 7, 2, 8);
        Case { q, k, v: k, out: q, lens: [q.numel(), k.numel(), k.numel(), q.numel()], lse: None, opts: Options::default() }
    }
    fn run(&self) -> Result<(), Error> {
        let x = |n: usize| (0..n).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect::<Vec<f32>>();
        let (q, k, v) = (x(self.lens[0]), x(self.lens[1]), x(self.lens[2]));
        let mut out = vec![f32::NAN; self.lens[3]];
        let mut lse = self.lse.map(|n| vec![f32::NAN; n]);
        let attn = cpu();
        let r = match lse.as_mut() {
            None => attn.forward(&Tensor::host(&q, self.q), &Tensor::host(&k, self.k), &Tensor::host(&v, self.v), &mut TensorMut::host(&mut out, self.out), &self.opts),
            Some(l) => attn.forward_with_lse(&Tensor::host(&q, self.q), &Tensor::host(&k, self.k), &Tensor::host(&v, self.v), &mut TensorMut::host(&mut out, self.out), &mut LseMut::host(l), &self.opts),
        };
        if r.is_err() {
            assert!(out.iter().all(|x| x.is_nan()), "failed call wrote the output");
            assert!(lse.iter().flatten().all(|x| x.is_nan()), "failed call wrote lse");
        }
        r.map(|_| ())
    }
}

/// Runs a case and checks it fails naming `arg` with every needle in the message.
fn expect(case: Case, arg: &str, needles: &[&str]) {
    expect_error(case.run(), arg, needles)
}

/// Checks a call failed with `InvalidArgument` naming `arg`, with every needle in the message.
fn expect_error(r: Result<(), Error>, arg: &str, needles: &[&str]) {
    let err = r.expect_err("should be rejected");
    match &err {
        Error::InvalidArgument { arg: a, .. } => assert_eq!(*a, arg, "{err}"),
        other => panic!("expected InvalidArgument for {arg}, got {other:?}"),
    }
    let text = err.to_string();
    for n in needles {
        assert!(text.contains(n), "`{text}` should mention `{n}`");
    }
}

#[test]
fn the_good_case_passes() {
    Case::good().run().unwrap();
    let mut c = Case::good();
    c.lse = Some(2 * 4 * 5);
    c.run().unwrap();
}

#[test]
fn mismatched_shapes() {
    let mut c = Case::good();
    c.k = Layout::contiguous(3, 7, 2, 8);
    c.v = c.k;
    c.lens[1] = c.k.numel();
    c.lens[2] = c.k.numel();
    expect(c, "k", &["batch 3", "batch 2"]);

    let mut c = Case::good();
    c.v = Layout::contiguous(2, 6, 2, 8);
    expect(c, "v", &["[2, 6, 2, 8]", "[2, 7, 2, 8]"]);

    let mut c = Case::good();
    c.k = Layout::contiguous(2, 7, 2, 16);
    c.v = c.k;
    c.lens[1] = c.k.numel();
    c.lens[2] = c.k.numel();
    expect(c, "k", &["head_dim 16", "head_dim 8"]);

    let mut c = Case::good();
    c.out = Layout::contiguous(2, 5, 4, 4);
    expect(c, "out", &["[2, 5, 4, 4]", "[2, 5, 4, 8]"]);
}

#[test]
fn zero_sizes() {
    for dims in [[0, 5, 4, 8], [2, 0, 4, 8], [2, 5, 0, 8], [2, 5, 4, 0]] {
        let mut c = Case::good();
        c.q = Layout::contiguous(dims[0], dims[1], dims[2], dims[3]);
        expect(c, "q", &["at least 1"]);
    }
    let mut c = Case::good();
    c.k = Layout::contiguous(2, 0, 2, 8);
    c.v = c.k;
    expect(c, "k", &["[2, 0, 2, 8]"]);
}

#[test]
fn heads_not_divisible() {
    let mut c = Case::good();
    c.k = Layout::contiguous(2, 7, 3, 8);
    c.v = c.k;
    c.lens[1] = c.k.numel();
    c.lens[2] = c.k.numel();
    expect(c, "k", &["3 heads", "divides q's 4 heads"]);
}

#[test]
fn strides_that_overlap() {
    // Inputs are only read: heads 4 elements apart with head_dim 8 share memory, and that is
    // allowed (as zero-stride broadcast K/V is).
    let mut c = Case::good();
    c.q = Layout::strided([2, 5, 4, 8], [200, 40, 4]);
    c.lens[0] = 400;
    c.run().unwrap();

    // An output must give each element its own address.
    let mut c = Case::good();
    c.out = Layout::strided([2, 5, 4, 8], [0, 32, 8]);
    expect(c, "out", &["strides [0, 32, 8]", "no two output elements share memory"]);
    let mut c = Case::good();
    c.out = Layout::strided([2, 5, 4, 8], [200, 40, 4]);
    c.lens[3] = 400;
    expect(c, "out", &["strides [200, 40, 4]"]);
}

#[test]
fn strides_past_the_buffer_and_buffers_too_small() {
    let mut c = Case::good();
    c.q = Layout::strided([2, 5, 4, 8], [1000, 32, 8]);
    expect(c, "q", &["buffer of 320 elements", "at least 1160"]);

    let mut c = Case::good();
    c.lens[2] -= 1;
    expect(c, "v", &["buffer of 223 elements", "at least 224"]);

    let mut c = Case::good();
    c.lens[3] = 10;
    expect(c, "out", &["buffer of 10 elements"]);

    let mut c = Case::good();
    c.q = Layout::strided([2, 5, 4, 8], [usize::MAX, 32, 8]);
    expect(c, "q", &["fits in isize"]);
}

#[test]
fn element_counts_that_overflow_are_rejected() {
    // 2^64 elements: the product wraps to 0 in unchecked arithmetic, which once read as an
    // empty tensor that fits any buffer.
    let huge = Layout::contiguous(1 << 16, 1 << 16, 1 << 16, 1 << 16);
    for (i, arg) in ["q", "k", "v", "out"].into_iter().enumerate() {
        let mut c = Case::good();
        match i {
            0 => c.q = huge,
            1 => c.k = huge,
            2 => c.v = huge,
            _ => c.out = huge,
        }
        c.lens[i] = 0;
        expect(c, arg, &["element count fits in usize"]);
    }
}

#[test]
fn lse_of_the_wrong_size() {
    let mut c = Case::good();
    c.lse = Some(39);
    expect(c, "lse", &["39 elements", "exactly batch*heads*seqlen_q = 40"]);
}

#[test]
fn scale_outside_the_documented_range() {
    for s in [f32::NAN, f32::INFINITY, -1.0, -1e37, 1e37, 1.0000001e6] {
        let mut c = Case::good();
        c.opts = Options::default().scale(s);
        expect(c, "options.softmax_scale", &["from 0 to 1e6"]);
    }
    for s in [0.0, 1e6] {
        let mut c = Case::good();
        c.opts = Options::default().scale(s);
        c.run().unwrap();
    }
}

#[test]
fn bad_softcap() {
    for c in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut case = Case::good();
        case.opts = Options::default().softcap(c);
        expect(case, "options.softcap", &["above 0"]);
    }
}

#[test]
fn strided_layouts_are_accepted() {
    // [b, h, s, d] memory and padded rows are valid layouts, not errors.
    let mut c = Case::good();
    c.q = Layout::heads_first(2, 5, 4, 8);
    c.k = Layout::strided([2, 7, 2, 8], [7 * 2 * 16, 2 * 16, 16]);
    c.v = c.k;
    c.lens[1] = c.k.span().unwrap();
    c.lens[2] = c.k.span().unwrap();
    c.run().unwrap();
}

/// Runs a packed batch of `total_q`/`total_k` rows on the CPU backend with the given prefix
/// sums and maxima; on failure, checks nothing was written.
fn varlen_run(q_batch: usize, cu_q: &[i32], cu_k: &[i32], max: (usize, usize), lse_len: Option<usize>) -> Result<(), Error> {
    let (total_q, total_k, h, d) = (10, 12, 2, 8);
    let lq = Layout::contiguous(q_batch, total_q, h, d);
    let lk = Layout::contiguous(1, total_k, h, d);
    let x = |n: usize| (0..n).map(|i| ((i * 31) % 11) as f32 / 11.0 - 0.5).collect::<Vec<f32>>();
    let (q, k, v) = (x(lq.numel()), x(lk.numel()), x(lk.numel()));
    let mut out = vec![f32::NAN; lq.numel()];
    let mut lse = lse_len.map(|n| vec![f32::NAN; n]);
    let varlen = attention::VarLen::new(attention::SeqLens::host(cu_q), attention::SeqLens::host(cu_k), max.0, max.1);
    let attn = cpu();
    let (tq, tk, tv) = (Tensor::host(&q, lq), Tensor::host(&k, lk), Tensor::host(&v, lk));
    let r = match lse.as_mut() {
        None => attn.forward_varlen(&tq, &tk, &tv, &mut TensorMut::host(&mut out, lq), &varlen, &Options::default()),
        Some(l) => attn.forward_varlen_with_lse(&tq, &tk, &tv, &mut TensorMut::host(&mut out, lq), &mut LseMut::host(l), &varlen, &Options::default()),
    };
    if r.is_err() {
        assert!(out.iter().all(|x| x.is_nan()), "failed call wrote the output");
        assert!(lse.iter().flatten().all(|x| x.is_nan()), "failed call wrote lse");
    }
    r.map(|_| ())
}


#[test]
fn varlen_prefix_sums_are_checked_one_constraint_at_a_time() {
    let good_q = [0, 4, 4, 10];
    let good_k = [0, 5, 7, 12];
    varlen_run(1, &good_q, &good_k, (6, 5), None).unwrap();
    varlen_run(1, &good_q, &good_k, (6, 5), Some(2 * 10)).unwrap();
    expect_error(varlen_run(2, &good_q, &good_k, (6, 5), None), "q", &["batch 2", "batch 1"]);
    expect_error(varlen_run(1, &[0], &[0], (6, 5), None), "cu_seqlens_q", &["1 entries", "batch + 1"]);
    expect_error(varlen_run(1, &good_q, &[0, 5, 12], (6, 7), None), "cu_seqlens_k", &["3 entries", "as many as cu_seqlens_q (4)"]);
    expect_error(varlen_run(1, &[0, 6, 4, 10], &good_k, (6, 5), None), "cu_seqlens_q", &["entries 1..2 = 6, 4", "non-decreasing"]);
    expect_error(varlen_run(1, &[0, 4, 4, 11], &good_k, (7, 5), None), "cu_seqlens_q", &["entry 3 = 11", "row count 10"]);
    expect_error(varlen_run(1, &good_q, &[-1, 5, 7, 12], (6, 6), None), "cu_seqlens_k", &["entry 0 = -1"]);
    // Rows outside every sequence would never be written: the sums must cover the tensor.
    expect_error(varlen_run(1, &[2, 4, 4, 10], &good_k, (6, 5), None), "cu_seqlens_q", &["entry 0 = 2", "starting at 0"]);
    expect_error(varlen_run(1, &[0, 4, 4, 8], &good_k, (6, 5), None), "cu_seqlens_q", &["last entry 3 = 8", "row count 10"]);
    expect_error(varlen_run(1, &good_q, &[0, 5, 7, 9], (6, 5), None), "cu_seqlens_k", &["last entry 3 = 9", "row count 12"]);
    expect_error(varlen_run(1, &good_q, &good_k, (5, 5), None), "cu_seqlens_q", &["sequence 2 of length 6", "maximum 5"]);
    expect_error(varlen_run(1, &good_q, &good_k, (0, 5), None), "max_seqlen_q", &["0", "longest"]);
    expect_error(varlen_run(1, &good_q, &good_k, (6, 5), Some(3 * 2 * 10)), "lse", &["60 elements", "20"]);
}

/// Device views with made-up addresses: validation runs before anything touches the device,
/// so overlaps are rejected here even on a machine without a GPU.
#[test]
fn device_outputs_may_not_overlap_inputs_lse_or_prefix_sums() {
    let attn = cpu();
    let l = Layout::contiguous(1, 8, 2, 8); // 128 f32 = 512 bytes
    let base = 0x7f00_0000_0000u64;
    let (q, k, v, out) = (base, base + 0x1000, base + 0x2000, base + 0x3000);
    // SAFETY: validation rejects each call before any pointer is used.
    unsafe {
        let (tq, tk, tv) = (
            Tensor::<f32>::from_raw_device(q, 128, l),
            Tensor::<f32>::from_raw_device(k, 128, l),
            Tensor::<f32>::from_raw_device(v, 128, l),
        );
        // lse (2·8 f32) starting inside v.
        let mut o = TensorMut::<f32>::from_raw_device(out, 128, l, std::ptr::null_mut());
        let mut lse = LseMut::from_raw_device(v + 64, 16);
        let r = attn.forward_with_lse(&tq, &tk, &tv, &mut o, &mut lse, &Options::default()).map(|_| ());
        expect_error(r, "lse", &["overlapping v"]);
        // cu_seqlens_q inside out.
        let cu = attention::SeqLens::from_raw_device(out + 256, 2);
        let cu_k = attention::SeqLens::from_raw_device(base + 0x5000, 2);
        let varlen = attention::VarLen::new(cu, cu_k, 8, 8);
        let mut o = TensorMut::<f32>::from_raw_device(out, 128, l, std::ptr::null_mut());
        let r = attn.forward_varlen(&tq, &tk, &tv, &mut o, &varlen, &Options::default()).map(|_| ());
        expect_error(r, "out", &["overlapping cu_seqlens_q"]);
    }
}

/// A size-1 dimension's stride is never used, so any value (even usize::MAX) is accepted and
/// changes nothing; it once overflowed a debug build's alignment arithmetic.
#[test]
fn any_stride_on_a_size_one_dimension() {
    let attn = cpu();
    let (dense, odd) = (Layout::contiguous(2, 5, 1, 8), Layout::strided([2, 5, 1, 8], [40, 8, usize::MAX]));
    let x: Vec<f32> = (0..80).map(|i| (i as f32 * 0.7).sin()).collect();
    let mut a = vec![f32::NAN; 80];
    let mut b = vec![f32::NAN; 80];
    attn.forward(&Tensor::host(&x, dense), &Tensor::host(&x, dense), &Tensor::host(&x, dense), &mut TensorMut::host(&mut a, dense), &Options::default()).unwrap();
    attn.forward(&Tensor::host(&x, odd), &Tensor::host(&x, odd), &Tensor::host(&x, odd), &mut TensorMut::host(&mut b, odd), &Options::default()).unwrap();
    assert_eq!(a, b);
}

/// Dimensions past 2^31 − 2^16 would let a kernel's row + tile sum overflow i32: rejected.
#[test]
fn dimensions_near_i32_max_are_rejected() {
    let mut c = Case::good();
    let n = (1usize << 31) - (1 << 16) + 1;
    c.q = Layout::strided([2, n, 4, 8], [0, 0, 8]);
    expect(c, "q", &[&format!("dimension {n}"), "at most 2147418111"]);
}
