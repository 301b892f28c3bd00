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
    int heads;      // query heads per batch
    int kv_group;   // heads / kv_heads: query head h reads kv head h / kv_group
    int seqlen_q;
    int seqlen_k;
    int head_dim;
    int bh_start;   // first flattened (batch * heads + head) index in this chunk
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
// heads is at byte 96, scale at 132, causal at 136, softcap at 148.)
static_assert(sizeof(NaiveParams) == 152, "NaiveParams must be 152 bytes to match the Rust #[repr(C)] struct");

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
__device__ __forceinline__ float attn_warp_max(float x) {
#pragma unroll
    for (int o = ATTN_WARP_SIZE / 2; o > 0; o >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(ATTN_FULL_MASK, x, o));
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
