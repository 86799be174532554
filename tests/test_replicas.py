"""Replicas: two `tamis serve` processes behind a round-robin proxy answer like one server, and keep
answering when one replica is killed (the server is stateless: any replica can take any request)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import tamis
from round_robin_proxy import RoundRobinProxy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from local_server import start_nginx  # noqa: E402  (README's nginx block, shared with the benchmark)

SHARED = Path(__file__).resolve().parents[2] / "shared"
V2 = SHARED / "fixtures" / "jina-embeddings-v2-tiny"
CE = SHARED / "fixtures" / "jina-reranker-v1-tiny-like"
pytestmark = [pytest.mark.skipif(not SHARED.is_dir(), reason=f"../shared not found at {SHARED}"),
              pytest.mark.timeout(300)]

TEXTS = ["Berlin is the capital of Germany.", "Cats purr when they are content.", "Stocks fell on Monday."]
DOCS = ["A cat purrs to signal contentment.", "The DAX closed lower.", "Berlin has 3.8 million people."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_replica(port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tamis.server", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--embedding-model", str(V2), "--reranker-model", str(CE), "--dtype", "float32"]
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=dict(os.environ))


def _wait_ready(procs: list[subprocess.Popen], ports: list[int], logs: list[Path], timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    todo = set(range(len(ports)))
    while todo and time.time() < deadline:
        for i in list(todo):
            if procs[i].poll() is not None:
                raise RuntimeError(f"replica {i} exited: {logs[i].read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{ports[i]}/health", timeout=2).status_code == 200:
                    todo.discard(i)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    if todo:
        raise RuntimeError(f"replicas {sorted(todo)} not ready in {timeout_s:.0f} s")


@pytest.fixture()
def replicas(tmp_path):
    ports = [_free_port(), _free_port()]
    logs = [tmp_path / f"replica{i}.log" for i in range(2)]
    procs = [_start_replica(p, log) for p, log in zip(ports, logs)]
    try:
        _wait_ready(procs, ports, logs)
        yield procs, ports
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _embed(client: httpx.Client, url: str) -> np.ndarray:
    r = client.post(f"{url}/v1/embeddings", json={"model": "jina-embeddings-v2-tiny", "input": TEXTS})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def _rerank(client: httpx.Client, url: str) -> list[tuple[int, float]]:
    r = client.post(f"{url}/v1/rerank", json={"model": "jina-reranker-v1-tiny-like", "query": "why do cats purr",
                                              "documents": DOCS})
    assert r.status_code == 200, r.text
    return [(x["index"], x["relevance_score"]) for x in r.json()["results"]]


def test_two_replicas_behind_a_round_robin_proxy_with_failover(replicas):
    procs, ports = replicas
    expected = tamis.Embedder(V2, dtype="float32").embed(TEXTS)  # as the replicas: same vectors on any CPU
    with httpx.Client(timeout=60) as client:
        direct = [_embed(client, f"http://127.0.0.1:{p}") for p in ports]
        ranks = [_rerank(client, f"http://127.0.0.1:{p}") for p in ports]
        np.testing.assert_array_equal(direct[0], direct[1])  # same model, same input: same bits on one machine
        assert ranks[0] == ranks[1]
        np.testing.assert_allclose(direct[0], expected, atol=1e-6)

        with RoundRobinProxy([("127.0.0.1", p) for p in ports]) as proxy:
            for _ in range(4):
                np.testing.assert_array_equal(_embed(client, proxy.url), direct[0])
                assert _rerank(client, proxy.url) == ranks[0]
            assert proxy.served == {0: 4, 1: 4} and proxy.failovers == 0  # spread evenly
            assert client.get(f"{proxy.url}/health").status_code == 200

            procs[0].kill()  # one replica dies hard: no goodbye, connections refused from now on
            procs[0].wait(10)
            for _ in range(6):
                np.testing.assert_array_equal(_embed(client, proxy.url), direct[0])
            assert _rerank(client, proxy.url) == ranks[0]
            assert proxy.served[1] == 4 + 7 and proxy.failovers >= 3  # every other pick hit the dead one

            procs[1].kill()
            procs[1].wait(10)
            r = client.post(f"{proxy.url}/v1/embeddings", json={"model": "jina-embeddings-v2-tiny", "input": TEXTS})
            assert r.status_code == 502 and r.json()["detail"] == "no replica answered"


# ---------------------------------------------------------------------------- nginx, README's block as it is
@pytest.mark.skipif(shutil.which("nginx") is None,
                    reason="nginx is not installed (apt-get install nginx): README's nginx block is not run")
def test_two_replicas_behind_the_readme_nginx_config(replicas, tmp_path):
    procs, ports = replicas
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    port = _free_port()
    nginx = start_nginx(nginx_dir, ports, port)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=60) as client:
            direct = _embed(client, f"http://127.0.0.1:{ports[0]}")
            rank = _rerank(client, f"http://127.0.0.1:{ports[0]}")
            for _ in range(4):
                np.testing.assert_array_equal(_embed(client, url), direct)
                assert _rerank(client, url) == rank

            procs[0].kill()
            procs[0].wait(10)
            for _ in range(6):  # nginx retries the refused connection on the other replica, then avoids it
                np.testing.assert_array_equal(_embed(client, url), direct)
            assert _rerank(client, url) == rank

            procs[1].kill()
            procs[1].wait(10)
            r = client.post(f"{url}/v1/embeddings", json={"model": "jina-embeddings-v2-tiny", "input": TEXTS})
            assert r.status_code == 502 and r.json()["detail"] == "no tamis replica answered"
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait(5)
