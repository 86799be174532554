"""The shared reranking sets, evaluated in one call: what every reranker tamis ships is measured on.

| set | first stage | candidates | headline |
|---|---|---|---|
| TREC DL 2021 passages | the provided BM25 run | top 100 | nDCG@10 (graded, binary measures at label >= 2) |
| SciFact (BEIR test) | BM25 | top 100 | nDCG@10 |
| NovelEval-2306 | the judged pool (20 passages per question, as published) | 20 | nDCG@10 |
| llamaindex-10k-lyft | dense, bundled all-MiniLM-L6-v2 | top 20 | Hit@3, MRR@10 |

>>> rerank_suite("path/to/reranker", "../shared/data")   # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tamis.evaluate.pipeline import evaluate


@dataclass(frozen=True)
class SuiteSet:
    name: str
    directory: str
    first_stage: str
    depth: int
    metrics: tuple[str, ...]
    split: str = "test"


RERANK_SUITE: tuple[SuiteSet, ...] = (
    SuiteSet("trec-dl21", "trec-dl21", "run:run.bm25.tsv", 100, ("nDCG@10", "MRR@10")),
    SuiteSet("scifact", "scifact", "bm25", 100, ("nDCG@10", "MRR@10")),
    SuiteSet("noveleval", "noveleval", "pool", 20, ("nDCG@10", "MRR@10")),
    SuiteSet("lyft", "llamaindex-10k-lyft", "dense", 20, ("Hit@3", "MRR@10", "nDCG@10")),
)


def rerank_suite(
    reranker: Any,
    data_root: str | os.PathLike[str],
    sets: tuple[str, ...] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Rerank each set's first stage with ``reranker`` (an object, name or path); one row per set with
    the first stage's and the reranked metrics, pairs/s and the settings."""
    from tamis.evaluate.pipeline import load_reranker

    rr = load_reranker(reranker, device, dtype)
    rows = []
    for s in RERANK_SUITE:
        if sets is not None and s.name not in sets:
            continue
        report = evaluate(Path(data_root) / s.directory, split=s.split, first_stage=s.first_stage, reranker=rr,
                          depth=s.depth, k_values=(1, 3, 5, 10, 100), cache_dir=cache_dir, device=device,
                          dtype=dtype, show_progress=show_progress)
        first, final = report.stages[0].metrics, report.final.metrics
        row: dict[str, Any] = {"set": s.name, "first_stage": s.first_stage, "depth": s.depth,
                               "reranker": getattr(rr, "name", str(reranker))}
        for m in s.metrics:
            row[f"first:{m}"] = round(first[m], 4)
            row[m] = round(final[m], 4)
        row["pairs_per_s"] = round(report.final.info.get("pairs_per_second", 0.0), 1)
        rows.append(row)
    return rows
