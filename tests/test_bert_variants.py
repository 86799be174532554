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


def test_splade_scorer_matches_transformers_term_weights(tmp_path):
    """SpladeScorer's sparse vectors equal ``max_t log(1 + relu(logits))`` over each text's own tokens, computed
    with transformers one text at a time (no padding): batching texts of unequal length must not change them."""
    import shutil

    import numpy as np

    from tamis.models.loading import resolve_model_dir
    from tamis.tokenize import Tokenizer
    from tamis.train.teachers import SpladeScorer

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        ref.cls.predictions.bias.normal_(mean=-0.5, std=1.0)  # some terms positive, most cut by the relu
    ref.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(resolve_model_dir(None) / "tokenizer.json", tmp_path / "tokenizer.json")
    texts = ["a short query", "a much longer document about sparse retrieval, " * 12, "mid length text here"]
    scorer = SpladeScorer(tmp_path, max_length=64, max_tokens_per_batch=4096, show_progress=False)
    got = scorer.encode(texts)
    tok = Tokenizer.from_dir(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    for text, (terms, weights) in zip(texts, got):
        ids = torch.tensor([tok.encode([text], 64, truncate=True)[0].ids])
        with torch.no_grad():
            want = torch.log1p(torch.relu(ref(input_ids=ids).logits[0])).amax(dim=0)
        nz = want.nonzero().flatten()
        assert 0 < len(nz) < cfg.vocab_size
        np.testing.assert_array_equal(terms, nz.numpy())
        np.testing.assert_allclose(weights, want[nz].numpy(), atol=2e-5, rtol=1e-4)
