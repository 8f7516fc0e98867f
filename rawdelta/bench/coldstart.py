"""Time to first result: one call of one implementation in a fresh process with empty compiler caches.

The parent (:func:`cold_start`) gives the child empty ``CUPY_CACHE_DIR`` (rawdelta's NVRTC binaries) and
``TRITON_CACHE_DIR`` (the peer's kernels); the child builds the inputs, then times its first call,
compilation and autotuning included, and says whether the caches were still empty when the call began.
Run as ``python -m rawdelta.bench.coldstart '<json spec>'``; the last line of its output is JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CACHE_VARS = ("CUPY_CACHE_DIR", "TRITON_CACHE_DIR")


def cold_start(op: str, mode: str, impl: str, shape: tuple[int, ...], dtype: str, seed: int, cpu: bool,
               timeout_s: float) -> dict[str, Any]:
    """First-call time of `impl` running `op` in `mode` at `shape` ``(B, T, H, D)``, in a fresh process.

    Returns ``{"status": "ok", "first_result_s", "process_s", "cold"}`` or ``{"status": "timeout" | "error",
    "reason", "process_s"}``; ``process_s`` is the child's whole life (imports and input set-up included).
    """
    spec = {"op": op, "mode": mode, "impl": impl, "shape": list(shape), "dtype": dtype, "seed": seed, "cpu": cpu}
    root = str(Path(__file__).resolve().parents[2])
    with tempfile.TemporaryDirectory(prefix="rawdelta-cold-") as tmp:
        env = dict(os.environ)
        for var in CACHE_VARS:
            env[var] = os.path.join(tmp, var.lower())
            os.makedirs(env[var])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "rawdelta.bench.coldstart", json.dumps(spec)], env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"no result within {timeout_s:g} s",
                    "process_s": time.perf_counter() - t0}
        process_s = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "reason": f"exit {proc.returncode}: {tail[:300]}", "process_s": process_s}
    return {**out, "process_s": process_s}


def _caches_empty() -> bool:
    return all(not os.listdir(os.environ[v]) for v in CACHE_VARS if os.path.isdir(os.environ.get(v, "")))


def main(argv: list[str]) -> int:
    """Child side: one first call, timed; prints one JSON line."""
    spec = json.loads(argv[0])
    from .env import detect
    from .registry import IMPLS, OPS
    from .timing import make_clock
    from .workload import Workload, host_inputs

    env = detect(force_cpu=spec["cpu"])
    op = next(o for o in OPS if o.name == spec["op"])
    impl = next(i for i in IMPLS if i.name == spec["impl"])
    shape = tuple(spec["shape"])
    reason = impl.availability(env)
    if reason:
        print(json.dumps({"status": "error", "reason": reason}))
        return 0
    try:
        w = Workload(host_inputs(op, shape, spec["mode"], spec["dtype"], spec["seed"]), env)  # type: ignore[arg-type]
        clock = make_clock(env.gpu, env.torch_cuda)
        fn = impl.build(op, spec["mode"], w)
        clock.sync()
        cold = _caches_empty()
        t0 = time.perf_counter()
        fn()
        clock.sync()
        first = time.perf_counter() - t0
    except Exception as e:
        print(json.dumps({"status": "error", "reason": f"{type(e).__name__}: {str(e)[:300]}"}))
        return 0
    print(json.dumps({"status": "ok", "first_result_s": first, "cold": cold}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
