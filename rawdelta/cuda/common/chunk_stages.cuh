// Stages shared by every chunked linear-recurrence kernel (gated delta rule, GLA, DPLR):
// chunk tiles in shared memory, the chunk-local base-2 gate cumsum, the decay of the state across
// a chunk, the masked intra-chunk decay and the output assembly.
//
// The gate form is a template parameter. ScalarGate: one log-gate per (token, head), so a chunk's
// cumulative gates are a column G[BT] and decays scale whole rows. KeyGate<K>: one per (token, head,
// key), G[BT][K]; decays act along the key dimension (the state's rows).
#pragma once
#include "common/mma.cuh"

namespace rawdelta {

constexpr float LOG2E = 1.4426950408889634f;

struct ScalarGate {
    static constexpr bool PER_KEY = false;
    // Decay of state row `kd` across the whole chunk (G holds the chunk's cumulative log2 gates).
    static __device__ __forceinline__ float chunk_decay(const float* G, int ldg, int last, int kd) {
        return exp2f(G[last * ldg]);
    }
};

struct KeyGate {
    static constexpr bool PER_KEY = true;
    static __device__ __forceinline__ float chunk_decay(const float* G, int ldg, int last, int kd) {
        return exp2f(G[last * ldg + kd]);
    }
};

// A tile of input precision: 16-bit inputs stay in their type E; float32 inputs are kept as Split<E>.
template <typename T, typename E> struct InputTile { using type = E*; };
template <typename E> struct InputTile<float, E> { using type = Split<E>; };

__device__ __forceinline__ void tile_put(float* s, int idx, float x) { s[idx] = x; }
__device__ __forceinline__ void tile_put(__half* s, int idx, float x) { s[idx] = __float2half_rn(x); }
__device__ __forceinline__ void tile_put(__nv_bfloat16* s, int idx, float x) { s[idx] = __float2bfloat16_rn(x); }
template <typename E>
__device__ __forceinline__ void tile_put(Split<E> s, int idx, float x) { split_store(s, idx, x); }
template <typename X> __device__ __forceinline__ float tile_get(const X* s, int idx) { return to_float(s[idx]); }
template <typename E> __device__ __forceinline__ float tile_get(Split<E> s, int idx) {
    return to_float(s.hi[idx]) + to_float(s.lo[idx]);
}
// Two adjacent elements (idx even) of a tile, as one access per part.
template <typename X> __device__ __forceinline__ void tile_put_pair(X* s, int idx, float a, float b) {
    store_pair(s, idx, a, b);
}
template <typename E> __device__ __forceinline__ void tile_put_pair(Split<E> s, int idx, float a, float b) {
    split_store_pair(s, idx, a, b);
}
template <typename X> __device__ __forceinline__ float2 tile_get_pair(const X* s, int idx) { return load_pair(s, idx); }
template <typename E> __device__ __forceinline__ float2 tile_get_pair(Split<E> s, int idx) {
    const float2 h = load_pair(static_cast<const E*>(s.hi), idx), l = load_pair(static_cast<const E*>(s.lo), idx);
    return make_float2(h.x + l.x, h.y + l.y);
}

// Carve consecutive tiles out of dynamic shared memory (every size is kept a multiple of 16 bytes).
struct SmemCursor {
    unsigned char* p;
    template <typename X> __device__ __forceinline__ X* take(int n) {
        X* r = reinterpret_cast<X*>(p);
        p += ((size_t)n * sizeof(X) + 15) & ~(size_t)15;
        return r;
    }
    template <typename E> __device__ __forceinline__ Split<E> take_split(int n) { return {take<E>(n), take<E>(n)}; }
    template <typename X> __device__ __forceinline__ void into(X*& t, int n) { t = take<X>(n); }
    template <typename E> __device__ __forceinline__ void into(Split<E>& t, int n) { t = take_split<E>(n); }
};

template <typename A, typename B> struct SameType { static constexpr bool value = false; };
template <typename A> struct SameType<A, A> { static constexpr bool value = true; };

// 16-byte global -> shared copy in flight (cp.async); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }
// 4-byte copy in flight (src_bytes = 0 writes a zero); groups: commit what was issued, wait until at most N
// committed groups are still in flight.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// s[r * ld + c] = g[r * gstride + c] for r < rows, c < cols; zero up to rows_pad x cols_pad.
// Same-type 16-bit tiles with aligned rows go through cp.async (all of a chunk's loads in flight at
// once; the caller waits with cp_async_wait_all() before its __syncthreads()); otherwise 16-byte
// vector loads stored through tile_put (converting or splitting), or scalar loads at ragged edges.
// A whole tile (rows == rows_pad, cols == cols_pad) of aligned rows takes a fast path: one address per
// thread, stepped by whole row groups, so each 16-byte copy costs a few instructions instead of the general
// loop's per-element index arithmetic and edge tests.
template <typename TL, typename T>
__device__ __forceinline__ void load_tile(TL s, int ld, const T* __restrict__ g, i64 gstride, int rows, int cols,
                                          int rows_pad, int cols_pad) {
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = (gstride % VEC == 0) && ((reinterpret_cast<size_t>(g) & 15) == 0);
    const int nvc = (cols_pad + VEC - 1) / VEC;
    if constexpr (SameType<TL, T*>::value) {
        if (vec && rows == rows_pad && cols == cols_pad && cols % VEC == 0 && blockDim.x % nvc == 0) {
            const int step = blockDim.x / nvc, c0 = (threadIdx.x % nvc) * VEC;
            int r = threadIdx.x / nvc;
            const T* gp = g + r * gstride + c0;
            T* sp = s + r * ld + c0;
            for (; r < rows; r += step, gp += step * gstride, sp += step * ld) cp_async16(sp, gp, 16);
            return;
        }
    }
    for (int idx = threadIdx.x; idx < rows_pad * nvc; idx += blockDim.x) {
        const int r = idx / nvc, c0 = (idx % nvc) * VEC;
        const bool inside = r < rows && c0 + VEC <= cols, outside = r >= rows || c0 >= cols;
        if constexpr (SameType<TL, T*>::value) {
            if (vec && (inside || outside) && c0 + VEC <= cols_pad) {
                cp_async16(s + r * ld + c0, inside ? g + r * gstride + c0 : g, inside ? 16 : 0);
                continue;
            }
        }
        alignas(16) T e[VEC];
        if (inside && vec) {
            *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(g + r * gstride + c0);
        } else {
#pragma unroll
            for (int x = 0; x < VEC; ++x) e[x] = (r < rows && c0 + x < cols) ? g[r * gstride + c0 + x] : from_float<T>(0.f);
        }
#pragma unroll
        for (int x = 0; x < VEC; ++x)
            if (c0 + x < cols_pad) tile_put(s, r * ld + c0 + x, to_float(e[x]));
    }
}

// Inverse L2 norms 1 / sqrt(|x_r|^2 + 1e-6) of rows [0, rows) of a tile, one of `nthreads` threads (this
// one is `tid`) per row; rows up to rows_pad get 1. The chunk kernels fold these row factors into their
// epilogues instead of normalising tiles. `cols` even.
template <typename TL>
__device__ __forceinline__ void row_inv_norms(TL s, int ld, int rows, int rows_pad, int cols, float* out, int tid,
                                              int nthreads) {
    for (int r = tid; r < rows_pad; r += nthreads) {
        float s0 = 0.f, s1 = 0.f;
        for (int c = 0; c < cols; c += 2) {
            const float2 x = tile_get_pair(s, r * ld + c);
            s0 += x.x * x.x;
            s1 += x.y * x.y;
        }
        out[r] = r < rows ? rsqrtf(s0 + s1 + 1e-6f) : 1.f;
    }
}

// In-place inclusive cumsum over rows [0, rows) of each of `width` columns of G (natural-log gates in,
// log2 units out). Rows [rows, rows_pad) repeat the last sum, so masked-out decays stay finite.
// width = 1 for ScalarGate, K for KeyGate.
__device__ __forceinline__ void chunk_local_cumsum_log2(float* G, int ld, int width, int rows, int rows_pad) {
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = 0.f;
        for (int r = 0; r < rows_pad; ++r) {
            if (r < rows) acc += G[r * ld + c];
            G[r * ld + c] = acc * LOG2E;
        }
    }
}

// State across one chunk: S = decay(G_last) * S, then the caller adds its rank-BT update. S is a
// KP x BV accumulator (Acc, or a warpgroup's WgAcc) whose rows are keys.
template <typename Form, typename AccT>
__device__ __forceinline__ void decay_state(AccT& S, const float* G, int ldg, int last) {
    S.apply([&](int kd, int, float& x) { x *= Form::chunk_decay(G, ldg, last, kd); });
}

// Intra-chunk scores with the causal mask and decay: P[i][j] = x * 2^(G_i - G_j) * scale * ri_i * rj_j
// for j <= i < rows (j < i when STRICT), else 0; ri / rj are row factors of the two operands (their
// inverse L2 norms, or 1). Scalar gates only (per-key decays are folded into the operands before the
// product).
template <bool STRICT, int BT, int NW>
__device__ __forceinline__ void mask_decay_scores(Acc<BT, BT, NW>& P, const float* G, int rows, float scale,
                                                  const float* ri, const float* rj) {
    P.apply([&](int i, int j, float& x) {
        const bool keep = STRICT ? (j < i) : (j <= i);
        x = (keep && i < rows) ? x * exp2f(G[i] - G[j]) * (scale * ri[i] * rj[j]) : 0.f;
    });
}

// Output of a chunk: O = scale * 2^(G_i) * (q S)_i + (P d)_i, with Y = q S given and P d added by the
// caller's product into the same accumulator afterwards (P already carries the scale). gq_i = 2^G_i
// times q's row factor. Y: an Acc or a warpgroup's WgAcc.
template <typename AccT>
__device__ __forceinline__ void scale_inter_output(AccT& Y, const float* gq, float scale) {
    Y.apply([&](int i, int, float& x) { x *= gq[i] * scale; });
}

// A = (I + L)^-1 for a strictly lower-triangular BT x BT L (floats, leading dimension ld), in float32.
// The 16 x 16 diagonal blocks are inverted at once by forward substitution (one column per thread);
// then block row I below them is A_I = -D_I (L_I A_<I) with D_I its diagonal inverse: two small
// products per block row, parallel over elements. X is scratch of 16 x BT floats (leading dimension ld).
template <int BT>
__device__ __forceinline__ void invert_unit_lower(const float* L, float* A, float* X, int ld) {
    for (int idx = threadIdx.x; idx < BT * BT; idx += blockDim.x) A[(idx / BT) * ld + idx % BT] = 0.f;
    __syncthreads();
    if (threadIdx.x < BT) {
        const int c = threadIdx.x, r0 = c & ~15;
        float x[16];
#pragma unroll
        for (int m = 0; m < 16; ++m) {
            const int r = r0 + m;
            float v = (r == c) ? 1.f : 0.f;
#pragma unroll
            for (int j = 0; j < m; ++j) v -= L[r * ld + r0 + j] * x[j];
            x[m] = r < c ? 0.f : v;
        }
#pragma unroll
        for (int m = 0; m < 16; ++m) A[(r0 + m) * ld + c] = x[m];
    }
    __syncthreads();
#pragma unroll 1
    for (int r0 = 16; r0 < BT; r0 += 16) {
        // X = L_I A_<I. A_<I is lower triangular, so column c only takes rows j >= c; each thread computes
        // four rows of one column, so every A element it loads serves four products.
        for (int idx = threadIdx.x; idx < 4 * r0; idx += blockDim.x) {
            const int m = (idx / r0) * 4, c = idx % r0;
            const float* Lm = L + (r0 + m) * ld;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            for (int j = c; j < r0; ++j) {
                const float a = A[j * ld + c];
                s0 += Lm[j] * a;
                s1 += Lm[ld + j] * a;
                s2 += Lm[2 * ld + j] * a;
                s3 += Lm[3 * ld + j] * a;
            }
            X[m * ld + c] = s0;
            X[(m + 1) * ld + c] = s1;
            X[(m + 2) * ld + c] = s2;
            X[(m + 3) * ld + c] = s3;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < 16 * r0; idx += blockDim.x) {
            const int m = idx / r0, c = idx % r0;
            float s = 0.f;
            for (int n = 0; n <= m; ++n) s += A[(r0 + m) * ld + r0 + n] * X[n * ld + c];
            A[(r0 + m) * ld + c] = -s;
        }
        __syncthreads();
    }
}

// Per-chunk tables for a batch of sequences (one block of 1024 threads): seq_chunk0[n] = index of
// sequence n's first chunk (seq_chunk0[N] = total), and per chunk its first token and length.
// Without cu_seqlens, sequence n is tokens [n T, n T + T).
__device__ __forceinline__ void build_chunk_table(const i64* cu, int N, int T, int BT, bool varlen, int* seq_chunk0,
                                                  i64* chunk_bos, int* chunk_len) {
    __shared__ int part[1024];
    const int per = (N + blockDim.x - 1) / blockDim.x;
    const int n0 = threadIdx.x * per, n1 = min(N, n0 + per);
    int cnt = 0;
    for (int n = n0; n < n1; ++n) {
        const i64 len = varlen ? cu[n + 1] - cu[n] : (i64)T;
        cnt += (int)((len + BT - 1) / BT);
    }
    part[threadIdx.x] = cnt;
    __syncthreads();
    for (int off = 1; off < (int)blockDim.x; off <<= 1) {  // Hillis-Steele inclusive scan
        const int x = threadIdx.x >= off ? part[threadIdx.x - off] : 0;
        __syncthreads();
        part[threadIdx.x] += x;
        __syncthreads();
    }
    int c = part[threadIdx.x] - cnt;
    for (int n = n0; n < n1; ++n) {
        const i64 bos = varlen ? cu[n] : (i64)n * T, len = varlen ? cu[n + 1] - cu[n] : (i64)T;
        seq_chunk0[n] = c;
        for (i64 s = 0; s < len; s += BT, ++c) {
            chunk_bos[c] = bos + s;
            chunk_len[c] = (int)min((i64)BT, len - s);
        }
    }
    if (threadIdx.x == blockDim.x - 1) seq_chunk0[N] = part[threadIdx.x];
}

}  // namespace rawdelta
