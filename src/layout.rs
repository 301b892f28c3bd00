//! Shapes and strides of the q, k, v and out tensors.

/// The shape and memory layout of one attention tensor.
///
/// The logical shape is always `[batch, seqlen, heads, head_dim]`; `strides` say, in elements,
/// how far apart consecutive batches, sequence positions and heads are in memory. `head_dim`
/// is always contiguous (stride 1), which every kernel relies on for vector loads.
///
/// Both common memory orders are a constructor away, so no copy is ever needed:
///
/// ```
/// use attention::Layout;
/// // PyTorch/FlashAttention order: [batch, seqlen, heads, head_dim] contiguous.
/// let bshd = Layout::contiguous(2, 128, 8, 64);
/// assert_eq!(bshd.strides(), [128 * 8 * 64, 8 * 64, 64]);
/// // SDPA order: [batch, heads, seqlen, head_dim] contiguous, same logical shape.
/// let bhsd = Layout::heads_first(2, 128, 8, 64);
/// assert_eq!(bhsd.strides(), [8 * 128 * 64, 64, 128 * 64]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// `[batch, seqlen, heads, head_dim]`.
    shape: [usize; 4],
    /// Element strides of `[batch, seqlen, heads]`; head_dim has stride 1.
    strides: [usize; 3],
}

impl Layout {
    /// `[batch, seqlen, heads, head_dim]` stored contiguously in that order.
    pub const fn contiguous(batch: usize, seqlen: usize, heads: usize, head_dim: usize) -> Self {
        Layout {
            shape: [batch, seqlen, heads, head_dim],
            strides: [seqlen * heads * head_dim, heads * head_dim, head_dim],
        }
    }

    /// `[batch, seqlen, heads, head_dim]` stored as `[batch, heads, seqlen, head_dim]`
    /// (PyTorch SDPA's order).
    pub const fn heads_first(batch: usize, seqlen: usize, heads: usize, head_dim: usize) -> Self {
        Layout {
            shape: [batch, seqlen, heads, head_dim],
            strides: [heads * seqlen * head_dim, head_dim, seqlen * head_dim],
        }
    }

    /// Any layout: `shape` is `[batch, seqlen, heads, head_dim]`, `strides` the element
    /// strides of `[batch, seqlen, heads]`. Validity (in bounds, no overlap) is checked when the
    /// tensor is used, so the error can name the argument.
    pub const fn strided(shape: [usize; 4], strides: [usize; 3]) -> Self {
        Layout { shape, strides }
    }

    /// `[batch, seqlen, heads, head_dim]`.
    pub const fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// Element strides of `[batch, seqlen, heads]`.
    pub const fn strides(&self) -> [usize; 3] {
        self.strides
    }
    /// Batch size.
    pub const fn batch(&self) -> usize {
        self.shape[0]
    }
    /// Sequence length.
    pub const fn seqlen(&self) -> usize {
        self.shape[1]
    }
    /// Number of heads.
    pub const fn heads(&self) -> usize {
        self.shape[2]
    }
    /// Head dimension.
    pub const fn head_dim(&self) -> usize {
        self.shape[3]
    }

    /// Element offset of `(b, s, h, 0)`.
    #[inline]
    pub const fn offset(&self, b: usize, s: usize, h: usize) -> usize {
        b * self.strides[0] + s * self.strides[1] + h * self.strides[2]
    }

    /// Number of elements the logical tensor has, saturating at `usize::MAX` (no buffer can
    /// hold that many, so a saturated count is always rejected when the tensor is used). Use
    /// [`Layout::checked_numel`] to tell an overflow apart.
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or(usize::MAX)
    }

    /// Number of elements, or `None` when the product of the dimensions overflows `usize`.
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// One past the largest element offset the layout touches, or `None` on overflow (of the
    /// element count or of an offset). Zero for an empty tensor.
    pub fn span(&self) -> Option<usize> {
        if self.checked_numel()? == 0 {
            return Some(0);
        }
        let mut last = self.shape[3] - 1;
        for i in 0..3 {
            last = last.checked_add((self.shape[i] - 1).checked_mul(self.strides[i])?)?;
        }
        last.checked_add(1)
    }

    /// The same elements with the stride of every size-1 dimension set to 0. A size-1
    /// dimension's stride never moves an index, so this changes no address; it keeps an
    /// arbitrary (say `usize::MAX`) stride there out of every later stride computation.
    pub(crate) fn canonical(&self) -> Layout {
        let mut strides = self.strides;
        for (s, &n) in strides.iter_mut().zip(&self.shape) {
            if n == 1 {
                *s = 0;
            }
        }
        Layout { shape: self.shape, strides }
    }

    /// Whether two different logical elements share a memory location.
    ///
    /// Dimensions of size 1 are ignored (their stride is never used). First the usual sufficient
    /// test: the remaining dimensions, taken from the smallest stride up, each step over
    /// everything the dimensions inside them cover; that accepts every permutation of a dense
    /// layout and every padded one. Layouts it cannot decide (interleaved ones, where a
    /// dimension's stride falls inside another's extent) are decided exactly by sorting the
    /// start of every head_dim row when there are at most [`Layout::EXACT_OVERLAP_ROWS`] rows;
    /// larger ones count as overlapping.
    pub fn overlaps(&self) -> bool {
        match (self.checked_numel(), self.span()) {
            (Some(0), _) => return false, // no elements, so no two share memory
            (None, _) | (_, None) => return true, // offsets overflow: nothing is addressable
            _ => {}
        }
        let mut dims: Vec<(usize, usize)> = (0..3)
            .filter(|&i| self.shape[i] > 1)
            .map(|i| (self.strides[i], self.shape[i]))
            .collect();
        dims.sort_unstable();
        let mut covered = self.shape[3]; // head_dim is contiguous
        let mut nested = true;
        for &(stride, size) in &dims {
            if stride < covered {
                nested = false;
                break;
            }
            covered = stride.saturating_mul(size - 1).saturating_add(covered);
        }
        if nested {
            return false;
        }
        let rows = self.shape[0] * self.shape[1] * self.shape[2]; // no overflow: numel fits
        if rows > Self::EXACT_OVERLAP_ROWS || dims.iter().any(|&(stride, _)| stride == 0) {
            return true;
        }
        let mut starts = Vec::with_capacity(rows);
        for b in 0..self.shape[0] {
            for s in 0..self.shape[1] {
                for h in 0..self.shape[2] {
                    starts.push(self.offset(b, s, h));
                }
            }
        }
        starts.sort_unstable();
        starts.windows(2).any(|w| w[1] - w[0] < self.shape[3])
    }

    /// The most `batch · seqlen · heads` rows [`Layout::overlaps`] checks one by one when the
    /// layout is not nested (the check sorts that many offsets).
    pub const EXACT_OVERLAP_ROWS: usize = 1 << 20;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_and_overlap() {
        let l = Layout::contiguous(2, 3, 4, 5);
        assert_eq!(l.span(), Some(120));
        assert!(!l.overlaps());
        let l = Layout::heads_first(2, 3, 4, 5);
        assert_eq!(l.span(), Some(120));
        assert!(!l.overlaps());
        // heads stride smaller than head_dim: two heads share elements.
        assert!(Layout::strided([1, 2, 2, 8], [64, 16, 4]).overlaps());
        // padded rows are fine.
        assert!(!Layout::strided([2, 3, 1, 8], [100, 10, 0]).overlaps());
        assert_eq!(Layout::contiguous(0, 3, 4, 5).span(), Some(0));
    }

    #[test]
    fn element_count_overflow_is_detected() {
        let l = Layout::contiguous(1 << 16, 1 << 16, 1 << 16, 1 << 16);
        assert_eq!(l.checked_numel(), None);
        assert_eq!(l.numel(), usize::MAX);
        assert_eq!(l.span(), None, "a wrapped element count must not read as an empty tensor");
        // A huge stride of a size-1 dimension moves nothing.
        let l = Layout::strided([1, 4, 2, 8], [usize::MAX, 16, 8]);
        assert_eq!(l.span(), Some(64));
        assert_eq!(l.canonical().strides(), [0, 16, 8]);
        assert!(!l.overlaps());
    }

    #[test]
    fn interleaved_layouts_are_decided_exactly() {
        // head_dim 1, seq stride 3 over 2 rows, head stride 2 over 3 heads: offsets
        // {0, 2, 4, 3, 5, 7} are distinct although the strides are not nested.
        assert!(!Layout::strided([1, 2, 3, 1], [0, 3, 2]).overlaps());
        // The same with head_dim 2 puts rows 0..2 and 2..4 next to 3..5: overlap.
        assert!(Layout::strided([1, 2, 3, 2], [0, 3, 2]).overlaps());
        // A zero stride on a dimension of size > 1 always repeats elements.
        assert!(Layout::strided([2, 3, 1, 8], [0, 8, 0]).overlaps());
    }
}
