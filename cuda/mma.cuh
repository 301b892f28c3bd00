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
template <bool BF16>
__device__ __forceinline__ void attn_mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
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
}

// Two f32 -> one register of two 16-bit values, `lo` in the low half (round to nearest even).
template <bool BF16>
__device__ __forceinline__ unsigned attn_pack2(float lo, float hi) {
    unsigned r;
    if (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// 2^x with the hardware approximation (exact enough for softmax; 2^-inf = +0).
__device__ __forceinline__ float attn_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// tanh with the hardware approximation (sm_75+), for logit soft-capping.
__device__ __forceinline__ float attn_tanh(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][D] tile of 16-bit
// values (D >= 64): the chunk index is XORed with row % 8 so that the 16-byte writes that fill a
// tile and the ldmatrix reads of its 8x8 blocks both hit distinct banks.
template <int D>
__device__ __forceinline__ int attn_swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// The epilogue of the tensor-core kernels, for the accumulator layout mma.sync m16n8 and wgmma
// share: per 8-column chunk i, this thread holds columns 8i + 2(lane%4) + {0, 1} of two rows,
// row0 ([i][0..1]) and row0 + 8 ([i][2..3]). Normalises by the full row sums (a quad's), stores
// rows < sq and columns < head_dim with their LSE; a row that saw no key gets zeros and -inf.
template <int D, bool BF16>
__device__ __forceinline__ void attn_store_rows(const AttnParams& p, const AttnSeq& seq, unsigned short* o,
                                                const float (&acc)[D / 8][4], const float (&row_max)[2],
                                                const float (&row_sum)[2], int row0, int lane, int sq, float logit_scale) {
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
            for (int i = 0; i < D / 8; ++i) {
                const int col = i * 8 + (lane & 3) * 2;
                if (col < p.head_dim) {
                    *reinterpret_cast<unsigned*>(orow + col) = attn_pack2<BF16>(acc[i][2 * r] * inv, acc[i][2 * r + 1] * inv);
                }
            }
            if (p.lse != nullptr && (lane & 3) == 0) {
                p.lse[seq.lse + row] = sum == 0.f ? attn_neg_inf() : row_max[r] * logit_scale + __logf(sum);
            }
        }
    }
}
