"""Cross-encoder reranker: BERT / JinaBERT sequence classifiers (jina-reranker-v1-tiny/turbo, ms-marco)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tamis.batching import DEFAULT_MAX_BATCH_SIZE, default_token_budget, plan_batches
from tamis.errors import InputTooLongError
from tamis.hardware import Precision, configure_threads, resolve_precision
from tamis.models import bert
from tamis.models.loading import load_config, resolve_device
from tamis.models.packed import Packing
from tamis.models.runtime import load_for_inference
from tamis.rerank.base import SentenceTransformersCompat, document_texts, query_text
from tamis.rerank.results import RankedResults, rank
from tamis.tokenize import Batch, Tokenizer, pack

ACTIVATIONS = ("sigmoid", "none")


def relevance_column(logits: torch.Tensor) -> torch.Tensor:
    """One relevance logit per pair from the head's logits [B, labels]: the logit of a 1-label head, or
    logit(relevant) - logit(not relevant) of a 2-label head."""
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0]


def relevance_logits(model: torch.nn.Module, batch: Batch, return_states: bool = False) -> Any:
    """:func:`relevance_column` of a padded batch. Training calls this; inference runs the same module and
    head packed (:meth:`CrossEncoderReranker.logits`, equal to float rounding) or padded through it.
    ``return_states=True``: (logits, every hidden state on the way; see :class:`tamis.models.bert.BertModel`)."""
    if not return_states:
        return relevance_column(model(batch.input_ids, batch.attention_mask, batch.token_type_ids))
    logits, states = model(batch.input_ids, batch.attention_mask, batch.token_type_ids, return_states=True)
    return relevance_column(logits), states


class CrossEncoderReranker(SentenceTransformersCompat):
    """Scores each (query, document) pair with one forward pass of a sequence classifier.

    The pair goes through the tokenizer's own pair template (``[CLS] q [SEP] d [SEP]`` with token
    types, or ``<s> q </s></s> d </s>``); over-long pairs lose the end of the document first.
    ``relevance_score`` is sigmoid(logit) by default (``activation="none"`` for raw logits).
    Pairs run packed (no padding, see :class:`tamis.models.packed.Packing`); ``self.packed = False`` runs
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
        compile: bool | str = "auto",
    ):
        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        dev = resolve_device(device)
        precision = resolve_precision(dtype, dev)
        if dev.type == "cpu":
            configure_threads()
        model, seconds, why = load_for_inference(self.model_dir, dev, precision, classification=True, compile=compile)
        tokenizer = Tokenizer.from_dir(self.model_dir, self.config)
        self._setup(model, tokenizer, name or self.model_dir.name, max_length, activation, max_tokens_per_batch,
                    max_batch_size, precision)
        self.compile_seconds, self.compile_reason = seconds, why

    def _setup(self, model: bert.BertForSequenceClassification, tokenizer: Tokenizer, name: str,
               max_length: int | None, activation: str, max_tokens_per_batch: int | None, max_batch_size: int,
               precision: Precision) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        self.precision = precision
        self.packed = True
        self.compile_seconds: float | None = None
        self.compile_reason = "not compiled"
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        limits = [x for x in (model.cfg.max_length, tokenizer.model_max_length, max_length) if x]
        self.max_length = min(limits) if limits else 512
        self.activation = activation
        self.max_tokens_per_batch = max_tokens_per_batch or default_token_budget(self.device)
        self.max_batch_size = max_batch_size

    @classmethod
    def from_module(
        cls,
        model: bert.BertForSequenceClassification,
        tokenizer: Tokenizer,
        name: str = "in-memory",
        max_length: int | None = None,
        activation: str = "sigmoid",
        max_tokens_per_batch: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> CrossEncoderReranker:
        """Wrap a module being trained (or built in memory) with the exact inference path, so that
        dev evaluation during training scores pairs the way the saved model will be scored."""
        rr = cls.__new__(cls)
        rr.model_dir = Path(name)
        rr.config = {}
        dtype = next(model.parameters()).dtype
        precision = Precision(dtype, False, str(dtype).removeprefix("torch."), "the module's own dtype")
        rr._setup(model, tokenizer, name, max_length, activation, max_tokens_per_batch, max_batch_size, precision)
        return rr

    def __repr__(self) -> str:
        return (f"CrossEncoderReranker(name={self.name!r}, max_length={self.max_length}, "
                f"activation={self.activation!r}, device={str(self.device)!r}, dtype={self.precision.name!r} "
                f"({self.precision.requested}: {self.precision.reason}), packed={self.packed}, "
                f"compiled={self.compile_seconds is not None} ({self.compile_reason}))")

    @torch.inference_mode()
    def logits(
        self,
        query: str,
        docs: Sequence[str],
        truncate: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, int, list[int]]:
        """Raw relevance logits per document, tokens used, and indices of truncated pairs.

        ``truncate=False`` raises :class:`InputTooLongError` for the first (query, document) pair over
        ``max_length``; ``progress(done, total)`` runs after every batch (raising there stops the work).
        """
        try:
            encodings = self.tokenizer.encode_pairs([query] * len(docs), docs, self.max_length, truncate=truncate)
        except InputTooLongError as exc:
            raise InputTooLongError(exc.index, exc.n_tokens, exc.limit, what="query + document") from None
        out = np.empty(len(docs), dtype=np.float32)
        done = 0
        for idx in plan_batches([len(e) for e in encodings], self.max_tokens_per_batch, self.max_batch_size):
            if self.packed:  # plan_batches gives rows longest first: few distinct lengths per run
                packed = pack([encodings[i] for i in idx], self.device)
                packing = Packing(packed.lengths, self.device)
                col = relevance_column(self.model.forward_packed(packed.input_ids, packed.token_type_ids, packing))
            else:
                col = relevance_logits(self.model, self.tokenizer.pad([encodings[i] for i in idx], self.device))
            out[idx] = col.float().cpu().numpy()
            done += len(idx)
            if progress is not None:
                progress(done, len(docs))
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
        *,
        truncate: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> RankedResults:
        """Rank documents; ``truncate`` and ``progress`` as in :meth:`logits`."""
        q = query_text(query)
        docs = document_texts(documents)
        empty: tuple[np.ndarray, int, list[int]] = (np.empty(0, np.float32), 0, [])
        logits, tokens, truncated = self.logits(q, docs, truncate, progress) if docs else empty
        scores = logits if raw_scores or self.activation == "none" else 1.0 / (1.0 + np.exp(-logits))
        return rank(q, scores.tolist(), list(documents), top_n, return_documents,
                    model=self.name, total_tokens=tokens, truncated=truncated)
