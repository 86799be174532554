"""A SPLADE sparse encoder as a reranker: ``score = q · d`` over learned term weights.

SPLADE (Formal et al., SIGIR 2021) encodes a text with a BERT masked-LM head and keeps, for every vocabulary
term, ``w_t = max_i log(1 + relu(logit_{i,t}))`` over the text's tokens: a sparse, interpretable vector. The
same encoder is the ``splade=DIR`` teacher scorer in :mod:`tamis.train.teachers`. A masked-LM checkpoint
does not say whether it was trained as SPLADE, so ``tamis.Reranker`` never guesses: name it in an ensemble
(``"kind": "splade"``) or build ``SpladeReranker(dir)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tamis.errors import InputTooLongError
from tamis.rerank.base import SentenceTransformersCompat, document_texts, query_text
from tamis.rerank.results import RankedResults, rank

SparseVector = tuple[np.ndarray, np.ndarray]  # (term ids ascending, weights)


class SpladeReranker(SentenceTransformersCompat):
    """Rerank by the dot product of SPLADE vectors of the query and each document (fp32)."""

    kind = "splade"

    def __init__(self, model_dir: str | os.PathLike[str], name: str | None = None, device: str | torch.device = "cpu",
                 max_length: int = 256, max_tokens_per_batch: int = 8192):
        from tamis.models import bert
        from tamis.models.loading import load_config
        from tamis.tokenize import Tokenizer

        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.device = torch.device(device)
        self.model = bert.from_pretrained(self.model_dir, self.device, masked_lm=True)
        self.tokenizer = Tokenizer.from_dir(self.model_dir, load_config(self.model_dir))
        self.max_length = max_length
        self.max_tokens_per_batch = max_tokens_per_batch

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (SPLADE runs in its checkpoint's precision; no ``dtype="auto"`` choice)."""
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return f"SpladeReranker(name={self.name!r}: SPLADE term weights of {self.model_dir}, max {self.max_length} tokens)"

    def encode(self, texts: Sequence[str], truncate: bool = True, show_progress: bool = False,
               desc: str = "splade") -> list[SparseVector]:
        """Sparse vectors ``(term ids, weights)``, one per text (only non-zero terms kept)."""
        return self.encode_tokens(self.tokenizer.encode(list(texts), self.max_length, truncate=truncate),
                                  show_progress=show_progress, desc=desc)

    @torch.inference_mode()
    def encode_tokens(self, encodings: Sequence[Any], show_progress: bool = False, desc: str = "splade",
                      progress: Callable[[int, int], None] | None = None) -> list[SparseVector]:
        from tamis.batching import plan_batches

        out: list[Any] = [None] * len(encodings)
        done = 0
        with tqdm(total=len(encodings), desc=desc, unit="text", disable=not show_progress) as bar:
            for idx in plan_batches([len(e) for e in encodings], self.max_tokens_per_batch):
                batch = self.tokenizer.pad([encodings[i] for i in idx], self.device)
                logits = self.model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
                # log(1 + relu(.)) is monotonic: max-pool the raw logits first (padding at -inf), then
                # saturate the [B, V] maximum, not the [B, L, V] logits — same vectors, far less work.
                logits = logits.float().masked_fill_(~batch.attention_mask.bool()[..., None], float("-inf"))
                pooled = torch.log1p(torch.relu(logits.amax(dim=1))).cpu()
                for row, i in enumerate(idx):
                    nz = pooled[row].nonzero().flatten()
                    out[i] = (nz.numpy(), pooled[row, nz].numpy())
                bar.update(len(idx))
                done += len(idx)
                if progress is not None:
                    progress(done, len(encodings))
        return out

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
        q = query_text(query)
        docs = document_texts(documents)
        if not docs:
            return rank(q, [], [], top_n, return_documents, model=self.name)
        try:
            (q_enc,) = self.tokenizer.encode([q], self.max_length, truncate=truncate)
        except InputTooLongError as exc:
            raise InputTooLongError(None, exc.n_tokens, exc.limit, what="query") from None
        try:
            d_enc = self.tokenizer.encode(docs, self.max_length, truncate=truncate)
        except InputTooLongError as exc:
            raise InputTooLongError(exc.index, exc.n_tokens, exc.limit, what="document") from None
        (q_vec,) = self.encode_tokens([q_enc])
        d_vecs = self.encode_tokens(d_enc, progress=progress)
        scores = [sparse_dot(q_vec, d) for d in d_vecs]
        return rank(q, scores, list(documents), top_n, return_documents, model=self.name,
                    total_tokens=len(q_enc) + sum(len(e) for e in d_enc),
                    truncated=[i for i, e in enumerate(d_enc) if e.truncated],
                    extras={"query_truncated": True} if q_enc.truncated else {})


def sparse_dot(a: SparseVector, b: SparseVector) -> float:
    """Dot product of two sparse vectors with ascending term ids."""
    _, ia, ib = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    return float(np.dot(a[1][ia].astype(np.float64), b[1][ib].astype(np.float64)))
