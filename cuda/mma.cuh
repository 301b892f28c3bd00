// Tensor-core and async-copy building blocks for the tensor-core kernels (flash, mem_efficient),
// and their shared epilogue: raw PTX only, so the header needs nothing beyond common.cuh and
// compiles unchanged under nvcc and NVRTC.
#pragma once
#include "common.cuh"

// Shared-memory address of a generic pointer, as the 32-bit value ldmatrix/cp.async take.
__device__ __forceinline__ unsigned attn_smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte global -> shared copy that bypasses L1. When `valid` is false nothing is read and the
// destination is zero-filled (src-size 0): out-of-range rows and head_dim padding become zeros,
// so no garbage (or NaN) is ever multiplied.
__device__ __forceinline__ void attn_cp_async_16(unsigned smem, const void* gmem, bool valid) {
    int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void attn_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void attn_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 b16 matrices from shared memory; lane l supplies the address of row l%8 of matrix l/8.
__device__ __forceinline__ void attn_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void attn_ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D = A·B + D, m16n8k16, f32 accumulate; A row-major 16x16, B "col" 16x8 (i.e. stored n-major).
// Below sm_80 (mem_efficient on sm_75, f16 only) it is two m16n8k8: A registers {a0, a1} hold
// k 0..7 and {a2, a3} k 8..15; B register b0 holds k 0..7, b1 k 8..15.
template <bool BF16>
__device__ __forceinline__ void attn_mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[2]), "r"(a[3]), "r"(b1));
#else
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

// Two f32 -> one register of two 16-bit values, `lo` in the low half (round to nearest even).
// cvt.rn.{f16,bf16}x2.f32 needs sm_80; below it two scalar conversions (bf16 never runs there).
template <bool BF16>
__device__ __forceinline__ unsigned attn_pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    return (unsigned)attn_f32_to_f16(lo) | ((unsigned)attn_f32_to_f16(hi) << 16);
#else
    unsigned r;
    if (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
#endif
}

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][D] tile of 16-bit
// values (D >= 64): the chunk index is XORed with row % 8 so that the 16-byte writes that fill a
// tile and the ldmatrix reads of its 8x8 blocks both hit distinct banks.
template <int D>
__device__ __forceinline__ int attn_swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// Loads rows [row0, row0+ROWS) of a [seq, D] slice of 16-bit values into a shared tile with
// cp.async, chunk (r, c) at element `swz(r, c)` of the tile (each kernel's swizzle); rows >=
// seqlen and chunks >= head_dim are zero-filled. UNROLL: the copy loop's unroll factor, 0 for
// the compiler's own choice (what the mma.sync kernel was tuned with).
template <int D, int ROWS, int THREADS, int UNROLL, class Swizzle>
__device__ __forceinline__ void attn_load_tile(unsigned tile_addr, const unsigned short* base, long long row_stride, int row0,
                                               int seqlen, int head_dim, Swizzle swz) {
    constexpr int CH = D / 8;
    const auto copy = [&](int i) {
        const int r = i / CH, c = i % CH;
        const int row = row0 + r;
        const bool ok = row < seqlen && c * 8 < head_dim;
        const unsigned short* src = ok ? base + (long long)row * row_stride + c * 8 : base;
        attn_cp_async_16(tile_addr + 2 * swz(r, c), src, ok);
    };
    if constexpr (UNROLL > 0) {
#pragma unroll UNROLL
        for (int i = threadIdx.x; i < ROWS * CH; i += THREADS) copy(i);
    } else {
        for (int i = threadIdx.x; i < ROWS * CH; i += THREADS) copy(i);
    }
}

// The prologue and the two products of the mma.sync kernels (flash, mem_efficient), written once
// as statement macros rather than functions: as __forceinline__ functions they compiled to the same
// instructions in another schedule, and mem_efficient ran 3-9% slower on the H200 (measured
// beside the inline code in one device call); the macros expand to exactly the code each kernel
// had, and nvdisasm shows the same SASS.
//
// ATTN_TILE_SEQ and ATTN_TILE_KEYS: the prologue of both kernels, around the line each has
// that sets m0, the tile's first row (heaviest tiles first; flash before ATTN_TILE_SEQ,
// mem_efficient after it, as each was tuned). They declare h, b, seq, sq, sk, then kt, nb_begin,
// nb_end, ops and q, k, v, o, and return the block when its sequence has no rows at m0 (a packed
// batch sizes the grid by its longest sequence; uniform across the block, before any barrier).
#define ATTN_TILE_SEQ(p)                                                                                               \
    const int h = blockIdx.y;                                                                                           \
    const int b = blockIdx.z;                                                                                           \
    const AttnSeq seq = attn_seq(p, b, h);                                                                              \
    const int sq = seq.seqlen_q, sk = seq.seqlen_k;
#define ATTN_TILE_KEYS(p, BM, BN)                                                                                      \
    if (m0 >= sq) return;                                                                                               \
    const AttnKeyTiles kt = attn_key_tiles(p, m0, BM, BN, sq, sk);                                                      \
    const int nb_begin = kt.nb_begin, nb_end = kt.nb_end;                                                               \
    const AttnOperands16 ops = attn_operands16(p, seq);                                                                 \
    const unsigned short *q = ops.q, *k = ops.k, *v = ops.v;                                                            \
    unsigned short* o = ops.o;

// ATTN_TILE_ROWS: this thread's rows in m-tile t (mma C-fragment layout: lane/4 and lane/4 + 8
// of rows warp_row0 + 16·t, WARP_M being the warp's index along the rows), its online-softmax
// state over DW head_dim columns (acc, row_max, row_sum, initialised) and the logit transform lg.
#define ATTN_TILE_ROWS(p, WARP_M, MT, DW)                                                                              \
    const int warp_row0 = WARP_M * 16 * MT;                                                                             \
    const int row_in_tile = warp_row0 + (lane >> 2);                                                                    \
    float acc[MT][DW / 8][4], row_max[MT][2], row_sum[MT][2];                                                           \
    attn_softmax_init(acc, row_max, row_sum);                                                                           \
    const AttnLogits lg = attn_logits(p);

// ATTN_MMA_SCORES: s = Q·K(tile)ᵀ over k-steps [K0, K0 + KSTEPS) of head_dim (16 columns each)
// for one warp's 16·MT rows from warp_row0 (mma C-fragment layout: in m-tile t, rows lane/4 and
// lane/4 + 8 of its 16); Q and K in attn_swz tiles; each K fragment serves MT m-tiles. Partly
// unrolled: a full unroll lets the compiler hoist every Q fragment at once, which costs 64
// registers at d=128 and pushes sm_100/sm_120 into spills.
#define ATTN_MMA_SCORES(s, sQ, sK, warp_row0, lane, D, BN, MT, KSTEPS, K0, BF16)                                      \
    _Pragma("unroll") for (int t = 0; t < MT; ++t)                                                                      \
        _Pragma("unroll") for (int i = 0; i < BN / 8; ++i) s[t][i][0] = s[t][i][1] = s[t][i][2] = s[t][i][3] = 0.f;    \
    _Pragma("unroll 2") for (int k2 = 0; k2 < KSTEPS; ++k2) {                                                           \
        const int kk = K0 + k2;                                                                                         \
        unsigned a[MT][4];                                                                                              \
        _Pragma("unroll") for (int t = 0; t < MT; ++t)                                                                  \
            attn_ldmatrix_x4(a[t], sQ + 2 * attn_swz<D>(warp_row0 + t * 16 + (lane & 15), kk * 2 + (lane >> 4)));     \
        _Pragma("unroll") for (int nt = 0; nt < BN / 16; ++nt) {                                                        \
            unsigned bk[4];                                                                                             \
            const int key = nt * 16 + ((lane >> 4) << 3) + (lane & 7);                                                  \
            attn_ldmatrix_x4(bk, sK + 2 * attn_swz<D>(key, kk * 2 + ((lane >> 3) & 1)));                                \
            _Pragma("unroll") for (int t = 0; t < MT; ++t) {                                                            \
                attn_mma_16816<BF16>(s[t][2 * nt], a[t], bk[0], bk[1]);                                                 \
                attn_mma_16816<BF16>(s[t][2 * nt + 1], a[t], bk[2], bk[3]);                                             \
            }                                                                                                           \
        }                                                                                                               \
    }

// ATTN_MMA_PV: acc += P·V(tile) for head_dim columns [16 D0, 16 (D0 + DSTEPS)) (acc's 2·DSTEPS
// n8 tiles): two adjacent n8 tiles of S are one k16 A fragment of P; each V fragment serves MT
// m-tiles.
#define ATTN_MMA_PV(acc, s, sV, lane, D, BN, MT, DSTEPS, D0, BF16)                                                     \
    _Pragma("unroll") for (int kk = 0; kk < BN / 16; ++kk) {                                                            \
        unsigned a[MT][4];                                                                                              \
        _Pragma("unroll") for (int t = 0; t < MT; ++t) {                                                                \
            a[t][0] = attn_pack2<BF16>(s[t][2 * kk][0], s[t][2 * kk][1]);                                               \
            a[t][1] = attn_pack2<BF16>(s[t][2 * kk][2], s[t][2 * kk][3]);                                               \
            a[t][2] = attn_pack2<BF16>(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);                                       \
            a[t][3] = attn_pack2<BF16>(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);                                       \
        }                                                                                                               \
        _Pragma("unroll") for (int d2 = 0; d2 < DSTEPS; ++d2) {                                                         \
            const int dt = D0 + d2;                                                                                     \
            unsigned bv[4];                                                                                             \
            const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);                                            \
            attn_ldmatrix_x4_trans(bv, sV + 2 * attn_swz<D>(key, dt * 2 + (lane >> 4)));                               \
            _Pragma("unroll") for (int t = 0; t < MT; ++t) {                                                            \
                attn_mma_16816<BF16>(acc[t][2 * d2], a[t], bv[0], bv[1]);                                               \
                attn_mma_16816<BF16>(acc[t][2 * d2 + 1], a[t], bv[2], bv[3]);                                           \
            }                                                                                                           \
        }                                                                                                               \
    }

// The epilogue of the tensor-core kernels, for the accumulator layout mma.sync m16n8 and wgmma
// share: per 8-column chunk i, this thread holds columns col0 + 8i + 2(lane%4) + {0, 1} of two
// rows, row0 ([i][0..1]) and row0 + 8 ([i][2..3]). Normalises by the full row sums (a quad's),
// stores rows < sq and columns < head_dim, and (`write_lse`: one writer per row) their LSE; a
// row that saw no key gets zeros and -inf. ALIGNED: head_dim is a multiple of 8 and rows are
// 16-byte aligned, so a column pair is stored whole or not at all.
template <int DW, bool BF16, bool ALIGNED = true>
__device__ __forceinline__ void attn_store_rows(const AttnParams& p, const AttnSeq& seq, unsigned short* o,
                                                const float (&acc)[DW / 8][4], const float (&row_max)[2],
                                                const float (&row_sum)[2], int row0, int lane, int sq, float logit_scale,
                                                int col0 = 0, bool write_lse = true) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int row = row0 + r * 8;
        if (row < sq) {
            unsigned short* orow = o + (long long)row * p.o_stride[1];
#pragma unroll
            for (int i = 0; i < DW / 8; ++i) {
                const int col = col0 + i * 8 + (lane & 3) * 2;
                if (ALIGNED) {
                    if (col < p.head_dim) *reinterpret_cast<unsigned*>(orow + col) = attn_pack2<BF16>(acc[i][2 * r] * inv, acc[i][2 * r + 1] * inv);
                } else {
                    const unsigned pair = attn_pack2<BF16>(acc[i][2 * r] * inv, acc[i][2 * r + 1] * inv);
                    if (col < p.head_dim) orow[col] = (unsigned short)(pair & 0xffffu);
                    if (col + 1 < p.head_dim) orow[col + 1] = (unsigned short)(pair >> 16);
                }
            }
            if (write_lse && p.lse != nullptr && (lane & 3) == 0) {
                p.lse[seq.lse + row] = sum == 0.f ? attn_neg_inf() : row_max[r] * logit_scale + __logf(sum);
            }
        }
    }
}

// The attention variant on a score tile in the mma accumulator layout (s[t][i][e]: m-tile t,
// n8-tile i; this thread's rows row_in_tile + 16t + 8(e/2), keys n0 + 8i + 2(lane%4) + e%2):
// soft-capping of the scaled logits (`capped`), then the mask, only on tiles that need it (the
// ragged end, the causal diagonal, window edges).
template <int MT, int NI>
__device__ __forceinline__ void attn_variant_tile(const AttnParams& p, float (&s)[MT][NI][4], bool capped, int n0, int sk, int m0,
                                                  const AttnKeyTiles& kt, int row_in_tile, int lane) {
    if (capped) {
        const float pre = p.scale / p.softcap;
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int i = 0; i < NI; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[t][i][e] = p.softcap * attn_tanh(s[t][i][e] * pre);
    }
    if (attn_tile_needs_mask(p, n0, NI * 8, sk, m0, kt.m_last, kt.diag)) {
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int i = 0; i < NI; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const long long col = n0 + i * 8 + (lane & 3) * 2 + (e & 1);
                    const long long row = m0 + row_in_tile + t * 16 + (e >> 1) * 8;
                    if (attn_masked(p, row, col, kt.diag, sk)) s[t][i][e] = attn_neg_inf();
                }
    }
}

// The online-softmax state before the first key: zero accumulators and sums, maxima -inf.
template <int MT, int AI>
__device__ __forceinline__ void attn_softmax_init(float (&acc)[MT][AI][4], float (&row_max)[MT][2], float (&row_sum)[MT][2]) {
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
        for (int i = 0; i < AI; ++i) acc[t][i][0] = acc[t][i][1] = acc[t][i][2] = acc[t][i][3] = 0.f;
        row_max[t][0] = row_max[t][1] = attn_neg_inf();
        row_sum[t][0] = row_sum[t][1] = 0.f;
    }
}

// The online-softmax step on a score tile in the mma accumulator layout: each row's new running
// max (over its quad), the rescale of its sum and of its accumulator columns acc[t][..], and the
// scores exponentiated in place (base 2, scale_log2 folds the softmax scale and log2 e).
template <int MT, int NI, int AI>
__device__ __forceinline__ void attn_online_softmax(float (&s)[MT][NI][4], float (&row_max)[MT][2], float (&row_sum)[MT][2],
                                                    float (&acc)[MT][AI][4], float scale_log2) {
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = row_max[t][r];
#pragma unroll
            for (int i = 0; i < NI; ++i) mx = attn_max(mx, attn_max(s[t][i][2 * r], s[t][i][2 * r + 1]));
            mx = attn_max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = attn_max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row that has seen only masked keys keeps max -inf: use 0 as the base so that
            // exp2(-inf - base) = 0 instead of NaN.
            const float base = mx == attn_neg_inf() ? 0.f : mx * scale_log2;
            const float rescale = attn_exp2(row_max[t][r] * scale_log2 - base);
            row_max[t][r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < NI; ++i) {
                s[t][i][2 * r] = attn_exp2(s[t][i][2 * r] * scale_log2 - base);
                s[t][i][2 * r + 1] = attn_exp2(s[t][i][2 * r + 1] * scale_log2 - base);
                sum += s[t][i][2 * r] + s[t][i][2 * r + 1];
            }
            row_sum[t][r] = row_sum[t][r] * rescale + sum;  // per-lane partial; reduced at the end
            // Once a row's max has settled (most tiles of a long row) the rescale is exactly 1:
            // skip the multiplies when no row of the warp moved.
            if (!__all_sync(0xffffffffu, rescale == 1.f)) {
#pragma unroll
                for (int i = 0; i < AI; ++i) {
                    acc[t][i][2 * r] *= rescale;
                    acc[t][i][2 * r + 1] *= rescale;
                }
            }
        }
}
