// The state passes on Hopper warpgroups (wgmma, sm_90a), for 16-bit inputs and chunks of 64, whatever the family:
// per (sequence, value head, block of BV = NWG BVW value columns), warpgroup w owns the state's columns
// [w BVW, (w + 1) BVW), all KP rows, in float32 registers, and runs the chunk's chain of products on them alone:
// inside a chunk it waits only on its own warpgroup; the chunk's tiles are loaded once for all NWG (2, or 4 so that
// one block covers a head's 128 value columns). The q, k, rule-matrix and score tiles come as TMA boxes issued by
// one thread (common/tma.cuh, in the 128-byte swizzle that wgmma reads), v in the swizzle of its row length, so
// the warps do not spend the chain's time on the addresses of 16-byte copies; the tiles the warpgroups write are
// blocked (common/wgmma.cuh). The state and the per-chunk values enter the tensor cores rounded to T, like the
// peer's; the state itself stays float32 in registers through the pass.
//
// The chain is written once here (wg_forward_state_pass, wg_reverse_state_pass); the family's per-chunk math comes
// as two policy types: the gate form (common/chunk_pass.cuh: ScalarGate, KeyGate) and the update rule, which computes
// the chunk's update values U from the chunk's tiles and the state (the gated delta rule: gated_delta_rule/
// chunk_rule.cuh; the plain rule: common/plain_rule.cuh) and, in the reverse pass, the gradient of what U was computed
// from. A rule declares:
//   HAS_A                        whether its per-chunk BT x BT matrix (PassMaps::a) is in the stage
//   REVERSE_P_LO                 whether the reverse pass takes the scores as hi + lo tiles (PassMaps::p, plo), so
//                                that P^T do carries P at about float precision
//   REVERSE_READS_V              whether reverse_values reads the chunk's v (the stage's v tile); else the reverse
//                                pass loads no v, and the tile only carries the values' gradient out
//   issue_correction(X, aK, s)   products of the chunk's k with the state, issued with the chain's first ones
//   values(X, D, ..., emit)      U from them, given to emit(row, col, u0&, u1&) pair by pair
//   reverse_values(Z, ...)       from dU (in tile0), the values' input gradient into the stage's v tile
//   issue_state_grad(dS, ...)    its term of the state gradient, issued with the chain's last product
//   finish_reverse(Z, ...)       its stores once that product is done
// The pass declares every accumulator (X, Y, D; Z, U: 64 x BVW per warpgroup) and lends them to the rule, so that
// the registers are laid out by the pass alike for every rule (the compiler numbers them in the order they are
// declared).
//
// PIPE: two stages of chunk inputs, the next chunk's loads in flight while this one computes (for grids of at most
// one block per SM, where no other block hides the loads).
// AHEAD (with PIPE, the forward pass): the kernel that writes the chunk's factors runs beside the pass instead of
// before it, and a producer warp after the warpgroups issues every load as soon as that kernel has published the
// chunk and the consumers have handed the stage back; the warpgroups synchronise among themselves only.
#pragma once
#include "common/chunk_pass.cuh"
#include "common/ready_flags.cuh"
#include "common/tma.cuh"
#include "common/wgmma.cuh"

namespace rawdelta {

// Blocks per SM the Hopper state passes' launch bounds promise: one with four warpgroups or two stages of inputs,
// else as many as their shared memory allows (three at 16 columns per warpgroup and K <= 128, else two).
__host__ __device__ constexpr int wg_pass_blocks_per_sm(int nwg, int bvw, int kp, bool pipe) {
    return (pipe || nwg > 2) ? 1 : (bvw == 16 && kp <= 128) ? 3 : 2;
}

// TMA maps of the state passes' per-chunk tiles: q, k [BT_, H, K]; the update rule's matrix and the scores
// [BT_, HV, BT]; v [BT_, HV, V] (the forward pass; boxes of min(BV, 64) columns); the scores' lo part [BT_, HV, BT]
// (a reverse pass whose rule takes them split: Rule::REVERSE_P_LO).
struct PassMaps {
    TmaMap q, k, a, p, v, plo;
};

// One stage of a Hopper state pass's chunk inputs: byte offsets of its tiles (q and the scores only with HAS_Q_P,
// do only with HAS_DO, the rule's matrix only with HAS_A, the scores' lo part only with P_LO) and of the raw row
// scalars. Every tile starts 1024-byte aligned when the stage does.
template <int KP, int BV, bool HAS_Q_P, bool HAS_DO, bool HAS_A, bool P_LO = false>
struct WgStage {
    static_assert(HAS_Q_P || !P_LO, "the scores' lo part comes with the scores");
    static constexpr int BT = 64, Q = 0, K = Q + (HAS_Q_P ? BT * KP * 2 : 0), V = K + BT * KP * 2,
                         DO = V + BT * BV * 2, A = DO + (HAS_DO ? BT * BV * 2 : 0), P = A + (HAS_A ? BT * BT * 2 : 0),
                         PLO = P + (HAS_Q_P ? BT * BT * 2 : 0), RAW = PLO + (P_LO ? BT * BT * 2 : 0),
                         BYTES = sw128_aligned(RAW + ChunkRows::RAW * BT * 4);

    // Chunk c of block pb's sequence into stage st: the q, k, rule-matrix and score tiles as TMA boxes in the
    // 128-byte swizzle (tma.cuh; KP / 64 boxes for q and k), and without do (the forward) the v tile at the
    // block's value columns (tma.cuh: swizzled), issued by thread 0 and counted by `bar`; v (with LOAD_V: a rule
    // whose reverse pass reads it) and do blocked otherwise, and the row scalars, as one cp.async group by the
    // block's NT threads. The boxes hold rows past the chunk (the next sequence's, or zeros past the tensor):
    // zero_tail clears them.
    template <int NT, bool LOAD_V = true, typename T>
    static __device__ __forceinline__ void issue(unsigned char* st, u64* bar, const StatePassBlock& pb, int c,
                                                 const PassMaps& maps, const T* v, const T* dout,
                                                 const RowInputs& in, int HV, int Vd, const PassOptions& opt) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        if (threadIdx.x == 0) {
            mbar_arrive_expect_tx(bar, TMA_BYTES);
            issue_tiles(st, bar, pb, (int)bos, maps);
        }
        if (HAS_DO) {
            const i64 vo = (bos * HV + pb.hv) * Vd + pb.v0;
            if (LOAD_V) load_blocked<BV, BT, NT>(reinterpret_cast<T*>(st + V), v + vo, (i64)HV * Vd, L, pb.vcols);
            load_blocked<BV, BT, NT>(reinterpret_cast<T*>(st + DO), dout + vo, (i64)HV * Vd, L, pb.vcols);
        }
        ChunkRows::fetch_raw(reinterpret_cast<float*>(st + RAW), in, bos, L, BT, HV, pb.hv, opt);
        cp_async_commit();
    }
    // The row scalars of a producer warp's lane for chunk c, in registers (through L2: in a pass whose factors are
    // written beside it, they are written during the pass), ChunkRows::fetch_raw's values at [lane + 32 i].
    struct LaneRows {
        float x[ChunkRows::RAW * BT / 32];
    };
    static __device__ __forceinline__ LaneRows lane_rows(const StatePassBlock& pb, int c, const RowInputs& in, int HV,
                                                         const PassOptions& opt, int lane) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        LaneRows v;
#pragma unroll
        for (int i = 0; i < ChunkRows::RAW * BT / 32; ++i) {
            const float* src = ChunkRows::raw_source(lane + 32 * i, in, bos, L, BT, HV, pb.hv, opt);
            v.x[i] = src != nullptr ? __ldcg(src) : 0.f;
        }
        return v;
    }
    // issue() for a pass whose factors are written beside it (AHEAD), by the producer warp once it has acquired the
    // chunk's readiness flag and its lanes' rows (lane_rows): they store the rows and arrive on `bar` (32
    // arrivals), lane 0 announcing and issuing the TMA tiles (no do).
    static __device__ __forceinline__ void issue_ahead(unsigned char* st, u64* bar, const StatePassBlock& pb, int c,
                                                       const PassMaps& maps, const LaneRows& rows, int lane) {
        static_assert(!HAS_DO, "the reverse pass does not run beside the factors' kernel");
        float* raw = reinterpret_cast<float*>(st + RAW);
#pragma unroll
        for (int i = 0; i < ChunkRows::RAW * BT / 32; ++i) raw[lane + 32 * i] = rows.x[i];
        const i64 bos = pb.bos + (i64)c * BT;
        if (lane == 0) {
            fence_proxy_async_global();  // the factors' global writes, acquired, before the TMA units read them
            mbar_arrive_expect_tx(bar, TMA_BYTES);
            issue_tiles(st, bar, pb, (int)bos, maps);
        } else {
            mbar_arrive(bar);
        }
    }
    // The TMA tiles of the chunk starting at token `row` (its phase's bytes already announced on `bar`).
    static __device__ __forceinline__ void issue_tiles(unsigned char* st, u64* bar, const StatePassBlock& pb, int row,
                                                       const PassMaps& maps) {
#pragma unroll
        for (int b = 0; b < KP / 64; ++b) {
            if (HAS_Q_P) tma_load_3d(st + Q + b * SW128_BOX_BYTES, &maps.q, 64 * b, pb.h, row, bar);
            tma_load_3d(st + K + b * SW128_BOX_BYTES, &maps.k, 64 * b, pb.h, row, bar);
        }
        if (HAS_A) tma_load_3d(st + A, &maps.a, 0, pb.hv, row, bar);
        if (HAS_Q_P) tma_load_3d(st + P, &maps.p, 0, pb.hv, row, bar);
        if (P_LO) tma_load_3d(st + PLO, &maps.plo, 0, pb.hv, row, bar);
        for (int b = 0; b < V_BOXES; ++b)  // none with do
            tma_load_3d(st + V + b * V_BOX_BYTES, &maps.v, pb.v0 + V_BOX_COLS * b, pb.hv, row, bar);
    }
    static constexpr int QK_BOXES = (HAS_Q_P ? 2 : 1) * (KP / 64),
                         AP_BOXES = (HAS_A ? 1 : 0) + (HAS_Q_P ? 1 : 0) + (P_LO ? 1 : 0),
                         V_BOX_COLS = BV < 64 ? BV : 64, V_BOXES = HAS_DO ? 0 : BV / V_BOX_COLS,
                         V_BOX_BYTES = BT * V_BOX_COLS * 2,
                         TMA_BYTES = (QK_BOXES + AP_BOXES) * SW128_BOX_BYTES + V_BOXES * V_BOX_BYTES;
    // Rows [L, BT) of the TMA tiles to zero, as load_blocked leaves them, by threads [0, NT).
    template <int NT>
    static __device__ __forceinline__ void zero_tail(unsigned char* st, int L) {
        if (L >= BT) return;
        zero_box_rows(st + Q, QK_BOXES, L, 128, NT);  // q and k are adjacent, as are the rule's matrix and P
        zero_box_rows(st + A, AP_BOXES, L, 128, NT);  // and the scores' lo part, after them
        zero_box_rows(st + V, V_BOXES, L, 2 * V_BOX_COLS, NT);
    }
};

// Shared memory of a Hopper state pass: NS stages of chunk inputs, the state tile (KP x BV, T), NT value-sized
// tiles (BT x BV, T; tile1 only with NT = 2), the chunk's row arrays and two mbarriers per stage: `full`, for
// its TMA tiles, and with AHEAD `empty`, on which the consumers hand it back to the producer warp. NCONS: the
// threads that run the chain (all of the block but that warp). The stages start 1024-byte aligned (the
// 128-byte swizzle's period; the host adds 1024 bytes of slack). A per-key gate form (KeyGate) has a slot of KP
// per-key decays per stage after the rows, fetched with the stage's inputs (Gate::fetch).
template <typename T, typename St, int KP, int BV, int NS, int NT, int NCONS, bool AHEAD = false,
          class Gate = ScalarGate>
struct WgPassSmem {
    static_assert(!(AHEAD && Gate::PER_KEY), "the producer warp fetches no per-key decays");
    unsigned char* stages;
    T *state, *tile0, *tile1;
    unsigned a_state, a0, a1;  // their shared-memory addresses, for the descriptors
    ChunkRows rows;
    u64* bars;  // full[2], empty[2]
    float* gate_slots;  // per-key decays: NS slots of KP (null for a scalar gate)
    static constexpr int CONSUMER_BARRIER = 5;  // named barrier of the NCONS threads (1 + wg: each warpgroup's)
    __device__ __forceinline__ explicit WgPassSmem(unsigned char* smem) {
        SmemCursor cur{smem + ((1024u - (smem_addr(smem) & 1023u)) & 1023u)};
        stages = cur.take<unsigned char>(NS * St::BYTES);
        state = cur.take<T>(KP * BV);
        tile0 = cur.take<T>(St::BT * BV);
        tile1 = NT > 1 ? cur.take<T>(St::BT * BV) : nullptr;
        rows.carve(cur, St::BT);
        bars = cur.take<u64>(4);
        gate_slots = Gate::PER_KEY ? cur.take<float>(NS * KP) : nullptr;
        a_state = smem_addr(state);
        a0 = smem_addr(tile0);
        a1 = NT > 1 ? smem_addr(tile1) : 0u;
        if (threadIdx.x == 0) {
            for (int s = 0; s < NS; ++s) {
                mbar_init(bars + s, AHEAD ? 32 : 1);  // AHEAD: every lane of the producer warp arrives
                mbar_init(bars + 2 + s, 1);
            }
            fence_mbarrier_init();
        }
        __syncthreads();
    }
    // Barrier over the consumer threads (the whole block without a producer warp).
    __device__ __forceinline__ void sync() const {
        if (AHEAD) asm volatile("bar.sync %0, %1;\n" ::"n"(CONSUMER_BARRIER), "n"(NCONS) : "memory");
        else __syncthreads();
    }
    // The end of pass step `step`: every consumer is done with its stage; with AHEAD, it goes back to the producer.
    __device__ __forceinline__ void leave_chunk(int step) {
        sync();
        if (AHEAD && threadIdx.x == 0) mbar_arrive(bars + 2 + step % NS);
    }
    // The start of pass step `step` (chunk c of L tokens): with PIPE, first issues chunk `next`'s loads (none when
    // next < 0) into the other stage; waits for chunk c's stage, derives its rows (and points them at the stage's
    // per-key decays) and returns it. issue(c, s) counts the stage's TMA tiles on bars[s], filled once per use of the
    // stage; their rows past the chunk are cleared here.
    // With AHEAD the producer warp issues every load (produce_ahead): the consumers only wait for the stage.
    template <bool PIPE, typename Issue>
    __device__ __forceinline__ unsigned char* enter_chunk(int step, int c, int next, int L, const PassOptions& opt,
                                                          Issue&& issue) {
        const int s = PIPE ? (step & 1) : 0;
        if (AHEAD) {
            mbar_wait(bars + s, (step >> 1) & 1);  // its arrivals release the producer's row scalars too
        } else {
            if (!PIPE) issue(c, 0);
            if (PIPE && next >= 0) {
                issue(next, s ^ 1);  // that stage's last reader was the previous step, before its closing barrier
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            mbar_wait(bars + s, (PIPE ? step >> 1 : step) & 1);
            __syncthreads();
        }
        unsigned char* st = stages + s * St::BYTES;
        if (Gate::PER_KEY) rows.kdecay = gate_slot(s);
        St::template zero_tail<NCONS>(st, L);  // fenced and synchronised before the first product
        rows.derive(reinterpret_cast<const float*>(st + St::RAW), L, St::BT, opt);
        return st;
    }
    // The producer warp of a pass whose factors are written beside it (AHEAD), chunk by chunk: waits until the
    // chunk is published (await_item) and reads its rows, then, once the consumers have handed its stage back,
    // fills it. The flag and the rows' round trips to L2 come before the stage is free, so that only the TMA
    // copies' latency remains after it.
    __device__ __forceinline__ void produce_ahead(const StatePassBlock& pb, const PassMaps& maps, const RowInputs& in,
                                                  const int* ready, const int* seq_chunk0, int HV,
                                                  const PassOptions& opt) {
        const int lane = threadIdx.x & 31;
#pragma unroll 1
        for (int c = 0; c < pb.nchunks; ++c) {
            const int s = c & 1;
            await_item(ready + (i64)(seq_chunk0[pb.n] + c) * HV + pb.hv);
            const typename St::LaneRows rows = St::lane_rows(pb, c, in, HV, opt, lane);
            if (c >= 2) mbar_wait(bars + 2 + s, ((c >> 1) - 1) & 1);
            St::issue_ahead(stages + s * St::BYTES, bars + s, pb, c, maps, rows, lane);
        }
    }
    // Stage s's per-key decays (Gate::fetch's slot).
    __device__ __forceinline__ float* gate_slot(int s) const { return gate_slots + s * KP; }
    // A warpgroup's state columns (from c0) into the state tile.
    template <typename AccT>
    __device__ __forceinline__ void put_state(AccT& S, int c0) {
        S.apply_pairs([&](int r, int j, float& x0, float& x1) { store_pair(state, blk(r, c0 + j, BV), x0, x1); });
    }
    // The whole state tile (once every warpgroup has put its columns) to a [K, V] state at value columns
    // [v0, v0 + vcols) (V and v0 multiples of 8), by the block's NT threads.
    template <int NTH>
    __device__ __forceinline__ void copy_state_out(T* dst, int K, int V, int v0, int vcols) const {
        store_blocked<BV, NTH, BV, KP>(dst + v0, V, state, K, 0, vcols, threadIdx.x);
    }
    // Rows [0, L) of a warpgroup's columns [c0, c0 + BVW) of a BT x BV tile to a chunk's rows of a [.., HV, V]
    // array (dst: its first row at the block's first value column), by the warpgroup's threads.
    template <int BVW>
    static __device__ __forceinline__ void copy_cols_out(T* dst, int HV, int V, const T* tile, int L, int c0,
                                                         int vcols) {
        store_blocked<BVW, 128, BV, St::BT>(dst, (i64)HV * V, tile, L, c0, vcols, threadIdx.x & 127);
    }
};

// What a warpgroup's update rule sees of its chunk: the stage's v tile (swizzled) and the rule matrix's address, the
// value-sized work tile tile0 (blocked) and its address, the chunk's rows, this warpgroup (wg) and its first column
// c0, and the chunk's first token and length.
template <typename T>
struct WgChunk {
    T* sV;
    unsigned aA;
    T* tile0;
    unsigned a0;
    const ChunkRows& rows;
    int wg, c0;
    i64 bos;
    int L;
};

// The forward state pass per (sequence, value head, block of BV = NWG BVW value columns), over one sequence's
// chunks. Per chunk, with S the state at its start and U the update values of the rule:
//   o = scale (2^G (q S) + P U),   S = 2^G_last S + k^T (2^(G_last - G) U)
// STORE (the backward's recompute): skip the output, store S per chunk (hbuf, where given) and U (vnew) instead.
// KEEP (a forward whose backward follows): write the output and store S per chunk (hbuf) too. A compile-time
// choice, so that the plain forward's pass carries no code for the stores.
// The final state where PASS_HT is set (with STORE and no hbuf: the segments' end states of a segmented pass,
// common/segment_combine.cuh).
// From a chunk's first dead row on (common/chunk_stages.cuh), the outputs and the state carried on are NaN.
template <typename T, int KP, int NWG, int BVW, bool STORE, bool PIPE, bool AHEAD, class Gate, class Rule,
          bool KEEP = false>
__device__ __forceinline__ void wg_forward_state_pass(unsigned char* smem, const ForwardPassIO<T>& a,
                                                      const int* ready, const PassMaps& maps) {
    static_assert(PIPE || !AHEAD, "the producer warp fills two stages");
    constexpr int BT = 64, BV = NWG * BVW, MS = KP / 64, NS = PIPE ? 2 : 1;
    using St = WgStage<KP, BV, !STORE, false, Rule::HAS_A>;
    const int HV = a.HV, K = a.K, V = a.V;
    // tile0: the rule's work, then U (each warpgroup's columns, after its products on the work are done);
    // tile1: 2^(G_last - G) U
    WgPassSmem<T, St, KP, BV, NS, 2, 128 * NWG, AHEAD, Gate> sm(smem);

    const StatePassBlock pb(a.NVB, BV, BT, a.cu, a.T_, a.H, HV, K, V, a.opt);
    if (AHEAD && threadIdx.x >= 128 * NWG) {
        sm.produce_ahead(pb, maps, a.rows, ready, a.seq_chunk0, HV, a.opt);
        return;
    }
    const int wg = threadIdx.x >> 7, c0 = wg * BVW;
    const auto ncols = [&](unsigned tile) { return b_mnmajor(tile, BV, c0); };  // this warpgroup's columns
    const auto issue = [&](int c, int s) {  // chunk c's inputs into stage s
        Gate::template fetch<KP>(sm.gate_slot(s), a.rows, pb.chunk_index(a.seq_chunk0, c), HV, pb.hv, K);
        St::template issue<128 * NWG>(sm.stages + s * St::BYTES, sm.bars + s, pb, c, maps, (const T*)nullptr,
                                      (const T*)nullptr, a.rows, HV, V, a.opt);
    };

    WgAcc<MS, BVW> S;  // this warpgroup's columns: value columns [v0 + c0, v0 + vcols) of the state
    if (a.opt.h0()) load_state(S, a.h0 + pb.state_off, K, V, pb.v0 + c0, pb.vcols - c0);
    else S.fill(0.f);

    if (PIPE && !AHEAD && pb.nchunks > 0) issue(0, 0);
#pragma unroll 1
    for (int c = 0; c < pb.nchunks; ++c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        unsigned char* st = sm.template enter_chunk<PIPE>(c, c, c + 1 < pb.nchunks ? c + 1 : -1, L, a.opt,
                                                          issue);
        T* sV = reinterpret_cast<T*>(st + St::V);
        // the chunk's output rows: o, or U (vnew, where the rule's U is worth keeping)
        T* const rows_out = (STORE ? a.vnew : a.o) + (bos * HV + pb.hv) * V + pb.v0;
        const unsigned aQ = smem_addr(st + St::Q), aK = smem_addr(st + St::K), aA = smem_addr(st + St::A),
                       aP = smem_addr(st + St::P);
        const WgChunk<T> ch{sV, aA, sm.tile0, sm.a0, sm.rows, wg, c0, bos, L};
        sm.put_state(S, c0);
        fence_proxy_async();
        sm.sync();
        // the rule's products with S (and Y = q S): this warpgroup's columns
        WgAcc<1, BVW> X, Y;
        wg_fence();
        Rule::template issue_correction<KP>(X, aK, ncols(sm.a_state));
        if (!STORE) Y.template mma<T, false, true, KP>(a_kmajor_sw128(aQ), ncols(sm.a_state), false);
        wg_commit();
        if ((STORE || KEEP) && a.hbuf != nullptr)
            sm.template copy_state_out<128 * NWG>(a.hbuf + pb.chunk_state_off(a.seq_chunk0, c, HV, K, V), K, V, pb.v0,
                                                  pb.vcols);
        wg_wait<0>();
        WgAcc<1, BVW> D;
        Rule::template values<Gate, BV>(X, D, ch, ncols, [&](int i, int j, float& x0, float& x1) {
            const int e = blk(i, c0 + j, BV);
            store_pair(sm.tile0, e, x0, x1);
            const float l = Gate::update_factor(sm.rows, i);
            store_pair(sm.tile1, e, x0 * l, x1 * l);
        });
        if (!STORE) Gate::scale_output(Y, sm.rows, a.scale);
        Gate::template decay<BT>(S, sm.rows);
        fence_proxy_async();
        wg_barrier(wg);
        // o = scale 2^G q S + P U;  S = 2^G_last S + k^T (2^(G_last - G) U)
        wg_fence();
        if (!STORE) Y.template mma<T, false, true, BT>(a_kmajor_sw128(aP), ncols(sm.a0), true);
        S.template mma<T, true, true, BT>(a_mnmajor_sw128(aK), ncols(sm.a1), true);
        wg_commit();
        if (STORE && a.vnew != nullptr) sm.template copy_cols_out<BVW>(rows_out, HV, V, sm.tile0, L, c0, pb.vcols);
        wg_wait<0>();
        const int live = sm.rows.live_rows();
        if (live < L) S.fill(dead_value());
        if (!STORE) {  // o through this warpgroup's columns of tile1 (their last reader, S's product, is done)
            Y.apply_pairs([&](int i, int j, float& x0, float& x1) {
                store_pair(sm.tile1, blk(i, c0 + j, BV), i < live ? x0 : dead_value(), i < live ? x1 : dead_value());
            });
            wg_barrier(wg);
            sm.template copy_cols_out<BVW>(rows_out, HV, V, sm.tile1, L, c0, pb.vcols);
        }
        sm.leave_chunk(c);
    }
    if (a.opt.ht()) store_state(S, a.ht + pb.state_off, K, V, pb.v0 + c0, pb.vcols - c0);
}

// The reverse state pass, last chunk to first, laid out like wg_forward_state_pass: warpgroup w owns the columns
// [w BVW, (w + 1) BVW) of dS, the gradient of the state at the current chunk's end (dht, or 0, at the sequence end),
// all KP rows, in float32 registers. Per chunk:
//   dU = P^T do + 2^(G_last - G) (k dS)      (the rule: the values' input gradient and its state term from dU;
//                                             P as hi + lo tiles where the rule says REVERSE_P_LO)
//   dS = 2^G_last dS + q^T (scale 2^G do) + the rule's term
// Stores dS per chunk (dhbuf), the values' input gradient (dv) and dh0. A chunk with dead rows ends at the first,
// unless a cotangent reaches them (cotangent_reaches_dead_rows): then dS is NaN from there on. PIPE: the previous
// chunk's inputs load
// while this one computes. The stage's do tile turns into scale 2^G do in place, so that two stages of 128 value
// columns fit; tile0 holds dU, then the rule's work.
template <typename T, int KP, int NWG, int BVW, bool PIPE, class Gate, class Rule>
__device__ __forceinline__ void wg_reverse_state_pass(unsigned char* smem, const ReversePassIO<T>& a,
                                                      const PassMaps& maps, const Rule& rule) {
    constexpr int BT = 64, BV = NWG * BVW, MS = KP / 64, NS = PIPE ? 2 : 1;
    constexpr bool P_LO = Rule::REVERSE_P_LO;
    using St = WgStage<KP, BV, true, true, Rule::HAS_A, P_LO>;
    const int HV = a.HV, K = a.K, V = a.V;
    WgPassSmem<T, St, KP, BV, NS, 1, 128 * NWG, false, Gate> sm(smem);

    const StatePassBlock pb(a.NVB, BV, BT, a.cu, a.T_, a.H, HV, K, V, a.opt);
    const int wg = threadIdx.x >> 7, c0 = wg * BVW;
    const auto ncols = [&](unsigned tile) { return b_mnmajor(tile, BV, c0); };  // this warpgroup's columns
    const auto issue = [&](int c, int s) {  // chunk c's inputs into stage s
        Gate::template fetch<KP>(sm.gate_slot(s), a.rows, pb.chunk_index(a.seq_chunk0, c), HV, pb.hv, K);
        St::template issue<128 * NWG, Rule::REVERSE_READS_V>(sm.stages + s * St::BYTES, sm.bars + s, pb, c, maps, a.v,
                                                             a.dout, a.rows, HV, V, a.opt);
    };

    WgAcc<MS, BVW> dS;  // this warpgroup's columns of the state gradient at the current chunk's end
    if (a.opt.dht()) load_state(dS, a.dht + pb.state_off, K, V, pb.v0 + c0, pb.vcols - c0);
    else dS.fill(0.f);

    if (PIPE && pb.nchunks > 0) issue(pb.nchunks - 1, 0);
#pragma unroll 1
    for (int c = pb.nchunks - 1; c >= 0; --c) {
        const i64 bos = pb.bos + (i64)c * BT;
        const int L = min(BT, pb.len - c * BT);
        const int code0 = a.rows.Rc[bos * HV + pb.hv];  // the chunk's first row code: its load flies during the wait
        unsigned char* st = sm.template enter_chunk<PIPE>(pb.nchunks - 1 - c, c, c - 1, L, a.opt, issue);
        T* sV = reinterpret_cast<T*>(st + St::V);
        T* sDo = reinterpret_cast<T*>(st + St::DO);
        const i64 rows_off = (bos * HV + pb.hv) * V + pb.v0;  // the chunk's rows of the [BT_, HV, V] outputs
        const unsigned aQ = smem_addr(st + St::Q), aK = smem_addr(st + St::K), aA = smem_addr(st + St::A),
                       aP = smem_addr(st + St::P), aPlo = smem_addr(st + St::PLO), aDo = smem_addr(st + St::DO);
        const WgChunk<T> ch{sV, aA, sm.tile0, sm.a0, sm.rows, wg, c0, bos, L};
        const int live = code_live_rows(code0);
        if (live < L && cotangent_reaches_dead_rows(dS, a.dout, bos, live, L, HV, V, pb)) dS.fill(dead_value());
        sm.put_state(dS, c0);
        fence_proxy_async();
        __syncthreads();
        // dU = 2^(G_last - G) (k dS) + P^T do
        WgAcc<1, BVW> Z, U;
        wg_fence();
        Z.template mma<T, false, true, KP>(a_kmajor_sw128(aK), ncols(sm.a_state), false);
        U.template mma<T, true, true, BT>(a_mnmajor_sw128(aP), ncols(aDo), false);
        if (P_LO) U.template mma<T, true, true, BT>(a_mnmajor_sw128(aPlo), ncols(aDo), true);
        wg_commit();
        sm.template copy_state_out<128 * NWG>(a.dhbuf + pb.chunk_state_off(a.seq_chunk0, c, HV, K, V), K, V, pb.v0,
                                              pb.vcols);
        wg_wait<0>();
        wg_barrier(wg);  // every warp's part of P^T do has read this warpgroup's do columns
        for (int idx = threadIdx.x & 127; idx < BT * BVW / 2; idx += 128) {  // do -> scale 2^G do, in place
            const int i = idx / (BVW / 2), e = blk(i, c0 + 2 * (idx % (BVW / 2)), BV);
            const float2 d = load_pair(sDo, e);
            const float f = a.scale * Gate::q_factor(sm.rows, i);
            store_pair(sDo, e, f * d.x, f * d.y);
        }
        Z.zip_pairs(U, [&](int i, int j, float& z0, float& z1, float& u0, float& u1) {
            const float l = Gate::update_factor(sm.rows, i);
            store_pair(sm.tile0, blk(i, c0 + j, BV), l * z0 + u0, l * z1 + u1);
        });
        fence_proxy_async();
        wg_barrier(wg);
        rule.template reverse_values<Gate, BV>(Z, ch, ncols, pb);  // the values' input gradient into the v tile
        Gate::template decay<BT>(dS, sm.rows);
        fence_proxy_async();
        wg_barrier(wg);
        // dS = 2^G_last dS + q^T (scale 2^G do) + the rule's term
        wg_fence();
        dS.template mma<T, true, true, BT>(a_mnmajor_sw128(aQ), ncols(aDo), true);
        Rule::template issue_state_grad<BT>(dS, aK, ncols(sm.a0));
        wg_commit();
        sm.template copy_cols_out<BVW>(a.dv + rows_off, HV, V, sV, L, c0, pb.vcols);
        wg_wait<0>();
        rule.template finish_reverse<BV>(Z, ch, sDo, rows_off, [&](T* dst, const T* tile) {
            sm.template copy_cols_out<BVW>(dst, HV, V, tile, L, c0, pb.vcols);
        });
        __syncthreads();
    }
    if (a.opt.h0()) store_state(dS, a.dh0 + pb.state_off, K, V, pb.v0 + c0, pb.vcols - c0);
}

}  // namespace rawdelta
