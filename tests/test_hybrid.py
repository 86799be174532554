"""Hybrid first stage: learned-sparse search, weighted z-score fusion, ``hybrid:[rrf|zscore:]PART[=W]+...`` specs
and ``tamis eval --first-stage hybrid:... --sparse-model``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tamis  # noqa: E402
from conftest import save_random_splade  # noqa: E402
from tamis.evaluate.first_stage import (  # noqa: E402
    EmbeddingCache,
    fuse,
    rrf,
    sparse_search,
    sparse_topk,
    zscore_fusion,
)
from tamis.evaluate.pipeline import evaluate, parse_first_stage, parse_hybrid  # noqa: E402
from test_evaluate import FakeEmbedder, toy  # noqa: E402,F401  (the toy data set fixture)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("splade")
    save_random_splade(d, {"model_max_length": 128, "pad_token": "[PAD]"})
    return d


def test_zscore_fusion_by_hand():
    a = {"q": {"d1": 3.0, "d2": 1.0, "d3": 2.0}}
    b = {"q": {"d2": 10.0, "d4": 0.0}}
    za = {"d1": 1.224744871, "d2": -1.224744871, "d3": 0.0}
    zb = {"d2": 1.0, "d4": -1.0}
    fused = zscore_fusion([a, b], weights=[1.0, 0.5])
    expect = {d: za.get(d, min(za.values())) + 0.5 * zb.get(d, min(zb.values())) for d in ["d1", "d2", "d3", "d4"]}
    assert fused["q"] == pytest.approx(expect)
    assert list(fused["q"]) == sorted(expect, key=lambda d: -expect[d])
    assert list(zscore_fusion([a, b], weights=[1.0, 0.5], depth=2)["q"]) == list(fused["q"])[:2]
    # a query only one run has; a run with one document (no spread) adds nothing but its presence
    c = {"q": {"d9": 5.0}, "other": {"x": 1.0}}
    out = zscore_fusion([a, c])
    assert set(out) == {"q", "other"} and out["other"] == {"x": 0.0}
    assert fuse([a, b], "rrf") == rrf([a, b])
    with pytest.raises(ValueError):
        fuse([a, b], "max")


def test_hybrid_specs():
    assert parse_first_stage("hybrid") == ("hybrid", None)
    assert parse_first_stage("splade") == ("sparse", None)
    h = parse_hybrid("zscore:bm25+dense=0.5+splade")
    assert (h.parts, h.weights, h.fusion) == (["bm25", "dense", "sparse"], [1.0, 0.5, 1.0], "zscore")
    assert h.label == "hybrid:zscore:bm25+dense+sparse=1,0.5,1"
    assert parse_hybrid("dense+sparse").fusion == "rrf"
    assert parse_hybrid(None).parts == ["bm25", "dense"]
    for bad in ("hybrid:bm25", "hybrid:bm25+colbert", "hybrid:bm25+bm25", "hybrid:bm25=x+dense",
                "hybrid:bm25=-1+dense"):
        with pytest.raises(ValueError):
            parse_first_stage(bad)


def test_sparse_topk_is_exact():
    import scipy.sparse as sp

    docs = sp.random(50, 300, density=0.05, random_state=1, format="csr", dtype=np.float32)
    qs = sp.random(7, 300, density=0.1, random_state=2, format="csr", dtype=np.float32)
    idx, scores = sparse_topk(qs, docs, 5, block=3)
    full = (qs @ docs.T).toarray()
    for r in range(7):
        pos = full[r][full[r] > 0]
        assert np.allclose(scores[r], np.sort(pos)[::-1][:5])
        assert np.allclose(full[r][idx[r]], scores[r])


def test_sparse_search_and_cache(sparse_model, tmp_path):
    sp_model = tamis.SparseEmbedder(sparse_model)
    texts = ["cats purr and sleep", "dogs bark loudly", "the stock market fell", "morning runs are healthy"]
    ids = ["a", "b", "c", "d"]
    queries = {"q1": "cats purring", "q2": "stock market"}
    cache = EmbeddingCache(tmp_path / "c")
    run = sparse_search(sp_model, texts, ids, queries, k=3, cache=cache, show_progress=False)
    assert cache.misses == 2 and all(len(v) <= 3 for v in run.values())
    qv = sp_model.embed([queries["q1"]], "query")[0]
    dv = sp_model.embed(texts, "document")
    for did, s in run["q1"].items():
        assert s == pytest.approx(qv.dot(dv[ids.index(did)]), rel=1e-5)
    again = sparse_search(sp_model, texts, ids, queries, k=3, cache=cache, show_progress=False)
    assert cache.hits == 2 and again == run


def test_eval_hybrid_three_parts(toy, sparse_model, tmp_path):  # noqa: F811
    report = evaluate(toy, first_stage="hybrid:zscore:bm25+dense+sparse", model=FakeEmbedder(),
                      sparse_model=sparse_model, cache_dir=tmp_path / "c", show_progress=False, k_values=[1, 5])
    names = [s.name for s in report.stages]
    assert names == ["bm25", "dense", "sparse", "hybrid:zscore:bm25+dense+sparse"]
    parts = [report.stage(p).run for p in ("bm25", "dense", "sparse")]
    assert report.final.run == zscore_fusion(parts, depth=1000)
    assert report.config["fusion"] == {"method": "zscore", "parts": ["bm25", "dense", "sparse"],
                                       "weights": [1.0, 1.0, 1.0]}
    only = evaluate(toy, first_stage="sparse", sparse_model=sparse_model, cache_dir=False, show_progress=False)
    assert only.final.name == "sparse" and only.final.run == report.stage("sparse").run
    with pytest.raises(ValueError, match="sparse-model"):
        evaluate(toy, first_stage="sparse", show_progress=False)


def test_cli_eval_hybrid(toy, sparse_model, tmp_path, capsys):  # noqa: F811
    from tamis.cli import main

    out = tmp_path / "r.json"
    rc = main(["eval", "--data", str(toy), "--first-stage", "hybrid:rrf:bm25+sparse", "--sparse-model",
               str(sparse_model), "--no-cache", "--quiet", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["stages"]] == ["bm25", "sparse", "hybrid:rrf:bm25+sparse"]
    assert "hybrid:rrf:bm25+sparse" in capsys.readouterr().out
