"""Decode benchmark: one token per sequence through `fused_recurrent_gated_delta_rule`, state in and out.

Side by side in one process, on the same inputs and the same CUDA stream: rawdelta (cuda backend,
new final state and in-place update) and the peer's `fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`
when importable. Shapes: 64 sequences x 32 heads x K = V = 128, bf16 q/k/v, float32 g, beta and state,
q/k L2-normalised in the kernel. The floor is the state traffic (read + write) over the device-to-device
copy bandwidth measured in the same run.

The standard decode sweep (64 and 256 sequences, with the gate, floor and plots) is
``rawdelta bench --mode decode``; this script keeps the in-place-state, kernel-only and CUDA-graph variants.

``--state-v-first`` also times the same calls with the state held as ``[N, H, V, K]`` (``state_v_first=True``,
which the kernel reads and writes natively) beside the default ``[N, H, K, V]``, and prints each variant's ratio.

Usage: PYTHONPATH=. python3 benchmarks/decode_gdn.py [--state-v-first] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import cupy
import numpy as np
import torch

import rawdelta
from rawdelta.testing import assert_close


def time_ms(fn, iters: int = 200, warmup: int = 20, reps: int = 5) -> float:
    """Median over `reps` of the mean time per call of `iters` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def time_graph_ms(fn, steps: int = 20) -> float:
    """Capture `steps` calls of `fn` in one CUDA graph; time its replays (per call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    return time_ms(graph.replay, iters=20, warmup=3) / steps


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), 1 GiB buffers."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), iters=20, warmup=3)
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def _raw_launch(q, k, v, g, beta, state, stream, geom, one_step, min_blocks, v_first=False):
    """The forward kernel launched directly (no validation), to separate kernel time from host overhead; `state` is
    ``[N, H, V, K]`` with `v_first` (its kernel: ``geom[1]`` warps per block)."""
    from rawdelta.cuda.launch import CTYPES, NULL
    from rawdelta.cuda.loader import get_kernel, register
    from rawdelta.ops.common.validation import validate
    from rawdelta.ops.gated_delta_rule import cuda_recurrent as cr
    from rawdelta.ops.gated_delta_rule.cuda_common import F_HT, problem_flags
    from rawdelta.ops.gated_delta_rule.definition import RECURRENT

    p = validate(RECURRENT, {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": state,
                             "use_qk_l2norm_in_kernel": True, "inplace_final_state": True, "backend": "cuda",
                             "state_v_first": v_first})
    o = cupy.empty_like(v)
    if v_first:  # only geom[1], the warps per block, applies to this kernel
        rl = cr.fwd_vk_rows(p.K)
        name = cr.fwd_vk_name(CTYPES[p.q.dtype], rl, one_step, geom[1], min_blocks)
        nvb = -(-p.V // ((32 // rl) * geom[1]))
    else:
        name = cr.fwd_name(CTYPES[p.q.dtype], cr.fwd_kpt(p.K, geom), one_step, geom, min_blocks)
        nvb = -(-p.V // (4 * geom[0]))
    register(cr.SOURCE, [name])  # benchmark-only variants join the registry like any other
    kern = get_kernel(cr.SOURCE, name)
    args = (q, k, v, g, NULL, NULL, beta, state, NULL, NULL, NULL, o, state, np.int32(p.T), np.int32(p.H),
            np.int32(p.HV), np.int32(p.K), np.int32(p.V), np.int32(nvb), np.float32(p.scale),
            np.int32(problem_flags(p) | F_HT))

    def launch():
        kern((p.N * p.HV * nvb,), (32 * geom[1],), args, stream=stream)

    return launch


def decode_args() -> argparse.ArgumentParser:
    """The decode benchmarks' common options: --json, and the shape (--seqs x --heads x --dim, K = V = dim)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    return ap


def main() -> int:
    ap = decode_args()
    ap.add_argument("--state-v-first", action="store_true",
                    help="also time state_v_first=True ([N, H, V, K] states) beside the default layout")
    args = ap.parse_args()
    N, H, D = args.seqs, args.heads, args.dim
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(N, 1, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(N, 1, H, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(N, 1, H, D, device=dev, dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(N, 1, H, device=dev, dtype=torch.float32))
    beta = torch.rand(N, 1, H, device=dev, dtype=torch.float32).sigmoid()
    h0 = torch.randn(N, H, D, D, device=dev, dtype=torch.float32)
    state_bytes = 2 * h0.numel() * 4
    io_bytes = (q.numel() + k.numel() + 2 * v.numel()) * 2 + (g.numel() + beta.numel()) * 4
    bw = copy_bandwidth_gbs()
    floor_us = (state_bytes + io_bytes) / (bw * 1e9) * 1e6

    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    cq, ck, cv, cg, cb, ch0 = (cupy.from_dlpack(x) for x in (q, k, v, g, beta, h0))
    h_inplace = ch0.copy()
    kw = {"use_qk_l2norm_in_kernel": True, "backend": "cuda", "stream": stream}
    results = []

    # correctness gate: rawdelta vs the float64 reference on this exact problem
    o_rd, ht_rd = rawdelta.fused_recurrent_gated_delta_rule(cq, ck, cv, cg, cb, initial_state=ch0,
                                                            output_final_state=True, **kw)
    host = {n: x.get() for n, x in {"q": cq, "k": ck, "v": cv, "g": cg, "beta": cb, "initial_state": ch0}.items()}
    o_ref, ht_ref = rawdelta.naive_recurrent_gated_delta_rule(
        host["q"], host["k"], host["v"], host["beta"], host["g"], initial_state=host["initial_state"],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert_close("o", o_ref, o_rd, dtype="bfloat16")
    assert_close("ht", ht_ref, ht_rd, dtype="bfloat16")

    def rd_new_state():
        rawdelta.fused_recurrent_gated_delta_rule(cq, ck, cv, cg, cb, initial_state=ch0, output_final_state=True, **kw)

    def rd_inplace():
        rawdelta.fused_recurrent_gated_delta_rule(cq, ck, cv, cg, cb, initial_state=h_inplace,
                                                  inplace_final_state=True, **kw)

    t_new = time_ms(rd_new_state)
    t_inp = time_ms(rd_inplace)
    results.append(("rawdelta cuda (new final state)", t_new))
    results.append(("rawdelta cuda (in-place state)", t_inp))
    # kernel-only variants: the whole-row geometry and occupancy bounds around the default
    variants = [((32, 8), True, 1), ((8, 4), False, 6), ((8, 4), True, 4), ((8, 4), True, 6), ((8, 4), True, 8)]
    for geom, one, minb in variants:
        results.append((f"rawdelta kernel only, CG={geom[0]} W={geom[1]} one_step={one} min_blocks={minb} "
                        "(in-place, raw launches)",
                        time_ms(_raw_launch(cq, ck, cv, cg, cb, h_inplace, stream, geom, one, minb))))

    # CUDA-graph replay of the whole op (how serving stacks run decode: no host overhead per step)
    import rawdelta.torch as rdt

    h_graph = h0.clone()

    def rd_torch_inplace():
        rdt.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h_graph, inplace_final_state=True,
                                             use_qk_l2norm_in_kernel=True)

    results.append(("rawdelta (torch adapter, in-place) CUDA-graph replay", time_graph_ms(rd_torch_inplace)))
    v_first_rows = []
    if args.state_v_first:
        v_first_rows = _state_v_first_rows(results, q, k, v, g, beta, h0, o_ref, ht_ref, stream, kw)
        results += [(name, ms) for name, ms, _ in v_first_rows]

    peer_note = ""
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fr

        o_p, ht_p = fla_fr(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=True)
        peer_o_err = assert_close("o", o_ref, o_p.float().cpu().numpy(), dtype="bfloat16")
        peer_ht_err = assert_close("ht", ht_ref, ht_p.cpu().numpy(), dtype="bfloat16")
        t_peer = time_ms(lambda: fla_fr(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True))
        results.append(("fla-core fused_recurrent_gated_delta_rule", t_peer))
        results.append(("fla-core fused_recurrent_gated_delta_rule CUDA-graph replay", time_graph_ms(
            lambda: fla_fr(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=True))))
        peer_note = f"peer error vs float64 reference: o {peer_o_err[0]:.2e}, ht {peer_ht_err[0]:.2e}"
    except Exception as e:  # the peer is optional: report why it did not run
        t_peer = None
        peer_note = f"peer unavailable: {type(e).__name__}: {e}"

    rd_o_err = assert_close("o", o_ref, o_rd, dtype="bfloat16")
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s  "
          f"bytes {state_bytes + io_bytes:,}  floor {floor_us:.1f} us")
    print(f"rawdelta error vs float64 reference: o {rd_o_err[0]:.2e}; {peer_note}")
    print(f"| implementation ({N} seqs x 1 token, {H} heads, K=V={D}, bf16, fp32 state) | time (us) | "
          f"x floor | vs peer |")
    print("|---|---|---|---|")
    rows = []
    for name, ms in results:
        us = ms * 1e3
        ratio = f"{t_peer / ms:.2f}x faster" if t_peer else "n/a"
        if name == "fla-core fused_recurrent_gated_delta_rule":
            ratio = "1.00x"
        print(f"| {name} | {us:.1f} | {us / floor_us:.2f} | {ratio} |")
        rows.append({"impl": name, "us": us, "x_floor": us / floor_us})
    ratios = {name: ms / base_ms for name, ms, base_ms in v_first_rows}
    for name, ratio in ratios.items():
        print(f"state_v_first / default: {ratio:.3f}  ({name})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bw, "floor_us": floor_us,
                       "shape": [N, 1, H, D], "rows": rows, "peer_note": peer_note,
                       "state_v_first_ratios": ratios}, f, indent=1)
    return 0


def _state_v_first_rows(results, q, k, v, g, beta, h0, o_ref, ht_ref, stream, kw):
    """``(name, ms, ms of the same call in the default layout)`` for the decode calls with ``state_v_first=True``
    (states ``[N, H, V, K]``, read and written natively by the kernel), after checking them against the reference."""
    cq, ck, cv, cg, cb = (cupy.from_dlpack(x) for x in (q, k, v, g, beta))
    h0_t = h0.transpose(-1, -2).contiguous()
    ch0_t = cupy.from_dlpack(h0_t)
    o_t, ht_t = rawdelta.fused_recurrent_gated_delta_rule(cq, ck, cv, cg, cb, initial_state=ch0_t,
                                                          output_final_state=True, state_v_first=True, **kw)
    assert_close("o", o_ref, o_t, dtype="bfloat16")
    assert_close("ht", ht_ref.swapaxes(-1, -2), ht_t, dtype="bfloat16")
    h_inplace_t = ch0_t.copy()
    h_graph_t = h0_t.clone()
    import rawdelta.torch as rdt

    def new_state():
        rawdelta.fused_recurrent_gated_delta_rule(cq, ck, cv, cg, cb, initial_state=ch0_t, output_final_state=True,
                                                  state_v_first=True, **kw)

    def inplace():
        rawdelta.fused_recurrent_gated_delta_rule(cq, ck, cv, cg, cb, initial_state=h_inplace_t,
                                                  inplace_final_state=True, state_v_first=True, **kw)

    def torch_inplace():
        rdt.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h_graph_t, inplace_final_state=True,
                                             use_qk_l2norm_in_kernel=True, state_v_first=True)

    base = dict(results)
    kernel = "rawdelta kernel only, CG=8 W=4 one_step=True min_blocks=6 (in-place, raw launches)"
    return [
        ("rawdelta cuda (new final state), state_v_first", time_ms(new_state),
         base["rawdelta cuda (new final state)"]),
        ("rawdelta cuda (in-place state), state_v_first", time_ms(inplace), base["rawdelta cuda (in-place state)"]),
        *((f"rawdelta kernel only, [N, H, V, K] kernel W={w} one_step=True min_blocks={minb} (in-place, raw "
           "launches), state_v_first",
           time_ms(_raw_launch(cq, ck, cv, cg, cb, h_inplace_t, stream, (0, w), True, minb, v_first=True)),
           base[kernel]) for w, minb in ((4, 6), (4, 8), (8, 3), (2, 12))),
        ("rawdelta (torch adapter, in-place) CUDA-graph replay, state_v_first", time_graph_ms(torch_inplace),
         base["rawdelta (torch adapter, in-place) CUDA-graph replay"]),
    ]


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
