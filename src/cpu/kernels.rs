//! The CPU backend's SIMD layer: one run-time dispatch point ([`Isa::detect`]), one small
//! vector trait ([`Simd`]) with an implementation per instruction set, and the micro-kernels
//! written once, generically, on top of it.
//!
//! The pattern is the one `pulp` and `gemm` use: every kernel is an `#[inline(always)]`
//! generic function over `S: Simd`; an entry point per instruction set carries
//! `#[target_feature]` and instantiates the kernels with that set's `S`, so the whole call
//! tree is compiled for it and inlined into one function, while the rest of the crate stays a
//! default (baseline x86-64 / aarch64) build. [`Portable`] is plain `[f32; 8]` arithmetic that
//! the compiler vectorises for the baseline (SSE2 on x86-64, NEON on aarch64, where NEON is
//! always present); [`Avx2`] uses AVX2 + FMA + F16C intrinsics, chosen at run time.
//!
//! Where AVX-512F is present, the matrix micro-kernel (nearly all the FLOPs of prefill) runs
//! as an AVX-512 assembly kernel ([`micro_avx512`]), as do a decode item's scores and P·V
//! step when its kv heads have query heads in fours ([`scores_keys`], [`pv_narrow_rows`], in
//! `decode512`), and the rest stays on AVX2: AVX-512 intrinsics and `target_feature(enable =
//! "avx512f")` are stable only from Rust 1.89, above this crate's `rust-version`, while `asm!`
//! is not.

use crate::dtype::{DType, Element};

/// `vpxord` of zmm0-15 with themselves: the sixteen accumulators of the AVX-512 kernels
/// zeroed (a string for `asm!`).
#[cfg(target_arch = "x86_64")]
macro_rules! zero_zmm0_15 {
    () => {
        concat!(
            "vpxord zmm0, zmm0, zmm0\n", "vpxord zmm1, zmm1, zmm1\n", "vpxord zmm2, zmm2, zmm2\n",
            "vpxord zmm3, zmm3, zmm3\n", "vpxord zmm4, zmm4, zmm4\n", "vpxord zmm5, zmm5, zmm5\n",
            "vpxord zmm6, zmm6, zmm6\n", "vpxord zmm7, zmm7, zmm7\n", "vpxord zmm8, zmm8, zmm8\n",
            "vpxord zmm9, zmm9, zmm9\n", "vpxord zmm10, zmm10, zmm10\n", "vpxord zmm11, zmm11, zmm11\n",
            "vpxord zmm12, zmm12, zmm12\n", "vpxord zmm13, zmm13, zmm13\n", "vpxord zmm14, zmm14, zmm14\n",
            "vpxord zmm15, zmm15, zmm15",
        )
    };
}

#[cfg(target_arch = "x86_64")]
mod decode512;

/// Tests only: how many times this thread has called the AVX-512 decode kernels.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn decode512_calls() -> usize {
    decode512::tests::CALLS.with(|c| c.get())
}

/// The instruction set the kernels run with, detected once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// [`Isa::Avx2`] plus AVX-512F for the matrix micro-kernel and the decode kernels (x86-64,
    /// detected at run time).
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2 + FMA + F16C (x86-64, detected at run time).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The baseline of the build target, through the compiler's vectoriser (SSE2 on x86-64,
    /// NEON on aarch64).
    Portable,
}

impl Isa {
    /// The best instruction set this CPU runs (the one dispatch point of the CPU backend).
    pub(crate) fn detect() -> Isa {
        #[cfg(test)]
        if let Some(isa) = FORCED.with(|f| f.get()) {
            return isa;
        }
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let isa = Isa::best();
            log::debug!("attention: the CPU backend runs its {} kernels", isa.name());
            isa
        })
    }

    /// A short name (`"avx512"`, `"avx2"`, `"portable"`), as `attention::testing::cpu_isa`
    /// reports it.
    pub(crate) fn short_name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// What [`Isa::detect`] returns, found afresh.
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            // `is_x86_feature_detected` also checks that the OS saves the zmm state.
            return if is_x86_feature_detected!("avx512f") { Isa::Avx512 } else { Isa::Avx2 };
        }
        Isa::Portable
    }

    /// Name for logs and benchmark reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512f (matrix and decode kernels) + avx2+fma+f16c",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2+fma+f16c",
            #[cfg(target_arch = "aarch64")]
            Isa::Portable => "portable (neon)",
            #[cfg(not(target_arch = "aarch64"))]
            Isa::Portable => "portable",
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests only: the instruction set calls from this thread use instead of the detected one.
    static FORCED: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// Tests only: runs `f` with calls made from this thread on `isa` (work items take the set
/// their call chose, whichever thread runs them).
#[cfg(test)]
pub(crate) fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    let before = FORCED.with(|c| c.replace(Some(isa)));
    let r = f();
    FORCED.with(|c| c.set(before));
    r
}

/// Lanes of one [`Simd::V`]: every implementation has eight, so scratch layouts (panels of 8
/// or 16 queries) do not depend on the instruction set.
pub(crate) const LANES: usize = 8;

/// Eight f32 lanes and the operations the kernels need. All methods are `unsafe` because an
/// implementation may only be called where its instruction set is enabled (see [`Isa`]);
/// pointer arguments must be valid for [`LANES`] elements.
pub(crate) trait Simd: Copy {
    /// Eight f32 values.
    type V: Copy;
    /// Eight lane masks (all ones / all zeros per lane).
    type M: Copy;

    /// All lanes zero.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Eight values from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// Eight values to `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c` (fused where the instruction set has it).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a · b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// The larger of `a` and `b`; `b` where either is NaN (NaN is tracked separately).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `a < b` (false where either is NaN).
    unsafe fn lt(a: Self::V, b: Self::V) -> Self::M;
    /// `a >= b` (false where either is NaN).
    unsafe fn ge(a: Self::V, b: Self::V) -> Self::M;
    /// `a == b` (false where either is NaN).
    unsafe fn eq(a: Self::V, b: Self::V) -> Self::M;
    /// Lanes that are NaN.
    unsafe fn is_nan(a: Self::V) -> Self::M;
    /// Lane-wise `a & b`.
    unsafe fn and(a: Self::M, b: Self::M) -> Self::M;
    /// Lane-wise `a | b`.
    unsafe fn or(a: Self::M, b: Self::M) -> Self::M;
    /// `m ? a : b` per lane.
    unsafe fn select(m: Self::M, a: Self::V, b: Self::V) -> Self::V;
    /// Whether any lane of `m` is set.
    unsafe fn any(m: Self::M) -> bool;
    /// The sum of the lanes, in a fixed order.
    unsafe fn reduce_add(a: Self::V) -> f32;
    /// `e^x` per lane, within 2 ulp; `e^-inf = 0`, NaN stays NaN, `x < -87.3` gives 0.
    unsafe fn exp(x: Self::V) -> Self::V;
    /// Widens eight bf16 (raw bits) at `p`.
    unsafe fn widen_bf16(p: *const u16) -> Self::V;
    /// Widens eight f16 (raw bits) at `p`.
    unsafe fn widen_f16(p: *const u16) -> Self::V;
}

// Constants of the exp approximation (Cephes `expf`): e^x = 2^n · e^r, n = round(x·log2 e),
// r = x − n·ln 2 in two parts for accuracy, e^r by a degree-6 polynomial on |r| ≤ ln2/2.
/// Below this, e^x is under `f32::MIN_POSITIVE`: flushed to 0.
const EXP_LO: f32 = -87.336_55;
/// Above this, e^x overflows f32 (inputs are clamped here; softmax never gets there).
const EXP_HI: f32 = 88.376_26;
/// log2(e).
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2, high part: exact in few bits, so `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
/// ln 2 − `LN2_HI`.
const LN2_LO: f32 = -2.121_944_4e-4;
/// Polynomial for (e^r − 1 − r) / r², highest power first.
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// Plain `[f32; 8]` arithmetic, vectorised by the compiler for the build's baseline.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

/// Applies `f` lane-wise.
#[inline(always)]
fn lanes<T: Copy, U: Copy + Default>(a: [T; LANES], f: impl Fn(T) -> U) -> [U; LANES] {
    let mut out = [U::default(); LANES];
    for i in 0..LANES {
        out[i] = f(a[i]);
    }
    out
}

/// Applies `f` lane-wise to two vectors.
#[inline(always)]
fn lanes2<T: Copy, U: Copy + Default>(a: [T; LANES], b: [T; LANES], f: impl Fn(T, T) -> U) -> [U; LANES] {
    let mut out = [U::default(); LANES];
    for i in 0..LANES {
        out[i] = f(a[i], b[i]);
    }
    out
}

/// One lane of [`Simd::exp`], branch-free so the portable path vectorises.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    // `<` is false for NaN, so NaN passes the clamps and the polynomial unchanged.
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let xc = if xc > EXP_HI { EXP_HI } else { xc };
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    // n is within [-126, 128]: 2^n is a normal f32 but for n = 128, which only x > 88.37
    // reaches; the clamp keeps n ≤ 127 + rounding, and e < 1 there.
    let scale = f32::from_bits(((n as i32 + 127).clamp(0, 254) as u32) << 23);
    if x < EXP_LO {
        0.0
    } else {
        e * scale
    }
}

impl Simd for Portable {
    type V = [f32; LANES];
    type M = [bool; LANES];

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; LANES]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; LANES]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        // SAFETY: the caller guarantees `p` is valid for LANES reads.
        unsafe { p.cast::<[f32; LANES]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees `p` is valid for LANES writes.
        unsafe { p.cast::<[f32; LANES]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // Not `mul_add`: without hardware FMA in the baseline it is a slow library call.
        let ab = lanes2(a, b, |x, y| x * y);
        lanes2(ab, c, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        lanes2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        lanes2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        lanes2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        lanes2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    unsafe fn lt(a: Self::V, b: Self::V) -> Self::M {
        lanes2(a, b, |x, y| x < y)
    }
    #[inline(always)]
    unsafe fn ge(a: Self::V, b: Self::V) -> Self::M {
        lanes2(a, b, |x, y| x >= y)
    }
    #[inline(always)]
    unsafe fn eq(a: Self::V, b: Self::V) -> Self::M {
        lanes2(a, b, |x, y| x == y)
    }
    #[inline(always)]
    unsafe fn is_nan(a: Self::V) -> Self::M {
        lanes(a, f32::is_nan)
    }
    #[inline(always)]
    unsafe fn and(a: Self::M, b: Self::M) -> Self::M {
        lanes2(a, b, |x, y| x & y)
    }
    #[inline(always)]
    unsafe fn or(a: Self::M, b: Self::M) -> Self::M {
        lanes2(a, b, |x, y| x | y)
    }
    #[inline(always)]
    unsafe fn select(m: Self::M, a: Self::V, b: Self::V) -> Self::V {
        let mut out = b;
        for i in 0..LANES {
            if m[i] {
                out[i] = a[i];
            }
        }
        out
    }
    #[inline(always)]
    unsafe fn any(m: Self::M) -> bool {
        m.iter().fold(false, |x, &y| x | y)
    }
    #[inline(always)]
    unsafe fn reduce_add(a: Self::V) -> f32 {
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        lanes(x, exp_lane)
    }
    #[inline(always)]
    unsafe fn widen_bf16(p: *const u16) -> Self::V {
        // SAFETY: the caller guarantees `p` is valid for LANES reads.
        let bits = unsafe { p.cast::<[u16; LANES]>().read_unaligned() };
        lanes(bits, |b| f32::from_bits((b as u32) << 16))
    }
    #[inline(always)]
    unsafe fn widen_f16(p: *const u16) -> Self::V {
        // SAFETY: the caller guarantees `p` is valid for LANES reads.
        let bits = unsafe { p.cast::<[u16; LANES]>().read_unaligned() };
        lanes(bits, |b| half::f16::from_bits(b).to_f32())
    }
}

/// AVX2 + FMA + F16C. Only ever instantiated inside functions that enable those features,
/// after [`Isa::detect`] found them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

/// The [`Simd`] implementation of [`Avx2`].
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    // SAFETY (for every method): `Avx2` is used only from `#[target_feature(enable =
    // "avx2,fma,f16c")]` functions that run after `Isa::detect` saw all three features, so
    // every intrinsic here is supported by the CPU; pointer validity is the caller's contract
    // as documented on `Simd`.
    impl Simd for Avx2 {
        type V = __m256;
        type M = __m256;

        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            // vmaxps returns its second operand when either is NaN, as documented on the trait.
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn lt(a: __m256, b: __m256) -> __m256 {
            _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)
        }
        #[inline(always)]
        unsafe fn ge(a: __m256, b: __m256) -> __m256 {
            _mm256_cmp_ps::<_CMP_GE_OQ>(a, b)
        }
        #[inline(always)]
        unsafe fn eq(a: __m256, b: __m256) -> __m256 {
            _mm256_cmp_ps::<_CMP_EQ_OQ>(a, b)
        }
        #[inline(always)]
        unsafe fn is_nan(a: __m256) -> __m256 {
            _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a)
        }
        #[inline(always)]
        unsafe fn and(a: __m256, b: __m256) -> __m256 {
            _mm256_and_ps(a, b)
        }
        #[inline(always)]
        unsafe fn or(a: __m256, b: __m256) -> __m256 {
            _mm256_or_ps(a, b)
        }
        #[inline(always)]
        unsafe fn select(m: __m256, a: __m256, b: __m256) -> __m256 {
            _mm256_blendv_ps(b, a, m)
        }
        #[inline(always)]
        unsafe fn any(m: __m256) -> bool {
            _mm256_movemask_ps(m) != 0
        }
        #[inline(always)]
        unsafe fn reduce_add(a: __m256) -> f32 {
            // ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)), as the portable path.
            let x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let y = _mm_add_ps(x, _mm_movehl_ps(x, x));
            _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps::<1>(y, y)))
        }
        #[inline(always)]
        unsafe fn exp(x: __m256) -> __m256 {
            // As `exp_lane`. max/min take the constant first so a NaN `x` (second operand)
            // is what they return.
            let xc = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
            let xc = _mm256_min_ps(_mm256_set1_ps(EXP_HI), xc);
            let n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5)));
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(EXP_P[0]);
            for &c in &EXP_P[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
            let ni = _mm256_cvtps_epi32(n);
            let ni = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), _mm256_setzero_si256()), _mm256_set1_epi32(254));
            let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(ni));
            let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
            _mm256_andnot_ps(under, _mm256_mul_ps(e, scale))
        }
        #[inline(always)]
        unsafe fn widen_bf16(p: *const u16) -> __m256 {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
        #[inline(always)]
        unsafe fn widen_f16(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
    }
}

/// Asks the CPU to start loading `row` into cache (a hint: no effect on results, no fault).
///
/// K/V rows of one kv head are usually strided (`[seq, kv_heads, d]` caches put the other heads'
/// rows in between), which the hardware prefetchers follow poorly: without this, decode waits
/// on one cache miss after another instead of streaming at memory bandwidth.
///
/// Into L2, not L1 (`T1`): an L1 prefetch holds one of the few L1 miss buffers until its line
/// arrives, which caps the misses in flight far below what streaming needs; L2 tracks many
/// more. Measured on Zen 4, one thread, bf16 decode over 4k–32k keys: seq-major caches
/// 3.6 → 6.9 GiB/s, heads-first 7.5 → 8.5 GiB/s (L2 and L3 hints are the same there; a
/// non-temporal hint is no better than L1).
#[inline(always)]
pub(crate) fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let bytes = std::mem::size_of_val(row);
        let p = row.as_ptr().cast::<i8>();
        for line in (0..bytes).step_by(64) {
            // SAFETY: SSE is in the x86-64 baseline; the address is inside `row` (a prefetch
            // would not fault even outside it).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Widens `n` elements at `src` into `dst`, eight at a time.
///
/// # Safety
/// `src` and `dst` valid for `n` elements; `S`'s instruction set enabled.
#[inline(always)]
pub(crate) unsafe fn widen<S: Simd, T: Element>(dst: *mut f32, src: *const T, n: usize) {
    let mut i = 0;
    // SAFETY: `i + LANES <= n` in the loop, so every access is within the caller's `n`.
    unsafe {
        while i + LANES <= n {
            let v = load_widen::<S, T>(src.add(i));
            S::store(dst.add(i), v);
            i += LANES;
        }
        while i < n {
            *dst.add(i) = (*src.add(i)).to_f32();
            i += 1;
        }
    }
}

/// As [`widen`], and says whether all `n` values are finite (no NaN, no infinity).
///
/// # Safety
/// As [`widen`].
#[inline(always)]
pub(crate) unsafe fn widen_finite<S: Simd, T: Element>(dst: *mut f32, src: *const T, n: usize) -> bool {
    let mut i = 0;
    // SAFETY: `i + LANES <= n` in the loop, so every access is within the caller's `n`.
    unsafe {
        // x - x is 0 for finite x and NaN for NaN and ±inf.
        let mut bad = S::is_nan(S::zero());
        while i + LANES <= n {
            let v = load_widen::<S, T>(src.add(i));
            S::store(dst.add(i), v);
            bad = S::or(bad, S::is_nan(S::sub(v, v)));
            i += LANES;
        }
        let mut finite = !S::any(bad);
        while i < n {
            let x = (*src.add(i)).to_f32();
            *dst.add(i) = x;
            finite &= x.is_finite();
            i += 1;
        }
        finite
    }
}

/// The register-blocked micro-kernel: `C[MR × 8·NV] (+)= A[MR × kc] · B[kc × 8·NV]`.
///
/// A is read by broadcast, element `(i, p)` at `a + i·a_rs + p·a_cs` (so it may be stored
/// either way round); B row `p` is `8·NV` contiguous values at `b + p·ldb`; C row `i` at
/// `c + i·ldc`. The `MR × NV` accumulators stay in registers for the whole `kc` loop, and
/// every term is added in order of `p`, so the result never depends on who calls.
///
/// # Safety
/// Every addressed element valid; `S`'s instruction set enabled.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: all addresses are within the operands the caller vouches for.
    unsafe {
        let mut acc = [[S::zero(); NV]; MR];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = S::load(c.add(i * ldc + v * LANES));
                }
            }
        }
        for p in 0..kc {
            let bp = b.add(p * ldb);
            let mut bv = [S::zero(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = S::load(bp.add(v * LANES));
            }
            let ap = a.add(p * a_cs);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = S::splat(*ap.add(i * a_rs));
                for (x, &bx) in row.iter_mut().zip(&bv) {
                    *x = S::fma(ai, bx, *x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                S::store(c.add(i * ldc + v * LANES), x);
            }
        }
    }
}

/// Rows of the main micro-kernel: 6 × 16 uses 12 of AVX2's 16 registers for accumulators,
/// two for B and one for the broadcast A.
pub(crate) const MR: usize = 6;

/// `C[m × 8·NV] (+)= A[m × kc] · B[kc × 8·NV]` for any `m`, in [`MR`]-row micro-kernel calls
/// (addressing as in [`micro`]).
///
/// # Safety
/// As [`micro`], for all `m` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows<S: Simd, const NV: usize>(
    m: usize,
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut i = 0;
    // SAFETY: rows `i .. i + rows` are within the caller's `m`.
    unsafe {
        while i + MR <= m {
            micro::<S, MR, NV>(kc, a.add(i * a_rs), a_rs, a_cs, b, ldb, c.add(i * ldc), ldc, accumulate);
            i += MR;
        }
        let (a, c) = (a.add(i * a_rs), c.add(i * ldc));
        match m - i {
            0 => {}
            1 => micro::<S, 1, NV>(kc, a, a_rs, a_cs, b, ldb, c, ldc, accumulate),
            2 => micro::<S, 2, NV>(kc, a, a_rs, a_cs, b, ldb, c, ldc, accumulate),
            3 => micro::<S, 3, NV>(kc, a, a_rs, a_cs, b, ldb, c, ldc, accumulate),
            4 => micro::<S, 4, NV>(kc, a, a_rs, a_cs, b, ldb, c, ldc, accumulate),
            _ => micro::<S, 5, NV>(kc, a, a_rs, a_cs, b, ldb, c, ldc, accumulate),
        }
    }
}

/// Eight elements of `T` at `p`, widened to f32.
///
/// # Safety
/// `p` valid for [`LANES`] elements; `S`'s instruction set enabled.
#[inline(always)]
unsafe fn load_widen<S: Simd, T: Element>(p: *const T) -> S::V {
    // SAFETY: the caller's contract.
    unsafe {
        match T::DTYPE {
            DType::F32 => S::load(p.cast()),
            DType::BF16 => S::widen_bf16(p.cast()),
            DType::F16 => S::widen_f16(p.cast()),
        }
    }
}

/// [`scores_narrow`] for `rows` (1 to 8) query rows: the dispatch to its per-count
/// instantiation, so the query accumulators stay in registers.
///
/// # Safety
/// As [`scores_narrow`] with `N = rows`.
#[inline(always)]
pub(crate) unsafe fn scores_narrow_rows<S: Simd, T: Element>(rows: usize, d: usize, k: *const T, q: *const f32, s: *mut f32) {
    // SAFETY: the caller's contract, for the matching `N`.
    unsafe {
        match rows {
            1 => scores_narrow::<S, T, 1>(d, k, q, s),
            2 => scores_narrow::<S, T, 2>(d, k, q, s),
            3 => scores_narrow::<S, T, 3>(d, k, q, s),
            4 => scores_narrow::<S, T, 4>(d, k, q, s),
            5 => scores_narrow::<S, T, 5>(d, k, q, s),
            6 => scores_narrow::<S, T, 6>(d, k, q, s),
            7 => scores_narrow::<S, T, 7>(d, k, q, s),
            _ => scores_narrow::<S, T, 8>(d, k, q, s),
        }
    }
}

/// Whether the AVX-512 decode kernels serve a narrow item of `rows` query rows: `WIDE` (AVX-512F
/// present) and the rows in fours. [`scores_keys`] and [`pv_narrow_rows`] both take them then.
#[inline(always)]
fn decode512_serves<const WIDE: bool>(rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return WIDE && rows % decode512::ROWS == 0;
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = rows;
        false
    }
}

/// How many keys [`scores_keys`] takes at once for `rows` query rows: four where the AVX-512
/// kernel serves them (so its callers should hand it keys in fours), else one.
#[inline(always)]
pub(crate) fn score_keys<const WIDE: bool>(rows: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if decode512_serves::<WIDE>(rows) {
        return decode512::KEYS;
    }
    1
}

/// `s[j·ps + r] = k_j · q_r` for the key rows `k` of a narrow item's tile (`d` elements of `T`
/// each) and its `rows` (1 to 8) queries (f32 rows of `q`, `d` apart): on the AVX-512 kernel,
/// four keys × four queries at a time, when `WIDE` and the rows come in fours (GQA groups of
/// 4 or 8); else key by key ([`scores_narrow_rows`]).
///
/// # Safety
/// Every `k[j]` valid for `d` elements, `q` for `rows·d` values, `s` for `k.len()` rows of
/// `ps >= rows` values; `S`'s instruction set enabled, and AVX-512F if `WIDE`.
#[inline(always)]
pub(crate) unsafe fn scores_keys<S: Simd, T: Element, const WIDE: bool>(rows: usize, d: usize, k: &[*const T], q: *const f32, s: *mut f32, ps: usize) {
    #[cfg(target_arch = "x86_64")]
    if decode512_serves::<WIDE>(rows) {
        // SAFETY: the caller's contract, which is the kernel's.
        return unsafe { decode512::scores::<T>(rows, d, k, q, s, ps) };
    }
    for (j, &row) in k.iter().enumerate() {
        // SAFETY: row `j < k.len()` of `s`; the rest is the caller's contract.
        unsafe { scores_narrow_rows::<S, T>(rows, d, row, q, s.add(j * ps)) };
    }
}

/// `acc_i = alpha_i · acc_i + Σ_j p[j·ps + i] · v_j` for the `rows` (1 to 8) accumulator rows
/// of a narrow item (`d` values each, `ldc` apart) and the value rows `v` (`d` elements of `T`
/// each, read where they lie and widened in registers): the rescale and P·V step of a decode
/// tile in one pass, without first copying the values into a widened tile. Every term is added
/// in order of `j` with fused multiply-adds after the rescale, as [`gemm_block`] does.
///
/// Only for tiles where every row sees every key of `v`: a weight of 0 then only ever meets a
/// value row the row sees anyway, so no masked key's NaN or infinity can leak in (the caller
/// takes the masked path otherwise). On the AVX-512 kernel when `WIDE` and the rows come in
/// fours (the same bits: the same FMAs in the same order).
///
/// # Safety
/// Every `v[j]` valid for `d` elements, `p` for `v.len()` rows of `ps >= rows` values, `alpha`
/// for `rows`, `acc` for `rows` rows of `d` values `ldc` apart; `S`'s instruction set enabled,
/// and AVX-512F if `WIDE`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv_narrow_rows<S: Simd, T: Element, const WIDE: bool>(
    rows: usize,
    v: &[*const T],
    p: *const f32,
    ps: usize,
    alpha: *const f32,
    acc: *mut f32,
    ldc: usize,
    d: usize,
) {
    // Panels as wide as the registers allow: `rows · NV` accumulators, `NV` value vectors and a
    // broadcast within AVX2's sixteen, with room to spare (at sixteen exactly, the compiler
    // spills an accumulator, and every key then waits on a store and a reload).
    #[cfg(target_arch = "x86_64")]
    if decode512_serves::<WIDE>(rows) {
        // SAFETY: the caller's contract, which is the kernel's.
        return unsafe { decode512::pv::<T>(rows, v, p, ps, alpha, acc, ldc, d) };
    }
    // SAFETY: the caller's contract, for the matching `N`.
    unsafe {
        match rows {
            1 => pv_narrow::<S, T, 1, 4>(v, p, ps, alpha, acc, ldc, d),
            2 => pv_narrow::<S, T, 2, 4>(v, p, ps, alpha, acc, ldc, d),
            3 => pv_narrow::<S, T, 3, 2>(v, p, ps, alpha, acc, ldc, d),
            4 => pv_narrow::<S, T, 4, 2>(v, p, ps, alpha, acc, ldc, d),
            5 => pv_narrow::<S, T, 5, 2>(v, p, ps, alpha, acc, ldc, d),
            6 => pv_narrow::<S, T, 6, 2>(v, p, ps, alpha, acc, ldc, d),
            7 => pv_narrow::<S, T, 7, 1>(v, p, ps, alpha, acc, ldc, d),
            _ => pv_narrow::<S, T, 8, 1>(v, p, ps, alpha, acc, ldc, d),
        }
    }
}

/// [`pv_narrow_rows`] for `N` rows, in column panels of `NV` vectors, then single vectors,
/// then scalar columns.
///
/// # Safety
/// As [`pv_narrow_rows`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_narrow<S: Simd, T: Element, const N: usize, const NV: usize>(
    v: &[*const T],
    p: *const f32,
    ps: usize,
    alpha: *const f32,
    acc: *mut f32,
    ldc: usize,
    d: usize,
) {
    let mut col = 0;
    // SAFETY: every access is below `d` in a value row and in an accumulator row, below
    // `v.len()` rows of `p`, below `N` in `alpha`.
    unsafe {
        while col + NV * LANES <= d {
            pv_panel::<S, T, N, NV>(v, p, ps, alpha, acc, ldc, col);
            col += NV * LANES;
        }
        while col + LANES <= d {
            pv_panel::<S, T, N, 1>(v, p, ps, alpha, acc, ldc, col);
            col += LANES;
        }
        for i in 0..N {
            for c in col..d {
                let x = acc.add(i * ldc + c);
                let mut sum = *x * *alpha.add(i);
                for (j, &row) in v.iter().enumerate() {
                    sum += *p.add(j * ps + i) * (*row.add(c)).to_f32();
                }
                *x = sum;
            }
        }
    }
}

/// One panel of [`pv_narrow`]: columns `col .. col + NV·LANES`, whose `N × NV` accumulators
/// stay in registers over all the value rows.
///
/// # Safety
/// As [`pv_narrow_rows`], with `col + NV·LANES <= d`.
#[inline(always)]
unsafe fn pv_panel<S: Simd, T: Element, const N: usize, const NV: usize>(
    v: &[*const T],
    p: *const f32,
    ps: usize,
    alpha: *const f32,
    acc: *mut f32,
    ldc: usize,
    col: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut c = [[S::zero(); NV]; N];
        for (i, row) in c.iter_mut().enumerate() {
            let a = S::splat(*alpha.add(i));
            for (k, x) in row.iter_mut().enumerate() {
                *x = S::mul(S::load(acc.add(i * ldc + col + k * LANES)), a);
            }
        }
        for (j, &vrow) in v.iter().enumerate() {
            let mut bv = [S::zero(); NV];
            for (k, x) in bv.iter_mut().enumerate() {
                *x = load_widen::<S, T>(vrow.add(col + k * LANES));
            }
            let pj = p.add(j * ps);
            for (i, row) in c.iter_mut().enumerate() {
                let pi = S::splat(*pj.add(i));
                for (x, &b) in row.iter_mut().zip(&bv) {
                    *x = S::fma(pi, b, *x);
                }
            }
        }
        for (i, row) in c.iter().enumerate() {
            for (k, &x) in row.iter().enumerate() {
                S::store(acc.add(i * ldc + col + k * LANES), x);
            }
        }
    }
}

/// `s[i] = k · q_i` for one key row `k` (`d` elements of `T`, widened in registers) and `N`
/// queries (f32 rows of `q`, `d` apart), as dot products: for work items of at most eight
/// query rows (decode), where the panel form would broadcast every key element for a single
/// FMA. Each vector of the key row is loaded and widened once and used by all `N` queries.
///
/// # Safety
/// `k` valid for `d`, `q` for `N·d`, `s` for `N` values; `S`'s instruction set enabled.
#[inline(always)]
unsafe fn scores_narrow<S: Simd, T: Element, const N: usize>(d: usize, k: *const T, q: *const f32, s: *mut f32) {
    let body = d / LANES * LANES;
    // SAFETY: every access is below `d` in `k`, `N·d` in `q`, `N` in `s`.
    unsafe {
        let mut acc = [S::zero(); N];
        let mut c = 0;
        while c < body {
            let kv = load_widen::<S, T>(k.add(c));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = S::fma(S::load(q.add(i * d + c)), kv, *a);
            }
            c += LANES;
        }
        for (i, a) in acc.iter().enumerate() {
            let mut dot = S::reduce_add(*a);
            for e in body..d {
                dot += *q.add(i * d + e) * (*k.add(e)).to_f32();
            }
            *s.add(i) = dot;
        }
    }
}

/// Rows of the AVX-512 micro-kernel.
#[cfg(target_arch = "x86_64")]
pub(crate) const MR_512: usize = 8;

/// The AVX-512 micro-kernel: `C[8 × 32] (+)= A[8 × kc] · B[kc × 32]`, addressing as in
/// [`micro`] (strides in elements). Sixteen zmm accumulators stay in registers for the whole
/// `kc` loop; per step, two B loads and eight A broadcasts feed sixteen FMAs. Terms are added
/// in order of `p`, with fused multiply-adds, as in [`micro`] on AVX2.
///
/// Written in assembly because AVX-512 intrinsics and `target_feature(enable = "avx512f")`
/// are stable only from Rust 1.89, above this crate's `rust-version`; the assembler takes the
/// instructions regardless.
///
/// # Safety
/// The CPU supports AVX-512F (as [`Isa::detect`] checks). Every addressed element is valid:
/// A rows `0..8` × steps `0..kc`, B rows `0..kc` × 32 values, C rows `0..8` × 32 values.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn micro_avx512(
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    const F: usize = std::mem::size_of::<f32>();
    // SAFETY: the caller guarantees AVX-512F and the extent of every operand. The block uses
    // zmm0-25 and the named general registers only. xmm0-15 are declared clobbered (the
    // compiler cannot name zmm registers without the avx512f feature); being a non-inlined
    // function, every caller also treats all vector registers, zmm16-31 and the upper halves
    // included, as clobbered by the call, as the C and Rust ABIs say.
    // `vzeroupper` at the end leaves the upper halves clean for the SSE/AVX code around it.
    unsafe {
        std::arch::asm!(
            "test {acc}, {acc}",
            "jz 2f",
            "mov {t}, {c}",
            "vmovups zmm0, [{t}]",
            "vmovups zmm1, [{t} + 64]",
            "add {t}, {ldc}",
            "vmovups zmm2, [{t}]",
            "vmovups zmm3, [{t} + 64]",
            "add {t}, {ldc}",
            "vmovups zmm4, [{t}]",
            "vmovups zmm5, [{t} + 64]",
            "add {t}, {ldc}",
            "vmovups zmm6, [{t}]",
            "vmovups zmm7, [{t} + 64]",
            "add {t}, {ldc}",
            "vmovups zmm8, [{t}]",
            "vmovups zmm9, [{t} + 64]",
            "add {t}, {ldc}",
            "vmovups zmm10, [{t}]",
            "vmovups zmm11, [{t} + 64]",
            "add {t}, {ldc}",
            "vmovups zmm12, [{t}]",
            "vmovups zmm13, [{t} + 64]",
            "add {t}, {ldc}",
            "vmovups zmm14, [{t}]",
            "vmovups zmm15, [{t} + 64]",
            "add {t}, {ldc}",
            "jmp 3f",
            "2:",
            zero_zmm0_15!(),
            "3:",
            "test {kc}, {kc}",
            "jz 5f",
            "4:",
            "vmovups zmm16, [{b}]",
            "vmovups zmm17, [{b} + 64]",
            "vbroadcastss zmm18, dword ptr [{a0}]",
            "vbroadcastss zmm19, dword ptr [{a0} + {rs}]",
            "vbroadcastss zmm20, dword ptr [{a0} + {rs}*2]",
            "vbroadcastss zmm21, dword ptr [{a0} + {rs3}]",
            "vbroadcastss zmm22, dword ptr [{a4}]",
            "vbroadcastss zmm23, dword ptr [{a4} + {rs}]",
            "vbroadcastss zmm24, dword ptr [{a4} + {rs}*2]",
            "vbroadcastss zmm25, dword ptr [{a4} + {rs3}]",
            "vfmadd231ps zmm0, zmm18, zmm16",
            "vfmadd231ps zmm1, zmm18, zmm17",
            "vfmadd231ps zmm2, zmm19, zmm16",
            "vfmadd231ps zmm3, zmm19, zmm17",
            "vfmadd231ps zmm4, zmm20, zmm16",
            "vfmadd231ps zmm5, zmm20, zmm17",
            "vfmadd231ps zmm6, zmm21, zmm16",
            "vfmadd231ps zmm7, zmm21, zmm17",
            "vfmadd231ps zmm8, zmm22, zmm16",
            "vfmadd231ps zmm9, zmm22, zmm17",
            "vfmadd231ps zmm10, zmm23, zmm16",
            "vfmadd231ps zmm11, zmm23, zmm17",
            "vfmadd231ps zmm12, zmm24, zmm16",
            "vfmadd231ps zmm13, zmm24, zmm17",
            "vfmadd231ps zmm14, zmm25, zmm16",
            "vfmadd231ps zmm15, zmm25, zmm17",
            "add {a0}, {cs}",
            "add {a4}, {cs}",
            "add {b}, {ldb}",
            "dec {kc}",
            "jnz 4b",
            "5:",
            "mov {t}, {c}",
            "vmovups [{t}], zmm0",
            "vmovups [{t} + 64], zmm1",
            "add {t}, {ldc}",
            "vmovups [{t}], zmm2",
            "vmovups [{t} + 64], zmm3",
            "add {t}, {ldc}",
            "vmovups [{t}], zmm4",
            "vmovups [{t} + 64], zmm5",
            "add {t}, {ldc}",
            "vmovups [{t}], zmm6",
            "vmovups [{t} + 64], zmm7",
            "add {t}, {ldc}",
            "vmovups [{t}], zmm8",
            "vmovups [{t} + 64], zmm9",
            "add {t}, {ldc}",
            "vmovups [{t}], zmm10",
            "vmovups [{t} + 64], zmm11",
            "add {t}, {ldc}",
            "vmovups [{t}], zmm12",
            "vmovups [{t} + 64], zmm13",
            "add {t}, {ldc}",
            "vmovups [{t}], zmm14",
            "vmovups [{t} + 64], zmm15",
            "add {t}, {ldc}",
            "vzeroupper",
            acc = in(reg) accumulate as usize,
            kc = inout(reg) kc => _,
            a0 = inout(reg) a => _,
            a4 = inout(reg) a.wrapping_add(4 * a_rs) => _,
            rs = in(reg) a_rs * F,
            rs3 = in(reg) 3 * a_rs * F,
            cs = in(reg) a_cs * F,
            b = inout(reg) b => _,
            ldb = in(reg) ldb * F,
            c = in(reg) c,
            ldc = in(reg) ldc * F,
            t = out(reg) _,
            out("xmm0") _,
            out("xmm1") _,
            out("xmm2") _,
            out("xmm3") _,
            out("xmm4") _,
            out("xmm5") _,
            out("xmm6") _,
            out("xmm7") _,
            out("xmm8") _,
            out("xmm9") _,
            out("xmm10") _,
            out("xmm11") _,
            out("xmm12") _,
            out("xmm13") _,
            out("xmm14") _,
            out("xmm15") _,
            options(nostack),
        );
    }
}

/// `C[m × width] (+)= A[m × kc] · B[kc × width]` (addressing as in [`micro`]; `width` a
/// multiple of [`LANES`]), in panels of 32 columns on the AVX-512 kernel when `WIDE`, then
/// 16 and 8 on `S`'s kernels.
///
/// # Safety
/// As [`micro`], for all `m` rows and `width` columns; with `WIDE`, the CPU has AVX-512F.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_block<S: Simd, const WIDE: bool>(
    m: usize,
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    width: usize,
) {
    debug_assert_eq!(width % LANES, 0);
    let mut col = 0;
    // SAFETY: every call covers rows `< m` and columns `col .. col + panel <= width`.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if WIDE {
            while col + 4 * LANES <= width {
                let (b, c) = (b.add(col), c.add(col));
                let mut i = 0;
                while i + MR_512 <= m {
                    micro_avx512(kc, a.add(i * a_rs), a_rs, a_cs, b, ldb, c.add(i * ldc), ldc, accumulate);
                    i += MR_512;
                }
                if i < m {
                    let (a, c) = (a.add(i * a_rs), c.add(i * ldc));
                    gemm_rows::<S, 2>(m - i, kc, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
                    gemm_rows::<S, 2>(m - i, kc, a, a_rs, a_cs, b.add(2 * LANES), ldb, c.add(2 * LANES), ldc, accumulate);
                }
                col += 4 * LANES;
            }
        }
        while col + 2 * LANES <= width {
            gemm_rows::<S, 2>(m, kc, a, a_rs, a_cs, b.add(col), ldb, c.add(col), ldc, accumulate);
            col += 2 * LANES;
        }
        if col < width {
            gemm_rows::<S, 1>(m, kc, a, a_rs, a_cs, b.add(col), ldb, c.add(col), ldc, accumulate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector exp against f64, over the range softmax uses and its edges, on every
    /// instruction set this machine has.
    #[test]
    fn exp_is_accurate_and_handles_edges() {
        let check = |f: &dyn Fn(f32) -> f32, isa: &str| {
            let mut x = -90.0f32;
            while x <= 1.0 {
                let got = f(x) as f64;
                let want = (x as f64).exp();
                if want >= f32::MIN_POSITIVE as f64 {
                    assert!(((got - want) / want).abs() < 3e-7, "{isa}: exp({x}) = {got}, want {want}");
                } else {
                    assert!(got <= f32::MIN_POSITIVE as f64 * 1.01, "{isa}: exp({x}) = {got}");
                }
                x += 0.0137;
            }
            assert_eq!(f(0.0), 1.0, "{isa}");
            assert_eq!(f(f32::NEG_INFINITY), 0.0, "{isa}");
            assert_eq!(f(-1e30), 0.0, "{isa}");
            assert!(f(f32::NAN).is_nan(), "{isa}");
            assert!(f(-f32::NAN).is_nan(), "{isa}");
        };
        // SAFETY: the portable set is always available.
        check(&|x| unsafe { Portable::exp([x; LANES]) }[3], "portable");
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() == Isa::Avx2 {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn one(x: f32) -> f32 {
                let mut out = [0.0f32; LANES];
                // SAFETY: `out` holds LANES values; AVX2 is enabled here.
                unsafe { Avx2::store(out.as_mut_ptr(), Avx2::exp(Avx2::splat(x))) };
                out[5]
            }
            // SAFETY: detect() found AVX2, FMA and F16C.
            check(&|x| unsafe { one(x) }, "avx2");
        }
    }
}
