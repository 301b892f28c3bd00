// The parts every decode kernel shares (cuda/decode.cu on CUDA cores, cuda/decode_tc.cu on
// tensor cores): the parameter block, where a key lives (contiguous or paged), which keys a
// block and each of its rows see, the block epilogue that merges warps and stores a row (or a
// split's partial), and the combine kernel that merges splits by log-sum-exp.
#pragma once
#include "common.cuh"
#include "mma.cuh"

// Warps of the CUDA-core kernels (the tensor-core ones take theirs as a template argument).
#define DEC_WARPS 4
// Keys per tile: the m of the tensor-core kernels' K.Q^T; split shares start on whole tiles.
#define DEC_TILE 16
// log2(e) and ln(2): scores run in base 2 (ex2.approx) and the lse is reported in base e.
#define DEC_LOG2E 1.4426950408889634f
#define DEC_LN2 0.6931471805599453f
// Most blocks of one split cluster (cluster_merge): the non-portable cluster size of sm_90.
#define DEC_MAX_CLUSTER 16

// Must match `DecodeParams` (#[repr(C)]) in src/gpu/decode.rs exactly.
struct DecodeParams {
    long long q_stride[3];  // [batch, q row, head]
    long long k_stride[3];  // contiguous: [batch, position, kv head]; paged: [page, slot, kv head]
    long long v_stride[3];
    long long o_stride[3];  // [batch, q row, head]
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;              // null, or [batch, heads, q_len] ([heads, total_q] with cu_seqlens_q)
    const int* lens;         // null (every sequence max_len long), or [batch]: keys in each sequence's cache
    const int* block_table;  // null (contiguous cache), or [batch] rows of `table_stride` page ids
    float* part_o;           // splits > 1: [splits, batch, heads, q_len, head_dim] f32
    float* part_lse;         // splits > 1: [splits, batch, heads, q_len]
    long long table_stride;  // elements between block-table rows
    int batch;
    int heads;
    int kv_group;   // heads / kv_heads: query head h reads kv head h / kv_group
    int q_len;      // query rows per sequence (the last q_len positions of its cache); with cu_seqlens_q the most any has
    int head_dim;
    int max_len;    // capacity: lens are clamped to it (contiguous: the cache's seqlen; paged: pages per row x page size)
    int page_size;  // paged: slots per page
    int num_pages;  // paged: page ids are clamped below it
    int splits;     // gridDim.x
    int min_chunk;  // fewest keys a split takes: short sequences use fewer splits
    int window_left;   // < 0: unlimited
    int window_right;  // < 0: unlimited
    int causal;        // bottom-right against each sequence's length
    float scale;
    float softcap;  // <= 0: off
    int rows_per_block;
    // null: every sequence has q_len query rows, q/out [batch, q_len, heads, d]. Else packed:
    // q/out [1, total_q, heads, d], sequence b's rows are cu_seqlens_q[b] .. cu_seqlens_q[b + 1]
    // (clamped to 0..total_q and to q_len rows), at the last positions of its cache.
    const int* cu_seqlens_q;
    int total_q;
    // 1: the `splits` blocks of a (sequence, KV head, row group) are one thread block cluster
    // (sm_90+) and merge through distributed shared memory (no workspace, no combine).
    int cluster_merge;
};
// (NVRTC has no offsetof: the Rust side checks the offsets; here only the size.)
static_assert(sizeof(DecodeParams) == 256, "DecodeParams must match the Rust #[repr(C)] struct");

// 16 bytes from global memory through the non-coherent (read-only) path. Streamed (EF): the
// line is not allocated in L1 and is the first evicted from L2 (K/V read once per call).
template <bool EF = false>
__device__ __forceinline__ void dec_load16(const void* p, unsigned (&r)[4]) {
    if (EF) {
        // A policy value, not an instruction per load: the compiler keeps one (no side effects).
        unsigned long long policy;
        asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "l"(p), "l"(policy));
    } else
        asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "l"(p));
}

// Where key j of sequence b lives, in elements from the tensor's base (head offset excluded).
__device__ __forceinline__ long long dec_row(const DecodeParams& p, const long long (&stride)[3], int b, int j) {
    if (p.block_table == nullptr) return (long long)b * stride[0] + (long long)j * stride[1];
    int page = p.block_table[(long long)b * p.table_stride + j / p.page_size];
    page = page < 0 ? 0 : (page >= p.num_pages ? p.num_pages - 1 : page);  // clamp: never outside the pages
    return (long long)page * stride[0] + (long long)(j % p.page_size) * stride[1];
}

// Where a tile of DEC_TILE keys starting at `j0` (a multiple of DEC_TILE) of sequence b lives
// in a paged cache whose page size is a multiple of DEC_TILE: the whole tile lies in one page,
// found with one block-table read (instead of one per key). Key j0 + i is at slot `slot + i`
// of `page`. Past the sequence's keys (`live` false) nothing is read.
struct DecPage {
    int page, slot;
};

__device__ __forceinline__ DecPage dec_tile_page(const DecodeParams& p, int b, int j0, bool live) {
    DecPage r = {0, 0};
    if (!live) return r;
    const int idx = j0 / p.page_size;
    const int page = p.block_table[(long long)b * p.table_stride + idx];
    r.page = page < 0 ? 0 : (page >= p.num_pages ? p.num_pages - 1 : page);  // clamp: never outside the pages
    r.slot = j0 - idx * p.page_size;
    return r;
}

__device__ __forceinline__ long long dec_page_row(const long long (&stride)[3], DecPage pg, int i) {
    return (long long)pg.page * stride[0] + (long long)(pg.slot + i) * stride[1];
}

// Which rows a block owns: grid (splits, kv_heads x row_groups, batch); packed row
// `qi * kv_group + g` is query head `hk * kv_group + g` at query position qi.
// A sequence's query rows: q0 .. q0 + qn of q's row dimension (q0 = 0 unless packed).
struct DecSeq {
    int q0, qn;
};

__device__ __forceinline__ DecSeq dec_seq(const DecodeParams& p, int b) {
    DecSeq s = {0, p.q_len};
    if (p.cu_seqlens_q != nullptr) {
        // Clamped like every device-side index array: wrong rows, never a fault.
        const int lo = min(max(p.cu_seqlens_q[b], 0), p.total_q);
        const int hi = min(max(p.cu_seqlens_q[b + 1], lo), p.total_q);
        s.q0 = lo;
        s.qn = min(hi - lo, p.q_len);
    }
    return s;
}

// Element offset of query row qi of sequence b in q or out (head excluded).
__device__ __forceinline__ long long dec_qrow(const DecodeParams& p, const long long (&stride)[3], int b, const DecSeq& s, int qi) {
    return p.cu_seqlens_q != nullptr ? (long long)(s.q0 + qi) * stride[1] : (long long)b * stride[0] + (long long)qi * stride[1];
}

// Index of (sequence b, head h, query row qi) in lse: [batch, heads, q_len], or [heads, total_q] packed.
__device__ __forceinline__ long long dec_lse_index(const DecodeParams& p, int b, const DecSeq& s, int h, int qi) {
    return p.cu_seqlens_q != nullptr ? (long long)h * p.total_q + s.q0 + qi : ((long long)b * p.heads + h) * p.q_len + qi;
}

struct DecBlock {
    int b, hk, row0, nrows;  // nrows <= 0: the sequence has no rows here (the block exits)
    DecSeq seq;
};

__device__ __forceinline__ DecBlock dec_block(const DecodeParams& p) {
    DecBlock k;
    const int kv_heads = p.heads / p.kv_group;
    k.b = blockIdx.z;
    k.hk = blockIdx.y % kv_heads;
    k.row0 = (blockIdx.y / kv_heads) * p.rows_per_block;
    k.seq = dec_seq(p, k.b);
    k.nrows = min(p.rows_per_block, k.seq.qn * p.kv_group - k.row0);
    return k;
}

// The keys one block sees: its sequence's length (clamped to the capacity), and this split's
// share [k_begin, k_end) of the keys any of its rows can see. Rows are packed query rows
// `row0 .. row0 + nrows` (query position qi = row / kv_group).
struct DecSpan {
    int len, qn;
    long long k_begin, k_end;
};

__device__ __forceinline__ DecSpan dec_span(const DecodeParams& p, const DecBlock& blk) {
    const int b = blk.b, row0 = blk.row0, nrows = blk.nrows, qn = blk.seq.qn;
    // Dense K/V (no length array): every sequence holds max_len keys.
    int len = p.lens == nullptr ? p.max_len : p.lens[b];
    len = len < 0 ? 0 : (len > p.max_len ? p.max_len : len);
    // Bottom-right: query row qi sits at position len - qn + qi.
    const int qi_lo = row0 / p.kv_group, qi_hi = (row0 + nrows - 1) / p.kv_group;
    long long lo = 0, hi = len;
    const long long diag_lo = (long long)len - qn + qi_lo, diag_hi = (long long)len - qn + qi_hi;
    if (p.causal) hi = min(hi, diag_hi + 1);
    if (p.window_right >= 0) hi = min(hi, diag_hi + p.window_right + 1);
    if (p.window_left >= 0) lo = max(lo, diag_lo - p.window_left);
    if (lo < 0) lo = 0;
    // Shares start on whole DEC_TILE-key tiles, so that a tile of a paged cache whose page
    // size is a multiple of the tile lies in one page (one block-table read per tile). Keys
    // below `lo` that the rounding adds are masked by each row's own window (dec_row_keys).
    lo &= ~(long long)(DEC_TILE - 1);
    const long long span = hi > lo ? hi - lo : 0;
    long long chunk = (span + p.splits - 1) / p.splits;
    if (chunk < p.min_chunk) chunk = p.min_chunk;
    chunk = (chunk + DEC_TILE - 1) & ~(long long)(DEC_TILE - 1);
    DecSpan s;
    s.len = len;
    s.qn = qn;
    s.k_begin = lo + (long long)blockIdx.x * chunk;
    s.k_end = min(hi, s.k_begin + chunk);
    return s;
}

// The keys [jlo, jhi) that query position `qrow` sees within the block's share, as
// attn_key_visible states the mask; a row that is not real (`live` false) sees none.
__device__ __forceinline__ void dec_row_keys(const DecodeParams& p, const DecSpan& s, int qrow, bool live, int& jlo, int& jhi) {
    const long long diag = (long long)s.len - s.qn + qrow;
    long long rlo = s.k_begin, rhi = s.k_end;
    if (p.causal) rhi = min(rhi, diag + 1);
    if (p.window_right >= 0) rhi = min(rhi, diag + p.window_right + 1);
    if (p.window_left >= 0) rlo = max(rlo, diag - p.window_left);
    jlo = (int)rlo;
    jhi = live ? (int)max(rhi, rlo) : (int)rlo;
}

// A score as the softmax takes it: base-2 logits, soft-capped first when asked. `raw` is q·k
// unscaled.
__device__ __forceinline__ float dec_logit(const DecodeParams& p, float raw) {
    return p.softcap > 0.f ? p.softcap * attn_tanh(raw * p.scale / p.softcap) * DEC_LOG2E : raw * (p.scale * DEC_LOG2E);
}

// Programmatic dependent launch (sm_90+; no-ops in code for older archs, which the host then
// launches plainly): the combine is launched while the main kernel still runs, and waits here
// until every main block has finished and its partials are visible.
__device__ __forceinline__ void dec_wait_for_producer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// A main block past its key loop lets the dependent combine's launch begin. (Letting it begin
// as each block starts measured the same on the H200.)
__device__ __forceinline__ void dec_allow_consumer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// One output element of packed row r, column c, from its merged (max m in base 2, sum l,
// unnormalised accumulator a): the output and lse, or this split's partial for the combine.
// A row that saw no key gives zeros and -inf (l == 0); NaN stays NaN.
template <class D>
__device__ __forceinline__ void dec_write(const DecodeParams& p, const DecBlock& blk, bool partial, int r, int c, float mm, float ll, float aa) {
    typedef typename D::storage T;
    const int pr = blk.row0 + r, qi = pr / p.kv_group, h = blk.hk * p.kv_group + pr % p.kv_group;
    const float out = ll == 0.f ? 0.f : aa / ll;
    const float lse = ll == 0.f ? attn_neg_inf() : (mm + __log2f(ll)) * DEC_LN2;
    if (!partial) {
        T* op = (T*)p.o + dec_qrow(p, p.o_stride, blk.b, blk.seq, qi) + (long long)h * p.o_stride[2];
        op[c] = D::from_f32(out);
        if (c == 0 && p.lse != nullptr) p.lse[dec_lse_index(p, blk.b, blk.seq, h, qi)] = lse;
    } else {
        // Partials by (b, h, qi) with qi below the q_len bound: the combine's order.
        const long long bhq = ((long long)blk.b * p.heads + h) * p.q_len + qi;
        const long long slot = (long long)blockIdx.x * p.batch * p.heads * p.q_len + bhq;
        p.part_o[slot * p.head_dim + c] = out;
        if (c == 0) p.part_lse[slot] = lse;
    }
}

// The merge of `n` (max, sum, accumulator) triples of one row and column: the weights are
// exp2(m_s - max), a triple that saw no key (m = -inf, l = 0) weighs nothing.
struct DecMerged {
    float mm, ll, aa;
};

template <int N, class Get>
__device__ __forceinline__ DecMerged dec_merge(int n, Get get) {
    float m[N];
    float mm = attn_neg_inf();
#pragma unroll
    for (int w = 0; w < N; ++w) {
        m[w] = w < n ? get.m(w) : attn_neg_inf();
        mm = attn_max(mm, m[w]);
    }
    const float base = mm == attn_neg_inf() ? 0.f : mm;
    DecMerged r = {mm, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < N; ++w) {
        if (w < n) {
            const float e = attn_exp2(m[w] - base);
            r.ll += get.l(w) * e;
            r.aa += get.a(w) * e;
        }
    }
    return r;
}

// The warps' triples of row r, column c in the block's shared memory.
template <int HD, int ROWS, int WARPS>
struct DecWarpTriples {
    const float (&acc)[WARPS][ROWS][HD];
    const float (&ml)[WARPS][ROWS][2];
    int r, c;
    __device__ float m(int w) const { return ml[w][r][0]; }
    __device__ float l(int w) const { return ml[w][r][1]; }
    __device__ float a(int w) const { return acc[w][r][c]; }
};

// The block epilogue: every warp has left its rows' running max m (base 2), sum l and
// unnormalised accumulators in shared memory; one thread per (row, column) merges the warps,
// normalises and stores the output and lse, or this split's partial for the combine.
template <class D, int HD, int ROWS, int WARPS>
__device__ __forceinline__ void dec_store(const DecodeParams& p, const float (&s_acc)[WARPS][ROWS][HD],
                                          const float (&s_ml)[WARPS][ROWS][2], const DecBlock& blk) {
    dec_allow_consumer();
    for (int idx = threadIdx.x; idx < blk.nrows * p.head_dim; idx += WARPS * 32) {
        const int r = idx / p.head_dim, c = idx % p.head_dim;
        const DecMerged t = dec_merge<WARPS>(WARPS, DecWarpTriples<HD, ROWS, WARPS>{s_acc, s_ml, r, c});
        dec_write<D>(p, blk, p.splits > 1, r, c, t.mm, t.ll, t.aa);
    }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Every thread of the cluster arrives, then waits: the release/acquire pair orders each block's
// shared-memory writes before the other blocks' reads of them.
__device__ __forceinline__ void dec_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// A float of block `rank`'s shared memory at the address `local` has in this block's.
__device__ __forceinline__ float dec_cluster_load(const float* local, unsigned rank) {
    unsigned a = (unsigned)__cvta_generic_to_shared(local), remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

// The split blocks' triples of row r, column c, each in its own block's shared memory (warp
// 0's slot, where dec_cluster_store leaves the block's merge).
template <int HD, int ROWS, int WARPS>
struct DecClusterTriples {
    const float (&acc)[WARPS][ROWS][HD];
    const float (&ml)[WARPS][ROWS][2];
    int r, c;
    __device__ float m(int s) const { return dec_cluster_load(&ml[0][r][0], s); }
    __device__ float l(int s) const { return dec_cluster_load(&ml[0][r][1], s); }
    __device__ float a(int s) const { return dec_cluster_load(&acc[0][r][c], s); }
};
#endif

// The epilogue of a split grid launched as clusters of its `splits` blocks (sm_90+; the host
// never sets cluster_merge elsewhere): each block merges its warps into warp 0's slots, the
// cluster synchronises, and the blocks share out the rows' columns, each merging every split's
// triple straight from the other blocks' shared memory and storing the output. A second
// cluster barrier keeps every block's shared memory alive until the others have read it.
template <class D, int HD, int ROWS, int WARPS>
__device__ __forceinline__ void dec_cluster_store(const DecodeParams& p, float (&s_acc)[WARPS][ROWS][HD], float (&s_ml)[WARPS][ROWS][2],
                                                  const DecBlock& blk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int cols = blk.nrows * p.head_dim;
    // Warps into warp 0's accumulators: thread (r, c) alone reads and writes column c of row r.
    for (int idx = threadIdx.x; idx < cols; idx += WARPS * 32) {
        const int r = idx / p.head_dim, c = idx % p.head_dim;
        s_acc[0][r][c] = dec_merge<WARPS>(WARPS, DecWarpTriples<HD, ROWS, WARPS>{s_acc, s_ml, r, c}).aa;
    }
    __syncthreads();  // every thread has read the warps' (max, sum) pairs
    if (threadIdx.x < blk.nrows) {
        const int r = threadIdx.x;
        const DecMerged t = dec_merge<WARPS>(WARPS, DecWarpTriples<HD, ROWS, WARPS>{s_acc, s_ml, r, 0});
        s_ml[0][r][0] = t.mm;
        s_ml[0][r][1] = t.ll;
    }
    dec_cluster_sync();
    const int splits = p.splits, rank = blockIdx.x;  // the cluster spans the grid's x: rank = blockIdx.x
    for (int idx = rank * WARPS * 32 + threadIdx.x; idx < cols; idx += splits * WARPS * 32) {
        const int r = idx / p.head_dim, c = idx % p.head_dim;
        const DecMerged t = dec_merge<DEC_MAX_CLUSTER>(splits, DecClusterTriples<HD, ROWS, WARPS>{s_acc, s_ml, r, c});
        dec_write<D>(p, blk, false, r, c, t.mm, t.ll, t.aa);
    }
    dec_cluster_sync();
#endif
}

// Merges the splits of one (batch, head, query row): out = sum_s w_s o_s / sum_s w_s with
// w_s = exp(lse_s - max lse); splits that saw no key have lse = -inf and weigh nothing.
// Every load is independent of the others, so they are all issued together rather than one
// L2 round trip per split: thread s < splits reads lse_s (at most one per thread, MAX_SPLITS
// <= DEC_COMBINE_THREADS), and the partial rows are read as 16-byte vectors by groups of
// threads that each take every `groups`-th split, merged through shared memory at the end.
// acc += w * o, skipping an empty split's zeros (w = 0) but keeping NaN.
__device__ __forceinline__ void dec_add_weighted(float4& acc, float w, const float4& o) {
    if (w != 0.f || o.x != o.x) acc.x += w * o.x;
    if (w != 0.f || o.y != o.y) acc.y += w * o.y;
    if (w != 0.f || o.z != o.z) acc.z += w * o.z;
    if (w != 0.f || o.w != o.w) acc.w += w * o.w;
}

#define DEC_COMBINE_THREADS 128
// Partial vectors per thread loaded before the weights are known (8 x 16 bytes of registers).
#define DEC_COMBINE_PRELOAD 8
template <class D>
__device__ __forceinline__ void dec_combine(const DecodeParams& p) {
    typedef typename D::storage T;
    const long long bhq = blockIdx.x;  // ((b * heads) + h) * q_len + qi
    const long long per_split = (long long)p.batch * p.heads * p.q_len;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int qi = (int)(bhq % p.q_len), h = (int)((bhq / p.q_len) % p.heads), b = (int)(bhq / ((long long)p.q_len * p.heads));
    __shared__ float s_w[DEC_COMBINE_THREADS];
    __shared__ float s_red[DEC_COMBINE_THREADS / 32];
    __shared__ float4 s_acc[DEC_COMBINE_THREADS];
    dec_wait_for_producer();
    const DecSeq seq = dec_seq(p, b);
    if (qi >= seq.qn) return;  // a row the sequence does not have (packed queries)

    // Every load first, so that one L2 round trip serves them all: this thread's lse and the
    // first DEC_COMBINE_PRELOAD of its column vector's partials (thread (group, cv) takes column
    // vector cv of splits group, group + groups, ...); the weights they need come after.
    const int vecs = p.head_dim / 4;  // head_dim is a multiple of 4 (one 16-byte vector of f32)
    const int groups = DEC_COMBINE_THREADS / vecs;
    const int group = tid / vecs, cv = tid % vecs;
    const float x = tid < p.splits ? p.part_lse[tid * per_split + bhq] : attn_neg_inf();
    float4 pre[DEC_COMBINE_PRELOAD];
#pragma unroll
    for (int i = 0; i < DEC_COMBINE_PRELOAD; ++i) {
        const int s = group + i * groups;
        pre[i] = group < groups && s < p.splits ? *reinterpret_cast<const float4*>(p.part_o + (s * per_split + bhq) * p.head_dim + 4 * cv)
                                                : make_float4(0.f, 0.f, 0.f, 0.f);
    }

    // The weights: block-wide maximum, then exp and sum.
    float mx = x;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = attn_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) s_red[warp] = mx;
    __syncthreads();
    mx = s_red[0];
#pragma unroll
    for (int w = 1; w < DEC_COMBINE_THREADS / 32; ++w) mx = attn_max(mx, s_red[w]);
    const float base = mx == attn_neg_inf() ? 0.f : mx;
    const float w = tid < p.splits ? __expf(x - base) : 0.f;
    s_w[tid] = w;
    float wsum = w;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, off);
    __syncthreads();  // every warp has read s_red's maxima, and s_w is complete
    if (lane == 0) s_red[warp] = wsum;
    __syncthreads();
    wsum = 0.f;
#pragma unroll
    for (int i = 0; i < DEC_COMBINE_THREADS / 32; ++i) wsum += s_red[i];

    // The rows: the weighted sum of this thread's partials (skipping empty splits' zeros,
    // keeping NaN), the preloaded ones, then any further splits.
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (group < groups) {
#pragma unroll
        for (int i = 0; i < DEC_COMBINE_PRELOAD; ++i) {
            const int s = group + i * groups;
            if (s < p.splits) dec_add_weighted(acc, s_w[s], pre[i]);
        }
#pragma unroll 1
        for (int s = group + DEC_COMBINE_PRELOAD * groups; s < p.splits; s += groups)
            dec_add_weighted(acc, s_w[s], *reinterpret_cast<const float4*>(p.part_o + (s * per_split + bhq) * p.head_dim + 4 * cv));
    }
    s_acc[tid] = acc;
    __syncthreads();
    T* op = (T*)p.o + dec_qrow(p, p.o_stride, b, seq, qi) + (long long)h * p.o_stride[2];
    if (tid < vecs) {
        float4 sum = s_acc[tid];
        for (int g = 1; g < groups; ++g) {
            const float4 o = s_acc[g * vecs + tid];
            sum.x += o.x;
            sum.y += o.y;
            sum.z += o.z;
            sum.w += o.w;
        }
        const float inv = wsum == 0.f ? 0.f : 1.f / wsum;
        op[4 * tid + 0] = D::from_f32(sum.x * inv);
        op[4 * tid + 1] = D::from_f32(sum.y * inv);
        op[4 * tid + 2] = D::from_f32(sum.z * inv);
        op[4 * tid + 3] = D::from_f32(sum.w * inv);
    }
    if (tid == 0 && p.lse != nullptr) p.lse[dec_lse_index(p, b, seq, h, qi)] = wsum == 0.f ? attn_neg_inf() : base + __logf(wsum);
}

