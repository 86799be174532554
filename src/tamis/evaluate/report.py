"""Tables, JSON reports and the quality-versus-throughput plot."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tamis.evaluate.metrics import HEADLINE


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    """A plain-text table; floats formatted with ``floatfmt``; columns default to the first row's keys."""
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns is not None else list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    numeric = [all(_is_number(r.get(c)) for r in rows) for c in cols]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(b) for b in body)])


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def eval_table(report: Any, metrics: Sequence[str] = HEADLINE) -> str:
    """One row per stage of an :class:`~tamis.evaluate.pipeline.EvalReport` (or its dict)."""
    d = report.to_dict() if hasattr(report, "to_dict") else report
    rows = []
    for s in d["stages"]:
        row: dict[str, Any] = {"stage": s["name"]}
        row.update({m: s["metrics"][m] for m in metrics if m in s["metrics"]})
        row["queries"] = s["n_queries"]
        row["seconds"] = f"{float(s['seconds']):.2f}"
        rows.append(row)
    title = f"{d['dataset']} ({d['split']}): {d['sizes']['documents']} documents, {d['sizes']['queries']} queries"
    return title + "\n" + format_table(rows)


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def plot_quality_vs_throughput(
    points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    x: str = "docs_per_50ms",
    y: str = "nDCG@10",
    title: str = "Quality vs throughput",
    xlabel: str = "documents per 50 ms (higher is faster)",
) -> Path:
    """Scatter of ``points`` with labels, like the Jina reranker Turbo/Tiny chart.

    Each point is a dict with ``label``, the ``x`` and ``y`` keys, and optionally ``group`` (colour and
    legend, e.g. the system), ``panel`` (one subplot per panel, e.g. "embedding" / "reranking") and
    ``ylabel`` (the panel's quality measure). A point without a quality value is drawn hollow at the
    bottom of its panel; a panel where no point has one is a throughput-only bar chart (no quality axis, so
    never a made-up one). The PNG carries its axes as text metadata (``tamis:axes``: per panel its kind,
    x / y limits and labels, and whether every label lies inside the image). Uses the Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = list(dict.fromkeys(str(p.get("panel", "")) for p in points)) or [""]
    groups = list(dict.fromkeys(str(p.get("group", "")) for p in points))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), dpi=120, squeeze=False)
    kinds: list[str] = []
    for ax, panel in zip(axes[0], panels):
        pts = [p for p in points if str(p.get("panel", "")) == panel]
        have_y = [float(p[y]) for p in pts if p.get(y) is not None]
        if not have_y:  # throughput only: one bar per point, labels on the y axis
            kinds.append("throughput")
            labels = [str(p.get("label", "")) for p in pts]
            values = [float(p[x]) for p in pts]
            bar_colors = [colors[groups.index(str(p.get("group", ""))) % len(colors)] for p in pts]
            rows = list(range(len(pts)))[::-1]
            ax.barh(rows, values, color=bar_colors, height=0.6)
            ax.set_yticks(rows, labels, fontsize=9)
            for row, v in zip(rows, values, strict=True):
                ax.annotate(f"{v:.1f}", (v, row), textcoords="offset points", xytext=(4, -4), fontsize=9)
            ax.set_xlim(0, (max(values) if values else 1.0) * 1.2)
            ax.set_xlabel(xlabel)
            name = "Throughput"
            ax.set_title(f"{name}: {panel}" if panel else name)
            ax.grid(True, axis="x", alpha=0.3)
            continue
        kinds.append("quality")
        lo, hi = min(have_y), max(have_y)
        pad = max(0.02, (hi - lo) * 0.25)
        floor = max(lo - pad, 0.0) if lo >= 0 else lo - pad  # nDCG is never below 0: neither is its axis
        seen: set[str] = set()
        for n, p in enumerate(pts):
            g = str(p.get("group", ""))
            c = colors[groups.index(g) % len(colors)]
            known = p.get(y) is not None
            xv, yv = float(p[x]), (float(p[y]) if known else floor)
            ax.scatter([xv], [yv], s=110, edgecolors=c if not known else "black", facecolors=c if known else "none",
                       linewidths=1.5, zorder=3, label=g if g and g not in seen else None, clip_on=False)
            seen.add(g)
            text = str(p.get("label", "")) + ("" if known else " (quality unknown)")
            # alternate labels above and below so points at the same quality do not overprint; a point of
            # unknown quality sits on the bottom edge: its label goes above it, inside the axes
            offset = (8, 8) if not known else (-10, 12 if n % 2 == 0 else -20)
            ax.annotate(text, (xv, yv), textcoords="offset points", xytext=offset, fontsize=9, annotation_clip=False)
        xs = [float(p[x]) for p in pts]
        ax.set_xlim(0, (max(xs) if xs else 1.0) * 1.6)
        ax.set_ylim(floor - (pad * 0.5 if floor > 0 else 0.0), hi + pad)
        ax.set_xlabel(xlabel)
        ylabels = {str(p["ylabel"]) for p in pts if p.get("ylabel")}
        ax.set_ylabel(ylabels.pop() if len(ylabels) == 1 else y)
        ax.set_title(f"{title}: {panel}" if panel else title)
        ax.grid(True, alpha=0.3)
        if any(groups):
            ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    box = fig.bbox

    def drawn(ax: Any) -> list[Any]:  # point labels, titles, axis labels and the tick labels within the view
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        ticks = [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
        ticks += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
        return [t for t in [*ax.texts, ax.title, ax.xaxis.label, ax.yaxis.label, *ticks]
                if t.get_visible() and t.get_text()]

    inside = all(box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1
                 for ax in axes[0] for e in (t.get_window_extent() for t in drawn(ax)))
    meta = [{"panel": panel, "kind": kind, "xlim": [float(v) for v in ax.get_xlim()],
             "ylim": [float(v) for v in ax.get_ylim()], "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
             "labels_inside": inside} for ax, panel, kind in zip(axes[0], panels, kinds, strict=True)]
    fig.savefig(path, metadata={"tamis:axes": json.dumps(meta)})
    plt.close(fig)
    return path
