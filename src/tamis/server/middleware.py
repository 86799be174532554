"""One pure-ASGI middleware in front of the routes: metrics, auth, body size and UTF-8.

Pure ASGI (not ``BaseHTTPMiddleware``) so the routes keep the real ``receive`` and can notice a client
disconnect while their work is queued. The body is read here (bounded by ``max_request_bytes``), checked
to be UTF-8, and replayed to the app; after the replay ``receive`` passes through to the server. POST
bodies are parsed as JSON whatever their Content-Type (``curl -d`` sends a form type).
"""

from __future__ import annotations

import time
from typing import Any

from tamis.server.auth import KeyChecker, is_public
from tamis.server.errors import ApiError
from tamis.server.metrics import Metrics

ROUTES = frozenset({"/v1/embeddings", "/v1/rerank", "/v2/rerank", "/v1/models", "/health", "/metrics",
                    "/openapi.json", "/docs", "/redoc", "/"})


JSON_ROUTES = frozenset({"/v1/embeddings", "/v1/rerank", "/v2/rerank"})


class ServerMiddleware:
    def __init__(self, app: Any, *, keys: KeyChecker, metrics: Metrics, max_request_bytes: int):
        self.app = app
        self.keys = keys
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        route = path if path in ROUTES else "other"
        started = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = _headers(scope)
            if not is_public(path):
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
                if path in JSON_ROUTES:  # every POST route takes JSON, whatever the client labelled it
                    scope = dict(scope)
                    scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                    scope["headers"].append((b"content-type", b"application/json"))
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, method if route != "other" else "any", str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes | ApiError | None:
        limit = self.max_request_bytes
        too_large = ApiError(413, f"request body larger than the limit of {limit} bytes; send fewer or shorter "
                                  "inputs per request", code="payload_too_large")
        declared = headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return too_large
            except ValueError:
                return ApiError(400, "invalid Content-Length header", code="invalid_request")
        chunks: list[bytes] = []
        size = 0
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
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return ApiError(400, f"request body is not valid UTF-8 (byte {exc.start}): send UTF-8 encoded JSON",
                            code="invalid_encoding")
        return body


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
