"""Read a Llama- or Qwen2-architecture GGUF file (llama.cpp's format) into a Hugging Face layout directory.

The ``gguf`` package (llama.cpp's own reader) parses the file and dequantizes every tensor to float32;
this module only maps names and undoes llama.cpp's conversion quirks:

- tensor names: ``token_embd`` -> ``model.embed_tokens``, ``blk.N.attn_q`` -> ``model.layers.N.self_attn.q_proj``, ...
- shapes: GGUF lists dimensions fastest-first, so ``[in, out]`` there is a ``[out, in]`` torch weight;
- rotary layout: llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` of Llama models so that
  its interleaved ("GPT-J") RoPE equals Hugging Face's half-split ("NeoX") one; :func:`unpermute_rope`
  inverts that permutation, because our decoder (tamis.models.qwen3) uses the half-split layout. Qwen2
  files are not permuted (llama.cpp runs them with NeoX RoPE) and carry q/k/v biases;
- tokenizer: a GPT-2 style byte-level BPE (``tokenizer.ggml.tokens`` / ``merges``) is rebuilt as a
  ``tokenizer.json`` for the ``tokenizers`` library, with control tokens (``<|im_start|>`` ...) as special
  added tokens and the pre-tokenizer named by ``tokenizer.ggml.pre`` (``smollm``, ``gpt2``, ``qwen2``).

Quantized weights (Q4_1, Q8_0, ...) are lossy; dequantized they are the exact values llama.cpp computes
with. :func:`gguf_to_hf` writes ``config.json`` (model_type llama), ``model.safetensors`` (float32),
``tokenizer.json`` and ``tokenizer_config.json``, which :class:`tamis.models.qwen3.Qwen3Config` and the
training code read like any other checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tamis.errors import CheckpointError, UnsupportedModelError

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp pre-tokenizer names -> the regex split of Hugging Face's tokenizer.json for those models.
# "gpt2"-family byte-level splitting; "smollm" additionally splits every digit on its own; "qwen2" uses its
# own split (one digit per piece, letters with one leading non-letter, NFC-normalised text).
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False, "qwen2": False}
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GGUF_NAMES = {hf: gguf for gguf, hf in _LAYER_NAMES.items()}


def _reader(path: str | os.PathLike[str]) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UnsupportedModelError(
            "reading GGUF files needs the 'gguf' package: pip install 'tamis[gguf]' (or pip install gguf)"
        ) from e
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of a q/k projection ``[n_heads * head_dim, in]``.

    llama.cpp stores, per head, the rows in the order (0, hd/2, 1, hd/2+1, ...) so that pairs rotated
    together are adjacent; Hugging Face rotates row i with row i + hd/2.
    """
    out, inp = w.shape
    head_dim = out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's conversion permutation (the inverse of :func:`unpermute_rope`)."""
    out, inp = w.shape
    head_dim = out // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_tensor_name(key: str) -> str:
    """The GGUF name of a Hugging Face decoder tensor name (the inverse of :func:`read_gguf`'s mapping), for
    writing GGUF files, e.g. small test models."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if key in fixed:
        return fixed[key]
    _, _, layer, rest = key.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(HF ``config.json`` dict, HF-named float32 state dict, tokenizer description) of a Llama / Qwen2 GGUF."""
    from gguf import dequantize

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"({', '.join(map(repr, _ARCHITECTURES))})")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = hidden // heads
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings are not supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    config = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(meta("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "gguf_source": {"name": _field(reader, "general.name"), "file": Path(path).name,
                        "file_type": _field(reader, "general.file_type")},
    }
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type)
        shape = [int(x) for x in reversed(t.shape.tolist())]  # GGUF lists the fastest dimension first
        w = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy
        name = t.name
        if name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            state["model.norm.weight"] = w
        elif name == "output.weight":
            config["tie_word_embeddings"] = False
            state["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, layer, kind, suffix = name.split(".", 3)
            biased = arch == "qwen2" and kind in ("attn_q", "attn_k", "attn_v")
            if kind not in _LAYER_NAMES or suffix not in (("weight", "bias") if biased else ("weight",)):
                raise UnsupportedModelError(f"{path}: unexpected tensor {name}")
            if arch == "llama" and kind == "attn_q":
                w = unpermute_rope(w, heads)
            elif arch == "llama" and kind == "attn_k":
                w = unpermute_rope(w, kv_heads)
            state[f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"] = w
        elif name == "rope_freqs.weight":
            raise UnsupportedModelError(f"{path}: rope frequency factors (rope scaling) are not supported")
        else:
            raise UnsupportedModelError(f"{path}: unexpected tensor {name}")
    tokenizer = {
        "model": _field(reader, "tokenizer.ggml.model"),
        "pre": _field(reader, "tokenizer.ggml.pre", "default"),
        "tokens": tokens,
        "token_type": list(_field(reader, "tokenizer.ggml.token_type") or []),
        "merges": list(_field(reader, "tokenizer.ggml.merges") or []),
        "bos": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad": _field(reader, "tokenizer.ggml.padding_token_id"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    return config, state, tokenizer


def build_tokenizer(desc: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` for a GGUF ``gpt2``-type vocabulary (byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if desc["model"] != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer model {desc['model']!r} is not supported (only byte-level BPE 'gpt2')")
    pre = desc.get("pre") or "default"
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})")
    vocab = {tok: i for i, tok in enumerate(desc["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in desc["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre == "qwen2":  # Qwen2's tokenizer.json: NFC, its own split, then bytes without GPT-2's regex
        tok.normalizer = normalizers.NFC()
        steps = [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]  # GPT-2's regex split
        if _PRE_TOKENIZERS[pre]:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(desc["tokens"], desc["token_type"]) if kind in (3, 4)]
    if special:
        tok.add_special_tokens(special)
    return tok


def gguf_to_hf(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write the GGUF model at ``path`` as a Hugging Face layout directory (float32 safetensors)."""
    config, state, desc = read_gguf(path)
    tok = build_tokenizer(desc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": f"gguf:{Path(path).name}"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))

    def name(i: int | None) -> str | None:
        return desc["tokens"][i] if i is not None and 0 <= i < len(desc["tokens"]) else None

    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
               "bos_token": name(desc["bos"]), "eos_token": name(desc["eos"]), "pad_token": name(desc["pad"]),
               "model_max_length": config["max_position_embeddings"], "padding_side": "left",
               "chat_template": desc.get("chat_template")}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out


__all__ = ["build_tokenizer", "gguf_tensor_name", "gguf_to_hf", "permute_rope", "read_gguf", "unpermute_rope"]
