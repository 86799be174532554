"""Ray Data adapter (``pip install 'tamis[ray]'``): the batch mappers on an actor pool.

``embed_dataset(ds, ...)`` / ``rerank_dataset(ds, ...)`` return a lazy ``ray.data.Dataset`` with the
mapper's output columns (pyarrow batches: vectors are fixed-size lists, so ``write_parquet`` writes plain
Parquet lists any reader understands). Each actor loads the model once and maps many batches.

CPU shares: Ray Data's read and write tasks ask for one CPU each. Actors that hold every CPU of the
cluster leave them none and the job never finishes (2 actors x 1 CPU on a 2-CPU machine hangs), so by
default the actors share the cluster's CPUs minus one: 2 actors on 2 CPUs get 0.5 CPU each. The share
is a scheduling reservation; each actor still runs ``num_threads`` torch threads (default: the share
rounded, at least 1).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

from tamis.errors import InvalidInputError
from tamis.scale.mapper import EmbedBatch, RerankBatch

logger = logging.getLogger("tamis.scale")

DEFAULT_BATCH_SIZE = 512


@dataclass(frozen=True)
class ActorPlan:
    workers: int
    num_cpus: float
    num_gpus: float
    num_threads: int


def plan_actors(
    cluster_cpus: float,
    cluster_gpus: float = 0.0,
    num_workers: int | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    device: str = "cpu",
) -> ActorPlan:
    """Actor count and per-actor resources that leave one CPU to Ray Data's read/write tasks.

    >>> plan_actors(2)
    ActorPlan(workers=2, num_cpus=0.5, num_gpus=0.0, num_threads=1)
    """
    on_gpu = not str(device).startswith("cpu")
    if num_workers is None:
        num_workers = max(1, int(cluster_gpus)) if on_gpu else max(1, int(cluster_cpus))
    if num_workers < 1:
        raise InvalidInputError("num_workers must be at least 1")
    free = max(cluster_cpus - 1.0, 0.0)  # one CPU stays free for reading and writing
    if num_cpus is None:
        share = free / num_workers
        if on_gpu:
            share = min(1.0, share)
        # Ray schedules in steps of 1/10000 CPU; floor to 2 decimals so n shares never exceed `free`
        num_cpus = max(math.floor(share * 100) / 100, 0.01)
    elif num_cpus * num_workers > free + 1e-9:
        warnings.warn(
            f"{num_workers} actors x {num_cpus} CPU leave less than one of the cluster's {cluster_cpus:g} CPUs "
            "to Ray Data's read and write tasks; the job can stall. Lower num_cpus or num_workers.",
            RuntimeWarning, stacklevel=3)
    if num_gpus is None:
        num_gpus = 0.0
        if on_gpu:
            if cluster_gpus <= 0:
                raise InvalidInputError(f"device={device!r} but the Ray cluster has no GPU")
            num_gpus = 1.0 if num_workers <= cluster_gpus else math.floor(cluster_gpus / num_workers * 100) / 100
    threads = max(1, round(num_cpus))
    return ActorPlan(int(num_workers), float(num_cpus), float(num_gpus), int(threads))


def _cluster() -> tuple[float, float]:
    import ray

    if not ray.is_initialized():
        ray.init()
    res = ray.cluster_resources()
    return float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))


def map_dataset(
    ds: Any,
    mapper: EmbedBatch | RerankBatch,
    *,
    num_workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> Any:
    """``ds.map_batches`` with ``mapper`` on a fixed actor pool (pyarrow batches in and out)."""
    from ray.data import ActorPoolStrategy

    cpus, gpus = _cluster()
    plan = plan_actors(cpus, gpus, num_workers, num_cpus, num_gpus, mapper.device)
    if mapper.num_threads is None:
        mapper.num_threads = plan.num_threads
    logger.info("tamis on Ray: %d actors x %.2f CPU (%d torch threads)%s, batches of %d rows", plan.workers,
                plan.num_cpus, mapper.num_threads, f" x {plan.num_gpus:g} GPU" if plan.num_gpus else "", batch_size)
    extra: dict[str, Any] = {}
    if plan.num_gpus:
        extra["num_gpus"] = plan.num_gpus
    return ds.map_batches(
        _Worker,
        fn_constructor_args=(mapper,),
        compute=ActorPoolStrategy(size=plan.workers),
        batch_size=batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        num_cpus=plan.num_cpus,
        udf_modifying_row_count=mapper.bad_rows == "skip",
        **extra,
    )


class _Worker:
    """The actor: holds one mapper (which loads its model on the first batch)."""

    def __init__(self, mapper: EmbedBatch | RerankBatch):
        self.mapper = mapper

    def __call__(self, batch: Any) -> Any:
        return self.mapper(batch)


def embed_dataset(
    ds: Any,
    model: str | None = None,
    *,
    text_column: str | list[str] = "text",
    keep_columns: list[str] | None = None,
    task: str | None = None,
    dimensions: int | None = None,
    normalized: bool = True,
    embedding_type: str | list[str] = "float",
    truncate: bool = True,
    output_column: str = "embedding",
    bad_rows: str = "flag",
    device: str = "cpu",
    dtype: str = "auto",
    num_workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    num_threads: int | None = None,
    **model_kwargs: Any,
) -> Any:
    """Embed a Ray Dataset's text column on an actor pool; returns the lazy mapped Dataset.

    >>> ds = ray.data.read_parquet("corpus/")                                    # doctest: +SKIP
    >>> tamis.scale.embed_dataset(ds, text_column=["title", "text"]).write_parquet("vectors/")  # doctest: +SKIP

    Arguments as :class:`tamis.scale.EmbedBatch`, plus the pool: ``num_workers`` actors (default: one
    per CPU, or per GPU with ``device="cuda"``), ``num_cpus`` / ``num_gpus`` per actor (default: see the
    module docstring), ``batch_size`` rows per call (larger batches pad less: rows are length-sorted
    within a batch).
    """
    mapper = EmbedBatch(model, text_column=text_column, keep_columns=keep_columns, task=task,
                        dimensions=dimensions, normalized=normalized, embedding_type=embedding_type,
                        truncate=truncate, output_column=output_column, bad_rows=bad_rows, device=device,
                        dtype=dtype, num_threads=num_threads, model_kwargs=model_kwargs)
    return map_dataset(ds, mapper, num_workers=num_workers, batch_size=batch_size, num_cpus=num_cpus,
                       num_gpus=num_gpus)


def rerank_dataset(
    ds: Any,
    model: str | None = None,
    *,
    query_column: str = "query",
    document_column: str = "document",
    keep_columns: list[str] | None = None,
    output_column: str = "score",
    bad_rows: str = "flag",
    device: str = "cpu",
    dtype: str = "auto",
    num_workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    num_threads: int | None = None,
    **model_kwargs: Any,
) -> Any:
    """Score a Ray Dataset of (query, document) rows on an actor pool; returns the lazy mapped Dataset.

    Arguments as :class:`tamis.scale.RerankBatch` and :func:`embed_dataset`.
    """
    mapper = RerankBatch(model, query_column=query_column, document_column=document_column,
                         keep_columns=keep_columns, output_column=output_column, bad_rows=bad_rows, device=device,
                         dtype=dtype, num_threads=num_threads, model_kwargs=model_kwargs)
    return map_dataset(ds, mapper, num_workers=num_workers, batch_size=batch_size, num_cpus=num_cpus,
                       num_gpus=num_gpus)
