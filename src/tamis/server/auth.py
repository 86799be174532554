"""Bearer-key authentication, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable

from tamis.server.errors import ApiError
from tamis.server.settings import LOOPBACK_HOSTS

# paths served without a key: liveness and the docs. /metrics needs the key (Prometheus sends it with
# `authorization: {credentials: KEY}` in its scrape config) unless the server runs with --public-metrics:
# it names the served models and shows the traffic, which /v1/models already keeps behind the key.
PUBLIC_PATHS = frozenset({"/health", "/livez", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"})
DOCS_STATIC = "/static-offline-docs"  # Swagger UI / ReDoc assets served from the fastapi-offline package


def is_public(path: str) -> bool:
    """Paths readable without a key: health and the API docs (with their static assets)."""
    return path in PUBLIC_PATHS or path.startswith(DOCS_STATIC + "/")


class KeyChecker:
    """Accepts ``Authorization: Bearer <key>`` for any configured key; no keys = open server.

    Keys are compared as SHA-256 digests with :func:`hmac.compare_digest` against every configured key
    (no early exit), so timing reveals neither the key nor which key matched.
    """

    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def valid(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(digest, d)
        return ok

    def allows(self, authorization: str | None) -> bool:
        """Whether a request with this header may see what needs a key (always, on an open server)."""
        try:
            self.check(authorization)
        except ApiError:
            return False
        return True

    def check(self, authorization: str | None) -> None:
        """Raise 401 unless the header carries a valid key (no-op when the server is open)."""
        if not self.enabled:
            return
        if not authorization:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", code="invalid_auth_format")
        if not self.valid(key.strip()):
            raise ApiError(401, "invalid API key", code="invalid_api_key")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def startup_message(n_keys: int, host: str) -> tuple[int, str]:
    """The start-up line about auth: (logging level, message)."""
    if n_keys:
        return logging.INFO, f"authentication: on ({n_keys} API key{'s' if n_keys != 1 else ''})"
    if is_loopback(host):
        return logging.INFO, (
            "authentication: off - no API key configured, the server is open (bound to loopback only); "
            "set --api-key or TAMIS_API_KEYS to require one"
        )
    return logging.WARNING, (
        f"authentication: OFF - no API key configured and the server is bound to {host}, beyond loopback: "
        "anyone who can reach it can use it. Set --api-key or TAMIS_API_KEYS."
    )
