"""``tamis eval`` and ``tamis bench``: :func:`register` adds both to the main parser's subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tamis.cli import add_compile_argument, add_offline_argument, compile_kwargs
from tamis.errors import TamisError


def _default_data_root() -> str:
    return os.environ.get("TAMIS_DATA", "../shared/data")


def _k_values(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers, got {text!r}") from None
    if not ks or min(ks) <= 0:
        raise argparse.ArgumentTypeError("--k values must be positive")
    return ks


def register(subparsers: Any) -> None:
    """Add the ``eval`` and ``bench`` subcommands (handlers set with ``set_defaults(func=...)``)."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate retrieval (BM25 / dense / hybrid / a run file) and reranking on a data set",
        description="Evaluate a first stage and an optional reranker on a BEIR-layout data set; prints a "
        "table and writes a JSON report.",
    )
    p.add_argument("--data", required=True, help="data set directory (corpus.jsonl.gz, queries.jsonl.gz, qrels/)")
    p.add_argument("--split", default="test", help="qrels split (qrels/<split>.tsv); default test")
    p.add_argument("--first-stage", default="bm25", metavar="bm25|dense|sparse|hybrid[:...]|pool|run:FILE",
                   help="first stage; sparse: the --sparse-model's SPLADE vectors; hybrid: BM25 + dense by "
                        "reciprocal rank fusion, or hybrid:[rrf|zscore:]PART[=WEIGHT]+... with parts bm25, dense, "
                        "sparse (e.g. hybrid:zscore:bm25+dense+sparse; the parts are reported beside the fusion); "
                        "run:FILE reads a run file (relative to --data unless absolute); pool: "
                        "each query's judged documents (fixed candidate lists, e.g. NovelEval)")
    p.add_argument("--model", default=None, help="embedding model for dense / hybrid (default: bundled MiniLM)")
    p.add_argument("--sparse-model", default=None, metavar="MODEL",
                   help="SPLADE model (a BertForMaskedLM directory or Hub id) for sparse / hybrid with sparse")
    p.add_argument("--reranker", default=None, help="rerank the first stage's top --depth ('default' or a model)")
    p.add_argument("--depth", type=int, default=100, help="candidates per query given to the reranker")
    p.add_argument("--queries", default=None, metavar="DIR",
                   help="read queries from another data set directory (cross-lingual: same query ids)")
    p.add_argument("--top-k", type=int, default=1000, help="first-stage results per query (default 1000)")
    p.add_argument("--k", type=_k_values, default=[1, 3, 5, 10, 100], help="cutoffs, e.g. 1,3,5,10,100")
    p.add_argument("--relevance-level", type=int, default=None,
                   help="min label counted relevant by binary measures (default 2 for trec-dl*, else 1)")
    p.add_argument("--lang", default=None,
                   help="BM25 stemmer language (PyStemmer name, e.g. german); default from the directory name")
    p.add_argument("--stopwords", default="auto",
                   help="BM25 stop words: auto (English only for English), none, or a bm25s language code")
    p.add_argument("--k1", type=float, default=None, help="BM25 k1 (default 1.2)")
    p.add_argument("--b", type=float, default=None, help="BM25 b (default 0.75)")
    p.add_argument("--no-title", action="store_true", help="index text only, not title + ' ' + text")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default $TAMIS_CACHE or ~/.cache/tamis)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached embeddings")
    p.add_argument("--ann", choices=["auto", "exact", "faiss"], default="auto",
                   help="dense search: exact inner product, faiss HNSW, or auto (faiss above 1M documents)")
    p.add_argument("--ignore-identical-ids", action="store_true", help="drop results whose id equals the query id")
    p.add_argument("--rrf-k", type=int, default=60, help="reciprocal rank fusion constant (hybrid)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto",
                   help="auto (default: bf16 with native bf16 on CPU / on GPU, else float32), float32, bfloat16, int8")
    add_compile_argument(p)
    p.add_argument("--out", default="reports", metavar="DIR",
                   help="directory of the JSON report, named eval-<data>-<first stage>[-<reranker>].json "
                        "(default reports)")
    p.add_argument("--output", default=None, metavar="FILE.json", help="the JSON report's path instead")
    p.add_argument("--max-queries", type=int, default=None, metavar="N",
                   help="a quick run: a seeded random sample of N queries")
    p.add_argument("--corpus-sample", type=int, default=None, metavar="N",
                   help="a quick dense run: search N documents (every judged one of the kept queries plus a "
                        "seeded random sample; scores come out higher than on the whole corpus)")
    p.add_argument("--seed", type=int, default=0, help="seed of --max-queries / --corpus-sample (default 0)")
    p.add_argument("--per-query", action="store_true", help="include per-query metrics in the JSON report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_offline_argument(p)
    p.set_defaults(func=eval_command)

    b = subparsers.add_parser(
        "bench",
        help="throughput of embedding and reranking on real texts (optionally vs sentence-transformers)",
        description="Time embedding (SciFact documents) and reranking (TREC DL 2021 BM25 candidates): "
        "documents/s, documents per 50 ms, batch latency p50/p95, peak memory, and for BERT-family models the useful "
        "GFLOP/s and its % of a quick torch matmul probe of the same dtype at the model's shapes (the practical ceiling "
        "of torch-based code on this machine).",
    )
    b.add_argument("--data", default=_default_data_root(),
                   help="data root holding scifact/ and trec-dl21/ (default $TAMIS_DATA or ../shared/data)")
    b.add_argument("--task", choices=["embed", "rerank", "both"], default="both")
    b.add_argument("--model", default=None, help="embedding model (default: bundled MiniLM)")
    b.add_argument("--reranker", default="default", help="reranker (default: embedding similarity)")
    b.add_argument("--compare-reranker", action="append", default=[], metavar="MODEL",
                   help="also time this reranker on the same candidates, interleaved with --reranker, and print "
                        "its throughput relative to --reranker (repeatable; e.g. a teacher vs its student)")
    b.add_argument("--docs", type=int, default=1000, help="SciFact documents to embed per pass")
    b.add_argument("--batch-size", type=int, default=32, help="documents per embedding call")
    b.add_argument("--queries", type=int, default=10, help="TREC DL 21 queries to rerank per pass")
    b.add_argument("--depth", type=int, default=100, help="BM25 candidates per query to rerank")
    b.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    b.add_argument("--vs", choices=["sentence-transformers"], default=None,
                   help="also time sentence-transformers on the same weights and texts, print the ratio")
    b.add_argument("--plot", default=None, metavar="FILE.png", help="draw quality vs throughput")
    b.add_argument("--quality", action="append", default=[], metavar="REPORT.json",
                   help="eval report(s) giving nDCG@10 for the plot (repeatable)")
    b.add_argument("--quick-eval", action="store_true",
                   help="for the plot, evaluate quality now when no report gives it (SciFact dense / DL21 rerank)")
    b.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the results as JSON to FILE (or stdout with no FILE)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="auto",
                   help="auto (bf16 with native bf16 on CPU / on GPU, else float32), float32, bfloat16, int8")
    b.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile tamis's models (BERT family; warm-up paid before timing and printed): "
                        "auto (default, as the models load by default: where measured to pay, bf16 on CPUs with "
                        "native bf16), on (also bare --compile), off")
    b.add_argument("--no-st-bf16", dest="st_bf16", action="store_false",
                   help="with --vs, skip sentence-transformers under bf16 autocast")
    b.add_argument("--no-ort", dest="ort", action="store_false",
                   help="with --vs, skip ONNX Runtime fp32 / int8 of the embedding model (run when onnxruntime "
                        "and onnx are installed)")
    b.add_argument("--quiet", action="store_true")
    add_offline_argument(b)
    b.set_defaults(func=bench_command)


# ------------------------------------------------------------------------------------------- eval


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def _short(name: str) -> str:
    """The last part of a path or Hub id, without a data file's suffixes: ``../x/run.bm25.tsv`` -> ``run.bm25``."""
    path = Path(name.rstrip("/\\"))
    last = (path.parent.name if path.name in ("model", "checkpoint") and path.parent.name else path.name) or name
    for suffix in (".gz", ".tsv", ".txt", ".trec", ".run", ".jsonl", ".json"):
        last = last.removesuffix(suffix)
    return _slug(last)[:48] or "x"


def default_report_path(dataset: str, stage: str, reranker: str | None = None, out: str | Path = "reports",
                        sampled: bool = False) -> Path:
    """``<out>/eval-<data>-<stage>[-<reranker>][-sample].json`` with short names: a run file by its name, a model by
    the last part of its path or id (``eval-trec-dl21-run.bm25-rerank-tiny.json`` for ``runs/tiny/model``)."""
    kind, _, arg = stage.partition(":")
    run = _short(arg) if kind == "run" and arg else ""
    parts = [_short(dataset), (run if run.startswith("run") else f"run-{run}") if run else _slug(kind)]
    if reranker:
        parts.append("rerank" if reranker == "default" else f"rerank-{_short(reranker)}")
    if sampled:
        parts.append("sample")
    return Path(out) / ("eval-" + "-".join(parts) + ".json")


def eval_command(args: argparse.Namespace) -> int:
    from tamis.evaluate.first_stage import BM25_B, BM25_K1
    from tamis.evaluate.pipeline import evaluate
    from tamis.evaluate.report import eval_table, write_json

    try:
        report = evaluate(
            args.data,
            split=args.split,
            first_stage=args.first_stage,
            model=args.model,
            reranker=args.reranker,
            depth=args.depth,
            queries_dir=args.queries,
            top_k=args.top_k,
            k_values=args.k,
            relevance_level=args.relevance_level,
            lang=args.lang,
            stopwords=None if args.stopwords == "none" else args.stopwords,
            k1=BM25_K1 if args.k1 is None else args.k1,
            b=BM25_B if args.b is None else args.b,
            with_title=not args.no_title,
            cache_dir=False if args.no_cache else args.cache_dir,
            ann=args.ann,
            ignore_identical_ids=args.ignore_identical_ids,
            rrf_k=args.rrf_k,
            sparse_model=args.sparse_model,
            device=args.device,
            dtype=args.dtype,
            show_progress=not args.quiet,
            max_queries=args.max_queries,
            corpus_sample=args.corpus_sample,
            seed=args.seed,
            **compile_kwargs(args.compile),
        )
    except (TamisError, ValueError, FileNotFoundError) as exc:
        print(f"tamis eval: error: {exc}", file=sys.stderr)
        return 2
    print(eval_table(report))
    sampled = args.max_queries is not None or args.corpus_sample is not None
    out = Path(args.output) if args.output else default_report_path(report.dataset, args.first_stage, args.reranker,
                                                                    args.out, sampled)
    if sampled:
        print(f"sample: {report.sizes['queries']} queries, {report.sizes['documents']} documents (seed {args.seed}); "
              "a quick run, not comparable with full-set numbers")
    data = report.to_dict(per_query=args.per_query)
    data["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    write_json(data, out)
    print(f"report: {out}")
    return 0


# ------------------------------------------------------------------------------------------ bench


def _quality_from_reports(paths: list[str]) -> dict[tuple[str, str], float]:
    """(task, model name) -> nDCG@10 from eval reports: dense first stages for embedders, reranked
    stages for rerankers."""
    out: dict[tuple[str, str], float] = {}
    for p in paths:
        d = json.loads(Path(p).read_text(encoding="utf-8"))
        cfg = d.get("config", {})
        for s in d.get("stages", []):
            if "rerank" in s["name"] and cfg.get("reranker"):
                out[("rerank", str(cfg["reranker"]))] = s["metrics"]["nDCG@10"]
            elif s["name"] == "dense" and cfg.get("model"):
                out[("embed", str(cfg["model"]))] = s["metrics"]["nDCG@10"]
    return out


def _quick_quality(args: argparse.Namespace, task: str) -> tuple[float | None, str]:
    from tamis.evaluate.pipeline import evaluate

    root = Path(args.data)
    if task == "embed":
        r = evaluate(root / "scifact", first_stage="dense", model=args.model, device=args.device,
                     dtype=args.dtype, show_progress=not args.quiet)
        return r.stage("dense").metrics["nDCG@10"], "SciFact nDCG@10 (dense)"
    r = evaluate(root / "trec-dl21", first_stage="run:run.bm25.tsv", reranker=args.reranker, depth=args.depth,
                 device=args.device, dtype=args.dtype, show_progress=not args.quiet)
    return r.final.metrics["nDCG@10"], "TREC DL21 nDCG@10 (BM25 top-100 reranked)"


def bench_command(args: argparse.Namespace) -> int:
    from tamis.evaluate.bench import run_bench
    from tamis.evaluate.report import format_table, plot_quality_vs_throughput, write_json

    tasks = ("embed", "rerank") if args.task == "both" else (args.task,)
    try:
        report = run_bench(
            args.data, model=args.model, reranker=args.reranker, tasks=tasks, n_docs=args.docs,
            batch_size=args.batch_size, n_queries=args.queries, depth=args.depth, repeats=args.repeats,
            vs=args.vs, device=args.device, dtype=args.dtype, show_progress=not args.quiet,
            compare_rerankers=args.compare_reranker, st_bf16=args.st_bf16, compile=args.compile, ort=args.ort,
        )
    except TypeError as exc:
        if args.compile == "auto" or "compile" not in str(exc):
            raise
        print(f"tamis bench: error: --compile is for BERT-family embedders and cross-encoders ({exc})", file=sys.stderr)
        return 2
    except (TamisError, ValueError, FileNotFoundError) as exc:
        print(f"tamis bench: error: {exc}", file=sys.stderr)
        return 2
    data = report.to_dict()
    to_stdout = args.json == "-"
    out = sys.stderr if to_stdout else sys.stdout
    cfg = report.config
    print(f"CPU: {cfg.get('cpu')}; torch threads {cfg.get('torch_threads')}", file=out)
    for task in ("embed", "rerank"):
        t = cfg.get(task, {}).get("tamis")
        if t:
            why = f" ({t['requested']}: {t['reason']})" if t.get("reason") else ""
            packed = f", packed={t['packed']}" if t.get("packed") is not None else ""
            if "compile_seconds" in t:
                compiled = f", compiled (warm-up {t['compile_seconds']:.1f} s)"
            else:
                compiled = f", not compiled ({t['compile_reason']})" if t.get("compile_reason") else ""
            print(f"{task}: tamis dtype {t.get('dtype')}{why}{packed}{compiled}", file=out)
            if t.get("attention"):
                print(f"{task}: tamis attention: {t['attention']}", file=out)
    print(format_table([r.row() for r in report.results], floatfmt=".2f"), file=out)
    for task in ("embed", "rerank"):
        for suffix, who in (("", "sentence-transformers"), ("_vs_st_bf16", "sentence-transformers + bf16 autocast"),
                            ("_vs_ort", "ONNX Runtime fp32"), ("_vs_ort_int8", "ONNX Runtime int8 dynamic")):
            if task + suffix in report.ratios:
                paired = report.ratios.get(f"{task}_paired_median{suffix}", float("nan"))
                print(f"{task}: tamis / {who} throughput = {report.ratios[task + suffix]:.2f}x "
                      f"(median of paired per-call speedups: {paired:.2f}x)", file=out)
    for key, value in report.ratios.items():
        if key.startswith("rerank:") and not key.endswith("_paired_median"):
            paired = report.ratios.get(f"{key}_paired_median", float("nan"))
            print(f"rerank: {key.removeprefix('rerank:')} throughput = {value:.2f}x "
                  f"(median of paired per-call speedups: {paired:.2f}x)", file=out)
    for name, value in report.checks.items():
        print(f"check {name}: {value:.6g}" if isinstance(value, float) else f"check {name}: {value}", file=out)
    for key, why in report.skipped.items():
        task, _, who = key.partition(":")
        print(f"{task}: {who or 'sentence-transformers'} skipped ({why})", file=out)

    if args.plot:
        quality = _quality_from_reports(args.quality)
        labels = {"embed": "SciFact nDCG@10 (dense)", "rerank": "TREC DL21 nDCG@10 (BM25 top-100 reranked)"}
        points = []
        for r in report.results:
            tamis_name = next((x.model for x in report.results if x.task == r.task and x.system == "tamis"), r.model)
            q = quality.get((r.task, tamis_name))
            if q is None and args.quick_eval:
                q, labels[r.task] = _quick_quality(args, r.task)
                quality[(r.task, tamis_name)] = q
            points.append({
                "label": f"{'ST' if r.system == 'sentence-transformers' else r.system}: {tamis_name}",
                "group": r.system,
                "panel": "embedding" if r.task == "embed" else "reranking",
                "docs_per_50ms": r.docs_per_50ms,
                "nDCG@10": q,
                "ylabel": labels[r.task],
            })
        path = plot_quality_vs_throughput(points, args.plot, title="Quality vs throughput")
        data["plot"] = {"path": str(path), "points": points}
        print(f"plot: {path}", file=out)

    if args.json:
        if to_stdout:
            print(json.dumps(data, indent=2, default=str))
        else:
            write_json(data, args.json)
            print(f"json: {args.json}", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m tamis.evaluate.cli eval ...``) until the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="tamis")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
