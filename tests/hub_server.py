"""A stand-in for the Hugging Face Hub on 127.0.0.1: the part of its HTTP API that huggingface_hub 2.x uses to
download a model (read from huggingface_hub's own source: ``HfApi.model_info``, ``HfApi.list_repo_tree``,
``get_hf_file_metadata`` and ``http_get``):

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: ``{"id", "sha", "siblings", ...}``;
* ``GET /api/models/{repo}/tree/{rev}?recursive=True``: the files, ``[{"type", "path", "size", "oid"}]``;
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag``, ``Content-Length``;
  a ``Range: bytes=N-`` request gets ``206`` and ``Content-Range``;
* refusals as the Hub makes them: ``404`` + ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound``, ``401`` + ``RepoNotFound`` for a private repo without its token, ``403`` + ``GatedRepo``.

Repos hold revisions (commit sha -> {path: bytes}) and refs (branch or tag -> sha). Every request is logged
(:attr:`FakeHub.requests`); :attr:`FakeHub.cut_once` makes the first GET of a file stop half-way (the client
must resume it with a Range request) and :attr:`FakeHub.gates` hold a file's GET until an event is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    revisions: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag -> commit sha
    token: str | None = None  # private: needs "Authorization: Bearer <token>"
    gated: bool = False

    def add(self, files: dict[str, bytes], *refs: str) -> str:
        """A new commit holding ``files``; ``refs`` (default "main") point at it. Returns its sha."""
        h = hashlib.sha1()
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        h.update(str(len(self.revisions)).encode())
        sha = h.hexdigest()
        self.revisions[sha] = dict(files)
        for ref in refs or ("main",):
            self.refs[ref] = sha
        return sha


def read_dir(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """A model directory's files as a repo's ``{path: bytes}``."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in skip}


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_once: set[str] = set()  # "repo/path": the first GET sends half the file, then hangs up
        self.gates: dict[str, threading.Event] = {}  # "repo/path": GET waits for the event
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self._connections: set[socket.socket] = set()

    def repo(self, repo_id: str, **kwargs: Any) -> Repo:
        self.repos[repo_id] = Repo(**kwargs)
        return self.repos[repo_id]

    def gets(self, suffix: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(suffix)]

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()
                hub._connections.add(self.connection)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in list(self._connections):  # kept-alive connections too: a stopped Hub answers nothing
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._connections.clear()

    # ------------------------------------------------------------------ requests
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        path = url.path
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            repo = self._access(h, repo_id)
            if repo is None:
                return
            if not rest or rest[0] == "revision":
                sha = self._sha(h, repo, rest[1] if len(rest) > 1 else "main")
                if sha is not None:
                    files = repo.revisions[sha]
                    self._json(h, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.token is not None,
                                   "gated": repo.gated, "siblings": [{"rfilename": f} for f in sorted(files)]})
                return
            if rest[0] == "tree" and len(rest) >= 2:
                sha = self._sha(h, repo, rest[1])
                if sha is not None:
                    files = repo.revisions[sha]
                    self._json(h, [{"type": "file", "path": f, "size": len(b), "oid": _oid(b)}
                                   for f, b in sorted(files.items())])
                return
            return self._error(h, 404, "EntryNotFound")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = "/".join(parts[:2])
            repo = self._access(h, repo_id)
            if repo is None:
                return
            sha = self._sha(h, repo, parts[3])
            if sha is None:
                return
            name = "/".join(parts[4:])
            data = repo.revisions[sha].get(name)
            if data is None:
                return self._error(h, 404, "EntryNotFound")
            return self._file(h, repo_id, name, sha, data, head)
        self._error(h, 404, None)

    def _access(self, h: BaseHTTPRequestHandler, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound")
            return None
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(h, 401, "RepoNotFound")
            return None
        if repo.gated:
            self._error(h, 403, "GatedRepo")
            return None
        return repo

    def _sha(self, h: BaseHTTPRequestHandler, repo: Repo, rev: str) -> str | None:
        sha = rev if rev in repo.revisions else repo.refs.get(rev)
        if sha is None:
            self._error(h, 404, "RevisionNotFound")
        return sha

    def _file(self, h: BaseHTTPRequestHandler, repo_id: str, name: str, sha: str, data: bytes, head: bool) -> None:
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0] or 0)
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("X-Repo-Commit", sha)
        h.send_header("ETag", f'"{_oid(data)}"')
        h.send_header("Content-Length", str(len(body)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if head:
            return
        key = f"{repo_id}/{name}"
        gate = self.gates.get(key)
        if gate is not None:
            gate.wait(60)
        if key in self.cut_once and not start and len(body) > 1:
            self.cut_once.discard(key)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, obj: Any) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str | None) -> None:
        body = json.dumps({"error": code or "not found"}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code or "not found")
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
