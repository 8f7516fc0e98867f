// GLA, fused chunked mode: one block of 256 threads per (sequence, head) walks the sequence's chunks with the whole
// K x V float32 state in registers (K, V <= 128), computing each chunk's factors on chip (gla/chunk_factors.cuh, the
// stage prepare writes to global memory for chunk_gla), so nothing is written but the outputs: no per-token factor
// buffers, no per-chunk states. Layouts and names: gla/chunk.cuh; math: rawdelta/ops/gla/README.md.
//
// Template parameters: T input dtype; E the 16-bit mma type; BT chunk size; KP, VP the key and value dimensions
// padded to 64 or 128. Grid N * H (blockIdx.x = n H + h).
#include "gla/chunk_factors.cuh"

using namespace rawdelta;

namespace gla_fused {

constexpr int NW = 8;

// The chunk operands a fused kernel keeps in shared memory besides the factor scratch: qg, kg (BT x KP), v
// (BT x VP), the scores P (BT x BT; input precision: split for float inputs) and the per-key decays (KP floats).
template <typename T, typename E, int BT, int KP, int VP>
struct ChunkOperands {
    using TT = typename InputTile<T, E>::type;
    static constexpr int LDK = KP + TILE_PAD, LDV = VP + TILE_PAD, LDP = BT + TILE_PAD;
    TT sQg, sKg, sV, sP;
    float* kdecay;
    __device__ __forceinline__ void carve(SmemCursor& cur) {
        cur.into(sQg, BT * LDK);
        cur.into(sKg, BT * LDK);
        cur.into(sV, BT * LDV);
        cur.into(sP, BT * LDP);
        kdecay = cur.take<float>(KP);
    }
    // The chunk at token bos of head h (L rows, live before its first dead row): the factors into the operand
    // tiles (zero past the chunk and past K), P from the scores. The factor scratch `fs` may overlap anything
    // carved after these tiles. A barrier last.
    __device__ __forceinline__ void factors(const ChunkFactorScratch<T, E, BT>& fs, const T* q, const T* k,
                                            const float* g, i64 tok, i64 HK, int L, int live, int K, float scale) {
        gla_chunk_factors(
            fs, q + tok, k + tok, g + tok, HK, L, live, K, scale,
            [&](int r, int d, bool, float, int, float xq, float xk) {
                tile_put(sQg, r * LDK + d, xq);
                tile_put(sKg, r * LDK + d, xk);
            },
            [&](int d, float x) { kdecay[d] = x; });
        constexpr int LDA = ChunkFactorScratch<T, E, BT>::LDA;
        for (int idx = 2 * threadIdx.x; idx < BT * BT; idx += 2 * blockDim.x) {
            const int r = idx / BT, j = idx % BT;
            tile_put_pair(sP, r * LDP + j, fs.sA[r * LDA + j], fs.sA[r * LDA + j + 1]);
        }
        __syncthreads();
    }
};

}  // namespace gla_fused

// Forward, per (sequence n, head h). S = h0 (or 0); per chunk (L rows, live before the first dead row), with S the
// state at its start:
//   o = scale (qg S) + P v                   (rows from the first dead row on: NaN)
//   S = 2^G_last S + kg^T v                  (per key row; 0 by selection across a reset; NaN after a dead row)
// ht = S. Products on tensor cores (the state as a split operand); the state update's product has one chain per
// output tile (UNROLL 1), so the state and the output's accumulators stay in registers.
template <typename T, typename E, int BT, int KP, int VP>
__global__ void __launch_bounds__(256) gla_fused_chunk_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ g,
    const float* __restrict__ h0, const i64* __restrict__ cu, T* __restrict__ o, float* __restrict__ ht, int T_,
    int H, int K, int V, float scale, int flags) {
    using namespace gla_fused;
    using Ops = ChunkOperands<T, E, BT, KP, VP>;
    constexpr int LDK = Ops::LDK, LDV = Ops::LDV, LDP = Ops::LDP;
    const PassOptions opt{flags};
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    Ops ops;
    ops.carve(cur);
    // The factor scratch and the state's split tile share what follows (the state is stored after the factors).
    SmemCursor scratch{cur.p};
    ChunkFactorScratch<T, E, BT> fs;
    fs.carve(scratch);
    const Split<E> sS = cur.take_split<E>(KP * LDV);

    const int n = blockIdx.x / H, h = blockIdx.x % H;
    const SeqRange sr = seq_range(cu, n, T_, opt.varlen());
    const int len = (int)(sr.eos - sr.bos);
    const i64 HK = (i64)H * K, HV = (i64)H * V, state_off = ((i64)n * H + h) * K * V;
    const bool paired = (V & 1) == 0;
    for (int d = threadIdx.x; d < KP; d += blockDim.x) ops.kdecay[d] = 0.f;  // padding keys: decay 0, never set

    Acc<KP, VP, NW> S;
    if (opt.h0()) load_state(S, h0 + state_off, K, V, 0, V);
    else S.fill(0.f);

#pragma unroll 1
    for (int c0 = 0; c0 < len; c0 += BT) {
        const i64 bos = sr.bos + c0;
        const int L = min(BT, len - c0);
        const i64 tok = bos * HK + (i64)h * K;
        const int live = first_dead_key_row(g + tok, HK, L, K, fs.sLive);
        load_tile(ops.sV, LDV, v + bos * HV + (i64)h * V, HV, L, V, BT, VP);
        ops.factors(fs, q, k, g, tok, HK, L, live, K, scale);  // waits for the v tile too
        S.store(sS, LDV);
        __syncthreads();
        Acc<BT, VP, NW> Y;
        Y.fill(0.f);
        gemm<E, MK, KN, BT, VP, KP, NW>(Y, ops.sQg, LDK, sS, LDV);
        Y.apply([&](int, int, float& x) { x *= scale; });
        gemm<E, MK, KN, BT, VP, BT, NW>(Y, ops.sP, LDP, ops.sV, LDV);
        Y.apply_pairs([&](int i, int j, float& x0, float& x1) {
            if (i < L)
                put_row_pair(o, (bos + i) * HV + (i64)h * V + j, j, V, paired, i < live ? x0 : dead_value(),
                             i < live ? x1 : dead_value());
        });
        S.apply([&](int kd, int, float& x) {
            const float f = ops.kdecay[kd];
            x = f == 0.f ? 0.f : x * f;  // a reset: zero by selection (the state before it may hold a NaN)
        });
        gemm<E, KM, KN, KP, VP, BT, NW, 1>(S, ops.sKg, LDK, ops.sV, LDV);
        if (live < L) S.fill(dead_value());
        __syncthreads();
    }
    if (opt.ht()) store_state(S, ht + state_off, K, V, 0, V);
}
