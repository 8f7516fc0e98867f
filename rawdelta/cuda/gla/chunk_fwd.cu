// GLA, chunked mode: the forward state pass, which writes the output and the final state (and, for the backward,
// the per-chunk states instead). The chain is common/state_pass.cuh with the per-key gate (KeyGate) and the plain
// rule (common/plain_rule.cuh) on the operands prepare wrote. Layouts: gla/chunk.cuh.
#include "gla/chunk.cuh"

using namespace rawdelta;

// Forward state pass over one sequence's chunks, per (sequence, head, block of BV value columns). Per chunk, with S
// the state at its start (float32 registers):
//   o = scale (qg S) + A v,   S = 2^G_last S + kg^T v
// STORE (backward recompute): skip the output, store S per chunk instead.
template <typename T, typename E, int BT, int KP, int BV, bool STORE>
__global__ void __launch_bounds__(256) gla_chunk_fwd_kernel(
    const T* __restrict__ qg, const T* __restrict__ kg, const T* __restrict__ v, const int* __restrict__ Rc,
    const float* __restrict__ Dk, const E* __restrict__ Ahi, const E* __restrict__ Alo, const float* __restrict__ h0,
    const i64* __restrict__ cu, const int* __restrict__ seq_chunk0, T* __restrict__ o, float* __restrict__ ht,
    T* __restrict__ hbuf, int T_, int H, int K, int V, int NVB, float scale, int flags) {
    extern __shared__ __align__(16) unsigned char smem[];
    PlainRule<T, E, BT, KP, BV> rule;
    forward_state_pass<T, E, BT, KP, BV, STORE, KeyGate>(
        smem,
        ForwardPassIO<T>{{qg, kg, v, {nullptr, nullptr, Rc, nullptr, nullptr, Dk}, cu, seq_chunk0, T_, H, H, K, V,
                          NVB, scale, PassOptions{flags}},
                         h0, o, ht, hbuf, nullptr},
        Ahi, Alo, rule);
}

// The forward state pass on Hopper warpgroups (wgmma, sm_90a), for 16-bit inputs and chunks of 64: the math of
// gla_chunk_fwd_kernel per (sequence, head, block of BV = NWG BVW value columns), NWG warpgroups of BVW columns
// (common/wg_state_pass.cuh). qg, kg and the scores come as TMA tiles through `maps` (no rule matrix), v likewise.
// PIPE: two stages of chunk inputs, the next chunk's loads in flight while this one computes. KEEP (with the
// output): store S per chunk (hbuf) as well, for the backward.
template <typename T, int KP, int NWG, int BVW, bool STORE, bool PIPE, bool KEEP>
__global__ void __launch_bounds__(128 * NWG, wg_pass_blocks_per_sm(NWG, BVW, KP, PIPE)) gla_chunk_fwd_wg_kernel(
    const int* __restrict__ Rc, const float* __restrict__ Dk, const float* __restrict__ h0,
    const i64* __restrict__ cu, const int* __restrict__ seq_chunk0, T* __restrict__ o, float* __restrict__ ht,
    T* __restrict__ hbuf, int T_, int H, int K, int V, int NVB, float scale, int flags,
    const __grid_constant__ PassMaps maps) {
    extern __shared__ __align__(1024) unsigned char smem[];
    wg_forward_state_pass<T, KP, NWG, BVW, STORE, PIPE, false, KeyGate, PlainWgRule<T>, KEEP>(
        smem,
        ForwardPassIO<T>{{nullptr, nullptr, nullptr, {nullptr, nullptr, Rc, nullptr, nullptr, Dk}, cu, seq_chunk0, T_,
                          H, H, K, V, NVB, scale, PassOptions{flags}},
                         h0, o, ht, hbuf, nullptr},
        nullptr, maps);
}
