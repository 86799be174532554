"""What every reranker backend shares: document normalisation, the ``rerank`` pipeline, one scoring method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tamis.batching import DEFAULT_MAX_BATCH_SIZE, plan_batches
from tamis.errors import InputTooLongError, InvalidInputError
from tamis.rerank.results import RankedResults, rank

Progress = Callable[[int, int], None]


def document_texts(documents: Sequence[Any]) -> list[str]:
    """Texts of documents given as strings or ``{"text": ...}`` objects."""
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise InvalidInputError("documents must be a list of strings or {'text': ...} objects")
    texts = []
    for i, d in enumerate(documents):
        if isinstance(d, str):
            texts.append(d)
        elif isinstance(d, dict) and isinstance(d.get("text"), str):
            texts.append(d["text"])
        else:
            raise InvalidInputError(f"document {i} must be a string or an object with a 'text' string")
    return texts


def query_text(query: Any) -> str:
    if isinstance(query, dict) and isinstance(query.get("text"), str):
        query = query["text"]
    if not isinstance(query, str):
        raise InvalidInputError("query must be a string (or {'text': ...})")
    if not query.strip():
        raise InvalidInputError("query must not be empty")
    return query


def encode_texts(encode: Callable[[list[str]], list[Any]], texts: list[str], what: str) -> list[Any]:
    """``encode(texts)`` with :class:`InputTooLongError` naming ``what`` ("query": the single query, no index;
    "document"; "query + document")."""
    try:
        return encode(texts)
    except InputTooLongError as exc:
        raise InputTooLongError(None if what == "query" else exc.index, exc.n_tokens, exc.limit, what=what) from None


def batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
            progress: Progress | None = None) -> Iterator[list[int]]:
    """:func:`tamis.batching.plan_batches`' batches of rows, ``progress(done, total)`` after each is processed."""
    done = 0
    for idx in plan_batches(lengths, max_tokens, max_batch_size):
        yield idx
        done += len(idx)
        if progress is not None:
            progress(done, len(lengths))


@dataclass
class Usage:
    """What one :meth:`BaseReranker.score` call reports beside the scores (it fills the object it is given)."""

    total_tokens: int = 0
    truncated: list[int] = field(default_factory=list)  # indices of the documents that were cut
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. {"query_truncated": True}

    def count(self, documents: Sequence[Any], query: Any = None) -> None:
        """Tokens and cut texts of encoded ``documents`` (and of the encoded ``query``)."""
        self.total_tokens += sum(len(e) for e in documents) + (len(query) if query is not None else 0)
        self.truncated = [i for i, e in enumerate(documents) if e.truncated]
        if query is not None and query.truncated:
            self.extras["query_truncated"] = True


class SentenceTransformersCompat:
    """sentence-transformers ``CrossEncoder`` habits on every reranker, so code moves over by changing an import:
    ``predict(pairs)`` and ``rank(query, documents, top_k, return_documents)``, same arguments and return shapes.

    Scores are the reranker's ``relevance_score`` (a cross-encoder's sigmoid, as ``CrossEncoder`` gives for one
    label). ``batch_size`` is checked and otherwise a speed knob only: tamis plans its batches by token budget,
    and a pair's score does not depend on the batch it ran in. ``predict`` groups pairs by query, so a listwise
    reranker scores each query's documents together."""

    rerank: Callable[..., RankedResults]

    def predict(
        self,
        sentences: Sequence[Sequence[str]] | Sequence[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[..., Any] | None = None,
        apply_softmax: bool | None = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
    ) -> Any:
        """Scores of ``(query, document)`` pairs, in their order: ``np.ndarray`` [n] (a float for one pair given
        as ``(query, document)``; a tensor with ``convert_to_tensor``; a list of 0-d tensors without
        ``convert_to_numpy``), as ``CrossEncoder.predict``."""
        _check_batch_size(batch_size)
        if activation_fn is not None or apply_softmax:
            raise InvalidInputError("activation_fn / apply_softmax are not supported: scores are the reranker's own "
                                    "(load a cross-encoder with activation='none' for raw logits)")
        singular = len(sentences) > 0 and isinstance(sentences[0], str)
        pairs = [sentences] if singular else list(sentences)
        groups: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise InvalidInputError(f"pair {i} must be a (query, document) pair of strings")
            groups.setdefault(pair[0], []).append(i)
        scores = np.zeros(len(pairs), dtype=np.float32)
        for query, where in groups.items():
            res = self.rerank(query, [pairs[i][1] for i in where], return_documents=False)
            for r in res.results:
                scores[where[r.index]] = r.relevance_score
        if convert_to_tensor:
            import torch

            out: Any = torch.from_numpy(scores)
            return out[0] if singular else out
        if not convert_to_numpy:
            import torch

            out = [torch.tensor(s) for s in scores]
            return out[0] if singular else out
        return scores[0] if singular else scores

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> list[dict[str, Any]]:
        """``[{"corpus_id": i, "score": s(, "text": document)}]`` sorted by score, descending (ties by index), the
        first ``top_k``, as ``CrossEncoder.rank``."""
        _check_batch_size(batch_size)
        res = self.rerank(query, list(documents), top_n=top_k, return_documents=False)
        out = []
        for r in res.results:
            item: dict[str, Any] = {"corpus_id": int(r.index), "score": float(r.relevance_score)}
            if return_documents:
                item["text"] = documents[r.index]
            out.append(item)
        return out


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer (got {batch_size!r})")


class BaseReranker(SentenceTransformersCompat, ABC):
    """Every backend: ``rerank`` reads the query and documents (strings or ``{"text": ...}``), returns an empty
    result for no documents, else ranks what :meth:`score` gives. A backend is its ``score`` method.

    ``truncate=False``: a text over the model's limit raises :class:`~tamis.errors.InputTooLongError`
    (``what`` "query", "document" or "query + document") instead of being cut. ``progress(done, total)``
    is called between model batches (or listwise blocks); an exception raised there stops the rerank.
    """

    name: str
    kind: str

    @abstractmethod
    def score(self, query: str, documents: Sequence[str], *, truncate: bool = True, progress: Progress | None = None,
              usage: Usage | None = None) -> np.ndarray:
        """``relevance_score`` of each of the (non-empty list of) ``documents`` for ``query``, an array [n]; the
        tokens used and the texts cut go into ``usage``. Backends may take more keyword options."""

    def rerank(
        self,
        query: Any,
        documents: Sequence[Any],
        top_n: int | None = None,
        return_documents: bool = True,
        *,
        truncate: bool = True,
        progress: Progress | None = None,
        **options: Any,
    ) -> RankedResults:
        """Documents sorted by ``relevance_score`` (ties by index), the first ``top_n``; ``options`` go to
        :meth:`score`."""
        q = query_text(query)
        docs = document_texts(documents)
        usage = Usage()
        scores = self.score(q, docs, truncate=truncate, progress=progress, usage=usage, **options) if docs else []
        return rank(q, [float(s) for s in scores], list(documents), top_n, return_documents, model=self.name,
                    total_tokens=usage.total_tokens, truncated=usage.truncated, extras=usage.extras)


RerankerLike = BaseReranker  # the name the server and ``tamis.Reranker`` used before the base class
