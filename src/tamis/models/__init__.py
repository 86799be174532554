"""Native PyTorch model families and checkpoint loading.

``detect_family`` reads ``config.json`` and names the implementation:
- ``"xlmr-lora"``: jina-embeddings-v3 (XLM-RoBERTa + rotary + task LoRA), :mod:`tamis.models.xlmr`;
- ``"qwen3-listwise"``: jina-reranker-v3 (Qwen3 decoder + projector), :mod:`tamis.models.qwen3`;
- ``"bert"``: BERT / RoBERTa / JinaBERT encoders and cross-encoders, :mod:`tamis.models.bert`.
"""

from __future__ import annotations

from typing import Any

from tamis.errors import UnsupportedModelError

BERT_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "jina_bert", "mpnet"}


def detect_family(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    model_type = config.get("model_type", "")
    if config.get("lora_adaptations") is not None or config.get("position_embedding_type") == "rotary":
        return "xlmr-lora"
    if model_type == "qwen3" or "JinaForRanking" in archs:
        return "qwen3-listwise"
    if model_type in BERT_TYPES or any(a.startswith(("Bert", "JinaBert", "Roberta", "XLMRoberta", "MPNet")) for a in archs):
        return "bert"
    raise UnsupportedModelError(
        f"model_type {model_type!r} / architectures {archs} is not implemented by tamis; supported: "
        "BERT and RoBERTa encoders (e.g. all-MiniLM-L6-v2, BGE), JinaBERT (jina-embeddings-v2, "
        "jina-reranker-v1-*), jina-embeddings-v3, jina-reranker-v3"
    )


def is_cross_encoder(config: dict[str, Any]) -> bool:
    return any("SequenceClassification" in a for a in (config.get("architectures") or []))
