"""Retrieval data sets in the BEIR-style layout of ``../shared/data`` (or any directory a user gives).

```
<dir>/corpus.jsonl.gz      {"_id", "title", "text"}      one document per line (.jsonl also accepted)
<dir>/queries.jsonl.gz     {"_id", "text"}
<dir>/qrels/<split>.tsv    query-id TAB corpus-id TAB score   (header line; graded for TREC DL)
<dir>/run.<split>.tsv      optional first-stage run: query-id TAB corpus-id TAB rank TAB score (header)
<dir>/pairs.jsonl.gz       pair sets: one labelled (query, document) pair per line
```

Queries may come from another directory (``queries_dir``): cross-lingual XQuAD keeps the same query and
paragraph ids in every language, so English queries can be run against the German corpus and qrels.
Every missing file raises :class:`DatasetError` naming the path that was expected.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tamis.errors import TamisError

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

# XQuAD / data-dir names -> PyStemmer algorithm (used when no --lang is given)
LANG_CODES = {
    "ar": "arabic",
    "da": "danish",
    "de": "german",
    "el": "greek",
    "en": "english",
    "es": "spanish",
    "fi": "finnish",
    "fr": "french",
    "hi": "hindi",
    "hu": "hungarian",
    "it": "italian",
    "nl": "dutch",
    "no": "norwegian",
    "pt": "portuguese",
    "ro": "romanian",
    "ru": "russian",
    "sv": "swedish",
    "tr": "turkish",
}


class DatasetError(TamisError, FileNotFoundError):
    """A data set directory lacks a file it needs (the message names it) or holds a malformed line."""


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _find(directory: Path, stem: str) -> Path:
    """``<stem>.jsonl.gz`` or ``<stem>.jsonl`` inside ``directory``; DatasetError names the expected file."""
    for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
        if (directory / name).is_file():
            return directory / name
    if not directory.is_dir():
        raise DatasetError(f"data directory {directory} does not exist (expected {directory / (stem + '.jsonl.gz')})")
    raise DatasetError(f"missing file {directory / (stem + '.jsonl.gz')} (or {stem}.jsonl) in data set {directory}")


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


@dataclass
class Corpus:
    """Documents in file order; ``ids[i]`` has ``titles[i]`` and ``texts[i]``."""

    ids: list[str]
    titles: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def documents(self, with_title: bool = True) -> list[str]:
        """Text to index: ``title + " " + text`` when the title is non-empty (the BEIR / MTEB convention)."""
        if not with_title:
            return list(self.texts)
        return [f"{t} {x}" if t else x for t, x in zip(self.titles, self.texts)]

    def index_of(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.ids)}


@dataclass
class Dataset:
    name: str
    path: Path
    split: str
    corpus: Corpus
    queries: dict[str, str]  # only the queries that have qrels in the split (BEIR convention), file order
    qrels: Qrels
    queries_path: Path | None = None
    lang: str | None = None  # language of the corpus, inferred from the directory name when it is a code
    query_lang: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {
            "documents": len(self.corpus),
            "queries": len(self.queries),
            "judgments": sum(len(v) for v in self.qrels.values()),
        }

    def run_file(self, name: str | os.PathLike[str] | None = None) -> Path:
        """Resolve a run file: absolute, relative to the data directory (else to the working directory),
        or the split's ``run.<split>.tsv`` when no name is given."""
        if name is None:
            path = self.path / f"run.{self.split}.tsv"
        else:
            path = Path(name).expanduser()
            if not path.is_absolute() and ((self.path / path).is_file() or not path.is_file()):
                path = self.path / path
        if not path.is_file():
            raise DatasetError(f"missing run file {path}")
        return path


def load_corpus(directory: str | os.PathLike[str]) -> Corpus:
    path = _find(Path(directory), "corpus")
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    for row in iter_jsonl(path):
        if "_id" not in row:
            raise DatasetError(f"{path}: a document has no '_id' field")
        ids.append(str(row["_id"]))
        titles.append(str(row.get("title") or ""))
        texts.append(str(row.get("text") or ""))
    return Corpus(ids, titles, texts)


def load_queries(directory: str | os.PathLike[str]) -> dict[str, str]:
    path = _find(Path(directory), "queries")
    out: dict[str, str] = {}
    for row in iter_jsonl(path):
        if "_id" not in row:
            raise DatasetError(f"{path}: a query has no '_id' field")
        out[str(row["_id"])] = str(row.get("text") or "")
    return out


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _rows(path: Path, min_cols: int) -> Iterator[list[str]]:
    """Rows of a TSV (a first line with no number after its first column is a header, skipped)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            cols = line.split("\t") if "\t" in line else line.split()
            if len(cols) < min_cols:
                raise DatasetError(f"{path}:{lineno}: expected at least {min_cols} columns, got {len(cols)}")
            if lineno == 1 and not any(_is_float(c) for c in cols[1:]):
                continue  # header
            yield cols


def load_qrels(path: str | os.PathLike[str]) -> Qrels:
    """``query-id TAB corpus-id TAB score`` (BEIR) or TREC ``qid 0 docid rel`` lines."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing qrels file {path}")
    qrels: Qrels = {}
    for cols in _rows(path, 3):
        if len(cols) >= 4:  # TREC format: qid iter docid rel
            qid, did, rel = cols[0], cols[2], cols[3]
        else:
            qid, did, rel = cols[0], cols[1], cols[2]
        qrels.setdefault(qid, {})[did] = int(float(rel))
    return qrels


def load_run(path: str | os.PathLike[str]) -> Run:
    """A run file: ``query-id TAB corpus-id TAB rank TAB score`` (header optional) or a 6-column TREC run
    (``qid Q0 docid rank score tag``). With no score column, scores are derived from ranks."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing run file {path}")
    run: Run = {}
    for cols in _rows(path, 2):
        if len(cols) >= 6:  # TREC: qid Q0 docid rank score tag
            qid, did, score = cols[0], cols[2], float(cols[4])
        elif len(cols) >= 4:
            qid, did, score = cols[0], cols[1], float(cols[3])
        elif len(cols) == 3:  # qid docid rank
            qid, did, score = cols[0], cols[1], -float(cols[2])
        else:
            qid, did = cols[0], cols[1]
            score = -float(len(run.get(qid, {})) + 1)
        run.setdefault(qid, {})[did] = score
    return run


def save_run(run: Run, path: str | os.PathLike[str]) -> Path:
    """Write a run in the data layout (header, ranks from 1, scores descending)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\trank\tscore\n")
        for qid, docs in run.items():
            for rank, (did, score) in enumerate(sorted_docs(docs), 1):
                f.write(f"{qid}\t{did}\t{rank}\t{score:.6f}\n")
    return path


def sorted_docs(docs: dict[str, float]) -> list[tuple[str, float]]:
    """A query's results in trec_eval order: score descending, ties by document id descending."""
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def lang_from_dir(path: Path) -> str | None:
    """PyStemmer language from a directory named by a language code (``xquad/de`` -> ``german``)."""
    return LANG_CODES.get(path.name.lower())


def load_dataset(
    directory: str | os.PathLike[str],
    split: str = "test",
    queries_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load corpus, queries (optionally from ``queries_dir``) and the split's qrels.

    Queries without judgments in the split are dropped; qrels whose query is missing from the queries
    file are dropped too (they cannot be run). Raises :class:`DatasetError` naming any missing file.
    """
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise DatasetError(f"data directory {path} does not exist")
    qrels_path = path / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (path / "qrels").glob("*.tsv")) if (path / "qrels").is_dir() else []
        hint = f" (splits present: {', '.join(have)})" if have else ""
        raise DatasetError(f"missing qrels file {qrels_path}{hint}")
    corpus = load_corpus(path)
    qpath = Path(queries_dir).expanduser() if queries_dir is not None else path
    all_queries = load_queries(qpath)
    qrels = load_qrels(qrels_path)
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    qrels = {qid: rels for qid, rels in qrels.items() if qid in queries}
    name = f"{path.parent.name}-{path.name}" if path.name.lower() in LANG_CODES else path.name
    if queries_dir is not None and qpath.resolve() != path.resolve():
        name = f"{name}-queries-{qpath.name}"
    return Dataset(
        name=name,
        path=path,
        split=split,
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        queries_path=qpath,
        lang=lang_from_dir(path),
        query_lang=lang_from_dir(qpath),
        extras={"queries_without_qrels": len(all_queries) - len(queries)},
    )


@dataclass
class Pair:
    query: str
    document: str
    label: float
    extras: dict[str, Any] = field(default_factory=dict)


_DOC_FIELDS = ("document", "passage", "text", "code", "doc", "positive")


def load_pairs(directory: str | os.PathLike[str]) -> list[Pair]:
    """Labelled (query, document) pairs from ``pairs.jsonl.gz`` (document field: document, passage,
    text or code; label: label, score or relevance)."""
    path = _find(Path(directory).expanduser(), "pairs")
    pairs: list[Pair] = []
    for row in iter_jsonl(path):
        doc_key = next((k for k in _DOC_FIELDS if k in row), None)
        if "query" not in row or doc_key is None:
            raise DatasetError(f"{path}: a pair needs 'query' and one of {', '.join(_DOC_FIELDS)}")
        label_key = next((k for k in ("label", "score", "relevance") if k in row), None)
        extras = {k: v for k, v in row.items() if k not in ("query", doc_key, label_key)}
        label = float(row[label_key]) if label_key is not None else 1.0
        pairs.append(Pair(str(row["query"]), str(row[doc_key]), label, extras))
    return pairs


@dataclass
class RerankData:
    """Documents and queries by id with their labels, of one (or several merged) sets: what training lists and list
    scorers (:mod:`tamis.train`) read."""

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: Qrels
    sources: dict[str, str] = field(default_factory=dict)  # query id -> sub-set name (pair sets, merges)

    def positives(self, qid: str) -> list[str]:
        return [d for d, rel in self.qrels.get(qid, {}).items() if rel > 0]

    def labelled_negatives(self, qid: str) -> list[str]:
        return [d for d, rel in self.qrels.get(qid, {}).items() if rel <= 0]

    def trainable_queries(self) -> list[str]:
        """Queries with at least one relevant document, in file order."""
        return [q for q in self.queries if self.positives(q)]

    def unlabelled_queries(self) -> list[str]:
        """Queries judged in this split with no relevant document (in a pair set: queries whose only pairs
        are labelled not relevant), in file order: no positive for a label loss, but a teacher can still rank
        their candidates (label-free distillation lists). Only the split's own judged queries qualify, so a
        BEIR set's test queries (in its queries file, not in its train qrels) never do."""
        return [q for q in self.queries if q in self.qrels and not self.positives(q)]

    def sizes(self) -> dict[str, int]:
        return {
            "documents": len(self.corpus),
            "queries": len(self.queries),
            "trainable_queries": len(self.trainable_queries()),
            "positives": sum(len(self.positives(q)) for q in self.queries),
        }


def from_beir(directory: str | os.PathLike[str], split: str = "train", with_title: bool = True) -> RerankData:
    """A BEIR-layout set's corpus, the queries of ``split`` and their qrels."""
    ds = load_dataset(directory, split=split)
    docs = ds.corpus.documents(with_title=with_title)
    corpus = dict(zip(ds.corpus.ids, docs))
    name = f"{ds.name}-{split}"
    return RerankData(name, corpus, dict(ds.queries), ds.qrels, {q: name for q in ds.queries})
