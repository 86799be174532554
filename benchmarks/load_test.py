"""Load test of ``tamis serve`` on localhost: concurrent clients, mixed input sizes, a burst past the queue bound.

    python benchmarks/load_test.py [--clients 32] [--duration 60] [--model default] [--quick]

One run, in order:
1. builds requests of mixed sizes (1..32 inputs; SciFact claims, abstracts and abstract fragments, i.e.
   a few tokens up to the model's context) with a fixed seed;
2. **offline**: times ``Embedder.embed`` on exactly the texts of those requests in this process
   (warm-up first), the figure the server is compared with; measured again at the end (the machine may
   be shared) and the faster of the two is used;
3. starts ``python -m tamis.server`` as a subprocess on a free 127.0.0.1 port (``--max-queued-inputs``
   small enough for the burst to overflow it, large enough for the steady load never to);
   start-up is timed: spawn until ``/health`` is ready, then the first and the second request;
4. **load**: ``--clients`` concurrent clients send the requests in a loop for ``--duration`` seconds
   (base64 output, as the OpenAI client asks); throughput = inputs answered per second;
   latency p50/p90/p99 of the requests;
5. **burst**: ``--burst-requests`` requests at once, more inputs than the queue bound: some must get 429
   with Retry-After, none a 5xx;
6. **recovery**: after the burst, requests succeed again and ``/health`` is 200.

Exit status 0 when: zero errors under load, throughput >= 80 % of offline, the burst saw 429s and no 5xx,
and the server recovered. Only 127.0.0.1 is contacted; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from local_server import free_port, start_server, stop_server

DATA = Path(os.environ.get("TAMIS_DATA", "/work/shared/data")) / "scifact"
SIZES = [1, 1, 2, 4, 8, 16, 32]


def read_jsonl(path: Path, limit: int) -> list[dict[str, Any]]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) >= limit:
                break
    return out


def build_requests(n_requests: int, seed: int) -> list[list[str]]:
    """Mixed sizes: short claims, whole abstracts (often longer than the context), fragments."""
    rng = random.Random(seed)
    claims = [q["text"] for q in read_jsonl(DATA / "queries.jsonl.gz", 1200)]
    docs = [(d.get("title", "") + " " + d["text"]).strip() for d in read_jsonl(DATA / "corpus.jsonl.gz", 1500)]

    def text() -> str:
        r = rng.random()
        if r < 0.4:
            return rng.choice(claims)
        if r < 0.7:
            words = rng.choice(docs).split()
            k = rng.randint(10, 80)
            s = rng.randint(0, max(0, len(words) - k))
            return " ".join(words[s : s + k])
        return rng.choice(docs)

    return [[text() for _ in range(rng.choice(SIZES))] for _ in range(n_requests)]


def offline_throughput(model: str, texts: list[str], quiet: bool = False) -> dict[str, float]:
    import logging
    import warnings

    import torch

    import tamis

    logging.getLogger("tamis").setLevel(logging.ERROR)  # truncation is intended here (same as the server run)
    emb = tamis.Embedder(None if model == "default" else model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tamis.TruncationWarning)
        emb.embed(texts[:64], truncate=True, show_progress=False)  # warm-up
        t0 = time.perf_counter()
        res = emb.embed_result(texts, truncate=True, embedding_type="base64", show_progress=not quiet)
        dt = time.perf_counter() - t0
    return {"texts": len(texts), "tokens": int(sum(res.token_counts)), "seconds": dt,
            "texts_per_s": len(texts) / dt, "tokens_per_s": sum(res.token_counts) / dt,
            "torch_threads": torch.get_num_threads()}


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


async def run_load(url: str, bodies: list[bytes], sizes: list[int], clients: int, duration: float,
                   quiet: bool) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    done_inputs = 0
    done_tokens = 0
    next_req = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker() -> None:
            nonlocal done_inputs, done_tokens, next_req
            while time.perf_counter() < stop_at:
                i = next_req % len(bodies)
                next_req += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/embeddings", content=bodies[i], headers=headers)
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                dt = time.perf_counter() - t0
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                body = r.json()
                if len(body["data"]) != sizes[i]:
                    errors.append(f"request {i}: {len(body['data'])} embeddings for {sizes[i]} inputs")
                    continue
                latencies.append(dt)
                done_inputs += sizes[i]
                done_tokens += body["usage"]["total_tokens"]

        async def progress() -> None:
            with tqdm(total=int(duration), desc="load", unit="s", disable=quiet) as bar:
                while time.perf_counter() < stop_at:
                    await asyncio.sleep(1)
                    bar.update(1)
                    bar.set_postfix(inputs=done_inputs, errors=len(errors))

        await asyncio.gather(progress(), *[worker() for _ in range(clients)])
        elapsed = time.perf_counter() - start
    return {
        "clients": clients, "seconds": elapsed, "requests": len(latencies), "inputs": done_inputs,
        "tokens": done_tokens, "inputs_per_s": done_inputs / elapsed, "tokens_per_s": done_tokens / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50), "p90_ms": 1000 * percentile(latencies, 90),
        "p99_ms": 1000 * percentile(latencies, 99), "mean_ms": 1000 * statistics.fmean(latencies) if latencies else 0,
        "statuses": statuses, "errors": len(errors), "error_samples": errors[:5],
    }


async def run_burst(url: str, n_requests: int, size: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = [json.dumps({"input": [f"burst {i} {j} " + "word " * rng.randint(1, 30) for j in range(size)],
                          "truncate": True}).encode() for i in range(n_requests)]
    statuses: dict[int, int] = {}
    retry_after: list[str] = []
    limits = httpx.Limits(max_connections=n_requests + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        async def one(b: bytes) -> None:
            r = await client.post("/v1/embeddings", content=b, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 429:
                retry_after.append(r.headers.get("retry-after", ""))
                assert "detail" in r.json()

        t0 = time.perf_counter()
        await asyncio.gather(*[one(b) for b in bodies])
        dt = time.perf_counter() - t0
        # recovery: the queue drains and normal requests succeed again
        ok = 0
        for i in range(20):
            r = await client.post("/v1/embeddings", json={"input": [f"after the burst {i}", "short text"]})
            ok += r.status_code == 200
        health = (await client.get("/health")).status_code
        metrics = (await client.get("/metrics")).text
    depth = [ln for ln in metrics.splitlines() if ln.startswith("tamis_queue_depth{")]
    return {"requests": n_requests, "inputs_each": size, "seconds": dt, "statuses": statuses,
            "retry_after_present": all(retry_after) if retry_after else None,
            "recovery_ok": f"{ok}/20", "health_after": health, "queue_depth_after": depth}


def server_stats(metrics: str, seconds: float) -> dict[str, float]:
    """Model-side view of the load phase from /metrics: busy share, batch sizes, padded tokens."""
    def total(name: str) -> float:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines() if ln.startswith(name + "{"))

    calls = total("tamis_forward_seconds_count")
    busy = total("tamis_forward_seconds_sum")
    return {"forward_calls": calls, "forward_busy_share": busy / seconds,
            "mean_batch_rows": total("tamis_batch_size_sum") / max(calls, 1),
            "mean_requests_per_batch": total("tamis_batch_requests_sum") / max(calls, 1),
            "padded_tokens_per_forward_s": total("tamis_batch_tokens_sum") / max(busy, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--requests", type=int, default=400, help="distinct requests (cycled); offline embeds all of them")
    ap.add_argument("--max-queued-inputs", type=int, default=2048)
    ap.add_argument("--burst-requests", type=int, default=120)
    ap.add_argument("--burst-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 s, 8 clients, 60 requests")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.clients, args.requests = 8.0, 8, 60
    if args.clients * max(SIZES) > args.max_queued_inputs:
        ap.error("--max-queued-inputs must hold every client's largest request (clients x 32)")

    requests = build_requests(args.requests, args.seed)
    texts = [t for r in requests for t in r]
    print(f"{len(requests)} requests, {len(texts)} inputs, sizes {sorted(set(map(len, requests)))}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    offline_before = offline_throughput(args.model, texts, args.quiet)
    print(f"offline Embedder.embed: {offline_before['texts_per_s']:.1f} inputs/s, "
          f"{offline_before['tokens_per_s']:.0f} tokens/s ({offline_before['texts']} inputs in "
          f"{offline_before['seconds']:.1f} s)", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tamis-load-server-{port}.log"
    with open(log_path, "w") as log:
        t_spawn = time.perf_counter()
        proc = start_server(port, ["--no-reranker", "--embedding-model", args.model,
                                   "--max-queued-inputs", str(args.max_queued_inputs)], log, timeout_s=120)
        try:
            bodies = [json.dumps({"model": None, "input": r, "truncate": True, "encoding_format": "base64"}).encode()
                      for r in requests]
            # first-request latency: start-up until /health says ready, then the first and second requests
            # (the first pays any lazy warm-up: allocator, thread pools, first-shape kernels)
            startup = {"healthy_after_s": time.perf_counter() - t_spawn}
            for key in ("first_request_ms", "second_request_ms"):
                t0 = time.perf_counter()
                warm = httpx.post(url + "/v1/embeddings", content=bodies[0],
                                  headers={"content-type": "application/json"}, timeout=60)
                startup[key] = 1e3 * (time.perf_counter() - t0)
                assert warm.status_code == 200, warm.text
            startup["request_inputs"] = len(requests[0])
            print(f"start-up: /health ready {startup['healthy_after_s']:.1f} s after spawn; first request "
                  f"({len(requests[0])} inputs) {startup['first_request_ms']:.0f} ms, second "
                  f"{startup['second_request_ms']:.0f} ms", flush=True)
            load = asyncio.run(run_load(url, bodies, [len(r) for r in requests], args.clients, args.duration,
                                        args.quiet))
            load["server"] = server_stats(httpx.get(url + "/metrics").text, load["seconds"])
            burst = asyncio.run(run_burst(url, args.burst_requests, args.burst_size, args.seed))
        finally:
            stop_server(proc)

    # the machine may be shared: offline is measured again after the server run and the ratio uses the
    # faster of the two (other load only slows a run down, so the faster one is the fairer baseline)
    offline_after = offline_throughput(args.model, texts, args.quiet)
    offline = max(offline_before, offline_after, key=lambda o: o["texts_per_s"])
    print(f"offline again: {offline_after['texts_per_s']:.1f} inputs/s; baseline (faster) {offline['texts_per_s']:.1f} "
          f"inputs/s, {offline['tokens_per_s']:.0f} tokens/s; load average now {os.getloadavg()[0]:.2f}")
    ratio_inputs = load["inputs_per_s"] / offline["texts_per_s"]
    ratio_tokens = load["tokens_per_s"] / offline["tokens_per_s"]
    print()
    print(f"load: {args.clients} clients x {load['seconds']:.1f} s: {load['requests']} requests, {load['inputs']} inputs, "
          f"statuses {load['statuses']}, errors {load['errors']}")
    print(f"  throughput {load['inputs_per_s']:.1f} inputs/s, {load['tokens_per_s']:.0f} tokens/s")
    print(f"  latency p50 {load['p50_ms']:.0f} ms, p90 {load['p90_ms']:.0f} ms, p99 {load['p99_ms']:.0f} ms")
    print(f"  vs offline: {ratio_inputs:.1%} (inputs/s), {ratio_tokens:.1%} (tokens/s)")
    sv = load["server"]
    print(f"  server: model busy {sv['forward_busy_share']:.0%} of the time, {sv['forward_calls']:.0f} forward calls, "
          f"{sv['mean_batch_rows']:.1f} rows from {sv['mean_requests_per_batch']:.1f} requests per call, "
          f"{sv['padded_tokens_per_forward_s']:.0f} padded tokens per forward-second")
    print(f"burst: {burst['requests']} x {burst['inputs_each']} inputs at once -> {burst['statuses']} in "
          f"{burst['seconds']:.1f} s; Retry-After on every 429: {burst['retry_after_present']}")
    print(f"recovery: {burst['recovery_ok']} ok, /health {burst['health_after']}, {burst['queue_depth_after']}")
    checks = {
        "zero errors under load": load["errors"] == 0 and load["requests"] > 0,
        "throughput >= 80% of offline": ratio_inputs >= 0.8,
        "burst got 429s": burst["statuses"].get(429, 0) > 0,
        "burst had no 5xx": not any(s >= 500 for s in burst["statuses"]),
        "recovered": burst["recovery_ok"] == "20/20" and burst["health_after"] == 200,
    }
    for name, ok in checks.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"offline_before": offline_before, "offline_after": offline_after,
                                               "offline_baseline": offline, "startup": startup, "load": load,
                                               "burst": burst,
                                               "ratio_inputs": ratio_inputs, "ratio_tokens": ratio_tokens,
                                               "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
