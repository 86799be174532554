"""Any embedding model as a reranker: cosine between the query and each document."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tamis.embed import Embedder
from tamis.rerank.base import document_texts, query_text
from tamis.rerank.results import RankedResults, rank


class EmbeddingReranker:
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
        self, query: Any, documents: Sequence[Any], top_n: int | None = None, return_documents: bool = True
    ) -> RankedResults:
        q = query_text(query)
        docs = document_texts(documents)
        if not docs:
            return rank(q, [], [], top_n, return_documents, model=self.name)
        emb = self.embedder
        qr = emb.embed_result([q], task=emb.query_task, show_progress=False)
        dr = emb.embed_result(docs, task=emb.passage_task, show_progress=False)
        scores = (np.asarray(dr.embeddings) @ np.asarray(qr.embeddings)[0]).astype(np.float32)
        return rank(q, scores.tolist(), list(documents), top_n, return_documents, model=self.name,
                    total_tokens=sum(qr.token_counts) + sum(dr.token_counts), truncated=dr.truncated)
