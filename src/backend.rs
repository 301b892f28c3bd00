//! The trait every backend implements, and the checks the GPU backends share. The backend
//! names and the typed reasons they reject a problem are vocabulary, in [`crate::reason`].

pub(crate) use crate::reason::{BackendKind, Reason};

use crate::caps::DeviceCaps;
use crate::error::Error;
use crate::problem::{MemoryKind, Problem};

/// A failure while a backend ran.
#[derive(Debug)]
pub(crate) enum RunError {
    /// Nothing was written and the device is healthy: mark the backend unusable, try the next.
    Recoverable(Reason),
    /// Anything else (sticky CUDA errors above all): returned to the caller as is.
    Fatal(Error),
}

impl From<Error> for RunError {
    fn from(e: Error) -> Self {
        RunError::Fatal(e)
    }
}

/// One way to compute attention. Modeled on xFormers' ops: each declares what it supports
/// through `check`, which returns every reason it cannot run a problem (empty = it can).
pub(crate) trait Backend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Every reason this backend cannot run `problem` on the device described by `caps`.
    fn check(&self, caps: &DeviceCaps, problem: &Problem) -> Vec<Reason>;
    /// Runs a problem `check` accepted.
    fn forward(&self, call: &mut crate::call::Call<'_>) -> Result<(), RunError>;
    /// Whether it runs KV-cache calls (per-sequence lengths, paged keys). The selector answers
    /// [`Reason::KvCache`] for the backends that do not, so their checks stay prefill-only.
    fn runs_kv_cache(&self) -> bool {
        false
    }
}

/// The largest grid y/z dimension a launch may have.
pub(crate) const MAX_GRID_YZ: usize = 65535;

/// The fused kernels' launch grid is (query tiles, heads, batch): the heads and the batch (or
/// the sequences of a packed batch) must each fit a grid dimension.
pub(crate) fn grid_reasons(problem: &Problem) -> Vec<Reason> {
    [("heads", problem.heads), ("batch", problem.batch)]
        .into_iter()
        .filter(|&(_, found)| found > MAX_GRID_YZ)
        .map(|(dim, found)| Reason::GridLimit { dim, found, max: MAX_GRID_YZ })
        .collect()
}

/// Reasons every GPU backend shares: device memory on this device.
pub(crate) fn gpu_memory_reasons(caps: &DeviceCaps, problem: &Problem) -> Vec<Reason> {
    match problem.memory {
        MemoryKind::Host => vec![Reason::HostMemory],
        MemoryKind::Device { ordinal } if caps.is_real() && ordinal != caps.ordinal => {
            vec![Reason::OtherDevice { expected: caps.ordinal }]
        }
        MemoryKind::Device { .. } => vec![],
    }
}

