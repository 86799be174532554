"""SPLADE as a reranker (term weights against transformers) and rerankers fused into one (EnsembleReranker)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tamis
from conftest import save_random_splade
from tamis.errors import CheckpointError, InputTooLongError
from tamis.evaluate.bench import _precision_of
from tamis.rerank import EnsembleReranker, SpladeReranker
from tamis.rerank.ensemble import standardize
from tamis.tokenize import Tokenizer

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).resolve().parents[2] / "shared"
V1 = SHARED / "fixtures" / "jina-reranker-v1-tiny-like"
DOCS = ["a short query", "a much longer document about sparse retrieval, " * 12, "mid length text here",
        "sparse retrieval with learned term weights"]


@pytest.fixture(scope="module")
def splade_dir(tmp_path_factory) -> tuple[Path, object]:
    """A tiny random BERT masked-LM with MiniLM's (uncased BERT) tokenizer, saved by transformers."""
    d = tmp_path_factory.mktemp("splade")
    return d, save_random_splade(d)


def test_splade_term_weights_match_transformers_text_by_text(splade_dir):
    """``max_t log(1 + relu(logits))`` over each text's own tokens, computed with transformers one text at a
    time (no padding): batching texts of unequal length must not change a vector."""
    d, ref = splade_dir
    rr = SpladeReranker(d, max_length=64, max_tokens_per_batch=4096)
    tok = Tokenizer.from_dir(d, json.loads((d / "config.json").read_text()))
    for text, (terms, weights) in zip(DOCS, rr.encode(DOCS)):
        ids = torch.tensor([tok.encode([text], 64, truncate=True)[0].ids])
        with torch.no_grad():
            want = torch.log1p(torch.relu(ref(input_ids=ids).logits[0])).amax(dim=0)
        nz = want.nonzero().flatten()
        assert 0 < len(nz) < 30522
        np.testing.assert_array_equal(terms, nz.numpy())
        np.testing.assert_allclose(weights, want[nz].numpy(), atol=2e-5, rtol=1e-4)


def test_splade_reranker_scores_are_dot_products_and_long_inputs_are_reported(splade_dir):
    d, _ = splade_dir
    rr = SpladeReranker(d, max_length=64)
    (q,) = rr.encode(["sparse retrieval"])
    vecs = rr.encode(DOCS)

    def dense(v):
        out = np.zeros(30522)
        out[v[0]] = v[1]
        return out

    want = [float(dense(q) @ dense(v)) for v in vecs]
    seen = []
    res = rr.rerank("sparse retrieval", DOCS, top_n=2, progress=lambda done, n: seen.append((done, n)))
    assert res.indices == sorted(range(len(DOCS)), key=lambda i: (-want[i], i))[:2]
    np.testing.assert_allclose(res.scores, [want[i] for i in res.indices], rtol=1e-5)
    assert res.truncated == [1] and seen[-1] == (len(DOCS), len(DOCS))
    with pytest.raises(InputTooLongError) as err:
        rr.rerank("sparse retrieval", DOCS, truncate=False)
    assert err.value.what == "document" and err.value.index == 1


def test_ensemble_fuses_standardised_member_scores_and_loads_from_a_directory(splade_dir, tmp_path):
    d, _ = splade_dir
    shutil.copytree(d, tmp_path / "ens" / "splade")
    specs = [{"model": str(V1), "dtype": "float32"}, {"model": "splade", "kind": "splade", "max_length": 64},
             {"model": "default", "dtype": "float32"}]
    weights, scale = [0.5, 0.2, 0.3], 2.5
    members = [tamis.Reranker(V1, dtype="float32"), SpladeReranker(d, max_length=64),
               tamis.Reranker(None, dtype="float32")]
    query = "what are learned sparse term weights"
    raw = [np.array([r.relevance_score for r in sorted(m.rerank(query, DOCS, return_documents=False).results,
                                                       key=lambda r: r.index)]) for m in members]
    want = scale * sum(w * standardize(s) for w, s in zip(weights, raw))

    EnsembleReranker(members, weights, scale, specs=specs).save(tmp_path / "ens", card="# test ensemble\n")
    ens = tamis.Reranker(tmp_path / "ens")
    assert isinstance(ens, EnsembleReranker) and ens.kind == "ensemble" and ens.name == "ens"
    assert "0.5*" in repr(ens) and [m.kind for m in ens.members] == ["cross-encoder", "splade", "embedding"]
    precision = _precision_of(ens)  # what `tamis bench` prints for an ensemble: its members' dtypes
    assert precision["dtype"] == "float32" and len(precision["members"]) == 3
    seen = []
    res = ens.rerank(query, DOCS, top_n=3, progress=lambda done, n: seen.append((done, n)))
    assert res.indices == sorted(range(len(DOCS)), key=lambda i: (-want[i], i))[:3]
    np.testing.assert_allclose(res.scores, [want[i] for i in res.indices], rtol=1e-4, atol=1e-5)
    assert res.results[0].document == DOCS[res.indices[0]] and res.total_tokens > 0
    assert seen[-1] == (3 * len(DOCS), 3 * len(DOCS))
    assert 1 in res.truncated  # the long document is cut by at least one member
    assert ens.rerank(query, []).results == []


def test_ensemble_bad_configs_are_one_line_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tamis-ensemble", "members": []}))
    with pytest.raises(CheckpointError, match="not a tamis ensemble"):
        EnsembleReranker.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tamis-ensemble", "members": [{"model": "x"}]}))
    with pytest.raises(CheckpointError, match="member 0 needs 'model' and 'weight'"):
        tamis.Reranker(tmp_path)
    with pytest.raises(ValueError, match="one weight per member"):
        EnsembleReranker([tamis.Reranker(V1)], [0.5, 0.5])
    with pytest.raises(ValueError, match="give specs"):
        EnsembleReranker([tamis.Reranker(V1)], [1.0]).save(tmp_path / "out")
