// GLA, chunked mode: what its kernels share. The stages are one source each: chunk_prepare.cu (per-chunk factors),
// chunk_fwd.cu (the forward state pass: the common one with the per-key gate and the plain rule), chunk_bwd.cu (the
// reverse state pass, likewise), chunk_bwd_dqk.cu (dq, dk and the gate gradient). Math and the backward
// derivation: rawdelta/ops/gla/README.md ("Chunked form").
//
// Layouts (C-contiguous; BT_ = B * T flattened tokens, NC chunks in all, chunks never cross sequences; one value
// head per key head, so the passes' HV is H):
//   q, k, qg, kg [BT_, H, K] (T)   v, o, do, dv [BT_, H, V] (T)   g [BT_, H, K] float (natural-log gates)
//   Gk [BT_, H, K] float: per key, the chunk-local cumulative log2 gate, resets left out (common/chunk_stages.cuh:
//                    chunk_local_cumsum_log2); rows from the chunk's first dead row on repeat the last live row's
//   Rk [BT_, H, K] uint8: per key, the resets so far in the chunk (the row's own included)
//   Rc [BT_, H] int: row codes (common/chunk_stages.cuh: row_code), no scalar resets, the chunk's first dead row
//   qg = q 2^G (0 after a reset of that key), kg = k 2^(G_last - G) (0 before one): the operands the state passes
//                    take for q and k, with every per-key decay folded in
//   Dk [NC, H, K] float: each chunk's per-key decay 2^G_last (0 across a reset): the state's rows across the chunk
//   Ahi, Alo [BT_, H, BT] (E): row r of the chunk's scores scale sum_d q_rd k_jd 2^(G_rd - G_jd), j <= r < live,
//                    else 0; split into hi + lo (Alo for float inputs only): the passes' P
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
// factors taken against a reference row between them (each factor at most 1 for gates <= 0, so neither overflows);
// the diagonal sub-blocks are summed element by element (their factors against any one row could overflow).
constexpr int SUB = 16;

// Decay 2^(G_a - G_b) of key d from row b to row a >= b of a chunk (Gk and its reset counts, int or byte tiles of
// leading dimension ld): 0 across a reset of that key (selected: G may differ by anything across one).
template <typename RT>
__device__ __forceinline__ float key_decay(const float* G, const RT* R, int ld, int a, int b, int d) {
    return R[a * ld + d] == R[b * ld + d] ? exp2f(G[a * ld + d] - G[b * ld + d]) : 0.f;
}

}  // namespace rawdelta
