"""Reranking front door: one ``Reranker(...)`` factory over every backend, one result type.

``Reranker(name_or_path)`` reads the checkpoint's config and returns
- a :class:`CrossEncoderReranker` for BERT / JinaBERT sequence classifiers (jina-reranker-v1-*);
- a :class:`ListwiseReranker` for the jina-reranker-v3 layout (Qwen3 decoder + projector);
- an :class:`EnsembleReranker` for a saved ensemble (``model_type`` ``tamis-ensemble``: several
  rerankers' standardised scores, weighted);
- an :class:`EmbeddingReranker` for embedding models.

No argument (or ``"default"``) gives the shipped tiny cross-encoder ``tamis-reranker-tiny`` (made by
``recipes/tiny_reranker.py``; see its model card in ``weights/``) when the package holds its weights, else
the embedding reranker on the bundled all-MiniLM-L6-v2, which stays reachable by name: ``"embedding"`` or
``"all-MiniLM-L6-v2"``.

:class:`SpladeReranker` (a SPLADE sparse encoder) is built directly or named in an ensemble.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tamis.errors import InvalidInputError, ModelNotFoundError
from tamis.models import detect_family, is_cross_encoder
from tamis.models.loading import load_config, model_name, resolve_model_dir
from tamis.rerank.base import BaseReranker, RerankerLike, document_texts
from tamis.rerank.cross_encoder import CrossEncoderReranker
from tamis.rerank.embedding import EmbeddingReranker
from tamis.rerank.ensemble import MODEL_TYPE as ENSEMBLE_MODEL_TYPE
from tamis.rerank.ensemble import EnsembleReranker
from tamis.rerank.results import RankedResults, RankResult

SHIPPED_RERANKER = "tamis-reranker-tiny"
EMBEDDING_RERANKER_ALIASES = {"embedding", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

__all__ = [
    "BaseReranker",
    "CrossEncoderReranker",
    "EmbeddingReranker",
    "EnsembleReranker",
    "ListwiseReranker",
    "RankResult",
    "RankedResults",
    "EMBEDDING_RERANKER_ALIASES",
    "SHIPPED_RERANKER",
    "Reranker",
    "RerankerLike",
    "SpladeReranker",
    "document_texts",
    "shipped_reranker_dir",
]


def Reranker(  # noqa: N802 - a factory with the name of the thing it makes, as in `rerankers`
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    **kwargs: Any,
) -> BaseReranker:
    """Load a reranker by name, path or Hub id, choosing the implementation from its config.

    A Hub id (``org/name[@revision]``) comes from the Hugging Face cache, else is downloaded unless offline;
    ``revision``, ``local_files_only`` and ``show_progress`` work as in :class:`tamis.Embedder`.

    ``dtype="auto"`` (default) is bfloat16 on CPUs with native bf16 and on GPUs, float32 elsewhere (see
    :mod:`tamis.hardware`); an explicit dtype wins. ``compile`` (True, False, ``"auto"``: BERT-family models,
    see :class:`tamis.Embedder`) passes on; the listwise decoder runs eager."""
    from tamis.embed import Embedder

    hub = {"revision": kwargs.pop("revision", None), "local_files_only": kwargs.pop("local_files_only", None),
           "show_progress": kwargs.pop("show_progress", True)}
    key = None if name_or_path is None else str(name_or_path).lower()
    if key in (None, "default", SHIPPED_RERANKER):
        shipped = shipped_reranker_dir()
        if shipped is not None:
            return CrossEncoderReranker(shipped, SHIPPED_RERANKER, device=device, dtype=dtype, **kwargs)
        if key == SHIPPED_RERANKER:
            raise ModelNotFoundError(SHIPPED_RERANKER, [str(_SHIPPED_DIR)])
    if key in EMBEDDING_RERANKER_ALIASES or key in (None, "default"):
        embedder = Embedder(None, device=device, dtype=dtype, **kwargs)
        return EmbeddingReranker(embedder, name=embedder.name)
    model_dir = resolve_model_dir(name_or_path, **hub)
    name = model_name(name_or_path)
    config = load_config(model_dir)
    if config.get("model_type") == ENSEMBLE_MODEL_TYPE:
        return EnsembleReranker.from_dir(model_dir, device=device, dtype=dtype, name=name)
    family = detect_family(config)
    if family == "qwen3-listwise":
        from tamis.rerank.listwise import ListwiseReranker

        if kwargs.pop("compile", "auto") is True:
            raise InvalidInputError(f"compile=True is available for BERT-family models, not {name} ({family})")
        rr = ListwiseReranker(model_dir, device=device, dtype=dtype, **kwargs)
        rr.name = name
        return rr
    if family == "bert" and is_cross_encoder(config):
        return CrossEncoderReranker(model_dir, name, device=device, dtype=dtype, **kwargs)
    return EmbeddingReranker(Embedder(model_dir, device=device, dtype=dtype, **kwargs), name=name)


_SHIPPED_DIR = Path(__file__).resolve().parent / "weights" / SHIPPED_RERANKER


def shipped_reranker_dir() -> Path | None:
    """The packaged tamis-reranker-tiny directory, or None when this install does not hold its weights."""
    return _SHIPPED_DIR if (_SHIPPED_DIR / "model.safetensors").is_file() else None


def __getattr__(name: str) -> Any:
    if name == "ListwiseReranker":  # imported lazily: it pulls in the Qwen3 model code
        from tamis.rerank.listwise import ListwiseReranker

        return ListwiseReranker
    if name == "SpladeReranker":
        from tamis.rerank.sparse import SpladeReranker

        return SpladeReranker
    raise AttributeError(name)
