"""tamis: self-hosted embeddings, rerankers, evaluation and serving."""

__version__ = "0.1.0"
