"""Cross-encoder reranker: BERT / JinaBERT sequence classifiers (jina-reranker-v1-tiny/turbo, ms-marco)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tamis.batching import DEFAULT_MAX_BATCH_SIZE, default_token_budget, plan_batches
from tamis.hardware import configure_threads, resolve_precision
from tamis.models import bert
from tamis.models.loading import load_config
from tamis.rerank.base import document_texts, query_text
from tamis.rerank.results import RankedResults, rank
from tamis.tokenize import Tokenizer, pack

ACTIVATIONS = ("sigmoid", "none")


class CrossEncoderReranker:
    """Scores each (query, document) pair with one forward pass of a sequence classifier.

    The pair goes through the tokenizer's own pair template (``[CLS] q [SEP] d [SEP]`` with token
    types, or ``<s> q </s></s> d </s>``); over-long pairs lose the end of the document first.
    ``relevance_score`` is sigmoid(logit) by default (``activation="none"`` for raw logits).
    Pairs run packed (no padding, see :class:`tamis.models.bert.Packing`); ``self.packed = False`` runs
    padded batches instead. ``dtype="auto"`` and ``compile`` as in :class:`tamis.Embedder`.
    """

    kind = "cross-encoder"

    def __init__(
        self,
        model_dir: str | Path,
        name: str | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        max_length: int | None = None,
        activation: str = "sigmoid",
        max_tokens_per_batch: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        compile: bool = False,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.device = torch.device(device)
        self.config = load_config(self.model_dir)
        self.precision = resolve_precision(dtype, self.device)
        if self.device.type == "cpu":
            configure_threads()
        self.model = bert.from_pretrained(self.model_dir, self.device, self.precision.dtype, classification=True)
        if self.precision.int8:
            from tamis.models.quantize import quantize_int8

            self.model = quantize_int8(self.model)
        else:
            bert.fuse_qkv(self.model)
        self.packed = True
        self.compile_seconds = bert.compile_packed(self.model, self.device) if compile else None
        self.tokenizer = Tokenizer.from_dir(self.model_dir, self.config)
        limits = [x for x in (self.model.cfg.max_length, self.tokenizer.model_max_length, max_length) if x]
        self.max_length = min(limits) if limits else 512
        self.activation = activation
        self.max_tokens_per_batch = max_tokens_per_batch or default_token_budget(self.device)
        self.max_batch_size = max_batch_size

    def __repr__(self) -> str:
        return (f"CrossEncoderReranker(name={self.name!r}, max_length={self.max_length}, "
                f"activation={self.activation!r}, device={str(self.device)!r}, dtype={self.precision.name!r} "
                f"({self.precision.requested}: {self.precision.reason}), packed={self.packed})")

    @torch.inference_mode()
    def logits(self, query: str, docs: Sequence[str]) -> tuple[np.ndarray, int, list[int]]:
        """Raw relevance logits per document, tokens used, and indices of truncated pairs."""
        encodings = self.tokenizer.encode_pairs([query] * len(docs), docs, self.max_length, truncate=True)
        out = np.empty(len(docs), dtype=np.float32)
        for idx in plan_batches([len(e) for e in encodings], self.max_tokens_per_batch, self.max_batch_size):
            if self.packed:  # plan_batches gives rows longest first: few distinct lengths per run
                packed = pack([encodings[i] for i in idx], self.device)
                packing = bert.Packing(packed.lengths, self.device)
                logits = self.model.forward_packed(packed.input_ids, packed.token_type_ids, packing).float()
            else:
                batch = self.tokenizer.pad([encodings[i] for i in idx], self.device)
                logits = self.model(batch.input_ids, batch.attention_mask, batch.token_type_ids).float()
            # one label: the relevance logit; two labels: logit(relevant) - logit(not relevant)
            col = logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0]
            out[idx] = col.cpu().numpy()
        return out, sum(len(e) for e in encodings), [i for i, e in enumerate(encodings) if e.truncated]

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        logits, _, _ = self.logits(query, docs)
        return 1.0 / (1.0 + np.exp(-logits)) if self.activation == "sigmoid" else logits

    def rerank(
        self,
        query: Any,
        documents: Sequence[Any],
        top_n: int | None = None,
        return_documents: bool = True,
        raw_scores: bool = False,
    ) -> RankedResults:
        q = query_text(query)
        docs = document_texts(documents)
        logits, tokens, truncated = self.logits(q, docs) if docs else (np.empty(0, np.float32), 0, [])
        scores = logits if raw_scores or self.activation == "none" else 1.0 / (1.0 + np.exp(-logits))
        return rank(q, scores.tolist(), list(documents), top_n, return_documents,
                    model=self.name, total_tokens=tokens, truncated=truncated)
