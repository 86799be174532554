"""XLM-RoBERTa with rotary positions and task LoRA adapters (jina-embeddings-v3), native PyTorch.

Architecture (docs/models.md §1): word + token-type embeddings (no position table) -> LayerNorm -> N post-LN
layers (fused ``Wqkv``, rotary on q and k in the non-interleaved NeoX ``rotate_half`` style, exact erf GELU
MLP ``fc1``/``fc2``). A tanh pooler on token 0 is in the checkpoint but plays no part in embeddings.

Checkpoint layout: keys start with ``roberta.``; every Linear and Embedding weight is stored as a
parametrization, ``<m>.parametrizations.weight.original`` (base weight) plus
``<m>.parametrizations.weight.0.lora_A`` / ``lora_B`` (all adapters stacked on dim 0). The key map folds
these onto ``<m>.weight``, ``<m>.lora_A``, ``<m>.lora_B`` and ``encoder.layers.N`` onto ``layers.N``.

Adapters (§1.3) are never merged into the weights, so choosing one costs nothing at load time and a batch
may mix them: ``forward(..., adapter_ids=[B])`` gives each row an adapter index, or -1 for the base
weights. Every projection runs the base weight on the whole batch, then adds the rank-r delta only to the
rows that have an adapter, with s = lora_alpha / lora_rank:
- Linear (W [out, in], A [n, r, in], B [n, out, r]): y += s * (x A[t]^T) B[t]^T, two thin matmuls;
- Embedding (E [V, d], A [n, V, r], B [n, r, d]): y += s * A[t][ids] B[t].
When every selected row shares one adapter (the usual single-task request) the delta is two plain
matmuls; mixed rows gather A/B per row and use ``bmm``. Rows with -1 are skipped, not multiplied by zero.

Padding must be on the right (the XLM-R tokenizer's side): positions run 0..L-1 for every row, as in the
reference's padded path, and padded keys are masked out of attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tamis.errors import CheckpointError, UnknownTaskError, UnsupportedModelError
from tamis.models.activations import ACTIVATIONS
from tamis.models.loading import apply_key_map, load_config, load_state_dict, resolve_dtype
from tamis.models.lora import AdapterRoute, linear_delta, route_adapters

# official checkpoint name fragment -> ours (substring replacement, after stripping "roberta.")
KEY_MAP = {
    ".parametrizations.weight.original": ".weight",
    ".parametrizations.weight.0.lora_A": ".lora_A",
    ".parametrizations.weight.0.lora_B": ".lora_B",
    "encoder.layers.": "layers.",
}


@dataclass
class XLMRConfig:
    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    type_vocab_size: int = 1
    rotary_emb_base: float = 10000.0
    lora_adaptations: list[str] = field(default_factory=list)
    lora_rank: int = 4
    lora_alpha: float = 1.0
    task_instructions: dict[str, str] = field(default_factory=dict)
    matryoshka_dimensions: list[int] = field(default_factory=list)
    max_position_embeddings: int = 8194

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> XLMRConfig:
        pos = config.get("position_embedding_type", "rotary") or "rotary"
        if pos != "rotary":
            raise UnsupportedModelError(
                f"position_embedding_type {pos!r}: the XLM-R LoRA family (jina-embeddings-v3) needs 'rotary'"
            )
        act = config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        kwargs = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        cfg = cls(**kwargs)
        cfg.lora_adaptations = list(cfg.lora_adaptations)
        cfg.task_instructions = dict(cfg.task_instructions)
        cfg.matryoshka_dimensions = list(cfg.matryoshka_dimensions)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise UnsupportedModelError(
                f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
            )
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def n_adapters(self) -> int:
        return len(self.lora_adaptations)

    @property
    def lora_scaling(self) -> float:
        return float(self.lora_alpha) / float(self.lora_rank)


# ---------------------------------------------------------------------------------------------- adapters
def _add_delta(y: torch.Tensor, delta: torch.Tensor, route: AdapterRoute, scaling: float) -> torch.Tensor:
    if route.rows is None:
        return y.add_(delta, alpha=scaling)
    return y.index_add_(0, route.rows, delta, alpha=scaling)


class StackedLoRALinear(nn.Module):
    """``nn.Linear`` with stacked task adapters: W_eff[t] = W + s * B[t] @ A[t], applied per row."""

    def __init__(self, in_features: int, out_features: int, n_adapters: int, rank: int, scaling: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.lora_A = nn.Parameter(torch.empty(n_adapters, rank, in_features)) if n_adapters else None
        self.lora_B = nn.Parameter(torch.empty(n_adapters, out_features, rank)) if n_adapters else None
        self.scaling = scaling

    def forward(self, x: torch.Tensor, route: AdapterRoute | None = None) -> torch.Tensor:
        """x: [B, L, in] -> [B, L, out]."""
        y = F.linear(x, self.weight, self.bias)
        if route is None or self.lora_A is None or self.lora_B is None:
            return y
        return linear_delta(y, x, self.lora_A, self.lora_B, route, self.scaling)


class StackedLoRAEmbedding(nn.Module):
    """``nn.Embedding`` with stacked task adapters: E_eff[t] = E + s * A[t] @ B[t], applied per row."""

    def __init__(self, num_embeddings: int, dim: int, n_adapters: int, rank: int, scaling: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        self.lora_A = nn.Parameter(torch.empty(n_adapters, num_embeddings, rank)) if n_adapters else None
        self.lora_B = nn.Parameter(torch.empty(n_adapters, rank, dim)) if n_adapters else None
        self.scaling = scaling

    def forward(self, ids: torch.Tensor, route: AdapterRoute | None = None) -> torch.Tensor:
        """ids: [B, L] -> [B, L, dim]."""
        y = F.embedding(ids, self.weight)
        if route is None or self.lora_A is None or self.lora_B is None:
            return y
        sel = ids if route.rows is None else ids.index_select(0, route.rows)
        if route.single is not None:
            delta = F.embedding(sel, self.lora_A[route.single]) @ self.lora_B[route.single]
        else:
            a = self.lora_A[route.ids[:, None], sel]  # [b, L, r]
            delta = torch.bmm(a, self.lora_B.index_select(0, route.ids))
        return _add_delta(y, delta, route, self.scaling)


# ---------------------------------------------------------------------------------------------- rotary
def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [len(positions), head_dim] for NeoX-style rotary; computed in fp32, cast to ``dtype``."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = torch.outer(positions.to(torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., L, D]; non-interleaved: dims i and i + D/2 form a pair (rotate_half = cat(-x2, x1))."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---------------------------------------------------------------------------------------------- layers
class Embeddings(nn.Module):
    def __init__(self, c: XLMRConfig):
        super().__init__()
        args = (c.n_adapters, c.lora_rank, c.lora_scaling)
        self.word_embeddings = StackedLoRAEmbedding(c.vocab_size, c.hidden_size, *args)
        self.token_type_embeddings = StackedLoRAEmbedding(c.type_vocab_size, c.hidden_size, *args)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, route: AdapterRoute | None
    ) -> torch.Tensor:
        return self.word_embeddings(input_ids, route) + self.token_type_embeddings(token_type_ids, route)


class Attention(nn.Module):
    def __init__(self, c: XLMRConfig):
        super().__init__()
        args = (c.n_adapters, c.lora_rank, c.lora_scaling)
        self.n_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.Wqkv = StackedLoRALinear(c.hidden_size, 3 * c.hidden_size, *args)  # rows: [Q | K | V], head-major
        self.out_proj = StackedLoRALinear(c.hidden_size, c.hidden_size, *args)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        route: AdapterRoute | None,
    ) -> torch.Tensor:
        B, L, H = x.shape
        qkv = self.Wqkv(x, route).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, L, head_dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H), route)


class MLP(nn.Module):
    def __init__(self, c: XLMRConfig):
        super().__init__()
        args = (c.n_adapters, c.lora_rank, c.lora_scaling)
        self.fc1 = StackedLoRALinear(c.hidden_size, c.intermediate_size, *args)
        self.fc2 = StackedLoRALinear(c.intermediate_size, c.hidden_size, *args)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor, route: AdapterRoute | None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, route)), route)


class Block(nn.Module):
    """Post-LN: x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, c: XLMRConfig):
        super().__init__()
        self.mixer = Attention(c)
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        route: AdapterRoute | None,
    ) -> torch.Tensor:
        x = self.norm1(x + self.mixer(x, mask, cos, sin, route))
        return self.norm2(x + self.mlp(x, route))


class Pooler(nn.Module):
    def __init__(self, c: XLMRConfig):
        super().__init__()
        self.dense = StackedLoRALinear(c.hidden_size, c.hidden_size, c.n_adapters, c.lora_rank, c.lora_scaling)

    def forward(self, hidden: torch.Tensor, route: AdapterRoute | None) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, :1], route)[:, 0])


# ---------------------------------------------------------------------------------------------- model
class XLMRobertaLoRA(nn.Module):
    """jina-embeddings-v3's encoder. ``forward`` returns ``last_hidden_state`` [B, L, H]."""

    def __init__(self, config: XLMRConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(config)
        self._rotary: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for tests and benchmarks (adapters non-zero, so a wrong one shows). No-op on meta."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if "norm" in name or "emb_ln" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std if "lora" not in name else 0.1)

    # ------------------------------------------------------------------ adapters by name
    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in index order (``config.lora_adaptations``)."""
        return list(self.config.lora_adaptations)

    def adapter_index(self, task: str) -> int:
        try:
            return self.config.lora_adaptations.index(task)
        except ValueError:
            raise UnknownTaskError(task, self.adapter_names) from None

    # ------------------------------------------------------------------ forward
    def _cos_sin(
        self, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        cached = self._rotary.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 512)
            positions = torch.arange(size, device=device, dtype=torch.float32)
            cached = rotary_cos_sin(positions, self.config.head_dim, self.config.rotary_emb_base, dtype)
            self._rotary[key] = cached
        return cached[0][:length], cached[1][:length]

    def route(self, adapter_ids: torch.Tensor | list[int] | None, batch: int) -> AdapterRoute | None:
        return route_adapters(adapter_ids, batch, self.config.n_adapters, self.emb_ln.weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_ids: torch.Tensor | list[int] | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids/attention_mask/token_type_ids: [B, L] (right padded); adapter_ids: [B], -1 = no adapter.

        Returns last_hidden_state [B, L, H] in the model's dtype.
        """
        B, L = input_ids.shape
        route = self.route(adapter_ids, B)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.emb_ln(self.embeddings(input_ids, token_type_ids, route))
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: True = attend
        cos, sin = self._cos_sin(L, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, mask, cos, sin, route)
        return x

    def pool(
        self, last_hidden_state: torch.Tensor, adapter_ids: torch.Tensor | list[int] | None = None
    ) -> torch.Tensor:
        """The checkpoint's pooler: tanh(dense(h[:, 0])) -> [B, H]. Not used for embeddings."""
        return self.pooler(last_hidden_state, self.route(adapter_ids, last_hidden_state.shape[0]))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
    ) -> XLMRobertaLoRA:
        """Load an official jina-embeddings-v3 directory (config.json + model.safetensors)."""
        model_dir = Path(model_dir)
        config = XLMRConfig.from_dict(load_config(model_dir))
        dtype = resolve_dtype(dtype)
        with torch.device("meta"):
            model = cls(config)
        state = load_state_dict(model_dir)
        try:
            state = apply_key_map(state, model, rename=KEY_MAP, strip_prefixes=("roberta.",))
        except CheckpointError as exc:
            raise CheckpointError(
                f"{model_dir}: not a jina-embeddings-v3 (XLM-RoBERTa LoRA) checkpoint for this config.json: {exc}. "
                "Names are shown after the key map: official names carry a 'roberta.' prefix, "
                "'encoder.layers.N' for 'layers.N', and '.parametrizations.weight.original' / "
                "'.parametrizations.weight.0.lora_A|lora_B' for '.weight' / '.lora_A|lora_B'."
            ) from None
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


# ---------------------------------------------------------------------------------------------- training / saving
def trainable_tasks(model: XLMRobertaLoRA, tasks: Sequence[str]) -> list[nn.Parameter]:
    """Freeze everything but the adapter slices of ``tasks`` in the stacked LoRA parameters: each stack
    stays one tensor (the official layout), and a gradient hook zeroes the other tasks' slices. Train
    with no weight decay on them, or AdamW would shrink the frozen slices too."""
    index = sorted({model.adapter_index(t) for t in tasks})
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B"):
            continue
        p.requires_grad_(True)
        mask = torch.zeros(p.shape[0], *([1] * (p.ndim - 1)), dtype=p.dtype, device=p.device)
        mask[index] = 1
        p.register_hook(lambda g, m=mask: g * m)
        params.append(p)
    return params


def hf_state_dict(model: XLMRobertaLoRA) -> dict[str, torch.Tensor]:
    """The module's tensors under the official jina-embeddings-v3 names (the inverse of :data:`KEY_MAP`):
    ``roberta.`` prefix, ``encoder.layers.N``, adapted weights as ``parametrizations.weight.original`` and
    the stacked adapters as ``parametrizations.weight.0.lora_A`` / ``lora_B``."""
    adapted = {path for path, m in model.named_modules()
               if isinstance(m, StackedLoRALinear | StackedLoRAEmbedding) and m.lora_A is not None}
    out = {}
    for key, value in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        if path in adapted:
            leaf = {"weight": "parametrizations.weight.original", "lora_A": "parametrizations.weight.0.lora_A",
                    "lora_B": "parametrizations.weight.0.lora_B"}.get(leaf, leaf)
        if path.startswith("layers.") or path == "layers":
            path = "encoder." + path
        out[f"roberta.{path}.{leaf}"] = value.detach().contiguous()
    return out
