"""``tamis serve``: the command line of the HTTP server.

The lead's ``tamis.cli`` calls :func:`register` on its subparsers; ``python -m tamis.server`` runs the same
command standalone. Building the parser imports only the standard library and :mod:`tamis.server.settings`
(no FastAPI, uvicorn or torch), so ``tamis serve --help`` and argument errors answer at once; the app, the
models and uvicorn are imported when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tamis.cli import add_compile_argument
from tamis.server.settings import ServerSettings, keys_from_env

LOADER_THREAD = "tamis-loader"  # the thread tamis.server.app starts to load the models

logger = logging.getLogger("tamis.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH_OR_ID`` -> (served name, model); ``PATH_OR_ID`` -> (None, model).

    A ``=`` only counts as the separator when the left side is not itself an existing path.
    """
    if "=" in spec:
        name, _, model = spec.partition("=")
        if name and model and not os.path.exists(spec):
            return name.strip(), model.strip()
    return None, spec


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve embedding and reranker models over HTTP (Jina / OpenAI / Cohere compatible)",
        description=(
            "Serve models over HTTP. With no arguments: the default embedding model (all-MiniLM-L6-v2) and the "
            "default reranker on 127.0.0.1:8080. Routes: POST /v1/embeddings, /v1/rerank, /v2/rerank; "
            "GET /v1/models, /health (200 once every model is loaded, 503 before), /livez (200 while the process "
            "serves HTTP), /metrics, /docs. The port opens at once; models load (and download) in the background, "
            "and a model that fails to load stops the server with a non-zero exit status."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=serve_command)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    p.add_argument("--embedding-model", action="append", default=None, metavar="[NAME=]MODEL",
                   help="embedding model: local dir, Hugging Face id org/name[@revision] (cache, else download), or "
                        "'default'; repeat to serve several "
                        "(requests pick one with their 'model' field); NAME= sets the served name")
    p.add_argument("--reranker-model", action="append", default=None, metavar="[NAME=]MODEL",
                   help="reranker model (cross-encoder, listwise, ensemble; 'default' = the cosine similarity of the "
                        "bundled all-MiniLM-L6-v2's embeddings, as 'embedding', until a tamis-reranker-tiny ships with "
                        "the package: none does yet); repeatable")
    p.add_argument("--offline", action="store_true",
                   help="never touch the network: Hub ids load from the Hugging Face cache only (fill it with "
                        "`tamis pull`); sets HF_HUB_OFFLINE=1 for the whole process")
    p.add_argument("--no-embedding", action="store_true", help="serve no embedding model")
    p.add_argument("--no-reranker", action="store_true", help="serve no reranker")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeatable; also TAMIS_API_KEYS=k1,k2)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="auto (default): bfloat16 on CPUs with native bf16 and on GPUs, else float32; the choice "
                        "is logged per model at start-up")
    add_compile_argument(p)
    p.add_argument("--max-inputs", type=int, default=d.max_inputs, help=f"inputs per request (default {d.max_inputs})")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="tokens per input when truncate=false (default: the model's context)")
    p.add_argument("--max-request-tokens", type=int, default=None,
                   help="tokens per embedding request (after truncation); more is a 400 (default: no cap beyond "
                        "--max-inputs x the model's context). Big requests share the model fairly either way: "
                        "requests take turns batch by batch")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"request body limit (default {d.max_request_bytes})")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="padded tokens per forward pass (default: 4096 on CPU, 16384 on accelerators)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help=f"rows per forward pass (default {d.max_batch_size})")
    p.add_argument("--max-padding", type=_padding, default=d.max_padding,
                   help=f"padding bound of a batch as a fraction of its tokens (default {d.max_padding}); 'none' fills "
                        "the token budget instead (better on GPUs). Models that run packed (BERT-family embedders) "
                        "compute no padding: their batches fill the budget in real tokens whatever this says")
    p.add_argument("--max-queued-inputs", type=int, default=d.max_queued_inputs,
                   help=f"per-model queue bound in inputs; beyond it requests get 429 (default {d.max_queued_inputs})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help="seconds from a request's arrival (body, tokenizing, queue wait and model time) after which "
                        f"it gets 503 and its work is given up (default {d.request_timeout_s:g})")
    c = p.add_argument_group("connections")
    c.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="at this many open connections a new one closes the oldest one still waiting for a request; "
                        f"when all are busy, the new one is closed at once (default {d.max_connections})")
    c.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a connection may take to send a complete request head before it is closed "
                        f"(default {d.header_timeout_s:g})")
    c.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help=f"seconds to receive a request body, else 408 (default {d.body_timeout_s:g})")
    c.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout_s,
                   help=f"seconds an idle kept-alive connection stays open (default {d.keep_alive_timeout_s:g})")
    c.add_argument("--graceful-timeout", type=float, default=d.graceful_timeout_s,
                   help="on SIGTERM / Ctrl-C: seconds to finish admitted requests; the rest get 503 + Retry-After "
                        f"(default {d.graceful_timeout_s:g})")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (by default it needs the key when one is set)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _padding(value: str) -> float | None:
    return None if value.lower() in ("none", "off") else float(value)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    keys = list(args.api_key or []) + keys_from_env()
    return ServerSettings(
        max_inputs=args.max_inputs,
        max_input_tokens=args.max_input_tokens,
        max_request_bytes=args.max_request_bytes,
        max_request_tokens=args.max_request_tokens,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        max_padding=args.max_padding,
        max_queued_inputs=args.max_queued_inputs,
        request_timeout_s=args.request_timeout,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_timeout_s=args.keep_alive_timeout,
        graceful_timeout_s=args.graceful_timeout,
        api_keys=keys,
        public_metrics=args.public_metrics,
    )


def load_models(
    embedding_specs: Sequence[str], reranker_specs: Sequence[str], device: str = "cpu", dtype: str = "auto",
    compile: str = "auto", offline: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load models by spec; served name = ``NAME=`` if given, else the model's own name. ``compile``: the
    ``--compile`` choice (auto, on, off); a compiled model pays its warm-up here, before /health is ready.
    Hub ids come from the Hugging Face cache, else are downloaded (progress on stderr) unless ``offline``."""
    import tamis
    from tamis.cli import compile_kwargs
    from tamis.models.loading import DEFAULT_MODEL_ALIASES
    from tamis.rerank import EMBEDDING_RERANKER_ALIASES, EmbeddingReranker, shipped_reranker_dir

    def bundled(model: str) -> str:  # every spelling of the bundled all-MiniLM-L6-v2 shares one copy
        return "default" if model.lower() in DEFAULT_MODEL_ALIASES | EMBEDDING_RERANKER_ALIASES else model

    hub = {"local_files_only": True} if offline else {}
    embedders: dict[str, Any] = {}
    rerankers: dict[str, Any] = {}
    by_spec: dict[str, Any] = {}
    for spec in embedding_specs:
        name, model = parse_model_spec(spec)
        emb = tamis.Embedder(None if model == "default" else model, device=device, dtype=dtype,
                             **compile_kwargs(compile), **hub)
        by_spec[bundled(model)] = emb
        _add(embedders, name or emb.name, emb, "embedding")
    for spec in reranker_specs:
        name, model = parse_model_spec(spec)
        # the default reranker is the shipped cross-encoder when the package holds it
        if bundled(model) in by_spec and not (model == "default" and shipped_reranker_dir() is not None):
            # the same embedding model on both routes: one copy in memory, one worker per route
            rr = EmbeddingReranker(by_spec[bundled(model)], name=by_spec[bundled(model)].name)
        else:
            rr = tamis.Reranker(None if model == "default" else model, device=device, dtype=dtype,
                                **compile_kwargs(compile), **hub)
        _add(rerankers, name or rr.name, rr, "reranker")
    if embedding_specs or reranker_specs:
        from tamis.hardware import cpu_info

        logger.info("CPU: %s", cpu_info().describe())
        if cpu_info().bf16_native and str(device).startswith("cpu"):
            from tamis.models.kernels import attention_path

            logger.info("packed bf16 attention: %s", attention_path())
        for kind, table in (("embedding", embedders), ("reranker", rerankers)):
            for served, model in table.items():
                logger.info("%s model %s: %r", kind, served, model)  # repr: dtype, packed, compiled and why
    return embedders, rerankers


def _add(table: dict[str, Any], name: str, model: Any, kind: str) -> None:
    if name in table:
        raise ValueError(f"two {kind} models are served as {name!r}; give one another name with NAME=MODEL")
    table[name] = model


def serve_command(args: argparse.Namespace) -> int:
    from tamis.server.app import create_app
    from tamis.server.auth import startup_message
    from tamis.server.runner import run

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    logger.setLevel(args.log_level.upper())  # also when `tamis` configured the root logger quieter
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"tamis serve: {exc}", file=sys.stderr)
        return 2
    from tamis.server.memory import tune_allocator

    # before torch loads: native memory that stays flat whatever the variety of batch shapes (issue 34, E)
    tuned = tune_allocator()
    logger.debug("allocator settings: %s", ", ".join(f"{k}={v}" for k, v in tuned.items()) or "none (not glibc)")
    emb_specs = [] if args.no_embedding else (args.embedding_model or ["default"])
    rr_specs = [] if args.no_reranker else (args.reranker_model or ["default"])
    if not emb_specs and not rr_specs:
        print("tamis serve: nothing to serve (both --no-embedding and --no-reranker)", file=sys.stderr)
        return 2
    if args.offline:  # huggingface_hub reads this once, at import: set both, so nothing in the process goes out
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub_constants = sys.modules.get("huggingface_hub.constants")
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    from tamis.models.loading import resolve_device

    if args.device != "cpu":  # a device this torch cannot use: one `tamis: error:` line before the port opens
        resolve_device(args.device)  # (the CPU needs no check: torch then loads with the models, port open)
    level, message = startup_message(len(settings.api_keys), args.host)
    logger.log(level, message)
    app = create_app(settings=settings, loader=lambda: load_models(emb_specs, rr_specs, args.device, args.dtype,
                                                                       args.compile, args.offline))
    logger.info("serving on http://%s:%d (docs at /docs); loading models: embedding %s, reranker %s",
                args.host, args.port, emb_specs, rr_specs)
    try:
        load_error = run(app, settings, args.host, args.port, args.log_level)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn re-raises it once the server has stopped
        exit_while_loading(130, "tamis: interrupted")
        raise
    if load_error is not None:  # the server stopped because a model could not be loaded
        exit_while_loading(1, f"tamis: error: model loading failed: {load_error}")
        print(f"tamis: error: model loading failed: {load_error}", file=sys.stderr)
        return 1
    exit_while_loading(0, "")
    return 0


def exit_while_loading(code: int, message: str) -> None:
    """Stop the process now if the model loader thread is still running (the server was stopped during
    start-up): an interpreter shutting down beside a thread inside torch (importing it, loading or compiling
    a model) aborts with ``terminate called without an active exception`` (exit 134). Nothing of a half-loaded
    model needs saving, so the process ends with ``os._exit`` after flushing its output. Returns when no
    loader is running."""
    import threading

    if not any(t.name == LOADER_THREAD and t.is_alive() for t in threading.enumerate()):
        return
    if message:
        print(message, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tamis")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))
