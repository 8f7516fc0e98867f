// Segmented forward state passes, for a state whose transition across a chunk is diagonal (per-key decays: GLA).
// Each sequence is cut into S segments of whole chunks, and a pass walks every segment at once instead of each
// sequence's chunks one after another (S times the blocks, 1/S of the walk each):
//   1. the pass over the segments from a zero state, writing each segment's end state alone (the forward pass with
//      STORE, no hbuf, PASS_HT): `local`;
//   2. this kernel, per sequence, S steps: the state at each segment boundary, from the sequence's initial state and
//      each segment's per-key decay, the product of its chunks' (Dk);
//   3. the pass over the segments again, from those boundaries, writing what the unsegmented pass writes.
// Segment s of a sequence:  start_s = x,  x = D_s x + local_s  (from x = h0 or 0; ht = x at the end)
// with D_s x = 0 where a chunk of the segment has decay 0 (a reset of that key, or an underflow), selected as the
// unsegmented pass selects per chunk (the state before a reset may hold a NaN that the reset discards).
#include "common/chunk_pass.cuh"

using namespace rawdelta;

constexpr int MAX_SEGMENTS = 16;

// One block per (sequence n, head h, key d) of N sequences of S segments each; threads over the V value columns.
// Layouts: local, bounds [N S, H, K, V] float (segment n S + s); Dk [NC, H, K] float; seg_chunk0 [N S + 1] int, the
// segments' first chunks (the chunk table of the segments as sequences); h0, ht [N, H, K, V] float or null.
__global__ void __launch_bounds__(128) segment_combine_kernel(
    const float* __restrict__ local, const float* __restrict__ Dk, const int* __restrict__ seg_chunk0,
    const float* __restrict__ h0, float* __restrict__ bounds, float* __restrict__ ht, int S, int H, int K, int V) {
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
        float x = h0 != nullptr ? h0[row + v] : 0.f;
        for (int s = 0; s < S; ++s) {
            const i64 e = (((i64)n * S + s) * H + h) * KV + (i64)d * V + v;
            bounds[e] = x;
            const float f = decay[s];
            x = (f < 0.f ? 0.f : f * x) + local[e];
        }
        if (ht != nullptr) ht[row + v] = x;
    }
}
