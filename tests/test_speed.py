"""The fast inference path: dtype="auto", hardware detection, packed (unpadded) forward == padded forward."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tamis
from tamis.embed import pool, pool_packed
from tamis.hardware import CPUInfo, auto_dtype, cpu_info, resolve_precision
from tamis.models import bert
from tamis.models.loading import resolve_dtype

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIX = SHARED / "fixtures"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"../shared not found at {SHARED}")

TEXTS = [
    "short",
    "a somewhat longer sentence about proteins and cells",
    "x " * 100,
    "another one",
    "short too",  # same length as "another one": a run of two sequences in one attention call
    "Zinc finger proteins bind DNA. " * 5,
]


def _cpu(*flags: str) -> CPUInfo:
    return CPUInfo(model="test CPU", arch="x86_64", capability="AVX2", flags=frozenset(flags), physical_cores=2)


# ------------------------------------------------------------------------------------------ dtype
def test_auto_dtype_follows_native_bf16():
    assert auto_dtype("cpu", _cpu("avx2", "fma"))[0] == torch.float32
    assert auto_dtype("cpu", _cpu("avx2", "avx512f", "avx512_bf16"))[0] == torch.bfloat16
    dtype, why = auto_dtype("cpu", _cpu("avx2", "amx_tile", "amx_bf16"))
    assert dtype == torch.bfloat16 and "AMX" in why
    assert not _cpu("avx512_vnni").bf16_native and _cpu("avx512_vnni").int8_native


def test_explicit_dtype_wins_and_bad_names_fail():
    native = _cpu("avx512_bf16")
    assert resolve_precision("float32", "cpu", native).dtype == torch.float32
    assert resolve_precision(torch.float16, "cpu", native).dtype == torch.float16
    assert resolve_precision("auto", "cpu", native).dtype == torch.bfloat16
    assert resolve_precision(None, "cpu", _cpu("avx2")).dtype == torch.float32
    p = resolve_precision("int8", "cpu", native)
    assert p.int8 and p.dtype == torch.float32 and p.name == "int8"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_precision("int8", "cuda")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_precision("float8", "cpu")
    assert resolve_dtype("auto", "cpu") == auto_dtype("cpu")[0]


def test_this_cpu_is_described():
    info = cpu_info()
    assert info.model and info.physical_cores >= 1
    line = info.describe()
    assert info.model in line and ("native bf16" in line)
    assert set(info.to_dict()) >= {"model", "features", "bf16_native", "physical_cores"}
    # auto never picks bf16 on a CPU without bf16 instructions
    assert auto_dtype("cpu", info)[0] == (torch.bfloat16 if info.bf16_native else torch.float32)


# ----------------------------------------------------------------------------------------- packing
def test_packing_runs_and_positions():
    p = bert.Packing([3, 3, 2, 1, 1])
    assert p.total == 10 and p.starts == [0, 3, 6, 8, 9]
    assert p.runs.tolist() == [[0, 2, 3], [6, 1, 2], [8, 2, 1]]
    assert p.position_ids().tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 0]
    assert p.first_rows().tolist() == [0, 3, 6, 8, 9]
    with pytest.raises(ValueError):
        bert.Packing([2, 0])


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "last"])
def test_pool_packed_matches_padded_pool(mode):
    torch.manual_seed(0)
    lengths = [5, 3, 3, 1]
    padded = torch.randn(len(lengths), 5, 8)
    mask = torch.zeros(len(lengths), 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    packed = torch.cat([padded[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(pool_packed(packed, lengths, mode), pool(padded, mask, mode), rtol=0, atol=1e-6)


def _tiny_config(**kw) -> bert.BertConfig:
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, layer_norm_eps=1e-12)
    base.update(kw)
    return bert.BertConfig(**base)


@pytest.mark.parametrize("style", ["bert", "roberta", "alibi-geglu"])
def test_packed_forward_matches_padded_on_random_models(style):
    """Every model variant (absolute / RoBERTa-offset / ALiBi positions, plain / gated MLP, both classifier
    heads) gives the same hidden states and logits packed as padded, to 1e-5 in float32."""
    if style == "roberta":
        cfg = _tiny_config(pad_token_id=1, position_offset=2, classifier_style="roberta", num_labels=1)
    elif style == "alibi-geglu":
        cfg = _tiny_config(position_embedding_type="alibi", feed_forward_type="geglu", num_labels=1)
    else:
        cfg = _tiny_config(num_labels=2)
    torch.manual_seed(1)
    model = bert.BertForSequenceClassification(cfg).eval()
    lengths = [9, 9, 6, 4, 4, 4, 1]
    ids = [torch.randint(3, 100, (n,)) for n in lengths]
    types = [torch.randint(0, 2, (n,)) for n in lengths]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), cfg.pad_token_id)
    type_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n], type_ids[i, :n], mask[i, :n] = ids[i], types[i], 1
    packing = bert.Packing(lengths)
    with torch.inference_mode():
        padded_logits = model(input_ids, mask, type_ids)
        packed_logits = model.forward_packed(torch.cat(ids), torch.cat(types), packing)
        padded_hidden = model.encoder_model(input_ids, mask, type_ids)
        packed_hidden = model.encoder_model.forward_packed(torch.cat(ids), torch.cat(types), packing)
    torch.testing.assert_close(packed_logits, padded_logits, rtol=0, atol=1e-5)
    real = torch.cat([padded_hidden[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(packed_hidden, real, rtol=0, atol=1e-5)


@needs_shared
@pytest.mark.parametrize("model", [None, "jina-embeddings-v2-tiny"])
def test_embedder_packed_matches_padded(model):
    emb = tamis.Embedder(FIX / model if model else None, dtype="float32")
    assert emb.packed
    enc = emb.tokenize(TEXTS)
    packed = emb.forward(enc)
    emb.packed = False
    padded = emb.forward(enc)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert emb.forward([]).shape == (0, emb.dimension)


@needs_shared
def test_cross_encoder_packed_matches_padded():
    from tamis.rerank.cross_encoder import CrossEncoderReranker

    rr = CrossEncoderReranker(FIX / "jina-reranker-v1-tiny-like", dtype="float32")
    assert rr.packed
    packed, tokens, _ = rr.logits("what binds DNA", TEXTS)
    rr.packed = False
    padded, tokens2, _ = rr.logits("what binds DNA", TEXTS)
    np.testing.assert_allclose(packed, padded, rtol=0, atol=1e-5)
    assert tokens == tokens2


def test_repr_shows_the_dtype_choice():
    emb = tamis.Embedder()
    text = repr(emb)
    assert "auto:" in text and "packed=True" in text
    assert ("bfloat16" if cpu_info().bf16_native else "float32") in text


# -------------------------------------------------------------------------------------------- int8
def test_int8_option_reports_its_quality():
    """dtype="int8" (dynamic per-channel int8 Linears through torch's dynamic quantisation): near float32,
    but measured below the bf16 bar (min cosine ~0.95 on SciFact + short texts, README "Speed"), so "auto"
    never picks it."""
    fp32 = tamis.Embedder(dtype="float32")
    q = tamis.Embedder(dtype="int8")
    assert q.precision.int8 and "int8" in repr(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = fp32.embed(TEXTS), q.embed(TEXTS)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.9, cos
    assert cos.min() < 0.99999  # it really is quantised
