"""XQuAD question -> paragraph retrieval, mono- and cross-lingual (queries in one language, corpus in
another; query and paragraph ids are shared across languages).

    python benchmarks/eval_xquad.py [--pairs en-de,de-en,en-en,de-de] [--systems bm25,dense] [--no-title]

XQuAD paragraph titles are the English Wikipedia article names in every language; ``--no-title`` leaves
them out, which is the fairer cross-lingual setting (the default indexes title + " " + text, as BEIR).
Prints nDCG@10 and Hit@10 per (queries -> corpus, system).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tamis.evaluate import evaluate
from tamis.evaluate.report import format_table, write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "xquad"))
    p.add_argument("--pairs", default="en-de,de-en,en-en,de-de", help="QUERYLANG-CORPUSLANG, comma separated")
    p.add_argument("--systems", default="bm25,dense")
    p.add_argument("--model", default=None)
    p.add_argument("--no-title", action="store_true")
    p.add_argument("--out", default="reports/eval-xquad.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    root = Path(args.data)
    rows = []
    for pair in args.pairs.split(","):
        qlang, clang = pair.split("-")
        for system in args.systems.split(","):
            r = evaluate(root / clang, queries_dir=root / qlang, first_stage=system, model=args.model,
                         with_title=not args.no_title, show_progress=not args.quiet)
            m = r.final.metrics
            rows.append({"queries": qlang, "corpus": clang, "system": system,
                         "model": r.config.get("model", "bm25"), "nDCG@10": m["nDCG@10"], "Hit@10": m["Hit@10"],
                         "MRR@10": m["MRR@10"], "n": m.n_queries})
    print(f"XQuAD ({'text only' if args.no_title else 'title + text'})")
    print(format_table(rows))
    write_json({"with_title": not args.no_title, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
