"""Decode benchmark for GLA: one token per sequence through `fused_recurrent_gla`, state in and out.

Side by side in one process, on the same inputs and the same CUDA stream: rawdelta (cuda backend, new final state,
in-place state, and the torch adapter's in-place call replayed from a CUDA graph) and the peer's
`fla.ops.gla.fused_recurrent_gla` (eager and graph replay) when importable. Shapes: 64 sequences x 32 heads x
K = V = 128 by default, bf16 q/k/v, float32 gk (``--gv``: and gv) and state. The floor is the bytes that must move
(the state read and written, q, k, v, o and the gates) over the device-to-device copy bandwidth measured in the same
run. Both implementations are gated against the float64 reference first.

Usage: PYTHONPATH=. python3 benchmarks/decode_gla.py [--seqs 64] [--heads 32] [--dim 128] [--gv] [--json out.json]
"""

from __future__ import annotations

import json
import sys

import cupy
import torch
from decode_gdn import copy_bandwidth_gbs, decode_args, time_graph_ms, time_ms  # this directory is on sys.path

import rawdelta
import rawdelta.torch as rdt
from rawdelta.testing import assert_close


def main() -> int:
    ap = decode_args()
    ap.add_argument("--gv", action="store_true", help="a per-value gate besides the per-key one")
    args = ap.parse_args()
    N, H, D = args.seqs, args.heads, args.dim
    torch.manual_seed(0)
    dev = "cuda"
    q, k, v = (torch.randn(N, 1, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    gk = torch.nn.functional.logsigmoid(torch.randn(N, 1, H, D, device=dev)) / 16
    gv = torch.nn.functional.logsigmoid(torch.randn(N, 1, H, D, device=dev)) / 16 if args.gv else None
    h0 = torch.randn(N, H, D, D, device=dev, dtype=torch.float32)
    state_bytes = 2 * h0.numel() * 4
    io_bytes = (q.numel() + k.numel() + 2 * v.numel()) * 2 + gk.numel() * 4 * (2 if args.gv else 1)
    bw = copy_bandwidth_gbs()
    floor_us = (state_bytes + io_bytes) / (bw * 1e9) * 1e6

    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    cq, ck, cv, cgk, ch0 = (cupy.from_dlpack(x) for x in (q, k, v, gk, h0))
    cgv = None if gv is None else cupy.from_dlpack(gv)
    h_inplace = ch0.copy()
    kw = {"backend": "cuda", "stream": stream}

    o_rd, ht_rd = rawdelta.fused_recurrent_gla(cq, ck, cv, cgk, cgv, initial_state=ch0, output_final_state=True,
                                               **kw)
    host = {n: None if x is None else x.get() for n, x in {"q": cq, "k": ck, "v": cv, "gk": cgk, "gv": cgv,
                                                           "initial_state": ch0}.items()}
    o_ref, ht_ref = rawdelta.naive_recurrent_gla(host["q"], host["k"], host["v"], host["gk"], host["initial_state"],
                                                 True, gv=host["gv"])
    errs = {"rawdelta": (assert_close("o", o_ref, o_rd, dtype="bfloat16")[0],
                         assert_close("ht", ht_ref, ht_rd, dtype="bfloat16")[0])}
    results = [
        ("rawdelta cuda (new final state)", time_ms(lambda: rawdelta.fused_recurrent_gla(
            cq, ck, cv, cgk, cgv, initial_state=ch0, output_final_state=True, **kw))),
        ("rawdelta cuda (in-place state)", time_ms(lambda: rawdelta.fused_recurrent_gla(
            cq, ck, cv, cgk, cgv, initial_state=h_inplace, inplace_final_state=True, **kw))),
    ]
    h_graph = h0.clone()
    results.append(("rawdelta (torch adapter, in-place) CUDA-graph replay", time_graph_ms(
        lambda: rdt.fused_recurrent_gla(q, k, v, gk, gv, initial_state=h_graph, inplace_final_state=True))))
    t_peer = None
    try:
        from fla.ops.gla import fused_recurrent_gla as fla_fr

        def peer() -> tuple[torch.Tensor, torch.Tensor]:
            return fla_fr(q, k, v, gk=gk, gv=gv, initial_state=h0, output_final_state=True)

        o_p, ht_p = peer()
        errs["peer"] = (assert_close("o", o_ref, o_p.float().cpu().numpy(), dtype="bfloat16")[0],
                        assert_close("ht", ht_ref, ht_p.cpu().numpy(), dtype="bfloat16")[0])
        t_peer = time_ms(peer)
        results.append(("fla-core fused_recurrent_gla", t_peer))
        results.append(("fla-core fused_recurrent_gla CUDA-graph replay", time_graph_ms(peer)))
    except Exception as e:  # the peer is optional: report why it did not run
        print(f"peer unavailable: {type(e).__name__}: {e}")

    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s  "
          f"bytes {state_bytes + io_bytes:,}  floor {floor_us:.1f} us")
    print("error vs float64 reference (o, final state): " + ", ".join(
        f"{n} {a:.2e} / {b:.2e}" for n, (a, b) in errs.items()))
    print(f"{'implementation':58s} {'us':>8s} {'x floor':>8s} {'vs peer eager':>14s}")
    for name, ms in results:
        rel = f"{t_peer / ms:.2f}x" if t_peer else "-"
        print(f"{name:58s} {ms * 1e3:8.1f} {ms * 1e3 / floor_us:8.2f} {rel:>14s}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth_gbs": bw, "floor_us": floor_us,
                       "errors": errs, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
