"""tamis: self-hosted embeddings, rerankers, evaluation and serving.

>>> import tamis
>>> emb = tamis.Embedder()                 # bundled all-MiniLM-L6-v2, no download
>>> rr = tamis.Reranker()                  # embedding-similarity reranker on the default model
"""

from tamis import errors
from tamis.embed import Chunk, Embedder, EmbedResult, TruncationWarning
from tamis.rerank import RankedResults, RankResult, Reranker

__version__ = "0.1.0"

__all__ = [
    "Chunk",
    "EmbedResult",
    "Embedder",
    "RankResult",
    "RankedResults",
    "Reranker",
    "TruncationWarning",
    "errors",
    "__version__",
]
