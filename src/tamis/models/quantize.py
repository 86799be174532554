"""``dtype="int8"``: dynamic int8 Linear layers (weights int8 per output channel, activations quantised per
call), through torch's own dynamic quantisation (fbgemm on x86: VNNI where the CPU has it, AVX2 u8*s8 pairs
elsewhere). Everything else (embeddings, LayerNorm, attention, pooling) stays float32.

Quality is below the bf16 bar (see README "Speed"), so ``"auto"`` never picks it; measure it on your data with
``tamis bench --dtype int8 --vs sentence-transformers`` (min cosine vs float32).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of a float32 CPU inference module by a dynamic int8 one (per-channel)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if torch.backends.quantized.engine not in ("fbgemm", "x86", "qnnpack", "onednn"):
        raise ValueError(f"dtype='int8' needs a quantized engine; this torch has {torch.backends.quantized.engine!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's move notice
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
        return quantize_dynamic(module.float().eval(), {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
