// Gated delta rule, chunked mode: what its kernels share. The stages are one source each: chunk_prepare.cu
// (per-chunk factors), chunk_fwd.cu (forward state passes), chunk_bwd.cu (reverse state passes), chunk_bwd_dqk.cu
// (dq, dk and the gate and beta gradients); the passes' chain is common/state_pass.cuh and common/wg_state_pass.cuh
// with the rule of chunk_rule.cuh. Math and the backward derivation: rawdelta/ops/gated_delta_rule/README.md
// ("Chunked form").
//
// Layouts (C-contiguous; BT_ = B * T flattened tokens, NC chunks in all, chunks never cross sequences):
//   q, k [BT_, H, K] (T)   v, o, do [BT_, HV, V] (T)   g, beta [BT_, HV] (float)
//   Gc, Bc [BT_, HV] float: chunk-local cumulative log2 gates, effective beta (prepare kernel)
//   Rc [BT_, HV] int: row codes, the resets so far in the chunk and its first dead row (prepare kernel;
//                    common/chunk_stages.cuh)
//   Rq, Rk [BT_, HV] float: inverse L2 norms of the q and k rows (prepare kernel; only with F_L2). The
//                    kernels fold them into their epilogues as row factors instead of normalising tiles
//   hbuf, dhbuf [NC, HV, K, V] (T): state at each chunk's start / its gradient at the chunk's end
//   vnew, ybuf [BT_, HV, V] (T): delta = A r and y = A^T d(delta), per chunk
//
//   Ahi, Alo [BT_, HV, BT] (E): row r of the chunk's (I + L)^-1 at token r, split into hi + lo parts (Alo for
//                    the mma.sync state passes only)
//   Phi, Plo [BT_, HV, BT] (E): row r of the chunk's masked, decayed, scaled scores q k^T (prepare kernel),
//                    for both state passes; Plo only for float inputs (their score tiles are split)
//
// Template parameters: T input dtype; E the 16-bit mma type (bf16 for bf16 and float inputs, fp16 for
// fp16); BT chunk size; KP the key dimension padded to 64/128/256; BV the value columns per block of
// the state passes. Tiles of input precision are E tiles (Split<E> for float inputs); states, inverses
// and other float32 intermediates are Split<E> tiles, so their products keep ~16 mantissa bits.
//
// The option flags stay runtime arguments: each is tested once per block, or once per row of a chunk where the
// rows are loaded, never inside a product, so a template parameter per flag would double the instantiations
// (and the compile time) of every kernel for no measurable gain. The code paths that do change the loops (the
// recompute for the backward, prefetching, prepare beside the pass, dq/dk finished in the kernel) are template
// parameters.
#pragma once
#include "common/chunk_pass.cuh"
#include "gated_delta_rule/gdn_common.cuh"

namespace rawdelta {

// The pass options keep their bits in the gated delta rule's flag word (common/chunk_pass.cuh: PassOptions).
static_assert(F_L2 == PASS_ROW_NORMS && F_H0 == PASS_H0 && F_HT == PASS_HT && F_VARLEN == PASS_VARLEN &&
                  F_DHT == PASS_DHT,
              "the chunk passes read the pass options at their common bits");

}  // namespace rawdelta
