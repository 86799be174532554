"""Cross-encoder rerankers: initialise, train on lists (labels and/or teacher scores), evaluate, save.

The model is :class:`tamis.models.bert.BertForSequenceClassification` — the module inference runs —
and pairs go through :meth:`tamis.tokenize.Tokenizer.encode_pairs` and
:func:`tamis.rerank.cross_encoder.relevance_logits`, exactly as :class:`~tamis.rerank.CrossEncoderReranker`
scores them. A trained model is saved in the Hugging Face ``BertForSequenceClassification`` layout
(config.json, model.safetensors, tokenizer files, a model card), which ``tamis.Reranker(dir)`` and
sentence-transformers ``CrossEncoder(dir)`` both load.

Initialisation:
- :func:`init_cross_encoder` from any BERT-family encoder checkpoint plus a fresh 1-logit head, or from
  a cross-encoder (e.g. the teacher) keeping only some of its layers (``layers=[0, 1]``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from tamis.errors import CheckpointError
from tamis.evaluate.datasets import Qrels, Run
from tamis.evaluate.metrics import compute_metrics
from tamis.models import bert, detect_family, is_cross_encoder
from tamis.models.loading import load_config, load_state_dict, model_name, resolve_model_dir
from tamis.rerank.cross_encoder import CrossEncoderReranker, relevance_logits
from tamis.tokenize import Tokenizer
from tamis.train.data import RerankData, TrainList, make_groups
from tamis.train.losses import STATE_LOSSES, cls_distance, compute, hidden_mse, parse_loss_spec
from tamis.train.trainer import StepOutput

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentencepiece.bpe.model", "merges.txt", "vocab.json")
_ARCHITECTURES = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
                  "xlm-roberta": "XLMRobertaForSequenceClassification", "mpnet": "MPNetForSequenceClassification"}


def copy_tokenizer(source_dir: Path, out: Path, max_length: int | None = None) -> None:
    """Tokenizer files, with the fixed padding / truncation of ``tokenizer.json`` removed (loaders set
    their own) and ``model_max_length`` set when given."""
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, out / name)
    tok_path = out / "tokenizer.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        tok["padding"] = None
        tok["truncation"] = None
        tok_path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    if max_length:
        tc_path = out / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        tc["model_max_length"] = int(max_length)
        tc_path.write_text(json.dumps(tc, indent=2) + "\n")



@dataclass
class CrossEncoder:
    """A cross-encoder being trained: the module, its tokenizer, and where it came from."""

    model: bert.BertForSequenceClassification
    tokenizer: Tokenizer
    source_dir: Path
    source_config: dict[str, Any]
    init: str  # how it was initialised, for the model card

    def reranker(self, max_length: int | None = None, name: str = "training") -> CrossEncoderReranker:
        return CrossEncoderReranker.from_module(self.model, self.tokenizer, name=name, max_length=max_length,
                                                activation="none")


def _fresh_head(model: bert.BertForSequenceClassification, seed: int, reset_pooler: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    heads: list[nn.Linear] = []
    if model.cfg.classifier_style == "roberta":
        heads = [model.classifier.dense, model.classifier.out_proj]
    else:
        heads = [model.classifier] + ([model.encoder_model.pooler.dense] if reset_pooler else [])
    with torch.no_grad():
        for lin in heads:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
            lin.bias.zero_()


def init_cross_encoder(
    source: str | Path | None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> CrossEncoder:
    """A cross-encoder from ``source``: a cross-encoder checkpoint (kept as is, or reduced to ``layers``)
    or any BERT-family encoder (``None``: the bundled all-MiniLM-L6-v2) with a fresh 1-logit head."""
    source_dir = resolve_model_dir(source)
    config = load_config(source_dir)
    family = detect_family(config)
    if family != "bert":
        raise ValueError(f"{source_dir} is a {family} model; cross-encoder training needs a BERT-family encoder")
    if is_cross_encoder(config):
        model = bert.from_pretrained(source_dir, device, classification=True)
        init = f"cross-encoder {source_dir.name}"
    else:
        cfg = bert.BertConfig.from_dict({**config, "architectures": [_ARCHITECTURES.get(config.get("model_type"),
                                                                                        "BertForSequenceClassification")]})
        cfg.num_labels = 1
        model = bert.BertForSequenceClassification(cfg)
        state = load_state_dict(source_dir)
        has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
        model.encoder_model.load_state_dict(encoder_state(state, model.encoder_model), strict=False)
        _fresh_head(model, seed, reset_pooler=not has_pooler)
        model = model.to(device).eval()
        init = f"encoder {model_name(source)} + fresh 1-logit head (seed {seed})"
    if layers is not None:
        layers = list(layers)
        bert.select_layers(model, layers)
        init += f", layers {layers}"
    tokenizer = Tokenizer.from_dir(source_dir, config)
    return CrossEncoder(model, tokenizer, source_dir, config, init)


def encoder_state(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """An encoder checkpoint's tensors under ``encoder``'s names (the BERT key map); every encoder
    tensor must be there except the pooler, which a fresh head may initialise."""
    expected = set(encoder.state_dict())
    out = {}
    for key, value in state.items():
        new = key
        for prefix in ("bert.", "roberta.", "mpnet.", "model."):
            if new.startswith(prefix):
                new = new[len(prefix):]
                break
        for old, repl in bert._RENAME.items():
            new = new.replace(old, repl)
        if new in expected:
            out[new] = value
    missing = [k for k in expected if k not in out and not k.startswith("pooler.")]
    if missing:
        raise CheckpointError(f"encoder checkpoint lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    return out


# ------------------------------------------------------------------------------------ batching


@dataclass
class ListBatch:
    qids: list[str]
    docs: list[list[str]]


class ListBatcher:
    """Length-grouped batches of training lists (1 positive + k negatives each) for one epoch.

    Lists are shuffled (seeded by epoch), cut into pools of ``pool`` batches, sorted by their longest
    pair inside each pool and split into batches, then the batches are shuffled: batches hold lists of
    similar length (little padding) while the order stays random.
    """

    def __init__(self, data: RerankData, lists: Sequence[TrainList], tokenizer: Tokenizer, n_negatives: int,
                 lists_per_batch: int, max_length: int, seed: int = 0, pool: int = 50):
        self.data = data
        self.lists = list(lists)
        self.n_negatives = n_negatives
        self.lists_per_batch = lists_per_batch
        self.max_length = max_length
        self.seed = seed
        self.pool = pool
        texts_q = sorted({t.qid for t in self.lists})
        texts_d = sorted({d for t in self.lists for d in (*t.positives, *t.negatives)})
        self.q_len = dict(zip(texts_q, tokenizer.count_tokens([data.queries[q] for q in texts_q], False)))
        self.d_len = dict(zip(texts_d, tokenizer.count_tokens([data.corpus[d] for d in texts_d], False)))

    def __call__(self, epoch: int) -> list[ListBatch]:
        groups = make_groups(self.lists, self.n_negatives, epoch, self.seed)
        rng = random.Random(f"batches:{self.seed}:{epoch}")
        rng.shuffle(groups)

        def length(g: tuple[str, list[str]]) -> int:
            return min(self.max_length, self.q_len[g[0]] + max(self.d_len[d] for d in g[1]))

        batches: list[ListBatch] = []
        size = self.lists_per_batch
        for start in range(0, len(groups), size * self.pool):
            chunk = sorted(groups[start : start + size * self.pool], key=length)
            for b in range(0, len(chunk), size):
                part = chunk[b : b + size]
                batches.append(ListBatch([g[0] for g in part], [g[1] for g in part]))
        rng.shuffle(batches)
        return batches


def default_layer_map(kept: Sequence[int] | None, student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher state each student state learns (see :func:`tamis.train.losses.hidden_mse`): for a
    student made of the teacher's layers ``kept``, its layer i matches the output of teacher layer
    ``kept[i]``; otherwise layers are spread evenly (student layer i -> teacher layer round(i * T / S))."""
    if kept is not None:
        if len(kept) != student_layers:
            raise ValueError(f"{len(kept)} kept layers for a {student_layers}-layer student")
        return [0, *(k + 1 for k in kept)]
    return [0, *(round((i + 1) * teacher_layers / student_layers) for i in range(student_layers))]


class ListStep:
    """Forward pass and loss of one :class:`ListBatch`: scores ``[B, L]`` from the cross-encoder, then a
    weighted sum of losses (:func:`tamis.train.losses.parse_loss_spec`) on labels and teacher scores.

    ``teacher_model`` (a frozen cross-encoder) is run on every batch: its logits are the teacher scores
    when no cached ``teacher`` table is given, and the ``hidden`` / ``cls`` losses match the student's hidden
    states (every token / the first) to its states ``layer_map`` (:func:`default_layer_map`)."""

    def __init__(self, ce: CrossEncoder, data: RerankData, loss: str, max_length: int,
                 teacher: dict[str, dict[str, float]] | None = None, temperature: float = 1.0,
                 pos_weight: float | None = None, teacher_model: CrossEncoder | None = None,
                 layer_map: Sequence[int] | None = None):
        self.ce = ce
        self.data = data
        self.terms = parse_loss_spec(loss)
        self.max_length = max_length
        self.teacher = teacher
        self.temperature = temperature
        self.pos_weight = pos_weight
        self.teacher_model = teacher_model
        self.uses_states = any(n in STATE_LOSSES for n, _ in self.terms)
        needs = [n for n, _ in self.terms if n in ("mse", "margin-mse", "kl")]
        if needs and teacher is None and teacher_model is None:
            raise ValueError(f"loss {loss!r} uses {needs} but no teacher scores were given")
        if self.uses_states:
            what = "/".join(n for n, _ in self.terms if n in STATE_LOSSES)
            if teacher_model is None:
                raise ValueError(f"loss {what!r} needs a teacher model (a cross-encoder) run beside the student")
            s_cfg, t_cfg = ce.model.cfg, teacher_model.model.cfg
            if s_cfg.hidden_size != t_cfg.hidden_size:
                raise ValueError(f"loss {what!r} needs equal widths: student {s_cfg.hidden_size}, "
                                 f"teacher {t_cfg.hidden_size}")
            self.layer_map = list(layer_map) if layer_map is not None else default_layer_map(
                None, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
            if len(self.layer_map) != s_cfg.num_hidden_layers + 1 or not all(
                    0 <= j <= t_cfg.num_hidden_layers for j in self.layer_map):
                raise ValueError(f"layer_map {self.layer_map} does not fit a {s_cfg.num_hidden_layers}-layer "
                                 f"student and a {t_cfg.num_hidden_layers}-layer teacher")
        if teacher_model is not None:
            teacher_model.model.eval().requires_grad_(False)

    def __call__(self, batch: ListBatch) -> StepOutput:
        q = [self.data.queries[qid] for qid, docs in zip(batch.qids, batch.docs) for _ in docs]
        d = [self.data.corpus[x] for docs in batch.docs for x in docs]
        enc = self.ce.tokenizer.encode_pairs(q, d, self.max_length, truncate=True)
        device = next(self.ce.model.parameters()).device
        padded = self.ce.tokenizer.pad(enc, device)
        b, n = len(batch.docs), len(batch.docs[0])
        if self.uses_states:
            logits, states = relevance_logits(self.ce.model, padded, return_states=True)
        else:
            logits, states = relevance_logits(self.ce.model, padded), []
        scores = logits.float().view(b, n)
        labels = torch.tensor([[self.data.qrels.get(qid, {}).get(x, 0) for x in docs]
                               for qid, docs in zip(batch.qids, batch.docs)], dtype=torch.float32, device=device)
        teacher = None
        if self.teacher is not None:
            teacher = torch.tensor([[self.teacher[qid][x] for x in docs] for qid, docs in zip(batch.qids, batch.docs)],
                                   dtype=torch.float32, device=device)
        t_states: list[torch.Tensor] = []
        if self.teacher_model is not None:
            with torch.no_grad():
                t_logits, t_states = relevance_logits(self.teacher_model.model, padded, return_states=True)
            if teacher is None:
                teacher = t_logits.float().view(b, n)
        total = scores.new_zeros(())
        parts = {}
        for name, weight in self.terms:
            if name == "hidden":
                value = hidden_mse(states, t_states, self.layer_map, padded.attention_mask)
            elif name == "cls":
                value = cls_distance(states, t_states, self.layer_map)
            else:
                value = compute(name, scores, labels, teacher, None, self.temperature, self.pos_weight)
            parts[f"loss_{name}"] = float(value.detach())
            total = total + weight * value
        return StepOutput(total, b * n, parts if len(self.terms) > 1 else {})


# ------------------------------------------------------------------------------------ evaluation


def rerank_metrics(reranker: Any, data: RerankData, run: Run, qrels: Qrels | None = None,
                   k_values: Sequence[int] = (10,), show_progress: bool = False) -> dict[str, float]:
    """Rerank each query's candidates in ``run`` with ``reranker`` and return nDCG@k / MRR@k / Hit@k
    (the project's metrics) against ``qrels`` (default: the data's labels)."""
    from tqdm.auto import tqdm

    qrels = qrels if qrels is not None else {q: data.qrels[q] for q in run if q in data.qrels}
    reranked: Run = {}
    for qid, cands in tqdm(run.items(), desc="dev", unit="query", disable=not show_progress):
        ids = list(cands)
        if not ids:
            continue
        texts = [data.corpus[d] for d in ids]
        if hasattr(reranker, "logits"):
            scores = reranker.logits(data.queries[qid], texts)[0]
        else:
            res = reranker.rerank(data.queries[qid], texts, return_documents=False)
            scores = np.empty(len(ids), dtype=np.float32)
            for r in res:
                scores[r.index] = r.relevance_score
        reranked[qid] = {d: float(s) for d, s in zip(ids, scores)}
    m = compute_metrics({q: r for q, r in qrels.items() if q in reranked}, reranked, k_values=list(k_values))
    out = {}
    for k in k_values:
        for name in (f"nDCG@{k}", f"MRR@{k}", f"Hit@{k}"):
            if name in m.mean:
                out[name] = float(m.mean[name])
    return out


# ------------------------------------------------------------------------------------ saving


def save_cross_encoder(
    ce: CrossEncoder,
    out_dir: str | Path,
    max_length: int | None = None,
    dtype: torch.dtype = torch.float32,
    card: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write the Hugging Face ``*ForSequenceClassification`` layout: config.json, model.safetensors
    (``dtype``; the config keeps float32 so loaders up-cast), tokenizer files (fixed padding and
    truncation removed, ``model_max_length`` = ``max_length``) and a README model card."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = ce.model.cfg
    config = {k: v for k, v in ce.source_config.items() if not k.startswith("_")}
    model_type = config.get("model_type", "bert")
    config.update(
        architectures=[_ARCHITECTURES.get(model_type, "BertForSequenceClassification")],
        num_hidden_layers=cfg.num_hidden_layers,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        torch_dtype="float32",
        sentence_transformers={"activation_fn": "torch.nn.modules.activation.Sigmoid"},
    )
    config.pop("dtype", None)
    config.update(extra_config or {})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in bert.hf_state_dict(ce.model).items()}
    save_file({k: v.cpu() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(ce.source_dir, tmp, max_length)
    if card:
        (tmp / "README.md").write_text(card)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}


def freeze_embeddings(ce: CrossEncoder, which: str = "word") -> int:
    """Freeze the word embeddings (``"word"``) or all embeddings (``"all"``); returns frozen parameters."""
    emb = ce.model.encoder_model.embeddings
    targets = [emb.word_embeddings] if which == "word" else [emb]
    n = 0
    for mod in targets:
        for p in mod.parameters():
            p.requires_grad_(False)
            n += p.numel()
    return n


def teacher_table(lists: Sequence[tuple[str, Sequence[str]]], scores: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for (qid, docs), s in zip(lists, scores):
        row = table.setdefault(qid, {})
        for d, v in zip(docs, s):
            if not math.isfinite(float(v)):
                raise ValueError(f"teacher score for ({qid}, {d}) is not finite")
            row[d] = float(v)
    return table
