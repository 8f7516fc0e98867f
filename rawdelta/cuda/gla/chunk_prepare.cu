// GLA, chunked mode, the first stage: per (chunk, head) the factors every later stage takes (prepare). Layouts:
// gla/chunk.cuh. The chunk table is the gated delta rule's (gated_delta_rule/chunk_prepare.cu:
// gdn_chunk_table_kernel).
#include "gla/chunk.cuh"

using namespace rawdelta;

// The first dead row among rows [0, L) of a chunk of per-key gates (g rows of stride `stride`, K keys): the first row
// with a NaN or +inf gate of any key (common/chunk_stages.cuh: kills_row); L when none. A barrier over the block.
__device__ __forceinline__ int first_dead_key_row(const float* __restrict__ g, i64 stride, int L, int K, int* slot) {
    if (threadIdx.x == 0) *slot = L;
    __syncthreads();
    int first = L;
    for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) {
        const int r = idx / K;
        if (r < first && kills_row(g[r * stride + idx % K], 0.f)) first = r;
    }
    if (first < L) atomicMin(slot, first);
    __syncthreads();
    return *slot;
}

// Prepare: per (chunk, head), over slices of KS keys:
//   Gk, Rk: the per-key chunk-local cumulative log2 gates and reset counts (common/chunk_stages.cuh); Rc the row
//   codes (the chunk's first dead row); qg = q 2^G, kg = k 2^(G_last - G); Dk = 2^G_last;
//   A_rj = scale sum_d q_rd k_jd 2^(G_rd - G_jd) for j <= r < live, summed over the slices: for rows of 16-block I
//   and columns of a block before it on tensor cores, as (q_r 2^(G_r - G_ref)) . (k_j 2^(G_ref - G_j)) with ref the
//   first row of I (every factor <= 1 for gates <= 0, 0 across a reset); the diagonal 16-blocks element by element.
// Blocks of 256 threads; block b takes chunk b / H (the chunk table's order), head b % H. Alo is null for 16-bit
// inputs (the passes take A's hi part only).
template <typename T, typename E, int BT>
__global__ void __launch_bounds__(256) gla_chunk_prepare_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ g, const i64* __restrict__ chunk_bos,
    const int* __restrict__ chunk_len, float* __restrict__ Gk, unsigned char* __restrict__ Rk, int* __restrict__ Rc,
    T* __restrict__ qg, T* __restrict__ kg, float* __restrict__ Dk, E* __restrict__ Ahi, E* __restrict__ Alo, int H,
    int K, float scale) {
    constexpr int NW = 8, KS = 64, LDT = KS + TILE_PAD, LDG = KS, LDA = BT + 4, NB = BT / SUB;
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    T *sQ, *sK;
    cur.into(sQ, BT * LDT);
    cur.into(sK, BT * LDT);
    const Split<E> sQs = cur.take_split<E>(BT * LDT), sKs = cur.take_split<E>(BT * LDT);
    float* sG = cur.take<float>(BT * LDG);
    int* sR = cur.take<int>(BT * LDG);
    float* sA = cur.take<float>(BT * LDA);
    int* sLive = cur.take<int>(4);

    const int c = blockIdx.x / H, h = blockIdx.x % H;
    const i64 bos = chunk_bos[c];
    const int L = chunk_len[c], last = L - 1;
    const i64 HK = (i64)H * K;
    const int live = first_dead_key_row(g + bos * HK + (i64)h * K, HK, L, K, sLive);
    for (int r = threadIdx.x; r < L; r += blockDim.x) Rc[(bos + r) * H + h] = row_code(0, live);

    // Each thread's diagonal-block entries: slot s = threadIdx.x + 256 m is (block s / 256, row (s / 16) % 16, column
    // s % 16) of the NB diagonal 16-blocks, summed over the key slices.
    constexpr int DIAG = (NB * SUB * SUB + 255) / 256;
    float diag[DIAG];
#pragma unroll
    for (int m = 0; m < DIAG; ++m) diag[m] = 0.f;
    Acc<SUB, BT, NW> off[NB > 1 ? NB - 1 : 1];  // off[I - 1]: rows of block I against every column (j < 16 I kept)
#pragma unroll
    for (int I = 0; I < NB - 1; ++I) off[I].fill(0.f);

#pragma unroll 1
    for (int k0 = 0; k0 < K; k0 += KS) {
        const int kc = min(KS, K - k0);
        const i64 tok = bos * HK + (i64)h * K + k0;
        load_tile(sQ, LDT, q + tok, HK, L, kc, BT, KS);
        load_tile(sK, LDT, k + tok, HK, L, kc, BT, KS);
        load_tile(sG, LDG, g + tok, HK, L, kc, BT, KS);
        cp_async_wait_all();
        __syncthreads();
        chunk_local_cumsum_log2(sG, sR, LDG, kc, live, BT);
        __syncthreads();
        // The slice's per-key outputs, and the scaled operands of the off-diagonal products.
        for (int idx = threadIdx.x; idx < BT * KS; idx += blockDim.x) {
            const int r = idx / KS, d = idx % KS, e = r * LDG + d, ref = r & ~(SUB - 1);
            const bool in = r < L && d < kc;
            const float x = to_float(sQ[r * LDT + d]), y = to_float(sK[r * LDT + d]);
            if (in) {
                const i64 o = tok + (i64)r * HK + d;
                const float G = sG[e], Gl = sG[last * LDG + d];
                const int R = sR[e], Rl = sR[last * LDG + d];
                Gk[o] = G;
                Rk[o] = (unsigned char)R;
                qg[o] = from_float<T>(R > 0 ? 0.f : x * exp2f(G));
                kg[o] = from_float<T>(Rl > R ? 0.f : y * exp2f(Gl - G));
                if (r == last) Dk[((i64)c * H + h) * K + k0 + d] = Rl > 0 ? 0.f : exp2f(Gl);
            }
            tile_put(sQs, r * LDT + d, in ? x * key_decay(sG, sR, LDG, r, ref, d) : 0.f);
        }
        // Diagonal blocks, element by element.
#pragma unroll
        for (int m = 0; m < DIAG; ++m) {
            const int s = threadIdx.x + 256 * m, b = s / (SUB * SUB), i = b * SUB + (s / SUB) % SUB,
                      j = b * SUB + s % SUB;
            if (b < NB && j <= i && i < L) {
                float acc = 0.f;
                for (int d = 0; d < kc; ++d)
                    acc += to_float(sQ[i * LDT + d]) * to_float(sK[j * LDT + d]) * key_decay(sG, sR, LDG, i, j, d);
                diag[m] += acc;
            }
        }
        // Off-diagonal blocks: rows of block I against the columns before it, k scaled to I's first row.
#pragma unroll
        for (int I = 1; I < NB; ++I) {
            const int ref = I * SUB;
            for (int idx = threadIdx.x; idx < BT * KS; idx += blockDim.x) {
                const int j = idx / KS, d = idx % KS;
                const bool in = j < ref && j < L && d < kc;
                const float y = to_float(sK[j * LDT + d]);
                tile_put(sKs, j * LDT + d, in ? y * key_decay(sG, sR, LDG, ref, j, d) : 0.f);
            }
            __syncthreads();
            gemm<E, MK, NK, SUB, BT, KS, NW>(off[I - 1], advance(sQs, (i64)ref * LDT), LDT, sKs, LDT);
            __syncthreads();
        }
        __syncthreads();  // the next slice's loads overwrite the tiles the diagonal sums read
    }

    // A = scale (off-diagonal + diagonal), masked to j <= r < live, to the per-token chunk matrix.
#pragma unroll
    for (int I = 1; I < NB; ++I)
        off[I - 1].apply([&](int i, int j, float& x) {
            if (j < I * SUB) sA[(I * SUB + i) * LDA + j] = x;
        });
#pragma unroll
    for (int m = 0; m < DIAG; ++m) {
        const int s = threadIdx.x + 256 * m, b = s / (SUB * SUB), i = b * SUB + (s / SUB) % SUB, j = b * SUB + s % SUB;
        if (b < NB) sA[i * LDA + j] = diag[m];
    }
    // the 16-blocks above the diagonal (never written above): zero
    for (int idx = threadIdx.x; idx < BT * BT; idx += blockDim.x) {
        const int i = idx / BT, j = idx % BT;
        if (j / SUB > i / SUB) sA[i * LDA + j] = 0.f;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < L * (BT / 8); idx += blockDim.x) {
        const int r = idx / (BT / 8), j0 = (idx % (BT / 8)) * 8;
        float* row = sA + r * LDA + j0;
#pragma unroll
        for (int x = 0; x < 8; ++x) row[x] = (j0 + x <= r && r < live) ? row[x] * scale : 0.f;
        const i64 e = ((bos + r) * H + h) * BT + j0;
        split_store8(Ahi + e, Alo != nullptr ? Alo + e : nullptr, row);
    }
}
