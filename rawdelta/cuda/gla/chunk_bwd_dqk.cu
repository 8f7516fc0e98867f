// GLA, chunked mode, the last stage of the backward: per chunk, head and slice of KS keys, dq, dk and the gate
// gradient dg (mma.sync: sm_80 and later). Layouts: gla/chunk.cuh; math: rawdelta/ops/gla/README.md ("Backward").
#include "gla/chunk_bwd_intra.cuh"

using namespace rawdelta;

// ---------------------------------------------------------------------------------------------
// Per (chunk c, head h, slice of KS keys [k0, k0 + kc)), one block of 256 threads, grid NC * H * NKS (blockIdx.x =
// (c H + h) NKS + ks). Rows r, j of the chunk (L rows; live = its first dead row, L when none; last = live - 1),
// G / R the per-key cumulative log2 gates and reset counts (gla/chunk.cuh; recomputed here from the gates g), every
// decay selected to 0 across a reset:
//   loop over V in blocks of BVB (tensor cores):  Dq = do h^T, Dx = v dh^T [BT x KS],  dA = do v^T [BT x BT],
//                                                 hdh_d = sum_v h_dv dh_dv
//   dA_rj = scale dA_rj for j <= r < live, else 0
//   dq_r  = scale 2^G_r Dq_r + sum_{j <= r} dA_rj 2^(G_r - G_j) k_j
//   dx_j  = 2^(G_last - G_j) Dx_j                               (dk^inter)
//   dk_j  = dx_j + sum_{r >= j} dA_rj 2^(G_r - G_j) q_r
// The intra-chunk sums by 16-row sub-blocks: a pair of sub-blocks I >= J is a product of scaled tiles, every decay
// split at the blocks' boundary rows (s the first row of I, e the last live row of J) into factors each at most 1
// for gates <= 0 and 0 across a reset (gla/chunk_bwd_intra.cuh):
//   dq_I += 2^(G_I - G_s) 2^(G_s - G_e) (dA_IJ (k_J 2^(G_e - G_J)))      (kE, one tile for every I)
//   dk_J += 2^(G_e - G_J) 2^(G_s - G_e) (dA_IJ^T (q_I 2^(G_I - G_s)))    (qF, one tile for every J)
// (the per-key middle factor on each pair's product, the per-element outer one once, in registers); a diagonal
// sub-block whose gates could overflow its factors element by element in float32, the diagonal entries j = r
// (decay 1) apart.
// Gate gradient per key d (natural-log units, README "The gate gradient"):
//   dG_r = q_r (dq_r - dA_rr k_r) - k_r (dk_r - dx_r - dA_rr q_r)      (the diagonal terms, which cancel exactly,
//                                                                        left out of both)
//   dg_s = sum_{s <= r < live, R_r = R_s} dG_r + sum_{j < s} k_j dx_j + Dk hdh,   0 at a reset's own gate
// that is, the reverse chunk-local cumsum of dG_r + [r = last] (Dk hdh + sum_j k_j dx_j), with the rows past the
// next reset left out (their terms sum to 0: naive_chunk's reverse_chunk_local_cumsum) and the rows written's
// terms k_j dx_j summed over their spans j < s directly (an exclusive prefix) rather than added at the last row
// and cancelled again at row j, which would cancel O(1) terms under strong decay.
// Dead rows [live, L) are past the chunk for every product (selected out; q, k, v, do, G may be anything there) and
// get NaN in dq, dk and dg. Deterministic: every sum in a fixed order, no atomics.
template <typename T, typename E, int BT, int KS, int BVB>
__global__ void __launch_bounds__(256, 2) gla_chunk_bwd_dqk_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ g, const int* __restrict__ Rc,
    const float* __restrict__ Dk, const T* __restrict__ hbuf, const T* __restrict__ dhbuf,
    const i64* __restrict__ chunk_bos, const int* __restrict__ chunk_len, T* __restrict__ dq, T* __restrict__ dk,
    float* __restrict__ dg, int H, int K, int V, int NKS, float scale) {
    using TT = typename InputTile<T, E>::type;
    constexpr int NW = 8, NB = BT / SUB;
    constexpr int LDF = KS + 4;         // float and int tiles of the slice's keys: G, R, q, k (then dG, k dx)
    constexpr int LDK = KS + TILE_PAD;  // the scaled operands kE / qF
    constexpr int LDV = BVB + TILE_PAD;
    constexpr int LDM = BT + TILE_PAD;  // the scores dA
    using AccQ = Acc<BT, KS, NW>;
    using AccA = Acc<BT, BT, NW>;
    constexpr int NT = AccQ::NT, WM = AccQ::WM, WN = AccQ::WN;
    static_assert(BT % SUB == 0 && KS % 16 == 0 && BVB % 16 == 0, "tile sizes");
    static_assert(AccQ::MT == 1 && WM == NB && WM * WN == NW, "each warp owns one 16-row sub-block of dq / dk");
    static_assert(KS * 4 == NW * 32, "four threads per key sum h dh");
    constexpr int U = 1;  // k steps unrolled per product of the V loop (three accumulators live across it)
    // 16-bit inputs: two stages of the V loop's tiles (each step's cp.async loads in flight during the step before);
    // float32 inputs are converted through registers, so a second stage would only take shared memory
    constexpr int STAGES = sizeof(T) == 2 ? 2 : 1;

    // Shared memory: G, R, hdh and Dk for the whole block, the scores' diagonal and the diagonal sub-blocks' flags;
    // then the V loop's tiles, whose space afterwards holds q, k (float), the scores and one scaled operand (kE, then
    // qF); q and k become dG and k dx at the end.
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    float* sG = cur.take<float>(BT * LDF);
    int* sR = cur.take<int>(BT * LDF);
    float* sHdh = cur.take<float>(KS);
    float* sDk = cur.take<float>(KS);
    float* sDa = cur.take<float>(BT);
    int* sFlag = cur.take<int>(4);
    unsigned char* const vloop_tiles = cur.p;
    TT sDo[STAGES], sV[STAGES], sH[STAGES], sDh[STAGES];
#pragma unroll
    for (int b = 0; b < STAGES; ++b) {
        cur.into(sDo[b], BT * LDV);
        cur.into(sV[b], BT * LDV);
        cur.into(sH[b], KS * LDV);
        cur.into(sDh[b], KS * LDV);
    }
    SmemCursor after{vloop_tiles};
    float* sQ = after.take<float>(BT * LDF);
    float* sK = after.take<float>(BT * LDF);
    const Split<E> sA = after.take_split<E>(BT * LDM);
    const Split<E> sS = after.take_split<E>(BT * LDK);

    const int ks = blockIdx.x % NKS, ch = blockIdx.x / NKS, h = ch % H, c = ch / H;
    const i64 bos = chunk_bos[c];
    const int L = chunk_len[c], k0 = ks * KS, kc = min(KS, K - k0);
    const int live = min(code_live_rows(Rc[bos * H + h]), L), last = max(live - 1, 0);
    const i64 qk0 = (bos * H + h) * K + k0, rstride = (i64)H * K;  // (row 0, key k0) of [BT_, H, K]; row stride
    const i64 hoff = ((i64)c * H + h) * K * V + (i64)k0 * V;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wb = warp % WM, wn = warp / WM;  // this warp's sub-block of rows in dq / dk, its column group

    // Every tile whole (a full chunk, a whole key slice, whole value steps, 16-byte aligned rows: all but the
    // edges of a call): the loads without bounds or alignment tests (load_tile_whole)
    const bool whole = L == BT && kc == KS && V % BVB == 0 && rows_aligned16(g + qk0, rstride) &&
                       rows_aligned16(dout + (bos * H + h) * V, (i64)H * V) &&
                       rows_aligned16(v + (bos * H + h) * V, (i64)H * V) && rows_aligned16(hbuf + hoff, (i64)V) &&
                       rows_aligned16(dhbuf + hoff, (i64)V) && rows_aligned16(q + qk0, rstride) &&
                       rows_aligned16(k + qk0, rstride);
    if (whole) load_tile_whole<BT, KS, THREADS>(sG, LDF, g + qk0, rstride);  // the raw gates: G and R after the V loop
    else load_tile(sG, LDF, g + qk0, rstride, L, kc, BT, KS);

    AccQ Dq, Dx;
    AccA dA;
    Dq.fill(0.f);
    Dx.fill(0.f);
    dA.fill(0.f);
    float hdh = 0.f;  // this thread's part of hdh of key hkey: value columns 2 hpart + 8 i (and the next)
    const int hkey = threadIdx.x >> 2, hpart = threadIdx.x & 3;
    // stage b's tile of x (selected: a runtime index into the arrays would put them in local memory)
    const auto at = [](const TT (&x)[STAGES], int b) { return STAGES > 1 && b ? x[STAGES - 1] : x[0]; };
    // step s of the V loop into stage s % STAGES, one cp.async group (with the gates for step 0)
    const auto issue = [&](int s) {
        const int v0 = s * BVB, vc = min(BVB, V - v0), b = s % STAGES;
        const i64 row = (bos * H + h) * V + v0;
        if constexpr (SameType<TT, T*>::value) {  // 16-bit inputs: same-type tiles
            if (whole) {
                load_tile_whole<BT, BVB, THREADS>(at(sDo, b), LDV, dout + row, (i64)H * V);
                load_tile_whole<BT, BVB, THREADS>(at(sV, b), LDV, v + row, (i64)H * V);
                load_tile_whole<KS, BVB, THREADS>(at(sH, b), LDV, hbuf + hoff + v0, (i64)V);
                load_tile_whole<KS, BVB, THREADS>(at(sDh, b), LDV, dhbuf + hoff + v0, (i64)V);
                cp_async_commit();
                return;
            }
        }
        load_tile(at(sDo, b), LDV, dout + row, (i64)H * V, L, vc, BT, BVB);
        load_tile(at(sV, b), LDV, v + row, (i64)H * V, L, vc, BT, BVB);
        load_tile(at(sH, b), LDV, hbuf + hoff + v0, (i64)V, kc, vc, KS, BVB);
        load_tile(at(sDh, b), LDV, dhbuf + hoff + v0, (i64)V, kc, vc, KS, BVB);
        cp_async_commit();
    };
    const int nv = (V + BVB - 1) / BVB;
    issue(0);
#pragma unroll 1
    for (int s = 0; s < nv; ++s) {
        // the next step's loads in flight while this one computes (into the stage step s - 1 read, released by its
        // closing barrier)
        if (STAGES > 1 && s + 1 < nv) {
            issue(s + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (s + 1 == nv) {  // q and k, loaded through registers after the loop: on their way to L2 during its last step
            prefetch_tile_l2(q + qk0, rstride, L, kc);
            prefetch_tile_l2(k + qk0, rstride, L, kc);
        }
        const int b = s % STAGES;
#pragma unroll
        for (int col = 2 * hpart; col < BVB; col += 8) {
            const int e = hkey * LDV + col;
            const float2 x = tile_get_pair(at(sH, b), e), y = tile_get_pair(at(sDh, b), e);
            hdh += x.x * y.x + x.y * y.y;
        }
        gemm<E, MK, NK, BT, KS, BVB, NW, U>(Dq, at(sDo, b), LDV, at(sH, b), LDV);
        gemm<E, MK, NK, BT, KS, BVB, NW, U>(Dx, at(sV, b), LDV, at(sDh, b), LDV);
        gemm<E, MK, NK, BT, BT, BVB, NW, U>(dA, at(sDo, b), LDV, at(sV, b), LDV);
        // before this stage is loaded again (by step s + 2's issue, or the next step's with one stage) or, after the
        // last step, taken by the tiles that follow
        if (STAGES == 1 || s + 2 < nv || s + 1 == nv) __syncthreads();
        if (STAGES == 1 && s + 1 < nv) issue(s + 1);
    }

    // ---- the V loop's tiles are dead: the scores (masked, scaled), q, k, hdh, Dk ----
    gla_dqk::store_scores<E>(dA, sA, LDM, sDa, live, scale);
    if (sizeof(T) == 2 && whole) {  // converted through registers (float32 rows take load_tile's cp.async path)
        load_tile_whole_convert<BT, KS, THREADS>(sQ, LDF, q + qk0, rstride);
        load_tile_whole_convert<BT, KS, THREADS>(sK, LDF, k + qk0, rstride);
    } else {
        load_tile(sQ, LDF, q + qk0, rstride, L, kc, BT, KS);
        load_tile(sK, LDF, k + qk0, rstride, L, kc, BT, KS);
    }
    hdh = lane_group_sum<1, 4>(hdh);
    if (hpart == 0) sHdh[hkey] = hdh;
    if ((int)threadIdx.x < KS)
        sDk[threadIdx.x] = (int)threadIdx.x < kc ? Dk[((i64)c * H + h) * K + k0 + threadIdx.x] : 0.f;
    cp_async_wait_all();
    __syncthreads();

    // G, R from the gates (as prepare computes them); the inter-chunk parts, then the intra-chunk sums without their
    // diagonal terms (gla/chunk_bwd_intra.cuh)
    chunk_local_cumsum_log2(sG, sR, LDF, KS, live, BT);
    __syncthreads();
    AccQ Di;
    Di.fill(0.f);
    if (gla_dqk::whole_slice_fits<E, AccQ>(sG, sR, LDF, live)) {
        // one reference per key for the whole slice (gla/chunk_bwd_intra.cuh: whole_dq)
        gla_dqk::whole_dx_and_kM<E>(Dx, sK, sG, sR, LDF, sS, LDK, live);
        gla_dqk::whole_dq<E>(Dq, sA, LDM, sQ, sG, sR, LDF, sS, LDK, live, scale);
        gla_dqk::whole_dk<E>(Di, sA, LDM, sG, sR, LDF, sS, LDK, live);
    } else {
        diag_blocks_elementwise<BT, E>(sG, sR, LDF, KS, live, sFlag);  // barriers around
        // each per-element factor once: b_j for dx and kE, a_r for dq and qF (gla/chunk_bwd_intra.cuh: dx_and_kE)
        gla_dqk::dx_and_kE<E>(Dx, sK, sG, sR, LDF, sS, LDK, live);
        gla_dqk::dq_chunk<E, true>(Dq, sA, LDM, sK, sG, sR, LDF, sS, LDK, sFlag, live, scale, sQ);
        gla_dqk::dk_chunk<E, true>(Dx, Di, sA, LDM, sQ, sG, sR, LDF, sS, LDK, sFlag, live);
    }
    __syncthreads();  // q and k read by every thread: from here each thread rewrites only its own elements

    // dq, dk (with the diagonal terms dA_rr k_r, dA_rr q_r); q and k become dG_r and k_r dx_r (0 past live)
    const bool paired = (K & 1) == 0;
#pragma unroll
    for (int jt = 0; jt < NT; ++jt)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            const int r = AccQ::row(warp, lane, 0, e), d = AccQ::col(warp, lane, jt, e);
            const bool in = r < live;
            const float a = sDa[r];
            const int i = r * LDF + d;
            const float2 q2 = load_pair(sQ, i), k2 = load_pair(sK, i);
            const float qv[2] = {q2.x, q2.y}, kv[2] = {k2.x, k2.y};
            float oq[2], ok[2], dG[2], kdx[2];
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                const float xq = Dq.v[0][jt][e + x], xi = Di.v[0][jt][e + x], xx = Dx.v[0][jt][e + x];
                oq[x] = in ? xq + a * kv[x] : dead_value();
                ok[x] = in ? xx + xi + a * qv[x] : dead_value();
                dG[x] = in ? qv[x] * xq - kv[x] * xi : 0.f;
                kdx[x] = in ? kv[x] * xx : 0.f;
            }
            store_pair(sQ, i, dG[0], dG[1]);
            store_pair(sK, i, kdx[0], kdx[1]);
            if (r < L) {
                const i64 o = qk0 + r * rstride + d;
                put_row_pair(dq, o, d, kc, paired, oq[0], oq[1]);
                put_row_pair(dk, o, d, kc, paired, ok[0], ok[1]);
            }
        }
    __syncthreads();

    // dg, one thread per key, rows in a fixed order: the exclusive prefix of k dx, then the reverse cumsum of dG
    // within each run of rows between resets
    if ((int)threadIdx.x < kc) {
        const int d = threadIdx.x;
        const float carried = sDk[d] == 0.f ? 0.f : sDk[d] * sHdh[d];  // 2^G_last spans every step
        float* out = dg + qk0 + d;
        gla_dqk::dg_reverse_scan(0.f, carried, sQ + d, sK + d, sR + d, LDF, live, out, rstride);
        for (int s = live; s < L; ++s) out[s * rstride] = dead_value();
    }
}
