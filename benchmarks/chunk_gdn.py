"""Chunked gated delta rule: speed and accuracy side by side with the peer, in one process, same inputs.

Speed: forward and forward + backward of ``rawdelta.chunk_gated_delta_rule`` (cuda backend, bf16,
chunk 64, q/k L2-normalised in the kernel like GatedDeltaNet) against ``fla.ops.gated_delta_rule.
chunk_gated_delta_rule`` (fla-core) at the same shapes on the same CUDA stream, and torch's flash
SDPA (causal, same B, T, H, D) as the softmax-attention yardstick. Each time is also shown as a
multiple of the memory floor: bytes of the inputs read once and outputs written once, over the
device-to-device copy bandwidth measured in the same run.

Two times per row: the wall time of back-to-back calls between CUDA events, and the GPU kernel time (the time
during which any of the call's kernels runs, from the torch profiler, which sees the CuPy launches too: the sum
of their durations where they run one after the other). The peer launches
about a dozen Triton and torch kernels per forward from Python; where the host cannot keep up, its event time
includes the gaps between them. The speed-up is taken on the kernel times, so that launch overhead on this
host does not flatter rawdelta.

Accuracy: with bf16 inputs, the relative RMS error of o, the final state and every gradient against
a float64 reference (the token-by-token recurrence run in float64 with torch autograd on the GPU), for
rawdelta and, where it runs, the peer.

The standard sweep (every op, mode and shape, with the correctness gate, floors, peak memory, time to
first result and plots) is ``rawdelta bench`` (rawdelta/bench/); this script keeps the accuracy study with
an initial state and a final-state cotangent against the float64 torch recurrence.

Usage: PYTHONPATH=. python3 benchmarks/chunk_gdn.py [--json out.json] [--shapes 8x2048x16x128,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import cupy
import numpy as np
import torch
from decode_gdn import time_graph_ms, time_ms  # this directory is on sys.path for its scripts
from profile_op import profiled

import rawdelta
import rawdelta.torch as rt
from rawdelta.testing.compare import error_stats


def kernel_ms(fn, calls: int = 5) -> float:
    """GPU kernel time per call: the time during which any of the GPU work of `calls` calls runs (the union of
    the kernel and copy intervals the torch profiler records), per call. For kernels that run one after the other
    it is the sum of their durations; kernels that run side by side count once."""
    from torch.autograd import DeviceType

    prof = profiled(fn, calls, warm=1)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy_us, end = 0.0, float("-inf")
    for a, b in spans:
        busy_us += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy_us / calls / 1e3


def timed(fn) -> dict[str, float]:
    return {"ms": time_ms(fn, iters=20, warmup=5), "gpu_ms": kernel_ms(fn)}


def _replay_ms(replay, mark, elapsed_ms, iters: int = 20, reps: int = 5) -> float:
    """Median over `reps` of the mean time of `iters` back-to-back graph replays between two recorded events
    (``mark()`` records one; ``elapsed_ms(start, end)``)."""
    samples = []
    for _ in range(3):
        replay()
    for _ in range(reps):
        start = mark()
        for _ in range(iters):
            replay()
        end = mark()
        end.synchronize()
        samples.append(elapsed_ms(start, end) / iters)
    return statistics.median(samples)


def graph_ms_torch(fn) -> float:
    """GPU time per call with no host in the way: the call captured once in a CUDA graph (torch), replayed."""
    return time_graph_ms(fn, steps=1)


def graph_ms_cupy(make_fn) -> float:
    """The same for CuPy launches: ``make_fn(stream)`` gives the call on a CuPy stream, captured there (launches
    with programmatic stream serialization stay programmatic edges in the graph)."""
    stream = cupy.cuda.Stream(non_blocking=True)
    fn = make_fn(stream)
    for _ in range(3):
        fn()
    stream.synchronize()
    stream.begin_capture()
    fn()
    graph = stream.end_capture()

    def mark() -> Any:
        e = cupy.cuda.Event()
        e.record(stream)
        return e

    return _replay_ms(lambda: graph.launch(stream), mark, cupy.cuda.get_elapsed_time)


def copy_bandwidth_gbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), iters=20, warmup=3)
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def make_inputs(B: int, T: int, H: int, D: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = {"device": "cuda", "generator": g}
    return {
        "q": torch.randn(B, T, H, D, dtype=torch.bfloat16, **kw),
        "k": torch.randn(B, T, H, D, dtype=torch.bfloat16, **kw),
        "v": torch.randn(B, T, H, D, dtype=torch.bfloat16, **kw),
        "g": torch.nn.functional.logsigmoid(torch.randn(B, T, H, dtype=torch.float32, **kw)),
        "beta": torch.rand(B, T, H, dtype=torch.float32, **kw).sigmoid(),
        "do": torch.randn(B, T, H, D, dtype=torch.bfloat16, **kw),
    }


class RawDelta:
    """rawdelta's core API on CuPy views of the torch tensors, launched on torch's current stream."""

    def __init__(self, x: dict[str, torch.Tensor], h0: torch.Tensor | None = None, stream: Any = None):
        self.c = {n: cupy.from_dlpack(t) for n, t in x.items()}
        self.h0 = None if h0 is None else cupy.from_dlpack(h0)
        self.stream = stream or cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

    def fwd(self, final_state: bool = False) -> Any:
        c = self.c
        return rawdelta.chunk_gated_delta_rule_fwd(
            c["q"], c["k"], c["v"], c["g"], c["beta"], initial_state=self.h0, output_final_state=final_state,
            use_qk_l2norm_in_kernel=True, backend="cuda", stream=self.stream)

    def fwd_bwd(self, dht: Any = None) -> Any:
        (o, ht), res = self.fwd(final_state=dht is not None)
        return o, ht, rawdelta.chunk_gated_delta_rule_bwd(res, self.c["do"], dht)


def reference_f64(x: dict[str, torch.Tensor], h0: torch.Tensor, dht: torch.Tensor) -> dict[str, np.ndarray]:
    """Float64 o, final state and gradients of the recurrence (torch autograd, token by token, on the GPU)."""
    leaves = {n: x[n].double().requires_grad_() for n in ("q", "k", "v", "g", "beta")}
    S = h0.double().clone().requires_grad_()
    h0_leaf = S
    def l2(t: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt((t * t).sum(-1, keepdim=True) + 1e-6)

    q, k = l2(leaves["q"]), l2(leaves["k"])
    v, g, beta = leaves["v"], leaves["g"], leaves["beta"]
    scale = q.shape[-1] ** -0.5
    outs = []
    for t in range(q.shape[1]):
        S = S * g[:, t].exp()[..., None, None]
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        delta = beta[:, t][..., None] * (v[:, t] - pred)
        S = S + k[:, t][..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, 1)
    loss = (o * x["do"].double()).sum() + (S * dht.double()).sum()
    grads = torch.autograd.grad(loss, [*leaves.values(), h0_leaf])
    out = {"o": o, "ht": S}
    out.update({"d" + n: gr for n, gr in zip([*leaves, "h0"], grads)})
    return {n: t.detach().cpu().numpy() for n, t in out.items()}


def accuracy(B: int, T: int, H: int, D: int) -> list[dict[str, Any]]:
    x = make_inputs(B, T, H, D, seed=1)
    gen = torch.Generator(device="cuda").manual_seed(2)
    h0 = 0.5 * torch.randn(B, H, D, D, device="cuda", generator=gen)
    dht = torch.randn(B, H, D, D, device="cuda", generator=gen)
    ref = reference_f64(x, h0, dht)
    rows = []
    rd = RawDelta(x, h0)
    o, ht, gr = rd.fwd_bwd(cupy.from_dlpack(dht))
    got = {"o": o, "ht": ht, "dq": gr.q, "dk": gr.k, "dv": gr.v, "dg": gr.g, "dbeta": gr.beta, "dh0": gr.initial_state}
    rows.append({"impl": "rawdelta cuda", **{n: error_stats(ref[n], t)[0] for n, t in got.items()}})
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "beta")}
        h0p = h0.clone().requires_grad_()
        o_p, ht_p = fla_chunk(**leaves, initial_state=h0p, output_final_state=True, use_qk_l2norm_in_kernel=True)
        row = {"impl": "fla-core chunk_gated_delta_rule",
               "o": error_stats(ref["o"], o_p.detach().float().cpu().numpy())[0],
               "ht": error_stats(ref["ht"], ht_p.detach().float().cpu().numpy())[0]}
        try:
            ((o_p.float() * x["do"].float()).sum() + (ht_p * dht).sum()).backward()
            for n in leaves:
                row["d" + n] = error_stats(ref["d" + n], leaves[n].grad.float().cpu().numpy())[0]
            row["dh0"] = error_stats(ref["dh0"], h0p.grad.float().cpu().numpy())[0]
        except Exception as e:  # the peer refuses its gated backward on Hopper with Triton 3.6
            row["note"] = f"backward: {type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
    except Exception as e:
        rows.append({"impl": "fla-core chunk_gated_delta_rule", "note": f"unavailable: {type(e).__name__}: {e}"})
    return rows


def speed(B: int, T: int, H: int, D: int, bw: float) -> list[dict[str, Any]]:
    x = make_inputs(B, T, H, D)
    n_tok = B * T * H
    in_bytes = 3 * n_tok * D * 2 + 2 * n_tok * 4  # q, k, v bf16; g, beta fp32
    fwd_bytes = in_bytes + n_tok * D * 2  # + o
    # backward: the inputs and do again; dq, dk, dv, dg, dbeta out
    fb_bytes = fwd_bytes + in_bytes + n_tok * D * 2 + 3 * n_tok * D * 2 + 2 * n_tok * 4
    floor = {"fwd": fwd_bytes / (bw * 1e9) * 1e3, "fwd+bwd": fb_bytes / (bw * 1e9) * 1e3}
    rows = []
    rd = RawDelta(x)
    torch.cuda.synchronize()
    rows.append({"impl": "rawdelta cuda", "mode": "fwd", **timed(lambda: rd.fwd()),
                 "graph_ms": graph_ms_cupy(lambda stream: RawDelta(x, stream=stream).fwd)})
    rows.append({"impl": "rawdelta cuda", "mode": "fwd+bwd", **timed(lambda: rd.fwd_bwd())})
    # The same op through autograd (the torch adapter keeps the forward's factors for the backward); the
    # gradients are returned, not accumulated into .grad, so no extra kernels run.
    ours = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "beta")}

    def torch_fb():
        o, _ = rt.chunk_gated_delta_rule(**ours, use_qk_l2norm_in_kernel=True)
        return torch.autograd.grad(o, list(ours.values()), x["do"])

    rows.append({"impl": "rawdelta torch adapter", "mode": "fwd+bwd", **timed(torch_fb)})
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        args = {n: x[n] for n in ("q", "k", "v", "g", "beta")}
        rows.append({"impl": "fla-core", "mode": "fwd",
                     **timed(lambda: fla_chunk(**args, use_qk_l2norm_in_kernel=True)),
                     "graph_ms": graph_ms_torch(lambda: fla_chunk(**args, use_qk_l2norm_in_kernel=True))})
        leaves = {n: t.clone().requires_grad_() for n, t in args.items()}

        def peer_fb():
            o, _ = fla_chunk(**leaves, use_qk_l2norm_in_kernel=True)
            o.backward(x["do"])

        try:
            rows.append({"impl": "fla-core", "mode": "fwd+bwd", **timed(peer_fb)})
        except Exception as e:
            rows.append({"impl": "fla-core", "mode": "fwd+bwd", "ms": None,
                         "note": f"{type(e).__name__}: {str(e)[:100]}"})
    except Exception as e:
        rows.append({"impl": "fla-core", "mode": "fwd", "ms": None, "note": f"unavailable: {e}"})
    qs, ks, vs = (x[n].transpose(1, 2).contiguous().requires_grad_() for n in ("q", "k", "v"))
    dos = x["do"].transpose(1, 2).contiguous()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        rows.append({"impl": "torch SDPA flash (causal softmax)", "mode": "fwd",
                     **timed(lambda: sdpa(qs, ks, vs, is_causal=True))})
        rows.append({"impl": "torch SDPA flash (causal softmax)", "mode": "fwd+bwd",
                     **timed(lambda: sdpa(qs, ks, vs, is_causal=True).backward(dos))})
    for r in rows:
        r["shape"] = [B, T, H, D]
        r["floor_ms"] = floor[r["mode"]]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default="8x2048x16x128,2x8192x16x128")
    ap.add_argument("--accuracy-shape", default="2x1024x8x128")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s")
    rows: list[dict[str, Any]] = []
    for s in filter(None, args.shapes.split(",")):
        rows += speed(*(int(v) for v in s.split("x")), bw)
    print("| (B, T, H, D) | mode | implementation | time (ms) | GPU kernel time (ms) | graph replay (ms) "
          "| x floor (kernel time) | rawdelta speed-up (kernel time) | rawdelta speed-up (graph replay) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours = next(x for x in rows if x["impl"] == "rawdelta cuda" and x["mode"] == r["mode"]
                    and x["shape"] == r["shape"])
        ms, gpu, graph = r["ms"], r.get("gpu_ms"), r.get("graph_ms")
        t = f"{ms:.3f}" if ms else f"n/a ({r.get('note', '')})"
        g = f"{gpu:.3f}" if ms else "-"
        gr = f"{graph:.3f}" if graph else "-"
        xf = f"{gpu / r['floor_ms']:.2f}" if ms else "-"
        theirs = ms and r["impl"] != "rawdelta cuda"
        sp = f"{gpu / ours['gpu_ms']:.2f}x" if theirs else "-"
        spg = f"{graph / ours['graph_ms']:.2f}x" if theirs and graph and ours.get("graph_ms") else "-"
        print(f"| {tuple(r['shape'])} | {r['mode']} | {r['impl']} | {t} | {g} | {gr} | {xf} | {sp} | {spg} |")
    acc = []
    if not args.skip_accuracy:
        acc = accuracy(*(int(v) for v in args.accuracy_shape.split("x")))
        names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
        print(f"accuracy, bf16 inputs, shape {args.accuracy_shape}: relative RMS error vs float64")
        print("| implementation | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for r in acc:
            cells = [f"{r[n]:.2e}" if n in r else "-" for n in names]
            print(f"| {r['impl']} | " + " | ".join(cells) + " |" + (f" {r['note']}" if "note" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bw, "speed": rows, "accuracy": acc}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
