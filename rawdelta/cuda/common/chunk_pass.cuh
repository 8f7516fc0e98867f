// What every kernel that walks chunks shares, whatever the family: the options every pass has, the per-chunk row
// scalars in shared memory (ChunkRows), the scalar gate form, a state pass block's work (StatePassBlock), loads of
// per-token chunk matrices and of [K, V] states, and paired row stores.
//
// Layouts (C-contiguous; BT_ = B * T flattened tokens, chunks never cross sequences):
//   Gc, Bc, Rq, Rk [BT_, HV] float: per token, the chunk-local cumulative log2 gate, the update rule's row scalar
//                    (the gated delta rule's effective beta) and the inverse L2 norms of the q and k rows
//   Rc [BT_, HV] int: per token, its row code (common/chunk_stages.cuh: resets so far, the chunk's first dead row)
//   chunk matrices [BT_, HV, BT]: row r of a chunk's BT x BT matrix at token r
//   states [N or NC, HV, K, V]
#pragma once
#include "common/chunk_stages.cuh"

namespace rawdelta {

constexpr int TILE_PAD = 8;  // elements added to every 16-bit mma.sync tile row: ldmatrix without bank conflicts

// The options of a pass that do not select its code at compile time: each is tested once per block or once per
// row of a chunk, never inside a product. They are these bits of the flag word a family's kernels take (every
// family keeps them at these positions), tested where they are used.
enum : int { PASS_ROW_NORMS = 32, PASS_H0 = 1024, PASS_HT = 2048, PASS_VARLEN = 4096, PASS_DHT = 8192 };

struct PassOptions {
    int flags;
    // an initial state is given: the forward pass starts from it, the reverse pass writes dh0
    __device__ __forceinline__ bool h0() const { return flags & PASS_H0; }
    // the forward pass writes the final state
    __device__ __forceinline__ bool ht() const { return flags & PASS_HT; }
    // the reverse pass starts from the final state's gradient, else from zero
    __device__ __forceinline__ bool dht() const { return flags & PASS_DHT; }
    // sequences from cu_seqlens, else N sequences of T_ tokens
    __device__ __forceinline__ bool varlen() const { return flags & PASS_VARLEN; }
    // Rq and Rk hold the q and k rows' inverse L2 norms, else every row factor is 1
    __device__ __forceinline__ bool row_norms() const { return flags & PASS_ROW_NORMS; }
};

// The per-token row scalars a pass reads (ChunkRows::load, fetch_raw), [BT_, HV] each: float gates, row scalars and
// q / k row factors, int row codes (common/chunk_stages.cuh: row_code).
// A per-key gate form adds Dk [NC, HV, K] float, each chunk's per-key decay (null for a scalar gate). Gc and Bc may be
// null: no scalar gate (every row factor 1) and no row scalar (1).
struct RowInputs {
    const float *Gc, *Bc;
    const int* Rc;
    const float *Rq, *Rk;
    const float* Dk = nullptr;
};

// Per-chunk row scalars in shared memory, loaded at each chunk's start:
//   G the cumulative log2 gates and R the reset counts (common/chunk_stages.cuh; rows past the chunk repeat the
//   last, so every decay stays finite), B the update rule's row scalar (0 past the chunk and on dead rows), rq / rk
//   the q / k row factors (inverse L2 norms with the row_norms option, else 1), the chunk's live rows (its first
//   dead row, or its length), and the decays the epilogues need, chosen by the reset counts: gq = 2^G rq and
//   gk = 2^G rk (0 after a reset), lk = 2^(G_last - G) rk (0 before a reset).
struct ChunkRows {
    float *G, *B, *rq, *rk, *gq, *gk, *lk;
    int *R, *live;
    float* kdecay;  // per-key decay across the chunk (the per-key gate form's, KeyGate; KP floats)
    static constexpr int ARRAYS = 7;

    __device__ __forceinline__ void carve(SmemCursor& cur, int BT) {
        float** arrays[ARRAYS] = {&G, &B, &rq, &rk, &gq, &gk, &lk};
#pragma unroll
        for (int a = 0; a < ARRAYS; ++a) *arrays[a] = cur.take<float>(BT);
        R = cur.take<int>(BT + 4);
        live = R + BT;
    }
    // Row r from its cumulative gate x and row code, the last row's gate and code, its row scalar and q / k factors.
    __device__ __forceinline__ void set(int r, float x, int code, float glast, int code_last, float b, float nq,
                                        float nk) {
        const int n = code_resets(code);
        const float e = n > 0 ? 0.f : exp2f(x), l = code_resets(code_last) > n ? 0.f : exp2f(glast - x);
        G[r] = x;
        R[r] = n;
        B[r] = b;
        rq[r] = nq;
        rk[r] = nk;
        gq[r] = e * nq;
        gk[r] = e * nk;
        lk[r] = l * nk;
        if (r == 0) *live = code_live_rows(code);
    }
    // The chunk's rows before its first dead one (its length when none).
    __device__ __forceinline__ int live_rows() const { return *live; }
    // Decays from the chunk's start to row i, from row i to the chunk's last row `last`, and from row j to row i.
    __device__ __forceinline__ float start(int i) const { return R[i] > 0 ? 0.f : exp2f(G[i]); }
    __device__ __forceinline__ float to_end(int i, int last) const {
        return R[last] > R[i] ? 0.f : exp2f(G[last] - G[i]);
    }
    __device__ __forceinline__ float pair(int i, int j) const { return pair_decay(G, R, i, j); }
    // Whether row i's own gate is a reset.
    __device__ __forceinline__ bool reset_at(int i) const { return R[i] > (i > 0 ? R[i - 1] : 0); }

    __device__ __forceinline__ void load(const RowInputs& in, i64 bos, int L, int BT, int HV, int hv,
                                         const PassOptions& opt) {
        const i64 tl = (bos + L - 1) * HV + hv;
        const float glast = in.Gc != nullptr ? in.Gc[tl] : 0.f;
        const int clast = in.Rc[tl];
        for (int r = threadIdx.x; r < BT; r += blockDim.x) {
            const bool inside = r < L, l2 = inside && opt.row_norms();
            const i64 th = (bos + (inside ? r : L - 1)) * HV + hv;
            set(r, in.Gc != nullptr ? in.Gc[th] : 0.f, in.Rc[th], glast, clast,
                inside ? (in.Bc != nullptr ? in.Bc[th] : 1.f) : 0.f, l2 ? in.Rq[th] : 1.f, l2 ? in.Rk[th] : 1.f);
        }
    }
    // load() in two steps, for prefetching: the raw per-token values into shared memory ([RAW][BT] 4-byte words:
    // Gc, Bc, Rq, Rk, Rc; cp.async, zeros past the chunk), then the rows from them once they have landed.
    static constexpr int RAW = 5;
    static __device__ __forceinline__ void fetch_raw(float* raw, const RowInputs& in, i64 bos, int L, int BT, int HV,
                                                     int hv, const PassOptions& opt) {
        for (int idx = threadIdx.x; idx < RAW * BT; idx += blockDim.x) {
            const float* src = raw_source(idx, in, bos, L, BT, HV, hv, opt);
            // a zero-filled copy reads nothing, but takes a valid address: the row codes are always given
            cp_async4(raw + idx, src != nullptr ? src : reinterpret_cast<const float*>(in.Rc), src != nullptr ? 4 : 0);
        }
    }
    // Where raw value idx of the chunk of L tokens at token bos comes from: null for a zero (a row past the chunk, a
    // row norm without the row_norms option, or an absent scalar gate or row scalar).
    static __device__ __forceinline__ const float* raw_source(int idx, const RowInputs& in, i64 bos, int L, int BT,
                                                              int HV, int hv, const PassOptions& opt) {
        const int a = idx / BT, r = idx % BT;
        if (r >= L || ((a == 2 || a == 3) && !opt.row_norms()) || (a == 0 && in.Gc == nullptr) ||
            (a == 1 && in.Bc == nullptr))
            return nullptr;
        const i64 th = (bos + r) * HV + hv;
        if (a == 4) return reinterpret_cast<const float*>(in.Rc + th);
        return (a == 0 ? in.Gc : a == 1 ? in.Bc : a == 2 ? in.Rq : in.Rk) + th;
    }
    __device__ __forceinline__ void derive(const float* raw, int L, int BT, const PassOptions& opt) {
        const int* code = reinterpret_cast<const int*>(raw + 4 * BT);
        const float glast = raw[L - 1];
        const int clast = code[L - 1];
        for (int r = threadIdx.x; r < BT; r += blockDim.x) {
            const bool inside = r < L, l2 = inside && opt.row_norms();
            const int rr = inside ? r : L - 1;
            set(r, raw[rr], code[rr], glast, clast, raw[BT + r], l2 ? raw[2 * BT + r] : 1.f,
                l2 ? raw[3 * BT + r] : 1.f);
        }
    }
};

// A NaN: what a forward pass writes from a chunk's first dead row on (its outputs, and the state it carries on).
__device__ __forceinline__ float dead_value() { return __int_as_float(0x7fc00000); }

// What every state pass takes, forward or reverse, as its kernel takes it: q, k [BT_, H, K] and v [BT_, HV, V] (the
// mma.sync forms; the Hopper ones read q and k, and the forward pass v, through their tensor maps), the per-token row
// scalars, the sequences (cu_seqlens) and each one's first chunk, the sizes, the output scale and the options.
template <typename T>
struct PassInputs {
    const T *q, *k, *v;
    RowInputs rows;
    const i64* cu;
    const int* seq_chunk0;
    int T_, H, HV, K, V, NVB;
    float scale;
    PassOptions opt;
};

// A forward state pass's arrays besides: h0, ht [N, HV, K, V]; o [BT_, HV, V]; hbuf [NC, HV, K, V] (the state at
// each chunk's start) and vnew [BT_, HV, V] (the update values), written by the backward's recompute only.
template <typename T>
struct ForwardPassIO : PassInputs<T> {
    const float* h0;
    T* o;
    float* ht;
    T *hbuf, *vnew;
};

// A reverse state pass's arrays besides: do, dv [BT_, HV, V]; dht, dh0 [N, HV, K, V]; dhbuf [NC, HV, K, V] (the
// state gradient at each chunk's end).
template <typename T>
struct ReversePassIO : PassInputs<T> {
    const T* dout;
    const float* dht;
    T *dhbuf, *dv;
    float* dh0;
};

// The scalar gate form of the state passes: one log-gate per (token, head), so a chunk's cumulative gates are a
// column G[BT] (ChunkRows) and every decay scales whole rows: the state's by 2^G_last across the chunk, the
// operands' rows by the factors ChunkRows derives. A per-key form (GLA) decays each state row by its own key's
// gate and folds the per-key factors into the q and k operands (its rows' factors are then 1).
struct ScalarGate {
    // Decay of state row `kd` across the whole chunk (G holds the chunk's cumulative log2 gates).
    static __device__ __forceinline__ float chunk_decay(const float* G, int ldg, int last, int kd) {
        return exp2f(G[last * ldg]);
    }
    // S = 2^G_last S: the state (or its gradient) across a chunk of BT rows.
    template <int BT, typename AccT>
    static __device__ __forceinline__ void decay(AccT& S, const ChunkRows& rows) {
        decay_state<ScalarGate>(S, rows.G, rows.R, 1, BT - 1);
    }
    // Y = scale 2^G_i rq_i (q S)_i: the output's inter-chunk part.
    template <typename AccT>
    static __device__ __forceinline__ void scale_output(AccT& Y, const ChunkRows& rows, float scale) {
        scale_inter_output(Y, rows.gq, scale);
    }
    // Factors of row i: q's in the output (2^G_i rq_i), k's against the chunk's starting state (2^G_i rk_i), and the
    // update values' in the state's update S += k^T (f U) (2^(G_last - G_i) rk_i).
    static __device__ __forceinline__ float q_factor(const ChunkRows& rows, int i) { return rows.gq[i]; }
    static __device__ __forceinline__ float k_factor(const ChunkRows& rows, int i) { return rows.gk[i]; }
    static __device__ __forceinline__ float update_factor(const ChunkRows& rows, int i) { return rows.lk[i]; }
    // A scalar gate keeps, loads and fetches nothing per key.
    static constexpr bool PER_KEY = false;
    template <int KP> static __device__ __forceinline__ void carve(ChunkRows&, SmemCursor&) {}
    template <int KP> static __device__ __forceinline__ void load(ChunkRows&, const RowInputs&, int, int, int, int) {}
    template <int KP> static __device__ __forceinline__ void fetch(float*, const RowInputs&, int, int, int, int) {}
};

// The per-key gate form (GLA): a log-gate per (token, head, key). The family's prepare folds every decay into the
// operands the passes take for q and k (q 2^G, k 2^(G_last - G)) and into the scores, so the passes see no scalar
// gate (RowInputs Gc null: every row factor is 1); across a chunk each state row kd decays by its own key's
// 2^G_last, from RowInputs Dk, per chunk in ChunkRows::kdecay: loaded at the chunk's step (load: the mma.sync
// passes), or fetched with the chunk's stage of inputs (fetch: the Hopper passes, where a load's round trip would sit
// on every chunk's chain).
struct KeyGate {
    static constexpr bool PER_KEY = true;
    template <int BT, typename AccT>
    static __device__ __forceinline__ void decay(AccT& S, const ChunkRows& rows) {
        // a reset's decay is 0: the state row is zero by selection (the state before it may hold a NaN)
        S.apply([&](int kd, int, float& x) {
            const float f = rows.kdecay[kd];
            x = f == 0.f ? 0.f : x * f;
        });
    }
    template <typename AccT>
    static __device__ __forceinline__ void scale_output(AccT& Y, const ChunkRows&, float scale) {
        Y.apply([&](int, int, float& x) { x *= scale; });
    }
    static __device__ __forceinline__ float q_factor(const ChunkRows& rows, int i) { return rows.gq[i]; }
    static __device__ __forceinline__ float k_factor(const ChunkRows& rows, int i) { return rows.gk[i]; }
    static __device__ __forceinline__ float update_factor(const ChunkRows& rows, int i) { return rows.lk[i]; }
    template <int KP> static __device__ __forceinline__ void carve(ChunkRows& rows, SmemCursor& cur) {
        rows.kdecay = cur.take<float>(KP);
    }
    // Chunk `chunk` (its index among all NC) of value head hv: its K per-key decays, 0 on the padding rows [K, KP)
    // (the state is zero there, and must stay so). Read after the pass's next barrier.
    template <int KP>
    static __device__ __forceinline__ void load(ChunkRows& rows, const RowInputs& in, int chunk, int HV, int hv,
                                                int K) {
        const float* src = in.Dk + ((i64)chunk * HV + hv) * K;
        for (int d = threadIdx.x; d < KP; d += blockDim.x) rows.kdecay[d] = d < K ? src[d] : 0.f;
    }
    // load()'s values as cp.async copies into `slot` (KP floats; zero-filled past K) in the caller's open group: the
    // caller commits and waits.
    template <int KP>
    static __device__ __forceinline__ void fetch(float* slot, const RowInputs& in, int chunk, int HV, int hv, int K) {
        const float* src = in.Dk + ((i64)chunk * HV + hv) * K;
        for (int d = threadIdx.x; d < KP; d += blockDim.x) cp_async4(slot + d, d < K ? src + d : src, d < K ? 4 : 0);
    }
};

// out[e], out[e + 1] for columns j, j + 1 of a row with `cols` valid columns; one paired store when the
// row length is even (then e is even and the pair aligned).
template <typename T>
__device__ __forceinline__ void put_row_pair(T* out, i64 e, int j, int cols, bool paired, float a, float b) {
    if (paired && j + 1 < cols) {
        store_pair(out + e, 0, a, b);
        return;
    }
    if (j < cols) out[e] = from_float<T>(a);
    if (j + 1 < cols) out[e + 1] = from_float<T>(b);
}

// A per-token [BT_, HV, BT] chunk matrix in global memory as the tile type TT of its kernel: the hi array
// for 16-bit inputs, the hi and lo arrays for float inputs (lo is unused otherwise); advance() offsets both.
template <typename TT, typename E>
__device__ __forceinline__ TT chunk_matrix(const E* hi, const E* lo) {
    if constexpr (OperandSplit<TT>::value) return TT{const_cast<E*>(hi), const_cast<E*>(lo)};
    else return const_cast<E*>(hi);
}
template <typename E> __device__ __forceinline__ E* advance(E* p, i64 n) { return p + n; }
template <typename E> __device__ __forceinline__ Split<E> advance(Split<E> s, i64 n) { return {s.hi + n, s.lo + n}; }

// Rows [bos, bos + L) of a per-token [BT_, HV, BT] chunk matrix into a tile, zero rows past the chunk; a split
// matrix (hi and lo arrays) into a split tile.
template <int BT, typename E>
__device__ __forceinline__ void load_chunk_rows(E* s, int ld, const E* g, i64 bos, int L, int HV, int hv) {
    load_tile(s, ld, g + (bos * HV + hv) * BT, (i64)HV * BT, L, BT, BT, BT);
}
template <int BT, typename E>
__device__ __forceinline__ void load_chunk_rows(Split<E> s, int ld, Split<E> g, i64 bos, int L, int HV, int hv) {
    load_chunk_rows<BT>(s.hi, ld, g.hi, bos, L, HV, hv);
    load_chunk_rows<BT>(s.lo, ld, g.lo, bos, L, HV, hv);
}

// State tile [K, V] (row stride V) <-> a KP x BV accumulator (Acc, or a warpgroup's WgAcc) at value columns
// [v0, v0 + vcols) (none when vcols <= 0).
template <typename TS, typename AccT>
__device__ __forceinline__ void store_state(AccT& S, TS* dst, int K, int V, int v0, int vcols) {
    S.apply_pairs([&](int r, int c, float& x0, float& x1) {
        if (r < K) put_row_pair(dst, (i64)r * V + v0 + c, c, vcols, (V & 1) == 0, x0, x1);
    });
}
template <typename AccT>
__device__ __forceinline__ void load_state(AccT& S, const float* src, int K, int V, int v0, int vcols) {
    S.apply([&](int r, int c, float& x) { x = (r < K && c < vcols) ? src[(i64)r * V + v0 + c] : 0.f; });
}

// A state pass block's work: sequence n, value head hv (key head h), the value columns [v0, v0 + vcols) of its
// block vb (NVB blocks of BV columns per head), the sequence's tokens [bos, bos + len) in nchunks chunks of BT,
// and the offset of its [K, V] states.
struct StatePassBlock {
    int vb, hv, n, h, v0, vcols, len, nchunks;
    i64 bos, state_off;
    bool paired;  // V even: output rows take paired stores
    __device__ __forceinline__ StatePassBlock(int NVB, int BV, int BT, const i64* cu, int T_, int H, int HV, int K,
                                              int V, const PassOptions& opt) {
        vb = blockIdx.x % NVB;
        const int nh = blockIdx.x / NVB;
        hv = nh % HV;
        n = nh / HV;
        h = hv / (HV / H);
        v0 = vb * BV;
        vcols = min(BV, V - v0);
        paired = (V & 1) == 0;
        const SeqRange sr = seq_range(cu, n, T_, opt.varlen());
        bos = sr.bos;
        len = (int)(sr.eos - sr.bos);
        nchunks = (len + BT - 1) / BT;
        state_off = ((i64)n * HV + hv) * K * V;
    }
    // Index among all NC chunks of the sequence's chunk c.
    __device__ __forceinline__ int chunk_index(const int* seq_chunk0, int c) const { return seq_chunk0[n] + c; }
    // Offset of chunk c's [K, V] state in a per-chunk [NC, HV, K, V] array (hbuf, dhbuf).
    __device__ __forceinline__ i64 chunk_state_off(const int* seq_chunk0, int c, int HV, int K, int V) const {
        return ((i64)chunk_index(seq_chunk0, c) * HV + hv) * K * V;
    }
};

// Whether any cotangent of this block reaches the dead rows [nb, L) of its chunk (nb < L): its columns of the state
// gradient at the chunk's end (dS, an Acc or a warpgroup's WgAcc; zero past the block's columns) or do's rows there
// ([BT_, HV, V], the block's value columns). Then the gradients before the dead rows are NaN; otherwise the chunk
// ends at nb for the reverse pass. A barrier over the whole block: every thread gets the answer.
template <typename T, typename AccT>
__device__ __forceinline__ bool cotangent_reaches_dead_rows(AccT& dS, const T* dout, i64 bos, int nb, int L, int HV,
                                                            int V, const StatePassBlock& pb) {
    bool any = false;
    dS.apply([&](int, int, float& x) { any |= x != 0.f; });
    for (int idx = threadIdx.x; idx < (L - nb) * pb.vcols; idx += blockDim.x) {
        const int r = nb + idx / pb.vcols, j = idx % pb.vcols;
        any |= to_float(dout[((bos + r) * HV + pb.hv) * V + pb.v0 + j]) != 0.f;
    }
    return __syncthreads_or(any);
}

}  // namespace rawdelta
