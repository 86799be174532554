"""tamis.segment: chunks tile the text exactly, positions slice it, no chunk is over the limit (property tests),
boundaries are paragraphs and sentences before words and tokens."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tamis.errors import InvalidInputError
from tamis.models.loading import load_config, resolve_model_dir
from tamis.segment import HFTokenizer, chunk_spans, load_tiktoken, segment
from tamis.tokenize import Tokenizer


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    d = resolve_model_dir(None)
    return HFTokenizer("minilm", Tokenizer.from_dir(d, load_config(d)))


WORDS = st.sampled_from(["alpha", "beta", "gamma", "sparse", "retrieval", "Hello", "world", "x", "日本語", "naïve",
                         "supercalifragilisticexpialidocious", "42", "e.g.", "U.S.", "--", "(a)", "🙂"])
SEPS = st.sampled_from([" ", " ", " ", ". ", "? ", "! ", "\n", "\n\n", "  ", "\t", ".\n\n", ", "])


@st.composite
def texts(draw) -> str:
    n = draw(st.integers(0, 120))
    parts = []
    for _ in range(n):
        parts.append(draw(WORDS))
        parts.append(draw(SEPS))
    lead = draw(st.sampled_from(["", " ", "\n\n", "  \n"]))
    return lead + "".join(parts)[: draw(st.integers(0, 2000))]


def check(text: str, seg, tok: HFTokenizer, limit: int) -> None:
    assert "".join(seg.chunks) == text
    pos = 0
    for (s, e), c in zip(seg.chunk_positions, seg.chunks):
        assert s == pos and e > s and text[s:e] == c
        assert tok.count(c) <= limit, (c, tok.count(c), limit)
        pos = e
    assert pos == len(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts(), limit=st.integers(1, 40))
def test_chunks_tile_the_text_and_respect_the_limit(tok, text, limit):
    seg = segment(text, tok, max_chunk_length=limit, return_chunks=True)
    check(text, seg, tok, limit)
    assert seg.num_tokens == tok.count(text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300), limit=st.integers(1, 12))
def test_any_unicode_text(tok, text, limit):
    check(text, segment(text, tok, max_chunk_length=limit, return_chunks=True), tok, limit)


def test_paragraphs_then_sentences(tok):
    p1 = "First sentence of the first paragraph. Second sentence here.\n\n"
    p2 = "Another paragraph starts. It has two sentences.\n\n"
    p3 = "Short one."
    text = p1 + p2 + p3
    # room for one paragraph at a time: cut at the blank lines
    seg = segment(text, tok, max_chunk_length=tok.count(p1) + 1, return_chunks=True)
    assert seg.chunks == [p1, p2 + p3]  # the last two paragraphs fit together
    seg = segment(text, tok, max_chunk_length=tok.count(p2 + p3) - 1, return_chunks=True)
    assert seg.chunks == [p1, p2, p3]
    # room for about a sentence: cut after the sentences, never inside one
    seg = segment(text, tok, max_chunk_length=8, return_chunks=True)
    assert seg.chunks[0] == "First sentence of the first paragraph. "
    assert all(c.rstrip().endswith((".", "here.")) for c in seg.chunks if c.strip())
    # a whole text under the limit is one chunk
    assert segment(text, tok, max_chunk_length=1000, return_chunks=True).chunks == [text]


def test_tokens_head_tail_and_errors(tok):
    text = "Sparse retrieval works. Dense retrieval too.\n\nHybrid is best."
    seg = segment(text, tok, max_chunk_length=6, return_chunks=True, return_tokens=True)
    assert len(seg.tokens) == len(seg.chunks)
    for chunk, pairs in zip(seg.chunks, seg.tokens):
        assert all(isinstance(t, str) and len(ids) == 1 for t, ids in pairs)
        assert len(pairs) == tok.count(chunk)
    flat = segment(text, tok, return_chunks=False, return_tokens=True)
    assert [p[0] for p in flat.tokens][:3] == ["Sparse", "retrieval", "works"]  # slices of the text
    assert flat.to_jina(return_chunks=False).keys() == {"num_tokens", "tokenizer", "usage", "tokens"}
    head = segment(text, tok, head=3, return_chunks=True, return_tokens=False)
    assert "".join(head.chunks) == "Sparse retrieval works"
    tail = segment(text, tok, tail=4, return_chunks=True)
    assert "".join(tail.chunks) == "Hybrid is best." and tail.chunk_positions[0][0] == text.index("Hybrid")
    for bad in ({"max_chunk_length": 0}, {"head": 1, "tail": 1}, {"head": 0}):
        with pytest.raises(InvalidInputError):
            segment(text, tok, **bad)
    assert segment("", tok, return_chunks=True).chunks == []


def test_a_word_longer_than_the_limit_is_cut_by_tokens(tok):
    text = "supercalifragilisticexpialidocious " * 3
    spans = chunk_spans(text, tok, 2)
    assert "".join(text[s:e] for s, e in spans) == text
    assert all(tok.count(text[s:e]) <= 2 for s, e in spans)


def test_cl100k_is_a_clear_error_or_works():
    try:
        t = load_tiktoken("cl100k_base", timeout_s=5)
    except InvalidInputError as exc:
        assert "cl100k_base" in str(exc) and "served model" in str(exc)
        with pytest.raises(InvalidInputError):  # remembered, not retried
            load_tiktoken("cl100k_base")
        return
    text = "Hello world. 日本語のテキスト.\n\nSecond paragraph 🙂 here."
    check(text, segment(text, t, max_chunk_length=5, return_chunks=True), t, 5)


def test_cli_segment(tmp_path, capsys):
    import json

    from tamis.cli import main

    text = "First paragraph, one sentence.\n\nSecond paragraph. Two sentences here.\n"
    src = tmp_path / "doc.txt"
    src.write_text(text)
    assert main(["segment", str(src), "--max-chunk-length", "8", "-q"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "".join(r["text"] for r in rows) == text
    assert all(text[r["start"]:r["end"]] == r["text"] and r["tokens"] <= 8 for r in rows)
