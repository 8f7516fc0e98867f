// GLA, chunked mode: the backward's per-chunk stages of dq, dk and dg over one slice of KS keys, as device functions
// that the chunked op's dq/dk/dg kernel (chunk_bwd_dqk.cu) and the fused backward (fused_chunk.cu) share. Every
// function is called by all 256 threads of a block. Tiles of the slice (rows of stride ld): G, R the per-key
// chunk-local log2 cumulative gates and reset counts, q, k as float; the scores dA a split tile (leading dimension
// ldm), masked to j < r < live and scaled, their diagonal dA_rr apart (float, BT); `scratch` a split
// BT x (KS + TILE_PAD) tile (ldk); `flags` the diagonal sub-blocks summed element by element in this slice
// (gla/chunk.cuh: diag_blocks_elementwise). Math and the sub-block scheme: chunk_bwd_dqk.cu.
#pragma once
#include "gla/chunk.cuh"

namespace gla_dqk {

using namespace rawdelta;

// R[i], R[i + 1] (i even, R's rows of even length): one 8-byte load for int counts.
template <typename RT> __device__ __forceinline__ int2 count_pair(const RT* R, int i) {
    if constexpr (SameType<RT, int>::value) return *reinterpret_cast<const int2*>(R + i);
    else return make_int2((int)R[i], (int)R[i + 1]);
}

// The reference of a per-element decay factor: key d's gates and reset counts at (d, d + 1), loaded by column pair.
struct KeyRef {
    float2 g;
    int2 r;
};

// A reference row `ref` of the tiles: its gates and counts.
template <typename RT> struct RowRef {
    const float* sG;
    const RT* sR;
    int ld, ref;
    __device__ __forceinline__ KeyRef operator()(int d) const {
        return {load_pair(sG, ref * ld + d), count_pair(sR, ref * ld + d)};
    }
};

// The whole-slice reference of each key: m_d = (G_0d + G_last,d) / 2 with counts 0 (whole_slice_fits).
struct MidRef {
    const float* sG;
    int ld, last;
    __device__ __forceinline__ KeyRef operator()(int d) const {
        return {whole_slice_reference(load_pair(sG, d), load_pair(sG, last * ld + d)), make_int2(0, 0)};
    }
};

// The per-key decay factors between each of a thread's rows r of an Acc (one 16-row sub-block per warp, MT = 1) and
// a reference (ref(d): a row of the same sub-block's span, RowRef, or the slice's per-key middle, MidRef):
// 2^(G_r - G_ref) (ROW_MINUS_REF) or 2^(G_ref - G_r), by column pair, the reference's gates and counts loaded once
// per pair: f(jt, e, r, d, x0, x1, same0, same1, rr, c) for the accumulator elements v[0][jt][e], v[0][jt][e + 1] at
// (r, d), (r, d + 1), with same the two columns' reset counts equal to the reference's, rr the row's counts and
// c = per_col(d, reference), what the caller computes once per column pair. Every load is ahead of f's stores for
// its pair, and f selects (no branch around a load).
template <typename AccQ, bool ROW_MINUS_REF, typename RT, typename Ref, typename C, typename F>
__device__ __forceinline__ void key_factor_pairs(const float* sG, const RT* sR, int ld, const Ref& ref, C&& per_col,
                                                 F&& f) {
    static_assert(AccQ::MT == 1, "one 16-row sub-block per warp");
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int jt = 0; jt < AccQ::NT; ++jt) {
        const int d = AccQ::col(warp, lane, jt, 0);
        const KeyRef rf = ref(d);
        const float2 gf = rf.g;
        const auto c = per_col(d, rf);
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            const int r = AccQ::row(warp, lane, 0, e);
            const float2 gr = load_pair(sG, r * ld + d);
            const int2 rr = count_pair(sR, r * ld + d);
            const float x0 = ROW_MINUS_REF ? exp2_ftz(gr.x - gf.x) : exp2_ftz(gf.x - gr.x);
            const float x1 = ROW_MINUS_REF ? exp2_ftz(gr.y - gf.y) : exp2_ftz(gf.y - gr.y);
            f(jt, e, r, d, x0, x1, rr.x == rf.r.x, rr.y == rf.r.y, rr, c);
        }
    }
}

// One warp: c[j] = A B_j, A the 16 x 16 block at (m0, k0) of a split tile (layout LA: MK, or KM for the stored
// matrix's transpose), B_j the 16 x 8 block at (k0, (wn + j WN) 8) of a split KN tile; hi*hi + lo*hi + hi*lo
// (~16 mantissa bits). c is the 16 x 8 accumulator tiles' layout of Acc (row (lane >> 2) + 8 (e >> 1), column
// 2 (lane & 3) + (e & 1)).
template <typename E, Layout LA, int NT, int WN>
__device__ __forceinline__ void warp_block_mma(float (&c)[NT][4], const Split<E>& A, int lda, int m0, int k0,
                                               const Split<E>& B, int ldb, int wn, int lane) {
    const int ao = a_lane<LA>(lane, lda) + a_frag<LA>(m0, k0, lda);
    u32 ah[4], al[4];
    load_a<LA>(ah, smem_addr(A.hi) + ao);
    load_a<LA>(al, smem_addr(A.lo) + ao);
    const int bl0 = b_lane<KN>(lane, ldb);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int bo = bl0 + b_frag<KN>(k0, (wn + j * WN) * 8, ldb);
        u32 bh[2], bl[2];
        load_b<KN>(bh, smem_addr(B.hi) + bo);
        load_b<KN>(bl, smem_addr(B.lo) + bo);
#pragma unroll
        for (int e = 0; e < 4; ++e) c[j][e] = 0.f;
        MmaType<E>::mma(c[j], ah, bh);
        MmaType<E>::mma(c[j], al, bh);
        MmaType<E>::mma(c[j], ah, bl);
    }
}

// The scores dA (do v^T, an accumulator) into sA: scale dA_rj for j < r < live, else 0 (selected: do and v may be
// anything on dead rows); the diagonal scale dA_rr (0 from live on) into diag[r].
template <typename E, int BT, int NW>
__device__ __forceinline__ void store_scores(Acc<BT, BT, NW>& dA, const Split<E>& sA, int ldm, float* diag, int live,
                                             float scale) {
    dA.apply_pairs([&](int r, int j, float& x0, float& x1) {
        const bool in = r < live;
        split_store_pair(sA, r * ldm + j, in && j < r ? x0 * scale : 0.f, in && j + 1 < r ? x1 * scale : 0.f);
        if (j == r) diag[r] = in ? x0 * scale : 0.f;
        if (j + 1 == r) diag[r] = in ? x1 * scale : 0.f;
    });
}

// Every decay of the intra-chunk sums, from a row j of sub-block J to a row r of sub-block I >= J, splits at the
// two blocks' boundary rows s = the first row of I and e = the last live row of J:
//   2^(G_r - G_j) = a_r c_IJ b_j,   a_r = 2^(G_r - G_s),  c_IJ = 2^(G_s - G_e),  b_j = 2^(G_e - G_j),
// each 0 across a reset (selected), each at most 1 for gates <= 0 but c_II (at most 2^diag_span where the diagonal
// sub-block is a product). a and b are per element, c per key: the stages below take two exponentials per element
// (one for the scaled operand qF = q a or kE = k b, one for the post-factor) and one per key and block pair, where a
// factor per element and pair took 2.5 on average. The inter-chunk decays split at the same rows:
// 2^G_r = a_r 2^G_s and 2^(G_last - G_j) = 2^(G_last - G_e) b_j.

// acc += c t for one warp's product t of a sub-block pair (the accumulator tiles' layout), c = 2^(G_s - G_e) per key
// column (0 across a reset): each of the thread's column pairs' factors computed once for its rows.
template <typename AccQ, typename RT>
__device__ __forceinline__ void block_pair_add(AccQ& acc, const float (&t)[AccQ::NT][4], const float* sG,
                                               const RT* sR, int ld, int s, int e, int warp, int lane) {
#pragma unroll
    for (int jt = 0; jt < AccQ::NT; ++jt) {
        const int d = AccQ::col(warp, lane, jt, 0);
        const float2 gs = load_pair(sG, s * ld + d), ge = load_pair(sG, e * ld + d);
        const int2 rs = count_pair(sR, s * ld + d), re = count_pair(sR, e * ld + d);
        // key_decay_sel(s, e) of both columns
        const float x0 = exp2_ftz(gs.x - ge.x), x1 = exp2_ftz(gs.y - ge.y);
        const float c0 = rs.x == re.x ? x0 : 0.f, c1 = rs.y == re.y ? x1 : 0.f;
        acc.v[0][jt][0] += c0 * t[jt][0];
        acc.v[0][jt][1] += c1 * t[jt][1];
        acc.v[0][jt][2] += c0 * t[jt][2];
        acc.v[0][jt][3] += c1 * t[jt][3];
    }
}

// dk's inter-chunk part and dq_chunk's operand kE from one factor per element, b_j = 2^(G_e - G_j) (e the last live
// row of j's sub-block), by the owner of each element of Dx (Acc<BT, KS>: v dh^T on entry):
//   dx_j = 2^(G_last - G_e) b_j Dx_j (0 before a reset after j, by selection),   kE_j = k_j b_j into the scratch,
// each with the bits dk_chunk / dq_chunk give it. Then dq_chunk and dk_chunk run with SHARED_FACTORS: dq_chunk
// takes this kE and, with a_r at hand, writes dk_chunk's qF; dk_chunk computes neither. dq_chunk's barrier comes
// before the scratch is read.
template <typename E, int BT, int KS, int NW, typename RT>
__device__ __forceinline__ void dx_and_kE(Acc<BT, KS, NW>& Dx, const float* sK, const float* sG, const RT* sR, int ld,
                                          const Split<E>& scratch, int ldk, int live) {
    using AccQ = Acc<BT, KS, NW>;
    static_assert(AccQ::MT == 1 && AccQ::WM == BT / SUB, "each warp owns one 16-row sub-block");
    const int last = max(live - 1, 0), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e = min(AccQ::row(warp, lane, 0, 0) | (SUB - 1), last);
    struct Last {
        float2 l;  // 2^(G_last - G_e)
        int2 r;    // R_last
    };
    key_factor_pairs<AccQ, false>(
        sG, sR, ld, RowRef<RT>{sG, sR, ld, e},
        [&](int d, const KeyRef&) {
            const float2 ge = load_pair(sG, e * ld + d), gl = load_pair(sG, last * ld + d);
            return Last{make_float2(exp2_ftz(gl.x - ge.x), exp2_ftz(gl.y - ge.y)), count_pair(sR, last * ld + d)};
        },
        [&](int jt, int x, int j, int d, float b0, float b1, bool same0, bool same1, int2 rj, const Last& c) {
            const float2 kj = load_pair(sK, j * ld + d);
            const bool in = j < live;
            float& x0 = Dx.v[0][jt][x];
            float& x1 = Dx.v[0][jt][x + 1];
            x0 = in && rj.x == c.r.x ? x0 * (b0 * c.l.x) : 0.f;
            x1 = in && rj.y == c.r.y ? x1 * (b1 * c.l.y) : 0.f;
            split_store_pair(scratch, j * ldk + d, in ? kj.x * (same0 ? b0 : 0.f) : 0.f,
                             in ? kj.y * (same1 ? b1 : 0.f) : 0.f);
        });
}

// dq without its diagonal terms (dA_rr k_r), in Dq (Acc<BT, KS>: do h^T on entry; each warp one 16-row sub-block
// I = wb, rows from s = 16 I):
//   dq_r = a_r (scale 2^G_s Dq_r + sum_{J <= I} c_IJ (dA_IJ kE_J)_r),   kE_j = k_j b_j,
// the J = I term only unless flagged; a flagged diagonal sub-block element by element (j in [s, r)). 0 on rows past
// live. Barriers before and after the products (the scratch's kE may be overwritten when it returns).
template <typename E, bool SHARED_FACTORS = false, int BT, int KS, int NW, typename RT>
__device__ __forceinline__ void dq_chunk(Acc<BT, KS, NW>& Dq, const Split<E>& sA, int ldm, const float* sK,
                                         const float* sG, const RT* sR, int ld, const Split<E>& scratch, int ldk,
                                         const int* flags, int live, float scale, const float* sQ = nullptr) {
    using AccQ = Acc<BT, KS, NW>;
    constexpr int NT = AccQ::NT, WM = AccQ::WM, WN = AccQ::WN;
    static_assert(AccQ::MT == 1 && WM == BT / SUB && WM * WN == NW, "each warp owns one 16-row sub-block");
    const int last = max(live - 1, 0), warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wb = warp % WM,
              wn = warp / WM, s = wb * SUB;
    const bool elementwise = flags[wb] != 0;
    // kE_j = k_j b_j; 0 on dead rows (with SHARED_FACTORS the caller stored it: dx_and_kE)
    if (!SHARED_FACTORS)
        for (int idx = 2 * threadIdx.x; idx < BT * KS; idx += 2 * THREADS) {
            const int j = idx / KS, d = idx % KS, e = min(j | (SUB - 1), last);
            const float x0 = sK[j * ld + d] * key_decay_sel(sG, sR, ld, e, j, d);
            const float x1 = sK[j * ld + d + 1] * key_decay_sel(sG, sR, ld, e, j, d + 1);
            split_store_pair(scratch, j * ldk + d, j < live ? x0 : 0.f, j < live ? x1 : 0.f);
        }
    // the inter-chunk part to row s: scale 2^G_s Dq (0 after a reset at or before s: selected, the state may hold
    // anything a reset discards)
#pragma unroll
    for (int jt = 0; jt < NT; ++jt) {
        const int d = AccQ::col(warp, lane, jt, 0);
        const float2 gs = load_pair(sG, s * ld + d);
        const int2 rs = count_pair(sR, s * ld + d);
        const float f0 = scale * exp2_ftz(gs.x), f1 = scale * exp2_ftz(gs.y);
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            Dq.v[0][jt][e] = rs.x > 0 ? 0.f : Dq.v[0][jt][e] * f0;
            Dq.v[0][jt][e + 1] = rs.y > 0 ? 0.f : Dq.v[0][jt][e + 1] * f1;
        }
    }
    __syncthreads();
    // sub-blocks J <= I (for J < I all rows of J are live when a row of I is)
    const int nJ = elementwise ? wb : wb + 1;
    for (int J = 0; J < nJ && s < live; ++J) {
        float t[NT][4];
        warp_block_mma<E, MK, NT, WN>(t, sA, ldm, s, J * SUB, scratch, ldk, wn, lane);
        const int e = min(J * SUB + SUB - 1, last);
        block_pair_add<AccQ>(Dq, t, sG, sR, ld, s, e, warp, lane);
    }
    // a_r (0 from a reset inside the block on, by selection: every term crosses it); with SHARED_FACTORS also
    // dk_chunk's operand qF_r = q_r a_r, into the scratch once every warp's products have read kE from it
    if (SHARED_FACTORS) __syncthreads();
    key_factor_pairs<AccQ, true>(
        sG, sR, ld, RowRef<RT>{sG, sR, ld, s}, [](int, const KeyRef&) { return 0; },
        [&](int jt, int x, int r, int d, float a0, float a1, bool same0, bool same1, int2, int) {
            const bool in = r < live;
            float& x0 = Dq.v[0][jt][x];
            float& x1 = Dq.v[0][jt][x + 1];
            x0 = in && same0 ? x0 * a0 : 0.f;
            x1 = in && same1 ? x1 * a1 : 0.f;
            if (SHARED_FACTORS) {  // dk_chunk's qF, its bits
                const float2 q = load_pair(sQ, r * ld + d);
                split_store_pair(scratch, r * ldk + d, in ? q.x * (same0 ? a0 : 0.f) : 0.f,
                                 in ? q.y * (same1 ? a1 : 0.f) : 0.f);
            }
        });
    // a flagged diagonal sub-block: j in [s, r)
    if (elementwise)
        Dq.apply([&](int r, int d, float& x) {
            if (r >= live) return;
            float sum = 0.f;
            for (int j = s; j < r; ++j)
                sum += tile_get(sA, r * ldm + j) * key_decay(sG, sR, ld, r, j, d) * sK[j * ld + d];
            x += sum;
        });
    __syncthreads();  // kE read (with SHARED_FACTORS: qF written)
}

// dk without its diagonal terms, as its inter-chunk part Dx (Acc<BT, KS>: v dh^T on entry) and its intra-chunk part
// Di (0 on entry); each warp one 16-row sub-block J = wb, e = its last live row:
//   dx_j = 2^(G_last - G_e) b_j Dx_j,   Di_j = b_j sum_{I >= J} c_IJ (dA_IJ^T qF_I)_j,   qF_r = q_r a_r,
// the I = J term only unless flagged; a flagged diagonal sub-block element by element (r in (j, end of the block),
// live rows). 0 on rows past live. A barrier after qF is written; the caller's barrier before the scratch or the
// tiles are overwritten.
template <typename E, bool SHARED_FACTORS = false, int BT, int KS, int NW, typename RT>
__device__ __forceinline__ void dk_chunk(Acc<BT, KS, NW>& Dx, Acc<BT, KS, NW>& Di, const Split<E>& sA, int ldm,
                                         const float* sQ, const float* sG, const RT* sR, int ld,
                                         const Split<E>& scratch, int ldk, const int* flags, int live) {
    using AccQ = Acc<BT, KS, NW>;
    constexpr int NT = AccQ::NT, WM = AccQ::WM, WN = AccQ::WN, NB = BT / SUB;
    static_assert(AccQ::MT == 1 && WM == NB && WM * WN == NW, "each warp owns one 16-row sub-block");
    const int last = max(live - 1, 0), warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wb = warp % WM,
              wn = warp / WM, e = min(wb * SUB + SUB - 1, last);
    const bool elementwise = flags[wb] != 0;
    // qF_r = q_r a_r; 0 on dead rows (with SHARED_FACTORS dq_chunk stored it, and Dx holds dx: dx_and_kE)
    if (!SHARED_FACTORS)
        for (int idx = 2 * threadIdx.x; idx < BT * KS; idx += 2 * THREADS) {
            const int r = idx / KS, d = idx % KS, s = r & ~(SUB - 1);
            const float x0 = sQ[r * ld + d] * key_decay_sel(sG, sR, ld, r, s, d);
            const float x1 = sQ[r * ld + d + 1] * key_decay_sel(sG, sR, ld, r, s, d + 1);
            split_store_pair(scratch, r * ldk + d, r < live ? x0 : 0.f, r < live ? x1 : 0.f);
        }
    __syncthreads();
    // sub-blocks I >= J with a live row
    for (int I = elementwise ? wb + 1 : wb; I < NB && I * SUB < live; ++I) {
        float t[NT][4];
        warp_block_mma<E, KM, NT, WN>(t, sA, ldm, wb * SUB, I * SUB, scratch, ldk, wn, lane);
        block_pair_add<AccQ>(Di, t, sG, sR, ld, I * SUB, e, warp, lane);
    }
    // b_j, and the inter-chunk part (0 before a reset after j, by selection: the state gradient may hold anything
    // the reset discards)
    if (SHARED_FACTORS) {  // Dx is dx already: b_j for Di alone
        key_factor_pairs<AccQ, false>(
            sG, sR, ld, RowRef<RT>{sG, sR, ld, e}, [](int, const KeyRef&) { return 0; },
            [&](int jt, int x, int j, int, float b0, float b1, bool same0, bool same1, int2, int) {
                float& x0 = Di.v[0][jt][x];
                float& x1 = Di.v[0][jt][x + 1];
                x0 = j < live && same0 ? x0 * b0 : 0.f;
                x1 = j < live && same1 ? x1 * b1 : 0.f;
            });
    } else {
        Di.zip(Dx, [&](int j, int d, float& xi, float& xx) {
            const int ij = j * ld + d, ie = e * ld + d, il = last * ld + d;
            const float b = exp2_ftz(sG[ie] - sG[ij]);
            xi = j < live && sR[ij] == sR[ie] ? xi * b : 0.f;
            xx = j < live && sR[ij] == sR[il] ? xx * (b * exp2_ftz(sG[il] - sG[ie])) : 0.f;
        });
    }
    // a flagged diagonal sub-block: r in (j, end of j's sub-block), live rows only
    if (elementwise)
        Di.apply([&](int j, int d, float& x) {
            if (j >= live) return;
            const int end = min((j | (SUB - 1)) + 1, live);
            float sum = 0.f;
            for (int r = j + 1; r < end; ++r)
                sum += tile_get(sA, r * ldm + j) * key_decay(sG, sR, ld, r, j, d) * sQ[r * ld + d];
            x += sum;
        });
}

// The whole-slice form of the three stages above, where whole_slice_fits holds: every decay taken against one
// reference per key, m = MidRef's (the mean of the slice's first and last gates), so that no sub-block pair needs a
// factor of its own and no diagonal sub-block is summed element by element:
//   2^(G_r - G_j) = a_r b_j,   a_r = 2^(G_r - m),  b_j = 2^(m - G_j),   each in [2^-span, 2^span]
//   dx_j = 2^(G_last - m) b_j Dx_j,   kM_j = k_j b_j                                        (whole_dx_and_kM)
//   dq_r = a_r (sum_{J <= I} (dA_IJ kM_J)_r + scale 2^m Dq_r),   qM_r = q_r a_r            (whole_dq)
//   Di_j = b_j sum_{I >= J} (dA_IJ^T qM_I)_j                                                (whole_dk)
// with 2^m taken as 2^(m/2) 2^(m/2) after a_r, so that it underflows only where 2^G_r does. The same outputs as
// dx_and_kE, dq_chunk and dk_chunk with SHARED_FACTORS; rows from live on 0.

// Whether a slice takes the whole-slice form: no reset in any key, and every live gate of every key within
// diag_span<E>() (log2 units) of m_d, so that a_r and b_j lie in [2^-span, 2^span] (a diagonal product block's
// range: gla/chunk.cuh). Each thread tests the elements of an Acc<BT, KS> it owns (together every (row, key) of the
// slice); a barrier over the block, whose answer every thread gets. False for a NaN or infinite gate.
template <typename E, typename AccQ, typename RT>
__device__ __forceinline__ bool whole_slice_fits(const float* sG, const RT* sR, int ld, int live) {
    const int last = max(live - 1, 0), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const MidRef mid{sG, ld, last};
    bool fits = true;
#pragma unroll
    for (int jt = 0; jt < AccQ::NT; ++jt) {
        const int d = AccQ::col(warp, lane, jt, 0);
        const float2 m = mid(d).g;
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            const int r = AccQ::row(warp, lane, 0, e);
            const float2 gr = load_pair(sG, r * ld + d);
            const int2 rr = count_pair(sR, r * ld + d);
            fits &= r >= live || (whole_slice_allows<E>(gr.x, m.x, rr.x) && whole_slice_allows<E>(gr.y, m.y, rr.y));
        }
    }
    return __syncthreads_and(fits) != 0;
}

// dx_j and kM_j (the scratch), by the owner of each element of Dx (v dh^T on entry). A barrier after.
template <typename E, int BT, int KS, int NW, typename RT>
__device__ __forceinline__ void whole_dx_and_kM(Acc<BT, KS, NW>& Dx, const float* sK, const float* sG, const RT* sR,
                                                int ld, const Split<E>& scratch, int ldk, int live) {
    using AccQ = Acc<BT, KS, NW>;
    const int last = max(live - 1, 0);
    key_factor_pairs<AccQ, false>(
        sG, sR, ld, MidRef{sG, ld, last},
        [&](int d, const KeyRef& m) {  // 2^(G_last - m)
            const float2 gl = load_pair(sG, last * ld + d);
            return make_float2(exp2_ftz(gl.x - m.g.x), exp2_ftz(gl.y - m.g.y));
        },
        [&](int jt, int x, int j, int d, float b0, float b1, bool, bool, int2, const float2& t) {
            const float2 kj = load_pair(sK, j * ld + d);
            const bool in = j < live;
            float& x0 = Dx.v[0][jt][x];
            float& x1 = Dx.v[0][jt][x + 1];
            x0 = in ? x0 * (b0 * t.x) : 0.f;
            x1 = in ? x1 * (b1 * t.y) : 0.f;
            split_store_pair(scratch, j * ldk + d, in ? kj.x * b0 : 0.f, in ? kj.y * b1 : 0.f);
        });
    __syncthreads();
}

// acc += sum over the 16-blocks b in [b0, b1) of warp_block_mma(b), each warp its own rows (the accumulator tiles'
// layout). LA MK: the scores' rows of this warp's sub-block against block b's columns; KM: block b's rows,
// transposed.
template <typename E, Layout LA, typename AccQ>
__device__ __forceinline__ void whole_products(AccQ& acc, const Split<E>& sA, int ldm, const Split<E>& scratch,
                                               int ldk, int b0, int b1) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wb = warp % AccQ::WM, wn = warp / AccQ::WM;
    for (int b = b0; b < b1; ++b) {
        float t[AccQ::NT][4];
        warp_block_mma<E, LA, AccQ::NT, AccQ::WN>(t, sA, ldm, wb * SUB, b * SUB, scratch, ldk, wn, lane);
#pragma unroll
        for (int jt = 0; jt < AccQ::NT; ++jt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc.v[0][jt][e] += t[jt][e];
    }
}

// dq (Dq: do h^T on entry) from kM in the scratch; then qM into the scratch once every warp has read kM. Barriers
// before the products' end and after qM is written.
template <typename E, int BT, int KS, int NW, typename RT>
__device__ __forceinline__ void whole_dq(Acc<BT, KS, NW>& Dq, const Split<E>& sA, int ldm, const float* sQ,
                                         const float* sG, const RT* sR, int ld, const Split<E>& scratch, int ldk,
                                         int live, float scale) {
    using AccQ = Acc<BT, KS, NW>;
    const int last = max(live - 1, 0), wb = (threadIdx.x >> 5) % AccQ::WM;
    AccQ intra;
    intra.fill(0.f);
    if (wb * SUB < live) whole_products<E, MK>(intra, sA, ldm, scratch, ldk, 0, wb + 1);
    __syncthreads();  // kM read
    key_factor_pairs<AccQ, true>(
        sG, sR, ld, MidRef{sG, ld, last},
        [&](int, const KeyRef& m) { return make_float2(exp2_ftz(0.5f * m.g.x), exp2_ftz(0.5f * m.g.y)); },
        [&](int jt, int x, int r, int d, float a0, float a1, bool, bool, int2, const float2& hm) {
            const bool in = r < live;
            float& x0 = Dq.v[0][jt][x];
            float& x1 = Dq.v[0][jt][x + 1];
            x0 = in ? a0 * intra.v[0][jt][x] + (a0 * hm.x) * hm.x * scale * x0 : 0.f;
            x1 = in ? a1 * intra.v[0][jt][x + 1] + (a1 * hm.y) * hm.y * scale * x1 : 0.f;
            const float2 q = load_pair(sQ, r * ld + d);
            split_store_pair(scratch, r * ldk + d, in ? q.x * a0 : 0.f, in ? q.y * a1 : 0.f);
        });
    __syncthreads();  // qM written
}

// dk's intra-chunk part Di (0 on entry) from qM in the scratch. The caller's barrier before the scratch or the
// tiles are overwritten.
template <typename E, int BT, int KS, int NW, typename RT>
__device__ __forceinline__ void whole_dk(Acc<BT, KS, NW>& Di, const Split<E>& sA, int ldm, const float* sG,
                                         const RT* sR, int ld, const Split<E>& scratch, int ldk, int live) {
    using AccQ = Acc<BT, KS, NW>;
    constexpr int NB = BT / SUB;
    const int last = max(live - 1, 0), wb = (threadIdx.x >> 5) % AccQ::WM;
    whole_products<E, KM>(Di, sA, ldm, scratch, ldk, wb, min(NB, (live + SUB - 1) / SUB));
    key_factor_pairs<AccQ, false>(
        sG, sR, ld, MidRef{sG, ld, last}, [](int, const KeyRef&) { return 0; },
        [&](int jt, int x, int j, int, float b0, float b1, bool, bool, int2, int) {
            float& x0 = Di.v[0][jt][x];
            float& x1 = Di.v[0][jt][x + 1];
            x0 = j < live ? x0 * b0 : 0.f;
            x1 = j < live ? x1 * b1 : 0.f;
        });
}

// dg of one key over a chunk's live rows, by the thread that owns the key, rows in a fixed order: kdx (the terms
// k_j dx_j of the rows written, column stride ld) becomes its exclusive prefix sum_{j < s}; then, from the last
// live row back, carry = 0 at a reset's own row, else carry + dG_s, and dg_s = carry + prefix_s + add (0 at a
// reset's own row). Returns the carry past row 0 (0 when row 0 is a reset's own).
template <typename RT>
__device__ __forceinline__ float dg_reverse_scan(float carry, float add, const float* dG, float* kdx, const RT* R,
                                                 int ld, int live, float* out, i64 stride) {
    // U rows read ahead into registers per step (one thread per key: the loads' latency is the scan's)
    constexpr int U = 8;
    float pre = 0.f;
    for (int s0 = 0; s0 < live; s0 += U) {
        float x[U];
#pragma unroll
        for (int u = 0; u < U; ++u) x[u] = s0 + u < live ? kdx[(s0 + u) * ld] : 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (s0 + u < live) {
                kdx[(s0 + u) * ld] = pre;
                pre += x[u];
            }
    }
    for (int s1 = live - 1; s1 >= 0; s1 -= U) {
        float gx[U], px[U];
        int rx[U + 1];  // the reset counts of rows s1 - u, one row further for the last row's predecessor
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int s = s1 - u;
            gx[u] = s >= 0 ? dG[s * ld] : 0.f;
            px[u] = s >= 0 ? kdx[s * ld] : 0.f;
        }
#pragma unroll
        for (int u = 0; u <= U; ++u) rx[u] = s1 - u >= 0 ? (int)R[(s1 - u) * ld] : 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int s = s1 - u;
            if (s < 0) break;
            const bool own_reset = rx[u] > rx[u + 1];
            carry = own_reset ? 0.f : carry + gx[u];
            out[s * stride] = own_reset ? 0.f : carry + px[u] + add;
        }
    }
    return carry;
}

}  // namespace gla_dqk
