// FlashAttention-2-style forward kernel for sm_80+ (f16, bf16): one block of 8 warps per
// (128-query-row tile, head, batch); each warp owns 16 query rows, so softmax statistics never
// leave the warp. K and V tiles stream through swizzled shared memory with cp.async; S = Q·Kᵀ
// and O += P·V run on mma.sync m16n8k16 with f32 accumulation, and P goes from the S
// accumulators straight into A fragments (it never touches shared memory).
//
// Masking (all optional, combined): keys past seqlen_k; causal, aligned bottom-right (row i
// sees key j iff j <= i + seqlen_k - seqlen_q); a sliding window [i + diag - left, i + diag +
// right]. Soft-capping replaces the scaled logit x by cap·tanh(x/cap). Rows that see no key
// produce zeros and lse = -inf.
#include "common.cuh"
#include "mma.cuh"

// Each warp owns MT m16 tiles (16·MT query rows), so every K/V fragment read from shared memory
// feeds MT tensor-core ops: shared-memory bandwidth, not the tensor cores, bounded the one-tile
// version (72 ldmatrix per 128 mma). Blocks have WARPS warps and BM = WARPS·16·MT rows.
// Loads rows [row0, row0+ROWS) of a [seq, D] slice into a swizzled tile; rows >= seqlen and
// chunks >= head_dim are zero-filled.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void flash_load_tile(unsigned tile_addr, const unsigned short* base, long long row_stride,
                                                int row0, int seqlen, int head_dim) {
    constexpr int CH = D / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += THREADS) {
        const int r = i / CH, c = i % CH;
        const int row = row0 + r;
        const bool ok = row < seqlen && c * 8 < head_dim;
        const unsigned short* src = ok ? base + (long long)row * row_stride + c * 8 : base;
        attn_cp_async_16(tile_addr + 2 * attn_swz<D>(r, c), src, ok);
    }
}

template <int D, int BN, int WARPS, int MT, bool BF16>
__device__ __forceinline__ void flash_fwd(const AttnParams& p) {
    constexpr int BM = WARPS * 16 * MT;
    constexpr int THREADS = WARPS * 32;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    // Shared-memory byte addresses, computed once: the hot loops then do plain integer math on
    // them instead of converting a generic pointer for every ldmatrix.
    const unsigned sQ = attn_smem_addr(flash_smem);
    // Two K buffers: K(n+1) streams in while tile n is computed, with one barrier fewer per tile.
    const unsigned sK0 = sQ + 2 * BM * D;
    const unsigned sV = sK0 + 2 * 2 * BN * D;

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int m0 = attn_heaviest_first_tile() * BM;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const AttnSeq seq = attn_seq(p, b, h);
    const int sq = seq.seqlen_q, sk = seq.seqlen_k;
    // A packed batch sizes the grid by its longest sequence: shorter ones have spare tiles.
    if (m0 >= sq) return;
    const AttnKeyTiles kt = attn_key_tiles(p, m0, BM, BN, sq, sk);
    const int nb_begin = kt.nb_begin, nb_end = kt.nb_end;

    const AttnOperands16 ops = attn_operands16(p, seq);
    const unsigned short *q = ops.q, *k = ops.k, *v = ops.v;
    unsigned short* o = ops.o;

    // This thread's rows (mma C-fragment layout): in m-tile t, lane/4 and lane/4 + 8 of the
    // tile's 16 rows, which start at warp_row0 + 16·t.
    const int warp_row0 = warp * 16 * MT;
    const int row_in_tile = warp_row0 + (lane >> 2);
    float acc[MT][D / 8][4], row_max[MT][2], row_sum[MT][2];
    attn_softmax_init(acc, row_max, row_sum);
    const AttnLogits lg = attn_logits(p);
    const bool capped = lg.capped;
    const float logit_scale = lg.scale, scale_log2 = lg.scale_log2;

    if (nb_begin < nb_end) {
        flash_load_tile<D, BM, THREADS>(sQ, q, p.q_stride[1], m0, sq, p.head_dim);
        flash_load_tile<D, BN, THREADS>(sK0, k, p.k_stride[1], nb_begin * BN, sk, p.head_dim);
        attn_cp_async_commit();
    }
    for (int nb = nb_begin; nb < nb_end; ++nb) {
        const unsigned sK = sK0 + ((nb - nb_begin) & 1) * 2 * BN * D;
        const unsigned sK_next = sK0 + (((nb - nb_begin) & 1) ^ 1) * 2 * BN * D;
        attn_cp_async_wait<0>();
        // K(nb) (and Q) landed; every warp is done with V(nb-1) and with K(nb-1), whose buffer
        // K(nb+1) now overwrites.
        __syncthreads();
        flash_load_tile<D, BN, THREADS>(sV, v, p.v_stride[1], nb * BN, sk, p.head_dim);
        attn_cp_async_commit();
        if (nb + 1 < nb_end) flash_load_tile<D, BN, THREADS>(sK_next, k, p.k_stride[1], (nb + 1) * BN, sk, p.head_dim);
        attn_cp_async_commit();  // possibly empty: keeps the group count uniform

        // S = Q·K(nb)ᵀ for this warp's 16·MT rows; each K fragment serves MT m-tiles.
        float s[MT][BN / 8][4];
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[t][i][0] = s[t][i][1] = s[t][i][2] = s[t][i][3] = 0.f;
        // Partly unrolled: a full unroll lets the compiler hoist every Q fragment at once, which
        // costs 64 registers at d=128 and pushes sm_100/sm_120 into spills.
#pragma unroll 2
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int t = 0; t < MT; ++t)
                attn_ldmatrix_x4(a[t], sQ + 2 * attn_swz<D>(warp_row0 + t * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
            for (int nt = 0; nt < BN / 16; ++nt) {
                unsigned bk[4];
                const int key = nt * 16 + ((lane >> 4) << 3) + (lane & 7);
                attn_ldmatrix_x4(bk, sK + 2 * attn_swz<D>(key, kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    attn_mma_16816<BF16>(s[t][2 * nt], a[t], bk[0], bk[1]);
                    attn_mma_16816<BF16>(s[t][2 * nt + 1], a[t], bk[2], bk[3]);
                }
            }
        }

        attn_variant_tile(p, s, capped, nb * BN, sk, m0, kt, row_in_tile, lane);
        attn_online_softmax(s, row_max, row_sum, acc, scale_log2);

        attn_cp_async_wait<1>();
        __syncthreads();  // V(nb) landed (K(nb+1) may still be in flight)
        // O += P·V(nb): two adjacent n8 tiles of S are one k16 A fragment of P; each V fragment
        // serves MT m-tiles.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int t = 0; t < MT; ++t) {
                a[t][0] = attn_pack2<BF16>(s[t][2 * kk][0], s[t][2 * kk][1]);
                a[t][1] = attn_pack2<BF16>(s[t][2 * kk][2], s[t][2 * kk][3]);
                a[t][2] = attn_pack2<BF16>(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);
                a[t][3] = attn_pack2<BF16>(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dt = 0; dt < D / 16; ++dt) {
                unsigned bv[4];
                const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                attn_ldmatrix_x4_trans(bv, sV + 2 * attn_swz<D>(key, dt * 2 + (lane >> 4)));
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    attn_mma_16816<BF16>(acc[t][2 * dt], a[t], bv[0], bv[1]);
                    attn_mma_16816<BF16>(acc[t][2 * dt + 1], a[t], bv[2], bv[3]);
                }
            }
        }
    }
    attn_cp_async_wait<0>();

    // Finish: full row sums, normalise, store; rows that saw no key are zeros, lse -inf.
#pragma unroll
    for (int t = 0; t < MT; ++t)
        attn_store_rows<D, BF16>(p, seq, o, acc[t], row_max[t], row_sum[t], m0 + row_in_tile + t * 16, lane, sq, logit_scale);
}

// The entry points: one instantiation of flash_fwd per (element type, head_dim) specialisation,
// generated by build.rs from the kernel registry (src/registry.rs: head_dim, keys per tile,
// warps, m16 tiles per warp), which the host reads too for the launch shape and shared memory (a
// Q tile, two K tiles and a V tile). The Hopper family is its own module, cuda/flash_hopper.cu.
#include "flash_entries.cuh"
