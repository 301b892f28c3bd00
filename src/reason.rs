//! The backends' names and the typed reasons a backend rejects a problem: vocabulary every
//! layer shares, so it imports nothing above the device description.

use std::fmt;

use crate::arch::ComputeCapability;

/// The backends this crate knows, fastest first. Parse one from its documented name:
///
/// ```
/// use attention::BackendKind;
/// assert_eq!("naive".parse::<BackendKind>().unwrap(), BackendKind::Naive);
/// assert_eq!("xformers".parse::<BackendKind>().unwrap(), BackendKind::MemEfficient);
/// assert!("fast".parse::<BackendKind>().unwrap_err().to_string().contains("flash, mem_efficient"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum BackendKind {
    /// FlashDecoding-style kernels for a few query rows against long keys (sm_75+): decode,
    /// speculative decoding, KV-cache and paged-KV calls. GQA-packed, split-KV.
    Decode,
    /// FlashAttention-style tiled tensor-core kernels (sm_80+; FlashAttention-3-style on sm_90).
    Flash,
    /// xFormers-style memory-efficient kernel (sm_75+): tiled online softmax, f16/bf16 on tensor
    /// cores (bf16 on sm_80+), f32 on SIMT, any head_dim up to 512, unaligned tensors accepted.
    MemEfficient,
    /// CUDA kernels that materialise the score matrix in an f32 workspace.
    Naive,
    /// Multi-threaded CPU implementation; the reference and the no-GPU fallback.
    Cpu,
}

impl BackendKind {
    /// Every kind, in rank order (fastest first).
    pub const ALL: [BackendKind; 5] = [
        BackendKind::Decode,
        BackendKind::Flash,
        BackendKind::MemEfficient,
        BackendKind::Naive,
        BackendKind::Cpu,
    ];

    /// The documented name (`flash`, `mem_efficient`, `naive`, `cpu`).
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Decode => "decode",
            BackendKind::Flash => "flash",
            BackendKind::MemEfficient => "mem_efficient",
            BackendKind::Naive => "naive",
            BackendKind::Cpu => "cpu",
        }
    }

    /// Whether this kind runs on the GPU (and so takes device memory).
    pub const fn is_gpu(self) -> bool {
        !matches!(self, BackendKind::Cpu)
    }

    /// The backend a documented name (or alias) means; `str::parse` wraps this with an error
    /// that lists the valid names.
    pub fn from_name(s: &str) -> Option<BackendKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "decode" | "flash_decoding" => Some(BackendKind::Decode),
            "flash" | "flash_attention" => Some(BackendKind::Flash),
            "mem_efficient" | "xformers" | "efficient" => Some(BackendKind::MemEfficient),
            "naive" => Some(BackendKind::Naive),
            "cpu" => Some(BackendKind::Cpu),
            _ => None,
        }
    }

    /// The accepted spellings, for error messages.
    pub const VALID_NAMES: &'static str = "decode, flash, mem_efficient (alias xformers), naive, cpu";
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Why a backend cannot run a problem. Each reason's `Display` says what would change it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Reason {
    /// Taken out of the chain by a setting (`ATTN_DISABLE` or [`crate::Selector::disable`]).
    Disabled {
        /// The setting that disabled it.
        by: &'static str,
    },
    /// Another backend was forced (`ATTN_BACKEND` or [`crate::Selector::backend`]).
    NotForced {
        /// The forced backend.
        forced: BackendKind,
        /// The setting that forced it.
        by: &'static str,
    },
    /// The backend is not part of this version of the crate.
    NotImplemented,
    /// No usable CUDA driver or device.
    NoDevice {
        /// What the probe found.
        why: String,
    },
    /// The device's compute capability is too old.
    ComputeCapability {
        /// Minimum needed.
        needed: ComputeCapability,
        /// The device's.
        found: ComputeCapability,
    },
    /// Head dimension out of range.
    HeadDim {
        /// Largest supported.
        max: usize,
        /// The problem's.
        found: usize,
    },
    /// Head dimension not a multiple the kernel's vector loads need.
    HeadDimMultiple {
        /// Required multiple.
        multiple: usize,
        /// The problem's.
        found: usize,
    },
    /// A base pointer or stride is not aligned for 16-byte vector access.
    Unaligned,
    /// Packed variable-length batches (`cu_seqlens`) are not supported by this backend.
    VarLen,
    /// The kernel for this problem needs more shared memory per block than the device has.
    SharedMemory {
        /// Bytes needed.
        needed: usize,
        /// Bytes the device allows per block (opt-in maximum).
        available: usize,
    },
    /// A size beyond what the kernel's launch grid can index.
    GridLimit {
        /// Which dimension.
        dim: &'static str,
        /// Its value.
        found: usize,
        /// The limit.
        max: usize,
    },
    /// Element type not supported here.
    DType {
        /// The problem's dtype.
        found: crate::DType,
        /// What the backend supports on this device.
        supported: &'static str,
    },
    /// The crate carries no kernel image this device can run, and JIT cannot make one.
    NoKernelImage {
        /// The arch list the embedded kernels were built for ("" when built without nvcc).
        built_for: String,
        /// The device's arch, `sm_XY`.
        device: String,
        /// Why the JIT repair is not available.
        jit: String,
    },
    /// JIT compilation was required (`ATTN_JIT=always`) or needed, and failed or is unavailable.
    Jit {
        /// What went wrong.
        why: String,
    },
    /// Too many query rows for the decode kernels: a prefill, which the tiled backends run.
    NotADecode {
        /// The problem's query rows per sequence.
        seqlen_q: usize,
        /// The most the decode kernels take.
        max: usize,
    },
    /// A KV-cache call (per-sequence lengths, pages): only `decode` and `cpu` run those.
    KvCache,
    /// The tensors are in host memory; GPU backends need device memory.
    HostMemory,
    /// The tensors are in device memory; the CPU backend never copies device memory silently.
    DeviceMemory,
    /// The tensors live on a different GPU than this handle's device.
    OtherDevice {
        /// The handle's device ordinal.
        expected: usize,
    },
    /// The backend failed on this device at run time in a recoverable way and was taken out.
    Unusable {
        /// The failure.
        why: String,
    },
}

/// How a reason bears on fallbacks and strict mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReasonScope {
    /// The user chose it (disabled, another backend forced): not a fallback.
    UserChoice,
    /// The backend was never a candidate for this device or memory kind: not a fallback.
    NotApplicable,
    /// The backend should have run here and did not: a fallback (warned, an error in strict mode).
    Fallback,
}

impl Reason {
    pub(crate) fn scope(&self) -> ReasonScope {
        match self {
            Reason::Disabled { .. } | Reason::NotForced { .. } => ReasonScope::UserChoice,
            Reason::NotImplemented
            | Reason::NoDevice { .. }
            | Reason::ComputeCapability { .. }
            | Reason::HostMemory
            | Reason::DeviceMemory
            | Reason::NotADecode { .. }
            | Reason::KvCache
            | Reason::OtherDevice { .. } => ReasonScope::NotApplicable,
            Reason::HeadDim { .. }
            | Reason::HeadDimMultiple { .. }
            | Reason::Unaligned
            | Reason::VarLen
            | Reason::SharedMemory { .. }
            | Reason::GridLimit { .. }
            | Reason::DType { .. }
            | Reason::NoKernelImage { .. }
            | Reason::Jit { .. }
            | Reason::Unusable { .. } => ReasonScope::Fallback,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Disabled { by } => write!(f, "disabled by {by}"),
            Reason::NotForced { forced, by } => write!(f, "{by} selects `{forced}`"),
            Reason::NotImplemented => write!(f, "not part of this version of the crate"),
            Reason::NoDevice { why } => write!(f, "no usable CUDA device: {why}"),
            Reason::ComputeCapability { needed, found } => write!(
                f,
                "needs compute capability {needed} or newer, the device has {found}"
            ),
            Reason::HeadDim { max, found } => {
                write!(f, "head_dim {found} is above the supported maximum {max}")
            }
            Reason::HeadDimMultiple { multiple, found } => {
                write!(f, "head_dim {found} is not a multiple of {multiple}")
            }
            Reason::Unaligned => write!(
                f,
                "a base pointer or stride is not 16-byte aligned (make the tensors contiguous or pad strides to 16 bytes)"
            ),
            Reason::NotADecode { seqlen_q, max } => write!(
                f,
                "{seqlen_q} query rows per sequence is a prefill (the decode kernels take at most {max}); \
                 flash and mem_efficient run it"
            ),
            Reason::KvCache => write!(
                f,
                "a KV-cache call (per-sequence lengths, paged keys) runs on decode (GPU) or cpu (host memory)"
            ),
            Reason::VarLen => write!(
                f,
                "packed variable-length batches (cu_seqlens) are not supported here; \
                 flash, mem_efficient and cpu run them (or pad to a fixed length)"
            ),
            Reason::SharedMemory { needed, available } => write!(
                f,
                "needs {needed} bytes of shared memory per block, the device allows {available}"
            ),
            Reason::GridLimit { dim, found, max } => {
                write!(f, "{dim} {found} exceeds the launch limit {max}")
            }
            Reason::DType { found, supported } => {
                write!(f, "dtype {found} is not supported here (supported: {supported})")
            }
            Reason::NoKernelImage { built_for, device, jit } => {
                let built = if built_for.is_empty() {
                    "no arch (built without nvcc)".to_string()
                } else {
                    format!("[{built_for}]")
                };
                write!(
                    f,
                    "no kernel image for {device}: the crate was built for {built} and {jit}; \
                     rebuild with ATTN_CUDA_ARCH_LIST including {} (or add +PTX to an older entry), \
                     or allow JIT with ATTN_JIT=auto and libnvrtc on the library path",
                    sm_to_list_entry(device)
                )
            }
            Reason::Jit { why } => write!(f, "JIT compilation unavailable or failed: {why}"),
            Reason::HostMemory => write!(
                f,
                "tensors are in host memory; pass device tensors (Tensor::cuda) to run on the GPU"
            ),
            Reason::DeviceMemory => write!(
                f,
                "tensors are in device memory; the CPU backend never copies them silently (pass host slices)"
            ),
            Reason::OtherDevice { expected } => write!(
                f,
                "tensors are not on device {expected}; select that device with ATTN_DEVICE or Selector::device"
            ),
            Reason::Unusable { why } => write!(
                f,
                "failed on this device earlier and was taken out of the chain: {why}"
            ),
        }
    }
}

/// "sm_90a" -> "9.0a"; anything else is returned unchanged.
fn sm_to_list_entry(sm: &str) -> String {
    let digits = sm.trim_start_matches("sm_");
    let (num, suffix): (String, String) = digits.chars().partition(|c| c.is_ascii_digit());
    if num.len() >= 2 {
        let (maj, min) = num.split_at(num.len() - 1);
        format!("{maj}.{min}{suffix}")
    } else {
        sm.to_string()
    }
}

/// A rejection is a fallback when every reason is one the device should not have had: a
/// backend that was disabled, or never applied to this device or memory, was not "fallen from".
pub(crate) fn is_fallback(reasons: &[Reason]) -> bool {
    !reasons.is_empty() && reasons.iter().all(|x| x.scope() == ReasonScope::Fallback)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn list_entry_from_sm() {
        assert_eq!(sm_to_list_entry("sm_90a"), "9.0a");
        assert_eq!(sm_to_list_entry("sm_120"), "12.0");
        assert_eq!(sm_to_list_entry("sm_75"), "7.5");
    }
}
