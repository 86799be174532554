"""Model cards: what a trained model is, what it was trained on (with the data licences), how, and how
well it does."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# licences of the sets in ../shared/data (its README); other sets are reported as "see source"
DATA_LICENCES = {
    "scifact": "CC BY-NC 2.0",
    "trec-dl21": "MS MARCO terms (non-commercial research)",
    "xquad": "CC BY-SA 4.0",
    "llamaindex-10k-lyft": "no licence stated",
    "ares-pairs": "Apache-2.0",
    "noveleval": "Apache-2.0 (repo)",
    "cosqa-dev": "C-UDA",
}


def data_licence(name: str) -> str:
    base = Path(str(name).split(":")[0].rstrip("/")).name
    for key, lic in DATA_LICENCES.items():
        if base.startswith(key):
            return lic
    return "see the data set's source"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def reranker_card(
    name: str,
    summary: str,
    architecture: Mapping[str, Any],
    init: str,
    data: Sequence[str],
    recipe: Mapping[str, Any],
    metrics: Sequence[Mapping[str, Any]] = (),
    command: str | None = None,
    notes: Sequence[str] = (),
    model_licence: str = "Apache-2.0",
    base_licences: Mapping[str, str] | None = None,
    kind: str = "cross-encoder",
) -> str:
    """A Markdown model card (README.md) for a ``"cross-encoder"`` or ``"listwise"`` reranker."""
    if kind == "listwise":
        use_extra = ""
        scores = ("Scores are cosines (in [-1, 1]) between each document's projected vector and the query's, "
                  "read in one causal pass over the whole list.")
    else:
        use_extra = ("\n\nfrom sentence_transformers import CrossEncoder   # the same scores\n"
                     "CrossEncoder(\"path/to/this/directory\").predict([(\"query\", \"doc 1\")])")
        scores = "Scores are `sigmoid(logit)` of the single output."
    data_rows = [{"data": d, "licence": data_licence(d)} for d in data]
    arch = ", ".join(f"{k} {v}" for k, v in architecture.items())
    recipe_rows = [{"setting": k, "value": v} for k, v in recipe.items()]
    parts = [
        f"---\nlicense: {model_licence.lower()}\nlibrary_name: tamis\npipeline_tag: text-ranking\ntags:\n"
        f"- {kind}\n- reranker\n---\n",
        f"# {name}\n\n{summary}\n",
        "## Use\n\n```python\nimport tamis\nrr = tamis.Reranker(\"path/to/this/directory\")\n"
        "rr.rerank(\"query\", [\"doc 1\", \"doc 2\"], top_n=1)" + use_extra + "\n```\n",
        f"## Model\n\n{arch}. Initialised from {init}. {scores}\n",
        "## Training data\n\n" + _table(data_rows) + "\n\nNo test query of any evaluation set was used for "
        "training or for model selection (dev metrics come from queries held out of the training sets).\n",
        "## Recipe\n\n" + (f"```bash\n{command}\n```\n\n" if command else "") + _table(recipe_rows) + "\n",
    ]
    if metrics:
        parts.append("## Evaluation\n\n" + _table(metrics) + "\n")
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    lic = [f"- Model weights: {model_licence}."]
    for what, licence in (base_licences or {}).items():
        lic.append(f"- {what}: {licence}.")
    lic.append("- Training data: as listed above; several sets are for non-commercial research only, which "
               "may restrict how models trained on them can be used.")
    parts.append("## Licences\n\n" + "\n".join(lic) + "\n")
    return "\n".join(parts)
