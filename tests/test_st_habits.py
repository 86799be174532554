"""sentence-transformers habits (issue 36, item 4): ``Embedder.encode`` and ``predict`` / ``rank`` on rerankers
give what ``SentenceTransformer.encode`` / ``CrossEncoder.predict`` / ``CrossEncoder.rank`` give, called the
same way, so code moves over by changing one import."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tamis
from tamis.errors import InvalidInputError
from tamis.models.loading import bundled_default_dir
from tamis.train.cross_encoder import init_cross_encoder, save_cross_encoder

st = pytest.importorskip("sentence_transformers")

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "Bananas are rich in potassium."]
QUERY = "What is the capital of France?"
DOCS = ["Berlin is the capital of Germany.", "Paris is the capital and largest city of France.", "Bananas.",
        "France is a country in Western Europe."]


@pytest.fixture(scope="module")
def pair() -> tuple[tamis.Embedder, object]:
    return tamis.Embedder(dtype="float32", compile=False), st.SentenceTransformer(str(bundled_default_dir()),
                                                                                     device="cpu")


@pytest.fixture(scope="module")
def cross(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    d = tmp_path_factory.mktemp("ce") / "model"
    save_cross_encoder(init_cross_encoder("all-MiniLM-L6-v2", layers=[0, 1], seed=0), d, max_length=128)
    return tamis.Reranker(d, dtype="float32"), st.CrossEncoder(str(d), device="cpu")


def test_encode_matches_sentence_transformers(pair) -> None:
    ours, theirs = pair
    for kw in ({}, {"normalize_embeddings": True}, {"batch_size": 1, "show_progress_bar": False},
               {"truncate_dim": 64}, {"prompt": "query: "}):
        a, b = ours.encode(TEXTS, **kw), theirs.encode(TEXTS, **kw)
        assert isinstance(a, np.ndarray) and a.shape == b.shape and a.dtype == np.float32, kw
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=str(kw))
    # the model's Normalize runs at full width, before the cut: a cut vector is shorter than 1, as there
    assert float(np.linalg.norm(ours.encode(TEXTS[0], truncate_dim=64))) < 0.99
    one = ours.encode(TEXTS[0])  # one string: one vector
    assert one.shape == (384,)
    np.testing.assert_allclose(one, theirs.encode(TEXTS[0]), atol=2e-5)
    t = ours.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (3, 384)
    rows = ours.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 3 and all(isinstance(r, torch.Tensor) for r in rows)
    for precision in ("binary", "ubinary"):
        np.testing.assert_array_equal(ours.encode(TEXTS, precision=precision), theirs.encode(TEXTS, precision=precision))
    with pytest.raises(InvalidInputError, match="batch_size"):
        ours.encode(TEXTS, batch_size=0)
    with pytest.raises(InvalidInputError, match="output_value"):
        ours.encode(TEXTS, output_value="token_embeddings")


def test_cross_encoder_predict_and_rank_match_sentence_transformers(cross) -> None:
    ours, theirs = cross
    pairs = [(QUERY, d) for d in DOCS] + [("why do cats purr", DOCS[2]), (QUERY, DOCS[0])]
    a, b = ours.predict(pairs), theirs.predict(pairs)
    assert isinstance(a, np.ndarray) and a.shape == (6,)
    np.testing.assert_allclose(a, b, atol=1e-5)
    single = ours.predict((QUERY, DOCS[1]))  # one pair: one score
    assert np.ndim(single) == 0 and abs(float(single) - float(theirs.predict((QUERY, DOCS[1])))) < 1e-5
    assert isinstance(ours.predict(pairs, convert_to_tensor=True), torch.Tensor)
    for kw in ({}, {"top_k": 2}, {"return_documents": True}, {"top_k": 3, "return_documents": True}):
        got, exp = ours.rank(QUERY, DOCS, **kw), theirs.rank(QUERY, DOCS, **kw)
        assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in exp], kw
        assert [set(r) for r in got] == [set(r) for r in exp], kw
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in exp], atol=1e-5)
        if kw.get("return_documents"):
            assert [r["text"] for r in got] == [r["text"] for r in exp]


def test_every_reranker_has_predict_and_rank() -> None:
    rr = tamis.Reranker()  # the embedding reranker
    scores = rr.predict([(QUERY, d) for d in DOCS])
    ranked = rr.rank(QUERY, DOCS, top_k=2)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable")[:2])
