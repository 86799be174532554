"""Low-rank adapters (LoRA) on any module tree: inject, train, serve several per batch, merge, save in
peft's layout.

An adapted ``nn.Linear`` becomes a :class:`LoRALinear` that keeps the original layer as ``base`` and
stacks the adapters it knows: ``lora_A`` ``[n, r, in]``, ``lora_B`` ``[n, out, r]`` (ranks padded with
zeros to the largest), one scale ``alpha / r`` per adapter. Which rows of a batch use which adapter is a
:class:`AdapterRoute` made once per forward pass (:func:`route_adapters`) and read by every adapted layer
from a context variable (:func:`use_route`), so model code does not change: rows without an adapter
cost nothing, a batch where every row uses one adapter costs one low-rank product per layer, mixed
batches one batched product. (jina-embeddings-v3 passes the same route explicitly through its layers.)

On disk, an adapter uses peft's layout: ``adapter_config.json`` and ``adapter_model.safetensors`` with
keys ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``;
module paths are the official checkpoint's (see ``path_to_official``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tamis.errors import CheckpointError


@dataclass(frozen=True)
class AdapterRoute:
    """Which rows of a batch get which adapter; built once per forward, shared by every layer."""

    rows: torch.Tensor | None  # [b] row indices that have an adapter; None = every row
    ids: torch.Tensor | None  # [b] adapter index of each selected row; None when ``single`` is set
    single: int | None  # every selected row uses this adapter


def route_adapters(
    adapter_ids: torch.Tensor | Sequence[int] | None, batch: int, n_adapters: int, device: torch.device
) -> AdapterRoute | None:
    """Validate ``adapter_ids`` ([batch], -1 = base weights) and plan the per-row LoRA deltas."""
    if adapter_ids is None:
        return None
    ids = torch.as_tensor(adapter_ids).reshape(-1).to("cpu", torch.long)  # tiny; planning happens on the host
    if ids.numel() != batch:
        raise ValueError(f"adapter_ids has {ids.numel()} entries for a batch of {batch}")
    if batch == 0:
        return None
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= n_adapters:
        raise ValueError(f"adapter_ids must lie in [-1, {n_adapters - 1}] (this model has {n_adapters} adapters)")
    has = ids >= 0
    n = int(has.sum())
    if n == 0:
        return None
    rows = None if n == batch else has.nonzero().squeeze(1).to(device)
    sel = ids[has]
    if bool((sel == sel[0]).all()):
        return AdapterRoute(rows=rows, ids=None, single=int(sel[0]))
    return AdapterRoute(rows=rows, ids=sel.to(device), single=None)


def linear_delta(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, route: AdapterRoute,
    scaling: float | torch.Tensor,
) -> torch.Tensor:
    """``y + s_t · (x A_tᵀ) B_tᵀ`` for the routed rows of ``x`` ``[B, L, in]`` (``y``: ``[B, L, out]``).

    ``lora_a`` ``[n, r, in]``, ``lora_b`` ``[n, out, r]``; ``scaling`` a float or ``[n]`` per adapter.
    In place on ``y`` when no gradient flows (inference), out of place when training.
    """
    inplace = not torch.is_grad_enabled() or not (lora_a.requires_grad or lora_b.requires_grad or x.requires_grad)
    xs = x if route.rows is None else x.index_select(0, route.rows)
    if route.single is not None:
        s = scaling if isinstance(scaling, float) else float(scaling[route.single])
        xa = F.linear(xs, lora_a[route.single])  # [b, L, r]
        bt = lora_b[route.single].t()  # [r, out]
        if route.rows is None and inplace:  # accumulate in place: no [B, L, out] temporary
            y.view(-1, y.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), bt, alpha=s)
            return y
        delta = (xa @ bt) * s
    else:
        a = lora_a.index_select(0, route.ids)  # [b, r, in]
        bt = lora_b.index_select(0, route.ids).transpose(1, 2)  # [b, r, out]
        xa = torch.bmm(xs.reshape(xs.shape[0], -1, xs.shape[-1]), a.transpose(1, 2))
        if isinstance(scaling, float):
            delta = torch.bmm(xa, bt) * scaling
        else:
            delta = torch.bmm(xa, bt) * scaling.index_select(0, route.ids).to(xa.dtype)[:, None, None]
        delta = delta.reshape(*xs.shape[:-1], -1)
    if route.rows is None:
        return y.add_(delta) if inplace else y + delta
    return y.index_add_(0, route.rows, delta) if inplace else y.index_add(0, route.rows, delta)


_ROUTE: ContextVar[AdapterRoute | None] = ContextVar("tamis_lora_route", default=None)


@contextmanager
def use_route(route: AdapterRoute | None) -> Iterator[None]:
    """Adapted layers called inside this block apply ``route`` (``None``: base weights only)."""
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


def active_route() -> AdapterRoute | None:
    """The route set by the enclosing :func:`use_route` (None: adapted layers compute base weights only;
    carried into recomputation, e.g. gradient checkpointing)."""
    return _ROUTE.get()


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (kept as ``base``) with stacked named adapters, applied per routed row."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.names: list[str] = []
        self.lora_A: nn.Parameter | None = None  # [n, r, in]
        self.lora_B: nn.Parameter | None = None  # [n, out, r]
        self.register_buffer("scaling", torch.zeros(0), persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def set_adapter(self, index: int, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Put adapter ``index`` (``a`` ``[r, in]``, ``b`` ``[out, r]``); the stack grows (zeros) as needed."""
        r = a.shape[0]
        if a.shape[1] != self.in_features or b.shape != (self.out_features, r):
            raise CheckpointError(f"adapter {name!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a "
                                  f"Linear {self.in_features} -> {self.out_features}")
        n = max(index + 1, len(self.names))
        r_max = max(r, self.lora_A.shape[1] if self.lora_A is not None else 0)
        w = self.base.weight
        new_a = torch.zeros(n, r_max, self.in_features, dtype=w.dtype, device=w.device)
        new_b = torch.zeros(n, self.out_features, r_max, dtype=w.dtype, device=w.device)
        new_s = torch.zeros(n, dtype=torch.float32, device=w.device)
        if self.lora_A is not None and self.lora_B is not None:
            old_n, old_r = self.lora_A.shape[0], self.lora_A.shape[1]
            new_a[:old_n, :old_r] = self.lora_A.detach()
            new_b[:old_n, :, :old_r] = self.lora_B.detach()
            new_s[:old_n] = self.scaling
        new_a[index, :r] = a.to(w.dtype)
        new_b[index, :, :r] = b.to(w.dtype)
        new_s[index] = scaling
        self.lora_A, self.lora_B = nn.Parameter(new_a), nn.Parameter(new_b)
        self.scaling = new_s
        self.names += [""] * (n - len(self.names))
        self.names[index] = name

    def grow(self, n: int) -> None:
        """Make room for ``n`` adapters (zero adapters: this layer is not adapted by the new ones)."""
        if self.lora_A is None or self.lora_A.shape[0] >= n:
            return
        extra = n - self.lora_A.shape[0]
        self.lora_A = nn.Parameter(torch.cat([self.lora_A.detach(), self.lora_A.new_zeros(extra, *self.lora_A.shape[1:])]))
        self.lora_B = nn.Parameter(torch.cat([self.lora_B.detach(), self.lora_B.new_zeros(extra, *self.lora_B.shape[1:])]))
        self.scaling = torch.cat([self.scaling, self.scaling.new_zeros(extra)])
        self.names += [""] * extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = _ROUTE.get()
        if route is None or self.lora_A is None or self.lora_B is None:
            return y
        return linear_delta(y, x, self.lora_A, self.lora_B, route, self.scaling)

    def adapter(self, index: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A [r, in], B [out, r], scaling)`` of one adapter, padding rows dropped."""
        assert self.lora_A is not None and self.lora_B is not None
        a, b = self.lora_A[index], self.lora_B[index]
        keep = (a.abs().sum(1) > 0) | (b.abs().sum(0) > 0)
        r = int(keep.nonzero().max()) + 1 if keep.any() else a.shape[0]
        return a[:r], b[:, :r], float(self.scaling[index])

    @torch.no_grad()
    def merged(self, index: int) -> nn.Linear:
        """A plain ``nn.Linear`` with adapter ``index`` folded in: ``W + s · B A``."""
        a, b, s = self.adapter(index)
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + s * (b.float() @ a.float()).to(self.base.weight.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


# ------------------------------------------------------------------------------------ model surgery


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def target_paths(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Paths of the ``nn.Linear`` modules whose name (last path component) or path suffix is in ``targets``."""
    wrapped = {p + ".base" for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    out = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear | LoRALinear) and path not in wrapped and any(
                path == t or path.endswith("." + t) for t in targets):
            out.append(path)
    if not out:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no Linear layer matches target_modules {list(targets)}; Linear names here: {names}")
    return out


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in lora_layers(model).values():
        for i, n in enumerate(layer.names):
            while len(names) <= i:
                names.append("")
            names[i] = names[i] or n
    return names


def add_adapter(model: nn.Module, name: str, targets: Sequence[str], r: int = 8, alpha: float = 16.0,
                seed: int = 0, weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> int:
    """Add adapter ``name`` to the layers matching ``targets`` (wrapping them in :class:`LoRALinear` first)
    and return its index. Fresh adapters follow peft: A Kaiming-uniform, B zero (the model is unchanged
    until trained); ``weights`` (path -> (A, B)) loads trained ones instead."""
    names = adapter_names(model)
    if name in names:
        raise ValueError(f"the model already has an adapter named {name!r}")
    index = len(names)
    paths = list(weights) if weights is not None else target_paths(model, targets)
    g = torch.Generator().manual_seed(seed)
    for path in paths:
        mod = model.get_submodule(path)
        if not isinstance(mod, LoRALinear):
            if not isinstance(mod, nn.Linear):
                raise CheckpointError(f"adapter {name!r} targets {path}, which is not a Linear layer")
            parent, child = _parent(model, path)
            mod = LoRALinear(mod)
            setattr(parent, child, mod)
        if weights is not None:
            a, b = weights[path]
            rank = a.shape[0]
        else:
            rank = r
            a = torch.empty(r, mod.in_features)
            bound = 1.0 / math.sqrt(mod.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
            a.uniform_(-bound, bound, generator=g)
            b = torch.zeros(mod.out_features, r)
        mod.set_adapter(index, name, a, b, alpha / rank)
    for layer in lora_layers(model).values():  # every adapted layer stacks the same adapters
        layer.grow(index + 1)
    return index


def route_all(model: nn.Module, name: str, batch: int) -> AdapterRoute | None:
    """Every row of a batch through adapter ``name`` (training, or a single-task batch)."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter {name!r}; adapters: {names}")
    device = next(model.parameters()).device
    return route_adapters([names.index(name)] * batch, batch, len(names), device)


def trainable_adapter(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Freeze everything but the LoRA stacks (gradients of other adapters' slices are zeroed by a hook)."""
    index = adapter_names(model).index(name)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in lora_layers(model).values():
        for p in (layer.lora_A, layer.lora_B):
            if p is None:
                continue
            p.requires_grad_(True)
            if p.shape[0] > 1:
                mask = torch.zeros(p.shape[0], *([1] * (p.ndim - 1)), dtype=p.dtype, device=p.device)
                mask[index] = 1
                p.register_hook(lambda g, m=mask: g * m)
            params.append(p)
    return params


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights and remove every adapter (an ordinary model again)."""
    index = adapter_names(model).index(name)
    for path, layer in lora_layers(model).items():
        parent, child = _parent(model, path)
        has = layer.lora_A is not None and index < layer.lora_A.shape[0] and layer.names[index] == name
        setattr(parent, child, layer.merged(index) if has else layer.base)


# ------------------------------------------------------------------------------------ peft's layout

PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, name: str, out_dir: str | Path, base_model: str | None = None,
                 path_to_official: Callable[[str], str] = lambda p: p, extra_config: dict[str, Any] | None = None
                 ) -> Path:
    """Write adapter ``name`` as ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's layout)."""
    index = adapter_names(model).index(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, targets = set(), set(), set()
    for path, layer in lora_layers(model).items():
        if layer.lora_A is None or index >= layer.lora_A.shape[0] or layer.names[index] != name:
            continue
        a, b, s = layer.adapter(index)
        key = PEFT_PREFIX + path_to_official(path)
        tensors[f"{key}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = b.detach().float().contiguous().cpu()
        ranks.add(a.shape[0])
        alphas.add(round(s * a.shape[0], 6))
        targets.add(path_to_official(path))
    if not tensors:
        raise ValueError(f"adapter {name!r} adapts no layer")
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"adapter {name!r} mixes ranks {ranks} / alphas {alphas}; peft's config has one of each")
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": ranks.pop(), "lora_alpha": alphas.pop(),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": _suffix_targets(model, targets, path_to_official),
              "base_model_name_or_path": base_model, "inference_mode": True, "modules_to_save": None,
              "tamis_adapter_name": name, **(extra_config or {})}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _suffix_targets(model: nn.Module, adapted: set[str], path_to_official: Callable[[str], str]) -> list[str]:
    """peft ``target_modules`` naming exactly the ``adapted`` (official) paths: for each, the shortest
    path suffix that matches no other Linear layer (peft matches a name or a ``.``-suffix, as
    :func:`target_paths`), e.g. ``query`` but ``attention.output.dense`` when a pooler's ``dense`` is
    not adapted."""
    wrapped = {p + ".base" for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    linear = [path_to_official(p) for p, m in model.named_modules()
              if isinstance(m, nn.Linear | LoRALinear) and p not in wrapped]
    chosen = set()
    for path in adapted:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(p in adapted for p in linear if p == suffix or p.endswith("." + suffix)):
                chosen.add(suffix)
                break
    return sorted(chosen)


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str,
                 official_to_path: Callable[[str], str] = lambda p: p) -> int:
    """Add the peft-layout adapter in ``adapter_dir`` to ``model`` under ``name``; returns its index."""
    d = Path(adapter_dir)
    cfg_path, weights_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        missing = [p.name for p in (cfg_path, weights_path) if not p.is_file()]
        raise CheckpointError(f"{d} is not a LoRA adapter directory: missing {', '.join(missing)}"
                              + (" (adapter_model.bin is pickle and is never loaded)" if (d / "adapter_model.bin").is_file() else ""))
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{d}: peft_type {config.get('peft_type')!r} is not LoRA")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise CheckpointError(f"{d}: DoRA / fan_in_fan_out adapters are not supported")
    alpha, default_r = float(config["lora_alpha"]), int(config["r"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():
            stem = key.removeprefix(PEFT_PREFIX)
            for part in (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
                if stem.endswith(part):
                    path = official_to_path(stem[: -len(part)])
                    pairs.setdefault(path, {})["A" if "lora_A" in part else "B"] = f.get_tensor(key)
                    break
            else:
                raise CheckpointError(f"{d}: unexpected tensor {key} (only LoRA A/B matrices of Linear layers)")
    weights = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{d}: {path} has only lora_{next(iter(ab))}")
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{d}: the adapter targets {path}, which this model does not have") from None
        if not isinstance(mod, nn.Linear | LoRALinear):
            raise CheckpointError(f"{d}: {path} is not a Linear layer")
        weights[path] = (ab["A"], ab["B"])
    ranks = {a.shape[0] for a, _ in weights.values()}
    if ranks - {default_r} and not config.get("rank_pattern"):
        raise CheckpointError(f"{d}: tensors have rank {sorted(ranks)} but adapter_config.json says r={default_r}")
    return add_adapter(model, name, [], alpha=alpha, weights=weights)
