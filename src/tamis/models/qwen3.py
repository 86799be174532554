"""Qwen3 / Llama decoder and the jina-reranker-v3 ("last but not late") listwise ranking model.

Layout of ``jinaai/jina-reranker-v3`` (docs/models.md §2): a Qwen3 causal decoder (``model.*``; pre-norm
RMSNorm blocks, GQA attention with per-head q/k RMSNorm before NeoX RoPE, SiLU-gated MLP, final ``norm``)
without an LM head, plus ``projector`` = Linear(H, H/2) -> ReLU -> Linear(H/2, 512), both without bias.
Document vectors are read from the final post-norm hidden state at ``<|embed_token|>`` positions and the
query vector at the ``<|rerank_token|>`` position; the token ids are passed in by the caller, who takes
them from the tokenizer.

Llama (e.g. SmolLM2) is the same decoder without the per-head q/k RMSNorm (``qk_norm=False``), and Qwen2
(e.g. Qwen2.5-Coder) is Llama with biases on the q/k/v projections (``qkv_bias=True``), so the three model
types share these modules; ``Qwen3Config.from_dict`` reads each ``config.json``. :class:`DecoderLM` adds the
(usually tied) LM head and a key/value cache for generation (:mod:`tamis.models.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from tamis.errors import UnsupportedModelError
from tamis.models.loading import apply_key_map, load_config, load_state_dict, resolve_dtype
from tamis.models.lora import active_route, use_route

DEFAULT_PROJECTOR_DIM = 512


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 131072
    attention_bias: bool = False  # biases on q/k/v/o (Llama's attention_bias)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    qk_norm: bool = True  # Qwen3: RMSNorm on each query/key head before RoPE; Llama, Qwen2: none
    tie_word_embeddings: bool = True
    model_type: str = "qwen3"
    # listwise projector: Linear(hidden, projector_hidden) -> ReLU -> Linear(projector_hidden, projector_dim)
    projector_hidden: int = 0
    projector_dim: int = DEFAULT_PROJECTOR_DIM

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen3Config:
        """Build from a Hugging Face ``config.json`` of ``model_type`` qwen3, qwen2 or llama."""
        model_type = d.get("model_type") or "qwen3"
        if model_type not in ("qwen3", "qwen2", "llama"):
            raise UnsupportedModelError(f"expected a qwen3, qwen2 or llama config, got model_type {model_type!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{model_type}: hidden_act {act!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise UnsupportedModelError(f"{model_type}: mlp_bias is not supported")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        if scaling:
            raise UnsupportedModelError(f"{model_type}: rope scaling {scaling!r} is not supported")
        if d.get("use_sliding_window"):
            raise UnsupportedModelError(f"{model_type}: sliding-window attention is not supported")
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 1_000_000.0))),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            attention_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            model_type=model_type,
            projector_hidden=int(d.get("projector_hidden") or hidden // 2),
            projector_dim=int(d.get("projector_dim") or DEFAULT_PROJECTOR_DIM),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, L, head_dim] for integer positions [B, L] (NeoX layout: halves repeated)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[..., None] * inv_freq  # [B, L, hd/2], fp32
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm: nn.Module = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Self-attention over ``x``; with ``past`` (cached keys/values [B, n_kv, T, hd]) the new tokens also
        attend to the cached ones, and the result is ``(out, (keys, values))`` with this call's appended."""
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        cache = (k, v)
        gqa = self.n_kv != self.n_heads  # grouped keys/values: SDPA reads each for its group of query heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = self.o_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))
        return out if past is None else (out, cache)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def _run_layer(layer: nn.Module, route: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    with use_route(route):
        return layer(x, cos, sin, mask)


class Qwen3Model(nn.Module):
    """The Qwen3 decoder body (no LM head). ``forward`` returns the final post-norm hidden states."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # training: recompute each layer in backward (less memory)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] (left or right padded when ``attention_mask`` [B, L] is given) -> [B, L, H].

        Positions count real tokens only, so a left-padded row starts at position 0 at its first token.
        Hidden states at padded positions are meaningless.
        """
        b, n = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            keep = attention_mask.bool()
            positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
            eye = torch.eye(n, dtype=torch.bool, device=input_ids.device)
            # padded query rows see only themselves, which keeps softmax finite; real rows see real keys <= i
            mask = ((causal[None] & keep[:, None, :]) | eye[None])[:, None]  # [B, 1, L, L]
        else:
            positions = torch.arange(n, device=input_ids.device).expand(b, n)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        route = active_route()  # LoRA routes live in a context variable; recomputation must see it too
        for layer in self.layers:
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(_run_layer, layer, route, x, cos, sin, mask,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward_cached(
        self, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """New tokens ``input_ids`` [B, L] after the ``cache``d ones -> (final hidden states [B, L, H], the
        cache with them appended). ``attention_mask`` [B, L] marks the real new tokens (padding may sit
        anywhere); positions count real tokens only, the cached ones included, as in :meth:`forward`."""
        b, n = input_ids.shape
        device = input_ids.device
        if cache.real.shape[0] != b:
            cache = cache.expand(b)
        new_real = attention_mask.bool() if attention_mask is not None else torch.ones(b, n, dtype=torch.bool,
                                                                                      device=device)
        real = torch.cat([cache.real, new_real], dim=1)  # [B, T + L]
        positions = ((real.long().cumsum(-1) - 1).clamp(min=0))[:, -n:]
        keys = torch.arange(real.shape[1], device=device)
        queries = keys[-n:]
        # a new token sees the real tokens up to itself; a padded one only itself (softmax stays finite)
        mask = ((keys[None, :] <= queries[:, None])[None] & real[:, None, :]) | (keys[None, :] == queries[:, None])
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        layers = []
        for layer, past in zip(self.layers, cache.layers):
            x, kv = layer.forward_cached(x, cos, sin, mask[:, None], past)
            layers.append(kv)
        return self.norm(x), KVCache(layers, real)


@dataclass
class KVCache:
    """Keys and values [B, n_kv, T, head_dim] of every layer for the T tokens seen so far, and which of
    them are real (``real`` [B, T], False at padding). A batch-1 cache (a shared prompt prefix) serves a
    batch of any size: the first call that extends it broadcasts it over the batch."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    real: torch.Tensor

    @classmethod
    def empty(cls, cfg: Qwen3Config, batch: int = 1, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> KVCache:
        z = torch.zeros(batch, cfg.num_key_value_heads, 0, cfg.head_dim, device=device, dtype=dtype)
        return cls([(z, z) for _ in range(cfg.num_hidden_layers)], torch.zeros(batch, 0, dtype=torch.bool,
                                                                                device=device))

    @property
    def length(self) -> int:
        return int(self.real.shape[1])

    def expand(self, batch: int) -> KVCache:
        """This batch-1 cache as a batch of ``batch`` identical rows (views, no copy)."""
        if self.real.shape[0] != 1:
            raise ValueError(f"only a batch-1 cache can be expanded (this one has {self.real.shape[0]} rows)")
        return KVCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers],
                       self.real.expand(batch, -1))


class DecoderLM(nn.Module):
    """The decoder with its LM head (tied to the input embeddings unless the checkpoint has its own):
    next-token logits for generation. Loads Qwen2/Qwen3/Llama ``*ForCausalLM`` checkpoints and GGUF files
    converted by :func:`tamis.models.gguf.gguf_to_hf`."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """(logits [B, V] of the token after each row's last position, the cache with ``input_ids`` added).
        Rows are right-aligned: pad on the left (``attention_mask`` 0) so every row ends at position -1."""
        if cache is None:
            cache = KVCache.empty(self.config, input_ids.shape[0], self.device, self.dtype)
        hidden, cache = self.model.forward_cached(input_ids, cache, attention_mask)
        return self.lm_head(hidden[:, -1]).float(), cache

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32") -> DecoderLM:
        model_dir = Path(model_dir)
        cfg = Qwen3Config.from_dict(load_config(model_dir))
        state = load_state_dict(model_dir)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(apply_key_map(state, model), assign=True)
        model = model.to(device=device, dtype=resolve_dtype(dtype)).eval()
        if cfg.tie_word_embeddings:  # assign=True and .to() untie the two; keep one tensor
            model.lm_head.weight = model.model.embed_tokens.weight
        return model



class JinaListwiseModel(nn.Module):
    """Qwen3 body + ReLU projector: the jina-reranker-v3 ranking model."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.projector = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.projector_hidden, bias=False),
            nn.ReLU(),
            nn.Linear(cfg.projector_hidden, cfg.projector_dim, bias=False),
        )

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final post-norm hidden states [B, L, H]."""
        return self.model(input_ids, attention_mask)

    def read_out(
        self,
        input_ids: torch.Tensor,
        doc_token_id: int,
        query_token_id: int,
        attention_mask: torch.Tensor | None = None,
        n_query_tokens: int = 1,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row: (doc_embeds [n_docs, P], query_embeds [n_query_tokens, P]), projected, not normalised.

        Query tokens come in prompt order: with the dual query token of training (right after the first
        query) row ``[0]`` is that one and ``[-1]`` the ranking query at the end. Each row must hold
        exactly ``n_query_tokens`` of them.
        """
        hidden = self.forward(input_ids, attention_mask)
        real = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for r in range(input_ids.shape[0]):
            doc_pos = ((input_ids[r] == doc_token_id) & real[r]).nonzero().flatten()
            q_pos = ((input_ids[r] == query_token_id) & real[r]).nonzero().flatten()
            if q_pos.numel() != n_query_tokens:
                raise ValueError(
                    f"row {r} has {q_pos.numel()} query tokens (id {query_token_id}); expected {n_query_tokens}"
                )
            proj = self.projector(hidden[r, torch.cat([doc_pos, q_pos])])
            out.append((proj[: doc_pos.numel()], proj[doc_pos.numel() :]))
        return out

    def rank_embeddings_batch(
        self,
        input_ids: torch.Tensor,
        doc_token_id: int,
        query_token_id: int,
        attention_mask: torch.Tensor | None = None,
        n_query_tokens: int = 1,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row: (doc_embeds [n_docs, P], query_embed [P]), projected, not normalised, in model dtype.

        ``doc_token_id`` / ``query_token_id`` are the ids of ``<|embed_token|>`` / ``<|rerank_token|>``
        taken from the tokenizer. Each row must hold exactly ``n_query_tokens`` query tokens (1 in the
        official prompt, 2 with the dual query token); the last one is the query vector.
        """
        rows = self.read_out(input_ids, doc_token_id, query_token_id, attention_mask, n_query_tokens)
        return [(docs, queries[-1]) for docs, queries in rows]

    def rank_embeddings(
        self,
        input_ids: torch.Tensor,
        doc_token_id: int,
        query_token_id: int,
        attention_mask: torch.Tensor | None = None,
        n_query_tokens: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(doc_embeds [n_docs, P], query_embed [P]) for a single sequence (input_ids [L] or [1, L])."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = attention_mask[None] if attention_mask is not None else None
        if input_ids.shape[0] != 1:
            raise ValueError("rank_embeddings takes one sequence; use rank_embeddings_batch for several")
        return self.rank_embeddings_batch(input_ids, doc_token_id, query_token_id, attention_mask, n_query_tokens)[0]

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> JinaListwiseModel:
        """Load a jina-reranker-v3 layout directory (config.json + safetensors). Every key must map."""
        model_dir = Path(model_dir)
        raw = load_config(model_dir)
        cfg = Qwen3Config.from_dict(raw)
        state = load_state_dict(model_dir)
        # projector widths as the checkpoint stores them (the real model: 1024 -> 512 -> 512)
        p0, p2 = state.get("projector.0.weight"), state.get("projector.2.weight")
        if p0 is not None and p2 is not None:
            cfg = replace(cfg, projector_hidden=int(p0.shape[0]), projector_dim=int(p2.shape[0]))
        with torch.device("meta"):
            model = cls(cfg)
        # official names are ours (model.*, projector.0/2); lm_head is replaced by Identity upstream
        state = apply_key_map(state, model, ignore=("lm_head.",))
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=resolve_dtype(dtype)).eval()
