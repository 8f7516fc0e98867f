// GLA, chunked mode: what its kernels share. The stages are one source each: chunk_prepare.cu (per-chunk factors),
// chunk_fwd.cu (the forward state pass: the common one with the per-key gate and the plain rule), chunk_bwd.cu (the
// reverse state pass, likewise), chunk_bwd_dqk.cu (dq, dk and the gate gradient). Math and the backward
// derivation: rawdelta/ops/gla/README.md ("Chunked form").
//
// Layouts (C-contiguous; BT_ = B * T flattened tokens, NC chunks in all, chunks never cross sequences; one value
// head per key head, so the passes' HV is H):
//   q, k, qg, kg [BT_, H, K] (T)   v, o, do, dv [BT_, H, V] (T)   g [BT_, H, K] float (natural-log gates)
//   G, R (shared-memory tiles of a chunk, recomputed from g by every stage that needs them): per key, the chunk-local
//                    cumulative log2 gate, resets left out, and the resets so far in the chunk, the row's own
//                    included (common/chunk_stages.cuh: chunk_local_cumsum_log2); rows from the chunk's first dead
//                    row on repeat the last live row's
//   Rc [BT_, H] int: row codes (common/chunk_stages.cuh: row_code), no scalar resets, the chunk's first dead row
//   qg = q 2^G (0 after a reset of that key), kg = k 2^(G_last - G) (0 before one): the operands the state passes
//                    take for q and k, with every per-key decay folded in
//   Dk [NC, H, K] float: each chunk's per-key decay 2^G_last (0 across a reset): the state's rows across the chunk
//   Ahi, Alo [BT_, H, BT] (E): row r of the chunk's scores scale sum_d q_rd k_jd 2^(G_rd - G_jd), j <= r < live,
//                    else 0; split into hi + lo: the passes' P (the forward pass takes Alo for float inputs
//                    only; the reverse pass takes it for every input type: common/plain_rule.cuh, REVERSE_P_LO)
//   hbuf, dhbuf [NC, H, K, V] (T): state at each chunk's start / its gradient at the chunk's end
//
// Template parameters: T input dtype; E the 16-bit mma type (bf16 for bf16 and float inputs, fp16 for fp16); BT
// chunk size; KP the key dimension padded to 64/128/256; BV the value columns per block of the state passes.
#pragma once
#include "common/chunk_pass.cuh"
#include "common/plain_rule.cuh"
#include "common/state_pass.cuh"

namespace rawdelta {

// The 16-row sub-blocks of a chunk: off-diagonal pairs of sub-blocks are products on tensor cores with both decay
// factors taken against a reference row between them (each factor at most 1 for gates <= 0, so neither overflows).
// A diagonal sub-block is a product too, against a row inside it, when its gates allow (diag_blocks_elementwise);
// else it is summed element by element.
constexpr int SUB = 16;

// The block size of every GLA chunk kernel: loops stepped by it have trip counts the compiler knows (it unrolls them
// and keeps their loads in flight).
constexpr int THREADS = 256;

// A diagonal sub-block's product form takes factors 2^(G_a - G_ref) for rows a, ref of the sub-block, some above 1:
// allowed where the block's gates of every key span at most diag_span<E>() (log2 units) over its live rows, so every
// factor lies in [2^-span, 2^span]: 64 for bf16 operands (float's exponent range), 4 for fp16 ones (largest finite
// 65504: a scaled operand stays far below it, and a factor 2^-4 keeps q and k normal).
template <typename E>
__device__ __forceinline__ constexpr float diag_span() { return SameType<E, __half>::value ? 4.f : 64.f; }

// The whole-slice form (prepare's factors, dq/dk/dg): a slice of keys whose gates allow it takes every decay factor
// against one reference per key, the mean of the chunk's first and last (live) cumulative gates, for the key pair
// (d, d + 1) at once.
__device__ __forceinline__ float2 whole_slice_reference(float2 g_first, float2 g_last) {
    return make_float2(0.5f * (g_first.x + g_last.x), 0.5f * (g_first.y + g_last.y));
}

// Whether one live element (gate G, reset count `resets`) allows the whole-slice form against its key's reference m:
// no reset, and G within diag_span<E>() of m, so that both factors 2^(G - m) and 2^(m - G) lie in [2^-span, 2^span]
// (a product-form diagonal block's range). False for a NaN or infinite G.
template <typename E>
__device__ __forceinline__ bool whole_slice_allows(float G, float m, int resets) {
    return resets == 0 && fabsf(G - m) <= diag_span<E>();
}

// 2^x on the special-function unit alone: ex2.approx.ftz, the instruction exp2f is built on (the same value, within
// 2 ulp) without exp2f's range check and rescaling that keep results below 2^-126 subnormal: here they are 0. One
// instruction where exp2f takes four; the per-element factors of a chunk take several per element.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Decay 2^(G_a - G_b) of key d from row b to row a >= b of a chunk (G and its reset counts R, tiles of leading
// dimension ld): 0 across a reset of that key (selected: G may differ by anything across one).
template <typename RT>
__device__ __forceinline__ float key_decay(const float* G, const RT* R, int ld, int a, int b, int d) {
    return R[a * ld + d] == R[b * ld + d] ? exp2f(G[a * ld + d] - G[b * ld + d]) : 0.f;
}

// key_decay for the loops every element of a tile runs through: the factor computed whatever R holds (by exp2_ftz),
// then selected, so no branch per element. The element-by-element sums of flagged sub-blocks keep key_decay, whose
// branch skips the work across a reset.
template <typename RT>
__device__ __forceinline__ float key_decay_sel(const float* G, const RT* R, int ld, int a, int b, int d) {
    const float x = exp2_ftz(G[a * ld + d] - G[b * ld + d]);
    return R[a * ld + d] == R[b * ld + d] ? x : 0.f;
}

// flags[b] = 1 for each 16-row sub-block b of rows [0, live) of a slice (G, R: per-key gates and reset counts,
// `width` keys, leading dimension ld) that must be summed element by element: a key whose gates span more than
// diag_span<E>() over the block's live rows, or a reset inside the block (a factor across it is 0 by selection);
// else 0. Every thread calls it; barriers before and after.
template <int BT, typename E, typename RT>
__device__ __forceinline__ void diag_blocks_elementwise(const float* G, const RT* R, int ld, int width, int live,
                                                        int* flags) {
    constexpr int NB = BT / SUB;
    if ((int)threadIdx.x < NB) flags[threadIdx.x] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < NB * width; p += blockDim.x) {
        const int b = p / width, d = p % width, r0 = b * SUB, r1 = min(r0 + SUB, live);
        if (r0 >= r1) continue;
        const float g0 = G[r0 * ld + d];
        const int n0 = (int)R[r0 * ld + d];
        float lo = g0, hi = g0;
        bool reset = false;
        for (int r = r0 + 1; r < r1; ++r) {
            const float x = G[r * ld + d];
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
            reset |= (int)R[r * ld + d] != n0;
        }
        if (reset || !(hi - lo <= diag_span<E>())) flags[b] = 1;  // (an infinite or NaN span too)
    }
    __syncthreads();
}

}  // namespace rawdelta
