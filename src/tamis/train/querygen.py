"""Synthetic search queries for passages (InPars / Promptagator style), written by a local decoder.

A chat decoder (e.g. Qwen2.5-Coder-0.5B-Instruct from its GGUF file, converted by
:func:`tamis.models.gguf.gguf_to_hf`) is shown a few (passage -> real query) example turns and then a new
passage, and writes the query a person would type to find it. The examples form a prompt prefix shared by
every passage, so its keys and values are computed once (:func:`tamis.models.generate.prefill`) and each
batch computes only its own passages. Several example sets (``n_prefixes``) rotate over the batches, for
variety in the queries' style.

:func:`generate_queries` is a resumable stage: one JSONL record per passage (``doc``, ``query``,
``prefix``), appended as batches finish, so a run stopped at any point continues where it stopped; the
rate of the first batches is logged with an estimate of the whole. Filtering the queries (keep a query
only where a teacher ranks its source passage first among mined candidates) is the caller's next stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tamis.models.generate import generate, prefill
from tamis.models.qwen3 import DecoderLM, KVCache
from tamis.tokenize import Tokenizer

log = logging.getLogger(__name__)

SYSTEM = ("You write web search queries. Given a passage, write one short query that a person could type into "
          "a search engine and that this passage answers. Reply with the query only.")


@dataclass(frozen=True)
class QueryGenConfig:
    max_new_tokens: int = 24
    max_passage_tokens: int = 192
    batch_size: int = 16
    n_prefixes: int = 4  # example sets rotated over the batches
    n_examples: int = 3  # (passage, query) example turns per prefix
    temperature: float = 0.0  # greedy
    top_p: float = 1.0
    seed: int = 0


def _key(seed: int, text: str) -> str:
    return hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()


def pick_examples(pairs: Sequence[tuple[str, str]], n_sets: int, per_set: int, seed: int = 0,
                  max_words: int = 90) -> list[list[tuple[str, str]]]:
    """``n_sets`` disjoint sets of ``per_set`` (passage, query) examples, drawn in a seeded hash order from
    ``pairs``; passages over ``max_words`` words are skipped (they would make the shared prefix long)."""
    usable = [p for p in pairs if len(p[0].split()) <= max_words and p[1].strip()]
    usable.sort(key=lambda p: _key(seed, p[1]))
    if len(usable) < n_sets * per_set:
        raise ValueError(f"need {n_sets * per_set} example (passage, query) pairs of <= {max_words} words, "
                         f"have {len(usable)}")
    return [usable[i * per_set:(i + 1) * per_set] for i in range(n_sets)]


def clean_query(text: str) -> str:
    """The first line of a generation without quotes, a "Query:" label or trailing spaces; '' if none."""
    line = text.strip().split("\n", 1)[0].strip()
    line = re.sub(r"^(search\s+)?query\s*:\s*", "", line, flags=re.I).strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    return line


class QueryGenerator:
    """A decoder that writes one search query per passage, prompted with example turns."""

    def __init__(self, model_dir: str | os.PathLike[str], examples: Sequence[Sequence[tuple[str, str]]],
                 config: QueryGenConfig = QueryGenConfig(), device: str = "cpu", dtype: str = "float32"):
        self.config = config
        self.model = DecoderLM.from_pretrained(model_dir, device=device, dtype=dtype)
        self.tok = Tokenizer.from_dir(model_dir)
        self.examples = [list(e) for e in examples]
        stops = [self.tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")]
        self.stop_ids = [i for i in stops if i is not None]
        if not self.stop_ids:
            raise ValueError(f"{model_dir}: no end-of-turn token (<|im_end|>) in the tokenizer")
        self.pad_id = self.stop_ids[-1]
        self.example_queries = {q.strip().lower() for e in self.examples for _, q in e}
        self._prefixes: dict[int, KVCache] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode([text], max_length=None, add_special_tokens=False)[0].ids

    def _passage_turn(self, passage: str) -> list[int]:
        ids = self._ids(" " + " ".join(passage.split()))[: self.config.max_passage_tokens]
        return self._ids("<|im_start|>user\nPassage:") + ids + self._ids("<|im_end|>\n<|im_start|>assistant\n")

    def prefix_ids(self, k: int) -> list[int]:
        """Token ids of example set ``k``'s prompt prefix: the system turn and its example turns."""
        ids = self._ids(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        for passage, query in self.examples[k]:
            ids += self._passage_turn(passage) + self._ids(f"{query.strip()}<|im_end|>\n")
        return ids

    def prefix(self, k: int) -> KVCache:
        if k not in self._prefixes:
            self._prefixes[k] = prefill(self.model, self.prefix_ids(k))
        return self._prefixes[k]

    def __call__(self, passages: Sequence[str], k: int = 0, generator: torch.Generator | None = None) -> list[str]:
        """One query per passage, with example set ``k``; '' where the decoder wrote none (or an example's
        query verbatim)."""
        c = self.config
        out = generate(self.model, [self._passage_turn(p) for p in passages], c.max_new_tokens, self.stop_ids,
                       prefix=self.prefix(k), pad_id=self.pad_id, temperature=c.temperature, top_p=c.top_p,
                       generator=generator)
        queries = [clean_query(self.tok.decode(ids, skip_special_tokens=True)) for ids in out]
        return ["" if q.lower() in self.example_queries else q for q in queries]


def read_records(path: str | os.PathLike[str]) -> dict[str, dict]:
    """The records a (possibly interrupted) generation run wrote, by document id; a cut-off last line is
    ignored (that passage is generated again)."""
    done: dict[str, dict] = {}
    path = Path(path)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[row["doc"]] = row
    return done


def cut_short(path: Path) -> bool:
    """Whether the file's last record line was cut short (by a kill): the next record starts a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def append_records(path: str | os.PathLike[str], rows: Sequence[dict]) -> None:
    """Append records to a JSONL file, on a fresh line when its last one was cut short."""
    path = Path(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" if cut_short(path) else "")
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _batches(items: Sequence[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def generate_queries(generator: QueryGenerator, docs: Sequence[tuple[str, str]], out_path: str | os.PathLike[str],
                     limit: int | None = None, show_progress: bool = True) -> dict[str, dict]:
    """Write a query for each ``(doc_id, passage)`` not yet in ``out_path`` (JSONL, appended per batch);
    returns every record. Passages are taken in the given order, up to ``limit`` records in total; batch
    ``i`` of the whole list uses example set ``i % n_prefixes`` (stable across resumed runs)."""
    from tqdm.auto import tqdm

    c = generator.config
    done = read_records(out_path)
    todo_all = list(docs[:limit] if limit is not None else docs)
    batches = [(i, b) for i, b in enumerate(_batches(todo_all, c.batch_size)) if any(d not in done for d, _ in b)]
    remaining = sum(1 for d, _ in todo_all if d not in done)
    if not remaining:
        return done
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = cut_short(out_path)
    bar = tqdm(total=remaining, desc="queries", unit="passage", disable=not show_progress)
    t0, written = time.perf_counter(), 0
    with open(out_path, "a", encoding="utf-8") as f:
        if needs_newline:
            f.write("\n")
        for n, (i, batch) in enumerate(batches, 1):
            batch = [(d, p) for d, p in batch if d not in done]
            k = i % c.n_prefixes
            gen = torch.Generator().manual_seed(c.seed * 1_000_003 + i) if c.temperature > 0 else None
            queries = generator([p for _, p in batch], k, gen)
            for (d, _), q in zip(batch, queries):
                row = {"doc": d, "query": q, "prefix": k}
                done[d] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            written += len(batch)
            bar.update(len(batch))
            if n <= 3 or n % 20 == 0 or written == remaining:  # the first batches size the run, then a pulse
                rate = (time.perf_counter() - t0) / written
                log.info("queries: %d written, %.2f s per passage, ~%.0f min for the %d left", written, rate,
                         rate * (remaining - written) / 60, remaining - written)
    bar.close()
    return done


__all__ = ["QueryGenConfig", "QueryGenerator", "append_records", "clean_query", "cut_short", "generate_queries",
           "pick_examples", "read_records"]
