"""The evaluation pipeline: data set -> first stage -> optional reranking -> metrics -> report."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tamis.evaluate.datasets import Dataset, Run, load_dataset, load_run, sorted_docs
from tamis.evaluate.first_stage import (
    BM25_B,
    BM25_K1,
    BM25Index,
    EmbeddingCache,
    dense_search,
    exclude_identical_ids,
    fuse,
    quiet_truncation,
    sparse_search,
)
from tamis.evaluate.metrics import DEFAULT_K_VALUES, Metrics, compute_metrics

FIRST_STAGES = ("bm25", "dense", "sparse", "hybrid", "run", "pool")
RETRIEVERS = ("bm25", "dense", "sparse")  # the parts a hybrid fuses ("splade" names "sparse")


@dataclass
class HybridSpec:
    """What ``hybrid[:FUSION][:PART[=WEIGHT]+...]`` asks for: retrievers, their weights and the fusion."""

    parts: list[str]
    weights: list[float]
    fusion: str = "rrf"

    @property
    def label(self) -> str:
        ws = "" if all(w == 1.0 for w in self.weights) else "=" + ",".join(f"{w:g}" for w in self.weights)
        return f"hybrid:{self.fusion}:{'+'.join(self.parts)}{ws}"


def parse_hybrid(arg: str | None) -> HybridSpec:
    """``None`` / ``""`` -> BM25 + dense by RRF (the plain ``hybrid``); ``"zscore:bm25+dense=0.5+sparse"``: the
    fusion (``rrf`` or ``zscore``, default ``rrf``) then ``+``-joined parts from bm25 / dense / sparse (``splade``),
    each with an optional ``=weight`` (default 1)."""
    from tamis.evaluate.first_stage import FUSIONS

    if not arg:
        return HybridSpec(["bm25", "dense"], [1.0, 1.0])
    fusion, _, rest = arg.partition(":")
    if fusion.strip().lower() not in FUSIONS:
        fusion, rest = "rrf", arg
    fusion = fusion.strip().lower()
    if not rest.strip():
        return HybridSpec(["bm25", "dense"], [1.0, 1.0], fusion)
    parts, weights = [], []
    for item in rest.split("+"):
        name, eq, w = item.partition("=")
        name = name.strip().lower()
        name = "sparse" if name == "splade" else name
        if name not in RETRIEVERS:
            raise ValueError(f"unknown hybrid part {item.strip()!r} in {arg!r}; parts: bm25, dense, sparse (splade)")
        if name in parts:
            raise ValueError(f"hybrid part {name!r} given twice in {arg!r}")
        try:
            weight = float(w) if eq else 1.0
        except ValueError:
            raise ValueError(f"hybrid weight {w!r} of {name!r} is not a number") from None
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"hybrid weight of {name!r} must be a finite number >= 0, got {w!r}")
        parts.append(name)
        weights.append(weight)
    if len(parts) < 2:
        raise ValueError(f"a hybrid fuses at least two retrievers, got {arg!r}")
    return HybridSpec(parts, weights, fusion)


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
    """``"bm25" | "dense" | "sparse" | "hybrid[:...]" | "pool" | "run" | "run:FILE"`` -> (kind, argument).

    ``sparse`` (also ``splade``): a SPLADE model's sparse vectors (``sparse_model``). ``hybrid``: BM25 + dense by
    reciprocal rank fusion, or ``hybrid:[rrf|zscore:]PART[=W]+PART[=W]...`` (see :func:`parse_hybrid`).
    ``pool``: each query's judged documents are its candidates (the protocol of sets that come as
    fixed candidate lists, such as NovelEval's 20 passages per question)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    kind = "sparse" if kind == "splade" else kind
    if kind not in FIRST_STAGES:
        raise ValueError(f"unknown first stage {spec!r}; use bm25, dense, sparse, hybrid[:...], pool or run:FILE")
    if kind == "run":
        return kind, arg or None
    if kind == "hybrid":
        parse_hybrid(arg)  # fail early on a bad spec
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


def load_sparse_embedder(model: Any, device: str = "cpu") -> Any:
    """A SparseEmbedder object as is, or ``tamis.SparseEmbedder(model)`` for a name / path."""
    if model is not None and hasattr(model, "embed") and hasattr(model, "decode"):
        return model
    if model is None:
        raise ValueError("a sparse first stage needs a SPLADE model: pass sparse_model= (tamis eval --sparse-model)")
    from tamis.embed_sparse import SparseEmbedder

    return SparseEmbedder(model, device=device)


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
    sparse_model: Any = None,
) -> EvalReport:
    """Run a first stage (and optionally a reranker over its top ``depth``) on a data set and score it.

    ``model``: embedder name / path / object for dense and hybrid (None: the default model).
    ``reranker``: None (no reranking), ``"default"``, a name / path, or a Reranker object.
    ``cache_dir``: where corpus embeddings are kept (None: ``$TAMIS_CACHE`` or ~/.cache/tamis; False: off).
    ``lang``: BM25 stemmer language (None: from the data directory name, else English).
    ``compile``: for models loaded here (True, False, ``"auto"``: see :class:`tamis.Embedder`).
    ``sparse_model``: SPLADE model name / path / SparseEmbedder for ``sparse`` and hybrids with a sparse part.
    ``first_stage="hybrid:zscore:bm25+dense+sparse"``: the parts are reported beside their fusion.
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
    hybrid = parse_hybrid(run_file) if kind == "hybrid" else None
    wanted = set(hybrid.parts) if hybrid else {kind}
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
    if "bm25" in wanted:
        index = BM25Index(texts, ids, lang=bm25_lang, stopwords=stopwords, k1=k1, b=b, show_progress=show_progress)
        runs["bm25"] = index.search(dataset.queries, k=top_k, show_progress=show_progress)
        config["bm25"] = index.params
    if "dense" in wanted:
        embedder = load_embedder(model, device, dtype, **options)
        hits0 = cache.hits if cache else 0
        runs["dense"] = dense_search(embedder, texts, ids, dataset.queries, k=top_k, cache=cache, ann=ann,
                                     show_progress=show_progress)
        config["model"] = getattr(embedder, "name", str(model))
        config["query_task"] = getattr(embedder, "query_task", None)
        config["passage_task"] = getattr(embedder, "passage_task", None)
        if cache is not None:
            info["embedding_cache"] = {"dir": str(cache.directory), "hits": cache.hits - hits0}
    if "sparse" in wanted:
        sparse = load_sparse_embedder(sparse_model, device)
        hits0 = cache.hits if cache else 0
        t_sparse = time.perf_counter()
        runs["sparse"] = sparse_search(sparse, texts, ids, dataset.queries, k=top_k, cache=cache,
                                       show_progress=show_progress)
        timings["sparse"] = time.perf_counter() - t_sparse
        config["sparse_model"] = getattr(sparse, "name", str(sparse_model))
        if cache is not None:
            info["sparse_cache"] = {"dir": str(cache.directory), "hits": cache.hits - hits0}
    if kind == "run":
        path = dataset.run_file(run_file)
        config["run_file"] = str(path)
        runs["run"] = load_run(path)
    if kind == "pool":  # judged documents in file order, scores falling so the order is kept
        runs["pool"] = {q: {d: -float(i) for i, d in enumerate(dataset.qrels[q])} for q in dataset.queries}
    if hybrid is not None:
        first = fuse([runs[p] for p in hybrid.parts], hybrid.fusion, hybrid.weights, depth=top_k, rrf_k=rrf_k)
        config["fusion"] = {"method": hybrid.fusion, "parts": hybrid.parts, "weights": hybrid.weights,
                            **({"rrf_k": rrf_k} if hybrid.fusion == "rrf" else {})}
        if hybrid.fusion == "rrf":
            config["rrf_k"] = rrf_k
    else:
        first = runs[kind]
    timings["first_stage"] = time.perf_counter() - t0
    if hybrid is not None:  # report the parts beside the fusion
        for part in hybrid.parts:
            stages.append(StageResult(part, score(runs[part]), 0.0, runs[part]))
    stage_name = f"run:{Path(config['run_file']).name}" if kind == "run" else kind
    if hybrid is not None and run_file:
        stage_name = hybrid.label
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
