"""The packed inference layout of the BERT family: sequences laid end to end, attention per run of equal lengths.

:class:`Packing` describes one batch; :class:`PackedRuns` is what the layers' attention receives instead of a
padded mask (see :meth:`tamis.models.bert.BertModel.encode_packed`). Attention runs through SDPA, or on a CPU
with native bf16 through two bf16 matmuls or tamis's fused kernel (:mod:`tamis.models.kernels`), and under
``torch.compile`` as one opaque custom op so that one graph serves every batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tamis.hardware import cpu_info
from tamis.models.kernels import ATTENTION_HEAD_SIZES, attention_bf16
from tamis.models.positions import alibi_bias, relative_position_buckets


class Packing:
    """Sequences laid end to end in one ``[T, ...]`` tensor, in the order given (callers sort by length).

    Sequence ``s`` holds rows ``starts[s] : starts[s] + lengths[s]``. Attention runs once per *run* of
    consecutive sequences of equal length, as a ``[g, heads, n, d]`` SDPA call with no mask: no padded
    token is ever computed, and a length-sorted batch of short inputs (queries, rerank pairs) has only a
    handful of distinct lengths, so the number of calls stays small. The alternatives cost more by
    construction: re-padding around attention adds a scatter/gather per layer, a block-diagonal ``[T, T]``
    mask is quadratic in the whole batch; against the padded layout the packed one is measured in
    ``benchmarks/fast_path.py`` (README "Speed").

    The model sees only tensors (:meth:`tamis.models.bert.BertModel.encode_packed`), so one compiled graph with a dynamic
    token count serves every batch: ``runs`` [R, 3] = (first row, sequences, length) per run.
    """

    def __init__(self, lengths: Sequence[int], device: str | torch.device = "cpu"):
        if not lengths or min(lengths) <= 0:
            raise ValueError("every packed sequence needs at least one token")
        self.lengths = [int(n) for n in lengths]
        self.device = torch.device(device)
        self.starts = [0]
        for n in self.lengths[:-1]:
            self.starts.append(self.starts[-1] + n)
        self.total = self.starts[-1] + self.lengths[-1]
        runs: list[list[int]] = []
        for start, n in zip(self.starts, self.lengths):
            if runs and runs[-1][2] == n:
                runs[-1][1] += 1
            else:
                runs.append([start, 1, n])
        self.runs = torch.tensor(runs, dtype=torch.long)  # host tensor: read by the attention loop

    def __len__(self) -> int:
        return len(self.lengths)

    def _tensor(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device)

    def position_ids(self) -> torch.Tensor:
        """[T]: 0, 1, ... within each sequence."""
        starts = torch.tensor(self.starts, dtype=torch.long).repeat_interleave(torch.tensor(self.lengths))
        return (torch.arange(self.total) - starts).to(self.device)

    def segment_ids(self) -> torch.Tensor:
        """[T]: the sequence each row belongs to."""
        return torch.arange(len(self)).repeat_interleave(torch.tensor(self.lengths)).to(self.device)

    def first_rows(self) -> torch.Tensor:
        return self._tensor(self.starts)

    def last_rows(self) -> torch.Tensor:
        return self._tensor([s + n - 1 for s, n in zip(self.starts, self.lengths)])


def _run_bias(n: int, n_heads: int, dtype: torch.dtype, device: torch.device, alibi: bool,
              rel: torch.Tensor | None) -> torch.Tensor | None:
    """The additive attention bias [1, heads, n, n] of one sequence length: ALiBi, MPNet's relative
    position bias (``rel``: its ``[buckets, heads]`` table), or None."""
    if alibi:
        return alibi_bias(n_heads, n, device).to(dtype)
    if rel is not None:
        buckets = relative_position_buckets(n, rel.shape[0], device=device)
        return F.embedding(buckets, rel).permute(2, 0, 1).unsqueeze(0).to(dtype)
    return None


# Score elements per chunk of the CPU bf16 attention (2 MiB in bf16, 4 MiB upcast for a bias): stays in cache.
_SCORES_PER_CHUNK = 1 << 20


def use_matmul_attention(q: torch.Tensor) -> bool:
    """Whether packed attention computes ``softmax(q k^T) v`` with two bf16 matmuls instead of SDPA: bf16
    inference on a CPU with native bf16, where torch's flash SDPA kernel for CPU measured 1.37-1.6x slower than
    this for 32-256 tokens at head size 32 (README "Speed").
    Elsewhere (float32: flash is as fast or faster; GPUs; training) SDPA."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled()
            and cpu_info().bf16_native)


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[g, heads, n, d]`` -> ``[g * n, heads * d]``: ``softmax(q k^T / sqrt(d) + bias) v``, a chunk of
    sequences at a time. The matmuls accumulate in float32 and round their results to the input dtype; softmax
    computes in float32 whatever its input (torch's CPU kernel upcasts bf16), so without a bias the scale is
    folded into ``q`` and the scores never take a float32 copy; with a bias the scores are upcast to add it."""
    g, n_heads, n, d = q.shape
    per = max(1, _SCORES_PER_CHUNK // (n_heads * n * n))
    scale = d**-0.5
    q = q * scale if bias is None else q.contiguous()  # one copy of each per run, not per chunk
    k, v = k.transpose(-1, -2).contiguous(), v.contiguous()
    outs = []
    for s0 in range(0, g, per):
        sl = slice(s0, s0 + per)
        scores = torch.matmul(q[sl], k[sl])
        if bias is None:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores.float().mul_(scale) + bias.float(), dim=-1).to(v.dtype)
        o = torch.matmul(probs, v[sl])
        outs.append(o.transpose(1, 2).reshape(o.shape[0] * n, n_heads * d))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _attend_runs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor, n_heads: int, alibi: bool,
    rel: torch.Tensor | None = None, biases: dict[int, torch.Tensor | None] | None = None,
    matmul: bool | None = None,
) -> torch.Tensor:
    """``biases``: length -> bias, filled on the way (shared by the layers of one forward, then dropped).
    ``matmul``: force (True) or forbid (False) :func:`_matmul_attention`; None decides by
    :func:`use_matmul_attention`."""
    h = q.shape[-1]
    d = h // n_heads
    biases = {} if biases is None else biases
    matmul = use_matmul_attention(q) if matmul is None else matmul
    if matmul and not alibi and rel is None and d in ATTENTION_HEAD_SIZES:
        fused = attention_bf16()
        if fused is not None:  # one call for every run: tamis's fused bf16 kernel (README "Speed")
            return fused(*(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)), runs, n_heads, d**-0.5)
    outs = []
    for row, g, n in runs.tolist():
        rows = slice(row, row + g * n)

        def heads(t: torch.Tensor, rows: slice = rows, g: int = g, n: int = n) -> torch.Tensor:
            return t[rows].view(g, n, n_heads, d).transpose(1, 2)

        if n not in biases:
            biases[n] = _run_bias(n, n_heads, q.dtype, q.device, alibi, rel)
        if matmul:
            outs.append(_matmul_attention(heads(q), heads(k), heads(v), biases[n]))
            continue
        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), biases[n])
        outs.append(o.transpose(1, 2).reshape(g * n, h))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.library.custom_op("tamis::packed_attention", mutates_args=())
def _packed_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor, n_heads: int, alibi: bool,
    rel: torch.Tensor | None,
) -> torch.Tensor:
    """The run-wise attention loop as one opaque op, so ``torch.compile`` keeps one graph for any batch."""
    return _attend_runs(q, k, v, runs, n_heads, alibi, rel)


@_packed_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor, n_heads: int, alibi: bool,
      rel: torch.Tensor | None) -> torch.Tensor:
    return q.new_empty(q.shape)


@dataclass
class PackedRuns:
    """What attention needs of a :class:`Packing` inside the model: the runs tensor, ALiBi or not, MPNet's
    relative position table (``rel``) or None; the per-length biases are computed once per forward."""

    runs: torch.Tensor
    alibi: bool = False
    rel: torch.Tensor | None = None
    biases: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
        """``q``/``k``/``v`` [T, H] (any row stride) -> [T, H]."""
        if torch.compiler.is_compiling():
            return _packed_attention_op(q, k, v, self.runs, n_heads, self.alibi, self.rel)
        return _attend_runs(q, k, v, self.runs, n_heads, self.alibi, self.rel, self.biases)  # eager: differentiable
