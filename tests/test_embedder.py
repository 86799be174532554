"""Embedder: parity with references, output types, Matryoshka, truncation, late chunking, loading."""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tamis
from tamis.batching import plan_batches
from tamis.embed import assign_tokens, join_chunks, sentence_spans
from tamis.errors import InputTooLongError, InvalidInputError, ModelNotFoundError, UnknownTaskError
from tamis.models.bert import alibi_bias, alibi_slopes
from tamis.models.loading import resolve_model_dir

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIX = SHARED / "fixtures"
DATA = SHARED / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"../shared not found at {SHARED}")


@pytest.fixture(scope="module")
def minilm() -> tamis.Embedder:
    return tamis.Embedder(dtype="float32")  # golden values are float32; "auto" may pick bf16


def scifact_docs(n: int) -> list[str]:
    docs = []
    with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt") as f:
        for line in f:
            d = json.loads(line)
            docs.append((d["title"] + " " + d["text"]).strip())
            if len(docs) == n:
                break
    return docs


# ---------------------------------------------------------------------------- parity
@pytest.mark.slow
def test_minilm_matches_sentence_transformers_on_scifact(minilm):
    from sentence_transformers import SentenceTransformer

    docs = scifact_docs(500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tamis.TruncationWarning)
        ours = minilm.embed(docs, show_progress=False)
    ref = SentenceTransformer(str(resolve_model_dir(None)), device="cpu").encode(
        docs, batch_size=32, normalize_embeddings=True, convert_to_numpy=True
    )
    cos = (ours * ref).sum(axis=1)
    assert cos.min() >= 0.99999, cos.min()


def test_jina_v2_tiny_text_level():
    """The reference JinaBERT encode() tokenizes with max_length=8192 (ALiBi: no position table), so the
    texts of 93 and 210 tokens are embedded whole although tokenizer_config says 64."""
    expected = json.loads((FIX / "jina-embeddings-v2-tiny" / "expected_text.json").read_text())
    emb = tamis.Embedder(FIX / "jina-embeddings-v2-tiny", dtype="float32")
    assert emb.family == "bert" and emb.pooling == "mean" and emb.max_length == 8192
    res = emb.embed_result(expected["texts"], normalized=False)
    assert res.truncated == [] and res.token_counts == [18, 93, 62, 6, 210]
    np.testing.assert_allclose(res.embeddings, np.array(expected["encode.mean"]), atol=1e-4)
    normed = emb.embed(expected["texts"])
    np.testing.assert_allclose(normed, np.array(expected["encode.mean.normalized"]), atol=1e-5)
    with pytest.warns(tamis.TruncationWarning):
        cut = tamis.Embedder(FIX / "jina-embeddings-v2-tiny", max_length=64, dtype="float32").embed_result(expected["texts"])
    assert cut.truncated == [1, 4]


V3 = FIX / "jina-embeddings-v3-tiny"
V3_TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]


@pytest.fixture(scope="module")
def v3() -> tamis.Embedder:
    return tamis.Embedder(V3, dtype="float32")


def test_jina_v3_tiny_every_task_and_matryoshka(v3):
    expected = json.loads((V3 / "expected_text.json").read_text())
    texts = expected["texts"]
    assert v3.tasks == V3_TASKS and v3.query_task == "retrieval.query" and v3.passage_task == "retrieval.passage"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tamis.TruncationWarning)
        np.testing.assert_allclose(v3.embed(texts), np.array(expected["encode.no_task"]), atol=1e-5)
        for task in V3_TASKS:
            np.testing.assert_allclose(v3.embed(texts, task=task), np.array(expected[f"encode.{task}"]), atol=1e-5)
            np.testing.assert_allclose(
                v3.embed(texts, task=task, dimensions=32), np.array(expected[f"encode.{task}.dim32"]), atol=1e-5
            )


def test_jina_v3_tiny_mixed_adapters_in_one_batch(v3):
    """Rows of different tasks share one forward pass and each matches its single-task result."""
    expected = json.loads((V3 / "expected_text.json").read_text())
    texts = expected["texts"][:4]
    tasks = ["retrieval.query", None, "text-matching", "separation"]
    encodings = [v3.tokenize([t], task)[0] for t, task in zip(texts, tasks)]
    mixed = v3.finalize(v3.forward(encodings, tasks))
    for i, task in enumerate(tasks):
        key = f"encode.{task}" if task else "encode.no_task"
        np.testing.assert_allclose(mixed[i], np.array(expected[key][i]), atol=1e-5)


def test_unknown_task_lists_valid_ones(v3, minilm):
    with pytest.raises(UnknownTaskError) as err:
        v3.embed(["x"], task="retrieval")
    for t in V3_TASKS:
        assert t in str(err.value)
    with pytest.raises(UnknownTaskError, match="no tasks"):
        minilm.embed(["x"], task="retrieval.query")


# ---------------------------------------------------------------------------- output options
def test_matryoshka_is_prefix_renormalised(minilm):
    texts = ["late chunking keeps context", "a second, longer sentence about rerankers and retrieval"]
    full = minilm.embed(texts, normalized=False)
    cut = minilm.embed(texts, dimensions=64)
    ref = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, ref, atol=1e-6)
    assert np.allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    for bad in (0, -3, 385, 2.5):
        with pytest.raises(InvalidInputError):
            minilm.embed(texts, dimensions=bad)


def test_binary_ubinary_base64_decode_back(minilm):
    texts = ["binary quantisation keeps the sign bits", "short"]
    out = minilm.embed(texts, embedding_type=["float", "binary", "ubinary", "base64"])
    x = out["float"]
    signs = (x > 0).astype(np.uint8)
    assert out["ubinary"].dtype == np.uint8 and out["ubinary"].shape == (2, 384 // 8)
    np.testing.assert_array_equal(np.unpackbits(out["ubinary"], axis=1), signs)
    assert out["binary"].dtype == np.int8
    np.testing.assert_array_equal(np.unpackbits((out["binary"].astype(np.int16) + 128).astype(np.uint8), axis=1), signs)
    decoded = np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in out["base64"]])
    np.testing.assert_array_equal(decoded, x)
    with pytest.raises(InvalidInputError):
        minilm.embed(texts, embedding_type="int4")


def test_truncate_false_raises_with_index_and_counts(minilm):
    long = "word " * 400
    with pytest.raises(InputTooLongError) as err:
        minilm.embed(["fine", long], truncate=False)
    assert err.value.index == 1 and err.value.limit == 256 and err.value.n_tokens == 402
    assert "input 1 has 402 tokens" in str(err.value)
    with pytest.warns(tamis.TruncationWarning, match=r"indices \[1\]"):
        res = minilm.embed_result(["fine", long])
    assert res.truncated == [1] and res.token_counts[1] == 256


def test_batching_restores_input_order(minilm):
    texts = [("alpha " * n).strip() for n in (30, 1, 12, 5, 60, 2)]
    together = minilm.embed(texts)
    alone = np.concatenate([minilm.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_large_inputs_go_by_slab_with_the_next_tokenized_beside_the_model(minilm, monkeypatch):
    import threading

    import tamis.embed as embed_mod

    texts = [("alpha " * n).strip() for n in (30, 1, 12, 5, 60, 2, 9, 7)] + ["word " * 400]
    monkeypatch.setattr(embed_mod, "TOKENIZE_SLAB", 10**6)
    with pytest.warns(tamis.TruncationWarning, match=r"indices \[8\]"):
        whole = minilm.embed_result(texts)
    threads: list[str] = []
    tokenize = minilm.tokenize

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(minilm, "tokenize", spy)
    monkeypatch.setattr(embed_mod, "TOKENIZE_SLAB", 3)
    monkeypatch.setattr(embed_mod, "tokenize_beside_model", lambda device: True)
    with pytest.warns(tamis.TruncationWarning, match=r"indices \[8\]"):
        slabs = minilm.embed_result(texts)
    assert len(threads) == 3 and threads[0] == threading.current_thread().name
    assert all(t.startswith("tamis-tokenize") for t in threads[1:])
    np.testing.assert_allclose(slabs.embeddings, whole.embeddings, atol=1e-5)
    assert slabs.token_counts == whole.token_counts and slabs.truncated == whole.truncated == [8]
    threads.clear()
    monkeypatch.setattr(embed_mod, "tokenize_beside_model", lambda device: False)
    with pytest.warns(tamis.TruncationWarning):
        np.testing.assert_allclose(minilm.embed(texts), whole.embeddings, atol=1e-5)
    assert threads == [threading.current_thread().name] * 3
    # truncate=False tokenizes everything first: the over-long input fails before any model work
    monkeypatch.setattr(minilm, "forward", lambda *a, **k: pytest.fail("model ran before the error"))
    with pytest.raises(InputTooLongError):
        minilm.embed(texts, truncate=False)


def test_embed_chunks_yields_in_order_with_chunk_relative_truncation(minilm):
    texts = [("alpha " * n).strip() for n in (30, 1, 12, 5, 60)] + ["word " * 400, "beta"]
    chunks = list(minilm.embed_chunks(texts, 3, dimensions=64))
    assert [start for start, _ in chunks] == [0, 3, 6]
    assert [r.truncated for _, r in chunks] == [[], [2], []]
    with pytest.warns(tamis.TruncationWarning):
        one_pass = minilm.embed(texts, dimensions=64)
    np.testing.assert_allclose(np.concatenate([r.embeddings for _, r in chunks]), one_pass, atol=1e-5)
    with pytest.raises(InvalidInputError, match="chunk_size"):
        next(minilm.embed_chunks(texts, 0))


def test_tokenize_beside_model_only_with_a_spare_cpu(monkeypatch):
    import tamis.hardware as hw

    assert hw.tokenize_beside_model("cuda")
    monkeypatch.setattr(hw, "_available_cpus", lambda: torch.get_num_threads())
    assert not hw.tokenize_beside_model("cpu")
    monkeypatch.setattr(hw, "_available_cpus", lambda: torch.get_num_threads() + 1)
    assert hw.tokenize_beside_model("cpu")


def test_plan_batches_respects_budget_and_covers_all():
    lengths = [5, 300, 17, 17, 2, 120, 64, 64, 64, 1]
    batches = plan_batches(lengths, max_tokens=256, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 256
    assert batches[0] == [1]  # longest first, alone because it exceeds the budget


# ---------------------------------------------------------------------------- late chunking
DOC = (
    "Berlin is the capital and largest city of Germany. Its more than 3.85 million inhabitants make it "
    "the most populous city of the European Union. The city is also one of the states of Germany! "
    "Is it the third smallest state in the country by area?"
)


def test_sentence_spans_tile_the_document():
    spans = sentence_spans(DOC)
    assert "".join(DOC[s:e] for s, e in spans) == DOC
    assert len(spans) == 4
    assert DOC[spans[1][0] :].startswith("Its more than 3.85")  # "3.85" is not a sentence end


def test_late_chunk_spans_and_context(minilm):
    chunks = minilm.late_chunk(DOC)
    assert [c.text for c in chunks] == [DOC[s:e] for s, e in sentence_spans(DOC)]
    assert all(DOC[c.start : c.end] == c.text for c in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(DOC)
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    alone = minilm.embed([c.text for c in chunks])
    for c, v in zip(chunks, alone):
        assert abs(np.linalg.norm(c.embedding) - 1) < 1e-5
        assert float(c.embedding @ v) < 0.999  # the late vector carries the document's context
    # late chunking over API-style inputs gives the same vectors as late_chunk on the joined text
    api = minilm.embed([c.text.strip() for c in chunks], late_chunking=True)
    np.testing.assert_allclose(api, np.stack([c.embedding for c in chunks]), atol=1e-5)


def test_late_chunking_one_chunk_equals_plain_embedding(minilm, v3):
    text = "Late chunking pools each chunk's tokens after one pass."
    np.testing.assert_allclose(minilm.embed([text], late_chunking=True), minilm.embed([text]), atol=1e-6)
    short = "Late chunking keeps context."
    assert v3.count_tokens([short], task="retrieval.passage")[0] <= v3.max_length
    np.testing.assert_allclose(
        v3.embed([short], task="retrieval.passage", late_chunking=True), v3.embed([short], task="retrieval.passage"),
        atol=1e-6,
    )


def test_late_chunking_token_assignment_prefix_and_specials(v3):
    chunks = ["First part.", "Second part here.", "Third."]
    text, spans = join_chunks(chunks)
    assert text == "First part. Second part here. Third."
    prefix = v3.prefix("retrieval.query")
    enc = v3.tokenizer.encode([prefix + text], max_length=None)[0]
    owner = assign_tokens(enc, spans, prefix + text, len(prefix))
    assert owner[0] == 0 and owner[-1] == 2  # <s> and instruction go to the first chunk, </s> to the last
    assert owner == sorted(owner)  # chunks own consecutive token runs
    for j in range(len(spans)):
        p = len(prefix)
        toks = [k for k, o in enumerate(owner) if o == j and not enc.special[k] and enc.offsets[k][1] > p]
        covered = "".join(text[max(enc.offsets[k][0] - p, 0) : enc.offsets[k][1] - p] for k in toks)
        assert covered.replace(" ", "") == chunks[j].replace(" ", "")
        prefix_tokens = [k for k, o in enumerate(owner) if not enc.special[k] and enc.offsets[k][1] <= p]
        assert prefix_tokens and all(owner[k] == 0 for k in prefix_tokens)


def test_late_chunk_long_document_uses_windows():
    emb = tamis.Embedder(max_length=32)
    doc = " ".join(f"Sentence number {i} talks about topic {i % 5}." for i in range(30))
    n_tokens = emb.count_tokens([doc])[0]
    assert n_tokens > 3 * 32
    chunks = emb.late_chunk(doc, overlap=8)
    assert len(chunks) == 30 and "".join(c.text for c in chunks) == doc
    assert sum(c.n_tokens for c in chunks) == n_tokens  # every token pooled once, nothing truncated
    fixed = emb.late_chunk(doc, strategy="fixed", chunk_size=20, overlap=8)
    assert "".join(c.text for c in fixed) == doc and all(c.n_tokens <= 22 for c in fixed)


def test_bad_inputs(minilm):
    with pytest.raises(InvalidInputError):
        minilm.embed([1, 2])
    with pytest.raises(InvalidInputError):
        minilm.late_chunk("   ")
    with pytest.raises(InvalidInputError):
        minilm.embed(["a", "   ", "b"], late_chunking=True)
    assert minilm.embed([]).shape == (0, 384)


# ---------------------------------------------------------------------------- loading
def test_missing_model_error_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        tamis.Embedder("jinaai/jina-embeddings-v3")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "models--jinaai--jina-embeddings-v3") in msg and "HF_HUB_OFFLINE=1" in msg
    assert "\n" not in msg and "tamis pull jinaai/jina-embeddings-v3" in msg


def test_hf_cache_layout_resolves_offline(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--jinaai--jina-embeddings-v2-tiny"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(FIX / "jina-embeddings-v2-tiny", snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    emb = tamis.Embedder("jinaai/jina-embeddings-v2-tiny")
    assert emb.name == "jinaai/jina-embeddings-v2-tiny" and emb.model_dir == snap
    assert emb.embed(["hello"]).shape == (1, 48)


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIX / "jina-embeddings-v2-tiny", d)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="pickle checkpoints are never loaded"):
        tamis.Embedder(d)


def test_bfloat16_close_to_float32(minilm):
    texts = ["bfloat16 halves the memory", "and stays close in cosine"]
    bf = tamis.Embedder(dtype="bfloat16").embed(texts)
    assert ((bf * minilm.embed(texts)).sum(axis=1) > 0.99).all()


def test_alibi_slopes_and_sign():
    assert alibi_slopes(6).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    twelve = [2.0**-i for i in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    np.testing.assert_allclose(alibi_slopes(12).numpy(), np.array(twelve, dtype=np.float32))
    bias = alibi_bias(4, 5)
    assert (bias <= 0).all() and torch.all(torch.diagonal(bias[0], dim1=-2, dim2=-1) == 0)
    assert torch.equal(bias, bias.transpose(-1, -2))
