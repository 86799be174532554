"""Schema fuzzing of ``tamis serve`` on localhost with schemathesis: no 5xx, and the server stays up.

    python benchmarks/fuzz_server.py [--examples 300] [--reranker default] [--embedding-model default ...]

Starts ``python -m tamis.server`` on a free 127.0.0.1 port with real models (default: all-MiniLM-L6-v2 and
the default reranker; add fixture models with ``--embedding-model`` / ``--reranker-model``), loads its
OpenAPI schema, and for every operation draws ``--examples`` positive cases (schema-valid bodies; in
three of four the random ``model`` - and in some ``task``, ``dimensions``, ``truncate`` - are removed
so that most cases reach the model rather than "unknown model") and
as many negative ones (schema-violating bodies) for POST routes; then a list of hand-written nasty bodies
(invalid UTF-8, lone surrogates, NaN, deep nesting, oversize, too many inputs, wrong content types).
Every answer must be < 500 and every error body must carry ``detail``. Exit 0 when so and the server
is still healthy; only 127.0.0.1 is contacted; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from local_server import free_port, start_server, stop_server

REASONS: Counter[tuple[str, int, str]] = Counter()


def make_check(op: Any, mode: Any, bar: Any, statuses: Counter, failures: list[str]) -> Any:
    from schemathesis import GenerationMode

    counter = {"i": 0}

    def check(case: Any) -> None:
        counter["i"] += 1
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
            # random names and values mostly hit "unknown model / task" and range checks; clear some of
            # them so that most cases reach the tokenizer and the model
            drop = {0: (), 1: ("model",), 2: ("model", "task"),
                    3: ("model", "task", "dimensions", "return_multivector", "truncate")}[counter["i"] % 4]
            for key in drop:
                case.body.pop(key, None)
        try:
            r = case.call(timeout=120)
        except Exception as exc:  # connection refused / reset = the server fell over
            failures.append(f"{op.method} {op.path}: {type(exc).__name__}: {exc} body={case.body!r:.300}")
            return
        finally:
            bar.update(1)
        statuses[(op.method.upper(), op.path, r.status_code)] += 1
        if r.status_code >= 500:
            failures.append(f"{op.method} {op.path} -> {r.status_code} {r.text[:300]} body={case.body!r:.300}")
        elif r.status_code >= 400:
            try:
                detail = r.json()["detail"]
                REASONS[(op.path, r.status_code, re.sub(r"[0-9'\"].*", "", str(detail))[:48])] += 1
            except Exception:
                failures.append(f"{op.method} {op.path} -> {r.status_code} without detail: {r.text[:200]}")

    return check


def nasty_cases(emb_name: str) -> list[tuple[str, bytes, dict[str, str]]]:
    j = {"content-type": "application/json"}
    big_list = json.dumps({"input": ["x"] * 300}).encode()
    deep = ("[" * 5000 + "]" * 5000).encode()
    return [
        ("/v1/embeddings", b'{"input": "caf\xe9"}', j),
        ("/v1/embeddings", b'{"input": "\\ud800\\udc00\\udfff"}', j),
        ("/v1/embeddings", b'{"input": ["a"], "dimensions": NaN}', j),
        ("/v1/embeddings", b'{"input": ["a"], "dimensions": 1e400}', j),
        ("/v1/embeddings", b'{"input": ["a"], "dimensions": 99999999999999999999999}', j),
        ("/v1/embeddings", b'{"input": "\\u0000\\u0000"}', j),
        ("/v1/embeddings", b'{"input": ["   "]}', j),
        ("/v1/embeddings", json.dumps({"input": ["\U0001f600" * 3000], "truncate": True}).encode(), j),
        ("/v1/embeddings", json.dumps({"input": ["word " * 5000], "late_chunking": True}).encode(), j),
        ("/v1/embeddings", json.dumps({"input": ["", "a"], "late_chunking": True}).encode(), j),
        ("/v1/embeddings", json.dumps({"input": [" ", "a"], "late_chunking": True}).encode(), j),
        ("/v1/embeddings", json.dumps({"input": "x", "embedding_type": []}).encode(), j),
        ("/v1/embeddings", json.dumps({"input": "x", "model": emb_name, "task": "\ud800"}).encode(), j),
        ("/v1/embeddings", big_list, j),
        ("/v1/embeddings", deep, j),
        ("/v1/embeddings", b"", j),
        ("/v1/embeddings", b"null", j),
        ("/v1/embeddings", b"input=x", {"content-type": "application/x-www-form-urlencoded"}),
        ("/v1/embeddings", b'{"input": "x"}', {"content-type": "text/plain"}),
        ("/v1/embeddings", b"\x00" * 100, j),
        ("/v1/embeddings", b"{" * 100000, j),
        ("/v1/rerank", json.dumps({"query": "q", "documents": ["d"] * 300}).encode(), j),
        ("/v1/rerank", json.dumps({"query": "q", "documents": ["word " * 5000], "top_n": 10**30}).encode(), j),
        ("/v1/rerank", json.dumps({"query": "q " * 5000, "documents": ["d", ""]}).encode(), j),
        ("/v2/rerank", json.dumps({"query": {"text": "q"}, "documents": [{"text": "d", "x": [1]}]}).encode(), j),
        ("/v2/rerank", b'{"query": "q", "documents": ["\\udfff"]}', j),
        ("/v1/models", b"", {}),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=300, help="positive and negative cases per operation")
    ap.add_argument("--embedding-model", action="append", default=None)
    ap.add_argument("--reranker-model", action="append", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis import GenerationMode

    emb = args.embedding_model or ["default"]
    rr = args.reranker_model or ["default"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tamis-fuzz-server-{port}.log"
    statuses: Counter[tuple[str, str, int]] = Counter()
    failures: list[str] = []
    with open(log_path, "w") as log:
        server_args = ["--max-inputs", "256"]
        for m in emb:
            server_args += ["--embedding-model", m]
        for m in rr:
            server_args += ["--reranker-model", m]
        proc = start_server(port, server_args, log)
        try:
            models = httpx.get(url + "/v1/models").json()["data"]
            emb_names = [m["id"] for m in models if m["type"] == "embedding"]
            schema = schemathesis.openapi.from_url(url + "/openapi.json")
            t0 = time.time()
            for result in schema.get_all_operations():
                op = result.ok()
                modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
                for mode in modes:
                    n = args.examples if op.method.upper() == "POST" else 5
                    bar = tqdm(total=n, desc=f"{op.method.upper()} {op.path} {mode.value}", leave=True)
                    check = make_check(op, mode, bar, statuses, failures)
                    seed(args.seed)(given(case=op.as_strategy(generation_mode=mode))(settings(
                        max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                        suppress_health_check=list(HealthCheck))(check)))()
                    bar.close()
            fuzz_s = time.time() - t0
            for path, body, headers in nasty_cases(emb_names[0] if emb_names else "default"):
                try:
                    method = "GET" if path == "/v1/models" else "POST"
                    r = httpx.request(method, url + path, content=body, headers=headers, timeout=120)
                except httpx.HTTPError as exc:
                    failures.append(f"nasty {path} {body[:80]!r}: {type(exc).__name__}: {exc}")
                    continue
                statuses[("NASTY", path, r.status_code)] += 1
                ok_detail = r.status_code < 400 or "detail" in r.json()
                if r.status_code >= 500 or not ok_detail:
                    failures.append(f"nasty {path} {body[:80]!r} -> {r.status_code} {r.text[:300]}")
            health = httpx.get(url + "/health").status_code
            alive = proc.poll() is None
        finally:
            stop_server(proc)

    total = sum(statuses.values())
    print(f"\n{total} requests ({fuzz_s:.0f} s of schema fuzzing), server alive: {alive}, /health after: {health}")
    by_route: dict[str, Counter[int]] = {}
    for (m, p, s), c in sorted(statuses.items()):
        by_route.setdefault(f"{m} {p}", Counter())[s] += c
    for route, c in by_route.items():
        print(f"  {route:28s} {dict(sorted(c.items()))}")
    print("most frequent error messages (route, status, message start):")
    for (route, status, msg), c in REASONS.most_common(8):
        print(f"  {c:5d}  {route} {status} {msg}")
    print(f"failures: {len(failures)}")
    for f in failures[:10]:
        print("  " + f)
    if args.json:
        Path(args.json).write_text(json.dumps({"statuses": {f"{m} {p} {s}": c for (m, p, s), c in statuses.items()},
                                               "failures": failures}, indent=2))
    return 0 if not failures and alive and health == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
