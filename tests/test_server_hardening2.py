"""Server hardening II (issue 34): held connections, work before admission, fair sharing, framing, and the
low items. Each test names its item and fails on the code before the fix.

No wall-clock bounds: orderings, events and statuses only (the machine may be busy).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from live_server import LiveServer
from tamis.server import ServerSettings, create_app
from tamis.server.batcher import ModelWorker
from test_server import FakeEmbedder, client, make_app, metric, run
from test_server_hardening import start_script_server

pytestmark = pytest.mark.timeout(120)


def post(c: httpx.AsyncClient, path: str, body: Any, **kw: Any) -> Any:
    return c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json",
                                                                    **kw.pop("headers", {})}, **kw)


def _recv_until_closed(sock: socket.socket, wait_s: float = 10.0) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection within ``wait_s``."""
    sock.settimeout(wait_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except TimeoutError:
        return data, False
    except ConnectionResetError:
        return data, True


def _read_response_head(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------------------- A: early responses
@pytest.mark.parametrize("request_head", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",  # a GET with a body: 200 at once
    b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",  # no key: 401 at once
    b"DELETE /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",  # 401 too (before 405)
])
def test_a_connection_answered_before_its_body_is_closed(request_head: bytes) -> None:
    """Item A: after an early answer, one more body byte left the connection open with no timer running
    (busy for the connection cap, forever)."""
    settings = ServerSettings(api_keys=["k"], keep_alive_timeout_s=60.0, header_timeout_s=60.0,
                              body_timeout_s=60.0)
    with LiveServer(create_app({"fake": FakeEmbedder()}, {}, settings), settings=settings) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(request_head)
        head = _read_response_head(s)
        try:
            s.sendall(b"x")
        except OSError:  # already closed by the server: what this test wants
            pass
        rest, closed = _recv_until_closed(s, 10.0)  # every timer here is 60 s: only the fix closes it
        s.close()
    assert head.startswith(b"HTTP/1.1 "), head
    assert b"connection: close" in head.lower(), head
    assert closed, rest


def test_a_complete_requests_stay_kept_alive() -> None:
    """Item A, the other side: a request whose body arrived in full keeps its connection."""
    settings = ServerSettings(keep_alive_timeout_s=60.0)
    with LiveServer(create_app({"fake": FakeEmbedder()}, {}, settings), settings=settings) as srv:
        with httpx.Client(base_url=srv.url) as c:
            first = c.post("/v1/embeddings", json={"input": "one"})
            second = c.get("/health")
    assert first.status_code == second.status_code == 200
    assert "close" not in first.headers.get("connection", "")


# ---------------------------------------------------------------------------- D: framing
def test_d_content_length_with_transfer_encoding_is_refused_and_closed() -> None:
    """Item D: both headers were accepted and the pipelined request behind them answered (smuggling)."""
    settings = ServerSettings()
    with LiveServer(create_app({"fake": FakeEmbedder()}, {}, settings), settings=settings) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        body = b'{"input": "x"}'
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body) + 7).encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
                  + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data, closed = _recv_until_closed(s, 10.0)
        s.close()
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"invalid_framing" in data and b"connection: close" in data.lower()
    assert data.count(b"HTTP/1.1 ") == 1, data  # the pipelined request is not answered
    assert closed


# ---------------------------------------------------------------------------- C: fair sharing
class SteppedEmbedder(FakeEmbedder):
    """A fake whose forward calls run one at a time when the test releases them; records each call."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.release = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)

    def forward(self, encodings, tasks):  # type: ignore[no-untyped-def]
        self.entered.release()
        assert self.release.acquire(timeout=60)
        return super().forward(encodings, tasks)


def _texts(prefix: str, n: int, words: int) -> list[str]:
    return [" ".join(f"{prefix}{i}w{k}" for k in range(words)) for i in range(n)]


@pytest.mark.parametrize("big_in_pool", [False, True])
def test_c_a_small_request_is_served_while_a_big_one_runs(big_in_pool: bool) -> None:
    """Item C: a big request's rows filled the planning window first, so a one-input request sent just
    after it waited for all of them. Now requests take turns batch by batch: the small one's row is in the
    batch right after the one running when it arrived, and it is answered while the big one still runs."""
    emb = SteppedEmbedder()
    words = 3 if not big_in_pool else 40  # 40 words: cut at the fake's 16 tokens, but >32768 characters in all
    big_texts = _texts("big", 120, words)
    app = create_app({"fake": emb}, {}, ServerSettings(max_batch_size=4, max_batch_tokens=10_000, gather_batches=4,
                                                       default_truncate=True))
    worker: ModelWorker = app.state.tamis.workers[("embedding", "fake")]

    async def go():
        async with client(app) as c:
            big = asyncio.ensure_future(post(c, "/v1/embeddings", {"input": big_texts}))
            await asyncio.to_thread(emb.entered.acquire)  # the big request's first batch is running
            small = asyncio.ensure_future(post(c, "/v1/embeddings", {"input": "small one"}))
            while worker.pending_jobs < 2:  # the small request is admitted
                await asyncio.sleep(0.01)
            calls = 1
            while not small.done():
                emb.release.release()  # let one batch finish
                await asyncio.to_thread(emb.entered.acquire) if not small.done() and calls < 40 else None
                calls += 1
                await asyncio.sleep(0)
                for _ in range(200):  # the small request's answer travels back through the loop
                    if small.done():
                        break
                    await asyncio.sleep(0.005)
            big_done_at_small = big.done()
            for _ in range(100):
                emb.release.release()
            return await small, await big, big_done_at_small

    small, big, big_done_at_small = run(go())
    assert small.status_code == 200 and big.status_code == 200, (small.text, big.text[:200])
    assert not big_done_at_small  # the small request was answered while the big one still ran
    small_ids = tuple(emb.tokenize(["small one"])[0].ids)
    where = [k for k, call in enumerate(emb.calls) if small_ids in call]
    assert where == [1], (where, [len(c) for c in emb.calls])  # in the batch right after the running one
    np_big = big.json()["data"]
    assert [d["index"] for d in np_big] == list(range(120))
    # rows of both requests went back to their own request and position
    exp = emb.expected(big_texts[:3])
    got = [d["embedding"] for d in np_big[:3]]
    assert torch.allclose(torch.tensor(got), torch.tensor(exp), atol=1e-5)


def test_c_requests_take_turns_in_the_planner() -> None:
    """Item C, the planner alone: three queued requests (big, big, small) get batches in turn, the small
    one in the first round, instead of the oldest request's rows first."""
    emb = FakeEmbedder()
    worker = ModelWorker("fake", emb, max_batch_size=2, max_batch_tokens=1000, gather_batches=2)

    async def go():
        jobs = []
        for prefix, n in (("a", 6), ("b", 6), ("c", 1)):
            texts = _texts(prefix, n, 2)
            jobs.append(worker.submit_rows(emb.tokenize(texts), [None] * n, 60.0))
        order = []
        with worker._cond:
            while worker._queue:
                batch = worker._next_batch_locked()
                order.append({j.seq for j, _ in batch})
                for job, _ in batch:
                    job.done += 1
        return order, jobs

    worker._thread = threading.Thread(target=lambda: None)  # planned by hand: no worker thread
    worker._thread.is_alive = lambda: True  # type: ignore[method-assign]
    order, jobs = run(go())
    first_c = next(k for k, seqs in enumerate(order) if 3 in seqs)
    assert first_c <= 2, order  # in the first round (FIFO: after a's and b's rows, the 6th batch or later)
    assert sum(len(s) for s in order) >= 7 and all(j.done == j.n for j in jobs)


def test_c_per_request_token_cap() -> None:
    """Item C: the per-request token cap (a setting; off by default)."""
    app = make_app(max_request_tokens=10)

    async def go():
        async with client(app) as c:
            return (await post(c, "/v1/embeddings", {"input": ["a b c", "d e f"]}),  # 2 x 5 tokens: at the cap
                    await post(c, "/v1/embeddings", {"input": ["a b c", "d e f g"]}))  # 11

    ok, over = run(go())
    assert ok.status_code == 200, ok.text
    assert over.status_code == 400 and over.json()["error"]["code"] == "request_too_large", over.text


# ---------------------------------------------------------------------------- B: before admission
class SlowTokenizer(FakeEmbedder):
    """Tokenizing a big request (over ``slow_chars`` characters in one call) waits for ``gate``."""

    def __init__(self, *a: Any, slow_chars: int = 10_000, **kw: Any):
        super().__init__(*a, **kw)
        self.slow_chars = slow_chars
        self.gate = threading.Event()
        self.big_calls = 0
        self.entered = threading.Event()

    def tokenize(self, texts, task=None, truncate=True):  # type: ignore[no-untyped-def]
        if sum(map(len, texts)) >= self.slow_chars:
            self.big_calls += 1
            self.entered.set()
            self.gate.wait(30)
        return super().tokenize(texts, task, truncate)

    def forward(self, encodings, tasks):  # type: ignore[no-untyped-def]
        return FakeEmbedder.forward(self, encodings, tasks)


def _big_body(n: int = 1200) -> dict:
    return {"input": _texts("t", n, 100), "truncate": True}  # each cut to 512 characters: ~600,000 in all


def test_b_deadline_counts_from_arrival_and_stops_tokenizing() -> None:
    """Item B: the deadline started only once a big request had been tokenized (in the thread pool), so
    the 503 came long after --request-timeout; its tokenizing ran on to the end."""
    emb = SlowTokenizer()
    app = create_app({"fake": emb}, {}, ServerSettings(request_timeout_s=0.5))
    worker: ModelWorker = app.state.tamis.workers[("embedding", "fake")]

    async def go():
        async with client(app) as c:
            r = await post(c, "/v1/embeddings", _big_body())
            emb.gate.set()  # the first slice's tokenizing ends now, after the answer
            while worker.tokenizing_chars:  # the slices after it are never started
                await asyncio.sleep(0.01)
            return r, await c.get("/metrics")

    r, m = run(go())
    assert r.status_code == 503 and r.json()["error"]["code"] == "timeout", r.text
    assert r.headers["retry-after"]
    assert emb.big_calls == 1  # one slice tokenized (it was running), the other slices dropped
    assert metric(m.text, "tamis_queue_depth") == 0


def test_b_work_before_admission_is_bounded() -> None:
    """Item B: requests being tokenized in the thread pool were not counted anywhere: four maximal ones
    at once all went ahead. Now they count in the queue bound and in a bound on characters being
    tokenized (429 with Retry-After, like the queue)."""
    emb = SlowTokenizer()
    app = create_app({"fake": emb}, {}, ServerSettings(max_tokenizing_chars=700_000, max_queued_inputs=5000))
    worker: ModelWorker = app.state.tamis.workers[("embedding", "fake")]

    async def go():
        async with client(app) as c:
            first = asyncio.ensure_future(post(c, "/v1/embeddings", _big_body()))
            await asyncio.to_thread(emb.entered.wait, 30)
            queued = worker.pending_inputs
            second = await post(c, "/v1/embeddings", _big_body())
            emb.gate.set()
            return await first, second, queued

    first, second, queued = run(go())
    assert queued == 1200  # admitted (counted in the queue bound) while still being tokenized
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1, second.text
    assert "tokenized" in second.json()["detail"]
    assert first.status_code == 200, first.text[:300]


def test_b_big_request_results_match_small_ones() -> None:
    """Item B: a request tokenized in slices in the thread pool gives the same vectors, in order, as the
    same texts sent one by one (slices joined in order, errors name the right index)."""
    emb = FakeEmbedder()
    app = create_app({"fake": emb}, {}, ServerSettings(default_truncate=True))
    # ~470 characters and at most 15 tokens each (within the fake's 512 characters / 16 tokens): 2 slices
    texts = [" ".join([f"w{i}"] + [f"x{k}" for k in range(i % 12)]) + " " + "z" * 440 for i in range(700)]

    async def go():
        async with client(app) as c:
            big = await post(c, "/v1/embeddings", {"input": texts})
            long = list(texts)
            long[650] = " ".join(["y"] * 40)  # over the fake's 16 tokens, within its characters
            refused = await post(c, "/v1/embeddings", {"input": long, "truncate": False})
            return big, refused

    big, refused = run(go())
    assert big.status_code == 200, big.text[:300]
    got = torch.tensor([d["embedding"] for d in big.json()["data"]])
    exp = torch.tensor(emb.expected(texts))
    assert torch.allclose(got, exp, atol=1e-5)
    assert refused.status_code == 400, refused.text[:300]
    assert refused.json()["error"]["code"] == "input_too_long" and refused.json()["index"] == 650, refused.text[:300]


# ---------------------------------------------------------------------------- low items
def test_low_two_authorization_headers_are_a_400() -> None:
    app = make_app(api_keys=["good"])

    async def go():
        async with client(app) as c:
            two = await c.post("/v1/embeddings", json={"input": "x"},
                               headers=[("authorization", "Bearer bad"), ("authorization", "Bearer good")])
            one = await c.post("/v1/embeddings", json={"input": "x"}, headers={"authorization": "Bearer good"})
            return two, one

    two, one = run(go())
    assert two.status_code == 400 and "Authorization headers" in two.json()["detail"], two.text
    assert one.status_code == 200


def test_low_public_health_names_no_models_without_the_key() -> None:
    app = make_app(api_keys=["good"])
    open_app = make_app()

    async def go():
        async with client(app) as c, client(open_app) as o:
            return (await c.get("/health"), await c.get("/health", headers={"authorization": "Bearer good"}),
                    await c.get("/health", headers={"authorization": "Bearer bad"}), await o.get("/health"))

    anon, keyed, bad, open_ = run(go())
    assert anon.status_code == 200 and anon.json()["status"] == "ok"
    assert "embedding_models" not in anon.json() and "fake" not in anon.text, anon.text
    assert "embedding_models" not in bad.json()
    assert keyed.json()["embedding_models"] == ["fake"] and keyed.json()["reranker_models"] == ["fake-rr"]
    assert open_.json()["embedding_models"] == ["fake"]  # an open server: anyone may see them


@pytest.mark.parametrize("field,value", [("truncate", "yes"), ("truncate", "no"), ("normalized", 0),
                                         ("late_chunking", "no"), ("normalized", "true"), ("truncate", 1)])
def test_low_booleans_are_strict(field: str, value: Any) -> None:
    async def go():
        async with client(make_app()) as c:
            return (await post(c, "/v1/embeddings", {"input": "x", field: value}),
                    await post(c, "/v1/rerank", {"query": "q", "documents": ["d"], "return_documents": value}))

    emb, rr = run(go())
    assert emb.status_code == 422 and field in emb.text, emb.text
    assert rr.status_code == 422 and "return_documents" in rr.text, rr.text


def test_low_top_n_minimum_is_in_the_schema() -> None:
    async def go():
        async with client(make_app()) as c:
            return (await c.get("/openapi.json"), await post(c, "/v1/rerank", {"query": "q", "documents": ["d"],
                                                                               "top_n": 0}))

    spec, zero = run(go())
    top_n = spec.json()["components"]["schemas"]["RerankRequest"]["properties"]["top_n"]
    assert {"type": "integer", "minimum": 1} in top_n["anyOf"], top_n
    assert zero.status_code == 400 and zero.json()["error"]["code"] == "invalid_top_n"


@pytest.mark.parametrize("text", ["\x00", "\x00\x00\x00", "\u200b", "\ufeff", "\u200b \ufeff\u2060\n", "\u200d\u200c"])
def test_low_invisible_inputs_are_refused_like_whitespace(text: str) -> None:
    emb = FakeEmbedder()

    async def go():
        async with client(make_app(emb=emb)) as c:
            return (await post(c, "/v1/embeddings", {"input": ["fine", text]}),
                    await post(c, "/v1/rerank", {"query": "q", "documents": ["d", text]}),
                    await post(c, "/v1/rerank", {"query": text, "documents": ["d"]}),
                    await post(c, "/v2/embed", {"texts": [text]}),
                    await post(c, "/v1/embeddings", {"input": "caf\u00e9\u200b"}))

    e, d, q, co, ok = run(go())
    for r, needle in ((e, "input 1"), (d, "document 1"), (q, "query"), (co, "text 0")):
        assert r.status_code == 400 and r.json()["error"]["code"] == "empty_input", r.text
        assert needle in r.json()["detail"], r.text
    assert ok.status_code == 200  # a zero-width character inside real text is fine


def test_low_retry_after_follows_the_measured_drain_rate() -> None:
    """Low item: Retry-After came from a per-batch model-time average over all admitted inputs (60 while
    the queue drained in 9-12 s). Now: the inputs still to compute over the rate they drained at (the
    worker's busy time, here a stepped clock: 0.125 s per batch of 10 rows = 80 inputs/s)."""
    clock = [0.0]

    class Timed(SteppedEmbedder):
        def forward(self, encodings, tasks):  # type: ignore[no-untyped-def]
            out = super().forward(encodings, tasks)
            clock[0] += 0.125  # exact in binary: the rate below is exactly 80 inputs/s
            return out

    emb = Timed()
    app = create_app({"fake": emb}, {}, ServerSettings(max_batch_size=10, max_batch_tokens=10_000))
    worker: ModelWorker = app.state.tamis.workers[("embedding", "fake")]
    worker.clock = lambda: clock[0]
    seen: list[tuple[int, int]] = []  # (rows left, Retry-After)

    async def go():
        async with client(app) as c:
            big = asyncio.ensure_future(post(c, "/v1/embeddings", {"input": _texts("r", 2000, 2)}))
            for k in range(200):
                await asyncio.to_thread(emb.entered.acquire)
                if k in (20, 150, 190):
                    seen.append((int(worker.remaining_inputs()), worker.retry_after()))
                emb.release.release()
            return await big

    big = run(go())
    assert big.status_code == 200
    assert [left for left, _ in seen] == [1800, 500, 100]
    assert [after for _, after in seen] == [23, 7, 2], seen  # ceil(left / 80)


def test_low_health_answers_503_during_the_grace_period(tmp_path: Path) -> None:
    """Low item: after SIGTERM the port was closed at once, so no client ever saw /health 503
    shutting_down. Now new connections are still answered while admitted work runs."""
    proc, url, log = start_script_server(tmp_path, "max_batch_size=1, graceful_timeout_s=20.0")
    try:
        http = httpx.Client(base_url=url, timeout=60)
        result: list[httpx.Response] = []
        t = threading.Thread(target=lambda: result.append(http.post("/v1/embeddings", json={"input": ["a"] * 8})))
        t.start()  # 8 rows x 0.5 s, one per batch
        while metric(http.get("/metrics").text, "tamis_queue_requests") < 1:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        health = []
        while t.is_alive():
            try:
                health.append(httpx.get(url + "/health", timeout=10))
            except httpx.TransportError as exc:
                health.append(exc)  # type: ignore[arg-type]
                break
            if health[-1].status_code == 503:
                break
            time.sleep(0.05)
        refused_new = httpx.post(url + "/v1/embeddings", json={"input": "late"}, timeout=10) if t.is_alive() else None
        t.join(60)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    last = health[-1]
    assert isinstance(last, httpx.Response), health
    assert last.status_code == 503 and last.json()["status"] == "shutting_down", last.text
    assert refused_new is None or refused_new.status_code == 503
    assert result and result[0].status_code == 200  # the admitted request finished within the grace period
    assert proc.returncode is not None
