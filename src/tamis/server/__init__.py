"""HTTP server: Jina / OpenAI embeddings, Jina / Cohere rerank, dynamic batching, auth, limits, metrics.

>>> import tamis
>>> from tamis.server import create_app, ServerSettings
>>> app = create_app({"minilm": tamis.Embedder()}, {"minilm": tamis.Reranker()}, ServerSettings())

The names below are imported on first use (PEP 562): ``tamis serve --help`` reads only
:mod:`tamis.server.cli` and :mod:`tamis.server.settings`, never FastAPI or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ApiError": "tamis.server.errors",
    "ServerSettings": "tamis.server.settings",
    "create_app": "tamis.server.app",
}

__all__ = ["ApiError", "ServerSettings", "create_app"]

if TYPE_CHECKING:
    from tamis.server.app import create_app
    from tamis.server.errors import ApiError
    from tamis.server.settings import ServerSettings


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
