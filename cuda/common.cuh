// Shared device helpers for the attention kernels.
//
// This header (and every kernel that includes it) must compile unchanged under
// nvcc and under NVRTC with no include paths, so it includes NOTHING: no
// <cuda_fp16.h>, no <stdint.h>, no <math.h>. Conversions are written by hand
// and f16/bf16 values travel as their raw `unsigned short` bit patterns.
#pragma once

// ---------------------------------------------------------------------------
// Kernel parameters. Passed by value as the first argument of every naive
// kernel; must match `NaiveParams` (#[repr(C)]) on the Rust side exactly.
// ---------------------------------------------------------------------------
struct NaiveParams {
    long long q_stride[3];  // element strides of [batch, seq, head]; head_dim stride is 1
    long long k_stride[3];
    long long v_stride[3];
    long long o_stride[3];
    long long bh_start;  // first flattened (batch * heads + head) index in this chunk: batch·heads
                         // may pass 2^31 (every dimension is below 2^31, their product is not)
    int heads;      // query heads per batch
    int kv_group;   // heads / kv_heads: query head h reads kv head h / kv_group
    int seqlen_q;
    int seqlen_k;
    int head_dim;
    int bh_count;   // (batch, head) pairs in this chunk
    int row_start;  // first query row of this chunk
    int row_count;  // query rows in this chunk
    float scale;    // softmax scale
    int causal;     // 1: bottom-right aligned causal mask: row i sees key j iff j <= i + seqlen_k - seqlen_q
    int window_left;   // < 0: unlimited; else row i sees no key j < i + seqlen_k - seqlen_q - window_left
    int window_right;  // < 0: unlimited; else row i sees no key j > i + seqlen_k - seqlen_q + window_right
    float softcap;     // <= 0: off; else the scaled logit x becomes softcap * tanh(x / softcap)
};
// (NVRTC has no offsetof/__builtin_offsetof, so only the size is checked here:
// bh_start is at byte 96, heads at 104, scale at 136, causal at 140, softcap at 152.)
static_assert(sizeof(NaiveParams) == 160, "NaiveParams must be 160 bytes to match the Rust #[repr(C)] struct");

#define ATTN_FULL_MASK 0xffffffffu
#define ATTN_WARP_SIZE 32

// -inf / +inf without <math.h>.
__device__ __forceinline__ float attn_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float attn_pos_inf() { return __int_as_float(0x7f800000); }

// ---------------------------------------------------------------------------
// Conversions.
// ---------------------------------------------------------------------------

// IEEE half (bit pattern) -> f32, exact.
__device__ __forceinline__ float attn_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> IEEE half (bit pattern), round to nearest even; overflow -> inf, NaN stays NaN.
__device__ __forceinline__ unsigned short attn_f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// bfloat16 (bit pattern) -> f32, exact.
__device__ __forceinline__ float attn_bf16_to_f32(unsigned short b) {
    return __int_as_float((int)(((unsigned int)b) << 16));
}

// f32 -> bfloat16 (bit pattern), round to nearest even, NaN preserved (quieted,
// sign kept), same results as `half::bf16::from_f32`. Integer ops only, so it
// works on every arch (cvt.rn.bf16.f32 needs sm_80).
__device__ __forceinline__ unsigned short attn_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// ---------------------------------------------------------------------------
// Element types: `storage` is what lives in global memory; load/store go
// through f32.
// ---------------------------------------------------------------------------
struct AttnF16 {
    typedef unsigned short storage;
    static __device__ __forceinline__ float to_f32(storage x) { return attn_f16_to_f32(x); }
    static __device__ __forceinline__ storage from_f32(float x) { return attn_f32_to_f16(x); }
};
struct AttnBF16 {
    typedef unsigned short storage;
    static __device__ __forceinline__ float to_f32(storage x) { return attn_bf16_to_f32(x); }
    static __device__ __forceinline__ storage from_f32(float x) { return attn_f32_to_bf16(x); }
};
struct AttnF32 {
    typedef float storage;
    static __device__ __forceinline__ float to_f32(storage x) { return x; }
    static __device__ __forceinline__ storage from_f32(float x) { return x; }
};

template <class D>
__device__ __forceinline__ float attn_load(const typename D::storage* p, long long i) {
    return D::to_f32(p[i]);
}
template <class D>
__device__ __forceinline__ void attn_store(typename D::storage* p, long long i, float x) {
    p[i] = D::from_f32(x);
}

// ---------------------------------------------------------------------------
// Warp reductions (all 32 lanes must participate).
// ---------------------------------------------------------------------------
// The row maximum of the online softmax propagates NaN (fmaxf drops it), so a NaN in a row's
// inputs gives a NaN row, as PyTorch does, instead of a row that looks fully masked.
__device__ __forceinline__ float attn_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return (a != a || b != b) ? a + b : fmaxf(a, b);
#endif
}

// 2^x with the hardware approximation (exact enough for softmax; 2^-inf = +0).
__device__ __forceinline__ float attn_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// tanh for logit soft-capping, the one definition every kernel uses: from one ex2 and one fast
// divide, tanh(x) = 1 - 2/(e^{2x} + 1), absolute error ~1e-7. (tanh.approx's ~5e-4 relative
// error, times the cap, would dominate f16's error budget; tanhf costs a dozen instructions.)
// The limits come out exactly: e^{2x} -> inf gives 1, -> 0 gives -1.
__device__ __forceinline__ float attn_tanh(float x) {
    return 1.f - __fdividef(2.f, attn_exp2(x * 2.8853900817779268f) + 1.f);
}

__device__ __forceinline__ float attn_warp_max(float x) {
#pragma unroll
    for (int o = ATTN_WARP_SIZE / 2; o > 0; o >>= 1) {
        x = attn_max(x, __shfl_xor_sync(ATTN_FULL_MASK, x, o));
    }
    return x;
}
__device__ __forceinline__ float attn_warp_sum(float x) {
#pragma unroll
    for (int o = ATTN_WARP_SIZE / 2; o > 0; o >>= 1) {
        x += __shfl_xor_sync(ATTN_FULL_MASK, x, o);
    }
    return x;
}

// ---------------------------------------------------------------------------
// Masking.
// ---------------------------------------------------------------------------

// Whether query row `row` may see key `j` under the causal mask and the sliding window (all
// bottom-right aligned; the host-side statement of the rule is `Mask` in src/options.rs).
__device__ __forceinline__ bool attn_key_visible(long long row, long long j, int seqlen_q, int seqlen_k, int causal,
                                                 int window_left, int window_right) {
    const long long diag = row + (long long)seqlen_k - (long long)seqlen_q;
    if (causal && j > diag) return false;
    if (window_right >= 0 && j > diag + window_right) return false;
    if (window_left >= 0 && j < diag - window_left) return false;
    return true;
}

// Bottom-right aligned causal mask: the last key query row `row` may see
// (keys j <= this are visible). Negative when the row sees no key.
__device__ __forceinline__ long long attn_causal_last_key(long long row, int seqlen_q, int seqlen_k) {
    return row + (long long)seqlen_k - (long long)seqlen_q;
}

// ---------------------------------------------------------------------------
// Parameters of the fused kernels (flash, mem_efficient): one call's tensors and options.
// Passed by value; must match `AttnParams` (#[repr(C)]) in src/gpu/params.rs exactly.
// ---------------------------------------------------------------------------
struct AttnParams {
    long long q_stride[3];  // element strides of [batch, seq, head]; head_dim is contiguous
    long long k_stride[3];
    long long v_stride[3];
    long long o_stride[3];
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;  // null, or [batch, heads, seqlen_q] (fixed length) / [heads, total_q] (varlen)
    // Variable-length batches: null, or `batch + 1` int32 prefix sums into the packed sequence
    // dimension (the tensors then have batch 1). Sequence b is rows [cu[b], cu[b+1]).
    const int* cu_seqlens_q;
    const int* cu_seqlens_k;
    int batch;
    int heads;
    int kv_group;  // heads / kv_heads: query head h reads kv head h / kv_group
    int seqlen_q;  // fixed length: every sequence's; varlen: the maximum (sizes the grid)
    int seqlen_k;
    int total_q;  // rows in the q/out tensors' sequence dimension (bounds every cu_seqlens_q entry)
    int total_k;
    int head_dim;
    int window_left;   // < 0: unlimited; else row i sees no key j < i + sk - sq - window_left
    int window_right;  // < 0: unlimited; else row i sees no key j > i + sk - sq + window_right
    int causal;        // bottom-right aligned: row i sees key j iff j <= i + sk - sq
    float scale;       // softmax scale
    float softcap;     // <= 0: off; else the scaled logit x becomes softcap * tanh(x / softcap)
    int flags;         // ATTN_FLAG_* bits
};
static_assert(sizeof(AttnParams) == 208, "AttnParams must match the Rust #[repr(C)] struct");
// f32 kernels may use TF32 tensor cores (PyTorch's allow_tf32).
#define ATTN_FLAG_ALLOW_TF32 1

// One (batch, head) pair's sequence: where its rows start in each tensor and how long it is.
struct AttnSeq {
    long long q, k, v, o;  // element offset of row 0 (this head) in each tensor
    long long lse;         // index of row 0's lse value
    int seqlen_q, seqlen_k;
};

__device__ __forceinline__ int attn_clamp(int x, int lo, int hi) { return min(max(x, lo), hi); }

// Resolves sequence `b` for query head `h`. Prefix sums from device memory are clamped to the
// tensors and lengths to the stated maxima, so malformed ones can never move an access outside
// the caller's buffers (they give wrong rows, not a fault).
__device__ __forceinline__ AttnSeq attn_seq(const AttnParams& p, int b, int h) {
    const int hk = h / p.kv_group;
    AttnSeq s;
    long long q0, k0, v0, o0;
    if (p.cu_seqlens_q != nullptr) {
        const int qs = attn_clamp(p.cu_seqlens_q[b], 0, p.total_q);
        const int qe = attn_clamp(p.cu_seqlens_q[b + 1], qs, p.total_q);
        const int ks = attn_clamp(p.cu_seqlens_k[b], 0, p.total_k);
        const int ke = attn_clamp(p.cu_seqlens_k[b + 1], ks, p.total_k);
        s.seqlen_q = min(qe - qs, p.seqlen_q);
        s.seqlen_k = min(ke - ks, p.seqlen_k);
        q0 = qs * p.q_stride[1];
        o0 = qs * p.o_stride[1];
        k0 = ks * p.k_stride[1];
        v0 = ks * p.v_stride[1];
        s.lse = (long long)h * p.total_q + qs;
    } else {
        s.seqlen_q = p.seqlen_q;
        s.seqlen_k = p.seqlen_k;
        q0 = b * p.q_stride[0];
        o0 = b * p.o_stride[0];
        k0 = b * p.k_stride[0];
        v0 = b * p.v_stride[0];
        s.lse = ((long long)b * p.heads + h) * p.seqlen_q;
    }
    s.q = q0 + h * p.q_stride[2];
    s.o = o0 + h * p.o_stride[2];
    s.k = k0 + hk * p.k_stride[2];
    s.v = v0 + hk * p.v_stride[2];
    return s;
}

// ---------------------------------------------------------------------------
// Masking for the tiled kernels (flash, mem_efficient): the same rule as attn_key_visible,
// stated per block and per tile. diag = seqlen_k - seqlen_q.
// ---------------------------------------------------------------------------

// Whether key `col` is hidden from query row `row`: past the keys, after the row's diagonal key
// (causal), or outside the sliding window.
__device__ __forceinline__ bool attn_masked(const AttnParams& p, long long row, long long col, long long diag, int sk) {
    const long long lim = row + diag;  // the diagonal key of this row
    return col >= sk || (p.causal && col > lim) || (p.window_right >= 0 && col > lim + p.window_right) ||
           (p.window_left >= 0 && col < lim - p.window_left);
}

// The keys [n_begin, n_end) any of query rows [m0, m_last] can see: the key tiles a block visits.
__device__ __forceinline__ void attn_block_key_range(const AttnParams& p, int m0, long long m_last, long long diag, int sk,
                                                     long long& n_begin, long long& n_end) {
    n_end = sk;
    n_begin = 0;
    if (p.causal) n_end = min(n_end, m_last + diag + 1);
    if (p.window_right >= 0) n_end = min(n_end, m_last + diag + p.window_right + 1);
    if (p.window_left >= 0) n_begin = max(n_begin, (long long)m0 + diag - p.window_left);
}

// The scale the softmax applies to a score: with soft-capping the scale is applied inside the
// cap (cap * tanh(x * scale / cap)), and the softmax then works on the capped logits as they are.
// scale_log2 folds log2(e) in, for exp2.
struct AttnLogits {
    bool capped;
    float scale, scale_log2;
};

__device__ __forceinline__ AttnLogits attn_logits(const AttnParams& p) {
    AttnLogits l;
    l.capped = p.softcap > 0.f;
    l.scale = l.capped ? 1.f : p.scale;
    l.scale_log2 = l.scale * 1.4426950408889634f;
    return l;
}

// A sequence's 16-bit operands (f16/bf16 kernels): the tensors' bases moved to its first row.
struct AttnOperands16 {
    const unsigned short *q, *k, *v;
    unsigned short* o;
};

__device__ __forceinline__ AttnOperands16 attn_operands16(const AttnParams& p, const AttnSeq& seq) {
    AttnOperands16 r;
    r.q = static_cast<const unsigned short*>(p.q) + seq.q;
    r.k = static_cast<const unsigned short*>(p.k) + seq.k;
    r.v = static_cast<const unsigned short*>(p.v) + seq.v;
    r.o = static_cast<unsigned short*>(p.o) + seq.o;
    return r;
}

// The query tile a block of a tiled kernel takes: heaviest first, since under a causal mask the
// last query tiles see the most keys and should not start last.
__device__ __forceinline__ int attn_heaviest_first_tile() { return (int)(gridDim.x - 1 - blockIdx.x); }

// What a query tile [m0, m0 + bm) of a sequence (sq queries, sk keys) visits: its last real row,
// the diagonal offset and the key tiles [nb_begin, nb_end) of bn keys that any of its rows sees.
struct AttnKeyTiles {
    long long diag, m_last;
    int nb_begin, nb_end;
};

__device__ __forceinline__ AttnKeyTiles attn_key_tiles(const AttnParams& p, int m0, int bm, int bn, int sq, int sk) {
    AttnKeyTiles t;
    t.diag = (long long)sk - sq;
    t.m_last = (long long)min(m0 + bm, sq) - 1;
    long long n_begin, n_end;
    attn_block_key_range(p, m0, t.m_last, t.diag, sk, n_begin, n_end);
    t.nb_begin = (int)(n_begin / bn);
    t.nb_end = n_end <= 0 ? 0 : (int)((n_end + bn - 1) / bn);
    return t;
}

// The tile scheduler of the persistent (warp-specialised) kernel: block blockIdx.x takes tiles
// k * gridDim.x + its index, k = 0, 1, ... Default order: query tile fastest (heaviest causal
// first within a head), then head, then batch, so the blocks of a round share few heads' K and V
// in L2. Masked rows (causal, window) cost in proportion to the keys they see, so odd rounds run
// backwards (snake): a block that drew a heavy tile draws a light one next, even when the grid is
// a multiple of the query tiles per head (132 SMs, 4 tiles). And with few heads (long sequences)
// the blocks would drift apart over many heads' K/V: there tiles go heaviest first across every
// head (LPT), so a round's tiles cost about the same and its blocks stream the same K/V together.
struct AttnTileOrder {
    int n_m, tiles, heads_batches;
    bool masked, lpt;
};

__device__ __forceinline__ AttnTileOrder attn_tile_order(const AttnParams& p, int bm) {
    AttnTileOrder o;
    o.n_m = (p.seqlen_q + bm - 1) / bm;
    o.heads_batches = p.heads * p.batch;
    o.tiles = o.n_m * o.heads_batches;
    o.masked = p.causal || p.window_left >= 0 || p.window_right >= 0;
    o.lpt = o.masked && o.heads_batches * 4 <= (int)gridDim.x;
    return o;
}

// This block's k-th tile (query tile start m0, head h, batch b), or false past the last.
__device__ __forceinline__ bool attn_persistent_tile(const AttnTileOrder& o, const AttnParams& p, int k, int bm, int& m0, int& h, int& b) {
    const int g = gridDim.x;
    const int t = k * g + (o.masked && (k & 1) ? g - 1 - (int)blockIdx.x : (int)blockIdx.x);
    if (t >= o.tiles) return false;
    int mb, hb;
    if (o.lpt) {
        mb = o.n_m - 1 - t / o.heads_batches;
        hb = t - (t / o.heads_batches) * o.heads_batches;
    } else {
        hb = t / o.n_m;
        mb = o.n_m - 1 - (t - hb * o.n_m);
    }
    m0 = mb * bm;
    h = hb % p.heads;
    b = hb / p.heads;
    return true;
}

// Whether key tile [n0, n0 + bn) hides any key from any of rows [m0, m_last]: only those tiles
// (the ragged end, the causal diagonal, the window edges) pay for per-element masking.
// (int tile and row starts, as the kernels hold them: widening them early costs registers that
// the 255-register kernels do not have.)
__device__ __forceinline__ bool attn_tile_needs_mask(const AttnParams& p, int n0, int bn, int sk, int m0, long long m_last,
                                                     long long diag) {
    return n0 + bn > sk || (p.causal && n0 + bn - 1 > m0 + diag) ||
           (p.window_right >= 0 && n0 + bn - 1 > m0 + diag + p.window_right) ||
           (p.window_left >= 0 && (long long)n0 < m_last + diag - p.window_left);
}
