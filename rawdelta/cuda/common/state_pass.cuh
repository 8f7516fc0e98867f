// The state passes on tensor cores (mma.sync, fp32 accumulation), whatever the family: per (sequence, value head,
// block of BV value columns), blocks of 8 warps walk one sequence's chunks with the state (KP x BV, float32) in
// registers. Tiles of input precision are E tiles (Split<E> for float inputs); the state and other float32
// intermediates enter the products as Split<E> tiles, so they keep ~16 mantissa bits.
//
// The chain is written once here (forward_state_pass, reverse_state_pass); the family's per-chunk math comes as two
// policy types: the gate form (common/chunk_pass.cuh: ScalarGate, KeyGate) and the update rule, an object holding its
// own inputs and shared-memory tiles, which computes the chunk's update values U (the gated delta rule's delta:
// gated_delta_rule/chunk_rule.cuh; the plain rule's v: common/plain_rule.cuh) and, in the reverse pass, the gradient
// of what U was computed from. A rule has:
//   carve_inputs(cur) / load(bos, L, HV, hv)   its per-chunk input tiles (carved after the pass's own, loaded with
//                                               them)
//   carve_work(cur), correct<Gate>(X, ...), values(D, emit)
//                                               forward: its work tiles (after the state tile), its products with
//                                               the state, and U given to emit(row, col, u0&, u1&) pair by pair
//   carve_reverse_work(cur), reverse_values<Gate>(dU, Y, ...), update_state_grad(dS, ...)
//                                               reverse: its scratch (after the rows), the values' input gradient
//                                               (dv) from dU, and its term of the state gradient
// The pass declares every accumulator (X, D, Y: BT x BV) and lends them to the rule, so that the registers are laid
// out by the pass alike for every rule (the compiler numbers them in the order they are declared).
#pragma once
#include "common/chunk_pass.cuh"

namespace rawdelta {

constexpr int STATE_PASS_WARPS = 8;

// The forward state pass over one sequence's chunks. Per chunk, with S the state at its start and U the rule's
// update values:
//   o = scale (2^G (q S) + P U),   S = 2^G_last S + k^T (2^(G_last - G) U)
// P: the chunk's masked, decayed, scaled scores q k^T (a per-token chunk matrix, split for float inputs).
// STORE (the backward's recompute): skip the output, store S per chunk (hbuf, where given) and U (vnew) instead.
// The final state where PASS_HT is set (with STORE and no hbuf: the segments' end states of a segmented pass,
// common/segment_combine.cuh).
// From a chunk's first dead row on (common/chunk_stages.cuh), the outputs and the state carried on are NaN.
template <typename T, typename E, int BT, int KP, int BV, bool STORE, class Gate, class Rule>
__device__ __forceinline__ void forward_state_pass(unsigned char* smem, const ForwardPassIO<T>& a, const E* Phi,
                                                   const E* Plo, Rule& rule) {
    using TT = typename InputTile<T, E>::type;
    constexpr int NW = STATE_PASS_WARPS, LDK = KP + TILE_PAD, LDV = BV + TILE_PAD, LDP = BT + TILE_PAD;
    const int H = a.H, HV = a.HV, K = a.K, V = a.V;
    SmemCursor cur{smem};
    TT sQ, sK, sVD, sP;
    if (!STORE) cur.into(sQ, BT * LDK);
    cur.into(sK, BT * LDK);
    cur.into(sVD, BT * LDV);  // v, then U
    if (!STORE) cur.into(sP, BT * LDP);
    rule.carve_inputs(cur);
    const Split<E> sS = cur.take_split<E>(KP * LDV);
    rule.carve_work(cur);
    const Split<E> sDt = cur.take_split<E>(BT * LDV);
    ChunkRows rows;
    rows.carve(cur, BT);
    Gate::template carve<KP>(rows, cur);

    const StatePassBlock pb(a.NVB, BV, BT, a.cu, a.T_, H, HV, K, V, a.opt);

    Acc<KP, BV, NW> S;
    if (a.opt.h0()) load_state(S, a.h0 + pb.state_off, K, V, pb.v0, pb.vcols);
    else S.fill(0.f);

#pragma unroll 1
    for (int c = 0; c < pb.nchunks; ++c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        if (!STORE) load_tile(sQ, LDK, a.q + (bos * H + pb.h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sK, LDK, a.k + (bos * H + pb.h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sVD, LDV, a.v + (bos * HV + pb.hv) * V + pb.v0, (i64)HV * V, L, pb.vcols, BT, BV);
        rule.load(bos, L, HV, pb.hv);
        if (!STORE) load_chunk_rows<BT>(sP, LDP, chunk_matrix<TT>(Phi, Plo), bos, L, HV, pb.hv);
        rows.load(a.rows, bos, L, BT, HV, pb.hv, a.opt);
        Gate::template load<KP>(rows, a.rows, pb.chunk_index(a.seq_chunk0, c), HV, pb.hv, K);
        S.store(sS, LDV);
        if (STORE && a.hbuf != nullptr)
            store_state(S, a.hbuf + pb.chunk_state_off(a.seq_chunk0, c, HV, K, V), K, V, pb.v0, pb.vcols);
        cp_async_wait_all();
        __syncthreads();
        Acc<BT, BV, NW> X;
        rule.template correct<Gate>(X, sK, sS, sVD, rows);
        Acc<BT, BV, NW> Y;
        if (!STORE) {
            Y.fill(0.f);
            gemm<E, MK, KN, BT, BV, KP, NW>(Y, sQ, LDK, sS, LDV);
        }
        __syncthreads();
        Acc<BT, BV, NW> D;
        rule.values(D, [&](int i, int j, float& x0, float& x1) {
            if (!STORE) tile_put_pair(sVD, i * LDV + j, x0, x1);
            const float l = Gate::update_factor(rows, i);
            tile_put_pair(sDt, i * LDV + j, x0 * l, x1 * l);
            if (STORE && a.vnew != nullptr && i < L)
                put_row_pair(a.vnew, ((bos + i) * HV + pb.hv) * V + pb.v0 + j, j, pb.vcols, pb.paired, x0, x1);
        });
        __syncthreads();
        if (!STORE) {
            Gate::scale_output(Y, rows, a.scale);
            gemm<E, MK, KN, BT, BV, BT, NW>(Y, sP, LDP, sVD, LDV);
            const int live = rows.live_rows();
            Y.apply_pairs([&](int i, int j, float& x0, float& x1) {
                if (i < L)
                    put_row_pair(a.o, ((bos + i) * HV + pb.hv) * V + pb.v0 + j, j, pb.vcols, pb.paired,
                                 i < live ? x0 : dead_value(), i < live ? x1 : dead_value());
            });
        }
        Gate::template decay<BT>(S, rows);
        gemm<E, KM, KN, KP, BV, BT, NW>(S, sK, LDK, sDt, LDV);
        if (rows.live_rows() < L) S.fill(dead_value());
        __syncthreads();
    }
    if (a.opt.ht()) store_state(S, a.ht + pb.state_off, K, V, pb.v0, pb.vcols);
}

// The reverse state pass, last chunk to first. dS is the gradient of the state at the current chunk's end (dht,
// or 0, at the sequence end). Per chunk:
//   dU = P^T do + 2^(G_last - G) (k dS)      (the rule: the values' input gradient and its state term from dU;
//                                             P as hi + lo tiles for every input type where the rule says
//                                             REVERSE_P_LO, else as the inputs' tiles)
//   dS = 2^G_last dS + q^T (scale 2^G do) + the rule's term
// Stores dS per chunk (dhbuf) and dh0. A chunk with dead rows ends at the first for the pass, unless a cotangent
// reaches them (cotangent_reaches_dead_rows): then dS is NaN from there on.
template <typename T, typename E, int BT, int KP, int BV, class Gate, class Rule>
__device__ __forceinline__ void reverse_state_pass(unsigned char* smem, const ReversePassIO<T>& a, const E* Phi,
                                                   const E* Plo, Rule& rule) {
    using TT = typename InputTile<T, E>::type;
    using PT = typename Pick<Rule::REVERSE_P_LO, Split<E>, TT>::type;
    constexpr int NW = STATE_PASS_WARPS, LDK = KP + TILE_PAD, LDV = BV + TILE_PAD, LDP = BT + TILE_PAD;
    using AccV = Acc<BT, BV, NW>;
    const int H = a.H, HV = a.HV, K = a.K, V = a.V;
    SmemCursor cur{smem};
    TT sQ, sK, sDo;
    PT sP;
    cur.into(sQ, BT * LDK);
    cur.into(sK, BT * LDK);
    cur.into(sP, BT * LDP);
    cur.into(sDo, BT * LDV);
    rule.carve_inputs(cur);
    // sT: dU, then the rule's work
    const Split<E> sS = cur.take_split<E>(KP * LDV), sT = cur.take_split<E>(BT * LDV),
                   sDoG = cur.take_split<E>(BT * LDV);
    ChunkRows rows;
    rows.carve(cur, BT);
    Gate::template carve<KP>(rows, cur);
    rule.carve_reverse_work(cur);

    const StatePassBlock pb(a.NVB, BV, BT, a.cu, a.T_, H, HV, K, V, a.opt);

    Acc<KP, BV, NW> dS;
    if (a.opt.dht()) load_state(dS, a.dht + pb.state_off, K, V, pb.v0, pb.vcols);
    else dS.fill(0.f);

#pragma unroll 1
    for (int c = pb.nchunks - 1; c >= 0; --c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        load_tile(sQ, LDK, a.q + (bos * H + pb.h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sK, LDK, a.k + (bos * H + pb.h) * K, (i64)H * K, L, K, BT, KP);
        load_tile(sDo, LDV, a.dout + (bos * HV + pb.hv) * V + pb.v0, (i64)HV * V, L, pb.vcols, BT, BV);
        rule.load(bos, L, HV, pb.hv);
        load_chunk_rows<BT>(sP, LDP, chunk_matrix<PT>(Phi, Plo), bos, L, HV, pb.hv);
        rows.load(a.rows, bos, L, BT, HV, pb.hv, a.opt);
        Gate::template load<KP>(rows, a.rows, pb.chunk_index(a.seq_chunk0, c), HV, pb.hv, K);
        const int live = code_live_rows(a.rows.Rc[bos * HV + pb.hv]);
        if (live < L && cotangent_reaches_dead_rows(dS, a.dout, bos, live, L, HV, V, pb)) dS.fill(dead_value());
        dS.store(sS, LDV);
        store_state(dS, a.dhbuf + pb.chunk_state_off(a.seq_chunk0, c, HV, K, V), K, V, pb.v0, pb.vcols);
        cp_async_wait_all();
        __syncthreads();
        AccV Z;
        Z.fill(0.f);
        gemm<E, MK, KN, BT, BV, KP, NW>(Z, sK, LDK, sS, LDV);
        Z.apply([&](int i, int, float& x) { x *= Gate::update_factor(rows, i); });
        for (int idx = 2 * threadIdx.x; idx < BT * BV; idx += 2 * blockDim.x) {
            const int i = idx / BV, j = idx % BV;
            const float2 d = tile_get_pair(sDo, i * LDV + j);
            const float f = a.scale * Gate::q_factor(rows, i);
            tile_put_pair(sDoG, i * LDV + j, f * d.x, f * d.y);
        }
        __syncthreads();
        gemm<E, KM, KN, BT, BV, BT, NW>(Z, sP, LDP, sDo, LDV);
        AccV Y;
        rule.template reverse_values<Gate>(Z, Y, sT, sDo, rows, a, pb, bos, L);  // do is dead: the rule may reuse its tile
        Gate::template decay<BT>(dS, rows);
        gemm<E, KM, KN, KP, BV, BT, NW>(dS, sQ, LDK, sDoG, LDV);
        rule.update_state_grad(dS, sK, sT);
        __syncthreads();
    }
    if (a.opt.h0()) store_state(dS, a.dh0 + pb.state_off, K, V, pb.v0, pb.vcols);
}

}  // namespace rawdelta
