"""First-stage retrieval: BM25 (bm25s), dense (any Embedder, exact or ANN), learned-sparse (a SPLADE
:class:`~tamis.embed_sparse.SparseEmbedder`, exact sparse dot products), hybrid (reciprocal rank fusion or weighted
z-scores of any of them).

Every searcher returns a :data:`~tamis.evaluate.datasets.Run`: ``{query_id: {doc_id: score}}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from tamis.evaluate.datasets import Run, sorted_docs

# above this many vectors dense search switches to an ANN index (faiss HNSW) unless told otherwise
ANN_THRESHOLD = 1_000_000
# BM25 parameters: Lucene BM25 with k1=1.2, b=0.75 (BEIR's Elasticsearch setting). On SciFact test with
# title + " " + text, English stop words and the Snowball English stemmer this gives nDCG@10 0.6791
# (Pyserini flat: 0.6789); bm25s's own defaults (k1=1.5) give 0.6863.
BM25_K1 = 1.2
BM25_B = 0.75


# ---------------------------------------------------------------------------------------------- BM25


def _stemmer(lang: str | None):
    if lang is None or lang in ("none", ""):
        return None
    import Stemmer

    if lang not in Stemmer.algorithms():
        return None
    return Stemmer.Stemmer(lang)


def _stopwords(stopwords: str | Sequence[str] | None, lang: str | None) -> str | list[str] | None:
    """``"auto"``: English stop words for English, none for other languages (their stop lists are left
    to the caller); ``"none"``: none; a bm25s language name / code or an explicit list otherwise."""
    if stopwords is None or stopwords == "none":
        return None
    if stopwords == "auto":
        return "en" if (lang or "english") == "english" else None
    if isinstance(stopwords, str):
        return stopwords
    return list(stopwords)


class BM25Index:
    """A bm25s index over a list of texts: lowercase word tokens, stop words removed, PyStemmer stems.

    ``lang`` picks the stemmer (a PyStemmer algorithm such as ``"english"`` or ``"german"``; languages
    PyStemmer lacks get no stemming).
    """

    def __init__(
        self,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        lang: str | None = "english",
        stopwords: str | Sequence[str] | None = "auto",
        k1: float = BM25_K1,
        b: float = BM25_B,
        method: str = "lucene",
        show_progress: bool = True,
    ):
        import bm25s

        # bm25s sets its own logger to DEBUG, which floods any application that configured logging
        bm25s_logger = logging.getLogger("bm25s")
        if bm25s_logger.level == logging.DEBUG:
            bm25s_logger.setLevel(logging.WARNING)
        self._bm25s = bm25s
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(texts))]
        if len(self.ids) != len(texts):
            raise ValueError("ids and texts differ in length")
        self.lang = lang or "english"
        self.stemmer = _stemmer(self.lang)
        self.stopwords = _stopwords(stopwords, self.lang)
        self.params = {"k1": k1, "b": b, "method": method, "lang": self.lang, "stopwords": self.stopwords,
                       "stemmer": self.lang if self.stemmer is not None else None}
        tokens = bm25s.tokenize(list(texts), stopwords=self.stopwords, stemmer=self.stemmer,
                                show_progress=show_progress)
        self.retriever = bm25s.BM25(k1=k1, b=b, method=method)
        self.retriever.index(tokens, show_progress=show_progress)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every indexed document for one query (zeros when no query term survives)."""
        tokens = self._bm25s.tokenize([query], stopwords=self.stopwords, stemmer=self.stemmer,
                                      return_ids=False, show_progress=False)[0]
        known = [t for t in tokens if t in self.retriever.vocab_dict]
        if not known:
            return np.zeros(len(self.ids), dtype=np.float32)
        return np.asarray(self.retriever.get_scores(known), dtype=np.float32)

    def search(self, queries: Mapping[str, str], k: int = 1000, show_progress: bool = True) -> Run:
        if not queries:
            return {}
        qids = list(queries)
        k = max(1, min(int(k), len(self.ids)))
        tokens = self._bm25s.tokenize([queries[q] for q in qids], stopwords=self.stopwords,
                                      stemmer=self.stemmer, show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=show_progress, n_threads=0)
        run: Run = {}
        for row, qid in enumerate(qids):
            # bm25s returns every requested slot; zero-score slots are documents sharing no term
            run[qid] = {self.ids[int(d)]: float(s) for d, s in zip(docs[row], scores[row]) if s > 0}
        return run


def bm25_search(
    texts: Sequence[str],
    ids: Sequence[str],
    queries: Mapping[str, str],
    k: int = 1000,
    lang: str | None = "english",
    stopwords: str | Sequence[str] | None = "auto",
    k1: float = BM25_K1,
    b: float = BM25_B,
    show_progress: bool = True,
) -> Run:
    """Index ``texts`` with BM25 and return the top ``k`` documents for each query."""
    index = BM25Index(texts, ids, lang=lang, stopwords=stopwords, k1=k1, b=b, show_progress=show_progress)
    return index.search(queries, k=k, show_progress=show_progress)


# --------------------------------------------------------------------------------- embedding cache


class SupportsEmbed(Protocol):
    name: str
    dimension: int

    def embed(self, texts: list[str], task: str | None = ..., **kw: Any) -> Any: ...


def default_cache_dir() -> Path:
    if os.environ.get("TAMIS_CACHE"):
        return Path(os.environ["TAMIS_CACHE"]).expanduser() / "embeddings"
    return Path("~/.cache/tamis/embeddings").expanduser()


def model_identity(embedder: Any) -> dict[str, Any]:
    """What makes two embedders produce the same vectors: name, dimension, dtype, compiled or not, max length and
    the checkpoint files' sizes and modification times (so a retrained checkpoint invalidates the cache)."""
    ident: dict[str, Any] = {
        "class": type(embedder).__name__,
        "name": str(getattr(embedder, "name", "")),
        "dimension": int(getattr(embedder, "dimension", 0) or 0),
        "max_length": getattr(embedder, "max_length", None),
        # dtype="int8" computes with float32 activations (embedder.dtype) but other vectors: its own key
        "dtype": "int8" if getattr(getattr(embedder, "precision", None), "int8", False)
        else str(getattr(embedder, "dtype", "")),
    }
    if getattr(embedder, "compile_seconds", None) is not None:  # compiled bf16 rounds differently from eager
        ident["compiled"] = True
    model_dir = getattr(embedder, "model_dir", None) or getattr(embedder, "path", None)
    if model_dir is None and type(embedder).__name__ == "Embedder":
        try:
            from tamis.models.loading import resolve_model_dir

            model_dir = resolve_model_dir(getattr(embedder, "name", None))
        except Exception:
            model_dir = None
    if model_dir is not None and Path(model_dir).is_dir():
        files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("config*.json"))
        ident["files"] = [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
    adapters = getattr(embedder, "adapter_dirs", None) or {}
    if adapters:  # task adapters loaded from files: their weights are part of what the vectors depend on
        ident["adapters"] = {t: [[p.name, p.stat().st_size, int(p.stat().st_mtime)]
                                 for p in sorted(Path(d).glob("adapter_*"))] for t, d in sorted(adapters.items())}
    return ident


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings on disk as ``.npy`` (never pickle), keyed by model identity, task and a hash of the texts."""

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def key(self, embedder: Any, texts: Sequence[str], task: str | None, extra: Mapping[str, Any] | None = None) -> str:
        ident = {"model": model_identity(embedder), "task": task, "texts": texts_hash(texts),
                 "n": len(texts), **(dict(extra) if extra else {})}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path(self, embedder: Any, key: str) -> Path:
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(getattr(embedder, "name", "model")))
        return self.directory / slug[-80:] / f"{key}.npy"

    def get(self, embedder: Any, key: str) -> np.ndarray | None:
        path = self.path(embedder, key)
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, embedder: Any, key: str, array: np.ndarray, meta: Mapping[str, Any] | None = None) -> Path:
        path = self.path(embedder, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
        if meta is not None:
            path.with_suffix(".json").write_text(json.dumps(dict(meta), default=str, indent=1))
        return path

    def sparse_path(self, embedder: Any, key: str) -> Path:
        return self.path(embedder, key).with_suffix(".sparse.npz")

    def get_sparse(self, embedder: Any, key: str) -> Any:
        """A cached ``scipy.sparse.csr_matrix`` (stored as plain arrays, never pickle), or None."""
        import scipy.sparse as sp

        path = self.sparse_path(embedder, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        except (OSError, ValueError, KeyError):
            return None

    def put_sparse(self, embedder: Any, key: str, matrix: Any) -> Path:
        path = self.sparse_path(embedder, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, data=matrix.data, indices=matrix.indices, indptr=matrix.indptr, shape=np.asarray(matrix.shape))
        os.replace(tmp, path)
        return path


@contextmanager
def quiet_truncation() -> Iterator[None]:
    """Silence the per-call truncation warnings (``warnings`` and the ``tamis`` logger) of bulk runs,
    which count truncated inputs themselves."""
    log = logging.getLogger("tamis")
    level = log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if log.getEffectiveLevel() < logging.ERROR:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            log.setLevel(level)


def encode(
    embedder: Any,
    texts: Sequence[str],
    task: str | None = None,
    cache: EmbeddingCache | None = None,
    show_progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Normalised float32 embeddings of ``texts``, from ``cache`` when it holds them."""
    texts = list(texts)
    key = None
    if cache is not None:
        key = cache.key(embedder, texts, task, {"normalized": True})
        hit = cache.get(embedder, key)
        if hit is not None and hit.shape[0] == len(texts):
            cache.hits += 1
            return hit
        cache.misses += 1
    if show_progress:
        tqdm.write(f"{desc}: {len(texts)} texts with {getattr(embedder, 'name', 'model')}")
    with quiet_truncation():  # truncation is expected on long documents; counted instead
        if hasattr(embedder, "embed_result"):
            result = embedder.embed_result(texts, task=task, normalized=True, show_progress=show_progress)
            vectors, truncated = result.embeddings, len(result.truncated)
        else:
            vectors = embedder.embed(texts, task=task, normalized=True, show_progress=show_progress)
            truncated = None
    vectors = np.asarray(vectors, dtype=np.float32)
    if show_progress and truncated:
        tqdm.write(f"{desc}: {truncated} of {len(texts)} texts were truncated to the model's limit")
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ValueError(f"embedder returned shape {vectors.shape} for {len(texts)} texts")
    if cache is not None and key is not None:
        cache.put(embedder, key, vectors, {"model": model_identity(embedder), "task": task, "n": len(texts),
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return vectors


# ------------------------------------------------------------------------------------- dense search


def exact_topk(queries: np.ndarray, docs: np.ndarray, k: int, block_elems: int = 1 << 25) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: ``(scores [nq, k], indices [nq, k])``, computed in query blocks."""
    k = max(1, min(int(k), docs.shape[0]))
    d = torch.from_numpy(np.ascontiguousarray(docs, dtype=np.float32))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    step = max(1, block_elems // max(1, docs.shape[0]))
    out_s, out_i = [], []
    for start in range(0, q.shape[0], step):
        sims = q[start : start + step] @ d.T
        s, i = torch.topk(sims, k, dim=1)
        out_s.append(s)
        out_i.append(i)
    if not out_s:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(out_s).numpy(), torch.cat(out_i).numpy()


def ann_topk(queries: np.ndarray, docs: np.ndarray, k: int, m: int = 32, ef_search: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Approximate inner-product top-k with a faiss HNSW index (``pip install tamis[ann]``)."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError("ANN search needs faiss: pip install 'tamis[ann]' (faiss-cpu)") from exc
    k = max(1, min(int(k), docs.shape[0]))
    index = faiss.IndexHNSWFlat(docs.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.add(np.ascontiguousarray(docs, dtype=np.float32))
    index.hnsw.efSearch = max(ef_search, k)
    scores, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, idx


def dense_search(
    embedder: Any,
    texts: Sequence[str],
    ids: Sequence[str],
    queries: Mapping[str, str],
    k: int = 1000,
    cache: EmbeddingCache | None = None,
    ann: str = "auto",
    show_progress: bool = True,
) -> Run:
    """Embed documents (``embedder.passage_task``) and queries (``embedder.query_task``), return each
    query's top ``k`` by inner product of normalised vectors (cosine). ``ann``: ``"auto"`` (faiss HNSW
    above :data:`ANN_THRESHOLD` documents), ``"exact"`` or ``"faiss"``."""
    if ann not in ("auto", "exact", "faiss"):
        raise ValueError(f"ann must be 'auto', 'exact' or 'faiss', got {ann!r}")
    qids = list(queries)
    doc_vecs = encode(embedder, texts, getattr(embedder, "passage_task", None), cache, show_progress, "corpus")
    q_vecs = encode(embedder, [queries[q] for q in qids], getattr(embedder, "query_task", None), cache,
                    show_progress, "queries")
    use_ann = ann == "faiss" or (ann == "auto" and doc_vecs.shape[0] > ANN_THRESHOLD)
    scores, idx = (ann_topk if use_ann else exact_topk)(q_vecs, doc_vecs, k)
    run: Run = {}
    for row, qid in enumerate(qids):
        run[qid] = {ids[int(i)]: float(s) for i, s in zip(idx[row], scores[row]) if i >= 0}
    return run


# ---------------------------------------------------------------------------------------- fusion


def rrf(runs: Sequence[Run], k: int = 60, depth: int | None = 1000, weights: Sequence[float] | None = None) -> Run:
    """Reciprocal rank fusion: ``score(d) = sum_i w_i / (k + rank_i(d))``, ranks from 1 in each run's
    trec_eval order; documents missing from a run get nothing from it. Keeps the top ``depth``."""
    if weights is not None and len(weights) != len(runs):
        raise ValueError("one weight per run")
    ws = list(weights) if weights is not None else [1.0] * len(runs)
    fused: Run = {}
    for run, w in zip(runs, ws):
        for qid, docs in run.items():
            acc = fused.setdefault(qid, {})
            for rank, (did, _) in enumerate(sorted_docs(docs), 1):
                acc[did] = acc.get(did, 0.0) + w / (k + rank)
    if depth is not None:
        fused = {qid: dict(sorted_docs(docs)[:depth]) for qid, docs in fused.items()}
    return fused


def exclude_identical_ids(run: Run) -> Run:
    """Drop documents whose id equals the query id (BEIR's ``ignore_identical_ids`` for some sets)."""
    return {qid: {d: s for d, s in docs.items() if d != qid} for qid, docs in run.items()}


def zscore_fusion(runs: Sequence[Run], weights: Sequence[float] | None = None, depth: int | None = 1000) -> Run:
    """Weighted z-score fusion: each run's scores standardised per query (mean 0, standard deviation 1 over its
    list), ``score(d) = sum_i w_i * z_i(d)``; a document missing from a run gets that run's lowest z for the
    query (it ranked below the run's list). Unlike RRF it keeps how far apart the scores are, so a retriever that
    is sure of its first document counts for more there. Keeps the top ``depth``."""
    if weights is not None and len(weights) != len(runs):
        raise ValueError("one weight per run")
    ws = list(weights) if weights is not None else [1.0] * len(runs)
    qids: list[str] = []
    for run in runs:
        qids.extend(q for q in run if q not in qids)
    fused: Run = {}
    for qid in qids:
        parts = []
        for run in runs:
            docs = run.get(qid) or {}
            if not docs:
                parts.append(({}, 0.0))
                continue
            vals = np.fromiter(docs.values(), dtype=np.float64, count=len(docs))
            std = float(vals.std())
            z = (vals - vals.mean()) / std if std > 0 else np.zeros_like(vals)
            parts.append((dict(zip(docs, z.tolist())), float(z.min())))
        acc = {did: 0.0 for zs, _ in parts for did in zs}
        for (zs, floor), w in zip(parts, ws):
            if not zs:
                continue
            for did in acc:
                acc[did] += w * zs.get(did, floor)
        fused[qid] = acc
    if depth is not None:
        fused = {qid: dict(sorted_docs(docs)[:depth]) for qid, docs in fused.items()}
    return fused


FUSIONS = ("rrf", "zscore")


def fuse(runs: Sequence[Run], method: str = "rrf", weights: Sequence[float] | None = None, depth: int | None = 1000,
         rrf_k: int = 60) -> Run:
    """Fuse first-stage runs: ``"rrf"`` (:func:`rrf`) or ``"zscore"`` (:func:`zscore_fusion`)."""
    if method == "rrf":
        return rrf(runs, k=rrf_k, depth=depth, weights=weights)
    if method == "zscore":
        return zscore_fusion(runs, weights=weights, depth=depth)
    raise ValueError(f"unknown fusion {method!r}; use one of {', '.join(FUSIONS)}")


# ------------------------------------------------------------------------------------ sparse search


def encode_sparse(
    embedder: Any,
    texts: Sequence[str],
    task: str | None = None,
    cache: EmbeddingCache | None = None,
    show_progress: bool = True,
    desc: str = "sparse",
) -> Any:
    """SPLADE vectors of ``texts`` as a ``scipy.sparse.csr_matrix`` [n, vocab] (float32), from ``cache`` when it
    holds them (kept as ``.sparse.npz`` of plain arrays beside the dense ``.npy`` files, never pickle)."""
    from tamis.embed_sparse import to_csr

    texts = list(texts)
    key = None
    if cache is not None:
        key = cache.key(embedder, texts, task, {"sparse": True})
        hit = cache.get_sparse(embedder, key)
        if hit is not None and hit.shape[0] == len(texts):
            cache.hits += 1
            return hit
        cache.misses += 1
    if show_progress:
        tqdm.write(f"{desc}: {len(texts)} texts with {getattr(embedder, 'name', 'model')}")
    with quiet_truncation():
        vectors = embedder.embed(texts, task, show_progress=show_progress)
    m = to_csr(vectors, int(embedder.dimension))
    if cache is not None and key is not None:
        cache.put_sparse(embedder, key, m)
    return m


def sparse_topk(queries: Any, docs: Any, k: int, block: int = 256) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact top-k of sparse dot products: per query, (document indices, scores) by descending score; documents
    sharing no term with the query (score 0) are left out."""
    docs_t = docs.T.tocsr()
    out_i: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    for start in range(0, queries.shape[0], block):
        scores = (queries[start:start + block] @ docs_t).toarray()
        for row in scores:
            nz = np.flatnonzero(row > 0)
            if len(nz) > k:
                nz = nz[np.argpartition(-row[nz], k - 1)[:k]]
            order = nz[np.lexsort((nz, -row[nz]))]
            out_i.append(order)
            out_s.append(row[order])
    return out_i, out_s


def sparse_search(
    embedder: Any,
    texts: Sequence[str],
    ids: Sequence[str],
    queries: Mapping[str, str],
    k: int = 1000,
    cache: EmbeddingCache | None = None,
    show_progress: bool = True,
) -> Run:
    """Learned-sparse retrieval: documents (task ``"document"``) and queries (``"query"``) through a
    :class:`~tamis.embed_sparse.SparseEmbedder`, each query's top ``k`` by exact sparse dot product."""
    qids = list(queries)
    doc_m = encode_sparse(embedder, texts, "document", cache, show_progress, "corpus (sparse)")
    q_m = encode_sparse(embedder, [queries[q] for q in qids], "query", cache, show_progress, "queries (sparse)")
    idx, scores = sparse_topk(q_m, doc_m, max(1, int(k)))
    return {qid: {ids[int(i)]: float(s) for i, s in zip(idx[row], scores[row])} for row, qid in enumerate(qids)}
