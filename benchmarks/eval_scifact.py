"""Reproduce the published SciFact (BEIR test) numbers: BM25, dense with the default model, hybrid.

    python benchmarks/eval_scifact.py [--data ../shared/data/scifact] [--stages bm25,dense,hybrid]
                                      [--reranker default --depth 100]

Targets (../shared/data/README.md): BM25 nDCG@10 in [0.64, 0.70] (Pyserini 0.6647-0.6789);
dense all-MiniLM-L6-v2 0.6451 +- 0.001. Corpus embeddings are cached, so a second run is fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tamis.evaluate import evaluate
from tamis.evaluate.report import eval_table, write_json

TARGETS = {"bm25": (0.64, 0.70), "dense": (0.6441, 0.6461)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
    p.add_argument("--stages", default="bm25,dense,hybrid")
    p.add_argument("--model", default=None)
    p.add_argument("--reranker", default=None)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default="reports")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    ok = True
    for stage in args.stages.split(","):
        report = evaluate(args.data, first_stage=stage, model=args.model, reranker=args.reranker, depth=args.depth,
                          cache_dir=args.cache_dir, show_progress=not args.quiet)
        print(eval_table(report))
        write_json(report.to_dict(), Path(args.out_dir) / f"eval-scifact-{stage}{'-rerank' if args.reranker else ''}.json")
        ndcg = report.stage(stage).metrics["nDCG@10"]
        if stage in TARGETS and args.model is None:
            lo, hi = TARGETS[stage]
            hit = lo <= ndcg <= hi
            ok &= hit
            print(f"{stage}: nDCG@10 {ndcg:.4f}, target [{lo}, {hi}]: {'OK' if hit else 'MISSED'}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
