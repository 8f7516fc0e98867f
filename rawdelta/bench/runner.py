"""Runs a plan of (shape, op, mode, implementation) cases and returns the results as one JSON-ready dict.

Order: shapes from the least to the most work, so a slow implementation (numba at the big shapes) is
found too slow on a small shape and skipped on the larger ones instead of being run there; within a
shape, every op, mode and implementation on the same inputs (built once, freed before the next shape).

Per case: the first call's outputs pass the correctness gate or the case is reported wrong and not timed;
then :func:`.timing.measure`. The float64 references are computed in worker processes while the device
is timed (``jobs``), or in this process (``jobs=0``). After the sweep, time to first result is measured in
fresh processes (:mod:`.coldstart`) for the implementations that ran.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import gc
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .env import Env, describe, versions
from .models import MODELS, floor_seconds
from .modes import DECODE, FORWARD, FORWARD_BACKWARD, Shape
from .reference import Expected, expected_outputs, gate, reference_for, reference_job
from .registry import ImplSpec, OpSpec, impl_modes, shape_fits_mode
from .timing import Budget, Measurement, make_clock, measure
from .workload import Workload, host_inputs, np_dtype

SCHEMA = 1


@dataclass(frozen=True)
class Case:
    """One measurement: an implementation of an op in a mode at a shape."""

    shape: Shape
    op: OpSpec
    mode: str
    impl: ImplSpec


@dataclass
class Settings:
    """Everything besides the plan that decides a run's numbers (recorded in the JSON).

    Attributes:
        dtype: q/k/v/o dtype (gates, beta and states are float32).
        seed: input generator seed.
        budget: per-measurement limits (:class:`.timing.Budget`).
        cold_start: time to first result in fresh processes: ``"op"`` (each op's first mode that ran),
            ``"all"`` (every mode) or ``"none"``.
        cold_timeout_s: limit for one such process.
        jobs: worker processes computing the float64 references (0: in this process).
        time_limit_s: the whole run aims to end by then (None: no limit). With fresh-process first calls
            the sweep takes no new case after 70% of it (without them, after all of it); the rest are
            reported as skipped, and the first calls share what is left.
    """

    dtype: str = "bfloat16"
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    cold_start: str = "op"
    cold_timeout_s: float = 240.0
    jobs: int = 0
    time_limit_s: float | None = None


def work_size(shape: Shape) -> int:
    B, T, H, D = shape
    return B * T * H * D * D


def plan(ops: Sequence[OpSpec], modes: Sequence[str], impls: Sequence[ImplSpec],
         shapes: Sequence[Shape]) -> list[Case]:
    """Every applicable case, shapes ordered by work (then as given), then op, mode, implementation."""
    order = sorted(dict.fromkeys(shapes), key=work_size)
    return [Case(s, op, m, impl) for s in order for op in ops for m in op.modes if m in modes
            and shape_fits_mode(s, m) for impl in impls if m in impl_modes(impl, op)]


def _input_key(op: OpSpec, shape: Shape, mode: str) -> tuple[Any, ...]:
    return (op.inputs.__name__, tuple(sorted(op.input_args.items())), shape, mode == DECODE)


def _quantities(expected: Expected, mode: str) -> Expected:
    """The reference outputs a mode's call is compared on (a forward compares o only)."""
    return {"o": expected["o"]} if mode == FORWARD else expected


def _lowest_priority() -> None:
    """A reference worker's initializer: the lowest CPU priority (where the OS has one), so that the timing
    process's thread, which issues the timed launches, never waits for a core behind the workers' float64 NumPy
    (each multithreaded): a host that falls behind the GPU makes the events time the host."""
    if hasattr(os, "nice"):
        os.nice(19)


def reference_pool(jobs: int) -> concurrent.futures.Executor:
    """`jobs` worker processes (spawned: no CUDA context inherited) for the float64 references, each at the lowest
    CPU priority."""
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_lowest_priority)


class _References:
    """Float64 references per (reference, inputs, shape, mode), computed once, in workers when ``jobs``."""

    def __init__(self, cases: Sequence[Case], settings: Settings) -> None:
        self.settings = settings
        self.cache: dict[tuple[Any, ...], Any] = {}
        # One reference for forward and forward + backward on the same inputs: the latter's includes o.
        self.mode_of: dict[tuple[Any, ...], str] = {}
        for c in cases:
            k = self._group(c)
            if self.mode_of.get(k) != FORWARD_BACKWARD:
                self.mode_of[k] = c.mode
        self.pool: concurrent.futures.Executor | None = None
        offloaded = [c for c in cases if reference_for(self._name(c)).offload]
        if settings.jobs > 0 and offloaded:
            self.pool = reference_pool(settings.jobs)
            for c in offloaded:
                self._submit(c)

    @staticmethod
    def _name(c: Case) -> str:
        return c.impl.reference or c.op.reference

    def _group(self, c: Case) -> tuple[Any, ...]:
        return (self._name(c), *_input_key(c.op, c.shape, c.mode))

    def _submit(self, c: Case) -> None:
        k = self._group(c)
        if k not in self.cache and self.pool is not None:
            s = self.settings
            self.cache[k] = self.pool.submit(reference_job, self._name(c), c.op.name, c.shape, self.mode_of[k],
                                             s.dtype, s.seed)

    def get(self, c: Case, w: Workload) -> Expected:
        k = self._group(c)
        got = self.cache.get(k)
        if isinstance(got, concurrent.futures.Future):
            try:
                got = got.result()
            except Exception:  # a dead worker is not a wrong implementation: compute it here instead
                got = None
        if got is None:
            got = expected_outputs(self._name(c), w.host, c.shape, self.mode_of[k])
        self.cache[k] = got
        return _quantities(got, c.mode)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True, disable=None)


def _case_line(rec: dict[str, Any]) -> str:
    """One measured case as a log line: what ran, its median time or why none, and its first call."""
    what = f"{rec['op']} {rec['mode']} {rec['impl']} {tuple(rec['shape'])}"
    result = f"{rec['time_s'] * 1e3:.4g} ms" if rec["time_s"] is not None else rec["status"]
    first = f", first call {rec['first_call_s']:.3g} s" if rec["first_call_s"] is not None else ""
    return f"{what}: {result}{first}"


def _ceilings(clock: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, fn in (("copy", clock.copy_bandwidth), ("flops", clock.flop_ceiling)):
        try:
            value, how = fn()
            out[f"{key}_per_s"], out[f"{key}_source"] = value, how
        except Exception as e:  # a floor is a nicety; the timings stand without it
            out[f"{key}_per_s"], out[f"{key}_source"] = None, f"not measured: {type(e).__name__}: {e}"
    return out


def _record(c: Case, m: Measurement, dtype: str, ceil: dict[str, Any]) -> dict[str, Any]:
    model = c.impl.model or c.op.model
    work = MODELS[model](c.shape, c.mode, np_dtype(dtype).itemsize)
    floor, bound = floor_seconds(work, ceil.get("copy_per_s"), ceil.get("flops_per_s"))
    t = statistics.median(m.samples) if m.status == "ok" and m.samples else None
    return {
        "op": c.op.name, "mode": c.mode, "shape": list(c.shape), "impl": c.impl.name, "status": m.status,
        "reason": m.reason, "time_s": t, "time_min_s": min(m.samples) if t is not None else None,
        "reps": len(m.samples), "first_call_s": m.first_call_s, "call_s": m.call_s, "peak_bytes": m.peak_bytes,
        "model": model, "bytes": work.bytes, "flops": work.flops, "floor_s": floor, "bound": bound,
        "floor_fraction": floor / t if (floor and t) else None,
        "gate": None if m.gate is None else {"passed": m.gate.passed, "errors": m.gate.errors,
                                             "reference": c.impl.reference or c.op.reference},
    }


def run(env: Env, cases: Sequence[Case], settings: Settings, impls: Sequence[ImplSpec],
        command: str, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every case; returns the results document (see :mod:`.report` for its schema).

    Args:
        env: the machine (:func:`.env.detect`).
        cases: from :func:`plan`; cases of an unavailable implementation are not run (the implementation is
            listed with its reason instead).
        settings: dtype, seed, budget, cold start, reference workers.
        impls: every implementation to report availability for (the selected ones are those in `cases`).
        command: the command line that produced the run, recorded for reproduction.
        progress: show a progress bar (tqdm, when installed and stderr is a terminal).
        log: where one-line notes go (default: stderr).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    clock = make_clock(env.gpu, env.torch_cuda)
    selected = {c.impl.name for c in cases}
    avail = {i.name: i.availability(env) for i in impls}
    runnable = [c for c in cases if avail[c.impl.name] is None]
    ceil = _ceilings(clock)
    refs = _References(runnable, settings)
    results: list[dict[str, Any]] = []
    shared: dict[tuple[Any, ...], dict[str, Any]] = {}
    too_slow: dict[tuple[str, str, str], tuple[int, float, Shape]] = {}
    refused: dict[tuple[str, str, str], str] = {}
    ran: set[tuple[str, str, str]] = set()
    started = time.perf_counter()
    sweep_limit = settings.time_limit_s
    if sweep_limit is not None and settings.cold_start != "none":
        sweep_limit *= 0.7
    bar = _progress(len(runnable)) if progress else None
    workload: tuple[tuple[Any, ...], Workload] | None = None
    try:
        for c in runnable:
            if bar is not None:
                bar.set_postfix_str(f"{c.op.name} {c.mode} {c.shape} {c.impl.name}", refresh=False)
            key = (c.impl.name, c.mode, c.shape)
            if c.impl.shared and key in shared:
                results.append({**shared[key], "op": c.op.name})
                if bar is not None:
                    bar.update()
                continue
            ckey = (c.impl.name, c.op.name, c.mode)
            slow = too_slow.get(ckey)
            if slow is not None and work_size(c.shape) >= slow[0]:
                m = Measurement("too slow", f"too slow ({slow[1]:.3g} s/call at {tuple(slow[2])}; "
                                            "larger shapes not run)")
            elif ckey in refused:
                m = Measurement("unavailable", refused[ckey])
            elif sweep_limit is not None and time.perf_counter() - started > sweep_limit:
                m = Measurement("skipped", f"the sweep's share ({sweep_limit:.0f} s) of the run's time limit "
                                           "was spent")
            else:
                ikey = _input_key(c.op, c.shape, c.mode)
                if workload is None or workload[0] != ikey:
                    if workload is not None:
                        workload[1].release()
                    workload = None
                    gc.collect()
                    _empty_device_cache(env)
                    if bar is None or bar.disable:  # no live bar (not a terminal): one line per shape
                        log(f"[{runnable.index(c) + 1}/{len(runnable)}, {time.perf_counter() - started:.0f} s] "
                            f"shape {c.shape}")
                    workload = (ikey, Workload(host_inputs(c.op, c.shape, c.mode, settings.dtype, settings.seed),
                                               env))
                warm = not c.impl.compiles_per_shape and ckey in ran
                m = _measure_case(c, workload[1], clock, settings, refs, warm)
                ran.add(ckey)
                if m.status == "too slow" and m.call_s is not None:
                    too_slow[ckey] = (work_size(c.shape), m.call_s, c.shape)
                if m.status == "unavailable" and not _out_of_memory(m.reason):
                    # a refusal (no backward, a Triton version check) repeats at every shape: run it once
                    refused[ckey] = m.reason or "unavailable"
            rec = _record(c, m, settings.dtype, ceil)
            if c.impl.shared:
                shared[key] = rec
            results.append(rec)
            if bar is not None:
                bar.update()
            if bar is None or bar.disable:  # a run cut short (a time limit outside) keeps what it measured
                log(f"[{runnable.index(c) + 1}/{len(runnable)}, {time.perf_counter() - started:.0f} s] "
                    f"{_case_line(rec)}")
    finally:
        if bar is not None:
            bar.close()
        refs.close()
        workload = None
        gc.collect()
    sweep_s = time.perf_counter() - started
    cold = (_cold_starts(results, cases, env, settings, log, started) if settings.cold_start != "none" else [])
    return {
        "schema": SCHEMA,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": {**describe(env), **ceil},
        "versions": versions(),
        "settings": {"dtype": settings.dtype, "seed": settings.seed, "rep_s": settings.budget.rep_s,
                     "min_reps": settings.budget.min_reps, "max_reps": settings.budget.max_reps,
                     "warmup": settings.budget.warmup, "max_call_s": settings.budget.max_call_s,
                     "flush_l2": settings.budget.flush_l2 and env.gpu, "cold_start": settings.cold_start,
                     "jobs": settings.jobs, "time_limit_s": settings.time_limit_s},
        "duration_s": {"sweep": sweep_s, "total": time.perf_counter() - started},
        "implementations": {i.name: {"label": i.label, "family": i.family, "selected": i.name in selected,
                                     "available": avail[i.name] is None, "reason": avail[i.name],
                                     "note": i.notes.get(env.kind)} for i in impls},
        "results": results,
        "cold_start": cold,
    }


def _measure_case(c: Case, w: Workload, clock: Any, settings: Settings, refs: _References,
                  first_is_warm: bool) -> Measurement:
    ref = reference_for(c.impl.reference or c.op.reference)
    sl = ref.gate_slice(c.shape)

    def check(outputs: dict[str, Any]) -> Any:
        return gate(outputs, refs.get(c, w), sl, settings.dtype)

    try:
        fn = c.impl.build(c.op, c.mode, w)
    except Exception as e:
        return Measurement("unavailable", f"{type(e).__name__}: {str(e)[:300]}")
    m = measure(fn, clock, settings.budget, check, first_is_warm)
    if not w.env.gpu and c.impl.arrays != "numpy":
        m.peak_bytes = None  # tracemalloc sees NumPy's allocations only
    return m


def _out_of_memory(reason: str | None) -> bool:
    return bool(reason) and "memory" in reason.lower()  # type: ignore[union-attr]


def _empty_device_cache(env: Env) -> None:
    """Give the cached device memory back between shapes: torch's, and CuPy's pool's (the timed calls of the
    CuPy-based implementations allocate from it)."""
    if env.gpu and env.torch_cuda:
        import torch

        torch.cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if env.gpu and cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


def _cold_starts(results: list[dict[str, Any]], cases: Sequence[Case], env: Env, settings: Settings,
                 log: Callable[[str], None], started: float) -> list[dict[str, Any]]:
    """Time to first result, in a fresh process, for each (op, mode, implementation) with ``cold_start`` that
    ran correctly, at its smallest shape that did; with ``settings.cold_start == "op"`` only in the first of
    the op's modes in which one of them did."""
    from .coldstart import cold_start

    wanted = {(c.op.name, c.mode, c.impl.name) for c in cases if c.impl.cold_start}
    smallest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in results:
        k = (r["op"], r["mode"], r["impl"])
        if k in wanted and r["status"] == "ok" and k not in smallest:
            smallest[k] = r  # results are in increasing order of work
    if settings.cold_start == "op":
        ops = {op: [m for m in o.modes if any(k[:2] == (op, m) for k in smallest)] for op, o in
               {c.op.name: c.op for c in cases}.items()}
        smallest = {k: r for k, r in smallest.items() if ops[k[0]] and k[1] == ops[k[0]][0]}
    out = []
    for (op, mode, impl), r in smallest.items():
        timeout = settings.cold_timeout_s
        if settings.time_limit_s is not None:
            timeout = min(timeout, settings.time_limit_s - (time.perf_counter() - started))
        if timeout < 5:
            res: dict[str, Any] = {"status": "skipped", "reason": "the run's time limit was spent"}
        else:
            log(f"time to first result: {op} {mode} {impl} at {tuple(r['shape'])} in a fresh process")
            res = cold_start(op, mode, impl, tuple(r["shape"]), settings.dtype, settings.seed, not env.gpu, timeout)
        out.append({"op": op, "mode": mode, "impl": impl, "shape": r["shape"], "first_result_s": None,
                    "cold": None, "reason": None, **res, "warm_time_s": r["time_s"]})
    return out
