"""Training data: BEIR-layout qrels and pair sets -> queries, documents and labels -> training lists.

A :class:`RerankData` holds what every training recipe needs: documents and queries by id, and
relevance labels (``qrels``: label > 0 relevant; label 0 a *known* non-relevant document, as pair sets
give them). Data sets are read from the layout of ``../shared/data`` (see
:mod:`tamis.evaluate.datasets`):

- a BEIR directory with ``qrels/<split>.tsv`` (e.g. ``scifact`` with ``split="train"``);
- a pair set directory with ``pairs.jsonl.gz`` (e.g. ``ares-pairs``): pairs are grouped by query text,
  documents deduplicated, ids derived from the text (stable across runs);
- ``DIR:unlabelled``: a corpus and queries without any judgment (e.g. real search queries beside a pooled
  corpus): every query is label-free, for teacher-scored candidate lists only.

:func:`split_dev` holds out a deterministic slice of the *training* queries for model selection.
:class:`TrainList` is one query with its positives and (labelled or mined) negatives.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tamis.evaluate.datasets import DatasetError, Qrels, RerankData, from_beir, load_pairs


def text_id(prefix: str, text: str) -> str:
    return f"{prefix}{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


def from_pairs(directory: str | os.PathLike[str], name: str | None = None) -> RerankData:
    """A pair set (``pairs.jsonl.gz``: query, document, label) as queries, documents and qrels.

    Labels > 0 are relevant (rounded to integer grades, at least 1), labels <= 0 known non-relevant.
    The pair's ``source`` field (if any) is kept per query, for balanced dev splits.
    """
    path = Path(directory).expanduser()
    name = name or path.name
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: Qrels = {}
    sources: dict[str, str] = {}
    for pair in load_pairs(path):
        if not pair.query.strip() or not pair.document.strip():
            continue
        qid, did = text_id("q", pair.query), text_id("d", pair.document)
        queries[qid] = pair.query
        corpus[did] = pair.document
        rel = max(1, round(pair.label)) if pair.label > 0 else 0
        qrels.setdefault(qid, {})[did] = max(rel, qrels.get(qid, {}).get(did, 0))
        sources[qid] = f"{name}/{pair.extras['source']}" if "source" in pair.extras else name
    return RerankData(name, corpus, queries, qrels, sources)


def from_unlabelled(directory: str | os.PathLike[str], with_title: bool = True) -> RerankData:
    """A corpus and queries with no judgments: every query is a label-free query (in ``qrels`` with no
    document), so it gives a mined candidate list that only a teacher can score."""
    from tamis.evaluate.datasets import load_corpus, load_queries

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise DatasetError(f"data directory {path} does not exist")
    corpus = load_corpus(path)
    queries = {q: t for q, t in load_queries(path).items() if t.strip()}
    name = f"{path.name}-unlabelled"
    return RerankData(name, dict(zip(corpus.ids, corpus.documents(with_title))), queries,
                      {q: {} for q in queries}, {q: name for q in queries})


def load_training_data(spec: str | os.PathLike[str], with_title: bool = True, allow_test: bool = False) -> RerankData:
    """``DIR`` (a pair set, or a BEIR set's ``train`` split), ``DIR:SPLIT`` or ``DIR:unlabelled``.

    A ``test`` split is refused unless ``allow_test`` says the set is training data that merely comes
    as one file named so (e.g. llamaindex-10k-lyft, whose questions are the published *training* set
    of its 10-K anchor) and is never used to evaluate."""
    text = str(spec)
    split = "train"
    if ":" in text and not Path(text).exists():
        text, _, split = text.rpartition(":")
    path = Path(text).expanduser()
    if split == "unlabelled":
        return from_unlabelled(path, with_title)
    if (path / "pairs.jsonl.gz").is_file() or (path / "pairs.jsonl").is_file():
        return from_pairs(path)
    if not (path / "qrels").is_dir():
        raise DatasetError(f"{path} is neither a pair set (pairs.jsonl.gz) nor a BEIR set (qrels/<split>.tsv)")
    if split == "test" and not allow_test:
        raise DatasetError(f"refusing to train on {path}'s test split: test queries are for evaluation only "
                           "(a set that is only training data may be allowed explicitly: --allow-test-split)")
    return from_beir(path, split, with_title)


def merge(datasets: Sequence[RerankData]) -> RerankData:
    """One data set from several; ids are prefixed with each set's name so they cannot collide."""
    if len(datasets) == 1:
        return datasets[0]
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: Qrels = {}
    sources: dict[str, str] = {}
    for d in datasets:
        p = f"{d.name}/"
        corpus.update({p + k: v for k, v in d.corpus.items()})
        queries.update({p + k: v for k, v in d.queries.items()})
        qrels.update({p + q: {p + k: v for k, v in rels.items()} for q, rels in d.qrels.items()})
        sources.update({p + q: d.sources.get(q, d.name) for q in d.queries})
    return RerankData("+".join(d.name for d in datasets), corpus, queries, qrels, sources)


def _rank_key(seed: int, qid: str) -> str:
    return hashlib.sha1(f"{seed}:{qid}".encode()).hexdigest()


def split_dev(data: RerankData, dev: int | float = 0.05, seed: int = 0,
              max_dev_per_source: int | None = None) -> tuple[list[str], list[str]]:
    """Hold out training queries for development: ``(train_qids, dev_qids)``.

    ``dev`` is a count or a fraction of the trainable queries; the slice is taken per source (pair-set
    sub-sets, merged sets) in proportion, by a seeded hash of the query id, so it is the same on every
    run and does not depend on file order. Only queries with a relevant document are returned.
    """
    qids = data.trainable_queries()
    by_source: dict[str, list[str]] = {}
    for q in qids:
        by_source.setdefault(data.sources.get(q, data.name), []).append(q)
    total = len(qids)
    n_dev = int(round(dev * total)) if isinstance(dev, float) and dev < 1 else int(dev)
    dev_set: set[str] = set()
    for _, members in sorted(by_source.items()):
        share = int(round(n_dev * len(members) / max(total, 1)))
        if max_dev_per_source is not None:
            share = min(share, max_dev_per_source)
        dev_set.update(sorted(members, key=lambda q: _rank_key(seed, q))[:share])
    train = [q for q in qids if q not in dev_set]
    return train, [q for q in qids if q in dev_set]


def split_dev_unseen(data: RerankData, dev: int | float = 0.1, seed: int = 0
                     ) -> tuple[list[str], list[str], set[str]]:
    """Hold out dev queries *and their relevant documents*: ``(train_qids, dev_qids, dev_docs)``.

    Relevant documents are drawn in a seeded hash order; each brings every query it is relevant to (and
    their other relevant documents, transitively) until the dev queries reach ``dev`` (a count, or a
    fraction of the trainable queries). No dev document is a training positive; callers must also keep
    ``dev_docs`` out of training negatives (:func:`drop_documents`), so that the dev slice measures
    queries *and* documents the model never saw.
    """
    qids = data.trainable_queries()
    n_dev = int(round(dev * len(qids))) if isinstance(dev, float) and dev < 1 else int(dev)
    by_doc: dict[str, list[str]] = {}
    for q in qids:
        for d in data.positives(q):
            by_doc.setdefault(d, []).append(q)
    dev_set: set[str] = set()
    dev_docs: set[str] = set()
    for doc in sorted(by_doc, key=lambda d: _rank_key(seed, d)):
        if len(dev_set) >= n_dev:
            break
        if doc in dev_docs:
            continue
        todo = [doc]
        while todo:  # close over shared positives
            d = todo.pop()
            if d in dev_docs:
                continue
            dev_docs.add(d)
            for q in by_doc[d]:
                if q not in dev_set:
                    dev_set.add(q)
                    todo.extend(x for x in data.positives(q) if x not in dev_docs)
    return [q for q in qids if q not in dev_set], [q for q in qids if q in dev_set], dev_docs


def drop_documents(lists: Sequence[TrainList], docs: set[str]) -> list[TrainList]:
    """Training lists without ``docs`` among their negatives (held-out dev documents)."""
    out = []
    for t in lists:
        keep = [d for d in t.negatives if d not in docs]
        labelled = sum(1 for d in t.negatives[: t.labelled] if d not in docs)
        out.append(TrainList(t.qid, t.positives, keep, labelled))
    return out


@dataclass
class TrainList:
    """One training query: its relevant documents and its negatives (labelled ones first, then mined)."""

    qid: str
    positives: list[str]
    negatives: list[str]
    labelled: int = 0  # the first `labelled` negatives are judged non-relevant; the rest are mined

    def to_json(self) -> dict[str, object]:
        return {"qid": self.qid, "positives": self.positives, "negatives": self.negatives, "labelled": self.labelled}


def save_lists(lists: Iterable[TrainList], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in lists:
            f.write(json.dumps(item.to_json()) + "\n")
    tmp.replace(path)
    return path


def load_lists(path: str | os.PathLike[str]) -> list[TrainList]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.append(TrainList(row["qid"], list(row["positives"]), list(row["negatives"]),
                                     int(row.get("labelled", 0))))
    return out


def negatives_per_group(has_positive: bool, n_negatives: int) -> int:
    """Candidates a list contributes besides its positive: ``k``, or ``k + 1`` for a label-free list (no
    positive), so every group in a batch has the same width."""
    return n_negatives if has_positive else n_negatives + 1


def make_groups(lists: Sequence[TrainList], n_negatives: int, epoch: int, seed: int) -> list[tuple[str, list[str]]]:
    """One ``(qid, [positive, negative_1 .. negative_k])`` group per training list for an epoch.

    The positive cycles through the list's positives from epoch to epoch; the ``k`` negatives are the
    labelled ones first, then mined ones drawn at random (seeded by epoch). A label-free list (no positive,
    see :meth:`RerankData.unlabelled_queries`) gives ``k + 1`` of its candidates, labelled ones first, then
    mined ones at random: only teacher losses learn from it. Lists with fewer candidates than that are
    dropped (a fixed list size keeps the batch a dense tensor).
    """
    rng = random.Random(f"{seed}:{epoch}")
    groups = []
    for item in lists:
        head = [item.positives[epoch % len(item.positives)]] if item.positives else []
        size = negatives_per_group(bool(item.positives), n_negatives)
        if len(item.negatives) < size:
            continue
        labelled = [d for d in item.negatives[: item.labelled] if d not in head][:size]
        mined = [d for d in item.negatives[item.labelled :] if d not in head and d not in labelled]
        need = size - len(labelled)
        if len(mined) < need:
            continue
        groups.append((item.qid, [*head, *labelled, *rng.sample(mined, need)]))
    return groups
