"""Soak of ``tamis serve`` (issue 34): rounds of mixed embedding / rerank load of varied shapes against one
real server, its RSS and the latency percentiles per round, a PNG of both.

    python benchmarks/soak.py [--rounds 20] [--seconds 60] [--clients 6] [--out soak.json] [--png soak.png]
                              [--big-inputs 2000] [--big-chars 8192] [--url http://127.0.0.1:8080 --pid PID]
                              [-- extra tamis serve options]

Starts ``python -m tamis.server`` (the default embedding model and reranker) on a free 127.0.0.1 port unless
``--url`` (with ``--pid`` for its RSS) names a running one. Each round, for ``--seconds``:

* ``--clients`` threads send requests back to back, each one at random: an embedding request of 1-64 texts
  of 1-400 words (about 1-600 tokens; ``truncate`` true) or a rerank of a query and 1-64 such documents,
  through ``/v1/embeddings``, ``/v2/embed``, ``/v1/rerank`` or ``/v2/rerank``: every batch shape differs;
* one maximal embedding request (``--big-inputs`` texts of ``--big-chars`` characters, ``truncate`` true:
  2,000 x 8,192 by default, within the documented limits) is sent at the start of the round, and while it
  is in flight a probe sends a one-word embedding request every 0.25 s (the "small request while a maximal
  one runs" of the issue).

Per round it records the server's RSS (VmRSS at the end of the round), p50 / p99 latency of the mixed
requests and of the probe, the statuses (429 and 503 with Retry-After are documented answers under load;
any other 5xx, a non-JSON error or a dropped connection is a finding) and the maximal request's status and
time. Checks (exit status 1 when one fails): RSS growth from the end of round 3 to the last round
<= ``--max-growth-mb`` (50); no 5xx other than 429/503; the probe's p99 over all rounds <= ``--probe-p99-s``
(2 s). Prints the CPU, the load average and the server's command line, so that figures name their machine.
The full run of the issue: ``nice -n 19 python benchmarks/soak.py --rounds 20 --seconds 60``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import free_port, start_server, stop_server  # noqa: E402

LETTERS = "etaoinshrdlucmfwypvbgkjqxz"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS[: rng.randint(6, 26)]) for _ in range(rng.randint(1, 9)))


def text(rng: random.Random, max_words: int = 400) -> str:
    return " ".join(word(rng) for _ in range(rng.randint(1, rng.choice([8, 40, max_words]))))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class Round:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: list[float] = []
        self.probe: list[float] = []
        self.statuses: dict[str, int] = {}
        self.findings: list[str] = []
        self.big: dict[str, Any] = {}

    def note(self, status: int | str, seconds: float, probe: bool = False, detail: str = "") -> None:
        with self.lock:
            key = str(status)
            self.statuses[key] = self.statuses.get(key, 0) + 1
            if status == 200:
                (self.probe if probe else self.latency).append(seconds)
            elif not isinstance(status, int) or (status >= 500 and status != 503):
                self.findings.append(f"{status} {detail}"[:200])


def one_request(c: httpx.Client, rng: random.Random) -> httpx.Response:
    kind = rng.choice(["v1/embeddings", "v2/embed", "v1/rerank", "v2/rerank"])
    n = rng.randint(1, 64)
    if kind == "v1/embeddings":
        body: dict[str, Any] = {"input": [text(rng) for _ in range(n)], "truncate": True}
    elif kind == "v2/embed":
        body = {"texts": [text(rng) for _ in range(n)], "input_type": "search_document",
                "embedding_types": ["float"]}
    else:
        body = {"query": text(rng, 30), "documents": [text(rng) for _ in range(n)], "top_n": rng.randint(1, n)}
    return c.post("/" + kind, json=body)


def client_loop(url: str, until: float, rnd: Round, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=300) as c:
        while time.time() < until:
            t0 = time.perf_counter()
            try:
                r = one_request(c, rng)
            except httpx.HTTPError as exc:
                rnd.note(type(exc).__name__, time.perf_counter() - t0, detail="connection")
                continue
            detail = ""
            if r.status_code >= 400:
                try:
                    detail = str(r.json().get("detail", ""))[:120]
                except ValueError:
                    rnd.note("non-JSON", 0.0, detail=r.text[:120])
                    continue
            rnd.note(r.status_code, time.perf_counter() - t0, detail=detail)
            if r.status_code in (429, 503):
                time.sleep(min(5.0, float(r.headers.get("retry-after", "1"))))


def big_and_probe(url: str, rnd: Round, n: int, chars: int, seed: int, until: float) -> None:
    """One maximal request; a one-word probe every 0.25 s while it is in flight."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        t = text(rng, 2000)
        while len(t) < chars:
            t += " " + text(rng, 2000)
        texts.append(t[:chars])
    body = json.dumps({"input": texts, "truncate": True}).encode()
    done = threading.Event()

    def big() -> None:
        t0 = time.perf_counter()
        try:
            with httpx.Client(base_url=url, timeout=600) as c:
                r = c.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
            rnd.big = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 2)}
            if r.status_code >= 500 and r.status_code != 503:
                rnd.note(r.status_code, 0.0, detail="maximal request: " + r.text[:100])
        except httpx.HTTPError as exc:
            rnd.big = {"status": type(exc).__name__, "seconds": round(time.perf_counter() - t0, 2)}
            rnd.note(type(exc).__name__, 0.0, detail="maximal request")
        done.set()

    t = threading.Thread(target=big, daemon=True)
    t.start()
    with httpx.Client(base_url=url, timeout=300) as c:
        time.sleep(0.5)  # the maximal request is in
        while not done.is_set() and time.time() < until:
            t0 = time.perf_counter()
            try:
                r = c.post("/v1/embeddings", json={"input": word(rng)})
                rnd.note(r.status_code, time.perf_counter() - t0, probe=True)
            except httpx.HTTPError as exc:
                rnd.note(type(exc).__name__, time.perf_counter() - t0, probe=True, detail="probe")
            time.sleep(0.25)
    t.join(max(0.0, until - time.time()) + 600)


def plot(rounds: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rounds]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    a.plot(x, [r["rss_mb"] for r in rounds], "o-", color="tab:blue")
    a.set_ylabel("server RSS at round end (MB)")
    a.grid(alpha=0.3)
    a.set_title(title, fontsize=9)
    for key, label, style in (("p50_s", "mixed p50", "o-"), ("p99_s", "mixed p99", "s-"),
                              ("probe_p99_s", "one-word probe p99 (maximal request in flight)", "^-")):
        b.plot(x, [r[key] if r[key] is not None else float("nan") for r in rounds], style, label=label)
    b.set_ylabel("latency (s)")
    b.set_xlabel("round")
    b.set_yscale("log")
    b.grid(alpha=0.3, which="both")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--big-inputs", type=int, default=2000)
    p.add_argument("--big-chars", type=int, default=8192)
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--pid", type=int, default=None, help="the running server's process id (for its RSS)")
    p.add_argument("--max-growth-mb", type=float, default=50.0)
    p.add_argument("--probe-p99-s", type=float, default=2.0)
    p.add_argument("--out", default="soak.json")
    p.add_argument("--png", default="soak.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("server_args", nargs="*", help="after --: more `tamis serve` options")
    args = p.parse_args(argv)

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    proc = None
    log = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        port = free_port()
        log = open(Path(tempfile.gettempdir()) / f"tamis-soak-{port}.log", "w")
        server_args = ["--embedding-model", "default", "--reranker-model", "default", *args.server_args]
        print("server: python -m tamis.server --port", port, " ".join(server_args), flush=True)
        proc = start_server(port, server_args, log, timeout_s=600)
        url, pid = f"http://127.0.0.1:{port}", proc.pid
    rounds: list[dict[str, Any]] = []
    rss_ready = rss_mb(pid) if pid else None
    print(f"server RSS when ready: {rss_ready:.0f} MB" if rss_ready else "server RSS: unknown (no --pid)", flush=True)
    try:
        for k in range(1, args.rounds + 1):
            rnd = Round()
            until = time.time() + args.seconds
            threads = [threading.Thread(target=client_loop, args=(url, until, rnd, args.seed * 1000 + k * 100 + i))
                       for i in range(args.clients)]
            threads.append(threading.Thread(target=big_and_probe, args=(url, rnd, args.big_inputs, args.big_chars,
                                                                         args.seed * 1000 + k, until)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            row = {"round": k, "rss_mb": round(rss_mb(pid), 1) if pid else None,
                   "requests": len(rnd.latency), "p50_s": pct(rnd.latency, 50), "p99_s": pct(rnd.latency, 99),
                   "probe_requests": len(rnd.probe), "probe_p50_s": pct(rnd.probe, 50),
                   "probe_p99_s": pct(rnd.probe, 99), "statuses": rnd.statuses, "maximal": rnd.big,
                   "findings": rnd.findings[:10], "probe_all": rnd.probe}
            rounds.append(row)
            print(f"round {k:2d}: RSS {row['rss_mb']} MB, {row['requests']} requests p50 {fmt(row['p50_s'])} "
                  f"p99 {fmt(row['p99_s'])}; probe x{row['probe_requests']} p50 {fmt(row['probe_p50_s'])} "
                  f"p99 {fmt(row['probe_p99_s'])}; maximal {rnd.big}; statuses {rnd.statuses}"
                  + (f"; FINDINGS {rnd.findings[:3]}" if rnd.findings else ""), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
        if log is not None:
            log.close()

    base = rounds[min(2, len(rounds) - 1)]["rss_mb"]
    growth = None if base is None or rounds[-1]["rss_mb"] is None else round(rounds[-1]["rss_mb"] - base, 1)
    probes = [x for r in rounds for x in r.pop("probe_all")]
    findings = [f for r in rounds for f in r["findings"]]
    checks = {
        "rss_growth_after_round_3_mb": growth,
        "rss_ok": growth is not None and growth <= args.max_growth_mb,
        "probe_p99_s": pct(probes, 99),
        "probe_ok": bool(probes) and (pct(probes, 99) or 0) <= args.probe_p99_s,
        "unexpected_5xx_or_drops": len(findings),
        "no_findings_ok": not findings,
    }
    summary = {"rounds": rounds, "checks": checks, "rss_ready_mb": rss_ready, "args": vars(args),
               "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps(summary, indent=1))
    title = (f"tamis serve soak: {args.rounds} x {args.seconds:g} s, {args.clients} clients + one "
             f"{args.big_inputs} x {args.big_chars}-char request a round; RSS growth after round 3: {growth} MB")
    plot(rounds, Path(args.png), title)
    print(json.dumps(checks), flush=True)
    print(f"wrote {args.out} and {args.png}", flush=True)
    return 0 if checks["rss_ok"] and checks["probe_ok"] and checks["no_findings_ok"] else 1


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f} s"


if __name__ == "__main__":
    sys.exit(main())
