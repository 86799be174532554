"""Scale-out: batch embedding and reranking on Ray Data or Spark, and resumable ``tamis batch`` jobs.

Nothing here imports an engine at import time:

- :class:`EmbedBatch` / :class:`RerankBatch`: the engine-agnostic callables (a batch of rows in, rows
  with vectors or scores out), loading the model once per worker;
- :func:`embed_dataset` / :func:`rerank_dataset`: Ray Data (``pip install 'tamis[ray]'``);
- :func:`embed_dataframe` / :func:`rerank_dataframe`: Spark ``mapInPandas`` (``pip install 'tamis[spark]'``);
- :func:`run_job`: the resumable Parquet/JSONL -> Parquet-shards job behind ``tamis batch``.
"""

from __future__ import annotations

from tamis.scale.job import JobReport, run_job
from tamis.scale.mapper import EmbedBatch, RerankBatch
from tamis.scale.ray_data import embed_dataset, plan_actors, rerank_dataset
from tamis.scale.spark import embed_dataframe, rerank_dataframe

__all__ = [
    "EmbedBatch",
    "JobReport",
    "RerankBatch",
    "embed_dataframe",
    "embed_dataset",
    "plan_actors",
    "rerank_dataframe",
    "rerank_dataset",
    "run_job",
]
