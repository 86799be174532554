"""Which pieces of the fast path pay on this CPU: padded vs packed, fused QKV, SDPA backend, torch.compile, int8.

Every variant is a separate model object in this one process; the variants' batches are interleaved (batch j
of every variant, order alternating) for ``--rounds`` rounds, and each variant's per-round total is reported
as a median, with its ratio to the padded float32 baseline and its min cosine against it.

    PYTHONPATH=src python benchmarks/fast_path.py --docs 256 --queries 256 --rounds 3 [--compile] [--bf16] [--int8]

Workloads: SciFact documents (title + text, most near the 256-token cap) and SciFact queries (short, mixed
lengths: where padding costs most), in calls of ``--batch-size`` texts (cross-encoder speed: ``tamis bench
--task rerank``). With ``--bf16`` on a CPU where tamis's fused bf16 attention kernel runs, the last bf16
variant is timed again with torch's attention path ("same, torch attention").
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import tamis  # noqa: E402
from tamis.hardware import cpu_info  # noqa: E402
from tamis.models import packed  # noqa: E402
from tamis.models.kernels import attention_bf16  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "scifact"


def scifact(n_docs: int, n_queries: int) -> tuple[list[str], list[str]]:
    docs = []
    with gzip.open(DATA / "corpus.jsonl.gz", "rt") as f:
        for line in f:
            d = json.loads(line)
            docs.append((d["title"] + " " + d["text"]).strip())
            if len(docs) >= n_docs:
                break
    queries = []
    path = DATA / "queries.jsonl.gz" if (DATA / "queries.jsonl.gz").exists() else DATA / "queries.jsonl"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        for line in f:
            queries.append(json.loads(line)["text"])
            if len(queries) >= n_queries:
                break
    return docs, queries


def unfused(emb: tamis.Embedder) -> tamis.Embedder:
    """Back to three q/k/v projections (the Embedder fuses them by default)."""
    for layer in emb.model.encoder.layer:
        layer.attention.self.qkv_weight = None
    return emb


class TorchAttention:
    """An Embedder run with its packed bf16 attention on torch's matmul + softmax path instead of tamis's fused
    kernel (``tamis.models.kernels``): the same object and compiled graph, the kernel switched off per call."""

    def __init__(self, emb: tamis.Embedder):
        self.emb = emb

    def embed(self, texts: list[str], **kwargs: Any) -> np.ndarray:
        saved = packed.attention_bf16
        packed.attention_bf16 = lambda: None
        try:
            return self.emb.embed(texts, **kwargs)
        finally:
            packed.attention_bf16 = saved


def make_variants(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    padded = unfused(tamis.Embedder(dtype="float32", compile=False))
    padded.packed = False
    out["padded fp32 (before)"] = padded
    out["packed fp32"] = unfused(tamis.Embedder(dtype="float32", compile=False))
    out["packed+fusedQKV fp32"] = tamis.Embedder(dtype="float32", compile=False)
    if args.compile:
        comp = tamis.Embedder(dtype="float32", compile=True)
        print(f"compile warm-up (in the constructor): {comp.compile_seconds:.1f} s")
        out["packed+fused+compile fp32"] = comp
    if args.bf16:
        out["packed bf16"] = tamis.Embedder(dtype="bfloat16", compile=False)
        if args.compile:
            comp = tamis.Embedder(dtype="bfloat16", compile=True)
            print(f"bf16 compile warm-up (in the constructor): {comp.compile_seconds:.1f} s")
            out["packed bf16+compile"] = comp
            if attention_bf16() is not None:
                out["  same, torch attention"] = TorchAttention(comp)
        elif attention_bf16() is not None:
            out["  same, torch attention"] = TorchAttention(out["packed bf16"])
    if args.int8:
        out["packed int8"] = tamis.Embedder(dtype="int8")
    return out


def run(name: str, variants: dict[str, Any], texts: list[str], batch: int, rounds: int) -> None:
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    warm = {}
    for v, emb in variants.items():  # warm-up (compile happens here: measured)
        t0 = time.perf_counter()
        for b in batches[:2]:
            emb.embed(b, show_progress=False)
        warm[v] = time.perf_counter() - t0
    totals: dict[str, list[float]] = {v: [] for v in variants}
    outs: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    names = list(variants)
    for r in range(rounds):
        sums = dict.fromkeys(names, 0.0)
        for j, b in enumerate(batches):
            order = names if (r + j) % 2 == 0 else names[::-1]
            for v in order:
                t0 = time.perf_counter()
                e = variants[v].embed(b, show_progress=False)
                sums[v] += time.perf_counter() - t0
                if r == 0:
                    outs[v].append(e)
        for v in names:
            totals[v].append(sums[v])
    base = names[0]
    ref = np.concatenate(outs[base])
    print(f"\n{name}: {len(texts)} texts, batches of {batch}, {rounds} interleaved rounds (medians)")
    print(f"{'variant':28s} {'texts/s':>9s} {'vs padded':>9s} {'min cos':>9s} {'warm-up s':>9s}")
    for v in names:
        med = statistics.median(totals[v])
        cos = float(np.min(np.sum(ref * np.concatenate(outs[v]), axis=1)))
        ratio = statistics.median(totals[base]) / med
        print(f"{v:28s} {len(texts) / med:9.1f} {ratio:8.2f}x {cos:9.6f} {warm[v]:9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=256)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--int8", action="store_true")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    info = cpu_info()
    print(f"CPU: {info.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    docs, queries = scifact(args.docs, args.queries)
    variants = make_variants(args)
    if args.docs:
        run("SciFact documents", variants, docs, args.batch_size, args.rounds)
    if args.queries:
        run("SciFact queries", variants, queries, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
