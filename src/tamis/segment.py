"""Split a text into chunks of at most ``max_chunk_length`` tokens on its own boundaries (Jina Segmenter's job).

Chunks tile the text exactly: ``"".join(chunks) == text`` and ``text[start:end] == chunk`` for every
``(start, end)`` of ``chunk_positions`` (the whitespace after a boundary belongs to the chunk before it, as in
:func:`tamis.embed.sentence_spans`, whose sentence rule this reuses). Boundaries are tried coarsest first:
paragraphs (a blank line), lines, sentences, words, and only for a single word longer than the limit, tokens.
Neighbouring pieces are packed greedily up to the limit, and every chunk's length is its own tokenization's
(the chunk tokenized alone, no special tokens), so no chunk is over the limit even for byte-level BPE
vocabularies whose tokens can straddle the pieces.

Tokenizers: any served model's (a :class:`tamis.tokenize.Tokenizer`) and ``cl100k_base`` when ``tiktoken`` can load
it without the network (its BPE file in tiktoken's cache, ``TIKTOKEN_CACHE_DIR``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tamis.errors import InvalidInputError

DEFAULT_MAX_CHUNK_LENGTH = 1000
CL100K = "cl100k_base"

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_LINE = re.compile(r"\n\s*")
_WORD = re.compile(r"\s+")


class TokenizerLike(Protocol):
    name: str

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets (no special tokens)."""
        ...

    def count(self, text: str) -> int: ...


class HFTokenizer:
    """A served model's tokenizer (the ``tokenizers`` library behind :class:`tamis.tokenize.Tokenizer`)."""

    def __init__(self, name: str, tokenizer: Any):
        self.name = name
        self.tokenizer = tokenizer

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        (enc,) = self.tokenizer.raw([text])
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def count(self, text: str) -> int:
        return len(self.tokenizer.raw([text])[0].ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.raw(list(texts))]

    def token_text(self, text: str, ids: list[int], offsets: list[tuple[int, int]], i: int) -> str:
        s, e = offsets[i]
        return text[s:e]


class TiktokenTokenizer:
    """An OpenAI BPE vocabulary through ``tiktoken`` (offsets from ``decode_with_offsets``)."""

    def __init__(self, name: str, encoding: Any):
        self.name = name
        self.encoding = encoding

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encoding.encode(text, disallowed_special=())
        if not ids:
            return [], []
        decoded, starts = self.encoding.decode_with_offsets(ids)
        if decoded != text:  # invalid UTF-8 cannot come from a str; keep offsets inside the text anyway
            starts = [min(s, len(text)) for s in starts]
        ends = [max(a, b) for a, b in zip(starts, starts[1:] + [len(text)])]
        return ids, list(zip(starts, ends))

    def count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))

    def count_many(self, texts: Sequence[str]) -> list[int]:
        return [len(x) for x in self.encoding.encode_batch(list(texts), disallowed_special=())]


_tiktoken_lock = threading.Lock()
_tiktoken_cache: dict[str, Any] = {}


def load_tiktoken(name: str = CL100K, timeout_s: float = 10.0) -> TiktokenTokenizer:
    """``tiktoken``'s encoding ``name`` if it loads from tiktoken's cache; InvalidInputError (a 400) otherwise.

    tiktoken fetches a vocabulary it does not find in its cache, so the load runs in a thread bounded by
    ``timeout_s`` (an offline server does not wait on it more than once: a failure is remembered)."""
    with _tiktoken_lock:
        if name in _tiktoken_cache:
            got = _tiktoken_cache[name]
            if isinstance(got, Exception):
                raise got
            return got
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            exc = InvalidInputError(f"tokenizer {name!r} needs the tiktoken package (pip install tiktoken) with "
                                    "its vocabulary in tiktoken's cache; use a served model's tokenizer instead")
            _tiktoken_cache[name] = exc
            raise exc from None
        box: dict[str, Any] = {}

        def load() -> None:
            try:
                import tiktoken

                box["enc"] = tiktoken.get_encoding(name)
            except Exception as e:  # noqa: BLE001 - any failure means: not available here
                box["err"] = e

        t = threading.Thread(target=load, daemon=True, name="tamis-tiktoken")
        t.start()
        t.join(timeout_s)
        if "enc" in box:
            got = TiktokenTokenizer(name, box["enc"])
        else:
            why = f"{type(box['err']).__name__}" if "err" in box else f"no answer in {timeout_s:g} s"
            got = InvalidInputError(
                f"tokenizer {name!r} is not available on this server (tiktoken could not load its vocabulary "
                f"offline: {why}; put the file in TIKTOKEN_CACHE_DIR); use a served model's tokenizer instead")
        _tiktoken_cache[name] = got
        if isinstance(got, Exception):
            raise got
        return got


# ---------------------------------------------------------------------------------------------- spans


def _split(text: str, start: int, end: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """Spans tiling ``text[start:end]``, each ending after one match of ``pattern`` (the separator stays left)."""
    spans, s = [], start
    for m in pattern.finditer(text, start, end):
        if m.end() > s and m.start() > s:
            spans.append((s, m.end()))
            s = m.end()
    if s < end:
        if spans and not text[s:end].strip():
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((s, end))
    return spans or [(start, end)]


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    from tamis.embed import sentence_spans

    return [(start + s, start + e) for s, e in sentence_spans(text[start:end])]


def _levels() -> list[Callable[[str, int, int], list[tuple[int, int]]]]:
    return [
        lambda t, s, e: _split(t, s, e, _PARAGRAPH),
        lambda t, s, e: _split(t, s, e, _LINE),
        _sentences,
        lambda t, s, e: _split(t, s, e, _WORD),
    ]


def _token_cuts(text: str, start: int, end: int, tok: Any, limit: int) -> list[tuple[int, int]]:
    """A piece with no boundary left, cut every ``limit`` tokens (each piece checked by its own tokenization)."""
    out = []
    s = start
    while s < end:
        _, offsets = tok.encode(text[s:end])
        starts = [s + a for a, _ in offsets]
        if len(starts) <= limit:
            out.append((s, end))
            break
        n = limit
        while True:
            cut = starts[n] if n < len(starts) else end
            if cut <= s:  # a token that starts where we are: take at least one character
                cut = s + 1
            if n <= 1 or tok.count(text[s:cut]) <= limit:
                break
            n -= 1
        out.append((s, cut))
        s = cut
    return out


def chunk_spans(text: str, tok: Any, max_tokens: int, level: int = 0, start: int = 0, end: int | None = None
                ) -> list[tuple[int, int]]:
    """Character spans tiling ``text[start:end]``, each at most ``max_tokens`` tokens by ``tok`` (see module doc)."""
    end = len(text) if end is None else end
    if start >= end:
        return []
    if tok.count(text[start:end]) <= max_tokens:
        return [(start, end)]
    levels = _levels()
    if level >= len(levels):
        return _token_cuts(text, start, end, tok, max_tokens)
    pieces = levels[level](text, start, end)
    if len(pieces) == 1:
        return chunk_spans(text, tok, max_tokens, level + 1, start, end)
    counts = tok.count_many([text[s:e] for s, e in pieces])
    out: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    cur_n = 0
    for (s, e), n in zip(pieces, counts):
        if n > max_tokens:  # too big alone: flush, then split it finer
            if cur is not None:
                out.append(cur)
                cur, cur_n = None, 0
            out.extend(chunk_spans(text, tok, max_tokens, level + 1, s, e))
            continue
        if cur is not None and cur_n + n <= max_tokens and tok.count(text[cur[0]:e]) <= max_tokens:
            cur, cur_n = (cur[0], e), cur_n + n
        else:
            if cur is not None:
                out.append(cur)
            cur, cur_n = (s, e), n
    if cur is not None:
        out.append(cur)
    return out


# --------------------------------------------------------------------------------------------- front door


@dataclass
class Segmentation:
    tokenizer: str
    num_tokens: int
    chunks: list[str] = field(default_factory=list)
    chunk_positions: list[tuple[int, int]] = field(default_factory=list)
    tokens: list[Any] | None = None

    def to_jina(self, return_chunks: bool = True) -> dict[str, Any]:
        """Jina Segmenter's response body."""
        body: dict[str, Any] = {"num_tokens": self.num_tokens, "tokenizer": self.tokenizer,
                                "usage": {"tokens": self.num_tokens}}
        if return_chunks:
            body["num_chunks"] = len(self.chunks)
            body["chunk_positions"] = [list(p) for p in self.chunk_positions]
            body["chunks"] = self.chunks
        if self.tokens is not None:
            body["tokens"] = self.tokens
        return body


def _token_pairs(text: str, tok: Any, ids: list[int], offsets: list[tuple[int, int]], lo: int, hi: int
                 ) -> list[list[Any]]:
    """``[[token text, [ids]], ...]`` of tokens ``lo:hi`` (Jina's shape: a piece of text and the ids it encodes)."""
    return [[text[offsets[i][0]:offsets[i][1]], [int(ids[i])]] for i in range(lo, hi)]


def segment(
    content: str,
    tok: Any,
    *,
    max_chunk_length: int = DEFAULT_MAX_CHUNK_LENGTH,
    return_chunks: bool = True,
    return_tokens: bool = False,
    head: int | None = None,
    tail: int | None = None,
) -> Segmentation:
    """Count and chunk ``content`` with ``tok`` (an :class:`HFTokenizer` or :class:`TiktokenTokenizer`).

    ``head`` / ``tail``: only the first / last N tokens of the content are chunked and returned (positions stay
    those in the whole content; ``num_tokens`` counts the whole content). ``return_tokens``: per chunk (or for
    the whole kept text without ``return_chunks``) its tokens as ``[text, [id]]`` pairs."""
    if not isinstance(content, str):
        raise InvalidInputError("content must be a string")
    if isinstance(max_chunk_length, bool) or not isinstance(max_chunk_length, int) or max_chunk_length < 1:
        raise InvalidInputError(f"max_chunk_length must be a positive integer, got {max_chunk_length!r}")
    if head is not None and tail is not None:
        raise InvalidInputError("head and tail cannot be used together")
    for name, v in (("head", head), ("tail", tail)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
    ids, offsets = tok.encode(content) if content else ([], [])
    n = len(ids)
    lo_tok, hi_tok = 0, n
    start, end = 0, len(content)
    if head is not None and head < n:
        hi_tok = head
        end = offsets[head][0]
    if tail is not None and tail < n:
        lo_tok = n - tail
        start = offsets[lo_tok][0]
    out = Segmentation(tokenizer=tok.name, num_tokens=n)
    if return_chunks:
        spans = chunk_spans(content, tok, max_chunk_length, 0, start, end)
        out.chunk_positions = spans
        out.chunks = [content[s:e] for s, e in spans]
    if return_tokens:
        if return_chunks:
            out.tokens = []
            for s, e in out.chunk_positions:
                c_ids, c_off = tok.encode(content[s:e])
                out.tokens.append(_token_pairs(content[s:e], tok, c_ids, c_off, 0, len(c_ids)))
        else:
            out.tokens = _token_pairs(content, tok, ids, offsets, lo_tok, hi_tok)
    return out
