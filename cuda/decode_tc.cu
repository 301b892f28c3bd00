// Decode on tensor cores (sm_80+, f16 and bf16): the structure of cuda/decode.cu (GQA packing,
// split-KV with a device-side share of each sequence's keys, contiguous or paged K/V), with
// both products on mma.sync so that the instruction count per byte read stays far below what
// the memory system delivers. Each warp takes 16 keys at a time and computes transposed:
//
//   S^T[16 keys x 8 rows]  = K[16 keys x d] . Q^T[d x 8 rows]    (m16n8k16, keys are the m)
//   O^T[d x 8 rows]       += V^T[d x 16 keys] . P^T[16 keys x 8 rows]
//
// so the 8 packed query rows (the query heads of one KV head, times the query positions) are
// the n of both products and nothing is padded but rows a GQA group does not fill. Operands come
// straight from global memory into registers, in 16-byte loads: the dot product does not care
// in which order it visits the head dimension, so K's and Q's columns are permuted identically
// so that each lane's 16 bytes are its fragment (no shuffles); V's fragments pair two keys per
// register (one byte permute each); P^T is the score fragment transposed by movmatrix.
//
// Launch: block WARPS * 32 threads; grid (splits, kv_heads * row_groups, batch) with 8
// packed rows per row group; attn_decode_combine as in decode.cu.
#include "decode.cuh"

#define DTC_ROWS 8  // packed rows per block: the n of m16n8k16

// The 8x8 16-bit matrix a warp holds as mma fragments (lane 4g + t: row g, columns 2t, 2t + 1),
// transposed.
__device__ __forceinline__ unsigned dtc_transpose(unsigned x) {
    unsigned y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

// The K and V fragments of one warp step: U tiles of DEC_TILE keys. K rows g and g + 8, V keys
// 2t, 2t + 1, 2t + 8, 2t + 9 of each tile, in the column orders the products below take.
template <int HD, int U>
struct DtcFrags {
    unsigned kf[U][2][HD / 32][4];
    unsigned vf[U][4][HD / 64][4];
};

// Issues every load of the warp step at key0 (keys past the share load as zeros and are
// masked). `pg`: the step's tiles' pages (paged caches whose pages hold whole tiles).
template <class T, int HD, int U, bool EF>
__device__ __forceinline__ void dtc_load(const DecodeParams& p, int b, const T* kbase, const T* vbase, int kend, bool tiled, int key0,
                                         const DecPage (&pg)[U], DtcFrags<HD, U>& f) {
    constexpr int KC = HD / 32, VL = HD / 64;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int j = key0 + 16 * u + g + 8 * rr;
            const T* kp = kbase + (j >= kend ? 0 : tiled ? dec_page_row(p.k_stride, pg[u], g + 8 * rr) : dec_row(p, p.k_stride, b, j));
#pragma unroll
            for (int c = 0; c < KC; ++c) {
                f.kf[u][rr][c][0] = f.kf[u][rr][c][1] = f.kf[u][rr][c][2] = f.kf[u][rr][c][3] = 0u;
                if (j < kend && 32 * c + 8 * t < p.head_dim) dec_load16<EF>(kp + 32 * c + 8 * t, f.kf[u][rr][c]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const int j = key0 + 16 * u + 2 * t + (kk & 1) + 8 * (kk >> 1);
            const T* vp = vbase + (j >= kend ? 0 : tiled ? dec_page_row(p.v_stride, pg[u], j - key0 - 16 * u) : dec_row(p, p.v_stride, b, j));
#pragma unroll
            for (int x = 0; x < VL; ++x) {
                f.vf[u][kk][x][0] = f.vf[u][kk][x][1] = f.vf[u][kk][x][2] = f.vf[u][kk][x][3] = 0u;
                if (j < kend && 64 * x + 8 * g < p.head_dim) dec_load16<EF>(vp + 64 * x + 8 * g, f.vf[u][kk][x]);
            }
        }
    }
}

// The pages of the U tiles of the warp step at key0 (tiled paged caches; else unused).
template <int U>
__device__ __forceinline__ void dtc_pages(const DecodeParams& p, int b, int kend, bool tiled, int key0, DecPage (&pg)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int j0 = key0 + DEC_TILE * u;
        pg[u] = tiled ? dec_tile_page(p, b, j0, j0 < kend) : DecPage{0, 0};
    }
}

// One warp step on loaded fragments: S^T = K . Q^T, the online softmax of its 16U keys per
// row, O^T += V^T . P^T.
template <bool BF16, int HD, int U>
__device__ __forceinline__ void dtc_step(const DecodeParams& p, int key0, const DtcFrags<HD, U>& f, const unsigned (&qf)[HD / 32][4],
                                         const int (&jlo)[2], const int (&jhi)[2], float (&m)[2], float (&l)[2],
                                         float (&o)[HD / 16][4]) {
    constexpr int KC = HD / 32, MT = HD / 16;
    const int lane = threadIdx.x & 31, g = lane >> 2;
    // s[u][e] is key g + 8 (e >> 1) of tile u, packed row 2t + (e & 1).
    float s[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        s[u][0] = s[u][1] = s[u][2] = s[u][3] = 0.f;
#pragma unroll
        for (int c = 0; c < KC; ++c)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const unsigned a[4] = {f.kf[u][0][c][2 * h], f.kf[u][1][c][2 * h], f.kf[u][0][c][2 * h + 1], f.kf[u][1][c][2 * h + 1]};
                attn_mma_16816<BF16>(s[u], a, qf[c][2 * h], qf[c][2 * h + 1]);
            }
    }
    // Per row: logits, mask, the new maximum across the warp's 8 key groups, one rescale.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float mx = m[i];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int e = i; e < 4; e += 2) {
                const int j = key0 + 16 * u + g + 8 * (e >> 1);
                const float x = dec_logit(p, s[u][e]);
                s[u][e] = (j >= jlo[i] && j < jhi[i]) ? x : attn_neg_inf();
                mx = attn_max(mx, s[u][e]);
            }
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) mx = attn_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float base = mx == attn_neg_inf() ? 0.f : mx;
        const float alpha = attn_exp2(m[i] - base);  // 0 on the first keys (m = -inf)
        m[i] = mx;
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int e = i; e < 4; e += 2) {
                s[u][e] = attn_exp2(s[u][e] - base);  // masked: exp2(-inf) = 0
                sum += s[u][e];
            }
        l[i] = l[i] * alpha + sum;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            o[mt][i] *= alpha;
            o[mt][i + 2] *= alpha;
        }
    }
    // O^T += V^T . P^T. P^T's fragments are the score fragments transposed; V^T's pair keys
    // (2t, 2t + 1) and (2t + 8, 2t + 9) per register: low halves are head column 2i of the
    // lane's run, high halves column 2i + 1 (the m-tile's rows g and g + 8).
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const unsigned b0 = dtc_transpose(attn_pack2<BF16>(s[u][0], s[u][1]));
        const unsigned b1 = dtc_transpose(attn_pack2<BF16>(s[u][2], s[u][3]));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const unsigned k0 = f.vf[u][0][mt / 4][mt % 4], k1 = f.vf[u][1][mt / 4][mt % 4];
            const unsigned k8 = f.vf[u][2][mt / 4][mt % 4], k9 = f.vf[u][3][mt / 4][mt % 4];
            const unsigned a[4] = {__byte_perm(k0, k1, 0x5410), __byte_perm(k0, k1, 0x7632), __byte_perm(k8, k9, 0x5410),
                                   __byte_perm(k8, k9, 0x7632)};
            attn_mma_16816<BF16>(o[mt], a, b0, b1);
        }
    }
}

// A step's loads are all issued, then waited for: measured on the H200, a second register
// buffer that keeps the next step's loads in flight while a step computes (same registers, half
// the tiles per step) ran no faster at any decode shape, so the bytes in flight per SM are not
// what limits it.
// EF: streamed K/V loads. CLUSTER: the kernel holds the cluster merge (the host sets
// cluster_merge only for such kernels; without it d256 stays within its registers).
template <class D, bool BF16, int HD, int U, int WARPS, bool EF, bool CLUSTER>
__device__ __forceinline__ void dtc_kernel(const DecodeParams& p) {
    typedef typename D::storage T;
    constexpr int KC = HD / 32;  // K (and Q) loads per row per lane: 8 columns of each 32
    constexpr int MT = HD / 16;  // m-tiles of O^T
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const DecBlock blk = dec_block(p);
    if (blk.nrows <= 0) return;  // packed queries: this sequence has fewer rows (uniform per block)
    const DecSpan span = dec_span(p, blk);

    // Q^T fragments of packed row g. Column order: k-step 2c + h, fragment columns 2t, 2t + 1
    // (and 2t + 8, 2t + 9) are head columns 32c + 8t + 4h + (0, 1) (and + (2, 3)), so a lane's
    // 16 bytes at 32c + 8t hold its B fragments of two k-steps; K uses the same order.
    unsigned qf[KC][4];
    {
        const int pr = blk.row0 + (g < blk.nrows ? g : 0);
        const int qrow = pr / p.kv_group, qhead = blk.hk * p.kv_group + pr % p.kv_group;
        const T* qp = (const T*)p.q + dec_qrow(p, p.q_stride, blk.b, blk.seq, qrow) + (long long)qhead * p.q_stride[2];
#pragma unroll
        for (int c = 0; c < KC; ++c) {
            qf[c][0] = qf[c][1] = qf[c][2] = qf[c][3] = 0u;
            if (g < blk.nrows && 32 * c + 8 * t < p.head_dim) dec_load16(qp + 32 * c + 8 * t, qf[c]);
        }
    }
    // This lane's score columns are packed rows 2t and 2t + 1: the keys each sees.
    int jlo[2], jhi[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = 2 * t + i;
        dec_row_keys(p, span, (blk.row0 + (r < blk.nrows ? r : 0)) / p.kv_group, r < blk.nrows, jlo[i], jhi[i]);
    }

    // O^T accumulators: o[mt][0 | 2] are rows 2t, o[mt][1 | 3] rows 2t + 1, at head columns
    // 64 (mt / 4) + 8g + 2 (mt % 4) + (0 | 1): V's lane order.
    float o[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
    float m[2] = {attn_neg_inf(), attn_neg_inf()}, l[2] = {0.f, 0.f};

    const T* kbase = (const T*)p.k + (long long)blk.hk * p.k_stride[2];
    const T* vbase = (const T*)p.v + (long long)blk.hk * p.v_stride[2];
    const int kend = (int)span.k_end, b = blk.b;
    constexpr int STEP = WARPS * DEC_TILE * U;  // keys the block advances per warp step
    // A paged cache whose pages hold whole tiles (span starts are tile-aligned): one table read
    // per tile, issued a step before the loads that need it. Other page sizes read the table
    // per key (dec_row).
    const bool tiled = p.block_table != nullptr && p.page_size % DEC_TILE == 0;
    const int first = (int)span.k_begin + warp * DEC_TILE * U;
    // Warp-uniform trip count: mma and the shuffles need every lane.
    {
        DtcFrags<HD, U> f;
        DecPage pg[U], next[U];
        dtc_pages(p, b, kend, tiled, first, pg);
        for (int key0 = first; key0 < kend; key0 += STEP) {
            dtc_pages(p, b, kend, tiled, key0 + STEP, next);
            dtc_load<T, HD, U, EF>(p, b, kbase, vbase, kend, tiled, key0, pg, f);
            dtc_step<BF16, HD, U>(p, key0, f, qf, jlo, jhi, m, l, o);
#pragma unroll
            for (int u = 0; u < U; ++u) pg[u] = next[u];
        }
    }

    // Each row's sum over the warp's key groups (the maximum is already warp-wide).
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) l[i] += __shfl_xor_sync(0xffffffffu, l[i], off);

    __shared__ float s_acc[WARPS][DTC_ROWS][HD];
    __shared__ float s_ml[WARPS][DTC_ROWS][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s_acc[warp][2 * t + (e & 1)][64 * (mt / 4) + 8 * g + 2 * (mt % 4) + (e >> 1)] = o[mt][e];
    if (g == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            s_ml[warp][2 * t + i][0] = m[i];
            s_ml[warp][2 * t + i][1] = l[i];
        }
    }
    __syncthreads();
    if (CLUSTER && p.cluster_merge)
        dec_cluster_store<D, HD, DTC_ROWS, WARPS>(p, s_acc, s_ml, blk);
    else
        dec_store<D, HD, DTC_ROWS, WARPS>(p, s_acc, s_ml, blk);
}

// The entry points (tiles per warp step per head_dim: 16 KiB of K/V in flight per warp at d64
// and d128, one tile at d256), generated from the kernel registry (src/registry.rs) by build.rs.
#include "decode_tc_entries.cuh"
