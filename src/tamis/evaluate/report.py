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
    bottom of its panel. Uses the Agg backend (no display needed).
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
    for ax, panel in zip(axes[0], panels):
        pts = [p for p in points if str(p.get("panel", "")) == panel]
        have_y = [float(p[y]) for p in pts if p.get(y) is not None]
        lo = min(have_y) if have_y else 0.0
        hi = max(have_y) if have_y else 1.0
        pad = max(0.02, (hi - lo) * 0.25)
        floor = lo - pad
        seen: set[str] = set()
        for n, p in enumerate(pts):
            g = str(p.get("group", ""))
            c = colors[groups.index(g) % len(colors)]
            known = p.get(y) is not None
            xv, yv = float(p[x]), (float(p[y]) if known else floor)
            ax.scatter([xv], [yv], s=110, edgecolors=c if not known else "black", facecolors=c if known else "none",
                       linewidths=1.5, zorder=3, label=g if g and g not in seen else None)
            seen.add(g)
            text = str(p.get("label", "")) + ("" if known else " (quality unknown)")
            # alternate labels above and below so points at the same quality do not overprint
            ax.annotate(text, (xv, yv), textcoords="offset points", xytext=(-10, 12 if n % 2 == 0 else -20),
                        fontsize=9)
        xs = [float(p[x]) for p in pts]
        ax.set_xlim(0, (max(xs) if xs else 1.0) * 1.35)
        ax.set_ylim(floor - pad * 0.5, hi + pad)
        ax.set_xlabel(xlabel)
        ylabels = {str(p["ylabel"]) for p in pts if p.get("ylabel")}
        ax.set_ylabel(ylabels.pop() if len(ylabels) == 1 else y)
        ax.set_title(f"{title}: {panel}" if panel else title)
        ax.grid(True, alpha=0.3)
        if any(groups):
            ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
