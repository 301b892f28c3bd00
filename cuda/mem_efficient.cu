// Memory-efficient (xFormers-style) forward attention: the score matrix is never materialised;
// K/V tiles stream through shared memory and each query row keeps an online softmax
// (running max, running sum, f32 accumulator). One binary serves sm_75 through sm_120:
//
// * f16 / bf16: tensor cores. sm_80+: mma.sync m16n8k16 with cp.async; sm_75 (f16 only): each
//   m16n8k16 becomes two m16n8k8 (the k16 A/B fragments are exactly two k8 fragments side by
//   side), loads are plain 16-byte loads. ldmatrix serves both. bf16 entry points compile to
//   empty bodies below sm_80; the host never launches them there (Reason::DType).
// * f32: SIMT, every arch: a group of G lanes owns one query row (each lane D/G columns of q
//   and of the accumulator), scores are reduced across the group with shuffles.
//
// Any head_dim 1..512: kernels are specialised for D buckets (64/128/256/512 for the tensor-core
// kernels, 32..512 for f32); columns past head_dim are zero-filled in shared memory, never read
// or written in global memory. Tensors need not be 16-byte aligned: the UNALIGNED variants load
// element by element (the host picks from Problem::vector_aligned).
//
// Masking is flash.cu's, verbatim in meaning: keys past seqlen_k; causal aligned bottom-right
// (row i sees key j iff j <= i + seqlen_k - seqlen_q); a sliding window [i + diag - left,
// i + diag + right]; soft-capping replaces the scaled logit x by cap·tanh(x/cap). Rows that see
// no key produce zeros and lse = -inf. Varlen batches resolve through attn_seq.
//
// Shared memory stays at or below 64 KiB for every specialisation (sm_75's per-block limit).
#include "common.cuh"
#include "mma.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ME_SM80 1
#else
#define ME_SM80 0
#endif

// 16 bytes, for plain vector loads/stores (no <vector_types.h> under NVRTC without headers).
struct __align__(16) MeVec16 {
    unsigned x, y, z, w;
};

// cp.async bookkeeping, only where the loads are asynchronous (sm_80+, aligned tensors); the
// synchronous load paths need nothing but the barriers around them.
template <bool ASYNC>
__device__ __forceinline__ void me_commit() {
#if ME_SM80
    if (ASYNC) attn_cp_async_commit();
#endif
}
template <bool ASYNC, int N>
__device__ __forceinline__ void me_wait() {
#if ME_SM80
    if (ASYNC) attn_cp_async_wait<N>();
#endif
}


// Loads rows [row0, row0+ROWS) of a [seq, D] slice of 16-bit values into the swizzled tile at
// byte offset `tile`; rows >= seqlen and columns >= head_dim become zeros. ALIGNED (base,
// strides and head_dim·2 multiples of 16 bytes): 16-byte moves, asynchronous on sm_80+.
// Otherwise element by element, so no access crosses the end of a row.
template <int D, int ROWS, int THREADS, bool ALIGNED>
__device__ __forceinline__ void me_load_tile(unsigned char* smem, unsigned smem_addr, int tile,
                                             const unsigned short* base, long long row_stride, int row0, int seqlen,
                                             int head_dim) {
    constexpr int CH = D / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += THREADS) {
        const int r = i / CH, c = i % CH;
        const int row = row0 + r;
        const int off = tile + 2 * attn_swz<D>(r, c);
        const unsigned short* src = base + (long long)row * row_stride + c * 8;
        if (ALIGNED) {
            // head_dim is a multiple of 8 here, so a chunk is either wholly inside the row or past it.
            const bool ok = row < seqlen && c * 8 < head_dim;
#if ME_SM80
            attn_cp_async_16(smem_addr + off, ok ? src : base, ok);
#else
            MeVec16 v = {0u, 0u, 0u, 0u};
            if (ok) v = *reinterpret_cast<const MeVec16*>(src);
            *reinterpret_cast<MeVec16*>(smem + off) = v;
#endif
        } else {
            unsigned w[4] = {0u, 0u, 0u, 0u};
            if (row < seqlen) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    if (c * 8 + e < head_dim) w[e >> 1] |= (unsigned)src[e] << (16 * (e & 1));
                }
            }
            MeVec16 v = {w[0], w[1], w[2], w[3]};
            *reinterpret_cast<MeVec16*>(smem + off) = v;
        }
    }
}


// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (f16, bf16). A block has WM·WD warps: WM warps along the query rows (each
// 16·MT rows, so softmax statistics stay in the warp), WD warps along head_dim. With WD > 1
// (large D) each warp computes a partial S over its D/WD slice of Q·Kᵀ, the partials are summed
// through shared memory in a fixed order (so every warp of a row gets bit-identical scores and
// softmax state), and each warp accumulates only its D/WD output columns: the accumulator fits
// in registers at D = 512. KBUF = 2 double-buffers K (K(n+1) streams in during tile n).
// Shared memory: Q [BM][D], KBUF × K [BN][D], V [BN][D] (16-bit), and with WD > 1 the partial
// scores, WD·BM·BN f32.
// ---------------------------------------------------------------------------------------------
template <int D, int BN, int WM, int WD, int MT, int KBUF, bool BF16, bool ALIGNED>
__device__ __forceinline__ void me_fwd_tc(const AttnParams& p) {
    constexpr int BM = WM * 16 * MT;
    constexpr int THREADS = WM * WD * 32;
    constexpr int DW = D / WD;  // columns of Q·Kᵀ's reduction and of the output per warp
    constexpr bool ASYNC = ME_SM80 && ALIGNED;
    static_assert(D % 64 == 0 && DW % 16 == 0 && BN % 16 == 0, "tile shape");
    static_assert(KBUF == 1 || KBUF == 2, "K buffers");
    extern __shared__ __align__(128) unsigned char me_smem[];
    const unsigned sbase = attn_smem_addr(me_smem);
    constexpr int OFF_Q = 0;
    constexpr int OFF_K = 2 * BM * D;
    constexpr int OFF_V = OFF_K + KBUF * 2 * BN * D;
    constexpr int OFF_RED = OFF_V + 2 * BN * D;
    float* red = reinterpret_cast<float*>(me_smem + OFF_RED);

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int wm = warp % WM;
    const int wd = warp / WM;
    ATTN_TILE_SEQ(p)
    const int m0 = attn_heaviest_first_tile() * BM;
    ATTN_TILE_KEYS(p, BM, BN)
    ATTN_TILE_ROWS(p, wm, MT, DW)  // the warp's DW columns of head_dim

    if (nb_begin < nb_end) {
        me_load_tile<D, BM, THREADS, ALIGNED>(me_smem, sbase, OFF_Q, q, p.q_stride[1], m0, sq, p.head_dim);
        me_load_tile<D, BN, THREADS, ALIGNED>(me_smem, sbase, OFF_K, k, p.k_stride[1], nb_begin * BN, sk,
                                              p.head_dim);
        me_commit<ASYNC>();
    }
    for (int nb = nb_begin; nb < nb_end; ++nb) {
        const int offK = OFF_K + (KBUF == 2 ? ((nb - nb_begin) & 1) * 2 * BN * D : 0);
        const unsigned sK = sbase + offK;
        const unsigned sQ = sbase + OFF_Q;
        const unsigned sV = sbase + OFF_V;
        me_wait<ASYNC, 0>();
        // K(nb) (and Q) landed; every warp is done with V(nb-1), with the partial-score buffer
        // and (double buffering) with K(nb-1), whose buffer K(nb+1) now overwrites.
        __syncthreads();
        me_load_tile<D, BN, THREADS, ALIGNED>(me_smem, sbase, OFF_V, v, p.v_stride[1], nb * BN, sk, p.head_dim);
        me_commit<ASYNC>();
        if (KBUF == 2) {
            const int offK_next = OFF_K + (((nb - nb_begin) & 1) ^ 1) * 2 * BN * D;
            if (nb + 1 < nb_end)
                me_load_tile<D, BN, THREADS, ALIGNED>(me_smem, sbase, offK_next, k, p.k_stride[1], (nb + 1) * BN,
                                                      sk, p.head_dim);
            me_commit<ASYNC>();  // possibly empty: keeps the group count uniform
        }

        // S = Q·K(nb)ᵀ for this warp's 16·MT rows over its D slice; each K fragment serves MT
        // m-tiles.
        float s[MT][BN / 8][4];
        ATTN_MMA_SCORES(s, sQ, sK, warp_row0, lane, D, BN, MT, DW / 16, wd * (DW / 16), BF16)
        if (WD > 1) {
            // Sum the WD partial scores. Layout [wd][wm][t][i][e][lane]: each lane reads back its
            // own fragment positions, so no layout change and no bank conflicts.
            constexpr int PER = MT * (BN / 8) * 4 * 32;  // floats per (wd, wm)
#pragma unroll
            for (int t = 0; t < MT; ++t)
#pragma unroll
                for (int i = 0; i < BN / 8; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        red[(wd * WM + wm) * PER + ((t * (BN / 8) + i) * 4 + e) * 32 + lane] = s[t][i][e];
            __syncthreads();
#pragma unroll
            for (int t = 0; t < MT; ++t)
#pragma unroll
                for (int i = 0; i < BN / 8; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float sum = 0.f;
#pragma unroll
                        for (int w = 0; w < WD; ++w) sum += red[(w * WM + wm) * PER + ((t * (BN / 8) + i) * 4 + e) * 32 + lane];
                        s[t][i][e] = sum;
                    }
        }

        attn_variant_tile(p, s, lg.capped, nb * BN, sk, m0, kt, row_in_tile, lane);
        attn_online_softmax(s, row_max, row_sum, acc, lg.scale_log2);

        if (KBUF == 2) {
            me_wait<ASYNC, 1>();
        } else {
            me_wait<ASYNC, 0>();
        }
        // V(nb) landed (K(nb+1) may still be in flight); every warp is done with K(nb).
        __syncthreads();
        if (KBUF == 1 && nb + 1 < nb_end) {
            // One K buffer: K(nb+1) streams in during P·V(nb).
            me_load_tile<D, BN, THREADS, ALIGNED>(me_smem, sbase, OFF_K, k, p.k_stride[1], (nb + 1) * BN, sk,
                                                  p.head_dim);
            me_commit<ASYNC>();
        }
        ATTN_MMA_PV(acc, s, sV, lane, D, BN, MT, DW / 16, wd * (DW / 16), BF16)
    }
    me_wait<ASYNC, 0>();

    // Finish: full row sums, normalise, store this warp's DW columns; rows that saw no key are
    // zeros, lse -inf (written by the first column group).
#pragma unroll
    for (int t = 0; t < MT; ++t)
        attn_store_rows<DW, BF16, ALIGNED>(p, seq, o, acc[t], row_max[t], row_sum[t], m0 + row_in_tile + t * 16, lane, sq, lg.scale,
                                           wd * DW, wd == 0);
}

// ---------------------------------------------------------------------------------------------
// f32 SIMT kernel. G lanes (adjacent, within a warp) own one query row; lane g holds columns
// g, g+G, g+2G, ... of q and of the accumulator, so at each step the G lanes of a group read
// consecutive words of a K/V row (no bank conflicts; the other groups of the warp read the same
// words, a broadcast). Scores are reduced across the group with shuffles. K and V tiles [BN][D]
// f32 live in static shared memory (2·BN·D·4 <= 32 KiB). Exponentials and the soft-cap use the
// accurate f32 functions: this path promises 1e-4 relative error.
// ---------------------------------------------------------------------------------------------
template <int D, int G, int BN, int THREADS>
__device__ __forceinline__ void me_fwd_simt(const AttnParams& p) {
    constexpr int E = D / G;            // columns per lane
    constexpr int ROWS = THREADS / G;   // query rows per block
    static_assert(G <= 32 && (32 % G) == 0 && D % G == 0, "row groups must tile a warp");
    __shared__ float sK[BN * D];
    __shared__ float sV[BN * D];

    const int tid = threadIdx.x;
    const int g = tid % G;
    const int h = blockIdx.y;
    const AttnSeq seq = attn_seq(p, blockIdx.z, h);
    const int sq = seq.seqlen_q, sk = seq.seqlen_k;
    const int m0 = attn_heaviest_first_tile() * ROWS;
    if (m0 >= sq) return;  // varlen: past this sequence (uniform across the block)
    const int row = m0 + tid / G;
    const bool row_ok = row < sq;
    const AttnKeyTiles kt = attn_key_tiles(p, m0, ROWS, BN, sq, sk);

    const float* q = static_cast<const float*>(p.q) + seq.q;
    const float* k = static_cast<const float*>(p.k) + seq.k;
    const float* v = static_cast<const float*>(p.v) + seq.v;
    float* o = static_cast<float*>(p.o) + seq.o;
    const int hd = p.head_dim;

    float qv[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int c = g + G * e;
        qv[e] = (row_ok && c < hd) ? q[(long long)row * p.q_stride[1] + c] : 0.f;
        acc[e] = 0.f;
    }
    float row_max = attn_neg_inf(), row_sum = 0.f;
    const AttnLogits lg = attn_logits(p);
    const bool capped = lg.capped;
    const float logit_scale = lg.scale, scale_log2 = lg.scale_log2;
    const float pre = capped ? p.scale / p.softcap : 0.f;

    for (long long n0 = (long long)kt.nb_begin * BN; n0 < (long long)kt.nb_end * BN; n0 += BN) {
        __syncthreads();  // every group is done with the previous tile
        for (int i = tid; i < BN * D; i += THREADS) {
            const int j = i / D, c = i % D;
            const long long key = n0 + j;
            const bool ok = key < sk && c < hd;
            sK[i] = ok ? k[key * p.k_stride[1] + c] : 0.f;
            sV[i] = ok ? v[key * p.v_stride[1] + c] : 0.f;
        }
        __syncthreads();

        float s[BN];
        float mx = row_max;
#pragma unroll
        for (int j = 0; j < BN; ++j) {
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e) dot = fmaf(qv[e], sK[j * D + g + G * e], dot);
#pragma unroll
            for (int off = G / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
            if (capped) dot = p.softcap * attn_tanh(dot * pre);
            if (attn_masked(p, row, n0 + j, kt.diag, sk)) dot = attn_neg_inf();
            s[j] = dot;
            mx = attn_max(mx, dot);
        }
        // A row that has seen only masked keys keeps max -inf: base 0 avoids -inf - -inf.
        const float base = mx == attn_neg_inf() ? 0.f : mx * scale_log2;
        const float rescale = exp2f(row_max * scale_log2 - base);
        row_max = mx;
        row_sum *= rescale;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] *= rescale;
#pragma unroll
        for (int j = 0; j < BN; ++j) {
            const float pj = exp2f(s[j] * scale_log2 - base);
            row_sum += pj;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] = fmaf(pj, sV[j * D + g + G * e], acc[e]);
        }
    }

    if (row_ok) {
        const float inv = row_sum > 0.f ? 1.f / row_sum : 0.f;
        float* orow = o + (long long)row * p.o_stride[1];
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int c = g + G * e;
            if (c < hd) orow[c] = acc[e] * inv;
        }
        if (p.lse != nullptr && g == 0) {
            p.lse[seq.lse + row] = row_sum == 0.f ? attn_neg_inf() : row_max * logit_scale + logf(row_sum);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points, generated by build.rs from the kernel registry (src/registry.rs), which the host
// reads too for the launch shape and dynamic shared memory.
//
// Tensor-core specialisations: (D, BN, WM, WD, MT, KBUF) -> BM = WM·16·MT rows, WM·WD warps,
// shared bytes = (BM + (KBUF+1)·BN)·D·2 + (WD > 1 ? WD·BM·BN·4 : 0):
//   D  64: BN 64, 4×1 warps, MT 2, K double-buffered: BM 128, 40960 B
//   D 128: BN 32, 4×1 warps, MT 2, K double-buffered: BM 128, 57344 B
//   D 256: BN 16, 4×1 warps, MT 1, K double-buffered: BM  64, 57344 B
//   D 512: BN 16, 1×4 warps, MT 1, one K buffer:      BM  16, 53248 B
// Suffix _a: aligned (16-byte) loads/stores; _u: element-wise. bf16 tensor cores need sm_80:
// below it the bf16 entries exist (one module for every arch) but are empty; the host rejects
// bf16 there before any launch (Reason::DType).
//
// f32 specialisations: (D, G lanes per row, BN keys per tile, threads) -> THREADS/G rows per
// block, static shared memory 2·BN·D·4 bytes:
//   D 32: G 2, BN 32, 128 threads (64 rows),  8 KiB     D 256: G 16, BN 16, 256 threads (16 rows), 32 KiB
//   D 64: G 4, BN 32, 128 threads (32 rows), 16 KiB     D 512: G 32, BN  8, 256 threads ( 8 rows), 32 KiB
//   D 128: G 8, BN 32, 128 threads (16 rows), 32 KiB
// ---------------------------------------------------------------------------------------------
#include "mem_efficient_entries.cuh"
