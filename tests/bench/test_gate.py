"""The runner on the CPU with implementations registered by the test: the gate fails a wrong one (reported,
never timed), a slow one is not timed and skips larger shapes, a refusing one is reported and the run goes on."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from rawdelta.bench import registry
from rawdelta.bench.env import Env
from rawdelta.bench.report import table, text_report, validate
from rawdelta.bench.runner import Settings, plan, run
from rawdelta.bench.timing import Budget
from rawdelta.bench.workload import GateSlice

ENV = Env("cpu", "tests run the CPU path", False)
NUMPY = next(i for i in registry.IMPLS if i.name == "numpy")
CHUNK = next(o for o in registry.OPS if o.name == "chunk_gated_delta_rule")
SHAPES = ((1, 32, 2, 16), (2, 32, 2, 16))
FAST = Settings(cold_start="none", budget=Budget(rep_s=0.01, min_reps=2, max_reps=5, warmup=1))


def counting(build: Any, calls: list[int], change: Any = None, sleep: float = 0.0) -> Any:
    """A builder wrapping `build` that counts calls and optionally alters the outputs or sleeps."""

    def wrapped(op: Any, mode: str, w: Any) -> Any:
        fn = build(op, mode, w)

        def run_once() -> dict[str, Any]:
            calls.append(1)
            if sleep:
                time.sleep(sleep)
            out = fn()
            return change(out) if change else out

        return run_once

    return wrapped


def bench(impls: list[Any], modes: tuple[str, ...] = ("forward",), settings: Settings = FAST) -> dict[str, Any]:
    cases = plan([CHUNK], modes, impls, SHAPES)
    doc = run(ENV, cases, settings, impls, "test", progress=False, log=lambda s: None)
    assert validate(doc) == []
    return doc


def rows(doc: dict[str, Any], impl: str) -> list[dict[str, Any]]:
    return [r for r in doc["results"] if r["impl"] == impl]


def test_a_wrong_implementation_is_reported_wrong_and_never_timed():
    calls: list[int] = []

    def off_by_5_percent(out: dict[str, Any]) -> dict[str, Any]:
        return {**out, "o": (out["o"].astype(np.float32) * 1.05).astype(out["o"].dtype)}

    wrong = replace(NUMPY, name="wrong", label="deliberately wrong",
                    build=counting(NUMPY.build, calls, off_by_5_percent))
    doc = bench([NUMPY, wrong])
    bad = rows(doc, "wrong")
    assert [r["status"] for r in bad] == ["wrong", "wrong"]
    for r in bad:
        assert r["time_s"] is None and r["reps"] == 0 and r["floor_fraction"] is None
        assert r["gate"]["passed"] is False and r["gate"]["errors"]["o"] > 1e-2
        assert "relative RMS error" in r["reason"]
    assert len(calls) == len(SHAPES), "a wrong implementation runs once per shape (the gated call), never timed"
    assert all(r["status"] == "ok" and r["time_s"] > 0 for r in rows(doc, "numpy"))
    body, notes = table(doc, [r for r in doc["results"] if r["mode"] == "forward"])
    assert any("wrong [1]" in cell for row in body for cell in row) and "relative RMS error" in notes[0]
    assert "WRONG" in text_report(doc)


def test_the_gate_fails_on_nan_and_on_a_missing_output():
    nan = replace(NUMPY, name="nan", build=counting(NUMPY.build, [], lambda out: {**out, "o": out["o"] * np.nan}))
    missing = replace(NUMPY, name="missing", build=counting(NUMPY.build, [], lambda out: {}))
    doc = bench([nan, missing])
    assert {r["status"] for r in doc["results"]} == {"wrong"}
    assert "NaN" in rows(doc, "nan")[0]["reason"]
    assert "returned none" in rows(doc, "missing")[0]["reason"]


def test_too_slow_is_not_timed_and_larger_shapes_are_skipped():
    calls: list[int] = []
    slow = replace(NUMPY, name="slow", build=counting(NUMPY.build, calls, sleep=0.03))
    settings = replace(FAST, budget=replace(FAST.budget, max_call_s=0.02))
    doc = bench([slow], settings=settings)
    first, second = rows(doc, "slow")
    assert first["status"] == second["status"] == "too slow"
    assert first["time_s"] is None and first["gate"]["passed"] and first["call_s"] > 0.02
    assert "larger shapes not run" in second["reason"] and second["gate"] is None
    assert len(calls) == 2, "the gated first call and one warm call, then nothing"


def test_a_refusing_implementation_is_reported_with_its_reason_and_the_run_goes_on():
    builds: list[int] = []

    def refuse(op: Any, mode: str, w: Any) -> Any:
        builds.append(1)

        def fn() -> dict[str, Any]:
            raise NotImplementedError("no backward on this GPU (test)")

        return fn

    refusing = replace(NUMPY, name="refuses", family="peer", build=refuse)
    absent = replace(NUMPY, name="absent", family="peer", availability=lambda env: "not installed (test)")
    doc = bench([NUMPY, refusing, absent], modes=("forward", "forward+backward"))
    refused = rows(doc, "refuses")
    assert {r["status"] for r in refused} == {"unavailable"}
    assert all("NotImplementedError: no backward on this GPU (test)" in r["reason"] for r in refused)
    assert len(builds) == 2, "refused once per mode, not retried at the larger shape"
    assert rows(doc, "absent") == []
    assert doc["implementations"]["absent"] == {**doc["implementations"]["absent"], "available": False,
                                                 "reason": "not installed (test)"}
    assert all(r["status"] == "ok" for r in rows(doc, "numpy"))


def test_speedups_are_against_rawdelta_and_floors_come_from_the_models():
    doc = bench([NUMPY, next(i for i in registry.IMPLS if i.name == "sdpa")])
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert r["floor_s"] > 0 and 0 < r["floor_fraction"] == pytest.approx(r["floor_s"] / r["time_s"])
    assert {r["model"] for r in doc["results"]} == {"gdn_chunk", "softmax_attention"}
    assert doc["implementations"]["numpy"]["family"] == "rawdelta"


def test_gate_slice_cuts_the_corners_of_every_array_kind():
    import torch

    sl = GateSlice.corners((8, 5, 3, 2), rows=(0, 4))
    x = np.arange(8 * 5 * 3 * 2, dtype=np.float32).reshape(8, 5, 3, 2)
    want = x[[0, 7]][:, [0, 4]][:, :, [0, 2]]
    np.testing.assert_array_equal(sl.host("o", x), want)
    np.testing.assert_array_equal(sl.host("o", torch.from_numpy(x).bfloat16()), want)  # exact in bf16
    state = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8, 3, 2, 2)
    np.testing.assert_array_equal(sl.host("final_state", state), state[[0, 7]][:, [0, 2]])
    assert GateSlice.corners((1, 5, 1, 2)).host("o", x[:1, :, :1]).shape == (1, 5, 1, 2)


def test_cases_past_the_time_limit_are_reported_skipped():
    calls: list[int] = []
    counted = replace(NUMPY, build=counting(NUMPY.build, calls))
    doc = bench([counted], settings=replace(FAST, time_limit_s=0.0))
    assert {r["status"] for r in doc["results"]} == {"skipped"} and not calls
    assert "time limit" in doc["results"][0]["reason"]


def test_the_peer_builder_runs_a_function_with_the_peers_signature():
    """The peer's path, on the CPU: rawdelta.torch has fla's signature, so it stands in for fla here."""
    fla = next(i for i in registry.IMPLS if i.name == "fla")
    stand_in = replace(fla, availability=lambda env: None)
    ops = [replace(o, peer=f"rawdelta.torch:{o.name}") for o in registry.OPS]
    cases = plan(ops, registry.MODES, [stand_in], ((1, 32, 2, 16), (3, 1, 2, 16)))
    doc = run(ENV, cases, FAST, [stand_in], "test", progress=False, log=lambda s: None)
    assert validate(doc) == []
    assert {(r["op"], r["mode"]) for r in doc["results"]} == {
        (o.name, m) for o in registry.OPS for m in o.modes}
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert r["gate"]["passed"]
    fb = next(r for r in doc["results"] if r["mode"] == "forward+backward")
    assert set(fb["gate"]["errors"]) == {"o", "dq", "dk", "dv", "dg", "dbeta"}


def test_a_slow_first_call_after_a_warm_shape_is_not_repeated():
    calls: list[tuple[int, ...]] = []

    def slow_at_b2(op: Any, mode: str, w: Any) -> Any:
        fn = NUMPY.build(op, mode, w)
        shape = w.host["q"].shape

        def run_once() -> dict[str, Any]:
            calls.append(shape)
            if shape[0] == 2:
                time.sleep(0.03)
            return fn()

        return run_once

    slow = replace(NUMPY, name="slow", build=slow_at_b2)
    doc = bench([slow], settings=replace(FAST, budget=replace(FAST.budget, max_call_s=0.02)))
    assert [r["status"] for r in rows(doc, "slow")] == ["ok", "too slow"]
    assert sum(s[0] == 2 for s in calls) == 1, "numpy compiles nothing per shape: its first call there is warm"


@pytest.mark.skipif(not hasattr(os, "nice"), reason="no process priorities on this OS")
def test_reference_workers_run_at_the_lowest_priority() -> None:
    """The float64 references' workers must not take a core from the timing process (a host behind the GPU makes
    the events time the host): they run at the lowest CPU priority."""
    from rawdelta.bench.runner import reference_pool

    with reference_pool(1) as pool:
        assert pool.submit(os.nice, 0).result() == 19
