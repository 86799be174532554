"""Training losses against hand computations on toy lists."""

from __future__ import annotations

import math

import pytest
import torch

from tamis.train import losses


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_bce_with_pos_weight_matches_hand_computation():
    s, y = _t([[2.0, -1.0, 0.5]]), _t([[1.0, 0.0, 0.0]])
    sig = [1 / (1 + math.exp(-x)) for x in (2.0, -1.0, 0.5)]
    want = (-2.0 * math.log(sig[0]) - math.log(1 - sig[1]) - math.log(1 - sig[2])) / 3
    assert losses.bce(s, y, pos_weight=2.0).item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_infonce_single_and_multi_positive():
    s, y = _t([[3.0, 1.0, 0.0]]), _t([[1.0, 0.0, 0.0]])
    z = math.exp(3) + math.exp(1) + 1
    assert losses.softmax_ce(s, y).item() == pytest.approx(-math.log(math.exp(3) / z), rel=1e-5, abs=1e-6)
    # temperature 0.5 doubles the logits
    z2 = math.exp(6) + math.exp(2) + 1
    assert losses.softmax_ce(s, y, temperature=0.5).item() == pytest.approx(-math.log(math.exp(6) / z2), rel=1e-5, abs=1e-6)
    # two positives share the mass; a list without positives is skipped
    s2, y2 = _t([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), _t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert losses.softmax_ce(s2, y2).item() == pytest.approx(-math.log((math.exp(3) + math.exp(1)) / z), rel=1e-5, abs=1e-6)


def test_mask_excludes_padded_candidates():
    s, y = _t([[3.0, 1.0, 50.0]]), _t([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert losses.softmax_ce(s, y, mask=mask).item() == pytest.approx(-math.log(math.exp(3) / (math.exp(3) + math.exp(1))), rel=1e-5, abs=1e-6)


def test_listnet_and_kl():
    s, t = _t([[1.0, 0.0]]), _t([[0.0, 1.0]])
    p_t = [1 / (1 + math.e), math.e / (1 + math.e)]
    log_q = [1 - math.log(math.e + 1), -math.log(math.e + 1)]
    want_listnet = -(p_t[0] * log_q[0] + p_t[1] * log_q[1])
    assert losses.listnet(s, t).item() == pytest.approx(want_listnet, rel=1e-5, abs=1e-6)
    want_kl = p_t[0] * (math.log(p_t[0]) - log_q[0]) + p_t[1] * (math.log(p_t[1]) - log_q[1])
    assert losses.kl_div(s, t).item() == pytest.approx(want_kl, rel=1e-5, abs=1e-6)
    # temperature: scores divided by T and the result scaled by T^2
    s2, t2 = s / 2, t / 2
    assert losses.kl_div(s, t, temperature=2.0).item() == pytest.approx(4 * losses.kl_div(s2, t2).item(), rel=1e-5, abs=1e-6)
    assert losses.kl_div(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_mse_and_margin_mse():
    s, t = _t([[3.0, 1.0, 0.0]]), _t([[2.0, 1.5, -1.0]])
    assert losses.mse(s, t).item() == pytest.approx((1 + 0.25 + 1) / 3, rel=1e-5, abs=1e-6)
    # margins: student (2, 3) vs teacher (0.5, 3)
    assert losses.margin_mse(s, t).item() == pytest.approx(((2 - 0.5) ** 2 + 0) / 2, rel=1e-5, abs=1e-6)


def test_lambda_loss_matches_hand_computation():
    # model order: doc0 (s=2, y=0), doc1 (s=1, y=2), doc2 (s=0, y=1); mu = 10, sigma = 1
    s, y = _t([[2.0, 1.0, 0.0]]), _t([[0.0, 2.0, 1.0]])
    d = [math.log2(2), math.log2(3), math.log2(4)]  # D(1), D(2), D(3)
    max_dcg = 3 / d[0] + 1 / d[1]
    g = [0.0, 3 / max_dcg, 1 / max_dcg]  # gains in model order

    def delta(dist):
        return abs(1 / math.log2(1 + dist) - 1 / math.log2(2 + dist))

    def term(i, j):  # pair with y_i > y_j, positions i, j (0-based in model order)
        gd = abs(g[i] - g[j])
        w = 10 * delta(abs(i - j)) * gd + abs(1 / d[i] - 1 / d[j]) * gd
        p = 1 / (1 + math.exp(-(s[0, i].item() - s[0, j].item())))
        return -w * math.log2(p)

    want = term(1, 0) + term(2, 0) + term(1, 2)
    assert losses.lambda_loss(s, y).item() == pytest.approx(want, rel=1e-5)
    # perfectly ordered lists with large margins cost almost nothing
    assert losses.lambda_loss(_t([[20.0, 10.0, 0.0]]), _t([[2.0, 1.0, 0.0]])).item() < 1e-3


def test_losses_have_gradients_and_spec_parsing():
    s = torch.randn(3, 5, requires_grad=True)
    y = torch.zeros(3, 5)
    y[:, 0] = 1
    t = torch.randn(3, 5)
    for name in losses.LOSSES:
        s.grad = None
        losses.compute(name, s, y, t, None, temperature=1.0, pos_weight=4.0).backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, name
    assert losses.parse_loss_spec("infonce + 0.5*kl") == [("infonce", 1.0), ("kl", 0.5)]
    assert losses.parse_loss_spec("kl+10*hidden") == [("kl", 1.0), ("hidden", 10.0)]  # a state loss
    assert losses.parse_loss_spec("kl+cls") == [("kl", 1.0), ("cls", 1.0)]
    with pytest.raises(ValueError, match="hidden states"):
        losses.compute("hidden", s, y, t, None)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.parse_loss_spec("infonce+cosine")
    with pytest.raises(ValueError, match="teacher"):
        losses.compute("kl", s, y, None, None)
