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
from tamis.models import bert, packed, runtime
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


def test_auto_resolves_to_bf16_only_with_native_bf16(monkeypatch):
    """The run-time detection (torch's cpuinfo capabilities and /proc/cpuinfo, both mocked here) decides
    what "auto" means wherever it is read: an AVX2-only CPU (this machine's kind) stays float32, even when
    /proc/cpuinfo lists a bf16 flag that cpuinfo says is not usable; avx512_bf16 or amx_bf16 give bfloat16;
    an explicit dtype still wins."""
    from tamis import hardware

    def machine(caps: dict, proc_flags: set) -> None:
        monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda: ("Fake CPU", set(proc_flags), 2))
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps), raising=False)
        hardware.cpu_info.cache_clear()

    try:
        machine({"avx2": True, "fma3": True, "avx512_bf16": False, "amx_bf16": False}, {"avx2", "fma", "avx512_bf16"})
        assert not hardware.cpu_info().bf16_native
        assert resolve_dtype("auto") == torch.float32 and resolve_dtype(None) == torch.float32
        assert resolve_precision("auto").dtype == torch.float32
        assert "float32" in repr(tamis.Embedder())

        machine({"avx2": True, "avx512_bf16": True}, {"avx2"})
        assert hardware.cpu_info().bf16_native
        assert resolve_dtype("auto") == resolve_dtype(None) == torch.bfloat16
        p = resolve_precision("auto")
        assert p.dtype == torch.bfloat16 and "AVX-512 BF16" in p.reason
        emb = tamis.Embedder()
        assert emb.dtype == torch.bfloat16 and next(emb.model.parameters()).dtype == torch.bfloat16
        assert tamis.Embedder(dtype="float32").dtype == torch.float32
        assert resolve_dtype("float32") == torch.float32

        machine({"amx_bf16": True, "amx_tile": True}, set())
        p = resolve_precision("auto")
        assert p.dtype == torch.bfloat16 and "AMX" in p.reason
    finally:
        hardware.cpu_info.cache_clear()


def test_auto_is_the_default_of_every_inference_entry_point(monkeypatch):
    """Library functions and commands that load models for inference default to "auto" (training keeps
    float32 master weights: tamis.train pins it), and the front door follows the detection."""
    import inspect

    import tamis.scale
    from tamis import cli, hardware
    from tamis.evaluate import pipeline, suite
    from tamis.evaluate.bench import run_bench
    from tamis.rerank.cross_encoder import CrossEncoderReranker
    from tamis.rerank.listwise import ListwiseReranker
    from tamis.server import cli as server_cli

    for fn in (tamis.Embedder, tamis.Reranker, CrossEncoderReranker, ListwiseReranker, pipeline.load_embedder, pipeline.load_reranker,
               pipeline.evaluate, suite.rerank_suite, run_bench, server_cli.load_models, tamis.scale.EmbedBatch, tamis.scale.RerankBatch,
               tamis.scale.embed_dataset, tamis.scale.rerank_dataset, tamis.scale.embed_dataframe,
               tamis.scale.rerank_dataframe):
        assert inspect.signature(fn).parameters["dtype"].default == "auto", fn
    for argv in (["embed"], ["rerank", "--query", "q", "--documents", "d"], ["serve"], ["eval", "--data", "d"],
                 ["bench"], ["batch", "embed", "in", "out"], ["batch", "rerank", "in", "out"]):
        assert cli.parse_args(argv).dtype == "auto", argv
    for command in (["embed"], ["serve"], ["batch", "embed", "in", "out"]):
        assert cli.parse_args([*command, "--dtype", "int8"]).dtype == "int8"

    monkeypatch.setattr(hardware, "cpu_info", lambda: CPUInfo("Fake CPU", "x86_64", "AVX512", frozenset({"amx_bf16"})))
    rr = tamis.Reranker("embedding")
    assert rr.embedder.dtype == torch.bfloat16 and "AMX" in repr(rr.embedder)
    assert tamis.Reranker("embedding", dtype="float32").embedder.dtype == torch.float32


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


@pytest.mark.parametrize("style", ["bert", "roberta", "alibi-geglu", "mpnet"])
def test_packed_forward_matches_padded_on_random_models(style):
    """Every model variant (absolute / RoBERTa-offset / ALiBi positions / MPNet's relative position bias,
    plain / gated MLP, both classifier heads) gives the same hidden states and logits packed as padded, to
    1e-5 in float32."""
    if style == "roberta":
        cfg = _tiny_config(pad_token_id=1, position_offset=2, classifier_style="roberta", num_labels=1)
    elif style == "mpnet":
        cfg = _tiny_config(pad_token_id=1, position_offset=2, classifier_style="roberta", num_labels=1,
                           type_vocab_size=0, relative_attention_num_buckets=32, model_type="mpnet")
    elif style == "alibi-geglu":
        cfg = _tiny_config(position_embedding_type="alibi", feed_forward_type="geglu", num_labels=1)
    else:
        cfg = _tiny_config(num_labels=2)
    torch.manual_seed(1)
    model = bert.BertForSequenceClassification(cfg).eval()
    if style == "mpnet":  # a visible relative bias (nn.Embedding starts at N(0, 1) already; make sure)
        torch.nn.init.normal_(model.encoder_model.encoder.relative_attention_bias.weight, std=1.0)
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


@pytest.mark.parametrize("bias", ["none", "alibi", "mpnet"])
def test_matmul_attention_matches_sdpa(bias, monkeypatch):
    """The two-matmul attention of bf16 CPU inference equals SDPA: to 1e-5 in float32 (forced), with every
    bias kind and with runs split into several chunks; to bf16 rounding in bfloat16."""
    torch.manual_seed(0)
    heads, d = 4, 8
    lengths = [9, 9, 9, 6, 4, 4, 1]
    runs = bert.Packing(lengths).runs
    rel = torch.randn(32, heads) if bias == "mpnet" else None
    q, k, v = (torch.randn(sum(lengths), 3 * heads * d)[:, : heads * d] for _ in range(3))  # strided, as fused
    monkeypatch.setattr(packed, "_SCORES_PER_CHUNK", heads * 9 * 9 * 2)  # the 3 sequences of length 9: 2 chunks
    with torch.inference_mode():
        ref = packed._attend_runs(q, k, v, runs, heads, bias == "alibi", rel, matmul=False)
        got = packed._attend_runs(q, k, v, runs, heads, bias == "alibi", rel, matmul=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        got16 = packed._attend_runs(qb, kb, vb, runs, heads, bias == "alibi", rel, matmul=True)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), ref, rtol=0, atol=0.05)


def test_matmul_attention_only_for_bf16_inference_on_native_bf16(monkeypatch):
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    for native in (True, False):
        monkeypatch.setattr(packed, "cpu_info", lambda native=native: CPUInfo(
            "test", "x86_64", "AVX512", frozenset({"avx512_bf16"} if native else set())))
        with torch.inference_mode():
            assert packed.use_matmul_attention(x) is native
            assert not packed.use_matmul_attention(x.float())
        with torch.enable_grad():  # training keeps SDPA
            assert not packed.use_matmul_attention(x)


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


# ------------------------------------------------------------------------------------------- fused QKV
def test_fused_qkv_serves_the_packed_forward_only():
    """runtime.fuse_qkv: a non-persistent [3H, H] copy that the packed (inference) forward runs, equal to the three
    projections; the padded forward, which training runs, keeps query/key/value, so gradients reach them. Models
    loaded for inference have the copy; a trainable Embedder (what tamis.train trains) has none to go stale."""
    import copy

    torch.manual_seed(2)
    cfg = _tiny_config()
    model = bert.BertModel(cfg).eval()
    ref = copy.deepcopy(model)
    runtime.fuse_qkv(model)
    assert model.encoder.layer[0].attention.self.qkv_weight.shape == (3 * cfg.hidden_size, cfg.hidden_size)
    assert set(model.state_dict()) == set(ref.state_dict())  # checkpoints keep query/key/value
    ids = torch.randint(3, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, mask), ref(ids, mask), rtol=0, atol=1e-5)
        p = bert.Packing([7, 4])
        flat, types = torch.cat([ids[0], ids[1, :4]]), torch.zeros(11, dtype=torch.long)
        torch.testing.assert_close(model.forward_packed(flat, types, p), ref.forward_packed(flat, types, p),
                                   rtol=0, atol=1e-5)
    model(ids, mask).pow(2).mean().backward()
    q = model.encoder.layer[0].attention.self.query
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert tamis.Embedder(dtype="float32").model.encoder.layer[0].attention.self.qkv_weight is not None
    trainable = tamis.Embedder(dtype="float32", trainable=True)
    assert trainable.model.encoder.layer[0].attention.self.qkv_weight is None and trainable.compile_seconds is None


def test_adapter_rows_run_their_lora_deltas_with_fused_qkv():
    """A task adapter on query/value: rows with that task get the LoRA deltas (they run padded, through the
    query/key/value modules), rows without it run the packed fast path on the fused base weights."""
    emb = tamis.Embedder(dtype="float32")
    emb.add_adapter("t", target_modules=["query", "value"], r=4, alpha=8)
    assert emb.runs_packed([None, None]) and not emb.runs_packed([None, "t"])  # what the server plans on
    from tamis.models import lora

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(emb.model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    fused = emb.embed(TEXTS, task="t")
    base = emb.embed(TEXTS)
    np.testing.assert_allclose(base, tamis.Embedder(dtype="float32").embed(TEXTS), atol=1e-6)
    for layer in emb.model.encoder.layer:  # drop the fused copies: query/key/value modules only
        layer.attention.self.qkv_weight = None
    plain = emb.embed(TEXTS, task="t")
    assert np.abs(plain - base).max() > 1e-3  # the adapter changes the vectors...
    np.testing.assert_allclose(fused, plain, atol=1e-6)  # ...with or without the fused copy


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
    with pytest.raises(tamis.errors.InvalidInputError, match="int8"):
        q.add_adapter("t")


# ------------------------------------------------------------------------------------------- compile
def test_auto_compile_only_where_it_pays(monkeypatch):
    """compile="auto" compiles bf16 on a CPU with native bf16 only (where freezing was measured to pay);
    float32, int8, emulated bf16 and GPUs stay eager; TAMIS_COMPILE=0 turns auto off; explicit wins."""
    from tamis.errors import InvalidInputError
    from tamis.hardware import auto_compile, resolve_compile

    monkeypatch.delenv("TAMIS_COMPILE", raising=False)
    native, avx2 = _cpu("avx512_bf16"), _cpu("avx2")
    bf16 = resolve_precision("bfloat16")
    assert auto_compile("cpu", bf16, native)[0]
    assert not auto_compile("cpu", bf16, avx2)[0]
    assert not auto_compile("cpu", resolve_precision("float32"), native)[0]
    assert not auto_compile("cpu", resolve_precision("int8"), native)[0]
    assert not auto_compile("cuda", bf16, native)[0]
    assert resolve_compile(True, "cpu", resolve_precision("float32"), avx2) == (True, "explicit")
    assert not resolve_compile(False, "cpu", bf16, native)[0]
    monkeypatch.setenv("TAMIS_COMPILE", "0")
    wanted, why = resolve_compile("auto", "cpu", bf16, native)
    assert not wanted and "TAMIS_COMPILE" in why
    with pytest.raises(InvalidInputError, match="compile must be"):
        resolve_compile("sometimes", "cpu", bf16, native)


def test_compile_is_auto_by_default_everywhere():
    import inspect

    from tamis import cli
    from tamis.evaluate.bench import run_bench
    from tamis.rerank.cross_encoder import CrossEncoderReranker

    for fn in (tamis.Embedder, CrossEncoderReranker, run_bench):
        assert inspect.signature(fn).parameters["compile"].default == "auto", fn
    for argv in (["embed"], ["rerank", "--query", "q", "--documents", "d"], ["serve"], ["bench"]):
        assert cli.parse_args(argv).compile == "auto", argv
    assert cli.parse_args(["bench", "--compile"]).compile == "on"
    assert cli.parse_args(["serve", "--compile", "off"]).compile == "off"
    assert cli.compile_kwargs("auto") == {} and cli.compile_kwargs("off") == {"compile": False}
    assert cli.compile_kwargs("on") == {"compile": True}


def test_a_failed_auto_compile_runs_eager_and_an_explicit_one_raises(monkeypatch):
    """No C++ compiler or an inductor error must not make a model unusable under "auto"."""
    def broken(model, device="cpu"):
        model.encode_packed = lambda *a: None  # what a half-done compile might leave behind
        raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(runtime, "compile_packed", broken)
    monkeypatch.setattr("tamis.models.runtime.resolve_compile", lambda *a, **k: (True, "test"))
    emb = tamis.Embedder(dtype="float32")
    assert emb.compile_seconds is None and "compile failed" in emb.compile_reason and "compiled=False" in repr(emb)
    assert emb.embed(["still works"]).shape == (1, emb.dimension)
    with pytest.raises(RuntimeError, match="no working C\\+\\+ compiler"):
        tamis.Embedder(dtype="float32", compile=True)


def _has_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cxx(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_frozen_forward_matches_eager():
    """The compiled packed forward (inductor, frozen weights, dynamic token count) gives eager's outputs on
    batches of other sizes and lengths than its warm-up, for a BERT encoder and an MPNet-style cross-encoder
    (relative position bias through the attention op, RoBERTa head)."""
    import copy

    torch.manual_seed(0)
    for classification in (False, True):
        cfg = (_tiny_config(pad_token_id=1, position_offset=2, classifier_style="roberta", num_labels=1,
                            type_vocab_size=0, relative_attention_num_buckets=32, model_type="mpnet")
               if classification else _tiny_config())
        model = (bert.BertForSequenceClassification(cfg) if classification else bert.BertModel(cfg)).eval()
        runtime.fuse_qkv(model)
        eager = copy.deepcopy(model)
        seconds = runtime.compile_packed(model, "cpu")
        assert seconds > 0
        for lengths in ([5], [9, 9, 3], [12, 7, 7, 7, 2]):
            packing = bert.Packing(lengths)
            ids = torch.randint(3, cfg.vocab_size, (packing.total,))
            with torch.inference_mode():
                got = model.forward_packed(ids, torch.zeros_like(ids), packing)
                want = eager.forward_packed(ids, torch.zeros_like(ids), packing)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert runtime.compile_packed(model, "cpu") == 0.0  # compiled once per model
