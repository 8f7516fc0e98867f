// GLA, chunked mode: the reverse state pass (common/state_pass.cuh with the per-key gate and the plain rule), which
// writes dv, the state gradient at each chunk's end and dh0. Layouts: gla/chunk.cuh.
#include "gla/chunk.cuh"

using namespace rawdelta;

// Reverse state pass over one sequence's chunks, last first, per (sequence, head, block of BV value columns). dS
// is the gradient of the state at the chunk's end (dht, or 0, at the sequence's end). Per chunk:
//   dhbuf = dS,   dv = A^T do + kg dS,   dS = 2^G_last dS + qg^T (scale do)
template <typename T, typename E, int BT, int KP, int BV>
__global__ void __launch_bounds__(256) gla_chunk_bwd_state_kernel(
    const T* __restrict__ qg, const T* __restrict__ kg, const T* __restrict__ dout, const int* __restrict__ Rc,
    const float* __restrict__ Dk, const E* __restrict__ Ahi, const E* __restrict__ Alo, const float* __restrict__ dht,
    const i64* __restrict__ cu, const int* __restrict__ seq_chunk0, T* __restrict__ dhbuf, T* __restrict__ dv,
    float* __restrict__ dh0, int T_, int H, int K, int V, int NVB, float scale, int flags) {
    extern __shared__ __align__(16) unsigned char smem[];
    PlainRule<T, E, BT, KP, BV> rule;
    reverse_state_pass<T, E, BT, KP, BV, KeyGate>(
        smem,
        ReversePassIO<T>{{qg, kg, nullptr, {nullptr, nullptr, Rc, nullptr, nullptr, Dk}, cu, seq_chunk0, T_, H, H, K,
                          V, NVB, scale, PassOptions{flags}},
                         dout, dht, dhbuf, dv, dh0},
        Ahi, Alo, rule);
}

// The reverse state pass on Hopper warpgroups (wgmma, sm_90a), for 16-bit inputs and chunks of 64: the math of
// gla_chunk_bwd_state_kernel, laid out like gla_chunk_fwd_wg_kernel (common/wg_state_pass.cuh). qg, kg and the
// scores come by TMA, do as a blocked copy; no v (the plain rule's dv needs none; the stage's v tile carries dv
// out). PIPE: the previous chunk's inputs load while this one computes.
template <typename T, int KP, int NWG, int BVW, bool PIPE>
__global__ void __launch_bounds__(128 * NWG, wg_pass_blocks_per_sm(NWG, BVW, KP, PIPE)) gla_chunk_bwd_wg_kernel(
    const int* __restrict__ Rc, const float* __restrict__ Dk, const T* __restrict__ dout, const float* __restrict__ dht,
    const i64* __restrict__ cu, const int* __restrict__ seq_chunk0, T* __restrict__ dhbuf, T* __restrict__ dv,
    float* __restrict__ dh0, int T_, int H, int K, int V, int NVB, float scale, int flags,
    const __grid_constant__ PassMaps maps) {
    extern __shared__ __align__(1024) unsigned char smem[];
    const PlainWgRule<T> rule;
    wg_reverse_state_pass<T, KP, NWG, BVW, PIPE, KeyGate>(
        smem,
        ReversePassIO<T>{{nullptr, nullptr, nullptr, {nullptr, nullptr, Rc, nullptr, nullptr, Dk}, cu, seq_chunk0, T_,
                          H, H, K, V, NVB, scale, PassOptions{flags}},
                         dout, dht, dhbuf, dv, dh0},
        maps, rule);
}
