"""A BERT-family model made ready for inference: loaded, int8 or fused query/key/value, compiled.

:func:`load_for_inference` is what :class:`tamis.Embedder` and :class:`tamis.rerank.CrossEncoderReranker` load
through. Like a compiled forward, the fused projections keep the weights they were made from: a module whose
weights change afterwards (training) is loaded with ``frozen=False`` (no fused copy, never compiled), or
through :func:`tamis.models.bert.from_pretrained` directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tamis.hardware import Precision, resolve_compile
from tamis.models import bert
from tamis.models.bert import BertForSequenceClassification, BertModel
from tamis.models.packed import Packing

logger = logging.getLogger("tamis")


def load_for_inference(
    model_dir: str | Path, device: torch.device, precision: Precision, *, classification: bool,
    compile: bool | str = "auto", frozen: bool = True,
) -> tuple[BertModel | BertForSequenceClassification, float | None, str]:
    """Load a BERT-family encoder (``classification=False``) or cross-encoder, then int8 (``precision.int8``)
    or fuse its query/key/value projections, then compile its packed forward as ``compile`` asks (see
    :func:`compile_if_wanted`). Returns (module, compile warm-up seconds or None, why compiled or not).
    ``frozen=False``: weights that will be trained, loaded as they are (no fused copy, eager)."""
    model = bert.from_pretrained(model_dir, device, precision.dtype, classification=classification)
    if not frozen:
        return model, None, "trainable: eager"
    if precision.int8:
        from tamis.models.quantize import quantize_int8

        model = quantize_int8(model)
    else:
        fuse_qkv(model)
    seconds, why = compile_if_wanted(model, device, compile, precision)
    return model, seconds, why


def fuse_qkv(model: BertModel | BertForSequenceClassification) -> None:
    """One [3H, H] query/key/value projection per layer for the packed forward: a non-persistent copy (checkpoints
    keep ``query``/``key``/``value``; the padded forward, which training and LoRA adapter rows run, uses them)."""
    encoder = model.encoder_model if isinstance(model, BertForSequenceClassification) else model
    with torch.no_grad():
        for layer in encoder.encoder.layer:
            att = layer.attention.self
            att.qkv_weight = torch.cat([att.query.weight, att.key.weight, att.value.weight])
            att.qkv_bias = torch.cat([att.query.bias, att.key.bias, att.value.bias])


def compile_packed(model: BertModel | BertForSequenceClassification, device: str | torch.device = "cpu") -> float:
    """``torch.compile`` (inductor, dynamic shapes) of the packed forward, warmed up now so no request pays
    for compilation. Returns the warm-up seconds (inductor's on-disk cache makes later start-ups faster).
    Every input's first dimension (tokens, runs, sequences) is marked unbacked, so one graph serves any batch:
    no recompilation when one of them is 1.

    On CPU the graph is compiled with inductor's *freezing*: the weights become constants, prepacked once
    for oneDNN, and each Linear carries its GELU or residual add as a fused post-op; that is what makes
    compiling pay on CPU (README "Speed"). The compiled forward therefore keeps the weights it was compiled
    with: it serves inference only, and a model whose weights change must be compiled again."""
    from torch._inductor import config as inductor_config

    if "encode_packed" in vars(model):  # compiled already: one compiled forward per model
        return 0.0
    compiled = torch.compile(model.encode_packed, dynamic=True)
    # Freezing is set around every call: torch.compile(options=...) does not reach the inference compiler (no
    # oneDNN post-ops in the output code); the patched config does, read only when a (re)compilation happens.
    freezing = torch.device(device).type == "cpu"

    def run(*args: torch.Tensor) -> torch.Tensor:
        for t in args:
            torch._dynamo.decorators.mark_unbacked(t, 0)
        if not freezing:
            return compiled(*args)
        with inductor_config.patch(freezing=True):
            return compiled(*args)

    model.encode_packed = run  # type: ignore[method-assign]
    t0 = time.perf_counter()
    with torch.inference_mode():
        packing = Packing([7, 7, 5, 2], device)
        ids = torch.zeros(packing.total, dtype=torch.long, device=device)
        model.forward_packed(ids, torch.zeros_like(ids), packing)
    return time.perf_counter() - t0


def compile_if_wanted(model: BertModel | BertForSequenceClassification, device: str | torch.device,
                      compile: bool | str, precision: Precision) -> tuple[float | None, str]:
    """The models' ``compile`` argument (True, False or ``"auto"``, see :func:`tamis.hardware.resolve_compile`)
    applied to a packed model: returns (warm-up seconds or None when it runs eager, why). Under ``"auto"`` a
    failed compilation (no C++ compiler, an inductor error) is logged and the model stays eager; an explicit
    ``compile=True`` raises it."""
    wanted, why = resolve_compile(compile, device, precision)
    if not wanted:
        return None, why
    try:
        return compile_packed(model, device), why
    except Exception as exc:
        model.__dict__.pop("encode_packed", None)  # back to the eager method
        if compile is True:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("torch.compile failed, running eager (%s: %s)", type(exc).__name__, first[:200])
        return None, f"compile failed ({type(exc).__name__}), eager"
