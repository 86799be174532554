"""Learned-sparse embeddings: SPLADE-family checkpoints (a BERT masked-LM head, ``log(1 + relu)``, max over tokens).

A SPLADE encoder (Formal et al., SIGIR 2021) gives every text a vocabulary-sized vector with a weight
``w_t = max_i log(1 + relu(logit_{i,t}))`` per term ``t`` over the text's tokens ``i``; most weights are zero, so a
vector is kept as ``(indices, values)``. The same weights as sentence-transformers' ``SparseEncoder``
(``MLMTransformer`` + ``SpladePooling("max")``), computed on tamis's packed BERT (no padding token computed) and
pooled in slices of tokens, so a batch never holds more than :data:`LOGIT_ROWS` rows of vocabulary logits.

Inference-free checkpoints (sentence-transformers' ``Router`` with a ``SparseStaticEmbedding`` query module, as
the opensearch-neural-sparse "doc-v*" models) encode queries without the model: each distinct query token gets
its learned static weight. tamis reads such a checkpoint's ``modules.json`` / ``router_config.json`` and does the
same for ``task="query"``.

>>> import tamis
>>> sp = tamis.SparseEmbedder("runs/tiny-reranker/models/splade-tiny")
>>> (v,) = sp.embed(["what is splade?"], top_k=64)
>>> v.indices, v.values                      # term ids ascending, float32 weights
>>> sp.decode(v, top_k=5)                    # [("sp", 2.48), ("##lad", 2.48), ...]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tamis.errors import InvalidInputError, UnsupportedModelError

# rows of [rows, vocab] logits computed at once (1024 x 30522 float32 = 125 MB)
LOGIT_ROWS = 1024
SPARSE_TASKS = ("query", "document")


@dataclass
class SparseEmbedding:
    """One sparse vector: term ids in ascending order and their (positive) weights.

    ``v["indices"]`` / ``v["values"]`` work as well as the attributes (the ``{indices, values}`` shape of the
    HTTP APIs); :meth:`to_dict` gives plain lists."""

    indices: np.ndarray  # int64, ascending
    values: np.ndarray  # float32, > 0

    def __getitem__(self, key: str) -> np.ndarray:
        if key in ("indices", "values"):
            return getattr(self, key)
        raise KeyError(key)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def keys(self) -> tuple[str, str]:
        return ("indices", "values")

    def to_dict(self) -> dict[str, list]:
        return {"indices": self.indices.tolist(), "values": self.values.tolist()}

    def dot(self, other: SparseEmbedding) -> float:
        """Dot product with another sparse vector (the SPLADE relevance score)."""
        _, ia, ib = np.intersect1d(self.indices, other.indices, assume_unique=True, return_indices=True)
        return float(np.dot(self.values[ia].astype(np.float64), other.values[ib].astype(np.float64)))

    def to_dense(self, dimension: int) -> np.ndarray:
        out = np.zeros(dimension, dtype=np.float32)
        out[self.indices] = self.values
        return out


def prune(indices: np.ndarray, values: np.ndarray, top_k: int | None = None, threshold: float = 0.0
          ) -> SparseEmbedding:
    """Keep weights above ``threshold`` and of those the ``top_k`` largest (ties: the lower term id), ids ascending."""
    keep = values > threshold
    indices, values = indices[keep], values[keep]
    if top_k is not None and len(values) > top_k:
        order = np.lexsort((indices, -values))[:top_k]
        order.sort()
        indices, values = indices[order], values[order]
    return SparseEmbedding(indices.astype(np.int64, copy=False), values.astype(np.float32, copy=False))


def check_pruning(top_k: int | None, threshold: float) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not np.isfinite(threshold) \
            or threshold < 0:
        raise InvalidInputError(f"threshold must be a finite number >= 0, got {threshold!r}")


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def _find_static_query_module(model_dir: Path) -> tuple[Path, Path] | None:
    """(query module dir, document module dir) of an inference-free sentence-transformers checkpoint, else None."""
    modules = _read_json(model_dir / "modules.json") or []
    for m in modules:
        if str(m.get("type", "")).endswith("Router"):
            router_dir = model_dir / m.get("path", "")
            cfg = _read_json(router_dir / "router_config.json") or {}
            structure = cfg.get("structure") or {}
            types = cfg.get("types") or {}
            q_names = structure.get("query") or []
            d_names = structure.get("document") or []
            if len(q_names) == 1 and str(types.get(q_names[0], "")).endswith("SparseStaticEmbedding") and d_names:
                return router_dir / q_names[0], router_dir / d_names[0]
    return None


def _logit_blocks(lengths: Sequence[int], rows: int) -> Iterator[tuple[tuple[int, int], list[tuple[int, int, bool]]]]:
    """Blocks of at most ``rows`` consecutive packed rows: ((first row, end row), [(sequence, its rows in the
    block, whether this is the sequence's first piece)]); a sequence longer than ``rows`` spans blocks."""
    block: list[tuple[int, int, bool]] = []
    start = pos = 0
    for seq, n in enumerate(lengths):
        done = 0
        while done < n:
            take = min(n - done, rows - (pos - start))
            block.append((seq, take, done == 0))
            pos += take
            done += take
            if pos - start == rows:
                yield (start, pos), block
                block, start = [], pos
    if block:
        yield (start, pos), block


class SparseEmbedder:
    """Sparse (SPLADE) embeddings of texts from a BertForMaskedLM checkpoint.

    Args:
        model: a local directory (``config.json`` with ``BertForMaskedLM``, ``model.safetensors``, ``tokenizer.json``)
            or a Hugging Face id resolved as :class:`tamis.Embedder` does (cache first, download unless offline); an
            inference-free sentence-transformers checkpoint (``Router``: ``SparseStaticEmbedding`` for queries, an
            MLM transformer for documents) is read from its modules' folders.
        device: torch device.
        max_length: input limit in tokens (default: the tokenizer's / position table's limit, 512 for BERT; what
            sentence-transformers uses).
        max_tokens_per_batch: tokens per forward pass (packed: no padding computed).
        name: the name reported (default: the directory's name).
    """

    kind = "splade"

    def __init__(
        self,
        model: str | os.PathLike[str] | None,
        *,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        max_tokens_per_batch: int = 8192,
        name: str | None = None,
        local_files_only: bool | None = None,
        show_progress: bool = False,
    ):
        from tamis.models import bert, detect_family
        from tamis.models.loading import load_config, resolve_model_dir
        from tamis.tokenize import Tokenizer

        if model is None or str(model) == "default":
            raise InvalidInputError("SparseEmbedder needs a SPLADE checkpoint (a BertForMaskedLM directory or Hub id)")
        local = Path(str(model)).expanduser()
        if local.is_dir() and (local / "modules.json").is_file() and not (local / "config.json").is_file():
            self.model_dir = local  # a sentence-transformers Router checkpoint: the modules hold the configs
        else:
            self.model_dir = Path(resolve_model_dir(model, local_files_only=local_files_only,
                                                    show_progress=show_progress))
        self.name = name or self.model_dir.name
        self.device = torch.device(device)
        static = _find_static_query_module(self.model_dir)
        doc_dir = static[1] if static else self.model_dir
        self.doc_dir = doc_dir
        self.config = load_config(doc_dir)
        archs = self.config.get("architectures") or []
        if detect_family(self.config) != "bert" or not any("MaskedLM" in a for a in archs):
            raise UnsupportedModelError(
                f"{doc_dir} is not a masked-LM BERT checkpoint (architectures {archs}): a SPLADE encoder is a "
                "BertForMaskedLM whose vocabulary logits are pooled into term weights")
        self.model = bert.from_pretrained(doc_dir, self.device, masked_lm=True)
        bert.fuse_qkv(self.model.bert)
        self.tokenizer = Tokenizer.from_dir(doc_dir, self.config)
        self.dimension = int(self.config["vocab_size"])
        limit = int(self.config.get("max_position_embeddings", 512))
        if self.tokenizer.model_max_length is not None:
            limit = min(limit, self.tokenizer.model_max_length)
        st_limit = (_read_json(doc_dir / "sentence_bert_config.json") or {}).get("max_seq_length")
        if st_limit:  # what sentence-transformers truncates to
            limit = min(limit, int(st_limit))
        if max_length is not None:
            if max_length < 3:
                raise InvalidInputError(f"max_length must be at least 3 tokens, got {max_length}")
            limit = min(limit, int(max_length))
        self.max_length = limit
        self.max_tokens_per_batch = int(max_tokens_per_batch)
        self.dtype = torch.float32
        self.static_weights: np.ndarray | None = None
        self.query_tokenizer = self.tokenizer
        if static is not None:
            from safetensors.numpy import load_file

            q_dir = static[0]
            weights = load_file(str(q_dir / "model.safetensors"))
            (w,) = [v for k, v in weights.items() if k.endswith("weight")]
            self.static_weights = np.asarray(w, dtype=np.float32).reshape(-1)
            if (q_dir / "tokenizer.json").is_file():
                self.query_tokenizer = Tokenizer.from_dir(q_dir, self.config)

    def __repr__(self) -> str:
        free = ", inference-free queries" if self.inference_free else ""
        return f"SparseEmbedder(name={self.name!r}: SPLADE over {self.dimension} terms, max {self.max_length} tokens{free})"

    @property
    def inference_free(self) -> bool:
        """Queries are encoded by static token weights, without the model."""
        return self.static_weights is not None

    # ------------------------------------------------------------------ tokenize
    def check_task(self, task: str | None) -> None:
        if task is not None and task not in SPARSE_TASKS:
            raise InvalidInputError(f"unknown task {task!r} for a sparse model; use 'query', 'document' or none")

    def tokenize(self, texts: str | Sequence[Any], task: str | None = None, truncate: bool = True) -> list[Any]:
        from tamis.embed import Embedder

        self.check_task(task)
        items = Embedder._as_texts(texts)
        if task == "query" and self.inference_free:  # sentence-transformers: no special tokens for static queries
            return self.query_tokenizer.encode(items, self.max_length, truncate=truncate, add_special_tokens=False)
        return self.tokenizer.encode(items, self.max_length, truncate=truncate)

    def count_tokens(self, texts: str | Sequence[str]) -> list[int]:
        from tamis.embed import Embedder

        return self.tokenizer.count_tokens(Embedder._as_texts(texts))

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, encodings: Sequence[Any], tasks: Sequence[str | None] | str | None = None) -> torch.Tensor:
        """Dense term weights [n, vocab] (float32, >= 0) of one batch of encodings, packed (no padding computed)."""
        from tamis.models.bert import Packing
        from tamis.tokenize import pack

        if isinstance(tasks, str) or tasks is None:
            tasks = [tasks] * len(encodings)
        out = torch.zeros(len(encodings), self.dimension, dtype=torch.float32)
        if not encodings:
            return out
        static_rows = [i for i, t in enumerate(tasks) if t == "query" and self.inference_free]
        if static_rows:
            w = torch.from_numpy(self.static_weights)
            for i in static_rows:
                ids = torch.tensor(sorted(set(encodings[i].ids)), dtype=torch.long)
                out[i, ids] = w[ids]
        rows = [i for i in range(len(encodings)) if i not in set(static_rows)]
        if not rows:
            return out
        order = sorted(rows, key=lambda i: -len(encodings[i]))
        batch = pack([encodings[i] for i in order], self.device)
        hidden = self.model.bert.forward_packed(batch.input_ids, batch.token_type_ids, Packing(batch.lengths, self.device))
        pooled = torch.empty(len(order), self.dimension, dtype=torch.float32, device=self.device)
        for rows_at, pieces in _logit_blocks(batch.lengths, LOGIT_ROWS):
            logits = self.logits(hidden[rows_at[0]:rows_at[1]])
            # each piece of a sequence: the maximum over its contiguous rows (relu: the maximum starts from 0)
            at = 0
            for seq, n, first in pieces:
                m = logits[at:at + n].amax(dim=0)
                pooled[seq] = m.clamp_min(0) if first else torch.maximum(pooled[seq], m)
                at += n
        # log1p is monotonic: saturating the [n, V] maximum equals the maximum of the saturated logits
        out[order] = torch.log1p(pooled).cpu()
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [rows, V] (float32) of hidden states [rows, H]: the masked-LM head."""
        t = self.model.cls.predictions.transform
        h = t.LayerNorm(self.model.act(t.dense(hidden)))
        return torch.nn.functional.linear(h, self.model.bert.embeddings.word_embeddings.weight,
                                          self.model.cls.predictions.bias).float()

    def finalize(self, weights: torch.Tensor, top_k: int | None = None, threshold: float = 0.0
                 ) -> list[SparseEmbedding]:
        """[n, vocab] weights -> one pruned :class:`SparseEmbedding` per row."""
        out = []
        for row in weights:
            nz = row.nonzero().flatten()
            out.append(prune(nz.numpy().astype(np.int64), row[nz].numpy(), top_k, threshold))
        return out

    # ------------------------------------------------------------------ front door
    def _batches(self, encodings: Sequence[Any]) -> Iterator[list[int]]:
        from tamis.batching import plan_batches

        yield from plan_batches([len(e) for e in encodings], self.max_tokens_per_batch)

    def embed(
        self,
        texts: str | Sequence[Any],
        task: str | None = None,
        *,
        top_k: int | None = None,
        threshold: float = 0.0,
        truncate: bool = True,
        show_progress: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[SparseEmbedding]:
        """One :class:`SparseEmbedding` per text. ``task``: ``"query"`` or ``"document"`` (the same model for
        both unless the checkpoint is inference-free) or None (document). ``top_k``: keep the largest
        weights only; ``threshold``: drop weights at or below it. ``truncate=False`` raises
        :class:`~tamis.errors.InputTooLongError` for an input over ``max_length`` tokens."""
        check_pruning(top_k, threshold)
        encodings = self.tokenize(texts, task, truncate)
        return self.embed_tokens(encodings, task, top_k=top_k, threshold=threshold, show_progress=show_progress,
                                 progress=progress)

    def embed_tokens(self, encodings: Sequence[Any], task: str | None = None, *, top_k: int | None = None,
                     threshold: float = 0.0, show_progress: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> list[SparseEmbedding]:
        out: list[Any] = [None] * len(encodings)
        done = 0
        with tqdm(total=len(encodings), desc=f"sparse {self.name}", unit="text", disable=not show_progress) as bar:
            for idx in self._batches(encodings):
                weights = self.forward([encodings[i] for i in idx], task)
                for i, v in zip(idx, self.finalize(weights, top_k, threshold)):
                    out[i] = v
                bar.update(len(idx))
                done += len(idx)
                if progress is not None:
                    progress(done, len(encodings))
        return out

    def embed_matrix(self, texts: Sequence[str], task: str | None = None, *, top_k: int | None = None,
                     threshold: float = 0.0, truncate: bool = True, show_progress: bool = False) -> Any:
        """The vectors of ``texts`` as one ``scipy.sparse.csr_matrix`` [n, vocab] (float32)."""
        return to_csr(self.embed(texts, task, top_k=top_k, threshold=threshold, truncate=truncate,
                                 show_progress=show_progress), self.dimension)

    # sentence-transformers habits
    def encode_query(self, texts: str | Sequence[str], **kw: Any) -> list[SparseEmbedding]:
        return self.embed(texts, "query", **kw)

    def encode_document(self, texts: str | Sequence[str], **kw: Any) -> list[SparseEmbedding]:
        return self.embed(texts, "document", **kw)

    # ------------------------------------------------------------------ debugging
    def decode(self, vector: SparseEmbedding | dict, top_k: int | None = None) -> list[tuple[str, float]]:
        """The vector's terms as ``(token, weight)``, largest weight first (``top_k`` of them)."""
        indices = np.asarray(vector["indices"], dtype=np.int64)
        values = np.asarray(vector["values"], dtype=np.float32)
        order = np.lexsort((indices, -values))
        if top_k is not None:
            order = order[:top_k]
        return [(self.token(int(indices[i])), float(values[i])) for i in order]

    def token(self, term_id: int) -> str:
        """The vocabulary entry of a term id (``"##lad"``, as sentence-transformers' ``decode`` shows it)."""
        tok = getattr(self.tokenizer, "_tok", None)
        text = tok.id_to_token(term_id) if tok is not None else None
        return text if text is not None else self.tokenizer.decode([term_id])


def to_csr(vectors: Sequence[SparseEmbedding], dimension: int) -> Any:
    """Stack sparse vectors into a ``scipy.sparse.csr_matrix`` [n, dimension] of float32."""
    import scipy.sparse as sp

    indptr = np.zeros(len(vectors) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(v) for v in vectors])
    indices = np.concatenate([v.indices for v in vectors]) if vectors else np.zeros(0, np.int64)
    data = np.concatenate([v.values for v in vectors]) if vectors else np.zeros(0, np.float32)
    return sp.csr_matrix((data.astype(np.float32), indices.astype(np.int32), indptr), shape=(len(vectors), dimension))
