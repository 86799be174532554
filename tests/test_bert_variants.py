"""BERT-family variants against transformers on tiny random checkpoints: MPNet (all-mpnet-base-v2's
architecture: relative position bias, no token types) and the masked-LM head SPLADE encoders use."""

from __future__ import annotations

import json

import pytest
import torch

from tamis.models import bert, detect_family

transformers = pytest.importorskip("transformers")


def _inputs(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (3, 150), generator=g)  # > 128 tokens: exercises the log-spaced buckets
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    mask[2, 20:] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


def test_mpnet_matches_transformers(tmp_path):
    cfg = transformers.MPNetConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=514, relative_attention_num_buckets=32)
    torch.manual_seed(0)
    ref = transformers.MPNetModel(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert detect_family(config) == "bert"
    ours = bert.from_pretrained(tmp_path, classification=False)
    ids, mask = _inputs(cfg.pad_token_id)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    m = mask.bool()
    torch.testing.assert_close(got[m], want[m], atol=2e-5, rtol=1e-4)
    # saving under the official names round-trips
    assert set(bert.hf_state_dict(ours)) <= set(ref.state_dict()) | {"pooler.dense.weight", "pooler.dense.bias"}


def test_masked_lm_head_matches_transformers(tmp_path):
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        ref.cls.predictions.bias.normal_(std=0.2)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = bert.from_pretrained(tmp_path, masked_lm=True)
    ids, mask = _inputs(0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    m = mask.bool()
    torch.testing.assert_close(got[m], want[m], atol=2e-5, rtol=1e-4)


def test_mpnet_cross_encoder_in_the_official_layout_matches_transformers(tmp_path):
    """MPNetForSequenceClassification keeps its encoder under "mpnet." (not "roberta."): such a checkpoint
    loads, gives transformers' logits, and is written back under the same names."""
    torch.manual_seed(0)
    cfg = transformers.MPNetConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=514, relative_attention_num_buckets=32,
                                   num_labels=1)
    ref = transformers.MPNetForSequenceClassification(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = bert.from_pretrained(tmp_path)
    assert isinstance(ours, bert.BertForSequenceClassification)
    ids, mask = _inputs(ref.config.pad_token_id)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    buffers = {k for k, _ in ref.named_buffers()}
    assert set(bert.hf_state_dict(ours)) == set(ref.state_dict()) - buffers
