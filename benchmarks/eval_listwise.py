"""Evaluate a listwise reranker against BM25 and the embedding reranker, with its sensitivity to the order
of the documents in the prompt and its throughput.

    python benchmarks/eval_listwise.py --model runs/listwise/model \
        [--data trec-dl21 scifact noveleval] [--depth 100] [--max-queries N] [--out results.json] \
        [--records results.jsonl]   # per-query results as they finish; rerun the same command to resume

Per set: BM25 (the set's run.bm25.tsv when present, else tamis's BM25) top ``--depth``, then
- ``embedding``: the bundled all-MiniLM-L6-v2 embedding reranker (tamis.Reranker());
- ``listwise/<order>``: the listwise model reading the candidates in BM25 order (``descending``), reversed
  (``ascending``) or shuffled (``random``, seeded per query) — jina-reranker-v3 reports 62.54 / 61.94 /
  61.52 for random / descending / ascending on BEIR;
with nDCG@10 from the project's metrics (TREC DL: relevance level 2, as trec_eval -l 2) on the same
queries, and documents per second of each reranker. ``--max-queries`` takes a seeded sample of the
judged queries (report it: a sample, not the full set).

Queries run in a seeded random order, every system on a query before the next query, so a run stopped
early has scored a random sample with all systems on the same queries. ``--records FILE`` appends each
(set, query, system) result to a JSONL file as it is done and skips what the file already holds: a run
that is interrupted (or paused and split over sessions) continues where it stopped, and the summary covers
the queries every system has finished (``complete`` says whether that is all of them). Throughput is the
median over queries of documents per second, which a pause in the middle of one query does not move.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

import tamis
from tamis.evaluate.datasets import load_dataset, load_run, sorted_docs
from tamis.evaluate.first_stage import BM25Index, quiet_truncation
from tamis.evaluate.metrics import compute_metrics
from tamis.evaluate.pipeline import default_relevance_level
from tamis.rerank.listwise import ListwiseReranker
from tamis.train.card import cpu_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rerank(rr, query: str, docs: list[str]) -> list[float]:
    quiet = {"show_progress": False} if isinstance(rr, ListwiseReranker) else {}
    with quiet_truncation():
        res = rr.rerank(query, docs, return_documents=False, top_n=None, **quiet)
    scores = [0.0] * len(docs)
    for r in res.results:
        scores[r.index] = float(r.relevance_score)
    return scores


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="listwise reranker directory")
    p.add_argument("--data", nargs="+", default=["trec-dl21", "scifact", "noveleval"])
    p.add_argument("--data-root", type=Path, default=DATA)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--max-queries", type=int, default=None, help="a seeded sample of judged queries per set")
    p.add_argument("--orders", default="descending,random,ascending")
    p.add_argument("--max-doc-length", type=int, default=None, help="listwise: tokens per document (default: model's)")
    p.add_argument("--block-size", type=int, default=None, help="listwise: documents per prompt (default: model's)")
    p.add_argument("--no-embedding", action="store_true", help="skip the embedding reranker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--records", type=Path, default=None,
                   help="JSONL of per-query results: appended as the run goes, skipped when already there (resume)")
    p.add_argument("--summary-only", action="store_true",
                   help="load no model, score nothing: the summary of what --records holds (e.g. while a run goes on)")
    args = p.parse_args()
    if args.summary_only and args.records is None:
        p.error("--summary-only needs --records")

    torch.manual_seed(args.seed)
    print(f"CPU: {cpu_model()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    kwargs = {k: v for k, v in (("max_doc_length", args.max_doc_length), ("block_size", args.block_size)) if v}
    listwise = embedding = None
    if not args.summary_only:
        listwise = tamis.Reranker(args.model, **kwargs)
        print(f"listwise: {listwise!r} block_size {listwise.block_size} max_doc_length {listwise.max_doc_length}")
        embedding = None if args.no_embedding else tamis.Reranker()
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    done: dict[tuple[str, str, str], dict] = {}
    held = args.records.read_text() if args.records is not None and args.records.is_file() else ""
    if held:
        for line in held.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: that query runs again
                continue
            done[(rec["set"], rec["query"], rec["system"])] = rec
        print(f"records: {len(done)} query results already in {args.records}")
    records = args.records.open("a") if args.records is not None and not args.summary_only else None
    if records is not None and held and not held.endswith("\n"):
        records.write("\n")  # after a cut line, start a fresh one
    results = {"cpu": cpu_model(), "model": args.model, "depth": args.depth, "max_queries": args.max_queries,
               "block_size": getattr(listwise, "block_size", None),
               "max_doc_length": getattr(listwise, "max_doc_length", None), "sets": {}}
    for name in args.data:
        ds = load_dataset(args.data_root / name, "test")
        texts = dict(zip(ds.corpus.ids, ds.corpus.documents(True)))
        run_file = ds.path / "run.bm25.tsv"
        if run_file.is_file():
            first = load_run(run_file)
        else:
            index = BM25Index(list(texts.values()), list(texts), lang=ds.lang or "english", show_progress=False)
            first = index.search(ds.queries, k=args.depth, show_progress=False)
        qids = sorted(q for q in ds.queries if q in ds.qrels and first.get(q))
        if args.max_queries and args.max_queries < len(qids):
            qids = sorted(random.Random(f"queries:{args.seed}").sample(qids, args.max_queries))
        level = default_relevance_level(ds)
        qrels = {q: ds.qrels[q] for q in qids}
        cands = {q: [d for d, _ in sorted_docs(first[q])[: args.depth] if d in texts] for q in qids}
        systems = [] if args.no_embedding else [("embedding", embedding, "descending")]
        systems += [(f"listwise/{o}", listwise, o) for o in orders]
        order_q = list(qids)
        random.Random(f"order:{args.seed}").shuffle(order_q)
        for q in tqdm(order_q, desc=name, unit="query"):
            for label, rr, order in systems:
                if (name, q, label) in done or args.summary_only:
                    continue
                docs = list(cands[q])
                if order == "ascending":
                    docs = docs[::-1]
                elif order == "random":
                    random.Random(f"{args.seed}:{q}").shuffle(docs)
                t0 = time.perf_counter()
                scores = rerank(rr, ds.queries[q], [texts[d] for d in docs])
                rec = {"set": name, "query": q, "system": label, "secs": time.perf_counter() - t0,
                       "scores": dict(zip(docs, scores))}
                done[(name, q, label)] = rec
                if records is not None:
                    records.write(json.dumps(rec) + "\n")
                    records.flush()

        labels = [label for label, _, _ in systems]
        finished = [q for q in qids if all((name, q, lb) in done for lb in labels)]
        row: dict = {"queries": len(finished), "of": len(qids), "complete": len(finished) == len(qids),
                     "docs": sum(len(cands[q]) for q in finished)}
        qrels_f = {q: qrels[q] for q in finished}

        def score(run: dict, qrels: dict = qrels_f, level: int = level) -> float:
            return round(compute_metrics(qrels, run, [10], level).mean["nDCG@10"], 4)

        row["bm25"] = score({q: {d: -float(i) for i, d in enumerate(cands[q])} for q in finished})
        for label in labels:
            recs = [done[(name, q, label)] for q in finished]
            rates = sorted(len(r["scores"]) / r["secs"] for r in recs)
            row[label] = score({r["query"]: r["scores"] for r in recs})
            row[f"{label} docs/s"] = round(rates[len(rates) // 2], 2) if rates else None
            print(f"{name}: {label:22s} nDCG@10 {row[label]:.4f}  ({row[f'{label} docs/s']} docs/s, median per query)",
                  flush=True)
        print(f"{name}: bm25 nDCG@10 {row['bm25']:.4f} on {len(finished)} of {len(qids)} queries x top {args.depth}",
              flush=True)
        results["sets"][name] = row
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
