"""Routes for learned-sparse embeddings, segmentation and tokenization, as one FastAPI ``APIRouter``.

* ``POST /embed_sparse`` — TEI's shape: ``{"inputs": str | [str], "truncate", "truncation_direction", "prompt_name"}``
  -> ``[[{"index": term id, "value": weight}, ...], ...]`` (one list per input); ``model`` picks a served sparse
  model (tamis's addition); ``prompt_name`` ``"query"`` / ``"document"`` picks the task (inference-free models
  encode queries without the model).
* ``/v1/embeddings`` with ``embedding_type: "sparse"`` — :meth:`SparseRoutes.openai_embeddings` answers it
  (``data[i].embedding = {"indices": [...], "values": [...]}``); the app's own embeddings route hands such
  requests over.
* ``POST /v1/segment`` (and ``/segment``) — Jina Segmenter's request (``content``, ``tokenizer``, ``return_tokens``,
  ``return_chunks``, ``max_chunk_length``, ``head``, ``tail``) and response (``num_tokens``, ``tokenizer``,
  ``usage``, ``num_chunks``, ``chunk_positions``, ``chunks``, ``tokens``); see :mod:`tamis.segment`.
  ``max_chunk_length`` counts tokens of ``tokenizer``.
* ``POST /tokenize`` — TEI's shape (``inputs``, ``add_special_tokens`` -> ``[[{"id", "text", "special", "start",
  "stop"}]]``, character offsets; special tokens have no offsets) or vLLM's (``prompt`` -> ``{"count",
  "max_model_len", "tokens"}``).

Tokenizer names are the served models' names (embedding, reranker and sparse models) and ``cl100k_base`` where
tiktoken has it offline; anything else is a 400 that lists them.

Wiring (``create_app``): ``app.include_router(create_router(sparse_models, state=state, settings=settings))``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from tamis.server.errors import ApiError, echo


class SparseEmbedRequest(BaseModel):
    """TEI ``/embed_sparse``."""

    model_config = ConfigDict(extra="ignore")
    inputs: str | list[str]
    truncate: bool | None = None
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    prompt_name: str | None = None
    model: str | None = None
    top_k: int | None = Field(None, description="tamis: keep the largest top_k weights of each vector")
    threshold: float = Field(0.0, description="tamis: drop weights at or below this")


class SegmentRequest(BaseModel):
    """Jina Segmenter."""

    model_config = ConfigDict(extra="ignore")
    content: str
    tokenizer: str | None = None
    return_tokens: bool = False
    return_chunks: bool = False
    max_chunk_length: int = 1000
    head: int | None = None
    tail: int | None = None


class TokenizeRequest(BaseModel):
    """TEI ``/tokenize`` (``inputs``) or vLLM ``/tokenize`` (``prompt``)."""

    model_config = ConfigDict(extra="ignore")
    inputs: str | list[str] | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    prompt_name: str | None = None
    model: str | None = None


def _dumps(obj: Any) -> bytes:
    try:
        import orjson

        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except ImportError:  # pragma: no cover
        import json

        return json.dumps(obj).encode()


def _json(obj: Any) -> Response:
    return Response(_dumps(obj), media_type="application/json")


class SparseRoutes:
    """The routes' state: served sparse models (one lock each: a model runs one call at a time) and tokenizers."""

    def __init__(self, sparse: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None, *,
                 state: Any = None, settings: Any = None, tokenizers: Mapping[str, Any] | None = None):
        self._sparse = sparse if callable(sparse) else dict(sparse or {})
        self.state = state
        self.settings = settings
        self.extra_tokenizers = dict(tokenizers or {})
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lookups
    @property
    def sparse(self) -> dict[str, Any]:
        return dict(self._sparse() if callable(self._sparse) else self._sparse)

    def _limit(self, name: str, default: int) -> int:
        return int(getattr(self.settings, name, default) or default)

    def _ready(self) -> None:
        if self.state is not None and hasattr(self.state, "ensure_ready"):
            self.state.ensure_ready()

    def sparse_model(self, requested: str | None) -> tuple[str, Any]:
        models = self.sparse
        if not models:
            raise ApiError(400, "this server serves no sparse model (tamis serve --sparse-model NAME=DIR)",
                           code="model_not_found", param="model")
        if not requested:
            name = next(iter(models))
            return name, models[name]
        for name in models:
            if name == requested or name.lower() == str(requested).lower():
                return name, models[name]
        raise ApiError(400, f"sparse model {echo(requested)} is not served; served sparse models: {', '.join(models)}",
                       code="model_not_found", param="model", extra={"available": list(models)})

    def tokenizers(self) -> dict[str, Any]:
        """Served name -> :class:`tamis.tokenize.Tokenizer` of every served model that has one."""
        out: dict[str, Any] = {}
        if self.state is not None:
            for table in (getattr(self.state, "embedders", {}), getattr(self.state, "rerankers", {})):
                for name, model in table.items():
                    tok = getattr(model, "tokenizer", None)
                    if tok is not None and hasattr(tok, "raw"):
                        out.setdefault(name, tok)
        for name, model in self.sparse.items():
            out.setdefault(name, model.tokenizer)
        out.update(self.extra_tokenizers)
        return out

    def tokenizer(self, requested: str | None, default_cl100k: bool) -> Any:
        from tamis.segment import CL100K, HFTokenizer, load_tiktoken

        toks = self.tokenizers()
        if requested is None and default_cl100k:
            try:
                return load_tiktoken(CL100K)
            except Exception:  # noqa: BLE001 - no cl100k here: the first served model's tokenizer, named in the body
                if not toks:
                    raise
        if requested is None:
            if not toks:
                raise ApiError(400, "this server has no tokenizer (no model is served)", code="invalid_input")
            name = next(iter(toks))
            return HFTokenizer(name, toks[name])
        for name, tok in toks.items():
            if name == requested or name.lower() == requested.lower():
                return HFTokenizer(name, tok)
        if requested.lower() == CL100K:
            return load_tiktoken(CL100K)  # a clear 400 when tiktoken cannot load it offline
        choices = ", ".join([*toks, CL100K])
        raise ApiError(400, f"unknown tokenizer {echo(requested)}; this server has: {choices}",
                       code="invalid_input", param="tokenizer", extra={"available": [*toks, CL100K]})

    # ------------------------------------------------------------------ sparse embeddings
    def _texts(self, raw: Any, field: str) -> list[str]:
        texts = [raw] if isinstance(raw, str) else list(raw)
        if not texts:
            raise ApiError(400, f"{field} is empty: send at least one text", code="invalid_input", param=field)
        limit = self._limit("max_inputs", 2048)
        if len(texts) > limit:
            raise ApiError(400, f"{field} has {len(texts)} items, more than the largest allowed size {limit}",
                           code="too_many_inputs", param=field)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ApiError(400, f"{field} {i} is empty or only whitespace: every input must contain text",
                               code="invalid_input", param=field)
        return texts

    async def embed(self, name: str, model: Any, texts: list[str], task: str | None, truncate: bool,
                    top_k: int | None = None, threshold: float = 0.0) -> tuple[list[Any], int]:
        """Sparse vectors of ``texts`` (in the thread pool, one call at a time per model) and their token count."""
        cap = model.max_length * self._limit("max_chars_per_token", 32)
        if not truncate:
            for i, t in enumerate(texts):
                if len(t) > cap:
                    raise ApiError(400, f"input {i} has {len(t)} characters, more than the {cap} that fit the model's "
                                        f"limit of {model.max_length} tokens; send \"truncate\": true",
                                   code="input_too_long", param="input")
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())

        def run() -> tuple[list[Any], int]:
            with lock:
                enc = model.tokenize(texts, task, truncate)
                return model.embed_tokens(enc, task, top_k=top_k, threshold=threshold), sum(len(e) for e in enc)

        from tamis.embed_sparse import check_pruning

        check_pruning(top_k, threshold)
        return await run_in_threadpool(run)

    async def openai_embeddings(self, body: Any) -> Response:
        """``/v1/embeddings`` with ``embedding_type: "sparse"`` (``body``: the parsed request or a dict with ``input``,
        ``model``, ``task``, ``truncate``)."""
        self._ready()
        get = body.get if isinstance(body, dict) else lambda k, d=None: getattr(body, k, d)
        name, model = self.sparse_model(get("model"))
        raw = get("input")
        raw = [raw] if isinstance(raw, (str, dict)) else list(raw or [])
        texts = self._texts([r.get("text") if isinstance(r, dict) else getattr(r, "text", r) for r in raw], "input")
        truncate = bool(get("truncate", False))
        vectors, tokens = await self.embed(name, model, texts, _task(get("task")), truncate)
        data = [{"object": "embedding", "index": i, "embedding": v.to_dict()} for i, v in enumerate(vectors)]
        return _json({"model": name, "object": "list", "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                      "data": data})


def _task(task: str | None) -> str | None:
    """Jina / Cohere / TEI task names -> ``query`` / ``document``."""
    if task is None:
        return None
    t = task.lower()
    if t in ("query", "retrieval.query", "search_query", "queries"):
        return "query"
    if t in ("document", "passage", "retrieval.passage", "search_document", "documents", "corpus"):
        return "document"
    raise ApiError(400, f"unknown task {echo(task)} for a sparse model; use query or document",
                   code="unknown_task", param="task")


def create_router(sparse: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None, *, state: Any = None,
                  settings: Any = None, tokenizers: Mapping[str, Any] | None = None) -> APIRouter:
    """The router (its :class:`SparseRoutes` is ``router.routes_state``). ``sparse``: served name ->
    :class:`tamis.SparseEmbedder` (or a function giving that mapping at request time, for models loaded in the
    background); ``state``: the app's ServerState (its models' tokenizers, readiness); ``settings``: ServerSettings
    (``max_inputs``, ``max_chars_per_token``, ``json_value_limit``); ``tokenizers``: more named tokenizers."""
    from tamis.server.body import read_body

    routes = SparseRoutes(sparse, state=state, settings=settings, tokenizers=tokenizers)
    router = APIRouter()
    router.routes_state = routes  # type: ignore[attr-defined]

    async def parse(request: Request, model: type[Any], field: str | None) -> Any:
        limit = int(getattr(settings, "json_value_limit", 0) or 32 * routes._limit("max_inputs", 2048))
        return await read_body(request, model, limit, {field: routes._limit("max_inputs", 2048)} if field else {})

    @router.post("/embed_sparse", tags=["embeddings"], summary="Sparse (SPLADE) embeddings, TEI's shape")
    async def embed_sparse(request: Request) -> Response:
        routes._ready()
        body = await parse(request, SparseEmbedRequest, "inputs")
        name, model = routes.sparse_model(body.model)
        texts = routes._texts(body.inputs, "inputs")
        truncate = bool(getattr(settings, "default_truncate", False)) if body.truncate is None else body.truncate
        if body.truncation_direction.lower() == "left":
            raise ApiError(400, "truncation_direction Left is not supported for sparse models", code="unsupported",
                           param="truncation_direction")
        vectors, _ = await routes.embed(name, model, texts, _task(body.prompt_name), truncate, body.top_k,
                                        body.threshold)
        return _json([[{"index": int(i), "value": float(v)} for i, v in zip(vec.indices, vec.values)]
                      for vec in vectors])

    async def segment_route(request: Request) -> Response:
        from tamis.segment import segment

        routes._ready()
        body = await parse(request, SegmentRequest, None)
        tok = routes.tokenizer(body.tokenizer, default_cl100k=True)
        limit = routes._limit("max_request_bytes", 16 * 1024 * 1024)
        if len(body.content) > limit:
            raise ApiError(413, f"content has {len(body.content)} characters, more than {limit}", code="too_large")
        seg = await run_in_threadpool(segment, body.content, tok, max_chunk_length=body.max_chunk_length,
                                      return_chunks=body.return_chunks, return_tokens=body.return_tokens,
                                      head=body.head, tail=body.tail)
        return _json(seg.to_jina(return_chunks=body.return_chunks))

    for path in ("/v1/segment", "/segment"):
        router.add_api_route(path, segment_route, methods=["POST"], tags=["segment"],
                             summary="Split a text into chunks (Jina Segmenter's request and response)",
                             include_in_schema=path == "/v1/segment")

    @router.post("/tokenize", tags=["tokenize"], summary="Tokenize with a served model's tokenizer (TEI or vLLM shape)")
    async def tokenize(request: Request) -> Response:
        routes._ready()
        body = await parse(request, TokenizeRequest, "inputs")
        if body.prompt is None and body.inputs is None:
            raise ApiError(400, "send inputs (TEI) or prompt (vLLM)", code="invalid_input", param="inputs")
        from tamis.segment import HFTokenizer

        tok = routes.tokenizer(body.model, default_cl100k=False)
        if not isinstance(tok, HFTokenizer):
            raise ApiError(400, "/tokenize serves the models' tokenizers; name a served model", code="invalid_input",
                           param="model")
        hf = tok.tokenizer
        if body.prompt is not None:
            (enc,) = hf.encode([body.prompt], None, add_special_tokens=body.add_special_tokens)
            limit = getattr(routes.sparse.get(tok.name), "max_length", None)
            if limit is None and routes.state is not None:
                limit = getattr(getattr(routes.state, "embedders", {}).get(tok.name), "max_length", None)
            return _json({"count": len(enc.ids), "max_model_len": limit, "tokens": list(enc.ids), "token_strs": None})
        texts = routes._texts(body.inputs, "inputs")

        def run() -> list[list[dict[str, Any]]]:
            out = []
            for text, enc in zip(texts, hf.encode(texts, None, add_special_tokens=body.add_special_tokens)):
                rows = []
                for tid, (s, e), special in zip(enc.ids, enc.offsets, enc.special):
                    if special:
                        rows.append({"id": int(tid), "text": hf.decode([tid]), "special": True, "start": None,
                                     "stop": None})
                    else:
                        rows.append({"id": int(tid), "text": text[s:e], "special": False, "start": int(s),
                                     "stop": int(e)})
                out.append(rows)
            return out

        return _json(await run_in_threadpool(run))

    return router
