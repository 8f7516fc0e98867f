// Gated delta rule: option flags and per-token scalar helpers shared by the recurrent and chunked kernels.
#pragma once
#include "include/rawdelta_common.cuh"

namespace rawdelta {

// Option bits; mirrored in rawdelta/ops/gated_delta_rule/cuda_common.py (F_* constants). F_V_FIRST: the states
// (h0, ht, dht, dh0) are [N, HV, V, K] (state_v_first); only the recurrent kernels read it.
enum : int {
    F_G = 1, F_GK = 2, F_GV = 4, F_BETA = 8, F_BETA_V = 16, F_L2 = 32, F_GATE = 64, F_DTB = 128,
    F_BSIG = 256, F_NEG = 512, F_H0 = 1024, F_HT = 2048, F_VARLEN = 4096, F_DHT = 8192, F_V_FIRST = 16384
};

// The update rule and the direction of time of the recurrent kernels (a template parameter): the gated delta rule's
// correction S += k (beta (v - S^T k))^T, or the plain update S += k v^T (GLA), forward in time or reversed (each
// sequence from its last token to its first).
enum : int { RULE_DELTA = 0, RULE_PLAIN = 1, RULE_PLAIN_REVERSED = 2 };
__host__ __device__ constexpr bool plain_rule(int rule) { return rule != RULE_DELTA; }
__host__ __device__ constexpr bool reversed_rule(int rule) { return rule == RULE_PLAIN_REVERSED; }
// Token of step s (0, 1, ...) of a sequence [bos, eos) in the rule's direction of time.
template <int RULE> __device__ __forceinline__ i64 step_token(i64 bos, i64 eos, i64 s) {
    return reversed_rule(RULE) ? eos - 1 - s : bos + s;
}
// The tokens of the first `steps` steps of a sequence [bos, eos) in the rule's direction of time, for a loop whose
// variable is the token itself: for (t = first; t != end; t += STEP). At the decode geometry's 80 registers a loop over
// a step count mapped to its token (step_token) kept 88 to 96 bytes of stack where this keeps 24.
template <int RULE> struct TokenWalk {
    static constexpr int STEP = reversed_rule(RULE) ? -1 : 1;
    i64 first, end;
    __device__ __forceinline__ TokenWalk(i64 bos, i64 eos, i64 steps)
        : first(step_token<RULE>(bos, eos, 0)), end(first + STEP * steps) {}
};

// Log-decay of the scalar gate at (token, head), after the optional in-kernel activation.
__device__ __forceinline__ float scalar_log_gate(const float* g, const float* A_log, const float* dt_bias,
                                                 i64 th, int hv, int flags) {
    if (!(flags & F_G)) return 0.f;
    float x = g[th];
    if (flags & F_GATE) x = -__expf(A_log[hv]) * softplusf_(x + ((flags & F_DTB) ? dt_bias[hv] : 0.f));
    return x;
}

__device__ __forceinline__ float beta_value(const float* beta, i64 idx, int flags) {
    if (!(flags & F_BETA)) return 1.f;
    float b = beta[idx];
    if (flags & F_BSIG) b = ((flags & F_NEG) ? 2.f : 1.f) * sigmoidf_(b);
    return b;
}

}  // namespace rawdelta
