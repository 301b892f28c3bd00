// Attention over a KV cache (decode, speculative decoding, short chunks): a few query rows per
// sequence against a long cache, contiguous or paged. FlashDecoding's structure:
//
//  * GQA packing: one block takes the query heads of one KV head (times the query positions),
//    so every K/V row is read from memory once per KV head, not once per query head.
//  * Split-KV: when batch x kv_heads cannot fill the GPU, gridDim.x blocks share a sequence's
//    keys; each writes a partial (normalised output and its log-sum-exp) to a workspace and
//    attn_decode_combine merges them. The host fixes the split count (the grid) from an upper
//    bound; each block decides on the device, from the sequence's real length, which keys are
//    its own, so one grid (one CUDA graph) serves every length.
//  * Memory-bound: no tensor cores. A K/V row is 16-byte vectors, LPK lanes per row, 32/LPK
//    rows per warp step, U steps in flight per warp; scores reduce across a row's lanes with
//    shuffles; the online softmax runs per lane group and merges across groups and warps.
//
// Launch: block DEC_WARPS * 32 threads; grid (splits, kv_heads * row_groups, batch);
// attn_decode_combine: block 128 threads, grid (batch * heads * q_len).
#include "decode.cuh"

// Widens one 16-byte vector of storage elements to floats: VEC = 8 for 16-bit types, 4 for f32.
template <class D, int VEC>
__device__ __forceinline__ void dec_widen(const unsigned (&r)[4], float (&x)[VEC]) {
    if (VEC == 4) {
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = __uint_as_float(r[i]);
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            x[2 * i] = D::to_f32((typename D::storage)(r[i] & 0xffffu));
            x[2 * i + 1] = D::to_f32((typename D::storage)(r[i] >> 16));
        }
    }
}

// Merges online-softmax state (m, l, acc) with another (mo, lo, acco); m in base-2 units.
// A side with no key (m = -inf) weighs 0; NaN propagates through attn_max.
template <int VEC>
__device__ __forceinline__ void dec_merge(float& m, float& l, float (&acc)[VEC], float mo, float lo, const float (&acco)[VEC]) {
    const float mn = attn_max(m, mo);
    const float base = mn == attn_neg_inf() ? 0.f : mn;
    const float a = attn_exp2(m - base), b = attn_exp2(mo - base);
    l = l * a + lo * b;
#pragma unroll
    for (int c = 0; c < VEC; ++c) acc[c] = acc[c] * a + acco[c] * b;
    m = mn;
}

template <class D, int HD, int ROWS>
__device__ __forceinline__ void dec_kernel(const DecodeParams& p) {
    typedef typename D::storage T;
    constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte vector
    constexpr int LPK = HD / VEC;             // lanes per key row
    constexpr int KPW = 32 / LPK;             // key rows per warp step
    static_assert(LPK <= 32 && 32 % LPK == 0, "a K/V row must fit one warp");
    constexpr int STEP = DEC_WARPS * KPW;     // key rows per block step
    // K/V rows in flight per lane: more hide more latency, but each costs 8 registers and
    // eight rows' queries and accumulators already hold most of them.
    constexpr int DEC_UNROLL = ROWS >= 8 ? 2 : 4;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int grp = lane / LPK, sub = lane % LPK;
    const DecBlock blk = dec_block(p);
    if (blk.nrows <= 0) return;  // packed queries: this sequence has fewer rows (uniform per block)
    const int b = blk.b, hk = blk.hk, row0 = blk.row0, nrows = blk.nrows;
    const int col = sub * VEC;
    const bool col_ok = col < p.head_dim;

    const DecSpan span = dec_span(p, blk);
    const long long k_begin = span.k_begin, k_end = span.k_end;

    // This lane's slice of each row's query, pre-scaled into base-2 logits (unless soft-capped,
    // where the cap applies to the scaled logit first).
    const float qscale = p.softcap > 0.f ? p.scale : p.scale * DEC_LOG2E;
    float q[ROWS][VEC];
    int qrow[ROWS], qhead[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int pr = row0 + (r < nrows ? r : 0);
        qrow[r] = pr / p.kv_group;
        qhead[r] = hk * p.kv_group + pr % p.kv_group;
        unsigned raw[4] = {0u, 0u, 0u, 0u};
        if (col_ok && r < nrows) {
            const T* qp = (const T*)p.q + dec_qrow(p, p.q_stride, b, blk.seq, qrow[r]) + (long long)qhead[r] * p.q_stride[2] + col;
            dec_load16(qp, raw);
        }
        dec_widen<D, VEC>(raw, q[r]);
#pragma unroll
        for (int c = 0; c < VEC; ++c) q[r][c] *= qscale;
    }

    float m[ROWS], l[ROWS], acc[ROWS][VEC];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = attn_neg_inf();
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < VEC; ++c) acc[r][c] = 0.f;
    }

    // The keys each row sees within this split: [jlo, jhi); rows past nrows see none.
    int jlo[ROWS], jhi[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) dec_row_keys(p, span, qrow[r], r < nrows, jlo[r], jhi[r]);

    const T* kbase = (const T*)p.k + (long long)hk * p.k_stride[2] + col;
    const T* vbase = (const T*)p.v + (long long)hk * p.v_stride[2] + col;
    const int kend = (int)k_end;
    // The trip count is the warp's, not the lane group's: the score reduction shuffles across
    // the whole warp, so every lane must run every iteration (rows past k_end are masked).
    for (int jw = (int)k_begin + warp * KPW; jw < kend; jw += STEP * DEC_UNROLL) {
        const int j0 = jw + grp;
        // Issue every load of the step first: U rows of K and of V in flight per lane.
        unsigned kr[DEC_UNROLL][4], vr[DEC_UNROLL][4];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; ++u) {
            const int j = j0 + u * STEP;
#pragma unroll
            for (int i = 0; i < 4; ++i) kr[u][i] = vr[u][i] = 0u;
            if (j < kend && col_ok) {
                dec_load16(kbase + dec_row(p, p.k_stride, b, j), kr[u]);
                dec_load16(vbase + dec_row(p, p.v_stride, b, j), vr[u]);
            }
        }
        // Scores of the step's U keys for every row: partial dot products, then one reduction
        // across each key's lanes with all U x ROWS shuffles independent (latency overlaps).
        float s[DEC_UNROLL][ROWS];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; ++u) {
            float kx[VEC];
            dec_widen<D, VEC>(kr[u], kx);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                float acc_s = 0.f;
#pragma unroll
                for (int c = 0; c < VEC; ++c) acc_s = fmaf(q[r][c], kx[c], acc_s);
                s[u][r] = acc_s;
            }
        }
#pragma unroll
        for (int o = LPK / 2; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < DEC_UNROLL; ++u)
#pragma unroll
                for (int r = 0; r < ROWS; ++r) s[u][r] += __shfl_xor_sync(0xffffffffu, s[u][r], o);
        // Online softmax, once per step and row: the new maximum over the U keys, one rescale.
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float mx = m[r];
#pragma unroll
            for (int u = 0; u < DEC_UNROLL; ++u) {
                const int j = j0 + u * STEP;
                float x = s[u][r];
                if (p.softcap > 0.f) x = p.softcap * attn_tanh(x / p.softcap) * DEC_LOG2E;
                x = (j >= jlo[r] && j < jhi[r]) ? x : attn_neg_inf();
                s[u][r] = x;
                mx = attn_max(mx, x);
            }
            const float base = mx == attn_neg_inf() ? 0.f : mx;
            const float a = attn_exp2(m[r] - base);  // 0 on the first keys (m = -inf)
            m[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int u = 0; u < DEC_UNROLL; ++u) {
                s[u][r] = attn_exp2(s[u][r] - base);  // masked: exp2(-inf) = 0
                sum += s[u][r];
            }
            l[r] = l[r] * a + sum;
#pragma unroll
            for (int c = 0; c < VEC; ++c) acc[r][c] *= a;
        }
        // O += P·V over the step's keys (rows out of range were loaded as zeros).
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; ++u) {
            float vx[VEC];
            dec_widen<D, VEC>(vr[u], vx);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
                for (int c = 0; c < VEC; ++c) acc[r][c] = fmaf(s[u][r], vx[c], acc[r][c]);
        }
    }

    // Merge the lane groups of each warp (lanes sub, sub + LPK, ... hold the same columns).
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float acco[VEC];
#pragma unroll
            for (int c = 0; c < VEC; ++c) acco[c] = __shfl_xor_sync(0xffffffffu, acc[r][c], o);
            const float mo = __shfl_xor_sync(0xffffffffu, m[r], o), lo_ = __shfl_xor_sync(0xffffffffu, l[r], o);
            dec_merge<VEC>(m[r], l[r], acc[r], mo, lo_, acco);
        }
    }

    // Merge the warps through shared memory: warp w's group 0 writes its rows.
    __shared__ float s_acc[DEC_WARPS][ROWS][HD];
    __shared__ float s_ml[DEC_WARPS][ROWS][2];
    if (grp == 0) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int c = 0; c < VEC; ++c) s_acc[warp][r][col + c] = acc[r][c];
            if (sub == 0) {
                s_ml[warp][r][0] = m[r];
                s_ml[warp][r][1] = l[r];
            }
        }
    }
    __syncthreads();

    dec_store<D, HD, ROWS, DEC_WARPS>(p, s_acc, s_ml, blk);
}

// The entry points (one per dtype, head_dim bucket and row count, and the combines), generated
// from the kernel registry (src/registry.rs) by build.rs.
#include "decode_entries.cuh"
