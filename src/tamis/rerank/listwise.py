"""Listwise "last but not late" reranker (jina-reranker-v3 layout), docs/models.md §2.3-§2.5.

The query and up to ``block_size`` documents go into one prompt; one causal forward pass reads a vector
at every ``<|embed_token|>`` (after each document) and one at ``<|rerank_token|>`` (after the repeated
query). Larger lists run in several blocks whose query vectors are averaged, weighted by each block's
best (1 + cos) / 2, and every document is scored by cosine against that final query vector.

Models trained by ``tamis train listwise`` also carry the *dual* query token of the paper's ℓ_dual term
(``"dual_query_token": true`` in config.json): ``<|rerank_token|>`` right after the first occurrence of
the query too. Training and inference build that prompt with the same :func:`build_prompt`; the query
vector is still the one at the end.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tamis.errors import CheckpointError, InputTooLongError, InvalidInputError
from tamis.models.loading import load_config, resolve_device, resolve_dtype, resolve_model_dir
from tamis.models.qwen3 import JinaListwiseModel
from tamis.rerank.base import BaseReranker, Progress, Usage
from tamis.tokenize import Tokenizer

DOC_TOKEN = "<|embed_token|>"
QUERY_TOKEN = "<|rerank_token|>"

SYSTEM_PROMPT = (
    "You are a search relevance expert who can determine a ranking of the passages based on how relevant "
    "they are to the query. If the query is a question, how relevant a passage is depends on how well it "
    "answers the question. If not, try to analyze the intent of the query and assess how well each passage "
    "satisfies the intent. If an instruction is provided, you should follow the instruction when "
    "determining the ranking."
)
PROMPT_PREFIX = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def sanitize(text: str) -> str:
    """Remove the two embedding-position token strings, so that inputs cannot move the read-out points."""
    for token in (DOC_TOKEN, QUERY_TOKEN):
        text = text.replace(token, "")
    return text


def build_prompt(
    query: str, documents: list[str], instruction: str | None = None, dual_query_token: bool = False
) -> str:
    """The exact jina-reranker-v3 prompt for one block (passage ids restart at 0 in every block).

    ``dual_query_token`` also places ``<|rerank_token|>`` right after the first occurrence of the query
    (the dual query vector of training; models trained with it are served with it).
    """
    query = sanitize(query)
    docs = [sanitize(d) for d in documents]
    dual = QUERY_TOKEN if dual_query_token else ""
    body = (
        f"I will provide you with {len(docs)} passages, each indicated by a numerical identifier. "
        f"Rank the passages based on their relevance to query: {query}{dual}\n"
    )
    if instruction:
        body += f"<instruct>\n{instruction}\n</instruct>\n"
    body += "\n".join(f'<passage id="{i}">\n{d}{DOC_TOKEN}\n</passage>' for i, d in enumerate(docs)) + "\n"
    body += f"<query>\n{query}{QUERY_TOKEN}\n</query>"
    return PROMPT_PREFIX + body + PROMPT_SUFFIX


def plan_blocks(
    doc_lengths: list[int],
    query_length: int,
    max_length: int,
    block_size: int = 125,
    max_doc_length: int = 2048,
) -> list[list[int]]:
    """Split documents, in input order, into blocks (§2.5).

    A block is flushed after the document that fills it to ``block_size`` or that leaves a token capacity
    (``max_length - 2 * query_length`` minus the documents' lengths) of at most ``max_doc_length``.
    """
    blocks: list[list[int]] = []
    current: list[int] = []
    capacity = max_length - 2 * query_length
    for i, n in enumerate(doc_lengths):
        current.append(i)
        capacity -= n
        if len(current) >= block_size or capacity <= max_doc_length:
            blocks.append(current)
            current = []
            capacity = max_length - 2 * query_length
    if current:
        blocks.append(current)
    return blocks


@dataclass
class BlockOutput:
    doc_embeds: np.ndarray  # [n_docs, P] float32, projected, not normalised
    query_embed: np.ndarray  # [P] float32
    scores: np.ndarray  # [n_docs] float32 cosine(doc, query) of this block
    n_tokens: int  # prompt length fed to the model


def _display_name(given: str, model_dir: Path) -> str:
    if Path(given).expanduser().is_dir():
        parts = model_dir.parts
        # <cache>/models--org--name/snapshots/<hash>
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3][len("models--") :].replace("--", "/")
        return model_dir.name
    return given


class ListwiseReranker(BaseReranker):
    """jina-reranker-v3: ranks a whole list of documents in one (or a few) causal forward passes."""

    kind = "listwise"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        block_size: int | None = None,
        max_query_length: int = 512,
        max_doc_length: int = 2048,
        name: str | None = None,
    ):
        """``block_size=None``: the checkpoint's ``block_size`` (config.json, set by ``tamis train listwise``
        to the list size it was trained on), else 125 as jina-reranker-v3."""
        if (block_size is not None and block_size < 1) or max_query_length < 1 or max_doc_length < 1:
            raise InvalidInputError("block_size, max_query_length and max_doc_length must be positive")
        self.model_dir = resolve_model_dir(model_dir)
        config = load_config(self.model_dir)
        tokenizer = Tokenizer.from_dir(self.model_dir, config)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        block_size = block_size if block_size is not None else int(config.get("block_size", 125))
        self._setup(
            JinaListwiseModel.from_pretrained(self.model_dir, dev, dt), tokenizer, config,
            name or _display_name(str(model_dir), self.model_dir), block_size, max_query_length, max_doc_length,
        )

    @classmethod
    def from_parts(
        cls,
        model: JinaListwiseModel,
        tokenizer: Tokenizer,
        config: dict[str, Any],
        name: str = "listwise",
        block_size: int = 125,
        max_query_length: int = 512,
        max_doc_length: int = 2048,
    ) -> ListwiseReranker:
        """A reranker around a model already in memory (training: dev evaluation and prompt building use
        exactly the inference code). ``config`` is the model's config.json dict."""
        self = cls.__new__(cls)
        self.model_dir = Path(".")
        self._setup(model, tokenizer, config, name, block_size, max_query_length, max_doc_length)
        return self

    def _setup(self, model: JinaListwiseModel, tokenizer: Tokenizer, config: dict[str, Any], name: str,
               block_size: int, max_query_length: int, max_doc_length: int) -> None:
        if block_size < 1 or max_query_length < 1 or max_doc_length < 1:
            raise InvalidInputError("block_size, max_query_length and max_doc_length must be positive")
        self.name = name
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.block_size = int(block_size)
        self.max_query_length = int(max_query_length)
        self.max_doc_length = int(max_doc_length)
        self.tokenizer = tokenizer
        added = self.tokenizer.added_tokens
        missing = [t for t in (DOC_TOKEN, QUERY_TOKEN) if t not in added]
        if missing:
            raise CheckpointError(
                f"{self.model_dir}: the tokenizer has no {', '.join(missing)} token; "
                "this is not a jina-reranker-v3 style listwise model"
            )
        self.doc_token_id = added[DOC_TOKEN]
        self.query_token_id = added[QUERY_TOKEN]
        self.dual_query_token = bool(config.get("dual_query_token", False))
        self.n_query_tokens = 2 if self.dual_query_token else 1
        self.max_length: int = self.tokenizer.model_max_length or int(
            config.get("max_position_embeddings", 131072)
        )

    def __repr__(self) -> str:
        return f"ListwiseReranker({self.name!r}, device={str(self.device)!r}, dtype={self.dtype})"

    # ------------------------------------------------------------------ pieces
    def build_prompt(self, query: str, documents: list[str], instruction: str | None = None) -> str:
        return build_prompt(query, documents, instruction, self.dual_query_token)

    def prompt_ids(self, query: str, documents: list[str], instruction: str | None = None) -> list[int]:
        """Token ids of the prompt for ``query`` and ``documents`` (taken as they are, no cutting)."""
        return self.tokenize_prompt(self.build_prompt(query, documents, instruction))

    def truncate(
        self, texts: list[str], limit: int, *, refuse: str | None = None
    ) -> tuple[list[str], list[int], list[bool]]:
        """Cut texts to ``limit`` tokens (no special tokens added) by decoding the kept ids.

        Returns (texts, token lengths after cutting, whether each was cut). As in the reference, a text of
        exactly ``limit`` tokens is also replaced by its decode (a no-op for byte-level BPE). With
        ``refuse`` (a name such as "document") a text over the limit raises :class:`InputTooLongError`
        instead ("query": the single query, named without an index).
        """
        out, lengths, cut = [], [], []
        for i, (text, enc) in enumerate(zip(texts, self.tokenizer.raw(texts))):
            n = len(enc.ids)
            if refuse is not None and n > limit:
                raise InputTooLongError(None if refuse == "query" else i, n, limit, what=refuse)
            if n >= limit:
                text = self.tokenizer.decode(enc.ids[:limit])
            out.append(text)
            lengths.append(min(n, limit))
            cut.append(n > limit)
        return out, lengths, cut

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode([prompt], max_length=None, add_special_tokens=False)[0].ids

    @torch.inference_mode()
    def forward_block(self, query: str, documents: list[str], instruction: str | None = None) -> BlockOutput:
        """One forward pass over the prompt of ``query`` and ``documents`` (taken as they are, no cutting)."""
        ids = self.prompt_ids(query, documents, instruction)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        docs, q = self.model.rank_embeddings(input_ids, self.doc_token_id, self.query_token_id,
                                             n_query_tokens=self.n_query_tokens)
        if docs.shape[0] != len(documents):
            raise RuntimeError(f"prompt holds {docs.shape[0]} document tokens for {len(documents)} documents")
        scores = F.cosine_similarity(docs, q[None].expand_as(docs), dim=-1)
        return BlockOutput(
            doc_embeds=docs.float().cpu().numpy(),
            query_embed=q.float().cpu().numpy(),
            scores=scores.float().cpu().numpy(),
            n_tokens=len(ids),
        )

    # ------------------------------------------------------------------ the front door
    def score(
        self,
        query: str,
        documents: Sequence[str],
        *,
        truncate: bool = True,
        progress: Progress | None = None,
        usage: Usage | None = None,
        return_embeddings: bool = False,
        instruction: str | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Cosine of each document's vector with the query vector, in [-1, 1] (``rerank(query, documents,
        return_embeddings=..., instruction=..., show_progress=...)`` passes these options here).

        ``show_progress=None`` shows a bar only when the list needs more than one block. A query over
        ``max_query_length`` tokens or a document over ``max_doc_length`` is cut (reported in
        ``extras["query_truncated"]`` / ``truncated``), or with ``truncate=False`` raises
        :class:`InputTooLongError`. ``progress(done, total)`` runs after every block (raising there stops
        the work). ``return_embeddings``: ``extras["embeddings"]`` / ``extras["query_embedding"]``.
        """
        texts = list(documents)
        strict = not truncate
        (query_t,), (query_len,), (query_cut,) = self.truncate([query], self.max_query_length,
                                                               refuse="query" if strict else None)
        docs_t, doc_lens, doc_cut = self.truncate(texts, self.max_doc_length, refuse="document" if strict else None)
        blocks = plan_blocks(doc_lens, query_len, self.max_length, self.block_size, self.max_doc_length)

        doc_embeds = np.zeros((len(texts), self.model.config.projector_dim), dtype=np.float32)
        query_embeds, weights = [], []
        total_tokens = done = 0
        disable = (len(blocks) < 2) if show_progress is None else not show_progress
        for block in tqdm(blocks, desc="rerank blocks", unit="block", disable=disable):
            out = self.forward_block(query_t, [docs_t[i] for i in block], instruction)
            doc_embeds[block] = out.doc_embeds
            query_embeds.append(out.query_embed)
            weights.append(((1.0 + out.scores) / 2.0).max())
            total_tokens += out.n_tokens
            done += len(block)
            if progress is not None:
                progress(done, len(texts))

        query_embed = np.average(
            np.stack(query_embeds), axis=0, weights=np.asarray(weights, dtype=np.float32)
        )
        query_embed = query_embed.astype(np.float32)
        norms = np.linalg.norm(query_embed) * np.linalg.norm(doc_embeds, axis=1)
        scores = (doc_embeds @ query_embed) / np.maximum(norms, np.float32(1e-12))
        if usage is not None:
            usage.total_tokens = total_tokens
            usage.truncated = [i for i, c in enumerate(doc_cut) if c]
            usage.extras["blocks"] = len(blocks)
            if query_cut:
                usage.extras["query_truncated"] = True
            if return_embeddings:
                usage.extras["embeddings"] = doc_embeds
                usage.extras["query_embedding"] = query_embed
        return scores
