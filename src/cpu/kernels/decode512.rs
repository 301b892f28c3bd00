//! The AVX-512 kernels of decode items (at most eight query rows per kv head, every row seeing
//! every key of the tile): the per-key scores `q·k` and the `acc += P·V` step, for query rows
//! in groups of four (a GQA group of four, or two of eight), in assembly like
//! [`super::micro_avx512`] and for the same reason (AVX-512 intrinsics are stable only from
//! Rust 1.89).
//!
//! Why they exist: a decode step reads each K/V row once and does 4 multiply-adds per element
//! (one per query of the group), so on AVX2 it is bound by instructions, not memory: per key a
//! chain of dependent FMAs per query, a horizontal sum per score, and the value rows widened
//! 8 lanes at a time. Here four keys × four queries are sixteen independent zmm accumulators,
//! each loaded and widened K vector serves four queries, the sixteen dot products are reduced
//! together by one transposing tree (45 instructions instead of 16 horizontal sums), and P·V
//! widens each value vector once for the four accumulator rows of a 64-column panel.
//!
//! Elements past head_dim are masked (AVX-512 masked loads neither read nor fault on masked
//! lanes), so any head_dim works without scalar tails.

use crate::dtype::{DType, Element};

/// Query rows (and accumulator rows) per kernel call: the kernels serve items whose kv heads
/// have a multiple of this many query rows each.
pub(crate) const ROWS: usize = 4;
/// Keys per call of the score kernel.
pub(crate) const KEYS: usize = 4;
/// Columns per panel of the P·V kernel (four zmm vectors).
const PANEL: usize = 64;

/// The widening load of sixteen elements into a zmm register, zeroing the lanes that mask
/// register `$k` leaves out: bf16 by a zero-extension and a shift into the high half, f16 by
/// `vcvtph2ps`, f32 as is.
macro_rules! widen {
    (bf16, $dst:literal, $k:literal, $src:expr) => {
        concat!("vpmovzxwd ", $dst, " {{", $k, "}}{{z}}, ymmword ptr ", $src, "\n", "vpslld ", $dst, ", ", $dst, ", 16")
    };
    (f16, $dst:literal, $k:literal, $src:expr) => {
        concat!("vcvtph2ps ", $dst, " {{", $k, "}}{{z}}, ymmword ptr ", $src)
    };
    (f32, $dst:literal, $k:literal, $src:expr) => {
        concat!("vmovups ", $dst, " {{", $k, "}}{{z}}, zmmword ptr ", $src)
    };
}

/// The sixteen FMAs of a 4 × 4 register block: accumulator `zmm(4·r + i) += zmm(20 + r) ·
/// zmm(16 + i)` (row operands in zmm20-23, column operands in zmm16-19).
macro_rules! fma_4x4 {
    () => {
        concat!(
            "vfmadd231ps zmm0, zmm20, zmm16\n", "vfmadd231ps zmm1, zmm20, zmm17\n",
            "vfmadd231ps zmm2, zmm20, zmm18\n", "vfmadd231ps zmm3, zmm20, zmm19\n",
            "vfmadd231ps zmm4, zmm21, zmm16\n", "vfmadd231ps zmm5, zmm21, zmm17\n",
            "vfmadd231ps zmm6, zmm21, zmm18\n", "vfmadd231ps zmm7, zmm21, zmm19\n",
            "vfmadd231ps zmm8, zmm22, zmm16\n", "vfmadd231ps zmm9, zmm22, zmm17\n",
            "vfmadd231ps zmm10, zmm22, zmm18\n", "vfmadd231ps zmm11, zmm22, zmm19\n",
            "vfmadd231ps zmm12, zmm23, zmm16\n", "vfmadd231ps zmm13, zmm23, zmm17\n",
            "vfmadd231ps zmm14, zmm23, zmm18\n", "vfmadd231ps zmm15, zmm23, zmm19",
        )
    };
}

/// Defines the two kernels for one element type: `$kind` names the [`widen!`] arm, `$qs` is
/// the scale from a byte offset into a K row to one into an f32 query row (4 / element size),
/// `$v1..$v3` the byte offsets of the second to fourth vector of sixteen elements.
macro_rules! kernels {
    ($scores:ident, $pv:ident, $kind:tt, $qs:literal, $v1:literal, $v2:literal, $v3:literal) => {
        /// Sixteen dot products over `full · 16 + popcount(tail)` elements: key `i` (the
        /// rows at `k[i]`) with query `r` (the f32 rows at `q[r]`) into `out[4·i + r]`.
        /// Lane `e` of chunk `c` is element `16·c + e`; the tail chunk loads only the lanes
        /// set in `tail`. Each lane adds its terms in order with FMAs; the tree then adds
        /// lanes `e` and `e + 8`, then `+ 4`, `+ 2`, `+ 1` (the AVX2 path's 8-lane partials
        /// are added in another order, so the two differ in the last bits).
        ///
        /// # Safety
        /// AVX-512F present; every `k[i]` valid for the elements read, every `q[r]` likewise
        /// (f32).
        #[inline(never)]
        unsafe fn $scores(k: [*const u8; KEYS], q: [*const f32; ROWS], full: usize, tail: u16, out: &mut [f32; KEYS * ROWS]) {
            // SAFETY: the caller guarantees AVX-512F and the extent of every row; the loads
            // stop at `full` chunks and the masked tail chunk. The block writes zmm0-25, k1 and
            // the named general registers. xmm0-15 are declared clobbered (the compiler cannot
            // name zmm registers or mask registers without the avx512f feature); as in
            // `micro_avx512`, a non-inlined function's callers treat every vector and mask
            // register as clobbered by the call, as the x86-64 ABIs say, and this function's own
            // code (compiled without AVX-512) holds nothing in zmm16-31 or k1. `vzeroupper`
            // leaves the upper halves clean for the SSE/AVX code around it.
            unsafe {
                std::arch::asm!(
                    zero_zmm0_15!(),
                    // All lanes for the full chunks; the tail pass sets k1 to `tail`.
                    "kxnorw k1, k1, k1",
                    "xor {off}, {off}",
                    "test {full}, {full}",
                    "jz 3f",
                    "2:",
                    widen!($kind, "zmm16", "k1", "[{key0} + {off}]"),
                    widen!($kind, "zmm17", "k1", "[{key1} + {off}]"),
                    widen!($kind, "zmm18", "k1", "[{key2} + {off}]"),
                    widen!($kind, "zmm19", "k1", "[{key3} + {off}]"),
                    concat!("vmovups zmm20 {{k1}}{{z}}, zmmword ptr [{q0} + {off}*", $qs, "]"),
                    concat!("vmovups zmm21 {{k1}}{{z}}, zmmword ptr [{q1} + {off}*", $qs, "]"),
                    concat!("vmovups zmm22 {{k1}}{{z}}, zmmword ptr [{q2} + {off}*", $qs, "]"),
                    concat!("vmovups zmm23 {{k1}}{{z}}, zmmword ptr [{q3} + {off}*", $qs, "]"),
                    // Accumulator 4·r + i: query r, key i.
                    fma_4x4!(),
                    concat!("add {off}, ", $v1),
                    "dec {full}",
                    "jnz 2b",
                    "3:",
                    // One more pass over the masked tail chunk, then none (tail := 0).
                    "test {tail:e}, {tail:e}",
                    "jz 4f",
                    "kmovw k1, {tail:e}",
                    "xor {tail:e}, {tail:e}",
                    "mov {full}, 1",
                    "jmp 2b",
                    "4:",
                    // Sixteen vectors a = 0..16 to their sixteen sums, in four halving steps.
                    // 1: the 256-bit halves of a pair (a, a+1) added: T_m (zmm16+m) holds
                    // vector 2m's 8 partial sums in its low half, 2m+1's in its high half.
                    "vshuff32x4 zmm24, zmm0, zmm1, 0x44",
                    "vshuff32x4 zmm25, zmm0, zmm1, 0xEE",
                    "vaddps zmm16, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm2, zmm3, 0x44",
                    "vshuff32x4 zmm25, zmm2, zmm3, 0xEE",
                    "vaddps zmm17, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm4, zmm5, 0x44",
                    "vshuff32x4 zmm25, zmm4, zmm5, 0xEE",
                    "vaddps zmm18, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm6, zmm7, 0x44",
                    "vshuff32x4 zmm25, zmm6, zmm7, 0xEE",
                    "vaddps zmm19, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm8, zmm9, 0x44",
                    "vshuff32x4 zmm25, zmm8, zmm9, 0xEE",
                    "vaddps zmm20, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm10, zmm11, 0x44",
                    "vshuff32x4 zmm25, zmm10, zmm11, 0xEE",
                    "vaddps zmm21, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm12, zmm13, 0x44",
                    "vshuff32x4 zmm25, zmm12, zmm13, 0xEE",
                    "vaddps zmm22, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm14, zmm15, 0x44",
                    "vshuff32x4 zmm25, zmm14, zmm15, 0xEE",
                    "vaddps zmm23, zmm24, zmm25",
                    // 2: the 128-bit lanes of each half added: U_m (zmm m) holds the 4 partial
                    // sums of vectors 4m .. 4m+4, one per 128-bit lane.
                    "vshuff32x4 zmm24, zmm16, zmm17, 0x88",
                    "vshuff32x4 zmm25, zmm16, zmm17, 0xDD",
                    "vaddps zmm0, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm18, zmm19, 0x88",
                    "vshuff32x4 zmm25, zmm18, zmm19, 0xDD",
                    "vaddps zmm1, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm20, zmm21, 0x88",
                    "vshuff32x4 zmm25, zmm20, zmm21, 0xDD",
                    "vaddps zmm2, zmm24, zmm25",
                    "vshuff32x4 zmm24, zmm22, zmm23, 0x88",
                    "vshuff32x4 zmm25, zmm22, zmm23, 0xDD",
                    "vaddps zmm3, zmm24, zmm25",
                    // 3: pairs of 64-bit halves within a lane: lane L of zmm4 holds 2 partials
                    // of vectors L and L+4, of zmm5 those of L+8 and L+12.
                    "vunpcklpd zmm24, zmm0, zmm1",
                    "vunpckhpd zmm25, zmm0, zmm1",
                    "vaddps zmm4, zmm24, zmm25",
                    "vunpcklpd zmm24, zmm2, zmm3",
                    "vunpckhpd zmm25, zmm2, zmm3",
                    "vaddps zmm5, zmm24, zmm25",
                    // 4: lane L = the sums of vectors L, L+4, L+8, L+12 = key L with queries
                    // 0..4, so `out[4·i + r]` is key i, query r.
                    "vshufps zmm24, zmm4, zmm5, 0x88",
                    "vshufps zmm25, zmm4, zmm5, 0xDD",
                    "vaddps zmm0, zmm24, zmm25",
                    "vmovups zmmword ptr [{out}], zmm0",
                    "vzeroupper",
                    key0 = in(reg) k[0],
                    key1 = in(reg) k[1],
                    key2 = in(reg) k[2],
                    key3 = in(reg) k[3],
                    q0 = in(reg) q[0],
                    q1 = in(reg) q[1],
                    q2 = in(reg) q[2],
                    q3 = in(reg) q[3],
                    full = inout(reg) full => _,
                    tail = inout(reg) tail as usize => _,
                    off = out(reg) _,
                    out = in(reg) out.as_mut_ptr(),
                    out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                    out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                    out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                    out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                    options(nostack),
                );
            }
        }

        /// `acc_r = alpha[r] · acc_r + Σ_j p[j·ps + r] · v_j` over one panel of up to 64
        /// columns for four accumulator rows (`c + r·ldc`, f32) and the value rows
        /// `v[0..n]` (each read from `col` on, widened in registers): vector `m` of the panel
        /// reads and writes only the lanes set in bits `16m .. 16m + 16` of `masks`. Terms are
        /// added in order of `j` with FMAs after the rescale, exactly as the AVX2 panel does,
        /// so both give the same bits.
        ///
        /// # Safety
        /// AVX-512F present; `v` valid for `n` pointers, each row valid for the masked
        /// elements from `col`; `p` for `n` rows of `ps` bytes with 4 f32 each; `alpha` for 4
        /// f32; `c` for the masked columns of 4 rows `ldc` bytes apart.
        #[inline(never)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $pv(n: usize, v: *const *const u8, col: usize, p: *const f32, ps: usize, alpha: *const f32, c: *mut f32, ldc: usize, masks: u64) {
            // SAFETY: as for the score kernel: the caller vouches for every address (the masked
            // lanes are neither read nor written); zmm0-23, k1-k4 and the named general
            // registers are written, xmm0-15 declared, the rest clobbered by the call per ABI.
            unsafe {
                std::arch::asm!(
                    "kmovw k1, {m:e}",
                    "shr {m}, 16",
                    "kmovw k2, {m:e}",
                    "shr {m}, 16",
                    "kmovw k3, {m:e}",
                    "shr {m}, 16",
                    "kmovw k4, {m:e}",
                    "vbroadcastss zmm20, dword ptr [{alpha}]",
                    "vbroadcastss zmm21, dword ptr [{alpha} + 4]",
                    "vbroadcastss zmm22, dword ptr [{alpha} + 8]",
                    "vbroadcastss zmm23, dword ptr [{alpha} + 12]",
                    "lea {t}, [{ldc} + {ldc}*2]",
                    // Accumulator 4·r + m: row r, vector m; each row rescaled by its alpha.
                    "vmovups zmm0 {{k1}}{{z}}, zmmword ptr [{c}]",
                    "vmovups zmm1 {{k2}}{{z}}, zmmword ptr [{c} + 64]",
                    "vmovups zmm2 {{k3}}{{z}}, zmmword ptr [{c} + 128]",
                    "vmovups zmm3 {{k4}}{{z}}, zmmword ptr [{c} + 192]",
                    "vmovups zmm4 {{k1}}{{z}}, zmmword ptr [{c} + {ldc}]",
                    "vmovups zmm5 {{k2}}{{z}}, zmmword ptr [{c} + {ldc} + 64]",
                    "vmovups zmm6 {{k3}}{{z}}, zmmword ptr [{c} + {ldc} + 128]",
                    "vmovups zmm7 {{k4}}{{z}}, zmmword ptr [{c} + {ldc} + 192]",
                    "vmovups zmm8 {{k1}}{{z}}, zmmword ptr [{c} + {ldc}*2]",
                    "vmovups zmm9 {{k2}}{{z}}, zmmword ptr [{c} + {ldc}*2 + 64]",
                    "vmovups zmm10 {{k3}}{{z}}, zmmword ptr [{c} + {ldc}*2 + 128]",
                    "vmovups zmm11 {{k4}}{{z}}, zmmword ptr [{c} + {ldc}*2 + 192]",
                    "vmovups zmm12 {{k1}}{{z}}, zmmword ptr [{c} + {t}]",
                    "vmovups zmm13 {{k2}}{{z}}, zmmword ptr [{c} + {t} + 64]",
                    "vmovups zmm14 {{k3}}{{z}}, zmmword ptr [{c} + {t} + 128]",
                    "vmovups zmm15 {{k4}}{{z}}, zmmword ptr [{c} + {t} + 192]",
                    "vmulps zmm0, zmm0, zmm20",
                    "vmulps zmm1, zmm1, zmm20",
                    "vmulps zmm2, zmm2, zmm20",
                    "vmulps zmm3, zmm3, zmm20",
                    "vmulps zmm4, zmm4, zmm21",
                    "vmulps zmm5, zmm5, zmm21",
                    "vmulps zmm6, zmm6, zmm21",
                    "vmulps zmm7, zmm7, zmm21",
                    "vmulps zmm8, zmm8, zmm22",
                    "vmulps zmm9, zmm9, zmm22",
                    "vmulps zmm10, zmm10, zmm22",
                    "vmulps zmm11, zmm11, zmm22",
                    "vmulps zmm12, zmm12, zmm23",
                    "vmulps zmm13, zmm13, zmm23",
                    "vmulps zmm14, zmm14, zmm23",
                    "vmulps zmm15, zmm15, zmm23",
                    "test {n}, {n}",
                    "jz 3f",
                    "2:",
                    "mov {row}, qword ptr [{v}]",
                    "add {row}, {col}",
                    widen!($kind, "zmm16", "k1", "[{row}]"),
                    widen!($kind, "zmm17", "k2", concat!("[{row} + ", $v1, "]")),
                    widen!($kind, "zmm18", "k3", concat!("[{row} + ", $v2, "]")),
                    widen!($kind, "zmm19", "k4", concat!("[{row} + ", $v3, "]")),
                    "vbroadcastss zmm20, dword ptr [{p}]",
                    "vbroadcastss zmm21, dword ptr [{p} + 4]",
                    "vbroadcastss zmm22, dword ptr [{p} + 8]",
                    "vbroadcastss zmm23, dword ptr [{p} + 12]",
                    fma_4x4!(),
                    "add {v}, 8",
                    "add {p}, {ps}",
                    "dec {n}",
                    "jnz 2b",
                    "3:",
                    "vmovups zmmword ptr [{c}] {{k1}}, zmm0",
                    "vmovups zmmword ptr [{c} + 64] {{k2}}, zmm1",
                    "vmovups zmmword ptr [{c} + 128] {{k3}}, zmm2",
                    "vmovups zmmword ptr [{c} + 192] {{k4}}, zmm3",
                    "vmovups zmmword ptr [{c} + {ldc}] {{k1}}, zmm4",
                    "vmovups zmmword ptr [{c} + {ldc} + 64] {{k2}}, zmm5",
                    "vmovups zmmword ptr [{c} + {ldc} + 128] {{k3}}, zmm6",
                    "vmovups zmmword ptr [{c} + {ldc} + 192] {{k4}}, zmm7",
                    "vmovups zmmword ptr [{c} + {ldc}*2] {{k1}}, zmm8",
                    "vmovups zmmword ptr [{c} + {ldc}*2 + 64] {{k2}}, zmm9",
                    "vmovups zmmword ptr [{c} + {ldc}*2 + 128] {{k3}}, zmm10",
                    "vmovups zmmword ptr [{c} + {ldc}*2 + 192] {{k4}}, zmm11",
                    "vmovups zmmword ptr [{c} + {t}] {{k1}}, zmm12",
                    "vmovups zmmword ptr [{c} + {t} + 64] {{k2}}, zmm13",
                    "vmovups zmmword ptr [{c} + {t} + 128] {{k3}}, zmm14",
                    "vmovups zmmword ptr [{c} + {t} + 192] {{k4}}, zmm15",
                    "vzeroupper",
                    m = inout(reg) masks => _,
                    alpha = in(reg) alpha,
                    t = out(reg) _,
                    c = in(reg) c,
                    ldc = in(reg) ldc,
                    n = inout(reg) n => _,
                    v = inout(reg) v => _,
                    row = out(reg) _,
                    col = in(reg) col,
                    p = inout(reg) p => _,
                    ps = in(reg) ps,
                    out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                    out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                    out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                    out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                    options(nostack),
                );
            }
        }
    };
}

kernels!(scores_bf16, pv_bf16, bf16, "2", "32", "64", "96");
kernels!(scores_f16, pv_f16, f16, "2", "32", "64", "96");
kernels!(scores_f32, pv_f32, f32, "1", "64", "128", "192");

/// `s[j·ps + r] = k_j · q_r` for the key rows `k` (`d` elements of `T` each) and `rows` queries
/// (f32 rows of `q`, `d` apart; `rows` a multiple of [`ROWS`]): the AVX-512 form of
/// [`super::scores_narrow_rows`] over several keys, four keys × four queries per call.
///
/// # Safety
/// AVX-512F present; every `k[j]` valid for `d` elements, `q` for `rows·d` values, `s` for
/// `k.len()` rows of `ps >= rows` values.
#[inline(always)]
pub(crate) unsafe fn scores<T: Element>(rows: usize, d: usize, k: &[*const T], q: *const f32, s: *mut f32, ps: usize) {
    debug_assert!(rows % ROWS == 0);
    let kernel = match T::DTYPE {
        DType::BF16 => scores_bf16,
        DType::F16 => scores_f16,
        DType::F32 => scores_f32,
    };
    #[cfg(test)]
    tests::CALLS.with(|c| c.set(c.get() + 1));
    let (full, tail) = (d / 16, ((1u32 << (d % 16)) - 1) as u16);
    let mut out = [0.0f32; KEYS * ROWS];
    for (g, keys) in k.chunks(KEYS).enumerate() {
        // A short last group repeats its last key: read again, its scores not stored.
        let row = |i: usize| keys[i.min(keys.len() - 1)].cast::<u8>();
        for r0 in (0..rows).step_by(ROWS) {
            // SAFETY: the key rows hold `d` elements and query rows `r0 .. r0 + 4 <= rows`
            // hold `d` values (the caller's contract); `full` chunks of 16 and the `tail`
            // lanes are exactly `d` elements.
            unsafe {
                let q = [0, 1, 2, 3].map(|r| q.add((r0 + r) * d));
                kernel([0, 1, 2, 3].map(row), q, full, tail, &mut out);
                for (i, sc) in out.chunks_exact(ROWS).take(keys.len()).enumerate() {
                    let dst = s.add((g * KEYS + i) * ps + r0);
                    std::ptr::copy_nonoverlapping(sc.as_ptr(), dst, ROWS);
                }
            }
        }
    }
}

/// The AVX-512 form of [`super::pv_narrow_rows`] (same contract and the same bits) for `rows`
/// a multiple of [`ROWS`]: four accumulator rows × a 64-column panel per call.
///
/// # Safety
/// As [`super::pv_narrow_rows`], and AVX-512F present.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv<T: Element>(rows: usize, v: &[*const T], p: *const f32, ps: usize, alpha: *const f32, acc: *mut f32, ldc: usize, d: usize) {
    debug_assert!(rows % ROWS == 0);
    let kernel = match T::DTYPE {
        DType::BF16 => pv_bf16,
        DType::F16 => pv_f16,
        DType::F32 => pv_f32,
    };
    #[cfg(test)]
    tests::CALLS.with(|c| c.set(c.get() + 1));
    let f = std::mem::size_of::<f32>();
    for r0 in (0..rows).step_by(ROWS) {
        for col in (0..d).step_by(PANEL) {
            // Lane masks of the panel's four vectors: the columns below `d`.
            let masks = (0..4).fold(0u64, |m, i| {
                let lanes = (d - col).saturating_sub(16 * i).min(16);
                m | (((1u64 << lanes) - 1) << (16 * i))
            });
            // SAFETY: rows `r0 .. r0 + 4 <= rows` of `p`, `alpha` and `acc`, columns `col ..
            // min(col + 64, d)` of the value and accumulator rows (the masks), all within
            // the caller's contract.
            unsafe {
                let (pr, c) = (p.add(r0), acc.add(r0 * ldc + col));
                let bytes = col * std::mem::size_of::<T>();
                kernel(v.len(), v.as_ptr().cast(), bytes, pr, ps * f, alpha.add(r0), c, ldc * f, masks);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cpu::kernels::{pv_narrow_rows, Avx2};
    use crate::cpu::rng::Rng;
    use half::{bf16, f16};
    use std::cell::Cell;

    thread_local! {
        /// Calls of [`scores`] and [`pv`] on this thread: the proof that a decode took them.
        pub(crate) static CALLS: Cell<usize> = const { Cell::new(0) };
    }

    /// Whether this CPU runs the kernels (and the AVX2 ones they are compared with).
    fn supported() -> bool {
        ["avx512f", "avx2", "fma", "f16c"].iter().all(|f| match *f {
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx2" => is_x86_feature_detected!("avx2"),
            "fma" => is_x86_feature_detected!("fma"),
            _ => is_x86_feature_detected!("f16c"),
        })
    }

    /// `n` random values in [-1, 1) (seeded per test run), rounded to `T`.
    fn values<T: Element>(n: usize) -> Vec<T> {
        let mut v = vec![T::from_f32(0.0); n];
        Rng::fresh().fill(&mut v, T::from_f32);
        v
    }

    /// The AVX2 P·V step ([`pv_narrow_rows`] on [`Avx2`]), for the bitwise comparison.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_avx2<T: Element>(rows: usize, v: &[*const T], p: *const f32, ps: usize, alpha: *const f32, acc: *mut f32, ldc: usize, d: usize) {
        // SAFETY: the caller's contract, as `pv_narrow_rows`'s; AVX2, FMA and F16C enabled.
        unsafe { pv_narrow_rows::<Avx2, T, false>(rows, v, p, ps, alpha, acc, ldc, d) }
    }

    /// Scores of `keys` key rows (strided 3 elements apart past `d`, so rows are not
    /// contiguous) and `rows` queries against f64, with a NaN in key 2's last element where
    /// there is one: only that key's scores are NaN.
    fn check_scores<T: Element>(d: usize, keys: usize, rows: usize) {
        let ks = d + 3;
        let mut k = values::<T>(keys * ks);
        let nan_key = (keys > 2).then_some(2);
        if let Some(j) = nan_key {
            k[j * ks + d - 1] = T::from_f32(f32::NAN);
        }
        let q: Vec<f32> = values::<T>(rows * d).iter().map(|x| x.to_f32()).collect();
        let ps = rows + 5;
        let mut s = vec![f32::NAN; keys * ps];
        let ptrs: Vec<*const T> = (0..keys).map(|j| k[j * ks..].as_ptr()).collect();
        // SAFETY: `supported()` checked AVX-512F; every key row holds `d` elements, `q` has
        // `rows · d` values and `s` `keys` rows of `ps >= rows`.
        unsafe { scores::<T>(rows, d, &ptrs, q.as_ptr(), s.as_mut_ptr(), ps) };
        for j in 0..keys {
            for r in 0..ps {
                let got = s[j * ps + r];
                if r >= rows {
                    assert!(got.is_nan(), "d={d} keys={keys}: padding column {r} of key {j} written");
                    continue;
                }
                if Some(j) == nan_key {
                    assert!(got.is_nan(), "d={d} keys={keys}: key {j} with a NaN scores {got}");
                    continue;
                }
                let terms = (0..d).map(|e| k[j * ks + e].to_f32() as f64 * q[r * d + e] as f64);
                let (want, mag) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                let err = (got as f64 - want).abs();
                assert!(err <= 4e-6 * mag + 1e-30, "{} d={d} keys={keys} rows={rows}: s[{j}][{r}] = {got}, want {want}", T::DTYPE);
            }
        }
    }

    /// P·V over `keys` value rows for `rows` accumulator rows against f64, and bit for bit
    /// against the AVX2 kernel where that one fuses every term (`d` a multiple of 8; its scalar
    /// tail columns do not). A NaN in a value row's last element makes that column NaN and
    /// leaves the others finite.
    fn check_pv<T: Element>(d: usize, keys: usize, rows: usize) {
        let vs = d + 5;
        let mut v = values::<T>(keys * vs);
        let nan = keys > 3 && d > 1;
        if nan {
            v[3 * vs + d - 1] = T::from_f32(f32::NAN);
        }
        let ptrs: Vec<*const T> = (0..keys).map(|j| v[j * vs..].as_ptr()).collect();
        let ps = rows + 3;
        let p: Vec<f32> = values::<f32>(keys * ps).iter().map(|x| x.abs()).collect();
        let alpha: Vec<f32> = (0..rows).map(|r| 0.25 + r as f32 / 8.0).collect();
        let ldc = d.div_ceil(16) * 16 + 16;
        let start: Vec<f32> = values::<f32>(rows * ldc);
        let (mut acc, mut acc2) = (start.clone(), start.clone());
        // SAFETY: `supported()` checked the features; `ptrs` rows hold `d` elements, `p` has
        // `keys` rows of `ps >= rows`, `alpha` `rows` values, `acc` `rows` rows of `ldc >= d`.
        unsafe {
            pv::<T>(rows, &ptrs, p.as_ptr(), ps, alpha.as_ptr(), acc.as_mut_ptr(), ldc, d);
            pv_avx2::<T>(rows, &ptrs, p.as_ptr(), ps, alpha.as_ptr(), acc2.as_mut_ptr(), ldc, d);
        }
        for r in 0..rows {
            for e in 0..ldc {
                let (got, i) = (acc[r * ldc + e], r * ldc + e);
                if e >= d {
                    assert_eq!(got.to_bits(), start[i].to_bits(), "d={d}: padding column {e} of row {r} written");
                    continue;
                }
                if d % 8 == 0 {
                    assert_eq!(got.to_bits(), acc2[i].to_bits(), "{} d={d} keys={keys} rows={rows}: acc[{r}][{e}] differs from AVX2", T::DTYPE);
                }
                if nan && e == d - 1 {
                    assert!(got.is_nan(), "d={d}: the NaN value column gives {got}");
                    continue;
                }
                let terms = (0..keys).map(|j| p[j * ps + r] as f64 * v[j * vs + e].to_f32() as f64);
                let (sum, mag) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                let want = start[i] as f64 * alpha[r] as f64 + sum;
                let err = (got as f64 - want).abs();
                assert!(err <= 4e-6 * (mag + start[i].abs() as f64) + 1e-30, "{} d={d} keys={keys}: acc[{r}][{e}] = {got}, want {want}", T::DTYPE);
            }
        }
    }

    /// Every element type at head_dims with and without a tail chunk (and below one chunk),
    /// 1 to 17 keys (short last groups of the score kernel), four and eight rows.
    #[test]
    fn kernels_match_f64_and_the_avx2_panel() {
        if !supported() {
            eprintln!("no AVX-512F here: the AVX-512 decode kernels are not run");
            return;
        }
        for d in [1, 8, 13, 16, 20, 72, 128, 256] {
            for keys in [1, 2, 3, 4, 5, 7, 8, 9, 16, 17] {
                for rows in [4, 8] {
                    check_scores::<bf16>(d, keys, rows);
                    check_scores::<f16>(d, keys, rows);
                    check_scores::<f32>(d, keys, rows);
                    check_pv::<bf16>(d, keys, rows);
                    check_pv::<f16>(d, keys, rows);
                    check_pv::<f32>(d, keys, rows);
                }
            }
        }
    }
}
