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

    /// Number of elements the logical tensor has.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// One past the largest element offset the layout touches, or `None` on overflow.
    /// Zero for an empty tensor.
    pub fn span(&self) -> Option<usize> {
        if self.numel() == 0 {
            return Some(0);
        }
        let mut last = self.shape[3] - 1;
        for i in 0..3 {
            last = last.checked_add((self.shape[i] - 1).checked_mul(self.strides[i])?)?;
        }
        last.checked_add(1)
    }

    /// Whether two different logical elements share a memory location.
    ///
    /// Dimensions of size 1 are ignored (their stride is never used). The remaining dimensions,
    /// taken from the smallest stride up, must each step over everything the dimensions inside
    /// them cover; that is the usual sufficient test, and it accepts every permutation of a
    /// dense layout and every padded one.
    pub fn overlaps(&self) -> bool {
        let mut dims: Vec<(usize, usize)> = (0..3)
            .filter(|&i| self.shape[i] > 1)
            .map(|i| (self.strides[i], self.shape[i]))
            .collect();
        dims.sort_unstable();
        let mut covered = self.shape[3]; // head_dim is contiguous
        for (stride, size) in dims {
            if stride < covered {
                return true;
            }
            covered = stride.saturating_mul(size - 1).saturating_add(covered);
        }
        false
    }
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
}
