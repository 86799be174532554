"""Throughput of tamis embedding (SciFact documents) and reranking (TREC DL 21 BM25 candidates) against
sentence-transformers on the same weights and texts, in one run; writes JSON and the quality-vs-throughput
plot. A thin wrapper over ``tamis bench``:

    python benchmarks/bench_throughput.py [--docs 1000] [--queries 10] [--repeats 3] \
        [--quality reports/eval-scifact-dense.json --quality reports/eval-trec-dl21-rerank.json]

Defaults: --vs sentence-transformers --plot reports/bench.png --json reports/bench.json.
"""

from __future__ import annotations

import sys

from tamis.evaluate.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    defaults = {"--vs": "sentence-transformers", "--plot": "reports/bench.png", "--json": "reports/bench.json"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    sys.exit(main(["bench", *argv]))
