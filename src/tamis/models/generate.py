"""Batched text generation with a key/value cache for the decoders of :mod:`tamis.models.qwen3`.

A plain loop in the spirit of gpt-fast's ``generate.py``: prefill the prompts once (left-padded, so every
row's next token is read at the last position), then one token per step for every unfinished row, reusing
the cached keys and values. Rows that stop (a stop token, or ``max_new_tokens``) leave the batch, so the
batch shrinks instead of computing padding. A prompt prefix shared by every row (a few-shot preamble) is
prefilled once with :func:`prefill` and passed as ``prefix``: each batch then computes only its own part.

Greedy decoding by default; ``temperature > 0`` samples (with nucleus ``top_p``) from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tamis.models.qwen3 import DecoderLM, KVCache


@torch.inference_mode()
def prefill(model: DecoderLM, ids: Sequence[int]) -> KVCache:
    """The batch-1 cache of a prompt prefix shared by many generations."""
    if not ids:
        raise ValueError("prefill: the prefix is empty")
    _, cache = model(torch.tensor([list(ids)], device=model.device))
    return cache


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest head whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: DecoderLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = (),
    prefix: KVCache | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (token ids, continuing ``prefix`` when given), without the stop token.

    Generation for a row ends at the first of ``stop_ids`` or after ``max_new_tokens`` tokens.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = True
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    out: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(len(prompts), device=device)  # which prompt each batch row generates for
    logits, cache = model(ids, prefix, mask)
    for step in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_p, generator)
        ended = torch.isin(nxt, stop)
        for r, t, e in zip(rows.tolist(), nxt.tolist(), ended.tolist()):
            if not e:
                out[r].append(t)
        keep = ~ended
        if not bool(keep.any()) or step == max_new_tokens - 1:
            break
        if not bool(keep.all()):  # finished rows leave the batch
            rows, nxt = rows[keep], nxt[keep]
            cache = KVCache([(k[keep], v[keep]) for k, v in cache.layers], cache.real[keep])
        logits, cache = model(nxt[:, None], cache)
    return out


__all__ = ["generate", "prefill"]
