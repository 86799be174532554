"""The one result type of reranking (every backend returns it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RankResult:
    index: int  # position of the document in the caller's list
    relevance_score: float
    document: Any = None  # the caller's document (str or {"text": ...}) when return_documents=True


@dataclass
class RankedResults:
    """Results sorted by ``relevance_score`` descending, ties by ascending index; cut to ``top_n``."""

    query: str
    results: list[RankResult]
    model: str = ""
    total_tokens: int = 0
    truncated: list[int] = field(default_factory=list)  # indices of documents that were cut
    extras: dict[str, Any] = field(default_factory=dict)  # backend extras, e.g. document embeddings

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i):
        return self.results[i]

    @property
    def indices(self) -> list[int]:
        return [r.index for r in self.results]

    @property
    def scores(self) -> list[float]:
        return [r.relevance_score for r in self.results]


def rank(
    query: str,
    scores: list[float],
    documents: list[Any],
    top_n: int | None,
    return_documents: bool,
    **kw: Any,
) -> RankedResults:
    """Sort scores descending (ties by index), cut to top_n, attach documents."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if top_n is not None:
        order = order[: max(int(top_n), 0)]
    results = [
        RankResult(i, float(scores[i]), documents[i] if return_documents else None) for i in order
    ]
    return RankedResults(query=query, results=results, **kw)
