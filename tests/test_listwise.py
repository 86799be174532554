"""Listwise reranker (jina-reranker-v3 layout): native Qwen3 + projector against the golden fixture."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tamis.errors import CheckpointError, InvalidInputError
from tamis.models.qwen3 import JinaListwiseModel, Qwen3Config
from tamis.rerank.listwise import ListwiseReranker, build_prompt, plan_blocks

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "jina-reranker-v3-tiny"

pytestmark = pytest.mark.skipif(
    not FIXTURE.is_dir(), reason=f"golden fixture {FIXTURE} is absent (it lives in the shared folder)"
)


@pytest.fixture(scope="module")
def expected_text() -> dict:
    return json.loads((FIXTURE / "expected_text.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def rr() -> ListwiseReranker:
    return ListwiseReranker(FIXTURE, dtype="float32")


@pytest.fixture(scope="module")
def rr_small_blocks() -> ListwiseReranker:
    return ListwiseReranker(FIXTURE, block_size=4, dtype="float32")


def scores_by_index(results) -> np.ndarray:
    out = np.full(len(results), np.nan)
    for r in results:
        out[r.index] = r.relevance_score
    return out


# ---------------------------------------------------------------------------------------------- prompt


def test_prompt_byte_for_byte(rr, expected_text):
    prompt = rr.build_prompt(expected_text["query"], expected_text["prompt_documents"])
    assert prompt.encode("utf-8") == expected_text["prompt"].encode("utf-8")
    # the special-token string inside document 1 was removed, so exactly one per document remains
    assert prompt.count("<|embed_token|>") == 3 and prompt.count("<|rerank_token|>") == 1


def test_prompt_sanitises_query_and_ids_restart():
    p = build_prompt("q<|rerank_token|>x<|embed_token|>", ["a", "b"], instruction="be strict")
    assert p.count("<|rerank_token|>") == 1 and p.count("<|embed_token|>") == 2
    assert "relevance to query: qx\n<instruct>\nbe strict\n</instruct>\n" in p
    assert (
        '<passage id="0">\na<|embed_token|>\n</passage>\n<passage id="1">\nb<|embed_token|>\n</passage>\n'
        in p
    )
    assert "<query>\nqx<|rerank_token|>\n</query><|im_end|>" in p


# ---------------------------------------------------------------------------------------------- token level


def test_token_level_matches_fixture(rr, expected_text, expected):
    ids = rr.tokenize_prompt(expected_text["prompt"])
    assert ids == expected["input_ids"][0].tolist()
    # ids of the read-out tokens come from the tokenizer (500 / 501 in the tiny model)
    assert (rr.doc_token_id, rr.query_token_id) == (500, 501)

    docs, q = rr.model.rank_embeddings(expected["input_ids"], rr.doc_token_id, rr.query_token_id)
    assert docs.shape == (3, 512) and q.shape == (512,)
    assert torch.allclose(docs, expected["doc_embeds"][0], atol=1e-4, rtol=0)
    assert torch.allclose(q, expected["query_embeds"][0, 0], atol=1e-4, rtol=0)

    out = rr.forward_block(expected_text["query"], expected_text["prompt_documents"])
    np.testing.assert_allclose(out.scores, expected["scores"][0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.doc_embeds, expected["doc_embeds"][0].numpy(), atol=1e-4, rtol=0)
    assert out.n_tokens == expected["input_ids"].shape[1]


def test_left_padded_batch_equals_single_rows(rr, expected):
    """Batch > 1 with left padding: positions start at 0 at each row's first real token."""
    ids = expected["input_ids"][0]
    short = ids[:200].clone()
    short[-1] = rr.query_token_id  # a shorter sequence with one query token at the end
    pad = rr.tokenizer.pad_id
    width = ids.numel()
    batch = torch.full((2, width), pad, dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    batch[0], mask[0] = ids, 1
    batch[1, width - short.numel() :], mask[1, width - short.numel() :] = short, 1

    with torch.inference_mode():
        hidden = rr.model(batch, mask)
        single_long = rr.model(ids[None])[0]
        single_short = rr.model(short[None])[0]
        rows = rr.model.rank_embeddings_batch(batch, rr.doc_token_id, rr.query_token_id, mask)
        row1 = rr.model.rank_embeddings(short, rr.doc_token_id, rr.query_token_id)
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(hidden[0], single_long, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[1, width - short.numel() :], single_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[0][0], expected["doc_embeds"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(rows[1][0], row1[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[1][1], row1[1], atol=1e-5, rtol=0)


def test_matches_transformers_qwen3_with_left_padding(rr, expected):
    """Independent reference for the decoder: transformers' Qwen3Model (test-time only)."""
    transformers = pytest.importorskip("transformers")
    raw = json.loads((FIXTURE / "config.json").read_text())
    cfg = transformers.Qwen3Config(
        **{
            k: raw[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "rms_norm_eps",
                "rope_theta",
                "max_position_embeddings",
            )
        },
        attn_implementation="eager",
    )
    ref = transformers.Qwen3Model(cfg).eval()
    state = {
        k[len("model.") :]: v
        for k, v in load_file(str(FIXTURE / "model.safetensors")).items()
        if k.startswith("model.")
    }
    ref.load_state_dict(state, strict=True)

    ids = expected["input_ids"][0][:120]
    n_pad = 17
    batch = torch.cat([torch.full((n_pad,), rr.tokenizer.pad_id), ids[: ids.numel() - n_pad]])
    batch = torch.stack([ids, batch])
    mask = torch.ones_like(batch)
    mask[1, :n_pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        want = ref(input_ids=batch, attention_mask=mask, position_ids=positions).last_hidden_state
        got = rr.model(batch, mask)
    keep = mask.bool()
    assert (got[keep] - want[keep]).abs().max().item() <= 1e-4


def test_causal(rr, expected):
    ids = expected["input_ids"][0]
    changed = ids.clone()
    changed[300:] = torch.flip(changed[300:], dims=[0])
    with torch.inference_mode():
        a, b = rr.model(ids[None])[0], rr.model(changed[None])[0]
    assert torch.equal(a[:300], b[:300])
    assert not torch.allclose(a[300:], b[300:])


# ---------------------------------------------------------------------------------------------- rerank


@pytest.mark.parametrize("case", ["rerank6", "rerank130"])
def test_rerank_matches_reference(rr, expected_text, case):
    ref = expected_text[case]
    res = rr.rerank(expected_text["query"], ref["documents"], show_progress=False)
    assert res.indices == ref["order"]
    np.testing.assert_allclose(scores_by_index(res), ref["scores_by_index"], atol=1e-5, rtol=0)
    assert res.model == "jina-reranker-v3-tiny"
    assert [r.document for r in res] == [ref["documents"][i] for i in ref["order"]]
    if case == "rerank130":
        # 125 + 5 documents; the last one is longer than 2048 tokens and is cut
        assert res.extras["blocks"] == 2
        assert res.truncated == [129]
    else:
        assert res.extras["blocks"] == 1 and res.truncated == []


def test_total_tokens_and_truncation(rr, expected_text):
    docs = expected_text["rerank130"]["documents"][-2:]  # a normal document and the >2048-token one
    res = rr.rerank(expected_text["query"], docs)
    long_ids = rr.tokenizer.raw([docs[1]])[0].ids
    assert len(long_ids) > 2048 and res.truncated == [1]
    kept = rr.tokenizer.decode(long_ids[:2048])
    assert docs[1].startswith(kept) and len(kept) < len(docs[1])
    prompt = rr.build_prompt(expected_text["query"], [docs[0], kept])
    assert res.total_tokens == len(rr.tokenize_prompt(prompt))
    out = rr.forward_block(expected_text["query"], [docs[0], kept])
    np.testing.assert_allclose(scores_by_index(res), out.scores, atol=1e-5, rtol=0)


def test_single_block_scores_equal_forward_cosines(rr, expected_text):
    docs = expected_text["rerank6"]["documents"]
    res = rr.rerank(expected_text["query"], docs, return_embeddings=True)
    out = rr.forward_block(expected_text["query"], docs)
    np.testing.assert_allclose(scores_by_index(res), out.scores, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(res.extras["embeddings"], out.doc_embeds)
    np.testing.assert_allclose(res.extras["query_embedding"], out.query_embed, atol=1e-6, rtol=0)


def test_multi_block_uses_weighted_query(rr_small_blocks, expected_text):
    rr = rr_small_blocks
    query = expected_text["query"]
    docs = expected_text["rerank6"]["documents"] + expected_text["rerank130"]["documents"][:4]  # 10 docs
    res = rr.rerank(query, docs, return_embeddings=True, show_progress=False)
    assert res.extras["blocks"] == 3 and len(res) == 10

    blocks = [docs[0:4], docs[4:8], docs[8:10]]
    outs = [rr.forward_block(query, b) for b in blocks]
    weights = np.array([((1.0 + o.scores) / 2.0).max() for o in outs], dtype=np.float64)
    q = sum(w * o.query_embed.astype(np.float64) for w, o in zip(weights, outs)) / weights.sum()
    d = np.concatenate([o.doc_embeds for o in outs]).astype(np.float64)
    want = d @ q / (np.linalg.norm(d, axis=1) * np.linalg.norm(q))
    got = scores_by_index(res)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.extras["query_embedding"], q, atol=1e-5, rtol=1e-5)
    # the combined query differs from each block's own one, so per-block cosines would be wrong
    per_block = np.concatenate([o.scores for o in outs])
    assert np.abs(per_block - got).max() > 1e-3
    assert res.total_tokens == sum(o.n_tokens for o in outs)


def test_plan_blocks():
    assert plan_blocks([10] * 7, 5, 10_000, block_size=3) == [[0, 1, 2], [3, 4, 5], [6]]
    # capacity = 100 - 2*10 = 80; flush once it drops to <= max_doc_length (30)
    assert plan_blocks([20, 20, 20, 5, 5, 40], 10, 100, block_size=125, max_doc_length=30) == [
        [0, 1, 2],
        [3, 4, 5],
    ]
    assert plan_blocks([], 3, 100) == []


def _shuffle_max_change(rr: ListwiseReranker, query: str, docs: list[str], seeds: range) -> float:
    base = scores_by_index(rr.rerank(query, docs, show_progress=False))
    worst = 0.0
    for seed in seeds:
        perm = list(range(len(docs)))
        random.Random(seed).shuffle(perm)
        s = scores_by_index(rr.rerank(query, [docs[i] for i in perm], show_progress=False))
        back = np.empty_like(s)
        back[perm] = s
        worst = max(worst, float(np.abs(back - base).max()))
    return worst


def test_shuffle_sensitivity_is_bounded(rr, rr_small_blocks, expected_text):
    """Causal attention makes listwise scores depend on the order; on the tiny random model we measured
    max |change| 0.1099 (6 docs, one block) and 0.1030 (10 docs, blocks of 4) over seeds 0-3 (scores span
    about 0.35..0.47). The bounds guard against regressions (e.g. a lost causal mask or query weighting)."""
    query = expected_text["query"]
    one_block = _shuffle_max_change(rr, query, expected_text["rerank6"]["documents"], range(4))
    multi = _shuffle_max_change(
        rr_small_blocks, query, expected_text["rerank130"]["documents"][:10], range(4)
    )
    assert 0.0 < one_block <= 0.12
    assert 0.0 < multi <= 0.12


def test_documents_as_objects_top_n_and_no_documents(rr, expected_text):
    docs = [{"text": t, "id": i} for i, t in enumerate(expected_text["rerank6"]["documents"])]
    res = rr.rerank(expected_text["query"], docs, top_n=2)
    assert res.indices == expected_text["rerank6"]["order"][:2]
    assert res[0].document is docs[res[0].index]
    res = rr.rerank(expected_text["query"], docs, top_n=3, return_documents=False)
    assert len(res) == 3 and all(r.document is None for r in res)
    empty = rr.rerank(expected_text["query"], [])
    assert len(empty) == 0 and empty.total_tokens == 0


@pytest.mark.parametrize("query", ["", "   "])
def test_empty_query_is_rejected(rr, query):
    with pytest.raises(InvalidInputError):
        rr.rerank(query, ["a document"])


def test_bad_document_is_rejected(rr):
    with pytest.raises(InvalidInputError, match="document 1"):
        rr.rerank("query", ["ok", {"body": "no text field"}])


def test_config_from_dict():
    raw = json.loads((FIXTURE / "config.json").read_text())
    cfg = Qwen3Config.from_dict(raw)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 1_000_000.0 and cfg.rms_norm_eps == 1e-6


@pytest.mark.parametrize(
    "edit",
    ["drop", "rename", "extra", "shape"],
)
def test_key_map_failure_raises_checkpoint_error(tmp_path, edit):
    model_dir = tmp_path / "broken"
    shutil.copytree(FIXTURE, model_dir, copy_function=shutil.copyfile)
    model_dir.chmod(0o755)
    state = load_file(str(model_dir / "model.safetensors"))
    if edit == "drop":
        del state["model.norm.weight"]
    elif edit == "rename":
        state["projector.1.weight"] = state.pop("projector.2.weight")
    elif edit == "extra":
        state["model.layers.2.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].clone()
    else:
        state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError):
        JinaListwiseModel.from_pretrained(model_dir)


def test_bfloat16_runs_and_stays_close(expected_text):
    rr16 = ListwiseReranker(FIXTURE, dtype="bfloat16")
    assert rr16.model.dtype == torch.bfloat16
    ref = expected_text["rerank6"]
    res = rr16.rerank(expected_text["query"], ref["documents"], return_embeddings=True)
    got = scores_by_index(res)
    assert np.isfinite(got).all() and res.extras["embeddings"].dtype == np.float32
    # measured max |bf16 - fp32 reference| on this fixture: 0.0046 (rerank6) and 0.0045 (rerank130)
    assert np.abs(got - np.array(ref["scores_by_index"])).max() < 0.01


def test_front_door_picks_listwise(expected_text):
    import tamis

    rr = tamis.Reranker(str(FIXTURE), dtype="float32")
    assert isinstance(rr, ListwiseReranker) and rr.kind == "listwise"
    assert rr.max_length == 131072
    ref = expected_text["rerank6"]
    res = rr.rerank(expected_text["query"], ref["documents"])
    assert res.indices == ref["order"]
    np.testing.assert_allclose(scores_by_index(res), ref["scores_by_index"], atol=1e-5, rtol=0)
