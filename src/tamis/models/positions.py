"""Position biases of the BERT family's attention, shared by the padded and packed layouts: JinaBERT's
symmetric ALiBi and MPNet's (T5-style) relative position buckets."""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al. slopes, as in the JinaBERT reference (and TEI)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_2(n_heads)
    else:
        p = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(p) + power_of_2(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(n_heads: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """Symmetric ALiBi bias [1, H, L, L]: -slope_h * |i - j| (zero on the diagonal, never positive)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)
    dist = (pos[None, :] - pos[:, None]).abs()
    return (-alibi_slopes(n_heads).to(device)[:, None, None] * dist[None]).unsqueeze(0)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int = 128,
                              device: torch.device | None = None) -> torch.Tensor:
    """MPNet's (T5's bidirectional) bucket of every key-minus-query offset, [L, L]: exact below
    ``num_buckets // 4``, log-spaced up to ``max_distance``, the sign in the upper half."""
    pos = torch.arange(length, device=device)
    n = pos[:, None] - pos[None, :]  # query - key = -(key - query)
    half = num_buckets // 2
    out = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    large = exact + (
        torch.log(n.float().clamp_min(1) / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    return out + torch.where(n < exact, n, large.clamp_max(half - 1))
