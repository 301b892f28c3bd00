//! Per-call options: one value with defaults, so later features (varlen, sliding window,
//! softcap, paged KV) are new fields, never new function names or positional arguments.

/// The largest softmax scale accepted (scales run from 0 to this). Scaled logits of f16 inputs
/// (|x| ≤ 65504, head_dim ≤ 2^16) stay finite in f32 below it, and no model uses a scale
/// anywhere near it; a larger one only turns logits into ±inf, whose softmax is undefined.
/// Negative scales are rejected too: the GPU kernels take each row's maximum before scaling,
/// which is only the maximum after scaling for a non-negative scale.
pub const MAX_SOFTMAX_SCALE: f32 = 1.0e6;

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
    /// Softmax scale; `None` means `1/sqrt(head_dim)`. Every value from 0 to
    /// [`MAX_SOFTMAX_SCALE`] gives the mathematically right answer; others are rejected. A NaN
    /// in the inputs a row reads gives NaN in that row (and its lse), as in PyTorch.
    pub softmax_scale: Option<f32>,
    /// Causal mask, aligned bottom-right (see the type's documentation).
    pub causal: bool,
    /// Sliding window: keys more than this many positions left of a row's diagonal key are
    /// hidden (`None`: unlimited). See [`Options::window`].
    pub window_left: Option<usize>,
    /// Sliding window: keys more than this many positions right of a row's diagonal key are
    /// hidden (`None`: unlimited).
    pub window_right: Option<usize>,
    /// Logit soft-capping: the scaled logit `x` becomes `softcap · tanh(x / softcap)`.
    pub softcap: Option<f32>,
    /// f32 inputs may run on TF32 tensor cores (10-bit mantissa products), as PyTorch's
    /// `torch.backends.cuda.matmul.allow_tf32` allows. Off by default. No kernel takes the
    /// permission yet (f32 runs on SIMT cores), so results are the same either way.
    pub allow_tf32: bool,
}

impl Options {
    /// Default options: non-causal, scale `1/sqrt(head_dim)`.
    pub fn new() -> Self {
        Self::default()
    }
    /// Set the causal mask (bottom-right aligned).
    #[must_use]

    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Set the softmax scale applied to `q·k` before the softmax.
    #[must_use]

    pub fn scale(mut self, scale: f32) -> Self {
        self.softmax_scale = Some(scale);
        self
    }
    /// Sliding-window (local) attention, as Mistral and Gemma use: query row `i` sees key `j`
    /// iff `d - left <= j <= d + right`, where `d = i + seqlen_k - seqlen_q` is the row's
    /// diagonal key (bottom-right aligned, like `causal`); `None` leaves a side unlimited.
    /// `window(Some(w), Some(0))` is causal attention over the last `w + 1` keys.
    #[must_use]

    pub fn window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
        self.window_left = left;
        self.window_right = right;
        self
    }
    /// Logit soft-capping (Gemma 2): each scaled logit `x` becomes `cap · tanh(x / cap)`.
    #[must_use]

    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }
    /// Let f32 inputs run on TF32 tensor cores (see the field).
    #[must_use]

    pub fn allow_tf32(mut self, allow: bool) -> Self {
        self.allow_tf32 = allow;
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

/// Which keys a query row may see: the causal mask and the sliding window combined, all
/// aligned bottom-right. The kernels implement the same rule; this is the host-side statement
/// of it (CPU backend) and its tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Mask {
    pub causal: bool,
    pub left: Option<usize>,
    pub right: Option<usize>,
}

impl Mask {
    pub(crate) fn of(opts: &Options) -> Self {
        Mask { causal: opts.causal, left: opts.window_left, right: opts.window_right }
    }

    /// The keys `[begin, end)` row `row` sees; `begin == end` when it sees none. Both ends are
    /// non-decreasing in `row`.
    pub(crate) fn key_range(&self, row: usize, seqlen_q: usize, seqlen_k: usize) -> (usize, usize) {
        let diag = row as i64 + seqlen_k as i64 - seqlen_q as i64;
        let mut end = seqlen_k as i64;
        let mut begin = 0i64;
        if self.causal {
            end = end.min(diag + 1);
        }
        if let Some(r) = self.right {
            end = end.min(diag.saturating_add(r as i64).saturating_add(1));
        }
        if let Some(l) = self.left {
            begin = begin.max(diag.saturating_sub(l as i64));
        }
        let end = end.clamp(0, seqlen_k as i64) as usize;
        let begin = (begin.clamp(0, seqlen_k as i64) as usize).min(end);
        (begin, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn causal_alignment_is_bottom_right() {
        let end = |row, sq, sk| {
            let (b, e) = Mask { causal: true, ..Mask::default() }.key_range(row, sq, sk);
            assert_eq!(b, 0);
            e
        };
        // square: lower triangle
        assert_eq!(end(0, 4, 4), 1);
        assert_eq!(end(3, 4, 4), 4);
        // decode: one row sees everything
        assert_eq!(end(0, 1, 10), 10);
        // more queries than keys: the first rows see nothing
        assert_eq!(end(0, 5, 2), 0);
        assert_eq!(end(2, 5, 2), 0);
        assert_eq!(end(3, 5, 2), 1);
        assert_eq!(end(4, 5, 2), 2);
    }

    #[test]
    fn sliding_window_ranges() {
        // Window of 2 to the left, causal: keys i-2..=i.
        let m = Mask { causal: true, left: Some(2), right: None };
        assert_eq!(m.key_range(0, 8, 8), (0, 1));
        assert_eq!(m.key_range(5, 8, 8), (3, 6));
        // Two-sided window, no causal: i-1..=i+1, clamped.
        let m = Mask { causal: false, left: Some(1), right: Some(1) };
        assert_eq!(m.key_range(0, 8, 8), (0, 2));
        assert_eq!(m.key_range(7, 8, 8), (6, 8));
        // Decode (sq=1, sk=100) with a 10-key window: the last 11 keys.
        let m = Mask { causal: true, left: Some(10), right: None };
        assert_eq!(m.key_range(0, 1, 100), (89, 100));
        // A window entirely before the keys: empty.
        let m = Mask { causal: false, left: Some(0), right: Some(0) };
        assert_eq!(m.key_range(0, 10, 2), (0, 0));
    }
}
