"""A SPLADE sparse encoder as a reranker: ``score = q · d`` over learned term weights.

SPLADE (Formal et al., SIGIR 2021) encodes a text with a BERT masked-LM head and keeps, for every vocabulary
term, ``w_t = max_i log(1 + relu(logit_{i,t}))`` over the text's tokens: a sparse, interpretable vector. The
same encoder is the ``splade=DIR`` teacher scorer in :mod:`tamis.train.teachers`. A masked-LM checkpoint
does not say whether it was trained as SPLADE, so ``tamis.Reranker`` never guesses: name it in an ensemble
(``"kind": "splade"``) or build ``SpladeReranker(dir)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tamis.rerank.base import BaseReranker, Progress, Usage, batches, encode_texts

SparseVector = tuple[np.ndarray, np.ndarray]  # (term ids ascending, weights)


class SpladeReranker(BaseReranker):
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
                      progress: Progress | None = None) -> list[SparseVector]:
        out: list[Any] = [None] * len(encodings)
        with tqdm(total=len(encodings), desc=desc, unit="text", disable=not show_progress) as bar:
            for idx in batches([len(e) for e in encodings], self.max_tokens_per_batch, progress=progress):
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
        return out

    def score(self, query: str, documents: Sequence[str], *, truncate: bool = True, progress: Progress | None = None,
              usage: Usage | None = None) -> np.ndarray:
        """``q · d`` of the SPLADE vectors of the query and each document."""
        (q_enc,) = encode_texts(lambda t: self.tokenizer.encode(t, self.max_length, truncate=truncate), [query], "query")
        d_enc = encode_texts(lambda t: self.tokenizer.encode(t, self.max_length, truncate=truncate), list(documents),
                             "document")
        (q_vec,) = self.encode_tokens([q_enc])
        d_vecs = self.encode_tokens(d_enc, progress=progress)
        if usage is not None:
            usage.count(d_enc, q_enc)
        return np.array([sparse_dot(q_vec, d) for d in d_vecs])


def sparse_dot(a: SparseVector, b: SparseVector) -> float:
    """Dot product of two sparse vectors with ascending term ids."""
    _, ia, ib = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    return float(np.dot(a[1][ia].astype(np.float64), b[1][ib].astype(np.float64)))
