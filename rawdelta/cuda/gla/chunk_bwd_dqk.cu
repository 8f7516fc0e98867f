// GLA, chunked mode, the last stage of the backward: per chunk, head and slice of KS keys, dq, dk and the gate
// gradient dg (mma.sync: sm_80 and later). Layouts: gla/chunk.cuh; math: rawdelta/ops/gla/README.md ("Backward").
#include "gla/chunk_bwd_intra.cuh"

using namespace rawdelta;

// ---------------------------------------------------------------------------------------------
// Per item (chunk c, head h, slice of KS keys [k0, k0 + kc)), NITEMS = NC * H * NKS in all (item x: ks = x % NKS,
// c H + h = x / NKS). Rows r, j of the chunk (L rows; live = its first dead row, L when none; last = live - 1),
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
//
// Persistent: block b takes the items b, b + gridDim.x, ... (blocks of 256 threads, two per SM where the shared
// memory allows). An item's gates, q and k are loaded as it starts, its V steps each one step ahead of the step
// that computes; the last step's tiles (stage B) then take the epilogue's scores, scaled operand and gate-gradient
// terms, and where the item's steps are even in number, the next item's first step (stage A, apart) is loaded
// during this item's epilogue: the loads of one item overlap the latency-bound epilogue of the one before.
template <typename T, typename E, int BT, int KS, int BVB>
__global__ void __launch_bounds__(256, 2) gla_chunk_bwd_dqk_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ g, const int* __restrict__ Rc,
    const float* __restrict__ Dk, const T* __restrict__ hbuf, const T* __restrict__ dhbuf,
    const i64* __restrict__ chunk_bos, const int* __restrict__ chunk_len, T* __restrict__ dq, T* __restrict__ dk,
    float* __restrict__ dg, int H, int K, int V, int NKS, int NITEMS, float scale) {
    using TT = typename InputTile<T, E>::type;
    constexpr int NW = 8;
    constexpr int LDF = KS + 4;         // the float and uint8 tiles of the slice's keys: G, R; dG and k dx at the end
    constexpr int LDQ = KS + TILE_PAD;  // q and k (input type; 16-byte rows for cp.async)
    constexpr int LDK = KS + TILE_PAD;  // the scaled operands kE / qF
    constexpr int LDV = BVB + TILE_PAD;
    constexpr int LDM = BT + TILE_PAD;  // the scores dA
    using AccQ = Acc<BT, KS, NW>;
    using AccA = Acc<BT, BT, NW>;
    constexpr int NT = AccQ::NT, WM = AccQ::WM, WN = AccQ::WN;
    static_assert(BT % SUB == 0 && KS % 16 == 0 && BVB % 16 == 0, "tile sizes");
    static_assert(AccQ::MT == 1 && WM == BT / SUB && WM * WN == NW, "each warp owns one 16-row sub-block of dq / dk");
    static_assert(KS * 4 == NW * 32, "four threads per key sum h dh");
    constexpr int U = 1;  // k steps unrolled per product of the V loop (three accumulators live across it)

    // Shared memory (the host's dqk_smem mirrors it): G, R, hdh, the scores' diagonal and the diagonal blocks' flags;
    // stage A of the V loop's tiles; region R1, which holds stage B, then the scores and one scaled operand (kE, then
    // qF), then dG and k dx; q and k.
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    float* sG = cur.take<float>(BT * LDF);
    unsigned char* sR = cur.take<unsigned char>(BT * LDF);
    float* sHdh = cur.take<float>(KS);
    float* sDa = cur.take<float>(BT);
    int* sFlag = cur.take<int>(4);
    // one stage of the V loop's tiles, carved from its first byte
    struct Stage {
        TT dO, V, H, Dh;
        __device__ __forceinline__ explicit Stage(unsigned char* base) {
            SmemCursor c{base};
            c.into(dO, BT * LDV);
            c.into(V, BT * LDV);
            c.into(H, KS * LDV);
            c.into(Dh, KS * LDV);
        }
    };
    // R1 at a compile-time offset (every tile address a constant from smem, nothing held in registers): the largest
    // of its three uses
    constexpr int TILE_PARTS = OperandSplit<TT>::value ? 2 : 1;
    constexpr int STAGE_BYTES = TILE_PARTS * (2 * r16_bytes(2 * BT * LDV) + 2 * r16_bytes(2 * KS * LDV));
    constexpr int SCORE_BYTES = 2 * r16_bytes(2 * BT * LDM) + 2 * r16_bytes(2 * BT * LDK);
    constexpr int TERM_BYTES = 2 * r16_bytes(4 * BT * LDF);
    constexpr int R1_BYTES = cmax(STAGE_BYTES, cmax(SCORE_BYTES, TERM_BYTES));
    unsigned char* const stage_a = cur.p;
    unsigned char* const r1 = stage_a + STAGE_BYTES;  // stage B, then the epilogue's tiles
    SmemCursor ca{r1}, cf{r1};
    const Split<E> sA = ca.take_split<E>(BT * LDM);
    const Split<E> sS = ca.take_split<E>(BT * LDK);
    float* fG = cf.take<float>(BT * LDF);
    float* fK = cf.take<float>(BT * LDF);
    cur.p = r1 + R1_BYTES;
    T* sQ = cur.take<T>(BT * LDQ);
    T* sK = cur.take<T>(BT * LDQ);

    const int nv = (V + BVB - 1) / BVB;
    // step s of an item runs on stage B where nv - 1 - s is even (the last step always), else on stage A; with an even
    // step count the first step is on stage A, which the previous item's epilogue leaves alone
    const bool ahead = (nv & 1) == 0;
    const auto stage = [&](int s) { return Stage(((nv - 1 - s) & 1) ? stage_a : r1); };
    const int my_items = (int)blockIdx.x < NITEMS ? (NITEMS - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
    const i64 rstride = (i64)H * K;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hkey = threadIdx.x >> 2, hpart = threadIdx.x & 3;  // four threads per key sum h dh

    struct Item {
        int c, h, L, k0, kc;
        i64 bos, qk0, hoff;  // qk0: (row 0, key k0) of [BT_, H, K]
    };
    const auto item_chunk = [&](int it) { return ((int)blockIdx.x + it * (int)gridDim.x) / NKS / H; };
    // item it, whose chunk starts at token bos and has L rows (the chunk table's entries, loaded one item ahead so
    // that no load of the item waits on them)
    const auto item = [&](int it, i64 bos, int L) {
        const int x = (int)blockIdx.x + it * (int)gridDim.x, ks = x % NKS, ch = x / NKS;
        Item m;
        m.h = ch % H;
        m.c = ch / H;
        m.bos = bos;
        m.L = L;
        m.k0 = ks * KS;
        m.kc = min(KS, K - m.k0);
        m.qk0 = (m.bos * H + m.h) * K + m.k0;
        m.hoff = ((i64)m.c * H + m.h) * K * V + (i64)m.k0 * V;
        return m;
    };
    // step s of item m into its stage (no commit)
    const auto load_step = [&](const Item& m, int s) {
        const int v0 = s * BVB, vc = min(BVB, V - v0);
        const i64 row = (m.bos * H + m.h) * V + v0;
        const Stage st = stage(s);
        load_tile(st.dO, LDV, dout + row, (i64)H * V, m.L, vc, BT, BVB);
        load_tile(st.V, LDV, v + row, (i64)H * V, m.L, vc, BT, BVB);
        load_tile(st.H, LDV, hbuf + m.hoff + v0, (i64)V, m.kc, vc, KS, BVB);
        load_tile(st.Dh, LDV, dhbuf + m.hoff + v0, (i64)V, m.kc, vc, KS, BVB);
    };

    i64 next_bos = 0;
    int next_len = 0;
    Item m;
    if (my_items > 0) {
        const int c0 = item_chunk(0);
        m = item(0, chunk_bos[c0], chunk_len[c0]);
    }
    bool loaded = false;  // the item's first step is in flight already (its own cp.async group)
#pragma unroll 1
    for (int it = 0; it < my_items; ++it) {
        // the item's gates, q and k (and its first step unless in flight): one cp.async group
        load_tile(sG, LDF, g + m.qk0, rstride, m.L, m.kc, BT, KS);
        load_tile(sQ, LDQ, q + m.qk0, rstride, m.L, m.kc, BT, KS);
        load_tile(sK, LDQ, k + m.qk0, rstride, m.L, m.kc, BT, KS);
        if (!loaded) load_step(m, 0);
        cp_async_commit();
        // read during the V loop, used after it: the item's row code, the next item's chunk table entries
        const int code = Rc[m.bos * H + m.h];
        if (it + 1 < my_items) {
            next_bos = chunk_bos[item_chunk(it + 1)];
            next_len = chunk_len[item_chunk(it + 1)];
        }

        AccQ Dq, Dx;
        AccA dA;
        Dq.fill(0.f);
        Dx.fill(0.f);
        dA.fill(0.f);
        float hdh = 0.f;  // this thread's part of hdh of key hkey: value columns 2 hpart + 8 i (and the next)
#pragma unroll 1
        for (int s = 0; s < nv; ++s) {
            // the next step's loads in flight while this one computes (into the stage step s - 1 read, released by
            // its closing barrier); a first step loaded ahead waits for itself only (the gates, q and k, issued
            // after it, are needed by the epilogue)
            if (s + 1 < nv) {
                load_step(m, s + 1);
                cp_async_commit();
                if (s == 0 && loaded) cp_async_wait<2>();
                else cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const Stage st = stage(s);
#pragma unroll
            for (int col = 2 * hpart; col < BVB; col += 8) {
                const int e = hkey * LDV + col;
                const float2 x = tile_get_pair(st.H, e), y = tile_get_pair(st.Dh, e);
                hdh += x.x * y.x + x.y * y.y;
            }
            gemm<E, MK, NK, BT, KS, BVB, NW, U>(Dq, st.dO, LDV, st.H, LDV);
            gemm<E, MK, NK, BT, KS, BVB, NW, U>(Dx, st.V, LDV, st.Dh, LDV);
            gemm<E, MK, NK, BT, BT, BVB, NW, U>(dA, st.dO, LDV, st.V, LDV);
            __syncthreads();  // this stage is read: it may be loaded again, and the last step's is R1 from here
        }
        // the next item's first step during this item's epilogue, where it runs on stage A
        const Item cm = m;
        const int live = min(code_live_rows(code), cm.L), L = cm.L;
        const bool more = it + 1 < my_items;
        if (more) m = item(it + 1, next_bos, next_len);
        loaded = ahead && more;
        if (loaded) {
            load_step(m, 0);
            cp_async_commit();
        }

        // ---- the epilogue: the scores (masked, scaled), hdh, G and R ----
        gla_dqk::store_scores<E>(dA, sA, LDM, sDa, live, scale);
        hdh = lane_group_sum<1, 4>(hdh);
        if (hpart == 0) sHdh[hkey] = hdh;
        // the thread of key d (d < kc) reads Dk[d] and writes dg[d]
        const float dlast = (int)threadIdx.x < cm.kc ? Dk[((i64)cm.c * H + cm.h) * K + cm.k0 + threadIdx.x] : 0.f;
        __syncthreads();
        chunk_local_cumsum_log2(sG, sR, LDF, KS, live, BT);
        diag_blocks_elementwise<BT, E>(sG, sR, LDF, KS, live, sFlag);  // barriers around
        // the inter-chunk parts, then the intra-chunk sums without their diagonal terms (gla/chunk_bwd_intra.cuh)
        gla_dqk::dq_chunk<E>(Dq, sA, LDM, sK, LDQ, sG, sR, LDF, sS, LDK, sFlag, live, scale);
        AccQ Di;
        Di.fill(0.f);
        gla_dqk::dk_chunk<E>(Dx, Di, sA, LDM, sQ, LDQ, sG, sR, LDF, sS, LDK, sFlag, live);
        __syncthreads();  // the scores and qF read by every warp: R1 takes dG and k dx

        // dq, dk (with the diagonal terms dA_rr k_r, dA_rr q_r); dG_r and k_r dx_r (0 past live) into fG, fK
        const bool paired = (K & 1) == 0;
#pragma unroll
        for (int jt = 0; jt < NT; ++jt)
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const int r = AccQ::row(warp, lane, 0, e), d = AccQ::col(warp, lane, jt, e);
                const bool in = r < live;
                const float a = sDa[r];
                const float2 qv = load_pair(sQ, r * LDQ + d), kv = load_pair(sK, r * LDQ + d);
                const float qx[2] = {qv.x, qv.y}, kx[2] = {kv.x, kv.y};
                float oq[2], ok[2], og[2], ox[2];
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    const float xq = Dq.v[0][jt][e + x], xi = Di.v[0][jt][e + x], xx = Dx.v[0][jt][e + x];
                    oq[x] = in ? xq + a * kx[x] : dead_value();
                    ok[x] = in ? xx + xi + a * qx[x] : dead_value();
                    og[x] = in ? qx[x] * xq - kx[x] * xi : 0.f;
                    ox[x] = in ? kx[x] * xx : 0.f;
                }
                store_pair(fG, r * LDF + d, og[0], og[1]);
                store_pair(fK, r * LDF + d, ox[0], ox[1]);
                if (r < L) {
                    const i64 o = cm.qk0 + r * rstride + d;
                    put_row_pair(dq, o, d, cm.kc, paired, oq[0], oq[1]);
                    put_row_pair(dk, o, d, cm.kc, paired, ok[0], ok[1]);
                }
            }
        __syncthreads();

        // dg, one thread per key, rows in a fixed order: the exclusive prefix of k dx, then the reverse cumsum of dG
        // within each run of rows between resets
        if ((int)threadIdx.x < cm.kc) {
            const int d = threadIdx.x;
            const float carried = dlast == 0.f ? 0.f : dlast * sHdh[d];  // 2^G_last spans every step
            float* out = dg + cm.qk0 + d;
            gla_dqk::dg_reverse_scan(0.f, carried, fG + d, fK + d, sR + d, LDF, live, out, rstride);
            for (int s = live; s < L; ++s) out[s * rstride] = dead_value();
        }
        __syncthreads();  // the tiles are read: the next item loads G, q, k and (maybe) its first step into them
    }
}
