"""Hostile-client probes of ``tamis serve`` (issue 12, items 9-19): figures and pass/fail checks.

    python benchmarks/probe_server.py [--only basic,11,12,14,15,16,17,leak] [--json probes.json]

Exit status 0 when every check passes, 1 when one fails (each failing check is listed at the end), 2 on a
usage error. Each probe starts ``python -m tamis.server`` (``--embedding-model default --reranker-model
default``, or ``--reranker``) on a free 127.0.0.1 port with the options it needs, and measures:

basic  items 9, 10, 13, 18, 19 on one server: ``"model": "default"`` on both routes (200) and an unknown
       name (400); a lone surrogate in an echoed document field (400, not 500); rerank with a query over the
       model's limit, ``truncate: false`` (400) and the default (200 + X-Truncated-Query); the rerank queue
       gauge while a rerank is queued (``kind="rerank"`` > 0, ``kind="embedding"`` 0); a 15 MB model name
       (400, small body), a repeated ``embedding_type``, a whitespace-only input, an empty document (400s)
11  a 15.8 MB body of 7.9 M list items, and one of 1 M ``{}`` documents: status and time to answer,
    the slowest ``/health`` while they are in flight, server RSS before and its peak (VmHWM)
12  an 8 MB string (``truncate`` false, then true): status and time; a one-word request sent right behind
14  SIGTERM while 8 reranks are admitted (``--graceful-timeout 5``; their size is chosen from a timed
    32-document rerank so that about 3 fit the grace period, or ``--sigterm-docs``): statuses, JSON bodies,
    Retry-After, time to exit
15  ``--request-timeout 0.5``: a 1-document rerank behind a 2,048-document one (status, time), and when the
    given-up rerank has left the worker (it stops at its next batch); then a ``--disconnect-docs`` document
    rerank (sized from a timed 32-document rerank to take about 30 s, at least 512 documents), timed in full,
    then sent again by a client that leaves after 1 s: when the next request is served
16  ``--methods`` (10,000) requests with random 2,000-character methods: ``/metrics`` size and server RSS
    before and after
17  300 connections that never send a request, server started with a 256-file limit: open descriptors
    after 1 s and after the header timeout, a /health request while they are open, bytes of server log
    after 30 s, and a request still served
leak  the hostile requests above (a 15.8 MB body of numbers, an 8 MB string cut and refused, a 512-document
    rerank whose client leaves, 1,000 random methods, 50 silent connections) plus normal requests, in
    ``--rounds`` (6) rounds on one server (MALLOC_ARENA_MAX=2, ``--arena-max``): its RSS after each round
    (levelling off = no leak)

Every server also reports its RSS once ready and just before it is stopped, a ``/health`` baseline (40 polls
on the idle server) and the tracebacks and HTTP 500s found in its log (a check: none). Statuses are
collected from every answer: 503 with Retry-After is the designed answer to a deadline or a shutdown; a 500
or a dropped connection is a finding.

Latency checks are relative to what the same server does when idle (its ``/health`` baseline, an idle
one-word request, a timed small rerank), with a floor in seconds, so that they hold on a slow or busy
machine (a CPU quota, other jobs) and still catch the findings of the issue, which were 10-1000x off.
Prints the CPU model, the usable CPUs, the CPU quota of this process's cgroup and the load average (the
figures are as slow as the machine is busy). Only 127.0.0.1 is contacted; every server is stopped at the
end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from local_server import free_port, start_server, stop_server
from tamis.train.card import cpu_model

JSON = {"content-type": "application/json"}


def cpu_quota() -> float | None:
    """CPUs this process may use under its cgroup's CPU quota (v1 or v2), or None when unlimited."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "" and Path("/sys/fs/cgroup" + path, "cpu.max").exists():  # cgroup v2
                quota, period = Path("/sys/fs/cgroup" + path, "cpu.max").read_text().split()
                return None if quota == "max" else int(quota) / int(period)
            if "cpu" in controllers.split(","):
                base = Path("/sys/fs/cgroup/cpu" + path)
                quota_us = int((base / "cpu.cfs_quota_us").read_text())
                return None if quota_us < 0 else quota_us / int((base / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------------------- checks
CHECKS: list[dict[str, Any]] = []  # every check of the run: item, what, ok, value


def check(item: str, what: str, ok: bool, value: Any = None) -> bool:
    """Record one pass/fail check (printed as it is made, and in the summary when it fails)."""
    CHECKS.append({"item": item, "check": what, "ok": bool(ok), "value": value})
    print(f"  {'PASS' if ok else 'FAIL'} [{item}] {what}" + ("" if value is None else f": {value}"), flush=True)
    return bool(ok)


def fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f} s"


def proc_status(pid: int, key: str) -> float:
    """VmRSS / VmHWM of a process in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


SERVERS: list[Server] = []  # every server started, for the log checks after each probe
MODELS = {"embedding": "default", "reranker": "default"}  # --embedding-model / --reranker-model of every server


class Server:
    def __init__(self, args: list[str], preexec: Any = None, env: dict[str, str] | None = None):
        SERVERS.append(self)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / f"tamis-probe-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.args = ["--reranker-model", MODELS["reranker"], "--embedding-model", MODELS["embedding"], *args]
        self.preexec = preexec
        self.env = env

    def __enter__(self) -> Server:
        if self.preexec is None and self.env is None:
            self.proc = start_server(self.port, self.args, self.log, timeout_s=300)
        else:  # start_server with a limit set in the child first, or more environment variables
            import subprocess

            cmd = [sys.executable, "-m", "tamis.server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning", *self.args]
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=self.preexec,
                                         env=None if self.env is None else {**os.environ, **self.env})
            deadline = time.time() + 300
            while True:
                if self.proc.poll() is not None or time.time() > deadline:
                    stop_server(self.proc)
                    raise RuntimeError(f"server not ready (exit code {self.proc.returncode}); see {self.log_path}")
                try:
                    if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self.rss_ready_mb = proc_status(self.proc.pid, "VmRSS")
        self.health_baseline = health_baseline(self)
        return self

    def report(self) -> dict[str, Any]:
        """RSS now (and once ready), the idle /health baseline; call before leaving the ``with``."""
        alive = self.proc.poll() is None
        return {"rss_ready_mb": round(self.rss_ready_mb, 1),
                "rss_end_mb": round(proc_status(self.proc.pid, "VmRSS"), 1) if alive else None,
                "rss_peak_mb": round(proc_status(self.proc.pid, "VmHWM"), 1) if alive else None,
                "health_idle": self.health_baseline}

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None:
            stop_server(self.proc)
        self.log.close()
        text = self.log_path.read_text(errors="replace")
        self.tracebacks = text.count("Traceback")
        self.log_500 = text.count(" 500 ")
        if not self.tracebacks and not self.log_500:
            self.log_path.unlink()  # kept (and named in the results) when it holds a finding


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail", ""))[:90]
    except ValueError:  # not JSON: a plain-text answer is itself a finding
        return "NOT JSON: " + r.text[:80]


def health_baseline(srv: Server, n: int = 40) -> dict[str, float]:
    times = []
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        for _ in range(n):
            _, dt = timed(h.get, "/health")
            times.append(dt)
            time.sleep(0.02)
    times.sort()
    return {"median_s": times[len(times) // 2], "max_s": times[-1]}


def timed(fn: Any, *a: Any, **kw: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def while_in_flight(srv: Server, send: Any) -> dict[str, Any]:
    """Run ``send()`` in a thread; poll /health and sample the server's RSS meanwhile; figures of all."""
    box: dict[str, Any] = {"rss_before_mb": round(proc_status(srv.proc.pid, "VmRSS"), 1)}
    rss = [box["rss_before_mb"]]

    def run() -> None:
        t0 = time.perf_counter()
        try:
            r = send()
        except httpx.HTTPError as exc:  # a dropped connection is a finding too
            box["status"], box["seconds"] = type(exc).__name__, time.perf_counter() - t0
            return
        box["status"], box["seconds"] = r.status_code, time.perf_counter() - t0
        box["detail"] = _detail(r) if r.status_code >= 400 else ""

    def sample() -> None:  # the server's peak (VmHWM) is usually its model loading: sample the RSS instead
        while t.is_alive():
            rss.append(proc_status(srv.proc.pid, "VmRSS"))
            time.sleep(0.005)

    t = threading.Thread(target=run)
    sampler = threading.Thread(target=sample)
    health: list[float] = []
    t.start()
    sampler.start()
    with httpx.Client(base_url=srv.url, timeout=60) as h:
        while t.is_alive():
            _, dt = timed(h.get, "/health")
            health.append(dt)
            time.sleep(0.02)
    t.join()
    sampler.join()
    box["rss_max_in_flight_mb"] = round(max(rss), 1)
    health.sort()
    box["health_polls"] = len(health)
    box["health_median_s"] = health[len(health) // 2] if health else None
    box["health_max_s"] = health[-1] if health else None
    return box


# ---------------------------------------------------------------------------- probes
def probe_basic() -> dict[str, Any]:
    """Items 9, 10, 13, 18, 19 on one server (answers and bodies; no timing)."""
    out: dict[str, Any] = {}
    q_long = "late chunking " * 400  # 5,600 characters, ~800 tokens: over a 256- or 512-token limit
    with Server([]) as srv, httpx.Client(base_url=srv.url, timeout=600) as c:
        # 9: the library's name for its default model, on both routes; unknown names stay a 400
        e = c.post("/v1/embeddings", json={"model": "default", "input": "x"})
        r = c.post("/v1/rerank", json={"model": "default", "query": "q", "documents": ["d"]})
        u = c.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"})
        out["9"] = {"embeddings_default": e.status_code, "rerank_default": r.status_code,
                    "unknown_name": u.status_code, "unknown_detail": _detail(u)}
        check("9", '"model": "default" accepted on /v1/embeddings and /v1/rerank', e.status_code == r.status_code
              == 200, f"{e.status_code}, {r.status_code}")
        check("9", "an unknown model name is a JSON 400", u.status_code == 400 and _detail(u) != ""
              and not _detail(u).startswith("NOT JSON"), f"{u.status_code} {_detail(u)!r}")
        # 10: a lone surrogate in a field that would be echoed back
        raw = b'{"query":"q","documents":[{"text":"a","meta":"\\ud800"}]}'
        b = c.post("/v1/rerank", content=raw, headers=JSON)
        out["10"] = {"status": b.status_code, "detail": _detail(b)}
        check("10", "lone surrogate in an echoed document field: JSON 400, not 500",
              b.status_code == 400 and "surrogate" in _detail(b), f"{b.status_code} {_detail(b)!r}")
        # 13: rerank truncation is never silent
        strict = c.post("/v1/rerank", json={"query": q_long, "documents": ["a", "b"], "truncate": False})
        default = c.post("/v1/rerank", json={"query": q_long, "documents": ["a", "b"]})
        out["13"] = {"truncate_false": {"status": strict.status_code, "detail": _detail(strict)},
                     "default": {"status": default.status_code,
                                 "x_truncated_query": default.headers.get("x-truncated-query")}}
        check("13", 'over-long rerank query with "truncate": false is a 400', strict.status_code == 400,
              f"{strict.status_code} {_detail(strict)!r}")
        check("13", "over-long rerank query by default: 200 with X-Truncated-Query: true",
              default.status_code == 200 and default.headers.get("x-truncated-query") == "true",
              f"{default.status_code}, X-Truncated-Query={default.headers.get('x-truncated-query')}")
        # 18: queue gauges by kind while a rerank is queued
        docs = [f"passage {i} about the queue metrics of a reranker" * 4 for i in range(512)]
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.update(r=httpx.post(srv.url + "/v1/rerank", timeout=600,
                                                                    json={"query": "q", "documents": docs})))
        t.start()
        depth: dict[str, float] = {}
        t0 = time.perf_counter()
        while t.is_alive() and time.perf_counter() - t0 < 60:
            depth = queue_gauges(c, "tamis_queue_depth")
            if depth.get("rerank", 0) > 0:
                break
            time.sleep(0.02)
        t.join()
        out["18"] = {"queue_depth_during_rerank": depth, "rerank_status": box["r"].status_code}
        check("18", "tamis_queue_depth by kind during a 512-document rerank: rerank 512, embedding 0",
              depth.get("rerank") == 512 and depth.get("embedding") == 0, depth)
        # 19: capped echoes, repeated embedding types, blank inputs, empty documents
        name = c.post("/v1/embeddings", content=b'{"model":"' + b"m" * 15_000_000 + b'","input":"x"}', headers=JSON)
        dup = c.post("/v1/embeddings", json={"input": "x", "embedding_type": ["float", "float"]})
        blank = c.post("/v1/embeddings", json={"input": ["fine", " \n\t "]})
        empty_doc = c.post("/v1/rerank", json={"query": "q", "documents": ["a", ""]})
        out["19"] = {"model_name_15mb": {"status": name.status_code, "reply_bytes": len(name.content)},
                     "repeated_embedding_type": dup.status_code, "whitespace_input": blank.status_code,
                     "empty_document": empty_doc.status_code}
        check("19", "a 15 MB model name: 400 with a reply under 2 KB",
              name.status_code == 400 and len(name.content) < 2048, f"{name.status_code}, {len(name.content)} bytes")
        check("19", "repeated embedding_type, whitespace-only input, empty document: 400 each",
              dup.status_code == blank.status_code == empty_doc.status_code == 400,
              f"{dup.status_code}, {blank.status_code}, {empty_doc.status_code}")
        out["server"] = srv.report()
    return out


def queue_gauges(c: httpx.Client, metric: str) -> dict[str, float]:
    """{kind: value} of one per-model queue gauge (summed over models)."""
    out: dict[str, float] = {}
    for ln in c.get("/metrics").text.splitlines():
        if ln.startswith(metric + "{") and 'kind="' in ln:
            kind = ln.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = out.get(kind, 0.0) + float(ln.rsplit(" ", 1)[1])
    return out


def probe_11() -> dict[str, Any]:
    ints = b'{"input":[' + b",".join([b"1"] * 7_900_000) + b"]}"
    objects = b'{"query":"q","documents":[' + b",".join([b"{}"] * 1_000_000) + b"]}"
    out: dict[str, Any] = {"ints_body_mb": len(ints) / 1e6, "objects_body_mb": len(objects) / 1e6}
    with Server([]) as srv:
        # the cost of sending and receiving these bytes alone: POST them to /health, which reads a body and
        # answers 405 without parsing it (the baseline of the time checks; no JSON is built)
        for key, body in (("ints", ints), ("objects", objects)):
            r, out[f"{key}_send_only_s"] = timed(httpx.post, srv.url + "/health", content=body, headers=JSON,
                                                 timeout=600)
            out[f"{key}_send_only_status"] = r.status_code
        out["ints"] = while_in_flight(srv, lambda: httpx.post(srv.url + "/v1/embeddings", content=ints, headers=JSON,
                                                               timeout=600))
        out["objects"] = while_in_flight(srv, lambda: httpx.post(srv.url + "/v1/rerank", content=objects,
                                                                  headers=JSON, timeout=600))
        out["server"] = rep = srv.report()
    # the figures: a 400 after 12.4 s with /health at 11.9 s meanwhile; 1 M {}: 6.5 s, +600 MB RSS
    idle = rep["health_idle"]["max_s"]
    for key, what in (("ints", "7.9 M numbers"), ("objects", "1 M {} documents")):
        box = out[key]
        check("11", f"{what}: a JSON 4xx (not 5xx, not a dropped connection)",
              isinstance(box["status"], int) and 400 <= box["status"] < 500 and not box["detail"].startswith("NOT"),
              f"{box['status']} {box.get('detail', '')!r}")
        send = out[f"{key}_send_only_s"]
        check("11", f"{what}: answered within 2 x the time to send the bytes alone + max(1 s, 10 x idle /health max)",
              box["seconds"] < 2 * send + max(1.0, 10 * idle),
              f"{fmt_s(box['seconds'])} (sending alone {fmt_s(send)}, idle /health max {fmt_s(idle)})")
        check("11", f"{what}: /health in flight within max(0.5 s, 10 x idle max)",
              box["health_max_s"] is None or box["health_max_s"] < max(0.5, 10 * idle), fmt_s(box["health_max_s"]))
        grown = box["rss_max_in_flight_mb"] - box["rss_before_mb"]
        check("11", f"{what}: server RSS grows by less than 200 MB while it is handled", grown < 200,
              f"+{grown:.0f} MB ({box['rss_before_mb']:.0f} -> {box['rss_max_in_flight_mb']:.0f} MB)")
    return out


def probe_12() -> dict[str, Any]:
    huge = "word " * 1_600_000  # 8 MB
    out: dict[str, Any] = {"string_mb": len(huge) / 1e6}
    with Server([]) as srv, httpx.Client(base_url=srv.url, timeout=600) as c:
        c.post("/v1/embeddings", json={"input": "warm up"})
        for truncate in (False, True):
            box: dict[str, Any] = {}

            def big(truncate: bool = truncate, box: dict[str, Any] = box) -> None:
                r, dt = timed(httpx.post, srv.url + "/v1/embeddings", json={"input": [huge], "truncate": truncate},
                              timeout=600)
                box.update(status=r.status_code, seconds=dt, truncated=r.headers.get("x-truncated-inputs"),
                           detail=_detail(r) if r.status_code >= 400 else "")

            t = threading.Thread(target=big)
            t.start()
            time.sleep(0.05)
            small, small_s = timed(c.post, "/v1/embeddings", json={"input": "one"})
            t.join()
            box.update(one_word_behind_status=small.status_code, one_word_behind_s=small_s)
            out[f"truncate_{str(truncate).lower()}"] = box
        out["one_word_idle_s"] = idle = min(timed(c.post, "/v1/embeddings", json={"input": "one"})[1]
                                            for _ in range(5))
        out["server"] = srv.report()
    # the figures: a 400 after 10.9 s, a one-word request behind it waited 10 s
    strict, cut = out["truncate_false"], out["truncate_true"]
    check("12", "8 MB string, truncate false: 400 within max(1 s, 20 x an idle one-word request)",
          strict["status"] == 400 and strict["seconds"] < max(1.0, 20 * idle),
          f"{strict['status']} in {fmt_s(strict['seconds'])} (idle one-word {fmt_s(idle)})")
    check("12", "8 MB string, truncate true: 200 reported in X-Truncated-Inputs",
          cut["status"] == 200 and cut["truncated"] == "0", f"{cut['status']}, X-Truncated-Inputs={cut['truncated']}")
    for key in ("truncate_false", "truncate_true"):
        box = out[key]
        check("12", f"one-word request behind it ({key}): 200 within max(1 s, 20 x idle)",
              box["one_word_behind_status"] == 200 and box["one_word_behind_s"] < max(1.0, 20 * idle),
              f"{box['one_word_behind_status']} in {fmt_s(box['one_word_behind_s'])}")
    return out


def probe_14(n_docs: int | None = None, grace_s: float = 5.0) -> dict[str, Any]:
    """``n_docs=None``: sized from a timed 32-document rerank so that about 3 of the 8 fit the grace period."""
    pool = [f"document {i} about late chunking and reranking of long texts " * 3 for i in range(4096)]
    results: list[dict[str, Any]] = []
    with Server(["--graceful-timeout", str(grace_s)]) as srv:
        http = httpx.Client(base_url=srv.url, timeout=600, limits=httpx.Limits(max_connections=16))
        http.post("/v1/rerank", json={"query": "warm", "documents": pool[:8]})
        _, t32 = timed(http.post, "/v1/rerank", json={"query": "warm", "documents": pool[:32]})
        if n_docs is None:
            n_docs = int(min(4096, max(4, 32 * (grace_s - 1.0) / (3 * t32))))
        docs = pool[:n_docs]

        def one(i: int) -> None:
            try:
                r = http.post("/v1/rerank", json={"query": f"query {i}", "documents": docs})
            except httpx.HTTPError as exc:  # a dropped connection is a finding too
                results.append({"status": type(exc).__name__, "json": False, "retry_after": None, "at": time.time()})
                return
            results.append({"status": r.status_code, "json": r.headers.get("content-type", "").startswith(
                "application/json"), "retry_after": r.headers.get("retry-after"), "at": time.time()})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        admitted = 0.0
        while time.time() < deadline:
            admitted = queued(http, "rerank")
            if admitted >= 8:
                break
            time.sleep(0.05)
        report = srv.report()
        sent = time.time()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        srv.proc.wait(60)
        exit_s = time.time() - sent
        http.close()
    statuses: dict[Any, int] = {}
    for r in results:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    out = {"requests": len(threads), "documents_each": n_docs, "rerank_32_docs_s": t32, "admitted_at_sigterm": admitted,
           "statuses": statuses, "all_json": all(r["json"] for r in results),
           "retry_after_on_503": all(r["retry_after"] for r in results if r["status"] == 503),
           "last_answer_after_sigterm_s": max(r["at"] for r in results) - sent if results else None,
           "exit_after_sigterm_s": exit_s, "exit_code": srv.proc.returncode, "server": report}
    # the finding: six plain-text 500s at uvicorn's graceful-shutdown timeout
    check("14", "all 8 reranks admitted before SIGTERM (else the probe proves less)", admitted >= 8, admitted)
    check("14", "every request answered: only 200 and 503, all JSON", len(results) == 8 and set(statuses) <= {200, 503}
          and out["all_json"], statuses)
    check("14", "what fits the grace period finishes (at least one 200)", statuses.get(200, 0) >= 1, statuses)
    check("14", "every 503 carries Retry-After", out["retry_after_on_503"])
    # uvicorn re-raises the signal it caught once it has shut down, so the exit status is "killed by SIGTERM"
    # (143 in a shell), which process managers count as a clean stop
    check("14", f"exits (status 0 or SIGTERM re-raised) within the grace period ({grace_s:g} s) + 3 s",
          srv.proc.returncode in (0, -signal.SIGTERM) and exit_s < grace_s + 3,
          f"exit {srv.proc.returncode} after {fmt_s(exit_s)}")
    return out


def probe_15(disconnect_docs: int | None = None, target_s: float = 30.0) -> dict[str, Any]:
    """``disconnect_docs=None``: sized from a timed 32-document rerank so that the abandoned rerank would run
    about ``target_s`` in full, between 512 and 2,048 documents. A given-up rerank stops at its next batch,
    so it may still run one batch (4,096 tokens, ~78 of these documents, with the default CPU budget): at
    least 512 documents keep that well under half of the whole, however slow the machine."""
    docs = [f"passage {i}: a document of moderate length about reranking " * 4 for i in range(2048)]
    out: dict[str, Any] = {}
    with Server(["--request-timeout", "0.5"]) as srv, httpx.Client(base_url=srv.url, timeout=600) as c:
        c.post("/v1/rerank", json={"query": "warm", "documents": docs[:8]})
        box: dict[str, Any] = {}

        def big() -> None:
            r, dt = timed(c.post, "/v1/rerank", json={"query": "q", "documents": docs})
            box.update(status=r.status_code, seconds=dt)

        t = threading.Thread(target=big)
        t.start()
        time.sleep(0.1)
        small, small_s = timed(httpx.post, srv.url + "/v1/rerank", json={"query": "q", "documents": ["d"]},
                               timeout=60)
        t.join()
        idle = srv.health_baseline["max_s"]
        t0 = time.perf_counter()
        while queued(c, "rerank") > 0 and time.perf_counter() - t0 < 120:  # the given-up rerank still runs
            time.sleep(0.05)
        box["worker_free_after_answer_s"] = time.perf_counter() - t0
        after, after_s = timed(httpx.post, srv.url + "/v1/rerank", json={"query": "q", "documents": ["d"]},
                               timeout=60)
        out["timeout_0.5"] = {"big": box, "small_behind": {"status": small.status_code, "seconds": small_s,
                                                           "retry_after": small.headers.get("retry-after"),
                                                           "detail": _detail(small)},
                              "next_request": {"status": after.status_code, "seconds": after_s},
                              "server": srv.report()}
    with Server(["--request-timeout", "900"]) as srv, httpx.Client(base_url=srv.url, timeout=900) as c:
        c.post("/v1/rerank", json={"query": "warm", "documents": docs[:8]})
        _, t32 = timed(c.post, "/v1/rerank", json={"query": "warm", "documents": docs[:32]})
        if disconnect_docs is None:
            disconnect_docs = int(min(2048, max(512, 32 * target_s / t32)))
        part = docs[:disconnect_docs]
        full, full_s = timed(c.post, "/v1/rerank", json={"query": "q", "documents": part})
        t0 = time.perf_counter()
        try:
            httpx.post(srv.url + "/v1/rerank", json={"query": "q", "documents": part}, timeout=1.0)
        except httpx.TimeoutException:
            pass
        nxt, _ = timed(c.post, "/v1/rerank", json={"query": "q", "documents": ["d"]})
        out["disconnect"] = {"documents": disconnect_docs, "full_rerank_s": full_s, "full_status": full.status_code,
                             "next_request_served_after_s": time.perf_counter() - t0,
                             "next_status": nxt.status_code, "server": srv.report()}
    # the findings: the 1-document rerank waited 10.6 s, then 503; an abandoned rerank ran on ~10 s
    d, tmo = out["disconnect"], out["timeout_0.5"]
    big, small = tmo["big"], tmo["small_behind"]
    check("15", "1-document rerank behind a 2,048-document one: 503 + Retry-After at its 0.5 s deadline "
          "(within 0.5 s + max(1 s, 10 x idle /health max))",
          small["status"] == 503 and small["retry_after"] is not None and small["seconds"] < 0.5 + max(1.0, 10 * idle),
          f"{small['status']} in {fmt_s(small['seconds'])}, Retry-After={small['retry_after']}")
    check("15", "the 2,048-document rerank itself: 503 at its deadline", big["status"] == 503
          and big["seconds"] < 0.5 + max(1.0, 10 * idle), f"{big['status']} in {fmt_s(big['seconds'])}")
    est = d["full_rerank_s"] * 2048 / d["documents"]  # a 2,048-document rerank, from the timed one
    check("15", "the given-up rerank leaves the worker within max(2 s, 1/4 of its full time)",
          big["worker_free_after_answer_s"] < max(2.0, est / 4),
          f"{fmt_s(big['worker_free_after_answer_s'])} (full time ~{est:.1f} s)")
    check("15", "a request after it is served", tmo["next_request"]["status"] == 200, tmo["next_request"]["status"])
    check("15", f"client leaves a {disconnect_docs}-document rerank after 1 s: the next request is served within "
          "1 s + half the full rerank time", d["full_status"] == d["next_status"] == 200
          and d["next_request_served_after_s"] < 1.0 + 0.5 * d["full_rerank_s"],
          f"{fmt_s(d['next_request_served_after_s'])} (full rerank {fmt_s(d['full_rerank_s'])})")
    return out


def queued(c: httpx.Client, kind: str) -> float:
    text = c.get("/metrics").text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("tamis_queue_requests{") and f'kind="{kind}"' in ln)


def probe_16(n_requests: int = 10_000) -> dict[str, Any]:
    rng = random.Random(0)

    async def flood(url: str) -> dict[int, int]:
        statuses: dict[int, int] = {}
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def one() -> None:
                method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2000))
                async with sem:
                    r = await c.request(method, "/health")
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

            await asyncio.gather(*[one() for _ in range(n_requests)])
        return statuses

    with Server([]) as srv:
        pid = srv.proc.pid
        before = len(httpx.get(srv.url + "/metrics").content)
        rss_before = proc_status(pid, "VmRSS")
        (statuses, seconds) = timed(asyncio.run, flood(srv.url))
        after = len(httpx.get(srv.url + "/metrics").content)
        rss_after = proc_status(pid, "VmRSS")
        report = srv.report()
    # the finding: 10,000 such requests grew /metrics to 41.5 MB and the RSS by 48 MB
    check("16", f"{n_requests} random 2,000-character methods: no 5xx, no dropped request",
          sum(statuses.values()) == n_requests and all(int(k) < 500 for k in statuses), statuses)
    check("16", "/metrics grows by less than 16 KB", after - before < 16_384, f"{before} -> {after} bytes")
    check("16", "server RSS grows by less than 20 MB", rss_after - rss_before < 20,
          f"{rss_before:.0f} -> {rss_after:.0f} MB")
    return {"requests": n_requests, "statuses": statuses, "seconds": seconds, "metrics_bytes_before": before,
            "metrics_bytes_after": after, "rss_before_mb": rss_before, "rss_after_mb": rss_after, "server": report}


def probe_17() -> dict[str, Any]:
    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with Server([], preexec=limit_files) as srv:
        pid = srv.proc.pid
        base = open_fds(pid)
        socks = []
        refused = 0
        for _ in range(300):
            try:
                socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=2))
            except OSError:
                refused += 1
        time.sleep(1.0)
        fds_1s = open_fds(pid)
        try:
            during, during_s = timed(httpx.get, srv.url + "/health", timeout=30)
            health_during: dict[str, Any] = {"status": during.status_code, "seconds": during_s}
        except httpx.HTTPError as exc:
            health_during = {"status": type(exc).__name__}
        time.sleep(11.0)  # past the default 10 s header timeout
        fds_after = open_fds(pid)
        closed = reset = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                reset += 1
            except OSError:  # still open: nothing came within 0.2 s
                pass
            s.close()
        time.sleep(18.0)
        log_bytes = srv.log_path.stat().st_size
        ok = httpx.post(srv.url + "/v1/embeddings", json={"input": "still serving"}, timeout=30)
        report = srv.report()
    # the finding: 300 silent connections exhausted a 256-file limit; "Too many open files" filled
    # ~80 MB of log in 30 s
    idle = report["health_idle"]["max_s"]
    check("17", "/health while 300 silent connections are open: 200 within max(1 s, 10 x idle max)",
          health_during["status"] == 200 and health_during.get("seconds", 1e9) < max(1.0, 10 * idle),
          health_during)
    check("17", "every silent connection closed by the server after the header timeout",
          closed + reset == len(socks) and fds_after <= base + 8,
          f"{closed} closed, {reset} reset of {len(socks)}; server descriptors {base} idle, {fds_1s} after 1 s, "
          f"{fds_after} after the timeout")
    check("17", "server log under 64 KB after 30 s", log_bytes < 65_536, f"{log_bytes} bytes")
    check("17", "a request after them is served", ok.status_code == 200, ok.status_code)
    return {"server": report, "connections": 300, "connect_failed": refused, "server_fds_idle": base,
            "server_fds_after_1s": fds_1s, "health_during": health_during,
            "server_fds_after_header_timeout": fds_after, "closed_by_server": closed, "reset_by_server": reset,
            "server_log_bytes_after_30s": log_bytes, "request_after": ok.status_code}


def probe_leak(rounds: int = 6, arena_max: int | None = 2) -> dict[str, Any]:
    """``arena_max``: the server's MALLOC_ARENA_MAX (None: glibc's default). glibc gives each thread that
    allocates its own arena and keeps freed memory there, so large bodies parsed in different pool threads
    move RSS by tens of MB in steps that come and go (6 rounds with the default arenas: 485, 520, 568, 520,
    490, 496 MB); with 2 arenas the curve is flat after round 2 (504, 551, 552, 552, 552, 552 MB), where a
    leak would show."""
    rng = random.Random(1)
    ints = b'{"input":[' + b",".join([b"1"] * 7_900_000) + b"]}"
    huge = "word " * 1_600_000
    docs = [f"passage {i}: a document of moderate length about reranking " * 4 for i in range(512)]
    statuses: dict[str, int] = {}

    def note(r: httpx.Response) -> None:
        statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    rss: list[float] = []
    env = None if arena_max is None else {"MALLOC_ARENA_MAX": str(arena_max)}
    with Server([], env=env) as srv, httpx.Client(base_url=srv.url, timeout=600) as c:
        pid = srv.proc.pid
        for _ in range(rounds):
            note(c.post("/v1/embeddings", content=ints, headers=JSON))
            note(c.post("/v1/embeddings", json={"input": [huge]}))
            note(c.post("/v1/embeddings", json={"input": [huge, "short"], "truncate": True}))
            try:
                httpx.post(srv.url + "/v1/rerank", json={"query": "q", "documents": docs}, timeout=1.0)
            except httpx.TimeoutException:
                pass
            t0 = time.perf_counter()
            while queued(c, "rerank") > 0 and time.perf_counter() - t0 < 120:
                time.sleep(0.05)
            for _ in range(1000):
                method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(200))
                note(c.request(method, "/health"))
            silent = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(50)]
            time.sleep(0.2)
            for sock in silent:
                sock.close()
            note(c.post("/v1/embeddings", json={"input": ["a normal request", "and another"]}))
            note(c.post("/v1/rerank", json={"query": "q", "documents": docs[:16]}))
            time.sleep(0.5)
            rss.append(round(proc_status(pid, "VmRSS"), 1))
        report = srv.report()
    check("leak", "no 5xx in any round", all(int(k) < 500 for k in statuses), statuses)
    # a leak makes the later rounds' RSS ever higher; allocator noise comes and goes
    half = len(rss) // 2
    check("leak", "RSS levels off: the highest of the last half of the rounds is within 25 MB of the highest of "
          "the first half", len(rss) >= 2 and max(rss[half:]) - max(rss[:half]) < 25, rss)
    return {"rounds": rounds, "malloc_arena_max": arena_max, "rss_after_each_round_mb": rss, "statuses": statuses,
            "server": report}


PROBES = {"basic": probe_basic, "11": probe_11, "12": probe_12, "14": probe_14, "15": probe_15, "16": probe_16,
          "17": probe_17, "leak": probe_leak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PROBES), help=f"comma-separated probes (default: all of {', '.join(PROBES)})")
    ap.add_argument("--json", default=None, help="write every figure and check to this file")
    ap.add_argument("--embedding-model", default="default", help="--embedding-model of the servers (default: default)")
    ap.add_argument("--reranker", default="default",
                    help="--reranker-model of the servers (default: default; the probes size their work from timings)")
    ap.add_argument("--sigterm-docs", type=int, default=None,
                    help="documents per rerank in probe 14 (default: sized so that about 3 of 8 fit the grace period)")
    ap.add_argument("--disconnect-docs", type=int, default=None,
                    help="documents of the abandoned rerank in probe 15 (default: sized so that it takes about 30 s)")
    ap.add_argument("--methods", type=int, default=10_000, help="requests with random methods in probe 16")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of the leak probe")
    ap.add_argument("--arena-max", type=int, default=2,
                    help="MALLOC_ARENA_MAX of the leak probe's server (0: glibc's default; see probe_leak)")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PROBES]
    if unknown or not keys:
        ap.error(f"unknown probe(s) {unknown}; choose from {', '.join(PROBES)}")
    MODELS.update(embedding=args.embedding_model, reranker=args.reranker)
    load = os.getloadavg()[0]
    quota = cpu_quota()
    cpus = len(os.sched_getaffinity(0))
    print(f"CPU: {cpu_model()}, {cpus} usable CPUs, cgroup CPU quota "
          f"{'none' if quota is None else f'{quota:g} CPUs'}, load average {load:.2f}; python {platform.python_version()}",
          flush=True)
    results: dict[str, Any] = {"cpu": cpu_model(), "cpus": cpus, "cpu_quota": quota, "load_average": load,
                               "models": dict(MODELS)}
    runs = {"14": lambda: probe_14(args.sigterm_docs), "15": lambda: probe_15(args.disconnect_docs),
            "16": lambda: probe_16(args.methods), "leak": lambda: probe_leak(args.rounds, args.arena_max or None)}
    for key in keys:
        t0 = time.perf_counter()
        SERVERS.clear()
        print(f"[{key}] ...", flush=True)
        try:
            results[key] = runs.get(key, PROBES[key])()
        except Exception as exc:  # a probe that cannot finish is a failed check, and the others still run
            check(key, "probe ran to its end", False, f"{type(exc).__name__}: {exc}")
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
            for srv in SERVERS:  # stop what the probe left running
                proc = getattr(srv, "proc", None)
                if proc is not None and proc.poll() is None:
                    stop_server(proc)
        logs = [{"tracebacks": getattr(s, "tracebacks", None), "http_500_lines": getattr(s, "log_500", None),
                 "log": str(s.log_path) if s.log_path.exists() else None} for s in SERVERS]
        results[key]["server_logs"] = logs
        check(key, "server logs hold no traceback and no HTTP 500",
              all(x["tracebacks"] == 0 and x["http_500_lines"] == 0 for x in logs), logs)
        print(f"[{key}] ({time.perf_counter() - t0:.0f} s) {json.dumps(results[key], default=str)}", flush=True)
    failed = [c for c in CHECKS if not c["ok"]]
    results["checks"] = CHECKS
    results["cpu_quota_at_end"] = quota_end = cpu_quota()  # a job may be moved into another cgroup while it runs
    results["load_average_at_end"] = os.getloadavg()[0]
    print(f"\nat the end: cgroup CPU quota {'none' if quota_end is None else f'{quota_end:g} CPUs'}, load average "
          f"{results['load_average_at_end']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"{len(CHECKS) - len(failed)} of {len(CHECKS)} checks passed", flush=True)
    for c in failed:
        print(f"FAIL [{c['item']}] {c['check']}: {c['value']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
