"""The `tokenizers` library behind one small interface.

Every text is first encoded *without* special tokens (batched, in Rust), truncated by us to the budget
left after the model's special tokens, then post-processed (the tokenizer's own template adds
``[CLS] … [SEP]`` / ``<s> … </s>`` and pair templates with token types). This keeps the tokenizer object
stateless (safe to share between threads), tells the caller exactly which inputs were cut and how
long they were, and keeps character offsets for late chunking.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer

from tamis.errors import InputTooLongError, ModelNotFoundError

# a text longer than this many characters per token of the model's limit is cut (or refused) by characters
# before tokenizing; the server's max_chars_per_token defaults to the same 32
MAX_CHARS_PER_TOKEN = 32

# tokenizer_config.json uses int(1e30) to mean "no limit"
_NO_LIMIT = 10**12


@dataclass
class Encoded:
    """One tokenized input, special tokens included."""

    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[int]  # 1 where the token was added by the template
    n_tokens: int  # length before truncation (special tokens included)
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    lengths: list[int] = field(default_factory=list)


class Tokenizer:
    """A model's tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)."""

    def __init__(self, tok: HFTokenizer, config: dict | None = None, model_config: dict | None = None):
        self._tok = tok
        self._tok.no_padding()
        self._tok.no_truncation()
        self.config = config or {}
        model_config = model_config or {}
        mml = self.config.get("model_max_length")
        self.model_max_length: int | None = int(mml) if mml is not None and int(mml) < _NO_LIMIT else None
        self.padding_side: str = self.config.get("padding_side", "right")
        pad = self._token_str(self.config.get("pad_token"))
        pad_id = self._tok.token_to_id(pad) if pad else None
        if pad_id is None:
            pad_id = model_config.get("pad_token_id")
        self.pad_id: int = int(pad_id) if pad_id is not None else 0
        self._n_special_single = self._tok.num_special_tokens_to_add(False)
        self._n_special_pair = self._tok.num_special_tokens_to_add(True)

    @staticmethod
    def _token_str(tok: object) -> str | None:
        if isinstance(tok, dict):
            return tok.get("content")
        return tok if isinstance(tok, str) else None

    @classmethod
    def from_dir(cls, model_dir: str | Path, model_config: dict | None = None) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(
                str(model_dir),
                [f"{path} (missing: tamis needs the fast-tokenizer file tokenizer.json beside config.json)"],
            )
        tc_path = model_dir / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else None
        return cls(HFTokenizer.from_file(str(path)), tc, model_config)

    # ------------------------------------------------------------------ vocabulary
    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def added_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    def num_special_tokens(self, pair: bool = False) -> int:
        return self._n_special_pair if pair else self._n_special_single

    # ------------------------------------------------------------------ encoding
    def raw(self, texts: Sequence[str]) -> list[Encoding]:
        """Encodings without special tokens and without truncation."""
        return self._tok.encode_batch(list(texts), add_special_tokens=False)

    def count_tokens(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[int]:
        extra = self._n_special_single if add_special_tokens else 0
        return [len(e.ids) + extra for e in self.raw(texts)]

    def encode(
        self,
        texts: Sequence[str],
        max_length: int | None,
        truncate: bool = True,
        add_special_tokens: bool = True,
        side: str = "right",
        prefix: str = "",
    ) -> list[Encoded]:
        """Encode single texts (each after ``prefix``, an instruction). With ``truncate=False`` an over-long input
        raises InputTooLongError; otherwise it is cut at the end (``side="right"``) or at the start
        (``side="left"``: the text's tail is kept, after the whole prefix).

        Before tokenizing, a text longer than :data:`MAX_CHARS_PER_TOKEN` characters per token of ``max_length``
        is cut to that many characters (and counts as truncated; its ``n_tokens`` are those of the cut text) or,
        with ``truncate=False``, refused: the server's rule, so one huge line cannot hold the tokenizer (and
        memory) for seconds."""
        if side not in ("right", "left"):
            raise ValueError(f"side must be 'right' or 'left', not {side!r}")
        texts = list(texts)
        clipped: set[int] = set()
        if max_length is not None:
            cap = int(max_length) * MAX_CHARS_PER_TOKEN
            for i, t in enumerate(texts):
                if len(t) > cap:
                    if not truncate:
                        raise InputTooLongError(i, 0, int(max_length), n_chars=len(t), char_limit=cap)
                    texts[i] = t[:cap] if side == "right" else t[-cap:]
                    clipped.add(i)
        extra = self._n_special_single if add_special_tokens else 0
        out: list[Encoded] = []
        prefix_enc = self.raw([prefix])[0] if prefix and side == "left" else None
        for i, enc in enumerate(self.raw([prefix + t for t in texts])):
            n = len(enc.ids) + extra
            cut = max_length is not None and n > max_length
            if i in clipped and not cut:
                out.append(_encoded(self._tok.post_process(enc, None, True) if add_special_tokens else enc, n, True))
                continue
            if cut:
                if not truncate:
                    raise InputTooLongError(i, n, int(max_length))
                keep = max(int(max_length) - extra, 0)
                if side == "right":
                    enc.truncate(keep)
                elif prefix_enc is None:
                    enc.truncate(keep, direction="left")
                else:
                    tail = self.raw([texts[i]])[0]
                    tail.truncate(max(keep - len(prefix_enc.ids), 0), direction="left")
                    enc = Encoding.merge([prefix_enc, tail], growing_offsets=False)
            if add_special_tokens:
                enc = self._tok.post_process(enc, None, True)
            out.append(_encoded(enc, n, cut))
        return out

    def encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        max_length: int | None,
        truncate: bool = True,
    ) -> list[Encoded]:
        """Encode (query, document) pairs with the tokenizer's pair template.

        Over-long pairs cut the document first; the query is cut only when it alone would leave the
        document less than half of the budget.
        """
        if len(queries) != len(documents):
            raise ValueError("queries and documents must have the same length")
        q_raw = self.raw(queries)
        d_raw = self.raw(documents)
        out: list[Encoded] = []
        for i, (q, d) in enumerate(zip(q_raw, d_raw)):
            n = len(q.ids) + len(d.ids) + self._n_special_pair
            cut = max_length is not None and n > max_length
            if cut:
                if not truncate:
                    raise InputTooLongError(i, n, int(max_length))
                budget = max(int(max_length) - self._n_special_pair, 0)
                d_keep = max(budget - len(q.ids), min(len(d.ids), budget // 2))
                q_keep = budget - d_keep
                if len(q.ids) > q_keep:
                    q.truncate(q_keep)
                d.truncate(d_keep)
            enc = self._tok.post_process(q, d, True)
            out.append(_encoded(enc, n, cut))
        return out

    def pad(self, encodings: Sequence[Encoded], device: str | torch.device = "cpu") -> Batch:
        """Stack encodings into padded tensors (padding side from tokenizer_config)."""
        lengths = [len(e) for e in encodings]
        width = max(lengths) if lengths else 0
        n = len(encodings)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        left = self.padding_side == "left"
        for r, e in enumerate(encodings):
            k = len(e)
            sl = slice(width - k, width) if left else slice(0, k)
            ids[r, sl] = e.ids
            types[r, sl] = e.type_ids
            mask[r, sl] = 1
        return Batch(
            input_ids=torch.from_numpy(ids).to(device),
            attention_mask=torch.from_numpy(mask).to(device),
            token_type_ids=torch.from_numpy(types).to(device),
            lengths=lengths,
        )


@dataclass
class PackedBatch:
    """Encodings laid end to end: ``input_ids`` / ``token_type_ids`` [T], sequence ``s`` has ``lengths[s]`` rows."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    lengths: list[int]


def pack(encodings: Sequence[Encoded], device: str | torch.device = "cpu") -> PackedBatch:
    """Concatenate encodings (no padding) in the order given."""
    lengths = [len(e) for e in encodings]
    ids = np.fromiter((t for e in encodings for t in e.ids), dtype=np.int64, count=sum(lengths))
    types = np.fromiter((t for e in encodings for t in e.type_ids), dtype=np.int64, count=sum(lengths))
    return PackedBatch(torch.from_numpy(ids).to(device), torch.from_numpy(types).to(device), lengths)


def _encoded(enc: Encoding, n_tokens: int, truncated: bool) -> Encoded:
    return Encoded(
        ids=list(enc.ids),
        type_ids=list(enc.type_ids),
        offsets=[tuple(o) for o in enc.offsets],
        special=list(enc.special_tokens_mask),
        n_tokens=n_tokens,
        truncated=truncated,
    )
