"""HTTP server: Jina / OpenAI embeddings, Jina / Cohere rerank, dynamic batching, auth, limits, metrics.

>>> import tamis
>>> from tamis.server import create_app, ServerSettings
>>> app = create_app({"minilm": tamis.Embedder()}, {"minilm": tamis.Reranker()}, ServerSettings())
"""

from tamis.server.app import create_app
from tamis.server.errors import ApiError
from tamis.server.settings import ServerSettings

__all__ = ["ApiError", "ServerSettings", "create_app"]
