// Stages shared by every chunked linear-recurrence kernel (gated delta rule, GLA, DPLR): chunk tiles in
// shared memory, the chunk-local base-2 gate cumsum, the decay of the state across a chunk, the masked
// intra-chunk decay, the output assembly, the triangular inverse and the chunk table.
//
// Decays take the gate form as a template parameter (common/chunk_pass.cuh: ScalarGate, one log-gate per
// (token, head), whose chunk decays scale whole state rows alike; a per-key form decays each key row by its own).
#pragma once
#include "common/mma.cuh"

namespace rawdelta {

constexpr float LOG2E = 1.4426950408889634f;

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

// Pick<C, A, B>::type is A when C holds, else B (NVRTC compiles without <type_traits>).
template <bool C, typename A, typename B> struct Pick { using type = A; };
template <typename A, typename B> struct Pick<false, A, B> { using type = B; };

// 16-byte global -> shared copy in flight (cp.async); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16_shared(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    cp_async16_shared(smem_addr(dst), src, src_bytes);
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }
// 4-byte copy in flight (src_bytes = 0 writes a zero); groups: commit what was issued, wait until at most N
// committed groups are still in flight.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Rows [0, rows) of `cols` elements (global, row stride gstride) into L2 ahead of a synchronous load_tile: one
// prefetch per 128-byte piece, spread over the block's threads; nothing waits on it.
template <typename T>
__device__ __forceinline__ void prefetch_tile_l2(const T* g, i64 gstride, int rows, int cols) {
    constexpr int PER = 128 / sizeof(T);
    const int pieces = (cols + PER - 1) / PER;
    for (int i = threadIdx.x; i < rows * pieces; i += blockDim.x) {
        const int r = i / pieces, c = (i % pieces) * PER;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(g + r * gstride + c));
    }
}

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

// load_tile's whole-tile path with every size known at compile time, for kernels of NT threads: ROWS x COLS
// same-type elements (COLS a multiple of a 16-byte piece) by cp.async, each thread's pieces a constant number of
// rows apart, so a copy costs an address add: no alignment tests, no loop control, a row test only where the
// threads cover more rows than the tile has. The caller checks
// what load_tile would (a whole tile, 16-byte aligned rows) and waits as for load_tile.
template <int ROWS, int COLS, int NT, typename T>
__device__ __forceinline__ void load_tile_whole(T* s, int ld, const T* __restrict__ g, i64 gstride) {
    constexpr int VEC = 16 / sizeof(T), NVC = COLS / VEC, STEP = NT / NVC;
    static_assert(COLS % VEC == 0 && NT % NVC == 0, "whole 16-byte pieces, whole rows per step");
    const int c0 = (threadIdx.x % NVC) * VEC, r0 = threadIdx.x / NVC;
    const T* gp = g + r0 * gstride + c0;
    T* sp = s + r0 * ld + c0;
#pragma unroll
    for (int i = 0; i < (ROWS + STEP - 1) / STEP; ++i)
        if (ROWS % STEP == 0 || r0 + i * STEP < ROWS) cp_async16(sp + i * STEP * ld, gp + i * STEP * gstride, 16);
}

// load_tile_whole for a tile of another type than the rows' (a float tile of 16-bit rows, or a split tile): each
// 16-byte piece loaded into registers and stored converted by pairs.
template <int ROWS, int COLS, int NT, typename TL, typename T>
__device__ __forceinline__ void load_tile_whole_convert(TL s, int ld, const T* __restrict__ g, i64 gstride) {
    constexpr int VEC = 16 / sizeof(T), NVC = COLS / VEC, STEP = NT / NVC, IT = (ROWS + STEP - 1) / STEP;
    static_assert(COLS % VEC == 0 && NT % NVC == 0, "whole 16-byte pieces, whole rows per step");
    const int c0 = (threadIdx.x % NVC) * VEC, r0 = threadIdx.x / NVC;
    const T* gp = g + r0 * gstride + c0;
    alignas(16) T e[IT][VEC];
#pragma unroll
    for (int i = 0; i < IT; ++i)  // every load in flight before the first store
        if (ROWS % STEP == 0 || r0 + i * STEP < ROWS)
            *reinterpret_cast<uint4*>(e[i]) = *reinterpret_cast<const uint4*>(gp + i * STEP * gstride);
#pragma unroll
    for (int i = 0; i < IT; ++i)
        if (ROWS % STEP == 0 || r0 + i * STEP < ROWS)
#pragma unroll
            for (int x = 0; x < VEC; x += 2)
                tile_put_pair(s, (r0 + i * STEP) * ld + c0 + x, to_float(e[i][x]), to_float(e[i][x + 1]));
}

// Whether 16-byte pieces of rows of a tile start 16-byte aligned: the pointer, and the row stride in elements of T.
template <typename T> __device__ __forceinline__ bool rows_aligned16(const T* g, i64 stride) {
    return (reinterpret_cast<size_t>(g) & 15) == 0 && (stride * (i64)sizeof(T)) % 16 == 0;
}

// Sum of squares of this thread's part of a tile row from element `row` (p: which of two interleaved halves of
// the 16-byte pieces of cols columns, a multiple of 16).
template <typename X> __device__ __forceinline__ float row_part_squares(const X* s, int row, int cols, int p) {
    float acc = 0.f;
    for (int c = 8 * p; c < cols; c += 16) {
        const uint4 x = *reinterpret_cast<const uint4*>(s + row + c);
        acc += dot8<X>(x, x);
    }
    return acc;
}
template <typename E> __device__ __forceinline__ float row_part_squares(Split<E> s, int row, int cols, int p) {
    float acc = 0.f;
    for (int c = 8 * p; c < cols; c += 16)
#pragma unroll
        for (int d = 0; d < 8; d += 2) {
            const float2 x = tile_get_pair(s, row + c + d);
            acc += x.x * x.x + x.y * x.y;
        }
    return acc;
}

// Inverse L2 norms 1 / sqrt(|x_r|^2 + 1e-6) of rows [0, rows) of a tile (ld: a multiple of 8 elements, cols of
// 16), by 128 threads (this one is tid); rows up to rows_pad get 1. Two threads per row: lanes l and l + 16 of a
// warp share a row, so each quarter-warp's 16-byte loads cover 8 rows (free of bank conflicts with the padded
// stride). The chunk kernels fold these row factors into their epilogues instead of normalising tiles.
template <typename TL>
__device__ __forceinline__ void row_inv_norms(TL s, int ld, int rows, int rows_pad, int cols, float* out, int tid) {
    const int p = (tid >> 4) & 1, r0 = (tid >> 5) * 16 + (tid & 15);
    for (int rb = 0; rb < rows_pad; rb += 64) {
        const int r = rb + r0;
        float acc = r < rows_pad ? row_part_squares(s, r * ld, cols, p) : 0.f;
        acc += __shfl_xor_sync(0xffffffffu, acc, 16);
        if (p == 0 && r < rows_pad) out[r] = r < rows ? rsqrtf(acc + 1e-6f) : 1.f;
    }
}

// Extreme gates. A natural-log gate at or below RESET_LOG_GATE (ln 2^-150: its float32 decay rounds to 0; -inf
// included) is a hard reset: it is left out of the cumsum G and counted in R, the resets so far in the chunk, so that
// every decay is chosen by comparing counts, never computed from an infinity: from row j to row i >= j it is 0 when
// R_i > R_j and 2^(G_i - G_j) otherwise (pair_decay), from the chunk's start to row i 0 when R_i > 0. A gate that is
// NaN or +inf, or a non-finite row scalar (beta), makes its row and every later row of the chunk dead: the first
// dead row nb ends the chunk for every product (rows past it are treated like rows past the chunk, so nothing at
// or after it reaches an earlier row), and the passes then poison what comes after it.
constexpr float RESET_LOG_GATE = -103.972077f;

__device__ __forceinline__ bool is_reset_gate(float g) { return g <= RESET_LOG_GATE; }
// A gate or row scalar from which the chunk's rows are dead: NaN or an infinity, a gate of -inf aside (a reset).
__device__ __forceinline__ bool kills_row(float g, float b) { return !(isfinite(g) || g < 0.f) || !isfinite(b); }

// Per-token row code of the chunked passes (int32 [BT_, HV], written by prepare): the row's reset count R (low 8
// bits) and its chunk's first dead row nb (L when none; bits 8-15).
__device__ __forceinline__ int row_code(int resets, int nb) { return resets | (nb << 8); }
__device__ __forceinline__ int code_resets(int code) { return code & 255; }
__device__ __forceinline__ int code_live_rows(int code) { return code >> 8; }

// Decay 2^(G_i - G_j) of a chunk from row j to row i >= j: 0 across a reset (R counts differ).
__device__ __forceinline__ float pair_decay(const float* G, const int* R, int i, int j) {
    return R[i] == R[j] ? exp2f(G[i] - G[j]) : 0.f;
}

// The first dead row (kills_row) among rows [0, L) of a scalar-gate chunk: gates G and row scalars B; L when none.
__device__ __forceinline__ int first_dead_row(const float* G, const float* B, int L) {
    for (int r = 0; r < L; ++r)
        if (kills_row(G[r], B[r])) return r;
    return L;
}

// One key's running sum of a chunk's gates in row order (natural-log units) and its reset count: the arithmetic of
// chunk_local_cumsum_log2, once, so a kernel that needs only a chunk's total (gla_chunk_decay_kernel) gets the
// cumsum's bits.
struct GateRunSum {
    float acc = 0.f;
    int n = 0;
    __device__ __forceinline__ void add(float x) {
        if (is_reset_gate(x)) ++n;
        else acc += x;
    }
    __device__ __forceinline__ float log2_sum() const { return acc * LOG2E; }
};

// In-place inclusive cumsum over rows [0, live) of each of `width` columns of G (natural-log gates in, log2 units
// out), resets left out and counted in R (same layout). Rows [live, rows_pad) repeat the last sum and count, so
// masked-out decays stay finite. width = 1 for a scalar gate, K for a per-key one. R: int, or uint8 (a chunk has at
// most 64 rows, so at most 64 resets).
// `dead` (where given): set to 1 where a column's sum is NaN or +inf (kills_row), which it is wherever one of its
// gates in rows [0, live) kills a row (a NaN or +inf gate makes the sum NaN or +inf, and no later gate makes it
// finite again: a reset is counted, not added), and also where finite positive gates overflow it (a false alarm:
// the caller then finds the first dead row itself). So a caller that takes live = L learns whether the chunk has a
// dead row in these columns at no cost to the scan.
template <typename RT>
__device__ __forceinline__ void chunk_local_cumsum_log2(float* G, RT* R, int ld, int width, int live, int rows_pad,
                                                        int* dead = nullptr) {
    // U rows read ahead into registers per step: the scan is one thread per column, so its latency is the loads'
    // (the compiler does not move a load above the previous row's store to the same array)
    constexpr int U = 8;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        GateRunSum sum;
        for (int r0 = 0; r0 < rows_pad; r0 += U) {
            float x[U];
#pragma unroll
            for (int u = 0; u < U; ++u) x[u] = r0 + u < live ? G[(r0 + u) * ld + c] : 0.f;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int r = r0 + u;
                if (r >= rows_pad) break;
                if (r < live) sum.add(x[u]);
                G[r * ld + c] = sum.log2_sum();
                R[r * ld + c] = (RT)sum.n;
            }
        }
        if (dead != nullptr && kills_row(sum.acc, 0.f)) *dead = 1;
    }
}

// State across one chunk: S = decay(G_last) * S (0 after a reset in the chunk), then the caller adds its rank-BT
// update. S is a KP x BV accumulator (Acc, or a warpgroup's WgAcc) whose rows are keys.
template <typename Form, typename AccT>
__device__ __forceinline__ void decay_state(AccT& S, const float* G, const int* R, int ldg, int last) {
    // a reset row's state is zero by selection: the state before it may hold a NaN that the reset discards
    S.apply([&](int kd, int, float& x) { x = R[last * ldg] > 0 ? 0.f : x * Form::chunk_decay(G, ldg, last, kd); });
}

// Intra-chunk scores with the causal mask and decay: P[i][j] = x * pair_decay(i, j) * scale * ri_i * rj_j
// for j <= i < rows (j < i when STRICT), else 0 (selected: x past `rows` may be anything); ri / rj are row factors
// of the two operands (their inverse L2 norms, or 1). Scalar gates only (per-key decays are folded into the
// operands before the product).
template <bool STRICT, int BT, int NW>
__device__ __forceinline__ void mask_decay_scores(Acc<BT, BT, NW>& P, const float* G, const int* R, int rows,
                                                  float scale, const float* ri, const float* rj) {
    P.apply([&](int i, int j, float& x) {
        const bool keep = STRICT ? (j < i) : (j <= i);
        x = (keep && i < rows) ? x * pair_decay(G, R, i, j) * (scale * ri[i] * rj[j]) : 0.f;
    });
}

// Output of a chunk: O = scale * 2^(G_i) * (q S)_i + (P d)_i, with Y = q S given and P d added by the
// caller's product into the same accumulator afterwards (P already carries the scale). gq_i = 2^G_i
// times q's row factor. Y: an Acc or a warpgroup's WgAcc.
template <typename AccT>
__device__ __forceinline__ void scale_inter_output(AccT& Y, const float* gq, float scale) {
    Y.apply([&](int i, int, float& x) { x *= gq[i] * scale; });
}

// acc[q] = sum over k in [k0, k1) of R[q ld_r + k] C[k ld_c], q < 4: four rows of R (16-byte aligned, as float4
// loads) against one column of C, over whole 16-blocks of k (k0, k1 multiples of 16), fully unrolled per block.
__device__ __forceinline__ void four_row_dots(const float* R, int ld_r, const float* C, int ld_c, int k0, int k1,
                                              float (&acc)[4]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[q] = 0.f;
    for (int kb = k0; kb < k1; kb += 16) {
#pragma unroll
        for (int k = kb; k < kb + 16; k += 4) {
            const float c[4] = {C[k * ld_c], C[(k + 1) * ld_c], C[(k + 2) * ld_c], C[(k + 3) * ld_c]};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float4 r = *reinterpret_cast<const float4*>(R + q * ld_r + k);
                acc[q] += r.x * c[0] + r.y * c[1] + r.z * c[2] + r.w * c[3];
            }
        }
    }
}

// A = (I + L)^-1 for a strictly lower-triangular BT x BT L (floats, leading dimension ld), in float32.
// The 16 x 16 diagonal blocks are inverted at once by forward substitution (one column per thread); then
// pairs of inverted s x s diagonal blocks (s = 16, 32, ..) merge into 2s x 2s inverses, all pairs of a
// level at once: [A_ll 0; A_hl A_hh] with A_hl = -A_hh (L_hl A_ll), two products parallel over elements.
// log2(BT / 16) levels of two barriers each, instead of one level per 16-row block row. The products run
// over whole 16-blocks, fully unrolled (the zeros above the diagonal inside a 16-block are stored), so
// their shared-memory loads issue together instead of one loop trip at a time. The threads beyond the
// first BT zero A's 16-blocks above the diagonal meanwhile, which no product reads. Blocks of NTHREADS; L and A
// 16-byte aligned with leading dimension ld (a multiple of 4); X is scratch of BT / 2 x BT / 2 floats, leading
// dimension ldx.
template <int BT, int NTHREADS>
__device__ __forceinline__ void invert_unit_lower(const float* L, float* A, int ld, float* X, int ldx) {
    static_assert(NTHREADS > BT, "threads beyond the first BT clear the upper blocks");
    if (threadIdx.x >= BT) {
        constexpr int NB = BT / 16;
        for (int idx = threadIdx.x - BT; idx < NB * NB * 64; idx += NTHREADS - BT) {
            const int blk = idx / 64, r = 16 * (blk / NB) + idx % 64 / 4, j = 16 * (blk % NB) + 4 * (idx % 4);
            if (blk % NB > blk / NB) *reinterpret_cast<float4*>(A + r * ld + j) = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    } else {
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
#pragma unroll
    for (int s = 16; s < BT; s *= 2) {
        // Each thread takes four rows m of one column c (four-row float4 loads of L and of A_hh serve four
        // products per element of the other operand). X_p = L_hl A_ll for pair p (diagonal blocks at b = 2 s p
        // and b + s) into X[m][p s + c]; A_ll[j][c] is zero for j in 16-blocks above c's, so the sums start
        // at c's 16-block.
        for (int idx = threadIdx.x; idx < BT / 8 * s; idx += NTHREADS) {
            const int c = idx % s, m = 4 * (idx / s % (s / 4)), p = idx / (s * s / 4), b = 2 * s * p;
            const float* Lr = L + (b + s + m) * ld + b;
            const float* Ac = A + b * ld + b + c;
            float acc[4];
            four_row_dots(Lr, ld, Ac, ld, c & ~15, s, acc);
#pragma unroll
            for (int q = 0; q < 4; ++q) X[(m + q) * ldx + p * s + c] = acc[q];
        }
        __syncthreads();
        // A_hl = -A_hh X_p: A_hh[m][n] is zero for n in 16-blocks after m's
        for (int idx = threadIdx.x; idx < BT / 8 * s; idx += NTHREADS) {
            const int c = idx % s, m = 4 * (idx / s % (s / 4)), p = idx / (s * s / 4), b = 2 * s * p;
            const float* Ar = A + (b + s + m) * ld + b + s;
            const float* Xc = X + p * s + c;
            float acc[4];
            four_row_dots(Ar, ld, Xc, ldx, 0, (m & ~15) + 16, acc);
#pragma unroll
            for (int q = 0; q < 4; ++q) A[(b + s + m + q) * ld + b + c] = -acc[q];
        }
        __syncthreads();
    }
}

}  // namespace rawdelta
