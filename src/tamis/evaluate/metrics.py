"""IR metrics through ``pytrec_eval`` (trec_eval's C code, the library BEIR uses).

- ``nDCG@k``: ``ndcg_cut.k`` with graded gains (gain = relevance label, log2 discount), as trec_eval.
- ``MRR@k``: ``recip_rank`` on the run cut at k (trec_eval order: score descending, ties by id descending).
- ``Recall@k``: ``recall.k``; ``Hit@k``: ``success.k`` (at least one relevant document in the top k).
- ``MAP``: ``map`` over the whole run.

Binary measures (MRR, Recall, Hit, MAP) count a document as relevant when its label is at least
``relevance_level`` (1 by default; TREC DL passage conventionally uses 2). nDCG always uses the graded
labels. Means are taken over every query with judgments: a query the run has no results for scores 0
(``trec_eval -c``), so a system cannot gain by returning nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytrec_eval

from tamis.evaluate.datasets import Qrels, Run, sorted_docs

DEFAULT_K_VALUES: tuple[int, ...] = (1, 3, 5, 10, 100)
# the columns printed by default (the JSON report keeps every metric)
HEADLINE = ("nDCG@10", "MRR@10", "Recall@100", "MAP", "Hit@10")


@dataclass
class Metrics:
    """Mean metrics over ``n_queries`` queries, plus per-query values."""

    mean: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    n_queries: int = 0

    def __getitem__(self, name: str) -> float:
        return self.mean[name]

    def headline(self, names: Iterable[str] = HEADLINE) -> dict[str, float]:
        return {n: self.mean[n] for n in names if n in self.mean}


def cut_run(run: Run, k: int) -> Run:
    """Keep each query's top k documents (trec_eval order)."""
    return {qid: dict(sorted_docs(docs)[:k]) for qid, docs in run.items()}


def _as_pytrec(qrels: Qrels, run: Run) -> tuple[dict, dict]:
    q = {str(qid): {str(d): int(r) for d, r in rels.items()} for qid, rels in qrels.items()}
    r = {str(qid): {str(d): float(s) for d, s in docs.items()} for qid, docs in run.items() if qid in q}
    return q, r


def compute_metrics(
    qrels: Qrels,
    run: Run,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    relevance_level: int = 1,
) -> Metrics:
    """nDCG@k, MRR@k, Recall@k, Hit@k for each k, and MAP, averaged over the queries of ``qrels``."""
    if not qrels:
        raise ValueError("no judged queries: qrels is empty")
    ks = sorted({int(k) for k in k_values})
    if not ks or ks[0] <= 0:
        raise ValueError(f"k values must be positive, got {list(k_values)}")
    kstr = ",".join(str(k) for k in ks)
    q, r = _as_pytrec(qrels, run)
    per_query: dict[str, dict[str, float]] = {qid: {} for qid in q}

    graded = pytrec_eval.RelevanceEvaluator(q, {f"ndcg_cut.{kstr}"})
    for qid, vals in graded.evaluate(r).items():
        for k in ks:
            per_query[qid][f"nDCG@{k}"] = vals[f"ndcg_cut_{k}"]

    binary = pytrec_eval.RelevanceEvaluator(
        q, {f"recall.{kstr}", f"success.{kstr}", "map"}, relevance_level=int(relevance_level)
    )
    for qid, vals in binary.evaluate(r).items():
        for k in ks:
            per_query[qid][f"Recall@{k}"] = vals[f"recall_{k}"]
            per_query[qid][f"Hit@{k}"] = vals[f"success_{k}"]
        per_query[qid]["MAP"] = vals["map"]

    rr = pytrec_eval.RelevanceEvaluator(q, {"recip_rank"}, relevance_level=int(relevance_level))
    for k in ks:
        for qid, vals in rr.evaluate(cut_run(r, k)).items():
            per_query[qid][f"MRR@{k}"] = vals["recip_rank"]

    names = [f"{m}@{k}" for m in ("nDCG", "MRR", "Recall", "Hit") for k in ks] + ["MAP"]
    for qid in per_query:  # queries with no results in the run score zero
        for n in names:
            per_query[qid].setdefault(n, 0.0)
    mean = {n: sum(v[n] for v in per_query.values()) / len(per_query) for n in names}
    return Metrics(mean=mean, per_query=per_query, n_queries=len(per_query))
