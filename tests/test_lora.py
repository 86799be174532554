"""LoRA on any module tree: fresh adapters change nothing, routes match merged weights, mixed batches
match single-adapter batches, peft-layout files round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from tamis.models import bert, lora


@pytest.fixture()
def tiny() -> bert.BertModel:
    cfg = bert.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32)
    torch.manual_seed(0)
    model = bert.BertModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    return ids, mask


def _randomize(model, name):
    index = lora.adapter_names(model).index(name)
    g = torch.Generator().manual_seed(10 + index)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            if layer.names[index] == name:
                layer.lora_B[index].copy_(torch.randn(layer.lora_B[index].shape, generator=g) * 0.3)


def test_fresh_adapter_is_a_no_op_and_route_matches_merge(tiny):
    ids, mask = _batch()
    with torch.no_grad():
        base = tiny(ids, mask)
    lora.add_adapter(tiny, "a", ["query", "value"], r=4, alpha=8)
    assert len(lora.lora_layers(tiny)) == 4
    with torch.no_grad(), lora.use_route(lora.route_all(tiny, "a", 4)):
        torch.testing.assert_close(tiny(ids, mask), base)  # B = 0: unchanged until trained
    _randomize(tiny, "a")
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids, mask), base)  # no route: base weights, no cost
        with lora.use_route(lora.route_all(tiny, "a", 4)):
            adapted = tiny(ids, mask)
    assert (adapted - base).abs().max() > 1e-3
    lora.merge_adapter(tiny, "a")
    assert not lora.lora_layers(tiny)
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids, mask), adapted, atol=1e-5, rtol=1e-5)


def test_mixed_batch_equals_single_adapter_batches(tiny):
    ids, mask = _batch()
    lora.add_adapter(tiny, "a", ["query", "value"], r=4, alpha=8)
    lora.add_adapter(tiny, "b", ["dense"], r=2, alpha=2)  # other layers, other rank
    _randomize(tiny, "a")
    _randomize(tiny, "b")
    names = ["a", "b", None, "a"]
    with torch.no_grad():
        singles = []
        for i, name in enumerate(names):
            route = lora.route_all(tiny, name, 1) if name else None
            with lora.use_route(route):
                singles.append(tiny(ids[i : i + 1], mask[i : i + 1]))
        ids_ = [lora.adapter_names(tiny).index(n) if n else -1 for n in names]
        with lora.use_route(lora.route_adapters(ids_, 4, 2, torch.device("cpu"))):
            mixed = tiny(ids, mask)
    for i in range(4):
        m = mask[i].bool()
        torch.testing.assert_close(mixed[i][m], singles[i][0][m], atol=1e-5, rtol=1e-5)


def test_training_touches_only_the_adapter_and_files_round_trip(tiny, tmp_path):
    ids, mask = _batch()
    lora.add_adapter(tiny, "first", ["query"], r=4, alpha=8)
    lora.add_adapter(tiny, "task", ["query", "value"], r=4, alpha=8, seed=1)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    params = lora.trainable_adapter(tiny, "task")
    opt = torch.optim.SGD(params, lr=0.1)
    with lora.use_route(lora.route_all(tiny, "task", 4)):
        for _ in range(3):
            opt.zero_grad()
            tiny(ids, mask).pow(2).mean().backward()
            opt.step()
    after = tiny.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("lora_" in k for k in changed)
    first = lora.adapter_names(tiny).index("first")
    for k in changed:  # the other adapter's slice did not move
        torch.testing.assert_close(after[k][first], before[k][first], rtol=0, atol=0)
    lora.save_adapter(tiny, "task", tmp_path / "task", base_model="tiny")
    config = json.loads((tmp_path / "task" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["query", "value"]
    fresh = bert.BertModel(tiny.cfg).eval()
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in before.items() if "lora_" not in k})
    lora.load_adapter(fresh, tmp_path / "task", "task")
    with torch.no_grad():
        with lora.use_route(lora.route_all(tiny, "task", 4)):
            want = tiny(ids, mask)
        with lora.use_route(lora.route_all(fresh, "task", 4)):
            got = fresh(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(Exception, match="not a LoRA adapter directory"):
        lora.load_adapter(fresh, tmp_path, "x")
