"""Any embedding model as a reranker: cosine between the query and each document."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tamis.embed import Embedder
from tamis.rerank.base import BaseReranker, Progress, Usage, batches, encode_texts


class EmbeddingReranker(BaseReranker):
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

    def score(self, query: str, documents: Sequence[str], *, truncate: bool = True, progress: Progress | None = None,
              usage: Usage | None = None) -> np.ndarray:
        """Cosine similarity of each document to the query.

        Texts longer than the model's ``max_length`` are cut (reported in ``truncated`` and, for the
        query, ``extras["query_truncated"]``), or with ``truncate=False`` raise :class:`InputTooLongError`.
        ``progress(done, total)`` runs after every batch of documents (raising there stops the work).
        """
        emb = self.embedder
        (q_enc,) = encode_texts(lambda t: emb.tokenize(t, emb.query_task, truncate), [query], "query")
        d_enc = encode_texts(lambda t: emb.tokenize(t, emb.passage_task, truncate), list(documents), "document")
        pooled = torch.empty(len(d_enc), emb.dimension, dtype=torch.float32)
        for idx in batches([len(e) for e in d_enc], emb.max_tokens_per_batch, emb.max_batch_size, progress):
            pooled[idx] = emb.forward([d_enc[i] for i in idx], emb.passage_task)
        q_vec = emb.finalize(emb.forward([q_enc], emb.query_task))[0]
        if usage is not None:
            usage.count(d_enc, q_enc)
        return (emb.finalize(pooled) @ q_vec).astype(np.float32)
