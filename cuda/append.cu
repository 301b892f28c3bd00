// Appending new keys and values to a KV cache (FlashAttention's in-call append, vLLM's
// `reshape_and_cache`): row (token t, kv head h) of k_new/v_new is copied to
//
//  * a contiguous cache `[batch, max_len, kv_heads, d]`: sequence b = t / new_len, position
//    lens[b] - new_len + (t % new_len) (lens counts the keys with the new rows included); with
//    packed rows (cu_seqlens, vLLM v1's mixed batches) sequence b is the one whose rows
//    cu_seqlens[b]..cu_seqlens[b + 1] hold t, n their count, position lens[b] - n + (t -
//    cu_seqlens[b]);
//  * a paged cache `[num_pages, page_size, kv_heads, d]`: page slot / page_size, row
//    slot % page_size, where slot = slot_mapping[t] (int64, vLLM's `slot_mapping`).
//
// Lengths, prefix sums and slots are read only here, never on the host, so a CUDA graph replays
// with new ones. A destination outside the cache (a negative slot: vLLM's padding tokens; a slot
// at or past num_pages * page_size; a position outside [0, max_len)) is skipped, and prefix sums
// are clamped as the attention kernels clamp them (decode.cuh's dec_seq): wrong rows, never an
// access outside the caller's buffers.
//
// A pure copy: bit-exact, no conversion, so one body serves every dtype; the entry points are
// per dtype for the launcher's naming. Launch: block (APPEND_THREADS, 1, 1), grid (x, 2, 1),
// blockIdx.y 0 for keys and 1 for values, each thread copying one 16-byte vector (the `_v16`
// kernels, when head_dim * size, every base and every stride are multiples of 16 bytes) or one
// element per step of a grid-stride loop over (token, kv head, vector). No allocation, no
// synchronisation, no shared memory.

#define APPEND_THREADS 256

// Must match `AppendParams` (#[repr(C)]) in src/gpu/append.rs.
struct AppendParams {
    long long src_stride[2][3];  // k_new, v_new: element strides of [batch, seq, head]
    long long dst_stride[2][3];  // k_cache, v_cache: element strides of [batch|page, pos|row, head]
    unsigned long long src[2];   // k_new, v_new
    unsigned long long dst[2];   // k_cache, v_cache
    unsigned long long lens;     // contiguous: int32 [batch]
    unsigned long long slots;    // paged: int64 [tokens]
    unsigned long long cu_seqlens;  // contiguous, packed rows: int32 [seqs + 1]; 0 otherwise
    long long tokens;            // batch * new_len rows of k_new
    long long num_slots;         // paged: num_pages * page_size
    int new_len;                 // rows per sequence of k_new
    int kv_heads;
    int row_vecs;                // copies per head_dim row (vectors or elements)
    int max_len;                 // contiguous: positions per sequence
    int page_size;               // paged: rows per page
    int paged;                   // 1: slots, 0: lens
    int seqs;                    // packed rows: sequences (entries of lens)
    int max_q;                   // packed rows: the most any sequence has
};
static_assert(sizeof(AppendParams) == 200, "AppendParams must match the Rust #[repr(C)] struct");

struct alignas(16) AppendVec16 {
    unsigned int w[4];
};

// Prefix sum k clamped into [0, tokens]: a malformed device array stays inside k_new's rows.
__device__ __forceinline__ long long append_cu(const AppendParams& p, const int* cu, int k) {
    return min(max((long long)cu[k], 0LL), p.tokens);
}

// Packed rows: token t's sequence (the last whose clamped start is at most t, by binary search),
// and its position there; false when t is none of the clamped rows of that sequence (an array
// that is not non-decreasing) or past the max_q rows the attention reads of it.
__device__ __forceinline__ bool append_packed(const AppendParams& p, long long t, long long& seq, long long& pos) {
    const int* cu = reinterpret_cast<const int*>(p.cu_seqlens);
    int lo = 0, hi = p.seqs;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (append_cu(p, cu, mid) <= t) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    const long long q0 = append_cu(p, cu, lo);
    const long long n = min(max(append_cu(p, cu, lo + 1), q0) - q0, (long long)p.max_q);
    const long long i = t - q0;
    if (i < 0 || i >= n) return false;
    seq = lo;
    pos = (long long)reinterpret_cast<const int*>(p.lens)[lo] - n + i;
    return true;
}

// One grid-stride loop over the rows' copies of keys (KV = 0) or values (KV = 1). Index is int
// when every index fits (the usual case: cheaper divisions), long long otherwise. E: element
// storage, C: the unit copied. KV is a template argument so that the strides are read from the
// parameter block at fixed offsets (a runtime choice copies them to a local array: a stack frame).
template <typename E, typename C, typename Index, int KV>
__device__ __forceinline__ void append_loop(const AppendParams& p) {
    const E* src = reinterpret_cast<const E*>(p.src[KV]);
    E* dst = reinterpret_cast<E*>(p.dst[KV]);
    const Index per_token = (Index)p.kv_heads * (Index)p.row_vecs;
    const Index n = (Index)p.tokens * per_token;
    const Index step = (Index)gridDim.x * (Index)blockDim.x;
    for (Index i = (Index)blockIdx.x * (Index)blockDim.x + (Index)threadIdx.x; i < n; i += step) {
        const Index t = i / per_token;
        const Index r = i - t * per_token;
        const Index h = r / (Index)p.row_vecs;
        const Index v = r - h * (Index)p.row_vecs;
        const Index b = t / (Index)p.new_len;
        const Index j = t - b * (Index)p.new_len;
        long long page, row;
        if (p.paged) {
            const long long slot = reinterpret_cast<const long long*>(p.slots)[t];
            if (slot < 0 || slot >= p.num_slots) continue;  // padding token or out of range
            page = slot / p.page_size;
            row = slot - page * p.page_size;
        } else {
            long long seq = (long long)b, pos;
            if (p.cu_seqlens != 0) {
                if (!append_packed(p, (long long)t, seq, pos)) continue;
            } else {
                pos = (long long)reinterpret_cast<const int*>(p.lens)[b] - p.new_len + (long long)j;
            }
            if (pos < 0 || pos >= p.max_len) continue;  // a length the cache cannot hold
            page = seq;
            row = pos;
        }
        const C* s = reinterpret_cast<const C*>(src + (long long)b * p.src_stride[KV][0] + (long long)j * p.src_stride[KV][1] +
                                                (long long)h * p.src_stride[KV][2]);
        C* d = reinterpret_cast<C*>(dst + page * p.dst_stride[KV][0] + row * p.dst_stride[KV][1] + (long long)h * p.dst_stride[KV][2]);
        d[v] = s[v];
    }
}

template <typename E, typename C, int KV>
__device__ __forceinline__ void append_rows(const AppendParams& p) {
    const long long n = p.tokens * (long long)p.kv_heads * (long long)p.row_vecs;
    // The 32-bit loop's last index plus one grid step must not wrap.
    const long long step = (long long)gridDim.x * blockDim.x;
    if (n + step <= 0x7fffffffLL) {
        append_loop<E, C, int, KV>(p);
    } else {
        append_loop<E, C, long long, KV>(p);
    }
}

template <typename E, typename C>
__device__ __forceinline__ void append_kernel(const AppendParams& p) {
    if (blockIdx.y == 0) {
        append_rows<E, C, 0>(p);
    } else {
        append_rows<E, C, 1>(p);
    }
}

// The entry points (element and 16-byte vector copies per dtype; at least one block per SM, not
// full occupancy: left to itself ptxas caps sm_120 at 40 registers and spills), generated from
// the kernel registry (src/registry.rs) by build.rs.
#include "append_entries.cuh"
