// Gated delta rule, recurrent mode: forward (also the in-place decode step) and backward.
// Math: rawdelta/ops/gated_delta_rule/README.md. Layouts (all C-contiguous):
//   q, k [BT, H, K] (T dtype)   v, o [BT, HV, V] (T dtype)   g, beta [BT, HV]   gk [BT, HV, K]
//   gv, beta_v [BT, HV, V]      state h0 / ht / dht / dh0 [N, HV, K, V], or [N, HV, V, K] with F_V_FIRST (float32)
// BT = B * T flattened tokens; with cu_seqlens (B == 1) sequence n covers tokens [cu[n], cu[n+1]).
// Each column j of the K x V state evolves independently, so threads own (column, rows) slices.
// A decay of 0 (a reset) and a zero cotangent are selected, never multiplied: a NaN or an infinity at a token
// reaches neither the earlier tokens' outputs nor, through a zero cotangent, their gradients.
#include "gated_delta_rule/gdn_common.cuh"

using namespace rawdelta;

// Offset of state element (row r, column j) of (n, hv) = nh: [K, V] rows, or [V, K] columns with v_first.
__device__ __forceinline__ i64 state_at(i64 nh, int r, int j, int K, int V, bool v_first) {
    return v_first ? (nh * V + j) * K + r : (nh * K + r) * V + j;
}

// An unsigned type of BYTES bytes: one vector load of that many bytes.
template <int BYTES> struct VecOf;
template <> struct VecOf<2> { typedef unsigned short type; };
template <> struct VecOf<4> { typedef unsigned int type; };
template <> struct VecOf<8> { typedef uint2 type; };
template <> struct VecOf<16> { typedef uint4 type; };

// KPT consecutive elements [r0, r0 + KPT) of a row of length K; 16-byte loads when aligned and in range.
template <typename T, int KPT>
__device__ __forceinline__ void load_row_chunk(const T* __restrict__ row, int r0, int K, float (&out)[KPT]) {
    constexpr int VEC = 16 / sizeof(T);
    if (KPT % VEC == 0 && r0 + KPT <= K && ((reinterpret_cast<size_t>(row + r0) & 15) == 0)) {
#pragma unroll
        for (int c = 0; c < KPT / VEC; ++c) {
            uint4 raw = *reinterpret_cast<const uint4*>(row + r0 + c * VEC);
            const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int x = 0; x < VEC; ++x) out[c * VEC + x] = to_float(e[x]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < KPT; ++i) out[i] = (r0 + i < K) ? to_float(row[r0 + i]) : 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward (also the decode step). Block = W warps over CG * 4 columns x all K rows of one (n, hv).
// Thread: 4 consecutive columns (one 16-byte float4 of a state row; CG lanes cover CG * 16 bytes of a
// row) x RPT consecutive rows; 32 / CG row parts per warp x W warps, so K <= (32 / CG) * W * RPT.
// Column dot products reduce over the in-warp row parts with shuffles, then over the warps in shared
// memory. Grid: N * HV * NVB blocks, NVB = ceil(V / (4 * CG)). The package launches CG = 8, W = 4
// (cuda_recurrent.py says why); benchmarks/decode_gdn.py also times other geometries.
// ht may alias h0 (each thread reads its elements before it writes them): the in-place decode update.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void load_state4(const float* row, int j0, int V, bool vec, float (&x)[4]) {
    if (vec) {  // streaming: each state element is read once and written once per call
        const float4 t = __ldcs(reinterpret_cast<const float4*>(row + j0));
        x[0] = t.x; x[1] = t.y; x[2] = t.z; x[3] = t.w;
    } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) x[c] = (j0 + c < V) ? row[j0 + c] : 0.f;
    }
}

__device__ __forceinline__ void store_state4(float* row, int j0, int V, bool vec, const float (&x)[4]) {
    if (vec) {
        __stcs(reinterpret_cast<float4*>(row + j0), make_float4(x[0], x[1], x[2], x[3]));
    } else {
#pragma unroll
        for (int c = 0; c < 4; ++c)
            if (j0 + c < V) row[j0 + c] = x[c];
    }
}

// Sum of x[0..4) and of `extra` over all row parts of the block; every thread gets the totals of its
// 4 columns. `red` is [W][4 * CG + 1] shared floats; one __syncthreads.
template <int CG, int W>
__device__ __forceinline__ void block_column_sum(float (&x)[4], float& extra, float* red, int warp, int lane) {
    constexpr int COLS = 4 * CG;
#pragma unroll
    for (int c = 0; c < 4; ++c) x[c] = lane_group_sum<CG, 32 / CG>(x[c]);
    extra = lane_group_sum<CG, 32 / CG>(extra);
    if (lane < CG) {
#pragma unroll
        for (int c = 0; c < 4; ++c) red[warp * (COLS + 1) + lane * 4 + c] = x[c];
        if (lane == 0) red[warp * (COLS + 1) + COLS] = extra;
    }
    __syncthreads();
    const int cg = lane & (CG - 1);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) acc += red[w * (COLS + 1) + cg * 4 + c];
        x[c] = acc;
    }
    float e = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) e += red[w * (COLS + 1) + COLS];
    extra = e;
}

// ONE_STEP: every sequence has at most one token (decoding). MINB: blocks per SM the register
// allocation must allow (occupancy, hence bytes in flight, for the memory-bound decode step). RULE: the update rule
// and the direction of time (gdn_common.cuh).
template <typename T, int RPT, int CG, int W, bool ONE_STEP, int MINB, int RULE>
__global__ void __launch_bounds__(W * 32, MINB)
gdn_recurrent_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const float* __restrict__ g, const float* __restrict__ gk, const float* __restrict__ gv,
                         const float* __restrict__ beta, const float* h0, const float* __restrict__ A_log,
                         const float* __restrict__ dt_bias, const i64* __restrict__ cu_seqlens,
                         T* __restrict__ o, float* ht, int T_, int H, int HV, int K, int V, int NVB, float scale,
                         int flags) {
    constexpr int COLS = 4 * CG, RPW = 32 / CG;
    // Two buffers: a thread may start the next reduction while others still read the previous one.
    __shared__ float red[2][W * (COLS + 1)];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cg = lane & (CG - 1), rp = warp * RPW + lane / CG;
    const i64 blk = blockIdx.x;
    const int vb = (int)(blk % NVB);
    const i64 nh = blk / NVB;
    const int hv = (int)(nh % HV), n = (int)(nh / HV);
    const int h = hv / (HV / H);
    const int j0 = vb * COLS + cg * 4;
    const bool vec = (V % 4 == 0) && (j0 + 4 <= V);
    const int r0 = rp * RPT;

    float S[RPT][4];
    const float* h0n = h0 + nh * K * V;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        if ((flags & F_H0) && r0 + i < K) load_state4(h0n + (i64)(r0 + i) * V, j0, V, vec, S[i]);
        else S[i][0] = S[i][1] = S[i][2] = S[i][3] = 0.f;
    }

    const SeqRange sr = seq_range(cu_seqlens, n, T_, (flags & F_VARLEN) != 0);
    const i64 steps = ONE_STEP ? min(sr.eos - sr.bos, (i64)1) : sr.eos - sr.bos;
    const TokenWalk<RULE> walk(sr.bos, sr.eos, steps);
#pragma unroll 1
    for (i64 t = walk.first; t != walk.end; t += walk.STEP) {
        const i64 th = t * HV + hv;
        float kk[RPT], qq[RPT];
        load_row_chunk<T, RPT>(k + (t * H + h) * K, r0, K, kk);
        load_row_chunk<T, RPT>(q + (t * H + h) * K, r0, K, qq);
        const float sdecay = __expf(scalar_log_gate(g, A_log, dt_bias, th, hv, flags));
        float cdecay[4], b[4], vj[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int j = j0 + c;
            const bool ok = j < V;
            cdecay[c] = ((flags & F_GV) && ok) ? sdecay * __expf(gv[th * V + j]) : sdecay;
            b[c] = beta_value(beta, (flags & F_BETA_V) ? th * V + (ok ? j : 0) : th, flags);
            vj[c] = ok ? to_float(v[th * V + j]) : 0.f;
        }
        float ks[4] = {0.f, 0.f, 0.f, 0.f}, kn = 0.f;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const float rd = ((flags & F_GK) && r0 + i < K) ? __expf(gk[th * K + r0 + i]) : 1.f;
            kn += kk[i] * kk[i];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float d = rd * cdecay[c];
                S[i][c] = d != 0.f ? S[i][c] * d : 0.f;  // a reset discards the state, even a non-finite one
                ks[c] += S[i][c] * kk[i];
            }
        }
        float rk = 1.f, delta[4];
        if constexpr (plain_rule(RULE)) {
#pragma unroll
            for (int c = 0; c < 4; ++c) delta[c] = vj[c];
        } else {
            block_column_sum<CG, W>(ks, kn, red[0], warp, lane);
            rk = (flags & F_L2) ? rsqrtf(kn + 1e-6f) : 1.f;
#pragma unroll
            for (int c = 0; c < 4; ++c) delta[c] = b[c] * (vj[c] - rk * ks[c]);
        }
        float os[4] = {0.f, 0.f, 0.f, 0.f}, qn = 0.f;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const float kh = rk * kk[i];
            qn += qq[i] * qq[i];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                S[i][c] += kh * delta[c];
                os[c] += S[i][c] * qq[i];
            }
        }
        block_column_sum<CG, W>(os, qn, red[1], warp, lane);
        const float oscale = scale * ((flags & F_L2) ? rsqrtf(qn + 1e-6f) : 1.f);
        if (rp == 0) {
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (j0 + c < V) o[th * V + j0 + c] = from_float<T>(oscale * os[c]);
        }
    }
    if (flags & F_HT) {
        float* htn = ht + nh * K * V;
#pragma unroll
        for (int i = 0; i < RPT; ++i)
            if (r0 + i < K) store_state4(htn + (i64)(r0 + i) * V, j0, V, vec, S[i]);
    }
}

// G elements [r, r + G) of a column of K floats (0 past K, all 0 unless ok); float4s when vec (K % 4 == 0).
template <int G>
__device__ __forceinline__ void load_col(const float* col, int r, int K, bool ok, bool vec, float (&x)[G]) {
    if constexpr (G % 4 == 0) {
        if (vec) {
#pragma unroll
            for (int e = 0; e < G; e += 4) {
                const bool in = ok && r + e < K;
                const float4 t = in ? __ldcs(reinterpret_cast<const float4*>(col + r + e)) : make_float4(0, 0, 0, 0);
                x[e] = t.x; x[e + 1] = t.y; x[e + 2] = t.z; x[e + 3] = t.w;
            }
            return;
        }
    }
#pragma unroll
    for (int e = 0; e < G; ++e) x[e] = (ok && r + e < K) ? col[r + e] : 0.f;
}

template <int G>
__device__ __forceinline__ void store_col(float* col, int r, int K, bool ok, bool vec, const float (&x)[G]) {
    if (!ok) return;
    if constexpr (G % 4 == 0) {
        if (vec) {
#pragma unroll
            for (int e = 0; e < G; e += 4)
                if (r + e < K)
                    __stcs(reinterpret_cast<float4*>(col + r + e), make_float4(x[e], x[e + 1], x[e + 2], x[e + 3]));
            return;
        }
    }
#pragma unroll
    for (int e = 0; e < G; ++e)
        if (r + e < K) col[r + e] = x[e];
}

// ---------------------------------------------------------------------------------------------
// Forward with [N, HV, V, K] states (F_V_FIRST): the same step, mirrored so that the state moves in whole lines.
// A warp owns JC value columns and all K rows: lane l holds rows m * 128 + 4 * l + x (x < 4, m < RL / 4), so each
// access of a column is one 16-byte float4 per lane and 512 contiguous bytes per warp. Column dot products are warp
// sums: no shared memory and no block barrier, warps are independent. K <= 32 * RL.
// Grid: N * HV * NVB blocks of W warps, NVB = ceil(V / (W * JC)). ht may alias h0, as above.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int lane_row(int i, int lane) { return i / 4 * 128 + 4 * lane + i % 4; }

// Rows lane_row(i, lane) of a row of length K: one vector load per 4 when aligned and in range; 0 past K.
template <typename T, int RL>
__device__ __forceinline__ void load_lane_rows(const T* __restrict__ row, int lane, int K, float (&out)[RL]) {
    typedef typename VecOf<4 * sizeof(T)>::type Vec;
#pragma unroll
    for (int m = 0; m < RL / 4; ++m) {
        const int r = lane_row(4 * m, lane);
        if (r + 4 <= K && (reinterpret_cast<size_t>(row + r) % sizeof(Vec)) == 0) {
            const Vec raw = *reinterpret_cast<const Vec*>(row + r);
            const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int x = 0; x < 4; ++x) out[4 * m + x] = to_float(e[x]);
        } else {
#pragma unroll
            for (int x = 0; x < 4; ++x) out[4 * m + x] = (r + x < K) ? to_float(row[r + x]) : 0.f;
        }
    }
}

template <typename T, int RL, int JC, int W, bool ONE_STEP, int MINB, int RULE>
__global__ void __launch_bounds__(W * 32, MINB)
gdn_recurrent_fwd_vk_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const float* __restrict__ g, const float* __restrict__ gk, const float* __restrict__ gv,
                            const float* __restrict__ beta, const float* h0, const float* __restrict__ A_log,
                            const float* __restrict__ dt_bias, const i64* __restrict__ cu_seqlens,
                            T* __restrict__ o, float* ht, int T_, int H, int HV, int K, int V, int NVB, float scale,
                            int flags) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 blk = blockIdx.x;
    const int vb = (int)(blk % NVB);
    const i64 nh = blk / NVB;
    const int hv = (int)(nh % HV), n = (int)(nh / HV);
    const int h = hv / (HV / H);
    const int jb = (vb * W + warp) * JC;
    const bool vec = K % 4 == 0;

    float S[RL][JC];
#pragma unroll
    for (int jj = 0; jj < JC; ++jj) {
        const bool ok = (flags & F_H0) && jb + jj < V;
#pragma unroll
        for (int m = 0; m < RL / 4; ++m) {
            float x[4];
            load_col<4>(h0 + (nh * V + jb + jj) * K, lane_row(4 * m, lane), K, ok, vec, x);
#pragma unroll
            for (int e = 0; e < 4; ++e) S[4 * m + e][jj] = x[e];
        }
    }

    const SeqRange sr = seq_range(cu_seqlens, n, T_, (flags & F_VARLEN) != 0);
    const i64 steps = ONE_STEP ? min(sr.eos - sr.bos, (i64)1) : sr.eos - sr.bos;
    const TokenWalk<RULE> walk(sr.bos, sr.eos, steps);
#pragma unroll 1
    for (i64 t = walk.first; t != walk.end; t += walk.STEP) {
        const i64 th = t * HV + hv;
        float kk[RL], qq[RL], rd[RL];
        load_lane_rows<T, RL>(k + (t * H + h) * K, lane, K, kk);
        load_lane_rows<T, RL>(q + (t * H + h) * K, lane, K, qq);
        float kn = 0.f, qn = 0.f;
#pragma unroll
        for (int i = 0; i < RL; ++i) {
            const int r = lane_row(i, lane);
            rd[i] = ((flags & F_GK) && r < K) ? __expf(gk[th * K + r]) : 1.f;
            kn += kk[i] * kk[i];
            qn += qq[i] * qq[i];
        }
        const float sdecay = __expf(scalar_log_gate(g, A_log, dt_bias, th, hv, flags));
        const float rk = (flags & F_L2) ? rsqrtf(warp_sum(kn) + 1e-6f) : 1.f;
        const float oscale = scale * ((flags & F_L2) ? rsqrtf(warp_sum(qn) + 1e-6f) : 1.f);
#pragma unroll
        for (int jj = 0; jj < JC; ++jj) {
            const int j = jb + jj;
            const bool ok = j < V;
            const float cd = ((flags & F_GV) && ok) ? sdecay * __expf(gv[th * V + j]) : sdecay;
            float ks = 0.f;
#pragma unroll
            for (int i = 0; i < RL; ++i) {
                const float d = rd[i] * cd;
                S[i][jj] = d != 0.f ? S[i][jj] * d : 0.f;  // a reset discards the state, even a non-finite one
                ks += S[i][jj] * kk[i];
            }
            const float vj = ok ? to_float(v[th * V + j]) : 0.f;
            float delta = vj;
            if constexpr (!plain_rule(RULE)) {
                ks = warp_sum(ks);
                delta = beta_value(beta, (flags & F_BETA_V) ? th * V + (ok ? j : 0) : th, flags) * (vj - rk * ks);
            }
            float os = 0.f;
#pragma unroll
            for (int i = 0; i < RL; ++i) {
                S[i][jj] += rk * kk[i] * delta;
                os += S[i][jj] * qq[i];
            }
            os = warp_sum(os);
            if (lane == jj % 32 && ok) o[th * V + j] = from_float<T>(oscale * os);
        }
    }
    if (flags & F_HT) {
#pragma unroll
        for (int jj = 0; jj < JC; ++jj) {
#pragma unroll
            for (int m = 0; m < RL / 4; ++m) {
                float x[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) x[e] = S[4 * m + e][jj];
                store_col<4>(ht + (nh * V + jb + jj) * K, lane_row(4 * m, lane), K, jb + jj < V, vec, x);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward. Block = BWD_WARPS warps, one column per warp; lane owns rows r = lane + 32 * i
// (K <= 32 * KPT). Block (n, hv, vb) handles columns (pass * NVB + vb) * BWD_WARPS + warp.
//   Phase 1: forward sweep storing the state every C steps (thread-private checkpoint layout).
//   Phase 2: per segment, last to first: reload the checkpoint, recompute the segment keeping its
//            C decayed states in shared memory (each thread reads back only what it wrote), then
//            walk it in reverse.
// Row quantities (dq, dk, dgk: sums over columns) and scalar ones (dg, dbeta) are reduced over the
// block's warps in shared memory each step and accumulated, in a fixed order, into per-vb partial
// buffers [NVB, BT, HV, K|1]; gdn_recurrent_bwd_finish_* sum those. No atomics: deterministic.
// Dynamic shared memory: C * BWD_WARPS * (32 * KPT + 2) floats.
// ---------------------------------------------------------------------------------------------
constexpr int BWD_WARPS = 8;

template <int KPT>
struct BwdStep {  // per-token values shared by all columns of a warp
    float k[KPT], q[KPT], gkd[KPT];
};

template <typename T, int KPT>
__device__ __forceinline__ void load_step(BwdStep<KPT>& st, const T* __restrict__ q, const T* __restrict__ k,
                                          const float* __restrict__ gk, i64 t, int h, int H, int K, i64 th,
                                          int lane, int flags) {
    float ks = 0.f, qs = 0.f;
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
        const int r = lane + 32 * i;
        const bool ok = r < K;
        st.k[i] = ok ? to_float(k[(t * H + h) * K + r]) : 0.f;
        st.q[i] = ok ? to_float(q[(t * H + h) * K + r]) : 0.f;
        st.gkd[i] = ((flags & F_GK) && ok) ? __expf(gk[th * K + r]) : 1.f;
        ks += st.k[i] * st.k[i];
        qs += st.q[i] * st.q[i];
    }
    if (flags & F_L2) {
        const float rk = rsqrtf(warp_sum(ks) + 1e-6f), rq = rsqrtf(warp_sum(qs) + 1e-6f);
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            st.k[i] *= rk;
            st.q[i] *= rq;
        }
    }
}

// One forward step of column j on the lane's rows: S <- S~ + k delta. Returns u = v_j - S~^T k and
// delta through the references (both v_j with the plain rule); leaves S~ in St when St is not null.
template <typename T, int KPT, bool PLAIN>
__device__ __forceinline__ void bwd_forward_step(float (&S)[KPT], const BwdStep<KPT>& st, float cd, float b, float vj,
                                                 float* St, float& u, float& delta) {
    float ks = 0.f;
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
        const float d = cd * st.gkd[i];
        S[i] = d != 0.f ? S[i] * d : 0.f;  // as the forward: a reset discards the state
        if (St) St[i * 32] = S[i];
        ks += S[i] * st.k[i];
    }
    u = PLAIN ? vj : vj - warp_sum(ks);
    delta = PLAIN ? vj : b * u;
#pragma unroll
    for (int i = 0; i < KPT; ++i) S[i] += st.k[i] * delta;
}

template <typename T, int KPT, int RULE>
__global__ void __launch_bounds__(BWD_WARPS * 32)
gdn_recurrent_bwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const float* __restrict__ g, const float* __restrict__ gk, const float* __restrict__ gv,
                         const float* __restrict__ beta, const float* __restrict__ h0,
                         const float* __restrict__ A_log, const float* __restrict__ dt_bias,
                         const i64* __restrict__ cu_seqlens, const float* __restrict__ do_,
                         const float* __restrict__ dht, float* __restrict__ ckpt, int NS, int C,
                         float* __restrict__ part_dq, float* __restrict__ part_dk, float* __restrict__ part_dgk,
                         float* __restrict__ part_dg, float* __restrict__ part_db, T* __restrict__ dv,
                         float* __restrict__ dgv, float* __restrict__ dbeta_v, float* __restrict__ dh0, i64 BT,
                         int T_, int H, int HV, int K, int V, int NVB, float scale, int flags) {
    __shared__ float red_rows[3][BWD_WARPS][32 * KPT];
    __shared__ float red_scal[2][BWD_WARPS];
    extern __shared__ float seg_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Per warp: C decayed states [C][KPT][32] (lane-contiguous: conflict-free), then u and delta [C].
    float* St_w = seg_smem + (i64)warp * C * (32 * KPT + 2);
    float* uu_w = St_w + C * 32 * KPT;
    float* dl_w = uu_w + C;
    const i64 blk = blockIdx.x;
    const int vb = (int)(blk % NVB);
    const i64 nh = blk / NVB;
    const int hv = (int)(nh % HV), n = (int)(nh / HV);
    const int h = hv / (HV / H);
    const SeqRange sr = seq_range(cu_seqlens, n, T_, (flags & F_VARLEN) != 0);
    const int L = (int)(sr.eos - sr.bos);
    const int nseg = (L + C - 1) / C;
    const int npass = (V + NVB * BWD_WARPS - 1) / (NVB * BWD_WARPS);
    const bool has_rows_gk = flags & F_GK;
    const int nq = has_rows_gk ? 3 : 2;
    const bool v_first = (flags & F_V_FIRST) != 0;

    for (int pass = 0; pass < npass; ++pass) {
        const int j = (pass * NVB + vb) * BWD_WARPS + warp;
        const bool jok = j < V;
        float* ck = ckpt + ((blk * NS) * BWD_WARPS + warp) * (32 * KPT) + lane;
        auto column_decay = [&](i64 th) {
            float cd = __expf(scalar_log_gate(g, A_log, dt_bias, th, hv, flags));
            if ((flags & F_GV) && jok) cd *= __expf(gv[th * V + j]);
            return cd;
        };
        auto column_beta = [&](i64 th) { return beta_value(beta, (flags & F_BETA_V) ? th * V + (jok ? j : 0) : th, flags); };

        // Phase 1: forward sweep, checkpoint at every segment start.
        float S[KPT];
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            const int r = lane + 32 * i;
            S[i] = ((flags & F_H0) && jok && r < K) ? h0[state_at(nh, r, j, K, V, v_first)] : 0.f;
        }
        for (int tl = 0; tl < L; ++tl) {
            if (tl % C == 0) {
#pragma unroll
                for (int i = 0; i < KPT; ++i) ck[((i64)(tl / C) * BWD_WARPS) * (32 * KPT) + i * 32] = S[i];
            }
            const i64 t = step_token<RULE>(sr.bos, sr.eos, tl), th = t * HV + hv;
            BwdStep<KPT> st;
            load_step<T, KPT>(st, q, k, gk, t, h, H, K, th, lane, flags);
            float u, delta;
            bwd_forward_step<T, KPT, plain_rule(RULE)>(S, st, column_decay(th), column_beta(th),
                                                       jok ? to_float(v[th * V + j]) : 0.f, nullptr, u, delta);
        }

        // Phase 2: reverse, one segment at a time.
        float dS[KPT];
#pragma unroll
        for (int i = 0; i < KPT; ++i) {
            const int r = lane + 32 * i;
            dS[i] = ((flags & F_DHT) && jok && r < K) ? dht[state_at(nh, r, j, K, V, v_first)] : 0.f;
        }
        for (int seg = nseg - 1; seg >= 0; --seg) {
            const int t0 = seg * C;
            const int len = min(C, L - t0);
#pragma unroll
            for (int i = 0; i < KPT; ++i) S[i] = ck[((i64)seg * BWD_WARPS) * (32 * KPT) + i * 32];
            for (int s = 0; s < len; ++s) {
                const i64 t = step_token<RULE>(sr.bos, sr.eos, t0 + s), th = t * HV + hv;
                BwdStep<KPT> st;
                load_step<T, KPT>(st, q, k, gk, t, h, H, K, th, lane, flags);
                float u, delta;
                bwd_forward_step<T, KPT, plain_rule(RULE)>(S, st, column_decay(th), column_beta(th),
                                                           jok ? to_float(v[th * V + j]) : 0.f,
                                                           St_w + s * 32 * KPT + lane, u, delta);
                if (lane == 0) {
                    uu_w[s] = u;
                    dl_w[s] = delta;
                }
            }
            __syncwarp();
            for (int s = len - 1; s >= 0; --s) {  // len is uniform over the block: all warps share the sequence
                const i64 t = step_token<RULE>(sr.bos, sr.eos, t0 + s), th = t * HV + hv;
                BwdStep<KPT> st;
                load_step<T, KPT>(st, q, k, gk, t, h, H, K, th, lane, flags);
                const float cd = column_decay(th);
                const float b = column_beta(th);
                const float doj = jok ? do_[th * V + j] : 0.f;
                const float* St = St_w + s * 32 * KPT + lane;
                const float dl = dl_w[s], uu = uu_w[s];

                float dd = 0.f;
#pragma unroll
                for (int i = 0; i < KPT; ++i) {
                    const float s_t = St[i * 32] + st.k[i] * dl;
                    red_rows[0][warp][lane + 32 * i] = scale * s_t * doj;  // dq (w.r.t. the normalised q)
                    dS[i] += scale * st.q[i] * doj;
                    dd += dS[i] * st.k[i];
                }
                dd = warp_sum(dd);
                // Past a NaN or an infinity at token t the cotangents from t on are zero (the contract's case) while
                // beta, the decay and the recomputed states there are not finite: select, so 0 stays 0.
                // The plain rule has no correction: its dv is dd itself and e (the correction's) is 0.
                const float e = plain_rule(RULE) || dd == 0.f ? 0.f : b * dd;
                float z = 0.f;
#pragma unroll
                for (int i = 0; i < KPT; ++i) {
                    const float sti = St[i * 32];
                    red_rows[1][warp][lane + 32 * i] = dS[i] * dl - sti * e;  // dk
                    dS[i] -= st.k[i] * e;                                     // dS~
                    const float zi = dS[i] != 0.f ? dS[i] * sti : 0.f;
                    if (has_rows_gk) red_rows[2][warp][lane + 32 * i] = zi;    // dgk
                    z += zi;
                    dS[i] = dS[i] != 0.f ? dS[i] * (cd * st.gkd[i]) : 0.f;   // dS of the step before
                }
                z = warp_sum(z);
                if (lane == 0) {
                    red_scal[0][warp] = z;         // dg
                    red_scal[1][warp] = dd * uu;   // dbeta (scalar beta)
                    if (jok) {
                        dv[th * V + j] = from_float<T>(plain_rule(RULE) ? dd : e);
                        if (flags & F_GV) dgv[th * V + j] = z;
                        if (flags & F_BETA_V) {
                            float db = dd * uu;
                            if (flags & F_BSIG) {
                                const float sg = sigmoidf_(beta[th * V + j]);
                                db *= ((flags & F_NEG) ? 2.f : 1.f) * sg * (1.f - sg);
                            }
                            dbeta_v[th * V + j] = db;
                        }
                    }
                }
                __syncthreads();
                for (int idx = threadIdx.x; idx < nq * K; idx += BWD_WARPS * 32) {
                    const int qn = idx / K, r = idx - qn * K;
                    float acc = 0.f;
#pragma unroll
                    for (int w = 0; w < BWD_WARPS; ++w) acc += red_rows[qn][w][r];
                    float* dst = (qn == 0 ? part_dq : qn == 1 ? part_dk : part_dgk) + ((vb * BT + t) * HV + hv) * K + r;
                    *dst = pass == 0 ? acc : *dst + acc;
                }
                if (threadIdx.x < 2) {
                    float acc = 0.f;
#pragma unroll
                    for (int w = 0; w < BWD_WARPS; ++w) acc += red_scal[threadIdx.x][w];
                    float* dst = (threadIdx.x == 0 ? part_dg : part_db) + (vb * BT + t) * HV + hv;
                    *dst = pass == 0 ? acc : *dst + acc;
                }
                __syncthreads();
            }
        }
        if (jok && (flags & F_H0)) {
#pragma unroll
            for (int i = 0; i < KPT; ++i) {
                const int r = lane + 32 * i;
                if (r < K) dh0[state_at(nh, r, j, K, V, v_first)] = dS[i];
            }
        }
    }
}
