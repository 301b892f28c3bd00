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
    let err = case.run().expect_err("should be rejected");
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
    let mut c = Case::good();
    // Heads 4 elements apart with head_dim 8: neighbouring heads share memory.
    c.q = Layout::strided([2, 5, 4, 8], [200, 40, 4]);
    c.lens[0] = 400;
    expect(c, "q", &["strides [200, 40, 4]", "no two elements share memory"]);

    let mut c = Case::good();
    c.out = Layout::strided([2, 5, 4, 8], [0, 32, 8]);
    expect(c, "out", &["strides [0, 32, 8]"]);
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
    expect(c, "q", &["fits in usize"]);
}

#[test]
fn lse_of_the_wrong_size() {
    let mut c = Case::good();
    c.lse = Some(39);
    expect(c, "lse", &["39 elements", "exactly batch*heads*seqlen_q = 40"]);
}

#[test]
fn non_finite_scale() {
    for s in [f32::NAN, f32::INFINITY] {
        let mut c = Case::good();
        c.opts = Options::default().scale(s);
        expect(c, "options.softmax_scale", &["finite"]);
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
