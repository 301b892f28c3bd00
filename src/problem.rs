//! The description of one attention call that backends check: sizes, dtype, options, memory.

use std::fmt;

use crate::dtype::DType;

/// Where the tensors of a call live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Host memory (slices): only the CPU backend runs it.
    Host,
    /// Device memory on the CUDA device with this ordinal.
    Device {
        /// The CUDA device ordinal.
        ordinal: usize,
    },
}

/// How the keys and values of a KV-cache call are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvCacheKind {
    /// `[batch, max_len, kv_heads, head_dim]`, any strides.
    Contiguous,
    /// Pages `[num_pages, page_size, kv_heads, head_dim]` reached through a block table.
    Paged {
        /// Key rows per page.
        page_size: usize,
    },
}

/// One attention problem: what `check` and `explain` look at. `forward` builds it from the
/// tensors; build one by hand to ask [`crate::Attention::explain`] about a call you have not
/// made yet.
///
/// ```
/// use attention::{DType, Problem};
/// let p = Problem::new(DType::BF16, 2, 1024, 1024, 32, 8, 128).causal(true);
/// assert_eq!(p.kv_heads, 8);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Problem {
    /// Element type of q, k, v and out.
    pub dtype: DType,
    /// Batch size.
    pub batch: usize,
    /// Query sequence length.
    pub seqlen_q: usize,
    /// Key/value sequence length.
    pub seqlen_k: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Causal mask (bottom-right aligned).
    pub causal: bool,
    /// A log-sum-exp output is requested.
    pub with_lse: bool,
    /// Sliding window (left, right), `None` for an unlimited side.
    pub window: (Option<usize>, Option<usize>),
    /// Logit soft-cap.
    pub softcap: Option<f32>,
    /// Where the tensors live.
    pub memory: MemoryKind,
    /// A packed variable-length batch (`cu_seqlens`): `batch` counts its sequences and
    /// `seqlen_q`/`seqlen_k` are the longest.
    pub varlen: bool,
    /// Every base pointer is 16-byte aligned and every stride a multiple of 16 bytes, so
    /// kernels can move 16-byte vectors (true for problems built by hand).
    pub vector_aligned: bool,
    /// A KV-cache call ([`crate::Attention::forward_kvcache`]): `seqlen_k` is the cache's
    /// capacity per sequence, each sequence's real length is on the device.
    pub kv_cache: Option<KvCacheKind>,
}

impl Problem {
    /// A non-causal problem in the memory of device 0.
    pub fn new(
        dtype: DType,
        batch: usize,
        seqlen_q: usize,
        seqlen_k: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Problem {
            dtype,
            batch,
            seqlen_q,
            seqlen_k,
            heads,
            kv_heads,
            head_dim,
            causal: false,
            with_lse: false,
            window: (None, None),
            softcap: None,
            memory: MemoryKind::Device { ordinal: 0 },
            varlen: false,
            vector_aligned: true,
            kv_cache: None,
        }
    }
    /// Make it a KV-cache call over keys stored as `kind`.
    pub fn kv_cache(mut self, kind: KvCacheKind) -> Self {
        self.kv_cache = Some(kind);
        self
    }
    /// Set the causal mask.
    #[must_use]
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Request the log-sum-exp output.
    #[must_use]
    pub fn with_lse(mut self, lse: bool) -> Self {
        self.with_lse = lse;
        self
    }
    /// Describe a packed variable-length batch (see [`crate::VarLen`]).
    #[must_use]
    pub fn varlen(mut self, varlen: bool) -> Self {
        self.varlen = varlen;
        self
    }
    /// Put the tensors in host memory.
    #[must_use]
    pub fn on_host(mut self) -> Self {
        self.memory = MemoryKind::Host;
        self
    }
    /// Put the tensors in the memory of device `ordinal`.
    #[must_use]
    pub fn on_device(mut self, ordinal: usize) -> Self {
        self.memory = MemoryKind::Device { ordinal };
        self
    }
    /// Floating-point operations of the forward pass: 4·b·h·sq·sk·d, halved whenever the
    /// problem is causal (exact for square problems, an approximation otherwise), the
    /// figure benchmarks report throughput against.
    pub fn flops(&self) -> f64 {
        let f = 4.0
            * self.batch as f64
            * self.heads as f64
            * self.seqlen_q as f64
            * self.seqlen_k as f64
            * self.head_dim as f64;
        if self.causal {
            f / 2.0
        } else {
            f
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} b={} sq={} sk={} h={}/{} d={}{}{}{} in {}",
            self.dtype,
            self.batch,
            self.seqlen_q,
            self.seqlen_k,
            self.heads,
            self.kv_heads,
            self.head_dim,
            if self.causal { " causal" } else { "" },
            if self.with_lse { " +lse" } else { "" }.to_string() + if self.varlen { " varlen" } else { "" },
            match self.window {
                (None, None) => String::new(),
                (l, r) => format!(
                    " window=({},{})",
                    l.map(|x| x.to_string()).unwrap_or_else(|| "inf".into()),
                    r.map(|x| x.to_string()).unwrap_or_else(|| "inf".into())
                ),
            } + &self.softcap.map(|c| format!(" softcap={c}")).unwrap_or_default()
                + match self.kv_cache {
                    None => "",
                    Some(KvCacheKind::Contiguous) => " kv-cache",
                    Some(KvCacheKind::Paged { .. }) => " paged kv-cache",
                },
            match self.memory {
                MemoryKind::Host => "host memory".to_string(),
                MemoryKind::Device { ordinal } => format!("device {ordinal} memory"),
            }
        )
    }
}
