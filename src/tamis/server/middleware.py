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
        scope.setdefault("state", {})["tamis_arrival"] = time.monotonic()  # request deadlines start here
        status = [500]
        raw = scope.get("headers", [])
        declares_body = _declares_body(raw)
        body_done = [not declares_body]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if not body_done[0]:
                    # answered before the declared body arrived (401, 405, a GET with a body): the rest of
                    # that body would be read as nothing (no timer watches it), so close after the response
                    message = {**message, "headers": _with_close(message.get("headers", []))}
            await send(message)

        upstream = receive

        async def tracking_receive() -> dict[str, Any]:
            message = await upstream()
            if message.get("type") == "http.request" and not message.get("more_body", False):
                body_done[0] = True
            return message

        try:
            headers = _headers(scope)
            framing = _framing_error(raw)
            if framing is not None:
                await framing.response()(scope, receive, send_wrapper)
                return
            try:
                authorization = _authorization(raw)
                if not (is_public(path) or (self.public_metrics and path == "/metrics")):
                    self.keys.check(authorization)
                    scope["state"]["tamis_authorized"] = True
                else:  # public: served either way; /health names the models only to key holders
                    scope["state"]["tamis_authorized"] = self.keys.allows(authorization)
            except ApiError as err:
                await err.response()(scope, receive, send_wrapper)
                return
            if method in ("POST", "PUT", "PATCH"):
                body = await self._read_body(headers, tracking_receive)
                if isinstance(body, ApiError):
                    await body.response()(scope, receive, send_wrapper)
                    return
                if body is None:  # the client left while sending
                    status[0] = 499
                    return
                receive = _replay(body, receive)
            else:
                receive = tracking_receive
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


def _declares_body(raw: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request head announces a body (a non-zero Content-Length, or Transfer-Encoding)."""
    for k, v in raw:
        name = k.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and v.strip() not in (b"0", b""):
            return True
    return False


def _framing_error(raw: list[tuple[bytes, bytes]]) -> ApiError | None:
    """400 (and close) for a request framed two ways: Content-Length together with Transfer-Encoding is
    request smuggling behind a proxy that frames by the other one (RFC 9112 section 6.1)."""
    names = {k.lower() for k, _ in raw}
    if b"transfer-encoding" in names and b"content-length" in names:
        return ApiError(400, "the request has both Content-Length and Transfer-Encoding headers: send one "
                             "(RFC 9112 section 6.1)", code="invalid_framing", headers={"Connection": "close"})
    return None


def _authorization(raw: list[tuple[bytes, bytes]]) -> str | None:
    """The one Authorization header; several are a 400 (which one counts would depend on the proxy)."""
    values = [v for k, v in raw if k.lower() == b"authorization"]
    if len(values) > 1:
        raise ApiError(400, f"the request has {len(values)} Authorization headers: send exactly one",
                       code="invalid_auth_format", headers={"Connection": "close"})
    return values[0].decode("latin-1") if values else None


def _with_close(headers: Any) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() != b"connection"]
    return [*out, (b"connection", b"close")]


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
