"""The FastAPI app: Jina / OpenAI embeddings, Jina / Cohere v1 and Cohere v2 rerank, models, health, metrics.

The routes call only the public Embedder / Reranker interfaces:

* embeddings: ``emb.tokenize(texts, task, truncate)`` (small requests on CPU models between model calls on
  the model thread, everything else in the thread pool) -> the model's dynamic batcher (``emb.forward`` over rows of many requests) ->
  ``emb.finalize(pooled, dimensions, normalized, type)``; a ``late_chunking`` request is one job running
  ``emb.embed_result(..., late_chunking=True)``;
* rerank: one job per request running ``rr.rerank(query, documents, top_n, return_documents=False,
  truncate=..., progress=...)``; ``progress`` stops it between batches once the request is given up on.

Before any of that, bodies are parsed and bounded off the event loop (:mod:`tamis.server.body`) and every
text is bounded by characters (``max_chars_per_token`` x the model's token limit): cut when ``truncate``
is true (and reported), refused otherwise, so no single string can hold a tokenizer for seconds.

Wire facts (field names, defaults, shapes) follow ``docs/api.md``. Server defaults that differ from the
library's: ``truncate`` is false for embeddings (Jina API: an over-long input is an error naming its index)
and true for rerank (as Cohere; reported in ``X-Truncated-Inputs`` / ``X-Truncated-Query``),
``normalized`` is true.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from tamis.batching import default_token_budget
from tamis.errors import InputTooLongError, UnknownModelError
from tamis.models.loading import DEFAULT_MODEL_ALIASES
from tamis.server import errors as err
from tamis.server import memory
from tamis.server.auth import DOCS_STATIC, KeyChecker
from tamis.server.batcher import Job, JobStopped, ModelWorker, wait_for
from tamis.server.body import read_body
from tamis.server.errors import ApiError, DeadlineExceeded, NotReady, ShuttingDown, echo
from tamis.server.metrics import Metrics
from tamis.server.middleware import ServerMiddleware
from tamis.server.schemas import (
    CohereEmbedRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    Health,
    ModelList,
    RerankRequest,
    RerankResponseV1,
    RerankResponseV2,
    TextDoc,
    error_responses,
)
from tamis.server.settings import ServerSettings

try:  # optional: serialises numpy arrays directly and ~10x faster than json for large float lists
    import orjson
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    orjson = None  # type: ignore[assignment]
import json

logger = logging.getLogger("tamis.server")

Loader = Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]]]
_IMAGE_KEYS = ("image", "url", "bytes", "pdf")
WORKER_KIND = {"embedding": "embedding", "reranker": "rerank"}  # the ``kind`` label of queue metrics
DRAIN_MARGIN_S = 1.0  # answer the last requests this long before the graceful-shutdown timeout
MODEL_THREAD_CHARS = 32768  # requests up to this many characters may be tokenized on the model thread
TOKENIZE_SLICE_CHARS = 262144  # a big request is tokenized this many characters at a time (a stop between)


# ---------------------------------------------------------------------------- state
class ServerState:
    """Served models, their workers and aliases; readiness and shutdown."""

    def __init__(self, settings: ServerSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.embedders: dict[str, Any] = {}
        self.rerankers: dict[str, Any] = {}
        self.workers: dict[tuple[str, str], ModelWorker] = {}
        self.aliases: dict[str, dict[str, str]] = {"embedding": {}, "reranker": {}}
        self.ready = False
        self.load_error: str | None = None
        self.draining = False
        self.created = int(time.time())
        self.loop: Any = None  # the event loop, set at start-up (drain() is scheduled onto it)
        # called with the one-line reason when the background load fails (`tamis serve` then exits non-zero)
        self.on_load_failed: Callable[[str], None] | None = None

    def register(self, embedders: Mapping[str, Any], rerankers: Mapping[str, Any]) -> None:
        s = self.settings
        for kind, models, target in (("embedding", embedders, self.embedders), ("reranker", rerankers, self.rerankers)):
            for name, model in models.items():
                target[name] = model
                self.workers[(kind, name)] = ModelWorker(
                    name, model, self.metrics, kind=WORKER_KIND[kind],
                    max_batch_tokens=s.max_batch_tokens or default_token_budget(getattr(model, "device", "cpu")),
                    max_batch_size=s.max_batch_size,
                    gather_batches=s.gather_batches, max_queued_inputs=max(s.max_queued_inputs, 1),
                    max_padding=s.max_padding, max_tokenizing_chars=s.max_tokenizing_chars,
                    on_idle=memory.trim,
                )
                table = self.aliases[kind]
                for alias in _aliases(name, model):
                    table.setdefault(alias.lower(), name)
        for name in self.rerankers:  # listed under its own id in /v1/models: requests may use that id too
            if name in self.embedders:
                self.aliases["reranker"].setdefault(reranker_id(name).lower(), name)
        self.metrics.ready.set(1)
        self.ready = True

    def tokenize_on_worker(self, name: str, n_chars: int) -> bool:
        """Tokenize a request on the model thread, between model calls, or in the thread pool?

        On a CPU the model's threads own every core while it runs, and tokenizing beside it slows both;
        so CPU models tokenize small requests (at most :data:`MODEL_THREAD_CHARS` characters, a few
        milliseconds of work) on the model thread. Larger requests always go to the thread pool, so no
        request can hold the model thread: others' batches run while it is tokenized.
        """
        if n_chars > MODEL_THREAD_CHARS:
            return False
        setting = self.settings.tokenize_on_model_thread
        if setting is not None:
            return bool(setting)
        return str(getattr(self.embedders[name], "device", "cpu")).startswith("cpu")

    def start(self) -> None:
        for w in self.workers.values():
            w.start()

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()

    def drain(self, grace_s: float) -> None:
        """Shutdown was asked for (event loop): refuse new work; what is admitted runs until ``grace_s``
        minus :data:`DRAIN_MARGIN_S`, then gets 503 (so every request is answered before the server's
        graceful-shutdown timeout cuts connections)."""
        if self.draining:
            return
        self.draining = True
        self.metrics.ready.set(0)
        at = time.monotonic() + max(0.0, grace_s - DRAIN_MARGIN_S)
        logger.info("shutting down: refusing new requests; answering admitted ones within %.1f s",
                    max(0.0, grace_s - DRAIN_MARGIN_S))
        for w in self.workers.values():
            w.drain(at)

    def ensure_ready(self) -> None:
        if self.draining:
            raise ShuttingDown()
        if self.load_error is not None:
            raise ApiError(503, f"model loading failed: {self.load_error}", code="load_failed",
                           headers={"Retry-After": "60"})
        if not self.ready:
            raise NotReady()

    def lookup(self, kind: str, requested: str | None) -> tuple[str, Any, ModelWorker]:
        """The served model a request names (see README "Model names")."""
        self.ensure_ready()
        models = self.embedders if kind == "embedding" else self.rerankers
        if not models:
            other = "/v1/rerank" if kind == "embedding" else "/v1/embeddings"
            raise ApiError(400, f"this server serves no {kind} model; see GET /v1/models (try {other})",
                           code="model_not_found", param="model")
        key = (requested or "").lower()
        if not key:
            name = next(iter(models))
        elif requested in models:
            name = str(requested)
        elif key in self.aliases[kind]:
            name = self.aliases[kind][key]
        elif key == "default":  # the library's name for its default model; here: this route's default
            name = next(iter(models))
        else:
            exc = UnknownModelError(str(requested), list(models))
            hint = ""
            other_kind = "reranker" if kind == "embedding" else "embedding"
            if key in self.aliases[other_kind]:
                hint = f" ({echo(requested)} is a served {other_kind} model: use the other route)"
            elif len(models) == 1:
                flag = "--embedding-model" if kind == "embedding" else "--reranker-model"
                hint = (f" (to answer requests for this name with the served model, serve it under that name: "
                        f"tamis serve {flag} NAME=MODEL)")
            api = err.from_exception(exc)
            api.message = api.message + hint
            raise api
        return name, models[name], self.workers[(kind, name)]


def reranker_id(name: str) -> str:
    """The /v1/models id of a reranker served under the same name as an embedding model (clients such as
    OpenAI's de-duplicate the list by id): ``NAME:reranker``, also accepted as its ``model`` in requests."""
    return f"{name}:reranker"


def _aliases(name: str, model: Any) -> list[str]:
    out = [name]
    mname = getattr(model, "name", None)
    if isinstance(mname, str) and mname:
        out += [mname, mname.rsplit("/", 1)[-1]]
    if any(a.lower() in DEFAULT_MODEL_ALIASES for a in out):  # the library's default model: its aliases too
        out += sorted(DEFAULT_MODEL_ALIASES)
    return out


# ---------------------------------------------------------------------------- input checks
def _doc_text(item: Any, what: str, param: str) -> str:
    if isinstance(item, TextDoc):
        if item.text is None:
            keys = sorted((item.model_extra or {}).keys())
            if any(k in _IMAGE_KEYS for k in keys):
                raise ApiError(400, f"{what} is an image/PDF document; the served models take text only",
                               code="unsupported_input", param=param)
            shown = ", ".join(echo(k, 32) for k in keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
            raise ApiError(400, f"{what} is an object without a 'text' field (keys: {shown})", code="invalid_input",
                           param=param)
        item = item.text
    if not isinstance(item, str):
        raise ApiError(400, f"{what} must be a string or a {{\"text\": ...}} object", code="invalid_input",
                       param=param)
    if not item.strip() or _invisible(item):
        kind = ("an empty string" if item == "" else "only whitespace" if not item.strip()
                else "only invisible characters (control, format or zero-width characters such as NUL, U+200B, BOM)")
        raise ApiError(400, f"{what} is {kind}: every input must contain text", code="empty_input", param=param)
    return item


_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def _invisible(text: str) -> bool:
    """Whether ``text`` holds only whitespace, control and format characters (NUL, zero-width spaces,
    BOMs): the tokenizer drops them all, so it would be embedded as the empty text."""
    return all(c.isspace() or unicodedata.category(c) in _INVISIBLE for c in text)


def _input_texts(raw: Any) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ApiError(400, "input is an empty list: send at least one text", code="empty_input", param="input")
    if any(isinstance(x, int | list) for x in items):
        raise ApiError(400, "token-id inputs (arrays of integers) are not supported: send the texts as strings",
                       code="unsupported_input", param="input")
    return [_doc_text(x, f"input {i}", "input") for i, x in enumerate(items)]


def clip_texts(texts: list[str], token_limit: int | None, per_token: int, truncate: bool, what: str,
               param: str, side: str = "right") -> tuple[list[str], list[int]]:
    """Bound work by characters before tokenizing: texts over ``token_limit * per_token`` characters are cut
    to that (``truncate``; at the end, or at the start with ``side="left"``; their indices are returned, they
    count as truncated) or refused with 400."""
    if not token_limit:
        return texts, []
    cap = int(token_limit) * per_token
    cut = [i for i, t in enumerate(texts) if len(t) > cap]
    if not cut:
        return texts, []
    if not truncate:
        i = cut[0]
        label = what if what == "query" else f"{what} {i}"
        raise ApiError(
            400,
            f"{label} has {len(texts[i])} characters, more than the {cap} that fit the model's limit of "
            f"{token_limit} tokens (the server refuses texts over {per_token} characters per token without "
            'tokenizing them); shorten it or send "truncate": true to drop the tail',
            code="input_too_long", param=param, extra={"index": None if what == "query" else i,
                                                        "n_chars": len(texts[i]), "char_limit": cap})
    out = list(texts)
    for i in cut:
        out[i] = texts[i][:cap] if side == "right" else texts[i][-cap:]
    return out, cut


def _slices(texts: list[str], chars: int) -> list[tuple[int, int]]:
    """(start, stop) ranges of ``texts`` of about ``chars`` characters each (at least one text each)."""
    out: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= chars:
            out.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(texts):
        out.append((start, len(texts)))
    return out


def _tokenize(emb: Any, texts: list[str], task: str | None, truncate: bool, limit: int | None,
              side: str = "right") -> list[Any]:
    encodings = list(emb.tokenize(texts, task, truncate) if side == "right" else emb.tokenize(texts, task, truncate,
                                                                                              side=side))
    if limit is not None and not truncate:
        for i, e in enumerate(encodings):
            if e.n_tokens > limit:
                raise InputTooLongError(i, int(e.n_tokens), int(limit))
    return encodings


def _check_dimensions(dimensions: int | None, emb: Any) -> None:
    if dimensions is None:
        return
    dim = int(emb.dimension)
    if not 1 <= dimensions <= dim:
        raise ApiError(400, f"dimensions={dimensions} is out of range: model gives 1..{dim} dimensions",
                       code="invalid_dimensions", param="dimensions")


def _output_type(body: EmbeddingRequest) -> str | list[str]:
    out = body.output_type()
    if isinstance(out, list):
        if not out:
            raise ApiError(400, "embedding_type is an empty list: name at least one type", code="invalid_input",
                           param="embedding_type")
        repeated = sorted({t for t in out if out.count(t) > 1})
        if repeated:
            raise ApiError(400, f"embedding_type lists {', '.join(map(repr, repeated))} more than once: the response "
                                "holds one key per type, list each at most once", code="invalid_input",
                           param="embedding_type")
    return out


def _rerank_limits(rr: Any) -> tuple[int | None, int | None]:
    """Token limits of a reranker's query and documents (listwise models bound each separately)."""
    ctx = getattr(rr, "max_length", None)
    return getattr(rr, "max_query_length", None) or ctx, getattr(rr, "max_doc_length", None) or ctx


COHERE_INPUT_TYPES = {  # Cohere input_type -> the first of these tasks / prompts the model has (none: no task)
    "search_query": ("retrieval.query", "query", "search_query"),
    "search_document": ("retrieval.passage", "passage", "document", "search_document"),
    "classification": ("classification",),
    "clustering": ("separation", "clustering"),
}
COHERE_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
COHERE_TRUNCATE = ("NONE", "START", "END")


def _cohere_task(emb: Any, input_type: str | None) -> str | None:
    if input_type is None:
        return None
    if input_type not in COHERE_INPUT_TYPES:
        raise ApiError(400, f"input_type {echo(input_type)} is not one of {', '.join(COHERE_INPUT_TYPES)} (images are "
                            "not supported: the served models take text only)", code="invalid_input",
                       param="input_type")
    tasks = list(getattr(emb, "tasks", []) or [])
    return next((t for t in COHERE_INPUT_TYPES[input_type] if t in tasks), None)


def _cohere_texts(body: Any) -> list[str]:
    if body.images:
        raise ApiError(400, "images are not supported: the served models take text only", code="unsupported_input",
                       param="images")
    if body.texts is not None and body.inputs is not None:
        raise ApiError(400, "send either texts or inputs, not both", code="invalid_input", param="inputs")
    if body.inputs is not None:
        items: list[Any] = []
        for i, inp in enumerate(body.inputs):
            content = inp.get("content")
            parts = content if isinstance(content, list) else []
            if not parts or any(not isinstance(c, dict) or c.get("type") != "text" for c in parts):
                raise ApiError(400, f'inputs {i} must hold text content only: {{"content": [{{"type": "text", '
                                    '"text": ...}]}', code="unsupported_input", param="inputs")
            items.append("".join(str(c.get("text") or "") for c in parts))
        param = "inputs"
    else:
        items = list(body.texts or [])
        param = "texts"
    if not items:
        raise ApiError(400, f"{param} is missing or empty: send at least one text", code="empty_input", param=param)
    return [_doc_text(x, f"{param[:-1]} {i}", param) for i, x in enumerate(items)]


def _cohere_types(body: Any, default: list[str]) -> list[str]:
    types = list(body.embedding_types) if body.embedding_types is not None else default
    bad = [t for t in types if t not in COHERE_TYPES]
    if bad or not types:
        raise ApiError(400, f"embedding_types {bad or types} is not a non-empty list of {', '.join(COHERE_TYPES)}",
                       code="invalid_input", param="embedding_types")
    return list(dict.fromkeys(types))


def _cohere_truncate(body: Any) -> str:
    value = (body.truncate or "END").upper()
    if value not in COHERE_TRUNCATE:
        raise ApiError(400, f"truncate {echo(body.truncate)} is not one of NONE, START, END", code="invalid_input",
                       param="truncate")
    return value


# ---------------------------------------------------------------------------- rendering
def _dumps(obj: Any) -> bytes:
    if orjson is not None:
        try:
            return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # e.g. an echoed document holding an integer beyond 64 bits
            pass
    # ASCII JSON encodes whatever str it is given (a lone surrogate becomes an escape, not an exception)
    return json.dumps(obj, ensure_ascii=True, default=_np_default).encode("ascii")


def _np_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def _row(values: Any, i: int) -> Any:
    if isinstance(values, dict):
        return {k: _row(v, i) for k, v in values.items()}
    if isinstance(values, np.ndarray):
        row = values[i]
        return row if orjson is not None else row.tolist()
    return values[i]  # base64 strings


def render_embeddings(model: str, values: Any, n: int, tokens: int) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": _row(values, i)} for i in range(n)]
    return _dumps({"model": model, "object": "list", "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                   "data": data})


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json", headers=dict(headers or {}))


# ---------------------------------------------------------------------------- app
def create_app(
    embedders: Mapping[str, Any] | None = None,
    rerankers: Mapping[str, Any] | None = None,
    settings: ServerSettings | None = None,
    *,
    loader: Loader | None = None,
) -> FastAPI:
    """Build the app around loaded models (``{served name: Embedder}``, ``{served name: Reranker}``).

    With ``loader`` (a function returning ``(embedders, rerankers)``) the models are loaded in a background
    thread at start-up instead: the port opens at once, ``/health`` answers 503 until loading is done (then
    200; ``"failed"`` with the reason if it failed), and ``/livez`` answers 200 whenever the process serves HTTP.
    """
    settings = settings or ServerSettings()
    metrics = Metrics()
    state = ServerState(settings, metrics)
    keys = KeyChecker(settings.api_keys)
    if loader is None:
        state.register(dict(embedders or {}), dict(rerankers or {}))

    def load() -> None:
        assert loader is not None
        try:
            e, r = loader()
            state.register(dict(e), dict(r))
            state.start()
            logger.info("models ready: embedding %s, reranker %s", list(e), list(r))
        except Exception as exc:  # reported by /health and every model route
            from tamis.errors import TamisError

            if isinstance(exc, TamisError):  # a missing model, a bad device: the message says what to do
                state.load_error = str(exc)
                logger.error("model loading failed: %s", exc)
            else:
                first = (str(exc).strip().splitlines() or [""])[0]
                state.load_error = f"{type(exc).__name__}: {first}".rstrip(": ")
                logger.exception("model loading failed")
            if state.on_load_failed is not None:
                state.on_load_failed(state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        import asyncio

        state.loop = asyncio.get_running_loop()
        if loader is not None:
            threading.Thread(target=load, name="tamis-loader", daemon=True).start()
        else:
            state.start()
        yield
        state.stop()

    # docs assets come from the fastapi-offline package, not a CDN: /docs works on air-gapped networks
    app = FastAPIOffline(
        static_url=DOCS_STATIC,
        title="tamis",
        version=_version(),
        description=(
            "Self-hosted embeddings and reranking with Jina-, OpenAI- and Cohere-compatible routes. "
            "Errors carry `detail` (Jina clients) and `error` (OpenAI clients)."
        ),
        lifespan=lifespan,
    )
    app.state.tamis = state
    err.install(app)
    app.add_middleware(ServerMiddleware, keys=keys, metrics=metrics, max_request_bytes=settings.max_request_bytes,
                       body_timeout_s=settings.body_timeout_s, public_metrics=settings.public_metrics)
    _document_bodies(app, {"/v1/embeddings": EmbeddingRequest, "/v1/rerank": RerankRequest,
                           "/v2/rerank": RerankRequest, "/v2/embed": CohereEmbedRequest})

    common = error_responses(400, 401, 408, 413, 422, 429, 503)
    per_token = settings.max_chars_per_token

    def arrival(request: Request) -> float:
        """When the request's head arrived (set by the middleware): its deadline starts there."""
        return float(request.scope.get("state", {}).get("tamis_arrival") or time.monotonic())

    def time_left(request: Request, worker: ModelWorker) -> float:
        """Seconds left of the request's timeout, counted from its arrival; 503 when none is left (reading,
        parsing and checking the body count: work before admission is under the same deadline)."""
        waited = time.monotonic() - arrival(request)
        left = settings.request_timeout_s - waited
        if left <= 0:
            metrics.dropped.labels(*worker.labels, "deadline").inc()
            raise DeadlineExceeded(waited, worker.retry_after())
        return left

    tasks: set[Any] = set()

    def background(coro: Any) -> None:
        import asyncio

        task = asyncio.ensure_future(coro)
        tasks.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(tasks.discard)

    async def parse(request: Request, model: type[Any], list_field: str) -> Any:
        return await read_body(request, model, settings.json_value_limit, {list_field: settings.max_inputs})

    # ------------------------------------------------------------------ embeddings
    @app.post(
        "/v1/embeddings",
        response_model=None,
        responses={200: {"model": EmbeddingResponse, "description": "one embedding per input, in input order"},
                   **common},
        tags=["embeddings"],
        summary="Embed texts (Jina and OpenAI wire format)",
        openapi_extra=_body_schema(EmbeddingRequest),
    )
    async def embeddings(request: Request) -> Response:
        state.ensure_ready()
        body = await parse(request, EmbeddingRequest, "input")
        name, emb, worker = state.lookup("embedding", body.model)
        texts = _input_texts(body.input)
        task = body.task
        _check_dimensions(body.dimensions, emb)
        if body.return_multivector:
            raise ApiError(400, "return_multivector is not supported by the served models", code="unsupported",
                           param="return_multivector")
        output_type = _output_type(body)
        normalized = settings.default_normalized if body.normalized is None else body.normalized
        truncate = settings.default_truncate if body.truncate is None else body.truncate
        n = len(texts)
        worker.check_capacity(n)
        if body.late_chunking:
            cap = settings.max_late_chunking_tokens
            chars = sum(map(len, texts))
            if chars > cap * per_token:
                raise ApiError(400, f"late_chunking joins all inputs into one sequence: {chars} characters, more than "
                                    f"the {cap * per_token} that fit the server's limit of {cap} tokens",
                               code="input_too_long", param="input")
            counts = await run_in_threadpool(emb.count_tokens, texts, task)
            total = int(sum(counts))
            if total > cap:
                raise ApiError(400, f"late_chunking joins all inputs into one sequence: about {total} tokens, "
                                    f"more than the server's limit of {cap}", code="input_too_long", param="input")

            def run_late(job: Job) -> Any:
                return emb.embed_result(texts, task=task, dimensions=body.dimensions, normalized=normalized,
                                        embedding_type=output_type, truncate=truncate, late_chunking=True,
                                        show_progress=False)

            job = worker.submit_call(run_late, n, time_left(request, worker))
            job.since = arrival(request)
            result = await wait_for(job, request.receive)
            values, tokens, truncated = result.embeddings, int(sum(result.token_counts)), []
        else:
            values, tokens, truncated = await embed_texts(request, name, emb, worker, texts, task, body.dimensions,
                                                          normalized, output_type, truncate, "input")
        payload = await run_in_threadpool(render_embeddings, name, values, n, tokens)
        count(name, n, tokens, truncated)
        return Response(payload, media_type="application/json", headers=_truncated_header(truncated))

    def count(name: str, n: int, tokens: int, truncated: list[int]) -> None:
        metrics.tokens.labels(name, "embeddings").inc(tokens)
        metrics.inputs.labels(name, "embeddings").inc(n)
        if truncated:
            metrics.truncated.labels(name).inc(len(truncated))

    async def embed_texts(request: Request, name: str, emb: Any, worker: ModelWorker, texts: list[str],
                          task: str | None, dimensions: int | None, normalized: bool, output_type: Any,
                          truncate: bool, param: str, side: str = "right") -> tuple[Any, int, list[int]]:
        """Texts through the model's dynamic batcher: (values, tokens, indices of truncated inputs)."""
        n = len(texts)
        check_task = getattr(emb, "check_task", None)
        if check_task is not None:
            check_task(task)  # fail fast, before queueing
        label = "input" if param == "input" else param[:-1]
        texts, cut = clip_texts(texts, getattr(emb, "max_length", None), per_token, truncate, label, param, side)

        def check_tokens(total: int) -> None:
            cap = settings.max_request_tokens
            if cap is not None and total > cap:
                raise ApiError(400, f"the request holds {total} tokens or more, beyond the server's limit of {cap} "
                                    "tokens per request; send fewer or shorter inputs per request",
                               code="request_too_large", param=param)

        def tokenize() -> list[Any]:
            out = _tokenize(emb, texts, task, truncate, settings.max_input_tokens, side)
            check_tokens(sum(len(e) for e in out))
            return out

        chars = sum(map(len, texts))
        if state.tokenize_on_worker(name, chars):
            job = worker.submit_texts(n, tokenize, [task] * n, time_left(request, worker))
        else:
            # admitted now (queue bound, deadline, disconnect), tokenized in the thread pool in slices that
            # stop once the request is given up on; its rows join the batches when they are ready
            job = worker.submit_external(n, [task] * n, time_left(request, worker), chars)

            def tokenize_slices() -> list[Any]:
                out: list[Any] = []
                for start, stop in _slices(texts, TOKENIZE_SLICE_CHARS):
                    if job.dead:
                        raise JobStopped()
                    try:
                        out += _tokenize(emb, texts[start:stop], task, truncate, settings.max_input_tokens, side)
                    except InputTooLongError as exc:
                        raise InputTooLongError(None if exc.index is None else exc.index + start, exc.n_tokens,
                                                exc.limit, exc.what, exc.n_chars, exc.char_limit) from None
                    check_tokens(sum(len(e) for e in out))
                return out

            async def feed() -> None:
                try:
                    encodings = await run_in_threadpool(tokenize_slices)
                except BaseException as exc:  # an over-long input, an unknown task, or given up on
                    worker.provide(job, None, exc)
                else:
                    worker.provide(job, encodings)

            background(feed())
        job.since = arrival(request)
        pooled = await wait_for(job, request.receive)
        encodings = job.encodings or []
        truncated = sorted(set(cut) | {i for i, e in enumerate(encodings) if getattr(e, "truncated", False)})
        tokens = int(sum(len(e) for e in encodings))
        values = await run_in_threadpool(emb.finalize, pooled, dimensions, normalized, output_type)
        return values, tokens, truncated

    # ------------------------------------------------------------------ Cohere embed
    async def cohere_embed(request: Request, version: int) -> Response:
        state.ensure_ready()
        body = await read_body(request, CohereEmbedRequest, settings.json_value_limit,
                               {"texts": settings.max_inputs, "inputs": settings.max_inputs})
        name, emb, worker = state.lookup("embedding", body.model)
        texts = _cohere_texts(body)
        task = _cohere_task(emb, body.input_type)
        _check_dimensions(body.output_dimension, emb)
        limit = getattr(emb, "max_length", None)
        if body.max_tokens is not None and limit is not None and body.max_tokens < int(limit):
            raise ApiError(400, f"max_tokens={body.max_tokens} is below the model's limit of {int(limit)} tokens: "
                                "per-request token limits are not supported (omit max_tokens)", code="unsupported",
                           param="max_tokens")
        floats_only = version == 1 and body.embedding_types is None
        types = _cohere_types(body, ["float"])
        mode = _cohere_truncate(body)
        worker.check_capacity(len(texts))
        param = "inputs" if body.inputs is not None else "texts"
        try:
            values, tokens, truncated = await embed_texts(
                request, name, emb, worker, texts, task, body.output_dimension, True, types, mode != "NONE", param,
                "left" if mode == "START" else "right")
        except InputTooLongError as exc:
            raise ApiError(400, f"{param[:-1]} {exc.index} has {exc.n_tokens} tokens, more than the limit of "
                                f'{exc.limit}; shorten it or send "truncate": "END" (or "START")',
                           code="input_too_long", param=param,
                           extra={"index": exc.index, "n_tokens": exc.n_tokens, "limit": exc.limit}) from None
        except ApiError as exc:  # the character bound's refusal names the Jina field: name Cohere's
            exc.message = exc.message.replace('send "truncate": true', 'send "truncate": "END"')
            raise
        count(name, len(texts), tokens, truncated)
        meta = {"api_version": {"version": str(version), "is_experimental": False},
                "billed_units": {"input_tokens": tokens}}
        if floats_only:
            payload = {"response_type": "embeddings_floats", "id": str(uuid.uuid4()), "embeddings": values["float"],
                       "texts": texts, "meta": meta}
        else:
            payload = {"response_type": "embeddings_by_type", "id": str(uuid.uuid4()), "embeddings": values,
                       "texts": texts, "meta": meta}
        return _json(payload, headers={"X-Model": name, **_truncated_header(truncated)})

    cohere_doc = {200: {"description": "Cohere embed response: embeddings by type (v1 without embedding_types: "
                                       "embeddings_floats)"}, **common}

    @app.post("/v2/embed", response_model=None, responses=cohere_doc, tags=["embeddings"],
              summary="Embed texts (Cohere v2 wire format)", openapi_extra=_body_schema(CohereEmbedRequest))
    async def embed_v2(request: Request) -> Response:
        return await cohere_embed(request, 2)

    @app.post("/v1/embed", response_model=None, responses=cohere_doc, tags=["embeddings"],
              summary="Embed texts (Cohere v1 wire format)", openapi_extra=_body_schema(CohereEmbedRequest))
    async def embed_v1(request: Request) -> Response:
        return await cohere_embed(request, 1)

    # ------------------------------------------------------------------ rerank
    async def run_rerank(request: Request, default_return: bool) -> tuple[str, int, dict[str, str], list]:
        state.ensure_ready()
        body = await parse(request, RerankRequest, "documents")
        name, rr, worker = state.lookup("reranker", body.model)
        query = _doc_text(body.query, "query", "query")
        docs = body.documents
        if not docs:
            raise ApiError(400, "documents is an empty list: send at least one document", code="empty_input",
                           param="documents")
        texts = [_doc_text(d, f"document {i}", "documents") for i, d in enumerate(docs)]
        if body.top_n is not None and body.top_n <= 0:
            raise ApiError(400, '"top_n" must be greater than 0', code="invalid_top_n", param="top_n")
        top_n = body.top_n
        return_documents = default_return if body.return_documents is None else body.return_documents
        truncate = settings.default_rerank_truncate if body.truncate is None else body.truncate
        q_limit, d_limit = _rerank_limits(rr)
        (query,), q_cut = clip_texts([query], q_limit, per_token, truncate, "query", "query")
        texts, d_cut = clip_texts(texts, d_limit, per_token, truncate, "document", "documents")
        worker.check_capacity(len(texts))

        def call(job: Job) -> Any:
            return rr.rerank(query, texts, top_n=top_n, return_documents=False, truncate=truncate,
                             progress=job.progress)

        job = worker.submit_call(call, len(texts), time_left(request, worker))
        job.since = arrival(request)
        ranked = await wait_for(job, request.receive)
        results = []
        for r in ranked.results:
            item: dict[str, Any] = {"index": int(r.index), "relevance_score": float(r.relevance_score)}
            if return_documents:
                d = docs[r.index]
                item["document"] = d.model_dump(exclude_none=True) if isinstance(d, TextDoc) else {"text": d}
            results.append(item)
        tokens = int(getattr(ranked, "total_tokens", 0) or 0)
        metrics.tokens.labels(name, "rerank").inc(tokens)
        metrics.inputs.labels(name, "rerank").inc(len(texts))
        truncated = sorted(set(d_cut) | set(getattr(ranked, "truncated", None) or []))
        query_truncated = bool(q_cut) or bool((getattr(ranked, "extras", None) or {}).get("query_truncated"))
        if truncated:
            metrics.truncated.labels(name).inc(len(truncated))
        headers = _truncated_header(truncated)
        if query_truncated:
            headers["X-Truncated-Query"] = "true"
        return name, tokens, headers, results

    @app.post(
        "/v1/rerank",
        response_model=None,
        responses={200: {"model": RerankResponseV1, "description": "results sorted by relevance_score"}, **common},
        tags=["rerank"],
        summary="Rerank documents (Jina / Cohere v1 wire format)",
        openapi_extra=_body_schema(RerankRequest),
    )
    async def rerank_v1(request: Request) -> Response:
        name, tokens, headers, results = await run_rerank(request, default_return=True)
        return _json({"model": name, "object": "list", "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
                      "results": results}, headers=headers)

    @app.post(
        "/v2/rerank",
        response_model=None,
        responses={200: {"model": RerankResponseV2, "description": "results sorted by relevance_score"}, **common},
        tags=["rerank"],
        summary="Rerank documents (Cohere v2 wire format)",
        openapi_extra=_body_schema(RerankRequest),
    )
    async def rerank_v2(request: Request) -> Response:
        name, tokens, headers, results = await run_rerank(request, default_return=False)
        return _json({
            "id": str(uuid.uuid4()),
            "results": results,
            "meta": {
                "api_version": {"version": "2", "is_experimental": False},
                "billed_units": {"search_units": 1, "input_tokens": tokens},
                "tokens": {"input_tokens": tokens, "output_tokens": 0},
            },
        }, headers={"X-Model": name, **headers})

    # ------------------------------------------------------------------ models, health, metrics
    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503), tags=["info"])
    async def models() -> Response:
        state.ensure_ready()
        data = []
        for name, emb in state.embedders.items():
            data.append({
                "id": name, "served_name": name, "object": "model", "created": state.created, "owned_by": "tamis",
                "type": "embedding",
                "dimension": _int_or_none(getattr(emb, "dimension", None)),
                "max_length": _int_or_none(getattr(emb, "max_length", None)),
                "tasks": list(getattr(emb, "tasks", []) or []),
                "aliases": sorted({a for a, n in state.aliases["embedding"].items() if n == name and a != name}),
            })
        for name, rr in state.rerankers.items():
            data.append({
                "id": reranker_id(name) if name in state.embedders else name, "served_name": name,
                "object": "model", "created": state.created, "owned_by": "tamis", "type": "reranker",
                "kind": getattr(rr, "kind", None),
                "aliases": sorted({a for a, n in state.aliases["reranker"].items() if n == name and a != name}),
            })
        return _json({"object": "list", "data": data})

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not ready"}},
             tags=["info"])
    async def health(request: Request) -> Response:
        # the served models' names only for key holders (or on an open server), as /v1/models and /metrics
        authorized = request.scope.get("state", {}).get("tamis_authorized", not keys.enabled)
        body: dict[str, Any] = ({"embedding_models": list(state.embedders), "reranker_models": list(state.rerankers)}
                                if authorized else {})
        if state.draining:
            return _json({"status": "shutting_down", "detail": "the server is shutting down", **body}, 503,
                         headers={"Retry-After": "5"})
        if state.ready:
            return _json({"status": "ok", **body})
        if state.load_error is not None:
            msg = f"model loading failed: {state.load_error}"
            return _json({"status": "failed", "detail": msg, **body}, 503)
        return _json({"status": "loading", "detail": "models are still loading", **body}, 503,
                     headers={"Retry-After": "5"})

    @app.get("/livez", tags=["info"], responses={200: {"description": "the process serves HTTP (liveness)"}})
    async def livez() -> Response:
        """Liveness: 200 as soon as the process answers HTTP, while models load too (readiness is /health)."""
        return _json({"status": "alive"})

    @app.get("/metrics", response_class=Response, tags=["info"],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format (needs the API key unless public_metrics)"},
                        401: error_responses(401)[401]})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return _json({"name": "tamis", "version": _version(), "docs": "/docs", "openapi": "/openapi.json"})

    return app


def _body_schema(model: type[Any]) -> dict[str, Any]:
    """OpenAPI request body of a route that parses its own body (see :mod:`tamis.server.body`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _document_bodies(app: FastAPI, models: Mapping[str, type[Any]]) -> None:
    """Put the request models the routes parse themselves into the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models.values():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _truncated_header(indices: list[int]) -> dict[str, str]:
    """``X-Truncated-Inputs: 0,7`` names inputs cut at the model's context (at most 256 listed)."""
    return {"X-Truncated-Inputs": ",".join(map(str, indices[:256]))} if indices else {}


def _int_or_none(x: Any) -> int | None:
    return int(x) if x is not None else None


def _version() -> str:
    try:
        from tamis import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "0"
