"""PNG plots from a results document (matplotlib, optional; the Agg canvas, no pyplot and no display).

Per op: time per call against the shape (ordered by T) for every implementation, one panel per mode; and
rawdelta's speed-up over each other implementation, as bars per shape. Made from the JSON alone, so a run on
a GPU machine without matplotlib can be plotted elsewhere (``rawdelta bench --plot-from results.json``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .report import baseline, label, plot_files, sections, shape_key, speedups_by_impl


def _tick(shape: tuple[int, ...], mode: str) -> str:
    B, T, H, D = shape
    return f"{B} seqs\nH{H} D{D}" if mode == "decode" else f"T={T}\nB{B} H{H} D{D}"


def make_plots(doc: dict[str, Any], out_dir: str | Path, prefix: str) -> list[Path]:
    """Write the plots of :func:`.report.plot_files` into `out_dir`; returns their paths. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = doc["device"]["name"]
    base = baseline(doc)
    written = []
    for op, kind, fname, _ in plot_files(doc, prefix):
        secs = [(m, rows) for o, m, rows in sections(doc) if o == op]
        if kind == "speedup":
            secs = [(m, rows) for m, rows in secs if speedups_by_impl(doc, rows)]
        fig = Figure(figsize=(5.2 * len(secs), 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(secs), squeeze=False)[0]
        for ax, (mode, rows) in zip(axes, secs):
            shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: shape_key(list(s)))
            x = range(len(shapes))
            ax.set_title(f"{mode}", fontsize=10)
            ax.set_xticks(list(x), [_tick(s, mode) for s in shapes], fontsize=7)
            if kind == "time":
                for impl in dict.fromkeys(r["impl"] for r in rows):
                    t = {tuple(r["shape"]): r["time_s"] for r in rows if r["impl"] == impl}
                    y = [t[s] * 1e3 if t.get(s) else math.nan for s in shapes]
                    if any(not math.isnan(v) for v in y):
                        ax.plot(list(x), y, marker="o", label=label(doc, impl))
                ax.set_yscale("log")
                ax.set_ylabel("time per call (ms)")
            else:
                sp = speedups_by_impl(doc, rows)
                width = 0.8 / max(len(sp), 1)
                for j, (impl, vals) in enumerate(sp.items()):
                    xs = [i + (j - (len(sp) - 1) / 2) * width for i in x]
                    ys = [vals.get(s, math.nan) for s in shapes]
                    bars = ax.bar(xs, ys, width, label=f"vs {label(doc, impl)}")
                    ax.bar_label(bars, labels=[f"{v:.2g}×" if not math.isnan(v) else "" for v in ys], fontsize=6)
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_yscale("log")
                ax.set_ylabel(f"time of X / time of {label(doc, base)}" if base else "speed-up")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            ax.grid(True, which="major", alpha=0.3)
        what = "time per call" if kind == "time" else f"{label(doc, base)} speed-up (above 1: rawdelta faster)"
        fig.suptitle(f"{op}: {what}\n{device}, {doc['settings']['dtype']}, {doc['date']}", fontsize=10)
        path = out_dir / fname
        fig.savefig(path, dpi=110, metadata={"Software": None})
        written.append(path)
    return written

