//! The trait every backend implements, and the checks the GPU backends share. The backend
//! names and the typed reasons they reject a problem are vocabulary, in [`crate::reason`].

pub(crate) use crate::reason::{BackendKind, Reason};

use crate::caps::{ComputeCapability, DeviceCaps};
use crate::dtype::DType;
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
    /// How it would run `problem` (kernel, grid, splits), for `explain`; `None` where the
    /// backend has nothing more to say than its name.
    fn plan_summary(&self, _caps: &DeviceCaps, _problem: &Problem) -> Option<String> {
        None
    }
    /// Device scratch bytes a call of `problem`'s shape uses at most (0: none).
    fn workspace_bytes(&self, _caps: &DeviceCaps, _problem: &Problem) -> usize {
        0
    }
}

/// What a GPU backend declares it supports, checked by one named predicate per constraint,
/// each with the reason that says what would change it (PyTorch `sdp_utils`' `check_*`
/// functions, xFormers' `supports`). A backend adds only what is its own (shared memory of the
/// kernel it would pick, its module's availability, its grid shape).
pub(crate) struct Capabilities {
    /// Oldest device the kernels run on; below it nothing else is checked.
    pub min_cc: ComputeCapability,
    /// Element types and the oldest device each runs on, and how to say so in a reason.
    pub dtypes: &'static [(DType, ComputeCapability)],
    pub dtypes_text: &'static str,
    /// Largest head_dim, per element type.
    pub max_head_dim: fn(DType) -> usize,
    /// head_dim must be a multiple of this (per element type; 1: any).
    pub head_dim_multiple: fn(DType) -> usize,
    /// 16-byte aligned bases and strides are required.
    pub needs_alignment: bool,
    /// Packed variable-length batches are supported.
    pub varlen: bool,
    /// Most query rows per sequence of a dense problem (`None`: any): one past it is not for
    /// this backend (not a fallback), and nothing else is checked. KV-cache calls are taken at
    /// any query length.
    pub max_query_rows: Option<usize>,
    /// The launch grid is (tiles, heads, batch): heads and batch must fit a grid dimension.
    pub heads_and_batch_on_the_grid: bool,
}

impl Capabilities {
    /// Every reason the declared capabilities rule `problem` out on `caps`, in a fixed order.
    pub(crate) fn reasons(&self, caps: &DeviceCaps, problem: &Problem) -> Vec<Reason> {
        let mut reasons = gpu_memory_reasons(caps, problem);
        if let Some(max) = self.max_query_rows {
            // A KV-cache call has no other GPU backend: the bound is for dense problems.
            if problem.seqlen_q > max && problem.kv_cache.is_none() {
                reasons.push(Reason::NotADecode { seqlen_q: problem.seqlen_q, max });
                return reasons;
            }
        }
        if caps.cc < self.min_cc {
            // Nothing else matters on a device the kernels cannot run on.
            reasons.push(Reason::ComputeCapability { needed: self.min_cc, found: caps.cc });
            return reasons;
        }
        reasons.extend(self.check_dtype(caps, problem));
        reasons.extend(self.check_varlen(problem));
        reasons.extend(self.check_head_dim(problem));
        reasons.extend(self.check_alignment(problem));
        if self.heads_and_batch_on_the_grid {
            reasons.extend(grid_reasons(problem));
        }
        reasons
    }

    fn check_dtype(&self, caps: &DeviceCaps, problem: &Problem) -> Option<Reason> {
        let runs = self.dtypes.iter().any(|&(d, cc)| d == problem.dtype && caps.cc >= cc);
        (!runs).then_some(Reason::DType { found: problem.dtype, supported: self.dtypes_text })
    }

    fn check_varlen(&self, problem: &Problem) -> Option<Reason> {
        (problem.varlen && !self.varlen).then_some(Reason::VarLen)
    }

    fn check_head_dim(&self, problem: &Problem) -> Option<Reason> {
        let (max, multiple) = ((self.max_head_dim)(problem.dtype), (self.head_dim_multiple)(problem.dtype));
        if problem.head_dim > max {
            Some(Reason::HeadDim { max, found: problem.head_dim })
        } else if problem.head_dim % multiple != 0 {
            Some(Reason::HeadDimMultiple { multiple, found: problem.head_dim })
        } else {
            None
        }
    }

    fn check_alignment(&self, problem: &Problem) -> Option<Reason> {
        (self.needs_alignment && !problem.vector_aligned).then_some(Reason::Unaligned)
    }

    /// Whether `reasons` already rule out the head_dim (so nothing sized by it is checked).
    pub(crate) fn head_dim_rejected(reasons: &[Reason]) -> bool {
        reasons.iter().any(|r| matches!(r, Reason::HeadDim { .. } | Reason::HeadDimMultiple { .. } | Reason::ComputeCapability { .. } | Reason::NotADecode { .. }))
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

