"""Does tokenizing the next slab beside the model pay on this machine? ``Embedder.embed`` on SciFact documents
with the helper thread forced on and forced off (``tamis.embed.tokenize_beside_model``), interleaved, medians.

    python benchmarks/tokenize_overlap.py --docs 2048 --slab 512 --rounds 3 [--torch-threads 1]

``--slab`` sets ``tamis.embed.TOKENIZE_SLAB`` (4,096 by default in tamis; smaller here so a short run has
several slabs); ``--torch-threads 1`` leaves a core free beside the model, as an accelerator would.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tamis
import tamis.embed
from fast_path import scifact
from tamis.hardware import cpu_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=2048)
    p.add_argument("--slab", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=0, help="0: tamis's default (one per physical core)")
    args = p.parse_args()
    docs, _ = scifact(args.docs, 0)
    emb = tamis.Embedder()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tamis.embed.TOKENIZE_SLAB = args.slab
    print(f"CPU: {cpu_info().describe()}\n{emb!r}; torch threads {torch.get_num_threads()}; "
          f"{len(docs)} docs, slabs of {args.slab}")
    emb.embed(docs[:64], show_progress=False)
    times: dict[str, list[float]] = {"in turn": [], "overlapped": []}
    for r in range(args.rounds):
        for name in (times if r % 2 == 0 else reversed(times)):
            tamis.embed.tokenize_beside_model = lambda device, on=(name == "overlapped"): on
            t = time.perf_counter()
            emb.embed(docs, show_progress=False)
            times[name].append(time.perf_counter() - t)
    t0 = time.perf_counter()
    emb.tokenize(docs)
    share = (time.perf_counter() - t0) / statistics.median(times["in turn"])
    for name, ts in times.items():
        print(f"{name:10s} {len(docs) / statistics.median(ts):7.1f} docs/s  (rounds: "
              + ", ".join(f"{t:.2f}s" for t in ts) + ")")
    print(f"tokenizing alone: {share:.1%} of the in-turn time")


if __name__ == "__main__":
    main()
