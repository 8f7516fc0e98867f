// Gated delta rule, chunked mode, the first stage: the per-chunk factors every later stage takes (prepare), over the
// chunk table (common/chunk_table.cu). Layouts: gated_delta_rule/chunk.cuh.
#include "common/ready_flags.cuh"
#include "gated_delta_rule/chunk.cuh"

using namespace rawdelta;

// ---------------------------------------------------------------------------------------------
// Prepare: per (chunk, value head) the cumulative log2 gates, the effective beta, the row codes (reset counts and
// the first dead row: common/chunk_stages.cuh), A = (I + L)^-1 with L_ij = beta_i (k_i . k_j) 2^(G_i - G_j), i > j,
// and the intra-chunk scores P_ij = scale (q_i . k_j) 2^(G_i - G_j), j <= i (with the row factors; both over the
// live rows, with the decays across a reset 0; dead rows get beta 0), which every value block of the
// state passes needs: computed once here instead of once per value block. Blocks of NTHREADS (the host's
// launch size is the template argument). Alo is null for the Hopper state passes, which take the hi part only.
// Without AHEAD, block b takes item b: chunk b / HV (in the chunk table's order), value head b % HV, and the
// last four arguments are unused. With AHEAD the blocks are persistent and run ahead of a Hopper forward pass
// launched beside them (gdn_chunk_fwd_wg_kernel with AHEAD): they walk the items in the order that pass consumes
// them, chunk j of every sequence and value head before chunk j + 1 of any (N sequences, at most max_chunks
// chunks each), and publish each in ready[global chunk * HV + hv] (common/ready_flags.cuh).

template <typename T, typename E, int BT, int KP, int NTHREADS, bool AHEAD>
__global__ void __launch_bounds__(NTHREADS, AHEAD ? 5 : 0) gdn_chunk_prepare_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ g, const float* __restrict__ beta,
    const float* __restrict__ A_log, const float* __restrict__ dt_bias, const i64* __restrict__ chunk_bos,
    const int* __restrict__ chunk_len, float* __restrict__ Gc, float* __restrict__ Bc, int* __restrict__ Rc,
    float* __restrict__ Rq, float* __restrict__ Rk, E* __restrict__ Ahi, E* __restrict__ Alo, E* __restrict__ Phi,
    E* __restrict__ Plo,
    int H, int HV, int K, float scale, int flags, const int* __restrict__ seq_chunk0, int N, int max_chunks,
    int* __restrict__ ready) {
    using TT = typename InputTile<T, E>::type;
    constexpr int LDK = KP + TILE_PAD, LDA = BT + 8, LDX = BT / 2 + 4;  // LDA: L's pair stores free of bank conflicts
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor tiles{smem}, inv{smem};
    TT sK, sQ;
    tiles.into(sK, BT * LDK);
    tiles.into(sQ, BT * LDK);
    // L, the inverse and its scratch reuse the q / k tiles' space once their products are done (a smaller
    // block, so more of them share an SM and hide each other's barrier waits in the inversion)
    float* sL = inv.take<float>(BT * LDA);
    float* sA = inv.take<float>(BT * LDA);
    float* sX = inv.take<float>(BT / 2 * LDX);
    SmemCursor cur{tiles.p > inv.p ? tiles.p : inv.p};
    float* sG = cur.take<float>(BT);
    float* sB = cur.take<float>(BT);
    float* sRq = cur.take<float>(BT);
    float* sRk = cur.take<float>(BT);
    int* sR = cur.take<int>(BT + 4);  // reset counts, then the chunk's live rows at sR[BT]

    if (AHEAD) launch_dependents();
    const int items = AHEAD ? max_chunks * N * HV : 1;  // without AHEAD the loop is one pass, compiled away
#pragma unroll 1
    for (int item = AHEAD ? (int)blockIdx.x : 0; item < items; item += AHEAD ? (int)gridDim.x : 1) {
        const int it = AHEAD ? item : (int)blockIdx.x;
        int c = it / HV;
        const int hv = it % HV, h = hv / (HV / H);
        if (AHEAD) {  // item = (j N + n) HV + hv: chunk j of sequence n
            const int n = c % N, j = c / N;
            c = seq_chunk0[n] + j;
            if (c >= seq_chunk0[n + 1]) continue;
        }
        const i64 bos = chunk_bos[c];
        const int L = chunk_len[c];
        load_tile(sK, LDK, k + (bos * H + h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sQ, LDK, q + (bos * H + h) * K, (i64)H * K, L, K, BT, KP);
        for (int r = threadIdx.x; r < BT; r += blockDim.x) {
            const i64 th = (bos + r) * HV + hv;
            sG[r] = r < L ? scalar_log_gate(g, A_log, dt_bias, th, hv, flags) : 0.f;
            sB[r] = r < L ? beta_value(beta, th, flags) : 0.f;
        }
        cp_async_wait_all();
        __syncthreads();
        if (flags & F_L2) {  // 128 threads take q's rows, 128 k's
            static_assert(NTHREADS == 256, "two groups of 128 threads for the row norms");
            if (threadIdx.x < 128) row_inv_norms(sQ, LDK, L, BT, KP, sRq, threadIdx.x);
            else row_inv_norms(sK, LDK, L, BT, KP, sRk, threadIdx.x - 128);
        } else {
            for (int r = threadIdx.x; r < BT; r += blockDim.x) sRq[r] = sRk[r] = 1.f;
        }
        if (threadIdx.x == 0) {
            const int live = first_dead_row(sG, sB, L);
            sR[BT] = live;
            chunk_local_cumsum_log2(sG, sR, 1, 1, live, BT);
        }
        __syncthreads();
        const int live = sR[BT];
        for (int r = threadIdx.x; r < L; r += blockDim.x) {
            const i64 th = (bos + r) * HV + hv;
            Gc[th] = sG[r];
            Bc[th] = r < live ? sB[r] : 0.f;
            Rc[th] = row_code(sR[r], live);
            if (flags & F_L2) {
                Rq[th] = sRq[r];
                Rk[th] = sRk[r];
            }
        }
        constexpr int NW = NTHREADS / 32;
        {
            Acc<BT, BT, NW> S;
            S.fill(0.f);
            gemm<E, MK, NK, BT, BT, KP, NW>(S, sQ, LDK, sK, LDK);
            mask_decay_scores<false>(S, sG, sR, live, scale, sRq, sRk);
            const TT out = advance(chunk_matrix<TT>(Phi, Plo), (bos * HV + hv) * BT);
            S.apply_pairs([&](int i, int j, float& x0, float& x1) {
                if (i < L) tile_put_pair(out, i * HV * BT + j, x0, x1);
            });
        }
        Acc<BT, BT, NW> P;
        P.fill(0.f);
        gemm<E, MK, NK, BT, BT, KP, NW>(P, sK, LDK, sK, LDK);
        __syncthreads();  // sL takes the tiles' space
        P.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const bool in = i < live;
            *reinterpret_cast<float2*>(sL + i * LDA + j) = make_float2(
                (in && j < i) ? sB[i] * x0 * (sRk[i] * sRk[j]) * pair_decay(sG, sR, i, j) : 0.f,
                (in && j + 1 < i) ? sB[i] * x1 * (sRk[i] * sRk[j + 1]) * pair_decay(sG, sR, i, j + 1) : 0.f);
        });
        __syncthreads();
        invert_unit_lower<BT, NTHREADS>(sL, sA, LDA, sX, LDX);
        for (int idx = threadIdx.x; idx < L * (BT / 8); idx += blockDim.x) {
            const int r = idx / (BT / 8), j = (idx % (BT / 8)) * 8;
            const i64 e = ((bos + r) * HV + hv) * BT + j;
            split_store8(Ahi + e, Alo != nullptr ? Alo + e : nullptr, sA + r * LDA + j);
        }
        if (AHEAD) publish_item(ready + (i64)c * HV + hv);  // also the barrier before the next item
    }
}
