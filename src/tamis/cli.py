"""Command line: ``tamis embed | rerank | serve | eval | bench | train``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tamis.errors import TamisError


def _open_input(path: str | None) -> TextIO:
    if path in (None, "-"):
        return sys.stdin
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"tamis: input file {path} does not exist")
    if p.suffix == ".gz":
        import gzip

        return gzip.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


def read_records(path: str | None, fmt: str = "auto") -> Iterator[dict[str, Any]]:
    """Lines of text, or JSONL objects with a "text" field (optionally "title", "id"/"_id")."""
    with _open_input(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            is_json = fmt == "jsonl" or (fmt == "auto" and line.lstrip().startswith("{"))
            if not is_json:
                yield {"text": line}
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"tamis: line {n} is not valid JSON: {exc}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise SystemExit(f'tamis: line {n} has no "text" string')
            yield obj


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def cmd_embed(args: argparse.Namespace) -> int:
    from tamis.embed import Embedder

    records = list(read_records(args.input, args.format))
    if not records:
        raise SystemExit("tamis: no input texts")
    texts = [(r.get("title", "") + " " + r["text"]).strip() if args.with_title else r["text"] for r in records]
    types = args.embedding_type.split(",") if "," in args.embedding_type else args.embedding_type
    emb = Embedder(args.model, device=args.device, dtype=args.dtype)
    if not args.quiet:
        print(f"tamis: {emb!r}: embedding {len(texts)} texts", file=sys.stderr)
    result = emb.embed_result(
        texts, task=args.task, dimensions=args.dimensions, normalized=not args.no_normalize,
        embedding_type=types, truncate=not args.no_truncate, late_chunking=args.late_chunking,
        show_progress=False if args.quiet else len(texts) >= 64,
    )
    out = result.embeddings
    if args.output and args.output.endswith(".npy"):
        if not isinstance(out, np.ndarray):
            raise SystemExit("tamis: .npy output needs --embedding-type float, binary or ubinary")
        np.save(args.output, out)
    else:
        sink = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            for i, rec in enumerate(records):
                row: dict[str, Any] = {"index": i}
                rid = rec.get("id", rec.get("_id"))
                if rid is not None:
                    row["id"] = rid
                row["embedding"] = _jsonable({k: v[i] for k, v in out.items()} if isinstance(out, dict) else out[i])
                sink.write(json.dumps(row) + "\n")
        finally:
            if sink is not sys.stdout:
                sink.close()
    if not args.quiet:
        msg = f"tamis: {len(texts)} embeddings, {sum(result.token_counts)} tokens"
        if result.truncated:
            msg += f", {len(result.truncated)} truncated to {emb.max_length} tokens (indices {result.truncated[:10]})"
        print(msg, file=sys.stderr)
    return 0


def cmd_rerank(args: argparse.Namespace) -> int:
    from tamis.rerank import Reranker

    records = list(read_records(args.documents, args.format))
    if not records:
        raise SystemExit("tamis: no documents")
    rr = Reranker(args.model, device=args.device, dtype=args.dtype)
    if not args.quiet:
        print(f"tamis: {rr!r}", file=sys.stderr)
    res = rr.rerank(args.query, [r["text"] for r in records], top_n=args.top_n)
    if args.json:
        for rank, r in enumerate(res, 1):
            row = {"rank": rank, "index": r.index, "relevance_score": r.relevance_score, "document": r.document}
            rid = records[r.index].get("id", records[r.index].get("_id"))
            if rid is not None:
                row["id"] = rid
            print(json.dumps(row))
        return 0
    print(f"{'rank':>4}  {'score':>8}  {'index':>5}  document")
    for rank, r in enumerate(res, 1):
        text = " ".join(str(r.document).split())
        print(f"{rank:>4}  {r.relevance_score:>8.4f}  {r.index:>5}  {text[:100]}{'…' if len(text) > 100 else ''}")
    if res.truncated and not args.quiet:
        print(f"tamis: {len(res.truncated)} documents were truncated to fit the model", file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local directory or HF id in the local cache (default: bundled)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--format", default="auto", choices=["auto", "lines", "jsonl"], help="input format")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or notes on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tamis", description="Self-hosted embeddings and reranking.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="embed text lines or JSONL {'text': ...} into JSONL vectors or .npy")
    p.add_argument("input", nargs="?", default=None, help="file (lines, JSONL, .gz) or - for stdin (default)")
    _common(p)
    p.add_argument("-o", "--output", default=None, help="output file (.npy or JSONL); default stdout JSONL")
    p.add_argument("--task", default=None, help="task (jina-embeddings-v3: retrieval.query, retrieval.passage, ...)")
    p.add_argument("--dimensions", type=int, default=None, help="Matryoshka: keep the first N dimensions")
    p.add_argument("--embedding-type", default="float", help="float, base64, binary, ubinary (comma list for several)")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    p.add_argument("--no-truncate", action="store_true", help="error on over-long inputs instead of cutting them")
    p.add_argument("--late-chunking", action="store_true", help="treat the inputs as consecutive chunks of one text")
    p.add_argument("--with-title", action="store_true", help='JSONL: embed "title" + " " + "text"')
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("rerank", help="rank documents for a query")
    p.add_argument("--query", required=True)
    p.add_argument("--documents", required=True, help="file of documents (lines or JSONL), - for stdin")
    p.add_argument("--top-n", type=int, default=None)
    p.add_argument("--json", action="store_true", help="JSONL output")
    _common(p)
    p.set_defaults(func=cmd_rerank)

    from tamis.evaluate.cli import register as register_eval
    from tamis.server.cli import register as register_serve
    from tamis.train.cli import register as register_train

    register_serve(sub)
    register_eval(sub)
    register_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except TamisError as exc:
        print(f"tamis: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
