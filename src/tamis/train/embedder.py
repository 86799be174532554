"""Embedding models: contrastive fine-tuning, Matryoshka, task LoRA adapters on any encoder, merged export.

>>> from tamis.train import TrainConfig, train_embedder, EmbeddingConfig, AdapterConfig
>>> train_embedder(["../shared/data/scifact"], "runs/emb", config=TrainConfig(max_steps=100))  # doctest: +SKIP
>>> train_embedder(["../shared/data/scifact"], "runs/sf", adapter=AdapterConfig("scifact"))    # doctest: +SKIP

The model being trained is a :class:`tamis.Embedder` — the object inference uses — so tokenization,
task prefixes, adapters and pooling are the same in training and serving:

- **Loss**: multiple-negatives ranking (InfoNCE): each query against every document of the batch (the
  other queries' positives and mined hard negatives), cosine × ``scale``. Documents are deduplicated
  by text, so no text is encoded twice in a batch and a shared positive is one column; documents
  labelled relevant to a query other than its own target are masked out of its negatives. With
  ``matryoshka_dims`` the same loss runs on each prefix of the vectors (re-normalised), one encoder pass.
- **GradCache** (Gao et al. 2021, "cached MNRL"): with ``mini_batch`` set, the batch is first embedded
  without gradients in chunks, the loss and its gradient w.r.t. the embeddings are computed on the whole
  batch, then each chunk is embedded again with gradients and back-propagated with its cached embedding
  gradient. Memory is that of one chunk whatever the batch size; the result equals the full-batch
  gradient (the models have no dropout, so the second pass reproduces the first exactly).
- **Queries and documents** go through ``query_task`` / ``passage_task``: the model's prompts or
  instruction prefixes, and the adapters of those tasks.
- **Adapters**: on BERT-family encoders a fresh LoRA adapter per task (:mod:`tamis.models.lora`) on a
  frozen base, saved in peft's layout; on jina-embeddings-v3 the named tasks' slices of the stacked
  official adapters, saved as the official checkpoint.
- **Dev evaluation**: held-out training queries retrieve from the training corpus with the model being
  trained (exact cosine), scored by the project's metrics (nDCG@10, MRR@10, Hit@10; at each Matryoshka
  dimension too); the best checkpoint by ``select_metric`` is kept.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tamis.embed import Embedder, pool
from tamis.evaluate.datasets import Qrels
from tamis.evaluate.first_stage import EmbeddingCache, exact_topk, quiet_truncation
from tamis.evaluate.metrics import compute_metrics
from tamis.models.loading import read_json, resolve_dtype
from tamis.tokenize import Encoded
from tamis.train.card import cpu_model, data_licence
from tamis.train.cross_encoder import copy_tokenizer, count_parameters
from tamis.train.data import (
    RerankData,
    TrainList,
    drop_documents,
    load_lists,
    load_training_data,
    merge,
    save_lists,
    split_dev,
    split_dev_unseen,
)
from tamis.train.losses import in_batch_infonce, matryoshka
from tamis.train.mining import first_stage_runs, mine_lists
from tamis.train.rerankers import MiningConfig
from tamis.train.trainer import StepOutput, TrainConfig, Trainer, environment, save_summary

logger = logging.getLogger("tamis.train")

AUTO = "auto"


@dataclass
class EmbeddingConfig:
    batch_size: int = 32  # queries per step; each brings its positive and `hard_negatives` mined documents
    mini_batch: int | None = None  # GradCache chunk (texts embedded with gradients at once); None: off
    scale: float = 20.0  # cosine x scale = logits (temperature 1 / scale)
    hard_negatives: int = 1  # mined negatives per query in a batch (0: in-batch negatives only)
    matryoshka_dims: tuple[int, ...] | None = None  # e.g. (384, 256, 128, 64, 32)
    matryoshka_weights: tuple[float, ...] | None = None
    max_length: int | None = None  # tokens per text (None: the model's limit)
    query_task: str | None = AUTO  # task (prompt / adapter) of queries; "auto": the model's query task
    passage_task: str | None = AUTO
    freeze: str | None = None  # full fine-tuning: "word" freezes the word embeddings


@dataclass
class AdapterConfig:
    """A task adapter to train on a frozen base. BERT family: fresh LoRA adapters named ``task`` (queries
    and documents) or ``task`` + ``passage_task`` (queries / documents); jina-embeddings-v3: the slices
    of those existing tasks (e.g. ``retrieval.query`` + ``retrieval.passage``) in the stacked layout."""

    task: str
    passage_task: str | None = None
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None  # default: every Linear of every layer


# ------------------------------------------------------------------------------------ data


@dataclass
class PreparedPairs:
    data: RerankData
    train: list[TrainList]  # training queries: positives and mined negatives (dev documents removed)
    dev_qids: list[str]
    dev_docs: set[str]  # documents held out with the dev queries (``unseen_dev_docs``)
    sizes: dict[str, Any] = field(default_factory=dict)
    replay: list[str] = field(default_factory=list)  # names of the replay sets (training only, never dev)


def prepare_pairs(
    specs: Sequence[str], work_dir: str | Path, mining: MiningConfig, hard_negatives: int, seed: int = 0,
    unseen_dev_docs: bool = False, allow_test: bool = False, mine_model: str | Path | None = None,
    cache: EmbeddingCache | None = None, show_progress: bool = True, replay: Sequence[str] = (),
    replay_queries: int | None = None,
) -> PreparedPairs:
    """Load each set, hold out dev queries (and with ``unseen_dev_docs`` their documents), mine hard
    negatives for the training queries when ``hard_negatives`` > 0 (cached in ``work_dir``), merge.

    ``replay``: general-domain sets mixed into training so that a model adapted to ``specs`` keeps its
    quality elsewhere (rehearsal). Each contributes a seeded sample of ``replay_queries`` training queries
    (default: as many as ``specs`` train on), negatives mined with BM25 only, and nothing to the dev slice."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sets, all_lists, devs, held, sizes = [], [], [], [], {}
    embedder = None
    mine = bool(hard_negatives) and bool(mining.methods)
    for spec in specs:
        data = load_training_data(spec, allow_test=allow_test)
        sets.append(data)
        if unseen_dev_docs:
            train_q, dev_q, dev_docs = split_dev_unseen(data, mining.dev, seed)
        else:
            train_q, dev_q = split_dev(data, mining.dev, seed, mining.max_dev_per_source)
            dev_docs = set()
        lists = [TrainList(q, data.positives(q), data.labelled_negatives(q), len(data.labelled_negatives(q)))
                 for q in train_q]
        if mine:
            lists_path, meta_path = work / f"emb-lists-{data.name}.jsonl", work / f"emb-mining-{data.name}.json"
            meta = {"spec": str(spec), "seed": seed, "unseen_dev_docs": unseen_dev_docs, "train": len(train_q),
                    "mine_model": str(mine_model), **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in asdict(mining).items()}}
            if lists_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
                lists = load_lists(lists_path)
            else:
                if "dense" in mining.methods and embedder is None:
                    embedder = Embedder(mining.embedder or mine_model, dtype=mining.dtype)
                runs = first_stage_runs(data, train_q, mining.methods, mining.depth, embedder, cache, show_progress)
                lists = mine_lists(data, train_q, runs, mining.n_negatives, mining.skip_top, mining.depth,
                                   mining.strategy, seed)
                save_lists(lists, lists_path)
                meta_path.write_text(json.dumps(meta, indent=1))
        lists = drop_documents(lists, dev_docs)
        sizes[data.name] = {"train_queries": len(lists), "dev_queries": len(dev_q), "dev_documents_held_out":
                            len(dev_docs), **data.sizes()}
        all_lists.append(lists)
        devs.append(dev_q)
        held.append(dev_docs)
    n_replay = replay_queries if replay_queries is not None else sum(len(ls) for ls in all_lists)
    replay_names = []
    for spec in replay:
        data = load_training_data(spec)
        if data.name in {d.name for d in sets}:
            raise ValueError(f"replay set {data.name!r} is also a training set")
        candidates = sorted(data.trainable_queries())
        qids = random.Random(f"replay:{seed}").sample(candidates, min(n_replay, len(candidates)))
        lists = [TrainList(q, data.positives(q), data.labelled_negatives(q), len(data.labelled_negatives(q)))
                 for q in qids]
        if hard_negatives:
            lists_path, meta_path = work / f"emb-replay-{data.name}.jsonl", work / f"emb-replay-{data.name}.json"
            meta = {"spec": str(spec), "seed": seed, "queries": len(qids), "methods": ["bm25"],
                    "n_negatives": mining.n_negatives, "skip_top": mining.skip_top, "depth": mining.depth,
                    "strategy": mining.strategy}
            if lists_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
                lists = load_lists(lists_path)
            else:
                runs = first_stage_runs(data, qids, ("bm25",), mining.depth, None, cache, show_progress)
                lists = mine_lists(data, qids, runs, mining.n_negatives, mining.skip_top, mining.depth,
                                   mining.strategy, seed)
                save_lists(lists, lists_path)
                meta_path.write_text(json.dumps(meta, indent=1))
        sizes[data.name] = {"replay_queries": len(lists), **data.sizes()}
        sets.append(data)
        all_lists.append(lists)
        devs.append([])
        held.append(set())
        replay_names.append(data.name)
    if len(sets) == 1:
        return PreparedPairs(sets[0], all_lists[0], devs[0], held[0], sizes)
    merged = merge(sets)
    lists = [TrainList(f"{d.name}/{t.qid}", [f"{d.name}/{x}" for x in t.positives],
                       [f"{d.name}/{x}" for x in t.negatives], t.labelled) for d, ls in zip(sets, all_lists) for t in ls]
    dev_q = [f"{d.name}/{q}" for d, qs in zip(sets, devs) for q in qs]
    dev_docs = {f"{d.name}/{x}" for d, hs in zip(sets, held) for x in hs}
    return PreparedPairs(merged, lists, dev_q, dev_docs, sizes, replay_names)


@dataclass
class PairBatch:
    qids: list[str]
    docs: list[str]  # document ids, unique by text: every row's positive, then the hard negatives
    targets: list[int]  # column of each row's positive in ``docs``


class PairBatcher:
    """Batches of (query, positive, hard negatives) for one epoch, shuffled with a seed per epoch.

    The positive cycles through a query's positives from epoch to epoch; ``hard_negatives`` are drawn
    from its mined list (labelled negatives first). Documents are deduplicated by text within a batch.
    """

    def __init__(self, data: RerankData, lists: Sequence[TrainList], batch_size: int, hard_negatives: int = 0,
                 seed: int = 0):
        if batch_size < 2:
            raise ValueError("batch_size must be at least 2 (in-batch negatives)")
        self.data = data
        self.lists = [t for t in lists if t.positives]
        self.batch_size = batch_size
        self.hard_negatives = hard_negatives
        self.seed = seed

    def __call__(self, epoch: int) -> list[PairBatch]:
        rng = random.Random(f"pairs:{self.seed}:{epoch}")
        examples = []
        for t in self.lists:
            pos = t.positives[epoch % len(t.positives)]
            pool = [d for d in t.negatives if d != pos]
            labelled = [d for d in t.negatives[: t.labelled] if d != pos][: self.hard_negatives]
            mined = [d for d in pool if d not in labelled]
            k = min(self.hard_negatives - len(labelled), len(mined))
            examples.append((t.qid, pos, labelled + (rng.sample(mined, k) if k > 0 else [])))
        rng.shuffle(examples)
        batches = []
        for start in range(0, len(examples), self.batch_size):
            part = examples[start : start + self.batch_size]
            if len(part) < 2 and not any(negs for _, _, negs in part):
                continue  # a lone query with nothing to contrast against
            docs: list[str] = []
            column: dict[str, int] = {}  # document text -> its column: each text once per batch
            for doc_id in [pos for _, pos, _ in part] + [d for _, _, negs in part for d in negs]:
                text = self.data.corpus[doc_id]
                if text not in column:
                    column[text] = len(docs)
                    docs.append(doc_id)
            targets = [column[self.data.corpus[pos]] for _, pos, _ in part]
            batches.append(PairBatch([q for q, _, _ in part], docs, targets))
        return batches


# ------------------------------------------------------------------------------------ the step


def resolve_tasks(emb: Embedder, query_task: str | None, passage_task: str | None) -> tuple[str | None, str | None]:
    """``"auto"`` -> the model's own query / passage task (prompts, v3 tasks) or none."""
    q = emb.query_task if query_task == AUTO else query_task
    p = emb.passage_task if passage_task == AUTO else passage_task
    emb.check_task(q)
    emb.check_task(p)
    return q, p


class ContrastiveStep:
    """Loss of one :class:`PairBatch` (InfoNCE, or Matryoshka over it), with GradCache when
    ``mini_batch`` is set (see the module docstring)."""

    def __init__(self, emb: Embedder, data: RerankData, cfg: EmbeddingConfig, query_task: str | None,
                 passage_task: str | None):
        self.emb = emb
        self.data = data
        self.cfg = cfg
        self.query_task, self.passage_task = query_task, passage_task
        limit = emb.max_length if cfg.max_length is None else min(cfg.max_length, emb.max_length)
        self.max_length = limit
        self._tokens: dict[tuple[str, str], Encoded] = {}
        if cfg.matryoshka_dims:
            matryoshka(torch.zeros(2, emb.dimension), torch.zeros(2, emb.dimension), torch.zeros(2, dtype=torch.long),
                       cfg.matryoshka_dims, cfg.matryoshka_weights)  # validate dims and weights now

    def _encoded(self, kind: str, ident: str) -> Encoded:
        key = (kind, ident)
        enc = self._tokens.get(key)
        if enc is None:
            task = self.query_task if kind == "q" else self.passage_task
            text = self.data.queries[ident] if kind == "q" else self.data.corpus[ident]
            enc = self.emb.tokenizer.encode([self.emb.prefix(task) + text], self.max_length, truncate=True)[0]
            self._tokens[key] = enc
        return enc

    def embed(self, encodings: Sequence[Encoded], task: str | None) -> torch.Tensor:
        """Pooled float32 vectors [n, H] of one padded batch, with autograd as the caller set it."""
        batch = self.emb.tokenizer.pad(encodings, self.emb.device)
        hidden = self.emb.run_model(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                    [task] * len(encodings))
        return pool(hidden, batch.attention_mask, self.emb.pooling)

    def loss(self, q: torch.Tensor, d: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.matryoshka_dims:
            return matryoshka(q, d, targets, self.cfg.matryoshka_dims, self.cfg.matryoshka_weights, self.cfg.scale,
                              mask)
        return in_batch_infonce(q, d, targets, self.cfg.scale, mask), {}

    def _inputs(self, batch: PairBatch) -> tuple[list[Encoded], list[Encoded], torch.Tensor, torch.Tensor]:
        q_enc = [self._encoded("q", q) for q in batch.qids]
        d_enc = [self._encoded("d", d) for d in batch.docs]
        device = self.emb.device
        targets = torch.tensor(batch.targets, dtype=torch.long, device=device)
        mask = torch.ones(len(batch.qids), len(batch.docs), dtype=torch.bool)
        for i, q in enumerate(batch.qids):  # other documents known to be relevant are not negatives
            relevant = set(self.data.positives(q))
            for j, d in enumerate(batch.docs):
                if j != batch.targets[i] and d in relevant:
                    mask[i, j] = False
        return q_enc, d_enc, targets, mask.to(device)

    def _chunks(self, encodings: Sequence[Encoded]) -> list[list[int]]:
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]))  # similar lengths: little padding
        size = self.cfg.mini_batch or len(order)
        return [order[s : s + size] for s in range(0, len(order), size)]

    def __call__(self, batch: PairBatch) -> StepOutput:
        q_enc, d_enc, targets, mask = self._inputs(batch)
        n = len(q_enc) + len(d_enc)
        if not self.cfg.mini_batch or n <= self.cfg.mini_batch:
            q = self.embed(q_enc, self.query_task)
            d = self.embed(d_enc, self.passage_task)
            loss, parts = self.loss(q, d, targets, mask)
            return StepOutput(loss, len(q_enc), parts)
        # GradCache: 1) embed without gradients, chunk by chunk
        sides = [(q_enc, self.query_task, self._chunks(q_enc)), (d_enc, self.passage_task, self._chunks(d_enc))]
        reps = []
        with torch.no_grad():
            for encs, task, chunks in sides:
                out = torch.empty(len(encs), self.emb.dimension, dtype=torch.float32, device=self.emb.device)
                for idx in chunks:
                    out[idx] = self.embed([encs[i] for i in idx], task).float()
                reps.append(out.requires_grad_())
        # 2) the loss and its gradient with respect to the embeddings, on the whole batch
        with torch.enable_grad():
            loss, parts = self.loss(reps[0], reps[1], targets, mask)
            grads = torch.autograd.grad(loss, reps)
        device_type = self.emb.device.type if self.emb.device.type in ("cpu", "cuda") else "cpu"
        autocast = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type)

        # 3) when the trainer back-propagates the returned loss: embed each chunk again with gradients
        # and push its cached embedding gradient (times the incoming scale, e.g. 1 / grad_accum) through it
        def backward_chunks(grad_output: torch.Tensor) -> None:
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast):
                for (encs, task, chunks), grad in zip(sides, grads):
                    for idx in chunks:
                        e = self.embed([encs[i] for i in idx], task).float()
                        (e * (grad[idx] * grad_output)).sum().backward()

        out = loss.detach().requires_grad_()
        out.register_hook(backward_chunks)
        return StepOutput(out, len(q_enc), parts)


# ------------------------------------------------------------------------------------ evaluation


def retrieval_metrics(
    emb: Embedder, corpus: dict[str, str], queries: dict[str, str], qrels: Qrels, query_task: str | None,
    passage_task: str | None, dims: Sequence[int] | None = None, k: int = 10, show_progress: bool = False,
) -> dict[str, float]:
    """Dense retrieval of ``queries`` over ``corpus`` with ``emb`` (exact cosine), scored by the
    project's metrics: ``nDCG@k``, ``MRR@k``, ``Hit@k`` at full width and ``nDCG@k/d{D}`` (and MRR, Hit)
    for each Matryoshka width ``D`` in ``dims`` (each prefix re-normalised)."""
    ids = list(corpus)
    qids = [q for q in queries if q in qrels]
    with quiet_truncation():
        d_all = emb.embed([corpus[d] for d in ids], task=passage_task, normalized=False, show_progress=show_progress)
        q_all = emb.embed([queries[q] for q in qids], task=query_task, normalized=False, show_progress=show_progress)
    out: dict[str, float] = {}
    widths = [emb.dimension] + sorted({int(d) for d in (dims or []) if int(d) != emb.dimension}, reverse=True)
    for width in widths:
        dv = F.normalize(torch.from_numpy(d_all[:, :width]), dim=-1).numpy()
        qv = F.normalize(torch.from_numpy(q_all[:, :width]), dim=-1).numpy()
        scores, idx = exact_topk(qv, dv, max(k, 100))
        run = {q: {ids[int(i)]: float(s) for i, s in zip(idx[r], scores[r])} for r, q in enumerate(qids)}
        m = compute_metrics({q: qrels[q] for q in qids}, run, k_values=[k])
        suffix = "" if width == emb.dimension else f"/d{width}"
        for name in (f"nDCG@{k}", f"MRR@{k}", f"Hit@{k}"):
            out[name + suffix] = float(m.mean[name])
    return out


def dev_corpus(prepared: PreparedPairs, max_docs: int | None, seed: int = 0) -> dict[str, str]:
    """The documents dev queries retrieve from: the whole training corpus, or (``max_docs``) their
    relevant documents plus a seeded sample of the others. Replay sets' documents are never in it."""
    corpus = prepared.data.corpus
    if prepared.replay:
        skip = tuple(f"{name}/" for name in prepared.replay)
        corpus = {d: t for d, t in corpus.items() if not d.startswith(skip)}
    if max_docs is None or len(corpus) <= max_docs:
        return corpus
    must = sorted({d for q in prepared.dev_qids for d in prepared.data.positives(q)})
    rest = [d for d in corpus if d not in set(must)]
    extra = random.Random(f"devdocs:{seed}").sample(rest, max(0, min(len(rest), max_docs - len(must))))
    return {d: corpus[d] for d in must + sorted(extra)}


# ------------------------------------------------------------------------------------ saving


def _replace_dir(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                 "last": "pooling_mode_lasttoken"}


def save_sentence_transformer(
    module: nn.Module, emb: Embedder, out_dir: str | Path, dtype: torch.dtype = torch.float32,
    card: str | None = None, extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a BERT-family encoder ``module`` as a sentence-transformers model directory: config.json,
    model.safetensors (official names), tokenizer, modules.json with the pooling (and normalisation) of
    ``emb``'s source model, sentence_bert_config.json, prompts. tamis and sentence-transformers load it
    and give the same vectors."""
    from safetensors.torch import save_file

    from tamis.models import bert

    out = Path(out_dir)
    tmp = _fresh_tmp(out)
    src = emb.model_dir
    config = {k: v for k, v in emb.config.items() if not k.startswith("_")}
    config.pop("dtype", None)
    config.update(torch_dtype="float32", **(extra_config or {}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: (v.to(dtype) if v.is_floating_point() else v).cpu() for k, v in bert.hf_state_dict(module).items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(src, tmp)
    modules = read_json(src / "modules.json")
    if modules:
        (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        for m in modules:
            path = m.get("path", "")
            if path and (src / path).is_dir():
                shutil.copytree(src / path, tmp / path)
    else:  # a bare encoder: the pooling tamis uses, then L2 normalisation
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (tmp / "1_Pooling").mkdir()
        pooling = {"word_embedding_dimension": emb.dimension, **{v: emb.pooling == k for k, v in _POOLING_KEYS.items()}}
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    sbert = read_json(src / "sentence_bert_config.json") or {}
    sbert["max_seq_length"] = int(emb.max_length)
    sbert.setdefault("do_lower_case", False)
    (tmp / "sentence_bert_config.json").write_text(json.dumps(sbert, indent=2) + "\n")
    st = read_json(src / "config_sentence_transformers.json") or {}
    if emb._prefixes and not st.get("prompts"):
        st["prompts"] = dict(emb._prefixes)
    if st:
        (tmp / "config_sentence_transformers.json").write_text(json.dumps(st, indent=2) + "\n")
    if card:
        (tmp / "README.md").write_text(card)
    return _replace_dir(tmp, out)


def save_v3(emb: Embedder, out_dir: str | Path, dtype: torch.dtype = torch.float32, card: str | None = None) -> Path:
    """Write a jina-embeddings-v3 model in its official layout (stacked adapters as parametrizations):
    the source directory's files, the new weights."""
    from safetensors.torch import save_file

    from tamis.models import xlmr

    out = Path(out_dir)
    tmp = _fresh_tmp(out)
    src = emb.model_dir
    for p in src.iterdir():
        if p.is_file() and p.suffix not in (".safetensors", ".bin", ".pt") and not p.name.startswith("expected") \
                and p.name not in ("model.safetensors.index.json", "NOTES.md", "README.md"):
            shutil.copy(p, tmp / p.name)
    for m in read_json(src / "modules.json") or []:
        path = m.get("path", "")
        if path and (src / path).is_dir():
            shutil.copytree(src / path, tmp / path)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).cpu() for k, v in xlmr.hf_state_dict(emb.model).items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if card:
        (tmp / "README.md").write_text(card)
    return _replace_dir(tmp, out)


def export_merged(base: str | Path | None, adapter_dir: str | Path, out_dir: str | Path, task: str = "task",
                  dtype: torch.dtype = torch.float32, card: str | None = None) -> Path:
    """Fold a peft-layout adapter into its BERT-family base and save an ordinary sentence-transformers
    model: ``Embedder(out_dir)`` (or sentence-transformers) with no task gives the vectors that
    ``Embedder(base, adapters={task: adapter_dir})`` gives with ``task``."""
    from tamis.models import lora

    emb = Embedder(base, dtype="float32", adapters={task: adapter_dir})  # merge in float32, whatever "auto" is
    module = copy.deepcopy(emb.model)
    lora.merge_adapter(module, task)
    prefix = emb.prefix(task)
    if prefix:
        raise ValueError(f"task {task!r} also adds the prompt {prefix!r}; a merged model has no task to add it")
    cfg = read_json(Path(adapter_dir) / "adapter_config.json") or {}
    extra = {"tamis_merged_adapter": {"task": task, "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
                                      "target_modules": cfg.get("target_modules")}}
    return save_sentence_transformer(module, emb, out_dir, dtype, card, extra)


# ------------------------------------------------------------------------------------ cards


def embedder_card(name: str, summary: str, base: str, data: Sequence[str], recipe: dict[str, Any],
                  usage: str, metrics: dict[str, Any] | None = None, command: str | None = None) -> str:
    rows = "\n".join(f"| {d} | {data_licence(d)} |" for d in data)
    settings = "\n".join(f"| {k} | {v} |" for k, v in recipe.items())
    parts = [
        f"---\nlibrary_name: tamis\npipeline_tag: sentence-similarity\ntags:\n- sentence-embeddings\n---\n\n# {name}\n\n"
        f"{summary} Base model: {base}.\n",
        f"## Use\n\n```python\n{usage}\n```\n",
        f"## Training data\n\n| data | licence |\n|---|---|\n{rows}\n\nNo test query of an evaluation set was used "
        "for training or model selection.\n",
        "## Recipe\n\n" + (f"```bash\n{command}\n```\n\n" if command else "") + f"| setting | value |\n|---|---|\n{settings}\n",
    ]
    if metrics:
        parts.append("## Dev metrics (held-out training queries)\n\n" + "\n".join(
            f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()) + "\n")
    parts.append("## Licences\n\nThe base model's licence applies to the weights; several training sets are "
                 "for non-commercial research only, which may restrict how this model can be used.\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ end to end


def _train_only_lora(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """Freeze everything but the LoRA stacks of the adapters ``names`` (other adapters' slices get zero
    gradients)."""
    from tamis.models import lora

    all_names = lora.adapter_names(model)
    index = sorted({all_names.index(n) for n in names})
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in lora.lora_layers(model).values():
        for p in (layer.lora_A, layer.lora_B):
            if p is None:
                continue
            p.requires_grad_(True)
            if len(index) < p.shape[0]:
                mask = torch.zeros(p.shape[0], *([1] * (p.ndim - 1)), dtype=p.dtype, device=p.device)
                mask[index] = 1
                p.register_hook(lambda g, m=mask: g * m)
            params.append(p)
    return params


def train_embedder(
    data: Sequence[str],
    out_dir: str | Path,
    model: str | Path | None = None,
    embedding: EmbeddingConfig | None = None,
    mining: MiningConfig | None = None,
    config: TrainConfig | None = None,
    adapter: AdapterConfig | None = None,
    unseen_dev_docs: bool = False,
    max_dev_docs: int | None = None,
    allow_test: bool = False,
    merge_into: str | Path | None = None,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    save_dtype: str = "float32",
    name: str | None = None,
    command: str | None = None,
    show_progress: bool = True,
    replay: Sequence[str] = (),
    replay_queries: int | None = None,
) -> dict[str, Any]:
    """Train an embedding model (all weights) or, with ``adapter``, a task adapter on a frozen base.

    ``replay``: general-domain sets mixed into the training batches (``replay_queries`` seeded queries
    each; default as many as ``data`` trains on) so that the model keeps its quality outside ``data``'s
    domain; they never enter the dev slice (see :func:`prepare_pairs`).

    Outputs under ``out_dir``: ``model/`` (full training: a sentence-transformers directory, or a
    jina-embeddings-v3 checkpoint) or ``adapter/`` (peft layout; ``adapter-<passage_task>/`` for a
    separate document adapter), ``train_log.jsonl``, ``curve.png``, ``summary.json``, ``checkpoint/``
    (``resume=True``) and ``data/`` (mined lists). ``merge_into``: also fold the trained adapter into the
    base and save that ordinary model there (BERT family). Returns the summary.
    """
    embedding = embedding or EmbeddingConfig()
    mining = mining or MiningConfig()
    config = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emb_cache = EmbeddingCache(cache_dir) if cache_dir is not None else EmbeddingCache()
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    # float32 master weights (bf16: autocast); trainable: no fused or compiled copies of the weights it trains
    emb = Embedder(model, device=config.device, dtype="float32", trainable=True)
    v3 = emb.family == "xlmr-lora"
    trained_tasks: list[str] = []
    if adapter is not None:
        passage = adapter.passage_task or adapter.task
        trained_tasks = list(dict.fromkeys([adapter.task, passage]))
        if v3:
            from tamis.models import xlmr

            xlmr.trainable_tasks(emb.model, trained_tasks)
            if config.weight_decay:
                logger.info("weight decay set to 0: AdamW would also shrink the frozen tasks' slices of the stacks")
                config = replace(config, weight_decay=0.0)
        else:
            for i, task in enumerate(trained_tasks):
                emb.add_adapter(task, target_modules=adapter.target_modules, r=adapter.r, alpha=adapter.alpha,
                                seed=config.seed + i)
            _train_only_lora(emb.model, trained_tasks)
        query_task, passage_task = adapter.task, passage
    else:
        query_task, passage_task = resolve_tasks(emb, embedding.query_task, embedding.passage_task)
        if embedding.freeze == "word":
            for n, p in emb.model.named_parameters():
                if "word_embeddings" in n:
                    p.requires_grad_(False)
        elif embedding.freeze not in (None, "none"):
            raise ValueError(f"freeze must be 'word' or None, got {embedding.freeze!r}")
    prepared = prepare_pairs(data, Path(data_dir) if data_dir else out / "data", mining, embedding.hard_negatives,
                             config.seed, unseen_dev_docs, allow_test, mine_model=model, cache=emb_cache,
                             show_progress=show_progress, replay=replay, replay_queries=replay_queries)
    prep_s = time.perf_counter() - t0
    batcher = PairBatcher(prepared.data, prepared.train, embedding.batch_size, embedding.hard_negatives, config.seed)
    step = ContrastiveStep(emb, prepared.data, embedding, query_task, passage_task)
    dims = embedding.matryoshka_dims
    corpus = dev_corpus(prepared, max_dev_docs, config.seed)
    dev_queries = {q: prepared.data.queries[q] for q in prepared.dev_qids}
    dev_qrels = {q: prepared.data.qrels[q] for q in prepared.dev_qids}

    def evaluate() -> dict[str, float]:
        return retrieval_metrics(emb, corpus, dev_queries, dev_qrels, query_task, passage_task, dims)

    params = count_parameters(emb.model)
    name = name or out.name
    recipe = {
        "mode": f"task adapter {trained_tasks}" if adapter else "all weights",
        "loss": ("Matryoshka " + str(list(dims)) + " over " if dims else "") + f"InfoNCE, scale {embedding.scale}",
        "batch": f"{embedding.batch_size} queries + {embedding.hard_negatives} hard negative(s) each",
        "GradCache chunk": embedding.mini_batch or "off", "max length": step.max_length,
        "tasks": f"queries {query_task!r}, documents {passage_task!r}", **config.schedule_rows(),
        "seed": config.seed, "device": config.device,
        "negatives": ("+".join(mining.methods) + f" mined, top {mining.skip_top} skipped"
                      if embedding.hard_negatives and mining.methods else "in-batch only"),
        "dev": f"{len(prepared.dev_qids)} held-out queries over {len(corpus)} documents"
               + (" (their documents never trained on)" if unseen_dev_docs else ""),
    }
    if prepared.replay:
        recipe["replay"] = ", ".join(f"{n}: {prepared.sizes[n]['replay_queries']} queries (BM25 negatives)"
                                     for n in prepared.replay)
    if adapter is not None:
        recipe["adapter"] = "stacked v3 slices" if v3 else f"LoRA r={adapter.r}, alpha={adapter.alpha}, " \
                                                          f"targets {list(adapter.target_modules or ['all Linear'])}"
    base_name = emb.name
    usage_full = f'import tamis\nemb = tamis.Embedder("path/to/this/directory")\nemb.embed(["a text"]{", dimensions=64" if dims else ""})'

    def save(directory: Path) -> None:
        dtype = resolve_dtype(save_dtype)
        extra = {"matryoshka_dimensions": sorted(dims)} if dims else None
        if adapter is not None and not v3:
            usage = (f'import tamis\nemb = tamis.Embedder("{base_name}", adapters={{"{adapter.task}": "path/to/adapter"}})\n'
                     f'emb.embed(["a text"], task="{adapter.task}")')
            card = embedder_card(f"{name} ({adapter.task} adapter)", "A LoRA task adapter trained with `tamis train "
                                 "adapter`, in peft's layout.", base_name, [*data, *replay], recipe, usage, command=command)
            for task in trained_tasks:
                target = directory if task == adapter.task else directory.with_name(f"adapter-{task}")
                tmp = _fresh_tmp(target)
                emb.save_adapter(task, tmp)
                (tmp / "README.md").write_text(card)
                _replace_dir(tmp, target)
            return
        card = embedder_card(name, "An embedding model trained with `tamis train`.", base_name, [*data, *replay], recipe,
                             usage_full, command=command)
        if v3:
            save_v3(emb, directory, dtype, card)
        else:
            save_sentence_transformer(emb.model, emb, directory, dtype, card, extra)

    describe = {"title": f"{name}: {recipe['loss']}", "base": base_name, "data": [*data, *replay], "mode": recipe["mode"],
                "sizes": prepared.sizes, "parameters": params, **environment()}
    trainer = Trainer(emb.model, config, out, batcher, step, save, evaluate if prepared.dev_qids else None, describe,
                      model_dir=out / "adapter" if adapter is not None and not v3 else None)
    result = trainer.train(resume=resume)
    summary: dict[str, Any] = {
        "output": str(result.model_dir), "mode": recipe["mode"], **result.summary(prep_s), "base": base_name,
        "query_task": query_task, "passage_task": passage_task, "sizes": prepared.sizes, "parameters": params,
        "recipe": recipe, "cpu": cpu_model(),
    }
    if merge_into is not None:
        if adapter is None or v3:
            raise ValueError("merge_into folds a trained BERT-family adapter into its base; nothing to merge here")
        if passage_task != query_task:
            raise ValueError("a merged model has one set of weights: merge needs one adapter for queries and documents")
        merged_card = embedder_card(f"{name} (merged)", f"The {adapter.task!r} adapter folded into the base weights.",
                                    base_name, [*data, *replay], recipe, usage_full, command=command)
        summary["merged"] = str(export_merged(model, result.model_dir, merge_into, adapter.task,
                                              resolve_dtype(save_dtype), merged_card))
    return save_summary(out, summary)


__all__ = ["AdapterConfig", "ContrastiveStep", "EmbeddingConfig", "PairBatch", "PairBatcher", "PreparedPairs",
           "export_merged", "prepare_pairs", "retrieval_metrics", "save_sentence_transformer", "save_v3",
           "train_embedder"]
