// The plain update rule for the common state passes (common/state_pass.cuh, mma.sync: PlainRule;
// common/wg_state_pass.cuh, wgmma: PlainWgRule): S += k^T v, no correction, so the chunk's update values U are v
// itself and, in the reverse pass, dv = dU. GLA takes it with the per-key gate (common/chunk_pass.cuh: KeyGate).
#pragma once
#include "common/state_pass.cuh"
#include "common/wg_state_pass.cuh"

namespace rawdelta {

template <typename T, typename E, int BT, int KP, int BV>
struct PlainRule {
    using TT = typename InputTile<T, E>::type;
    using AccV = Acc<BT, BV, STATE_PASS_WARPS>;
    static constexpr int LDV = BV + TILE_PAD;

    static constexpr bool REVERSE_P_LO = true;  // as PlainWgRule's, below
    TT sV;  // the pass's v tile, as correct() lends it

    __device__ __forceinline__ void carve_inputs(SmemCursor&) {}
    __device__ __forceinline__ void load(i64, int, int, int) {}

    // Forward: nothing to correct; U = v, read from the pass's v tile.
    __device__ __forceinline__ void carve_work(SmemCursor&) {}
    template <class Gate>
    __device__ __forceinline__ void correct(AccV&, const TT&, const Split<E>&, const TT& v, const ChunkRows&) {
        sV = v;
    }
    template <typename Emit>
    __device__ __forceinline__ void values(AccV& D, Emit&& emit) {
        D.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float2 u = tile_get_pair(sV, i * LDV + j);
            x0 = u.x;
            x1 = u.y;
            emit(i, j, x0, x1);
        });
    }

    // Reverse: dv = dU for the chunk's rows; no term of the state gradient.
    __device__ __forceinline__ void carve_reverse_work(SmemCursor&) {}
    template <class Gate>
    __device__ __forceinline__ void reverse_values(AccV& Z, AccV&, const Split<E>&, const TT&, const ChunkRows&,
                                                   const ReversePassIO<T>& a, const StatePassBlock& pb, i64 bos,
                                                   int L) {
        const int HV = a.HV, V = a.V;
        Z.apply_pairs([&](int i, int j, float& x0, float& x1) {
            if (i < L) put_row_pair(a.dv, ((bos + i) * HV + pb.hv) * V + pb.v0 + j, j, pb.vcols, pb.paired, x0, x1);
        });
    }
    template <typename AccS>
    __device__ __forceinline__ void update_state_grad(AccS&, const TT&, const Split<E>&) {}
};

// wgmma form: no per-chunk matrix; U is read from the stage's v tile (swizzled, forward), and dv = dU goes from tile0
// into the stage's v tile (blocked, reverse), from which the pass stores it.
template <typename T>
struct PlainWgRule {
    static constexpr bool HAS_A = false;
    // dv's intra-chunk term P^T do is the values' whole gradient inside a chunk: P rounded to 16 bits there would
    // add its rounding to every dv (the peer keeps P in float32 for that product), so the scores come split.
    static constexpr bool REVERSE_P_LO = true;
    // dv = dU needs no v: the reverse pass loads none, and the stage's v tile only carries dv out
    static constexpr bool REVERSE_READS_V = false;

    template <int KP, int BVW>
    static __device__ __forceinline__ void issue_correction(WgAcc<1, BVW>&, unsigned, const WgOperand&) {}
    template <class Gate, int BV, int BVW, typename Cols, typename Emit>
    static __device__ __forceinline__ void values(WgAcc<1, BVW>&, WgAcc<1, BVW>& D, const WgChunk<T>& ch, Cols&&,
                                                  Emit&& emit) {
        D.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float2 u = load_pair(ch.sV, swizzled(i, ch.c0 + j, BV));
            x0 = u.x;
            x1 = u.y;
            emit(i, j, x0, x1);
        });
    }
    // dU is in tile0 (this warpgroup's columns, written by the same threads before the pass's barrier).
    template <class Gate, int BV, int BVW, typename Cols>
    __device__ __forceinline__ void reverse_values(WgAcc<1, BVW>& Z, const WgChunk<T>& ch, Cols&&,
                                                   const StatePassBlock&) const {
        Z.apply_pairs([&](int i, int j, float&, float&) {
            const int e = blk(i, ch.c0 + j, BV);
            const float2 u = load_pair(ch.tile0, e);
            store_pair(ch.sV, e, u.x, u.y);
        });
    }
    template <int BT_ROWS, typename AccS>
    static __device__ __forceinline__ void issue_state_grad(AccS&, unsigned, const WgOperand&) {}
    template <int BV, int BVW, typename Copy>
    __device__ __forceinline__ void finish_reverse(WgAcc<1, BVW>&, const WgChunk<T>&, T*, i64, Copy&&) const {}
};

}  // namespace rawdelta
