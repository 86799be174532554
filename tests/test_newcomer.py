"""What a new user hit (issue 36): one huge input line, blank inputs, /v1/models ids, help texts, bench and eval
rough edges. Each test names its item."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tamis
import tamis.cli
from tamis.cli import main
from tamis.tokenize import MAX_CHARS_PER_TOKEN, Tokenizer

HUGE = "word " * 2_000_000  # one 10 MB line


@pytest.fixture(scope="module")
def emb() -> tamis.Embedder:
    return tamis.Embedder(dtype="float32", compile=False)


def _watch_tokenizer(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    raw = Tokenizer.raw

    def watching(self: Tokenizer, texts: Any) -> Any:
        texts = list(texts)
        seen.extend(len(t) for t in texts)
        return raw(self, texts)

    monkeypatch.setattr(Tokenizer, "raw", watching)
    return seen


# ---------------------------------------------------------------------------- item 8: one 10 MB line
def test_huge_line_is_cut_by_characters_before_tokenizing(emb: tamis.Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _watch_tokenizer(monkeypatch)
    cap = emb.max_length * MAX_CHARS_PER_TOKEN
    res = emb.embed_result(["short", HUGE])
    assert max(seen) <= cap, max(seen)  # the tokenizer never saw the 10 MB
    assert res.truncated == [1] and res.token_counts[1] == emb.max_length
    np.testing.assert_allclose(res.embeddings[1], emb.embed([HUGE[:cap]])[0], atol=1e-6)  # the same cut as before
    with pytest.raises(ValueError, match=r"input 1 has 10,000,000 characters, more than the 8,192"):
        emb.embed(["short", HUGE], truncate=False)
    assert max(seen) <= cap


def test_cli_huge_line_no_truncate_and_compile_estimate(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.txt"
    src.write_text("a short line\n" + HUGE + "\n")
    estimates: list[int | None] = []
    real = tamis.cli._one_shot_compile

    def spy(choice: str, est_tokens: int | None) -> Any:
        estimates.append(est_tokens)
        return real(choice, est_tokens)

    monkeypatch.setattr(tamis.cli, "_one_shot_compile", spy)
    seen = _watch_tokenizer(monkeypatch)
    assert main(["embed", str(src), "--no-truncate", "--dtype", "float32", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2 has 10,000,000 characters" in err and "--no-truncate" in err, err
    assert not seen or max(seen) <= 256 * MAX_CHARS_PER_TOKEN  # refused without tokenizing the line
    assert estimates and estimates[0] < tamis.cli.ONE_SHOT_COMPILE_MIN_TOKENS // 100  # not counted as 2.5M tokens
    out = tmp_path / "v.jsonl"
    assert main(["embed", str(src), "-o", str(out), "--dtype", "float32", "--compile", "off"]) == 0
    assert "1 of 2 inputs were longer than 256 tokens and were cut (line 2)" in capsys.readouterr().err
    assert max(seen) <= 256 * MAX_CHARS_PER_TOKEN


# ---------------------------------------------------------------------------- item 12: blank inputs, one rule
def test_blank_input_is_a_value_error_naming_its_index(emb: tamis.Embedder) -> None:
    with pytest.raises(ValueError, match=r"^input 0 is an empty string: every input must contain text"):
        emb.embed([""])
    with pytest.raises(ValueError, match=r"^input 2 is only whitespace"):
        emb.embed(["a", "b", " \n\t"])
    with pytest.raises(ValueError, match=r"^input 1 is an empty string"):
        emb.encode(["a", ""])
    with pytest.raises(ValueError, match=r"^input 1 is an empty string"):
        emb.embed(["a chunk", ""], late_chunking=True)
    with pytest.raises(ValueError, match=r"^input 0 is an empty string"):
        emb.embed("")
    assert emb.embed(["a"]).shape == (1, 384)


# ---------------------------------------------------------------------------- item 11: /v1/models ids
def test_models_list_has_distinct_ids_and_the_kind() -> None:
    from openai import OpenAI

    from live_server import LiveServer
    from tamis.server import create_app
    from test_server import FakeEmbedder, FakeReranker

    # one model on both routes, as `tamis serve` serves the bundled model by default
    app = create_app({"all-MiniLM-L6-v2": FakeEmbedder("all-MiniLM-L6-v2", dimension=4)},
                     {"all-MiniLM-L6-v2": FakeReranker()})
    with LiveServer(app) as srv:
        listed = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).models.list().data
        import httpx

        rerank = httpx.post(srv.url + "/v1/rerank", json={"model": "all-MiniLM-L6-v2:reranker", "query": "a b",
                                                           "documents": ["a b", "c d"]})
    ids = [m.id for m in listed]
    assert len(ids) == len(set(ids)) == 2, ids  # clients de-duplicate by id: both models stay visible
    kinds = {m.id: (m.model_extra or {}).get("type") for m in listed}
    assert kinds == {"all-MiniLM-L6-v2": "embedding", "all-MiniLM-L6-v2:reranker": "reranker"}
    assert {(m.model_extra or {}).get("served_name") for m in listed} == {"all-MiniLM-L6-v2"}
    assert rerank.status_code == 200 and rerank.json()["model"] == "all-MiniLM-L6-v2"  # the listed id works


# ---------------------------------------------------------------------------- item 10: help and messages
def _help(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


def test_help_texts_say_what_ships_and_what_options_do(capsys: pytest.CaptureFixture) -> None:
    top = " ".join(_help(["--help"], capsys).split())
    assert "train models: rerankers (fine-tune, distil, listwise), embedding models and task adapters" in top
    serve = " ".join(_help(["serve", "--help"], capsys).split())
    assert "the shipped tamis-reranker-tiny" not in serve and "none does yet" in serve
    rerank = " ".join(_help(["rerank", "--help"], capsys).split())
    assert "--query QUERY the query text the documents are ranked for" in rerank
    assert "--top-n N print only the N most relevant documents" in rerank


def test_unknown_option_prints_the_commands_usage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["rerank", "--query", "q", "--documents", "-", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: tamis rerank") and "tamis rerank: error: unrecognized arguments: --bogus" in err


def test_resumed_run_counts_its_own_truncations(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "long.txt"
    src.write_text("".join(f"{i} " + "word " * 300 + "\n" for i in range(16)))  # every line over 256 tokens
    out = tmp_path / "v.jsonl"
    common = ["--dimensions", "8", "--write-every", "8", "--dtype", "float32", "--compile", "off"]
    real = tamis.Embedder.forward
    calls: list[int] = []

    def flaky(self: Any, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(tamis.Embedder, "forward", flaky)
        m.setattr(tamis.Embedder, "max_batch_size", 8, raising=False)
        assert main(["embed", str(src), "-o", str(out), *common]) == 130
    capsys.readouterr()
    assert main(["embed", str(src), "-o", str(out), "--resume", *common]) == 0
    err = capsys.readouterr().err
    assert "8 of 8 inputs embedded by this run were longer than 256 tokens and were cut (lines 9, 10, 11, 12, 13, 14, 15, 16)" in err, err


# ---------------------------------------------------------------------------- item 9: bench --plot, no quality
def _axes(png: Path) -> list[dict[str, Any]]:
    from PIL import Image

    with Image.open(png) as im:
        return json.loads(im.text["tamis:axes"])


def test_plot_without_quality_is_throughput_only(tmp_path: Path) -> None:
    from tamis.evaluate.report import plot_quality_vs_throughput

    # the points `tamis bench --plot` builds without --quality / --quick-eval: nDCG@10 unknown everywhere
    points = [{"label": f"{s}: {m}", "group": g, "panel": panel, "docs_per_50ms": v, "nDCG@10": None,
               "ylabel": "SciFact nDCG@10 (dense)" if panel == "embedding" else "TREC DL21 nDCG@10"}
              for s, g, m, panel, v in [("tamis", "tamis", "all-MiniLM-L6-v2", "embedding", 31.5),
                                        ("ST", "sentence-transformers", "all-MiniLM-L6-v2", "embedding", 18.2),
                                        ("tamis", "tamis", "all-MiniLM-L6-v2", "reranking", 12.0)]]
    png = plot_quality_vs_throughput(points, tmp_path / "bench.png")
    axes = _axes(png)
    assert [a["kind"] for a in axes] == ["throughput", "throughput"]
    for a in axes:
        assert a["xlim"][0] == 0 and a["xlim"][1] > 31.5 if a["panel"] == "embedding" else a["xlim"][1] > 12.0
        assert "nDCG" not in a["ylabel"] and "nDCG" not in a["xlabel"]  # no quality axis at all
        assert a["labels_inside"], a
    # with quality numbers: the quality axis, never below 0
    points[0]["nDCG@10"], points[1]["nDCG@10"] = 0.6451, 0.6451
    points[2]["nDCG@10"] = 0.5785
    axes = _axes(plot_quality_vs_throughput(points, tmp_path / "q.png"))
    assert [a["kind"] for a in axes] == ["quality", "quality"]
    for a, value in zip(axes, (0.6451, 0.5785), strict=True):
        assert 0 <= a["ylim"][0] < value < a["ylim"][1] <= 1.0 and "nDCG" in a["ylabel"], a
        assert a["labels_inside"], a
    # an unknown point beside known ones sits at the bottom of a quality axis that still starts at 0 or above
    points[1]["nDCG@10"] = None
    points[0]["nDCG@10"] = 0.01
    a = _axes(plot_quality_vs_throughput(points, tmp_path / "low.png"))[0]
    assert a["kind"] == "quality" and a["ylim"][0] >= 0 and a["labels_inside"], a


# ---------------------------------------------------------------------------- item 13: tamis eval
def test_eval_report_name_recall_on_the_full_list_and_max_queries(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from test_evaluate import DOCS, QRELS, QUERIES, _write_jsonl_gz

    data = tmp_path / "toy"  # test_evaluate's toy set: 5 documents, 3 judged queries, a run file
    (data / "qrels").mkdir(parents=True)
    _write_jsonl_gz(data / "corpus.jsonl.gz", DOCS)
    _write_jsonl_gz(data / "queries.jsonl.gz", QUERIES)
    (data / "qrels" / "test.tsv").write_text(QRELS)
    (data / "run.bm25.tsv").write_text("query-id\tcorpus-id\trank\tscore\nq1\td2\t1\t9.0\nq1\td1\t2\t8.0\n"
                                       "q1\td5\t3\t1.0\nq2\td4\t1\t5.0\nq2\td2\t2\t4.0\nq3\td5\t1\t3.0\n"
                                       "q3\td3\t2\t2.0\n")
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "reports-here"
    run_file = data / "run.bm25.tsv"
    assert main(["eval", "--data", str(data), "--first-stage", f"run:{run_file}", "--reranker", "default",
                 "--depth", "1", "--out", str(out_dir), "--quiet"]) == 0
    report = out_dir / "eval-toy-run.bm25-rerank.json"
    assert [p.name for p in out_dir.iterdir()] == [report.name]  # short name, under --out, nothing in the cwd
    assert not list(tmp_path.glob("eval-*.json"))
    stages = json.loads(report.read_text())["stages"]
    first, reranked = stages[0]["metrics"], stages[1]["metrics"]
    assert first["Recall@100"] == 1.0  # every relevant document is somewhere in the run file's lists
    assert reranked["Recall@100"] == first["Recall@100"]  # --depth 1 reranks the top 1 and keeps the rest
    capsys.readouterr()

    assert main(["eval", "--data", str(data), "--first-stage", "bm25", "--max-queries", "2", "--corpus-sample", "4",
                 "--out", str(out_dir), "--quiet"]) == 0
    printed = capsys.readouterr().out
    sample = json.loads((out_dir / "eval-toy-bm25-sample.json").read_text())
    assert sample["sizes"]["queries"] == 2 and sample["stages"][0]["n_queries"] == 2
    assert sample["sizes"]["documents"] == 4 and sample["config"]["sample"]["max_queries"] == 2
    assert "sample: 2 queries, 4 documents (seed 0)" in printed


# ---------------------------------------------------------------------------- item 3: Cohere embed bounds
def test_cohere_embed_bounds_texts_and_inputs_alike() -> None:
    from test_server import client, make_app, run

    async def go() -> list[Any]:
        async with client(make_app(max_inputs=2)) as c:
            texts = await c.post("/v2/embed", json={"texts": ["a", "b", "c"], "input_type": "search_query"})
            inputs = await c.post("/v2/embed", json={"inputs": [{"content": [{"type": "text", "text": t}]}
                                                                for t in "abc"], "input_type": "search_query"})
            ok = await c.post("/v2/embed", json={"texts": ["a b", "c d"], "input_type": "search_query",
                                                 "embedding_types": ["int8", "ubinary"]})
            images = await c.post("/v2/embed", json={"images": ["data:image/png;base64,AAAA"],
                                                     "input_type": "image"})
            return [texts, inputs, ok, images]

    texts, inputs, ok, images = run(go())
    for r, field in ((texts, "texts"), (inputs, "inputs")):
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_inputs", (field, r.text)
        assert r.json()["error"]["param"] == field
    body = ok.json()
    assert ok.status_code == 200 and body["response_type"] == "embeddings_by_type"
    assert set(body["embeddings"]) == {"int8", "ubinary"} and len(body["embeddings"]["int8"]) == 2
    assert images.status_code == 400 and "text only" in images.json()["detail"]
