"""``tamis batch embed|rerank INPUT OUTPUT``: resumable batch jobs, in-process or on Ray.

Registered by ``tamis.cli`` through :func:`register`; importing this module imports only argparse (the
engines, pyarrow and torch are imported when a job runs). ``python -m tamis.scale.cli embed|rerank ...``
runs the same command on its own (for ``ray job submit -- python -m tamis.scale.cli ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tamis.cli import add_compile_argument, add_offline_argument, compile_kwargs

HELP = "embed or rerank Parquet/JSONL files into Parquet shards (resumable; --ray for Ray Data)"


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "batch",
        help=HELP,
        description=(
            "Map every row of INPUT (a .parquet / .jsonl(.gz) file or a directory of them) into Parquet shards "
            "under OUTPUT: part-FFFFF-SSSSS.parquet, one per --shard-size rows, written atomically. A rerun "
            "skips finished shards, so a killed job resumes where it stopped. Bad rows (null, non-text, empty) "
            "are kept with their reason in the 'error' column (or left out with --skip-bad-rows)."
        ),
    )
    sub = p.add_subparsers(dest="batch_command", required=True)

    e = sub.add_parser("embed", help="rows with a text column -> ids + vectors")
    _io(e)
    e.add_argument("--text-column", action="append", default=None, metavar="NAME",
                   help="column to embed (default 'text'); repeat to join several with a space, e.g. "
                        "--text-column title --text-column text")
    e.add_argument("--task", default=None, help="task (jina-embeddings-v3: retrieval.passage, ...)")
    e.add_argument("--dimensions", type=int, default=None, help="Matryoshka: keep the first N dimensions")
    e.add_argument("--embedding-type", default="float",
                   help="float, base64, binary, ubinary (comma list for several columns)")
    e.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    e.add_argument("--no-truncate", action="store_true",
                   help="flag over-long rows in 'error' instead of cutting them at the model's limit")
    e.set_defaults(func=cmd_batch)

    r = sub.add_parser("rerank", help="rows with query and document columns -> ids + scores")
    _io(r)
    r.add_argument("--query-column", default="query")
    r.add_argument("--document-column", default="document")
    r.set_defaults(func=cmd_batch)
    return p


def _io(p: argparse.ArgumentParser) -> None:
    add_offline_argument(p)
    p.add_argument("input", help="a .parquet or .jsonl/.json/.ndjson(.gz) file, or a directory of them")
    p.add_argument("output", help="output directory of Parquet shards")
    p.add_argument("--model", default=None, help="local directory or Hugging Face id org/name[@revision] (cache, else download; default: bundled)")
    p.add_argument("--keep", action="append", default=None, metavar="COLUMN",
                   help="column to carry into the output (repeatable; default: every column but the text ones)")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave bad rows out instead of flagging them")
    p.add_argument("--shard-size", type=int, default=10_000, help="rows per output shard (default 10000)")
    p.add_argument("--batch-size", type=int, default=512, help="rows per model call (default 512)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="auto (default): bfloat16 where the worker's CPU has native bf16 or on GPUs, else float32; "
                        "pin float32 for identical vectors across unlike workers")
    add_compile_argument(p)
    p.add_argument("--overwrite", action="store_true", help="delete OUTPUT's shards and start again")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (pip install 'tamis[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: a running one from RAY_ADDRESS, else a local one)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray actors (default: one per CPU of the cluster; each gets (CPUs - 1) / workers)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or notes on stderr")


def cmd_batch(args: argparse.Namespace) -> int:
    from tamis.errors import InvalidInputError
    from tamis.scale.job import run_job
    from tamis.scale.mapper import EmbedBatch, RerankBatch

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise SystemExit("tamis batch: needs pyarrow: pip install 'tamis[batch]' (or 'tamis[ray]')") from None
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SystemExit("tamis batch --ray: Ray is not installed: pip install 'tamis[ray]'") from None
    if not args.ray and (args.workers is not None or args.ray_address is not None):
        raise InvalidInputError("--workers and --ray-address need --ray")
    bad_rows = "skip" if args.skip_bad_rows else "flag"
    model_kwargs = compile_kwargs(args.compile)  # each worker's model
    mapper: EmbedBatch | RerankBatch
    if args.batch_command == "embed":
        types = args.embedding_type.split(",") if "," in args.embedding_type else args.embedding_type
        mapper = EmbedBatch(args.model, text_column=args.text_column or "text", keep_columns=args.keep,
                            task=args.task, dimensions=args.dimensions, normalized=not args.no_normalize,
                            embedding_type=types, truncate=not args.no_truncate, bad_rows=bad_rows,
                            device=args.device, dtype=args.dtype, model_kwargs=model_kwargs)
    else:
        mapper = RerankBatch(args.model, query_column=args.query_column, document_column=args.document_column,
                             keep_columns=args.keep, bad_rows=bad_rows, device=args.device, dtype=args.dtype,
                             model_kwargs=model_kwargs)
    report = run_job(args.input, args.output, mapper, shard_size=args.shard_size, batch_size=args.batch_size,
                     use_ray=args.ray, ray_address=args.ray_address, num_workers=args.workers,
                     overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"tamis batch: {report.summary()}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``tamis batch ARGS`` on its own: ``python -m tamis.scale.cli embed IN OUT ...``.

    Errors a user can fix (bad input, a job mismatch, a missing file) are one line, exit status 2 (1 for
    file-system errors); Ctrl-C exits with 130.
    """
    from tamis.errors import TamisError

    parser = argparse.ArgumentParser(prog="tamis", description="Resumable batch embedding and reranking.")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tamis batch: interrupted", file=sys.stderr)
        return 130
    except TamisError as exc:
        print(f"tamis batch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        what = exc.strerror or str(exc) or type(exc).__name__
        print(f"tamis batch: error: {what}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
