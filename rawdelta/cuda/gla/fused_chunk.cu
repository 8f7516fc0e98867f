// GLA, fused chunked mode: one block of 256 threads per (sequence, head, value block) in the forward, per (sequence,
// head) in the backward, walks the sequence's chunks with its K x V float32 state in registers (K <= 128; the
// forward's blocks of VP <= 64 value columns, the backward's whole V <= 128), computing each chunk's factors on chip
// (gla/chunk_factors.cuh, the stage prepare writes to global memory for chunk_gla), so nothing is written but the
// outputs: no per-token factor buffers, no per-chunk states. Layouts and names: gla/chunk.cuh; math:
// rawdelta/ops/gla/README.md.
//
// Template parameters: T input dtype; E the 16-bit mma type; BT chunk size; KP the key dimension padded to 64 or 128;
// VP the value columns of a block: the forward's value block (32, 64 or 128), the backward's V padded to 64 or 128;
// P the operand precision of the shared-memory tiles (InputTile: T's, or float for hi + lo split tiles). The
// backward runs with P = float for every input type: its gate gradient sums, across the whole sequence, terms that
// cancel down to a much smaller value, and a 16-bit rounding of the state, its gradient or the scaled q and k that
// build them (2^-9 relative) would not cancel with them and grows with the length; split operands (about 2^-17) keep
// that sum at chunk_gla's accuracy. Grid N * H * NVB in the forward (blockIdx.x = (n H + h) NVB + vb), N * H in the
// backward (blockIdx.x = n H + h).
#include "gla/chunk_bwd_intra.cuh"
#include "gla/chunk_factors.cuh"

using namespace rawdelta;

namespace gla_fused {

constexpr int NW = 8;

// The chunk operands a fused kernel keeps in shared memory besides the factor scratch: qg, kg (BT x KP), v
// (BT x VP), the scores (BT x BT), in P's tile type (split for float), and the per-key decays (KP floats).
template <typename T, typename E, int BT, int KP, int VP, typename P = T>
struct ChunkOperands {
    using TT = typename InputTile<P, E>::type;
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
    // tiles (zero past the chunk and past K; qg times qscale, 0 from row qrows on), P from the scores. The factor
    // scratch `fs` may overlap anything carved after these tiles. A barrier last.
    __device__ __forceinline__ void factors(const ChunkFactorScratch<T, E, BT>& fs, const T* q, const T* k,
                                            const float* g, i64 tok, i64 HK, int L, int live, int K, float scale,
                                            float qscale = 1.f, int qrows = BT) {
        gla_chunk_factors<false>(
            fs, q + tok, k + tok, g + tok, HK, L, live, K, scale,
            [&](int r, int d, float xq0, float xq1, float xk0, float xk1, auto) {
                const bool qr = r < qrows;
                tile_put_pair(sQg, r * LDK + d, qr ? xq0 * qscale : 0.f, qr ? xq1 * qscale : 0.f);
                tile_put_pair(sKg, r * LDK + d, xk0, xk1);
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

// The scores dA's split tile of the backward: the scores' own tile where that is split (split operand tiles; the
// scores are dead once dv is written), else carved.
template <typename E>
__device__ __forceinline__ Split<E> scores_tile(Split<E> p, SmemCursor&, int) { return p; }
template <typename E>
__device__ __forceinline__ Split<E> scores_tile(E*, SmemCursor& cur, int n) { return cur.take_split<E>(n); }

// The backward kernels' shared memory: the chunk operands, do (BT x VP), the scores dA (split, BT x BT); then the
// factor scratch, overlapped by what the slice stages use after the factors: the state (or its gradient) as an
// input-precision operand (KP x VP), and per slice of KS keys G (float), R (int), q, k (float) and the split scratch
// of the intra-chunk products (gla/chunk_bwd_intra.cuh).
template <typename T, typename E, int BT, int KP, int VP, typename P>
struct BwdTiles {
    using Ops = ChunkOperands<T, E, BT, KP, VP, P>;
    using TT = typename Ops::TT;
    static constexpr int KS = 64, LDF = KS + 4, LDK = KS + TILE_PAD, LDM = Ops::LDP, LDV = Ops::LDV;
    Ops ops;
    TT sDo, sS;
    Split<E> sA, sT;
    ChunkFactorScratch<T, E, BT> fs;
    float *sG, *sQ, *sK, *sDa;
    int *sR, *sFlag;
    __device__ __forceinline__ void carve(SmemCursor& cur) {
        ops.carve(cur);
        cur.into(sDo, BT * LDV);
        sA = scores_tile<E>(ops.sP, cur, BT * LDM);
        SmemCursor scratch{cur.p};
        fs.carve(scratch);
        cur.into(sS, KP * LDV);
        sG = cur.take<float>(BT * LDF);
        sR = cur.take<int>(BT * LDF);
        sQ = cur.take<float>(BT * LDF);
        sK = cur.take<float>(BT * LDF);
        sT = cur.take_split<E>(BT * LDK);
        sDa = cur.take<float>(BT);
        sFlag = cur.take<int>(4);
    }
    // The slice [k0, k0 + kc) of the chunk at tok (L rows, live): q, k and the gates; G, R from the gates. Barriers
    // around (the caller's last reads of the slice tiles must be behind a barrier).
    __device__ __forceinline__ void slice(const T* q, const T* k, const float* g, i64 tok, i64 HK, int L, int live,
                                          int kc) {
        load_tile(sG, LDF, g + tok, HK, L, kc, BT, KS);
        load_tile(sQ, LDF, q + tok, HK, L, kc, BT, KS);
        load_tile(sK, LDF, k + tok, HK, L, kc, BT, KS);
        cp_async_wait_all();
        __syncthreads();
        chunk_local_cumsum_log2(sG, sR, LDF, KS, live, BT);
        diag_blocks_elementwise<BT, E>(sG, sR, LDF, KS, live, sFlag);  // barriers around
    }
};

// What both backward kernels start from: their tiles carved from dynamic shared memory (the per-key decays zeroed,
// padding included), block (n, h)'s sequence as one value block of VP columns, and the row strides of [BT_, H, K]
// and [BT_, H, V] arrays.
template <typename T, typename E, int BT, int KP, int VP, typename P>
struct BwdBlock {
    BwdTiles<T, E, BT, KP, VP, P> t;
    StatePassBlock pb;
    int h, len;
    i64 HK, HV;
    __device__ __forceinline__ BwdBlock(unsigned char* smem, const i64* cu, int T_, int H, int K, int V,
                                        const PassOptions& opt)
        : pb(1, VP, BT, cu, T_, H, H, K, V, opt), h(pb.hv), len(pb.len), HK((i64)H * K), HV((i64)H * V) {
        SmemCursor cur{smem};
        t.carve(cur);
        for (int d = threadIdx.x; d < KP; d += blockDim.x) t.ops.kdecay[d] = 0.f;
    }
};

}  // namespace gla_fused

// Forward, per (sequence n, head h, value block vb: columns [vb VP, vb VP + VP) of V). Every value block of a head
// computes the chunk's factors (they do not depend on v); with few sequences and heads the value blocks are what
// fills the GPU. S = h0 (or 0), the block's columns; per chunk (L rows, live before the first dead row), with S the
// state at its start:
//   o = scale (qg S) + P v                   (rows from the first dead row on: NaN)
//   S = 2^G_last S + kg^T v                  (per key row; 0 by selection across a reset; NaN after a dead row)
// ht = S. Products on tensor cores (the state as a split operand); the state update's product has one chain per
// output tile (UNROLL 1), so the state and the output's accumulators stay in registers.
template <typename T, typename E, int BT, int KP, int VP>
__global__ void __launch_bounds__(256) gla_fused_chunk_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ g,
    const float* __restrict__ h0, const i64* __restrict__ cu, T* __restrict__ o, float* __restrict__ ht, int T_,
    int H, int K, int V, int NVB, float scale, int flags) {
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

    const StatePassBlock pb(NVB, VP, BT, cu, T_, H, H, K, V, opt);
    const int h = pb.h, len = pb.len, v0 = pb.v0, vcols = pb.vcols;
    const i64 HK = (i64)H * K, HV = (i64)H * V;
    for (int d = threadIdx.x; d < KP; d += blockDim.x) ops.kdecay[d] = 0.f;  // padding keys: decay 0, never set

    Acc<KP, VP, NW> S;
    if (opt.h0()) load_state(S, h0 + pb.state_off, K, V, v0, vcols);
    else S.fill(0.f);

#pragma unroll 1
    for (int c0 = 0; c0 < len; c0 += BT) {
        const i64 bos = pb.bos + c0;
        const int L = min(BT, len - c0);
        const i64 tok = bos * HK + (i64)h * K;
        const int live = first_dead_key_row<BT>(g + tok, HK, L, K, fs.sLive);
        load_tile(ops.sV, LDV, v + bos * HV + (i64)h * V + v0, HV, L, vcols, BT, VP);
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
                put_row_pair(o, (bos + i) * HV + (i64)h * V + v0 + j, j, vcols, pb.paired,
                             i < live ? x0 : dead_value(), i < live ? x1 : dead_value());
        });
        S.apply([&](int kd, int, float& x) {
            const float f = ops.kdecay[kd];
            x = f == 0.f ? 0.f : x * f;  // a reset: zero by selection (the state before it may hold a NaN)
        });
        gemm<E, KM, KN, KP, VP, BT, NW, 1>(S, ops.sKg, LDK, ops.sV, LDV);
        if (live < L) S.fill(dead_value());
        __syncthreads();
    }
    if (opt.ht()) store_state(S, ht + pb.state_off, K, V, v0, vcols);
}

// Backward, phase 1 (forward in time), per (sequence n, head h): the state recomputed as the forward does, S = h0
// (or 0); per chunk (L rows, live before the first dead row), with S its start state, per slice of KS keys
// (gla/chunk_bwd_intra.cuh; math: rawdelta/ops/gla/README.md, "Backward"):
//   dA_rj = scale do_r . v_j for j <= r < live (else 0)
//   dq_r  = scale 2^G_r (S do_r) + sum_{j < r} dA_rj 2^(G_r - G_j) k_j  +  dA_rr k_r     (rows from live on: NaN)
// and dg receives q_r dq_r without the diagonal term (float32; phase 2 reads it back and overwrites it). Then S
// as the forward. With dht, at the last chunk (S = its start state h_last): carry_d = 2^G_last,d sum_v h_last dht
// (0 across a reset in that chunk; without dht 0), the gate gradient's term of the final state's decay, for phase 2.
template <typename T, typename E, int BT, int KP, int VP, typename P>
__global__ void __launch_bounds__(256) gla_fused_chunk_bwd_dq_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ g,
    const float* __restrict__ h0, const T* __restrict__ dout, const float* __restrict__ dht,
    const i64* __restrict__ cu, T* __restrict__ dq, float* __restrict__ dg, float* __restrict__ carry, int T_, int H,
    int K, int V, float scale, int flags) {
    using namespace gla_fused;
    using Tiles = BwdTiles<T, E, BT, KP, VP, P>;
    using AccS = Acc<KP, VP, NW>;
    using AccQ = Acc<BT, Tiles::KS, NW>;
    constexpr int KS = Tiles::KS, LDF = Tiles::LDF, LDK = Tiles::LDK, LDM = Tiles::LDM, LDV = Tiles::LDV;
    constexpr int LDKO = Tiles::Ops::LDK;
    const PassOptions opt{flags};
    extern __shared__ __align__(16) unsigned char smem[];
    BwdBlock<T, E, BT, KP, VP, P> blk(smem, cu, T_, H, K, V, opt);
    Tiles& t = blk.t;
    const StatePassBlock& pb = blk.pb;
    const int h = blk.h, len = blk.len;
    const i64 HK = blk.HK, HV = blk.HV;
    const bool paired = (K & 1) == 0;

    AccS S;
    if (opt.h0()) load_state(S, h0 + pb.state_off, K, V, 0, V);
    else S.fill(0.f);
    float carried = 0.f;  // thread d < K: key d's carry

#pragma unroll 1
    for (int c0 = 0; c0 < len; c0 += BT) {
        const i64 bos = pb.bos + c0;
        const int L = min(BT, len - c0);
        const i64 tok = bos * HK + (i64)h * K;
        const int live = first_dead_key_row<BT>(g + tok, HK, L, K, t.fs.sLive);
        load_tile(t.ops.sV, LDV, v + bos * HV + (i64)h * V, HV, L, V, BT, VP);
        load_tile(t.sDo, LDV, dout + bos * HV + (i64)h * V, HV, L, V, BT, VP);
        t.ops.factors(t.fs, q, k, g, tok, HK, L, live, K, scale);  // waits for the v and do tiles too
        S.store(t.sS, LDV);
        {
            Acc<BT, BT, NW> dA;
            dA.fill(0.f);
            gemm<E, MK, NK, BT, BT, VP, NW>(dA, t.sDo, LDV, t.ops.sV, LDV);
            gla_dqk::store_scores<E>(dA, t.sA, LDM, t.sDa, live, scale);
        }
        __syncthreads();
#pragma unroll 1
        for (int k0 = 0; k0 < K; k0 += KS) {
            const int kc = min(KS, K - k0);
            t.slice(q, k, g, tok + k0, HK, L, live, kc);
            AccQ Dq;
            Dq.fill(0.f);
            gemm<E, MK, NK, BT, KS, VP, NW>(Dq, t.sDo, LDV, advance(t.sS, (i64)k0 * LDV), LDV);
            gla_dqk::dq_chunk<E>(Dq, t.sA, LDM, t.sK, t.sG, t.sR, LDF, t.sT, LDK, t.sFlag, live, scale);
            Dq.apply_pairs([&](int r, int d, float& x0, float& x1) {
                if (r >= L) return;
                const bool in = r < live;
                const float a = t.sDa[r];
                const int i = r * LDF + d;
                const i64 o = tok + k0 + r * HK + d;
                put_row_pair(dq, o, d, kc, paired, in ? x0 + a * t.sK[i] : dead_value(),
                             in ? x1 + a * t.sK[i + 1] : dead_value());
                put_row_pair(dg, o, d, kc, paired, in ? t.sQ[i] * x0 : 0.f, in ? t.sQ[i + 1] * x1 : 0.f);
            });
            __syncthreads();  // the slice tiles read
        }
        if (c0 + BT >= len && opt.dht()) {
            // the last chunk: per key, sum_v h_last dht over this thread's columns into its slot of the partial
            // sums (KP x 4 WN floats in the slice tile sQ, each written by one thread), then summed in order
            constexpr int NP = 4 * AccS::WN;
            float* part = t.sQ;
            for (int idx = threadIdx.x; idx < KP * NP; idx += blockDim.x) part[idx] = 0.f;
            __syncthreads();
            const int slot = ((threadIdx.x >> 5) / AccS::WM) * 4 + (threadIdx.x & 3);
            S.apply([&](int r, int c, float& x) {
                if (r < K && c < V) part[r * NP + slot] += x * dht[pb.state_off + (i64)r * V + c];
            });
            __syncthreads();
            if ((int)threadIdx.x < K) {
                float sum = 0.f;
                for (int p = 0; p < NP; ++p) sum += part[threadIdx.x * NP + p];
                const float f = t.ops.kdecay[threadIdx.x];
                carried = f == 0.f ? 0.f : f * sum;
            }
            __syncthreads();
        }
        S.apply([&](int kd, int, float& x) {
            const float f = t.ops.kdecay[kd];
            x = f == 0.f ? 0.f : x * f;
        });
        gemm<E, KM, KN, KP, VP, BT, NW, 1>(S, t.ops.sKg, LDKO, t.ops.sV, LDV);
        if (live < L) S.fill(dead_value());
        __syncthreads();
    }
    if ((int)threadIdx.x < K) carry[((i64)pb.n * H + h) * K + threadIdx.x] = carried;
}

// Backward, phase 2 (reverse in time), per (sequence n, head h): dS = dht (or 0), the carry from phase 1; per chunk
// from the last (L rows, live before the first dead row; when live < L and a cotangent reaches the dead rows,
// cotangent_reaches_dead_rows, dS and the carry become NaN, else the carry 0), with dS the gradient of its end state:
//   dv_j = sum_r P_rj do_r + kg_j dS
//   dx_j = 2^(G_last - G_j) (dS v_j)                        (dk's inter part)
//   dk_j = dx_j + sum_{r > j} dA_rj 2^(G_r - G_j) q_r  +  dA_jj q_j
//   dG_r = q_r dq_r - k_r (dk_r - dx_r [not in the sequence's last chunk]), both without their diagonal terms (the
//          first read back from dg, where phase 1 put it)
//   dg_s = carry + sum_{s <= r < live, same reset count} dG_r + [last chunk] sum_{j < s} k_j dx_j, per key; 0 at a
//          reset's own row (which also zeroes the carry); the carry goes on to the chunk before
//   dS   = 2^G_last dS (0 across a reset) + (scale qg)^T do
// with do's rows from live on selected out; rows from live on get NaN in dk, dv and dg. dh0 = dS.
template <typename T, typename E, int BT, int KP, int VP, typename P>
__global__ void __launch_bounds__(256) gla_fused_chunk_bwd_dkv_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ g,
    const T* __restrict__ dout, const float* __restrict__ dht, const i64* __restrict__ cu,
    const float* __restrict__ carry, T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ dg,
    float* __restrict__ dh0, int T_, int H, int K, int V, float scale, int flags) {
    using namespace gla_fused;
    using Tiles = BwdTiles<T, E, BT, KP, VP, P>;
    using AccS = Acc<KP, VP, NW>;
    using AccQ = Acc<BT, Tiles::KS, NW>;
    constexpr int KS = Tiles::KS, LDF = Tiles::LDF, LDK = Tiles::LDK, LDM = Tiles::LDM, LDV = Tiles::LDV;
    constexpr int LDKO = Tiles::Ops::LDK, LDP = Tiles::Ops::LDP;
    const PassOptions opt{flags};
    extern __shared__ __align__(16) unsigned char smem[];
    BwdBlock<T, E, BT, KP, VP, P> blk(smem, cu, T_, H, K, V, opt);
    Tiles& t = blk.t;
    const StatePassBlock& pb = blk.pb;
    const int h = blk.h, len = blk.len;
    const i64 HK = blk.HK, HV = blk.HV;
    const bool paired = (K & 1) == 0, paired_v = (V & 1) == 0;

    AccS dS;
    if (opt.dht()) load_state(dS, dht + pb.state_off, K, V, 0, V);
    else dS.fill(0.f);
    float carried = (int)threadIdx.x < K ? carry[((i64)pb.n * H + h) * K + threadIdx.x] : 0.f;

#pragma unroll 1
    for (int c = pb.nchunks - 1; c >= 0; --c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, len - c * BT);
        const i64 tok = bos * HK + (i64)h * K;
        const bool exact = c == pb.nchunks - 1;  // the rows written into the final state: k dx summed over spans
        const int live = first_dead_key_row<BT>(g + tok, HK, L, K, t.fs.sLive);
        if (live < L) {
            const bool reaches = cotangent_reaches_dead_rows(dS, dout, bos, live, L, H, V, pb);
            if (reaches) dS.fill(dead_value());
            carried = reaches ? dead_value() : 0.f;
        }
        load_tile(t.ops.sV, LDV, v + bos * HV + (i64)h * V, HV, L, V, BT, VP);
        load_tile(t.sDo, LDV, dout + bos * HV + (i64)h * V, HV, L, V, BT, VP);
        t.ops.factors(t.fs, q, k, g, tok, HK, L, live, K, scale, scale, live);  // waits for v and do too
        for (int idx = threadIdx.x; idx < (L - live) * VP; idx += blockDim.x)
            tile_put(t.sDo, (live + idx / VP) * LDV + idx % VP, 0.f);  // do on dead rows: selected out
        dS.store(t.sS, LDV);
        __syncthreads();
        {
            Acc<BT, VP, NW> Y;
            Y.fill(0.f);
            gemm<E, KM, KN, BT, VP, BT, NW>(Y, t.ops.sP, LDP, t.sDo, LDV);
            gemm<E, MK, KN, BT, VP, KP, NW>(Y, t.ops.sKg, LDKO, t.sS, LDV);
            Y.apply_pairs([&](int i, int j, float& x0, float& x1) {
                if (i < L)
                    put_row_pair(dv, (bos + i) * HV + (i64)h * V + j, j, V, paired_v, i < live ? x0 : dead_value(),
                                 i < live ? x1 : dead_value());
            });
        }
        {
            Acc<BT, BT, NW> dA;
            dA.fill(0.f);
            gemm<E, MK, NK, BT, BT, VP, NW>(dA, t.sDo, LDV, t.ops.sV, LDV);
            __syncthreads();  // P read (dA may take its tile)
            gla_dqk::store_scores<E>(dA, t.sA, LDM, t.sDa, live, scale);
        }
        __syncthreads();
#pragma unroll 1
        for (int k0 = 0; k0 < K; k0 += KS) {
            const int kc = min(KS, K - k0);
            t.slice(q, k, g, tok + k0, HK, L, live, kc);
            AccQ Dx, Di;
            Dx.fill(0.f);
            Di.fill(0.f);
            gemm<E, MK, NK, BT, KS, VP, NW>(Dx, t.ops.sV, LDV, advance(t.sS, (i64)k0 * LDV), LDV);
            gla_dqk::dk_chunk<E>(Dx, Di, t.sA, LDM, t.sQ, t.sG, t.sR, LDF, t.sT, LDK, t.sFlag, live);
            __syncthreads();  // q and k read by every thread: from here each thread rewrites only its own elements
            Di.zip(Dx, [&](int r, int d, float& xi, float& xx) {
                const bool in = r < live;
                const int i = r * LDF + d;
                const i64 o = tok + k0 + r * HK + d;
                const float qv = t.sQ[i], kv = t.sK[i];
                if (r < L && d < kc) {
                    const float a = t.sDa[r];
                    dk[o] = from_float<T>(in ? xx + xi + a * qv : dead_value());
                }
                t.sQ[i] = in && d < kc ? dg[o] - kv * (exact ? xi : xi + xx) : 0.f;
                t.sK[i] = in && exact ? kv * xx : 0.f;
            });
            __syncthreads();
            const int d = (int)threadIdx.x - k0;
            if (d >= 0 && d < kc) {
                float* out = dg + tok + k0 + d;
                carried = gla_dqk::dg_reverse_scan(carried, 0.f, t.sQ + d, t.sK + d, t.sR + d, LDF, live, out, HK);
                for (int s = live; s < L; ++s) out[s * HK] = dead_value();
            }
            __syncthreads();
        }
        dS.apply([&](int kd, int, float& x) {
            const float f = t.ops.kdecay[kd];
            x = f == 0.f ? 0.f : x * f;
        });
        gemm<E, KM, KN, KP, VP, BT, NW, 1>(dS, t.ops.sQg, LDKO, t.sDo, LDV);
        __syncthreads();
    }
    if (opt.h0()) store_state(dS, dh0 + pb.state_off, K, V, 0, V);
}
