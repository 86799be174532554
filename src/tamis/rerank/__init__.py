"""Reranking front door: one ``Reranker(...)`` factory over every backend, one result type.

``Reranker(name_or_path)`` reads the checkpoint's config and returns
- a :class:`CrossEncoderReranker` for BERT / JinaBERT sequence classifiers (jina-reranker-v1-*);
- a :class:`ListwiseReranker` for the jina-reranker-v3 layout (Qwen3 decoder + projector);
- an :class:`EmbeddingReranker` for embedding models.

With no argument (or ``"default"``) it is the shipped ``tamis-reranker-tiny``: a 2-layer cross-encoder
distilled by ``recipes/tiny_reranker.py``, whose weights live in ``tamis/rerank/weights/``.
``Reranker("embedding")`` is the embedding-similarity reranker on the bundled all-MiniLM-L6-v2 (the
default before the shipped model); an embedding model's name or path gives the same on that model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tamis.models import detect_family, is_cross_encoder
from tamis.models.loading import (
    DEFAULT_MODEL_ALIASES,
    ModelNotFoundError,
    load_config,
    resolve_device,
    resolve_model_dir,
)
from tamis.rerank.base import RerankerLike, document_texts
from tamis.rerank.cross_encoder import CrossEncoderReranker
from tamis.rerank.embedding import EmbeddingReranker
from tamis.rerank.results import RankedResults, RankResult

__all__ = [
    "CrossEncoderReranker",
    "EmbeddingReranker",
    "ListwiseReranker",
    "RankResult",
    "RankedResults",
    "Reranker",
    "RerankerLike",
    "document_texts",
]


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_RERANKER = "tamis-reranker-tiny"
SHIPPED_RERANKERS = {DEFAULT_RERANKER: WEIGHTS_DIR / DEFAULT_RERANKER}
DEFAULT_RERANKER_ALIASES = {"default", DEFAULT_RERANKER, f"tamis/{DEFAULT_RERANKER}"}
EMBEDDING_RERANKER_ALIASES = {"embedding", "embedding-reranker"}  # on the bundled all-MiniLM-L6-v2


def shipped_reranker_dir(name: str = DEFAULT_RERANKER) -> Path:
    """Directory of a reranker shipped inside the package."""
    path = SHIPPED_RERANKERS[name]
    if not (path / "model.safetensors").is_file():
        raise ModelNotFoundError(name, [str(path)])
    return path


def Reranker(  # noqa: N802 - a factory with the name of the thing it makes, as in `rerankers`
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    **kwargs: Any,
) -> RerankerLike:
    """Load a reranker by name or path (offline), choosing the implementation from its config.

    No argument or ``"default"``: the shipped ``tamis-reranker-tiny`` cross-encoder. ``"embedding"``: the
    embedding-similarity reranker on the bundled all-MiniLM-L6-v2.
    """
    from tamis.embed import Embedder, _model_name

    device = resolve_device(device)  # a device this torch cannot use is the first error, before any loading
    key = "default" if name_or_path is None else str(name_or_path).lower()
    if key in DEFAULT_RERANKER_ALIASES:
        return CrossEncoderReranker(shipped_reranker_dir(), DEFAULT_RERANKER, device=device, dtype=dtype, **kwargs)
    if key in EMBEDDING_RERANKER_ALIASES:
        name_or_path = None
    model_dir = resolve_model_dir(name_or_path)
    name = _model_name(name_or_path, model_dir)
    config = load_config(model_dir)
    family = detect_family(config)
    if name_or_path is None or key in DEFAULT_MODEL_ALIASES:
        return EmbeddingReranker(Embedder(name_or_path, device=device, dtype=dtype, **kwargs), name=name)
    if family == "qwen3-listwise":
        from tamis.rerank.listwise import ListwiseReranker

        rr = ListwiseReranker(model_dir, device=device, dtype=dtype, **kwargs)
        rr.name = name
        return rr
    if family == "bert" and is_cross_encoder(config):
        return CrossEncoderReranker(model_dir, name, device=device, dtype=dtype, **kwargs)
    return EmbeddingReranker(Embedder(model_dir, device=device, dtype=dtype, **kwargs), name=name)


def __getattr__(name: str) -> Any:
    if name == "ListwiseReranker":  # imported lazily: it pulls in the Qwen3 model code
        from tamis.rerank.listwise import ListwiseReranker

        return ListwiseReranker
    raise AttributeError(name)
