"""Write a MiniLM-L6-shaped cross-encoder (the speed of ms-marco-MiniLM-L6-v2) for speed benchmarks offline.

No MiniLM-sized cross-encoder ships with tamis and Hugging Face is out of reach here, so this takes the
bundled all-MiniLM-L6-v2 encoder and pooler and adds a seeded random one-logit classifier: the same
architecture, shapes and tokenizer as ms-marco-MiniLM-L6-v2, hence the same speed, but no ranking
quality (use it for throughput and tamis-vs-sentence-transformers agreement only).

    PYTHONPATH=src python benchmarks/minilm_cross_encoder.py /tmp/minilm-ce
    tamis bench --task rerank --reranker /tmp/minilm-ce --vs sentence-transformers
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tamis.models.loading import resolve_model_dir


def write(out: Path) -> Path:
    src = resolve_model_dir(None)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, out / name)
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = {"bert." + k: v for k, v in load_file(src / "model.safetensors").items() if "position_ids" not in k}
    g = torch.Generator().manual_seed(0)
    state["classifier.weight"] = torch.randn(1, config["hidden_size"], generator=g) * 0.05
    state["classifier.bias"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    return out


if __name__ == "__main__":
    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/minilm-ce")))
