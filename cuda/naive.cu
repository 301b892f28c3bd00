// Naive (materialised-scores) attention: S = scale * Q K^T, P = softmax(S), O = P V.
//
// Three kernels per chunk of (batch, head) pairs and query rows, with an f32
// workspace `s` of bh_count * row_count * seqlen_k floats, indexed
// ((bh - bh_start) * row_count + r) * seqlen_k + j. Used as the always-works
// reference path (any head_dim, any arch, any stride) and for debugging.
//
// Launch configurations (the runtime launches exactly these; grids are rounded
// up and every index is guarded):
//   attn_naive_scores_<t>: block (16,16,1), grid (ceil(seqlen_k/16), ceil(row_count/16), bh_count)
//   attn_naive_softmax:    block (256,1,1), grid (ceil(row_count/8), bh_count, 1)
//   attn_naive_pv_<t>:     block (16,16,1), grid (ceil(head_dim/16), ceil(row_count/16), bh_count)
#include "common.cuh"

#define NAIVE_TILE 16
#define NAIVE_SOFTMAX_WARPS 8

// The (batch, head) pair of this block: blockIdx.z indexes the chunk's pairs.
struct NaiveHead {
    int zb;       // chunk-relative pair index (workspace slab)
    long long b;  // batch·heads may pass 2^31, so the batch is computed in 64 bits
    int h;
    int hk;  // kv head
};
__device__ __forceinline__ NaiveHead naive_head(const NaiveParams& p) {
    NaiveHead n;
    n.zb = blockIdx.z;
    const long long bh = p.bh_start + n.zb;
    n.b = bh / p.heads;
    n.h = (int)(bh % p.heads);
    n.hk = n.h / p.kv_group;
    return n;
}

// A scores or P·V block's tile: pair blockIdx.z of the chunk (`nh`), chunk rows r0.. by
// blockIdx.y and columns c0.. by blockIdx.x (keys for the scores, head_dim for P·V); this
// thread's row r = r0 + threadIdx.y (`row` in the whole sequence) and column c = c0 + threadIdx.x.
struct NaiveTile {
    NaiveHead nh;
    int r0, c0, r, c;
    long long row;
};
// false: the whole block is out of range (uniform across it, so it returns before any barrier).
__device__ __forceinline__ bool naive_tile(const NaiveParams& p, int columns, NaiveTile& t) {
    if ((int)blockIdx.z >= p.bh_count) return false;
    t.nh = naive_head(p);
    t.r0 = blockIdx.y * NAIVE_TILE;
    t.c0 = blockIdx.x * NAIVE_TILE;
    if (t.r0 >= p.row_count || t.c0 >= columns) return false;
    t.r = t.r0 + threadIdx.y;
    t.c = t.c0 + threadIdx.x;
    t.row = (long long)p.row_start + t.r;
    return true;
}

// The last key (inclusive) any row of the 16-row tile starting at chunk row r0 may see under the
// causal mask or the right window; seqlen_k - 1 when neither applies. Uniform across a block, so
// whole tiles past it are skipped without divergence.
__device__ __forceinline__ long long naive_tile_last_key(const NaiveParams& p, int r0) {
    if (!p.causal && p.window_right < 0) return (long long)p.seqlen_k - 1;
    int r_last = r0 + NAIVE_TILE - 1;
    if (r_last > p.row_count - 1) r_last = p.row_count - 1;
    long long last = attn_causal_last_key((long long)p.row_start + r_last, p.seqlen_q, p.seqlen_k);
    if (!p.causal) last += p.window_right;  // with causal too, the window's right side is moot
    return last;
}

// ---------------------------------------------------------------------------
// 1. Scores: s[r, j] = scale * dot(q[b, row, h, :], k[b, j, hk, :]), or -inf
//    where the causal mask hides key j. threadIdx.x -> key, threadIdx.y -> row.
// ---------------------------------------------------------------------------
template <class D>
__device__ __forceinline__ void naive_scores(const NaiveParams& p, const typename D::storage* __restrict__ q,
                                             const typename D::storage* __restrict__ k, float* __restrict__ s) {
    __shared__ float qs[NAIVE_TILE][NAIVE_TILE + 1];  // [row][d]
    __shared__ float ks[NAIVE_TILE][NAIVE_TILE + 1];  // [key][d]

    NaiveTile t;  // columns: keys
    if (!naive_tile(p, p.seqlen_k, t)) return;
    const int tx = threadIdx.x, ty = threadIdx.y, r0 = t.r0, j0 = t.c0, r = t.r, j = t.c;
    const long long row = t.row;
    const bool out_ok = r < p.row_count && row < p.seqlen_q && j < p.seqlen_k;
    const long long s_idx = ((long long)t.nh.zb * p.row_count + r) * (long long)p.seqlen_k + j;

    const float neg_inf = attn_neg_inf();
    if ((long long)j0 > naive_tile_last_key(p, r0)) {
        // No row of this tile sees any key of it.
        if (out_ok) s[s_idx] = neg_inf;
        return;
    }

    // Rows/keys this thread loads (the tile is loaded transposed for keys:
    // thread (tx, ty) loads element d0+tx of row r0+ty and of key j0+ty).
    const long long load_row = (long long)p.row_start + r0 + ty;
    const bool q_ok = (r0 + ty) < p.row_count && load_row < p.seqlen_q;
    const bool k_ok = (j0 + ty) < p.seqlen_k;
    const typename D::storage* q_ptr =
        q + t.nh.b * p.q_stride[0] + load_row * p.q_stride[1] + (long long)t.nh.h * p.q_stride[2];
    const typename D::storage* k_ptr =
        k + t.nh.b * p.k_stride[0] + (long long)(j0 + ty) * p.k_stride[1] + (long long)t.nh.hk * p.k_stride[2];

    float acc = 0.0f;
    for (int d0 = 0; d0 < p.head_dim; d0 += NAIVE_TILE) {
        const int d = d0 + tx;
        const bool d_ok = d < p.head_dim;
        qs[ty][tx] = (q_ok && d_ok) ? D::to_f32(q_ptr[d]) : 0.0f;
        ks[ty][tx] = (k_ok && d_ok) ? D::to_f32(k_ptr[d]) : 0.0f;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < NAIVE_TILE; ++kk) {
            acc = fmaf(qs[ty][kk], ks[tx][kk], acc);
        }
        __syncthreads();
    }

    if (out_ok) {
        float v = acc * p.scale;
        if (p.softcap > 0.f) v = p.softcap * attn_tanh(v / p.softcap);
        if (!attn_key_visible(row, j, p.seqlen_q, p.seqlen_k, p.causal, p.window_left, p.window_right)) v = neg_inf;
        s[s_idx] = v;
    }
}

// ---------------------------------------------------------------------------
// 2. Softmax, in place, one warp per row. Fully masked rows (max == -inf, or
//    seqlen_k == 0) become zeros with lse = -inf; never NaN for finite scores.
// ---------------------------------------------------------------------------
// `lane` and `warp` come from the entry, which reads threadIdx.x where its __launch_bounds__
// bounds it (so the compiler knows warp < NAIVE_SOFTMAX_WARPS).
__device__ __forceinline__ void naive_softmax(const NaiveParams& p, float* __restrict__ s, float* __restrict__ lse,
                                              const int lane, const int warp) {
    const int zb = blockIdx.y;
    const int r = blockIdx.x * NAIVE_SOFTMAX_WARPS + warp;
    if (zb >= p.bh_count || r >= p.row_count) return;  // whole warp exits together
    const long long row = (long long)p.row_start + r;
    if (row >= p.seqlen_q) return;
    const long long bh = (long long)p.bh_start + zb;
    const int n = p.seqlen_k;
    float* srow = s + ((long long)zb * p.row_count + r) * (long long)n;

    const float neg_inf = attn_neg_inf();
    float m = neg_inf;
    for (int j = lane; j < n; j += ATTN_WARP_SIZE) m = attn_max(m, srow[j]);
    m = attn_warp_max(m);

    if (m == neg_inf) {
        for (int j = lane; j < n; j += ATTN_WARP_SIZE) srow[j] = 0.0f;
        if (lse != nullptr && lane == 0) lse[bh * p.seqlen_q + row] = neg_inf;
        return;
    }

    float sum = 0.0f;
    for (int j = lane; j < n; j += ATTN_WARP_SIZE) {
        const float e = expf(srow[j] - m);  // exp(-inf - finite) = 0
        srow[j] = e;
        sum += e;
    }
    sum = attn_warp_sum(sum);  // >= 1: the max element contributes exp(0)
    const float inv = 1.0f / sum;
    for (int j = lane; j < n; j += ATTN_WARP_SIZE) srow[j] *= inv;
    if (lse != nullptr && lane == 0) lse[bh * p.seqlen_q + row] = m + logf(sum);
}

// ---------------------------------------------------------------------------
// 3. Output: o[b, row, h, d] = sum_j s[r, j] * v[b, j, hk, d], in f32, rounded
//    to the element type. threadIdx.x -> d, threadIdx.y -> row.
// ---------------------------------------------------------------------------
template <class D>
__device__ __forceinline__ void naive_pv(const NaiveParams& p, const float* __restrict__ s,
                                         const typename D::storage* __restrict__ v,
                                         typename D::storage* __restrict__ o) {
    __shared__ float ps[NAIVE_TILE][NAIVE_TILE + 1];  // [row][key]
    __shared__ float vs[NAIVE_TILE][NAIVE_TILE + 1];  // [key][d]

    NaiveTile t;  // columns: head_dim
    if (!naive_tile(p, p.head_dim, t)) return;
    const bool row_ok = t.r < p.row_count && t.row < p.seqlen_q;
    const int tx = threadIdx.x, ty = threadIdx.y, r0 = t.r0, r = t.r, d = t.c;
    const long long row = t.row;
    const bool d_ok = d < p.head_dim;

    // Keys past the last one any row of this tile can see have p == 0: skip them.
    long long j_end = naive_tile_last_key(p, r0) + 1;
    if (j_end > p.seqlen_k) j_end = p.seqlen_k;

    const float* s_row = s + ((long long)t.nh.zb * p.row_count + r) * (long long)p.seqlen_k;
    const typename D::storage* v_base = v + t.nh.b * p.v_stride[0] + (long long)t.nh.hk * p.v_stride[2] + d;

    float acc = 0.0f;
    for (long long j0 = 0; j0 < j_end; j0 += NAIVE_TILE) {
        // ps[ty][tx] = p[r0+ty, j0+tx]; vs[ty][tx] = v[j0+ty, d0+tx]; zero-filled
        // outside the valid range so that no garbage is ever multiplied.
        const long long jp = j0 + tx;
        const long long jv = j0 + ty;
        ps[ty][tx] = (row_ok && jp < j_end) ? s_row[jp] : 0.0f;
        vs[ty][tx] = (d_ok && jv < j_end) ? D::to_f32(v_base[jv * p.v_stride[1]]) : 0.0f;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < NAIVE_TILE; ++kk) {
            acc = fmaf(ps[ty][kk], vs[kk][tx], acc);
        }
        __syncthreads();
    }

    if (row_ok && d_ok) {
        const long long o_idx =
            t.nh.b * p.o_stride[0] + row * p.o_stride[1] + (long long)t.nh.h * p.o_stride[2] + d;
        o[o_idx] = D::from_f32(acc);
    }
}

// ---------------------------------------------------------------------------
// Entry points (attn_naive_scores_<t>, attn_naive_softmax, attn_naive_pv_<t>), generated by
// build.rs from the kernel registry (src/registry.rs), which also checks NAIVE_TILE and
// NAIVE_SOFTMAX_WARPS against its launch shapes.
// ---------------------------------------------------------------------------
#include "naive_entries.cuh"
