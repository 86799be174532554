"""One pure-ASGI middleware in front of the routes: metrics, auth, body size and body timeout.

Pure ASGI (not ``BaseHTTPMiddleware``) so the routes keep the real ``receive`` and can notice a client
disconnect while their work is queued. The body of a POST is read here, bounded by ``max_request_bytes``
(413) and by ``body_timeout_s`` (408: a client that trickles its body cannot hold a request open), and
replayed to the app; after the replay ``receive`` passes through to the server. The routes parse it
(:mod:`tamis.server.body`), as JSON whatever its Content-Type (``curl -d`` sends a form type).

Metric labels come from fixed sets (:func:`route_label`, :func:`method_label`), whatever the client sends.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tamis.server.auth import DOCS_STATIC, KeyChecker, is_public
from tamis.server.errors import ApiError
from tamis.server.metrics import Metrics

ROUTES = frozenset({"/v1/embeddings", "/v1/rerank", "/v2/rerank", "/v2/embed", "/v1/embed", "/v1/models", "/health", "/livez", "/metrics",
                    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_label(path: str) -> str:
    """The route template of ``path``, or "other" (so random paths cannot grow the metrics)."""
    if path in ROUTES:
        return path
    if path.startswith(DOCS_STATIC + "/"):
        return DOCS_STATIC + "/{path}"
    return "other"


def method_label(method: str) -> str:
    """A known HTTP method, or "other" (HTTP allows any token as a method)."""
    return method if method in METHODS else "other"


class ServerMiddleware:
    def __init__(self, app: Any, *, keys: KeyChecker, metrics: Metrics, max_request_bytes: int,
                 body_timeout_s: float = 60.0, public_metrics: bool = False):
        self.app = app
        self.keys = keys
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.public_metrics = public_metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        started = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = _headers(scope)
            if not (is_public(path) or (self.public_metrics and path == "/metrics")):
                try:
                    self.keys.check(headers.get("authorization"))
                except ApiError as err:
                    await err.response()(scope, receive, send_wrapper)
                    return
            if method in ("POST", "PUT", "PATCH"):
                body = await self._read_body(headers, receive)
                if isinstance(body, ApiError):
                    await body.response()(scope, receive, send_wrapper)
                    return
                if body is None:  # the client left while sending
                    status[0] = 499
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_label(path)
            self.metrics.requests.labels(route, method_label(method), str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes | ApiError | None:
        limit = self.max_request_bytes
        too_large = ApiError(413, f"request body larger than the limit of {limit} bytes; send fewer or shorter "
                                  "inputs per request", code="payload_too_large", headers={"Connection": "close"})
        declared = headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return too_large
            except ValueError:
                return ApiError(400, "invalid Content-Length header", code="invalid_request")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        return too_large
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return ApiError(408, f"request body not received within {self.body_timeout_s:g} s ({size} bytes came)",
                            code="body_timeout", headers={"Connection": "close"})
        return b"".join(chunks)


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        out[k.decode("latin-1").lower()] = v.decode("latin-1")
    return out


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
