"""tamis's compiled CPU kernels (``tamis.models.kernels``): the fused bf16 attention against float32 SDPA, its
input checks, its fallbacks, and its place in the packed forward."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import tamis
from tamis.hardware import CPUInfo, cpu_info
from tamis.models import bert, kernels, packed

AVAILABLE = kernels.attention_bf16() is not None
needs_kernel = pytest.mark.skipif(
    not AVAILABLE, reason=f"attention_bf16 needs AVX-512 BF16 and a C++ compiler; this CPU: {cpu_info().describe()}")


@pytest.fixture
def fresh_load(tmp_path, monkeypatch):
    """An empty kernel cache and no memoised load, restored afterwards."""
    monkeypatch.setenv("TAMIS_CACHE", str(tmp_path))
    kernels._load.cache_clear()
    yield
    kernels._load.cache_clear()


def _packed_qkv(lengths: list[int], heads: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v as column slices of one fused [T, 3H] projection (row stride 3H), like the model's."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3 * heads * d, generator=g) * 1.5
    h = heads * d
    return qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:], bert.Packing(lengths).runs


@needs_kernel
@pytest.mark.parametrize("heads,d", [(12, 32), (4, 64), (2, 128)])
def test_fused_attention_matches_float32_sdpa(heads, d, monkeypatch):
    """Every run length the blocking has edges for (1; row blocks of 256/d and their tails; 16-key blocks and their
    tails; several key groups):
    each output row within bf16 rounding of float32 SDPA, and closer to it than torch's bf16 path."""
    lengths = [300, 77, 77, 64, 17, 16, 5, 3, 1, 1]
    q, k, v, runs = _packed_qkv(lengths, heads, d)
    h = heads * d
    with torch.inference_mode():
        ref = packed._attend_runs(q, k, v, runs, heads, False, matmul=False)
        qkv = torch.cat([q, k, v], dim=1).bfloat16()
        qs, ks, vs = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]
        got = kernels.attention_bf16()(qs, ks, vs, runs, heads, d**-0.5)
        monkeypatch.setattr(packed, "attention_bf16", lambda: None)  # torch's bf16 path, the one the kernel replaces
        torch_bf16 = packed._attend_runs(qs, ks, vs, runs, heads, False, matmul=True)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape and got.is_contiguous()
    err = (got.float() - ref).abs().max().item()
    assert err < 0.05
    assert err <= (torch_bf16.float() - ref).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got.float(), ref, dim=-1)
    assert cos.min().item() > 0.9999


@needs_kernel
def test_fused_attention_is_what_packed_bf16_attention_runs(monkeypatch):
    q, k, v, runs = _packed_qkv([40, 40, 7], 12, 32)
    calls = []
    real = kernels.attention_bf16()
    monkeypatch.setattr(packed, "attention_bf16", lambda: lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(packed, "cpu_info", lambda: CPUInfo("test", "x86_64", "AVX512", frozenset({"avx512_bf16"})))
    with torch.inference_mode():
        packed._attend_runs(*(t.bfloat16() for t in (q, k, v)), runs, 12, False)  # matmul path: the kernel, once
        assert len(calls) == 1
        packed._attend_runs(*(t.bfloat16() for t in (q, k, v)), runs, 12, True)  # ALiBi: torch's path
        packed._attend_runs(q, k, v, runs, 12, False)  # float32: SDPA
    assert len(calls) == 1


@needs_kernel
@pytest.mark.parametrize("bad,message", [
    (lambda q, k, v, r: (q.float(), k, v, r, 12), "bf16 CPU tensors"),
    (lambda q, k, v, r: (q, k[:-1], v, r, 12), "shapes differ"),
    (lambda q, k, v, r: (q.t(), k.t(), v.t(), r, 12), "unit column stride"),
    (lambda q, k, v, r: (q, k, v, r.int(), 12), "int64"),
    (lambda q, k, v, r: (q, k, v, torch.tensor([[0, 2, 40]]), 12), "outside the 40 rows"),
    (lambda q, k, v, r: (q, k, v, r, 5), "not divisible"),
    (lambda q, k, v, r: (q, k, v, r, 24), "head size must be 32, 64 or 128, not 16"),
])
def test_fused_attention_rejects_bad_input_in_one_line(bad, message):
    q, k, v, runs = _packed_qkv([40], 12, 32)
    args = bad(*(t.bfloat16() for t in (q, k, v)), runs)
    with pytest.raises(RuntimeError, match=message) as info:
        kernels.attention_bf16()(*args, 32**-0.5)
    assert message in str(info.value).splitlines()[0]


@needs_kernel
def test_packed_bf16_embeddings_with_the_kernel_match_torch_attention(monkeypatch):
    """The default model in bf16, eager: the kernel's vectors against torch's bf16 attention path's."""
    texts = ["short", "a longer sentence about zinc finger proteins binding DNA " * 6, "another one", "x " * 90]
    emb = tamis.Embedder(dtype="bfloat16", compile=False)
    calls = []
    real = kernels.attention_bf16()
    monkeypatch.setattr(packed, "attention_bf16", lambda: lambda *a: calls.append(a) or real(*a))
    with_kernel = emb.embed(texts)
    assert len(calls) == emb.config["num_hidden_layers"]  # the model did run it: once per layer of one forward
    monkeypatch.setattr(packed, "attention_bf16", lambda: None)
    without = emb.embed(texts)
    assert (with_kernel * without).sum(-1).min() > 0.9999


def test_kernels_off_by_environment(fresh_load, monkeypatch):
    monkeypatch.setenv("TAMIS_KERNELS", "0")
    assert kernels.attention_bf16() is None
    assert kernels.why_off("attention_bf16") == "TAMIS_KERNELS=0"
    assert "TAMIS_KERNELS=0" in kernels.attention_path()


def test_kernel_is_not_loaded_on_a_cpu_without_avx512_bf16(fresh_load, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_info", lambda: CPUInfo("test", "x86_64", "AVX2", frozenset({"avx2", "fma"})))
    assert kernels.attention_bf16() is None
    assert kernels.why_off("attention_bf16") == "the CPU lacks avx512_bf16, avx512bw, avx512f, avx512vl"


@pytest.mark.skipif(not kernels._NEEDS <= cpu_info().flags,
                    reason="the build is attempted only on a CPU with AVX-512 BF16")
def test_failed_build_falls_back_with_a_warning(fresh_load, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'broken.cpp:1:1: error: no compiler here' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setattr(kernels, "_registered", lambda op: False)  # as in a process that has not loaded it yet
    with caplog.at_level(logging.WARNING, logger="tamis.models.kernels"):
        assert kernels.attention_bf16() is None
    assert "did not build" in caplog.text and "error: no compiler here" in caplog.text
    assert kernels.why_off("attention_bf16").startswith("build failed: cxx failed: broken.cpp:1:1: error")
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written is left to be loaded later


@needs_kernel
def test_kernel_builds_into_the_cache_once(fresh_load, tmp_path):
    source = Path(kernels.__file__).with_name("attention_bf16.cpp")
    built = kernels._build(source, kernels._compiler())
    assert built.parent == tmp_path / "kernels" and built.name.startswith("attention_bf16-")
    stamp = built.stat().st_mtime_ns
    assert kernels._build(source, kernels._compiler()) == built
    assert built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert list(built.parent.iterdir()) == [built]  # no temporary left beside it
