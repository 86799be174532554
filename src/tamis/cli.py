"""Command line: ``tamis embed | rerank | pull | serve | eval | bench | train | batch``.

Start-up is kept light: this module imports only the standard library and :mod:`tamis.errors` at load
time. ``embed`` and ``rerank`` import torch when they run; the commands of other packages (``serve``,
``eval``, ``bench``, ...) are listed in :data:`PACKAGE_COMMANDS` and their ``register(subparsers)`` module
is imported only when one of its commands is chosen. So ``tamis --help`` and argument errors answer at once.

Errors take one path (:func:`main`): the kinds listed in :func:`error_message` become one ``tamis: error:``
line (``-v`` adds the traceback), Ctrl-C exits with status 130, a closed stdout pipe exits quietly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Collection
from pathlib import Path
from typing import Any

from tamis.errors import InvalidInputError, TamisError

# Commands registered by other packages: command -> (module whose ``register(subparsers)`` adds it, one-line
# help for ``tamis --help``). A package adds its command here, with one line; its register module should
# import only argparse-level code at load time (heavy imports inside the command's function).
PACKAGE_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("tamis.server.cli",
              "serve embedding and reranker models over HTTP (Jina / OpenAI / Cohere compatible)"),
    "eval": ("tamis.evaluate.cli",
             "evaluate retrieval (BM25 / dense / hybrid / a run file) and reranking on a data set"),
    "bench": ("tamis.evaluate.cli",
              "throughput of embedding and reranking on real texts (optionally vs sentence-transformers)"),
    "train": ("tamis.train.cli",
              "train models: rerankers (fine-tune, distil, listwise), embedding models and task adapters"),
    "batch": ("tamis.scale.cli",
              "embed or rerank Parquet/JSONL files into Parquet shards (resumable; --ray for Ray Data)"),
}

# the library's embedding types (tamis.embed.EMBEDDING_TYPES; a test keeps them equal), known here so that
# a wrong --embedding-type is an argument error before torch is imported
EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary", "int8", "uint8")
NPY_TYPES = {"float": "float32", "binary": "int8", "ubinary": "uint8", "int8": "int8", "uint8": "uint8"}
DEFAULT_WRITE_EVERY = 1024
CHARS_CAP_ESTIMATE = 512 * 32  # characters of one input counted for the compile decision, before the model is known
SHOW_PROGRESS_FROM = 64  # inputs


# ------------------------------------------------------------------------------------------- embed


def _fmt(n: int) -> str:
    return f"{n:,}"


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"tamis: {message}", file=sys.stderr)


def _note_blank(args: argparse.Namespace, data: Any) -> None:
    from tamis.cli_io import line_list

    if data.blank_lines:
        n = len(data.blank_lines)
        _note(args, f"skipped {n} blank line{'s' * (n != 1)} of {data.source} (line{'s' * (n != 1)} "
                    f"{line_list(data.blank_lines)}); each output row gives its input \"line\"")


def _note_truncated(args: argparse.Namespace, what: str, lines: list[int], total: int, why: str, hint: str = "") -> None:
    from tamis.cli_io import line_list

    if lines:
        _note(args, f"{len(lines)} of {_fmt(total)} {what} {why} (line{'s' * (len(lines) != 1)} {line_list(lines)})"
                    + (f"; {hint}" if hint else ""))


def _check_no_truncation(emb: Any, texts: list[str], records: list[Any], task: str | None, step: int) -> None:
    """--no-truncate: find an over-long input before computing anything (by characters first, without
    tokenizing: the library's and the server's rule)."""
    from tamis.tokenize import MAX_CHARS_PER_TOKEN

    cap = emb.max_length * MAX_CHARS_PER_TOKEN
    for text, record in zip(texts, records, strict=True):
        if len(text) > cap:
            raise InvalidInputError(
                f"line {record.line} has {len(text):,} characters, more than the {cap:,} that fit the model's limit "
                f"of {emb.max_length} tokens; shorten it, or leave out --no-truncate to cut inputs at the limit")
    for start in range(0, len(texts), step):
        counts = emb.count_tokens(texts[start : start + step], task)
        for j, n in enumerate(counts):
            if n > emb.max_length:
                raise InvalidInputError(
                    f"line {records[start + j].line} has {n} tokens, more than the model's limit of "
                    f"{emb.max_length}; shorten it, or leave out --no-truncate to cut inputs at the limit"
                )


def cmd_embed(args: argparse.Namespace) -> int:
    from tamis.cli_io import EmbeddingOutput, input_digest, output_format, read_records
    from tamis.models.loading import resolve_model_dir

    types: list[str] = args.embedding_type
    if types == ["sparse"]:
        return cmd_embed_sparse(args)
    if args.top_k is not None or args.threshold or args.decode:
        raise InvalidInputError("--top-k, --threshold and --decode are for --embedding-type sparse")
    fmt = output_format(args.output)
    to_npy = fmt == "npy"
    if to_npy and (len(types) != 1 or types[0] not in NPY_TYPES):
        raise InvalidInputError(f".npy output takes one --embedding-type of {', '.join(NPY_TYPES)}")
    if fmt == "csv" and len(types) != 1:
        raise InvalidInputError(".csv output takes one --embedding-type (write .jsonl or .parquet for several)")
    if args.resume and args.output in (None, "-"):
        raise InvalidInputError("--resume needs an output file (-o FILE): stdout cannot be resumed")

    data = read_records(args.input, args.format)
    records = data.records
    if not records:
        raise InvalidInputError(f"no input texts in {data.source}" + (" (only blank lines)" if data.blank_lines else ""))
    if to_npy and data.inner_blank_lines:
        raise InvalidInputError(
            f"{data.source} line {data.inner_blank_lines[0]} is blank: .npy rows have no line numbers, so rows after "
            f"it would not match input lines; remove blank lines (e.g. `grep -v '^[[:space:]]*$'`), or write JSONL "
            f"(-o FILE.jsonl), whose rows give their input \"line\""
        )
    texts = [(r.title + " " + r.text).strip() if args.with_title else r.text for r in records]
    # a missing model fails here, before torch is imported (a Hub id is fetched into the cache here)
    model_dir = resolve_model_dir(args.model, **_hub_kwargs(args))
    from tamis.hardware import resolve_precision

    # "auto" as resolved on this machine: a run resumed where it means another dtype must not mix the two
    precision = resolve_precision(args.dtype, args.device)
    fingerprint = {
        "model": str(model_dir), "dtype": precision.name, "task": args.task, "dimensions": args.dimensions,
        "normalized": not args.no_normalize, "embedding_type": types, "truncate": not args.no_truncate,
        "late_chunking": args.late_chunking, "with_title": args.with_title,
        "inputs": len(texts), "input_sha256": input_digest(records, texts),
    }
    output = EmbeddingOutput(args.output, len(texts), fingerprint, resume=args.resume, input_path=args.input)
    _note_blank(args, data)

    import warnings

    from tqdm.auto import tqdm

    from tamis.embed import Embedder, TruncationWarning

    # an input counts as at most 32 characters per token of a 512-token context: one huge line is cut by
    # characters before tokenizing, so it must not make a small job look like one that repays a compile
    compile_opt, why_not = _one_shot_compile(args.compile, sum(min(len(t), CHARS_CAP_ESTIMATE) for t in texts) // 4)
    emb = Embedder(args.model, device=args.device, dtype=args.dtype, **compile_opt, **_hub_kwargs(args))
    if why_not:
        emb.compile_reason = why_not
    emb.check_task(args.task)
    emb.check_dimensions(args.dimensions)
    step = len(texts) if args.late_chunking else args.write_every
    if args.no_truncate and not args.late_chunking:
        _check_no_truncation(emb, texts, records, args.task, step)
    n = len(texts)
    width = args.dimensions or emb.dimension
    output.open(-(-width // 8) if types[0] in ("binary", "ubinary") else width, NPY_TYPES.get(types[0]))
    resumed = f", resuming after {_fmt(output.done)} done" if output.done else ""
    first_done = output.done
    _note(args, f"{emb!r}: embedding {_fmt(n)} texts into {output.where}{resumed}")

    etype: str | list[str] = types[0] if len(types) == 1 else types
    truncated: list[int] = []
    tokens = 0
    bar = tqdm(total=n, initial=output.done, desc="embed", unit="text", file=sys.stderr,
               disable=args.quiet or n < SHOW_PROGRESS_FROM)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)  # reported below as one line
            opts = {"task": args.task, "dimensions": args.dimensions, "normalized": not args.no_normalize,
                    "embedding_type": etype, "truncate": not args.no_truncate}
            # --write-every texts at a time, the next tokenized while the model runs these where that pays
            if args.late_chunking:  # one document: all or nothing
                chunks = [] if output.done >= n else [
                    (0, emb.embed_result(texts, late_chunking=True, show_progress=False, **opts))]
            else:
                first = output.done
                chunks = ((first + s, r) for s, r in emb.embed_chunks(texts[first:], step, **opts))
            for start, res in chunks:
                output.write(start, records[start : start + step], res.embeddings)
                truncated += [records[start + i].line for i in res.truncated]
                tokens += sum(res.token_counts)
                bar.update(len(res.token_counts))
    except KeyboardInterrupt:
        bar.close()
        output.close()
        kept = (f"; they are in {output.kept_in}: run the same command with --resume to continue"
                if output.path is not None and output.done else "")
        print(f"tamis: interrupted: {_fmt(output.done)} of {_fmt(n)} inputs done{kept}", file=sys.stderr)
        return 130
    bar.close()
    output.finish()
    # a resumed run reports the inputs it embedded itself, against its own count
    _note_truncated(args, "inputs" if not first_done else "inputs embedded by this run", truncated, n - first_done,
                    f"were longer than {emb.max_length} tokens and were cut", "--no-truncate makes that an error")
    _note(args, f"wrote {_fmt(n)} embeddings to {output.where} ({_fmt(tokens)} tokens embedded by this run)")
    return 0


def cmd_embed_sparse(args: argparse.Namespace) -> int:
    """``tamis embed --embedding-type sparse --model SPLADE``: JSONL rows with ``{"indices", "values"}``."""
    import json

    from tamis.cli_io import read_records

    fmt = "jsonl" if args.output in (None, "-") else Path(args.output).suffix.lower().lstrip(".")
    if fmt != "jsonl":
        raise InvalidInputError("--embedding-type sparse writes JSONL (-o FILE.jsonl or stdout)")
    if args.resume or args.late_chunking or args.dimensions is not None:
        raise InvalidInputError("--resume, --late-chunking and --dimensions are not available for sparse embeddings")
    if args.task not in (None, "query", "document"):
        raise InvalidInputError(f"--task for sparse embeddings is query or document, not {args.task!r}")
    data = read_records(args.input, args.format)
    records = data.records
    if not records:
        raise InvalidInputError(f"no input texts in {data.source}")
    texts = [(r.title + " " + r.text).strip() if args.with_title else r.text for r in records]
    _note_blank(args, data)
    from tamis.embed_sparse import SparseEmbedder

    sp = SparseEmbedder(args.model, device=args.device, **_hub_kwargs(args))
    _note(args, f"{sp!r}: {_fmt(len(texts))} texts")
    vectors = sp.embed(texts, args.task, top_k=args.top_k, threshold=args.threshold or 0.0,
                       truncate=not args.no_truncate, show_progress=not args.quiet and len(texts) >= SHOW_PROGRESS_FROM)
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    try:
        for i, (r, v) in enumerate(zip(records, vectors)):
            row: dict[str, Any] = {"index": i, "line": r.line}
            if getattr(r, "id", None) is not None:
                row["id"] = r.id
            row["embedding"] = v.to_dict()
            if args.decode:
                row["terms"] = dict(sp.decode(v, top_k=args.decode))
            out.write(json.dumps(row) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    _note(args, f"wrote {_fmt(len(texts))} sparse embeddings (mean {sum(map(len, vectors)) / len(vectors):.0f} terms)")
    return 0


# ----------------------------------------------------------------------------------------- segment


def cmd_segment(args: argparse.Namespace) -> int:
    """``tamis segment``: one text in, its chunks out as JSONL (``index``, ``start``, ``end``, ``tokens``, ``text``)."""
    import json

    from tamis.segment import CL100K, HFTokenizer, load_tiktoken, segment

    text = sys.stdin.read() if args.input in (None, "-") else Path(args.input).read_text(encoding="utf-8")
    if args.model == CL100K:
        tok: Any = load_tiktoken(CL100K)
    else:
        from tamis.models.loading import load_config, resolve_model_dir
        from tamis.tokenize import Tokenizer

        model_dir = resolve_model_dir(args.model, **_hub_kwargs(args))
        tok = HFTokenizer(str(args.model or "default"), Tokenizer.from_dir(model_dir, load_config(model_dir)))
    seg = segment(text, tok, max_chunk_length=args.max_chunk_length, return_chunks=True)
    for i, ((s, e), chunk) in enumerate(zip(seg.chunk_positions, seg.chunks)):
        row = {"index": i, "start": s, "end": e, "tokens": tok.count(chunk), "text": chunk}
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    _note(args, f"{_fmt(seg.num_tokens)} tokens ({tok.name}) in {_fmt(len(seg.chunks))} chunks of at most "
                f"{args.max_chunk_length}")
    return 0


def _add_segment(sub: Any) -> None:
    p = sub.add_parser(
        "segment", help="split a text into chunks of at most N tokens on paragraph / sentence boundaries",
        description="Split one text (a file, or stdin) into chunks of at most --max-chunk-length tokens of the "
        "model's tokenizer, cut at paragraphs, then lines, sentences and words (tokens only inside a word longer than "
        "the limit). The chunks tile the text exactly; JSONL rows carry index, start, end (character offsets), "
        "tokens and text.")
    p.add_argument("input", nargs="?", default=None, help="text file, or - for stdin (default)")
    p.add_argument("--model", default=None, help="whose tokenizer counts (directory or Hub id; default: bundled); "
                                                   "cl100k_base where tiktoken has it offline")
    p.add_argument("--max-chunk-length", type=_positive_int, default=512, metavar="N", help="tokens (default 512)")
    p.add_argument("--offline", action="store_true", help="Hub ids from the Hugging Face cache only")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes on stderr")
    p.set_defaults(func=cmd_segment)


# ------------------------------------------------------------------------------------------ rerank


def cmd_rerank(args: argparse.Namespace) -> int:
    import json
    import warnings

    from tamis.cli_io import read_records

    data = read_records(args.documents, args.format)
    records = data.records
    if not records:
        raise InvalidInputError(f"no documents in {data.source}" + (" (only blank lines)" if data.blank_lines else ""))
    _note_blank(args, data)

    from tamis.embed import TruncationWarning
    from tamis.rerank import Reranker

    compile_opt, why_not = _one_shot_compile(args.compile, None)
    rr = Reranker(args.model, device=args.device, dtype=args.dtype, **compile_opt, **_hub_kwargs(args))
    if why_not and hasattr(rr, "compile_reason"):
        rr.compile_reason = why_not
    _note(args, repr(rr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)  # reported below as one line
        res = rr.rerank(args.query, [r.text for r in records], top_n=args.top_n)
    if args.json:
        for rank, r in enumerate(res, 1):
            rec = records[r.index]
            row = {"rank": rank, "index": r.index, "line": rec.line, "relevance_score": r.relevance_score,
                   "document": r.document}
            if rec.id is not None:
                row["id"] = rec.id
            print(json.dumps(row))
    else:
        print(f"{'rank':>4}  {'score':>8}  {'line':>5}  document")
        for rank, r in enumerate(res, 1):
            text = " ".join(str(r.document).split())
            line = records[r.index].line
            print(f"{rank:>4}  {r.relevance_score:>8.4f}  {line:>5}  {text[:100]}{'…' if len(text) > 100 else ''}")
    _note_truncated(args, "documents", [records[i].line for i in res.truncated], len(records),
                    "were cut to fit the model's context")
    return 0


# -------------------------------------------------------------------------------------------- pull


def _hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--offline`` / ``-q`` -> the model resolver's ``local_files_only`` / ``show_progress``."""
    return {"local_files_only": True if getattr(args, "offline", False) else None,
            "show_progress": not getattr(args, "quiet", False)}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def cmd_pull(args: argparse.Namespace) -> int:
    """Download (or, offline, check) each model into the Hugging Face cache; print where it lives."""
    from tamis.models.loading import (
        DEFAULT_MODEL_ALIASES,
        hub_snapshot,
        model_size,
        parse_hub_id,
        resolve_model_dir,
    )

    failed = 0
    for model in args.models:
        try:
            hub = parse_hub_id(model)
            if model.lower() in DEFAULT_MODEL_ALIASES or hub is None or os.path.isdir(model):
                where = resolve_model_dir(model)  # bundled or local: nothing to fetch
            else:
                if hub[1] and args.revision and hub[1] != args.revision:
                    raise InvalidInputError(f"{model} names revision {hub[1]!r} and --revision is {args.revision!r}")
                where = hub_snapshot(hub[0], hub[1] or args.revision, refresh=True, **_hub_kwargs(args))
        except Exception as exc:
            known = error_message(exc)
            if known is None:
                raise
            print(f"tamis: error: {known[0]}", file=sys.stderr)
            failed += 1
            continue
        print(f"{model}\t{where}\t{_size(model_size(where))}", flush=True)
    return 2 if failed else 0


def _add_pull(sub: Any) -> None:
    p = sub.add_parser(
        "pull", help="download models into the Hugging Face cache (or check them there) and exit",
        description="Download each model (Hugging Face id, optionally id@revision) into the Hugging Face cache "
        "(HF_HUB_CACHE / HF_HOME), fetching only what tamis loads (configs, tokenizer, safetensors), or find "
        "it there with --offline; then print one line per model: name, directory, size. For baking images "
        "that run offline (`tamis serve --offline`). A local directory or 'default' is only checked.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="Hugging Face id (org/name[@revision]), directory")
    p.add_argument("--revision", default=None, help="branch, tag or commit for ids without @revision")
    p.add_argument("--offline", action="store_true", help="never use the network: only check the cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no download progress on stderr")
    p.set_defaults(func=cmd_pull)


# ------------------------------------------------------------------------------------------ parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _embedding_types(text: str) -> list[str]:
    types = [t.strip() for t in text.split(",")]
    if "sparse" in types:  # a SPLADE model's {indices, values}: its own path (cmd_embed_sparse), alone
        if types != ["sparse"]:
            raise argparse.ArgumentTypeError("sparse is a type of its own: --embedding-type sparse, with no other")
        return types
    bad = [t for t in types if t not in EMBEDDING_TYPES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown type {bad[0]!r}; use {', '.join(EMBEDDING_TYPES)}, or several separated by commas"
        )
    twice = sorted({t for t in types if types.count(t) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{twice[0]!r} is listed twice")
    return types


COMPILE_CHOICES = ("auto", "on", "off")


def add_offline_argument(p: argparse.ArgumentParser) -> None:
    """``--offline`` for every command that loads models: Hub ids come from the Hugging Face cache only (the
    process runs as with ``HF_HUB_OFFLINE=1``, set by :func:`main`)."""
    p.add_argument("--offline", action="store_true",
                   help="never use the network: Hub ids only from the Hugging Face cache (as HF_HUB_OFFLINE=1)")


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    """``--compile auto|on|off`` for every command that loads models (read with :func:`compile_kwargs`)."""
    p.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                   help="torch.compile the model (BERT family): auto (default) where it was measured to pay, "
                        "bf16 on a CPU with native bf16, warm-up paid while loading; on; off. TAMIS_COMPILE=0 "
                        "turns auto off")


def compile_kwargs(choice: str | None) -> dict[str, Any]:
    """``--compile`` -> the models' keyword: nothing for auto (the models' default, so models without a
    ``compile`` argument load as before), ``compile=True/False`` for on/off."""
    if choice in (None, "auto"):
        return {}
    if choice not in COMPILE_CHOICES:
        raise InvalidInputError(f"--compile must be one of {list(COMPILE_CHOICES)}, not {choice!r}")
    return {"compile": choice == "on"}


# Under --compile auto, `tamis embed` compiles only for inputs of at least this many tokens (estimated as
# characters / 4): compiling saves a sixth or more of the eager time (README "Speed") and its warm-up takes
# 6-7 s with inductor's cache warm, 12 s cold, so it repays itself after about a minute of eager work
# (~20k tokens/s on 2 cores). One query's documents (`tamis rerank`) never do.
ONE_SHOT_COMPILE_MIN_TOKENS = 1_000_000


def _one_shot_compile(choice: str, est_tokens: int | None) -> tuple[dict[str, Any], str | None]:
    """``--compile`` for the one-shot commands: auto compiles only for inputs large enough to repay the
    warm-up (``est_tokens``; None: never). Returns the models' keyword and, when auto declined, why."""
    from tamis.hardware import compile_env_off

    if choice != "auto" or compile_env_off():
        return compile_kwargs(choice), None
    if est_tokens is not None and est_tokens >= ONE_SHOT_COMPILE_MIN_TOKENS:
        return {}, None
    size = "one query's documents" if est_tokens is None else f"~{est_tokens:,} tokens of input"
    return {"compile": False}, f"auto: {size} would not repay the compile warm-up"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local directory or Hugging Face id org/name[@revision] (cache, else download; "
                        "default: bundled)")
    p.add_argument("--offline", action="store_true",
                   help="never use the network: Hub ids come from the Hugging Face cache only (as HF_HUB_OFFLINE=1)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="auto (default): bfloat16 on CPUs with native bf16 and on GPUs, else float32; int8: dynamic "
                        "int8 Linear layers (BERT family, CPU; below the bf16 quality bar)")
    add_compile_argument(p)
    p.add_argument("--format", default="auto", choices=["auto", "lines", "jsonl"], help="input format")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or notes on stderr")


def _add_embed(sub: Any) -> None:
    p = sub.add_parser(
        "embed", help="embed text lines or JSONL {'text': ...} into JSONL, .npy, Parquet or CSV",
        description="Embed each non-blank input line (text, or JSONL with a \"text\" field). JSONL output rows "
        "carry \"index\" (row), \"line\" (input line number), \"id\" (when the input has one) and \"embedding\"; "
        "they are written as they are computed, so an interrupted run keeps its rows and --resume continues it. "
        ".npy, .parquet and .csv outputs fill <output>.partial and become <output> when complete. Blank lines are "
        "skipped (and reported).",
    )
    p.add_argument("input", nargs="?", default=None, help="file (lines, JSONL, .gz) or - for stdin (default)")
    _common(p)
    p.add_argument("-o", "--output", default=None,
                   help="output file, its format by suffix: .jsonl, .npy, .parquet (needs pyarrow) or .csv (other "
                        "suffixes are an error); default stdout JSONL")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same -o file (same input and options)")
    p.add_argument("--write-every", type=_positive_int, default=DEFAULT_WRITE_EVERY, metavar="N",
                   help=f"inputs computed between writes to the output, the work lost at most on an interruption "
                        f"(default {DEFAULT_WRITE_EVERY})")
    p.add_argument("--task", default=None, help="task (jina-embeddings-v3: retrieval.query, retrieval.passage, ...)")
    p.add_argument("--dimensions", type=_positive_int, default=None, help="Matryoshka: keep the first N dimensions")
    p.add_argument("--embedding-type", type=_embedding_types, default=["float"], metavar="TYPE[,TYPE]",
                   help="float (default), base64, binary, ubinary, int8, uint8; several separated by commas "
                        "(JSONL / Parquet output); or sparse: a SPLADE --model's {indices, values} (JSONL)")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    p.add_argument("--no-truncate", action="store_true",
                   help="error on over-long inputs instead of cutting them at the model's limit")
    p.add_argument("--late-chunking", action="store_true", help="treat the inputs as consecutive chunks of one text")
    p.add_argument("--with-title", action="store_true", help='JSONL: embed "title" + " " + "text"')
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="N",
                   help="--embedding-type sparse: keep each vector's N largest weights")
    p.add_argument("--threshold", type=float, default=None, help="--embedding-type sparse: drop weights <= this")
    p.add_argument("--decode", type=_positive_int, default=None, metavar="N",
                   help="--embedding-type sparse: add each vector's N heaviest vocabulary terms (\"terms\")")
    p.set_defaults(func=cmd_embed)


def _add_rerank(sub: Any) -> None:
    p = sub.add_parser("rerank", help="rank documents for a query")
    p.add_argument("--query", required=True, help="the query text the documents are ranked for")
    p.add_argument("--documents", required=True, help="file of documents (lines or JSONL), - for stdin")
    p.add_argument("--top-n", type=_positive_int, default=None, metavar="N",
                   help="print only the N most relevant documents (default: all, best first)")
    p.add_argument("--json", action="store_true", help="JSONL output")
    _common(p)
    p.set_defaults(func=cmd_rerank)


def build_parser(load: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``tamis`` parser.

    ``load``: the package commands whose modules are imported and registered (``None``: all of them). The
    others are listed by name and help only, so building the parser imports nothing heavy.
    """
    from tamis import __version__

    parser = argparse.ArgumentParser(prog="tamis", description="Self-hosted embeddings and reranking.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"tamis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_embed(sub)
    _add_rerank(sub)
    _add_pull(sub)
    _add_segment(sub)
    wanted = set(PACKAGE_COMMANDS) if load is None else set(load)
    for module in dict.fromkeys(m for c, (m, _) in PACKAGE_COMMANDS.items() if c in wanted):
        importlib.import_module(module).register(sub)
    for command, (_, help_text) in PACKAGE_COMMANDS.items():
        if command not in sub.choices:  # listed only: parsed for real once it is chosen
            sub.add_parser(command, help=help_text, add_help=False)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse in two steps: the command first (nothing heavy imported), then with its package registered."""
    parser = build_parser(load=())
    first, _ = parser.parse_known_args(argv)
    if first.command in PACKAGE_COMMANDS:
        parser = build_parser(load=[first.command])
    args, extra = parser.parse_known_args(argv)
    if extra:  # the usage of the command the user typed, not the top-level one
        command = _subparsers(parser).get(args.command, parser)
        while True:  # nested commands (train reranker, ...): the innermost one given
            inner = next((p for name, p in _subparsers(command).items() if name in argv), None)
            if inner is None:
                break
            command = inner
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# ------------------------------------------------------------------------------------------ errors


def error_message(exc: BaseException) -> tuple[str, int] | None:
    """One-line message and exit status for the error kinds a user can fix; None for bugs (traceback)."""
    if isinstance(exc, TamisError):
        return str(exc), 2
    if isinstance(exc, UnicodeDecodeError):
        return f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})", 2
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        return (f"{what}: {exc.filename}" if exc.filename else what), 1
    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller model or fewer inputs at a time (--write-every)", 1
    return None


class _Interrupts:
    """Whether Ctrl-C came: an interrupt inside a C extension's import (numpy, torch) surfaces as an ImportError,
    which is then reported as the interruption it is, not as a traceback."""

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = True
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else list(argv)
    _Interrupts.seen = False
    own = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own:
        signal.signal(signal.SIGINT, _Interrupts.handler)
    try:
        return _main(argv)
    finally:
        if own and signal.getsignal(signal.SIGINT) is _Interrupts.handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _main(argv: list[str]) -> int:
    verbose = False
    try:
        args = parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        if not getattr(args, "offline", False):
            return int(args.func(args) or 0)
        before = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"  # every model this command resolves: the cache only
        try:
            return int(args.func(args) or 0)
        finally:
            if before is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = before
    except KeyboardInterrupt:
        print("tamis: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (e.g. `tamis embed ... | head`): stop quietly, as other tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except Exception as exc:
        if _Interrupts.seen:
            print("tamis: interrupted", file=sys.stderr)
            return 130
        known = error_message(exc)
        if known is None:
            raise
        if verbose:
            traceback.print_exc()
        print(f"tamis: error: {known[0]}", file=sys.stderr)
        return known[1]


if __name__ == "__main__":
    sys.exit(main())
