"""Draw the documentation's plots from the recorded measurements (no benchmark is rerun; a few seconds).

    python docs/plots/make_plots.py            # writes docs/plots/*.png; look at them before committing

Each number below is copied from the page that records it, with the command that measures it again:

- matryoshka.png: SciFact test nDCG@10 by dimensions, all-MiniLM-L6-v2 as shipped and Matryoshka-trained
  (docs/training-embedders.md; `python recipes/embedding_adapters.py --scifact-docs 0`).
- speed.png: docs/s of each system, 2 cores of an AMD EPYC with AVX-512 BF16 (docs/speed.md;
  `tamis bench --task embed|rerank --vs sentence-transformers`).
- students.png: nDCG@10 of the tiny-reranker recipe's teacher and students by evaluation set
  (docs/training.md; `python recipes/tiny_reranker.py --stages evaluate`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).resolve().parent
META = {"Software": "docs/plots/make_plots.py (tamis)"}

# docs/training-embedders.md, "Matryoshka-trained, SciFact test nDCG@10 at 384 / 128 / 64 / 32 dims"
MRL_DIMS = [384, 128, 64, 32]
MRL_BASE = [0.6451, 0.6016, 0.4841, 0.3371]
MRL_TRAINED = [0.6722, 0.6471, 0.5377, 0.3998]

# docs/speed.md, the table against sentence-transformers (docs/s)
SPEED = {
    "embed": [("sentence-transformers fp32", 27.6), ("sentence-transformers bf16 autocast", 65.2),
              ("ONNX Runtime fp32", 51.3), ("ONNX Runtime int8 dynamic", 92.9), ("tamis default", 137.6)],
    "rerank": [("sentence-transformers fp32", 83.4), ("sentence-transformers bf16 autocast", 196.4),
               ("tamis default", 447.3)],
}

# docs/training.md, the tiny-reranker table (nDCG@10; the lyft row, Hit@3 / MRR@10, is another measure)
SETS = ["TREC DL21", "SciFact", "NovelEval"]
STUDENTS = {
    "embedding reranker": [0.5785, 0.6635, 0.7410],
    "teacher (ensemble)": [0.6231, 0.7126, 0.7474],
    "student 2 x 128": [0.4694, 0.7243, 0.6594],
    "student 3 x 384 (MiniLM layers 0-2)": [0.4890, 0.7032, 0.6744],
}


def save(fig, name: str) -> Path:
    """Lay the figure out, write OUT/name (no timestamp, so a redraw of the same numbers is the same file)."""
    fig.tight_layout()
    path = OUT / name
    fig.savefig(path, dpi=110, metadata=META)
    plt.close(fig)
    return path


def matryoshka() -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(MRL_DIMS, MRL_BASE, "o-", label="all-MiniLM-L6-v2 as shipped")
    ax.plot(MRL_DIMS, MRL_TRAINED, "s-", label="Matryoshka-trained (tamis train embedder)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(MRL_DIMS, [str(d) for d in MRL_DIMS])
    ax.set_xlabel("dimensions kept")
    ax.set_ylabel("SciFact test nDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Matryoshka: quality by dimensions", fontsize=10)
    return save(fig, "matryoshka.png")


def speed() -> Path:
    fig, axes = plt.subplots(2, 1, figsize=(7, 4.8), gridspec_kw={"height_ratios": [5, 3]})
    for ax, (task, rows) in zip(axes, SPEED.items()):
        names = [n for n, _ in rows]
        vals = [v for _, v in rows]
        colors = ["#2b7bba" if n.startswith("tamis") else "#9aa5b1" for n in names]
        ax.barh(names, vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:g}", va="center", fontsize=8)
        ax.set_xlabel("docs/s (higher is better)")
        ax.set_title(f"{task} (all-MiniLM-L6-v2 shapes), 2 EPYC cores with AVX-512 BF16", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlim(0, max(vals) * 1.2)
        ax.invert_yaxis()
    return save(fig, "speed.png")


def students() -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(STUDENTS)
    for i, (name, vals) in enumerate(STUDENTS.items()):
        xs = [x + (i - (len(STUDENTS) - 1) / 2) * width for x in range(len(SETS))]
        ax.bar(xs, vals, width, label=name)
    ax.set_xticks(range(len(SETS)), SETS)
    ax.set_ylabel("nDCG@10")
    ax.set_ylim(0, 0.85)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("Tiny-reranker recipe: teacher and students (BM25 top 100; NovelEval pool)", fontsize=10)
    return save(fig, "students.png")


def main() -> None:
    for draw in (matryoshka, speed, students):
        print(draw())


if __name__ == "__main__":
    main()
