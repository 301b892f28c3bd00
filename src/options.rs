//! Per-call options: one value with defaults, so later features (varlen, sliding window,
//! softcap, paged KV) are new fields, never new function names or positional arguments.

/// Options of one attention call. Start from [`Options::default`] and set what you need:
///
/// ```
/// let opts = attention::Options::default().causal(true).scale(0.125);
/// assert!(opts.is_causal());
/// ```
///
/// # Causal masking is aligned bottom-right
///
/// With `causal(true)`, query row `i` (0-based) attends to key `j` exactly when
/// `j <= i + seqlen_k - seqlen_q`, as FlashAttention 2.1 and later do. When
/// `seqlen_q == seqlen_k` this is the usual lower triangle; when decoding (`seqlen_q <
/// seqlen_k`) the last query row sees every key; when `seqlen_q > seqlen_k` the first
/// `seqlen_q - seqlen_k` rows see no key at all, and their output is zeros with a
/// log-sum-exp of `-inf` (never NaN). PyTorch's `is_causal` aligns top-left instead; the two
/// agree only when `seqlen_q == seqlen_k`.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Options {
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Causal mask, aligned bottom-right (see the type's documentation).
    pub causal: bool,
}

impl Options {
    /// Default options: non-causal, scale `1/sqrt(head_dim)`.
    pub fn new() -> Self {
        Self::default()
    }
    /// Set the causal mask (bottom-right aligned).
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Set the softmax scale applied to `q·k` before the softmax.
    pub fn scale(mut self, scale: f32) -> Self {
        self.softmax_scale = Some(scale);
        self
    }
    /// Whether the causal mask is on.
    pub fn is_causal(&self) -> bool {
        self.causal
    }
    /// The scale that will be used for this head dimension.
    pub fn scale_for(&self, head_dim: usize) -> f32 {
        self.softmax_scale
            .unwrap_or_else(|| 1.0 / (head_dim.max(1) as f32).sqrt())
    }
}

/// The last key index (exclusive) query row `row` may attend to under the bottom-right causal
/// mask; `0` means the row sees no key. Shared by every backend so the semantics cannot drift.
#[inline]
pub(crate) fn causal_key_end(row: usize, seqlen_q: usize, seqlen_k: usize) -> usize {
    // row + seqlen_k - seqlen_q + 1, clamped to [0, seqlen_k], without signed overflow.
    let end = (row + 1 + seqlen_k).saturating_sub(seqlen_q);
    end.min(seqlen_k)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn causal_alignment_is_bottom_right() {
        // square: lower triangle
        assert_eq!(causal_key_end(0, 4, 4), 1);
        assert_eq!(causal_key_end(3, 4, 4), 4);
        // decode: one row sees everything
        assert_eq!(causal_key_end(0, 1, 10), 10);
        // more queries than keys: the first rows see nothing
        assert_eq!(causal_key_end(0, 5, 2), 0);
        assert_eq!(causal_key_end(2, 5, 2), 0);
        assert_eq!(causal_key_end(3, 5, 2), 1);
        assert_eq!(causal_key_end(4, 5, 2), 2);
    }
}
