// The gated delta rule's update rule for the common state passes (common/state_pass.cuh, mma.sync;
// common/wg_state_pass.cuh, wgmma): the WY form of the delta correction. Per chunk, with S the state at its start
// and A = (I + L)^-1 the chunk's inverse (prepare kernel):
//   r = beta (v - 2^G (k S)),   U = delta = A r
// and in the reverse pass, from dU = d(delta):
//   y = A^T d(delta),   dv = beta y,   dS += -k^T (beta 2^G y),   and y . v per row for the beta gradient.
// The scalar gate's row factors (2^G rk for k S) come from the pass's Gate.
#pragma once
#include "common/state_pass.cuh"
#include "common/wg_state_pass.cuh"
#include "gated_delta_rule/chunk.cuh"

namespace rawdelta {

// mma.sync form: A's split tile (hi + lo) is the rule's per-chunk input; r (forward) and the row-sum scratch
// (reverse) its work. The reverse pass also writes y (ybuf [BT_, HV, V], for the dq/dk kernel) and the per-block
// partial row sums y . v (part_yv [NVB, BT_, HV]).
template <typename T, typename E, int BT, int KP, int BV>
struct GdnRule {
    static constexpr bool REVERSE_P_LO = false;  // the reverse pass takes P in the inputs' precision
    using TT = typename InputTile<T, E>::type;
    using AccV = Acc<BT, BV, STATE_PASS_WARPS>;
    static constexpr int NW = STATE_PASS_WARPS, LDK = KP + TILE_PAD, LDV = BV + TILE_PAD, LDA = BT + TILE_PAD;

    const E *Ahi, *Alo;
    T* ybuf;
    float* part_yv;
    i64 BT_;
    Split<E> sA, sR;
    float *sScratch, *sRow;

    __device__ __forceinline__ void carve_inputs(SmemCursor& cur) { sA = cur.take_split<E>(BT * LDA); }
    __device__ __forceinline__ void load(i64 bos, int L, int HV, int hv) {
        load_chunk_rows<BT>(sA, LDA, chunk_matrix<Split<E>>(Ahi, Alo), bos, L, HV, hv);
    }

    // Forward: r = beta (v - 2^G k S) into sR, from the state tile sS and the chunk's k and v tiles.
    __device__ __forceinline__ void carve_work(SmemCursor& cur) { sR = cur.take_split<E>(BT * LDV); }
    template <class Gate>
    __device__ __forceinline__ void correct(AccV& X, const TT& sK, const Split<E>& sS, const TT& sV,
                                            const ChunkRows& rows) {
        X.fill(0.f);
        gemm<E, MK, KN, BT, BV, KP, NW>(X, sK, LDK, sS, LDV);
        X.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float2 vv = tile_get_pair(sV, i * LDV + j);
            const float b = rows.B[i], f = Gate::k_factor(rows, i);
            tile_put_pair(sR, i * LDV + j, b * (vv.x - f * x0), b * (vv.y - f * x1));
        });
    }
    // delta = A r, after a barrier over r.
    template <typename Emit>
    __device__ __forceinline__ void values(AccV& D, Emit&& emit) {
        D.fill(0.f);
        gemm<E, MK, KN, BT, BV, BT, NW>(D, sA, LDA, sR, LDV);
        D.apply_pairs(emit);
    }

    // Reverse: from d(delta) in Z, y = A^T d(delta); dv and ybuf written, sT = -beta 2^G y for the state gradient,
    // and the block's partial row sums y . v. The do tile sDo is free: it takes v.
    __device__ __forceinline__ void carve_reverse_work(SmemCursor& cur) {
        sScratch = cur.take<float>(AccV::WN * BT);
        sRow = cur.take<float>(BT);
    }
    template <class Gate>
    __device__ __forceinline__ void reverse_values(AccV& Z, AccV& Yc, const Split<E>& sT, const TT& sDo,
                                                   const ChunkRows& rows, const ReversePassIO<T>& a,
                                                   const StatePassBlock& pb, i64 bos, int L) {
        const int HV = a.HV, V = a.V;
        Z.store(sT, LDV);
        __syncthreads();
        load_tile(sDo, LDV, a.v + (bos * HV + pb.hv) * V + pb.v0, (i64)HV * V, L, pb.vcols, BT, BV);
        Yc.fill(0.f);
        gemm<E, KM, KN, BT, BV, BT, NW>(Yc, sA, LDA, sT, LDV);
        cp_async_wait_all();
        __syncthreads();
        Yc.apply_pairs([&](int i, int j, float& x0, float& x1) {
            if (i < L) {
                const i64 e = ((bos + i) * HV + pb.hv) * V + pb.v0 + j;
                const float b = rows.B[i];
                put_row_pair(a.dv, e, j, pb.vcols, pb.paired, b * x0, b * x1);
                put_row_pair(ybuf, e, j, pb.vcols, pb.paired, x0, x1);
            }
            const float f = -rows.B[i] * Gate::k_factor(rows, i);
            tile_put_pair(sT, i * LDV + j, f * x0, f * x1);
        });
        acc_row_sums(Yc, [&](int i, int j, float x) { return x * tile_get(sDo, i * LDV + j); }, sScratch, sRow);
        for (int i = threadIdx.x; i < L; i += blockDim.x) part_yv[((i64)pb.vb * BT_ + bos + i) * HV + pb.hv] = sRow[i];
    }
    // dS += k^T (-beta 2^G y)
    template <typename AccS>
    __device__ __forceinline__ void update_state_grad(AccS& dS, const TT& sK, const Split<E>& sT) {
        gemm<E, KM, KN, KP, BV, BT, NW>(dS, sK, LDK, sT, LDV);
    }
};

// wgmma form: A is the stage's rule matrix (hi part only); the work tile is the pass's tile0 (blocked), the v tile
// the stage's (swizzled forward, blocked in reverse). The reverse pass also writes y (ybuf) and each warpgroup's
// partial row sums y . v (partial NWG vb + w of part_yv [NWG NVB, BT_, HV]).
template <typename T>
struct GdnWgRule {
    static constexpr bool HAS_A = true;
    static constexpr bool REVERSE_P_LO = false;
    static constexpr bool REVERSE_READS_V = true;  // the partial row sums y . v
    static constexpr int BT = 64;

    T* ybuf;
    float* part_yv;
    i64 BT_;
    int HV;

    // Forward: X = k S.
    template <int KP, int BVW>
    static __device__ __forceinline__ void issue_correction(WgAcc<1, BVW>& X, unsigned aK, const WgOperand& state) {
        X.template mma<T, false, true, KP>(a_kmajor_sw128(aK), state, false);
    }
    // r = beta (v - 2^G X) into tile0, then delta = A r.
    template <class Gate, int BV, int BVW, typename Cols, typename Emit>
    static __device__ __forceinline__ void values(WgAcc<1, BVW>& X, WgAcc<1, BVW>& D, const WgChunk<T>& ch,
                                                  Cols&& ncols, Emit&& emit) {
        X.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float2 vv = load_pair(ch.sV, swizzled(i, ch.c0 + j, BV));
            const float b = ch.rows.B[i], f = Gate::k_factor(ch.rows, i);
            store_pair(ch.tile0, blk(i, ch.c0 + j, BV), b * (vv.x - f * x0), b * (vv.y - f * x1));
        });
        fence_proxy_async();
        wg_barrier(ch.wg);
        wg_fence();
        D.template mma<T, false, true, BT>(a_kmajor_sw128(ch.aA), ncols(ch.a0), false);
        wg_commit();
        wg_wait<0>();
        wg_barrier(ch.wg);  // every warp's part of the product has read r before delta overwrites it
        D.apply_pairs(emit);
    }

    // Reverse: y = A^T d(delta) (d(delta) in tile0), then tile0 = -beta 2^G y, the partial row sums y . v, and
    // dv = beta y through this warpgroup's columns of the v tile (their last reader was this thread).
    template <class Gate, int BV, int BVW, typename Cols>
    __device__ __forceinline__ void reverse_values(WgAcc<1, BVW>& Z, const WgChunk<T>& ch, Cols&& ncols,
                                                   const StatePassBlock& pb) const {
        constexpr int NWG = BV / BVW;
        wg_fence();
        Z.template mma<T, true, true, BT>(a_mnmajor_sw128(ch.aA), ncols(ch.a0), false);
        wg_commit();
        wg_wait<0>();
        wg_barrier(ch.wg);  // every warp's part of the product has read d(delta) before y's factor overwrites it
        Z.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float f = -ch.rows.B[i] * Gate::k_factor(ch.rows, i);
            store_pair(ch.tile0, blk(i, ch.c0 + j, BV), f * x0, f * x1);
        });
        Z.template row_dots<BV>(ch.sV, ch.c0, [&](int i, float x) {
            if (i < ch.L) part_yv[((i64)(NWG * pb.vb + ch.wg) * BT_ + ch.bos + i) * HV + pb.hv] = x;
        });
        Z.apply_pairs([&](int i, int j, float& x0, float& x1) {
            const float b = ch.rows.B[i];
            store_pair(ch.sV, blk(i, ch.c0 + j, BV), b * x0, b * x1);
        });
    }
    // dS += k^T (-beta 2^G y)
    template <int BT_ROWS, typename AccS>
    static __device__ __forceinline__ void issue_state_grad(AccS& dS, unsigned aK, const WgOperand& work) {
        dS.template mma<T, true, true, BT_ROWS>(a_mnmajor_sw128(aK), work, true);
    }
    // y to ybuf through this warpgroup's columns of the do tile, once the state gradient's product has read the
    // scaled do there.
    template <int BV, int BVW, typename Copy>
    __device__ __forceinline__ void finish_reverse(WgAcc<1, BVW>& Z, const WgChunk<T>& ch, T* sDo, i64 rows_off,
                                                   Copy&& copy_cols_out) const {
        wg_barrier(ch.wg);
        Z.apply_pairs([&](int i, int j, float& x0, float& x1) { store_pair(sDo, blk(i, ch.c0 + j, BV), x0, x1); });
        wg_barrier(ch.wg);
        copy_cols_out(ybuf + rows_off, sDo);
    }
};

}  // namespace rawdelta
