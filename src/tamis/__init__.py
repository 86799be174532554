"""tamis: self-hosted embeddings, rerankers, evaluation and serving.

>>> import tamis
>>> emb = tamis.Embedder()                 # bundled all-MiniLM-L6-v2, no download
>>> rr = tamis.Reranker()                  # embedding-similarity reranker on the default model

The public names below are imported on first use (PEP 562), so ``import tamis`` and the command line's
``--help`` do not pay for torch; ``tamis.errors`` is light and imported at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tamis import errors

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Chunk": "tamis.embed",
    "EmbedResult": "tamis.embed",
    "Embedder": "tamis.embed",
    "TruncationWarning": "tamis.embed",
    "SparseEmbedder": "tamis.embed_sparse",
    "SparseEmbedding": "tamis.embed_sparse",
    "RankResult": "tamis.rerank",
    "RankedResults": "tamis.rerank",
    "Reranker": "tamis.rerank",
}

__all__ = [
    "Chunk",
    "EmbedResult",
    "Embedder",
    "RankResult",
    "RankedResults",
    "Reranker",
    "SparseEmbedder",
    "SparseEmbedding",
    "TruncationWarning",
    "errors",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from tamis.embed import Chunk, Embedder, EmbedResult, TruncationWarning
    from tamis.embed_sparse import SparseEmbedder, SparseEmbedding
    from tamis.rerank import RankedResults, RankResult, Reranker


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tamis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
