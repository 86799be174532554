"""Cross-encoder reranker: BERT / JinaBERT sequence classifiers (jina-reranker-v1-tiny/turbo, ms-marco)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tamis.batching import DEFAULT_MAX_BATCH_SIZE, default_token_budget
from tamis.hardware import Precision, configure_threads, resolve_precision
from tamis.models import bert
from tamis.models.loading import load_config, resolve_device
from tamis.models.packed import Packing
from tamis.models.runtime import load_for_inference
from tamis.rerank.base import BaseReranker, Progress, Usage, batches, encode_texts
from tamis.tokenize import Batch, Tokenizer, pack

ACTIVATIONS = ("sigmoid", "none")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


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


class CrossEncoderReranker(BaseReranker):
    """Scores each (query, document) pair with one forward pass of a sequence classifier.

    The pair goes through the tokenizer's own pair template (``[CLS] q [SEP] d [SEP]`` with token
    types, or ``<s> q </s></s> d </s>``); over-long pairs lose the end of the document first.
    ``relevance_score`` is sigmoid(logit) by default (``activation="none"`` for raw logits).
    Pairs run packed (no padding, see :class:`tamis.models.packed.Packing`); ``self.packed = False`` runs
    padded batches instead. ``dtype="auto"`` and ``compile`` as in :class:`tamis.Embedder`.

    ``model`` is a checkpoint directory, or a module being trained (with its ``tokenizer``; it runs in its own
    device and dtype, eager): :meth:`from_module`.
    """

    kind = "cross-encoder"

    def __init__(
        self,
        model: str | Path | bert.BertForSequenceClassification,
        name: str | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        max_length: int | None = None,
        activation: str = "sigmoid",
        max_tokens_per_batch: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        compile: bool | str = "auto",
        tokenizer: Tokenizer | None = None,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        self.compile_seconds: float | None = None
        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("a cross-encoder module needs its tokenizer")
            self.model_dir, self.config, self.model = Path(name or "in-memory"), {}, model
            own = next(model.parameters()).dtype
            self.precision = Precision(own, False, str(own).removeprefix("torch."), "the module's own dtype")
            self.compile_reason = "not compiled"
        else:
            self.model_dir = Path(model)
            self.config = load_config(self.model_dir)
            dev = resolve_device(device)
            self.precision = resolve_precision(dtype, dev)
            if dev.type == "cpu":
                configure_threads()
            self.model, self.compile_seconds, self.compile_reason = load_for_inference(
                self.model_dir, dev, self.precision, classification=True, compile=compile)
            tokenizer = Tokenizer.from_dir(self.model_dir, self.config)
        self.packed = True
        self.name = name or self.model_dir.name
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        limits = [x for x in (self.model.cfg.max_length, tokenizer.model_max_length, max_length) if x]
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
        return cls(model, name, tokenizer=tokenizer, max_length=max_length, activation=activation,
                   max_tokens_per_batch=max_tokens_per_batch, max_batch_size=max_batch_size)

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
        progress: Progress | None = None,
    ) -> tuple[np.ndarray, int, list[int]]:
        """Raw relevance logits per document, tokens used, and indices of truncated pairs.

        ``truncate=False`` raises :class:`InputTooLongError` for the first (query, document) pair over
        ``max_length``; ``progress(done, total)`` runs after every batch (raising there stops the work).
        """
        encodings = encode_texts(lambda d: self.tokenizer.encode_pairs([query] * len(d), d, self.max_length,
                                                                       truncate=truncate), list(docs), "query + document")
        out = np.empty(len(docs), dtype=np.float32)
        for idx in batches([len(e) for e in encodings], self.max_tokens_per_batch, self.max_batch_size, progress):
            if self.packed:  # batches come longest first: few distinct lengths per run
                packed = pack([encodings[i] for i in idx], self.device)
                packing = Packing(packed.lengths, self.device)
                col = relevance_column(self.model.forward_packed(packed.input_ids, packed.token_type_ids, packing))
            else:
                col = relevance_logits(self.model, self.tokenizer.pad([encodings[i] for i in idx], self.device))
            out[idx] = col.float().cpu().numpy()
        return out, sum(len(e) for e in encodings), [i for i, e in enumerate(encodings) if e.truncated]

    def score(self, query: str, documents: Sequence[str], *, truncate: bool = True, progress: Progress | None = None,
              usage: Usage | None = None, raw_scores: bool = False) -> np.ndarray:
        """``relevance_score`` per document: sigmoid(logit), or the logit (``activation="none"``, ``raw_scores``)."""
        logits, tokens, truncated = self.logits(query, documents, truncate, progress)
        if usage is not None:
            usage.total_tokens, usage.truncated = tokens, truncated
        return logits if raw_scores or self.activation == "none" else sigmoid(logits)
