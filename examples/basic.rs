//! The few lines model code writes: select once, then call forward per layer.
//!
//! `cargo run --release --example basic`

use attention::{Layout, Options, Tensor, TensorMut};
use half::bf16;

fn main() -> Result<(), attention::Error> {
    // Once, at model load: probes the GPU, reads ATTN_* settings, logs the choice.
    let attn = attention::select()?;

    // [batch, seqlen, heads, head_dim] with 8 query heads sharing 2 key/value heads (GQA).
    let (b, s, h, hk, d) = (1, 128, 8, 2, 64);
    let (lq, lkv) = (Layout::contiguous(b, s, h, d), Layout::contiguous(b, s, hk, d));
    let q: Vec<bf16> = (0..lq.numel()).map(|i| bf16::from_f32((i as f32 * 0.01).sin())).collect();
    let k: Vec<bf16> = (0..lkv.numel()).map(|i| bf16::from_f32((i as f32 * 0.02).cos())).collect();
    let v = k.clone();
    let mut out = vec![bf16::ZERO; lq.numel()];
    let opts = Options::default().causal(true);

    if let Some(caps) = attn.device_caps() {
        // On a GPU: the same call with cudarc device slices (kernels run on out's stream).
        use attention::cudarc::driver::CudaContext;
        let stream = CudaContext::new(caps.ordinal).map(|c| c.default_stream()).expect("CUDA context");
        let (dq, dk, dv) = (stream.clone_htod(&q).unwrap(), stream.clone_htod(&k).unwrap(), stream.clone_htod(&v).unwrap());
        let mut dout = stream.alloc_zeros::<bf16>(lq.numel()).unwrap();
        let ran = attn.forward(&Tensor::cuda(&dq, lq), &Tensor::cuda(&dk, lkv), &Tensor::cuda(&dv, lkv), &mut TensorMut::cuda(&mut dout, lq), &opts)?;
        out = stream.clone_dtoh(&dout).unwrap();
        println!("ran on {ran} ({})", attn.device_summary());
    } else {
        let ran = attn.forward(&Tensor::host(&q, lq), &Tensor::host(&k, lkv), &Tensor::host(&v, lkv), &mut TensorMut::host(&mut out, lq), &opts)?;
        println!("ran on {ran}");
    }
    println!("out[0..4] = {:?}", &out[..4]);
    // Which backend would run a problem, and why not the others:
    let problem = attention::Problem::new(attention::DType::BF16, b, s, s, h, hk, d).causal(true);
    let problem = if attn.device_caps().is_some() { problem } else { problem.on_host() };
    print!("{}", attn.explain(&problem));
    Ok(())
}
