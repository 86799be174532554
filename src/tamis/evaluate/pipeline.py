"""The evaluation pipeline: data set -> first stage -> optional reranking -> metrics -> report."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tamis.evaluate.datasets import Dataset, Run, load_dataset, load_run, sorted_docs
from tamis.evaluate.first_stage import (
    BM25_B,
    BM25_K1,
    BM25Index,
    EmbeddingCache,
    dense_search,
    exclude_identical_ids,
    quiet_truncation,
    rrf,
)
from tamis.evaluate.metrics import DEFAULT_K_VALUES, Metrics, compute_metrics

FIRST_STAGES = ("bm25", "dense", "hybrid", "run", "pool")


@dataclass
class StageResult:
    name: str
    metrics: Metrics
    seconds: float
    run: Run = field(repr=False, default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalReport:
    dataset: str
    split: str
    sizes: dict[str, int]
    config: dict[str, Any]
    stages: list[StageResult]
    timings: dict[str, float]

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def final(self) -> StageResult:
        return self.stages[-1]

    def to_dict(self, per_query: bool = False) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "sizes": self.sizes,
            "config": self.config,
            "stages": [
                {
                    "name": s.name,
                    "metrics": s.metrics.mean,
                    "n_queries": s.metrics.n_queries,
                    "seconds": round(s.seconds, 4),
                    **({"info": s.info} if s.info else {}),
                    **({"per_query": s.metrics.per_query} if per_query else {}),
                }
                for s in self.stages
            ],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def sample_dataset(dataset: Dataset, max_queries: int | None = None, corpus_sample: int | None = None,
                   seed: int = 0) -> Dataset:
    """A quick-run subset: a seeded random ``max_queries`` of the queries (kept in file order) and a corpus of
    ``corpus_sample`` documents holding every document judged for them (see :func:`evaluate`)."""
    import dataclasses
    import random

    if max_queries is None and corpus_sample is None:
        return dataset
    for name, value in (("max_queries", max_queries), ("corpus_sample", corpus_sample)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (got {value})")
    queries = dataset.queries
    if max_queries is not None and max_queries < len(queries):
        keep = set(random.Random(f"queries:{seed}").sample(sorted(queries), max_queries))
        queries = {q: t for q, t in queries.items() if q in keep}
    qrels = {q: dataset.qrels[q] for q in queries if q in dataset.qrels}
    corpus = dataset.corpus
    if corpus_sample is not None and corpus_sample < len(corpus):
        judged = {d for q in qrels for d in qrels[q]}
        others = sorted(d for d in corpus.ids if d not in judged)
        n_more = max(corpus_sample - len(judged & set(corpus.ids)), 0)
        keep_docs = judged | set(random.Random(f"corpus:{seed}").sample(others, min(n_more, len(others))))
        at = [i for i, d in enumerate(corpus.ids) if d in keep_docs]
        corpus = dataclasses.replace(corpus, ids=[corpus.ids[i] for i in at], titles=[corpus.titles[i] for i in at],
                                     texts=[corpus.texts[i] for i in at])
    return dataclasses.replace(dataset, queries=queries, qrels=qrels, corpus=corpus)


def parse_first_stage(spec: str) -> tuple[str, str | None]:
    """``"bm25" | "dense" | "hybrid" | "pool" | "run" | "run:FILE"`` -> (kind, file).

    ``pool``: each query's judged documents are its candidates (the protocol of sets that come as
    fixed candidate lists, such as NovelEval's 20 passages per question)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in FIRST_STAGES:
        raise ValueError(f"unknown first stage {spec!r}; use bm25, dense, hybrid, pool or run:FILE")
    if kind == "run":
        return kind, arg or None
    if arg:
        raise ValueError(f"first stage {kind!r} takes no argument (got {spec!r})")
    return kind, None


def default_relevance_level(dataset: Dataset) -> int:
    """TREC DL passage judgments are graded 0-3 and binary measures count 2+ as relevant (the official
    trec_eval ``-l 2`` setting); everything else counts 1+."""
    return 2 if dataset.path.name.lower().startswith("trec-dl") else 1


def load_embedder(model: Any, device: str = "cpu", dtype: str = "auto", **options: Any) -> Any:
    """An Embedder object as is, or ``tamis.Embedder(model, **options)`` for a name / path / None."""
    if model is not None and hasattr(model, "embed"):
        return model
    from tamis.embed import Embedder

    return Embedder(model, device=device, dtype=dtype, **options)


def load_reranker(reranker: Any, device: str = "cpu", dtype: str = "auto", **options: Any) -> Any:
    """A Reranker object as is; ``"default"`` -> ``tamis.Reranker()``; a name / path -> ``tamis.Reranker(it)``
    (``options`` such as ``compile=True`` passed on)."""
    if reranker is not None and hasattr(reranker, "rerank"):
        return reranker
    from tamis.rerank import Reranker

    name = None if reranker in (None, "default") else reranker
    return Reranker(name, device=device, dtype=dtype, **options)


def rerank_run(
    reranker: Any,
    queries: dict[str, str],
    documents: dict[str, str],
    run: Run,
    depth: int = 100,
    show_progress: bool = True,
    keep_rest: bool = False,
) -> tuple[Run, dict[str, Any]]:
    """Rerank each query's top ``depth`` candidates of ``run``. The reranked run holds only those, or with
    ``keep_rest`` those followed by the rest of the first-stage list in its order (so measures deeper than
    ``depth``, such as Recall@100 after ``depth=20``, still see the whole first-stage list)."""
    out: Run = {}
    pairs = 0
    tokens = 0
    truncated = 0
    missing = 0
    qids = [q for q in queries if q in run]
    for qid in tqdm(qids, desc="rerank", unit="query", disable=not show_progress):
        cands = [d for d, _ in sorted_docs(run[qid])[:depth]]
        known = [d for d in cands if d in documents]
        missing += len(cands) - len(known)
        if not known:
            out[qid] = {d: -float(i) for i, (d, _) in enumerate(sorted_docs(run[qid]))} if keep_rest else {}
            continue
        with quiet_truncation():  # truncation is expected on long passages; counted in info
            ranked = reranker.rerank(queries[qid], [documents[d] for d in known], top_n=None,
                                     return_documents=False)
        out[qid] = {known[r.index]: float(r.relevance_score) for r in ranked.results}
        if keep_rest:
            floor = min(out[qid].values()) - 1.0
            rest = [d for d, _ in sorted_docs(run[qid])[depth:]]
            out[qid].update({d: floor - i for i, d in enumerate(rest)})
        pairs += len(known)
        tokens += int(getattr(ranked, "total_tokens", 0) or 0)
        truncated += len(getattr(ranked, "truncated", []) or [])
    info: dict[str, Any] = {"pairs": pairs, "total_tokens": tokens, "truncated": truncated}
    if missing:
        info["candidates_missing_from_corpus"] = missing
    return out, info


def evaluate(
    data: str | os.PathLike[str] | Dataset,
    split: str = "test",
    first_stage: str = "bm25",
    model: Any = None,
    reranker: Any = None,
    depth: int = 100,
    queries_dir: str | os.PathLike[str] | None = None,
    top_k: int = 1000,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    relevance_level: int | None = None,
    lang: str | None = None,
    stopwords: str | None = "auto",
    k1: float = BM25_K1,
    b: float = BM25_B,
    with_title: bool = True,
    cache_dir: str | os.PathLike[str] | None | bool = None,
    ann: str = "auto",
    ignore_identical_ids: bool = False,
    rrf_k: int = 60,
    device: str = "cpu",
    dtype: str = "auto",
    show_progress: bool = True,
    compile: bool | str = "auto",
    max_queries: int | None = None,
    corpus_sample: int | None = None,
    seed: int = 0,
) -> EvalReport:
    """Run a first stage (and optionally a reranker over its top ``depth``) on a data set and score it.

    ``model``: embedder name / path / object for dense and hybrid (None: the default model).
    ``reranker``: None (no reranking), ``"default"``, a name / path, or a Reranker object.
    ``cache_dir``: where corpus embeddings are kept (None: ``$TAMIS_CACHE`` or ~/.cache/tamis; False: off).
    ``lang``: BM25 stemmer language (None: from the data directory name, else English).
    ``compile``: for models loaded here (True, False, ``"auto"``: see :class:`tamis.Embedder`).
    ``max_queries``: evaluate a seeded random sample of this many queries (a quick run). ``corpus_sample``: search
    only this many documents, every document judged for the kept queries plus a seeded random sample of the
    others (a quick dense run; scores are then higher than on the whole corpus, and the report says so).
    The reranked stage keeps the first stage's list below ``depth`` (Recall@100 after ``depth=20`` counts the
    whole first-stage list).
    """
    options: dict[str, Any] = {} if compile == "auto" else {"compile": compile}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dataset = data if isinstance(data, Dataset) else load_dataset(data, split, queries_dir)
    dataset = sample_dataset(dataset, max_queries, corpus_sample, seed)
    timings["load"] = time.perf_counter() - t0
    kind, run_file = parse_first_stage(first_stage)
    level = default_relevance_level(dataset) if relevance_level is None else int(relevance_level)
    bm25_lang = lang or dataset.lang or "english"
    texts = dataset.corpus.documents(with_title)
    ids = dataset.corpus.ids
    cache = None if cache_dir is False else EmbeddingCache(None if cache_dir in (None, True) else cache_dir)
    config: dict[str, Any] = {
        "data": str(dataset.path),
        "queries": str(dataset.queries_path) if dataset.queries_path else None,
        "split": dataset.split,
        "first_stage": first_stage,
        "top_k": top_k,
        "k_values": list(k_values),
        "relevance_level": level,
        "with_title": with_title,
    }
    if max_queries is not None or corpus_sample is not None:
        config["sample"] = {"max_queries": max_queries, "corpus_sample": corpus_sample, "seed": seed}
    stages: list[StageResult] = []
    embedder = None

    def score(run: Run) -> Metrics:
        if ignore_identical_ids:
            run = exclude_identical_ids(run)
        return compute_metrics(dataset.qrels, run, k_values, level)

    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    runs: dict[str, Run] = {}
    if kind in ("bm25", "hybrid"):
        index = BM25Index(texts, ids, lang=bm25_lang, stopwords=stopwords, k1=k1, b=b, show_progress=show_progress)
        runs["bm25"] = index.search(dataset.queries, k=top_k, show_progress=show_progress)
        config["bm25"] = index.params
    if kind in ("dense", "hybrid"):
        embedder = load_embedder(model, device, dtype, **options)
        hits0 = cache.hits if cache else 0
        runs["dense"] = dense_search(embedder, texts, ids, dataset.queries, k=top_k, cache=cache, ann=ann,
                                     show_progress=show_progress)
        config["model"] = getattr(embedder, "name", str(model))
        config["query_task"] = getattr(embedder, "query_task", None)
        config["passage_task"] = getattr(embedder, "passage_task", None)
        if cache is not None:
            info["embedding_cache"] = {"dir": str(cache.directory), "hits": cache.hits - hits0}
    if kind == "run":
        path = dataset.run_file(run_file)
        config["run_file"] = str(path)
        runs["run"] = load_run(path)
    if kind == "pool":  # judged documents in file order, scores falling so the order is kept
        runs["pool"] = {q: {d: -float(i) for i, d in enumerate(dataset.qrels[q])} for q in dataset.queries}
    if kind == "hybrid":
        first = rrf([runs["bm25"], runs["dense"]], k=rrf_k, depth=top_k)
        config["rrf_k"] = rrf_k
    else:
        first = runs[kind]
    timings["first_stage"] = time.perf_counter() - t0
    if kind == "hybrid":  # report the parts beside the fusion
        for part in ("bm25", "dense"):
            stages.append(StageResult(part, score(runs[part]), 0.0, runs[part]))
    stage_name = f"run:{Path(config['run_file']).name}" if kind == "run" else kind
    stages.append(StageResult(stage_name, score(first), timings["first_stage"], first, info))

    if reranker is not None:
        t0 = time.perf_counter()
        rr = load_reranker(reranker, device, dtype, **options)
        timings["reranker_load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        doc_text = dict(zip(ids, texts))
        reranked, rinfo = rerank_run(rr, dataset.queries, doc_text, first, depth, show_progress, keep_rest=True)
        secs = time.perf_counter() - t0
        timings["rerank"] = secs
        rinfo["pairs_per_second"] = rinfo["pairs"] / secs if secs > 0 else 0.0
        config["reranker"] = getattr(rr, "name", str(reranker))
        config["reranker_kind"] = getattr(rr, "kind", None)
        config["depth"] = depth
        stages.append(StageResult(f"{stage_name} + rerank@{depth}", score(reranked), secs, reranked, rinfo))

    return EvalReport(
        dataset=dataset.name,
        split=dataset.split,
        sizes=dataset.sizes(),
        config=config,
        stages=stages,
        timings=timings,
    )
