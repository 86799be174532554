"""Any embedding model as a reranker: cosine between the query and each document."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from tamis.batching import plan_batches
from tamis.embed import Embedder
from tamis.errors import InputTooLongError
from tamis.rerank.base import SentenceTransformersCompat, document_texts, query_text
from tamis.rerank.results import RankedResults, rank


class EmbeddingReranker(SentenceTransformersCompat):
    """Query embedded with the model's query task, documents with its passage task, cosine scores.

    Scores lie in [-1, 1]. This is what ``tamis.Reranker()`` uses until the project ships a trained
    cross-encoder.
    """

    kind = "embedding"

    def __init__(self, embedder: Embedder, name: str | None = None):
        self.embedder = embedder
        self.name = name or embedder.name
        self.max_length = embedder.max_length

    def __repr__(self) -> str:
        return (
            f"EmbeddingReranker(name={self.name!r}: cosine similarity of {self.embedder.name} embeddings, "
            f"query task {self.embedder.query_task!r}, passage task {self.embedder.passage_task!r})"
        )

    def rerank(
        self,
        query: Any,
        documents: Sequence[Any],
        top_n: int | None = None,
        return_documents: bool = True,
        *,
        truncate: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> RankedResults:
        """Rank documents by cosine similarity to the query.

        Texts longer than the model's ``max_length`` are cut (reported in ``truncated`` and, for the
        query, ``extras["query_truncated"]``), or with ``truncate=False`` raise :class:`InputTooLongError`.
        ``progress(done, total)`` runs after every batch of documents (raising there stops the work).
        """
        q = query_text(query)
        docs = document_texts(documents)
        if not docs:
            return rank(q, [], [], top_n, return_documents, model=self.name)
        emb = self.embedder
        try:
            (q_enc,) = emb.tokenize([q], emb.query_task, truncate)
        except InputTooLongError as exc:
            raise InputTooLongError(None, exc.n_tokens, exc.limit, what="query") from None
        try:
            d_enc = emb.tokenize(docs, emb.passage_task, truncate)
        except InputTooLongError as exc:
            raise InputTooLongError(exc.index, exc.n_tokens, exc.limit, what="document") from None
        pooled = torch.empty(len(docs), emb.dimension, dtype=torch.float32)
        done = 0
        for idx in plan_batches([len(e) for e in d_enc], emb.max_tokens_per_batch, emb.max_batch_size):
            pooled[idx] = emb.forward([d_enc[i] for i in idx], emb.passage_task)
            done += len(idx)
            if progress is not None:
                progress(done, len(docs))
        q_vec = emb.finalize(emb.forward([q_enc], emb.query_task))[0]
        scores = (emb.finalize(pooled) @ q_vec).astype(np.float32)
        return rank(q, scores.tolist(), list(documents), top_n, return_documents, model=self.name,
                    total_tokens=len(q_enc) + sum(len(e) for e in d_enc),
                    truncated=[i for i, e in enumerate(d_enc) if e.truncated],
                    extras={"query_truncated": True} if q_enc.truncated else {})
