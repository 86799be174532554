"""Ray Data embedding vs a single-process ``Embedder.embed`` on the same texts, side by side in one run.

SciFact's 5,183 documents (title + " " + text) with the default model (all-MiniLM-L6-v2):

- single: one process, ``Embedder.embed(texts)`` with the model already loaded (torch's default threads);
- ray: ``tamis.scale.embed_dataset`` on a local Ray cluster of ``--cpus`` CPUs with ``--workers`` actors
  (0.5 CPU each on 2 CPUs, one torch thread each), timed end to end from the in-memory rows to the
  vectors back on the driver: dataset, actor start, model load in every actor, mapping, collection.
  ``ray.init`` is timed apart (a cluster is started once, not per job).

The two sides alternate (single, ray, ray, single, ...) so a noisy neighbour hits both alike; the ratio
is of medians. Then, with ``--resume-check``, a ``tamis batch embed --ray`` job joins the same cluster, is
killed (SIGKILL) once two shards are written, and is started again: it must skip the finished shards,
leave them untouched and finish with the same vectors.

    python benchmarks/scale_ray.py [--limit N] [--rounds 3] [--workers 2] [--batch-size 256] [--resume-check]

A throughput measurement needs a quiet machine (nothing else on its cores); on a shared one hold the heavy-job
lock: ``flock /work/notes/heavy.lock nice -n 5 python benchmarks/scale_ray.py --resume-check``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import tamis
from tamis.embed import TruncationWarning
from tamis.scale import embed_dataset, plan_actors
from tamis.train.card import cpu_model

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def load_corpus(n: int | None) -> list[dict]:
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return docs[:n] if n else docs


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def run_single(emb: tamis.Embedder, texts: list[str]) -> tuple[float, np.ndarray, int]:
    """Seconds, vectors and the number of truncated texts (the mapper reports those per row, silently)."""
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        res = emb.embed_result(texts, show_progress=False)
    return time.perf_counter() - t, res.embeddings, len(res.truncated)


def run_ray(rows: list[dict], workers: int, batch_size: int) -> tuple[float, np.ndarray]:
    import pyarrow as pa
    import ray
    import ray.data

    t = time.perf_counter()
    blocks = max(workers, -(-len(rows) // batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    out = embed_dataset(ds, text_column=["title", "text"], num_workers=workers, batch_size=batch_size)
    table = pa.concat_tables(ray.get(out.to_arrow_refs()))
    elapsed = time.perf_counter() - t
    order = {rid: i for i, rid in enumerate(table.column("_id").to_pylist())}
    emb = table.column("embedding").combine_chunks()
    flat = emb.values.to_numpy().reshape(len(emb), -1)
    return elapsed, flat[[order[r["_id"]] for r in rows]]


def resume_check(address: str, workers: int, reference: np.ndarray, ids: list[str], n_docs: int | None) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as f, open(src, "w") as dst:
            for i, line in enumerate(f):
                if n_docs and i >= n_docs:
                    break
                dst.write(line)
        out = Path(tmp) / "vectors"
        shard = max(50, min(500, len(ids) // 6))  # 11 shards of the whole corpus, at least 6 of a slice
        cmd = [sys.executable, "-m", "tamis.scale.cli", "embed", str(src), str(out), "--text-column", "title",
               "--text-column", "text", "--shard-size", str(shard), "--batch-size", str(min(250, shard)), "--ray",
               "--ray-address", address, "--workers", str(workers)]
        log1 = Path(tmp) / "run1.log"
        with open(log1, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 1800
            while len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            if proc.poll() is not None:
                raise SystemExit(f"resume: the first run ended (status {proc.returncode}) before it could be "
                                 f"killed:\n{log1.read_text()[-3000:]}")
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-job, shards in flight are lost
            proc.wait()
        done = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
        total = -(-len(ids) // shard)
        print(f"resume: first run killed (SIGKILL) with {len(done)} of {total} shards written")
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"resumed run failed:\n{res.stderr[-3000:]}")
        summary = [line for line in res.stderr.splitlines() if "already done" in line]
        m = re.search(r"(\d+) already done, (\d+) to do", summary[0]) if summary else None
        print(f"resume: second run: {summary[0].removeprefix('tamis batch: ') if summary else '?'} "
              f"({time.perf_counter() - t:.1f} s)")
        untouched = all((out / name).stat().st_mtime_ns == ns for name, ns in done.items())
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        order = {rid: i for i, rid in enumerate(table.column("_id").to_pylist())}
        emb = table.column("embedding").combine_chunks()
        got = emb.values.to_numpy().reshape(len(emb), -1)[[order[i] for i in ids]]
        cos = cosines(got, reference)
        ok = m is not None and int(m.group(1)) == len(done) and untouched and len(order) == len(ids)
        print(f"resume: finished shards skipped: {m is not None and int(m.group(1)) == len(done)}, untouched: "
              f"{untouched}, rows {len(order)}/{len(ids)}, min cosine vs single {cos.min():.7f} -> "
              f"{'OK' if ok and cos.min() >= 0.99999 else 'FAILED'}")
        return ok and bool(cos.min() >= 0.99999)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", "--docs", dest="docs", type=int, default=None,
                    help="first N documents (default: all 5,183; a small N checks the script, it measures nothing)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each side, interleaved")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--workers", type=int, default=2, help="Ray actors")
    ap.add_argument("--batch-size", type=int, default=256, help="rows per actor call")
    ap.add_argument("--resume-check", action="store_true", help="kill a `tamis batch --ray` job and resume it")
    args = ap.parse_args()

    import ray
    import torch

    docs = load_corpus(args.docs)
    rows = [{"_id": d["_id"], "title": d["title"], "text": d["text"]} for d in docs]
    texts = [(d["title"] + " " + d["text"]) if d["title"] else d["text"] for d in docs]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads in the single process; ray {ray.__version__}")
    print(f"data: SciFact corpus, {len(texts)} documents (title + ' ' + text), model all-MiniLM-L6-v2 (float32)")

    emb = tamis.Embedder()
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray.init(num_cpus={args.cpus}): {time.perf_counter() - t:.1f} s (once per cluster, not counted)")
    plan = plan_actors(args.cpus, 0, args.workers)
    print(f"ray: {plan.workers} actors x {plan.num_cpus} CPU, {plan.num_threads} torch thread(s) each, "
          f"batches of {args.batch_size}")

    single_s, ray_s = [], []
    ref = got = None
    for r in range(args.rounds):
        order = ("single", "ray") if r % 2 == 0 else ("ray", "single")
        for side in order:
            if side == "single":
                s, ref, n_truncated = run_single(emb, texts)
                single_s.append(s)
                if r == 0:
                    print(f"  ({n_truncated} of {len(texts)} documents are longer than the model's "
                          f"{emb.max_length} tokens and are cut, alike on both sides)")
            else:
                s, got = run_ray(rows, args.workers, args.batch_size)
                ray_s.append(s)
            print(f"  round {r + 1}: {side:<6} {s:7.1f} s  {len(texts) / s:7.1f} docs/s", flush=True)
    assert ref is not None and got is not None
    cos = cosines(got, ref)
    s_med, r_med = statistics.median(single_s), statistics.median(ray_s)
    print(f"single-process Embedder.embed: {len(texts) / s_med:.1f} docs/s (median of {len(single_s)})")
    print(f"Ray Data, {args.workers} workers:    {len(texts) / r_med:.1f} docs/s (median of {len(ray_s)}, end to end)")
    print(f"throughput ratio ray/single: {s_med / r_med:.1%} (target >= 80%)")
    print(f"min cosine ray vs single: {cos.min():.7f} (target >= 0.99999); max abs diff {np.abs(got - ref).max():.2e}")
    ok = bool(cos.min() >= 0.99999)
    if args.resume_check:
        ok = resume_check(ray.get_runtime_context().gcs_address, args.workers, ref, [d["_id"] for d in docs],
                          args.docs) and ok
    ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
