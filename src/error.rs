//! The crate's error type: every failure names what was wrong, the value, and what is accepted.

use crate::reason::{BackendKind, Reason};

// Parsing a backend name fails with the crate's error, so the impl lives beside the error
// (the names themselves are vocabulary, in `reason`, which imports nothing above it).
impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        BackendKind::from_name(s).ok_or_else(|| Error::UnknownBackend { name: s.to_string(), valid: BackendKind::VALID_NAMES })
    }
}

/// A backend and the reasons it was passed over.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The backend.
    pub backend: BackendKind,
    /// Every reason it cannot run the problem.
    pub reasons: Vec<Reason>,
}

impl Rejection {
    /// Whether this backend should have run here and did not (a fallback: warned once, an
    /// error under `ATTN_STRICT=1`), as opposed to one that was never for this device or
    /// memory, or that a setting took out.
    pub fn is_fallback(&self) -> bool {
        crate::reason::is_fallback(&self.reasons)
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.backend)?;
        for (i, r) in self.reasons.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

fn list(rejections: &[Rejection]) -> String {
    rejections
        .iter()
        .map(|r| format!("\n  - {r}"))
        .collect::<String>()
}

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument of a call is invalid.
    #[error("invalid argument `{arg}`: got {value}, expected {expected}")]
    InvalidArgument {
        /// The argument (`q`, `k.shape`, `lse`, ...).
        arg: &'static str,
        /// What was passed.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// An `ATTN_*` environment variable (or the builder call that mirrors it) has a bad value.
    #[error("invalid setting {var}={value:?}: expected {expected}")]
    InvalidSetting {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// A backend name that does not exist.
    #[error("unknown backend {name:?}: valid names are {valid}")]
    UnknownBackend {
        /// The name given.
        name: String,
        /// The valid names.
        valid: &'static str,
    },
    /// The backend the user forced cannot run this problem.
    #[error("backend `{backend}` was forced by {by} but cannot run this problem:{}", list(std::slice::from_ref(.rejection)))]
    ForcedBackendUnavailable {
        /// The forced backend.
        backend: BackendKind,
        /// The setting that forced it.
        by: &'static str,
        /// Why it cannot run.
        rejection: Rejection,
    },
    /// Strict mode (`ATTN_STRICT=1`) forbids falling back below the best backend.
    #[error("strict mode (ATTN_STRICT=1): `{chosen}` would run, but better backends were passed over:{}\nunset ATTN_STRICT to allow the fallback", list(.passed_over))]
    StrictFallback {
        /// The backend that would have run.
        chosen: BackendKind,
        /// The better backends and why each was passed over.
        passed_over: Vec<Rejection>,
    },
    /// No backend can run this problem.
    #[error("no backend can run this problem ({problem}):{}", list(.rejections))]
    NoBackend {
        /// A short description of the problem.
        problem: String,
        /// Every backend and why it was passed over.
        rejections: Vec<Rejection>,
    },
    /// A CUDA driver call failed in a way that is not a recoverable fallback (for example a
    /// sticky illegal-address error). The context may be unusable.
    #[error("CUDA error in {op}: {name} ({code}): {message}")]
    Cuda {
        /// The operation.
        op: &'static str,
        /// The `CUresult` value.
        code: i32,
        /// Its name (`CUDA_ERROR_ILLEGAL_ADDRESS`).
        name: String,
        /// The driver's description.
        message: String,
    },
    /// Compiling kernels at run time with NVRTC failed.
    #[error("NVRTC could not compile {module} for {arch}: {log}")]
    Jit {
        /// The kernel module.
        module: String,
        /// The target arch.
        arch: String,
        /// The compiler's log.
        log: String,
    },
}

impl Error {
    /// A failed driver call, with the driver's name and description of the code.
    pub(crate) fn cuda(op: &'static str, code: cudarc::driver::sys::CUresult) -> Self {
        let e = cudarc::driver::DriverError(code);
        Error::Cuda {
            op,
            code: code as i32,
            name: e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            message: e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }

    pub(crate) fn invalid(arg: &'static str, value: impl ToString, expected: impl ToString) -> Self {
        Error::InvalidArgument {
            arg,
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
