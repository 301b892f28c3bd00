// The source of spills_and_wgmma.log (see README.md): not built by the crate.
#include "wgmma.cuh"
extern "C" __global__ void __launch_bounds__(128) ser(float* out, unsigned long long a, unsigned long long b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    float d[32];
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    attn_wgmma_fence();
    attn_wgmma_ss_m64n64_f16(d, a, b, 1);
    d[0] += out[threadIdx.x];
    attn_wgmma_ss_m64n64_f16(d, a, b, 1);
    attn_wgmma_commit();
    attn_wgmma_wait<0>();
    for (int i = 0; i < 32; ++i) out[threadIdx.x * 32 + i] = d[i];
#endif
}
extern "C" __global__ void __launch_bounds__(128) spill(float* out, int n) {
    float x[64];
    for (int i = 0; i < 64; ++i) x[i] = out[i * n + threadIdx.x];
    for (int k = 0; k < n; ++k) for (int i = 0; i < 64; ++i) x[i] = x[i] * x[(i + k) & 63] + 1.f;
    for (int i = 0; i < 64; ++i) out[i + threadIdx.x] = x[i];
}
