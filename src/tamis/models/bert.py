"""BERT and JinaBERT encoders, with an optional sequence-classification head.

One module tree covers:
- BERT (absolute position table, GELU MLP): all-MiniLM-L6-v2, BGE, ms-marco cross-encoders;
- RoBERTa-style absolute positions (offset by ``pad_token_id + 1``);
- JinaBERT (symmetric ALiBi, no position table, GEGLU ``mlp.gated_layers``): jina-embeddings-v2 and
  jina-reranker-v1-tiny/turbo (``bert.`` prefix + pooler + ``classifier``);
- MPNet (RoBERTa-style positions, no token types, a T5-style relative position bias shared by all
  layers): all-mpnet-base-v2;
- a masked-LM head (``cls.predictions``) for SPLADE-style sparse encoders.

Module names follow the official BERT checkpoints, so the key map only strips the ``bert.``/``roberta.``
prefix, renames old ``gamma``/``beta`` LayerNorm names, maps MPNet's ``attn.q/k/v/o`` names onto the
BERT ones and drops non-persistent buffers. :func:`hf_state_dict` inverts it, so a trained module is
saved in the layout it was loaded from. All layers are post-LayerNorm.

Two layouts run through the same modules:
- padded ``forward(input_ids, attention_mask, token_type_ids)`` on ``[B, L]`` (training, autograd):
  attention is ``scaled_dot_product_attention`` with an additive mask (ALiBi or relative bias + padding);
- packed ``forward_packed(input_ids, token_type_ids, packing)`` on ``[T]`` tokens laid end to end
  (inference): every Linear, GELU and LayerNorm runs on ``[T, H]`` real tokens only, and attention runs
  per run of equal-length sequences (:mod:`tamis.models.packed`).
Loading for inference (int8 or fused query/key/value, ``torch.compile``) is :mod:`tamis.models.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tamis.errors import UnsupportedModelError
from tamis.models.activations import ACTIVATIONS
from tamis.models.loading import apply_key_map, load_config, load_state_dict
from tamis.models.packed import PackedRuns, Packing
from tamis.models.positions import alibi_bias, alibi_slopes, relative_position_buckets

__all__ = ["BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertModel", "Packing", "alibi_bias",
           "alibi_slopes", "from_pretrained", "fuse_qkv", "hf_state_dict", "module_path", "official_module_path",
           "relative_position_buckets", "select_layers"]


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
    relative_attention_num_buckets: int = 0  # MPNet: > 0 adds a relative position bias
    model_type: str = "bert"

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> BertConfig:
        model_type = c.get("model_type", "bert")
        archs = c.get("architectures") or []
        is_cls = any("SequenceClassification" in a for a in archs)
        roberta = model_type in ("roberta", "xlm-roberta", "camembert", "mpnet")
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
            type_vocab_size=0 if model_type == "mpnet" else c.get("type_vocab_size", 2),
            layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            pad_token_id=c.get("pad_token_id") if c.get("pad_token_id") is not None else (1 if roberta else 0),
            position_embedding_type=pos,
            feed_forward_type=c.get("feed_forward_type", "original") or "original",
            position_offset=(c.get("pad_token_id", 1) + 1) if roberta else 0,
            num_labels=(len(c.get("id2label") or {}) or c.get("num_labels", 1)) if is_cls else 0,
            classifier_style="roberta" if roberta else "bert",
            emb_pooler=c.get("emb_pooler"),
            prefix="mpnet." if model_type == "mpnet" else "roberta." if roberta else "bert.",
            relative_attention_num_buckets=c.get("relative_attention_num_buckets", 0) if model_type == "mpnet" else 0,
            model_type=model_type,
        )

    @property
    def max_length(self) -> int | None:
        """Longest input the architecture accepts (ALiBi extrapolates: no hard limit)."""
        if self.position_embedding_type == "alibi":
            return None
        return self.max_position_embeddings - self.position_offset


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        if cfg.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        if cfg.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Padded ``[B, L]`` ids with ``mask``, or packed ``[T]`` ids with ``position_ids`` (0-based)."""
        x = self.word_embeddings(input_ids)
        if self.cfg.type_vocab_size:
            x = x + self.token_type_embeddings(token_type_ids)
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
        # [3H, H] copies of query/key/value for the packed inference forward, set by tamis.models.runtime.fuse_qkv
        # (non-persistent: checkpoints and training keep the three Linears)
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | PackedRuns) -> torch.Tensor:
        """Padded ``x`` [B, L, H] with an additive ``bias``, or packed ``x`` [T, H] with :class:`PackedRuns`."""
        if isinstance(bias, PackedRuns) and self.qkv_weight is not None:
            return bias.attend(*F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1), self.n_heads)
        q, k, v = self.query(x), self.key(x), self.value(x)
        if isinstance(bias, PackedRuns):
            return bias.attend(q, k, v, self.n_heads)
        b, n, h = x.shape
        d = h // self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.n_heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), bias)
        return out.transpose(1, 2).reshape(b, n, h)


class Dense(nn.Module):
    """A Linear (``dense``), with a ``LayerNorm`` after it when ``eps`` is given: the checkpoints' names."""

    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = Dense(cfg.hidden_size, cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | PackedRuns) -> torch.Tensor:
        return self.output.LayerNorm(x + self.output.dense(self.self(x, bias)))


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
        if cfg.relative_attention_num_buckets:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_attention_heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """MPNet's relative position bias [1, H, L, L], shared by every layer."""
        buckets = relative_position_buckets(length, self.relative_attention_bias.num_embeddings, device=device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


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
        elif self.cfg.relative_attention_num_buckets:
            bias = (bias + self.encoder.position_bias(n, attention_mask.device).to(dtype)).clamp_min(neg)
        return bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        return_states: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """The last hidden state [B, L, H]; ``return_states=True``: every state on the way (index 0: the
        embeddings, i: the output of layer i; hidden-state distillation)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, attention_mask)
        bias = self.attention_bias(attention_mask, x.dtype)
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, bias)
            if return_states:
                states.append(x)
        return states if return_states else x

    def forward_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Last hidden states [T, H] of packed sequences (``input_ids`` / ``token_type_ids`` [T])."""
        return self.encode_packed(input_ids, token_type_ids, packing.position_ids(), packing.runs)

    def encode_packed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor, runs: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward_packed` on tensors only (what ``torch.compile`` traces; see :class:`Packing`)."""
        x = self.embeddings(input_ids, token_type_ids, position_ids=position_ids)
        rel = self.encoder.relative_attention_bias.weight if self.cfg.relative_attention_num_buckets else None
        att = PackedRuns(runs, alibi=self.cfg.position_embedding_type == "alibi", rel=rel)
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
        # the encoder's attribute is the checkpoint's prefix (bert / roberta / mpnet), so the state dict
        # carries the official names: MPNetForSequenceClassification keeps its encoder under "mpnet."
        self._encoder_name = cfg.prefix.rstrip(".") or ("roberta" if cfg.classifier_style == "roberta" else "bert")
        self.add_module(self._encoder_name, BertModel(cfg))
        if cfg.classifier_style == "roberta":
            self.classifier: nn.Module = RobertaClassificationHead(cfg)
        else:
            self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    @property
    def encoder_model(self) -> BertModel:
        return getattr(self, self._encoder_name)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        return_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, num_labels]; ``return_states=True``: (logits, the encoder's states, see :class:`BertModel`)."""
        if not return_states:
            return self.head(self.encoder_model(input_ids, attention_mask, token_type_ids)[:, 0])
        states = self.encoder_model(input_ids, attention_mask, token_type_ids, return_states=True)
        return self.head(states[-1][:, 0]), states

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

    def head_modules(self) -> dict[str, nn.Module]:
        """The classifier head's modules by their state-dict prefix."""
        if self.cfg.classifier_style == "roberta":
            return {"classifier": self.classifier}
        return {f"{self._encoder_name}.pooler": self.encoder_model.pooler, "classifier": self.classifier}

    def head(self, first: torch.Tensor) -> torch.Tensor:
        """Classifier on the first token's state [B, H], computed in the head's own dtype: float32 when
        :func:`from_pretrained` loaded the encoder in bf16 / fp16 (see there)."""
        if self.cfg.classifier_style == "roberta":
            head = self.classifier
            first = first.to(head.out_proj.weight.dtype)
            return head.out_proj(torch.tanh(head.dense(first)))
        first = first.to(self.classifier.weight.dtype)
        return self.classifier(torch.tanh(self.encoder_model.pooler.dense(first)))



class LMPredictions(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = Dense(cfg.hidden_size, cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class LMHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.predictions = LMPredictions(cfg)


class BertForMaskedLM(nn.Module):
    """Encoder + masked-LM head (decoder tied to the word embeddings); ``forward`` returns vocabulary
    logits [B, L, V]. SPLADE sparse encoders are this module plus a log-saturated max pooling."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg)
        del self.bert.pooler
        self.cls = LMHead(cfg)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        t = self.cls.predictions.transform
        hidden = t.LayerNorm(self.act(t.dense(hidden)))
        return F.linear(hidden, self.bert.embeddings.word_embeddings.weight, self.cls.predictions.bias)


def fuse_qkv(model: BertModel | BertForSequenceClassification) -> None:
    """:func:`tamis.models.runtime.fuse_qkv`, under the name callers of this module used before it moved."""
    from tamis.models.runtime import fuse_qkv as fuse

    fuse(model)


def select_layers(module: BertModel | BertForSequenceClassification, layers: list[int]) -> None:
    """Keep only the encoder layers ``layers`` (in that order), in place: a student initialised from
    a teacher by layer selection (e.g. ``[0, 1]`` of 6)."""
    encoder_model = module.encoder_model if isinstance(module, BertForSequenceClassification) else module
    n = len(encoder_model.encoder.layer)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers must be a non-empty list of indices in 0..{n - 1}, got {layers}")
    encoder_model.encoder.layer = nn.ModuleList(encoder_model.encoder.layer[i] for i in layers)
    module.cfg.num_hidden_layers = len(layers)
    if encoder_model.cfg is not module.cfg:
        encoder_model.cfg.num_hidden_layers = len(layers)


# ---------------------------------------------------------------------------- checkpoint loading
_RENAME = {
    ".gamma": ".weight",
    ".beta": ".bias",
    # MPNet names onto the BERT module tree
    ".attention.attn.q.": ".attention.self.query.",
    ".attention.attn.k.": ".attention.self.key.",
    ".attention.attn.v.": ".attention.self.value.",
    ".attention.attn.o.": ".attention.output.dense.",
    ".attention.LayerNorm.": ".attention.output.LayerNorm.",
}
_MPNET_INVERSE = {v: k for k, v in _RENAME.items() if ".attention." in k}
_IGNORE = ("embeddings.position_ids", "embeddings.token_type_ids", "lm_head.", "cls.", "encoder.alibi")


def _map_keys(state: dict[str, torch.Tensor], module: nn.Module, cfg: BertConfig) -> dict[str, torch.Tensor]:
    if isinstance(module, BertForSequenceClassification):
        head = cfg.prefix
        state = {k if (k.startswith(head) or k.startswith("classifier.")) else head + k: v for k, v in state.items()}
        ignore = tuple(head + i for i in _IGNORE) + _IGNORE
        return apply_key_map(state, module, rename=_RENAME, ignore=ignore)
    if isinstance(module, BertForMaskedLM):
        state = {k if k.startswith(("bert.", "cls.")) else "bert." + k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("cls.predictions.decoder")}  # tied
        ignore = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "bert.pooler.")
        return apply_key_map(state, module, rename=_RENAME, ignore=ignore)
    # plain encoder: keys at the root, or under the architecture's prefix; no pooler is fine
    has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
    if not has_pooler and hasattr(module, "pooler"):
        del module.pooler
    return apply_key_map(
        state, module, rename=_RENAME, strip_prefixes=("bert.", "roberta.", "mpnet.", "model."),
        ignore=_IGNORE + ("classifier.", "pooler.") if not has_pooler else _IGNORE + ("classifier.",),
    )


def official_module_path(cfg: BertConfig, path: str) -> str:
    """A module's path under the official checkpoint's names (what peft writes in adapter keys): the
    inverse of :func:`module_path`. Only MPNet's attention names differ from ours."""
    if cfg.model_type != "mpnet":
        return path
    p = path + "."
    for ours, theirs in _MPNET_INVERSE.items():
        p = p.replace(ours, theirs)
    return p[:-1]


def module_path(cfg: BertConfig, official: str) -> str:
    """Our module path for an official one, with or without the architecture prefix (``bert.``,
    ``roberta.``, ``mpnet.``: an adapter trained on a task model rather than the bare encoder)."""
    p = official
    for prefix in ("bert.", "roberta.", "mpnet.", "model."):
        if p.startswith(prefix):
            p = p[len(prefix):]
            break
    p += "."
    for old, new in _RENAME.items():
        p = p.replace(old, new)
    return p[:-1]


def hf_state_dict(module: BertModel | BertForSequenceClassification | BertForMaskedLM) -> dict[str, torch.Tensor]:
    """The module's tensors under the official checkpoint names (the inverse of the key map), contiguous
    and detached: what ``save_file`` writes so that Hugging Face / sentence-transformers load it."""
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    if module.cfg.model_type == "mpnet":
        renamed = {}
        for k, v in state.items():
            for ours, theirs in _MPNET_INVERSE.items():
                k = k.replace(ours, theirs)
            renamed[k] = v
        state = renamed
    return state


def from_pretrained(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    classification: bool | None = None,
    masked_lm: bool = False,
) -> BertModel | BertForSequenceClassification | BertForMaskedLM:
    """Load a BERT-family checkpoint. ``classification=None`` follows the config's architectures;
    ``masked_lm=True`` loads the encoder with its masked-LM head (SPLADE)."""
    config = load_config(Path(model_dir))
    cfg = BertConfig.from_dict(config)
    if classification is False or masked_lm:
        cfg.num_labels = 0
    elif classification and cfg.num_labels == 0:
        cfg.num_labels = 1
    module: nn.Module
    if masked_lm:
        module = BertForMaskedLM(cfg)
    else:
        module = BertForSequenceClassification(cfg) if cfg.num_labels else BertModel(cfg)
    state = _map_keys(load_state_dict(Path(model_dir)), module, cfg)
    module.load_state_dict(state, strict=True)
    module = module.to(device=device, dtype=dtype).eval()
    if isinstance(module, BertForSequenceClassification) and dtype != torch.float32:
        # A cross-encoder's logit is its score, and bf16 keeps 3 significant digits of it (ties between documents
        # whose float32 scores differ): the pooler and classifier, a few [H, H] products a pair, stay float32.
        for prefix, head in module.head_modules().items():
            head.float().load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items()
                                          if k.startswith(prefix + ".")})
    return module
