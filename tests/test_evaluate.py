"""Evaluation: data loading, metrics (hand-computed), BM25, dense + cache, RRF, reranking stage, CLI, bench."""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tamis.evaluate import (
    DatasetError,
    EmbeddingCache,
    bm25_search,
    compute_metrics,
    dense_search,
    evaluate,
    exact_topk,
    load_dataset,
    load_pairs,
    load_run,
    rrf,
    save_run,
)
from tamis.evaluate.bench import run_bench, time_calls
from tamis.evaluate.cli import register
from tamis.evaluate.report import format_table, plot_quality_vs_throughput
from tamis.rerank.results import rank

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "scifact").is_dir(), reason="../shared/data not present")


# ------------------------------------------------------------------------------------------ helpers


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


DOCS = [
    {"_id": "d1", "title": "Cats", "text": "Cats are small domesticated felines that purr."},
    {"_id": "d2", "title": "Dogs", "text": "Dogs are loyal animals; a dog barks and runs."},
    {"_id": "d3", "title": "", "text": "The stock market fell sharply on Monday as investors sold shares."},
    {"_id": "d4", "title": "Running", "text": "Running every morning improves cardiovascular health."},
    {"_id": "d5", "title": "Python", "text": "Python is a programming language with dynamic typing."},
]
QUERIES = [
    {"_id": "q1", "text": "why do cats purr"},
    {"_id": "q2", "text": "benefits of morning runs"},
    {"_id": "q3", "text": "stock market shares"},
    {"_id": "q4", "text": "a query without judgments"},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq2\td4\t1\nq2\td2\t0\nq3\td3\t1\n"


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    d = tmp_path / "toy"
    (d / "qrels").mkdir(parents=True)
    _write_jsonl_gz(d / "corpus.jsonl.gz", DOCS)
    _write_jsonl_gz(d / "queries.jsonl.gz", QUERIES)
    (d / "qrels" / "test.tsv").write_text(QRELS)
    (d / "run.bm25.tsv").write_text(
        "query-id\tcorpus-id\trank\tscore\n"
        "q1\td2\t1\t9.0\nq1\td1\t2\t8.0\nq1\td5\t3\t1.0\n"
        "q2\td4\t1\t5.0\nq2\td2\t2\t4.0\n"
        "q3\td5\t1\t3.0\nq3\td3\t2\t2.0\n"
    )
    return d


class FakeEmbedder:
    """Bag-of-letters embedder with the Embedder interface; counts texts it embedded."""

    name = "fake-letters"
    dimension = 26
    max_length = 128
    query_task = "retrieval.query"
    passage_task = "retrieval.passage"

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []

    def embed(self, texts, task=None, normalized=True, show_progress=None, **kw):
        self.calls.append((len(texts), task))
        out = np.zeros((len(texts), 26), np.float32)
        for i, t in enumerate(texts):
            for c in t.lower():
                if "a" <= c <= "z":
                    out[i, ord(c) - 97] += 1
        out += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalized else out


class FakeReranker:
    """Scores a document by the number of query words it contains; records what it was given."""

    name = "fake-overlap"
    kind = "cross-encoder"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def rerank(self, query, documents, top_n=None, return_documents=True):
        self.seen.append(len(documents))
        words = set(query.lower().split())
        scores = [float(sum(w.strip(".,;") in words for w in d.lower().split())) for d in documents]
        return rank(query, scores, documents, top_n, return_documents, model=self.name)


# ------------------------------------------------------------------------------------------ metrics


def _ndcg(gains_in_run_order: list[int], all_gains: list[int], k: int) -> float:
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains_in_run_order[:k]))
    ideal = sorted(all_gains, reverse=True)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
    return dcg / idcg


def test_metrics_match_hand_computed_graded_values():
    qrels = {"q1": {"a": 3, "b": 1, "c": 2, "z": 0}, "q2": {"d": 1}}
    # q1 run order: b (1), x (unjudged), a (3), c (2); q2 has no results at all
    run = {"q1": {"b": 4.0, "x": 3.0, "a": 2.0, "c": 1.0}}
    m = compute_metrics(qrels, run, k_values=[1, 3, 10])
    ndcg3 = _ndcg([1, 0, 3, 2], [3, 1, 2, 0], 3)
    ndcg10 = _ndcg([1, 0, 3, 2], [3, 1, 2, 0], 10)
    assert ndcg3 == pytest.approx(2.5 / (3 + 2 / math.log2(3) + 0.5))
    assert m.per_query["q1"]["nDCG@3"] == pytest.approx(ndcg3, abs=1e-9)
    assert m.per_query["q1"]["nDCG@10"] == pytest.approx(ndcg10, abs=1e-9)
    assert m.per_query["q2"]["nDCG@10"] == 0.0  # unanswered query counts as zero
    assert m["nDCG@10"] == pytest.approx(ndcg10 / 2, abs=1e-9)
    # binary measures at level 1: relevant are b (rank 1), a (rank 3), c (rank 4)
    assert m.per_query["q1"]["MRR@10"] == 1.0
    assert m.per_query["q1"]["Hit@1"] == 1.0
    assert m.per_query["q1"]["Recall@3"] == pytest.approx(2 / 3)
    assert m.per_query["q1"]["MAP"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 4) / 3)
    assert m.n_queries == 2


def test_relevance_level_and_mrr_cutoff():
    qrels = {"q1": {"a": 3, "b": 1, "c": 2}}
    run = {"q1": {"b": 4.0, "x": 3.0, "a": 2.0, "c": 1.0}}
    m = compute_metrics(qrels, run, k_values=[1, 2, 3, 10], relevance_level=2)
    # only a and c count: first relevant at rank 3
    assert m["MRR@10"] == pytest.approx(1 / 3)
    assert m["MRR@2"] == 0.0  # cut before the first relevant document
    assert m["Hit@2"] == 0.0 and m["Hit@3"] == 1.0
    assert m["MAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    # nDCG keeps the graded labels whatever the level
    assert m["nDCG@10"] == pytest.approx(_ndcg([1, 0, 3, 2], [3, 1, 2], 10))


def test_ties_follow_trec_eval_order():
    # equal scores: trec_eval breaks ties by document id descending, so "b" comes before "a"
    qrels = {"q": {"a": 1}}
    m = compute_metrics(qrels, {"q": {"a": 1.0, "b": 1.0}}, k_values=[1])
    assert m["MRR@1"] == 0.0
    assert m["nDCG@1"] == 0.0


# ------------------------------------------------------------------------------------------ datasets


def test_load_dataset_and_queries_without_qrels_are_skipped(toy: Path):
    ds = load_dataset(toy)
    assert ds.sizes() == {"documents": 5, "queries": 3, "judgments": 4}
    assert "q4" not in ds.queries
    assert ds.qrels["q1"] == {"d1": 2}
    assert ds.corpus.documents()[0] == "Cats Cats are small domesticated felines that purr."
    assert ds.corpus.documents()[2].startswith("The stock")  # empty title: text only
    assert ds.corpus.documents(with_title=False)[0].startswith("Cats are")


def test_loader_errors_name_the_missing_file(toy: Path, tmp_path: Path):
    (toy / "queries.jsonl.gz").unlink()
    with pytest.raises(DatasetError, match=r"queries\.jsonl\.gz"):
        load_dataset(toy)
    with pytest.raises(DatasetError, match=r"qrels/dev\.tsv.*splits present: test"):
        load_dataset(toy, split="dev")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "qrels").mkdir(parents=True)
    (empty / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(DatasetError, match=r"corpus\.jsonl\.gz"):
        load_dataset(empty)


def test_missing_run_file_is_named(toy: Path):
    with pytest.raises(DatasetError, match=r"run\.test\.tsv"):
        evaluate(toy, first_stage="run", show_progress=False)
    with pytest.raises(DatasetError, match=r"other\.tsv"):
        evaluate(toy, first_stage="run:other.tsv", show_progress=False)


def test_queries_from_another_directory(toy: Path, tmp_path: Path):
    other = tmp_path / "de"
    other.mkdir()
    _write_jsonl_gz(other / "queries.jsonl.gz", [{"_id": "q1", "text": "warum schnurren Katzen"}])
    ds = load_dataset(toy, queries_dir=other)
    assert ds.queries == {"q1": "warum schnurren Katzen"}
    assert set(ds.qrels) == {"q1"}
    assert ds.query_lang == "german"


def test_run_files_round_trip_and_formats(toy: Path, tmp_path: Path):
    run = load_run(toy / "run.bm25.tsv")
    assert list(run["q1"]) == ["d2", "d1", "d5"] and run["q1"]["d1"] == 8.0
    trec = tmp_path / "run.trec"
    trec.write_text("q1 Q0 d3 1 7.5 sys\nq1 Q0 d1 2 6.5 sys\n")
    assert load_run(trec) == {"q1": {"d3": 7.5, "d1": 6.5}}
    out = save_run(run, tmp_path / "saved.tsv")
    assert out.read_text().splitlines()[0] == "query-id\tcorpus-id\trank\tscore"
    assert load_run(out) == run
    with pytest.raises(DatasetError, match="nope.tsv"):
        load_run(tmp_path / "nope.tsv")


def test_pairs_loader(tmp_path: Path):
    _write_jsonl_gz(tmp_path / "pairs.jsonl.gz", [
        {"source": "nq", "query": "q", "document": "doc", "label": 1},
        {"query": "p", "code": "def f(): pass", "label": 0},
    ])
    pairs = load_pairs(tmp_path)
    assert [(p.query, p.document, p.label) for p in pairs] == [("q", "doc", 1.0), ("p", "def f(): pass", 0.0)]
    assert pairs[0].extras == {"source": "nq"}
    with pytest.raises(DatasetError, match="pairs.jsonl.gz"):
        load_pairs(tmp_path / "missing")


# ------------------------------------------------------------------------------------ first stage


def test_bm25_ranks_the_obvious_document_first(toy: Path):
    ds = load_dataset(toy)
    run = bm25_search(ds.corpus.documents(), ds.corpus.ids, ds.queries, k=3, show_progress=False)
    top = {q: max(docs, key=docs.get) for q, docs in run.items()}
    assert top == {"q1": "d1", "q2": "d4", "q3": "d3"}  # "runs" matches "Running" only through the stemmer
    assert all(len(docs) <= 3 for docs in run.values())
    m = compute_metrics(ds.qrels, run, [1])
    assert m["nDCG@1"] == 1.0


def test_rrf_toy():
    r1 = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    r2 = {"q": {"c": 10.0, "a": 5.0}}
    fused = rrf([r1, r2], k=60)
    assert fused["q"]["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["q"]["b"] == pytest.approx(1 / 62)
    assert fused["q"]["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert sorted(fused["q"], key=fused["q"].get, reverse=True) == ["a", "c", "b"]
    assert list(rrf([r1, r2], depth=1)["q"]) == ["a"]
    weighted = rrf([r1, r2], k=60, weights=[0.0, 1.0])
    assert weighted["q"]["b"] == 0.0


def test_exact_topk_matches_brute_force():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((7, 8)).astype(np.float32)
    scores, idx = exact_topk(queries, docs, k=5, block_elems=100)  # several blocks
    ref = queries @ docs.T
    assert np.array_equal(idx, np.argsort(-ref, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(ref, idx, 1), rtol=1e-6)


def test_dense_search_uses_tasks_and_the_cache(toy: Path, tmp_path: Path):
    ds = load_dataset(toy)
    emb = FakeEmbedder()
    cache = EmbeddingCache(tmp_path / "cache")
    texts = ds.corpus.documents()
    run1 = dense_search(emb, texts, ds.corpus.ids, ds.queries, k=5, cache=cache, show_progress=False)
    assert emb.calls == [(5, "retrieval.passage"), (3, "retrieval.query")]
    assert cache.misses == 2 and cache.hits == 0
    assert list((tmp_path / "cache").rglob("*.npy"))
    run2 = dense_search(emb, texts, ds.corpus.ids, ds.queries, k=5, cache=cache, show_progress=False)
    assert len(emb.calls) == 2  # nothing embedded the second time
    assert cache.hits == 2
    assert run1 == run2
    # another corpus text or another model identity misses
    dense_search(emb, texts[:-1] + ["changed"], ds.corpus.ids, ds.queries, k=5, cache=cache, show_progress=False)
    assert emb.calls[2:] == [(5, "retrieval.passage")]  # the queries still come from the cache
    emb2 = FakeEmbedder()
    emb2.dimension = 13
    dense_search(emb2, texts, ds.corpus.ids, ds.queries, k=5, cache=cache, show_progress=False)
    assert len(emb2.calls) == 2
    compiled = FakeEmbedder()
    compiled.compile_seconds = 6.5  # compiled bf16 rounds unlike eager: not the same vectors
    dense_search(compiled, texts, ds.corpus.ids, ds.queries, k=5, cache=cache, show_progress=False)
    assert len(compiled.calls) == 2
    # the scores are cosines of the fake vectors
    q = emb.embed([ds.queries["q1"]])[0]
    d = emb.embed([texts[0]])[0]
    assert run1["q1"]["d1"] == pytest.approx(float(q @ d), abs=1e-6)


def test_hybrid_reports_parts_and_fusion(toy: Path, tmp_path: Path):
    report = evaluate(toy, first_stage="hybrid", model=FakeEmbedder(), cache_dir=tmp_path / "c",
                      show_progress=False, k_values=[1, 5])
    assert [s.name for s in report.stages] == ["bm25", "dense", "hybrid"]
    fused = rrf([report.stage("bm25").run, report.stage("dense").run])
    assert report.stage("hybrid").run == fused


# ------------------------------------------------------------------------------------------ rerank


def test_rerank_stage_cuts_to_depth_and_scores(toy: Path):
    rr = FakeReranker()
    report = evaluate(toy, first_stage="run:run.bm25.tsv", reranker=rr, depth=2, show_progress=False,
                      k_values=[1, 10])
    first, reranked = report.stages
    assert first.name == "run:run.bm25.tsv"
    assert reranked.name == "run:run.bm25.tsv + rerank@2"
    assert rr.seen == [2, 2, 2]  # q1 had 3 candidates, cut to depth 2
    # q1: BM25 run puts d2 first; the overlap reranker moves d1 ("cats", "purr") above d2
    assert first.metrics.per_query["q1"]["nDCG@1"] == 0.0
    assert reranked.metrics.per_query["q1"]["nDCG@1"] == 1.0
    # the top 2 reranked, the rest of the first-stage list kept below them in its order (issue 36, item 13)
    assert sorted(reranked.run["q1"], key=reranked.run["q1"].get, reverse=True) == ["d1", "d2", "d5"]
    assert reranked.info["pairs"] == 6


# --------------------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tamis")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_eval_writes_report(toy: Path, tmp_path: Path, capsys):
    out = tmp_path / "r.json"
    assert _cli(["eval", "--data", str(toy), "--first-stage", "bm25", "--quiet", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nDCG@10" in printed and "bm25" in printed
    rep = json.loads(out.read_text())
    assert rep["sizes"]["queries"] == 3
    assert rep["stages"][0]["metrics"]["nDCG@1"] == 1.0
    assert rep["args"]["first_stage"] == "bm25"
    assert _cli(["eval", "--data", str(tmp_path / "none"), "--quiet", "--output", str(out)]) == 2
    assert "none" in capsys.readouterr().err


def test_cli_eval_compile_reaches_the_models(toy: Path, tmp_path: Path, monkeypatch, capsys):
    import tamis.evaluate.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "load_embedder",
                        lambda model, device, dtype, **options: seen.append(options) or FakeEmbedder())
    out = tmp_path / "r.json"
    for choice, options in (("off", {"compile": False}), ("on", {"compile": True}), ("auto", {})):
        assert _cli(["eval", "--data", str(toy), "--first-stage", "dense", "--no-cache", "--quiet",
                     "--compile", choice, "--output", str(out)]) == 0
        assert seen.pop() == options
    capsys.readouterr()


def test_format_table_aligns():
    text = format_table([{"a": "x", "n": 0.5}, {"a": "long", "n": 12.25}], floatfmt=".2f")
    lines = text.splitlines()
    assert lines[0].split() == ["a", "n"]
    assert lines[2].endswith(" 0.50") and lines[3].endswith("12.25")


# ------------------------------------------------------------------------------------------- bench


def test_time_calls_units():
    t = time_calls(lambda item: sum(range(1000)), [1, 2, 3, 4], [10, 10, 10, 10], repeats=2, warmup=1,
                   show_progress=False)
    assert t["documents"] == 40 and t["calls"] == 4 and len(t["pass_seconds"]) == 2
    assert t["docs_per_50ms"] == pytest.approx(t["docs_per_second"] * 0.05)
    assert 0 < t["p50_ms"] <= t["p95_ms"]
    assert t["peak_rss_mb"] > 0


def test_bench_runs_with_given_models_and_plot(toy: Path, tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "scifact").symlink_to(toy)
    (root / "trec-dl21").symlink_to(toy)
    rep = run_bench(root, model=FakeEmbedder(), reranker=FakeReranker(), n_docs=4, batch_size=2, n_queries=2,
                    depth=2, repeats=1, show_progress=False)
    embed, rerank = rep.results
    assert (embed.task, embed.documents, embed.calls) == ("embed", 4, 2)
    assert (rerank.task, rerank.documents, rerank.calls) == ("rerank", 4, 2)
    png = plot_quality_vs_throughput(
        [{"label": "a", "group": "tamis", "panel": "embedding", "docs_per_50ms": embed.docs_per_50ms, "nDCG@10": 0.6},
         {"label": "b", "group": "other", "panel": "embedding", "docs_per_50ms": 1.0, "nDCG@10": None},
         {"label": "c", "group": "tamis", "panel": "reranking", "docs_per_50ms": 2.0, "nDCG@10": 0.4}],
        tmp_path / "plot.png",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# ------------------------------------------------------------------------------------- real data / models


@needs_data
@pytest.mark.slow
def test_scifact_bm25_reaches_pyserini_range():
    report = evaluate(DATA / "scifact", first_stage="bm25", show_progress=False)
    ndcg = report.final.metrics["nDCG@10"]
    assert 0.64 <= ndcg <= 0.70
    assert ndcg == pytest.approx(0.6791, abs=0.002)  # k1=1.2, b=0.75, English stemmer + stop words
    assert report.sizes == {"documents": 5183, "queries": 300, "judgments": 339}


@needs_data
def test_trec_dl21_bm25_run_reproduces_pyserini():
    report = evaluate(DATA / "trec-dl21", first_stage="run:run.bm25.tsv", show_progress=False)
    assert report.final.metrics["nDCG@10"] == pytest.approx(0.4458, abs=0.0005)
    assert report.config["relevance_level"] == 2


@needs_data
@pytest.mark.slow
def test_dense_default_model_matches_sentence_transformers(tmp_path: Path):
    """Dense search with the real default model on 24 XQuAD paragraphs equals sentence-transformers."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from tamis.embed import Embedder

    ds = load_dataset(DATA / "xquad" / "en")
    ids, texts = ds.corpus.ids[:24], ds.corpus.documents()[:24]
    queries = {q: t for q, t in list(ds.queries.items()) if next(iter(ds.qrels[q])) in ids}
    queries = dict(list(queries.items())[:12])
    emb = Embedder(dtype="float32")  # compared with sentence-transformers float32 at 1e-5
    run = dense_search(emb, texts, ids, queries, k=3, cache=EmbeddingCache(tmp_path), show_progress=False)
    st = SentenceTransformer(str(emb.model_dir), device="cpu")
    st.max_seq_length = emb.max_length
    dv = st.encode(texts, normalize_embeddings=True)
    qv = st.encode(list(queries.values()), normalize_embeddings=True)
    ref = qv @ dv.T
    for row, qid in enumerate(queries):
        order = np.argsort(-ref[row])[:3]
        assert list(run[qid]) == [ids[i] for i in order]
        np.testing.assert_allclose([run[qid][ids[i]] for i in order], ref[row, order], atol=1e-5)


def test_faiss_ann_agrees_with_exact_on_a_small_corpus(toy: Path):
    pytest.importorskip("faiss")
    ds = load_dataset(toy)
    texts = ds.corpus.documents()
    exact = dense_search(FakeEmbedder(), texts, ds.corpus.ids, ds.queries, k=3, ann="exact", show_progress=False)
    approx = dense_search(FakeEmbedder(), texts, ds.corpus.ids, ds.queries, k=3, ann="faiss", show_progress=False)
    for qid in exact:
        assert list(approx[qid]) == list(exact[qid])
        np.testing.assert_allclose(list(approx[qid].values()), list(exact[qid].values()), atol=1e-5)


@needs_data
@pytest.mark.slow
def test_bench_against_sentence_transformers_on_real_texts():
    """Both systems run on the same weights and texts; their outputs agree (so the timing is fair)."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("onnxruntime")
    rep = run_bench(DATA, n_docs=8, batch_size=4, n_queries=1, depth=8, repeats=1, vs="sentence-transformers",
                    dtype="float32", show_progress=False)
    assert not rep.skipped, rep.skipped
    st, st16 = "sentence-transformers", "sentence-transformers+bf16-autocast"
    ort, ort8 = "onnxruntime", "onnxruntime-int8-dynamic"
    assert [(r.system, r.task) for r in rep.results] == [
        ("tamis", "embed"), (st, "embed"), (st16, "embed"), (ort, "embed"), (ort8, "embed"),
        ("tamis", "rerank"), (st, "rerank"), (st16, "rerank")
    ]
    assert rep.checks["embed_min_cosine_vs_st"] > 0.99999
    assert 0.99 < rep.checks["embed_st_bf16_min_cosine_vs_st"] < 0.999999  # autocast really ran in bf16
    assert rep.checks["embed_ort_min_cosine_vs_st"] > 0.99999  # the ONNX export is the same model
    assert 0.9 < rep.checks["embed_ort_int8_min_cosine_vs_st"] < 0.99999  # really quantized
    assert rep.checks["rerank_same_order_vs_st"] == 1.0
    assert rep.checks["rerank_max_abs_score_diff_vs_st"] < 1e-5
    embed_refs, rerank_refs = ("", "_vs_st_bf16", "_vs_ort", "_vs_ort_int8"), ("", "_vs_st_bf16")
    assert set(rep.ratios) == {f"{t}{k}{s}" for t, refs in (("embed", embed_refs), ("rerank", rerank_refs))
                               for k in ("", "_paired_median") for s in refs}
    assert all(v > 0 for v in rep.ratios.values())
    assert rep.config["cpu"] and rep.config["embed"]["tamis"]["packed"] is True
    probe = rep.config["matmul_probe_gflops"]
    assert probe["float32"] > 0 and probe["bfloat16"] > 0 and probe["shape"] == {"hidden": 384, "intermediate": 1536}
    embeds = [r for r in rep.results if r.task == "embed"]
    assert len({r.extra["gflop_per_pass"] for r in embeds}) == 1  # the same useful work for every system
    for r in embeds:  # each against its own dtype's probe: bfloat16 for ST autocast, float32 for the rest, none for int8
        if r.system == ort8:
            assert "pct_of_ceiling" not in r.extra and r.extra["gflops"] > 0
            continue
        assert r.extra["ceiling_dtype"] == ("bfloat16" if r.system == st16 else "float32")
        assert 0 < r.extra["pct_of_ceiling"] < 300 and "% ceiling" in r.row()


def test_encoder_gflop_counts_projections_and_attention_by_hand():
    from tamis.evaluate.bench import encoder_gflop

    cfg = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2}
    # per layer: projections 2 * (4*16 + 2*4*8) = 256 FLOP per token x 4 tokens; attention 4 * 4 * (3^2 + 1^2)
    assert encoder_gflop(cfg, [3, 1]) == pytest.approx(2 * (256 * 4 + 160) / 1e9)
    assert encoder_gflop({"hidden_size": 4}, [3]) is None


def test_rank_agreement_tolerates_near_ties_and_monotone_maps():
    from tamis.evaluate.bench import _rank_agreement

    a = [[0.9, 0.5, 0.5000001, 0.1]]
    assert _rank_agreement(a, [[0.9, 0.5000002, 0.5, 0.1]]) == 1.0  # a float-noise tie flips: fine
    assert _rank_agreement(a, [[1 / (1 + math.exp(-x)) for x in a[0]]]) == 1.0  # sigmoid keeps the order
    assert _rank_agreement(a, [[0.1, 0.5, 0.5, 0.9]]) == 0.0


def test_workloads_are_interleaved_call_by_call():
    from tamis.evaluate.bench import Workload, paired_speedup, time_workloads

    log: list[str] = []
    a = Workload("a", "embed", "m", lambda x: log.append(f"a{x}"), [0, 1, 2], [1, 1, 1])
    b = Workload("b", "embed", "m", lambda x: log.append(f"b{x}"), [0, 1, 2], [1, 1, 1])
    timed = time_workloads([a, b], repeats=1, warmup=0, show_progress=False)
    assert log == ["a0", "b0", "b1", "a1", "a2", "b2"]
    assert len(timed[0]["latencies"]) == len(timed[1]["latencies"]) == 3
    assert paired_speedup([1.0, 2.0, 1.0], [2.0, 2.0, 3.0]) == 2.0
