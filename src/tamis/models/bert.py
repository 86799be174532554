"""BERT and JinaBERT encoders, with an optional sequence-classification head.

One module tree covers:
- BERT (absolute position table, GELU MLP): all-MiniLM-L6-v2, BGE, ms-marco cross-encoders;
- RoBERTa-style absolute positions (offset by ``pad_token_id + 1``);
- JinaBERT (symmetric ALiBi, no position table, GEGLU ``mlp.gated_layers``): jina-embeddings-v2 and
  jina-reranker-v1-tiny/turbo (``bert.`` prefix + pooler + ``classifier``).

Module names follow the official checkpoints, so the key map only strips the ``bert.``/``roberta.``
prefix, renames old ``gamma``/``beta`` LayerNorm names and drops non-persistent buffers.
All layers are post-LayerNorm.

Two layouts run through the same modules:
- padded ``forward(input_ids, attention_mask, token_type_ids)`` on ``[B, L]`` (training, autograd):
  attention is ``scaled_dot_product_attention`` with an additive mask (ALiBi bias + padding);
- packed ``forward_packed(input_ids, token_type_ids, packing)`` on ``[T]`` tokens laid end to end
  (inference): every Linear, GELU and LayerNorm runs on ``[T, H]`` real tokens only, and attention runs
  per run of equal-length sequences (one SDPA call per distinct length, no mask, no padding). See
  :class:`Packing` for why this layout and not block-diagonal masks or nested tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tamis.errors import UnsupportedModelError
from tamis.models.activations import ACTIVATIONS
from tamis.models.loading import apply_key_map, load_config, load_state_dict


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"  # "absolute" | "alibi"
    feed_forward_type: str = "original"  # "original" | "geglu" | "reglu"
    position_offset: int = 0  # RoBERTa: positions start at pad_token_id + 1
    num_labels: int = 0  # > 0: sequence classification head
    classifier_style: str = "bert"  # "bert": pooler + classifier; "roberta": classifier.dense + out_proj
    emb_pooler: str | None = None
    prefix: str = ""  # checkpoint key prefix of the encoder ("", "bert.", "roberta.")

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> BertConfig:
        model_type = c.get("model_type", "bert")
        archs = c.get("architectures") or []
        is_cls = any("SequenceClassification" in a for a in archs)
        roberta = model_type in ("roberta", "xlm-roberta", "camembert")
        pos = c.get("position_embedding_type", "absolute") or "absolute"
        if pos not in ("absolute", "alibi"):
            raise UnsupportedModelError(f"position_embedding_type {pos!r} is not supported by the BERT family")
        act = c.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            hidden_act=act,
            max_position_embeddings=c.get("max_position_embeddings", 512),
            type_vocab_size=c.get("type_vocab_size", 2),
            layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            pad_token_id=c.get("pad_token_id") if c.get("pad_token_id") is not None else (1 if roberta else 0),
            position_embedding_type=pos,
            feed_forward_type=c.get("feed_forward_type", "original") or "original",
            position_offset=(c.get("pad_token_id", 1) + 1) if roberta else 0,
            num_labels=(len(c.get("id2label") or {}) or c.get("num_labels", 1)) if is_cls else 0,
            classifier_style="roberta" if roberta else "bert",
            emb_pooler=c.get("emb_pooler"),
            prefix="roberta." if roberta else "bert.",
        )

    @property
    def max_length(self) -> int | None:
        """Longest input the architecture accepts (ALiBi extrapolates: no hard limit)."""
        if self.position_embedding_type == "alibi":
            return None
        return self.max_position_embeddings - self.position_offset


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


class Packing:
    """Sequences laid end to end in one ``[T, ...]`` tensor, in the order given (callers sort by length).

    Sequence ``s`` holds rows ``starts[s] : starts[s] + lengths[s]``. Attention runs once per *run* of
    consecutive sequences of equal length, as a ``[g, heads, n, d]`` SDPA call with no mask: no padded
    token is ever computed, and a length-sorted batch of short inputs (queries, rerank pairs) has only a
    handful of distinct lengths, so the number of calls stays small. The alternatives cost more by
    construction: re-padding around attention adds a scatter/gather per layer, a block-diagonal ``[T, T]``
    mask is quadratic in the whole batch; against the padded layout the packed one is measured in
    ``benchmarks/fast_path.py`` (README "Speed").

    The model sees only tensors (:meth:`BertModel.encode_packed`), so one compiled graph with a dynamic
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


@functools.lru_cache(maxsize=32)
def _alibi_cached(n_heads: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return alibi_bias(n_heads, length, device).to(dtype)


def _attend_runs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor, n_heads: int, alibi: bool
) -> torch.Tensor:
    h = q.shape[-1]
    d = h // n_heads
    outs = []
    for row, g, n in runs.tolist():
        rows = slice(row, row + g * n)

        def heads(t: torch.Tensor, rows: slice = rows, g: int = g, n: int = n) -> torch.Tensor:
            return t[rows].view(g, n, n_heads, d).transpose(1, 2)

        bias = _alibi_cached(n_heads, n, q.dtype, q.device) if alibi else None
        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), bias)
        outs.append(o.transpose(1, 2).reshape(g * n, h))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.library.custom_op("tamis::packed_attention", mutates_args=())
def _packed_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor, n_heads: int, alibi: bool
) -> torch.Tensor:
    """The run-wise attention loop as one opaque op, so ``torch.compile`` keeps one graph for any batch."""
    return _attend_runs(q, k, v, runs, n_heads, alibi)


@_packed_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor, n_heads: int, alibi: bool) -> torch.Tensor:
    return q.new_empty(q.shape)


@dataclass
class PackedRuns:
    """What attention needs of a :class:`Packing` inside the model: the runs tensor, and ALiBi or not."""

    runs: torch.Tensor
    alibi: bool = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
        """``q``/``k``/``v`` [T, H] (any row stride) -> [T, H]."""
        if torch.compiler.is_compiling():
            return _packed_attention_op(q, k, v, self.runs, n_heads, self.alibi)
        return _attend_runs(q, k, v, self.runs, n_heads, self.alibi)  # eager: differentiable


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        if cfg.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Padded ``[B, L]`` ids with ``mask``, or packed ``[T]`` ids with ``position_ids`` (0-based)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        if self.cfg.position_embedding_type == "absolute":
            if position_ids is not None:
                positions = position_ids + (self.cfg.pad_token_id + 1 if self.cfg.position_offset else 0)
            elif self.cfg.position_offset:
                # RoBERTa: positions count real tokens only, starting after the padding index
                assert mask is not None
                positions = torch.cumsum(mask, dim=1) * mask + self.cfg.pad_token_id
            else:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            x = x + self.position_embeddings(positions)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def fuse_qkv(self) -> None:
        """Inference: one [3H, H] projection instead of three (a non-persistent copy: checkpoints and
        training keep ``query``/``key``/``value``). Call after moving the module to its device and dtype."""
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight]).detach()
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias]).detach()
        self.register_buffer("qkv_weight", w, persistent=False)
        self.register_buffer("qkv_bias", b, persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | PackedRuns) -> torch.Tensor:
        """Padded ``x`` [B, L, H] with an additive ``bias``, or packed ``x`` [T, H] with :class:`PackedRuns`."""
        if getattr(self, "qkv_weight", None) is not None:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        if isinstance(bias, PackedRuns):
            return bias.attend(q, k, v, self.n_heads)
        b, n, h = x.shape
        d = h // self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.n_heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), bias)
        return out.transpose(1, 2).reshape(b, n, h)


class AttentionOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = AttentionOutput(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | PackedRuns) -> torch.Tensor:
        return self.output.LayerNorm(x + self.output.dense(self.self(x, bias)))


class Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class GatedMLP(nn.Module):
    """JinaBERT GEGLU/ReGLU: act(first half) * second half, no bias on the gated projection."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.act = F.relu if cfg.feed_forward_type == "reglu" else ACTIVATIONS[cfg.hidden_act]
        self.gated_layers = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated, linear = self.gated_layers(x).split(self.inter, dim=-1)
        return self.layernorm(x + self.wo(self.act(gated) * linear))


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.gated = cfg.feed_forward_type.endswith("glu")
        if self.gated:
            self.mlp = GatedMLP(cfg)
        else:
            self.act = ACTIVATIONS[cfg.hidden_act]
            self.intermediate = Dense(cfg.hidden_size, cfg.intermediate_size)
            self.output = Dense(cfg.intermediate_size, cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | PackedRuns) -> torch.Tensor:
        x = self.attention(x, bias)
        if self.gated:
            return self.mlp(x)
        return self.output.LayerNorm(x + self.output.dense(self.act(self.intermediate.dense(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """Encoder (+ pooler). ``forward`` returns the last hidden state [B, L, H]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if cfg.num_labels == 0 or cfg.classifier_style == "bert":
            self.pooler = Dense(cfg.hidden_size, cfg.hidden_size)

    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        b, n = attention_mask.shape
        neg = torch.finfo(dtype).min
        bias = torch.zeros(b, 1, 1, n, dtype=dtype, device=attention_mask.device)
        bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, neg)
        if self.cfg.position_embedding_type == "alibi":
            alibi = alibi_bias(self.cfg.num_attention_heads, n, attention_mask.device).to(dtype)
            bias = (bias + alibi).clamp_min(neg)
        return bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, attention_mask)
        bias = self.attention_bias(attention_mask, x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x

    def forward_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Last hidden states [T, H] of packed sequences (``input_ids`` / ``token_type_ids`` [T])."""
        return self.encode_packed(input_ids, token_type_ids, packing.position_ids(), packing.runs)

    def encode_packed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor, runs: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward_packed` on tensors only (what ``torch.compile`` traces; see :class:`Packing`)."""
        x = self.embeddings(input_ids, token_type_ids, position_ids=position_ids)
        att = PackedRuns(runs, alibi=self.cfg.position_embedding_type == "alibi")
        for layer in self.encoder.layer:
            x = layer(x, att)
        return x

    def pool_cls(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler.dense(hidden[:, 0]))


class RobertaClassificationHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)


class BertForSequenceClassification(nn.Module):
    """Cross-encoder: ``forward`` returns logits [B, num_labels]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.classifier_style == "roberta":
            self.roberta = BertModel(cfg)
            self.classifier: nn.Module = RobertaClassificationHead(cfg)
        else:
            self.bert = BertModel(cfg)
            self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    @property
    def encoder_model(self) -> BertModel:
        return self.roberta if self.cfg.classifier_style == "roberta" else self.bert

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.encoder_model(input_ids, attention_mask, token_type_ids)
        return self.head(hidden[:, 0])

    def forward_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Logits [B, num_labels] of packed (query, document) sequences."""
        return self.encode_packed(input_ids, token_type_ids, packing.position_ids(), packing.runs,
                                  packing.first_rows())

    def encode_packed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor, runs: torch.Tensor,
        first_rows: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward_packed` on tensors only (what ``torch.compile`` traces)."""
        hidden = self.encoder_model.encode_packed(input_ids, token_type_ids, position_ids, runs)
        return self.head(hidden[first_rows])

    def head(self, first: torch.Tensor) -> torch.Tensor:
        """Classifier on the first token's state [B, H]."""
        if self.cfg.classifier_style == "roberta":
            head = self.classifier
            return head.out_proj(torch.tanh(head.dense(first)))
        return self.classifier(torch.tanh(self.bert.pooler.dense(first)))


# ---------------------------------------------------------------------------- inference fast path
def fuse_qkv(model: BertModel | BertForSequenceClassification) -> None:
    """One [3H, H] query/key/value projection per layer (inference only; see :meth:`SelfAttention.fuse_qkv`)."""
    encoder = model.encoder_model if isinstance(model, BertForSequenceClassification) else model
    for layer in encoder.encoder.layer:
        layer.attention.self.fuse_qkv()


def compile_packed(model: BertModel | BertForSequenceClassification, device: str | torch.device = "cpu") -> float:
    """``torch.compile`` (inductor, dynamic shapes) of the packed forward, warmed up now on the shapes that
    would otherwise each trigger a recompile (one sequence of one token; several runs), so no request pays
    for compilation. Returns the warm-up seconds (inductor's on-disk cache makes later start-ups faster)."""
    import time

    model.encode_packed = torch.compile(model.encode_packed, dynamic=True)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lengths in ([1], [7, 7, 5, 2], [16, 9]):
            packing = Packing(lengths, device)
            ids = torch.zeros(packing.total, dtype=torch.long, device=device)
            model.forward_packed(ids, torch.zeros_like(ids), packing)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- checkpoint loading
_RENAME = {".gamma": ".weight", ".beta": ".bias"}
_IGNORE = ("embeddings.position_ids", "embeddings.token_type_ids", "lm_head.", "cls.", "encoder.alibi")


def _map_keys(state: dict[str, torch.Tensor], module: nn.Module, cfg: BertConfig) -> dict[str, torch.Tensor]:
    if isinstance(module, BertForSequenceClassification):
        head = cfg.prefix
        state = {k if (k.startswith(head) or k.startswith("classifier.")) else head + k: v for k, v in state.items()}
        ignore = tuple(head + i for i in _IGNORE) + _IGNORE
        return apply_key_map(state, module, rename=_RENAME, ignore=ignore)
    # plain encoder: keys at the root, or under the architecture's prefix; no pooler is fine
    has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
    if not has_pooler and hasattr(module, "pooler"):
        del module.pooler
    return apply_key_map(
        state, module, rename=_RENAME, strip_prefixes=("bert.", "roberta.", "model."),
        ignore=_IGNORE + ("classifier.", "pooler.") if not has_pooler else _IGNORE + ("classifier.",),
    )


def from_pretrained(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    classification: bool | None = None,
) -> BertModel | BertForSequenceClassification:
    """Load a BERT-family checkpoint. ``classification=None`` follows the config's architectures."""
    config = load_config(Path(model_dir))
    cfg = BertConfig.from_dict(config)
    if classification is False:
        cfg.num_labels = 0
    elif classification and cfg.num_labels == 0:
        cfg.num_labels = 1
    module: nn.Module = BertForSequenceClassification(cfg) if cfg.num_labels else BertModel(cfg)
    state = _map_keys(load_state_dict(Path(model_dir)), module, cfg)
    module.load_state_dict(state, strict=True)
    return module.to(device=device, dtype=dtype).eval()
