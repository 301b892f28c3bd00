//! `cargo run --example candle_kv_cache --features candle` runs on the CPU;
//! `cargo run --example candle_kv_cache --features candle-cuda -- --cuda` on GPU 0. A small
//! attention block (q/k/v/o projections, GQA) that prefills a prompt and then decodes a few
//! tokens with a KV cache grown by concatenation, each step one `attention::candle` call.

use attention::Options;
use candle_core::{Device, Module, Result, Tensor};

/// `y = x W^T` for a `[b, s, in]` input.
struct Linear(Tensor);

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.0.t()?)
    }
}

struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// `[b, cached, kv_heads, head_dim]` each, grown by one step's rows per call.
    cache: Option<(Tensor, Tensor)>,
}

impl Block {
    fn new(hidden: usize, heads: usize, kv_heads: usize, dev: &Device) -> Result<Self> {
        let head_dim = hidden / heads;
        let w = |out: usize| -> Result<Linear> { Ok(Linear((Tensor::randn(0f32, 1.0, (out, hidden), dev)? / (hidden as f64).sqrt())?)) };
        Ok(Block { q: w(hidden)?, k: w(kv_heads * head_dim)?, v: w(kv_heads * head_dim)?, o: w(hidden)?, heads, kv_heads, head_dim, cache: None })
    }

    /// `x`: `[b, s, hidden]` new positions; returns `[b, s, hidden]`.
    fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let q = self.q.forward(x)?.reshape((b, s, self.heads, self.head_dim))?;
        let k = self.k.forward(x)?.reshape((b, s, self.kv_heads, self.head_dim))?;
        let v = self.v.forward(x)?.reshape((b, s, self.kv_heads, self.head_dim))?;
        let (k, v) = match &self.cache {
            Some((ck, cv)) => (Tensor::cat(&[ck, &k], 1)?, Tensor::cat(&[cv, &v], 1)?),
            None => (k, v),
        };
        self.cache = Some((k.clone(), v.clone()));
        // Causal, bottom-right aligned: the new rows see the whole cache and themselves.
        let y = attention::candle::attention(&q, &k, &v, &Options::default().causal(true))?;
        self.o.forward(&y.reshape((b, s, self.heads * self.head_dim))?)
    }
}

fn main() -> Result<()> {
    let dev = if std::env::args().any(|a| a == "--cuda") { Device::new_cuda(0)? } else { Device::Cpu };
    let (hidden, heads, kv_heads) = (256, 8, 2);
    let mut block = Block::new(hidden, heads, kv_heads, &dev)?;
    let prompt = Tensor::randn(0f32, 1.0, (1, 12, hidden), &dev)?;
    let mut x = block.forward(&prompt)?.narrow(1, 11, 1)?; // prefill; last position feeds the decode
    println!("prefill: 12 tokens on {:?}", dev.location());
    for step in 0..4 {
        x = block.forward(&x)?;
        let cached = block.cache.as_ref().map(|(k, _)| k.dim(1)).transpose()?.unwrap_or(0);
        println!("decode step {step}: cache {cached} positions, output norm {:.4}", x.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?);
    }
    // Which backend a decode step against this cache runs on, and why (not run).
    let attn = attention::select().map_err(candle_core::Error::wrap)?;
    let (k, v) = block.cache.as_ref().expect("cache");
    let q = Tensor::randn(0f32, 1.0, (1, 1, heads, hidden / heads), &dev)?;
    let e = attention::candle::explain(&attn, &q, k, v, &Options::default().causal(true))?;
    println!("a decode step runs on: {}", e.chosen.map(|b| b.to_string()).unwrap_or_else(|| "nothing".into()));
    Ok(())
}
