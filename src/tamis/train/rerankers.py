"""``tamis train reranker`` / ``tamis train distill``: data -> mined lists -> (teacher scores) -> trained
cross-encoder, end to end.

>>> from tamis.train import train_reranker, TrainConfig
>>> train_reranker(["../shared/data/ares-pairs"], "runs/ce", config=TrainConfig(max_steps=500))  # doctest: +SKIP

Everything slow is cached under ``out_dir`` (``data/``: mined lists and dev candidates; ``teacher/``:
teacher scores; embeddings in the shared embedding cache), so a rerun or ``resume=True`` starts
training at once.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tamis.errors import InvalidInputError
from tamis.evaluate.datasets import Run, load_run, save_run
from tamis.evaluate.first_stage import EmbeddingCache
from tamis.models.loading import resolve_dtype
from tamis.train.card import cpu_model, reranker_card
from tamis.train.cross_encoder import (
    CrossEncoder,
    ListBatcher,
    ListStep,
    count_parameters,
    default_layer_map,
    freeze_embeddings,
    init_cross_encoder,
    rerank_metrics,
    save_cross_encoder,
    teacher_table,
)
from tamis.train.data import (
    RerankData,
    TrainList,
    load_lists,
    load_training_data,
    merge,
    negatives_per_group,
    save_lists,
    split_dev,
)
from tamis.train.losses import STATE_LOSSES, parse_loss_spec
from tamis.train.mining import candidate_run, first_stage_runs, mine_lists
from tamis.train.teachers import EnsembleScorer, build_scorer, score_cached
from tamis.train.trainer import TrainConfig, Trainer, environment, save_summary

logger = logging.getLogger("tamis.train")


@dataclass
class MiningConfig:
    methods: tuple[str, ...] = ("bm25", "dense")
    n_negatives: int = 15  # negatives kept per list (a step samples `ListConfig.n_negatives` of them)
    skip_top: int = 3
    depth: int = 50
    strategy: str = "top"
    dev: float = 0.05  # fraction (< 1) or count of training queries held out for dev
    max_dev_per_source: int | None = 100
    dev_depth: int = 30  # dev candidates per query (RRF of the first stages)
    embedder: str | None = None  # dense first stage (default: the bundled MiniLM)
    # its dtype: float32 keeps mined lists the same on every CPU (recipes); "auto" is the fast one, as
    # `tamis eval` uses, so its cached corpus embeddings are reused (the `tamis train` default)
    dtype: str = "float32"
    # Also a list of mined candidates for every judged query without a relevant document (see
    # RerankData.unlabelled_queries): teacher losses learn from its teacher scores, label losses skip it.
    label_free: bool = False


@dataclass
class ListConfig:
    n_negatives: int = 7
    lists_per_batch: int = 4
    max_length: int = 256
    loss: str = "infonce"
    temperature: float = 1.0
    pos_weight: float | None = None
    # A seeded sample of this many training lists, each cut to ``n_negatives`` negatives: fewer pairs
    # for an expensive teacher (a cross-encoder) to score; several epochs then reuse them.
    max_lists: int | None = None
    max_dev: int | None = None  # a seeded sample of this many dev queries (cheaper periodic evaluation)


@dataclass
class PreparedData:
    data: RerankData
    train: list[TrainList]
    dev_run: Run
    sizes: dict[str, Any] = field(default_factory=dict)


def _prefix_lists(lists: Sequence[TrainList], prefix: str) -> list[TrainList]:
    return [TrainList(prefix + t.qid, [prefix + d for d in t.positives], [prefix + d for d in t.negatives], t.labelled)
            for t in lists]


def prepare_data(specs: Sequence[str], work_dir: str | Path, mining: MiningConfig, seed: int = 0,
                 cache: EmbeddingCache | None = None, show_progress: bool = True) -> PreparedData:
    """Load each training set, hold out dev queries, mine negatives and dev candidates (cached in
    ``work_dir``), and merge the sets."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sets, all_lists, dev_runs, sizes = [], [], [], {}
    embedder = None
    for spec in specs:
        data = load_training_data(spec)
        sets.append(data)
        lists_path, dev_path = work / f"lists-{data.name}.jsonl", work / f"dev-{data.name}.tsv"
        meta_path = work / f"mining-{data.name}.json"
        meta = {"spec": str(spec), "seed": seed, **{k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in mining.__dict__.items()
                                                   if not (k == "label_free" and not v)
                                                   and not (k == "dtype" and v == "float32")}}  # old caches stay valid
        if lists_path.is_file() and dev_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
            lists, dev_run = load_lists(lists_path), load_run(dev_path)
        else:
            train_q, dev_q = split_dev(data, mining.dev, seed, mining.max_dev_per_source)
            # a set of unjudged queries only (DIR:unlabelled) exists for its label-free lists
            free_q = data.unlabelled_queries() if mining.label_free or not data.trainable_queries() else []
            if "dense" in mining.methods and embedder is None:
                from tamis.embed import Embedder

                embedder = Embedder(mining.embedder, dtype=mining.dtype)
            if "dense" in mining.methods and show_progress:
                print(f"mining {data.name}: the dense first stage embeds {len(data.corpus):,} documents and "
                      f"{len(train_q) + len(dev_q) + len(free_q):,} queries with {embedder.name} "
                      f"({str(embedder.dtype).removeprefix('torch.')}; embeddings cached, so tamis eval's are "
                      "reused); --mine bm25 is the quick option", file=sys.stderr, flush=True)
            runs = first_stage_runs(data, train_q + dev_q + free_q, mining.methods, mining.depth, embedder, cache,
                                    show_progress)
            lists = mine_lists(data, train_q, runs, mining.n_negatives, mining.skip_top, mining.depth,
                               mining.strategy, seed)
            lists += mine_lists(data, free_q, runs, mining.n_negatives, mining.skip_top, mining.depth,
                                mining.strategy, seed, label_free=True)
            dev_only = {name: {q: run[q] for q in dev_q if q in run} for name, run in runs.items()}
            dev_run = candidate_run(dev_only, mining.dev_depth)
            save_lists(lists, lists_path)
            save_run(dev_run, dev_path)
            meta_path.write_text(json.dumps(meta, indent=1))
        sizes[data.name] = {"train_lists": len(lists), "label_free_lists": sum(not t.positives for t in lists),
                            "dev_queries": len(dev_run), **data.sizes()}
        all_lists.append(lists)
        dev_runs.append(dev_run)
    if len(sets) == 1:
        return PreparedData(sets[0], all_lists[0], dev_runs[0], sizes)
    merged = merge(sets)
    lists = [t for d, ls in zip(sets, all_lists) for t in _prefix_lists(ls, f"{d.name}/")]
    dev_run = {f"{d.name}/{q}": {f"{d.name}/{x}": s for x, s in docs.items()}
               for d, run in zip(sets, dev_runs) for q, docs in run.items()}
    return PreparedData(merged, lists, dev_run, sizes)


def check_label_free_loss(loss: str, has_teacher: bool) -> None:
    """Label-free lists have no positive: they need a teacher loss, and the only label loss that may share
    the batch is InfoNCE (it skips lists without a positive; BCE, LambdaLoss and label ListNet would read
    every candidate as not relevant)."""
    names = [n for n, _ in parse_loss_spec(loss)]
    teacher_terms = [n for n in names if n in ("kl", "mse", "margin-mse") or n in STATE_LOSSES
                     or (n == "listnet" and has_teacher)]  # ListNet reads teacher scores when there is one
    if not teacher_terms or not has_teacher:
        raise InvalidInputError(f"label-free lists learn from a teacher only: loss {loss!r} needs a teacher term "
                         "(kl, mse, margin-mse) and a teacher")
    wrong = [n for n in names if n not in teacher_terms and n != "infonce"]
    if wrong:
        raise InvalidInputError(f"label-free lists have no positive, so loss {loss!r} would read them wrongly through "
                         f"{wrong}; combine a teacher term with infonce only")


def subsample(prepared: PreparedData, max_lists: int | None, n_negatives: int, max_dev: int | None,
              seed: int = 0) -> PreparedData:
    """A seeded sample of ``max_lists`` training lists (each cut to ``n_negatives`` negatives, chosen at
    random) and of ``max_dev`` dev queries; ``None`` keeps everything."""
    train, dev = prepared.train, prepared.dev_run
    if max_lists is not None and max_lists < len(train):
        rng = random.Random(f"lists:{seed}")
        def cut(t: TrainList) -> TrainList:
            k = negatives_per_group(bool(t.positives), n_negatives)
            return TrainList(t.qid, t.positives, rng.sample(t.negatives, min(k, len(t.negatives))), t.labelled)

        train = [cut(t) for t in rng.sample(train, max_lists)]
    if max_dev is not None and max_dev < len(dev):
        keep = random.Random(f"dev:{seed}").sample(sorted(dev), max_dev)
        dev = {q: dev[q] for q in sorted(keep)}
    sizes = {**prepared.sizes, "used": {"train_lists": len(train), "dev_queries": len(dev)}}
    return PreparedData(prepared.data, train, dev, sizes)


def teacher_scores(spec: str | Any, prepared: PreparedData, cache_dir: str | Path, device: str = "cpu",
                   weights: Sequence[float] | None = None, emb_cache: EmbeddingCache | None = None,
                   show_progress: bool = True) -> tuple[dict[str, dict[str, float]], str, dict[str, Any]]:
    """Score every (query, candidate) of the training lists once with the teacher (cached on disk).

    An ensemble's weights are learned on the training lists' labels unless given."""
    scorer = build_scorer(spec, device, emb_cache, show_progress) if isinstance(spec, str) else spec
    lists = [(t.qid, [*t.positives, *t.negatives]) for t in prepared.train]
    info: dict[str, Any] = {}
    if isinstance(scorer, EnsembleScorer):
        comps = scorer.components(prepared.data, lists, cache_dir)
        if weights is not None:
            if len(weights) != len(scorer.scorers):
                raise ValueError(f"{len(weights)} teacher weights for {len(scorer.scorers)} scorers")
            total = float(sum(abs(w) for w in weights)) or 1.0
            scorer.weights, scorer.scale = [w / total for w in weights], total
        else:
            labels = [np.asarray([prepared.data.qrels.get(q, {}).get(d, 0) for d in docs], dtype=np.float32)
                      for q, docs in lists]
            scorer.fit(comps, labels)
        info = {"weights": dict(zip([s.name for s in scorer.scorers], scorer.weights)), "scale": scorer.scale}
        scores = scorer.combine(comps)
    else:
        scores = score_cached(scorer, prepared.data, lists, cache_dir)
    return teacher_table(lists, scores), scorer.name, info


def train_reranker(
    data: Sequence[str],
    out_dir: str | Path,
    model: str | None = None,
    layers: Sequence[int] | None = None,
    teacher: str | Any | None = None,
    teacher_weights: Sequence[float] | None = None,
    lists: ListConfig | None = None,
    mining: MiningConfig | None = None,
    config: TrainConfig | None = None,
    freeze: str | None = None,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    save_dtype: str = "float32",
    data_dir: str | Path | None = None,
    name: str | None = None,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a cross-encoder reranker; returns a summary (also written to ``out_dir/summary.json``).

    ``model``: an encoder (fresh head) or a cross-encoder to continue from; with ``layers``, only
    those layers are kept (a student initialised from its teacher). ``teacher``: a reranker path or
    scorer spec (see :func:`tamis.train.teachers.build_scorer`) whose scores feed distillation losses
    (``lists.loss`` such as ``"kl"`` or ``"infonce+kl"``). ``freeze``: ``"word"`` or ``"all"``
    embeddings frozen. ``data_dir``: where the mined lists are cached (default ``out_dir/data``; share
    it between a teacher and its student so mining runs once).
    """
    lists = lists or ListConfig()
    mining = mining or MiningConfig()
    config = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mining.label_free or any(str(d).endswith(":unlabelled") for d in data):  # before mining: fail at once
        check_label_free_loss(lists.loss, teacher is not None)
    emb_cache = EmbeddingCache(cache_dir) if cache_dir is not None else EmbeddingCache()
    t0 = time.perf_counter()
    prepared = prepare_data(data, Path(data_dir) if data_dir else out / "data", mining, config.seed, emb_cache,
                            show_progress)
    prepared = subsample(prepared, lists.max_lists, lists.n_negatives, lists.max_dev, config.seed)
    teacher_info: dict[str, Any] = {}
    table = None
    teacher_name = None
    teacher_model = None
    live = any(name in STATE_LOSSES for name, _ in parse_loss_spec(lists.loss))
    if live:  # the teacher runs beside the student on every batch: its states and its logits are the targets
        teacher_model = _live_teacher(teacher, config.seed, config.device)
        teacher_name = f"cross-encoder {Path(str(teacher)).name} (live: hidden states and scores)"
    elif teacher is not None:
        table, teacher_name, teacher_info = teacher_scores(teacher, prepared, out / "teacher", config.device,
                                                           teacher_weights, emb_cache, show_progress)
    prep_s = time.perf_counter() - t0
    torch.manual_seed(config.seed)
    ce = init_cross_encoder(model, layers, config.seed, config.device)
    frozen = freeze_embeddings(ce, freeze) if freeze else 0
    batcher = ListBatcher(prepared.data, prepared.train, ce.tokenizer, lists.n_negatives, lists.lists_per_batch,
                          lists.max_length, config.seed)
    layer_map = None
    if teacher_model is not None:
        layer_map = default_layer_map(layers, ce.model.cfg.num_hidden_layers,
                                      teacher_model.model.cfg.num_hidden_layers)
    step = ListStep(ce, prepared.data, lists.loss, lists.max_length, table, lists.temperature, lists.pos_weight,
                    teacher_model, layer_map)
    params = count_parameters(ce.model)
    name = name or out.name
    recipe = {
        "loss": lists.loss, "temperature": lists.temperature, "list": f"1 positive + {lists.n_negatives} negatives",
        "lists per batch": lists.lists_per_batch, "max length": lists.max_length, **config.schedule_rows(),
        "grad accumulation": config.grad_accum,
        "negatives": f"{'+'.join(mining.methods)} mined, top {mining.skip_top} skipped, depth {mining.depth}"
                     + (" (+ label-free lists: candidates of judged queries without a positive, teacher losses only)"
                        if mining.label_free else ""),
        "teacher": teacher_name or "none (labels only)", "frozen": freeze or "nothing", "seed": config.seed,
        "device": config.device, "bf16": config.bf16,
        "lists used": f"{len(prepared.train)} (sampled)" if lists.max_lists else f"{len(prepared.train)} (all)",
    }
    if layer_map is not None:
        recipe["hidden-state map"] = f"student states {list(range(len(layer_map)))} -> teacher states {layer_map}"

    def save(directory: Path) -> None:
        arch = {"layers": ce.model.cfg.num_hidden_layers, "hidden": ce.model.cfg.hidden_size,
                "heads": ce.model.cfg.num_attention_heads, "parameters": f"{params['parameters'] / 1e6:.1f} M"}
        card = reranker_card(name, f"A cross-encoder reranker trained with `tamis train` ({ce.init}).", arch,
                             ce.init, list(data), recipe, command=command)
        save_cross_encoder(ce, directory, lists.max_length, resolve_dtype(save_dtype), card)

    def evaluate() -> dict[str, float]:
        return rerank_metrics(ce.reranker(lists.max_length), prepared.data, prepared.dev_run)

    trainer = Trainer(ce.model, config, out, batcher, step, save, evaluate if prepared.dev_run else None,
                      describe={"title": f"{name}: {lists.loss}", "init": ce.init, "data": list(data),
                                "teacher": teacher_name, "teacher_info": teacher_info, "sizes": prepared.sizes,
                                "parameters": params, "frozen_parameters": frozen, **environment()})
    result = trainer.train(resume=resume)
    return save_summary(out, {"model_dir": str(result.model_dir), **result.summary(prep_s), "init": ce.init,
                              "teacher": teacher_name, "teacher_info": teacher_info, "sizes": prepared.sizes,
                              "parameters": params, "recipe": recipe, "cpu": cpu_model()})


def _live_teacher(teacher: Any, seed: int, device: str) -> CrossEncoder:
    """The cross-encoder a ``hidden`` or ``cls`` loss runs beside the student (a directory or a cached model name)."""
    from tamis.errors import TamisError
    from tamis.models import is_cross_encoder
    from tamis.models.loading import load_config, resolve_model_dir

    why = "losses 'hidden' and 'cls' need --teacher to be a cross-encoder directory (run beside the student)"
    if not isinstance(teacher, (str, Path)):
        raise ValueError(why)
    try:
        if not is_cross_encoder(load_config(resolve_model_dir(teacher))):
            raise ValueError(f"{why}; {teacher} is an embedding model")
    except TamisError as exc:
        raise ValueError(f"{why}; {exc}") from None
    return init_cross_encoder(teacher, None, seed, device)


__all__ = ["CrossEncoder", "ListConfig", "MiningConfig", "PreparedData", "prepare_data", "teacher_scores",
           "train_reranker"]
