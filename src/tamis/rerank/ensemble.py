"""Several rerankers as one: a weighted sum of their per-request standardised scores.

Score fusion of dense, sparse and cross-encoder rankers is what a distillation teacher is made of (see
:class:`tamis.train.teachers.EnsembleScorer`, which fits the weights on labelled training lists); this
module runs such a fused ranker on live requests, so the teacher can be evaluated, benchmarked and served
like any other reranker. Scores of each member are z-scored over the request's documents (members have
unrelated scales), then ``scale · Σ_m w_m · z_m``.

A saved ensemble is a directory whose ``config.json`` reads::

    {"model_type": "tamis-ensemble", "scale": 2.6,
     "members": [{"model": "all-MiniLM-L6-v2", "weight": 0.1},
                 {"model": "/models/all-mpnet-base-v2", "weight": 0.4, "max_length": 256},
                 {"model": "/models/splade-tiny", "kind": "splade", "weight": 0.5}]}

``model`` is a name or path (relative paths are relative to the directory); ``kind`` is ``"splade"`` for a
SPLADE masked-LM encoder, otherwise the checkpoint decides (as ``tamis.Reranker`` does); other keys are
passed to the member's loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tamis.errors import CheckpointError
from tamis.rerank.base import BaseReranker, Progress, Usage

MODEL_TYPE = "tamis-ensemble"


def standardize(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Z-scores of one list (a constant list maps to zeros): puts rankers with different scales on one."""
    scores = np.asarray(scores, dtype=np.float32)
    std = scores.std()
    return (scores - scores.mean()) / std if std > 1e-8 else np.zeros_like(scores)


class EnsembleReranker(BaseReranker):
    """``scale · Σ_m w_m · standardize(scores_m)`` over member rerankers."""

    kind = "ensemble"

    def __init__(self, members: Sequence[BaseReranker], weights: Sequence[float], scale: float = 1.0,
                 name: str | None = None, specs: Sequence[dict[str, Any]] | None = None):
        if not members or len(members) != len(weights):
            raise ValueError("an ensemble needs one weight per member, and at least one member")
        self.members = list(members)
        self.weights = [float(w) for w in weights]
        self.scale = float(scale)
        self.name = name or "ensemble(" + "+".join(m.name for m in self.members) + ")"
        self.specs = [dict(s) for s in specs] if specs is not None else None

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:.3g}*{m.name}" for m, w in zip(self.members, self.weights))
        return f"EnsembleReranker(name={self.name!r}: {self.scale:.3g} x ({parts}) of per-request z-scores)"

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "auto", name: str | None = None) -> EnsembleReranker:
        """Load a saved ensemble (see the module doc for ``config.json``)."""
        from tamis.rerank import Reranker
        from tamis.rerank.sparse import SpladeReranker

        root = Path(path)
        config = json.loads((root / "config.json").read_text())
        specs = config.get("members")
        if config.get("model_type") != MODEL_TYPE or not isinstance(specs, list) or not specs:
            raise CheckpointError(f"{root}/config.json is not a tamis ensemble (model_type {MODEL_TYPE!r}, members)")
        members, weights = [], []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or "model" not in spec or "weight" not in spec:
                raise CheckpointError(f"{root}/config.json member {i} needs 'model' and 'weight'")
            extra = {k: v for k, v in spec.items() if k not in ("model", "weight", "kind")}
            model = str(spec["model"])
            local = root / model
            if not Path(model).is_absolute() and local.is_dir():
                model = str(local)
            if spec.get("kind") == "splade":
                members.append(SpladeReranker(model, device=device, **extra))
            else:
                members.append(Reranker(model, device=device, **{"dtype": dtype, **extra}))
            weights.append(float(spec["weight"]))
        return cls(members, weights, float(config.get("scale", 1.0)), name=name or root.name, specs=specs)

    def save(self, path: str | os.PathLike[str], card: str | None = None) -> Path:
        """Write ``config.json`` (members by the specs this ensemble was built from) and a card."""
        if self.specs is None:
            raise ValueError("this ensemble was built from loaded members: give specs=[{'model': ...}, ...] to save it")
        return save_ensemble(path, self.specs, self.weights, self.scale, card)

    def score(self, query: str, documents: Sequence[str], *, truncate: bool = True, progress: Progress | None = None,
              usage: Usage | None = None) -> np.ndarray:
        """Every member scores all documents; the fused scores rank them. ``progress`` counts member
        passes over the documents (``done`` of ``members × documents``)."""
        total = np.zeros(len(documents), dtype=np.float64)
        usage = usage if usage is not None else Usage()
        cut: set[int] = set()
        passes = len(self.members) * len(documents)
        for m, (member, weight) in enumerate(zip(self.members, self.weights)):
            step = None
            if progress is not None:
                def step(done: int, n: int, base: int = m * len(documents)) -> None:
                    progress(base + done, passes)
            part = Usage()
            total += weight * standardize(member.score(query, documents, truncate=truncate, progress=step, usage=part))
            usage.total_tokens += part.total_tokens
            cut.update(part.truncated)
            if part.extras.get("query_truncated"):
                usage.extras["query_truncated"] = True
        usage.truncated = sorted(cut)
        return (self.scale * total).astype(np.float32)


def save_ensemble(path: str | os.PathLike[str], specs: Sequence[dict[str, Any]], weights: Sequence[float],
                  scale: float = 1.0, card: str | None = None) -> Path:
    """Write an ensemble directory (``config.json``, optional README card) without loading its members."""
    if not specs or len(specs) != len(weights):
        raise ValueError("an ensemble needs one weight per member, and at least one member")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    members = [{**s, "weight": float(w)} for s, w in zip(specs, weights)]
    config = {"model_type": MODEL_TYPE, "architectures": ["TamisEnsembleReranker"], "scale": float(scale),
              "members": members}
    (root / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if card is not None:
        (root / "README.md").write_text(card)
    return root
