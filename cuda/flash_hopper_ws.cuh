// The flash kernel's warp-specialised Hopper kernel (sm_90a), built the way FlashAttention-3 is:
// the copy engine (TMA) loads every tile, the tensor cores run from shared memory, and the warps
// only do softmax. Included by flash_hopper.cu after flash_hopper.cuh, whose per-tile steps (S = Q·Kᵀ,
// masking, online softmax, P·V, the epilogue) it shares.
//
// A block is one producer warpgroup and CWG consumer warpgroups; each consumer owns 64 query rows
// of a BM = 64·CWG row tile. One producer thread issues every load: a Q tile, then K and V tiles
// into a ring of STAGES buffers, each completing on an mbarrier ("full"); consumers release a
// buffer on its "empty" mbarrier as soon as the wgmma that read it has finished, so loads run
// ahead as far as the ring allows and no barrier spans the block. The two consumers take turns
// issuing their matrix products (ping-pong on two named barriers), so one's softmax runs while
// the tensor cores work for the other. `setmaxnreg` moves registers from the producer (which
// needs almost none) to the consumers.
//
// The grid is persistent: gridDim.x blocks (one per SM) take turns over the (query tile, head,
// batch) tiles (see attn_persistent_tile in common.cuh), so the producer loads the next tile's Q and K while the consumers
// finish the last one.
// Fixed-length batches only (the host runs packed batches on flash_hopper_fwd): the tensor maps
// describe [batch, seq, heads, head_dim] operands, and the copy engine zero-fills rows past a
// sequence and columns past head_dim, as cp.async's zero-fill does in the other kernels.
#pragma once

// The driver's CUtensorMap (cuTensorMapEncodeTiled on the host), opaque here: 128 bytes, passed
// by value as a __grid_constant__ parameter so the copy engine can read it from parameter space.
struct __align__(64) AttnTensorMap {
    unsigned long long opaque[16];
};

__device__ __forceinline__ void ws_mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// The producer's arrival, announcing the bytes the copy engine will deliver to this phase.
__device__ __forceinline__ void ws_mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void ws_mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed. A fresh barrier counts its (virtual)
// previous phase, parity 1, as completed: a producer's first wait on an empty buffer passes.
__device__ __forceinline__ void ws_mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nWS_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WS_WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// One [rows × 64] box of a 4-d tensor map (coordinates innermost first) into shared memory, in
// the 128-byte-swizzled layout wgmma reads; completes `bar`'s transaction count.
__device__ __forceinline__ void ws_tma_load(unsigned dst, const AttnTensorMap& map, unsigned bar, int c0, int c1, int c2,
                                            int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
        "[%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(&map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
        : "memory");
}
__device__ __forceinline__ void ws_prefetch_map(const AttnTensorMap& map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&map)) : "memory");
}
template <int N>
__device__ __forceinline__ void ws_setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void ws_setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Registers per thread after setmaxnreg: the whole register file is 64K, 128·(CWG+1) threads.
template <int CWG>
struct WsRegs;
template <>
struct WsRegs<2> {  // 128·24 + 256·240 = 64512
    static constexpr int producer = 24, consumer = 240;
};
template <>
struct WsRegs<3> {  // 128·32 + 384·160 = 65536
    static constexpr int producer = 32, consumer = 160;
};

template <int D, int BN, int CWG, int STAGES, bool BF16>
__device__ __forceinline__ void flash_hopper_ws_fwd(const AttnParams& p, const AttnTensorMap& tq, const AttnTensorMap& tk,
                                                    const AttnTensorMap& tv) {
    constexpr int BM = 64 * CWG;
    constexpr unsigned Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
    constexpr unsigned CONSUMERS = 128 * CWG;
    extern __shared__ __align__(1024) unsigned char hop_smem[];
    // wgmma's and TMA's 128-byte swizzle is anchored to 1024-byte boundaries: align the base (the
    // launch adds 1 KiB), then Q, the K ring, the V ring, and the mbarriers (8 bytes each).
    const unsigned base = (attn_smem_addr(hop_smem) + 1023u) & ~1023u;
    const unsigned sQ = base, sK = sQ + Q_BYTES, sV = sK + STAGES * KV_BYTES;
    const unsigned bars = sV + STAGES * KV_BYTES;
    const unsigned q_full = bars, q_empty = bars + 8;
    const auto k_full = [&](int s) { return bars + 16 + 8 * s; };
    const auto k_empty = [&](int s) { return bars + 16 + 8 * (STAGES + s); };
    const auto v_full = [&](int s) { return bars + 16 + 8 * (2 * STAGES + s); };
    const auto v_empty = [&](int s) { return bars + 16 + 8 * (3 * STAGES + s); };

    if (threadIdx.x == 0) {
        ws_mbar_init(q_full, 1);
        ws_mbar_init(q_empty, CONSUMERS);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            ws_mbar_init(k_full(s), 1);
            ws_mbar_init(k_empty(s), CONSUMERS);
            ws_mbar_init(v_full(s), 1);
            ws_mbar_init(v_empty(s), CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int sq = p.seqlen_q, sk = p.seqlen_k;
    const AttnTileOrder order = attn_tile_order(p, BM);
    const int wg = threadIdx.x >> 7;
    if (wg == 0) {
        // Producer. Load order = the order consumers need tiles: Q, K(first), then K(n+1) before
        // V(n), so a consumer never waits on a V while the K it needs sits behind it.
        ws_setmaxnreg_dec<WsRegs<CWG>::producer>();
        if (threadIdx.x == 0) {
            ws_prefetch_map(tq);
            ws_prefetch_map(tk);
            ws_prefetch_map(tv);
            int kc = 0, vc = 0, qc = 0;  // tiles loaded so far: ring slot and phase
            int m0, h, b;
            for (int k = 0; attn_persistent_tile(order, p, k, BM, m0, h, b); ++k) {
                const AttnKeyTiles kt = attn_key_tiles(p, m0, BM, BN, sq, sk);
                const int nb_begin = kt.nb_begin, nb_end = kt.nb_end;
                if (nb_begin >= nb_end) continue;  // rows that see no key: consumers write zeros
                const int hk = h / p.kv_group;
                ws_mbar_wait(q_empty, (qc & 1) ^ 1);
                ++qc;
                ws_mbar_arrive_expect_tx(q_full, Q_BYTES);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb) ws_tma_load(sQ + cb * BM * 128, tq, q_full, cb * 64, m0, h, b);
                const auto load = [&](const AttnTensorMap& map, unsigned ring, unsigned full, unsigned empty, int& count,
                                      int n) {
                    const int slot = count % STAGES;
                    ws_mbar_wait(empty + 8 * slot, ((count / STAGES) & 1) ^ 1);
                    ++count;
                    ws_mbar_arrive_expect_tx(full + 8 * slot, KV_BYTES);
#pragma unroll
                    for (int cb = 0; cb < D / 64; ++cb)
                        ws_tma_load(ring + slot * KV_BYTES + cb * BN * 128, map, full + 8 * slot, cb * 64, n * BN, hk, b);
                };
                load(tk, sK, k_full(0), k_empty(0), kc, nb_begin);
                for (int nb = nb_begin; nb < nb_end; ++nb) {
                    if (nb + 1 < nb_end) load(tk, sK, k_full(0), k_empty(0), kc, nb + 1);
                    load(tv, sV, v_full(0), v_empty(0), vc, nb);
                }
            }
        }
        return;
    }

    // Consumers. Per key tile n (FlashAttention-3's order): issue S(n) = Q·K(n)ᵀ and then
    // O += P(n-1)·V(n-1) back to back, wait for S(n) only, and run softmax(n) while P·V runs; then
    // wait for it, rescale O and pack P(n). The two warpgroups take turns issuing (ping-pong, two
    // named barriers), so one's softmax runs under the other's matrix products.
    ws_setmaxnreg_inc<WsRegs<CWG>::consumer>();
    const int c = wg - 1;  // rows [64c, 64c + 64) of the tile
    const int lane = threadIdx.x & 31;
    const int warp_in_wg = (threadIdx.x >> 5) & 3;
    const unsigned q_rows = sQ + c * 64 * 128;
    const AttnLogits lg = attn_logits(p);
    const float logit_scale = lg.scale, scale_log2 = lg.scale_log2;
    // Named barrier 1 + c: this warpgroup's turn. Every warpgroup runs the same number of turns
    // (the same tiles, the same key tiles each), so the turns stay paired; the first turn is
    // warpgroup 0's.
    static_assert(CWG == 2, "ping-pong pairs two consumer warpgroups");
    const auto turn_wait = [&]() { asm volatile("bar.sync %0, 256;\n" ::"r"(1 + c) : "memory"); };
    const auto turn_pass = [&]() { asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - c) : "memory"); };
    if (c == 1) turn_pass();
    int kc = 0, vc = 0, qc = 0;
    int m0, h, b;
    for (int k = 0; attn_persistent_tile(order, p, k, BM, m0, h, b); ++k) {
        const AttnKeyTiles kt = attn_key_tiles(p, m0, BM, BN, sq, sk);
        const int nb_begin = kt.nb_begin, nb_end = kt.nb_end;
        const AttnSeq seq = attn_seq(p, b, h);
        unsigned short* o = static_cast<unsigned short*>(p.o) + seq.o;
        const int row0 = m0 + c * 64 + warp_in_wg * 16 + (lane >> 2);

        float acc[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
        float row_max[2] = {attn_neg_inf(), attn_neg_inf()};
        float row_sum[2] = {0.f, 0.f};
        if (nb_begin < nb_end) {
            ws_mbar_wait(q_full, qc & 1);
            ++qc;
            float s[BN / 2];
            unsigned pa[BN / 16][4];  // P(n-1): the A operand of the pending P·V
            float rescale[2];
            // S of key tile nb has landed: its K slot goes back to the producer (and Q after
            // the last tile), then the mask and the online softmax.
            const auto scores_landed = [&](int nb, int k_slot) {
                attn_wgmma_fence_operands(s);
                ws_mbar_arrive(k_empty(k_slot));
                ++kc;
                if (nb + 1 == nb_end) ws_mbar_arrive(q_empty);
                hop_cap_and_mask<BN>(p, s, nb * BN, m0, kt.m_last, row0, lane, sk, kt.diag);
                hop_softmax<BN>(s, row_max, row_sum, rescale, scale_log2);
            };
            // The first tile: S alone (nothing to rescale yet).
            {
                const int slot = kc % STAGES;
                ws_mbar_wait(k_full(slot), (kc / STAGES) & 1);
                hop_issue_s<D, BN, BM, BF16>(s, q_rows, sK + slot * KV_BYTES);
                attn_wgmma_wait<0>();
                scores_landed(nb_begin, slot);
                hop_pack_p<BN, BF16>(s, pa);
            }
            for (int nb = nb_begin + 1; nb < nb_end; ++nb) {
                const int k_slot = kc % STAGES, v_slot = vc % STAGES;
                turn_wait();
                ws_mbar_wait(k_full(k_slot), (kc / STAGES) & 1);
                hop_issue_s<D, BN, BM, BF16>(s, q_rows, sK + k_slot * KV_BYTES);
                ws_mbar_wait(v_full(v_slot), (vc / STAGES) & 1);
                hop_issue_pv<D, BN, BF16>(acc, pa, sV + v_slot * KV_BYTES);
                turn_pass();
                attn_wgmma_wait<1>();  // S(nb); P·V(nb-1) still runs
                scores_landed(nb, k_slot);
                attn_wgmma_wait<0>();
                attn_wgmma_fence_operands(acc);
                ws_mbar_arrive(v_empty(v_slot));
                ++vc;
                hop_rescale<D>(acc, rescale);
                hop_pack_p<BN, BF16>(s, pa);
            }
            // The last tile's P·V.
            const int v_slot = vc % STAGES;
            ws_mbar_wait(v_full(v_slot), (vc / STAGES) & 1);
            hop_issue_pv<D, BN, BF16>(acc, pa, sV + v_slot * KV_BYTES);
            attn_wgmma_wait<0>();
            attn_wgmma_fence_operands(acc);
            ws_mbar_arrive(v_empty(v_slot));
            ++vc;
        }
        hop_store_rows<D, BF16>(p, seq, o, acc, row_max, row_sum, row0, lane, sq, logit_scale);
    }
}
