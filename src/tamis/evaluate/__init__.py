"""Evaluation and benchmarks: data sets, first-stage retrieval, reranking, IR metrics, reports, throughput.

>>> from tamis.evaluate import evaluate
>>> report = evaluate("../shared/data/scifact", first_stage="bm25")   # doctest: +SKIP
>>> report.final.metrics["nDCG@10"]                                     # doctest: +SKIP
0.679...
"""

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
    rrf,
)
from tamis.evaluate.metrics import Metrics, compute_metrics, cut_run
from tamis.evaluate.pipeline import EvalReport, StageResult, evaluate, rerank_run

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
    "load_corpus",
    "load_dataset",
    "load_pairs",
    "load_qrels",
    "load_queries",
    "load_run",
    "rerank_run",
    "rrf",
    "save_run",
]
