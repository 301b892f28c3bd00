//! `attention::candle` against candle's own matmul-softmax attention on the same tensors
//! (CPU device here; the CUDA tests run on a GPU with `--features candle-cuda,gpu-tests`).

use attention::candle::{attention, attention_varlen, Error, TensorError};
use attention::Options;
use candle_core::{DType, Device, IndexOp, Result, Tensor, D};

/// Plain attention with candle ops: q `[b, sq, h, d]`, k/v `[b, sk, hk, d]`, bottom-right
/// causal and window masks, softcap; f32 math.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, opts: &Options) -> Result<Tensor> {
    let (b, sq, h, d) = q.dims4()?;
    let (_, sk, hk, _) = k.dims4()?;
    let dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?; // [b, h, sq, d]
    let rep = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?.transpose(1, 2)?; // [b, hk, sk, d]
        let t = t.unsqueeze(2)?.expand((b, hk, h / hk, sk, d))?; // GQA: each KV head serves h/hk heads
        t.reshape((b, h, sk, d))
    };
    let (k, v) = (rep(k)?, rep(v)?);
    let scale = opts.softmax_scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
    let mut s = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(c) = opts.softcap {
        s = ((s / c as f64)?.tanh()? * c as f64)?;
    }
    let mut mask = vec![0f32; sq * sk];
    for i in 0..sq {
        for j in 0..sk {
            let diag = (i + sk) as i64 - sq as i64;
            let hidden = (opts.causal && j as i64 > diag)
                || opts.window_left.is_some_and(|w| (j as i64) < diag - w as i64)
                || opts.window_right.is_some_and(|w| j as i64 > diag + w as i64);
            if hidden {
                mask[i * sk + j] = f32::NEG_INFINITY;
            }
        }
    }
    let s = s.broadcast_add(&Tensor::from_vec(mask, (sq, sk), q.device())?)?;
    let max = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v.contiguous()?)?.transpose(1, 2)?.to_dtype(dtype) // [b, sq, h, d]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn randn(shape: (usize, usize, usize, usize)) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

#[test]
fn matches_candle_attention_f32_gqa_causal() {
    let (q, k, v) = (randn((2, 7, 4, 16)), randn((2, 9, 2, 16)), randn((2, 9, 2, 16)));
    for opts in [
        Options::default(),
        Options::default().causal(true),
        Options::default().causal(true).scale(0.3).softcap(5.0),
        Options::default().window(Some(3), Some(1)),
    ] {
        let out = attention(&q, &k, &v, &opts).unwrap();
        assert_eq!(out.dims(), q.dims());
        let want = reference(&q, &k, &v, &opts).unwrap();
        assert!(max_abs_diff(&out, &want) < 1e-4, "{opts:?}: {}", max_abs_diff(&out, &want));
    }
}

#[test]
fn half_types() {
    let (q, k, v) = (randn((1, 5, 2, 32)), randn((1, 6, 2, 32)), randn((1, 6, 2, 32)));
    let opts = Options::default().causal(true);
    let want = reference(&q, &k, &v, &opts).unwrap();
    for dt in [DType::F16, DType::BF16] {
        let (q, k, v) = (q.to_dtype(dt).unwrap(), k.to_dtype(dt).unwrap(), v.to_dtype(dt).unwrap());
        let out = attention(&q, &k, &v, &opts).unwrap();
        assert_eq!(out.dtype(), dt);
        assert!(max_abs_diff(&out, &want) < 3e-2, "{dt:?}: {}", max_abs_diff(&out, &want));
    }
}

#[test]
fn strided_views_and_offsets_are_read_in_place() {
    // [b, h, s, d] tensors seen as [b, s, h, d] through transpose: strided, no copy.
    let bhsd = |s| Tensor::randn(0f32, 1.0, (2, 4, s, 8), &Device::Cpu).unwrap();
    let (q, k, v) = (bhsd(5).transpose(1, 2).unwrap(), bhsd(6).transpose(1, 2).unwrap(), bhsd(6).transpose(1, 2).unwrap());
    assert!(!q.is_contiguous());
    let opts = Options::default().causal(true);
    let out = attention(&q, &k, &v, &opts).unwrap();
    assert!(max_abs_diff(&out, &reference(&q, &k, &v, &opts).unwrap()) < 1e-4);

    // q, k, v as views into one packed QKV tensor [b, s, 3h, d]: start offsets and strides.
    let qkv = randn((2, 6, 12, 8));
    let (q, k, v) = (qkv.narrow(2, 0, 4).unwrap(), qkv.narrow(2, 4, 4).unwrap(), qkv.narrow(2, 8, 4).unwrap());
    assert!(k.layout().start_offset() > 0);
    let out = attention(&q, &k, &v, &opts).unwrap();
    assert!(max_abs_diff(&out, &reference(&q, &k, &v, &opts).unwrap()) < 1e-4);

    // A broadcast (stride-0) batch of K/V.
    let k1 = randn((1, 6, 4, 8)).broadcast_as((2, 6, 4, 8)).unwrap();
    let q = randn((2, 6, 4, 8));
    let out = attention(&q, &k1, &k1, &opts).unwrap();
    assert!(max_abs_diff(&out, &reference(&q, &k1, &k1, &opts).unwrap()) < 1e-4);
}

#[test]
fn unmappable_layouts_are_typed_errors() {
    let q = randn((1, 4, 2, 8));
    // head_dim not contiguous.
    let qt = q.transpose(1, 3).unwrap();
    match attention(&qt, &qt, &qt, &Options::default()) {
        Err(Error::Tensor(TensorError::HeadDimStride { arg: "q", .. })) => {}
        other => panic!("{other:?}"),
    }
    // Wrong rank.
    let q3 = q.i(0).unwrap();
    assert!(matches!(attention(&q3, &q3, &q3, &Options::default()), Err(Error::Tensor(TensorError::Rank { arg: "q", .. }))));
    // Mixed dtypes.
    let k16 = q.to_dtype(DType::F16).unwrap();
    assert!(matches!(attention(&q, &k16, &k16, &Options::default()), Err(Error::Tensor(TensorError::DType { .. }))));
    // The crate's own validation comes back typed too (and converts into candle's error).
    let e = attention(&q, &q, &q, &Options::default().scale(-1.0)).unwrap_err();
    assert!(matches!(e, Error::Attention(attention::Error::InvalidArgument { .. })), "{e:?}");
    let c: candle_core::Error = e.into();
    assert!(c.to_string().contains("scale"), "{c}");
}

#[test]
fn varlen_matches_per_sequence_attention() {
    let (h, hk, d) = (4, 2, 16);
    let (lens_q, lens_k) = ([3usize, 5], [4usize, 7]);
    let qs: Vec<Tensor> = lens_q.iter().map(|&n| randn((1, n, h, d))).collect();
    let ks: Vec<Tensor> = lens_k.iter().map(|&n| randn((1, n, hk, d))).collect();
    let vs: Vec<Tensor> = lens_k.iter().map(|&n| randn((1, n, hk, d))).collect();
    let pack = |ts: &[Tensor]| Tensor::cat(ts, 1).unwrap().squeeze(0).unwrap(); // [total, h, d]
    let (q, k, v) = (pack(&qs), pack(&ks), pack(&vs));
    let cu = |l: &[usize]| Tensor::new(&[0u32, l[0] as u32, (l[0] + l[1]) as u32], &Device::Cpu).unwrap();
    let opts = Options::default().causal(true);
    let out = attention_varlen(&q, &k, &v, &cu(&lens_q), &cu(&lens_k), 5, 7, &opts).unwrap();
    assert_eq!(out.dims(), q.dims());
    let mut row = 0;
    for i in 0..2 {
        let want = reference(&qs[i], &ks[i], &vs[i], &opts).unwrap().squeeze(0).unwrap();
        let got = out.narrow(0, row, lens_q[i]).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4, "sequence {i}");
        row += lens_q[i];
    }
}

#[test]
fn explain_says_which_backend() {
    let attn = attention::select().unwrap();
    let q = randn((1, 4, 2, 8));
    let e = attention::candle::explain(&attn, &q, &q, &q, &Options::default()).unwrap();
    assert_eq!(e.chosen, Some(attention::BackendKind::Cpu), "{e}");
}

/// Per-sequence reference for a KV-cache call: sequence b's rows against its first lens[b] keys,
/// bottom-right causal (query row i at position lens[b] - q_len + i).
fn kv_reference(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize]) -> Tensor {
    let q_len = q.dim(1).unwrap();
    let rows: Vec<Tensor> = lens
        .iter()
        .enumerate()
        .map(|(b, &n)| {
            let (qb, kb, vb) = (q.narrow(0, b, 1).unwrap(), k.narrow(0, b, 1).unwrap().narrow(1, 0, n).unwrap(), v.narrow(0, b, 1).unwrap().narrow(1, 0, n).unwrap());
            assert!(n >= q_len);
            reference(&qb, &kb, &vb, &Options::default().causal(true)).unwrap()
        })
        .collect();
    Tensor::cat(&rows, 0).unwrap()
}

/// The cache of `kv_cases` as pages: sequence b's key j in page `table[b][j / page]`, pages in
/// reversed order so the table matters.
fn paged(cache: &Tensor, page: usize) -> (Tensor, Tensor) {
    let (b, cap, hk, d) = cache.dims4().unwrap();
    let per = cap / page;
    let pages = cache.reshape((b * per, page, hk, d)).unwrap();
    let order: Vec<u32> = (0..(b * per) as u32).rev().collect();
    let shuffled = pages.index_select(&Tensor::new(order.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
    // Logical page p of the flattened cache now sits at b*per - 1 - p.
    let table: Vec<u32> = (0..b * per).map(|p| (b * per - 1 - p) as u32).collect();
    (shuffled, Tensor::from_vec(table, (b, per), &Device::Cpu).unwrap())
}

#[test]
fn kv_cache_contiguous_and_paged_match_per_sequence_attention() {
    let (b, cap, h, hk, d, q_len) = (2, 32, 4, 2, 16, 3);
    let (q, k, v) = (randn((b, q_len, h, d)), randn((b, cap, hk, d)), randn((b, cap, hk, d)));
    let lens = [20usize, 32];
    let want = kv_reference(&q, &k, &v, &lens);
    let lens_t = Tensor::new(&[20u32, 32], &Device::Cpu).unwrap();
    let opts = Options::default().causal(true);
    let got = attention::candle::attention_kvcache(&q, &k, &v, &lens_t, None, &opts).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-4, "contiguous");
    let ((kp, table), (vp, _)) = (paged(&k, 8), paged(&v, 8));
    let got = attention::candle::attention_kvcache(&q, &kp, &vp, &lens_t, Some(&table), &opts).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-4, "paged");
    // A table of the wrong rank is a typed error naming it.
    let err = attention::candle::attention_kvcache(&q, &kp, &vp, &lens_t, Some(&table.flatten_all().unwrap()), &opts).unwrap_err();
    assert!(err.to_string().contains("block_table"), "{err}");
}

#[cfg(feature = "candle-cuda")]
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn cuda_kv_cache_matches_cpu() {
    let dev = Device::new_cuda(0).unwrap();
    let (b, cap, h, hk, d, q_len) = (2, 64, 8, 2, 64, 1);
    let (q, k, v) = (randn((b, q_len, h, d)), randn((b, cap, hk, d)), randn((b, cap, hk, d)));
    let lens = [37usize, 64];
    let want = kv_reference(&q, &k, &v, &lens);
    let opts = Options::default().causal(true);
    for dt in [DType::F16, DType::BF16] {
        let g = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(&dev).unwrap();
        let lens_t = Tensor::new(&[37u32, 64], &dev).unwrap();
        let got = attention::candle::attention_kvcache(&g(&q), &g(&k), &g(&v), &lens_t, None, &opts).unwrap();
        assert!(got.device().same_device(&dev));
        assert!(max_abs_diff(&got.to_device(&Device::Cpu).unwrap(), &want) < 3e-2, "contiguous {dt:?}");
        let ((kp, table), (vp, _)) = (paged(&k, 16), paged(&v, 16));
        let got = attention::candle::attention_kvcache(&g(&q), &g(&kp), &g(&vp), &lens_t, Some(&table.to_device(&dev).unwrap()), &opts).unwrap();
        assert!(max_abs_diff(&got.to_device(&Device::Cpu).unwrap(), &want) < 3e-2, "paged {dt:?}");
    }
}

#[cfg(feature = "candle-cuda")]
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a CUDA GPU: cargo test --features gpu-tests")]
fn cuda_device_matches_cpu() {
    let dev = Device::new_cuda(0).unwrap();
    for dt in [DType::F16, DType::BF16, DType::F32] {
        let (q, k, v) = (randn((2, 70, 8, 64)), randn((2, 90, 2, 64)), randn((2, 90, 2, 64)));
        let opts = Options::default().causal(true);
        let want = reference(&q, &k, &v, &opts).unwrap();
        let g = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(&dev).unwrap();
        // Strided: q as a transposed [b, h, s, d] tensor.
        let qg = g(&q.transpose(1, 2).unwrap().contiguous().unwrap()).transpose(1, 2).unwrap();
        let out = attention(&qg, &g(&k), &g(&v), &opts).unwrap();
        assert!(out.device().same_device(&dev));
        let tol = if dt == DType::F32 { 1e-3 } else { 3e-2 };
        assert!(max_abs_diff(&out.to_device(&Device::Cpu).unwrap(), &want) < tol, "{dt:?}");
        // Varlen on the device: u32 prefix sums on the device.
        let qp = g(&q).reshape((140, 8, 64)).unwrap();
        let (kp, vp) = (g(&k).reshape((180, 2, 64)).unwrap(), g(&v).reshape((180, 2, 64)).unwrap());
        let cq = Tensor::new(&[0u32, 70, 140], &dev).unwrap();
        let ck = Tensor::new(&[0u32, 90, 180], &dev).unwrap();
        let outp = attention_varlen(&qp, &kp, &vp, &cq, &ck, 70, 90, &opts).unwrap();
        let outp = outp.reshape((2, 70, 8, 64)).unwrap().to_device(&Device::Cpu).unwrap();
        assert!(max_abs_diff(&outp, &want) < tol, "varlen {dt:?}");
    }
}
