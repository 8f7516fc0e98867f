"""``rawdelta bench``: arguments and the command itself (wired into :mod:`rawdelta.cli`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from .modes import MODES
from .registry import IMPLS, OPS, default_shapes, impl_modes, impl_names, op_names, parse_shapes, shape_fits_mode


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``rawdelta`` parser's subparsers."""
    p = sub.add_parser(
        "bench", help="time every op against the peer (fla) and torch SDPA; tables, JSON, plots, docs",
        description="Time rawdelta's ops (every backend that can run here) against the peer (fla-core, when "
                    "importable) and torch's SDPA, after a correctness gate against the float64 reference. "
                    "Without a GPU the numpy backend runs at small shapes. With --report / --plot-from, render an "
                    "earlier run's JSON instead of running.",
)
    sel = p.add_argument_group("what to run")
    sel.add_argument("--op", action="append", choices=op_names(), help="only this op (repeatable)")
    sel.add_argument("--mode", action="append", choices=MODES, help="only this mode (repeatable)")
    sel.add_argument("--impl", action="append", choices=impl_names(),
                     help="only this implementation (repeatable); default: those meant for this device")
    sel.add_argument("--shapes", help="comma-separated BxTxHxD (T = 1: decode with B sequences); default: the "
                                      "peer's sweep on a GPU, a small one on the CPU")
    sel.add_argument("--cpu", action="store_true", help="measure the CPU path even when a GPU is present")
    sel.add_argument("--list", action="store_true", help="print ops, modes, shapes and implementations; run nothing")
    how = p.add_argument_group("how")
    how.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                     help="q, k, v, o dtype (default: %(default)s)")
    how.add_argument("--seed", type=int, default=0, help="input seed (default: %(default)s)")
    how.add_argument("--rep-s", type=float, default=0.5,
                     help="time budget of the repetitions of one measurement, s (default: %(default)s)")
    how.add_argument("--min-reps", type=int, default=3, help="(default: %(default)s)")
    how.add_argument("--max-reps", type=int, default=200, help="(default: %(default)s)")
    how.add_argument("--warmup", type=int, default=2,
                     help="calls after the first (compile, autotune) before timing (default: %(default)s)")
    how.add_argument("--max-call-s", type=float, default=2.0,
                     help="a warm call slower than this is reported 'too slow' and larger shapes are skipped "
                          "(default: %(default)s)")
    how.add_argument("--flush-l2", action="store_true", help="flush the L2 cache before every timed call (GPU)")
    how.add_argument("--cold-start", choices=("op", "all", "none"), default="op",
                     help="time to first result in a fresh process with empty caches: per op (its first mode), "
                          "per op and mode, or none (default: %(default)s)")
    how.add_argument("--cold-timeout-s", type=float, default=240.0,
                     help="limit for one fresh process, s (default: %(default)s)")
    how.add_argument("--time-limit-s", type=float, default=None,
                     help="end the run by then, s: the sweep stops at 70%% of it (the rest reported as skipped) "
                          "and the fresh-process first calls share what is left")
    how.add_argument("--jobs", type=int, default=None,
                     help="worker processes for the float64 references (default: 0 on a CPU, up to 4 on a GPU)")
    out = p.add_argument_group("output")
    out.add_argument("--json", nargs="?", const="-", metavar="PATH",
                     help="write the results JSON to PATH (or to stdout, without the table, when PATH is omitted)")
    out.add_argument("--plots-dir", metavar="DIR", help="write PNG plots there (needs matplotlib)")
    out.add_argument("--markdown", metavar="PAGE",
                     help="rewrite the generated region of PAGE (e.g. docs/benchmarks.md) from the results JSON")
    out.add_argument("--report", "--plot-from", dest="source", metavar="JSON",
                     help="render an earlier run's JSON (table, --plots-dir, --markdown) instead of running")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def _listing(env: Any) -> str:
    kind = env.kind
    lines = ["ops and modes:"] + [f"  {o.name}: {', '.join(o.modes)}" for o in OPS]
    lines += [f"default shapes here ({kind}), (B, T, H, D):"] + [f"  {s}" for s in default_shapes(kind)]
    lines.append("implementations:")
    for i in IMPLS:
        reason = i.availability(env)
        default = "default here" if kind in i.default_on else "on request"
        lines.append(f"  {i.name:6s} {i.label}: {'available' if reason is None else 'not available: ' + reason}"
                     f" ({default})")
    return "\n".join(lines)


def _render(doc: dict[str, Any], json_path: str | None, args: argparse.Namespace) -> None:
    from .report import update_markdown

    if args.plots_dir:
        try:
            from .plots import make_plots

            prefix = Path(json_path).stem if json_path else "bench"
            for path in make_plots(doc, args.plots_dir, prefix):
                print(f"wrote {path}", file=sys.stderr)
        except ImportError as e:
            print(f"no plots: matplotlib is not installed ({e}); make them later with --plot-from on the JSON",
                  file=sys.stderr)
    if args.markdown:
        plots_dir = args.plots_dir or str(Path(json_path).parent)  # type: ignore[arg-type]
        update_markdown(args.markdown, json_path, plots_dir, doc)  # type: ignore[arg-type]
        print(f"updated the generated region of {args.markdown}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    """Run (or render) and report; exit status 1 when a rawdelta implementation failed its gate."""
    from .report import dump, load, text_report

    if args.markdown and not (args.source or (args.json and args.json != "-")):
        print("rawdelta bench: --markdown needs the results JSON file (--json PATH or --report PATH)",
              file=sys.stderr)
        return 2
    if args.source:
        doc = load(args.source)
        if args.json:
            print(json_text(doc)) if args.json == "-" else dump(doc, args.json)
        if args.json != "-":
            print(text_report(doc))
        _render(doc, args.source, args)
        return 0

    from .env import detect

    env = detect(args.cpu)
    if args.list:
        print(_listing(env))
        return 0
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(env.kind)
    except ValueError as e:
        print(f"rawdelta bench: --shapes: {e}", file=sys.stderr)
        return 2
    from .runner import Settings, plan, run
    from .timing import Budget

    ops = [o for o in OPS if not args.op or o.name in args.op]
    impls = [i for i in IMPLS if (i.name in args.impl if args.impl else env.kind in i.default_on)]
    cases = plan(ops, args.mode or MODES, impls, shapes)
    if not cases:
        fits = [m for o in ops for i in impls for m in impl_modes(i, o) if any(shape_fits_mode(s, m) for s in shapes)]
        print("rawdelta bench: nothing to run for this selection"
              + ("" if fits else " (decode takes shapes with T = 1, the other modes the rest)"), file=sys.stderr)
        return 2
    if not env.gpu:
        print(f"rawdelta bench: no GPU ({env.gpu_reason}); running the numpy backend at small shapes on the CPU. "
              "These are CPU timings, not GPU ones.", file=sys.stderr)
    jobs = args.jobs if args.jobs is not None else (min(4, (os.cpu_count() or 1) // 4) if env.gpu else 0)
    settings = Settings(dtype=args.dtype, seed=args.seed, cold_start=args.cold_start,
                        cold_timeout_s=args.cold_timeout_s, jobs=max(jobs, 0), time_limit_s=args.time_limit_s,
                        budget=Budget(rep_s=args.rep_s, min_reps=args.min_reps, max_reps=args.max_reps,
                                      warmup=args.warmup, max_call_s=args.max_call_s, flush_l2=args.flush_l2))
    argv = getattr(args, "argv", None)
    command = "rawdelta " + shlex.join(argv) if argv else "rawdelta bench"
    doc = run(env, cases, settings, IMPLS, command, progress=not args.quiet)
    if args.json == "-":
        print(json_text(doc))
    else:
        if args.json:
            dump(doc, args.json)
        print(text_report(doc))
    _render(doc, args.json if args.json != "-" else None, args)
    wrong = [r for r in doc["results"] if r["status"] == "wrong" and doc["implementations"][r["impl"]]["family"]
             == "rawdelta"]
    return 1 if wrong else 0


def json_text(doc: dict[str, Any]) -> str:
    import json

    return json.dumps(doc, indent=1)
