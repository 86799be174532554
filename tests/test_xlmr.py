"""jina-embeddings-v3 (XLM-RoBERTa + rotary + task LoRA) against the golden fixture in ../shared/fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tamis.errors import CheckpointError, UnknownTaskError, UnsupportedModelError
from tamis.models.loading import load_config
from tamis.models.xlmr import (
    StackedLoRALinear,
    XLMRConfig,
    XLMRobertaLoRA,
    apply_rotary,
    rotary_cos_sin,
    route_adapters,
)
from tamis.tokenize import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "jina-embeddings-v3-tiny"
TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]

pytestmark = pytest.mark.skipif(
    not FIXTURE.is_dir(),
    reason=f"golden fixture {FIXTURE} is absent (expected ../shared beside the repo root)",
)


@pytest.fixture(scope="module")
def model() -> XLMRobertaLoRA:
    return XLMRobertaLoRA.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "expected.safetensors"))


def _max_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return (out.float() - ref)[keep].abs().max().item()


# ---------------------------------------------------------------------------------------------- config
def test_config_from_fixture(model: XLMRobertaLoRA) -> None:
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (300, 64, 2, 4)
    assert c.intermediate_size == 128 and c.rotary_emb_base == 20000.0 and c.lora_scaling == 0.25
    assert model.adapter_names == TASKS
    assert [model.adapter_index(t) for t in TASKS] == [0, 1, 2, 3, 4]
    assert c.task_instructions["retrieval.query"] == "Represent the query for retrieving evidence documents: "
    assert c.matryoshka_dimensions == [32, 64, 128, 256, 512, 768, 1024]
    with pytest.raises(UnknownTaskError, match="retrieval.query"):
        model.adapter_index("retrieval")


def test_config_rejects_absolute_positions() -> None:
    config = load_config(FIXTURE)
    with pytest.raises(UnsupportedModelError, match="rotary"):
        XLMRConfig.from_dict({**config, "position_embedding_type": "absolute"})


# ---------------------------------------------------------------------------------------------- hidden states
@pytest.mark.parametrize("entry", ["no_adapter", *TASKS, "mixed"])
def test_last_hidden_state_matches_fixture(model: XLMRobertaLoRA, expected: dict, entry: str) -> None:
    ids, mask = expected["input_ids"], expected["attention_mask"]
    if entry == "no_adapter":
        adapter_ids = None
    elif entry == "mixed":
        adapter_ids = expected["adapter_mask.mixed"]
        assert len(set(adapter_ids.tolist())) > 1
    else:
        adapter_ids = torch.full((ids.shape[0],), model.adapter_index(entry), dtype=torch.long)
    with torch.inference_mode():
        out = model(ids, mask, adapter_ids)
    assert out.shape == expected[f"last_hidden_state.{entry}"].shape
    assert _max_err(out, expected[f"last_hidden_state.{entry}"], mask) <= 1e-4


@pytest.mark.parametrize("adapter_ids", [[-1, 2, -1, 0], [3, -1, 3, -1], [-1, -1, -1, -1], [4, 1, 4, 1]])
def test_rows_without_adapter_and_partial_mixes(
    model: XLMRobertaLoRA, expected: dict, adapter_ids: list
) -> None:
    """Each row matches the fixture entry of its own adapter (-1 = base weights), whatever its neighbours use."""
    ids, mask = expected["input_ids"], expected["attention_mask"]
    with torch.inference_mode():
        out = model(ids, mask, torch.tensor(adapter_ids))
    for row, a in enumerate(adapter_ids):
        ref = expected["last_hidden_state." + ("no_adapter" if a < 0 else TASKS[a])]
        assert _max_err(out[row], ref[row], mask[row]) <= 1e-4, (row, a)


def test_row_alone_equals_row_in_padded_batch(model: XLMRobertaLoRA, expected: dict) -> None:
    ids, mask = expected["input_ids"], expected["attention_mask"]
    row = int(mask.sum(1).argmin())  # the most padded row
    n = int(mask[row].sum())
    with torch.inference_mode():
        batch = model(ids, mask, [1, 1, 1, 1])[row, :n]
        alone = model(ids[row : row + 1, :n], mask[row : row + 1, :n], [1])[0]
    assert (batch - alone).abs().max().item() <= 1e-5


def test_bad_adapter_ids(model: XLMRobertaLoRA, expected: dict) -> None:
    ids, mask = expected["input_ids"], expected["attention_mask"]
    with pytest.raises(ValueError, match="adapter_ids"):
        model(ids, mask, [0, 1, 2, 5])
    with pytest.raises(ValueError, match="adapter_ids"):
        model(ids, mask, [0, 1])


def test_route_plans() -> None:
    assert route_adapters(None, 3, 5, torch.device("cpu")) is None
    assert route_adapters([-1, -1], 2, 5, torch.device("cpu")) is None
    r = route_adapters([2, 2, 2], 3, 5, torch.device("cpu"))
    assert r is not None and r.rows is None and r.single == 2
    r = route_adapters([-1, 3, 0], 3, 5, torch.device("cpu"))
    assert r is not None and r.rows.tolist() == [1, 2] and r.ids.tolist() == [3, 0] and r.single is None


def test_lora_linear_equals_merged_weights() -> None:
    """Independent check of the LoRA algebra: per-row delta == x @ (W + s * B[t] @ A[t])^T + b."""
    torch.manual_seed(0)
    lin = StackedLoRALinear(12, 20, n_adapters=3, rank=4, scaling=0.25)
    for p in lin.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(4, 5, 12)
    adapter_ids = [2, -1, 0, 2]
    with torch.no_grad():
        out = lin(x, route_adapters(adapter_ids, 4, 3, torch.device("cpu")))
        for row, t in enumerate(adapter_ids):
            w = lin.weight if t < 0 else lin.weight + 0.25 * lin.lora_B[t] @ lin.lora_A[t]
            torch.testing.assert_close(out[row], x[row] @ w.T + lin.bias, atol=1e-4, rtol=1e-5)


def test_mlp_uses_exact_erf_gelu(model: XLMRobertaLoRA) -> None:
    """The tiny fixture cannot tell erf GELU from its tanh approximation (3e-6 apart), so pin it here."""
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    act = model.layers[0].mlp.act(x)
    torch.testing.assert_close(act, 0.5 * x * (1 + torch.erf(x / 2**0.5)), atol=1e-12, rtol=0)
    assert (act - F.gelu(x, approximate="tanh")).abs().max() > 1e-4


def test_pooler_applies_adapter(model: XLMRobertaLoRA, expected: dict) -> None:
    ids, mask = expected["input_ids"], expected["attention_mask"]
    dense = model.pooler.dense
    with torch.inference_mode():
        h = model(ids, mask, [3, 3, 3, 3])
        pooled = model.pool(h, [3, 3, 3, 3])
        w = dense.weight + 0.25 * dense.lora_B[3] @ dense.lora_A[3]
        torch.testing.assert_close(pooled, torch.tanh(h[:, 0] @ w.T + dense.bias), atol=1e-5, rtol=1e-5)
        assert (pooled - model.pool(h)).abs().max() > 1e-4  # the adapter changes the pooler output


# ---------------------------------------------------------------------------------------------- text level
def _encode(model: XLMRobertaLoRA, tok: Tokenizer, texts: list[str], task: str | None) -> torch.Tensor:
    prefix = model.config.task_instructions.get(task, "") if task else ""
    encs = tok.encode([prefix + t for t in texts], max_length=tok.model_max_length)
    batch = tok.pad(encs)
    adapter_ids = None if task is None else [model.adapter_index(task)] * len(texts)
    with torch.inference_mode():
        h = model(batch.input_ids, batch.attention_mask, adapter_ids).float()
    m = batch.attention_mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


@pytest.mark.parametrize("task", [None, *TASKS])
def test_text_level_encode_matches_reference(model: XLMRobertaLoRA, task: str | None) -> None:
    ref = json.loads((FIXTURE / "expected_text.json").read_text())
    tok = Tokenizer.from_dir(FIXTURE, load_config(FIXTURE))
    assert tok.model_max_length == ref["tokenizer_model_max_length"] == 48
    pooled = _encode(model, tok, ref["texts"], task)
    name = "encode.no_task" if task is None else f"encode.{task}"
    got = F.normalize(pooled, dim=-1)
    assert (got - torch.tensor(ref[name])).abs().max().item() <= 1e-5
    if task is not None:
        got32 = F.normalize(pooled[:, :32], dim=-1)
        assert (got32 - torch.tensor(ref[f"{name}.dim32"])).abs().max().item() <= 1e-5


def test_prefix_and_truncation_matter(model: XLMRobertaLoRA) -> None:
    """Guards the text-level test: without the prefix the retrieval.query vectors differ, and text 4 is cut."""
    ref = json.loads((FIXTURE / "expected_text.json").read_text())
    tok = Tokenizer.from_dir(FIXTURE, load_config(FIXTURE))
    encs = tok.encode(ref["texts"], max_length=tok.model_max_length)
    assert encs[4].truncated and len(encs[4]) == 48
    ids = [model.adapter_index("retrieval.query")] * len(ref["texts"])
    batch = tok.pad(encs)
    with torch.inference_mode():
        h = model(batch.input_ids, batch.attention_mask, ids)
    m = batch.attention_mask.unsqueeze(-1).float()
    no_prefix = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert (no_prefix - torch.tensor(ref["encode.retrieval.query"])).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------- loading
def _write_checkpoint(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    state = load_file(str(FIXTURE / "model.safetensors"))
    del state["roberta.encoder.layers.1.mlp.fc1.parametrizations.weight.0.lora_B"]
    with pytest.raises(CheckpointError, match=r"missing \['layers\.1\.mlp\.fc1\.lora_B'\]"):
        XLMRobertaLoRA.from_pretrained(_write_checkpoint(tmp_path, state))


def test_renamed_tensor_is_named(tmp_path: Path) -> None:
    state = load_file(str(FIXTURE / "model.safetensors"))
    state["roberta.pooler.dense.parametrizations.weight.orig"] = state.pop(
        "roberta.pooler.dense.parametrizations.weight.original"
    )
    with pytest.raises(CheckpointError) as info:
        XLMRobertaLoRA.from_pretrained(_write_checkpoint(tmp_path, state))
    assert "pooler.dense.weight" in str(info.value)  # missing
    assert "pooler.dense.parametrizations.weight.orig" in str(info.value)  # unexpected


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = load_file(str(FIXTURE / "model.safetensors"))
    key = "roberta.encoder.layers.0.mixer.Wqkv.bias"
    state[key] = state[key][:96].clone()
    with pytest.raises(CheckpointError, match=r"layers\.0\.mixer\.Wqkv\.bias"):
        XLMRobertaLoRA.from_pretrained(_write_checkpoint(tmp_path, state))


def test_bfloat16_close_to_float32(model: XLMRobertaLoRA, expected: dict) -> None:
    bf16 = XLMRobertaLoRA.from_pretrained(FIXTURE, dtype="bfloat16")
    assert bf16.layers[0].mixer.Wqkv.lora_A.dtype == torch.bfloat16
    ids, mask = expected["input_ids"], expected["attention_mask"]
    adapter_ids = expected["adapter_mask.mixed"]
    with torch.inference_mode():
        out = bf16(ids, mask, adapter_ids)
    assert out.dtype == torch.bfloat16
    ref = expected["last_hidden_state.mixed"]
    assert _max_err(out, ref, mask) <= 0.15
    m = mask.unsqueeze(-1).float()
    cos = F.cosine_similarity((out.float() * m).sum(1), (ref * m).sum(1), dim=-1)
    assert cos.min().item() >= 0.999


# ---------------------------------------------------------------------------------------------- rotary
def test_rotary_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    d, base = 16, 20000.0
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    pos = torch.tensor([0, 3, 7, 7 + 100, 3 + 100, 0 + 100])
    cos, sin = rotary_cos_sin(pos, d, base, torch.float64)
    rq, rk = apply_rotary(q.expand(6, d), cos, sin), apply_rotary(k.expand(6, d), cos, sin)
    # (q at 7, k at 3) == (q at 107, k at 103); (q at 3, k at 0) == (q at 103, k at 100)
    assert torch.allclose(rq[2] @ rk[1], rq[3] @ rk[4], atol=1e-8)
    assert torch.allclose(rq[1] @ rk[0], rq[4] @ rk[5], atol=1e-8)
    assert not torch.allclose(rq[2] @ rk[1], rq[2] @ rk[0], atol=1e-3)
    # position 0 is the identity; the pairing is non-interleaved (dim i with dim i + d/2)
    assert torch.allclose(rq[0], q)
    theta = torch.tensor(3.0, dtype=torch.float64)  # position 3 x the first frequency (base**0 = 1)
    assert torch.allclose(rq[1][0], q[0] * torch.cos(theta) - q[d // 2] * torch.sin(theta))
