"""TREC DL 2021 passages: the provided BM25 run (target nDCG@10 0.4458 +- 0.0005) and, optionally, that
run's top-100 reranked, reported side by side.

    python benchmarks/eval_trec_dl21.py [--reranker default|PATH] [--depth 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tamis.evaluate import evaluate
from tamis.evaluate.report import eval_table, write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl21"))
    p.add_argument("--reranker", default=None)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--out", default="reports/eval-trec-dl21-run.bm25.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    report = evaluate(args.data, first_stage="run:run.bm25.tsv", reranker=args.reranker, depth=args.depth,
                      show_progress=not args.quiet)
    print(eval_table(report))
    write_json(report.to_dict(), args.out)
    ndcg = report.stages[0].metrics["nDCG@10"]
    hit = abs(ndcg - 0.4458) <= 0.0005
    print(f"BM25 run nDCG@10 {ndcg:.4f}, target 0.4458 +- 0.0005: {'OK' if hit else 'MISSED'}")
    return 0 if hit else 1


if __name__ == "__main__":
    sys.exit(main())
