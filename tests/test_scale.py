"""Scale-out: the engine-agnostic batch mappers, the resumable `tamis batch` job, and the real engines
(a local Ray cluster, a local Spark session) giving the same vectors and scores as Embedder / Reranker.

Texts are SciFact queries and the starts of SciFact abstracts; models are the tiny fixtures.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import tamis
from tamis.errors import InvalidInputError
from tamis.scale import EmbedBatch, RerankBatch, plan_actors, run_job
from tamis.scale.cli import main
from tamis.scale.job import JobMismatchError

pa = pytest.importorskip("pyarrow", reason="pyarrow is needed for the batch tests (pip install 'tamis[batch]')")
pd = pytest.importorskip("pandas", reason="pandas is needed for the batch tests")
import pyarrow.parquet as pq  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIX = SHARED / "fixtures"
V2 = str(FIX / "jina-embeddings-v2-tiny")
V3 = str(FIX / "jina-embeddings-v3-tiny")
CE = str(FIX / "jina-reranker-v1-tiny-like")
SCIFACT = SHARED / "data" / "scifact"

pytestmark = [pytest.mark.skipif(not SHARED.is_dir(), reason=f"../shared not found at {SHARED}"),
              pytest.mark.timeout(600),
              # Ray Data's own DataContext warns about its own deprecated fields; nothing tamis sets
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]


@pytest.fixture(scope="module")
def queries() -> list[dict]:
    with gzip.open(SCIFACT / "queries.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f][:300]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    out = []
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append({"_id": d["_id"], "title": d["title"], "text": d["text"][:200]})
            if len(out) == 60:
                break
    return out


@pytest.fixture(scope="module")
def v2() -> tamis.Embedder:
    # float32 in every comparison of this file: mappers batch rows otherwise than the library call (and run in
    # other processes), and bf16 (what dtype="auto" picks on a CPU with native bf16) does not hold 1e-6 across
    # batchings
    return tamis.Embedder(V2, dtype="float32")


def _vectors(column) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray | pa.Array):
        column = column.to_pylist()
    return np.stack([np.asarray(v, dtype=np.float32) for v in column])


BAD = [None, "", "   ", 42, b"bytes", float("nan")]


def _mixed(queries: list[dict]) -> tuple[list, list[int]]:
    """Query texts with a bad value after every fifth; returns (texts, positions of the good ones)."""
    texts, good = [], []
    for i, q in enumerate(queries[:40]):
        good.append(len(texts))
        texts.append(q["text"])
        if i % 5 == 0:
            texts.append(BAD[(i // 5) % len(BAD)])
    return texts, good


# ---------------------------------------------------------------------------- the mapper, no engine
@pytest.mark.parametrize("kind", ["pandas", "arrow", "dict"])
def test_embed_mapper_matches_embedder_and_flags_bad_rows(kind, queries, v2):
    texts, good = _mixed(queries)
    ids = [f"id{i}" for i in range(len(texts))]
    ref = v2.embed([texts[i] for i in good])
    if kind == "pandas":
        batch = pd.DataFrame({"id": ids, "text": pd.Series(texts, dtype=object), "lang": "en"})
    elif kind == "arrow":  # arrow columns are typed: a non-string value can only come as null
        batch = pa.table({"id": ids, "text": [t if isinstance(t, str) else None for t in texts], "lang": ["en"] * len(ids)})
    else:
        batch = {"id": np.array(ids), "text": np.array(texts, dtype=object), "lang": np.array(["en"] * len(ids))}
    out = EmbedBatch(V2, dtype="float32")(batch)
    if kind == "pandas":
        assert list(out.columns) == ["id", "lang", "embedding", "n_tokens", "truncated", "error"]
        errors = [None if pd.isna(e) else e for e in out["error"]]
        vecs = _vectors([out["embedding"][i] for i in good])
        assert all(out["embedding"][i] is None for i in range(len(texts)) if i not in good)
        out_ids = list(out["id"])
    elif kind == "arrow":
        assert out.column_names == ["id", "lang", "embedding", "n_tokens", "truncated", "error"]
        assert out.schema.field("embedding").type == pa.list_(pa.float32(), v2.dimension)
        errors = out.column("error").to_pylist()
        vecs = _vectors(out.column("embedding").take(good))
        assert out.column("embedding").null_count == len(texts) - len(good)
        out_ids = out.column("id").to_pylist()
    else:
        assert out["embedding"].shape == (len(texts), v2.dimension)
        errors = list(out["error"])
        vecs = out["embedding"][good]
        assert np.isnan(np.delete(out["embedding"], good, axis=0)).all()
        out_ids = list(out["id"])
    assert out_ids == ids
    np.testing.assert_allclose(vecs, ref, atol=1e-6)
    for i, e in enumerate(errors):
        assert (e is None) == (i in good), (i, texts[i], e)
    reasons = " | ".join(e for e in errors if e)
    assert "text is null" in reasons and "text is empty" in reasons
    if kind != "arrow":
        assert "text is a int, expected a string" in reasons and "bytes" in reasons


def test_embed_mapper_skip_mode_types_dimensions_task_and_truncation(queries):
    v3 = tamis.Embedder(V3, dtype="float32")
    long = " ".join(q["text"] for q in queries[:10])  # far beyond the tiny model's 48 tokens
    texts = ["cats purr", long, None, "why dogs bark"]  # the short ones fit with the task prefix
    table = pa.table({"qid": [1, 2, 3, 4], "text": texts})
    m = EmbedBatch(V3, task="retrieval.query", dimensions=16, embedding_type=["float", "ubinary", "base64"],
                   bad_rows="skip", dtype="float32")
    out = m(table)
    assert out.column_names == ["qid", "embedding_float", "embedding_ubinary", "embedding_base64", "n_tokens", "truncated"]
    assert out.column("qid").to_pylist() == [1, 2, 4]
    good = [texts[0], long, texts[3]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = v3.embed(good, task="retrieval.query", dimensions=16, embedding_type=["float", "ubinary", "base64"])
    np.testing.assert_allclose(_vectors(out.column("embedding_float")), ref["float"], atol=1e-6)
    assert np.array_equal(np.stack(out.column("embedding_ubinary").to_pylist()).astype(np.uint8), ref["ubinary"])
    assert out.column("embedding_base64").to_pylist() == list(ref["base64"])
    assert out.column("truncated").to_pylist() == [False, True, False]
    assert out.column("n_tokens").to_pylist()[1] == v3.max_length

    strict = EmbedBatch(V3, truncate=False, dtype="float32")(table)  # too long -> flagged, not a failed batch
    err = strict.column("error").to_pylist()
    assert err[0] is None and "more than the model's limit of 48" in err[1] and err[2] == "text is null"
    assert strict.column("embedding").null_count == 2


def test_embed_mapper_joined_columns_pickles_small_and_checks(docs, v2):
    rows = pd.DataFrame(docs[:5])
    rows.loc[1, "title"] = None
    rows.loc[2, "title"] = ""
    rows.loc[3, ["title", "text"]] = [None, None]
    m = EmbedBatch(V2, text_column=["title", "text"], dtype="float32")
    before = len(pickle.dumps(m))
    out = m(rows)
    assert len(pickle.dumps(m)) == before < 2000  # the loaded model never travels
    expected = [docs[0]["title"] + " " + docs[0]["text"], docs[1]["text"], docs[2]["text"],
                docs[4]["title"] + " " + docs[4]["text"]]
    np.testing.assert_allclose(_vectors(out["embedding"][[0, 1, 2, 4]]), v2.embed(expected), atol=1e-6)
    assert out["error"][3] == "title and text are all null or empty"
    assert list(out.columns) == ["_id", "embedding", "n_tokens", "truncated", "error"]
    assert list(m(rows[["_id", "title", "text"]].iloc[:0])["_id"]) == []  # an empty batch is fine

    with pytest.raises(InvalidInputError, match="no column 'body'"):
        EmbedBatch(V2, text_column="body")(rows)
    with pytest.raises(InvalidInputError, match="names of output columns"):
        EmbedBatch(V2)(pd.DataFrame({"text": ["a"], "embedding": [1]}))
    with pytest.raises(InvalidInputError, match="keep_columns"):
        EmbedBatch(V2, keep_columns=["nope"])(rows.rename(columns={"title": "t"}))
    with pytest.raises(InvalidInputError, match="embedding_type"):
        EmbedBatch(V2, embedding_type="int4")
    with pytest.raises(InvalidInputError, match="bad_rows"):
        EmbedBatch(V2, bad_rows="ignore")


def test_rerank_mapper_matches_reranker(queries, docs):
    rr = tamis.Reranker(CE, dtype="float32")
    rows = []
    for q in queries[:4]:
        for d in docs[:6]:
            rows.append({"qid": q["_id"], "did": d["_id"], "query": q["text"], "document": d["text"]})
    rows.append({"qid": "x", "did": "y", "query": "", "document": "text"})
    rows.append({"qid": "x", "did": "z", "query": "q", "document": None})
    out = RerankBatch(CE, dtype="float32")(pa.Table.from_pylist(rows))
    assert out.column_names == ["qid", "did", "score", "truncated", "error"]
    scores = out.column("score").to_pylist()
    for q in queries[:4]:
        res = rr.rerank(q["text"], [d["text"] for d in docs[:6]])
        for r in res:
            i = [k for k, row in enumerate(rows) if row["qid"] == q["_id"]][r.index]
            assert scores[i] == pytest.approx(r.relevance_score, abs=1e-6)
    assert out.column("error").to_pylist()[-2:] == ["query is empty", "document is null"]
    assert scores[-2:] == [None, None]


# ---------------------------------------------------------------------------- the resumable job, no engine
def _write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines)


def test_batch_job_jsonl_shards_resume_and_mismatch(tmp_path, queries, v2, capsys):
    rows = [{"_id": q["_id"], "text": q["text"], "meta": {"n": i}} for i, q in enumerate(queries[:230])]
    rows[7]["text"] = 3.5  # non-text, flagged by the reader
    src = tmp_path / "q.jsonl"
    _write_jsonl(src, rows)
    with open(src, "a") as f:
        f.write("\n{not json}\n")
    out = tmp_path / "out"
    assert main(["embed", str(src), str(out), "--model", V2, "--dtype", "float32", "--shard-size", "100", "--batch-size", "32"]) == 0
    err = capsys.readouterr().err
    assert "3 shards (231 rows)" in err and "2 bad rows" in err
    names = sorted(p.name for p in out.glob("part-*.parquet"))
    assert names == ["part-00000-00000.parquet", "part-00000-00001.parquet", "part-00000-00002.parquet"]
    table = pq.read_table(out)
    assert table.column_names == ["_id", "meta", "embedding", "n_tokens", "truncated", "error"]
    assert table.column("_id").to_pylist() == [r["_id"] for r in rows] + [None]
    assert table.column("meta").to_pylist()[:2] == ['{"n": 0}', '{"n": 1}']
    errors = table.column("error").to_pylist()
    assert errors[7] == "text is a float, expected a string"
    assert errors[230].startswith("line 232 is not valid JSON")
    good = [i for i in range(230) if i != 7]
    np.testing.assert_allclose(_vectors(table.column("embedding").take(good)),
                               v2.embed([rows[i]["text"] for i in good]), atol=1e-6)

    # resume: only the missing shard is computed; finished shards are not touched
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    (out / "part-00000-00001.parquet").unlink()
    (out / ".part-00000-00001.parquet.tmp-999").write_bytes(b"half a file from a killed run")
    report = run_job(src, out, EmbedBatch(V2, dtype="float32"), shard_size=100, batch_size=32, progress=False)
    assert (report.skipped, report.written, report.rows) == (2, 1, 100)
    assert not list(out.glob(".part-*"))
    for name in ("part-00000-00000.parquet", "part-00000-00002.parquet"):
        assert (out / name).stat().st_mtime_ns == mtimes[name]
    assert pq.read_table(out).equals(table)

    with pytest.raises(JobMismatchError, match="dimensions"):
        run_job(src, out, EmbedBatch(V2, dimensions=8, dtype="float32"), shard_size=100, progress=False)
    assert main(["embed", str(src), str(out), "--model", V2, "--dtype", "float32", "--shard-size", "50", "-q"]) == 2
    assert "holds shards of another job" in capsys.readouterr().err


def test_batch_job_parquet_dir_gz_skip_and_rerank(tmp_path, queries, docs, v2):
    data = tmp_path / "in"
    data.mkdir()
    part1 = [{"id": i, "text": q["text"]} for i, q in enumerate(queries[:70])]
    part2 = [{"id": 70 + i, "text": q["text"]} for i, q in enumerate(queries[70:120])]
    part2[3]["text"] = ""
    pq.write_table(pa.Table.from_pylist(part1), data / "a.parquet", row_group_size=16)
    pq.write_table(pa.Table.from_pylist(part2), data / "b.parquet", row_group_size=7)
    out = tmp_path / "out"
    rep = run_job(data, out, EmbedBatch(V2, bad_rows="skip", dtype="float32"), shard_size=30, batch_size=8, progress=False)
    assert (rep.shards, rep.written, rep.bad_rows) == (3 + 2, 5, 1)
    table = pq.read_table(out)
    assert "error" not in table.column_names
    kept = [r for r in part1 + part2 if r["text"]]
    assert table.column("id").to_pylist() == [r["id"] for r in kept]
    np.testing.assert_allclose(_vectors(table.column("embedding")), v2.embed([r["text"] for r in kept]), atol=1e-6)

    pairs = [{"qid": q["_id"], "did": d["_id"], "query": q["text"], "document": d["text"]}
             for q in queries[:3] for d in docs[:5]]
    _write_jsonl(tmp_path / "pairs.jsonl.gz", pairs, gz=True)
    rout = tmp_path / "scores"
    assert main(["rerank", str(tmp_path / "pairs.jsonl.gz"), str(rout), "--model", CE, "--dtype", "float32", "-q"]) == 0
    scores = pq.read_table(rout)
    assert scores.column_names == ["qid", "did", "score", "truncated", "error"]
    assert not (rout / "_tamis_input").exists()  # the decompressed copy is removed once the job is done
    rr = tamis.Reranker(CE, dtype="float32")
    ref = rr.rerank(queries[0]["text"], [d["text"] for d in docs[:5]])
    got = scores.column("score").to_pylist()[:5]
    for r in ref:
        assert got[r.index] == pytest.approx(r.relevance_score, abs=1e-6)


def test_batch_cli_errors(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "missing.jsonl"), str(tmp_path / "o"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b\n")
    assert main(["embed", str(tmp_path / "x.csv"), str(tmp_path / "o"), "-q"]) == 2
    assert "not a .parquet or .jsonl" in capsys.readouterr().err
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    assert main(["embed", str(tmp_path / "t.parquet"), str(tmp_path / "o"), "-q"]) == 2
    assert "has no column 'text'" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "t.parquet"), str(tmp_path / "o"), "--workers", "2", "-q"]) == 2
    assert "--workers and --ray-address need --ray" in capsys.readouterr().err


def test_batch_cli_compile_reaches_the_workers_models(tmp_path, monkeypatch):
    import tamis.scale.job as job

    seen = []

    def fake_run_job(source, output, mapper, **kw):
        seen.append(mapper.model_kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(job, "run_job", fake_run_job)
    pq.write_table(pa.table({"text": ["x"], "query": ["q"], "document": ["d"]}), tmp_path / "t.parquet")
    for command, choice, kwargs in (("embed", "off", {"compile": False}), ("rerank", "on", {"compile": True}),
                                    ("embed", "auto", {})):
        with pytest.raises(SystemExit):
            main([command, str(tmp_path / "t.parquet"), str(tmp_path / "o"), "--compile", choice, "-q"])
        assert seen.pop() == kwargs


def test_batch_command_imports_nothing_heavy():
    # `tamis --help` and argument errors must not wait for an engine: the module registered for `tamis batch`
    # imports argparse-level code only (measured against what `import tamis` already loaded)
    code = ("import sys, tamis; before = set(sys.modules); import tamis.scale.cli; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} & "
            "{'ray', 'pyspark', 'torch', 'pyarrow', 'pandas', 'tokenizers'}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_batch_command_is_registered_in_the_tamis_cli():
    from tamis import cli

    table = getattr(cli, "PACKAGE_COMMANDS", None)
    if table is None:
        pytest.skip("tamis.cli has no PACKAGE_COMMANDS table on this branch (issue 12): `batch` is added there at merge")
    assert table.get("batch", ("",))[0] == "tamis.scale.cli"


def _env() -> dict[str, str]:
    """This environment, with the imported tamis first on the path of a child python."""
    src = str(Path(tamis.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


# a job that SIGKILLs itself once `kill_after` shards are written: the kill lands at a known point of the job
KILLED_JOB = """
import os, signal, sys
from tamis.scale import EmbedBatch, run_job
src, out, model, ray_address, kill_after = sys.argv[1:6]
done = []
def on_shard(shard, path):
    done.append(shard.name)
    if len(done) == int(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)
run_job(src, out, EmbedBatch(model, dtype="float32"), shard_size=100, batch_size=40, use_ray=ray_address != "-",
        ray_address=None if ray_address == "-" else ray_address, num_workers=2, progress=False, on_shard=on_shard)
raise SystemExit("the job finished: it was never killed")
"""


def _killed_job(src: Path, out: Path, kill_after: int, ray_address: str = "-") -> dict[str, int]:
    """Run a job in a child process that is SIGKILLed mid-job; the finished shards and their mtimes."""
    res = subprocess.run([sys.executable, "-c", KILLED_JOB, str(src), str(out), V2, ray_address, str(kill_after)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == -9, (res.returncode, res.stderr[-3000:])
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


def test_killed_job_resumes_from_finished_shards(tmp_path, queries, v2, capsys):
    src = tmp_path / "q.jsonl"
    _write_jsonl(src, [{"_id": q["_id"], "text": q["text"]} for q in queries])
    out = tmp_path / "out"
    done = _killed_job(src, out, kill_after=2)
    assert sorted(done) == ["part-00000-00000.parquet", "part-00000-00001.parquet"]
    assert main(["embed", str(src), str(out), "--model", V2, "--dtype", "float32", "--shard-size", "100", "--batch-size", "40"]) == 0
    assert "2 already done, 1 to do (100 rows)" in capsys.readouterr().err
    assert {name: (out / name).stat().st_mtime_ns for name in done} == done  # finished shards untouched
    table = pq.read_table(out)
    assert table.column("_id").to_pylist() == [q["_id"] for q in queries]
    np.testing.assert_allclose(_vectors(table.column("embedding")), v2.embed([q["text"] for q in queries]), atol=1e-6)


def test_actor_plan_never_takes_the_last_cpu():
    p = plan_actors(2)
    assert (p.workers, p.num_cpus, p.num_threads) == (2, 0.5, 1)
    assert plan_actors(2, num_workers=1).num_cpus == 1.0
    p = plan_actors(16, num_workers=4)
    assert p.num_cpus * p.workers <= 15 and p.num_threads == 4
    p = plan_actors(8, 2, device="cuda")
    assert (p.workers, p.num_gpus, p.num_cpus) == (2, 1.0, 1.0)
    assert plan_actors(8, 1, num_workers=4, device="cuda").num_gpus == 0.25
    with pytest.warns(RuntimeWarning, match="stall"):
        plan_actors(2, num_workers=2, num_cpus=1)
    with pytest.raises(InvalidInputError, match="no GPU"):
        plan_actors(4, 0, device="cuda")


# ---------------------------------------------------------------------------- a real local Ray cluster
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tamis[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'tamis[ray]')")
    # 0.5 CPU per actor (plan_actors): 2 actors x 1 CPU on 2 CPUs would starve Ray Data's read tasks
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:
            # Ray gives its raylet a fixed 30 s to register; on two cores busy with other work it can miss
            # that once. Start again once; a second failure is a real one.
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_ray_embed_and_rerank_dataset_equal_the_library(ray_cluster, queries, docs, v2):
    import ray.data

    texts = [q["text"] for q in queries]
    rows = [{"id": q["_id"], "text": q["text"]} for q in queries] + [{"id": "bad", "text": ""}]
    ds = tamis.scale.embed_dataset(ray.data.from_items(rows, override_num_blocks=6), V2, batch_size=64, dtype="float32")
    out = ds.to_arrow_refs()
    table = pa.concat_tables(ray_cluster.get(out))
    by_id = dict(zip(table.column("id").to_pylist(), range(table.num_rows)))
    assert sorted(by_id) == sorted(r["id"] for r in rows)
    order = [by_id[q["_id"]] for q in queries]
    np.testing.assert_allclose(_vectors(table.column("embedding").take(order)), v2.embed(texts), atol=1e-6)
    assert table.column("error").to_pylist()[by_id["bad"]] == "text is empty"

    pairs = [{"qid": q["_id"], "did": d["_id"], "query": q["text"], "document": d["text"]}
             for q in queries[:5] for d in docs[:8]]
    scored = tamis.scale.rerank_dataset(ray.data.from_items(pairs), CE, batch_size=40, dtype="float32").to_pandas()
    rr = tamis.Reranker(CE, dtype="float32")
    for q in queries[:5]:
        ref = rr.rerank(q["text"], [d["text"] for d in docs[:8]])
        got = scored[scored.qid == q["_id"]].set_index("did")["score"]
        for r in ref:
            assert got[docs[r.index]["_id"]] == pytest.approx(r.relevance_score, abs=1e-6)


def test_ray_batch_job_killed_then_resumed(ray_cluster, tmp_path, queries, v2, capsys):
    # the first driver joins the test's cluster and is SIGKILLed after its first shard; its actors die with
    # it. The rerun (`tamis batch embed --ray`) computes the two missing shards only.
    src = tmp_path / "q.jsonl"
    _write_jsonl(src, [{"_id": q["_id"], "text": q["text"]} for q in queries])
    out = tmp_path / "out"
    done = _killed_job(src, out, kill_after=1, ray_address=ray_cluster.get_runtime_context().gcs_address)
    assert len(done) == 1
    args = ["embed", str(src), str(out), "--model", V2, "--dtype", "float32", "--shard-size", "100", "--batch-size", "40",
            "--ray"]
    assert main(args) == 0
    assert "1 already done, 2 to do (200 rows) on Ray" in capsys.readouterr().err
    assert {name: (out / name).stat().st_mtime_ns for name in done} == done
    table = pq.read_table(out)
    assert table.column("_id").to_pylist() == [q["_id"] for q in queries]
    np.testing.assert_allclose(_vectors(table.column("embedding")), v2.embed([q["text"] for q in queries]), atol=1e-6)


# ---------------------------------------------------------------------------- a local Spark session
def _java() -> str | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return java


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install 'tamis[spark]')")
    if _java() is None:
        pytest.skip("no working Java on PATH: Spark needs a JRE (17+ for pyspark 4), e.g. apt-get install openjdk-17-jre")
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable  # workers must run this environment's python
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ.setdefault("PYTHONPATH", os.pathsep.join(sys.path))
    session = (SparkSession.builder.master("local[2]").appName("tamis-test")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.memory", "1g").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_embed_and_rerank_dataframe_equal_the_library(spark, queries, docs, v2):
    rows = [(q["_id"], q["text"]) for q in queries[:200]] + [("bad", None)]
    df = spark.createDataFrame(rows, "id string, text string").repartition(2)
    out = tamis.scale.embed_dataframe(df, V2, embedding_type=["float", "ubinary"], dtype="float32").toPandas().set_index("id")
    assert list(out.columns) == ["embedding_float", "embedding_ubinary", "n_tokens", "truncated", "error"]
    texts = [q["text"] for q in queries[:200]]
    ref = v2.embed(texts, embedding_type=["float", "ubinary"])
    got = np.stack([np.asarray(out.loc[q["_id"], "embedding_float"], dtype=np.float32) for q in queries[:200]])
    np.testing.assert_allclose(got, ref["float"], atol=1e-6)
    bits = np.stack([np.asarray(out.loc[q["_id"], "embedding_ubinary"]) for q in queries[:200]])
    assert np.array_equal(bits.astype(np.uint8), ref["ubinary"])
    assert out.loc["bad", "error"] == "text is null" and out.loc["bad", "embedding_float"] is None

    pairs = [(q["_id"], d["_id"], q["text"], d["text"]) for q in queries[:3] for d in docs[:6]]
    pdf = spark.createDataFrame(pairs, "qid string, did string, query string, document string")
    scored = tamis.scale.rerank_dataframe(pdf, CE, dtype="float32").toPandas()
    rr = tamis.Reranker(CE, dtype="float32")
    for q in queries[:3]:
        got_q = scored[scored.qid == q["_id"]].set_index("did")["score"]
        for r in rr.rerank(q["text"], [d["text"] for d in docs[:6]]):
            assert got_q[docs[r.index]["_id"]] == pytest.approx(r.relevance_score, abs=1e-6)
