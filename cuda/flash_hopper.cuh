// The flash kernel's Hopper family (sm_90a only): the same algorithm, masking and numerics as
// flash_fwd in flash.cu, with the two matrix products on warpgroup MMAs (wgmma) instead of
// mma.sync. Included by flash_hopper.cu, which is built for sm_90a only.
//
// A block is WGS warpgroups (128·WGS threads); each owns 64 query rows, so BM = 64·WGS and the
// softmax statistics never leave a warpgroup (each row lives in the four lanes of one quad, as with
// mma.sync). Per key tile: S = Q·Kᵀ is a wgmma with both operands in shared memory; P is packed
// from the S accumulators into registers, which is exactly the A-operand layout of the next
// wgmma, O += P·V, whose B operand (V, row-major) is read MN-major (transposed by the hardware).
// K and V tiles are double-buffered: the next tiles stream in with cp.async while the current
// ones compute, and softmax(n) runs while the tensor cores do P(n-1)·V(n-1) (see the loop).
//
// Shared-memory tiles use the canonical 128-byte-swizzle layout wgmma reads: a [rows][D] tile is
// stored as D/64 column blocks of [rows][64], each row 128 bytes with its 16-byte chunks XORed by
// row % 8, every block 1024-byte aligned.
#pragma once
#include "wgmma.cuh"

// Element offset of (row, 16-byte chunk) in a [ROWS][D] tile in the wgmma 128B-swizzle layout.
template <int ROWS>
__device__ __forceinline__ int hop_swz(int row, int chunk) {
    return (chunk >> 3) * ROWS * 64 + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

// Loads rows [row0, row0+ROWS) of a [seq, D] slice into a tile in wgmma's 128-byte swizzle
// (hop_swz); rows >= seqlen and chunks >= head_dim are zero-filled.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void hop_load_tile(unsigned tile_addr, const unsigned short* base, long long row_stride,
                                              int row0, int seqlen, int head_dim) {
    attn_load_tile<D, ROWS, THREADS, 4>(tile_addr, base, row_stride, row0, seqlen, head_dim,
                                        [](int r, int c) { return hop_swz<ROWS>(r, c); });
}

// A wgmma shared-memory matrix descriptor: 128-byte swizzle, leading/stride byte offsets.
__device__ __forceinline__ unsigned long long hop_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// Makes this thread's finished cp.async writes visible to the tensor cores' (async) proxy.
__device__ __forceinline__ void hop_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int N, bool BF16>
__device__ __forceinline__ void hop_mma_ss(float (&d)[N / 2], unsigned long long a, unsigned long long b, int acc) {
    if constexpr (N == 64) {
        if (BF16) attn_wgmma_ss_m64n64_bf16(d, a, b, acc); else attn_wgmma_ss_m64n64_f16(d, a, b, acc);
    } else {
        static_assert(N == 128, "S tiles are 64 or 128 keys wide");
        if (BF16) attn_wgmma_ss_m64n128_bf16(d, a, b, acc); else attn_wgmma_ss_m64n128_f16(d, a, b, acc);
    }
}

template <int N, bool BF16>
__device__ __forceinline__ void hop_mma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long b) {
    if constexpr (N == 64) {
        if (BF16) attn_wgmma_rs_m64n64_bf16(d, a, b); else attn_wgmma_rs_m64n64_f16(d, a, b);
    } else if constexpr (N == 128) {
        if (BF16) attn_wgmma_rs_m64n128_bf16(d, a, b); else attn_wgmma_rs_m64n128_f16(d, a, b);
    } else {
        static_assert(N == 256, "head_dim is 64, 128 or 256");
        if (BF16) attn_wgmma_rs_m64n256_bf16(d, a, b); else attn_wgmma_rs_m64n256_f16(d, a, b);
    }
}

// ---------------------------------------------------------------------------------------------
// Per-tile steps shared by both Hopper kernels (flash_hopper_fwd below and the warp-specialised
// flash_hopper_ws_fwd in flash_hopper_ws.cuh). A warpgroup owns 64 query rows; in the wgmma
// accumulator layout a thread holds two rows (lane/4 and lane/4 + 8 of its warp's 16) and, per
// 8-column chunk i, columns 8i + 2(lane%4) + {0, 1} of each: elements [4i + 2r + {0, 1}].
// ---------------------------------------------------------------------------------------------

// S = Q·Kᵀ for one warpgroup: D/16 k-steps, both operands K-major in shared memory; within a
// 64-wide column block a k16 step is 32 bytes on, and 8 rows of 128 bytes (1024 bytes) separate
// row groups. `q_rows` is the warpgroup's first Q row in a [QROWS][D] tile.
template <int D, int BN, int QROWS, bool BF16>
__device__ __forceinline__ void hop_issue_s(float (&s)[BN / 2], unsigned q_rows, unsigned sK) {
    attn_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned blk = kk >> 2, off = (kk & 3) * 32;
        const unsigned long long da = hop_desc(q_rows + blk * QROWS * 128 + off, 16, 1024);
        const unsigned long long db = hop_desc(sK + blk * BN * 128 + off, 16, 1024);
        hop_mma_ss<BN, BF16>(s, da, db, kk > 0);
    }
    attn_wgmma_commit();
}

// O += P·V: V is the B operand, MN-major (its 64-wide column blocks are BN·128 bytes apart);
// each k16 step is 16 keys = 2048 bytes down every column block.
template <int D, int BN, bool BF16>
__device__ __forceinline__ void hop_issue_pv(float (&acc)[D / 2], const unsigned (&pa)[BN / 16][4], unsigned sV) {
    attn_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) hop_mma_rs<D, BF16>(acc, pa[kk], hop_desc(sV + kk * 16 * 128, BN * 128, 1024));
    attn_wgmma_commit();
}

// Soft-capping and masking of one S tile (keys [n0, n0 + BN)) for this thread's two rows: row0
// (absolute) and row0 + 8. Rows [m0, m_last] are the block's.
template <int BN>
__device__ __forceinline__ void hop_cap_and_mask(const AttnParams& p, float (&s)[BN / 2], int n0, int m0, long long m_last,
                                                 int row0, int lane, int sk, long long diag) {
    if (p.softcap > 0.f) {
        const float pre = p.scale / p.softcap;
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) s[i] = p.softcap * attn_tanh(s[i] * pre);
    }
    if (attn_tile_needs_mask(p, n0, BN, sk, m0, m_last, diag)) {
        // Each of the two rows sees keys [lo, hi]: bounds worked out once in 64-bit, then plain
        // int compares per element.
        int lo[2], hi[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const long long lim = (long long)row0 + r * 8 + diag;  // diagonal key
            long long l = 0, u = sk - 1;
            if (p.causal) u = min(u, lim);
            if (p.window_right >= 0) u = min(u, lim + p.window_right);
            if (p.window_left >= 0) l = max(l, lim - p.window_left);
            lo[r] = (int)min(l, (long long)sk);
            hi[r] = (int)max(u, -1ll);
        }
#pragma unroll
        for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n0 + i * 8 + (lane & 3) * 2 + (e & 1);
                if (col < lo[e >> 1] || col > hi[e >> 1]) s[i * 4 + e] = attn_neg_inf();
            }
    }
}

// Online softmax of one tile in base 2, fully masked rows guarded: s becomes exp2(s·scale − max),
// the running max and sum move on, and rescale[r] is the factor row r of O must take.
template <int BN>
__device__ __forceinline__ void hop_softmax(float (&s)[BN / 2], float (&row_max)[2], float (&row_sum)[2],
                                            float (&rescale)[2], float scale_log2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = row_max[r];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) mx = attn_max(mx, attn_max(s[i * 4 + 2 * r], s[i * 4 + 2 * r + 1]));
        mx = attn_max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = attn_max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base_r = mx == attn_neg_inf() ? 0.f : mx * scale_log2;
        rescale[r] = attn_exp2(row_max[r] * scale_log2 - base_r);
        row_max[r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            s[i * 4 + 2 * r] = attn_exp2(s[i * 4 + 2 * r] * scale_log2 - base_r);
            s[i * 4 + 2 * r + 1] = attn_exp2(s[i * 4 + 2 * r + 1] * scale_log2 - base_r);
            sum += s[i * 4 + 2 * r] + s[i * 4 + 2 * r + 1];
        }
        row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
}

// P as wgmma A fragments: key chunks 2kk and 2kk+1 (8 wide each) make one k16 step.
template <int BN, bool BF16>
__device__ __forceinline__ void hop_pack_p(const float (&s)[BN / 2], unsigned (&pa)[BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = attn_pack2<BF16>(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1]);
        pa[kk][1] = attn_pack2<BF16>(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3]);
        pa[kk][2] = attn_pack2<BF16>(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1]);
        pa[kk][3] = attn_pack2<BF16>(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3]);
    }
}

// O *= rescale per row. Once the row maxima settle (most tiles of a long row) the factor is
// exactly 1: the multiplies are skipped when no row of the warp moved.
template <int D>
__device__ __forceinline__ void hop_rescale(float (&acc)[D / 2], const float (&rescale)[2]) {
    if (!__all_sync(0xffffffffu, rescale[0] == 1.f && rescale[1] == 1.f)) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            acc[i * 4 + 0] *= rescale[0];
            acc[i * 4 + 1] *= rescale[0];
            acc[i * 4 + 2] *= rescale[1];
            acc[i * 4 + 3] *= rescale[1];
        }
    }
}

// The epilogue (attn_store_rows in mma.cuh) over a wgmma accumulator: the same layout as
// mma.sync's, held flat.
template <int D, bool BF16>
__device__ __forceinline__ void hop_store_rows(const AttnParams& p, const AttnSeq& seq, unsigned short* o,
                                               const float (&acc)[D / 2], const float (&row_max)[2],
                                               const float (&row_sum)[2], int row0, int lane, int sq, float logit_scale) {
    attn_store_rows<D, BF16>(p, seq, o, reinterpret_cast<const float(&)[D / 8][4]>(acc), row_max, row_sum, row0, lane, sq,
                             logit_scale);
}

template <int D, int BN, int WGS, bool BF16>
__device__ __forceinline__ void flash_hopper_fwd(const AttnParams& p) {
    constexpr int BM = 64 * WGS;
    constexpr int THREADS = 128 * WGS;
    extern __shared__ __align__(1024) unsigned char hop_smem[];
    // wgmma's swizzle is anchored to 1024-byte boundaries: align the base (the launch adds 1 KiB).
    const unsigned base = (attn_smem_addr(hop_smem) + 1023u) & ~1023u;
    const unsigned sQ = base;
    const unsigned sK0 = sQ + BM * D * 2;  // two K buffers, then two V buffers
    const unsigned sV0 = sK0 + 2 * BN * D * 2;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int wg = tid >> 7;            // warpgroup: query rows [64·wg, 64·wg + 64) of the tile
    const int warp_in_wg = (tid >> 5) & 3;
    const int m0 = attn_heaviest_first_tile() * BM;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const AttnSeq seq = attn_seq(p, b, h);
    const int sq = seq.seqlen_q, sk = seq.seqlen_k;
    if (m0 >= sq) return;  // a packed batch's shorter sequences have spare tiles
    const AttnKeyTiles kt = attn_key_tiles(p, m0, BM, BN, sq, sk);
    const int nb_begin = kt.nb_begin, nb_end = kt.nb_end;

    const AttnOperands16 ops = attn_operands16(p, seq);
    const unsigned short *q = ops.q, *k = ops.k, *v = ops.v;
    unsigned short* o = ops.o;

    // This thread's rows (wgmma accumulator layout): warp w of the warpgroup holds rows 16w..16w+15
    // of its 64; lane/4 and lane/4 + 8 of those.
    const int row_in_tile = wg * 64 + warp_in_wg * 16 + (lane >> 2);
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    float row_max[2] = {attn_neg_inf(), attn_neg_inf()};
    float row_sum[2] = {0.f, 0.f};
    const AttnLogits lg = attn_logits(p);
    const float logit_scale = lg.scale, scale_log2 = lg.scale_log2;

    // Software pipeline within a warpgroup. Iteration n enters with S(n) = Q·K(n)ᵀ done and issues
    // O += P(n-1)·V(n-1), computes softmax(n) while the tensor cores work on it, packs P(n), then
    // issues S(n+1) and rescales O while that runs. Each asynchronous stage ends with a full wait,
    // and no accumulator of a wgmma in flight is touched, so ptxas keeps the wgmmas pipelined
    // (with FlashAttention-3's wait<1> overlap it serialises them: warning C7515).
    // Tiles in flight during iteration n: K(n+1) and V(n); resident: K(n) (done) and V(n-1).
    const unsigned q_wg = sQ + wg * 64 * 128;
    const auto issue_s = [&](unsigned sK, float (&s)[BN / 2]) { hop_issue_s<D, BN, BM, BF16>(s, q_wg, sK); };
    const auto issue_pv = [&](unsigned sV, const unsigned (&pa)[BN / 16][4]) { hop_issue_pv<D, BN, BF16>(acc, pa, sV); };
    const auto k_buf = [&](int n) { return sK0 + ((n - nb_begin) & 1) * BN * D * 2; };
    const auto v_buf = [&](int n) { return sV0 + ((n - nb_begin) & 1) * BN * D * 2; };

    float s[BN / 2];
    unsigned pa[BN / 16][4];  // P(n-1): the A operand of the pending P·V
    if (nb_begin < nb_end) {
        hop_load_tile<D, BM, THREADS>(sQ, q, p.q_stride[1], m0, sq, p.head_dim);
        hop_load_tile<D, BN, THREADS>(k_buf(nb_begin), k, p.k_stride[1], nb_begin * BN, sk, p.head_dim);
        attn_cp_async_commit();
        attn_cp_async_wait<0>();
        hop_fence_proxy_async();
        __syncthreads();
        hop_load_tile<D, BN, THREADS>(v_buf(nb_begin), v, p.v_stride[1], nb_begin * BN, sk, p.head_dim);
        if (nb_begin + 1 < nb_end)
            hop_load_tile<D, BN, THREADS>(k_buf(nb_begin + 1), k, p.k_stride[1], (nb_begin + 1) * BN, sk, p.head_dim);
        attn_cp_async_commit();
        issue_s(k_buf(nb_begin), s);
        attn_wgmma_wait<0>();
        attn_wgmma_fence_operands(s);
    }
    for (int nb = nb_begin; nb < nb_end; ++nb) {
        const bool pending_pv = nb > nb_begin;
        if (pending_pv) issue_pv(v_buf(nb - 1), pa);

        const int n0 = nb * BN;
        hop_cap_and_mask<BN>(p, s, n0, m0, kt.m_last, m0 + row_in_tile, lane, sk, kt.diag);
        float rescale[2];
        hop_softmax<BN>(s, row_max, row_sum, rescale, scale_log2);
        // Unconditional waits (a no-op when nothing is pending): with a wait under a branch,
        // ptxas cannot prove the accumulators idle afterwards and serialises every wgmma in the
        // kernel (C7514).
        attn_wgmma_wait<0>();
        attn_wgmma_fence_operands(acc);
        hop_pack_p<BN, BF16>(s, pa);

        // K(nb+1) and V(nb) landed for every thread; every warpgroup is done with K(nb) and
        // V(nb-1), whose buffers K(nb+2) and V(nb+1) now take.
        attn_cp_async_wait<0>();
        hop_fence_proxy_async();
        __syncthreads();
        if (nb + 2 < nb_end) hop_load_tile<D, BN, THREADS>(k_buf(nb + 2), k, p.k_stride[1], (nb + 2) * BN, sk, p.head_dim);
        if (nb + 1 < nb_end) hop_load_tile<D, BN, THREADS>(v_buf(nb + 1), v, p.v_stride[1], (nb + 1) * BN, sk, p.head_dim);
        attn_cp_async_commit();
        const bool next = nb + 1 < nb_end;
        if (next) issue_s(k_buf(nb + 1), s);

        attn_wgmma_wait<0>();
        attn_wgmma_fence_operands(s);
        hop_rescale<D>(acc, rescale);
    }
    if (nb_begin < nb_end) {
        // The last tile's P·V (V(last) landed at the last iteration's barrier).
        issue_pv(v_buf(nb_end - 1), pa);
        attn_wgmma_wait<0>();
        attn_wgmma_fence_operands(acc);
    }
    attn_cp_async_wait<0>();

    hop_store_rows<D, BF16>(p, seq, o, acc, row_max, row_sum, m0 + row_in_tile, lane, sq, logit_scale);
}
