// Segmented state passes, for a state whose transition across a chunk is diagonal (per-key decays: GLA). Each
// sequence is cut into S segments of whole chunks, and a pass walks every segment at once instead of each
// sequence's chunks one after another (S times the blocks, 1/S of the walk each):
//   1. the pass over the segments from a zero state (gradient), writing each segment's end state (forward: the
//      forward pass with STORE, no hbuf, PASS_HT) or its start's state gradient (reverse) alone: `local`;
//   2. this kernel, per sequence, S steps: the state (gradient) at each segment boundary, from the sequence's
//      initial state (final state gradient) and each segment's per-key decay, the product of its chunks' (Dk);
//   3. the pass over the segments again, from those boundaries, writing what the unsegmented pass writes.
// Forward, segment s of a sequence:  start_s = x,  x = D_s x + local_s  (from x = h0 or 0; ht = x at the end)
// Reverse, from the last segment:     end_s = x,  x = D_s x + local_s  (from x = dht or 0; dh0 = x at the end)
// with D_s x = 0 where a chunk of the segment has decay 0 (a reset of that key, or an underflow), selected as the
// unsegmented pass selects per chunk (the state before a reset may hold a NaN that the reset discards).
#include "common/chunk_pass.cuh"

using namespace rawdelta;

constexpr int MAX_SEGMENTS = 16;

// One block per (sequence n, head h, key d) of N sequences of S segments each; threads over the V value columns.
// Layouts: local, bounds [N S, H, K, V] float (segment n S + s); Dk [NC, H, K] float; seg_chunk0 [N S + 1] int, the
// segments' first chunks (the chunk table of the segments as sequences); carry_in, carry_out [N, H, K, V] float or
// null (forward: h0 in, ht out; reverse: dht in, dh0 out).
template <bool REVERSE>
__global__ void __launch_bounds__(128) segment_combine_kernel(
    const float* __restrict__ local, const float* __restrict__ Dk, const int* __restrict__ seg_chunk0,
    const float* __restrict__ carry_in, float* __restrict__ bounds, float* __restrict__ carry_out, int S, int H,
    int K, int V) {
    __shared__ float decay[MAX_SEGMENTS];  // per segment: the key's decay across it, -1 where a chunk's is 0
    const int d = blockIdx.x % K, h = (blockIdx.x / K) % H, n = blockIdx.x / (K * H);
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const int seg = n * S + s;
        float f = 1.f;
        bool cut = false;
        for (int c = seg_chunk0[seg]; c < seg_chunk0[seg + 1]; ++c) {
            const float x = Dk[((i64)c * H + h) * K + d];
            cut |= x == 0.f;
            f *= x;
        }
        decay[s] = cut ? -1.f : f;
    }
    __syncthreads();
    const i64 KV = (i64)K * V, row = ((i64)n * H + h) * KV + (i64)d * V;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float x = carry_in != nullptr ? carry_in[row + v] : 0.f;
        for (int i = 0; i < S; ++i) {
            const int s = REVERSE ? S - 1 - i : i;
            const i64 e = (((i64)n * S + s) * H + h) * KV + (i64)d * V + v;
            bounds[e] = x;
            const float f = decay[s];
            x = (f < 0.f ? 0.f : f * x) + local[e];
        }
        if (carry_out != nullptr) carry_out[row + v] = x;
    }
}
