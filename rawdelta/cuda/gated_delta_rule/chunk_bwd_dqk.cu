// Gated delta rule, chunked mode, the last stage of the backward: per chunk and key slice, dq, dk and the partial
// log-gate and beta gradients (mma.sync, and wgmma on Hopper), and their sums per token. Layouts:
// gated_delta_rule/chunk.cuh.
#include "common/wgmma.cuh"
#include "gated_delta_rule/chunk.cuh"

using namespace rawdelta;

// ---------------------------------------------------------------------------------------------
// One chunk's partial log-gate and beta gradients (over one key slice) from the gradients w.r.t. the decay
// exponents: C [BT x BT] (row stride ldc; rewritten in place) of the pair factors 2^(G_i - G_j), the row sums
// rowQ (q . dq_inter, decay 2^G_i; rewritten in place), rowK (k . dk_inter, 2^(G_last - G_j)), rowY (k . Yh,
// 2^G_i), rowB (sum_j dL_ij (k_i . k_j) E_ij), and this thread's part of <h, dh> (2^G_last). Blocks of NT
// threads, sRed NT / 32 floats. Writes part_dG and part_db at e0 + r HV for the chunk's rows r < L.
template <int BT, int NT>
__device__ __forceinline__ void chunk_gate_grads(float* sC, int ldc, const float* rowB, float* rowQ,
                                                 const float* rowK, const float* rowY, const ChunkRows& rows,
                                                 float hdh, float* sRed, int L,
                                                 float* __restrict__ part_dG, float* __restrict__ part_db, i64 e0,
                                                 int HV) {
    hdh = warp_sum(hdh);
    if ((threadIdx.x & 31) == 0) sRed[threadIdx.x >> 5] = hdh;
    __syncthreads();
    float carried = 0.f;  // decay 2^G_last of the carried state spans every step
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) carried += sRed[w];
    carried = rows.R[BT - 1] > 0 ? 0.f : carried * exp2f(rows.G[BT - 1]);
    // rowQ becomes the whole per-row term of the spans s <= i, once per row instead of once per thread
    if ((int)threadIdx.x < BT) rowQ[threadIdx.x] -= rows.B[threadIdx.x] * rows.start(threadIdx.x) * rowY[threadIdx.x];
    // Gradient of each step's log-gate: the sum of the decay-exponent gradients of every factor spanning it
    // (summing spans directly, instead of a reverse cumsum of per-row terms, avoids cancelling large terms).
    // The pair factors' spans are rectangles of C: row-wise exclusive prefixes first, then column sums.
    // Q threads share each row (and then each step), W entries each, combined by lane shuffles.
    constexpr int Q = NT / BT, W = BT / Q;
    const int part = threadIdx.x % Q, seg0 = part * W, rs = threadIdx.x / Q;
    {
        float* crow = sC + rs * ldc;
        float loc = 0.f;
#pragma unroll
        for (int j = seg0; j < seg0 + W; ++j) loc += crow[j];
        float incl = loc;
#pragma unroll
        for (int o = 1; o < Q; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, incl, o);
            if (part >= o) incl += y;
        }
        float run = incl - loc;
#pragma unroll
        for (int j = seg0; j < seg0 + W; ++j) {
            const float x = crow[j];
            crow[j] = run;
            run += x;
        }
    }
    __syncthreads();
    float acc = 0.f;
#pragma unroll
    for (int x = seg0; x < seg0 + W; ++x) {
        if (x >= rs && x < L) acc += rowQ[x] + sC[x * ldc + rs];
        if (x < rs) acc += rowK[x];
    }
    acc = lane_group_sum<1, Q>(acc);
    if (part == 0 && rs < L) {
        // a reset's own gate decays nothing that is kept: its gradient is 0, whatever the spans over it hold
        part_dG[e0 + (i64)rs * HV] = rows.reset_at(rs) ? 0.f : carried + acc;
        part_db[e0 + (i64)rs * HV] = -rows.start(rs) * rowY[rs] + rowB[rs];
    }
}

// ---------------------------------------------------------------------------------------------
// Per (chunk, value head, slice of KS keys): dq, dk (per value head, float32) and the partial row
// sums of the gate and beta gradients over this key slice. Loops over V in blocks of BVB:
//   Dq = do h^T, Yh = y h^T, Dk = delta dh^T, D = do delta^T, D2 = y delta^T
// then (M the causal decay mask, DM = scale * D * M, dL = -D2 strictly lower, E_ij = 2^(G_i - G_j)):
//   dq = scale 2^G Dq + DM k
//   dk = 2^(G_last - G) Dk + DM^T q - beta 2^G Yh + dK k + dK^T k,   dK_ij = dL_ij beta_i E_ij
//   dg_s = sum over every decay factor spanning step s of the gradient w.r.t. its exponent:
//          2^G_i (q_i . dq_inter_i, -beta_i k_i . Yh_i) for s <= i; 2^(G_last - G_j) (k_j . dk_inter_j) for
//          j < s; 2^G_last <h, dh> always; 2^(G_i - G_j) (DM_ij q_i . k_j + dL_ij L_ij) for j < s <= i
//   dbeta_i = -2^G_i k.Yh + sum_j dL_ij (k_i . k_j) E_ij     (+ y . v from the state pass)
template <typename T, typename E, int BT, int KS, int BVB>
__global__ void __launch_bounds__(256, 2) gdn_chunk_bwd_dqk_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ dout, const float* __restrict__ Gc,
    const float* __restrict__ Bc, const int* __restrict__ Rc, const float* __restrict__ Rq,
    const float* __restrict__ Rk, const T* __restrict__ hbuf, const T* __restrict__ dhbuf,
    const T* __restrict__ vnew, const T* __restrict__ ybuf, const i64* __restrict__ chunk_bos,
    const int* __restrict__ chunk_len, float* __restrict__ dq_hv, float* __restrict__ dk_hv,
    float* __restrict__ part_dG, float* __restrict__ part_db, int H, int HV, int K, int V, int NKS, i64 BT_,
    float scale, int flags) {
    using TT = typename InputTile<T, E>::type;
    constexpr int NW = 8, LDK = KS + TILE_PAD, LDV = BVB + TILE_PAD, LDM = BT + TILE_PAD, LDC = BT + 4;
    using AccQ = Acc<BT, KS, NW>;
    using AccP = Acc<BT, BT, NW>;
    constexpr int U = 1;  // k steps unrolled per product: up to seven accumulators are live, more would spill
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    TT sQ, sK, sDo, sY, sDel, sH, sDh;
    cur.into(sQ, BT * LDK);
    cur.into(sK, BT * LDK);
    unsigned char* vloop_tiles = cur.p;  // sDo .. sDh: dead after the V loop, then reused for C
    cur.into(sDo, BT * LDV);
    cur.into(sY, BT * LDV);
    cur.into(sDel, BT * LDV);
    cur.into(sH, KS * LDV);
    cur.into(sDh, KS * LDV);
    const Split<E> sDM = cur.take_split<E>(BT * LDM), sDK = cur.take_split<E>(BT * LDM);
    ChunkRows rows;
    rows.carve(cur, BT);
    const float* sB = rows.B;
    float* sScratch = cur.take<float>(NW * BT);  // max(WN, WM) * BT floats
    float* sRow = cur.take<float>(4 * BT);       // 4 row vectors of BT
    float* sRed = cur.take<float>(NW);           // one float per warp

    const int ks = blockIdx.x % NKS, ch = blockIdx.x / NKS, hv = ch % HV, c = ch / HV, h = hv / (HV / H);
    const i64 bos = chunk_bos[c];
    const int L = chunk_len[c], k0 = ks * KS, kc = min(KS, K - k0);
    const i64 hoff = ((i64)c * HV + hv) * K * V + (i64)k0 * V;

    load_tile(sQ, LDK, q + (bos * H + h) * K + k0, (i64)H * K, L, kc, BT, KS);
    load_tile(sK, LDK, k + (bos * H + h) * K + k0, (i64)H * K, L, kc, BT, KS);
    rows.load(RowInputs{Gc, Bc, Rc, Rq, Rk}, bos, L, BT, HV, hv, PassOptions{flags});
    cp_async_wait_all();
    __syncthreads();
    if (flags & F_L2) {  // q and k are operands of many products below: normalise the tiles once
        for (int idx = 2 * threadIdx.x; idx < BT * KS; idx += 2 * blockDim.x) {
            const int r = idx / KS, d = idx % KS;
            const float2 x = tile_get_pair(sQ, r * LDK + d), y = tile_get_pair(sK, r * LDK + d);
            tile_put_pair(sQ, r * LDK + d, x.x * rows.rq[r], x.y * rows.rq[r]);
            tile_put_pair(sK, r * LDK + d, y.x * rows.rk[r], y.y * rows.rk[r]);
        }
    }

    AccQ Dq, Yh, Dk;
    AccP D, D2;
    Dq.fill(0.f);
    Yh.fill(0.f);
    Dk.fill(0.f);
    D.fill(0.f);
    D2.fill(0.f);
    float hdh = 0.f;
#pragma unroll 1
    for (int v0 = 0; v0 < V; v0 += BVB) {
        const int vc = min(BVB, V - v0);
        const i64 row = (bos * HV + hv) * V + v0;
        load_tile(sDo, LDV, dout + row, (i64)HV * V, L, vc, BT, BVB);
        load_tile(sY, LDV, ybuf + row, (i64)HV * V, L, vc, BT, BVB);
        load_tile(sDel, LDV, vnew + row, (i64)HV * V, L, vc, BT, BVB);
        load_tile(sH, LDV, hbuf + hoff + v0, (i64)V, kc, vc, KS, BVB);
        load_tile(sDh, LDV, dhbuf + hoff + v0, (i64)V, kc, vc, KS, BVB);
        cp_async_wait_all();
        __syncthreads();
        for (int idx = 2 * threadIdx.x; idx < KS * BVB; idx += 2 * blockDim.x) {
            const int e = (idx / BVB) * LDV + idx % BVB;
            const float2 a = tile_get_pair(sH, e), b = tile_get_pair(sDh, e);
            hdh += a.x * b.x + a.y * b.y;
        }
        gemm<E, MK, NK, BT, KS, BVB, NW, U>(Dq, sDo, LDV, sH, LDV);
        gemm<E, MK, NK, BT, KS, BVB, NW, U>(Yh, sY, LDV, sH, LDV);
        gemm<E, MK, NK, BT, KS, BVB, NW, U>(Dk, sDel, LDV, sDh, LDV);
        gemm<E, MK, NK, BT, BT, BVB, NW, U>(D, sDo, LDV, sDel, LDV);
        gemm<E, MK, NK, BT, BT, BVB, NW, U>(D2, sY, LDV, sDel, LDV);
        __syncthreads();
    }

    // Scores: DM (output path) and dK (through L).
    // D becomes DM, D2 becomes dL_ij E_ij: each decay 2^(G_i - G_j) is evaluated once per element (select,
    // never multiply: it overflows above the diagonal).
    const int live = rows.live_rows();
    D.apply_pairs([&](int i, int j, float& x0, float& x1) {
        const bool in = i < live;
        x0 = (in && j <= i) ? x0 * rows.pair(i, j) * scale : 0.f;
        x1 = (in && j + 1 <= i) ? x1 * rows.pair(i, j + 1) * scale : 0.f;
        tile_put_pair(sDM, i * LDM + j, x0, x1);
    });
    D2.apply_pairs([&](int i, int j, float& x0, float& x1) {
        const bool in = i < live;
        x0 = (in && j < i) ? -x0 * rows.pair(i, j) : 0.f;
        x1 = (in && j + 1 < i) ? -x1 * rows.pair(i, j + 1) : 0.f;
        tile_put_pair(sDK, i * LDM + j, x0 * sB[i], x1 * sB[i]);
    });
    // KK becomes W_ij = dL_ij (k_i . k_j) E_ij (this key slice's part); beta_i W_ij = dL_ij L_ij. The score
    // products come after the transforms above so that fewer accumulators are live at once.
    AccP KK;
    KK.fill(0.f);
    gemm<E, MK, NK, BT, BT, KS, NW, U>(KK, sK, LDK, sK, LDK);
    KK.zip(D2, [&](int, int, float& x, float& dle) { x *= dle; });
    // C_ij: the gradient w.r.t. the exponent of the decay 2^(G_i - G_j), which spans the steps j < s <= i:
    // the intra-chunk output's DM_ij (q_i . k_j) plus the WY inverse's dL_ij L_ij.
    AccP C;
    C.fill(0.f);
    gemm<E, MK, NK, BT, BT, KS, NW, U>(C, sQ, LDK, sK, LDK);
    C.zip(D, [&](int, int, float& x, float& dm) { x *= dm; });
    C.zip(KK, [&](int i, int, float& x, float& w) { x += sB[i] * w; });
    float* sC = reinterpret_cast<float*>(vloop_tiles);
    C.store(sC, LDC);
    float* rowB = sRow;            // sum_j dL_ij (k_i . k_j) E_ij
    float* rowQ = sRow + BT;       // q . dq_inter: decay 2^G_i, spans s <= i
    float* rowK = sRow + 2 * BT;   // k . dk_inter: decay 2^(G_last - G_j), spans j < s
    float* rowY = sRow + 3 * BT;   // k . Yh: the WY factor's 2^G_i, spans s <= i
    acc_row_sums(KK, [&](int, int, float x) { return x; }, sScratch, rowB);

    Dq.apply([&](int i, int, float& x) { x *= rows.start(i) * scale; });
    acc_row_sums(Dq, [&](int i, int j, float x) { return x * tile_get(sQ, i * LDK + j); }, sScratch, rowQ);
    gemm<E, MK, KN, BT, KS, BT, NW, U>(Dq, sDM, LDM, sK, LDK);
    Dk.apply([&](int i, int, float& x) { x *= rows.to_end(i, BT - 1); });
    acc_row_sums(Dk, [&](int i, int j, float x) { return x * tile_get(sK, i * LDK + j); }, sScratch, rowK);
    acc_row_sums(Yh, [&](int i, int j, float x) { return x * tile_get(sK, i * LDK + j); }, sScratch, rowY);
    gemm<E, KM, KN, BT, KS, BT, NW, U>(Dk, sDM, LDM, sQ, LDK);
    Dk.zip(Yh, [&](int i, int, float& x, float& y) { x -= sB[i] * rows.start(i) * y; });
    gemm<E, MK, KN, BT, KS, BT, NW, U>(Dk, sDK, LDM, sK, LDK);
    gemm<E, KM, KN, BT, KS, BT, NW, U>(Dk, sDK, LDM, sK, LDK);

    const i64 qrow = (bos * HV + hv) * K + k0;
    const bool paired = (K & 1) == 0;
    Dq.apply_pairs([&](int i, int j, float& x0, float& x1) {
        if (i < L) put_row_pair(dq_hv, qrow + (i64)i * HV * K + j, j, kc, paired, x0, x1);
    });
    Dk.apply_pairs([&](int i, int j, float& x0, float& x1) {
        if (i < L) put_row_pair(dk_hv, qrow + (i64)i * HV * K + j, j, kc, paired, x0, x1);
    });

    chunk_gate_grads<BT, NW * 32>(sC, LDC, rowB, rowQ, rowK, rowY, rows, hdh, sRed, L, part_dG, part_db,
                                  ((i64)ks * BT_ + bos) * HV + hv, HV);
}

// ---------------------------------------------------------------------------------------------
// The dq/dk kernel on Hopper warpgroups (wgmma, sm_90a), for 16-bit inputs and chunks of 64: the math of
// gdn_chunk_bwd_dqk_kernel per (chunk, value head, slice of KS = 2 KSW keys). Persistent: each block walks
// the items blockIdx.x, blockIdx.x + gridDim.x, ... as a stream of V steps (BVB columns of do, y, delta, h,
// dh; an item's first step also brings its q, k and row scalars), loading step s + 1 while step s computes,
// so the next item's loads overlap this item's epilogue. Warpgroup w owns the keys [w KSW, (w + 1) KSW) of
// Dq, Yh, Dk and the score columns [32 w, 32 w + 32) of D, D2, KK, C. The q / k row factors (inverse L2 norms)
// enter as row and column factors of the score tiles instead of normalising q and k. With FUSE (HV == H, one
// key slice) it finishes dq and dk itself, through the L2 norm's backward, in q's dtype; otherwise it writes
// the float32 per-value-head gradients like gdn_chunk_bwd_dqk_kernel.
template <int KS>
struct DqkStages {  // byte offsets: an item's q, k and raw rows; one V step's tiles
    static constexpr int BT = 64, BVB = 64, Q = 0, K = BT * KS * 2, RAW = 2 * BT * KS * 2,
                         QK_BYTES = sw128_aligned(RAW + ChunkRows::RAW * BT * 4),
                         DO = 0, Y = DO + BT * BVB * 2, DEL = Y + BT * BVB * 2, H = DEL + BT * BVB * 2,
                         DH = H + KS * BVB * 2, V_BYTES = DH + KS * BVB * 2;
    static_assert(V_BYTES >= 4 * BT * BT * 2, "a consumed V step holds the four score tiles");
};

template <typename T, int KSW, bool FUSE>
__global__ void __launch_bounds__(256, 1) gdn_chunk_bwd_dqk_wg_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ dout, const float* __restrict__ Gc,
    const float* __restrict__ Bc, const int* __restrict__ Rc, const float* __restrict__ Rq,
    const float* __restrict__ Rk, const T* __restrict__ hbuf, const T* __restrict__ dhbuf,
    const T* __restrict__ vnew, const T* __restrict__ ybuf,
    const i64* __restrict__ chunk_bos, const int* __restrict__ chunk_len, float* __restrict__ dq_hv,
    float* __restrict__ dk_hv, T* __restrict__ dq, T* __restrict__ dk, float* __restrict__ part_dG,
    float* __restrict__ part_db, int H, int HV, int K, int V, int NKS, int NITEMS, i64 BT_, float scale,
    int flags) {
    constexpr int BT = 64, BVB = 64, KS = 2 * KSW, LDC = BT + 4;
    using St = DqkStages<KS>;
    extern __shared__ __align__(128) unsigned char smem[];
    SmemCursor cur{smem};
    unsigned char* qk_slots = cur.take<unsigned char>(2 * St::QK_BYTES);
    unsigned char* v_slots = cur.take<unsigned char>(2 * St::V_BYTES);
    float* sC = cur.take<float>(BT * LDC);
    ChunkRows rows;
    rows.carve(cur, BT);
    float* sPart = cur.take<float>(2 * 6 * BT);  // per warpgroup: rowB, rowQ, rowK, rowY, q . dq, k . dk
    float* sRow = cur.take<float>(6 * BT);       // the two warpgroups' sums
    float* sRed = cur.take<float>(8);

    const int wg = threadIdx.x >> 7, kw = wg * KSW, sw = 32 * wg;
    const int nvs = (V + BVB - 1) / BVB;
    const int my_items = blockIdx.x < NITEMS ? (NITEMS - 1 - blockIdx.x) / gridDim.x + 1 : 0, nsteps = my_items * nvs;
    struct Item { int c, hv, h, ks, L, k0, kc; i64 bos; };
    __shared__ Item sItems[2];  // the items of the two qk slots, decoded once (integer divisions)
    const auto item_chunk = [&](int it) { return (blockIdx.x + it * gridDim.x) / NKS / HV; };
    // The chunk table entries of the next item to issue, loaded one item ahead so that issuing never waits on them
    i64 next_bos = 0;
    int next_len = 0;
    if (my_items > 0) {
        next_bos = chunk_bos[item_chunk(0)];
        next_len = chunk_len[item_chunk(0)];
    }
    const auto issue = [&](int it, int vb) {  // step (item it, V block vb) into its slots, as one cp.async group
        const int v0 = vb * BVB, vc = min(BVB, V - v0);
        Item m;
        if (vb == 0) {
            const int x = blockIdx.x + it * gridDim.x, ks = x % NKS, ch = x / NKS, hv = ch % HV, c = ch / HV;
            const int k0 = ks * KS;
            m = Item{c, hv, hv / (HV / H), ks, next_len, k0, min(KS, K - k0), next_bos};
            if (threadIdx.x == 0) sItems[it & 1] = m;  // read after the step's barrier
            if (it + 1 < my_items) {
                next_bos = chunk_bos[item_chunk(it + 1)];
                next_len = chunk_len[item_chunk(it + 1)];
            }
            unsigned char* st = qk_slots + (it & 1) * St::QK_BYTES;
            const i64 qk = (m.bos * H + m.h) * K + m.k0;
            load_blocked<KS, BT, 256>(reinterpret_cast<T*>(st + St::Q), q + qk, (i64)H * K, m.L, m.kc);
            load_blocked<KS, BT, 256>(reinterpret_cast<T*>(st + St::K), k + qk, (i64)H * K, m.L, m.kc);
            ChunkRows::fetch_raw(reinterpret_cast<float*>(st + St::RAW), RowInputs{Gc, Bc, Rc, Rq, Rk}, m.bos, m.L,
                                 BT, HV, m.hv, PassOptions{flags});
        } else {
            m = sItems[it & 1];
        }
        unsigned char* sv = v_slots + (((it * nvs + vb) & 1) * St::V_BYTES);
        const i64 row = (m.bos * HV + m.hv) * V + v0, hoff = ((i64)m.c * HV + m.hv) * K * V + (i64)m.k0 * V + v0;
        load_blocked<BVB, BT, 256>(reinterpret_cast<T*>(sv + St::DO), dout + row, (i64)HV * V, m.L, vc);
        load_blocked<BVB, BT, 256>(reinterpret_cast<T*>(sv + St::Y), ybuf + row, (i64)HV * V, m.L, vc);
        load_blocked<BVB, BT, 256>(reinterpret_cast<T*>(sv + St::DEL), vnew + row, (i64)HV * V, m.L, vc);
        load_blocked<BVB, KS, 256>(reinterpret_cast<T*>(sv + St::H), hbuf + hoff, (i64)V, m.kc, vc);
        load_blocked<BVB, KS, 256>(reinterpret_cast<T*>(sv + St::DH), dhbuf + hoff, (i64)V, m.kc, vc);
        cp_async_commit();
    };

    WgAcc<1, KSW> Dq, Yh, Dk;
    WgAcc<1, 32> D, D2;
    float hdh = 0.f;
    if (nsteps > 0) issue(0, 0);
    __syncthreads();  // sItems[0], for step 1's issue
    // step s is V block vb of item it; (nit, nvb) the step after it
#pragma unroll 1
    for (int s = 0, it = 0, vb = 0; s < nsteps; ++s, it += (vb + 1 == nvs), vb = (vb + 1 == nvs) ? 0 : vb + 1) {
        const int nvb = (vb + 1 == nvs) ? 0 : vb + 1, nit = it + (nvb == 0);
        if (s + 1 < nsteps) {
            issue(nit, nvb);  // into the slots step s - 1 read, released by that step's closing barrier
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_proxy_async();
        __syncthreads();
        const Item m = sItems[it & 1];
        unsigned char* sq = qk_slots + (it & 1) * St::QK_BYTES;
        unsigned char* sv = v_slots + (s & 1) * St::V_BYTES;
        const T* sQ = reinterpret_cast<const T*>(sq + St::Q);
        const T* sK = reinterpret_cast<const T*>(sq + St::K);
        const unsigned aQ = smem_addr(sq + St::Q), aK = smem_addr(sq + St::K), aDo = smem_addr(sv + St::DO),
                       aY = smem_addr(sv + St::Y), aDel = smem_addr(sv + St::DEL), aH = smem_addr(sv + St::H),
                       aDh = smem_addr(sv + St::DH);
        // Dq = do h^T, Yh = y h^T, Dk = delta dh^T (this warpgroup's keys); D = do delta^T, D2 = y delta^T
        // (its score columns), over this step's value columns
        const bool acc = vb > 0;
        wg_fence();
        Dq.template mma<T, false, false, BVB>(a_kmajor(aDo, BVB, 0), b_kmajor(aH, BVB, kw), acc);
        Yh.template mma<T, false, false, BVB>(a_kmajor(aY, BVB, 0), b_kmajor(aH, BVB, kw), acc);
        Dk.template mma<T, false, false, BVB>(a_kmajor(aDel, BVB, 0), b_kmajor(aDh, BVB, kw), acc);
        D.template mma<T, false, false, BVB>(a_kmajor(aDo, BVB, 0), b_kmajor(aDel, BVB, sw), acc);
        D2.template mma<T, false, false, BVB>(a_kmajor(aY, BVB, 0), b_kmajor(aDel, BVB, sw), acc);
        wg_commit();
        if (vb == 0) {
            rows.derive(reinterpret_cast<const float*>(sq + St::RAW), m.L, BT, PassOptions{flags});
            hdh = 0.f;
        }
        {  // <h, dh> over this step (both tiles blocked alike, zeros outside), 16 bytes of each at a time
            const uint4* sH = reinterpret_cast<const uint4*>(sv + St::H);
            const uint4* sDh = reinterpret_cast<const uint4*>(sv + St::DH);
#pragma unroll
            for (int idx = threadIdx.x; idx < KS * BVB / 8; idx += 256) hdh += dot8<T>(sH[idx], sDh[idx]);
        }
        wg_wait<0>();
        if (vb + 1 < nvs) {
            __syncthreads();
            continue;
        }

        // ---- the item's epilogue; this step's V slot is dead from here and holds the score tiles ----
        __syncthreads();
        const float* sB = rows.B;
        const int live = rows.live_rows();
        T* sDMr = reinterpret_cast<T*>(sv);  // DM_ij rk_j      (dq += DMr k)
        T* sDMq = sDMr + BT * BT;             // DM_ij rq_i      (dk += DMq^T q)
        T* sdKc = sDMq + BT * BT;             // dK_ij rk_j      (dk += dKc k)
        T* sdKr = sdKc + BT * BT;             // dK_ij rk_i      (dk += dKr^T k)
        // D becomes DM = scale D M, D2 becomes dL_ij E_ij (each decay evaluated once; select, never multiply:
        // it overflows above the diagonal); dK_ij = beta_i dL_ij E_ij
        D.zip_pairs(D2, [&](int i, int jj, float& d0, float& d1, float& e0, float& e1) {
            const int j = sw + jj;
            const bool in = i < live;
            const float x0 = in && j <= i ? rows.pair(i, j) : 0.f;
            const float x1 = in && j + 1 <= i ? rows.pair(i, j + 1) : 0.f;
            d0 = x0 * d0 * scale;
            d1 = x1 * d1 * scale;
            e0 = j < i ? -x0 * e0 : 0.f;
            e1 = j + 1 < i ? -x1 * e1 : 0.f;
            const int e = blk(i, j, BT);
            const float rqi = rows.rq[i], rki = rows.rk[i], rk0 = rows.rk[j], rk1 = rows.rk[j + 1], b = sB[i];
            store_pair(sDMr, e, d0 * rk0, d1 * rk1);
            store_pair(sDMq, e, d0 * rqi, d1 * rqi);
            store_pair(sdKc, e, b * e0 * rk0, b * e1 * rk1);
            store_pair(sdKr, e, b * e0 * rki, b * e1 * rki);
        });
        fence_proxy_async();
        // KK = k k^T, C = q k^T over this slice's keys (this warpgroup's score columns)
        WgAcc<1, 32> KK, C;
        wg_fence();
        KK.template mma<T, false, false, KS>(a_kmajor(aK, KS, 0), b_kmajor(aK, KS, sw), false);
        C.template mma<T, false, false, KS>(a_kmajor(aQ, KS, 0), b_kmajor(aK, KS, sw), false);
        wg_commit();
        // meanwhile: the inter-chunk parts and their row sums (q . dq_inter, k . dk_inter, k . Yh)
        float* part = sPart + wg * 6 * BT;
        Dq.scale_rows([&](int i) { return rows.start(i) * scale; });
        Dk.scale_rows([&](int i) { return rows.to_end(i, BT - 1); });
        Dq.template row_dots<KS>(sQ, kw, [&](int i, float x) { part[BT + i] = x * rows.rq[i]; });
        Dk.template row_dots<KS>(sK, kw, [&](int i, float x) { part[2 * BT + i] = x * rows.rk[i]; });
        Yh.template row_dots<KS>(sK, kw, [&](int i, float x) { part[3 * BT + i] = x * rows.rk[i]; });
        Yh.scale_rows([&](int i) { return -sB[i] * rows.start(i); });
        Dk.zip_pairs(Yh, [&](int, int, float& x0, float& x1, float& y0, float& y1) {
            x0 += y0;
            x1 += y1;
        });
        wg_wait<0>();
        // KK becomes W_ij = dL_ij (k_i . k_j) E_ij (beta_i W_ij = dL_ij L_ij); C_ij = DM_ij (q_i . k_j) + beta_i W_ij:
        // the gradient w.r.t. the exponent of 2^(G_i - G_j)
        KK.zip_pairs(D2, [&](int i, int jj, float& x0, float& x1, float& e0, float& e1) {
            const float r = rows.rk[i];
            x0 *= r * rows.rk[sw + jj] * e0;
            x1 *= r * rows.rk[sw + jj + 1] * e1;
        });
        KK.row_sums([](int, int, float x) { return x; }, [&](int i, float x) { part[i] = x; });
        C.zip_pairs(D, [&](int i, int jj, float& x0, float& x1, float& d0, float& d1) {
            const float r = rows.rq[i];
            x0 *= r * rows.rk[sw + jj] * d0;
            x1 *= r * rows.rk[sw + jj + 1] * d1;
        });
        C.zip_pairs(KK, [&](int i, int jj, float& x0, float& x1, float& w0, float& w1) {
            x0 += sB[i] * w0;
            x1 += sB[i] * w1;
            *reinterpret_cast<float2*>(sC + i * LDC + sw + jj) = make_float2(x0, x1);
        });
        __syncthreads();  // the score tiles of both warpgroups
        wg_fence();
        Dq.template mma<T, false, true, BT>(a_kmajor(smem_addr(sDMr), BT, 0), b_mnmajor(aK, KS, kw), true);
        Dk.template mma<T, true, true, BT>(a_mnmajor(smem_addr(sDMq), BT), b_mnmajor(aQ, KS, kw), true);
        Dk.template mma<T, false, true, BT>(a_kmajor(smem_addr(sdKc), BT, 0), b_mnmajor(aK, KS, kw), true);
        Dk.template mma<T, true, true, BT>(a_mnmajor(smem_addr(sdKr), BT), b_mnmajor(aK, KS, kw), true);
        wg_commit();
        wg_wait<0>();
        const bool l2 = FUSE && (flags & F_L2);
        if (l2) {  // q . dq_n and k . dk_n over this warpgroup's keys, for the L2 norm's backward
            Dq.template row_dots<KS>(sQ, kw, [&](int i, float x) { part[4 * BT + i] = x; });
            Dk.template row_dots<KS>(sK, kw, [&](int i, float x) { part[5 * BT + i] = x; });
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < 6 * BT; idx += blockDim.x) sRow[idx] = sPart[idx] + sPart[6 * BT + idx];
        __syncthreads();
        const i64 qrow = (m.bos * H + m.h) * K + m.k0, hvrow = (m.bos * HV + m.hv) * K + m.k0;
        const bool paired = (K & 1) == 0;
        if (FUSE) {
            // dq = rq (dq_n - rq^2 (q . dq_n) q), likewise dk (the L2 norm's backward), else dq = dq_n
            Dq.apply_pairs([&](int i, int j, float& x0, float& x1) {
                const float r = rows.rq[i], f = l2 ? r * r * sRow[4 * BT + i] : 0.f, g = l2 ? r : 1.f;
                const float2 y = l2 ? load_pair(sQ, blk(i, kw + j, KS)) : make_float2(0.f, 0.f);
                if (i < m.L)
                    put_row_pair(dq, qrow + (i64)i * H * K + kw + j, kw + j, m.kc, paired, g * (x0 - f * y.x),
                                 g * (x1 - f * y.y));
            });
            Dk.apply_pairs([&](int i, int j, float& x0, float& x1) {
                const float r = rows.rk[i], f = l2 ? r * r * sRow[5 * BT + i] : 0.f, g = l2 ? r : 1.f;
                const float2 y = l2 ? load_pair(sK, blk(i, kw + j, KS)) : make_float2(0.f, 0.f);
                if (i < m.L)
                    put_row_pair(dk, qrow + (i64)i * H * K + kw + j, kw + j, m.kc, paired, g * (x0 - f * y.x),
                                 g * (x1 - f * y.y));
            });
        } else {
            Dq.apply_pairs([&](int i, int j, float& x0, float& x1) {
                if (i < m.L) put_row_pair(dq_hv, hvrow + (i64)i * HV * K + kw + j, kw + j, m.kc, paired, x0, x1);
            });
            Dk.apply_pairs([&](int i, int j, float& x0, float& x1) {
                if (i < m.L) put_row_pair(dk_hv, hvrow + (i64)i * HV * K + kw + j, kw + j, m.kc, paired, x0, x1);
            });
        }
        chunk_gate_grads<BT, 256>(sC, LDC, sRow, sRow + BT, sRow + 2 * BT, sRow + 3 * BT, rows, hdh, sRed, m.L,
                                  part_dG, part_db, ((i64)m.ks * BT_ + m.bos) * HV + m.hv, HV);
        __syncthreads();
    }
}

// Per (token, value head): sum the key-slice partials of the log-gate and beta gradients and the
// value-block partials y . v of the beta gradient, in a fixed order.
__global__ void gdn_chunk_bwd_gate_rows_kernel(const float* __restrict__ part_dG, const float* __restrict__ part_db,
                                               const float* __restrict__ part_yv, float* __restrict__ dg_tok,
                                               float* __restrict__ db_tok, i64 n, int NKS, int NVB) {
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    float dG = 0.f, db = 0.f;
    for (int s = 0; s < NKS; ++s) {
        dG += part_dG[s * n + e];
        db += part_db[s * n + e];
    }
    for (int s = 0; s < NVB; ++s) db += part_yv[s * n + e];
    dg_tok[e] = dG;
    db_tok[e] = db;
}
