// GLA, chunked mode: the per-chunk factors of one (chunk, head), as a device function that prepare
// (chunk_prepare.cu) writes to global memory and the fused kernels (fused_chunk.cu) keep in shared memory.
// Layouts and names: gla/chunk.cuh.
#pragma once
#include "gla/chunk.cuh"

namespace rawdelta {

// The first dead row among rows [0, L) of a chunk of per-key gates (g rows of stride `stride`, K keys): the first row
// with a NaN or +inf gate of any key (common/chunk_stages.cuh: kills_row); L when none. One warp per row; no load
// waits on an earlier row's result (no early exit), so the unrolled loops keep several global loads in flight: this
// runs once per chunk on a kernel's critical path. A barrier over the block.
__device__ __forceinline__ int first_dead_key_row(const float* __restrict__ g, i64 stride, int L, int K, int* slot) {
    if (threadIdx.x == 0) *slot = L;
    __syncthreads();
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    int first = L;
#pragma unroll 2
    for (int r = threadIdx.x >> 5; r < L; r += nw) {
        bool dead = false;
#pragma unroll 4
        for (int d = lane; d < K; d += 32) dead |= kills_row(g[r * stride + d], 0.f);
        first = dead ? min(first, r) : first;
    }
    if (first < L) atomicMin(slot, first);
    __syncthreads();
    return *slot;
}

// The scratch of gla_chunk_factors (blocks of 256 threads), carved from dynamic shared memory: the raw q and k of a
// slice of KS keys (leading dimension LDR: read element by element, so unpadded), their scaled split copies for the
// products (LDT, padded for ldmatrix), the slice's gates and reset counts (uint8), one int for the first dead row and
// the diagonal sub-blocks' flags; the chunk's scores sA (float, leading dimension LDA) take the space of the raw and
// scaled tiles, which is dead once the last slice's products are summed. Small enough for three prepare blocks per
// SM at BT = 64 with 16-bit inputs.
template <typename T, typename E, int BT>
struct ChunkFactorScratch {
    static constexpr int KS = 64, LDR = KS, LDT = KS + TILE_PAD, LDG = KS, LDA = BT + 4;
    static_assert(BT * LDA * sizeof(float) <= 2 * BT * LDR * sizeof(T) + 4 * BT * LDT * sizeof(E),
                  "the scores fit the raw and scaled q and k tiles");
    T *sQ, *sK;
    Split<E> sQs, sKs;
    float* sG;
    unsigned char* sR;
    float* sA;
    int *sLive, *sFlag;
    __device__ __forceinline__ void carve(SmemCursor& cur) {
        sA = reinterpret_cast<float*>(cur.p);
        cur.into(sQ, BT * LDR);
        cur.into(sK, BT * LDR);
        sQs = cur.take_split<E>(BT * LDT);
        sKs = cur.take_split<E>(BT * LDT);
        sG = cur.take<float>(BT * LDG);
        sR = cur.take<unsigned char>(BT * LDG);
        sLive = cur.take<int>(4);
        sFlag = cur.take<int>(4);
    }
};

// The factors of one chunk of one head (rows r < L; live = its first dead row), over slices of KS keys:
//   elem(r, d, in, qg, kg) for every row r < BT and key d of every slice (in: r < L and d < K; qg and kg are 0 when
//   not in), with G, R the per-key chunk-local cumulative log2 gate and reset count (common/chunk_stages.cuh):
//   qg = q 2^G (0 after a reset of key d), kg = k 2^(G_last - G) (0 before one), with last = L - 1;
//   decay(d, 2^G_last) for d < K, the chunk's per-key decay (0 across a reset);
//   sA[r LDA + j] = A_rj = scale sum_d q_rd k_jd 2^(G_rd - G_jd) for j <= r < live, else 0 (every r, j < BT),
//   summed over the slices: for the rows of 16-block I, on tensor cores, as (q_r 2^(G_r - G_ref)) . (k_j 2^(G_ref -
//   G_j)) with ref the first row of I, for the columns of the blocks before I (every factor <= 1 for gates <= 0, 0
//   across a reset) and of I itself where its gates allow (gla/chunk.cuh: diag_blocks_elementwise); element by
//   element for a diagonal block of a slice where they do not.
// q, k, g point at (row 0, key 0) of the chunk's head; rows of stride HK. Blocks of 256 threads; every thread calls
// it (barriers inside); sA is complete when it returns (a barrier last).
template <typename T, typename E, int BT, typename Elem, typename Decay>
__device__ __forceinline__ void gla_chunk_factors(const ChunkFactorScratch<T, E, BT>& s, const T* __restrict__ q,
                                                  const T* __restrict__ k, const float* __restrict__ g, i64 HK, int L,
                                                  int live, int K, float scale, Elem&& elem, Decay&& decay) {
    using S = ChunkFactorScratch<T, E, BT>;
    constexpr int NW = 8, KS = S::KS, LDR = S::LDR, LDT = S::LDT, LDG = S::LDG, LDA = S::LDA, NB = BT / SUB;
    static_assert(THREADS % KS == 0, "a thread keeps one key of a slice");
    constexpr int RSTEP = THREADS / KS;
    const int last = L - 1, d = threadIdx.x % KS, r0 = threadIdx.x / KS;
    T *sQ = s.sQ, *sK = s.sK;
    float *sG = s.sG, *sA = s.sA;
    unsigned char* sR = s.sR;
    int* sFlag = s.sFlag;

    // Each thread's diagonal-block entries: slot s = threadIdx.x + 256 m is (block s / 256, row (s / 16) % 16, column
    // s % 16) of the NB diagonal 16-blocks, summed over the key slices where the block is summed element by element.
    constexpr int DIAG = (NB * SUB * SUB + 255) / 256;
    float diag[DIAG];
#pragma unroll
    for (int m = 0; m < DIAG; ++m) diag[m] = 0.f;
    Acc<SUB, BT, NW> blk[NB];  // blk[I]: rows of block I against every column (j < 16 (I + 1) kept)
#pragma unroll
    for (int I = 0; I < NB; ++I) blk[I].fill(0.f);

#pragma unroll 1
    for (int k0 = 0; k0 < K; k0 += KS) {
        const int kc = min(KS, K - k0);
        const bool dk = d < kc;
        load_tile(sQ, LDR, q + k0, HK, L, kc, BT, KS);
        load_tile(sK, LDR, k + k0, HK, L, kc, BT, KS);
        load_tile(sG, LDG, g + k0, HK, L, kc, BT, KS);
        cp_async_wait_all();
        __syncthreads();
        chunk_local_cumsum_log2(sG, sR, LDG, kc, live, BT);
        diag_blocks_elementwise<BT, E>(sG, sR, LDG, kc, live, sFlag);  // barriers around (R is set for kc keys)
        // The slice's per-key outputs, and q scaled to its block's first row. Each thread keeps one key d (THREADS is
        // a multiple of KS), so the last row's gate and reset count, and each block's reference row's, are loaded
        // once per key rather than per element. The loops run a fixed count (the compiler unrolls them without a
        // remainder) and every factor is computed whatever the masks, then selected: no branch per element.
        const float Gl = sG[max(last, 0) * LDG + d];
        const int Rl = sR[max(last, 0) * LDG + d];
        if (r0 == 0 && dk && L > 0) decay(k0 + d, Rl > 0 ? 0.f : exp2f(Gl));
#pragma unroll 4
        for (int m = 0; m < BT / RSTEP; ++m) {
            const int r = r0 + m * RSTEP, e = r * LDG + d, ref = r & ~(SUB - 1);
            const bool in = r < L && dk;
            const float x = to_float(sQ[r * LDR + d]), y = to_float(sK[r * LDR + d]);
            const float G = sG[e];
            const int R = sR[e];
            const float xq = x * exp2f(G), xk = y * exp2f(Gl - G), xs = x * exp2f(G - sG[ref * LDG + d]);
            elem(r, k0 + d, in, in && R == 0 ? xq : 0.f, in && Rl <= R ? xk : 0.f);
            tile_put(s.sQs, r * LDT + d, in && R == sR[ref * LDG + d] ? xs : 0.f);
        }
        // Diagonal blocks summed element by element in this slice.
#pragma unroll
        for (int m = 0; m < DIAG; ++m) {
            const int t = threadIdx.x + 256 * m, b = t / (SUB * SUB), i = b * SUB + (t / SUB) % SUB,
                      j = b * SUB + t % SUB;
            if (b < NB && sFlag[b] && j <= i && i < L) {
                float acc = 0.f;
                for (int c = 0; c < kc; ++c)
                    acc += to_float(sQ[i * LDR + c]) * to_float(sK[j * LDR + c]) * key_decay(sG, sR, LDG, i, j, c);
                diag[m] += acc;
            }
        }
        // Rows of block I against the columns before it and, unless flagged, its own: k scaled to I's first row
        // (for the block's own columns a factor up to 2^diag_span, and no reset inside the block). Only k's rows
        // j < 16 (I + 1) are written: the product's columns past them are discarded (each column of the product is
        // its own row of k, so whatever those rows hold reaches no kept score).
#pragma unroll
        for (int I = 0; I < NB; ++I) {
            const int ref = I * SUB, end = sFlag[I] ? ref : ref + SUB;
            const float Gref = sG[ref * LDG + d];
            const int Rref = sR[ref * LDG + d];
#pragma unroll
            for (int m = 0; m < (ref + SUB) / RSTEP; ++m) {
                const int j = r0 + m * RSTEP;
                const float y = to_float(sK[j * LDR + d]) * exp2f(Gref - sG[j * LDG + d]);
                tile_put(s.sKs, j * LDT + d, j < end && j < L && dk && sR[j * LDG + d] == Rref ? y : 0.f);
            }
            __syncthreads();
            gemm<E, MK, NK, SUB, BT, KS, NW>(blk[I], advance(s.sQs, (i64)ref * LDT), LDT, s.sKs, LDT);
            __syncthreads();
        }
    }

    // A = scale (products + element-wise diagonal sums), masked to j <= r < live; sA takes the raw and scaled tiles'
    // space (every thread is past its last read of them: the last slice ends with a barrier).
#pragma unroll
    for (int I = 0; I < NB; ++I)
        blk[I].apply([&](int i, int j, float& x) {
            if (j < (I + 1) * SUB) sA[(I * SUB + i) * LDA + j] = x;
        });
    __syncthreads();
#pragma unroll
    for (int m = 0; m < DIAG; ++m) {
        const int t = threadIdx.x + 256 * m, b = t / (SUB * SUB), i = b * SUB + (t / SUB) % SUB, j = b * SUB + t % SUB;
        if (b < NB) sA[i * LDA + j] += diag[m];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BT * BT; idx += THREADS) {
        const int r = idx / BT, j = idx % BT;
        float& x = sA[r * LDA + j];
        x = (j <= r && r < live) ? x * scale : 0.f;  // the 16-blocks above the diagonal (never written): 0
    }
    __syncthreads();
}

}  // namespace rawdelta
