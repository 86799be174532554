"""The shipped default reranker (tamis-reranker-tiny): what is in the package, that sentence-transformers'
CrossEncoder reads it with the same scores, and that the library and the server use it by default."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

import tamis
from tamis.rerank import DEFAULT_RERANKER, CrossEncoderReranker, EmbeddingReranker, shipped_reranker_dir

SHIPPED = shipped_reranker_dir()
QUERY = "what causes the northern lights"
DOCS = [
    "Auroras are caused by charged particles from the solar wind colliding with gases in the upper atmosphere.",
    "The northern lights, or aurora borealis, appear when solar particles excite oxygen and nitrogen atoms.",
    "Northern Lights is also the name of a cannabis strain and of several hotels in Norway.",
    "Banana bread is best made with overripe bananas, butter, sugar and a pinch of salt.",
    "Geomagnetic storms triggered by coronal mass ejections make auroras visible farther south.",
    "",  # an empty document still gets a score
]


def test_shipped_files_are_small_float16_with_a_card():
    files = {f.name for f in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".ckpt")) for n in files)  # safetensors only
    assert (SHIPPED / "model.safetensors").stat().st_size < 40e6
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["num_hidden_layers"] <= 3
    card = (SHIPPED / "README.md").read_text()
    for needed in ("ares-pairs", "scifact", "Apache-2.0", "CC BY-NC", "recipes/tiny_reranker.py", "trec-dl21",
                   "noveleval", "lyft", "nDCG@10"):
        assert needed.lower() in card.lower(), needed


def test_sentence_transformers_cross_encoder_gives_the_same_scores():
    st = pytest.importorskip("sentence_transformers")
    ours = tamis.Reranker().score(QUERY, DOCS)
    theirs = st.CrossEncoder(str(SHIPPED), device="cpu").predict([(QUERY, d) for d in DOCS])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert int(np.argmax(ours)) in (0, 1) and int(np.argmin(ours[:5])) == 3


def test_default_everywhere_and_embedding_reranker_by_name():
    from tamis.server.cli import load_models

    assert tamis.Reranker().name == DEFAULT_RERANKER
    embedders, rerankers = load_models(["default"], ["default", "embedding"])
    assert isinstance(rerankers[DEFAULT_RERANKER], CrossEncoderReranker)
    emb_rr = rerankers["all-MiniLM-L6-v2"]
    assert isinstance(emb_rr, EmbeddingReranker) and emb_rr.embedder is embedders["all-MiniLM-L6-v2"]
