// Gated delta rule, chunked mode: the forward state passes, which write the output and the final state (and, for
// the backward, the per-chunk states and deltas). The chain is common/state_pass.cuh (mma.sync) and
// common/wg_state_pass.cuh (wgmma); the rule chunk_rule.cuh. Layouts: gated_delta_rule/chunk.cuh.
#include "gated_delta_rule/chunk_rule.cuh"

using namespace rawdelta;

// Forward state pass over one sequence's chunks, per (sequence, value head, block of BV columns).
// Per chunk, with S the state at its start (float32 registers):
//   r = beta * (v - 2^G * (k S)),  delta = A r,  o = scale * (2^G * (q S) + P delta),
//   S = 2^G_last * S + k^T (2^(G_last - G) * delta)
// STORE (backward recompute): skip the output, store S per chunk and delta instead.
template <typename T, typename E, int BT, int KP, int BV, bool STORE>
__global__ void __launch_bounds__(256) gdn_chunk_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ Gc,
    const float* __restrict__ Bc, const int* __restrict__ Rc, const float* __restrict__ Rq,
    const float* __restrict__ Rk,
    const E* __restrict__ Ahi, const E* __restrict__ Alo, const E* __restrict__ Phi, const E* __restrict__ Plo,
    const float* __restrict__ h0, const i64* __restrict__ cu, const int* __restrict__ seq_chunk0,
    T* __restrict__ o, float* __restrict__ ht, T* __restrict__ hbuf,
    T* __restrict__ vnew, int T_, int H, int HV, int K, int V, int NVB, float scale, int flags) {
    extern __shared__ __align__(16) unsigned char smem[];
    GdnRule<T, E, BT, KP, BV> rule{Ahi, Alo};
    forward_state_pass<T, E, BT, KP, BV, STORE, ScalarGate>(
        smem,
        ForwardPassIO<T>{{q, k, v, {Gc, Bc, Rc, Rq, Rk}, cu, seq_chunk0, T_, H, HV, K, V, NVB, scale,
                          PassOptions{flags}},
                         h0, o, ht, hbuf, vnew},
        Phi, Plo, rule);
}

// The forward state pass on Hopper warpgroups (wgmma, sm_90a), for 16-bit inputs and chunks of 64: the math of
// gdn_chunk_fwd_kernel per (sequence, value head, block of BV = NWG BVW value columns), NWG warpgroups of BVW
// columns (common/wg_state_pass.cuh). The state, r and delta enter the tensor cores rounded to T; the state
// stays float32 in registers through the pass.
// PIPE: two stages of chunk inputs, the next chunk's loads in flight while this one computes.
// AHEAD (with PIPE): prepare runs beside the pass (gdn_chunk_prepare_kernel with `ready`) instead of before it,
// and a producer warp after the warpgroups issues every load as soon as prepare has published the chunk.
template <typename T, int KP, int NWG, int BVW, bool STORE, bool PIPE, bool AHEAD>
__global__ void __launch_bounds__(128 * NWG + (AHEAD ? 32 : 0), wg_pass_blocks_per_sm(NWG, BVW, KP, PIPE))
    gdn_chunk_fwd_wg_kernel(
    const float* Gc, const float* Bc, const int* Rc, const float* Rq, const float* Rk, const float* __restrict__ h0,
    const i64* __restrict__ cu, const int* __restrict__ seq_chunk0, T* __restrict__ o, float* __restrict__ ht,
    T* __restrict__ hbuf, T* __restrict__ vnew, int T_, int H, int HV, int K, int V, int NVB, float scale, int flags,
    const int* ready, const __grid_constant__ PassMaps maps) {
    extern __shared__ __align__(1024) unsigned char smem[];
    wg_forward_state_pass<T, KP, NWG, BVW, STORE, PIPE, AHEAD, ScalarGate, GdnWgRule<T>>(
        smem,
        ForwardPassIO<T>{{nullptr, nullptr, nullptr, {Gc, Bc, Rc, Rq, Rk}, cu, seq_chunk0, T_, H, HV, K, V, NVB, scale,
                          PassOptions{flags}},
                         h0, o, ht, hbuf, vnew},
        ready, maps);
}
