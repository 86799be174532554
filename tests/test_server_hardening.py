"""Server hardening (issue 12, items 9-19): what a careless or hostile client hits.

Each test names its item. Fakes come from test_server.py; real tiny models from ../shared/fixtures and the
bundled all-MiniLM-L6-v2 where the behaviour belongs to the reranker backends themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import tamis
from live_server import LiveServer
from tamis.errors import InputTooLongError
from tamis.rerank import EmbeddingReranker
from tamis.rerank.results import rank
from tamis.server import ServerSettings, create_app
from tamis.server import body as body_module
from tamis.server.app import _dumps
from tamis.server.body import count_json_values
from tamis.server.runner import RepeatFilter
from test_server import FakeEmbedder, FakeReranker, client, make_app, metric, run

pytestmark = pytest.mark.timeout(120)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CE = SHARED / "fixtures" / "jina-reranker-v1-tiny-like"
LISTWISE = SHARED / "fixtures" / "jina-reranker-v3-tiny"
SRC = Path(__file__).resolve().parents[1] / "src"


class RecordingEmbedder(FakeEmbedder):
    """Records the longest text it was asked to tokenize and the thread it tokenized on."""

    def __init__(self, *a: Any, slow_chars: int | None = None, **kw: Any):
        super().__init__(*a, **kw)
        self.longest = 0
        self.threads: list[tuple[int, str]] = []  # (characters, thread name)
        self.slow_chars = slow_chars

    def tokenize(self, texts, task=None, truncate=True):  # type: ignore[no-untyped-def]
        chars = sum(map(len, texts))
        self.longest = max([self.longest, *map(len, texts)])
        self.threads.append((chars, threading.current_thread().name))
        if self.slow_chars is not None and chars >= self.slow_chars:
            time.sleep(2.0)  # a big request's tokenizing takes a while
        return super().tokenize(texts, task, truncate)


class SteppingReranker(FakeReranker):
    """A rerank that runs ``steps`` batches of ``step_s`` seconds, calling ``progress`` between them."""

    def __init__(self, name: str = "slow-rr", steps: int = 30, step_s: float = 0.1):
        super().__init__(name)
        self.steps, self.step_s = steps, step_s
        self.cooperative = True
        self.done_steps: list[int] = []

    def rerank(self, query, documents, top_n=None, return_documents=True, *, truncate=True, progress=None):  # type: ignore[no-untyped-def]
        done = 0
        for _ in range(self.steps if len(documents) > 1 else 1):
            time.sleep(self.step_s)
            done += 1
            if progress is not None and self.cooperative:
                try:
                    progress(done, self.steps)
                except BaseException:
                    self.done_steps.append(done)
                    raise
        self.done_steps.append(done)
        return rank(query, [0.5] * len(documents), documents, top_n, return_documents, model=self.name)


def post(c: httpx.AsyncClient, path: str, body: Any) -> Any:
    return c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


# ---------------------------------------------------------------------------- 9: model names
def test_model_default_alias_and_unknown_names() -> None:
    """Item 9: "default" (the library's name) is accepted; unknown names stay an error (vLLM's choice: a
    client asking for a model it does not get could mix vectors of two models in one index)."""
    app = make_app()
    mini_app = create_app({"other": FakeEmbedder("other"), "all-MiniLM-L6-v2": FakeEmbedder("all-MiniLM-L6-v2")},
                          {"fake-rr": FakeReranker()})

    async def go():
        async with client(app) as c, client(mini_app) as m:
            return (await post(c, "/v1/embeddings", {"model": "default", "input": "x"}),
                    await post(c, "/v1/embeddings", {"model": "DEFAULT", "input": "x"}),
                    await post(c, "/v1/rerank", {"model": "default", "query": "q", "documents": ["q d"]}),
                    await post(c, "/v1/embeddings", {"model": "jina-embeddings-v3", "input": "x"}),
                    await post(m, "/v1/embeddings", {"model": "default", "input": "x"}),
                    await post(m, "/v1/embeddings", {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "x"}),
                    await post(m, "/v1/embeddings", {"model": "nope", "input": "x"}))

    emb, upper, rr, unknown, mini_default, mini_full, mini_unknown = run(go())
    assert emb.status_code == upper.status_code == rr.status_code == 200, emb.text
    assert emb.json()["model"] == "fake" and rr.json()["model"] == "fake-rr"
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "model_not_found"
    assert "--embedding-model NAME=MODEL" in unknown.json()["detail"]  # how to serve it under that name
    # the library's default model answers to its aliases even when it is not the route's first model
    assert mini_default.json()["model"] == mini_full.json()["model"] == "all-MiniLM-L6-v2"
    assert mini_unknown.status_code == 400 and "NAME=MODEL" not in mini_unknown.json()["detail"]


# ---------------------------------------------------------------------------- 10: echoed fields
def test_lone_surrogate_in_an_echoed_document_field_is_a_400() -> None:
    """Item 10: was a 500 (UnicodeEncodeError in the JSON fallback) after the rerank had run."""
    rr = FakeReranker()
    raw = b'{"query":"q","documents":[{"text":"a","meta":"\\ud800"}]}'

    async def go():
        async with client(make_app(rr=rr)) as c:
            return (await c.post("/v1/rerank", content=raw, headers={"content-type": "application/json"}),
                    await post(c, "/v1/rerank", {"query": "q", "documents": [{"text": "a", "e": "\U0001f600"}]}))

    bad, emoji = run(go())
    assert bad.status_code == 400, bad.text
    assert "documents -> 0 -> meta" in bad.json()["detail"] and "surrogate" in bad.json()["detail"]
    assert rr.calls == 1  # only the valid request reached the model
    assert emoji.status_code == 200 and emoji.json()["results"][0]["document"]["e"] == "\U0001f600"
    # and the fallback encoder (for what orjson refuses) cannot fail on such text
    out = _dumps({"n": 2**70, "s": "\ud800"})
    assert json.loads(out) == {"n": 2**70, "s": "\ud800"}


# ---------------------------------------------------------------------------- 11: large bodies
def test_count_json_values_matches_a_tokenizer() -> None:
    def ref(s: bytes) -> int:
        n, inside, esc = 0, False, False
        for ch in s:
            if inside:
                esc, inside = (False, inside) if esc else (ch == 92, ch != 34)
            elif ch == 34:
                inside = True
            elif ch in (44, 91, 123):
                n += 1
        return n

    rng = random.Random(0)
    alphabet = ['a', '"', '\\', ',', '[', '{', '}', ']', ' ', 'é', '\U0001f600', '\\"', '\\\\']

    def value(d: int = 0) -> Any:
        r = rng.random()
        if d > 3 or r < 0.3:
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        if r < 0.4:
            return rng.randint(-5, 5)
        if r < 0.7:
            return [value(d + 1) for _ in range(rng.randint(0, 4))]
        return {str(rng.random()): value(d + 1) for _ in range(rng.randint(0, 4))}

    cases = [json.dumps(value(), ensure_ascii=rng.random() < 0.5).encode() for _ in range(500)]
    cases += [json.dumps({"a": "\\" * k + '"' + ",[{", "b": [1, "\\" * k, 2]}).encode() for k in range(1, 12)]
    for s in cases:
        # whole, and in blocks as small as one byte: string and escape state carried across block edges
        assert count_json_values(s) == ref(s), s
        for block in (1, 2, 3, 5, 8):
            assert count_json_values(s, block=block) == ref(s), (block, s)


def test_large_body_is_bounded_before_parsing_and_health_stays_responsive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 11: a body of a million list items was parsed and validated on the event loop (seconds, with
    /health waiting); now it is refused from a byte count, off the loop, before anything is built.

    Behaviour, not wall-clock time (issue 36, item 2): each big body is sent in two parts, and its second part
    is held back until ``/health`` has answered, so the server is seen answering while the body is pending;
    ``json.loads`` is watched to show the big bodies are never parsed."""
    big = b'{"input":[' + b",".join([b"1"] * 1_000_000) + b"]}"
    objects = b'{"query":"q","documents":[' + b",".join([b"{}"] * 600_000) + b"]}"
    parsed: list[int] = []
    loads = body_module.json.loads

    def watching_loads(text: Any, *a: Any, **kw: Any) -> Any:
        parsed.append(len(text))
        return loads(text, *a, **kw)

    monkeypatch.setattr(body_module.json, "loads", watching_loads)
    health_answered = threading.Event()
    with LiveServer(make_app()) as srv:
        results: dict[str, httpx.Response] = {}

        def send(name: str, body: bytes, path: str) -> None:
            def parts() -> Any:
                yield body[:10]
                health_answered.wait(60)  # the rest only once /health answered beside this pending body
                yield body[10:]

            results[name] = httpx.post(srv.url + path, content=parts(), timeout=60,
                                       headers={"content-type": "application/json", "content-length": str(len(body))})

        threads = [threading.Thread(target=send, args=("ints", big, "/v1/embeddings")),
                   threading.Thread(target=send, args=("objects", objects, "/v1/rerank"))]
        for t in threads:
            t.start()
        health: list[int] = []
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            health.append(h.get("/health").status_code)
            pending = all(t.is_alive() for t in threads)  # both bodies are still held back here
            health_answered.set()
            while any(t.is_alive() for t in threads):
                health.append(h.get("/health").status_code)
                time.sleep(0.01)
        for t in threads:
            t.join()
    assert pending and health and set(health) == {200}, health
    for name in ("ints", "objects"):
        r = results[name]
        assert r.status_code == 413 and "JSON values" in r.json()["detail"], r.text
    assert all(n < 10_000 for n in parsed), parsed  # the big bodies were refused before json.loads saw them


def test_large_bodies_are_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, bool]] = []
    parse = body_module.parse_body

    def recording(body: bytes, *a: Any) -> Any:
        seen.append((len(body), threading.current_thread() is threading.main_thread()))
        return parse(body, *a)

    monkeypatch.setattr(body_module, "parse_body", recording)

    async def go():
        async with client(make_app(max_inputs=4)) as c:
            small = await post(c, "/v1/embeddings", {"input": ["a b"]})
            large = await post(c, "/v1/embeddings", {"input": ["w " * 40_000], "truncate": True})
            return small, large

    small, large = run(go())
    assert small.status_code == large.status_code == 200
    assert [on_loop for _, on_loop in seen] == [True, False]  # the large one in the thread pool


# ---------------------------------------------------------------------------- 12: one huge string
def test_huge_string_is_cut_or_refused_by_characters_before_tokenizing() -> None:
    """Item 12: an 8 MB string was tokenized in full (on the model thread) before the 400."""
    emb = RecordingEmbedder()
    cap = emb.max_length * ServerSettings().max_chars_per_token  # 16 tokens x 32 characters
    huge = "w " * 200_000

    async def go():
        async with client(make_app(emb)) as c:
            return (await post(c, "/v1/embeddings", {"input": ["ok", huge]}),
                    await post(c, "/v1/embeddings", {"input": ["ok", huge], "truncate": True}))

    refused, cut = run(go())
    assert refused.status_code == 400, refused.text
    assert "input 1 has 400000 characters" in refused.json()["detail"]
    assert refused.json()["char_limit"] == cap and refused.json()["index"] == 1
    assert cut.status_code == 200 and cut.headers["x-truncated-inputs"] == "1"
    assert emb.longest <= cap  # the tokenizer never saw the whole string


def test_big_requests_are_tokenized_off_the_model_thread() -> None:
    """Item 12: a big request's tokenizing no longer holds the model thread (a small one behind it waits
    for nothing); small requests may still be tokenized there between model calls (CPU models)."""
    emb = RecordingEmbedder(slow_chars=30_000)
    app = make_app(emb)

    async def go():
        async with client(app) as c:
            big = asyncio.ensure_future(post(c, "/v1/embeddings", {"input": ["w " * 200] * 100, "truncate": True}))
            await asyncio.sleep(0.2)  # the big one is being tokenized (2 s)
            small = await post(c, "/v1/embeddings", {"input": "one"})
            big_still_running = not big.done()
            return await big, small, big_still_running

    big, small, big_still_running = run(go())
    assert big.status_code == small.status_code == 200
    assert big_still_running  # the small request was answered while the big one was still tokenizing
    threads = dict(emb.threads)
    assert not threads[40_000].startswith("tamis-worker")
    assert threads[3].startswith("tamis-worker")


# ---------------------------------------------------------------------------- 13: rerank truncation
@pytest.fixture(scope="module")
def real_rerankers() -> dict[str, Any]:
    if not CE.is_dir():
        pytest.skip(f"fixture {CE} is absent")
    return {"ce": tamis.Reranker(CE), "mini": EmbeddingReranker(tamis.Embedder())}


def test_rerank_truncation_is_an_error_or_reported(real_rerankers: dict[str, Any]) -> None:
    """Item 13: was silent (200, query cut, no header) whatever ``truncate`` said."""
    app = create_app({}, real_rerankers)
    queries = {"ce": "late chunking " * 40, "mini": "late chunking " * 150}  # over 64 / 256 tokens
    docs = ["late chunking embeds a document once", "short", "chunking " * 400]

    async def go():
        async with client(app) as c:
            out = {}
            for model, long_q in queries.items():
                out[model, "strict"] = await post(c, "/v1/rerank", {"model": model, "query": long_q,
                                                                    "documents": docs[:2], "truncate": False})
                out[model, "default"] = await post(c, "/v1/rerank", {"model": model, "query": long_q,
                                                                     "documents": docs})
            out["mini", "doc"] = await post(c, "/v2/rerank", {"model": "mini", "query": "q", "documents": docs,
                                                              "truncate": False})
            out["ce", "chars"] = await post(c, "/v1/rerank", {"model": "ce", "query": "q", "documents": docs,
                                                              "truncate": False})
            return out

    r = run(go())
    ce = r["ce", "strict"].json()
    assert r["ce", "strict"].status_code == 400 and ce["error"]["code"] == "input_too_long"
    assert ce["detail"].startswith("query + document 0 has ") and "limit of 64" in ce["detail"]
    assert ce["index"] == 0 and ce["n_tokens"] > 64 and ce["limit"] == 64
    mini = r["mini", "strict"].json()
    assert r["mini", "strict"].status_code == 400 and mini["detail"].startswith("query has ")
    assert mini["index"] is None and mini["limit"] == 256 and mini["error"]["param"] == "query"
    doc = r["mini", "doc"].json()
    assert doc["detail"].startswith("document 2 has 802 tokens") and doc["error"]["param"] == "documents"
    chars = r["ce", "chars"].json()  # 3600 characters cannot fit 64 tokens: refused without tokenizing
    assert chars["detail"].startswith("document 2 has 3600 characters") and chars["char_limit"] == 64 * 32
    # truncate defaults to true for rerank (as Cohere), and every cut is reported
    assert r["ce", "default"].status_code == 200 and r["ce", "default"].headers["x-truncated-inputs"] == "0,1,2"
    assert r["mini", "default"].status_code == 200
    assert r["mini", "default"].headers["x-truncated-query"] == "true"
    assert r["mini", "default"].headers["x-truncated-inputs"] == "2"


def test_reranker_backends_truncate_false_and_progress(real_rerankers: dict[str, Any]) -> None:
    ce, mini = real_rerankers["ce"], real_rerankers["mini"]
    with pytest.raises(InputTooLongError) as e:
        ce.rerank("q", ["short", "word " * 80], truncate=False)
    assert e.value.what == "query + document" and e.value.index == 1 and e.value.limit == 64
    with pytest.raises(InputTooLongError) as e:
        mini.rerank("word " * 300, ["d"], truncate=False)
    assert e.value.what == "query" and e.value.index is None and str(e.value).startswith("query has 302 tokens")
    calls: list[tuple[int, int]] = []
    docs = [f"document {i} " * (1 + i % 7) for i in range(40)]
    ce.max_batch_size = 8
    try:
        res = ce.rerank("document", docs, progress=lambda d, t: calls.append((d, t)))
    finally:
        ce.max_batch_size = 256
    assert len(res) == 40 and calls[-1] == (40, 40) and len(calls) >= 5
    with pytest.raises(KeyError):  # an exception raised by progress stops the rerank
        mini.rerank("q", docs, progress=lambda d, t: (_ for _ in ()).throw(KeyError("stop")))
    if LISTWISE.is_dir():
        from tamis.rerank import ListwiseReranker

        lw = ListwiseReranker(LISTWISE, block_size=2, max_doc_length=8, max_query_length=8)
        with pytest.raises(InputTooLongError) as e:
            lw.rerank("q", ["a b", "one two three four five six seven eight nine ten"], truncate=False)
        assert e.value.what == "document" and e.value.index == 1
        blocks: list[int] = []
        lw.rerank("q", ["a", "b", "c", "d", "e"], progress=lambda d, t: blocks.append(d))
        assert blocks == [2, 4, 5]


# ---------------------------------------------------------------------------- 14: SIGTERM
SCRIPT_SERVER = """
import sys, time, torch
sys.path.insert(0, {src!r})
from tamis.server import ServerSettings, create_app
from tamis.server.runner import run
from tamis.tokenize import Encoded

class Slow:
    name, dimension, max_length, tasks, device = "slow", 4, 64, [], "cpu"
    def tokenize(self, texts, task=None, truncate=True):
        return [Encoded([1, 5, 2], [0] * 3, [(0, 0)] * 3, [0] * 3, 3, False) for _ in texts]
    def forward(self, encodings, tasks):
        time.sleep(0.5)
        return torch.ones(len(encodings), 4)
    def finalize(self, pooled, dimensions=None, normalized=True, embedding_type="float"):
        return pooled.numpy()

settings = ServerSettings({settings})
run(create_app({{"slow": Slow()}}, {{}}, settings), settings, "127.0.0.1", {port}, "warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_script_server(tmp_path: Path, settings: str, preexec: Any = None) -> tuple[subprocess.Popen, str, Any]:
    """``tamis.server.runner.run`` in a subprocess serving a slow fake model (0.5 s per row); returns the
    process, its URL and its open log file, once /health answers 200."""
    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SCRIPT_SERVER.format(src=str(SRC), port=port, settings=settings)))
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120  # importing torch takes a while on a busy machine
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    log.close()
    raise AssertionError(f"script server not ready: {(tmp_path / 'server.log').read_text()[-2000:]}")


def test_sigterm_finishes_what_fits_and_answers_the_rest_with_503(tmp_path: Path) -> None:
    """Item 14: queued work at SIGTERM got plain-text 500s at the graceful-shutdown timeout."""
    proc, url, log = start_script_server(tmp_path, "max_batch_size=1, graceful_timeout_s=3.0")
    try:
        results: list[tuple[int, dict, dict]] = []
        http = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=32))

        def one(i: int) -> None:
            r = http.post("/v1/embeddings", json={"input": [f"text {i}"]})
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"raw": r.text}
            results.append((r.status_code, body, dict(r.headers)))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]  # 12 x 0.5 s of work, serial
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while time.time() < deadline:  # wait until all twelve are admitted (queued or running)
            if metric(http.get("/metrics").text, "tamis_queue_requests") >= 12:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(20)
        proc.wait(20)
        http.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    statuses = sorted(s for s, *_ in results)
    assert len(results) == 12, (tmp_path / "server.log").read_text()
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == 12, statuses  # nothing else: no 500, no dropped connection
    assert 2 <= len(ok) <= 8 and refused, statuses  # what fit in the grace period (2 s of 6 s) finished
    for _, body, headers in refused:
        # a JSON 503 from the server, not a connection cut when the graceful-shutdown timeout ran out
        assert "shutting down" in body["detail"] and int(headers["retry-after"]) >= 1
    assert proc.returncode is not None


# ---------------------------------------------------------------------------- 15: deadlines, disconnects
def test_deadline_is_enforced_on_the_waiting_side() -> None:
    """Item 15: a small rerank queued behind a long one got its 503 only when the worker came free."""
    rr = SteppingReranker(steps=20, step_s=0.1)
    rr.cooperative = False  # the blocker cannot be stopped (as a late-chunking job): the worker stays busy 2 s
    app = make_app(rr=rr, request_timeout_s=0.5)

    async def go():
        async with client(app) as c:
            blocker = asyncio.ensure_future(post(c, "/v1/rerank", {"query": "q", "documents": ["a", "b"]}))
            await asyncio.sleep(0.1)
            small = await post(c, "/v1/rerank", {"query": "q", "documents": ["c"]})
            still_busy = not blocker.done() or rr.done_steps == []
            await blocker
            return small, still_busy

    small, still_busy = run(go())
    assert small.status_code == 503 and small.headers["retry-after"] and "waited in the queue" in small.json()["detail"]
    assert still_busy  # answered at its deadline, while the worker was still busy, not when it came free


def test_started_rerank_stops_at_its_deadline() -> None:
    rr = SteppingReranker(steps=30, step_s=0.1)
    app = make_app(rr=rr, request_timeout_s=0.5)

    async def go():
        async with client(app) as c:
            r = await post(c, "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
            for _ in range(50):  # the worker stops at the next step after the deadline
                if rr.done_steps:
                    break
                await asyncio.sleep(0.05)
            return r, await c.get("/metrics")

    r, m = run(go())
    assert r.status_code == 503 and "computed" in r.json()["detail"]
    assert rr.done_steps and rr.done_steps[0] <= 15, rr.done_steps  # ~5 of its 30 steps, not all
    assert metric(m.text, "tamis_dropped_total", reason="deadline", kind="rerank") == 1
    assert metric(m.text, "tamis_queue_depth", kind="rerank") == 0


def test_started_rerank_stops_when_its_client_disconnects() -> None:
    rr = SteppingReranker(steps=30, step_s=0.1)
    with LiveServer(make_app(rr=rr)) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=0.5)
        deadline = time.time() + 5
        while not rr.done_steps and time.time() < deadline:
            time.sleep(0.05)
        m = httpx.get(srv.url + "/metrics").text
        after = httpx.post(srv.url + "/v1/rerank", json={"query": "q", "documents": ["c"]}, timeout=10)
    assert rr.done_steps and rr.done_steps[0] <= 12, rr.done_steps  # not all 30 steps (3 s)
    assert metric(m, "tamis_dropped_total", reason="disconnect", kind="rerank") == 1
    assert after.status_code == 200


# ---------------------------------------------------------------------------- 16: /metrics
def test_metrics_labels_are_a_fixed_set() -> None:
    """Item 16: random methods (and paths) were labels: /metrics grew with every distinct one."""
    rng = random.Random(0)

    async def go():
        async with client(make_app()) as c:
            await c.get("/metrics")  # its own series exist from here on
            sizes = []
            for _ in range(3):
                for _ in range(20):
                    method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(300))
                    await c.request(method, "/health")
                    await c.request(method, f"/random/{rng.random()}")
                    await c.get(f"/static-offline-docs/{rng.random()}.js")
                sizes.append(len((await c.get("/metrics")).text.splitlines()))
            return sizes, (await c.get("/metrics")).text

    sizes, text = run(go())
    assert sizes[0] == sizes[1] == sizes[2], sizes
    assert metric(text, "tamis_requests_total", route="/health", method="other") == 60
    assert metric(text, "tamis_requests_total", route="other", method="other") == 60
    assert 'route="/static-offline-docs/{path}"' in text


def test_metrics_follow_the_api_key_unless_public() -> None:
    async def go():
        async with client(make_app(api_keys=["k"])) as c, client(make_app(api_keys=["k"], public_metrics=True)) as p:
            return (await c.get("/metrics"), await c.get("/metrics", headers={"Authorization": "Bearer k"}),
                    await p.get("/metrics"), await c.get("/health"))

    closed, keyed, public, health = run(go())
    assert closed.status_code == 401 and keyed.status_code == public.status_code == health.status_code == 200


# ---------------------------------------------------------------------------- 17: connections
def _recv_all(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    sock.settimeout(timeout)
    t0 = time.perf_counter()
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        data += b"<still open>"
    return data, time.perf_counter() - t0


def test_connections_time_out_and_are_capped() -> None:
    """Item 17: connections that never completed a request were never closed (fd exhaustion)."""
    settings = ServerSettings(header_timeout_s=0.5, body_timeout_s=0.5, max_connections=4)
    with LiveServer(create_app({"fake": FakeEmbedder()}, {}, settings), settings=settings) as srv:
        addr = ("127.0.0.1", srv.port)
        opened = time.perf_counter()
        silent = [socket.create_connection(addr) for _ in range(3)]
        partial = socket.create_connection(addr)
        partial.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
        head, _ = _recv_all(partial, 3)
        closed = [(_recv_all(s, 3)[0], time.perf_counter() - opened) for s in silent]
        slow_body = socket.create_connection(addr)
        slow_body.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"input\": ")
        body_reply, _ = _recv_all(slow_body, 3)
        ok = httpx.post(srv.url + "/v1/embeddings", json={"input": "still serving"}, timeout=5)
        for s in [*silent, partial, slow_body]:
            s.close()
    assert head.startswith(b"HTTP/1.1 408")
    # closed by the server (b"", not "<still open>" at the end of the wait), never before the 0.5 s timeout
    assert all(data == b"" and s > 0.4 for data, s in closed), closed
    assert body_reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in body_reply
    assert ok.status_code == 200


def _is_open(sock: socket.socket) -> bool:
    return _recv_all(sock, 0.1)[0] == b"<still open>"


def test_connection_cap_closes_waiting_connections_first() -> None:
    """Item 17: at the cap, a new connection closes the oldest one that is only waiting (silent, or idle on
    keep-alive), so silent clients cannot lock real ones out; when all are busy, the new one is closed."""
    settings = ServerSettings(header_timeout_s=10.0, keep_alive_timeout_s=10.0, max_connections=4)
    rr = SteppingReranker(steps=6, step_s=0.1)  # 0.6 s per rerank, one at a time
    with LiveServer(create_app({"fake": FakeEmbedder()}, {"slow": rr}, settings), settings=settings) as srv:
        addr = ("127.0.0.1", srv.port)

        def connect(head: bytes = b"") -> socket.socket:
            s = socket.create_connection(addr)
            if head:
                s.sendall(head)
            time.sleep(0.1)  # the server has seen it: ages follow the order of opening
            return s

        def request(c: Any = httpx) -> int:
            status = c.post(srv.url + "/v1/embeddings", json={"input": "real"}, timeout=5).status_code
            time.sleep(0.2)  # the server has seen its connection close (or go idle)
            return status

        silent = [connect() for _ in range(3)]
        partial = connect(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # the cap (4) is full
        statuses = [request()]  # makes room by closing silent[0], the oldest
        closed_first = [not _is_open(s) for s in silent]
        keep_alive = httpx.Client()
        statuses.append(request(keep_alive))  # fills the cap again: its connection stays open, idle
        statuses.append(request())  # closes silent[1]
        silent.append(connect())
        statuses.append(request())  # closes silent[2]
        silent.append(connect())
        statuses.append(request())  # closes the partial head, with a 408
        partial_reply, _ = _recv_all(partial, 1)
        silent.append(connect())
        statuses.append(request())  # closes the idle keep-alive connection (the oldest waiting one now)
        statuses.append(request(keep_alive))  # whose client reconnects
        still_open = [_is_open(s) for s in silent]
        for s in [*silent, partial]:
            s.close()
        keep_alive.close()
        time.sleep(0.2)

        # four reranks in flight hold all four connections: none can be closed, the fifth one is refused
        results: list[int] = []

        def one() -> None:
            results.append(httpx.post(srv.url + "/v1/rerank", json={"model": "slow", "query": "q",
                                                                   "documents": ["a", "b"]}, timeout=30).status_code)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.4)
        extra = socket.create_connection(addr)
        refused, _ = _recv_all(extra, 2)
        extra.close()
        for t in threads:
            t.join(30)
        after = httpx.post(srv.url + "/v1/embeddings", json={"input": "after"}, timeout=5)
    assert statuses == [200] * 7
    assert closed_first == [True, False, False]
    assert partial_reply.startswith(b"HTTP/1.1 408")
    assert still_open == [False, False, False, True, True, True], still_open
    # closed by the server: b"", not "<still open>" at the end of the wait
    assert refused == b"", refused
    assert results == [200] * 4 and after.status_code == 200


def test_a_connection_flood_stays_within_a_low_open_file_limit(tmp_path: Path) -> None:
    """Item 17: with 256 open files, 300 connections made the server's accept fail ("Too many open files",
    logged on every retry); the cap alone still let one accept burst run past the limit."""
    import resource

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc, url, log = start_script_server(tmp_path, "header_timeout_s=2.0", preexec=limit_files)
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5))
        time.sleep(0.5)
        during = httpx.get(url + "/health", timeout=10)  # at the cap: makes room by closing a silent one
        time.sleep(2.5)  # past the header timeout: every silent connection is closed
        closed = 0
        for s in socks:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except OSError:
                pass
        after = httpx.post(url + "/v1/embeddings", json={"input": "still serving"}, timeout=10)
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(20)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "Too many open files" not in text and "out of system resource" not in text, text
    assert during.status_code == 200 and after.status_code == 200, text
    assert closed == 300
    assert "connections are capped at 120" in text  # 256 files: 64 for the process, 3 accept bursts of 24


def test_repeated_log_lines_are_rate_limited() -> None:
    f = RepeatFilter(window_s=0.2)
    log = logging.getLogger("tamis.test.repeat")

    def record(msg: str) -> logging.LogRecord:
        return log.makeRecord(log.name, logging.ERROR, __file__, 1, msg, (), None)

    passed = [f.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert sum(passed) == 1 and f.filter(record("another message"))
    time.sleep(0.25)
    r = record("socket.accept() out of system resource")
    assert f.filter(r) and "999 more like this" in r.getMessage()


# ---------------------------------------------------------------------------- 18: queue metrics by kind
def test_queue_metrics_are_labelled_by_kind() -> None:
    """Item 18: the embedding and rerank queues of one model name shared one gauge."""
    emb, rr = FakeEmbedder("same"), SteppingReranker("same", steps=10, step_s=0.05)
    app = create_app({"same": emb}, {"same": rr})

    async def go():
        async with client(app) as c:
            job = asyncio.ensure_future(post(c, "/v1/rerank", {"query": "q", "documents": ["a"] * 5}))
            await asyncio.sleep(0.2)
            during = (await c.get("/metrics")).text
            await job
            return during

    text = run(go())
    assert metric(text, "tamis_queue_depth", model="same", kind="rerank") == 5
    assert metric(text, "tamis_queue_depth", model="same", kind="embedding") == 0


# ---------------------------------------------------------------------------- 19: minor decisions
def test_minor_input_decisions() -> None:
    """Item 19: capped echoes; duplicate embedding types, blank inputs and empty documents are 400s."""
    huge_name = "m" * 100_000

    async def go():
        async with client(make_app()) as c:
            return (await post(c, "/v1/embeddings", {"model": huge_name, "input": "x"}),
                    await post(c, "/v1/rerank", {"model": huge_name, "query": "q", "documents": ["d"]}),
                    await post(c, "/v1/embeddings", {"input": "x", "embedding_type": ["float", "base64", "float"]}),
                    await post(c, "/v1/embeddings", {"input": ["fine", " \n\t "]}),
                    await post(c, "/v1/rerank", {"query": "q", "documents": ["a", ""]}),
                    await post(c, "/v1/rerank", {"query": "q", "documents": ["a", {"text": "   "}]}),
                    await post(c, "/v1/embeddings", {"input": "x", "embedding_type": ["ubinary", "float"]}))

    name_e, name_r, dup, blank, empty_doc, blank_doc, two = run(go())
    for r in (name_e, name_r):
        assert r.status_code == 400 and len(r.content) < 1000 and "(100000 characters)" in r.json()["detail"]
    assert dup.status_code == 400 and "'float' more than once" in dup.json()["detail"]
    assert blank.status_code == 400 and "input 1 is only whitespace" in blank.json()["detail"]
    assert empty_doc.status_code == 400 and "document 1 is an empty string" in empty_doc.json()["detail"]
    assert blank_doc.status_code == 400 and "document 1 is only whitespace" in blank_doc.json()["detail"]
    assert two.status_code == 200 and list(two.json()["data"][0]["embedding"]) == ["ubinary", "float"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_rss_and_time_of_a_rejected_million_object_body() -> None:
    """Item 11 figures: 1 M ``{}`` documents cost 6.5 s and +600 MB before; now a bounded refusal."""
    body = b'{"query":"q","documents":[' + b",".join([b"{}"] * 1_000_000) + b"]}"
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def go():
        async with client(make_app()) as c:
            return await c.post("/v1/rerank", content=body, headers={"content-type": "application/json"})

    try:
        r = run(go())
    finally:
        done.set()
        sampler.join()
    grown = peak[0] - before
    assert r.status_code == 413 and grown < 150, grown  # refused from the byte count, nothing built


# ---------------------------------------------------------------------------- start-up (item 6, server side)
def test_serve_parser_imports_nothing_heavy() -> None:
    """``tamis serve --help`` built its parser by importing the app (FastAPI) and torch: ~6 s before any
    output. Only what ``tamis`` itself imports may be loaded before the command runs."""
    code = textwrap.dedent("""
        import argparse, contextlib, io, sys
        import tamis
        before = set(sys.modules)
        import tamis.server, tamis.server.cli
        parser = argparse.ArgumentParser(prog="tamis")
        tamis.server.cli.register(parser.add_subparsers())
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            parser.parse_args(["serve", "--help"])
        heavy = ("fastapi", "starlette", "uvicorn", "pydantic", "torch", "numpy", "prometheus_client")
        print(sorted({m.split(".")[0] for m in set(sys.modules) - before} & set(heavy)))
        print("--request-timeout" in out.getvalue())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout
    # and the lazy names still resolve
    from tamis.server import ApiError, ServerSettings, create_app  # noqa: F401
