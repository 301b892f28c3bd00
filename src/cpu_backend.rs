//! The CPU backend: the reference, and the fallback when there is no GPU.

use crate::backend::{Backend, BackendKind, Reason, RunError};
use crate::caps::DeviceCaps;
use crate::dtype::DType;
use crate::error::Error;
use crate::problem::{MemoryKind, Problem};
use crate::tensor::Call;

/// Runs attention on host memory with all cores (online softmax, f32 accumulation).
pub(crate) struct CpuBackend {
    threads: usize,
}

impl CpuBackend {
    pub(crate) fn new(threads: usize) -> Self {
        CpuBackend { threads: threads.max(1) }
    }

    fn run<T: crate::Element>(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        let (scale, mask, softcap) = (call.scale, call.mask, call.softcap);
        let (ql, kl, vl, ol) = (call.q.layout, call.k.layout, call.v.layout, call.out.layout);
        // SAFETY: `check` accepted only host memory, and `call` comes from `validate`.
        let s = unsafe { call.host_slices::<T>() }.ok_or_else(|| {
            RunError::Fatal(Error::invalid("q", "device memory", "host memory for the CPU backend"))
        })?;
        crate::cpu::forward(
            crate::cpu::HostIn { data: s.q, layout: ql },
            crate::cpu::HostIn { data: s.k, layout: kl },
            crate::cpu::HostIn { data: s.v, layout: vl },
            s.out,
            ol,
            s.lse,
            scale,
            mask,
            softcap,
            self.threads,
        );
        Ok(())
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

    fn forward(&self, call: &mut Call<'_>) -> Result<(), RunError> {
        match call.problem.dtype {
            DType::F16 => self.run::<half::f16>(call),
            DType::BF16 => self.run::<half::bf16>(call),
            DType::F32 => self.run::<f32>(call),
        }
    }
}
