//! The CPU backend: the reference, and the fallback when there is no GPU.

use crate::backend::{Backend, BackendKind, Reason, RunError};
use crate::caps::DeviceCaps;
use crate::dtype::DType;
use crate::error::Error;
use crate::problem::{MemoryKind, Problem};
use crate::layout::Layout;
use crate::tensor::{Addr, Call};

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
        let (varlen, batch) = (call.varlen, call.problem.batch);
        let (max_q, max_k) = (call.problem.seqlen_q, call.problem.seqlen_k);
        // SAFETY: `check` accepted only host memory, and `call` comes from `validate`.
        let s = unsafe { call.host_slices::<T>() }.ok_or_else(|| {
            RunError::Fatal(Error::invalid("q", "device memory", "host memory for the CPU backend"))
        })?;
        if let Some(packed) = varlen {
            let (Addr::Host(cq), Addr::Host(ck)) = (packed.cu_seqlens_q, packed.cu_seqlens_k) else {
                return Err(RunError::Fatal(Error::invalid("cu_seqlens_q", "device memory", "host memory for the CPU backend")));
            };
            // SAFETY: `validate` checked both are host slices of `batch + 1` i32 values, borrowed
            // for as long as `call` lives.
            let (cq, ck) = unsafe {
                (std::slice::from_raw_parts(cq as *const i32, batch + 1), std::slice::from_raw_parts(ck as *const i32, batch + 1))
            };
            let heads = ql.heads();
            let mut lse = s.lse;
            let mut seq_lse = Vec::new();
            for b in 0..batch {
                // `validate` checked the prefix sums: in range, non-decreasing, within the maxima.
                let (q0, q1) = (cq[b] as usize, cq[b + 1] as usize);
                let (k0, k1) = (ck[b] as usize, ck[b + 1] as usize);
                debug_assert!(q1 - q0 <= max_q && k1 - k0 <= max_k);
                if q1 == q0 {
                    continue;
                }
                let sub = |l: Layout, rows: usize| Layout::strided([1, rows, l.heads(), l.head_dim()], l.strides());
                let (qo, ko, vo, oo) = (q0 * ql.strides()[1], k0 * kl.strides()[1], k0 * vl.strides()[1], q0 * ol.strides()[1]);
                seq_lse.resize(if lse.is_some() { heads * (q1 - q0) } else { 0 }, 0.0);
                crate::cpu::forward(
                    crate::cpu::HostIn { data: &s.q[qo..], layout: sub(ql, q1 - q0) },
                    crate::cpu::HostIn { data: &s.k[ko..], layout: sub(kl, k1 - k0) },
                    crate::cpu::HostIn { data: &s.v[vo..], layout: sub(vl, k1 - k0) },
                    &mut s.out[oo..],
                    sub(ol, q1 - q0),
                    lse.is_some().then_some(&mut seq_lse[..]),
                    scale,
                    mask,
                    softcap,
                    self.threads,
                );
                // The packed lse is [heads, total_q]; this sequence's is [heads, rows].
                if let Some(l) = lse.as_deref_mut() {
                    let total_q = ql.seqlen();
                    for (h, row) in seq_lse.chunks(q1 - q0).enumerate() {
                        l[h * total_q + q0..h * total_q + q1].copy_from_slice(row);
                    }
                }
            }
            return Ok(());
        }
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
