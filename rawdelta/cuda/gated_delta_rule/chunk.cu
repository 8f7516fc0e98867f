// Gated delta rule, chunked mode: forward and backward on tensor cores (mma.sync, fp32 accumulation).
// Math and the backward derivation: rawdelta/ops/gated_delta_rule/README.md ("Chunked form").
//
// Layouts (C-contiguous; BT_ = B * T flattened tokens, NC chunks in all, chunks never cross sequences):
//   q, k [BT_, H, K] (T)   v, o, do [BT_, HV, V] (T)   g, beta [BT_, HV] (float)
//   Gc, Bc [BT_, HV] float: chunk-local cumulative log2 gates, effective beta (prepare kernel)
//   Rq, Rk [BT_, HV] float: inverse L2 norms of the q and k rows (prepare kernel; only with F_L2). The
//                    kernels fold them into their epilogues as row factors instead of normalising tiles
//   hbuf, dhbuf [NC, HV, K, V] (T): state at each chunk's start / its gradient at the chunk's end
//   vnew, ybuf [BT_, HV, V] (T): delta = A r and y = A^T d(delta), per chunk
//
//   Ahi, Alo [BT_, HV, BT] (E): row r of the chunk's (I + L)^-1 at token r, split into hi + lo parts (Alo for
//                    the mma.sync state passes only)
//   Phi, Plo [BT_, HV, BT] (E): row r of the chunk's masked, decayed, scaled scores q k^T (prepare kernel),
//                    for both state passes; Plo only for float inputs (their score tiles are split)
//
// Template parameters: T input dtype; E the 16-bit mma type (bf16 for bf16 and float inputs, fp16 for
// fp16); BT chunk size; KP the key dimension padded to 64/128/256; BV the value columns per block of
// the state passes. Tiles of input precision are E tiles (Split<E> for float inputs); states, inverses
// and other float32 intermediates are Split<E> tiles, so their products keep ~16 mantissa bits.
#include "common/chunk_stages.cuh"
#include "common/ready_flags.cuh"
#include "common/tma.cuh"
#include "common/wgmma.cuh"
#include "gated_delta_rule/gdn_common.cuh"

using namespace rawdelta;

constexpr int PAD = 8;  // elements added to every 16-bit tile row: ldmatrix without bank conflicts

// A per-token [BT_, HV, BT] chunk matrix in global memory as the tile type TT of its kernel: the hi array
// for 16-bit inputs, the hi and lo arrays for float inputs (lo is unused otherwise); advance() offsets both.
template <typename TT, typename E>
__device__ __forceinline__ TT chunk_matrix(const E* hi, const E* lo) {
    if constexpr (OperandSplit<TT>::value) return TT{const_cast<E*>(hi), const_cast<E*>(lo)};
    else return const_cast<E*>(hi);
}
template <typename E> __device__ __forceinline__ E* advance(E* p, i64 n) { return p + n; }
template <typename E> __device__ __forceinline__ Split<E> advance(Split<E> s, i64 n) { return {s.hi + n, s.lo + n}; }

__global__ void __launch_bounds__(1024) gdn_chunk_table_kernel(const i64* __restrict__ cu, int N, int T_, int BT,
                                                                int* seq_chunk0, i64* chunk_bos, int* chunk_len,
                                                                int flags) {
    build_chunk_table(cu, N, T_, BT, (flags & F_VARLEN) != 0, seq_chunk0, chunk_bos, chunk_len);
}

// ---------------------------------------------------------------------------------------------
// Prepare: per (chunk, value head) the cumulative log2 gates, the effective beta,
// A = (I + L)^-1 with L_ij = beta_i (k_i . k_j) 2^(G_i - G_j), i > j, and the intra-chunk scores
// P_ij = scale (q_i . k_j) 2^(G_i - G_j), j <= i (with the row factors), which every value block of the
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
    const int* __restrict__ chunk_len, float* __restrict__ Gc, float* __restrict__ Bc, float* __restrict__ Rq,
    float* __restrict__ Rk, E* __restrict__ Ahi, E* __restrict__ Alo, E* __restrict__ Phi, E* __restrict__ Plo,
    int H, int HV, int K, float scale, int flags, const int* __restrict__ seq_chunk0, int N, int max_chunks,
    int* __restrict__ ready) {
    using TT = typename InputTile<T, E>::type;
    constexpr int LDK = KP + PAD, LDA = BT + 8, LDX = BT / 2 + 4;  // LDA: L's pair stores free of bank conflicts
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
        if (threadIdx.x < 32) chunk_local_cumsum_log2(sG, 1, 1, L, BT);
        __syncthreads();
        for (int r = threadIdx.x; r < L; r += blockDim.x) {
            const i64 th = (bos + r) * HV + hv;
            Gc[th] = sG[r];
            Bc[th] = sB[r];
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
            mask_decay_scores<false>(S, sG, L, scale, sRq, sRk);
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
            const bool in = i < L;
            *reinterpret_cast<float2*>(sL + i * LDA + j) = make_float2(
                (in && j < i) ? sB[i] * x0 * (sRk[i] * sRk[j]) * exp2f(sG[i] - sG[j]) : 0.f,
                (in && j + 1 < i) ? sB[i] * x1 * (sRk[i] * sRk[j + 1]) * exp2f(sG[i] - sG[j + 1]) : 0.f);
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

// Per-chunk row scalars in shared memory, loaded at each chunk's start:
//   G the cumulative log2 gates (rows past the chunk repeat the last, so every decay stays finite),
//   B the effective beta (0 past the chunk), rq / rk the q / k row factors (inverse L2 norms with F_L2,
//   else 1), and the products the epilogues need: gq = 2^G rq, gk = 2^G rk, lk = 2^(G_last - G) rk.
struct ChunkRows {
    float *G, *B, *rq, *rk, *gq, *gk, *lk;
    static constexpr int ARRAYS = 7;

    __device__ __forceinline__ void carve(SmemCursor& cur, int BT) {
        float** arrays[ARRAYS] = {&G, &B, &rq, &rk, &gq, &gk, &lk};
#pragma unroll
        for (int a = 0; a < ARRAYS; ++a) *arrays[a] = cur.take<float>(BT);
    }
    __device__ __forceinline__ void set(int r, float x, float glast, float b, float nq, float nk) {
        const float e = exp2f(x), l = exp2f(glast - x);
        G[r] = x;
        B[r] = b;
        rq[r] = nq;
        rk[r] = nk;
        gq[r] = e * nq;
        gk[r] = e * nk;
        lk[r] = l * nk;
    }
    __device__ __forceinline__ void load(const float* Gc, const float* Bc, const float* Rq, const float* Rk, i64 bos,
                                         int L, int BT, int HV, int hv, int flags) {
        const float glast = Gc[(bos + L - 1) * HV + hv];
        for (int r = threadIdx.x; r < BT; r += blockDim.x) {
            const bool in = r < L, l2 = in && (flags & F_L2);
            const i64 th = (bos + (in ? r : L - 1)) * HV + hv;
            set(r, Gc[th], glast, in ? Bc[th] : 0.f, l2 ? Rq[th] : 1.f, l2 ? Rk[th] : 1.f);
        }
    }
    // load() in two steps, for prefetching: the raw per-token values into shared memory ([4][BT] floats: Gc,
    // Bc, Rq, Rk; cp.async, zeros past the chunk), then the rows from them once they have landed.
    static __device__ __forceinline__ void fetch_raw(float* raw, const float* Gc, const float* Bc, const float* Rq,
                                                     const float* Rk, i64 bos, int L, int BT, int HV, int hv,
                                                     int flags) {
        for (int idx = threadIdx.x; idx < 4 * BT; idx += blockDim.x) {
            const float* src = raw_source(idx, Gc, Bc, Rq, Rk, bos, L, BT, HV, hv, flags);
            cp_async4(raw + idx, src != nullptr ? src : Gc, src != nullptr ? 4 : 0);
        }
    }
    // Where raw value idx of the chunk of L tokens at token bos comes from: null for a zero (a row past the chunk,
    // or a row norm without F_L2).
    static __device__ __forceinline__ const float* raw_source(int idx, const float* Gc, const float* Bc,
                                                              const float* Rq, const float* Rk, i64 bos, int L,
                                                              int BT, int HV, int hv, int flags) {
        const int a = idx / BT, r = idx % BT;
        if (r >= L || (a >= 2 && !(flags & F_L2))) return nullptr;
        return (a == 0 ? Gc : a == 1 ? Bc : a == 2 ? Rq : Rk) + (bos + r) * HV + hv;
    }
    __device__ __forceinline__ void derive(const float* raw, int L, int BT, int flags) {
        const float glast = raw[L - 1];
        for (int r = threadIdx.x; r < BT; r += blockDim.x) {
            const bool in = r < L, l2 = in && (flags & F_L2);
            set(r, raw[in ? r : L - 1], glast, raw[BT + r], l2 ? raw[2 * BT + r] : 1.f, l2 ? raw[3 * BT + r] : 1.f);
        }
    }
};

// out[e], out[e + 1] for columns j, j + 1 of a row with `cols` valid columns; one paired store when the
// row length is even (then e is even and the pair aligned).
template <typename T>
__device__ __forceinline__ void put_row_pair(T* out, i64 e, int j, int cols, bool paired, float a, float b) {
    if (paired && j + 1 < cols) {
        store_pair(out + e, 0, a, b);
        return;
    }
    if (j < cols) out[e] = from_float<T>(a);
    if (j + 1 < cols) out[e + 1] = from_float<T>(b);
}

// Rows [bos, bos + L) of a per-token [BT_, HV, BT] chunk matrix (A or P) into a tile, zero rows past the
// chunk; a split matrix (hi and lo arrays) into a split tile.
template <int BT, typename E>
__device__ __forceinline__ void load_chunk_rows(E* s, int ld, const E* g, i64 bos, int L, int HV, int hv) {
    load_tile(s, ld, g + (bos * HV + hv) * BT, (i64)HV * BT, L, BT, BT, BT);
}
template <int BT, typename E>
__device__ __forceinline__ void load_chunk_rows(Split<E> s, int ld, Split<E> g, i64 bos, int L, int HV, int hv) {
    load_chunk_rows<BT>(s.hi, ld, g.hi, bos, L, HV, hv);
    load_chunk_rows<BT>(s.lo, ld, g.lo, bos, L, HV, hv);
}

// State tile [K, V] (row stride V) <-> a KP x BV accumulator (Acc, or a warpgroup's WgAcc) at value columns
// [v0, v0 + vcols) (none when vcols <= 0).
template <typename TS, typename AccT>
__device__ __forceinline__ void store_state(AccT& S, TS* dst, int K, int V, int v0, int vcols) {
    S.apply_pairs([&](int r, int c, float& x0, float& x1) {
        if (r < K) put_row_pair(dst, (i64)r * V + v0 + c, c, vcols, (V & 1) == 0, x0, x1);
    });
}
template <typename AccT>
__device__ __forceinline__ void load_state(AccT& S, const float* src, int K, int V, int v0, int vcols) {
    S.apply([&](int r, int c, float& x) { x = (r < K && c < vcols) ? src[(i64)r * V + v0 + c] : 0.f; });
}

// A state pass block's work: sequence n, value head hv (key head h), the value columns [v0, v0 + vcols) of its
// block vb (NVB blocks of BV columns per head), the sequence's tokens [bos, bos + len) in nchunks chunks of BT,
// and the offset of its [K, V] states.
struct StatePassBlock {
    int vb, hv, n, h, v0, vcols, len, nchunks;
    i64 bos, state_off;
    bool paired;  // V even: output rows take paired stores
    __device__ __forceinline__ StatePassBlock(int NVB, int BV, int BT, const i64* cu, int T_, int H, int HV, int K,
                                              int V, int flags) {
        vb = blockIdx.x % NVB;
        const int nh = blockIdx.x / NVB;
        hv = nh % HV;
        n = nh / HV;
        h = hv / (HV / H);
        v0 = vb * BV;
        vcols = min(BV, V - v0);
        paired = (V & 1) == 0;
        const SeqRange sr = seq_range(cu, n, T_, flags);
        bos = sr.bos;
        len = (int)(sr.eos - sr.bos);
        nchunks = (len + BT - 1) / BT;
        state_off = ((i64)n * HV + hv) * K * V;
    }
    // Offset of chunk c's [K, V] state in a per-chunk [NC, HV, K, V] array (hbuf, dhbuf).
    __device__ __forceinline__ i64 chunk_state_off(const int* seq_chunk0, int c, int HV, int K, int V) const {
        return ((i64)(seq_chunk0[n] + c) * HV + hv) * K * V;
    }
};

// Blocks per SM the Hopper state passes' launch bounds promise: one with four warpgroups or two stages of inputs,
// else as many as their shared memory allows (three at 16 columns per warpgroup and K <= 128, else two).
__host__ __device__ constexpr int wg_pass_blocks_per_sm(int nwg, int bvw, int kp, bool pipe) {
    return (pipe || nwg > 2) ? 1 : (bvw == 16 && kp <= 128) ? 3 : 2;
}

// ---------------------------------------------------------------------------------------------
// Forward state pass over one sequence's chunks, per (sequence, value head, block of BV columns).
// Per chunk, with S the state at its start (float32 registers):
//   r = beta * (v - 2^G * (k S)),  delta = A r,  o = scale * (2^G * (q S) + P delta),
//   S = 2^G_last * S + k^T (2^(G_last - G) * delta)
// STORE (backward recompute): skip the output, store S per chunk and delta instead.
template <typename T, typename E, int BT, int KP, int BV, bool STORE>
__global__ void __launch_bounds__(256) gdn_chunk_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ Gc,
    const float* __restrict__ Bc, const float* __restrict__ Rq, const float* __restrict__ Rk,
    const E* __restrict__ Ahi, const E* __restrict__ Alo, const E* __restrict__ Phi, const E* __restrict__ Plo,
    const float* __restrict__ h0, const i64* __restrict__ cu, const int* __restrict__ seq_chunk0,
    T* __restrict__ o, float* __restrict__ ht, T* __restrict__ hbuf,
    T* __restrict__ vnew, int T_, int H, int HV, int K, int V, int NVB, float scale, int flags) {
    using TT = typename InputTile<T, E>::type;
    constexpr int NW = 8, LDK = KP + PAD, LDV = BV + PAD, LDA = BT + PAD, LDP = BT + PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    TT sQ, sK, sVD, sP;
    if (!STORE) cur.into(sQ, BT * LDK);
    cur.into(sK, BT * LDK);
    cur.into(sVD, BT * LDV);  // v, then delta
    if (!STORE) cur.into(sP, BT * LDP);
    const Split<E> sA = cur.take_split<E>(BT * LDA), sS = cur.take_split<E>(KP * LDV),
                   sR = cur.take_split<E>(BT * LDV), sDt = cur.take_split<E>(BT * LDV);
    ChunkRows rows;
    rows.carve(cur, BT);

    const StatePassBlock pb(NVB, BV, BT, cu, T_, H, HV, K, V, flags);

    Acc<KP, BV, NW> S;
    if (flags & F_H0) load_state(S, h0 + pb.state_off, K, V, pb.v0, pb.vcols);
    else S.fill(0.f);

#pragma unroll 1
    for (int c = 0; c < pb.nchunks; ++c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        if (!STORE) load_tile(sQ, LDK, q + (bos * H + pb.h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sK, LDK, k + (bos * H + pb.h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sVD, LDV, v + (bos * HV + pb.hv) * V + pb.v0, (i64)HV * V, L, pb.vcols, BT, BV);
        load_chunk_rows<BT>(sA, LDA, chunk_matrix<Split<E>>(Ahi, Alo), bos, L, HV, pb.hv);
        if (!STORE) load_chunk_rows<BT>(sP, LDP, chunk_matrix<TT>(Phi, Plo), bos, L, HV, pb.hv);
        rows.load(Gc, Bc, Rq, Rk, bos, L, BT, HV, pb.hv, flags);
        S.store(sS, LDV);
        if (STORE) store_state(S, hbuf + pb.chunk_state_off(seq_chunk0, c, HV, K, V), K, V, pb.v0, pb.vcols);
        cp_async_wait_all();
        __syncthreads();
        Acc<BT, BV, NW> X;
        X.fill(0.f);
        gemm<E, MK, KN, BT, BV, KP, NW>(X, sK, LDK, sS, LDV);
        X.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float2 vv = tile_get_pair(sVD, i * LDV + j);
            const float b = rows.B[i], f = rows.gk[i];
            tile_put_pair(sR, i * LDV + j, b * (vv.x - f * x0), b * (vv.y - f * x1));
        });
        Acc<BT, BV, NW> Y;
        if (!STORE) {
            Y.fill(0.f);
            gemm<E, MK, KN, BT, BV, KP, NW>(Y, sQ, LDK, sS, LDV);
        }
        __syncthreads();
        Acc<BT, BV, NW> D;
        D.fill(0.f);
        gemm<E, MK, KN, BT, BV, BT, NW>(D, sA, LDA, sR, LDV);
        D.apply_pairs([&](int i, int j, float& x0, float& x1) {
            if (!STORE) tile_put_pair(sVD, i * LDV + j, x0, x1);
            const float l = rows.lk[i];
            tile_put_pair(sDt, i * LDV + j, x0 * l, x1 * l);
            if (STORE && i < L)
                put_row_pair(vnew, ((bos + i) * HV + pb.hv) * V + pb.v0 + j, j, pb.vcols, pb.paired, x0, x1);
        });
        __syncthreads();
        if (!STORE) {
            scale_inter_output(Y, rows.gq, scale);
            gemm<E, MK, KN, BT, BV, BT, NW>(Y, sP, LDP, sVD, LDV);
            Y.apply_pairs([&](int i, int j, float& x0, float& x1) {
                if (i < L) put_row_pair(o, ((bos + i) * HV + pb.hv) * V + pb.v0 + j, j, pb.vcols, pb.paired, x0, x1);
            });
        }
        decay_state<ScalarGate>(S, rows.G, 1, BT - 1);
        gemm<E, KM, KN, KP, BV, BT, NW>(S, sK, LDK, sDt, LDV);
        __syncthreads();
    }
    if (!STORE && (flags & F_HT)) store_state(S, ht + pb.state_off, K, V, pb.v0, pb.vcols);
}

// ---------------------------------------------------------------------------------------------
// The forward state pass on Hopper warpgroups (wgmma, sm_90a), for 16-bit inputs and chunks of 64: the math
// of gdn_chunk_fwd_kernel, per (sequence, value head, block of BV = NWG BVW value columns). Warpgroup w owns
// the state's columns [w BVW, (w + 1) BVW), all KP rows, in registers, and runs the chunk's chain of products
// on them alone: inside a chunk it waits only on its own warpgroup; the chunk's q, k, v, (I + L)^-1 and score
// tiles are loaded once for all NWG (2, or 4 so that one block covers a head's 128 value columns). They come as
// TMA boxes issued by one thread (common/tma.cuh; q, k, (I + L)^-1 and the scores in the 128-byte swizzle that
// wgmma reads, v in the swizzle of its row length), so the warps no longer spend the chain's time on the
// addresses of 16-byte copies; the tiles the warpgroups write are blocked (common/wgmma.cuh). The state, r and
// delta enter the tensor cores rounded to T, like the peer's; the state itself stays float32 in registers through
// the pass.
// PIPE: two stages of chunk inputs, the next chunk's loads in flight while this one computes (for grids of
// at most one block per SM, where no other block hides the loads).
// AHEAD (with PIPE): prepare runs beside the pass (gdn_chunk_prepare_kernel with `ready`) instead of before it,
// and a producer warp after the warpgroups issues every load as soon as prepare has published the chunk and the
// consumers have handed the stage back; the warpgroups synchronise among themselves only.

// TMA maps of the state passes' per-chunk tiles: q, k [BT_, H, K]; (I + L)^-1 and the scores [BT_, HV, BT]; v
// [BT_, HV, V] (the forward pass; boxes of min(BV, 64) columns).
struct PassMaps {
    TmaMap q, k, a, p, v;
};

// One stage of a Hopper state pass's chunk inputs: byte offsets of its tiles (q and the scores only with HAS_Q_P,
// do only with HAS_DO) and of the raw row scalars. Every tile starts 1024-byte aligned when the stage does.
template <int KP, int BV, bool HAS_Q_P, bool HAS_DO>
struct WgStage {
    static constexpr int BT = 64, Q = 0, K = Q + (HAS_Q_P ? BT * KP * 2 : 0), V = K + BT * KP * 2,
                         DO = V + BT * BV * 2, A = DO + (HAS_DO ? BT * BV * 2 : 0), P = A + BT * BT * 2,
                         RAW = P + (HAS_Q_P ? BT * BT * 2 : 0), BYTES = RAW + 4 * BT * 4;

    // Chunk c of block pb's sequence into stage st: the q, k, (I + L)^-1 and score tiles as TMA boxes in the
    // 128-byte swizzle (tma.cuh; KP / 64 boxes for q and k), and without do (the forward) the v tile at the
    // block's value columns (tma.cuh: swizzled), issued by thread 0 and counted by `bar`; v and do blocked
    // otherwise, and the row scalars, as one cp.async group by the block's NT threads. The boxes hold rows past
    // the chunk (the next sequence's, or zeros past the tensor): zero_tail clears them.
    template <int NT, typename T>
    static __device__ __forceinline__ void issue(unsigned char* st, u64* bar, const StatePassBlock& pb, int c,
                                                 const PassMaps& maps, const T* v, const T* dout, const float* Gc,
                                                 const float* Bc, const float* Rq, const float* Rk, int HV, int Vd,
                                                 int flags) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        if (threadIdx.x == 0) {
            mbar_arrive_expect_tx(bar, TMA_BYTES);
            issue_tiles(st, bar, pb, (int)bos, maps);
        }
        if (HAS_DO) {
            const i64 vo = (bos * HV + pb.hv) * Vd + pb.v0;
            load_blocked<BV, BT, NT>(reinterpret_cast<T*>(st + V), v + vo, (i64)HV * Vd, L, pb.vcols);
            load_blocked<BV, BT, NT>(reinterpret_cast<T*>(st + DO), dout + vo, (i64)HV * Vd, L, pb.vcols);
        }
        ChunkRows::fetch_raw(reinterpret_cast<float*>(st + RAW), Gc, Bc, Rq, Rk, bos, L, BT, HV, pb.hv, flags);
        cp_async_commit();
    }
    // The row scalars of a producer warp's lane for chunk c, in registers (through L2: in a pass whose prepare
    // runs beside it, prepare writes them during the pass), ChunkRows::fetch_raw's values at [lane + 32 i].
    struct LaneRows {
        float x[4 * BT / 32];
    };
    static __device__ __forceinline__ LaneRows lane_rows(const StatePassBlock& pb, int c, const float* Gc,
                                                         const float* Bc, const float* Rq, const float* Rk, int HV,
                                                         int flags, int lane) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        LaneRows v;
#pragma unroll
        for (int i = 0; i < 4 * BT / 32; ++i) {
            const float* src = ChunkRows::raw_source(lane + 32 * i, Gc, Bc, Rq, Rk, bos, L, BT, HV, pb.hv, flags);
            v.x[i] = src != nullptr ? __ldcg(src) : 0.f;
        }
        return v;
    }
    // issue() for a pass whose prepare runs beside it (AHEAD), by the producer warp once it has acquired the
    // chunk's readiness flag and its lanes' rows (lane_rows): they store the rows and arrive on `bar` (32
    // arrivals), lane 0 announcing and issuing the TMA tiles (no do).
    static __device__ __forceinline__ void issue_ahead(unsigned char* st, u64* bar, const StatePassBlock& pb, int c,
                                                       const PassMaps& maps, const LaneRows& rows, int lane) {
        static_assert(!HAS_DO, "the reverse pass does not run beside prepare");
        float* raw = reinterpret_cast<float*>(st + RAW);
#pragma unroll
        for (int i = 0; i < 4 * BT / 32; ++i) raw[lane + 32 * i] = rows.x[i];
        const i64 bos = pb.bos + (i64)c * BT;
        if (lane == 0) {
            fence_proxy_async_global();  // prepare's global writes, acquired, before the TMA units read them
            mbar_arrive_expect_tx(bar, TMA_BYTES);
            issue_tiles(st, bar, pb, (int)bos, maps);
        } else {
            mbar_arrive(bar);
        }
    }
    // The TMA tiles of the chunk starting at token `row` (its phase's bytes already announced on `bar`).
    static __device__ __forceinline__ void issue_tiles(unsigned char* st, u64* bar, const StatePassBlock& pb, int row,
                                                       const PassMaps& maps) {
#pragma unroll
        for (int b = 0; b < KP / 64; ++b) {
            if (HAS_Q_P) tma_load_3d(st + Q + b * SW128_BOX_BYTES, &maps.q, 64 * b, pb.h, row, bar);
            tma_load_3d(st + K + b * SW128_BOX_BYTES, &maps.k, 64 * b, pb.h, row, bar);
        }
        tma_load_3d(st + A, &maps.a, 0, pb.hv, row, bar);
        if (HAS_Q_P) tma_load_3d(st + P, &maps.p, 0, pb.hv, row, bar);
        for (int b = 0; b < V_BOXES; ++b)  // none with do
            tma_load_3d(st + V + b * V_BOX_BYTES, &maps.v, pb.v0 + V_BOX_COLS * b, pb.hv, row, bar);
    }
    static constexpr int QK_BOXES = (HAS_Q_P ? 2 : 1) * (KP / 64), AP_BOXES = HAS_Q_P ? 2 : 1,
                         V_BOX_COLS = BV < 64 ? BV : 64, V_BOXES = HAS_DO ? 0 : BV / V_BOX_COLS,
                         V_BOX_BYTES = BT * V_BOX_COLS * 2,
                         TMA_BYTES = (QK_BOXES + AP_BOXES) * SW128_BOX_BYTES + V_BOXES * V_BOX_BYTES;
    // Rows [L, BT) of the TMA tiles to zero, as load_blocked leaves them, by threads [0, NT).
    template <int NT>
    static __device__ __forceinline__ void zero_tail(unsigned char* st, int L) {
        if (L >= BT) return;
        zero_box_rows(st + Q, QK_BOXES, L, 128, NT);  // q and k are adjacent, as are A and P
        zero_box_rows(st + A, AP_BOXES, L, 128, NT);
        zero_box_rows(st + V, V_BOXES, L, 2 * V_BOX_COLS, NT);
    }
};

// Shared memory of a Hopper state pass: NS stages of chunk inputs, the state tile (KP x BV, T), NT value-sized
// tiles (BT x BV, T; tile1 only with NT = 2), the chunk's row arrays and two mbarriers per stage: `full`, for
// its TMA tiles, and with AHEAD `empty`, on which the consumers hand it back to the producer warp. NCONS: the
// threads that run the chain (all of the block but that warp). The stages start 1024-byte aligned (the
// 128-byte swizzle's period; the host adds 1024 bytes of slack).
template <typename T, typename St, int KP, int BV, int NS, int NT, int NCONS, bool AHEAD = false>
struct WgPassSmem {
    unsigned char* stages;
    T *state, *tile0, *tile1;
    unsigned a_state, a0, a1;  // their shared-memory addresses, for the descriptors
    ChunkRows rows;
    u64* bars;  // full[2], empty[2]
    static constexpr int CONSUMER_BARRIER = 5;  // named barrier of the NCONS threads (1 + wg: each warpgroup's)
    __device__ __forceinline__ explicit WgPassSmem(unsigned char* smem) {
        SmemCursor cur{smem + ((1024u - (smem_addr(smem) & 1023u)) & 1023u)};
        stages = cur.take<unsigned char>(NS * St::BYTES);
        state = cur.take<T>(KP * BV);
        tile0 = cur.take<T>(St::BT * BV);
        tile1 = NT > 1 ? cur.take<T>(St::BT * BV) : nullptr;
        rows.carve(cur, St::BT);
        bars = cur.take<u64>(4);
        a_state = smem_addr(state);
        a0 = smem_addr(tile0);
        a1 = NT > 1 ? smem_addr(tile1) : 0u;
        if (threadIdx.x == 0) {
            for (int s = 0; s < NS; ++s) {
                mbar_init(bars + s, AHEAD ? 32 : 1);  // AHEAD: every lane of the producer warp arrives
                mbar_init(bars + 2 + s, 1);
            }
            fence_mbarrier_init();
        }
        __syncthreads();
    }
    // Barrier over the consumer threads (the whole block without a producer warp).
    __device__ __forceinline__ void sync() const {
        if (AHEAD) asm volatile("bar.sync %0, %1;\n" ::"n"(CONSUMER_BARRIER), "n"(NCONS) : "memory");
        else __syncthreads();
    }
    // The end of pass step `step`: every consumer is done with its stage; with AHEAD, it goes back to the producer.
    __device__ __forceinline__ void leave_chunk(int step) {
        sync();
        if (AHEAD && threadIdx.x == 0) mbar_arrive(bars + 2 + step % NS);
    }
    // The start of pass step `step` (chunk c of L tokens): with PIPE, first issues chunk `next`'s loads (none when
    // next < 0) into the other stage; waits for chunk c's stage, derives its rows and returns it. issue(c, s)
    // counts the stage's TMA tiles on bars[s], filled once per use of the stage; their rows past the chunk are
    // cleared here.
    // With AHEAD the producer warp issues every load (produce_ahead): the consumers only wait for the stage.
    template <bool PIPE, typename Issue>
    __device__ __forceinline__ unsigned char* enter_chunk(int step, int c, int next, int L, int flags, Issue&& issue) {
        const int s = PIPE ? (step & 1) : 0;
        if (AHEAD) {
            mbar_wait(bars + s, (step >> 1) & 1);  // its arrivals release the producer's row scalars too
        } else {
            if (!PIPE) issue(c, 0);
            if (PIPE && next >= 0) {
                issue(next, s ^ 1);  // that stage's last reader was the previous step, before its closing barrier
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            mbar_wait(bars + s, (PIPE ? step >> 1 : step) & 1);
            __syncthreads();
        }
        unsigned char* st = stages + s * St::BYTES;
        St::template zero_tail<NCONS>(st, L);  // fenced and synchronised before the first product
        rows.derive(reinterpret_cast<const float*>(st + St::RAW), L, St::BT, flags);
        return st;
    }
    // The producer warp of a pass that runs beside prepare (AHEAD), chunk by chunk: waits until prepare has
    // published the chunk (await_item) and reads its rows, then, once the consumers have handed its
    // stage back, fills it. The flag and the rows' round trips to L2 come before the stage is free, so that only
    // the TMA copies' latency remains after it.
    __device__ __forceinline__ void produce_ahead(const StatePassBlock& pb, const PassMaps& maps, const float* Gc,
                                                  const float* Bc, const float* Rq, const float* Rk, const int* ready,
                                                  const int* seq_chunk0, int HV, int flags) {
        const int lane = threadIdx.x & 31;
#pragma unroll 1
        for (int c = 0; c < pb.nchunks; ++c) {
            const int s = c & 1;
            await_item(ready + (i64)(seq_chunk0[pb.n] + c) * HV + pb.hv);
            const typename St::LaneRows rows = St::lane_rows(pb, c, Gc, Bc, Rq, Rk, HV, flags, lane);
            if (c >= 2) mbar_wait(bars + 2 + s, ((c >> 1) - 1) & 1);
            St::issue_ahead(stages + s * St::BYTES, bars + s, pb, c, maps, rows, lane);
        }
    }
    // A warpgroup's state columns (from c0) into the state tile.
    template <typename AccT>
    __device__ __forceinline__ void put_state(AccT& S, int c0) {
        S.apply_pairs([&](int r, int j, float& x0, float& x1) { store_pair(state, blk(r, c0 + j, BV), x0, x1); });
    }
    // The whole state tile (once every warpgroup has put its columns) to a [K, V] state at value columns
    // [v0, v0 + vcols) (V and v0 multiples of 8), by the block's NT threads.
    template <int NT>
    __device__ __forceinline__ void copy_state_out(T* dst, int K, int V, int v0, int vcols) const {
        store_blocked<BV, NT, BV, KP>(dst + v0, V, state, K, 0, vcols, threadIdx.x);
    }
    // Rows [0, L) of a warpgroup's columns [c0, c0 + BVW) of a BT x BV tile to a chunk's rows of a [.., HV, V]
    // array (dst: its first row at the block's first value column), by the warpgroup's threads.
    template <int BVW>
    static __device__ __forceinline__ void copy_cols_out(T* dst, int HV, int V, const T* tile, int L, int c0,
                                                         int vcols) {
        store_blocked<BVW, 128, BV, St::BT>(dst, (i64)HV * V, tile, L, c0, vcols, threadIdx.x & 127);
    }
};

template <typename T, int KP, int NWG, int BVW, bool STORE, bool PIPE, bool AHEAD>
__global__ void __launch_bounds__(128 * NWG + (AHEAD ? 32 : 0), wg_pass_blocks_per_sm(NWG, BVW, KP, PIPE))
    gdn_chunk_fwd_wg_kernel(
    const float* Gc, const float* Bc, const float* Rq, const float* Rk, const float* __restrict__ h0,
    const i64* __restrict__ cu, const int* __restrict__ seq_chunk0, T* __restrict__ o, float* __restrict__ ht,
    T* __restrict__ hbuf, T* __restrict__ vnew, int T_, int H, int HV, int K, int V, int NVB, float scale, int flags,
    const int* ready, const __grid_constant__ PassMaps maps) {
    static_assert(PIPE || !AHEAD, "the producer warp fills two stages");
    constexpr int BT = 64, BV = NWG * BVW, MS = KP / 64, NS = PIPE ? 2 : 1;
    using St = WgStage<KP, BV, !STORE, false>;
    extern __shared__ __align__(1024) unsigned char smem[];
    // tile0: r, then delta (each warpgroup's columns, after its product on r is done); tile1: 2^(G_last - G) delta
    WgPassSmem<T, St, KP, BV, NS, 2, 128 * NWG, AHEAD> sm(smem);

    const StatePassBlock pb(NVB, BV, BT, cu, T_, H, HV, K, V, flags);
    if (AHEAD && threadIdx.x >= 128 * NWG) {
        sm.produce_ahead(pb, maps, Gc, Bc, Rq, Rk, ready, seq_chunk0, HV, flags);
        return;
    }
    const int wg = threadIdx.x >> 7, c0 = wg * BVW;
    const auto ncols = [&](unsigned tile) { return b_mnmajor(tile, BV, c0); };  // this warpgroup's columns
    const auto issue = [&](int c, int s) {  // chunk c's inputs into stage s
        St::template issue<128 * NWG>(sm.stages + s * St::BYTES, sm.bars + s, pb, c, maps, (const T*)nullptr,
                                      (const T*)nullptr, Gc, Bc, Rq, Rk, HV, V, flags);
    };

    WgAcc<MS, BVW> S;  // this warpgroup's columns: value columns [v0 + c0, v0 + vcols) of the state
    if (flags & F_H0) load_state(S, h0 + pb.state_off, K, V, pb.v0 + c0, pb.vcols - c0);
    else S.fill(0.f);

    if (PIPE && !AHEAD && pb.nchunks > 0) issue(0, 0);
#pragma unroll 1
    for (int c = 0; c < pb.nchunks; ++c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        unsigned char* st = sm.template enter_chunk<PIPE>(c, c, c + 1 < pb.nchunks ? c + 1 : -1, L, flags, issue);
        T* sV = reinterpret_cast<T*>(st + St::V);
        T* const rows_out = (STORE ? vnew : o) + (bos * HV + pb.hv) * V + pb.v0;  // the chunk's output rows
        const unsigned aQ = smem_addr(st + St::Q), aK = smem_addr(st + St::K), aA = smem_addr(st + St::A),
                       aP = smem_addr(st + St::P);
        sm.put_state(S, c0);
        fence_proxy_async();
        sm.sync();
        // X = k S (and Y = q S): this warpgroup's columns
        WgAcc<1, BVW> X, Y;
        wg_fence();
        X.template mma<T, false, true, KP>(a_kmajor_sw128(aK), ncols(sm.a_state), false);
        if (!STORE) Y.template mma<T, false, true, KP>(a_kmajor_sw128(aQ), ncols(sm.a_state), false);
        wg_commit();
        if (STORE)
            sm.template copy_state_out<128 * NWG>(hbuf + pb.chunk_state_off(seq_chunk0, c, HV, K, V), K, V, pb.v0,
                                                  pb.vcols);
        wg_wait<0>();
        X.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float2 vv = load_pair(sV, swizzled(i, c0 + j, BV));
            const float b = sm.rows.B[i], f = sm.rows.gk[i];
            store_pair(sm.tile0, blk(i, c0 + j, BV), b * (vv.x - f * x0), b * (vv.y - f * x1));
        });
        fence_proxy_async();
        wg_barrier(wg);
        // delta = A r
        WgAcc<1, BVW> D;
        wg_fence();
        D.template mma<T, false, true, BT>(a_kmajor_sw128(aA), ncols(sm.a0), false);
        wg_commit();
        wg_wait<0>();
        wg_barrier(wg);  // every warp's part of the product has read r before delta overwrites it
        D.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const int e = blk(i, c0 + j, BV);
            store_pair(sm.tile0, e, x0, x1);
            const float l = sm.rows.lk[i];
            store_pair(sm.tile1, e, x0 * l, x1 * l);
        });
        if (!STORE) scale_inter_output(Y, sm.rows.gq, scale);
        decay_state<ScalarGate>(S, sm.rows.G, 1, BT - 1);
        fence_proxy_async();
        wg_barrier(wg);
        // o = scale 2^G q S + P delta;  S = 2^G_last S + k^T (2^(G_last - G) delta)
        wg_fence();
        if (!STORE) Y.template mma<T, false, true, BT>(a_kmajor_sw128(aP), ncols(sm.a0), true);
        S.template mma<T, true, true, BT>(a_mnmajor_sw128(aK), ncols(sm.a1), true);
        wg_commit();
        if (STORE) sm.template copy_cols_out<BVW>(rows_out, HV, V, sm.tile0, L, c0, pb.vcols);  // delta
        wg_wait<0>();
        if (!STORE) {  // o through this warpgroup's columns of tile1 (their last reader, S's product, is done)
            Y.apply_pairs(
                [&](int i, int j, float& x0, float& x1) { store_pair(sm.tile1, blk(i, c0 + j, BV), x0, x1); });
            wg_barrier(wg);
            sm.template copy_cols_out<BVW>(rows_out, HV, V, sm.tile1, L, c0, pb.vcols);
        }
        sm.leave_chunk(c);
    }
    if (!STORE && (flags & F_HT)) store_state(S, ht + pb.state_off, K, V, pb.v0 + c0, pb.vcols - c0);
}

// ---------------------------------------------------------------------------------------------
// Backward state pass, last chunk to first, per (sequence, value head, block of BV columns). dS is
// the gradient of the state at the current chunk's end (dht, or 0, at the sequence end):
//   d(delta) = P^T do + 2^(G_last - G) * (k dS)       y = A^T d(delta)       dv = beta * y
//   dS = 2^G_last * dS + q^T (scale 2^G do) - k^T (beta 2^G y)
// Stores dS per chunk (dhbuf), y (ybuf), dv, the per-block partial row sums y . v, and dh0.
template <typename T, typename E, int BT, int KP, int BV>
__global__ void __launch_bounds__(256) gdn_chunk_bwd_state_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ Gc,
    const float* __restrict__ Bc, const float* __restrict__ Rq, const float* __restrict__ Rk,
    const E* __restrict__ Ahi, const E* __restrict__ Alo, const E* __restrict__ Phi, const E* __restrict__ Plo,
    const T* __restrict__ dout, const float* __restrict__ dht,
    const i64* __restrict__ cu, const int* __restrict__ seq_chunk0, T* __restrict__ dhbuf, T* __restrict__ ybuf,
    T* __restrict__ dv, float* __restrict__ part_yv, float* __restrict__ dh0, int T_, int H, int HV, int K, int V,
    int NVB, i64 BT_, float scale, int flags) {
    using TT = typename InputTile<T, E>::type;
    constexpr int NW = 8, LDK = KP + PAD, LDV = BV + PAD, LDA = BT + PAD, LDP = BT + PAD;
    using AccV = Acc<BT, BV, NW>;
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    TT sQ, sK, sP, sDo;
    cur.into(sQ, BT * LDK);
    cur.into(sK, BT * LDK);
    cur.into(sP, BT * LDP);
    cur.into(sDo, BT * LDV);
    const Split<E> sA = cur.take_split<E>(BT * LDA), sS = cur.take_split<E>(KP * LDV),
                   sT = cur.take_split<E>(BT * LDV), sDoG = cur.take_split<E>(BT * LDV);
    ChunkRows rows;
    rows.carve(cur, BT);
    float* sScratch = cur.take<float>(AccV::WN * BT);
    float* sRow = cur.take<float>(BT);

    const StatePassBlock pb(NVB, BV, BT, cu, T_, H, HV, K, V, flags);

    Acc<KP, BV, NW> dS;
    if (flags & F_DHT) load_state(dS, dht + pb.state_off, K, V, pb.v0, pb.vcols);
    else dS.fill(0.f);

#pragma unroll 1
    for (int c = pb.nchunks - 1; c >= 0; --c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        load_tile(sQ, LDK, q + (bos * H + pb.h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sK, LDK, k + (bos * H + pb.h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sDo, LDV, dout + (bos * HV + pb.hv) * V + pb.v0, (i64)HV * V, L, pb.vcols, BT, BV);
        load_chunk_rows<BT>(sA, LDA, chunk_matrix<Split<E>>(Ahi, Alo), bos, L, HV, pb.hv);
        load_chunk_rows<BT>(sP, LDP, chunk_matrix<TT>(Phi, Plo), bos, L, HV, pb.hv);
        rows.load(Gc, Bc, Rq, Rk, bos, L, BT, HV, pb.hv, flags);
        dS.store(sS, LDV);
        store_state(dS, dhbuf + pb.chunk_state_off(seq_chunk0, c, HV, K, V), K, V, pb.v0, pb.vcols);
        cp_async_wait_all();
        __syncthreads();
        AccV Z;
        Z.fill(0.f);
        gemm<E, MK, KN, BT, BV, KP, NW>(Z, sK, LDK, sS, LDV);
        Z.apply([&](int i, int, float& x) { x *= rows.lk[i]; });
        for (int idx = 2 * threadIdx.x; idx < BT * BV; idx += 2 * blockDim.x) {
            const int i = idx / BV, j = idx % BV;
            const float2 d = tile_get_pair(sDo, i * LDV + j);
            const float f = scale * rows.gq[i];
            tile_put_pair(sDoG, i * LDV + j, f * d.x, f * d.y);
        }
        __syncthreads();
        gemm<E, KM, KN, BT, BV, BT, NW>(Z, sP, LDP, sDo, LDV);
        Z.store(sT, LDV);
        __syncthreads();
        // do is dead now: its tile takes v, for the row sums y . v below, while y is computed
        load_tile(sDo, LDV, v + (bos * HV + pb.hv) * V + pb.v0, (i64)HV * V, L, pb.vcols, BT, BV);
        AccV Yc;
        Yc.fill(0.f);
        gemm<E, KM, KN, BT, BV, BT, NW>(Yc, sA, LDA, sT, LDV);
        cp_async_wait_all();
        __syncthreads();
        Yc.apply_pairs([&](int i, int j, float& x0, float& x1) {
            if (i < L) {
                const i64 e = ((bos + i) * HV + pb.hv) * V + pb.v0 + j;
                const float b = rows.B[i];
                put_row_pair(dv, e, j, pb.vcols, pb.paired, b * x0, b * x1);
                put_row_pair(ybuf, e, j, pb.vcols, pb.paired, x0, x1);
            }
            const float f = -rows.B[i] * rows.gk[i];
            tile_put_pair(sT, i * LDV + j, f * x0, f * x1);
        });
        acc_row_sums(Yc, [&](int i, int j, float x) { return x * tile_get(sDo, i * LDV + j); }, sScratch, sRow);
        for (int i = threadIdx.x; i < L; i += blockDim.x) part_yv[((i64)pb.vb * BT_ + bos + i) * HV + pb.hv] = sRow[i];
        decay_state<ScalarGate>(dS, rows.G, 1, BT - 1);
        gemm<E, KM, KN, KP, BV, BT, NW>(dS, sQ, LDK, sDoG, LDV);
        gemm<E, KM, KN, KP, BV, BT, NW>(dS, sK, LDK, sT, LDV);
        __syncthreads();
    }
    if (flags & F_H0) store_state(dS, dh0 + pb.state_off, K, V, pb.v0, pb.vcols);
}

// ---------------------------------------------------------------------------------------------
// The backward state pass on Hopper warpgroups (wgmma, sm_90a), for 16-bit inputs and chunks of 64: the math
// of gdn_chunk_bwd_state_kernel, last chunk to first, laid out like gdn_chunk_fwd_wg_kernel: warpgroup w owns
// the columns [w BVW, (w + 1) BVW) of dS, all KP rows, in float32 registers; dS, d(delta), y and the scaled do
// enter the tensor cores rounded to T. Each warpgroup writes its own partial row sums y . v (partial NWG vb + w
// of part_yv). PIPE: the previous chunk's inputs load while this one computes. NWG: 2 or 4 warpgroups per block.
// The q, k, (I + L)^-1 and score tiles come by TMA, as in the forward pass; v and do are blocked copies.
template <typename T, int KP, int NWG, int BVW, bool PIPE>
__global__ void __launch_bounds__(128 * NWG, wg_pass_blocks_per_sm(NWG, BVW, KP, PIPE))
    gdn_chunk_bwd_wg_kernel(
    const T* __restrict__ v, const float* __restrict__ Gc, const float* __restrict__ Bc,
    const float* __restrict__ Rq, const float* __restrict__ Rk, const T* __restrict__ dout,
    const float* __restrict__ dht, const i64* __restrict__ cu, const int* __restrict__ seq_chunk0,
    T* __restrict__ dhbuf, T* __restrict__ ybuf, T* __restrict__ dv, float* __restrict__ part_yv,
    float* __restrict__ dh0, int T_, int H, int HV, int K, int V, int NVB, i64 BT_, float scale, int flags,
    const __grid_constant__ PassMaps maps) {
    constexpr int BT = 64, BV = NWG * BVW, MS = KP / 64, NS = PIPE ? 2 : 1;
    using St = WgStage<KP, BV, true, true>;
    extern __shared__ __align__(1024) unsigned char smem[];
    // tile0: d(delta), then -beta 2^G y. The stage's do tile turns into scale 2^G do in place, so that two stages
    // of 128 value columns fit.
    WgPassSmem<T, St, KP, BV, NS, 1, 128 * NWG> sm(smem);

    const StatePassBlock pb(NVB, BV, BT, cu, T_, H, HV, K, V, flags);
    const int wg = threadIdx.x >> 7, c0 = wg * BVW;
    const auto ncols = [&](unsigned tile) { return b_mnmajor(tile, BV, c0); };  // this warpgroup's columns
    const auto issue = [&](int c, int s) {  // chunk c's inputs into stage s
        St::template issue<128 * NWG>(sm.stages + s * St::BYTES, sm.bars + s, pb, c, maps, v, dout, Gc, Bc, Rq, Rk,
                                      HV, V, flags);
    };

    WgAcc<MS, BVW> dS;  // this warpgroup's columns of the state gradient at the current chunk's end
    if (flags & F_DHT) load_state(dS, dht + pb.state_off, K, V, pb.v0 + c0, pb.vcols - c0);
    else dS.fill(0.f);

    if (PIPE && pb.nchunks > 0) issue(pb.nchunks - 1, 0);
#pragma unroll 1
    for (int c = pb.nchunks - 1; c >= 0; --c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        unsigned char* st = sm.template enter_chunk<PIPE>(pb.nchunks - 1 - c, c, c - 1, L, flags, issue);
        T* sV = reinterpret_cast<T*>(st + St::V);
        T* sDo = reinterpret_cast<T*>(st + St::DO);
        const i64 rows_off = (bos * HV + pb.hv) * V + pb.v0;  // the chunk's rows of dv and ybuf
        const unsigned aQ = smem_addr(st + St::Q), aK = smem_addr(st + St::K), aA = smem_addr(st + St::A),
                       aP = smem_addr(st + St::P), aDo = smem_addr(st + St::DO);
        sm.put_state(dS, c0);
        fence_proxy_async();
        __syncthreads();
        // d(delta) = 2^(G_last - G) (k dS) + P^T do
        WgAcc<1, BVW> Z, U;
        wg_fence();
        Z.template mma<T, false, true, KP>(a_kmajor_sw128(aK), ncols(sm.a_state), false);
        U.template mma<T, true, true, BT>(a_mnmajor_sw128(aP), ncols(aDo), false);
        wg_commit();
        sm.template copy_state_out<128 * NWG>(dhbuf + pb.chunk_state_off(seq_chunk0, c, HV, K, V), K, V, pb.v0,
                                              pb.vcols);
        wg_wait<0>();
        wg_barrier(wg);  // every warp's part of P^T do has read this warpgroup's do columns
        for (int idx = threadIdx.x & 127; idx < BT * BVW / 2; idx += 128) {  // do -> scale 2^G do, in place
            const int i = idx / (BVW / 2), e = blk(i, c0 + 2 * (idx % (BVW / 2)), BV);
            const float2 d = load_pair(sDo, e);
            const float f = scale * sm.rows.gq[i];
            store_pair(sDo, e, f * d.x, f * d.y);
        }
        Z.zip_pairs(U, [&](int i, int j, float& z0, float& z1, float& u0, float& u1) {
            const float l = sm.rows.lk[i];
            store_pair(sm.tile0, blk(i, c0 + j, BV), l * z0 + u0, l * z1 + u1);
        });
        fence_proxy_async();
        wg_barrier(wg);
        // y = A^T d(delta)
        wg_fence();
        Z.template mma<T, true, true, BT>(a_mnmajor_sw128(aA), ncols(sm.a0), false);
        wg_commit();
        wg_wait<0>();
        wg_barrier(wg);  // every warp's part of the product has read d(delta) before y's factor overwrites it
        Z.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float f = -sm.rows.B[i] * sm.rows.gk[i];
            store_pair(sm.tile0, blk(i, c0 + j, BV), f * x0, f * x1);
        });
        Z.template row_dots<BV>(sV, c0, [&](int i, float x) {
            if (i < L) part_yv[((i64)(NWG * pb.vb + wg) * BT_ + bos + i) * HV + pb.hv] = x;
        });
        // dv = beta y through this warpgroup's columns of the v tile (their last reader was this thread)
        Z.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float b = sm.rows.B[i];
            store_pair(sV, blk(i, c0 + j, BV), b * x0, b * x1);
        });
        decay_state<ScalarGate>(dS, sm.rows.G, 1, BT - 1);
        fence_proxy_async();
        wg_barrier(wg);
        // dS = 2^G_last dS + q^T (scale 2^G do) - k^T (beta 2^G y)
        wg_fence();
        dS.template mma<T, true, true, BT>(a_mnmajor_sw128(aQ), ncols(aDo), true);
        dS.template mma<T, true, true, BT>(a_mnmajor_sw128(aK), ncols(sm.a0), true);
        wg_commit();
        sm.template copy_cols_out<BVW>(dv + rows_off, HV, V, sV, L, c0, pb.vcols);
        wg_wait<0>();
        wg_barrier(wg);  // every warp's part of the product has read the scaled do before y overwrites it
        Z.apply_pairs([&](int i, int j, float& x0, float& x1) { store_pair(sDo, blk(i, c0 + j, BV), x0, x1); });
        wg_barrier(wg);
        sm.template copy_cols_out<BVW>(ybuf + rows_off, HV, V, sDo, L, c0, pb.vcols);
        __syncthreads();
    }
    if (flags & F_H0) store_state(dS, dh0 + pb.state_off, K, V, pb.v0 + c0, pb.vcols - c0);
}

// ---------------------------------------------------------------------------------------------
// One chunk's partial log-gate and beta gradients (over one key slice) from the gradients w.r.t. the decay
// exponents: C [BT x BT] (row stride ldc; rewritten in place) of the pair factors 2^(G_i - G_j), the row sums
// rowQ (q . dq_inter, decay 2^G_i; rewritten in place), rowK (k . dk_inter, 2^(G_last - G_j)), rowY (k . Yh,
// 2^G_i), rowB (sum_j dL_ij (k_i . k_j) E_ij), and this thread's part of <h, dh> (2^G_last). Blocks of NT
// threads, sRed NT / 32 floats. Writes part_dG and part_db at e0 + r HV for the chunk's rows r < L.
template <int BT, int NT>
__device__ __forceinline__ void chunk_gate_grads(float* sC, int ldc, const float* rowB, float* rowQ,
                                                 const float* rowK, const float* rowY, const float* sG,
                                                 const float* sB, float hdh, float* sRed, int L,
                                                 float* __restrict__ part_dG, float* __restrict__ part_db, i64 e0,
                                                 int HV) {
    hdh = warp_sum(hdh);
    if ((threadIdx.x & 31) == 0) sRed[threadIdx.x >> 5] = hdh;
    __syncthreads();
    float carried = 0.f;  // decay 2^G_last of the carried state spans every step
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) carried += sRed[w];
    carried *= exp2f(sG[BT - 1]);
    // rowQ becomes the whole per-row term of the spans s <= i, once per row instead of once per thread
    if ((int)threadIdx.x < BT) rowQ[threadIdx.x] -= sB[threadIdx.x] * exp2f(sG[threadIdx.x]) * rowY[threadIdx.x];
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
        part_dG[e0 + (i64)rs * HV] = carried + acc;
        part_db[e0 + (i64)rs * HV] = -exp2f(sG[rs]) * rowY[rs] + rowB[rs];
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
    const float* __restrict__ Bc, const float* __restrict__ Rq, const float* __restrict__ Rk,
    const T* __restrict__ hbuf, const T* __restrict__ dhbuf,
    const T* __restrict__ vnew, const T* __restrict__ ybuf, const i64* __restrict__ chunk_bos,
    const int* __restrict__ chunk_len, float* __restrict__ dq_hv, float* __restrict__ dk_hv,
    float* __restrict__ part_dG, float* __restrict__ part_db, int H, int HV, int K, int V, int NKS, i64 BT_,
    float scale, int flags) {
    using TT = typename InputTile<T, E>::type;
    constexpr int NW = 8, LDK = KS + PAD, LDV = BVB + PAD, LDM = BT + PAD, LDC = BT + 4;
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
    const float* sG = rows.G;
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
    rows.load(Gc, Bc, Rq, Rk, bos, L, BT, HV, hv, flags);
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
    D.apply_pairs([&](int i, int j, float& x0, float& x1) {
        const bool in = i < L;
        x0 = (in && j <= i) ? x0 * exp2f(sG[i] - sG[j]) * scale : 0.f;
        x1 = (in && j + 1 <= i) ? x1 * exp2f(sG[i] - sG[j + 1]) * scale : 0.f;
        tile_put_pair(sDM, i * LDM + j, x0, x1);
    });
    D2.apply_pairs([&](int i, int j, float& x0, float& x1) {
        const bool in = i < L;
        x0 = (in && j < i) ? -x0 * exp2f(sG[i] - sG[j]) : 0.f;
        x1 = (in && j + 1 < i) ? -x1 * exp2f(sG[i] - sG[j + 1]) : 0.f;
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

    Dq.apply([&](int i, int, float& x) { x *= exp2f(sG[i]) * scale; });
    acc_row_sums(Dq, [&](int i, int j, float x) { return x * tile_get(sQ, i * LDK + j); }, sScratch, rowQ);
    gemm<E, MK, KN, BT, KS, BT, NW, U>(Dq, sDM, LDM, sK, LDK);
    const float glast = sG[BT - 1];
    Dk.apply([&](int i, int, float& x) { x *= exp2f(glast - sG[i]); });
    acc_row_sums(Dk, [&](int i, int j, float x) { return x * tile_get(sK, i * LDK + j); }, sScratch, rowK);
    acc_row_sums(Yh, [&](int i, int j, float x) { return x * tile_get(sK, i * LDK + j); }, sScratch, rowY);
    gemm<E, KM, KN, BT, KS, BT, NW, U>(Dk, sDM, LDM, sQ, LDK);
    Dk.zip(Yh, [&](int i, int, float& x, float& y) { x -= sB[i] * exp2f(sG[i]) * y; });
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

    chunk_gate_grads<BT, NW * 32>(sC, LDC, rowB, rowQ, rowK, rowY, sG, sB, hdh, sRed, L, part_dG, part_db,
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
    static constexpr int BT = 64, BVB = 64, Q = 0, K = BT * KS * 2, RAW = 2 * BT * KS * 2, QK_BYTES = RAW + 4 * BT * 4,
                         DO = 0, Y = DO + BT * BVB * 2, DEL = Y + BT * BVB * 2, H = DEL + BT * BVB * 2,
                         DH = H + KS * BVB * 2, V_BYTES = DH + KS * BVB * 2;
    static_assert(V_BYTES >= 4 * BT * BT * 2, "a consumed V step holds the four score tiles");
};

template <typename T, int KSW, bool FUSE>
__global__ void __launch_bounds__(256, 1) gdn_chunk_bwd_dqk_wg_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ dout, const float* __restrict__ Gc,
    const float* __restrict__ Bc, const float* __restrict__ Rq, const float* __restrict__ Rk,
    const T* __restrict__ hbuf, const T* __restrict__ dhbuf, const T* __restrict__ vnew, const T* __restrict__ ybuf,
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
            ChunkRows::fetch_raw(reinterpret_cast<float*>(st + St::RAW), Gc, Bc, Rq, Rk, m.bos, m.L, BT, HV, m.hv,
                                 flags);
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
            rows.derive(reinterpret_cast<const float*>(sq + St::RAW), m.L, BT, flags);
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
        const float* sG = rows.G;
        const float* sB = rows.B;
        T* sDMr = reinterpret_cast<T*>(sv);  // DM_ij rk_j      (dq += DMr k)
        T* sDMq = sDMr + BT * BT;             // DM_ij rq_i      (dk += DMq^T q)
        T* sdKc = sDMq + BT * BT;             // dK_ij rk_j      (dk += dKc k)
        T* sdKr = sdKc + BT * BT;             // dK_ij rk_i      (dk += dKr^T k)
        // D becomes DM = scale D M, D2 becomes dL_ij E_ij (each decay evaluated once; select, never multiply:
        // it overflows above the diagonal); dK_ij = beta_i dL_ij E_ij
        D.zip_pairs(D2, [&](int i, int jj, float& d0, float& d1, float& e0, float& e1) {
            const int j = sw + jj;
            const bool in = i < m.L;
            const float x0 = in && j <= i ? exp2f(sG[i] - sG[j]) : 0.f;
            const float x1 = in && j + 1 <= i ? exp2f(sG[i] - sG[j + 1]) : 0.f;
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
        const float glast = sG[BT - 1];
        Dq.scale_rows([&](int i) { return exp2f(sG[i]) * scale; });
        Dk.scale_rows([&](int i) { return exp2f(glast - sG[i]); });
        Dq.template row_dots<KS>(sQ, kw, [&](int i, float x) { part[BT + i] = x * rows.rq[i]; });
        Dk.template row_dots<KS>(sK, kw, [&](int i, float x) { part[2 * BT + i] = x * rows.rk[i]; });
        Yh.template row_dots<KS>(sK, kw, [&](int i, float x) { part[3 * BT + i] = x * rows.rk[i]; });
        Yh.scale_rows([&](int i) { return -sB[i] * exp2f(sG[i]); });
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
        chunk_gate_grads<BT, 256>(sC, LDC, sRow, sRow + BT, sRow + 2 * BT, sRow + 3 * BT, sG, sB, hdh, sRed, m.L,
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
