"""What every reranker backend shares: document normalisation and the call signature."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from tamis.errors import InvalidInputError
from tamis.rerank.results import RankedResults


def document_texts(documents: Sequence[Any]) -> list[str]:
    """Texts of documents given as strings or ``{"text": ...}`` objects."""
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise InvalidInputError("documents must be a list of strings or {'text': ...} objects")
    texts = []
    for i, d in enumerate(documents):
        if isinstance(d, str):
            texts.append(d)
        elif isinstance(d, dict) and isinstance(d.get("text"), str):
            texts.append(d["text"])
        else:
            raise InvalidInputError(f"document {i} must be a string or an object with a 'text' string")
    return texts


def query_text(query: Any) -> str:
    if isinstance(query, dict) and isinstance(query.get("text"), str):
        query = query["text"]
    if not isinstance(query, str):
        raise InvalidInputError("query must be a string (or {'text': ...})")
    if not query.strip():
        raise InvalidInputError("query must not be empty")
    return query


@runtime_checkable
class RerankerLike(Protocol):
    """What every backend offers (the server relies on exactly this).

    ``truncate=False``: a text over the model's limit raises :class:`~tamis.errors.InputTooLongError`
    (``what`` "query", "document" or "query + document") instead of being cut. ``progress(done, total)``
    is called between model batches (or listwise blocks); an exception raised there stops the rerank.
    """

    name: str
    kind: str

    def rerank(
        self,
        query: str,
        documents: Sequence[Any],
        top_n: int | None = None,
        return_documents: bool = True,
        *,
        truncate: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> RankedResults: ...
