"""Decoder generation: Qwen2 GGUF files, the LM head, the key/value cache and the batched generation loop,
against transformers' Qwen2ForCausalLM on a random tiny model written as llama.cpp writes GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tamis.models.generate import generate, prefill
from tamis.models.qwen3 import DecoderLM, KVCache, Qwen3Config

HIDDEN, HEADS, KV, INTER, LAYERS = 32, 4, 2, 48, 2


def _tiny_qwen2_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A random 2-layer Qwen2 (q/k/v biases, tied embeddings) as llama.cpp writes it: no rotary permutation."""
    gguf = pytest.importorskip("gguf")
    from tokenizers.pre_tokenizers import ByteLevel

    from tamis.models.gguf import gguf_tensor_name

    tokens = sorted(ByteLevel.alphabet()) + ["ab", "abc", "Ġab", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    merges = ["a b", "ab c", "Ġ ab"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    vocab, hd = len(tokens), HIDDEN // HEADS
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=g) * 0.5,
             "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        state[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        for name, shape in (("self_attn.q_proj", (HEADS * hd, HIDDEN)), ("self_attn.k_proj", (KV * hd, HIDDEN)),
                            ("self_attn.v_proj", (KV * hd, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HEADS * hd)),
                            ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)),
                            ("mlp.down_proj", (HIDDEN, INTER))):
            state[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.2
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                state[p + name + ".bias"] = torch.randn(shape[0], generator=g) * 0.2
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab - 2)
    w.add_pad_token_id(vocab - 1)
    for key, t in state.items():
        w.add_tensor(gguf_tensor_name(key), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tamis.models.gguf import gguf_to_hf

    tmp = tmp_path_factory.mktemp("qwen2")
    state = _tiny_qwen2_gguf(tmp / "tiny.gguf")
    out = gguf_to_hf(tmp / "tiny.gguf", tmp / "hf")
    config = json.loads((out / "config.json").read_text())
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=config["vocab_size"], hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        max_position_embeddings=256, tie_word_embeddings=True))
    ref.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    return out, state, ref.eval(), DecoderLM.from_pretrained(out)


def test_qwen2_gguf_converts_exactly(tiny):
    out, state, _, model = tiny
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    loaded = load_file(str(out / "model.safetensors"))
    assert set(loaded) == set(state)
    for k, v in state.items():  # Qwen2 files carry no rotary permutation
        assert torch.equal(loaded[k], v), k
    cfg = Qwen3Config.from_dict(config)
    assert cfg.qkv_bias and not cfg.attention_bias and not cfg.qk_norm
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one tensor


def test_logits_match_transformers_with_and_without_cache(tiny):
    _, _, ref, model = tiny
    ids = torch.randint(0, ref.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref(input_ids=ids).logits
        full, _ = model(ids)
        assert torch.allclose(full, want[:, -1], atol=1e-4), float((full - want[:, -1]).abs().max())
        # prefix then the rest, one token at a time: every step's logits equal the full forward's
        logits, cache = model(ids[:, :5])
        assert torch.allclose(logits, want[:, 4], atol=1e-4)
        for t in range(5, 13):
            logits, cache = model(ids[:, t:t + 1], cache)
            assert torch.allclose(logits, want[:, t], atol=1e-4), t
        assert cache.length == 13


def test_left_padding_and_a_shared_prefix_leave_logits_unchanged(tiny):
    _, _, ref, model = tiny
    g = torch.Generator().manual_seed(2)
    head = torch.randint(0, 200, (6,), generator=g).tolist()
    tails = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (3, 7)]
    with torch.inference_mode():
        prefix = prefill(model, head)
        width = max(len(t) for t in tails)
        ids = torch.tensor([[0] * (width - len(t)) + t for t in tails])
        mask = torch.tensor([[False] * (width - len(t)) + [True] * len(t) for t in tails])
        got, cache = model(ids, prefix, mask)
        for i, t in enumerate(tails):
            want = ref(input_ids=torch.tensor([head + t])).logits[0, -1]
            assert torch.allclose(got[i], want, atol=1e-4), i
        assert cache.real.shape == (2, len(head) + width) and prefix.real.shape == (1, len(head))


def test_batched_greedy_generation_matches_transformers(tiny):
    _, _, ref, model = tiny
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, 200, (4,), generator=g).tolist()
    tails = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (2, 5, 9)]
    stop = [ref.config.vocab_size - 2]
    out = generate(model, tails, max_new_tokens=8, stop_ids=stop, prefix=prefill(model, head))
    for tail, got in zip(tails, out):
        ids = torch.tensor([head + tail])
        want = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=stop, pad_token_id=0)[0, ids.shape[1]:]
        want = want.tolist()
        if stop[0] in want:
            want = want[: want.index(stop[0])]
        assert got == want
    # without a prefix: the same tokens
    assert generate(model, [head + t for t in tails], max_new_tokens=8, stop_ids=stop) == out


def test_stop_tokens_end_rows_and_sampling_is_seeded(tiny):
    _, _, _, model = tiny
    prompts = [[5, 6, 7], [8, 9]]
    greedy = generate(model, prompts, max_new_tokens=6)
    assert all(len(o) == 6 for o in greedy)
    first = greedy[0][0]
    cut = generate(model, prompts, max_new_tokens=6, stop_ids=[first])
    assert cut[0] == []
    assert cut[1] == (greedy[1][: greedy[1].index(first)] if first in greedy[1] else greedy[1])
    a = generate(model, prompts, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompts, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert a == b
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="batch-1"):
        KVCache.empty(model.config, 2).expand(3)


def test_qwen2_tokenizer_splits_digits_and_keeps_control_tokens(tiny):
    out = tiny[0]
    from tamis.tokenize import Tokenizer

    tok = Tokenizer.from_dir(out)
    ids = tok.encode(["<|im_start|>abc ab 12"], max_length=None, add_special_tokens=False)[0].ids
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.token_to_id("abc") in ids and tok.token_to_id("Ġab") in ids
    assert tok.token_to_id("1") in ids and tok.token_to_id("2") in ids  # one digit per piece
    assert tok.decode(ids) == "<|im_start|>abc ab 12"


# ------------------------------------------------------------------------------ synthetic queries (InPars)
def test_clean_query_and_example_sets():
    from tamis.train.querygen import clean_query, pick_examples

    assert clean_query('  "how tall is the eiffel tower"  \nmore') == "how tall is the eiffel tower"
    assert clean_query("Query: potty training tips") == "potty training tips"
    assert clean_query("\n\n") == ""
    pairs = [(f"passage {i}", f"query {i}") for i in range(10)] + [("word " * 200, "too long")]
    sets = pick_examples(pairs, 3, 2, seed=1)
    flat = [q for s in sets for _, q in s]
    assert len(sets) == 3 and all(len(s) == 2 for s in sets) and len(set(flat)) == 6 and "too long" not in flat
    assert pick_examples(pairs, 3, 2, seed=1) == sets and pick_examples(pairs, 3, 2, seed=2) != sets
    with pytest.raises(ValueError, match="need 12"):
        pick_examples(pairs, 4, 3)


def test_generate_queries_resumes_and_matches_one_uninterrupted_run(tiny, tmp_path):
    from tamis.train.querygen import QueryGenConfig, QueryGenerator, generate_queries, read_records

    out = tiny[0]
    cfg = QueryGenConfig(batch_size=2, n_prefixes=2, n_examples=1, max_new_tokens=5)
    gen = QueryGenerator(out, [[("ab abc", "abc ab")], [("abc", "ab")]], cfg)
    assert gen.prefix_ids(0) != gen.prefix_ids(1)
    docs = [(f"d{i}", "ab " * (i + 1)) for i in range(5)]
    whole = generate_queries(gen, docs, tmp_path / "whole.jsonl", show_progress=False)
    assert list(whole) == [d for d, _ in docs] and [r["prefix"] for r in whole.values()] == [0, 0, 1, 1, 0]
    part = tmp_path / "part.jsonl"
    assert len(generate_queries(gen, docs, part, limit=3, show_progress=False)) == 3
    with open(part, "a", encoding="utf-8") as f:
        f.write('{"doc": "d3", "que')  # a record cut short by a kill
    assert set(read_records(part)) == {"d0", "d1", "d2"}
    assert generate_queries(gen, docs, part, show_progress=False) == whole
    assert len(part.read_text().splitlines()) == 6  # 5 records and the cut line, which is ignored
