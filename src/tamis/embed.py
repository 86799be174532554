"""Embedder: tasks and prompts, adapters, pooling, Matryoshka, normalisation, output types, late chunking.

>>> emb = Embedder()                       # bundled all-MiniLM-L6-v2
>>> emb.embed(["a text", "another"]).shape
(2, 384)

Layers: ``tokenize`` (task prefix, truncation policy) -> ``forward`` (one batch through the model,
pooled, float32; BERT-family models run it packed, without padding: see :class:`tamis.models.packed.Packing`) -> ``finalize`` (Matryoshka cut, L2, output encoding). ``embed`` plans
length-sorted token-budget batches over them; the server calls the three layers itself to batch
across requests.
"""

from __future__ import annotations

import base64
import bisect
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tamis.batching import DEFAULT_MAX_BATCH_SIZE, default_token_budget, plan_batches
from tamis.errors import InvalidInputError, UnknownTaskError
from tamis.hardware import configure_threads, resolve_precision, tokenize_beside_model
from tamis.models import detect_family
from tamis.models.loading import (
    load_config,
    model_name,
    read_json,
    resolve_device,
    resolve_model_dir,
)
from tamis.tokenize import Encoded, Tokenizer, pack

logger = logging.getLogger("tamis")

EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary", "int8", "uint8")
DEFAULT_LATE_CHUNK_OVERLAP = 512
TOKENIZE_SLAB = 4096  # texts tokenized at a time in one embed() call (README "Speed")
# LoRA targets of a fresh task adapter on a BERT-family encoder: every Linear of every layer (attention
# q/k/v/output, MLP in/out; JinaBERT's gated MLP), not the pooler (unused by embeddings)
DEFAULT_ADAPTER_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                           "output.dense", "mlp.gated_layers", "mlp.wo")
ADAPTERS_FILE = "adapters.json"  # in a model directory: {"task": "adapter directory (relative or absolute)"}
JINABERT_MAX_LENGTH = 8192
_SENTENCE_END = re.compile(r"[.!?。！？]+[\"'”’)\]]*(?=\s|$)")


class TruncationWarning(UserWarning):
    """Some inputs were longer than the model's limit and lost their tail."""


@dataclass
class EmbedResult:
    embeddings: Any  # np.ndarray, list[str] (base64) or dict of these (several embedding types)
    token_counts: list[int]  # tokens fed to the model per input (after truncation)
    truncated: list[int] = field(default_factory=list)  # indices of inputs that were cut


@dataclass
class Chunk:
    text: str
    start: int  # character span in the document: document[start:end] == text
    end: int
    embedding: Any
    n_tokens: int = 0


def _st_normalizes(model_dir: Path) -> bool:
    """Whether the model's sentence-transformers pipeline (``modules.json``) ends in a Normalize module."""
    return any(str(m.get("type", "")).endswith("Normalize") for m in read_json(model_dir / "modules.json") or [])


def _pooling_mode(model_dir: Path, config: dict[str, Any]) -> str:
    modules = read_json(model_dir / "modules.json") or []
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            pc = read_json(model_dir / m.get("path", "1_Pooling") / "config.json") or {}
            for key, mode in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_lasttoken", "last"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_tokens", "mean"),
            ):
                if pc.get(key):
                    return mode
    pooler = config.get("emb_pooler")
    if pooler in ("cls", "mean"):
        return pooler
    return "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states [B, L, H] over ``mask`` [B, L] in float32."""
    hidden = hidden.float()
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(dim=1)
    if mode == "last":
        idx = mask.long().sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0]), idx]
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


def pool_packed(hidden: torch.Tensor, lengths: Sequence[int], mode: str) -> torch.Tensor:
    """Pool packed token states [T, H] (sequence ``s`` has ``lengths[s]`` consecutive rows) in float32."""
    hidden = hidden.float()
    n = torch.tensor(lengths, dtype=torch.long, device=hidden.device)
    ends = torch.cumsum(n, 0)
    if mode == "cls":
        return hidden[ends - n]
    if mode == "last":
        return hidden[ends - 1]
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), n)
    out = hidden.new_zeros(len(lengths), hidden.shape[1])
    if mode == "max":
        return out.scatter_reduce_(0, seg[:, None].expand_as(hidden), hidden, "amax", include_self=False)
    return out.index_add_(0, seg, hidden) / n[:, None].to(hidden.dtype)


def encode_output(x: np.ndarray, embedding_type: str | Sequence[str]) -> Any:
    """Encode float vectors as ``float`` / ``base64`` / ``binary`` / ``ubinary`` / ``int8`` / ``uint8`` (or several:
    a dict).

    ``int8`` scales each vector so its largest absolute component is 127 and rounds (the direction, hence cosine
    similarity, is kept up to rounding); ``uint8`` is that plus 128 (Cohere's ``uint8``). ``binary`` is the packed
    sign bits minus 128, as sentence-transformers' ``quantize_embeddings`` and Cohere's ``binary``."""
    if not isinstance(embedding_type, str):
        types = list(embedding_type)
        if not types:
            raise InvalidInputError("embedding_type list is empty")
        return {t: encode_output(x, t) for t in dict.fromkeys(types)}
    if embedding_type == "float":
        return x
    if embedding_type == "base64":
        le = x.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in le]
    if embedding_type == "ubinary":
        return np.packbits(x > 0, axis=-1)
    if embedding_type == "binary":
        return (np.packbits(x > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    if embedding_type in ("int8", "uint8"):
        peak = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12)
        q = np.clip(np.rint(x / peak * 127.0), -127, 127).astype(np.int16)
        return q.astype(np.int8) if embedding_type == "int8" else (q + 128).astype(np.uint8)
    raise InvalidInputError(f"unknown embedding_type {embedding_type!r}; use one of {list(EMBEDDING_TYPES)}")


class Embedder:
    """A text embedding model: BERT-family, JinaBERT (jina-embeddings-v2) or jina-embeddings-v3.

    Args:
        model: local directory, Hugging Face id (``org/name`` or ``org/name@revision``: the Hugging Face
            cache first, then a download unless offline; see :func:`tamis.models.loading.resolve_model_dir`),
            or None / "default" for the bundled all-MiniLM-L6-v2.
        device: torch device ("cpu", "cuda", ...).
        dtype: "auto" (default: bfloat16 on CPUs with native bf16 and on GPUs, float32 elsewhere; see
            :mod:`tamis.hardware`), "float32", "bfloat16", "float16", or "int8" (dynamic int8 Linear
            layers on CPU, BERT family only; below the bf16 quality bar, never chosen by "auto").
        max_tokens_per_batch: token budget of one padded batch (rows x longest row); default 4096 on
            CPU, 16384 on accelerators (see :func:`tamis.batching.default_token_budget`).
        max_batch_size: most rows in one batch.
        max_length: override the model's input limit in tokens (never above what the model declares
            for absolute-position models).
        adapters: task LoRA adapters for a BERT-family model, ``{"task": directory}`` in peft's layout
            (``adapter_config.json`` + ``adapter_model.safetensors``); ``embed(..., task="task")`` then
            runs that adapter, and a batch may mix tasks row by row (as jina-embeddings-v3's). Adapters
            listed in the model directory's ``adapters.json`` load too. Batches with an adapter task run
            padded (the packed fast path serves rows without one); not with ``dtype="int8"``.
        compile: ``"auto"`` (default), True or False: ``torch.compile`` the packed forward (BERT family;
            inductor, dynamic shapes, frozen weights on CPU), warmed up in the constructor
            (``compile_seconds``) so no request pays for it. ``"auto"`` compiles where it was measured to
            pay, bf16 on a CPU with native bf16 (see :func:`tamis.hardware.auto_compile`; the choice and why
            show in ``repr``); ``TAMIS_COMPILE=0`` turns that off. The compiled forward keeps the weights it
            was compiled with (inference only).
        revision: branch, tag or commit of a Hub id (or ``org/name@revision``).
        local_files_only: True: the Hugging Face cache only, never the network (default: ``HF_HUB_OFFLINE``).
        show_progress: download progress bars on stderr.
        trainable: the model's weights will be trained in place (``tamis.train``): no inference-only copies of
            them (the fused query/key/value projections, a compiled forward), so inference after a training
            step sees the new weights.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        max_tokens_per_batch: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_length: int | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        compile: bool | str = "auto",
        revision: str | None = None,
        local_files_only: bool | None = None,
        show_progress: bool = True,
        trainable: bool = False,
    ):
        self.model_dir = resolve_model_dir(model, revision, local_files_only=local_files_only,
                                           show_progress=show_progress)
        self.config = load_config(self.model_dir)
        self.family = detect_family(self.config)
        self.device = resolve_device(device)
        self.precision = resolve_precision(dtype, self.device)
        self.dtype = self.precision.dtype
        if self.device.type == "cpu":
            configure_threads()
        self.packed = False  # set below for the BERT family: forward() runs unpadded token sequences
        self.compile_seconds: float | None = None
        self.compile_reason = "not a packed model"
        self.name = model_name(model)
        self.max_tokens_per_batch = max_tokens_per_batch or default_token_budget(self.device)
        self.max_batch_size = max_batch_size
        self.tokenizer = Tokenizer.from_dir(self.model_dir, self.config)
        self.pooling = _pooling_mode(self.model_dir, self.config)
        self.st_normalize = _st_normalizes(self.model_dir)  # what SentenceTransformer(...).encode does anyway
        self._prefixes: dict[str, str] = {}
        self._adapters: dict[str, int] = {}  # task -> adapter index in the model's LoRA stacks
        self._n_adapters = 0
        self.adapter_dirs: dict[str, Path] = {}
        arch_limit: int | None
        if self.family == "xlmr-lora":
            from tamis.models.xlmr import XLMRobertaLoRA

            if self.precision.int8:
                raise InvalidInputError("dtype='int8' is available for BERT-family models only")
            self.model = XLMRobertaLoRA.from_pretrained(self.model_dir, device=self.device, dtype=self.dtype)
            names = list(self.config.get("lora_adaptations") or [])
            self._adapters = {t: i for i, t in enumerate(names)}
            self._n_adapters = len(names)
            instructions = self.config.get("task_instructions") or {}
            self._prefixes = {t: instructions.get(t, "") or "" for t in names}
            arch_limit = None
        elif self.family == "bert":
            from tamis.models.runtime import load_for_inference

            if trainable and self.precision.int8:
                raise InvalidInputError("trainable=True needs a float dtype, not 'int8'")
            self.model, self.compile_seconds, self.compile_reason = load_for_inference(
                self.model_dir, self.device, self.precision, classification=False, compile=compile, frozen=not trainable)
            self.packed = True
            arch_limit = self.model.cfg.max_length
            st = read_json(self.model_dir / "config_sentence_transformers.json") or {}
            self._prefixes = {k: v or "" for k, v in (st.get("prompts") or {}).items()}
        else:
            raise InvalidInputError(
                f"{self.model_dir} is a {self.family} model, not an embedding model; load it with tamis.Reranker"
            )
        if compile is True and not self.packed:
            raise InvalidInputError(f"compile=True is available for BERT-family models, not {self.family}")
        self.dimension = int(self.config["hidden_size"])
        self.max_length = self._limit(arch_limit, max_length)
        listed = read_json(self.model_dir / ADAPTERS_FILE) or {}
        wanted = {**{t: self.model_dir / d for t, d in listed.items()}, **dict(adapters or {})}
        if wanted and self.family != "bert":
            raise InvalidInputError(
                f"{self.name}: extra adapters load on BERT-family models; jina-embeddings-v3 keeps its task "
                "adapters stacked in the checkpoint (train one into it with `tamis train adapter`)")
        for task, directory in wanted.items():
            self.add_adapter(task, directory)

    # ------------------------------------------------------------------ task adapters (BERT family)
    def add_adapter(
        self, task: str, directory: str | Path | None = None, *, target_modules: Sequence[str] | None = None,
        r: int = 8, alpha: float = 16.0, seed: int = 0,
    ) -> int:
        """Add task adapter ``task``: loaded from a peft-layout ``directory``, or fresh (LoRA on
        ``target_modules``, rank ``r``, scale ``alpha / r``; B = 0, so it changes nothing until trained).
        Returns its index in the model's adapter stacks."""
        if self.family != "bert":
            raise InvalidInputError(f"{self.name} is a {self.family} model: its adapters are fixed by the checkpoint")
        if self.precision.int8:
            raise InvalidInputError("task adapters need a float dtype: dtype='int8' quantises the Linear layers they adapt")
        if not isinstance(task, str) or not task:
            raise InvalidInputError(f"an adapter needs a non-empty task name, got {task!r}")
        if task in self._adapters:
            raise InvalidInputError(f"{self.name} already has an adapter for task {task!r}")
        from tamis.models import bert, lora

        cfg = self.model.cfg
        if directory is not None:
            index = lora.load_adapter(self.model, directory, task, lambda p: bert.module_path(cfg, p))
            self.adapter_dirs[task] = Path(directory)
        else:
            index = lora.add_adapter(self.model, task, list(target_modules or DEFAULT_ADAPTER_TARGETS), r, alpha, seed)
        self._adapters[task] = index
        self._n_adapters = len(lora.adapter_names(self.model))
        return index

    def save_adapter(self, task: str, directory: str | Path) -> Path:
        """Write task adapter ``task`` in peft's layout (module paths of the official checkpoint)."""
        if self.family != "bert" or task not in self._adapters:
            raise InvalidInputError(f"no BERT-family task adapter {task!r}; adapters: {list(self._adapters)}")
        from tamis.models import bert, lora

        cfg = self.model.cfg
        return lora.save_adapter(self.model, task, directory, base_model=self.name,
                                 path_to_official=lambda p: bert.official_module_path(cfg, p))

    def _limit(self, arch_limit: int | None, override: int | None) -> int:
        sbert = read_json(self.model_dir / "sentence_bert_config.json") or {}
        if self.config.get("position_embedding_type") == "alibi" and not sbert:
            # JinaBERT's own encode() tokenizes with max_length=8192 whatever the tokenizer config says
            # (ALiBi has no position table); the jina-embeddings-v2-tiny fixture confirms this.
            known = [JINABERT_MAX_LENGTH]
        else:
            candidates = [arch_limit, self.tokenizer.model_max_length, sbert.get("max_seq_length")]
            known = [int(c) for c in candidates if c]
        limit = min(known) if known else int(self.config.get("max_position_embeddings", 512))
        if override is not None:
            if override <= 0:
                raise ValueError("max_length must be positive")
            limit = min(override, arch_limit) if arch_limit else override
        return limit

    # ------------------------------------------------------------------ properties
    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys([*self._prefixes, *self._adapters]))

    @property
    def query_task(self) -> str | None:
        for t in ("retrieval.query", "query"):
            if t in self.tasks:
                return t
        return None

    @property
    def passage_task(self) -> str | None:
        for t in ("retrieval.passage", "passage", "document"):
            if t in self.tasks:
                return t
        return None

    def __repr__(self) -> str:
        return (
            f"Embedder(name={self.name!r}, family={self.family!r}, dimension={self.dimension}, "
            f"max_length={self.max_length}, pooling={self.pooling!r}, tasks={self.tasks}, "
            f"device={str(self.device)!r}, dtype={self.precision.name!r} ({self.precision.requested}: "
            f"{self.precision.reason}), packed={self.packed}, compiled={self.compile_seconds is not None} ({self.compile_reason}))"
        )

    def check_task(self, task: str | None) -> None:
        if task is not None and task not in self.tasks:
            raise UnknownTaskError(task, self.tasks)

    def prefix(self, task: str | None) -> str:
        self.check_task(task)
        return self._prefixes.get(task, "") if task else ""

    # ------------------------------------------------------------------ layer 1: tokenize
    @staticmethod
    def _as_texts(texts: str | Sequence[Any]) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) and not hasattr(texts, "__iter__"):
            raise InvalidInputError(f"texts must be a string or a list of strings, not {type(texts).__name__}")
        out = []
        for i, t in enumerate(texts):
            if isinstance(t, dict) and isinstance(t.get("text"), str):
                t = t["text"]
            if not isinstance(t, str):
                raise InvalidInputError(f"input {i} is a {type(t).__name__}, expected a string")
            if not t.strip():  # the server's 400 and the CLI's skipped blank lines: one rule
                kind = "an empty string" if t == "" else "only whitespace"
                raise InvalidInputError(f"input {i} is {kind}: every input must contain text (a blank input "
                                        "embeds to the same vector as nothing)")
            out.append(t)
        return out

    def tokenize(self, texts: str | Sequence[str], task: str | None = None, truncate: bool = True,
                 side: str = "right") -> list[Encoded]:
        """Prefix (task instruction / prompt) and tokenize; over-long inputs are cut (at the end, or at the start
        with ``side="left"``, keeping the prefix) or raise."""
        prefix = self.prefix(task)
        items = self._as_texts(texts)
        return self.tokenizer.encode(items, self.max_length, truncate=truncate, side=side, prefix=prefix)

    def count_tokens(self, texts: str | Sequence[str], task: str | None = None) -> list[int]:
        prefix = self.prefix(task)
        return self.tokenizer.count_tokens([prefix + t for t in self._as_texts(texts)])

    # ------------------------------------------------------------------ layer 2: forward
    def _adapter_ids(self, tasks: Sequence[str | None], n: int) -> torch.Tensor | None:
        if not self._adapters:
            return None
        ids = [self._adapters.get(t, -1) if t is not None else -1 for t in tasks]
        if len(ids) != n:
            raise ValueError("one task per row is required")
        if all(i == -1 for i in ids):
            return None
        return torch.tensor(ids, dtype=torch.long)  # host-side: the model routes rows without a device sync

    @torch.inference_mode()
    def token_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
        tasks: Sequence[str | None],
    ) -> torch.Tensor:
        """Last hidden states [B, L, H] of one padded batch."""
        return self.run_model(input_ids, attention_mask, token_type_ids, tasks)

    def run_model(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
        tasks: Sequence[str | None],
    ) -> torch.Tensor:
        """:meth:`token_states` with autograd left as the caller set it (training): each row through its
        task's adapter (rows without one, and every row of a batch with no adapter task, cost nothing)."""
        for t in tasks:
            self.check_task(t)
        adapter_ids = self._adapter_ids(tasks, input_ids.shape[0])
        if self.family == "xlmr-lora":
            return self.model(input_ids, attention_mask, adapter_ids=adapter_ids)
        if adapter_ids is None:
            return self.model(input_ids, attention_mask, token_type_ids)
        from tamis.models.lora import route_adapters, use_route

        route = route_adapters(adapter_ids, input_ids.shape[0], self._n_adapters, self.device)
        with use_route(route):
            return self.model(input_ids, attention_mask, token_type_ids)

    def runs_packed(self, tasks: Sequence[str | None]) -> bool:
        """Whether :meth:`forward` computes rows with these tasks packed (no padding token computed): a
        BERT-family model and no task-adapter row. The server plans such batches on real tokens."""
        return self.packed and self._adapter_ids(list(tasks), len(tasks)) is None

    def forward(self, encodings: Sequence[Encoded], tasks: Sequence[str | None] | str | None = None) -> torch.Tensor:
        """Run one batch; returns pooled float32 vectors [n, dimension] (not normalised).

        BERT-family models run packed (no padding; rows are sorted by length inside, results come back
        in the order given); ``self.packed = False`` runs the padded batch instead (same numbers to float
        rounding), as do batches with a task adapter row (the LoRA routing is per padded row)."""
        if isinstance(tasks, str) or tasks is None:
            tasks = [tasks] * len(encodings)
        if self.runs_packed(tasks):
            return self._forward_packed(encodings, tasks)
        batch = self.tokenizer.pad(encodings, self.device)
        hidden = self.token_states(batch.input_ids, batch.attention_mask, batch.token_type_ids, tasks)
        return pool(hidden, batch.attention_mask, self.pooling).cpu()

    @torch.inference_mode()
    def _forward_packed(self, encodings: Sequence[Encoded], tasks: Sequence[str | None]) -> torch.Tensor:
        from tamis.models.packed import Packing

        for t in tasks:
            self.check_task(t)
        if not encodings:
            return torch.empty(0, self.dimension, dtype=torch.float32)
        order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i]))
        batch = pack([encodings[i] for i in order], self.device)
        hidden = self.model.forward_packed(batch.input_ids, batch.token_type_ids, Packing(batch.lengths, self.device))
        pooled = pool_packed(hidden, batch.lengths, self.pooling).cpu()
        out = torch.empty_like(pooled)
        out[order] = pooled
        return out

    # ------------------------------------------------------------------ layer 3: finalize
    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        if isinstance(dimensions, bool) or not isinstance(dimensions, int | np.integer):
            raise InvalidInputError(f"dimensions must be an integer, not {dimensions!r}")
        if not 1 <= dimensions <= self.dimension:
            raise InvalidInputError(
                f"dimensions={dimensions} is out of range: this model gives 1..{self.dimension} dimensions"
            )

    @staticmethod
    def check_embedding_type(embedding_type: str | Sequence[str]) -> None:
        types = [embedding_type] if isinstance(embedding_type, str) else list(embedding_type)
        bad = [t for t in types if t not in EMBEDDING_TYPES]
        if bad or not types:
            raise InvalidInputError(f"unknown embedding_type {bad or types}; use one of {list(EMBEDDING_TYPES)}")

    def finalize(
        self,
        pooled: torch.Tensor | np.ndarray,
        dimensions: int | None = None,
        normalized: bool = True,
        embedding_type: str | Sequence[str] = "float",
    ) -> Any:
        """Matryoshka cut, then L2 normalisation (when ``normalized``), then the output encoding."""
        self.check_dimensions(dimensions)
        self.check_embedding_type(embedding_type)
        x = pooled.detach().float().cpu().numpy() if isinstance(pooled, torch.Tensor) else np.asarray(pooled, np.float32)
        if dimensions is not None:
            x = x[:, :dimensions]
        if normalized:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.maximum(norms, 1e-12)
        return encode_output(np.ascontiguousarray(x, dtype=np.float32), embedding_type)

    # ------------------------------------------------------------------ public API
    def embed(
        self,
        texts: str | Sequence[str],
        task: str | None = None,
        dimensions: int | None = None,
        normalized: bool = True,
        embedding_type: str | Sequence[str] = "float",
        truncate: bool = True,
        late_chunking: bool = False,
        show_progress: bool | None = None,
    ) -> Any:
        """Embed texts. Returns float32 [n, d] (or base64 strings / packed bits / a dict of several).

        ``truncate=True`` cuts inputs at ``max_length`` and warns with their indices
        (:class:`TruncationWarning`); ``False`` raises :class:`~tamis.errors.InputTooLongError`.
        ``late_chunking=True`` treats ``texts`` as consecutive chunks of one document (see
        :meth:`late_chunk`): one forward pass, each vector pooled over its own tokens.
        """
        return self.embed_result(
            texts, task, dimensions, normalized, embedding_type, truncate, late_chunking, show_progress
        ).embeddings

    def encode(
        self,
        sentences: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
    ) -> Any:
        """sentence-transformers' ``SentenceTransformer.encode``, same arguments and return shapes, so code moves
        over by changing the import: one string gives a vector [d], a list a matrix [n, d]; vectors are normalised
        when ``normalize_embeddings`` is true or the model's ``modules.json`` ends in a Normalize module (as there;
        all-MiniLM-L6-v2's does); ``convert_to_tensor`` gives a tensor,
        ``convert_to_numpy=False`` a list of tensors. ``prompt_name`` is a task (prompt) of this model, ``prompt``
        text put before each input, ``truncate_dim`` the Matryoshka cut, ``precision`` ``float32``, ``binary`` or
        ``ubinary`` (sentence-transformers' ``int8`` / ``uint8`` calibrate ranges on the batch: use
        ``embed(embedding_type="int8")`` for tamis's per-vector scaling). Over-long inputs are cut, as there."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer (got {batch_size!r})")
        if output_value != "sentence_embedding":
            raise InvalidInputError(f"output_value={output_value!r} is not supported: only 'sentence_embedding'")
        if precision not in ("float32", "binary", "ubinary"):
            raise InvalidInputError(f"precision={precision!r} is not supported by encode(): use float32, binary or "
                                    "ubinary (or embed(embedding_type='int8' / 'uint8'))")
        if device is not None and torch.device(device) != torch.device(self.device):
            raise InvalidInputError(f"device={device!r}: this model is on {self.device}; load it there with "
                                    "Embedder(..., device=...)")
        if prompt_name is not None and prompt is not None:
            raise InvalidInputError("give prompt_name or prompt, not both")
        single = isinstance(sentences, str)
        items = self._as_texts(sentences)
        if prompt:
            items = [prompt + t for t in items]
        self.check_dimensions(truncate_dim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)  # sentence-transformers cuts silently too
            # its order: the model's own pipeline (Normalize included) at full width, then the cut, then
            # normalize_embeddings, then the precision
            res = self.embed_result(items, task=prompt_name, normalized=self.st_normalize,
                                    show_progress=bool(show_progress_bar), batch_size=batch_size)
        x = res.embeddings[:, :truncate_dim] if truncate_dim is not None else res.embeddings
        if normalize_embeddings:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        x = encode_output(np.ascontiguousarray(x, dtype=np.float32), "float" if precision == "float32" else precision)
        out = np.asarray(x)
        if convert_to_tensor:
            t = torch.from_numpy(out)
            return t[0] if single else t
        if not convert_to_numpy:
            rows = [torch.from_numpy(r) for r in out]
            return rows[0] if single else rows
        return out[0] if single else out

    def embed_result(
        self,
        texts: str | Sequence[str],
        task: str | None = None,
        dimensions: int | None = None,
        normalized: bool = True,
        embedding_type: str | Sequence[str] = "float",
        truncate: bool = True,
        late_chunking: bool = False,
        show_progress: bool | None = None,
        *,
        batch_size: int | None = None,
    ) -> EmbedResult:
        """Like :meth:`embed`, also returning token counts and the indices of truncated inputs. ``batch_size``
        caps the rows per model call (batches are planned by token budget; results do not depend on it)."""
        self.check_task(task)
        self.check_dimensions(dimensions)
        self.check_embedding_type(embedding_type)
        items = self._as_texts(texts)
        if late_chunking:
            text, spans = join_chunks(items)
            pooled, counts = self._late_pooled(text, spans, task)
            return EmbedResult(self.finalize(pooled, dimensions, normalized, embedding_type), counts)
        if show_progress is None:
            show_progress = len(items) >= 512
        # With truncate=False every input is tokenized first, so an over-long one fails before any model work.
        slab = TOKENIZE_SLAB if truncate else max(1, len(items))
        with tqdm(total=len(items), disable=not show_progress, desc="embed", unit="text", file=sys.stderr) as bar:
            parts = list(self._pooled_slabs(items, task, truncate, slab, bar, batch_size))
        pooled = torch.cat([p for _, p, _ in parts]) if parts else torch.empty(0, self.dimension)
        encodings = [e for _, _, part in parts for e in part]
        truncated = [i for i, e in enumerate(encodings) if e.truncated]
        if truncated:
            shown = truncated[:20]
            msg = (
                f"{len(truncated)} of {len(items)} inputs were longer than {self.max_length} tokens and were "
                f"truncated: indices {shown}{' ...' if len(truncated) > 20 else ''}"
            )
            warnings.warn(msg, TruncationWarning, stacklevel=3)
            logger.info(msg)
        return EmbedResult(
            self.finalize(pooled, dimensions, normalized, embedding_type),
            [len(e) for e in encodings],
            truncated,
        )

    def embed_chunks(
        self,
        texts: Sequence[str],
        chunk_size: int = TOKENIZE_SLAB,
        task: str | None = None,
        dimensions: int | None = None,
        normalized: bool = True,
        embedding_type: str | Sequence[str] = "float",
        truncate: bool = True,
    ) -> Iterator[tuple[int, EmbedResult]]:
        """Embed ``texts`` ``chunk_size`` at a time, yielding ``(start, result)`` in input order, where ``result``
        holds ``texts[start : start + chunk_size]``: its ``truncated`` lists positions within the chunk (no
        warning is raised; the caller reports them). For writing a large input as it goes: the next chunk is
        tokenized while the model runs this one where that pays (:func:`~tamis.hardware.tokenize_beside_model`)."""
        self.check_task(task)
        self.check_dimensions(dimensions)
        self.check_embedding_type(embedding_type)
        if chunk_size <= 0:
            raise InvalidInputError(f"chunk_size must be positive (got {chunk_size})")
        for start, pooled, encodings in self._pooled_slabs(self._as_texts(texts), task, truncate, chunk_size):
            yield start, EmbedResult(
                self.finalize(pooled, dimensions, normalized, embedding_type),
                [len(e) for e in encodings],
                [i for i, e in enumerate(encodings) if e.truncated],
            )

    def _pooled_slabs(
        self, items: list[str], task: str | None, truncate: bool, slab: int, bar: tqdm | None = None,
        max_batch_size: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor, list[Encoded]]]:
        """``(start, pooled float32 [n, dim], encodings)`` per slab of ``slab`` texts, batches planned within a
        slab; the next slab is tokenized on a helper thread while the model runs this one where that pays."""
        starts = range(0, len(items), slab)

        def tokenize_slab(k: int) -> list[Encoded]:
            return self.tokenize(items[starts[k] : starts[k] + slab], task, truncate)

        helper = ThreadPoolExecutor(1, "tamis-tokenize") if len(starts) > 1 and tokenize_beside_model(
            self.device) else None
        upcoming: Future[list[Encoded]] | None = None
        try:
            for k, start in enumerate(starts):
                current = upcoming.result() if upcoming is not None else tokenize_slab(k)
                upcoming = helper.submit(tokenize_slab, k + 1) if helper and k + 1 < len(starts) else None
                pooled = torch.empty(len(current), self.dimension, dtype=torch.float32)
                for idx in plan_batches([len(e) for e in current], self.max_tokens_per_batch,
                                        max_batch_size or self.max_batch_size):
                    pooled[idx] = self.forward([current[i] for i in idx], task)
                    if bar is not None:
                        bar.update(len(idx))
                yield start, pooled, current
        finally:
            if helper is not None:
                helper.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ late chunking
    def _late_pooled(
        self, text: str, spans: Sequence[tuple[int, int]], task: str | None, overlap: int = DEFAULT_LATE_CHUNK_OVERLAP
    ) -> tuple[torch.Tensor, list[int]]:
        """Token states of the whole text (windowed when too long), mean-pooled per character span."""
        prefix = self.prefix(task)
        enc = self.tokenizer.encode([prefix + text], max_length=None)[0]
        owner = assign_tokens(enc, spans, prefix + text, len(prefix))
        states = self._long_states(enc, task, overlap)
        index = torch.tensor(owner, dtype=torch.long)
        counts = torch.bincount(index, minlength=len(spans))
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise InvalidInputError(f"chunk {empty[0]} has no tokens (empty or whitespace only); remove it")
        sums = torch.zeros(len(spans), states.shape[1], dtype=torch.float32).index_add_(0, index, states)
        return sums / counts[:, None].float(), counts.tolist()

    @torch.inference_mode()
    def _long_states(self, enc: Encoded, task: str | None, overlap: int) -> torch.Tensor:
        """[n_tokens, H] float32 states for one sequence; overlapping windows beyond max_length."""
        ids = enc.ids
        width = self.max_length
        if len(ids) <= width:
            windows = [(0, len(ids))]
        else:
            overlap = min(max(overlap, 0), width // 2)
            step = width - overlap
            windows = [(s, min(s + width, len(ids))) for s in range(0, len(ids) - overlap, step)]
        parts = []
        for k, (s, e) in enumerate(windows):
            input_ids = torch.tensor([ids[s:e]], device=self.device)
            type_ids = torch.tensor([enc.type_ids[s:e]], device=self.device)
            mask = torch.ones_like(input_ids)
            h = self.token_states(input_ids, mask, type_ids, [task])[0].float().cpu()
            parts.append(h if k == 0 else h[overlap:])
        return torch.cat(parts)[: len(ids)]

    def late_chunk(
        self,
        document: str,
        strategy: str = "sentences",
        chunk_size: int | None = None,
        task: str | None = None,
        dimensions: int | None = None,
        normalized: bool = True,
        embedding_type: str | Sequence[str] = "float",
        overlap: int = DEFAULT_LATE_CHUNK_OVERLAP,
    ) -> list[Chunk]:
        """Split one document into chunks and embed them with late chunking.

        ``strategy="sentences"``: one sentence per chunk, or with ``chunk_size`` consecutive sentences
        packed up to ``chunk_size`` tokens. ``strategy="fixed"``: ``chunk_size`` tokens per chunk
        (default 256). Chunks tile the document exactly (``document[c.start:c.end] == c.text``; the
        whitespace after a sentence belongs to it). Documents longer than the model's context are
        embedded in overlapping windows of ``max_length`` tokens (``overlap`` tokens shared).
        """
        if not isinstance(document, str) or not document.strip():
            raise InvalidInputError("document must be a non-empty string")
        self.check_task(task)
        if strategy == "sentences":
            spans = sentence_spans(document)
            if chunk_size is not None:
                spans = self._pack_spans(document, spans, chunk_size)
        elif strategy == "fixed":
            spans = self._fixed_spans(document, chunk_size or 256)
        else:
            raise InvalidInputError(f"unknown chunking strategy {strategy!r}; use 'sentences' or 'fixed'")
        pooled, counts = self._late_pooled(document, spans, task, overlap)
        out = self.finalize(pooled, dimensions, normalized, embedding_type)
        chunks = []
        for j, (s, e) in enumerate(spans):
            vec = {k: v[j] for k, v in out.items()} if isinstance(out, dict) else out[j]
            chunks.append(Chunk(document[s:e], s, e, vec, counts[j]))
        return chunks

    def _fixed_spans(self, document: str, chunk_size: int) -> list[tuple[int, int]]:
        if chunk_size < 1:
            raise InvalidInputError("chunk_size must be at least 1 token")
        offsets = self.tokenizer.raw([document])[0].offsets
        starts = [0] + [offsets[i][0] for i in range(chunk_size, len(offsets), chunk_size)]
        return [(s, e) for s, e in zip(starts, starts[1:] + [len(document)]) if e > s]

    def _pack_spans(self, document: str, spans: list[tuple[int, int]], chunk_size: int) -> list[tuple[int, int]]:
        if chunk_size < 1:
            raise InvalidInputError("chunk_size must be at least 1 token")
        sizes = self.tokenizer.count_tokens([document[s:e] for s, e in spans], add_special_tokens=False)
        packed: list[tuple[int, int]] = []
        cur_start, cur_size = spans[0][0], 0
        for (s, _), n in zip(spans, sizes):
            if cur_size and cur_size + n > chunk_size:
                packed.append((cur_start, s))
                cur_start, cur_size = s, 0
            cur_size += n
        packed.append((cur_start, spans[-1][1]))
        return packed


def sentence_spans(document: str) -> list[tuple[int, int]]:
    """Character spans tiling ``document``, one per sentence (end punctuation + following whitespace)."""
    ends = []
    for m in _SENTENCE_END.finditer(document):
        e = m.end()
        while e < len(document) and document[e].isspace():
            e += 1
        ends.append(e)
    if not ends or ends[-1] < len(document):
        ends.append(len(document))
    spans, start = [], 0
    for e in ends:
        if e > start:
            spans.append((start, e))
            start = e
    # merge a trailing whitespace-only span into its predecessor
    if len(spans) > 1 and not document[spans[-1][0] : spans[-1][1]].strip():
        spans[-2] = (spans[-2][0], spans[-1][1])
        spans.pop()
    return spans


def join_chunks(chunks: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Concatenate consecutive chunks of one text, adding a space only where neither side has whitespace."""
    if not chunks:
        raise InvalidInputError("late chunking needs at least one chunk")
    parts: list[str] = []
    spans = []
    pos = 0
    for i, c in enumerate(chunks):
        if i and c and parts[-1] and not parts[-1][-1].isspace() and not c[0].isspace():
            parts.append(" ")
            pos += 1
        spans.append((pos, pos + len(c)))
        parts.append(c)
        pos += len(c)
    return "".join(parts), spans


def assign_tokens(enc: Encoded, spans: Sequence[tuple[int, int]], full_text: str, prefix_len: int) -> list[int]:
    """Chunk index of every token of ``enc`` (the encoding of ``full_text`` = prefix + document).

    A token belongs to the chunk holding its first non-space character. Instruction-prefix tokens
    and leading special tokens (``[CLS]``/``<s>``) go to the first chunk; trailing special tokens
    (``[SEP]``/``</s>``) to the last chunk, as in Jina's late-chunking reference.
    """
    starts = [s for s, _ in spans]
    last_chunk = len(spans) - 1
    owner: list[int] = []
    for (s, e), special in zip(enc.offsets, enc.special):
        if special:
            owner.append(0 if not any(o >= 0 for o in owner) else last_chunk)
            continue
        while s < e - 1 and full_text[s].isspace():
            s += 1
        if s < prefix_len:
            owner.append(0)
            continue
        s -= prefix_len
        j = max(bisect.bisect_right(starts, s) - 1, 0)
        if s >= spans[j][1] and j < last_chunk:  # starts in a separator inserted between chunks
            j += 1
        owner.append(j)
    return owner
