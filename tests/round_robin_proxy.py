"""A tiny round-robin HTTP proxy with failover, for testing tamis replicas behind one address.

Each request goes to the next replica in turn; a replica that refuses the connection (or drops it before
answering) is skipped and the request is sent to the next one, so a killed replica costs no failed
request. This is safe for tamis because its routes are pure functions of the request (`tamis serve`
keeps no state between requests). Loopback only, standard library only. In production use nginx,
HAProxy, Envoy or a cloud load balancer the same way (see README, "Scale out").
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "host"}


class RoundRobinProxy:
    def __init__(self, backends: list[tuple[str, int]], timeout_s: float = 60.0):
        self.backends = list(backends)
        self.timeout_s = timeout_s
        self.served: Counter[int] = Counter()  # backend index -> requests answered
        self.failovers = 0
        self._next = itertools.cycle(range(len(self.backends)))
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RoundRobinProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)

    def _pick(self) -> int:
        with self._lock:
            return next(self._next)

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        for _ in range(len(self.backends)):
            i = self._pick()
            host, port = self.backends[i]
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
            try:
                conn.request(method, path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.failovers += 1
                continue
            finally:
                conn.close()
            with self._lock:
                self.served[i] += 1
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP], data
        body = json.dumps({"detail": "no replica answered", "error": {"message": "no replica answered"}}).encode()
        return 502, [("content-type", "application/json")], body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                status, out_headers, data = proxy.forward(self.command, self.path, headers, body)
                self.send_response(status)
                for k, v in out_headers:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _relay  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        return Handler
