"""Running the app under uvicorn: connection cap and timeouts, graceful shutdown, quiet repeated logs.

uvicorn (h11) never times out a connection that has not sent a complete request: silent or trickling
clients would hold file descriptors until the process runs out (and asyncio then logs every failed
``accept``). :class:`Protocol` adds to uvicorn's HTTP/1.1 protocol:

* a connection cap: at ``max_connections`` open connections, a new one first makes room by closing the
  oldest connection that is only *waiting* (no complete request head yet, or idle between kept-alive
  requests; nginx reuses such connections the same way), so silent clients cannot lock out real ones;
  only when every connection is busy with a request is the new one closed as soon as it is accepted
  (before it costs more than its socket). Both are logged at most once per :data:`REPEAT_WINDOW_S`;
* a request-head timeout: a connection must deliver a complete request head within ``header_timeout_s``
  of opening (or of its first byte after a kept-alive response), else it gets ``408`` (if it sent
  something) and is closed. The body has its own bound (``body_timeout_s``, in the middleware) and an idle
  kept-alive connection uvicorn's ``timeout_keep_alive``.

:class:`Server` starts the app's drain when uvicorn is asked to stop (SIGTERM, Ctrl-C), so that queued
requests are answered with a JSON 503 + ``Retry-After`` before uvicorn's graceful-shutdown timeout would cut
them off with plain-text 500s. :class:`RepeatFilter` rate-limits identical log records.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tamis.server.settings import ServerSettings

logger = logging.getLogger("tamis.server")

REPEAT_WINDOW_S = 10.0
SHUTDOWN_NOTICE_S = 2.0  # after SIGTERM, /health answers 503 at least this long (within the grace period)
_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class RepeatFilter(logging.Filter):
    """Lets the first of a run of identical records through, then one per ``window_s`` seconds, saying
    how many were held back (identical: same logger, level, first line of the message and exception)."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S):
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[Any, ...], list[float]] = {}  # key -> [last emitted, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            first_line = record.getMessage().split("\n", 1)[0][:200]
        except Exception:  # a malformed record: let logging report it
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        key = (record.name, record.levelno, first_line, exc)
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window_s:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg = f"{record.msg} ({int(entry[1])} more like this in the last {now - entry[0]:.0f} s)"
        if len(self._seen) > 1000:  # bounded: forget old keys
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
        self._seen[key] = [now, 0]
        return True


def quiet_repeats(names: tuple[str, ...] = ("asyncio", "uvicorn.error", "tamis.server")) -> RepeatFilter:
    """Install one :class:`RepeatFilter` on the loggers where per-connection errors are reported."""
    f = RepeatFilter()
    for name in names:
        log = logging.getLogger(name)
        for old in [x for x in log.filters if isinstance(x, RepeatFilter)]:
            log.removeFilter(old)
        log.addFilter(f)
    return f


class _Waiting:
    """Per-server bookkeeping of the connection cap (kept on uvicorn's ``ServerState``)."""

    def __init__(self) -> None:
        self.waiting: dict[Protocol, None] = {}  # connections that may be closed to make room, oldest first
        self.closing: set[Protocol] = set()  # closed by the cap, not yet gone from ``connections``


def _waiting(server_state: Any) -> _Waiting:
    book = getattr(server_state, "tamis_waiting", None)
    if book is None:
        book = server_state.tamis_waiting = _Waiting()
    return book


class Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a connection cap and a request-head timeout (see the module docstring)."""

    max_connections = 1024
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        book = self._book = _waiting(self.server_state)
        if len(self.connections) - len(book.closing) > self.max_connections:
            victim = next(iter(book.waiting), None)
            if victim is None:
                logger.warning("connection limit reached (%d open, all busy with requests): closing new "
                               "connections; raise --max-connections or put a proxy in front", self.max_connections)
                book.closing.add(self)
                transport.close()
                return
            logger.warning("connection limit reached (%d open): closing the connections that waited longest "
                           "without a request to make room", self.max_connections)
            victim._close_waiting()
        book.waiting[self] = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._cancel_head_timer()
        elif self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm_head_timer()  # part of a request head is here: the rest must follow in time
        else:
            self._cancel_head_timer()
            if self.conn.their_state is not h11.IDLE:  # a request is under way: no longer evictable
                self._book.waiting.pop(self, None)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            # answered before the request's body arrived in full (a 401, a 405, a GET with a body): the rest
            # of that body would be read by no one and watched by no timer; close (the middleware has said
            # ``Connection: close`` in the response)
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:  # pragma: no cover - h11 refuses in this state: close anyway
                pass
            self.transport.close()
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._book.waiting[self] = None  # idle between kept-alive requests: evictable again, as the newest

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        book = getattr(self, "_book", None)
        if book is not None:
            book.waiting.pop(self, None)
            book.closing.discard(self)
        super().connection_lost(exc)

    def _close_waiting(self) -> None:
        """Close this waiting connection to make room for a new one (408 if it sent part of a head)."""
        self._book.waiting.pop(self, None)
        self._book.closing.add(self)
        self._cancel_head_timer()
        if self.conn.trailing_data[0]:
            self.transport.write(_TIMEOUT_408)
        self.transport.close()

    def _arm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self._book.waiting.pop(self, None)
        if self.conn.trailing_data[0]:
            self.transport.write(_TIMEOUT_408)
        logger.info("closed a connection that sent no complete request within %g s", self.header_timeout_s)
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server; a stop request (SIGTERM, Ctrl-C) first starts the app's drain."""

    def __init__(self, config: uvicorn.Config, app: Any, grace_s: float):
        super().__init__(config)
        self.tamis_state = getattr(getattr(app, "state", None), "tamis", None)
        self.grace_s = grace_s
        self.load_error: str | None = None
        if self.tamis_state is not None:
            self.tamis_state.on_load_failed = self.load_failed

    def load_failed(self, reason: str) -> None:
        """The models could not be loaded (loader thread): stop serving; :func:`run` returns ``reason``."""
        self.load_error = reason
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first stop request starts the app's drain and keeps serving while it runs: new connections
        are still accepted, so ``/health`` answers 503 ``shutting_down`` (and new work 503) during the grace
        period instead of the port being closed at once. uvicorn's own shutdown starts when the admitted
        requests are answered (or the drain's deadline passes), after at least :data:`SHUTDOWN_NOTICE_S`
        on SIGTERM (a load balancer polling ``/health`` sees the 503). A second request stops at once."""
        state = self.tamis_state
        loop = getattr(state, "loop", None)
        if self._draining or self.should_exit or state is None or loop is None or not getattr(state, "ready", False):
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._captured_signals.append(sig)  # re-raised by uvicorn once it has stopped, as its own handler does
        notice = 0.0 if sig == signal.SIGINT else SHUTDOWN_NOTICE_S
        loop.call_soon_threadsafe(self._start_drain, notice)

    _draining = False

    def _start_drain(self, notice_s: float) -> None:
        state = self.tamis_state
        state.drain(self.grace_s)
        asyncio.ensure_future(self._exit_when_drained(time.monotonic(), notice_s))

    async def _exit_when_drained(self, since: float, notice_s: float) -> None:
        state = self.tamis_state
        from tamis.server.app import DRAIN_MARGIN_S

        until = since + max(0.0, self.grace_s - DRAIN_MARGIN_S) + 0.5  # the drain answers everything by then
        notice_until = since + min(notice_s, max(0.0, self.grace_s - DRAIN_MARGIN_S))
        while not self.should_exit:
            now = time.monotonic()
            idle = not any(w.pending_jobs for w in state.workers.values())
            if now >= until or (idle and now >= notice_until):
                break
            await asyncio.sleep(0.05)
        self.should_exit = True


def make_config(app: Any, settings: ServerSettings, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config with tamis's protocol, timeouts and limits (``kwargs``: host, port, log_level, ...)."""
    protocol = type("Protocol", (Protocol,), {"max_connections": settings.max_connections,
                                              "header_timeout_s": settings.header_timeout_s})
    return uvicorn.Config(
        app,
        http=protocol,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.graceful_timeout_s,  # type: ignore[arg-type]
        **kwargs,
    )


ACCEPT_BACKLOG = 2048  # uvicorn's default listen backlog
RESERVED_FILES = 64  # the process's own files: models, logs, libraries, the listening socket


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards the hard limit (as Go programs do); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover - platform refuses
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else wanted


def fit_open_files(limit: int, max_connections: int, backlog: int = ACCEPT_BACKLOG) -> tuple[int, int]:
    """(connections, listen backlog) that stay within an open-file limit.

    asyncio accepts up to ``backlog`` queued sockets at each wake-up, before any of them reaches
    :meth:`Protocol.connection_made`, and a socket closed there keeps its descriptor for a few more loop
    turns: so a burst of connections can hold the cap plus about three backlogs of descriptors at once.
    Beyond the limit, ``accept`` fails ("Too many open files") and asyncio stops accepting for a second.
    """
    if max_connections + 3 * backlog + RESERVED_FILES <= limit:
        return max_connections, backlog
    spare = max(limit - RESERVED_FILES, 8)
    backlog = max(1, min(backlog, spare // 8))
    return max(1, min(max_connections, spare - 3 * backlog)), backlog


def run(app: Any, settings: ServerSettings, host: str, port: int, log_level: str = "info") -> str | None:
    """Serve ``app`` until SIGTERM / Ctrl-C, then drain (see :class:`Server`). Returns None, or why the models
    could not be loaded (the server then stops at once: an orchestrator sees the exit and its reason)."""
    limit = raise_open_file_limit(settings.max_connections + 3 * ACCEPT_BACKLOG + RESERVED_FILES)
    connections, backlog = fit_open_files(limit, settings.max_connections)
    if connections < settings.max_connections:
        logger.warning("open-file limit %d is too low for --max-connections %d: connections are capped at %d "
                       "(raise the limit with ulimit -n)", limit, settings.max_connections, connections)
        settings.max_connections = connections
    config = make_config(app, settings, host=host, port=port, log_level=log_level, backlog=backlog)
    quiet_repeats()
    server = Server(config, app, settings.graceful_timeout_s)
    server.run()
    return server.load_error
