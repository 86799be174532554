"""What Spark and replicas behind a load balancer cost, side by side with one process in the same run.

    python benchmarks/scale_overheads.py [--docs 1000] [--rounds 3] [--requests 200] [--skip spark|replicas]

spark     ``tamis.scale.embed_dataframe`` (``mapInPandas`` on ``local[2]``, 2 partitions, one torch thread per
          Python worker) vs one ``Embedder.embed`` call on the first ``--docs`` SciFact documents (title + " " +
          text), interleaved rounds, medians, the throughput ratio and the minimum cosine between the two.
          The Spark session starts once, outside the timings (a job runs on a running cluster).
replicas  two ``tamis serve`` replicas (the bundled default model, one torch thread each) behind README's nginx
          block vs one replica (two threads) called directly:
          - latency: ``--requests`` sequential requests of one short query each, the two routes alternating;
            medians and the difference = what the balancer hop costs per request;
          - throughput: 8 concurrent clients sending 16 SciFact documents per request for ``--seconds``,
            through nginx to two replicas vs straight to one replica.
          Needs nginx on PATH (skipped with a reason otherwise).

Both parts measure overhead, not speed-up: on a 2-core machine two workers or two replicas share the same two
cores. Print the CPU model with every number; quote medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import numpy as np

from tamis.embed import TruncationWarning
from tamis.train.card import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import free_port, start_nginx, start_server, stop_server  # noqa: E402
from scale_ray import cosines, load_corpus  # noqa: E402

# ------------------------------------------------------------------------------------ spark


def spark_part(n_docs: int, rounds: int) -> bool:
    import pyspark
    from pyspark.sql import SparkSession

    import tamis.scale

    docs = load_corpus(n_docs)
    rows = [(d["_id"], d["title"], d["text"]) for d in docs]
    texts = [(d["title"] + " " + d["text"]) if d["title"] else d["text"] for d in docs]
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ.setdefault("PYTHONPATH", os.pathsep.join(sys.path))
    t = time.perf_counter()
    spark = (SparkSession.builder.master("local[2]").appName("tamis-overheads")
             .config("spark.ui.enabled", "false").config("spark.driver.memory", "2g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    print(f"spark: pyspark {pyspark.__version__}, local[2], session start {time.perf_counter() - t:.1f} s (not counted)")
    emb = tamis.Embedder(dtype="float32")

    def single() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            out = emb.embed(texts, show_progress=False)
        return time.perf_counter() - t0, out

    def on_spark() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        df = spark.createDataFrame(rows, "_id string, title string, text string").repartition(2)
        out = tamis.scale.embed_dataframe(df, text_column=["title", "text"], dtype="float32",
                                          num_threads=1).toPandas()
        elapsed = time.perf_counter() - t0
        by_id = dict(zip(out["_id"], out["embedding"]))
        return elapsed, np.stack([np.asarray(by_id[d["_id"]], dtype=np.float32) for d in docs])

    times: dict[str, list[float]] = {"single": [], "spark": []}
    ref = got = None
    for r in range(rounds):
        for side in (("single", "spark") if r % 2 == 0 else ("spark", "single")):
            s, vecs = single() if side == "single" else on_spark()
            times[side].append(s)
            if side == "single":
                ref = vecs
            else:
                got = vecs
            print(f"  round {r + 1}: {side:<6} {s:7.1f} s  {len(texts) / s:7.1f} docs/s", flush=True)
    spark.stop()
    assert ref is not None and got is not None
    cos = cosines(got, ref)
    s_med, k_med = statistics.median(times["single"]), statistics.median(times["spark"])
    print(f"spark: {len(texts)} documents; single process {len(texts) / s_med:.1f} docs/s, Spark local[2] "
          f"{len(texts) / k_med:.1f} docs/s (medians of {rounds}, end to end incl. DataFrame creation and "
          f"collection); ratio spark/single {s_med / k_med:.1%}; min cosine {cos.min():.7f}")
    return bool(cos.min() >= 0.99999)


# ------------------------------------------------------------------------------------ replicas


async def throughput(url: str, bodies: list[dict], clients: int, seconds: float) -> tuple[float, float]:
    """Requests per second and median latency (s) of ``clients`` concurrent loops over ``bodies``."""
    done: list[float] = []
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        async def loop(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/embeddings", json=bodies[k % len(bodies)])
                r.raise_for_status()
                done.append(time.perf_counter() - t0)
                k += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return len(done) / elapsed, statistics.median(done)


def replicas_part(n_requests: int, seconds: float) -> bool:
    if shutil.which("nginx") is None:
        print("replicas: skipped (nginx is not installed: apt-get install nginx)")
        return True
    docs = load_corpus(2000)
    bodies = [{"input": [(d["title"] + " " + d["text"]) for d in docs[i:i + 16]], "truncate": True}
              for i in range(0, len(docs), 16)]
    query = {"input": ["what do cats do when they are content"]}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ports = [free_port(), free_port()]
        os.environ["OMP_NUM_THREADS"] = "1"  # the replicas inherit it: one torch thread each, two cores in all
        try:
            procs = [start_server(p, ["--dtype", "float32"], open(tmp / f"replica{i}.log", "wb"))
                     for i, p in enumerate(ports)]
        finally:
            del os.environ["OMP_NUM_THREADS"]
        solo_port = free_port()
        solo = start_server(solo_port, ["--dtype", "float32"], open(tmp / "solo.log", "wb"))
        (tmp / "nginx").mkdir()
        lb_port = free_port()
        nginx = start_nginx(tmp / "nginx", ports, lb_port, connections=256)
        lb, direct = f"http://127.0.0.1:{lb_port}", f"http://127.0.0.1:{ports[0]}"
        try:
            with httpx.Client(timeout=120) as client:
                for url in (lb, direct, f"http://127.0.0.1:{solo_port}"):
                    for _ in range(5):  # warm-up: connections, first-request work
                        client.post(f"{url}/v1/embeddings", json=query).raise_for_status()
                a = client.post(f"{lb}/v1/embeddings", json=bodies[0]).json()["data"]
                b = client.post(f"{direct}/v1/embeddings", json=bodies[0]).json()["data"]
                same = all(x["embedding"] == y["embedding"] for x, y in zip(a, b))
                lat: dict[str, list[float]] = {"direct": [], "nginx": []}
                for i in range(2 * n_requests):
                    side = ("direct", "nginx")[i % 2]
                    t0 = time.perf_counter()
                    client.post(f"{direct if side == 'direct' else lb}/v1/embeddings", json=query).raise_for_status()
                    lat[side].append(time.perf_counter() - t0)
            d_ms, n_ms = (1000 * statistics.median(lat[k]) for k in ("direct", "nginx"))
            print(f"replicas: latency of a 1-query request, median of {n_requests} each (alternating): straight "
                  f"to a replica {d_ms:.2f} ms, through nginx {n_ms:.2f} ms -> the hop costs {n_ms - d_ms:+.2f} ms; "
                  f"same vectors through nginx: {same}")
            rows = {}
            for name, url in (("one replica (2 threads), direct", f"http://127.0.0.1:{solo_port}"),
                              ("two replicas (1 thread each) behind nginx", lb)):
                rps, med = asyncio.run(throughput(url, bodies, 8, seconds))
                rows[name] = rps
                print(f"replicas: 8 clients x 16 documents per request, {seconds:.0f} s: {name}: {rps:.2f} req/s "
                      f"({16 * rps:.1f} docs/s), median latency {med:.2f} s", flush=True)
            (r1, r2) = rows.values()
            print(f"replicas: throughput two-behind-nginx / one-direct = {r2 / r1:.1%} (same two cores)")
            return same
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(10)
            for p in (*procs, solo):
                stop_server(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000, help="SciFact documents for the Spark part (default 1000)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each Spark side, interleaved")
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per route (latency)")
    ap.add_argument("--seconds", type=float, default=30.0, help="duration of each throughput run")
    ap.add_argument("--skip", choices=["spark", "replicas"], action="append", default=[])
    args = ap.parse_args()
    import torch

    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); torch {torch.__version__}; model all-MiniLM-L6-v2 (float32)")
    ok = True
    if "spark" not in args.skip:
        ok = spark_part(args.docs, args.rounds) and ok
    if "replicas" not in args.skip:
        ok = replicas_part(args.requests, args.seconds) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
