"""Every error the server answers, mapped to a status code and a body in one place.

Body shape (all routes): ``{"detail": "<message>", "error": {"message", "type", "param", "code"}}``.
``detail`` is what the Jina clients (LangChain, LlamaIndex, Haystack) print; ``error`` is what the
OpenAI client unwraps. Both keys on every route keeps one shape for ``/v1/embeddings``, which serves
both kinds of client. Validation errors add ``errors: [{"field", "message", "type"}]``.

Status codes:
    400 invalid input (empty input, empty string, unknown task or model, bad ``dimensions``, over-long
        input with ``truncate=false``, malformed JSON, non-UTF-8 body, lone surrogates, unsupported input kinds)
    401 missing or wrong API key            408 request body not received within the body timeout
    413 request body larger than the limit (bytes, or JSON values)
    422 body does not match the schema      429 queue full (with ``Retry-After``)
    503 models still loading, the request's deadline passed, or the server is shutting down (``Retry-After``)
    500 a bug: the message says so and the traceback goes to the log

Client text quoted in a message (a model name, a task) is cut to :data:`ECHO_CHARS` characters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tamis.errors import (
    InputTooLongError,
    InvalidInputError,
    TamisError,
    UnknownModelError,
    UnknownTaskError,
)

logger = logging.getLogger("tamis.server")

ECHO_CHARS = 64


def echo(text: object, limit: int = ECHO_CHARS) -> str:
    """``repr`` of client text for a message, cut to ``limit`` characters (with the full length said)."""
    s = str(text)
    if len(s) <= limit:
        return repr(s)
    return f"{s[:limit]!r}... ({len(s)} characters)"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    408: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered to the client as JSON with ``detail`` and ``error``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "detail": self.message,
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "error"),
                "param": self.param,
                "code": self.code,
            },
        }
        out.update(self.extra)
        return out

    def response(self) -> Response:
        # ensure_ascii: messages may quote client text with lone surrogates; ASCII JSON always encodes
        content = json.dumps(self.body(), ensure_ascii=True, default=str).encode("ascii")
        headers = dict(self.headers)
        if self.status == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return Response(content, status_code=self.status, media_type="application/json", headers=headers)


class Overloaded(ApiError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(429, message, code="overloaded", headers={"Retry-After": str(max(1, int(retry_after)))})


class NotReady(ApiError):
    def __init__(self, message: str = "the server is starting: models are still loading", retry_after: int = 5):
        super().__init__(503, message, code="not_ready", headers={"Retry-After": str(max(1, int(retry_after)))})


class DeadlineExceeded(ApiError):
    def __init__(self, waited_s: float, retry_after: int = 1, started: bool = False):
        where = "was queued and then computed" if started else "waited in the queue"
        super().__init__(
            503,
            f"no answer within the server's request timeout: the request {where} for {waited_s:.1f} s and its "
            "remaining work was dropped; retry later or send smaller requests",
            code="timeout",
            headers={"Retry-After": str(max(1, int(retry_after)))},
        )


class ShuttingDown(ApiError):
    def __init__(self, retry_after: int = 5) -> None:
        super().__init__(
            503,
            "the server is shutting down; retry (on another replica) after the Retry-After delay",
            code="shutting_down",
            headers={"Retry-After": str(max(1, int(retry_after))), "Connection": "close"},
        )


class ClientDisconnected(ApiError):
    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection; its queued work was dropped", code="cancelled")


def from_exception(exc: BaseException) -> ApiError:
    """Map library errors to API errors (the one place where tamis errors meet HTTP)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModelError):
        return ApiError(400, f"model {echo(exc.name)} is not available; served models: {', '.join(exc.available)}",
                        code="model_not_found", param="model", extra={"available": exc.available})
    if isinstance(exc, UnknownTaskError):
        valid = ", ".join(repr(v) for v in exc.valid) or "none (this model has no tasks)"
        return ApiError(400, f"unknown task {echo(exc.task)}; valid tasks for this model: {valid}",
                        code="unknown_task", param="task", extra={"valid_tasks": exc.valid})
    if isinstance(exc, InputTooLongError):
        what = getattr(exc, "what", "input")
        label = getattr(exc, "label", f"input {exc.index}")
        n_chars = getattr(exc, "n_chars", None)
        size = (f"{n_chars} characters, more than the {exc.char_limit} that fit the model's limit of {exc.limit} "
                "tokens" if n_chars is not None else f"{exc.n_tokens} tokens, more than the limit of {exc.limit}")
        return ApiError(
            400,
            f"{label} has {size}; shorten it or send "
            '"truncate": true to drop the tail',
            code="input_too_long",
            param={"document": "documents", "query + document": "documents"}.get(what, what),
            extra={"index": exc.index, "n_tokens": exc.n_tokens, "limit": exc.limit},
        )
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc), code="invalid_input")
    if isinstance(exc, TamisError):
        logger.error("model error", exc_info=exc)
        return ApiError(500, f"model error: {exc}", code="model_error")
    logger.error("internal error", exc_info=exc)
    return ApiError(500, f"internal server error ({type(exc).__name__}); see the server log", code="internal")


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return " -> ".join(str(p) for p in loc)


def validation_error(errors: Any, prefix: tuple[str, ...] = ()) -> ApiError:
    """422 (or 400 for malformed JSON) from pydantic's error list; ``prefix`` is put before each location."""
    errors = [{**e, "loc": (*prefix, *e.get("loc", ()))} for e in errors]
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        err = (e.get("ctx") or {}).get("error", "")
        return ApiError(400, f"malformed JSON body: {err}".rstrip(": "), code="invalid_json")
    items = [
        {"field": _loc(e.get("loc", ())), "message": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors[:50]
    ]
    summary = "; ".join(f"{i['field']}: {i['message']}" for i in items[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = items[0]["field"].removeprefix("body -> ").split(" -> ")[0] if items else None
    return ApiError(
        422,
        f"invalid request: {summary}{more}",
        code="validation_error",
        param=first,
        extra={"errors": items},
    )


async def api_error_handler(request: Request, exc: Exception) -> Response:
    return from_exception(exc).response()


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = "the request body could not be parsed as JSON"
    return ApiError(exc.status_code, detail, headers=exc.headers).response()


def install(app: Any) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(TamisError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(Exception, api_error_handler)
