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

// The inter-chunk parts from the products Dq = do h^T and Dx = v dh^T: dq = scale 2^G_r Dq (0 after a reset),
// dx = 2^(G_last - G_j) Dx (0 before one).
template <typename AccQ, typename RT>
__device__ __forceinline__ void dq_inter(AccQ& Dq, const float* sG, const RT* sR, int ld, float scale) {
    Dq.apply([&](int r, int d, float& x) {
        const float f = exp2_ftz(sG[r * ld + d]) * scale;
        x = sR[r * ld + d] > 0 ? 0.f : x * f;
    });
}
template <typename AccQ, typename RT>
__device__ __forceinline__ void dk_inter(AccQ& Dx, const float* sG, const RT* sR, int ld, int last) {
    Dx.apply([&](int j, int d, float& x) {
        const float f = exp2_ftz(sG[last * ld + d] - sG[j * ld + d]);
        x = sR[last * ld + d] > sR[j * ld + d] ? 0.f : x * f;
    });
}

// dq's intra-chunk part without its diagonal terms, added to Dq (Acc<BT, KS>; each warp one 16-row sub-block I):
// sub-blocks J <= I on tensor cores (J = I unless flagged), kL_j = k_j 2^(G_ref - G_j) with ref the last live row of
// J, post-factor 2^(G_r - G_ref) (up to 2^diag_span for J = I); a flagged diagonal sub-block element by element
// (j in [first row of r's sub-block, r)). Barriers before and after the products (the scratch's kL may be overwritten
// when it returns).
template <typename E, int BT, int KS, int NW, typename RT>
__device__ __forceinline__ void dq_intra(Acc<BT, KS, NW>& Dq, const Split<E>& sA, int ldm, const float* sK,
                                         const float* sG, const RT* sR, int ld, const Split<E>& scratch, int ldk,
                                         const int* flags, int live) {
    using AccQ = Acc<BT, KS, NW>;
    constexpr int NT = AccQ::NT, WM = AccQ::WM, WN = AccQ::WN;
    static_assert(AccQ::MT == 1 && WM == BT / SUB && WM * WN == NW, "each warp owns one 16-row sub-block");
    const int last = max(live - 1, 0), warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wb = warp % WM,
              wn = warp / WM;
    const bool elementwise = flags[wb] != 0;
    // kL_j = k_j 2^(G_ref - G_j), ref = the last live row of j's sub-block (>= j); 0 on dead rows
    for (int idx = 2 * threadIdx.x; idx < BT * KS; idx += 2 * THREADS) {
        const int j = idx / KS, d = idx % KS, ref = min(j | (SUB - 1), last);
        const float x0 = sK[j * ld + d] * key_decay_sel(sG, sR, ld, ref, j, d);
        const float x1 = sK[j * ld + d + 1] * key_decay_sel(sG, sR, ld, ref, j, d + 1);
        split_store_pair(scratch, j * ldk + d, j < live ? x0 : 0.f, j < live ? x1 : 0.f);
    }
    __syncthreads();
    // sub-blocks J <= I = wb (for J < I all rows of J are live when a row of I is): dq_r += 2^(G_r - G_ref)
    // (dA_IJ kL_J)_r; for J = I, r <= ref and no reset inside the block, so the factor is 2^(G_r - G_ref) as well
    const int nJ = elementwise ? wb : wb + 1;
    for (int J = 0; J < nJ && wb * SUB < live; ++J) {
        float t[NT][4];
        warp_block_mma<E, MK, NT, WN>(t, sA, ldm, wb * SUB, J * SUB, scratch, ldk, wn, lane);
        const int ref = min(J * SUB + SUB - 1, last);
#pragma unroll
        for (int jt = 0; jt < NT; ++jt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = AccQ::row(warp, lane, 0, e), d = AccQ::col(warp, lane, jt, e);
                const float f = key_decay_sel(sG, sR, ld, r, ref, d) * t[jt][e];
                Dq.v[0][jt][e] += r < live ? f : 0.f;
            }
    }
    // a flagged diagonal sub-block: j in [first row of r's sub-block, r)
    if (elementwise)
        Dq.apply([&](int r, int d, float& x) {
            if (r >= live) return;
            float s = 0.f;
            for (int j = r & ~(SUB - 1); j < r; ++j)
                s += tile_get(sA, r * ldm + j) * key_decay(sG, sR, ld, r, j, d) * sK[j * ld + d];
            x += s;
        });
    __syncthreads();  // kL read
}

// dk's intra-chunk part without its diagonal terms, added to Di (Acc<BT, KS>; each warp one 16-row sub-block J):
// sub-blocks I >= J on tensor cores (I = J unless flagged), qF_r = q_r 2^(G_r - G_ref) with ref the first row of I,
// post-factor 2^(G_ref - G_j) (up to 2^diag_span for I = J); a flagged diagonal sub-block element by element
// (r in (j, end of j's sub-block), live rows). A barrier after qF is written; the caller's barrier before the scratch
// or the tiles are overwritten.
template <typename E, int BT, int KS, int NW, typename RT>
__device__ __forceinline__ void dk_intra(Acc<BT, KS, NW>& Di, const Split<E>& sA, int ldm, const float* sQ,
                                         const float* sG, const RT* sR, int ld, const Split<E>& scratch, int ldk,
                                         const int* flags, int live) {
    using AccQ = Acc<BT, KS, NW>;
    constexpr int NT = AccQ::NT, WM = AccQ::WM, WN = AccQ::WN, NB = BT / SUB;
    static_assert(AccQ::MT == 1 && WM == NB && WM * WN == NW, "each warp owns one 16-row sub-block");
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wb = warp % WM, wn = warp / WM;
    const bool elementwise = flags[wb] != 0;
    // qF_r = q_r 2^(G_r - G_ref), ref = the first row of r's sub-block; 0 on dead rows
    for (int idx = 2 * threadIdx.x; idx < BT * KS; idx += 2 * THREADS) {
        const int r = idx / KS, d = idx % KS, ref = r & ~(SUB - 1);
        const float x0 = sQ[r * ld + d] * key_decay_sel(sG, sR, ld, r, ref, d);
        const float x1 = sQ[r * ld + d + 1] * key_decay_sel(sG, sR, ld, r, ref, d + 1);
        split_store_pair(scratch, r * ldk + d, r < live ? x0 : 0.f, r < live ? x1 : 0.f);
    }
    __syncthreads();
    // sub-blocks I >= J = wb with a live row (ref = the first row of I): dk_j += 2^(G_ref - G_j) (dA_IJ^T qF_I)_j
    for (int I = elementwise ? wb + 1 : wb; I < NB && I * SUB < live; ++I) {
        float t[NT][4];
        warp_block_mma<E, KM, NT, WN>(t, sA, ldm, wb * SUB, I * SUB, scratch, ldk, wn, lane);
        const int ref = I * SUB;
#pragma unroll
        for (int jt = 0; jt < NT; ++jt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = AccQ::row(warp, lane, 0, e), d = AccQ::col(warp, lane, jt, e);
                const float f = key_decay_sel(sG, sR, ld, ref, j, d) * t[jt][e];
                Di.v[0][jt][e] += j < live ? f : 0.f;
            }
    }
    // a flagged diagonal sub-block: r in (j, end of j's sub-block), live rows only
    if (elementwise)
        Di.apply([&](int j, int d, float& x) {
            if (j >= live) return;
            const int end = min((j | (SUB - 1)) + 1, live);
            float s = 0.f;
            for (int r = j + 1; r < end; ++r)
                s += tile_get(sA, r * ldm + j) * key_decay(sG, sR, ld, r, j, d) * sQ[r * ld + d];
            x += s;
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
        int rx[U], rp[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int s = s1 - u;
            gx[u] = s >= 0 ? dG[s * ld] : 0.f;
            px[u] = s >= 0 ? kdx[s * ld] : 0.f;
            rx[u] = s >= 0 ? (int)R[s * ld] : 0;
            rp[u] = s > 0 ? (int)R[(s - 1) * ld] : 0;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int s = s1 - u;
            if (s < 0) break;
            const bool own_reset = rx[u] > rp[u];
            carry = own_reset ? 0.f : carry + gx[u];
            out[s * stride] = own_reset ? 0.f : carry + px[u] + add;
        }
    }
    return carry;
}

}  // namespace gla_dqk
