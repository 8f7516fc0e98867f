// Gated delta rule, chunked mode: the reverse state passes of the backward (the state gradient per chunk, dv,
// dh0, y = A^T d(delta) and the beta gradient's y . v). The chain is common/state_pass.cuh (mma.sync) and
// common/wg_state_pass.cuh (wgmma); the rule chunk_rule.cuh. Layouts: gated_delta_rule/chunk.cuh.
#include "gated_delta_rule/chunk_rule.cuh"

using namespace rawdelta;

// Backward state pass, last chunk to first, per (sequence, value head, block of BV columns). dS is
// the gradient of the state at the current chunk's end (dht, or 0, at the sequence end):
//   d(delta) = P^T do + 2^(G_last - G) * (k dS)       y = A^T d(delta)       dv = beta * y
//   dS = 2^G_last * dS + q^T (scale 2^G do) - k^T (beta 2^G y)
// Stores dS per chunk (dhbuf), y (ybuf), dv, the per-block partial row sums y . v, and dh0.
template <typename T, typename E, int BT, int KP, int BV>
__global__ void __launch_bounds__(256) gdn_chunk_bwd_state_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ Gc,
    const float* __restrict__ Bc, const int* __restrict__ Rc, const float* __restrict__ Rq,
    const float* __restrict__ Rk,
    const E* __restrict__ Ahi, const E* __restrict__ Alo, const E* __restrict__ Phi, const E* __restrict__ Plo,
    const T* __restrict__ dout, const float* __restrict__ dht,
    const i64* __restrict__ cu, const int* __restrict__ seq_chunk0, T* __restrict__ dhbuf, T* __restrict__ ybuf,
    T* __restrict__ dv, float* __restrict__ part_yv, float* __restrict__ dh0, int T_, int H, int HV, int K, int V,
    int NVB, i64 BT_, float scale, int flags) {
    extern __shared__ __align__(16) unsigned char smem[];
    GdnRule<T, E, BT, KP, BV> rule{Ahi, Alo, ybuf, part_yv, BT_};
    reverse_state_pass<T, E, BT, KP, BV, ScalarGate>(
        smem,
        ReversePassIO<T>{{q, k, v, {Gc, Bc, Rc, Rq, Rk}, cu, seq_chunk0, T_, H, HV, K, V, NVB, scale,
                          PassOptions{flags}},
                         dout, dht, dhbuf, dv, dh0},
        Phi, Plo, rule);
}

// The backward state pass on Hopper warpgroups (wgmma, sm_90a), for 16-bit inputs and chunks of 64: the math
// of gdn_chunk_bwd_state_kernel, last chunk to first, laid out like gdn_chunk_fwd_wg_kernel
// (common/wg_state_pass.cuh); dS, d(delta), y and the scaled do enter the tensor cores rounded to T. Each
// warpgroup writes its own partial row sums y . v (partial NWG vb + w of part_yv). PIPE: the previous chunk's
// inputs load while this one computes. NWG: 2 or 4 warpgroups per block. The q, k, (I + L)^-1 and score tiles
// come by TMA, as in the forward pass; v and do are blocked copies.
template <typename T, int KP, int NWG, int BVW, bool PIPE>
__global__ void __launch_bounds__(128 * NWG, wg_pass_blocks_per_sm(NWG, BVW, KP, PIPE))
    gdn_chunk_bwd_wg_kernel(
    const T* __restrict__ v, const float* __restrict__ Gc, const float* __restrict__ Bc, const int* __restrict__ Rc,
    const float* __restrict__ Rq, const float* __restrict__ Rk, const T* __restrict__ dout,
    const float* __restrict__ dht, const i64* __restrict__ cu, const int* __restrict__ seq_chunk0,
    T* __restrict__ dhbuf, T* __restrict__ ybuf, T* __restrict__ dv, float* __restrict__ part_yv,
    float* __restrict__ dh0, int T_, int H, int HV, int K, int V, int NVB, i64 BT_, float scale, int flags,
    const __grid_constant__ PassMaps maps) {
    extern __shared__ __align__(1024) unsigned char smem[];
    const GdnWgRule<T> rule{ybuf, part_yv, BT_, HV};
    wg_reverse_state_pass<T, KP, NWG, BVW, PIPE, ScalarGate>(
        smem,
        ReversePassIO<T>{{nullptr, nullptr, v, {Gc, Bc, Rc, Rq, Rk}, cu, seq_chunk0, T_, H, HV, K, V, NVB, scale,
                          PassOptions{flags}},
                         dout, dht, dhbuf, dv, dh0},
        maps, rule);
}
