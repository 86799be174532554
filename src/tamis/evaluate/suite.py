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


def scorer_suite(
    scorer: Any,
    data_root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    sets: tuple[str, ...] | None = None,
    dtype: str = "auto",
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """The same sets, candidates and metrics as :func:`rerank_suite`, scored by a list scorer of
    :mod:`tamis.train.teachers` (e.g. a teacher ensemble) with its scores cached per (query, document)
    (``scorer.cached``): each distinct text is encoded once, where a reranker re-encodes a document for every
    query that retrieves it."""
    from tamis.evaluate.datasets import from_beir, load_dataset, sorted_docs
    from tamis.evaluate.metrics import compute_metrics
    from tamis.evaluate.pipeline import default_relevance_level

    rows = []
    for s in RERANK_SUITE:
        if sets is not None and s.name not in sets:
            continue
        path = Path(data_root) / s.directory
        report = evaluate(path, split=s.split, first_stage=s.first_stage, k_values=(1, 3, 5, 10, 100),
                          cache_dir=cache_dir, dtype=dtype, show_progress=show_progress)
        first = report.stages[-1]
        dataset, data = load_dataset(path, s.split), from_beir(path, split=s.split)
        lists = []
        for q in dataset.queries:
            if q in first.run:
                docs = [d for d, _ in sorted_docs(first.run[q])[: s.depth] if d in data.corpus]
                if docs:
                    lists.append((q, docs))
        scores = scorer.cached(data, lists, cache_dir)
        run = {q: {d: float(x) for d, x in zip(docs, sc)} for (q, docs), sc in zip(lists, scores)}
        final = compute_metrics(dataset.qrels, run, (1, 3, 5, 10, 100), default_relevance_level(dataset)).mean
        row: dict[str, Any] = {"set": s.name, "first_stage": s.first_stage, "depth": s.depth,
                               "reranker": getattr(scorer, "name", str(scorer))}
        for m in s.metrics:
            row[f"first:{m}"] = round(first.metrics.mean[m], 4)
            row[m] = round(final[m], 4)
        rows.append(row)
    return rows
