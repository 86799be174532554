"""Evaluation and benchmarks: data sets, first-stage retrieval, reranking, IR metrics, reports, throughput.

>>> from tamis.evaluate import evaluate
>>> report = evaluate("../shared/data/scifact", first_stage="bm25")   # doctest: +SKIP
>>> report.final.metrics["nDCG@10"]                                     # doctest: +SKIP
0.679...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it; imported on first use (PEP 562), so registering the `eval` and
# `bench` commands (tamis.evaluate.cli) imports neither torch nor the IR libraries
_LAZY = {
    **dict.fromkeys(
        ["Corpus", "Dataset", "DatasetError", "Pair", "Qrels", "Run", "load_corpus", "load_dataset", "load_pairs",
         "load_qrels", "load_queries", "load_run", "save_run"],
        "tamis.evaluate.datasets",
    ),
    **dict.fromkeys(
        ["BM25Index", "EmbeddingCache", "bm25_search", "dense_search", "encode", "exact_topk", "fuse", "rrf",
         "sparse_search", "zscore_fusion"],
        "tamis.evaluate.first_stage",
    ),
    **dict.fromkeys(["Metrics", "compute_metrics", "cut_run"], "tamis.evaluate.metrics"),
    **dict.fromkeys(["EvalReport", "StageResult", "evaluate", "rerank_run"], "tamis.evaluate.pipeline"),
}

__all__ = [
    "BM25Index",
    "Corpus",
    "Dataset",
    "DatasetError",
    "EmbeddingCache",
    "EvalReport",
    "Metrics",
    "Pair",
    "Qrels",
    "Run",
    "StageResult",
    "bm25_search",
    "compute_metrics",
    "cut_run",
    "dense_search",
    "encode",
    "evaluate",
    "exact_topk",
    "fuse",
    "load_corpus",
    "load_dataset",
    "load_pairs",
    "load_qrels",
    "load_queries",
    "load_run",
    "rerank_run",
    "rrf",
    "save_run",
    "sparse_search",
    "zscore_fusion",
]

if TYPE_CHECKING:
    from tamis.evaluate.datasets import (
        Corpus,
        Dataset,
        DatasetError,
        Pair,
        Qrels,
        Run,
        load_corpus,
        load_dataset,
        load_pairs,
        load_qrels,
        load_queries,
        load_run,
        save_run,
    )
    from tamis.evaluate.first_stage import (
        BM25Index,
        EmbeddingCache,
        bm25_search,
        dense_search,
        encode,
        exact_topk,
        fuse,
        rrf,
        sparse_search,
        zscore_fusion,
    )
    from tamis.evaluate.metrics import Metrics, compute_metrics, cut_run
    from tamis.evaluate.pipeline import EvalReport, StageResult, evaluate, rerank_run


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tamis.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
