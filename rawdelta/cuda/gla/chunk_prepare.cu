// GLA, chunked mode, the first stage: per (chunk, head) the factors every later stage takes (prepare), over the
// chunk table (common/chunk_table.cu). Layouts: gla/chunk.cuh.
#include "gla/chunk_factors.cuh"

using namespace rawdelta;

// Prepare: per (chunk, head), the chunk's factors (gla/chunk_factors.cuh: gla_chunk_factors_finding_dead) to global
// memory:
//   Rc the row codes (the chunk's first dead row); qg = q 2^G, kg = k 2^(G_last - G); Dk = 2^G_last; the scores A
//   (scaled, masked to j <= r < live) split into Ahi + Alo. The cumulative gates themselves are not written: the
//   backward's dq/dk/dg kernel recomputes them from g (the same bytes to read, and none to write here).
// Blocks of 256 threads; block b takes chunk b / H (the chunk table's order), head b % H. MINB: the blocks per SM the
// registers are bounded for (the shared memory of 16-bit inputs at BT = 64 fits three; three bound the registers to
// 80, with a few spilled).
template <typename T, typename E, int BT, int MINB>
__global__ void __launch_bounds__(256, MINB) gla_chunk_prepare_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ g, const i64* __restrict__ chunk_bos,
    const int* __restrict__ chunk_len, int* __restrict__ Rc,
    T* __restrict__ qg, T* __restrict__ kg, float* __restrict__ Dk, E* __restrict__ Ahi, E* __restrict__ Alo, int H,
    int K, float scale) {
    using Scratch = ChunkFactorScratch<T, E, BT>;
    constexpr int LDA = Scratch::LDA;
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    Scratch s;
    s.carve(cur);

    const int c = blockIdx.x / H, h = blockIdx.x % H;
    const i64 bos = chunk_bos[c];
    const int L = chunk_len[c];
    const i64 HK = (i64)H * K, tok = bos * HK + (i64)h * K;
    load_factor_slice(s, q + tok, k + tok, g + tok, HK, L, K, 0);

    // the chunk's rows from its first element: 32-bit offsets (r HK + d < BT H K), so the unrolled loop's stores
    // take one address add each rather than 64-bit arithmetic
    T* const qgc = qg + tok;
    T* const kgc = kg + tok;
    const int hk = (int)HK;
    const bool even = (K & 1) == 0;  // every pair's offset even: its two elements one aligned store
    // the first dead row from the gate cumsums: no scan of the chunk's gates before the factors (a chunk that has one
    // computes them twice)
    const int live = gla_chunk_factors_finding_dead<true>(
        s, q + tok, k + tok, g + tok, HK, L, K, scale,
        [&](int r, int d, float xq0, float xq1, float xk0, float xk1, auto in_range) {
            const int o = r * hk + d;
            if (decltype(in_range)::value && even) {  // every pair of the slice in range and aligned: no edge test
                store_pair(qgc + o, 0, xq0, xq1);
                store_pair(kgc + o, 0, xk0, xk1);
                return;
            }
            if (r >= L) return;
            put_row_pair(qgc, o, d, K, even, xq0, xq1);
            put_row_pair(kgc, o, d, K, even, xk0, xk1);
        },
        [&](int d, float x) { Dk[((i64)c * H + h) * K + d] = x; }, true, s.sLive);
    for (int r = threadIdx.x; r < L; r += blockDim.x) Rc[(bos + r) * H + h] = row_code(0, live);

    // A (scaled and masked) to the per-token chunk matrix.
    for (int idx = threadIdx.x; idx < L * (BT / 8); idx += blockDim.x) {
        const int r = idx / (BT / 8), j0 = (idx % (BT / 8)) * 8;
        const i64 e = ((bos + r) * H + h) * BT + j0;
        split_store8(Ahi + e, Alo != nullptr ? Alo + e : nullptr, s.sA + r * LDA + j0);
    }
}

// Each chunk's per-key decay Dk = 2^G_last (0 across a reset), alone: what prepare writes, for a backward whose
// factors come from a workspace (which holds no per-chunk arrays: their count is not known from the shapes). Per
// (chunk, head) one block; thread d sums key d's gates over the chunk's live rows in row order with prepare's cumsum's
// arithmetic (common/chunk_stages.cuh: GateRunSum), so the values are the same bits.
__global__ void gla_chunk_decay_kernel(const float* __restrict__ g, const i64* __restrict__ chunk_bos,
                                       const int* __restrict__ chunk_len, const int* __restrict__ Rc,
                                       float* __restrict__ Dk, int H, int K) {
    const int c = blockIdx.x / H, h = blockIdx.x % H;
    const i64 bos = chunk_bos[c], HK = (i64)H * K;
    const int live = min(code_live_rows(Rc[bos * H + h]), chunk_len[c]);
    for (int d = threadIdx.x; d < K; d += blockDim.x) {
        const float* gd = g + bos * HK + (i64)h * K + d;
        GateRunSum sum;
        for (int r = 0; r < live; ++r) sum.add(gd[r * HK]);
        Dk[((i64)c * H + h) * K + d] = sum.n > 0 ? 0.f : exp2_ftz(sum.log2_sum());  // as gla_chunk_factors does
    }
}
