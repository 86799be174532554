"""Teacher scores: score (query, candidates) lists once with any scorer, cache them, combine scorers.

A scorer maps lists ``[(query id, [doc id, ...]), ...]`` of a :class:`~tamis.train.data.RerankData` to
one score array per list:

- :class:`RerankerScorer`: any ``tamis.Reranker`` (cross-encoders give raw logits);
- :class:`DenseScorer`: cosine of any ``tamis.Embedder`` (each distinct text embedded once, cached);
- :class:`BM25Scorer`: lexical BM25 against the data set's own corpus statistics;
- :class:`SpladeScorer`: a SPLADE sparse encoder (masked-LM logits, ``log(1 + relu)`` max-pooled);
- :class:`ScoresFileScorer`: scores computed elsewhere (another machine, another tool), read from JSONL;
- :class:`EnsembleScorer`: a weighted sum of per-list standardised scores of several scorers, with
  given weights or weights learned on labelled lists (:meth:`EnsembleScorer.fit`).

:func:`score_cached` scores only what a JSONL cache file does not hold yet, so a teacher runs once per
(query, document) pair however many trainings read its scores.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tamis.rerank.ensemble import standardize
from tamis.train.data import RerankData

Lists = Sequence[tuple[str, Sequence[str]]]


class ListScorer(ABC):
    """A scorer: one score array per list; :meth:`cached` scores through a cache directory."""

    name: str

    @abstractmethod
    def score(self, data: RerankData, lists: Lists) -> list[np.ndarray]: ...

    def cached(self, data: RerankData, lists: Lists, cache_dir: str | os.PathLike[str]) -> list[np.ndarray]:
        """:meth:`score` through :func:`score_cached`: each (query, document) pair scored once per cache."""
        return score_cached(self, data, lists, cache_dir)


class RerankerScorer(ListScorer):
    """Scores with a ``tamis.Reranker``: raw logits for cross-encoders, relevance scores otherwise."""

    def __init__(self, reranker: Any, name: str | None = None, show_progress: bool = True):
        self.reranker = reranker
        self.name = name or f"reranker:{getattr(reranker, 'name', type(reranker).__name__)}"
        self.show_progress = show_progress

    def score(self, data: RerankData, lists: Lists) -> list[np.ndarray]:
        out = []
        for qid, docs in tqdm(lists, desc=self.name, unit="list", disable=not self.show_progress):
            texts = [data.corpus[d] for d in docs]
            if hasattr(self.reranker, "logits"):
                logits, _, _ = self.reranker.logits(data.queries[qid], texts)
                out.append(np.asarray(logits, dtype=np.float32))
                continue
            res = self.reranker.rerank(data.queries[qid], texts, return_documents=False)
            scores = np.empty(len(texts), dtype=np.float32)
            for r in res:
                scores[r.index] = r.relevance_score
            out.append(scores)
        return out


class DenseScorer(ListScorer):
    """Cosine similarity of an embedding model's query and document vectors."""

    def __init__(self, embedder: Any, cache: Any = None, show_progress: bool = True, whole_corpus: bool = True,
                 name: str | None = None):
        self.embedder = embedder
        self.cache = cache
        self.name = name or f"dense:{getattr(embedder, 'name', 'model')}"  # names the score cache file
        self.show_progress = show_progress
        # True: embed the whole corpus in file order, the same cache entry as dense mining with this model;
        # False: only the listed documents (a slow model that mining does not use)
        self.whole_corpus = whole_corpus

    def score(self, data: RerankData, lists: Lists) -> list[np.ndarray]:
        from tamis.evaluate.first_stage import encode

        qids = sorted({q for q, _ in lists})
        dids = list(data.corpus) if self.whole_corpus else sorted({d for _, docs in lists for d in docs})
        qv = encode(self.embedder, [data.queries[q] for q in qids], getattr(self.embedder, "query_task", None),
                    self.cache, self.show_progress, "queries")
        dv = encode(self.embedder, [data.corpus[d] for d in dids], getattr(self.embedder, "passage_task", None),
                    self.cache, self.show_progress, "documents")
        qi = {q: i for i, q in enumerate(qids)}
        di = {d: i for i, d in enumerate(dids)}
        return [dv[[di[d] for d in docs]] @ qv[qi[q]] for q, docs in lists]


class BM25Scorer(ListScorer):
    """BM25 (Lucene variant, the project's first stage) with the statistics of the data set's corpus."""

    name = "bm25"

    def __init__(self, show_progress: bool = True):
        self.show_progress = show_progress
        self._index: tuple[str, Any, dict[str, int]] | None = None

    def _index_for(self, data: RerankData) -> tuple[Any, dict[str, int]]:
        from tamis.evaluate.first_stage import BM25Index

        if self._index is None or self._index[0] != data.name:
            ids = list(data.corpus)
            index = BM25Index([data.corpus[d] for d in ids], ids, show_progress=self.show_progress)
            self._index = (data.name, index, {d: i for i, d in enumerate(ids)})
        return self._index[1], self._index[2]

    def score(self, data: RerankData, lists: Lists) -> list[np.ndarray]:
        index, pos = self._index_for(data)
        out = []
        for qid, docs in tqdm(lists, desc="bm25", unit="list", disable=not self.show_progress):
            all_scores = index.scores(data.queries[qid])
            out.append(all_scores[[pos[d] for d in docs]])
        return out


class SpladeScorer(ListScorer):
    """SPLADE: ``w_t = max_i log(1 + relu(logit_{i,t}))`` over the tokens of a text, score = ``q · d``.

    ``model_dir`` holds a BERT masked-LM checkpoint trained as a SPLADE encoder (e.g. SPLADE-tiny); the
    encoder is :class:`tamis.rerank.sparse.SpladeReranker`'s. Each distinct text is encoded once.
    """

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "cpu", max_length: int = 256,
                 max_tokens_per_batch: int = 8192, show_progress: bool = True):
        from tamis.rerank.sparse import SpladeReranker

        self.encoder = SpladeReranker(model_dir, device=device, max_length=max_length,
                                      max_tokens_per_batch=max_tokens_per_batch)
        self.model_dir = self.encoder.model_dir
        self.name = f"splade:{self.model_dir.name}"
        self.show_progress = show_progress

    def encode(self, texts: Sequence[str], desc: str = "splade") -> list[tuple[np.ndarray, np.ndarray]]:
        """Sparse vectors as ``(term ids, weights)`` per text."""
        return self.encoder.encode(texts, show_progress=self.show_progress, desc=desc)

    def score(self, data: RerankData, lists: Lists) -> list[np.ndarray]:
        from tamis.rerank.sparse import sparse_dot

        qids = sorted({q for q, _ in lists})
        dids = sorted({d for _, docs in lists for d in docs})
        qv = dict(zip(qids, self.encode([data.queries[q] for q in qids], "splade queries")))
        dv = dict(zip(dids, self.encode([data.corpus[d] for d in dids], "splade documents")))
        out = []
        for q, docs in lists:
            out.append(np.array([sparse_dot(qv[q], dv[d]) for d in docs], dtype=np.float32))
        return out


class ScoresFileScorer(ListScorer):
    """Teacher scores computed elsewhere — on a GPU machine, by another tool or a model tamis cannot run —
    read from JSONL in the cache's own format: one line per query, ``{"qid": ..., "scores": {doc id: score}}``
    (later lines add to or override earlier ones). Ids are those of the training lists (for merged sets,
    ``"<set name>/<id>"``). A pair the file lacks is an error, never a silent zero."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"teacher scores file {self.path} not found")
        import hashlib

        # the content's hash in the name: scores cached under it are never reused for an edited file
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        self.name = f"scores:{self.path.stem}-{digest}"
        self.table = read_scores(self.path)

    def score(self, data: RerankData, lists: Lists) -> list[np.ndarray]:
        out = []
        for qid, docs in lists:
            known = self.table.get(qid, {})
            missing = [d for d in docs if d not in known]
            if missing:
                raise ValueError(f"{self.path} has no score for query {qid!r} and document {missing[0]!r}"
                                 + (f" (and {len(missing) - 1} more of its list)" if len(missing) > 1 else ""))
            out.append(np.array([known[d] for d in docs], dtype=np.float32))
        return out


class EnsembleScorer(ListScorer):
    """Weighted sum of standardised scores of several scorers: ``Σ_m w_m · z_m``, then ``· scale``.

    ``scale`` sets the spread of the combined scores (z-scores have unit spread per list), which
    matters to softmax-based distillation; :meth:`fit` learns both the weights and the scale.
    """

    def __init__(self, scorers: Sequence[Any], weights: Sequence[float] | None = None, scale: float = 1.0):
        self.scorers = list(scorers)
        if weights is not None and len(weights) != len(self.scorers):
            raise ValueError("one weight per scorer")
        self.weights = list(weights) if weights is not None else [1.0 / len(self.scorers)] * len(self.scorers)
        self.scale = scale

    @property
    def name(self) -> str:
        parts = [f"{w:.3g}*{s.name}" for s, w in zip(self.scorers, self.weights)]
        return f"ensemble({' + '.join(parts)})x{self.scale:.3g}"

    def components(self, data: RerankData, lists: Lists, cache_dir: str | os.PathLike[str] | None = None
                   ) -> list[list[np.ndarray]]:
        """Each scorer's standardised scores per list (from the cache when ``cache_dir`` is given)."""
        per = []
        for s in self.scorers:
            raw = score_cached(s, data, lists, cache_dir) if cache_dir is not None else s.score(data, lists)
            per.append([standardize(x) for x in raw])
        return per

    def combine(self, components: list[list[np.ndarray]]) -> list[np.ndarray]:
        n = len(components[0])
        return [self.scale * sum(w * comp[i] for w, comp in zip(self.weights, components)) for i in range(n)]

    def score(self, data: RerankData, lists: Lists) -> list[np.ndarray]:
        return self.combine(self.components(data, lists))

    def cached(self, data: RerankData, lists: Lists, cache_dir: str | os.PathLike[str]) -> list[np.ndarray]:
        """Each member's scores through the cache (the combination is cheap and follows the current weights)."""
        return self.combine(self.components(data, lists, cache_dir))

    def fit(self, components: list[list[np.ndarray]], labels: list[np.ndarray], l2: float = 1e-3,
            steps: int = 300) -> EnsembleScorer:
        """Learn weights (and scale) that maximise the listwise likelihood of the relevant documents:
        minimise ``-log Σ_{rel} softmax(Σ_m v_m z_m)`` over labelled lists (L-BFGS, L2 penalty), then
        ``scale = ‖v‖₁`` and ``weights = v / ‖v‖₁``. Lists without a relevant document are ignored."""
        keep = [i for i, y in enumerate(labels) if np.any(y > 0)]
        if not keep:
            raise ValueError("no list has a relevant document: cannot learn ensemble weights")
        width = max(len(labels[i]) for i in keep)
        m = len(components)
        z = torch.zeros(len(keep), width, m)
        pos = torch.zeros(len(keep), width, dtype=torch.bool)
        valid = torch.zeros(len(keep), width, dtype=torch.bool)
        for r, i in enumerate(keep):
            k = len(labels[i])
            for c in range(m):
                z[r, :k, c] = torch.from_numpy(np.asarray(components[c][i], dtype=np.float32))
            pos[r, :k] = torch.from_numpy(np.asarray(labels[i]) > 0)
            valid[r, :k] = True
        v = torch.full((m,), 1.0 / m, requires_grad=True)
        opt = torch.optim.LBFGS([v], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = (z @ v).masked_fill(~valid, -1e9)
            loss = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, -1e9), 1)).mean()
            loss = loss + l2 * (v**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        raw = v.detach()
        total = float(raw.abs().sum()) or 1.0
        self.weights = [float(x) / total for x in raw]
        self.scale = total
        return self


def _cache_file(cache_dir: str | os.PathLike[str], scorer: Any, data: RerankData) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{data.name}--{scorer.name}")
    if len(slug) > 150:
        import hashlib

        slug = slug[:100] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{slug}.jsonl"


def read_scores(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """``{qid: {doc id: score}}`` from JSONL lines ``{"qid": ..., "scores": {doc id: score}}`` (the cache's
    format; later lines add to or override earlier ones). A malformed line is a one-line ``ValueError``."""
    table: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                table.setdefault(str(row["qid"]), {}).update({str(d): float(x) for d, x in row["scores"].items()})
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path} line {n}: expected {{\"qid\": ..., \"scores\": {{doc id: score}}}}") from None
    return table


def score_cached(scorer: Any, data: RerankData, lists: Lists, cache_dir: str | os.PathLike[str]
                 ) -> list[np.ndarray]:
    """``scorer.score`` with a JSONL cache (one line per query: ``{"qid", "scores": {doc id: score}}``):
    only (query, document) pairs missing from the cache are scored, and they are appended to it."""
    path = _cache_file(cache_dir, scorer, data)
    known = read_scores(path) if path.is_file() else {}
    todo = []
    for qid, docs in lists:
        missing = [d for d in docs if d not in known.get(qid, {})]
        if missing:
            todo.append((qid, missing))
    if todo:
        fresh = scorer.score(data, todo)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for (qid, docs), scores in zip(todo, fresh):
                row = {d: float(s) for d, s in zip(docs, scores)}
                known.setdefault(qid, {}).update(row)
                f.write(json.dumps({"qid": qid, "scores": row}) + "\n")
    return [np.array([known[qid][d] for d in docs], dtype=np.float32) for qid, docs in lists]


SCORER_KINDS = ("bm25", "dense", "splade", "scores")


def is_scorer_spec(spec: str) -> bool:
    """Whether ``spec`` names a scorer (BM25, dense, SPLADE, a scores file, an ensemble) rather than a model."""
    spec = spec.strip()
    return spec.startswith("ensemble:") or spec.partition("=")[0] in SCORER_KINDS


def build_scorer(spec: str, device: str = "cpu", cache: Any = None, show_progress: bool = True) -> Any:
    """A scorer from a command-line spec.

    - ``PATH`` or model name: a ``tamis.Reranker`` (cross-encoder logits; embedding models: cosine);
    - ``bm25``; ``dense`` (bundled MiniLM) or ``dense=MODEL``; ``splade=DIR``; ``reranker=MODEL``;
    - ``scores=FILE``: scores computed elsewhere (:class:`ScoresFileScorer`);
    - ``ensemble:A,B,...`` of the above (weights learned on the training lists unless given).
    """
    spec = spec.strip()
    if spec.startswith("ensemble:"):
        parts = [p for p in spec[len("ensemble:"):].split(",") if p.strip()]
        if len(parts) < 2:
            raise ValueError("an ensemble needs at least two scorers, e.g. ensemble:bm25,dense")
        return EnsembleScorer([build_scorer(p, device, cache, show_progress) for p in parts])
    kind, _, arg = spec.partition("=")
    if kind == "bm25" and not arg:
        return BM25Scorer(show_progress)
    if kind == "dense":
        from tamis.embed import Embedder

        return DenseScorer(Embedder(arg or None, device=device, dtype="float32"), cache, show_progress)
    if kind == "scores":
        if not arg:
            raise ValueError("scores needs a file: scores=FILE.jsonl")
        return ScoresFileScorer(arg)
    if kind == "splade":
        if not arg:
            raise ValueError("splade needs a model directory: splade=DIR")
        return SpladeScorer(arg, device=device, show_progress=show_progress)
    from tamis.rerank import Reranker

    return RerankerScorer(Reranker(arg if kind == "reranker" else spec, device=device, dtype="float32"), show_progress=show_progress)
