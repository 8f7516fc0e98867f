"""Results document: its schema, the text tables, and the generated region of ``docs/benchmarks.md``.

Everything here is a pure function of the results JSON (plus file names), so the documentation can be
regenerated on any machine and a test can check that the committed page says what the committed JSON
says. The document (``schema`` 1)::

    {"schema": 1, "command": str, "date": str,
     "device": {"kind": "gpu" | "cpu", "name": str, "copy_per_s": float | None, "copy_source": str,
                "flops_per_s": float | None, "flops_source": str, ...},
     "versions": {name: version | None}, "settings": {"dtype": str, ...},
     "implementations": {name: {"label", "family", "selected", "available", "reason", "note"}},
     "results": [{"op", "mode", "shape": [B, T, H, D], "impl", "status", "reason", "time_s", "time_min_s",
                  "reps", "first_call_s", "call_s", "peak_bytes", "model", "bytes", "flops", "floor_s",
                  "bound", "floor_fraction", "gate": {"passed", "errors": {name: rel-RMS}, "reference"} | None}],
     "cold_start": [{"op", "mode", "impl", "shape", "status", "first_result_s", "cold", "process_s",
                     "warm_time_s", "reason"}]}

A region of a markdown page is delimited by ``<!-- rawdelta-bench:begin <json> plots=<dir> -->`` and
``<!-- rawdelta-bench:end -->``, both paths relative to the page; :func:`update_markdown` rewrites only
that region (adding it at the end of the page the first time) and leaves the rest of the page alone.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .runner import SCHEMA

STATUSES = ("ok", "wrong", "unavailable", "too slow", "error", "skipped")
BEGIN = "<!-- rawdelta-bench:begin {json} plots={plots} -->"
END = "<!-- rawdelta-bench:end -->"
REGION_RE = re.compile(r"<!-- rawdelta-bench:begin (\S+) plots=(\S+) -->\n(.*?)<!-- rawdelta-bench:end -->", re.S)
RAWDELTA_ORDER = ("cuda", "numba", "numpy")

_TOP = {"schema": int, "command": str, "date": str, "device": dict, "versions": dict, "settings": dict,
        "implementations": dict, "results": list, "cold_start": list}
_RESULT = {"op": str, "mode": str, "shape": list, "impl": str, "status": str, "reason": (str, type(None)),
           "time_s": (float, type(None)), "first_call_s": (float, type(None)), "peak_bytes": (int, type(None)),
           "bytes": int, "flops": int, "floor_s": (float, type(None)), "floor_fraction": (float, type(None)),
           "gate": (dict, type(None))}


# ----------------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------------


def validate(doc: dict[str, Any]) -> list[str]:
    """Every way `doc` departs from the schema above (empty when it conforms)."""
    problems = [f"{k}: expected {t.__name__}" for k, t in _TOP.items() if not isinstance(doc.get(k), t)]
    if problems:
        return problems
    if doc["schema"] != SCHEMA:
        problems.append(f"schema: expected {SCHEMA}, got {doc['schema']}")
    if doc["device"].get("kind") not in ("gpu", "cpu"):
        problems.append("device.kind: expected 'gpu' or 'cpu'")
    for i, r in enumerate(doc["results"]):
        for k, t in _RESULT.items():
            if k not in r:
                problems.append(f"results[{i}].{k}: missing")
            elif not isinstance(r[k], t) or isinstance(r[k], bool):
                problems.append(f"results[{i}].{k}: unexpected type {type(r[k]).__name__}")
        if r.get("status") not in STATUSES:
            problems.append(f"results[{i}].status: {r.get('status')!r} is not one of {STATUSES}")
        if r.get("status") == "ok" and r.get("time_s") is None:
            problems.append(f"results[{i}]: status ok without a time")
        if r.get("status") != "ok" and r.get("time_s") is not None:
            problems.append(f"results[{i}]: a {r.get('status')} result carries a time")
        if r.get("impl") not in doc["implementations"]:
            problems.append(f"results[{i}].impl: {r.get('impl')!r} is not in implementations")
    return problems


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a results JSON; raises ValueError listing every schema problem."""
    doc = json.loads(Path(path).read_text())
    problems = validate(doc)
    if problems:
        raise ValueError(f"{path} is not a rawdelta bench results file:\n  " + "\n  ".join(problems))
    return doc


def dump(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write `doc` as indented JSON, creating the directory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Shared table model
# ----------------------------------------------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def fmt_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _rate(x: float | None, unit: str) -> str:
    if not x:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def baseline(doc: dict[str, Any]) -> str | None:
    """The rawdelta implementation speed-ups are quoted for: the first selected and available of cuda, numba, numpy."""
    impls = doc["implementations"]
    for name in RAWDELTA_ORDER:
        i = impls.get(name)
        if i and i["selected"] and i["available"]:
            return name
    return None


def label(doc: dict[str, Any], impl: str) -> str:
    return doc["implementations"].get(impl, {}).get("label", impl)


def sections(doc: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``(op, mode, results)`` by op name, then mode order, results by shape (T, then size)."""
    from .modes import MODES

    ops = sorted({r["op"] for r in doc["results"]})
    out = []
    for op in ops:
        for mode in MODES:
            rows = [r for r in doc["results"] if r["op"] == op and r["mode"] == mode]
            if rows:
                impl_order = list(doc["implementations"])
                rows.sort(key=lambda r: (shape_key(r["shape"]), impl_order.index(r["impl"])
                                         if r["impl"] in impl_order else 99))
                out.append((op, mode, rows))
    return out


def shape_key(shape: list[int]) -> tuple[int, int]:
    B, T, H, D = shape
    return T, B * H * D * D


def speedup(doc: dict[str, Any], r: dict[str, Any]) -> float | None:
    """``time(r) / time(baseline)`` at the same op, mode and shape: how much faster rawdelta is."""
    base = baseline(doc)
    if r["time_s"] is None or base is None or r["impl"] == base:
        return None
    for b in doc["results"]:
        if (b["impl"], b["op"], b["mode"], b["shape"]) == (base, r["op"], r["mode"], r["shape"]) and b["time_s"]:
            return r["time_s"] / b["time_s"]
    return None


def speedups_by_impl(doc: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, dict[tuple[int, ...], float]]:
    """``{impl: {shape: rawdelta speed-up over impl}}`` for the rows that have one (see :func:`speedup`)."""
    out: dict[str, dict[tuple[int, ...], float]] = {}
    for r in rows:
        s = speedup(doc, r)
        if s is not None:
            out.setdefault(r["impl"], {})[tuple(r["shape"])] = s
    return out


def plot_files(doc: dict[str, Any], prefix: str) -> list[tuple[str, str, str, str]]:
    """``(op, kind, file name, alt text)`` of every plot :func:`.plots.make_plots` makes for `doc`.

    Kind is ``"time"`` or ``"speedup"``. It lives here, not in :mod:`.plots` (which draws them), because the
    markdown region links the plots by these names and :mod:`.plots` imports this module, not the reverse.
    """
    out = []
    for op in dict.fromkeys(op for op, _, _ in sections(doc)):
        secs = [(m, rows) for o, m, rows in sections(doc) if o == op]
        if any(r["status"] == "ok" for _, rows in secs for r in rows):
            out.append((op, "time", f"{prefix}-{op}-time.png", f"{op}: time per call against T"))
        if any(speedups_by_impl(doc, rows) for _, rows in secs):  # panels: the modes with a speed-up
            out.append((op, "speedup", f"{prefix}-{op}-speedup.png", f"{op}: rawdelta speed-up"))
    return out


def _gate_cell(r: dict[str, Any]) -> str:
    g = r.get("gate")
    if not g:
        return "-"
    errs = [e for e in g["errors"].values() if e is not None]
    worst = f" ({max(errs):.1e})" if errs else ""
    return ("pass" if g["passed"] else "WRONG") + worst


def _floor_cell(r: dict[str, Any]) -> str:
    f = r.get("floor_fraction")
    return "-" if f is None else f"{100 * f:.2g}% {'mem' if r['bound'] == 'memory' else 'flop'}"


HEADER = ("(B, T, H, D)", "implementation", "time", "of floor", "rawdelta speed-up", "peak memory", "first call",
          "gate (max rel-RMS)")


def table(doc: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[tuple[str, ...]], list[str]]:
    """Table cells for one (op, mode) and the notes the cells refer to by number."""
    notes: list[str] = []
    body = []
    for r in rows:
        if r["status"] == "ok":
            t = fmt_time(r["time_s"])
        else:
            reason = r.get("reason") or r["status"]
            if reason not in notes:
                notes.append(reason)
            t = f"{r['status']} [{notes.index(reason) + 1}]"
        s = speedup(doc, r)
        body.append((fmt_shape(r["shape"]), label(doc, r["impl"]), t, _floor_cell(r),
                     f"{s:.3g}×" if s is not None else "-", fmt_bytes(r.get("peak_bytes")),
                     fmt_time(r.get("first_call_s")), _gate_cell(r)))
    return body, notes


COLD_HEADER = ("op", "mode", "implementation", "(B, T, H, D)", "first result", "warm call", "caches empty")


def cold_table(doc: dict[str, Any]) -> tuple[list[tuple[str, ...]], list[str]]:
    notes: list[str] = []
    body = []
    from .modes import MODES

    for c in sorted(doc["cold_start"], key=lambda c: (c["op"], MODES.index(c["mode"]), c["impl"])):
        if c.get("status") == "ok":
            first = fmt_time(c.get("first_result_s"))
        else:
            reason = c.get("reason") or c.get("status", "error")
            if reason not in notes:
                notes.append(reason)
            first = f"{c.get('status', 'error')} [{notes.index(reason) + 1}]"
        cold = {True: "yes", False: "no"}.get(c.get("cold"), "-")
        body.append((c["op"], c["mode"], label(doc, c["impl"]), fmt_shape(c["shape"]), first,
                     fmt_time(c.get("warm_time_s")), cold))
    return body, notes


def headline(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, value)`` lines describing where and how the numbers were measured."""
    d, s, v = doc["device"], doc["settings"], doc["versions"]
    name = d["name"] + (f" (compute capability {d['compute_capability']})" if d.get("compute_capability") else "")
    if d["kind"] == "cpu":
        name += f", {d.get('cores')} cores; no GPU, so the numpy backend ran at small shapes"
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    missing = [k for k, val in v.items() if not val]
    if missing:
        vers += "; not installed: " + ", ".join(missing)
    reps = (f"median of {s['min_reps']} to {s['max_reps']} calls within about {s['rep_s']:g} s after "
            f"{s['warmup']} warm-up call(s); calls slower than {s['max_call_s']:g} s not timed; L2 flush "
            f"{'on' if s['flush_l2'] else 'off'}")
    dur = doc.get("duration_s") or {}
    timing = reps + (f"; the run took {dur['total']:.0f} s ({dur['sweep']:.0f} s without the fresh-process "
                     "first calls)" if dur else "")
    return [
        ("device", name),
        ("date", doc["date"]),
        ("versions", vers),
        ("copy bandwidth", f"{_rate(d.get('copy_per_s'), 'B/s')} ({d.get('copy_source')})"),
        ("FLOP ceiling", f"{_rate(d.get('flops_per_s'), 'FLOP/s')} ({d.get('flops_source')})"),
        ("inputs", f"q, k, v, do {s['dtype']}; g (log-sigmoid), beta (sigmoid) and states float32; "
                   f"q/k L2-normalised in the kernel; H = HV, K = V = D; no initial state except in decode (one "
                   f"token per sequence, the state in and a new final state out); seed {s['seed']}"),
        ("timing", timing),
    ]


def impl_lines(doc: dict[str, Any]) -> list[str]:
    out = []
    for name, i in doc["implementations"].items():
        if i["available"]:
            state = "ran" if i["selected"] else "available, not selected"
        else:
            state = f"not available: {i['reason']}"
        note = f" ({i['note']})" if i.get("note") and i["available"] else ""
        out.append(f"{i['label']} (`{name}`){note}: {state}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Text (terminal)
# ----------------------------------------------------------------------------------------------------------------------


def _text_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *body)]


def text_report(doc: dict[str, Any]) -> str:
    """The terminal summary: where, then one table per (op, mode), then time to first result."""
    lines = [f"{k:15s}{v}" for k, v in headline(doc)]
    lines += ["", "implementations:"] + [f"  {s}" for s in impl_lines(doc)]
    for op, mode, rows in sections(doc):
        body, notes = table(doc, rows)
        lines += ["", f"{op}, {mode}"] + _text_table(HEADER, body)
        lines += [f"  [{i}] {n}" for i, n in enumerate(notes, 1)]
    if doc["cold_start"]:
        body, notes = cold_table(doc)
        lines += ["", "time to first result (fresh process, empty CuPy and Triton caches)"]
        lines += _text_table(COLD_HEADER, body) + [f"  [{i}] {n}" for i, n in enumerate(notes, 1)]
    lines += ["", f"command: {doc['command']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Markdown region
# ----------------------------------------------------------------------------------------------------------------------


def _md_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    def row(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [row(header), "|" + "---|" * len(header), *(row(b) for b in body)]


def _md_text(s: str) -> str:
    return s.replace("<", "&lt;").replace("*", "\\*")


def markdown_region(doc: dict[str, Any], prefix: str, plots_rel: str) -> str:
    """The body of a generated region (between the markers) for results `doc`.

    Args:
        doc: the results document.
        prefix: the plots' file-name prefix (the JSON's stem), see :func:`plot_files`.
        plots_rel: the plots' directory relative to the page.
    """
    d = doc["device"]
    title = f"{d['name']} ({'GPU' if d['kind'] == 'gpu' else 'CPU, numpy backend, small shapes'})"
    out = ["<!-- Generated from the JSON named above by `rawdelta bench --report`; edits here are overwritten. -->",
           "", f"### {title}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_md_text(v)} |" for k, v in headline(doc)]
    out += ["", "Command:", "", "```bash", doc["command"], "```", "", "Implementations:", ""]
    out += [f"- {_md_text(s)}" for s in impl_lines(doc)]
    out += ["", "Times are medians per call; *of floor* is the floor (bytes over the copy bandwidth or FLOPs over "
            "the FLOP ceiling, whichever is larger) as a fraction of the time; *rawdelta speed-up* is that "
            "implementation's time over rawdelta's; *first call* is the first call in the run (compilation and "
            "autotuning included, disk caches as found); *gate* is the worst relative RMS error against the "
            "float64 reference on the benchmark's own inputs (the first and last batch rows times the first and "
            "last heads, every token; 64 query rows for softmax attention), within the tolerance table of the "
            "input dtype or the result is reported wrong and not timed."]
    plots = plot_files(doc, prefix)
    for op in dict.fromkeys(op for op, _, _ in sections(doc)):
        for op_, mode, rows in sections(doc):
            if op_ != op:
                continue
            body, notes = table(doc, rows)
            out += ["", f"**`{op}`, {mode}**", ""] + _md_table(HEADER, body)
            if notes:
                out += [""] + [f"{i}. {_md_text(n)}" for i, n in enumerate(notes, 1)]
        for p_op, _, fname, alt in plots:
            if p_op == op:
                out += ["", f"![{alt}]({plots_rel.rstrip('/')}/{fname})"]
    if doc["cold_start"]:
        body, notes = cold_table(doc)
        out += ["", "**Time to first result** (one call in a fresh process with empty `CUPY_CACHE_DIR` and "
                "`TRITON_CACHE_DIR`, after imports and input set-up; *caches empty* says whether they still were "
                "when the call began)", ""] + _md_table(COLD_HEADER, body)
        if notes:
            out += [""] + [f"{i}. {_md_text(n)}" for i, n in enumerate(notes, 1)]
    return "\n".join(out) + "\n"


def render_region(doc: dict[str, Any], json_rel: str, plots_rel: str) -> str:
    """The whole region, markers included."""
    prefix = Path(json_rel).stem
    return (BEGIN.format(json=json_rel, plots=plots_rel) + "\n" + markdown_region(doc, prefix, plots_rel) + END)


def regions(text: str) -> list[tuple[str, str, str]]:
    """``(json path, plots dir, full region text)`` for every region in a page."""
    return [(m.group(1), m.group(2), m.group(0)) for m in REGION_RE.finditer(text)]


def update_markdown(page: str | os.PathLike[str], json_path: str | os.PathLike[str],
                    plots_dir: str | os.PathLike[str], doc: dict[str, Any] | None = None) -> str:
    """Rewrite the region of `page` generated from `json_path`; returns the region written.

    A new region goes before the page's first region (the newest results first), or at its end when it
    has none. Paths in the markers are relative to the page's directory, in POSIX form.
    """
    page = Path(page)
    base = page.parent.resolve()
    json_rel = Path(os.path.relpath(Path(json_path).resolve(), base)).as_posix()
    plots_rel = Path(os.path.relpath(Path(plots_dir).resolve(), base)).as_posix()
    region = render_region(doc if doc is not None else load(json_path), json_rel, plots_rel)
    text = page.read_text() if page.exists() else ""
    found = regions(text)
    for key, _, old in found:
        if key == json_rel:
            page.write_text(text.replace(old, region))
            return region
    if found:
        first = found[0][2]
        page.write_text(text.replace(first, region + "\n\n" + first, 1))
    else:
        page.write_text(text.rstrip("\n") + ("\n\n" if text.strip() else "") + region + "\n")
    return region
