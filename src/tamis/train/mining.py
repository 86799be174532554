"""Hard-negative mining with the project's own first stages (BM25 via bm25s, dense with any Embedder).

For each training query, the first stages rank the data set's documents; known positives are removed,
the top ``skip_top`` remaining ranks of every first stage are skipped (the highest-ranked "negatives" are
often relevant documents nobody labelled), and negatives are taken from the next ranks down to
``depth``: the hardest first (``strategy="top"``) or drawn at random from that window
(``strategy="random"``, seeded). Negatives of several first stages are interleaved rank by rank, so a
list mixes lexical and semantic confusers. Judged non-relevant documents (label 0) come first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tamis.evaluate.datasets import Run, sorted_docs
from tamis.evaluate.first_stage import BM25Index, EmbeddingCache, dense_search, rrf
from tamis.train.data import RerankData, TrainList, negatives_per_group

METHODS = ("bm25", "dense")


def first_stage_runs(
    data: RerankData,
    qids: Sequence[str],
    methods: Sequence[str] = METHODS,
    depth: int = 50,
    embedder: Any = None,
    cache: EmbeddingCache | None = None,
    show_progress: bool = True,
) -> dict[str, Run]:
    """Top ``depth`` documents of ``data.corpus`` for each query, per first stage."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown first stage {bad or methods}; use {', '.join(METHODS)}")
    ids = list(data.corpus)
    texts = [data.corpus[d] for d in ids]
    queries = {q: data.queries[q] for q in qids}
    runs: dict[str, Run] = {}
    if "bm25" in methods:
        index = BM25Index(texts, ids, show_progress=show_progress)
        runs["bm25"] = index.search(queries, k=depth, show_progress=show_progress)
    if "dense" in methods:
        if embedder is None:
            from tamis.embed import Embedder

            embedder = Embedder(dtype="float32")  # mined lists must not depend on the CPU
        runs["dense"] = dense_search(embedder, texts, ids, queries, k=depth, cache=cache, show_progress=show_progress)
    return runs


def mine_lists(
    data: RerankData,
    qids: Sequence[str],
    runs: dict[str, Run],
    n_negatives: int = 15,
    skip_top: int = 3,
    depth: int = 50,
    strategy: str = "top",
    seed: int = 0,
    label_free: bool = False,
) -> list[TrainList]:
    """Training lists for ``qids``: positives from the labels, negatives mined from ``runs``. Queries
    without a relevant document are left out, unless ``label_free``: then they get a list of candidates
    only (labelled non-relevant ones, then mined ones; ``skip_top`` still applies), for teacher losses."""
    if strategy not in ("top", "random"):
        raise ValueError("strategy must be 'top' or 'random'")
    rng = random.Random(seed)
    lists = []
    for qid in qids:
        positives = data.positives(qid)
        if not positives and not label_free:
            continue
        known = set(data.qrels.get(qid, {}))
        labelled = data.labelled_negatives(qid)
        per_method = []
        for name in sorted(runs):
            ranked = [d for d, _ in sorted_docs(runs[name].get(qid, {}))[:depth] if d not in known]
            window = ranked[skip_top:]
            if strategy == "random":
                window = rng.sample(window, len(window))
            per_method.append(window)
        mined: list[str] = []
        seen = set(labelled)
        for rank in range(max((len(w) for w in per_method), default=0)):
            for window in per_method:
                if rank < len(window) and window[rank] not in seen:
                    seen.add(window[rank])
                    mined.append(window[rank])
        keep = negatives_per_group(bool(positives), n_negatives)
        lists.append(TrainList(qid, positives, labelled + mined[:keep], labelled=len(labelled)))
    return lists


def candidate_run(runs: dict[str, Run], depth: int = 30) -> Run:
    """One candidate list per query from several first stages (reciprocal rank fusion, top ``depth``):
    what a reranker sees at evaluation time."""
    if len(runs) == 1:
        run = next(iter(runs.values()))
        return {q: dict(sorted_docs(docs)[:depth]) for q, docs in run.items()}
    return rrf(list(runs.values()), depth=depth)
