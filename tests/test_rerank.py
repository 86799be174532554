"""Reranker front door, cross-encoder parity, pair templates, embedding reranker, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

import tamis
from tamis.cli import main
from tamis.errors import InvalidInputError, ModelNotFoundError
from tamis.rerank import CrossEncoderReranker, EmbeddingReranker, shipped_reranker_dir
from tamis.tokenize import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
V1 = SHARED / "fixtures" / "jina-reranker-v1-tiny-like"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"../shared not found at {SHARED}")


@pytest.fixture(scope="module")
def v1() -> CrossEncoderReranker:
    rr = tamis.Reranker(V1, dtype="float32")  # golden logits: float32 whatever "auto" picks on this CPU
    assert isinstance(rr, CrossEncoderReranker)
    return rr


def test_cross_encoder_reproduces_fixture_logits_and_scores(v1):
    expected = json.loads((V1 / "expected_text.json").read_text())
    logits, tokens, truncated = v1.logits(expected["query"], expected["documents"])
    np.testing.assert_allclose(logits, np.array(expected["logits"]), atol=1e-4)
    np.testing.assert_allclose(v1.score(expected["query"], expected["documents"]), expected["scores.sigmoid"], atol=1e-5)
    assert truncated == [0, 1] and tokens > 0  # two pairs exceed the 64-token limit and are reported


def test_cross_encoder_rerank_end_to_end(v1):
    expected = json.loads((V1 / "expected_text.json").read_text())
    docs = [expected["documents"][0], {"text": expected["documents"][1]}, *expected["documents"][2:]]
    res = v1.rerank(expected["query"], docs, top_n=3)
    want = sorted(range(5), key=lambda i: (-expected["scores.sigmoid"][i], i))[:3]
    assert res.indices == want
    assert res.results[0].document is docs[want[0]]
    np.testing.assert_allclose(res.scores, [expected["scores.sigmoid"][i] for i in want], atol=1e-5)
    raw = v1.rerank(expected["query"], docs, return_documents=False, raw_scores=True)
    np.testing.assert_allclose(sorted(raw.scores, reverse=True), sorted(expected["logits"], reverse=True), atol=1e-4)
    assert all(r.document is None for r in raw)


def test_bf16_cross_encoder_keeps_its_head_in_float32(v1):
    """The logit is the score: a bf16 head would round it to bf16's 3 significant digits and tie documents
    whose float32 scores differ, so the pooler and classifier stay float32 with the checkpoint's values."""
    rr = CrossEncoderReranker(V1, dtype="bfloat16", compile=False)
    assert rr.model.bert.encoder.layer[0].attention.output.dense.weight.dtype == torch.bfloat16
    want = dict(v1.model.named_parameters())
    for prefix, head in rr.model.head_modules().items():
        for name, param in head.named_parameters():
            assert param.dtype == torch.float32
            assert torch.equal(param, want[f"{prefix}.{name}"]), name
    expected = json.loads((V1 / "expected_text.json").read_text())
    logits, _, _ = rr.logits(expected["query"], expected["documents"])
    assert not np.array_equal(logits, torch.from_numpy(logits).bfloat16().float().numpy())  # not on bf16's grid
    np.testing.assert_allclose(logits, expected["logits"], atol=0.1)  # the encoder's bf16 rounding, no more


def test_pair_template_bert_and_roberta_styles(v1):
    enc = v1.tokenizer.encode_pairs(["what is late chunking"], ["short"], max_length=64)[0]
    assert enc.ids[0] == v1.tokenizer.token_to_id("[CLS]") and enc.ids.count(v1.tokenizer.token_to_id("[SEP]")) == 2
    sep = enc.ids.index(v1.tokenizer.token_to_id("[SEP]"))
    assert set(enc.type_ids[: sep + 1]) == {0} and set(enc.type_ids[sep + 1 :]) == {1}
    # a RoBERTa-style tokenizer built here: <s> q </s></s> d </s>
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "query": 4, "doc": 5, "words": 6}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = Tokenizer(hf, {"pad_token": "<pad>", "model_max_length": 8})
    enc = tok.encode_pairs(["query"], ["doc words words words words words"], max_length=8)[0]
    assert enc.ids == [0, 4, 2, 2, 5, 6, 6, 2] and enc.truncated and enc.n_tokens == 11


def test_long_query_keeps_room_for_the_document(v1):
    query = "late chunking " * 60
    enc = v1.tokenizer.encode_pairs([query], ["the document text"], max_length=64)[0]
    assert len(enc.ids) == 64 and enc.truncated
    assert sum(enc.type_ids) >= 3  # the document's tokens (type 1) survive


def test_embedding_reranker_stays_reachable_by_name_and_says_so():
    for name in ("embedding", "all-MiniLM-L6-v2"):
        rr = tamis.Reranker(name)
        assert isinstance(rr, EmbeddingReranker) and rr.kind == "embedding" and rr.name == "all-MiniLM-L6-v2"
    assert "cosine similarity of all-MiniLM-L6-v2 embeddings" in repr(rr)
    docs = ["Paris is the capital of France.", "Bananas are rich in potassium.", "France's capital city is Paris."]
    res = rr.rerank("What is the capital of France?", docs)
    assert set(res.indices[:2]) == {0, 2} and res.indices[2] == 1
    emb = rr.embedder.embed(["What is the capital of France?", *docs])
    np.testing.assert_allclose(sorted(res.scores, reverse=True), sorted(emb[1:] @ emb[0], reverse=True), atol=1e-6)
    assert res.total_tokens > 0


def test_default_reranker_is_the_shipped_cross_encoder_only_when_the_package_holds_it(monkeypatch, tmp_path):
    """No shipped weights (today: no student has met the bar, see recipes/tiny_reranker.py): the default is
    the embedding reranker and the shipped name is a clear error. Weights in the package's slot: the
    default, "default" and the name all give that cross-encoder, with sentence-transformers' scores."""
    import tamis.rerank as rerank_pkg

    if shipped_reranker_dir() is None:
        assert isinstance(tamis.Reranker(), EmbeddingReranker)
        with pytest.raises(ModelNotFoundError, match="tamis-reranker-tiny"):
            tamis.Reranker("tamis-reranker-tiny")
    slot = tmp_path / "weights" / "tamis-reranker-tiny"
    shutil.copytree(V1, slot)
    monkeypatch.setattr(rerank_pkg, "_SHIPPED_DIR", slot)
    assert shipped_reranker_dir() == slot
    for rr in (tamis.Reranker(dtype="float32"), tamis.Reranker("default", dtype="float32"),
               tamis.Reranker("tamis-reranker-tiny", dtype="float32")):
        assert isinstance(rr, CrossEncoderReranker) and rr.kind == "cross-encoder" and rr.name == "tamis-reranker-tiny"
    assert isinstance(tamis.Reranker("embedding"), EmbeddingReranker)
    expected = json.loads((V1 / "expected_text.json").read_text())
    np.testing.assert_allclose(tamis.Reranker(dtype="float32").score(expected["query"], expected["documents"]),
                               expected["scores.sigmoid"], atol=1e-5)


@pytest.mark.skipif(shipped_reranker_dir() is None, reason="this install holds no shipped reranker weights")
def test_shipped_reranker_loads_in_sentence_transformers_with_the_same_scores():
    """The shipped tamis-reranker-tiny is an ordinary BertForSequenceClassification checkpoint: its card
    names data, recipe and licences, and sentence-transformers' CrossEncoder scores what tamis scores."""
    st = pytest.importorskip("sentence_transformers")
    shipped = shipped_reranker_dir()
    card = (shipped / "README.md").read_text()
    for needed in ("recipes/tiny_reranker.py", "nDCG@10", "ares-pairs", "Apache-2.0"):
        assert needed in card
    query = "what causes the northern lights"
    docs = ["Auroras happen when charged particles from the solar wind collide with gases in the upper atmosphere.",
            "The northern lights are best seen in winter from places like Tromso and Fairbanks.",
            "A recipe for lemon cake: butter, sugar, eggs, flour and the zest of two lemons.",
            "Solar storms push electrons along Earth's magnetic field lines toward the poles, where oxygen glows green."]
    ours = tamis.Reranker(dtype="float32").score(query, docs)
    theirs = st.CrossEncoder(str(shipped), device="cpu").predict([(query, d) for d in docs])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert np.argmin(ours) == 2  # the cake recipe is last


def test_ties_sorted_by_index_and_bad_inputs(v1):
    res = v1.rerank("q", ["same", "same", "same"])
    assert res.indices == [0, 1, 2]
    assert len(v1.rerank("q", [])) == 0
    with pytest.raises(InvalidInputError):
        v1.rerank("   ", ["doc"])
    with pytest.raises(InvalidInputError):
        v1.rerank("q", [{"title": "no text"}])
    with pytest.raises(InvalidInputError):
        v1.rerank("q", "not a list")


def test_rerank_cli_table_and_json(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "Cats purr when content."}\n{"id": "b", "text": "Interest rates rose."}\n')
    assert main(["rerank", "--query", "why do cats purr", "--documents", str(docs), "--json", "-q"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["relevance_score"] > rows[1]["relevance_score"]
    assert main(["rerank", "--query", "why do cats purr", "--documents", str(docs), "--top-n", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Cats purr" in out and "Interest" not in out


def test_embed_cli_jsonl_and_npy(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("first line\nsecond line\n")
    assert main(["embed", str(src), "--dimensions", "16", "-q"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and len(rows[0]["embedding"]) == 16
    direct = tamis.Embedder().embed(["first line", "second line"], dimensions=16)
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), direct, atol=1e-6)
    out = tmp_path / "v.npy"
    assert main(["embed", str(src), "-o", str(out), "--embedding-type", "ubinary", "-q"]) == 0
    assert np.load(out).shape == (2, 48)
    assert main(["embed", str(src), "--task", "nope", "-q"]) == 2
