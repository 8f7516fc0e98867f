// GLA, chunked mode: the per-chunk factors of one (chunk, head), as a device function that prepare
// (chunk_prepare.cu) writes to global memory and the fused kernels (fused_chunk.cu) keep in shared memory.
// Layouts and names: gla/chunk.cuh.
#pragma once
#include "gla/chunk.cuh"

namespace rawdelta {

// The first dead row among rows [0, L) of a chunk of BT rows of per-key gates (g rows of stride `stride`, K keys):
// the first row with a NaN or +inf gate of any key (common/chunk_stages.cuh: kills_row); L when none. Blocks of
// THREADS threads, a warp per row; every load of a pass over 128 keys is issued before any is tested (a warp's rows
// are one DRAM round trip, not one each: this runs once per chunk on a kernel's critical path; RPW KPL registers of
// gates per pass, 32 at BT = 64). A barrier over the block.
template <int BT>
__device__ __forceinline__ int first_dead_key_row(const float* __restrict__ g, i64 stride, int L, int K, int* slot) {
    constexpr int NW = THREADS / 32, RPW = (BT + NW - 1) / NW, KPL = 4;  // rows per warp, keys per lane per pass
    if (threadIdx.x == 0) *slot = L;
    __syncthreads();
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int first = L;
#pragma unroll 1
    for (int k0 = 0; k0 < K; k0 += 32 * KPL) {
        float x[RPW][KPL];
#pragma unroll
        for (int i = 0; i < RPW; ++i)
#pragma unroll
            for (int j = 0; j < KPL; ++j) {
                const int r = w + i * NW, d = k0 + lane + 32 * j;
                x[i][j] = r < L && d < K ? g[r * stride + d] : 0.f;  // 0 kills no row
            }
#pragma unroll
        for (int i = 0; i < RPW; ++i) {
            bool dead = false;
#pragma unroll
            for (int j = 0; j < KPL; ++j) dead |= kills_row(x[i][j], 0.f);
            first = dead ? min(first, w + i * NW) : first;
        }
    }
    if (first < L) atomicMin(slot, first);
    __syncthreads();
    return *slot;
}

// A compile-time bool as a type, for a generic lambda compiled once per value.
template <bool B> struct Flag {
    static constexpr bool value = B;
};

// Whether every row and key of a slice of KS keys (kc of them in range) of a chunk of L rows is in range: the test
// under which gla_chunk_factors' callers may store without edge tests.
template <int BT, int KS>
__device__ __forceinline__ bool whole_slice_in_range(int L, int kc) { return L == BT && kc == KS; }

// R[i], R[i + 1] of a uint8 tile, i even (one 2-byte load).
__device__ __forceinline__ uchar2 u8_pair(const unsigned char* R, int i) {
    return *reinterpret_cast<const uchar2*>(R + i);
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

// Issue the cp.async loads of the raw q, k and gate tiles of the key slice from key k0 of a chunk of L rows (q, k, g
// at (row 0, key 0) of the chunk's head; rows of stride HK) into the scratch; the caller waits. A whole chunk of
// whole, 16-byte aligned slices loads by compile-time loops, without load_tile's bounds and alignment tests or its
// zero padding.
template <typename T, typename E, int BT>
__device__ __forceinline__ void load_factor_slice(const ChunkFactorScratch<T, E, BT>& s, const T* __restrict__ q,
                                                  const T* __restrict__ k, const float* __restrict__ g, i64 HK,
                                                  int L, int K, int k0) {
    using S = ChunkFactorScratch<T, E, BT>;
    if (L == BT && K % S::KS == 0 && rows_aligned16(q, HK) && rows_aligned16(k, HK) && rows_aligned16(g, HK)) {
        load_tile_whole<BT, S::KS, THREADS>(s.sQ, S::LDR, q + k0, HK);
        load_tile_whole<BT, S::KS, THREADS>(s.sK, S::LDR, k + k0, HK);
        load_tile_whole<BT, S::KS, THREADS>(s.sG, S::LDG, g + k0, HK);
    } else {
        const int kc = min(S::KS, K - k0);
        load_tile(s.sQ, S::LDR, q + k0, HK, L, kc, BT, S::KS);
        load_tile(s.sK, S::LDR, k + k0, HK, L, kc, BT, S::KS);
        load_tile(s.sG, S::LDG, g + k0, HK, L, kc, BT, S::KS);
    }
}

// The factors of one chunk of one head (rows r < L; live = its first dead row), over slices of KS keys:
//   elem(r, d, qg_d, qg_d+1, kg_d, kg_d+1, in_range) for every row r < BT and even key d of every slice, the keys d
//   and d + 1 (each 0 unless r < L and the key < K; in_range a Flag, true where every row and key of the slice is in
//   range: whole_slice_in_range), with G, R the per-key chunk-local cumulative log2 gate and reset count
//   (common/chunk_stages.cuh):
//   qg = q 2^G (0 after a reset of key d), kg = k 2^(G_last - G) (0 before one), with last = L - 1 (every factor
//   of the products by gla/chunk.cuh: exp2_ftz);
//   decay(d, 2^G_last) for d < K, the chunk's per-key decay (0 across a reset);
//   sA[r LDA + j] = A_rj = scale sum_d q_rd k_jd 2^(G_rd - G_jd) for j <= r < live, else 0 (every r, j < BT),
//   summed over the slices: for the rows of 16-block I, on tensor cores, as (q_r 2^(G_r - G_ref)) . (k_j 2^(G_ref -
//   G_j)) with ref the first row of I, for the columns of the blocks before I (every factor <= 1 for gates <= 0, 0
//   across a reset) and of I itself where its gates allow (gla/chunk.cuh: diag_blocks_elementwise); element by
//   element for a diagonal block of a slice where they do not.
// q, k, g point at (row 0, key 0) of the chunk's head; rows of stride HK. Blocks of 256 threads; every thread calls
// it (barriers inside); sA is complete when it returns (a barrier last). ``first_issued``: the caller has issued the
// first slice's loads (load_factor_slice with k0 = 0), so that they fly during its own work before the call.
// SPLIT: the whole-slice loop compiled twice, once for slices whose every row and key is in range (no masks, and
// elem told so at compile time), for a caller whose time is this function's (prepare); one copy otherwise.
// ``dead`` (where given, with live = L): a shared int through which the gate cumsums tell whether a slice has a dead
// row (chunk_local_cumsum_log2); the call then stops at that slice and returns false, its outputs incomplete (a
// barrier last), for the caller to find the first dead row and call again. True otherwise.
template <bool SPLIT, typename T, typename E, int BT, typename Elem, typename Decay>
__device__ __forceinline__ bool gla_chunk_factors(const ChunkFactorScratch<T, E, BT>& s, const T* __restrict__ q,
                                                  const T* __restrict__ k, const float* __restrict__ g, i64 HK, int L,
                                                  int live, int K, float scale, Elem&& elem, Decay&& decay,
                                                  bool first_issued = false, int* dead = nullptr) {
    using S = ChunkFactorScratch<T, E, BT>;
    constexpr int NW = 8, KS = S::KS, LDR = S::LDR, LDT = S::LDT, LDG = S::LDG, LDA = S::LDA, NB = BT / SUB;
    constexpr int PAIRS = KS / 2;  // a thread keeps the keys d, d + 1 of a slice in its loops over rows
    static_assert(THREADS % PAIRS == 0, "every thread keeps one pair of keys");
    constexpr int RSTEP = THREADS / PAIRS;
    const int last = L - 1, d = 2 * (threadIdx.x % PAIRS), r0 = threadIdx.x / PAIRS;
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

    const auto load_slice = [&](int k0) { load_factor_slice(s, q, k, g, HK, L, K, k0); };
    if (dead != nullptr && threadIdx.x == 0) *dead = 0;  // before the first slice's barrier
    bool issued = first_issued;  // the slice's loads are in flight already (issued by the caller, or during the
                                 // previous slice's products)
#pragma unroll 1
    for (int k0 = 0; k0 < K; k0 += KS) {
        const int kc = min(KS, K - k0);
        const bool dk0 = d < kc, dk1 = d + 1 < kc;
        if (!issued) load_slice(k0);
        issued = false;
        cp_async_wait_all();
        __syncthreads();
        chunk_local_cumsum_log2(sG, sR, LDG, kc, live, BT, dead);
        __syncthreads();
        if (dead != nullptr && *dead) {
            __syncthreads();  // every thread has read the flag before the caller reuses it
            return false;
        }
        const int el = max(last, 0) * LDG + d;
        const float2 Gl = load_pair(sG, el);
        const uchar2 Rl = u8_pair(sR, el);
        if (r0 == 0 && L > 0) {
            if (dk0) decay(k0 + d, Rl.x > 0 ? 0.f : exp2_ftz(Gl.x));
            if (dk1) decay(k0 + d + 1, Rl.y > 0 ? 0.f : exp2_ftz(Gl.y));
        }
        // The whole slice at once where its gates allow: every factor taken against one per-key reference m, the
        // mean of the chunk's first and last gates, so that A's products are one per 16-block of rows against
        // every column (the diagonal blocks included) and no k is scaled per block. Allowed where every live
        // gate of every key lies within diag_span of m and no key resets: the factors 2^(G - m) and 2^(m - G) then
        // lie in [2^-span, 2^span], as a product-form diagonal block's (the per-element check is the test: gates
        // of either sign, in any order). The other outputs take m too: qg = (q 2^(G - m)) 2^(m/2) 2^(m/2) (two
        // halves, so that no factor underflows where q 2^G does not) and kg = (k 2^(m - G)) 2^(G_last - m).
        const float2 mid = whole_slice_reference(load_pair(sG, d), Gl);
        const float m0 = mid.x, m1 = mid.y;
        const float h0 = exp2_ftz(0.5f * m0), h1 = exp2_ftz(0.5f * m1);
        const float t0 = exp2_ftz(Gl.x - m0), t1 = exp2_ftz(Gl.y - m1);
        bool fits = true;
        // with SPLIT compiled twice: with every row and key of the slice in range (a whole chunk of a whole slice:
        // no masks, and the caller's stores without their edge tests), and in general
        const auto factor_rows = [&](auto all_in) {
#pragma unroll 4
            for (int m = 0; m < BT / RSTEP; ++m) {
                const int r = r0 + m * RSTEP, e = r * LDG + d;
                const bool in0 = decltype(all_in)::value || (r < L && dk0),
                           in1 = decltype(all_in)::value || (r < L && dk1);
                const float2 x = load_pair(sQ, r * LDR + d), y = load_pair(sK, r * LDR + d), G = load_pair(sG, e);
                const uchar2 R = u8_pair(sR, e);
                fits &= !in0 || whole_slice_allows<E>(G.x, m0, R.x);
                fits &= !in1 || whole_slice_allows<E>(G.y, m1, R.y);
                const float s0 = x.x * exp2_ftz(G.x - m0), s1 = x.y * exp2_ftz(G.y - m1);
                const float u0 = y.x * exp2_ftz(m0 - G.x), u1 = y.y * exp2_ftz(m1 - G.y);
                elem(r, k0 + d, in0 ? s0 * h0 * h0 : 0.f, in1 ? s1 * h1 * h1 : 0.f, in0 ? u0 * t0 : 0.f,
                     in1 ? u1 * t1 : 0.f, all_in);
                tile_put_pair(s.sQs, r * LDT + d, in0 ? s0 : 0.f, in1 ? s1 : 0.f);
                tile_put_pair(s.sKs, r * LDT + d, in0 ? u0 : 0.f, in1 ? u1 : 0.f);
            }
        };
        if (SPLIT && whole_slice_in_range<BT, KS>(L, kc)) factor_rows(Flag<SPLIT>{});
        else factor_rows(Flag<false>{});
        if (__syncthreads_and(fits)) {
            // the raw tiles are dead once every factor is out (the barrier): the next slice's loads fly during the
            // products, which read only the scaled tiles
            if (k0 + KS < K) {
                load_slice(k0 + KS);
                issued = true;
            }
#pragma unroll
            for (int I = 0; I < NB; ++I)
                gemm<E, MK, NK, SUB, BT, KS, NW>(blk[I], advance(s.sQs, (i64)I * SUB * LDT), LDT, s.sKs, LDT);
            __syncthreads();
            continue;
        }
        // Otherwise by 16-blocks, each against a reference row of its own: every output again, over what the
        // whole-slice loop wrote (the same thread writes the same elements).
        diag_blocks_elementwise<BT, E>(sG, sR, LDG, kc, live, sFlag);  // barriers around (R is set for kc keys)
        // The slice's per-key outputs, and q scaled to its block's first row. Each thread keeps two adjacent keys
        // (THREADS is a multiple of KS / 2): its loads and stores are pairs, and the last row's gates and reset
        // counts, and each block's reference row's, are loaded once per key pair rather than per element. The loops
        // run a fixed count (the compiler unrolls them without a remainder) and every factor is computed whatever
        // the masks, then selected: no branch per element.
#pragma unroll 4
        for (int m = 0; m < BT / RSTEP; ++m) {
            const int r = r0 + m * RSTEP, e = r * LDG + d, er = (r & ~(SUB - 1)) * LDG + d;
            const bool in0 = r < L && dk0, in1 = r < L && dk1;
            const float2 x = load_pair(sQ, r * LDR + d), y = load_pair(sK, r * LDR + d);
            const float2 G = load_pair(sG, e), Gr = load_pair(sG, er);
            const uchar2 R = u8_pair(sR, e), Rr = u8_pair(sR, er);
            const float q0 = x.x * exp2_ftz(G.x), q1 = x.y * exp2_ftz(G.y);
            const float c0 = y.x * exp2_ftz(Gl.x - G.x), c1 = y.y * exp2_ftz(Gl.y - G.y);
            const float s0 = x.x * exp2_ftz(G.x - Gr.x), s1 = x.y * exp2_ftz(G.y - Gr.y);
            elem(r, k0 + d, in0 && R.x == 0 ? q0 : 0.f, in1 && R.y == 0 ? q1 : 0.f, in0 && Rl.x <= R.x ? c0 : 0.f,
                 in1 && Rl.y <= R.y ? c1 : 0.f, Flag<false>{});
            tile_put_pair(s.sQs, r * LDT + d, in0 && R.x == Rr.x ? s0 : 0.f, in1 && R.y == Rr.y ? s1 : 0.f);
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
            const float2 Gref = load_pair(sG, ref * LDG + d);
            const uchar2 Rref = u8_pair(sR, ref * LDG + d);
#pragma unroll
            for (int m = 0; m < (ref + SUB) / RSTEP; ++m) {
                const int j = r0 + m * RSTEP;
                const bool jin = j < end && j < L;
                const float2 y = load_pair(sK, j * LDR + d), G = load_pair(sG, j * LDG + d);
                const uchar2 R = u8_pair(sR, j * LDG + d);
                const float y0 = y.x * exp2_ftz(Gref.x - G.x), y1 = y.y * exp2_ftz(Gref.y - G.y);
                tile_put_pair(s.sKs, j * LDT + d, jin && dk0 && R.x == Rref.x ? y0 : 0.f,
                              jin && dk1 && R.y == Rref.y ? y1 : 0.f);
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
    return true;
}

// gla_chunk_factors for a chunk whose first dead row is not known: taken as L, with the gate cumsums watching for a
// dead row; in a chunk that has one (rare: a NaN or +inf gate), first_dead_key_row finds it and every factor is
// computed again over what the first call wrote (the same thread writes the same elements). Returns the first dead
// row. `slot`: a shared int (first_dead_key_row's). The loop keeps one inlined copy of the factors' code.
template <bool SPLIT, typename T, typename E, int BT, typename Elem, typename Decay>
__device__ __forceinline__ int gla_chunk_factors_finding_dead(const ChunkFactorScratch<T, E, BT>& s,
                                                              const T* __restrict__ q, const T* __restrict__ k,
                                                              const float* __restrict__ g, i64 HK, int L, int K,
                                                              float scale, Elem&& elem, Decay&& decay,
                                                              bool first_issued, int* slot) {
    int live = L;
    int* dead = slot;
#pragma unroll 1
    while (!gla_chunk_factors<SPLIT>(s, q, k, g, HK, L, live, K, scale, elem, decay, first_issued, dead)) {
        live = first_dead_key_row<BT>(g, HK, L, K, slot);
        dead = nullptr;
        first_issued = false;
    }
    return live;
}

}  // namespace rawdelta
