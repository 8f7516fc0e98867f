// Gated delta rule, chunked mode: forward and backward on tensor cores (mma.sync, fp32 accumulation).
// Math and the backward derivation: rawdelta/ops/gated_delta_rule/README.md ("Chunked form").
//
// Layouts (C-contiguous; BT_ = B * T flattened tokens, NC chunks in all, chunks never cross sequences):
//   q, k [BT_, H, K] (T)   v, o, do [BT_, HV, V] (T)   g, beta [BT_, HV] (float)
//   Gc, Bc [BT_, HV] float: chunk-local cumulative log2 gates, effective beta (prepare kernel)
//   hbuf, dhbuf [NC, HV, K, V] (T): state at each chunk's start / its gradient at the chunk's end
//   vnew, ybuf [BT_, HV, V] (T): delta = A r and y = A^T d(delta), per chunk
//
//   Ahi, Alo [BT_, HV, BT] (E): row r of the chunk's (I + L)^-1 at token r, split into hi + lo parts
//
// Template parameters: T input dtype; E the 16-bit mma type (bf16 for bf16 and float inputs, fp16 for
// fp16); BT chunk size; KP the key dimension padded to 64/128/256; BV the value columns per block of
// the state passes. Tiles of input precision are E tiles (Split<E> for float inputs); states, inverses
// and other float32 intermediates are Split<E> tiles, so their products keep ~16 mantissa bits.
#include "common/chunk_stages.cuh"
#include "gated_delta_rule/gdn_common.cuh"

using namespace rawdelta;

constexpr int PAD = 8;  // elements added to every 16-bit tile row: ldmatrix without bank conflicts

__global__ void __launch_bounds__(1024) gdn_chunk_table_kernel(const i64* __restrict__ cu, int N, int T_, int BT,
                                                                int* seq_chunk0, i64* chunk_bos, int* chunk_len,
                                                                int flags) {
    build_chunk_table(cu, N, T_, BT, (flags & F_VARLEN) != 0, seq_chunk0, chunk_bos, chunk_len);
}

// ---------------------------------------------------------------------------------------------
// Prepare: per (chunk, value head) the cumulative log2 gates, the effective beta and
// A = (I + L)^-1 with L_ij = beta_i (k_i . k_j) 2^(G_i - G_j), i > j.
template <typename T, typename E, int BT, int KP>
__global__ void __launch_bounds__(128) gdn_chunk_prepare_kernel(
    const T* __restrict__ k, const float* __restrict__ g, const float* __restrict__ beta,
    const float* __restrict__ A_log, const float* __restrict__ dt_bias, const i64* __restrict__ chunk_bos,
    const int* __restrict__ chunk_len, float* __restrict__ Gc, float* __restrict__ Bc, E* __restrict__ Ahi,
    E* __restrict__ Alo, int H, int HV, int K, int flags) {
    using TT = typename InputTile<T, E>::type;
    constexpr int LDK = KP + PAD, LDA = BT + 4;
    extern __shared__ __align__(16) unsigned char smem[];
    SmemCursor cur{smem};
    TT sK;
    cur.into(sK, BT * LDK);
    float* sL = cur.take<float>(BT * LDA);
    float* sA = cur.take<float>(BT * LDA);
    float* sX = cur.take<float>(16 * LDA);
    float* sG = cur.take<float>(BT);
    float* sB = cur.take<float>(BT);

    const int c = blockIdx.x / HV, hv = blockIdx.x % HV, h = hv / (HV / H);
    const i64 bos = chunk_bos[c];
    const int L = chunk_len[c];
    load_tile(sK, LDK, k + (bos * H + h) * K, (i64)H * K, L, K, BT, KP);
    for (int r = threadIdx.x; r < BT; r += blockDim.x) {
        const i64 th = (bos + r) * HV + hv;
        sG[r] = r < L ? scalar_log_gate(g, A_log, dt_bias, th, hv, flags) : 0.f;
        sB[r] = r < L ? beta_value(beta, th, flags) : 0.f;
    }
    cp_async_wait_all();
    __syncthreads();
    if (flags & F_L2) l2norm_rows(sK, LDK, L, K);
    if (threadIdx.x < 32) chunk_local_cumsum_log2(sG, 1, 1, L, BT);
    __syncthreads();
    for (int r = threadIdx.x; r < L; r += blockDim.x) {
        Gc[(bos + r) * HV + hv] = sG[r];
        Bc[(bos + r) * HV + hv] = sB[r];
    }
    Acc<BT, BT, 4> P;
    P.fill(0.f);
    gemm<E, MK, NK, BT, BT, KP, 4>(P, sK, LDK, sK, LDK);
    P.apply([&](int i, int j, float& x) {
        sL[i * LDA + j] = (j < i && i < L) ? sB[i] * x * exp2f(sG[i] - sG[j]) : 0.f;
    });
    __syncthreads();
    invert_unit_lower<BT>(sL, sA, sX, LDA);
    const Split<E> out{Ahi, Alo};
    for (int idx = threadIdx.x; idx < L * BT; idx += blockDim.x) {
        const int r = idx / BT, j = idx % BT;
        split_store(out, (int)(((bos + r) * HV + hv) * BT + j), sA[r * LDA + j]);
    }
}

// Per-chunk scalars into shared memory: cumulative log2 gates (rows past the chunk repeat the last,
// so every decay stays finite) and the effective beta (0 past the chunk).
__device__ __forceinline__ void load_chunk_scalars(float* sG, float* sB, const float* Gc, const float* Bc, i64 bos,
                                                   int L, int BT, int HV, int hv) {
    for (int r = threadIdx.x; r < BT; r += blockDim.x) {
        const i64 th = (bos + (r < L ? r : L - 1)) * HV + hv;
        sG[r] = Gc[th];
        sB[r] = r < L ? Bc[th] : 0.f;
    }
}

// The chunk's (I + L)^-1 rows [bos, bos + L) into a split tile (zero rows past the chunk).
template <typename E, int BT>
__device__ __forceinline__ void load_inverse(Split<E> sA, int lda, const E* Ahi, const E* Alo, i64 bos, int L, int HV,
                                             int hv) {
    load_tile(sA.hi, lda, Ahi + (bos * HV + hv) * BT, (i64)HV * BT, L, BT, BT, BT);
    load_tile(sA.lo, lda, Alo + (bos * HV + hv) * BT, (i64)HV * BT, L, BT, BT, BT);
}

// State tile [K, V] (row stride V) <-> a KP x BV accumulator at value columns [v0, v0 + vcols).
template <typename TS, int KP, int BV, int NW>
__device__ __forceinline__ void store_state(Acc<KP, BV, NW>& S, TS* dst, int K, int V, int v0, int vcols) {
    S.apply([&](int r, int c, float& x) {
        if (r < K && c < vcols) dst[(i64)r * V + v0 + c] = from_float<TS>(x);
    });
}
template <int KP, int BV, int NW>
__device__ __forceinline__ void load_state(Acc<KP, BV, NW>& S, const float* src, int K, int V, int v0, int vcols) {
    S.apply([&](int r, int c, float& x) { x = (r < K && c < vcols) ? src[(i64)r * V + v0 + c] : 0.f; });
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
    const float* __restrict__ Bc, const E* __restrict__ Ahi, const E* __restrict__ Alo,
    const float* __restrict__ h0, const i64* __restrict__ cu, const int* __restrict__ seq_chunk0,
    T* __restrict__ o, float* __restrict__ ht, T* __restrict__ hbuf, T* __restrict__ vnew, int T_, int H, int HV,
    int K, int V, int NVB, float scale, int flags) {
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
    float* sG = cur.take<float>(BT);
    float* sB = cur.take<float>(BT);

    const int vb = blockIdx.x % NVB, nh = blockIdx.x / NVB, hv = nh % HV, n = nh / HV, h = hv / (HV / H);
    const int v0 = vb * BV, vcols = min(BV, V - v0);
    const SeqRange sr = seq_range(cu, n, T_, flags);
    const int len = (int)(sr.eos - sr.bos), nchunks = (len + BT - 1) / BT;
    const i64 state_off = ((i64)n * HV + hv) * K * V;

    Acc<KP, BV, NW> S;
    if (flags & F_H0) load_state(S, h0 + state_off, K, V, v0, vcols);
    else S.fill(0.f);

#pragma unroll 1
    for (int c = 0; c < nchunks; ++c) {
        const i64 bos = sr.bos + (i64)c * BT;
        const int L = min(BT, len - c * BT);
        if (!STORE) load_tile(sQ, LDK, q + (bos * H + h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sK, LDK, k + (bos * H + h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sVD, LDV, v + (bos * HV + hv) * V + v0, (i64)HV * V, L, vcols, BT, BV);
        load_inverse<E, BT>(sA, LDA, Ahi, Alo, bos, L, HV, hv);
        load_chunk_scalars(sG, sB, Gc, Bc, bos, L, BT, HV, hv);
        S.store(sS, LDV);
        if (STORE) store_state(S, hbuf + ((i64)(seq_chunk0[n] + c) * HV + hv) * K * V, K, V, v0, vcols);
        cp_async_wait_all();
        __syncthreads();
        if (flags & F_L2) {
            if (!STORE) l2norm_rows(sQ, LDK, L, K);
            l2norm_rows(sK, LDK, L, K);
            __syncthreads();
        }
        Acc<BT, BV, NW> X;
        X.fill(0.f);
        gemm<E, MK, KN, BT, BV, KP, NW>(X, sK, LDK, sS, LDV);
        X.apply([&](int i, int j, float& x) {
            tile_put(sR, i * LDV + j, sB[i] * (tile_get(sVD, i * LDV + j) - exp2f(sG[i]) * x));
        });
        Acc<BT, BV, NW> Y;
        if (!STORE) {
            Y.fill(0.f);
            gemm<E, MK, KN, BT, BV, KP, NW>(Y, sQ, LDK, sS, LDV);
            Acc<BT, BT, NW> P;
            P.fill(0.f);
            gemm<E, MK, NK, BT, BT, KP, NW>(P, sQ, LDK, sK, LDK);
            mask_decay_scores<false>(P, sG, L, scale);
            P.store(sP, LDP);
        }
        __syncthreads();
        Acc<BT, BV, NW> D;
        D.fill(0.f);
        gemm<E, MK, KN, BT, BV, BT, NW>(D, sA, LDA, sR, LDV);
        const float glast = sG[BT - 1];
        D.apply([&](int i, int j, float& x) {
            if (!STORE) tile_put(sVD, i * LDV + j, x);
            tile_put(sDt, i * LDV + j, x * exp2f(glast - sG[i]));
            if (STORE && i < L && j < vcols) vnew[((bos + i) * HV + hv) * V + v0 + j] = from_float<T>(x);
        });
        __syncthreads();
        if (!STORE) {
            scale_inter_output(Y, sG, scale);
            gemm<E, MK, KN, BT, BV, BT, NW>(Y, sP, LDP, sVD, LDV);
            Y.apply([&](int i, int j, float& x) {
                if (i < L && j < vcols) o[((bos + i) * HV + hv) * V + v0 + j] = from_float<T>(x);
            });
        }
        decay_state<ScalarGate>(S, sG, 1, BT - 1);
        gemm<E, KM, KN, KP, BV, BT, NW>(S, sK, LDK, sDt, LDV);
        __syncthreads();
    }
    if (!STORE && (flags & F_HT)) store_state(S, ht + state_off, K, V, v0, vcols);
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
    const float* __restrict__ Bc, const E* __restrict__ Ahi, const E* __restrict__ Alo, const T* __restrict__ dout,
    const float* __restrict__ dht, const i64* __restrict__ cu, const int* __restrict__ seq_chunk0,
    T* __restrict__ dhbuf, T* __restrict__ ybuf, T* __restrict__ dv, float* __restrict__ part_yv,
    float* __restrict__ dh0, int T_, int H, int HV, int K, int V, int NVB, i64 BT_, float scale, int flags) {
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
    float* sG = cur.take<float>(BT);
    float* sB = cur.take<float>(BT);
    float* sScratch = cur.take<float>(AccV::WN * BT);
    float* sRow = cur.take<float>(BT);

    const int vb = blockIdx.x % NVB, nh = blockIdx.x / NVB, hv = nh % HV, n = nh / HV, h = hv / (HV / H);
    const int v0 = vb * BV, vcols = min(BV, V - v0);
    const SeqRange sr = seq_range(cu, n, T_, flags);
    const int len = (int)(sr.eos - sr.bos), nchunks = (len + BT - 1) / BT;
    const i64 state_off = ((i64)n * HV + hv) * K * V;

    Acc<KP, BV, NW> dS;
    if (flags & F_DHT) load_state(dS, dht + state_off, K, V, v0, vcols);
    else dS.fill(0.f);

#pragma unroll 1
    for (int c = nchunks - 1; c >= 0; --c) {
        const i64 bos = sr.bos + (i64)c * BT;
        const int L = min(BT, len - c * BT);
        load_tile(sQ, LDK, q + (bos * H + h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sK, LDK, k + (bos * H + h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sDo, LDV, dout + (bos * HV + hv) * V + v0, (i64)HV * V, L, vcols, BT, BV);
        load_inverse<E, BT>(sA, LDA, Ahi, Alo, bos, L, HV, hv);
        load_chunk_scalars(sG, sB, Gc, Bc, bos, L, BT, HV, hv);
        dS.store(sS, LDV);
        store_state(dS, dhbuf + ((i64)(seq_chunk0[n] + c) * HV + hv) * K * V, K, V, v0, vcols);
        cp_async_wait_all();
        __syncthreads();
        if (flags & F_L2) {
            l2norm_rows(sQ, LDK, L, K);
            l2norm_rows(sK, LDK, L, K);
            __syncthreads();
        }
        const float glast = sG[BT - 1];
        {
            Acc<BT, BT, NW> P;
            P.fill(0.f);
            gemm<E, MK, NK, BT, BT, KP, NW>(P, sQ, LDK, sK, LDK);
            mask_decay_scores<false>(P, sG, L, scale);
            P.store(sP, LDP);
        }
        AccV Z;
        Z.fill(0.f);
        gemm<E, MK, KN, BT, BV, KP, NW>(Z, sK, LDK, sS, LDV);
        Z.apply([&](int i, int, float& x) { x *= exp2f(glast - sG[i]); });
        for (int idx = threadIdx.x; idx < BT * BV; idx += blockDim.x) {
            const int i = idx / BV, j = idx % BV;
            tile_put(sDoG, i * LDV + j, scale * exp2f(sG[i]) * tile_get(sDo, i * LDV + j));
        }
        __syncthreads();
        gemm<E, KM, KN, BT, BV, BT, NW>(Z, sP, LDP, sDo, LDV);
        Z.store(sT, LDV);
        __syncthreads();
        AccV Yc;
        Yc.fill(0.f);
        gemm<E, KM, KN, BT, BV, BT, NW>(Yc, sA, LDA, sT, LDV);
        __syncthreads();
        Yc.apply([&](int i, int j, float& x) {
            if (i < L && j < vcols) {
                const i64 e = ((bos + i) * HV + hv) * V + v0 + j;
                dv[e] = from_float<T>(sB[i] * x);
                ybuf[e] = from_float<T>(x);
            }
            tile_put(sT, i * LDV + j, -sB[i] * exp2f(sG[i]) * x);
        });
        acc_row_sums(Yc, [&](int i, int j, float x) {
            return (i < L && j < vcols) ? x * to_float(v[((bos + i) * HV + hv) * V + v0 + j]) : 0.f;
        }, sScratch, sRow);
        for (int i = threadIdx.x; i < L; i += blockDim.x) part_yv[((i64)vb * BT_ + bos + i) * HV + hv] = sRow[i];
        decay_state<ScalarGate>(dS, sG, 1, BT - 1);
        gemm<E, KM, KN, KP, BV, BT, NW>(dS, sQ, LDK, sDoG, LDV);
        gemm<E, KM, KN, KP, BV, BT, NW>(dS, sK, LDK, sT, LDV);
        __syncthreads();
    }
    if (flags & F_H0) store_state(dS, dh0 + state_off, K, V, v0, vcols);
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
__global__ void __launch_bounds__(256) gdn_chunk_bwd_dqk_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ dout, const float* __restrict__ Gc,
    const float* __restrict__ Bc, const T* __restrict__ hbuf, const T* __restrict__ dhbuf,
    const T* __restrict__ vnew, const T* __restrict__ ybuf, const i64* __restrict__ chunk_bos,
    const int* __restrict__ chunk_len, float* __restrict__ dq_hv, float* __restrict__ dk_hv,
    float* __restrict__ part_dG, float* __restrict__ part_db, int H, int HV, int K, int V, int NKS, i64 BT_,
    float scale, int flags) {
    using TT = typename InputTile<T, E>::type;
    constexpr int NW = 8, LDK = KS + PAD, LDV = BVB + PAD, LDM = BT + PAD, LDC = BT + 4;
    using AccQ = Acc<BT, KS, NW>;
    using AccP = Acc<BT, BT, NW>;
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
    float* sG = cur.take<float>(BT);
    float* sB = cur.take<float>(BT);
    float* sRn = cur.take<float>(2 * BT);
    float* sScratch = cur.take<float>(NW * BT);  // max(WN, WM) * BT floats
    float* sRow = cur.take<float>(4 * BT);       // 4 row vectors of BT
    float* sRed = cur.take<float>(NW * 32);      // one float per thread

    const int ks = blockIdx.x % NKS, ch = blockIdx.x / NKS, hv = ch % HV, c = ch / HV, h = hv / (HV / H);
    const i64 bos = chunk_bos[c];
    const int L = chunk_len[c], k0 = ks * KS, kc = min(KS, K - k0);
    const i64 hoff = ((i64)c * HV + hv) * K * V + (i64)k0 * V;

    load_tile(sQ, LDK, q + (bos * H + h) * K + k0, (i64)H * K, L, kc, BT, KS);
    load_tile(sK, LDK, k + (bos * H + h) * K + k0, (i64)H * K, L, kc, BT, KS);
    load_chunk_scalars(sG, sB, Gc, Bc, bos, L, BT, HV, hv);
    cp_async_wait_all();
    __syncthreads();
    if (flags & F_L2) {  // norms over the full key rows, not just this slice
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        for (int rr = warp; rr < 2 * BT; rr += NW) {
            const int r = rr % BT;
            const T* x = (rr < BT ? q : k) + ((bos + r) * H + h) * K;
            float ss = 0.f;
            if (r < L)
                for (int d = lane; d < K; d += 32) ss += to_float(x[d]) * to_float(x[d]);
            ss = warp_sum(ss);
            if (lane == 0) sRn[rr] = rsqrtf(ss + 1e-6f);
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < BT * KS; idx += blockDim.x) {
            const int r = idx / KS, d = idx % KS;
            tile_put(sQ, r * LDK + d, tile_get(sQ, r * LDK + d) * sRn[r]);
            tile_put(sK, r * LDK + d, tile_get(sK, r * LDK + d) * sRn[BT + r]);
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
        for (int idx = threadIdx.x; idx < KS * BVB; idx += blockDim.x)
            hdh += tile_get(sH, (idx / BVB) * LDV + idx % BVB) * tile_get(sDh, (idx / BVB) * LDV + idx % BVB);
        gemm<E, MK, NK, BT, KS, BVB, NW>(Dq, sDo, LDV, sH, LDV);
        gemm<E, MK, NK, BT, KS, BVB, NW>(Yh, sY, LDV, sH, LDV);
        gemm<E, MK, NK, BT, KS, BVB, NW>(Dk, sDel, LDV, sDh, LDV);
        gemm<E, MK, NK, BT, BT, BVB, NW>(D, sDo, LDV, sDel, LDV);
        gemm<E, MK, NK, BT, BT, BVB, NW>(D2, sY, LDV, sDel, LDV);
        __syncthreads();
    }

    // Scores: DM (output path) and dK (through L).
    AccP KK, C;
    KK.fill(0.f);
    C.fill(0.f);
    gemm<E, MK, NK, BT, BT, KS, NW>(KK, sK, LDK, sK, LDK);
    gemm<E, MK, NK, BT, BT, KS, NW>(C, sQ, LDK, sK, LDK);
    D.apply([&](int i, int j, float& x) {
        tile_put(sDM, i * LDM + j, (j <= i && i < L) ? x * exp2f(sG[i] - sG[j]) * scale : 0.f);
    });
    D2.apply([&](int i, int j, float& x) {  // select, never multiply: 2^(G_i - G_j) overflows above the diagonal
        const bool keep = j < i && i < L;
        x = keep ? -x : 0.f;
        tile_put(sDK, i * LDM + j, keep ? x * sB[i] * exp2f(sG[i] - sG[j]) : 0.f);
    });
    // KK becomes W_ij = dL_ij (k_i . k_j) E_ij (this key slice's part); beta_i W_ij = dL_ij L_ij.
    KK.zip(D2, [&](int i, int j, float& x, float& dl) { x = (j < i && i < L) ? dl * x * exp2f(sG[i] - sG[j]) : 0.f; });
    // C_ij: the gradient w.r.t. the exponent of the decay 2^(G_i - G_j), which spans the steps j < s <= i:
    // the intra-chunk output's DM_ij (q_i . k_j) plus the WY inverse's dL_ij L_ij.
    C.zip(D, [&](int i, int j, float& x, float& d) {
        x = (j <= i && i < L) ? x * d * exp2f(sG[i] - sG[j]) * scale : 0.f;
    });
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
    gemm<E, MK, KN, BT, KS, BT, NW>(Dq, sDM, LDM, sK, LDK);
    const float glast = sG[BT - 1];
    Dk.apply([&](int i, int, float& x) { x *= exp2f(glast - sG[i]); });
    acc_row_sums(Dk, [&](int i, int j, float x) { return x * tile_get(sK, i * LDK + j); }, sScratch, rowK);
    acc_row_sums(Yh, [&](int i, int j, float x) { return x * tile_get(sK, i * LDK + j); }, sScratch, rowY);
    gemm<E, KM, KN, BT, KS, BT, NW>(Dk, sDM, LDM, sQ, LDK);
    Dk.zip(Yh, [&](int i, int, float& x, float& y) { x -= sB[i] * exp2f(sG[i]) * y; });
    gemm<E, MK, KN, BT, KS, BT, NW>(Dk, sDK, LDM, sK, LDK);
    gemm<E, KM, KN, BT, KS, BT, NW>(Dk, sDK, LDM, sK, LDK);

    const i64 qrow = (bos * HV + hv) * K + k0;
    Dq.apply([&](int i, int j, float& x) {
        if (i < L && j < kc) dq_hv[qrow + (i64)i * HV * K + j] = x;
    });
    Dk.apply([&](int i, int j, float& x) {
        if (i < L && j < kc) dk_hv[qrow + (i64)i * HV * K + j] = x;
    });

    sRed[threadIdx.x] = hdh;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int t = 0; t < (int)blockDim.x; ++t) s += sRed[t];
        sRed[0] = exp2f(glast) * s;  // decay 2^G_last of the carried state spans every step
    }
    __syncthreads();
    // Gradient of each step's log-gate: the sum of the decay-exponent gradients of every factor spanning it
    // (summing spans directly, instead of a reverse cumsum of per-row terms, avoids cancelling large terms).
    // The pair factors' spans are rectangles of C: row-wise exclusive prefixes first, then column sums.
    for (int i = threadIdx.x; i < L; i += blockDim.x) {
        float run = 0.f;
        for (int j = 0; j < L; ++j) {
            const float x = sC[i * LDC + j];
            sC[i * LDC + j] = run;
            run += x;
        }
    }
    __syncthreads();
    for (int s = threadIdx.x; s < L; s += blockDim.x) {
        float dg = sRed[0], rect = 0.f;
        for (int i = s; i < L; ++i) dg += rowQ[i] - sB[i] * exp2f(sG[i]) * rowY[i];
        for (int j = 0; j < s; ++j) dg += rowK[j];
        for (int i = s; i < L; ++i) rect += sC[i * LDC + s];
        const i64 e = ((i64)ks * BT_ + bos + s) * HV + hv;
        part_dG[e] = dg + rect;
        part_db[e] = -exp2f(sG[s]) * rowY[s] + rowB[s];
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
