//! The CPU backend: the reference, and the fallback when there is no GPU.

use crate::backend::{Backend, BackendKind, Reason, RunError};
use crate::caps::DeviceCaps;
use crate::cpu::{HostIn, Seqs, Threads};
use crate::dtype::DType;
use crate::error::Error;
use crate::problem::{MemoryKind, Problem};
use crate::call::{host_i32s, Call};

/// Runs attention on host memory (online softmax, f32 accumulation) on a rayon pool.
pub(crate) struct CpuBackend {
    threads: Threads,
}

impl CpuBackend {
    /// `threads`: `None` runs on rayon's global pool (or the rayon pool of the calling task);
    /// `Some(n)` on `n` threads of a pool of this backend's own, started by the first call
    /// that needs more than one and reused after (0 counts as 1, and more than
    /// [`crate::cpu::MAX_THREADS`] as that many). A plain `usize` means `Some`.
    pub(crate) fn new(threads: impl Into<Option<usize>>) -> Self {
        CpuBackend { threads: Threads::new(threads.into()) }
    }

    fn run<T: crate::Element>(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        let (scale, mask, softcap) = (call.scale, call.mask, call.softcap);
        let (ql, kl, vl, ol) = (call.q.layout, call.k.layout, call.v.layout, call.out.layout);
        let (varlen, batch) = (call.varlen, call.problem.batch);
        // SAFETY: `check` accepted only host memory, and `call` comes from `validate`.
        let s = unsafe { call.host_slices::<T>() }.ok_or_else(|| {
            RunError::Fatal(Error::invalid("q", "device memory", "host memory for the CPU backend"))
        })?;
        let seqs = match varlen {
            None => Seqs::Dense,
            Some(packed) => {
                // SAFETY: `validate` checked both are `batch + 1` i32 values (in range,
                // non-decreasing), borrowed for as long as `call` lives.
                let (cu_q, cu_k) = unsafe {
                    (host_i32s(packed.cu_seqlens_q, batch + 1, "cu_seqlens_q")?, host_i32s(packed.cu_seqlens_k, batch + 1, "cu_seqlens_k")?)
                };
                Seqs::Packed { cu_q, cu_k }
            }
        };
        crate::cpu::forward(
            HostIn { data: s.q, layout: ql },
            HostIn { data: s.k, layout: kl },
            HostIn { data: s.v, layout: vl },
            s.out,
            ol,
            s.lse,
            seqs,
            scale,
            mask,
            softcap,
            &self.threads,
        )
        .map_err(RunError::Fatal)
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn check(&self, _caps: &DeviceCaps, problem: &Problem) -> Vec<Reason> {
        match problem.memory {
            MemoryKind::Host => vec![],
            MemoryKind::Device { .. } => vec![Reason::DeviceMemory],
        }
    }

    fn runs_kv_cache(&self) -> bool {
        true
    }

    fn forward(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        if call.kv.is_some() {
            return match call.problem.dtype {
                DType::F16 => crate::cpu_kvcache::forward::<half::f16>(call, &self.threads),
                DType::BF16 => crate::cpu_kvcache::forward::<half::bf16>(call, &self.threads),
                DType::F32 => crate::cpu_kvcache::forward::<f32>(call, &self.threads),
            };
        }
        match call.problem.dtype {
            DType::F16 => self.run::<half::f16>(call),
            DType::BF16 => self.run::<half::bf16>(call),
            DType::F32 => self.run::<f32>(call),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Options;
    use crate::tensor::{validate, Tensor, TensorMut};
    use crate::Layout;

    /// A handle asked for a million threads gets at most `MAX_THREADS`, and finishes a small
    /// call (many heads, little work each) quickly on the calling thread, starting none.
    #[test]
    fn a_million_threads_is_clamped_and_small_calls_start_none() {
        let backend = CpuBackend::new(1_000_000);
        assert_eq!(backend.threads.count(), Some(crate::cpu::MAX_THREADS));
        let l = Layout::contiguous(1, 2, 256, 8);
        let x: Vec<f32> = (0..l.numel()).map(|i| (i as f32 * 0.1).sin()).collect();
        let mut out = vec![f32::NAN; l.numel()];
        let (q, k, v) = (Tensor::host(&x, l), Tensor::host(&x, l), Tensor::host(&x, l));
        let mut o = TensorMut::host(&mut out, l);
        let start = std::time::Instant::now();
        for _ in 0..3 {
            let mut call = validate(&q, &k, &v, &mut o, None, None, &Options::default()).unwrap();
            assert!(backend.forward(&mut call).is_ok());
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "took {:?}", start.elapsed());
        assert!(out.iter().all(|o| o.is_finite()));
    }

    #[test]
    fn thread_settings_map_to_the_kernel() {
        assert_eq!(CpuBackend::new(None).threads.count(), None);
        assert_eq!(CpuBackend::new(Some(4)).threads.count(), Some(4));
        assert_eq!(CpuBackend::new(0).threads.count(), Some(1));
    }
}
