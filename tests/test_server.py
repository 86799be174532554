"""Server behaviour with fake models: batching across requests, queue bound, deadlines, disconnects,
auth, limits, error shapes, health, metrics, routing, and schema fuzzing.

The fake embedder tokenizes on whitespace and pools to a vector that encodes the row's content and task,
so a row scattered back to the wrong request or position shows up as a wrong value.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import tamis
from live_server import LiveServer
from tamis.errors import InputTooLongError, UnknownTaskError
from tamis.rerank.results import rank
from tamis.server import ServerSettings, create_app
from tamis.server.auth import KeyChecker, startup_message
from tamis.server.batcher import ModelWorker, grow_batch, grow_packed_batch
from tamis.server.cli import parse_model_spec
from tamis.server.errors import ClientDisconnected
from tamis.tokenize import Encoded

pytestmark = pytest.mark.timeout(120)

DIM = 8
TASKS = ["retrieval.query", "retrieval.passage"]


# ---------------------------------------------------------------------------- fakes
def _word_id(w: str) -> int:
    return sum(ord(c) for c in w) % 997 + 3


class FakeEmbedder:
    """Whitespace tokens; [1] + words + [2]; pooled = [len, sum(ids), task, i-th word ids...]."""

    dimension = DIM
    max_length = 16
    tasks = TASKS
    check_dimensions = tamis.Embedder.check_dimensions
    check_embedding_type = staticmethod(tamis.Embedder.check_embedding_type)
    finalize = tamis.Embedder.finalize

    def __init__(self, name: str = "fake", delay: float = 0.0, dimension: int = DIM):
        self.name = name
        self.delay = delay
        self.dimension = dimension
        self.calls: list[list[tuple[int, ...]]] = []
        self.call_tasks: list[list[str | None]] = []
        self.late_calls: list[list[str]] = []
        self.gate: threading.Event | None = None

    def _check_task(self, task: str | None) -> None:
        if task is not None and task not in self.tasks:
            raise UnknownTaskError(task, self.tasks)

    def tokenize(self, texts: list[str], task: str | None = None, truncate: bool = True) -> list[Encoded]:
        self._check_task(task)
        out = []
        for i, t in enumerate(texts):
            ids = [1] + [_word_id(w) for w in t.split()] + [2]
            n = len(ids)
            cut = n > self.max_length
            if cut:
                if not truncate:
                    raise InputTooLongError(i, n, self.max_length)
                ids = ids[: self.max_length - 1] + [2]
            out.append(Encoded(ids, [0] * len(ids), [(0, 0)] * len(ids), [0] * len(ids), n, cut))
        return out

    def count_tokens(self, texts: list[str], task: str | None = None) -> list[int]:
        return [len(t.split()) + 2 for t in texts]

    def vector(self, ids: list[int], task: str | None) -> list[float]:
        v = [float(len(ids)), float(sum(ids)), float(TASKS.index(task) + 1 if task else 0)]
        v += [float(x) for x in ids[1 : self.dimension - 2]]
        return (v + [0.5] * self.dimension)[: self.dimension]

    def forward(self, encodings: list[Encoded], tasks: list[str | None]) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        self.calls.append([tuple(e.ids) for e in encodings])
        self.call_tasks.append(list(tasks))
        return torch.tensor([self.vector(e.ids, t) for e, t in zip(encodings, tasks)], dtype=torch.float32)

    def expected(self, texts: list[str], task: str | None = None, normalized: bool = True) -> np.ndarray:
        pooled = torch.tensor([self.vector(e.ids, task) for e in self.tokenize(texts, task)])
        return self.finalize(pooled, None, normalized, "float")

    def embed_result(self, texts: list[str], task: str | None = None, dimensions: int | None = None,
                     normalized: bool = True, embedding_type: Any = "float", truncate: bool = True,
                     late_chunking: bool = False, show_progress: bool | None = None) -> tamis.EmbedResult:
        assert late_chunking
        self.late_calls.append(list(texts))
        pooled = torch.tensor([[float(i + 1)] * self.dimension for i in range(len(texts))])
        return tamis.EmbedResult(self.finalize(pooled, dimensions, normalized, embedding_type), [3] * len(texts))


class FakeReranker:
    """Score = number of query words the document shares."""

    kind = "cross-encoder"

    def __init__(self, name: str = "fake-rr"):
        self.name = name
        self.calls = 0

    def rerank(self, query: str, documents: list[str], top_n: int | None = None, return_documents: bool = True,
               *, truncate: bool = True, progress: Any = None):
        self.calls += 1
        q = set(query.split())
        scores = [float(len(q & set(d.split()))) / 10 for d in documents]
        return rank(query, scores, documents, top_n, return_documents, model=self.name, total_tokens=7 * len(documents))


def make_app(emb: Any = None, rr: Any = None, **settings: Any):
    emb = emb or FakeEmbedder()
    rr = rr or FakeReranker()
    return create_app({emb.name: emb}, {rr.name: rr}, ServerSettings(**settings))


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------- embeddings happy path
def test_embeddings_values_order_and_usage() -> None:
    emb = FakeEmbedder()
    texts = ["one", "two words", "three little words", "a b c d e"]

    async def go():
        async with client(make_app(emb)) as c:
            return await c.post("/v1/embeddings", json={"model": "fake", "input": texts, "task": "retrieval.query"})

    r = run(go())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fake" and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    assert all(d["object"] == "embedding" for d in body["data"])
    got = np.array([d["embedding"] for d in body["data"]])
    np.testing.assert_allclose(got, emb.expected(texts, "retrieval.query"), rtol=1e-6, atol=1e-7)
    assert body["usage"] == {"prompt_tokens": 3 + 4 + 5 + 7, "total_tokens": 19}


def test_embedding_types_aliases_and_dimensions() -> None:
    emb = FakeEmbedder()
    texts = ["alpha beta", "gamma"]
    full = emb.expected(texts)

    async def go():
        async with client(make_app(emb)) as c:
            a = await c.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
            b = await c.post("/v1/embeddings", json={"input": texts, "encoding_type": ["ubinary", "binary"]})
            d = await c.post("/v1/embeddings", json={"input": texts, "embedding_type": "float", "dimensions": 3,
                                                     "normalized": False})
            one = await c.post("/v1/embeddings", json={"input": {"text": "gamma"}})
            return a, b, d, one

    a, b, d, one = run(go())
    assert a.status_code == b.status_code == d.status_code == one.status_code == 200
    import base64

    dec = np.stack([np.frombuffer(base64.b64decode(x["embedding"]), "<f4") for x in a.json()["data"]])
    np.testing.assert_allclose(dec, full, rtol=1e-6)
    packed = np.packbits(full > 0, axis=-1)
    item = b.json()["data"][0]["embedding"]
    assert set(item) == {"ubinary", "binary"}
    assert item["ubinary"] == packed[0].tolist()
    assert item["binary"] == (packed[0].astype(int) - 128).tolist()
    raw = torch.tensor([emb.vector(e.ids, None) for e in emb.tokenize(texts)])[:, :3]
    np.testing.assert_allclose(np.array([x["embedding"] for x in d.json()["data"]]), raw.numpy(), rtol=1e-6)
    np.testing.assert_allclose(one.json()["data"][0]["embedding"], full[1], rtol=1e-6)


def test_late_chunking_is_one_job() -> None:
    emb = FakeEmbedder()

    async def go():
        async with client(make_app(emb)) as c:
            return await c.post("/v1/embeddings", json={"input": ["first chunk.", "second chunk."],
                                                        "late_chunking": True, "normalized": False})

    r = run(go())
    assert r.status_code == 200, r.text
    assert emb.late_calls == [["first chunk.", "second chunk."]] and emb.calls == []
    data = r.json()["data"]
    assert data[0]["embedding"] == [1.0] * DIM and data[1]["embedding"] == [2.0] * DIM
    assert r.json()["usage"]["total_tokens"] == 6


# ---------------------------------------------------------------------------- dynamic batching
@pytest.mark.parametrize("on_model_thread", [True, False])
def test_concurrent_requests_share_batches_within_token_budget(on_model_thread: bool) -> None:
    emb = FakeEmbedder()
    emb.gate = threading.Event()
    app = make_app(emb, max_batch_tokens=40, max_batch_size=8, gather_batches=4,
                   tokenize_on_model_thread=on_model_thread)
    reqs = [[f"w{i} " * (1 + (i * 3 + j) % 5) for j in range(3)] for i in range(8)]
    tasks = [TASKS[i % 2] for i in range(8)]

    async def go():
        async with client(app) as c:
            first = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": ["warm up"]}))
            await asyncio.sleep(0.2)  # the worker is now blocked in forward() on the first request
            rest = [asyncio.ensure_future(c.post("/v1/embeddings", json={"input": t, "task": k}))
                    for t, k in zip(reqs, tasks)]
            await asyncio.sleep(0.3)  # all queued
            emb.gate.set()
            return await first, await asyncio.gather(*rest)

    first, rest = run(go())
    assert first.status_code == 200
    for r, texts, task in zip(rest, reqs, tasks):
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, emb.expected(texts, task), rtol=1e-6, atol=1e-7)
    later = emb.calls[1:]
    assert sum(len(c) for c in later) == 24
    # rows from several requests (and both tasks) went through shared forward calls ...
    assert len(later) < 8
    assert any(len(set(t)) == 2 for t in emb.call_tasks[1:])
    # ... and every call kept to the padded token budget (rows * longest <= 40) and the row cap
    for call in later:
        assert len(call) <= 8 and len(call) * max(len(ids) for ids in call) <= 40
    # the oldest queued row goes first; length-sorted planning keeps padding low
    firsts = [tuple(emb.tokenize([r[0]])[0].ids) for r in reqs]
    if on_model_thread:  # admitted in arrival order (with thread-pool tokenization: in tokenizing order)
        assert later[0][0] == firsts[0]
    else:
        assert later[0][0] in firsts
    for call in later:  # tiny rows here: the padding bound is the free allowance
        assert len(call) * max(len(ids) for ids in call) - sum(len(ids) for ids in call) <= 64


def test_grow_batch_keeps_similar_lengths_within_budget() -> None:
    lengths = [10, 256, 250, 12, 11, 200]
    assert grow_batch(lengths, 0, 1000, 8, 0.1) == [0, 3, 4]
    assert grow_batch(lengths, 1, 1000, 8, 0.1) == [1, 2, 5]  # 768 padded for 706 real
    assert grow_batch(lengths, 5, 1000, 8, 0.1) == [1, 2, 5]  # budget: 4 x 256 > 1000
    assert grow_batch(lengths, 5, 400, 8, 0.1) == [5]
    assert grow_batch([300, 200, 100], 1, 10_000, 8, 0.1) == [1]  # 100 padded tokens: two calls are cheaper
    assert grow_batch([300, 200, 100], 1, 10_000, 8, 1.0) == [0, 1, 2]
    assert grow_batch([10] * 100, 37, 200, 256, 0.1) == list(range(18, 38))  # 20 x 10 tokens, older rows first
    assert grow_batch([10] * 100, 0, 10_000, 8, 0.1) == list(range(8))  # row cap
    assert grow_batch([5000], 0, 100, 8, 0.1) == [0]  # over budget alone: its own batch
    rng = np.random.default_rng(0)
    for _ in range(50):
        ls = rng.integers(3, 300, size=rng.integers(1, 200)).tolist()
        seed = int(rng.integers(len(ls)))
        b = grow_batch(ls, seed, 4096, 64, 0.1)
        assert seed in b and len(b) <= 64
        width = max(ls[i] for i in b)
        waste = len(b) * width - sum(ls[i] for i in b)
        assert len(b) == 1 or (len(b) * width <= 4096 and waste <= max(0.1 * sum(ls[i] for i in b), 64))


def test_grow_packed_batch_fills_the_budget_in_real_tokens() -> None:
    lengths = [10, 256, 250, 12, 11, 200]
    assert grow_packed_batch(lengths, 0, 1000, 8) == [0, 1, 2, 3, 4, 5]  # 739 real tokens; padded: [0, 3, 4]
    assert grow_packed_batch(lengths, 0, 500, 8) == [0, 2, 3, 4, 5]  # nearest lengths first: 256 no longer fits
    assert grow_packed_batch(lengths, 0, 1000, 3) == [0, 3, 4]  # row cap
    assert grow_packed_batch(lengths, 5, 460, 8) == [2, 5]  # 200 -> 250 (nearer than 12) -> 256 over budget
    assert grow_packed_batch([5000], 0, 100, 8) == [0]  # over budget alone: its own batch
    rng = np.random.default_rng(0)
    for _ in range(50):
        ls = rng.integers(3, 300, size=rng.integers(1, 200)).tolist()
        seed = int(rng.integers(len(ls)))
        b = grow_packed_batch(ls, seed, 4096, 64)
        assert seed in b and len(b) <= 64 and (len(b) == 1 or sum(ls[i] for i in b) <= 4096)
        ranks = sorted(range(len(ls)), key=lambda i: (-ls[i], i))
        pos = sorted(ranks.index(i) for i in b)
        assert pos == list(range(pos[0], pos[0] + len(b)))  # a contiguous stretch of the length order


@pytest.mark.parametrize("packed", [True, False])
def test_packed_models_get_batches_planned_on_real_tokens(packed: bool) -> None:
    """A model that runs packed (tamis's BERT embedders) gets mixed-length rows in one call up to the budget
    in real tokens; planned padded (rows x longest <= budget, padding bound) the same rows take several."""
    emb = FakeEmbedder()
    emb.runs_packed = lambda tasks: packed  # as tamis.Embedder.runs_packed answers for a BERT-family model
    emb.gate = threading.Event()
    app = make_app(emb, max_batch_tokens=40, max_batch_size=8, gather_batches=4)
    reqs = [["w " * 12, "w"], ["w " * 6, "w w"]]  # 14 + 3 and 8 + 4 tokens with [1] ... [2]

    async def go():
        async with client(app) as c:
            first = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": ["warm up"]}))
            await asyncio.sleep(0.2)
            rest = [asyncio.ensure_future(c.post("/v1/embeddings", json={"input": t})) for t in reqs]
            await asyncio.sleep(0.3)
            emb.gate.set()
            return await first, await asyncio.gather(*rest)

    first, rest = run(go())
    assert first.status_code == 200 and all(r.status_code == 200 for r in rest)
    later = emb.calls[1:]
    assert sorted(len(ids) for call in later for ids in call) == [3, 4, 8, 14]
    if packed:
        assert len(later) == 1  # 29 real tokens, 56 padded
    else:
        assert len(later) > 1 and all(len(c) * max(len(ids) for ids in c) <= 40 for c in later)


def test_queue_bound_answers_429_and_recovers() -> None:
    emb = FakeEmbedder()
    emb.gate = threading.Event()
    app = make_app(emb, max_queued_inputs=4)

    async def go():
        async with client(app) as c:
            first = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": ["a", "b", "c"]}))
            await asyncio.sleep(0.2)
            over = await c.post("/v1/embeddings", json={"input": ["d", "e"]})
            emb.gate.set()
            ok1 = await first
            after = await c.post("/v1/embeddings", json={"input": ["d", "e"]})
            # a request larger than the bound is still served when the queue is empty
            big = await c.post("/v1/embeddings", json={"input": ["x"] * 6})
            m = await c.get("/metrics")
            return over, ok1, after, big, m

    over, ok1, after, big, m = run(go())
    assert over.status_code == 429
    assert int(over.headers["retry-after"]) >= 1
    assert "overloaded" in over.json()["detail"] and over.json()["error"]["type"] == "rate_limit_error"
    assert ok1.status_code == after.status_code == big.status_code == 200
    assert metric(m.text, "tamis_rejected_total", reason="overload") == 1
    assert metric(m.text, "tamis_queue_depth", model="fake") == 0


def test_deadline_drops_queued_work() -> None:
    emb = FakeEmbedder()
    emb.gate = threading.Event()
    app = make_app(emb, request_timeout_s=0.2)

    async def go():
        async with client(app) as c:
            first = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": ["a"]}))
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": ["never computed"]}))
            await asyncio.sleep(0.5)
            emb.gate.set()
            return await first, await second, await c.get("/metrics")

    first, second, m = run(go())
    # the deadline bounds the whole request: the first one was running (its batch finishes, unanswered)
    assert first.status_code == 503 and "computed" in first.json()["detail"]
    assert second.status_code == 503 and "Retry-After" in second.headers
    assert "waited in the queue" in second.json()["detail"]
    assert all((1, _word_id("never"), _word_id("computed"), 2) not in call for call in emb.calls)
    assert metric(m.text, "tamis_dropped_total", reason="deadline") == 2


def test_worker_drops_cancelled_rows_directly() -> None:
    emb = FakeEmbedder()
    emb.gate = threading.Event()
    worker = ModelWorker("fake", emb)

    async def go():
        a = worker.submit_rows(emb.tokenize(["blocker"]), [None], 10)
        await asyncio.sleep(0.1)
        b = worker.submit_rows(emb.tokenize(["dropped row", "another"]), [None, None], 10)
        c = worker.submit_rows(emb.tokenize(["kept"]), [None], 10)
        b.cancel()
        emb.gate.set()
        ra = await a.future
        with pytest.raises(ClientDisconnected):
            await b.future
        rc = await c.future
        return ra, rc

    try:
        ra, rc = run(go())
    finally:
        worker.stop()
    assert ra.shape == (1, DIM) and rc[0, 0].item() == 3.0
    seen = {ids for call in emb.calls for ids in call}
    assert (1, _word_id("dropped"), _word_id("row"), 2) not in seen
    assert worker.pending_inputs == 0 and worker.pending_jobs == 0


def test_client_disconnect_drops_queued_request_on_live_server() -> None:
    emb = FakeEmbedder(delay=0.0)
    emb.gate = threading.Event()
    app = make_app(emb)
    with LiveServer(app) as srv:
        def blocker() -> None:
            httpx.post(srv.url + "/v1/embeddings", json={"input": ["blocker"]}, timeout=30)

        t = threading.Thread(target=blocker)
        t.start()
        time.sleep(0.3)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/embeddings", json={"input": ["gone away"]}, timeout=0.5)
        time.sleep(0.3)  # the server notices the closed connection
        emb.gate.set()
        t.join(10)
        ok = httpx.post(srv.url + "/v1/embeddings", json={"input": ["after"]}, timeout=10)
        m = httpx.get(srv.url + "/metrics").text
    assert ok.status_code == 200
    seen = {ids for call in emb.calls for ids in call}
    assert (1, _word_id("gone"), _word_id("away"), 2) not in seen
    assert metric(m, "tamis_dropped_total", reason="disconnect") == 1
    assert metric(m, "tamis_queue_depth", model="fake") == 0


# ---------------------------------------------------------------------------- errors
BAD_EMBEDDING_BODIES = [
    ({"input": []}, 400, "empty list"),
    ({"input": ["ok", ""]}, 400, "input 1 is an empty string"),
    ({"input": "x", "task": "nope"}, 400, "unknown task 'nope'"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions=0"),
    ({"input": "x", "dimensions": -3}, 400, "dimensions=-3"),
    ({"input": "x", "dimensions": DIM + 1}, 400, f"1..{DIM}"),
    ({"input": ["short", "w " * 40], "truncate": False}, 400, "input 1 has 42 tokens, more than the limit of 16"),
    ({"input": ["w " * 40]}, 400, "input 0 has 42 tokens"),  # the server's default is truncate=false
    ({"input": "x", "model": "nope"}, 400, "served models: fake"),
    ({"input": [[1, 2, 3]]}, 400, "token-id"),
    ({"input": [{"image": "https://x/y.png"}]}, 400, "image"),
    ({"input": "x", "return_multivector": True}, 400, "return_multivector"),
    ({"input": ["a"] * 5}, 400, "largest allowed size 4"),
    ({"input": "x", "embedding_type": "int4"}, 422, "embedding_type"),
    ({"input": "x", "dimensions": "many"}, 422, "dimensions"),
    ({"model": "fake"}, 422, "input"),
    ({"input": "\ud800"}, 400, "surrogate"),
]


@pytest.mark.parametrize("on_model_thread", [True, False])
@pytest.mark.parametrize(("body", "status", "needle"), BAD_EMBEDDING_BODIES)
def test_bad_embedding_inputs(body: dict, status: int, needle: str, on_model_thread: bool) -> None:
    async def go():
        async with client(make_app(max_inputs=4, tokenize_on_model_thread=on_model_thread)) as c:
            return await c.post("/v1/embeddings", content=json.dumps(body).encode(),
                                headers={"content-type": "application/json"})

    r = run(go())
    assert r.status_code == status, r.text
    body = r.json()
    assert needle in body["detail"], body
    assert body["error"]["message"] == body["detail"]


def test_truncate_true_cuts_and_reports() -> None:
    emb = FakeEmbedder()

    async def go():
        async with client(make_app(emb)) as c:
            return await c.post("/v1/embeddings", json={"input": ["short", "w " * 40], "truncate": True})

    r = run(go())
    assert r.status_code == 200
    assert r.headers["x-truncated-inputs"] == "1"
    assert r.json()["usage"]["total_tokens"] == 3 + 16


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b'{"input": ["a", ', 400, "malformed JSON"),
        (b'{"input": "caf\xe9"}', 400, "not valid UTF-8"),
        (b"[1, 2]", 422, "invalid request"),
    ],
)
def test_malformed_bodies(raw: bytes, status: int, needle: str) -> None:
    async def go():
        async with client(make_app()) as c:
            return await c.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})

    r = run(go())
    assert r.status_code == status and needle in r.json()["detail"], r.text


def test_payload_too_large() -> None:
    async def go():
        async with client(make_app(max_request_bytes=1000)) as c:
            return await c.post("/v1/embeddings", json={"input": ["word " * 300]})

    r = run(go())
    assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]


def test_auth() -> None:
    app = make_app(api_keys=["k1", "second-key"])

    async def go():
        async with client(app) as c:
            out = {
                "none": await c.post("/v1/embeddings", json={"input": "x"}),
                "wrong": await c.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer k2"}),
                "basic": await c.post("/v1/rerank", json={}, headers={"Authorization": "Basic k1"}),
                "ok": await c.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer k1"}),
                "ok2": await c.get("/v1/models", headers={"Authorization": "bearer second-key"}),
                "models": await c.get("/v1/models"),
                "health": await c.get("/health"),
                "metrics": await c.get("/metrics"),
                "metrics_key": await c.get("/metrics", headers={"Authorization": "Bearer k1"}),
            }
            return out

    r = run(go())
    for k in ("none", "wrong", "basic", "models", "metrics"):  # /metrics follows the key (README)
        assert r[k].status_code == 401, k
        assert r[k].json()["detail"] and r[k].json()["error"]["type"] == "authentication_error"
        assert r[k].headers["www-authenticate"] == "Bearer"
    assert "missing API key" in r["none"].json()["detail"]
    assert r["wrong"].json()["detail"] == "invalid API key"
    assert r["ok"].status_code == 200 and r["ok2"].status_code == 200
    assert r["health"].status_code == 200 and r["metrics_key"].status_code == 200


def test_key_checker_and_startup_message() -> None:
    kc = KeyChecker(["abc"])
    assert kc.valid("abc") and not kc.valid("abd") and not kc.valid("") and not kc.valid("abc ")
    assert not KeyChecker([]).enabled
    import logging

    assert startup_message(0, "127.0.0.1")[0] == logging.INFO
    level, msg = startup_message(0, "0.0.0.0")
    assert level == logging.WARNING and "OFF" in msg and "0.0.0.0" in msg
    assert "open" in startup_message(0, "::1")[1]
    assert startup_message(2, "0.0.0.0") == (logging.INFO, "authentication: on (2 API keys)")
    assert parse_model_spec("mini=/tmp/x") == ("mini", "/tmp/x")
    assert parse_model_spec("/tmp/x") == (None, "/tmp/x")


# ---------------------------------------------------------------------------- rerank
def test_rerank_v1_v2_shapes() -> None:
    docs = ["cats and dogs", {"text": "dogs bark loud", "id": "d2"}, "nothing here", "dogs dogs cats bark"]

    async def go():
        async with client(make_app()) as c:
            v1 = await c.post("/v1/rerank", json={"model": "fake-rr", "query": "dogs bark", "documents": docs,
                                                  "top_n": None})
            v1n = await c.post("/v1/rerank", json={"query": {"text": "dogs bark"}, "documents": docs, "top_n": 2,
                                                   "return_documents": False})
            v2 = await c.post("/v2/rerank", json={"model": "fake-rr", "query": "dogs bark", "documents": docs,
                                                  "top_n": 3, "max_tokens_per_doc": 100})
            return v1, v1n, v2

    v1, v1n, v2 = run(go())
    assert v1.status_code == v1n.status_code == v2.status_code == 200
    b = v1.json()
    assert b["model"] == "fake-rr" and b["usage"]["total_tokens"] == 28
    # scores: d0 1 shared word, d1 2, d2 0, d3 2 -> ties by index
    assert [r["index"] for r in b["results"]] == [1, 3, 0, 2]
    assert [r["relevance_score"] for r in b["results"]] == [0.2, 0.2, 0.1, 0.0]
    assert b["results"][0]["document"] == {"text": "dogs bark loud", "id": "d2"}
    assert b["results"][1]["document"] == {"text": "dogs dogs cats bark"}
    assert [r for r in v1n.json()["results"]] == [{"index": 1, "relevance_score": 0.2},
                                                  {"index": 3, "relevance_score": 0.2}]
    b2 = v2.json()
    assert [r["index"] for r in b2["results"]] == [1, 3, 0] and "document" not in b2["results"][0]
    assert b2["meta"]["api_version"]["version"] == "2" and isinstance(b2["id"], str)


def test_rerank_echoes_any_json_document() -> None:
    """Found by fuzzing: echoed document objects may hold integers beyond 64 bits (orjson refuses them)."""
    doc = {"text": "q a", "n": -1949677554795593210464829440, "f": 1e308, "nested": [[None, True]]}

    async def go():
        async with client(make_app()) as c:
            return await c.post("/v1/rerank", json={"query": "q", "documents": [doc, "b"]})

    r = run(go())
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["document"] == doc


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"query": "q", "documents": []}, 400, "empty list"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, 400, '"top_n" must be greater than 0'),
        ({"query": "", "documents": ["a"]}, 400, "query is an empty string"),
        ({"query": "q", "documents": ["a"], "model": "fake"}, 400, "is a served embedding model"),
        ({"query": "q", "documents": [{"image": "https://a/b.png"}]}, 400, "image"),
        ({"query": "q"}, 422, "documents"),
    ],
)
def test_bad_rerank_inputs(body: dict, status: int, needle: str) -> None:
    async def go():
        async with client(make_app()) as c:
            return await c.post("/v1/rerank", json=body), await c.post("/v2/rerank", json=body)

    for r in run(go()):
        assert r.status_code == status, r.text
        assert needle in r.json()["detail"]


# ---------------------------------------------------------------------------- routing, models, health, metrics
def test_multi_model_routing_and_models_list() -> None:
    a, b = FakeEmbedder("small", dimension=4), FakeEmbedder("large", dimension=8)
    app = create_app({"small": a, "large": b}, {"fake-rr": FakeReranker()})

    async def go():
        async with client(app) as c:
            return (await c.post("/v1/embeddings", json={"model": "large", "input": "x y"}),
                    await c.post("/v1/embeddings", json={"model": "SMALL", "input": "x y"}),
                    await c.post("/v1/embeddings", json={"input": "x y"}),
                    await c.post("/v1/embeddings", json={"model": "medium", "input": "x y"}),
                    await c.get("/v1/models"))

    large, small, default, unknown, models = run(go())
    assert len(large.json()["data"][0]["embedding"]) == 8 and large.json()["model"] == "large"
    assert len(small.json()["data"][0]["embedding"]) == 4 and small.json()["model"] == "small"
    assert default.json()["model"] == "small"
    assert unknown.status_code == 400 and "served models: small, large" in unknown.json()["detail"]
    assert unknown.json()["available"] == ["small", "large"]
    cards = {m["id"]: m for m in models.json()["data"]}
    assert cards["large"]["dimension"] == 8 and cards["large"]["tasks"] == TASKS
    assert cards["fake-rr"]["type"] == "reranker" and cards["fake-rr"]["kind"] == "cross-encoder"


def test_health_until_models_loaded_then_metrics() -> None:
    release = threading.Event()
    emb = FakeEmbedder()

    def loader():
        release.wait(10)
        return {"fake": emb}, {}

    app = create_app(settings=ServerSettings(), loader=loader)
    with LiveServer(app) as srv:
        h = httpx.get(srv.url + "/health")
        e = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"})
        release.set()
        deadline = time.time() + 10
        while httpx.get(srv.url + "/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        h2 = httpx.get(srv.url + "/health")
        ok = [httpx.post(srv.url + "/v1/embeddings", json={"input": ["a b", "c"]}) for _ in range(3)]
        m = httpx.get(srv.url + "/metrics")
    assert h.status_code == 503 and h.json()["status"] == "loading" and h.json()["detail"]
    assert e.status_code == 503 and e.headers["retry-after"] and "loading" in e.json()["detail"]
    assert h2.status_code == 200 and h2.json()["embedding_models"] == ["fake"]
    assert all(r.status_code == 200 for r in ok)
    t = m.text
    assert metric(t, "tamis_requests_total", route="/v1/embeddings", status="200") == 3
    assert metric(t, "tamis_requests_total", route="/v1/embeddings", status="503") == 1
    assert metric(t, "tamis_tokens_total", model="fake") == 3 * 7
    assert metric(t, "tamis_batch_size_count", model="fake") == 3
    assert metric(t, "tamis_batch_size_sum", model="fake") == 6
    assert metric(t, "tamis_request_latency_seconds_count", route="/v1/embeddings") == 4
    assert re.search(r"tamis_queue_depth\{kind=\"embedding\",model=\"fake\"\} 0\.0", t)


def test_loader_failure_reported() -> None:
    def loader():
        raise tamis.errors.ModelNotFoundError("nope", ["/x"])

    app = create_app(settings=ServerSettings(), loader=loader)
    with LiveServer(app) as srv:
        deadline = time.time() + 10
        while httpx.get(srv.url + "/health").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        h = httpx.get(srv.url + "/health")
        e = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"})
    assert h.status_code == 503 and h.json()["status"] == "failed" and "nope" in h.json()["detail"]
    assert e.status_code == 503 and "model loading failed" in e.json()["detail"]


def test_openapi_documents_routes() -> None:
    async def go():
        async with client(make_app()) as c:
            return (await c.get("/openapi.json")).json(), await c.get("/docs")

    spec, docs = run(go())
    assert docs.status_code == 200
    for path in ("/v1/embeddings", "/v1/rerank", "/v2/rerank", "/v1/models", "/health", "/metrics"):
        assert path in spec["paths"]
    props = spec["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert {"input", "model", "task", "dimensions", "late_chunking", "embedding_type", "encoding_type",
            "encoding_format", "normalized", "truncate"} <= set(props)
    assert {"400", "401", "413", "422", "429", "503"} <= set(spec["paths"]["/v1/embeddings"]["post"]["responses"])


def test_docs_work_offline_and_without_a_key() -> None:
    """Swagger UI assets come from the installed package, not a CDN, and are public like /docs itself."""

    async def go():
        async with client(make_app(api_keys=["secret"])) as c:
            page = await c.get("/docs")
            assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text)
            fetched = [await c.get(a) for a in assets]
            api = await c.post("/v1/embeddings", json={"input": "x"})
            return page, assets, fetched, api

    page, assets, fetched, api = run(go())
    assert page.status_code == 200 and "cdn." not in page.text and "//" not in "".join(assets)
    assert assets and all(r.status_code == 200 and len(r.content) > 1000 for r in fetched)
    assert api.status_code == 401  # the API itself still needs the key


# ---------------------------------------------------------------------------- schema fuzzing
def _fuzz_check(mode: Any, statuses: dict[int, int], failures: list[str]) -> Any:
    from schemathesis import GenerationMode

    def check(case: Any) -> None:
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body.pop("model", None)  # random names are all unknown; routing is tested above
        response = case.call()
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}")
        elif response.status_code >= 400:
            assert "detail" in response.json()

    return check


def test_schema_fuzzing_no_server_errors() -> None:
    """schemathesis against the OpenAPI schema, positive and negative cases (bounded): no 5xx, still up."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    app = make_app(max_inputs=64)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for op in schema.get_all_operations():
        operation = op.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            check = _fuzz_check(mode, statuses, failures)
            given(case=operation.as_strategy(generation_mode=mode))(settings(
                max_examples=30, deadline=None, database=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck), derandomize=True)(check))()
    assert not failures, failures[:3]
    assert sum(statuses.values()) >= 150
    assert statuses.get(200, 0) >= 20 and statuses.get(400, 0) > 0 and statuses.get(422, 0) > 0, statuses

    async def go():
        async with client(app) as c:
            return await c.post("/v1/embeddings", json={"input": "still alive"})

    assert run(go()).status_code == 200


def test_json_parsed_whatever_the_content_type() -> None:
    async def go():
        async with client(make_app()) as c:
            form = await c.post("/v1/embeddings", content=b'{"input": "x y"}',
                                headers={"content-type": "application/x-www-form-urlencoded"})
            none = await c.post("/v1/rerank", content=b'{"query": "x", "documents": ["x"]}')
            return form, none

    form, none = run(go())
    assert form.status_code == 200 and len(form.json()["data"]) == 1
    assert none.status_code == 200 and none.json()["results"][0]["relevance_score"] == 0.1


def test_default_serving_shares_one_model_between_routes():
    from tamis.rerank import shipped_reranker_dir
    from tamis.server.cli import load_models

    embedders, rerankers = load_models(["default"], ["embedding"])
    (emb,), (rr,) = embedders.values(), rerankers.values()
    assert rr.kind == "embedding" and rr.embedder is emb  # one copy of all-MiniLM-L6-v2 in memory
    _, rerankers = load_models(["default"], ["default"])  # the shipped cross-encoder when the package holds it
    (rr,) = rerankers.values()
    assert rr.kind == ("cross-encoder" if shipped_reranker_dir() else "embedding")
