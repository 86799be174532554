"""Listwise training (jina-reranker-v3's objective): each loss term against a hand computation, GGUF
import of a Llama decoder against transformers, the dual query token in one prompt builder, and a tiny
end-to-end run that lowers the loss and reloads through tamis.Reranker."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tamis
from tamis.models.qwen3 import JinaListwiseModel, Qwen3Config, Qwen3Model
from tamis.rerank.listwise import DOC_TOKEN, QUERY_TOKEN, ListwiseReranker, build_prompt
from tamis.train import losses
from tamis.train.listwise import ListwiseConfig, augment, train_listwise
from tamis.train.losses import ListwiseWeights
from tamis.train.rerankers import MiningConfig
from tamis.train.trainer import TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "jina-reranker-v3-tiny"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"{FIXTURE} is absent")


def _cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------- the four terms
Q = np.array([[1.0, 0.0], [0.0, 2.0]])
D = np.array([[[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]],
              [[1.0, 1.0], [0.0, 1.0], [-1.0, 0.5]]])
POS = [0, 1]
TAU = 0.25


def _hand_rank(q, d, pos, tau):
    out = []
    for b in range(len(q)):
        logits = [_cos(q[b], d[b, j]) / tau for j in range(d.shape[1])]
        out.append(-(logits[pos[b]] - math.log(sum(math.exp(x) for x in logits))))
    return sum(out) / len(out)


def test_rank_term_is_infonce_of_the_positive_over_the_prompts_documents():
    got = losses.rank_infonce(torch.tensor(Q), torch.tensor(D), torch.tensor(POS), TAU)
    assert got.item() == pytest.approx(_hand_rank(Q, D, POS, TAU), rel=1e-5)


def test_disperse_term_is_log_mean_exp_over_distinct_document_pairs():
    want = []
    for b in range(D.shape[0]):
        n = D.shape[1]
        terms = [math.exp(_cos(D[b, i], D[b, j]) / TAU) for i in range(n) for j in range(n) if i != j]
        want.append(math.log(sum(terms) / len(terms)))
    got = losses.disperse(torch.tensor(D), TAU)
    assert got.item() == pytest.approx(sum(want) / len(want), rel=1e-5)
    # spread documents score lower than collapsed ones
    collapsed = torch.ones(1, 3, 2)
    spread = torch.tensor([[[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]]])
    assert losses.disperse(spread, TAU) < losses.disperse(collapsed, TAU)


def test_dual_term_is_the_rank_term_read_at_the_dual_query_vector():
    dual = np.array([[0.5, 0.5], [1.0, -1.0]])
    terms = losses.listwise_objective(torch.tensor(Q), torch.tensor(D), torch.tensor(POS), torch.tensor(dual),
                                      None, ListwiseWeights(temperature=TAU))
    assert terms["dual"].item() == pytest.approx(_hand_rank(dual, D, POS, TAU), rel=1e-5)


def test_similar_term_pairs_each_document_with_its_augmented_copy():
    aug = D + np.array([[[0.1, 0.2], [0.0, -0.3], [0.2, 0.0]], [[0.0, 0.1], [0.3, 0.0], [0.0, -0.2]]])
    want = []
    for b in range(D.shape[0]):
        for i in range(D.shape[1]):
            logits = [_cos(D[b, i], aug[b, j]) / TAU for j in range(D.shape[1])]
            want.append(-(logits[i] - math.log(sum(math.exp(x) for x in logits))))
    got = losses.similar(torch.tensor(D), torch.tensor(aug), TAU)
    assert got.item() == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_objective_weights_the_terms_as_the_paper_and_skips_zero_weights():
    q, d, pos = torch.tensor(Q), torch.tensor(D), torch.tensor(POS)
    dual, aug = torch.tensor(Q[::-1].copy()), torch.tensor(D * 1.1 + 0.05)
    t = losses.listwise_objective(q, d, pos, dual, aug)
    assert ListwiseWeights() == ListwiseWeights(disperse=0.45, dual=0.85, similar=0.85, temperature=0.25)
    want = t["rank"] + 0.45 * t["disperse"] + 0.85 * t["dual"] + 0.85 * t["similar"]
    assert t["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    only_rank = losses.listwise_objective(q, d, pos, dual, aug, ListwiseWeights(0.0, 0.0, 0.0, 0.5))
    assert set(only_rank) == {"rank", "loss"}
    assert only_rank["loss"].item() == pytest.approx(losses.rank_infonce(q, d, pos, 0.5).item(), rel=1e-6)


def test_augmentation_crops_and_drops_words_deterministically():
    text = " ".join(f"w{i}" for i in range(40))
    a, b = augment(text, random.Random(1)), augment(text, random.Random(1))
    assert a == b and a != text
    words = a.split()
    assert 10 <= len(words) < 40 and all(w in text.split() for w in words)
    assert augment("too short", random.Random(0)) == "too short"


# ------------------------------------------------------------------------------------------- prompt
def test_dual_query_token_sits_right_after_the_first_query_only_when_asked():
    plain = build_prompt("who?", ["a", "b"])
    dual = build_prompt("who?", ["a", "b"], dual_query_token=True)
    assert plain.count(QUERY_TOKEN) == 1 and dual.count(QUERY_TOKEN) == 2
    assert f"relevance to query: who?{QUERY_TOKEN}\n" in dual
    assert dual.replace(f"who?{QUERY_TOKEN}\n<passage", "who?\n<passage", 1) == plain
    assert dual.count(DOC_TOKEN) == 2


# ------------------------------------------------------------------------------ GGUF (Llama decoder)
def _tiny_llama_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A random 2-layer Llama written as llama.cpp writes GGUF files (q/k rows permuted, F32)."""
    gguf = pytest.importorskip("gguf")
    # byte-level vocabulary: the 256 byte symbols, a few merges, two control tokens
    from tokenizers.pre_tokenizers import ByteLevel

    from tamis.models.gguf import gguf_tensor_name, permute_rope

    alphabet = ByteLevel.alphabet()
    tokens = sorted(alphabet) + ["ab", "abc", "<|im_start|>", "<|im_end|>"]
    merges = ["a b", "ab c"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    hidden, heads, kv, inter, layers = 32, 4, 2, 48, 2
    vocab = len(tokens)
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.5,
             "model.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g)}
    hd = hidden // heads
    for i in range(layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        state[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        for name, shape in (("self_attn.q_proj", (heads * hd, hidden)), ("self_attn.k_proj", (kv * hd, hidden)),
                            ("self_attn.v_proj", (kv * hd, hidden)), ("self_attn.o_proj", (hidden, heads * hd)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            state[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    for key, t in state.items():
        if key.endswith("self_attn.q_proj.weight"):
            t = permute_rope(t, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            t = permute_rope(t, kv)
        w.add_tensor(gguf_tensor_name(key), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = {"hidden": hidden, "heads": heads, "kv": kv, "inter": inter, "layers": layers, "vocab": vocab}
    return config, state


def test_gguf_llama_matches_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tamis.models.gguf import gguf_to_hf

    c, state = _tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == c["kv"]
    loaded = load_file(str(out / "model.safetensors"))
    for k, v in state.items():  # exact after undoing llama.cpp's rotary permutation
        assert torch.equal(loaded[k], v), k
    ours = Qwen3Model(Qwen3Config.from_dict(config))
    assert isinstance(ours.layers[0].self_attn.q_norm, torch.nn.Identity)  # llama: no q/k norm
    ours.load_state_dict({k.removeprefix("model."): v for k, v in loaded.items()})
    ref = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], num_key_value_heads=c["kv"], rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=256))
    ref.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    ids = torch.randint(0, c["vocab"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = ours.eval()(ids)
        b = ref.eval()(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    # the tokenizer: byte-level BPE with the merges, control tokens whole
    from tamis.tokenize import Tokenizer

    tok = Tokenizer.from_dir(out)
    ids = tok.encode(["<|im_start|>abc ab"], max_length=None, add_special_tokens=False)[0].ids
    assert ids[0] == c["vocab"] - 2 and tok.decode(ids) == "<|im_start|>abc ab"
    assert tok.token_to_id("abc") in ids


def test_gguf_errors_are_one_line(tmp_path):
    pytest.importorskip("gguf")
    from tamis.errors import CheckpointError
    from tamis.models.gguf import gguf_to_hf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        gguf_to_hf(bad, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such GGUF"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> Path:
    """The tiny jina-reranker-v3 fixture's Qwen3 body as a plain decoder (no projector)."""
    if not FIXTURE.is_dir():
        pytest.skip(f"{FIXTURE} is absent")
    d = tmp_path_factory.mktemp("tiny-qwen3")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURE / name, d / name)
    config = json.loads((FIXTURE / "config.json").read_text())
    config["architectures"] = ["Qwen3ForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))
    state = load_file(str(FIXTURE / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("projector.")}, str(d / "model.safetensors"))
    return d


@needs_fixture
def test_tiny_listwise_run_lowers_the_loss_and_reloads(tiny_decoder, pairs_dir, tmp_path):
    lists = ListwiseConfig(n_negatives=3, lists_per_batch=2, max_query_length=16, max_doc_length=24, lora_r=4,
                           lora_alpha=8.0, gradient_checkpointing=True)
    config = TrainConfig(lr=3e-3, max_steps=12, warmup=0, eval_every=12, log_every=1, seed=0,
                         select_metric="nDCG@10", show_progress=False)
    mining = MiningConfig(methods=("bm25",), n_negatives=6, skip_top=0, depth=12, dev=3, dev_depth=6)
    summary = train_listwise([str(pairs_dir)], tmp_path / "run", str(tiny_decoder), lists=lists, mining=mining,
                             config=config, show_progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    rows = [r for r in log if "loss" in r]
    assert {"loss_rank", "loss_disperse", "loss_dual", "loss_similar"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 0.1, (first, last)
    assert (tmp_path / "run" / "curve.png").is_file()

    model_dir = Path(summary["model_dir"])
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["JinaForRanking"] and cfg["dual_query_token"] is True and cfg["block_size"] == 4
    assert (model_dir / "adapter" / "adapter_config.json").is_file()
    card = (model_dir / "README.md").read_text()
    assert "- listwise" in card and "CrossEncoder" not in card and "cosines" in card
    rr = tamis.Reranker(str(model_dir), dtype="float32")
    assert isinstance(rr, ListwiseReranker) and rr.n_query_tokens == 2 and rr.block_size == 4
    docs = ["Cats purr when they are content.", "Cargo builds Rust projects.", "Tea is brewed from leaves."]
    res = rr.rerank("why do cats purr", docs)
    assert len(res.results) == 3 and all(-1 <= r.relevance_score <= 1 for r in res.results)

    # the merged checkpoint equals the training-time model with its adapter applied (one code path)
    from tamis.models.lora import route_all, use_route
    from tamis.train.listwise import ADAPTER, add_lora, init_listwise

    lm = init_listwise(str(tiny_decoder), tmp_path / "again", lists, seed=0)
    add_lora(lm, lists, seed=0)
    trained = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    lm.model.load_state_dict(trained)
    live = lm.reranker(4, 16, 24)
    with use_route(route_all(lm.model.model, ADAPTER, 1)):
        want = live.rerank("why do cats purr", docs)
    got = {r.index: r.relevance_score for r in res.results}  # one evaluation (the last step): that model
    for r in want.results:
        assert got[r.index] == pytest.approx(r.relevance_score, abs=1e-4)


@needs_fixture
def test_continuing_from_a_listwise_checkpoint_keeps_its_projector(tmp_path):
    from tamis.train.listwise import init_listwise

    lm = init_listwise(str(FIXTURE), tmp_path, ListwiseConfig())
    ref = JinaListwiseModel.from_pretrained(FIXTURE)
    assert torch.equal(lm.model.projector[0].weight, ref.projector[0].weight)
    assert lm.config["dual_query_token"] is True
    assert torch.equal(lm.model.projector[2].weight, ref.projector[2].weight)


def test_listwise_cli_help_and_one_line_errors(capsys, tmp_path):
    from tamis.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "listwise", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(o in out for o in ("--w-disperse", "--w-dual", "--w-similar", "--lora-r", "--gradient-checkpointing"))
    with pytest.raises(SystemExit) as exc:
        main(["train", "listwise", "--data", "x", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no.gguf")])
    assert "no such file" in str(exc.value.code) and "\n" not in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        main(["train", "listwise", "--data", "x", "--out", str(tmp_path / "o"), "--model", "m", "--temperature", "0"])
    assert "--temperature must be > 0" in str(exc.value.code)
