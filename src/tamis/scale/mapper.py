"""Engine-agnostic batch mappers: a table of rows in, the same rows with vectors or scores out.

:class:`EmbedBatch` and :class:`RerankBatch` are plain callables that import no engine: Ray Data's
``map_batches``, Spark's ``mapInPandas`` and the local ``tamis batch`` loop all call the same object.
The model loads lazily, on the first call in each worker process, and is cached per process, so a mapper
pickles in a few hundred bytes and a worker that runs many tasks loads its model once.

A batch is a ``pandas.DataFrame``, a ``pyarrow.Table`` or a ``dict`` of numpy arrays; the output is the
same kind. Every input column except the text columns is carried through (``keep_columns`` chooses
others), and the outputs are appended:

- ``embedding`` (``embedding_<type>`` for several types) or ``score``;
- ``n_tokens`` (embedding): tokens fed to the model, after truncation;
- ``truncated``: the row was longer than the model's limit and lost its tail;
- ``error``: why the row has no output (null, not a string, empty, too long with ``truncate=False``),
  null for good rows.

A bad row never fails its batch: with ``bad_rows="flag"`` (default) it stays, with null outputs and
its reason in ``error``; with ``bad_rows="skip"`` it is dropped.

Vectors are ``pyarrow`` fixed-size lists (null for bad rows), numpy arrays in a pandas object column
(``None`` for bad rows), or one dense ``[n, d]`` array in a dict batch (NaN rows for float vectors,
zero rows for packed bits: read ``error`` to tell them apart).
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tamis.errors import InvalidInputError

logger = logging.getLogger("tamis.scale")

BAD_ROWS = ("flag", "skip")
ERROR_COLUMN = "error"
TRUNCATED_COLUMN = "truncated"
TOKENS_COLUMN = "n_tokens"
SCORE_COLUMN = "score"
# A reader may pre-flag rows it could not turn into text (a JSON number in a text field, say): the mapper
# reports the message in ``error`` and does not carry this column.
READ_ERROR_COLUMN = "_tamis_read_error"

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


def _cached_model(key: tuple, load: Callable[[], Any]) -> Any:
    """One model per process and configuration (Spark unpickles a fresh mapper for every task)."""
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load()
        return _MODELS[key]


def clear_model_cache() -> None:
    """Drop the models this process loaded for mappers."""
    with _MODELS_LOCK:
        _MODELS.clear()


# ---------------------------------------------------------------------------- batch formats
def batch_kind(batch: Any) -> str:
    """"pandas", "arrow" or "dict", without importing pandas or pyarrow."""
    module = type(batch).__module__
    if module.startswith("pandas") and hasattr(batch, "columns"):
        return "pandas"
    if module.startswith("pyarrow") and hasattr(batch, "column_names"):
        return "arrow"
    if isinstance(batch, dict):
        return "dict"
    raise InvalidInputError(
        f"a batch must be a pandas DataFrame, a pyarrow Table or a dict of arrays, not {type(batch).__name__}"
    )


class _Batch:
    """Uniform read access to the three batch kinds."""

    def __init__(self, batch: Any):
        self.batch = batch
        self.kind = batch_kind(batch)
        if self.kind == "pandas":
            self.columns = [str(c) for c in batch.columns]
            self.n = len(batch)
        elif self.kind == "arrow":
            self.columns = list(batch.column_names)
            self.n = batch.num_rows
        else:
            self.columns = list(batch.keys())
            lengths = {len(v) for v in batch.values()}
            if len(lengths) > 1:
                raise InvalidInputError(f"the columns of a dict batch have different lengths: {sorted(lengths)}")
            self.n = lengths.pop() if lengths else 0

    def values(self, name: str) -> list[Any]:
        if self.kind == "pandas":
            return self.batch[name].tolist()
        if self.kind == "arrow":
            return self.batch.column(name).to_pylist()
        return list(self.batch[name])

    def require(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.columns:
                raise InvalidInputError(f"the batch has no column {name!r} (columns: {self.columns})")


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_text(value: Any, column: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable string, else (None, the reason)."""
    if _is_null(value):
        return None, f"{column} is null"
    if isinstance(value, bytes | bytearray):
        return None, f"{column} is bytes, expected a string (decode it first)"
    if not isinstance(value, str):
        return None, f"{column} is a {type(value).__name__}, expected a string"
    if not value.strip():
        return None, f"{column} is empty"
    return value, None


def _spread(col: Any, valid: np.ndarray, n: int, kind: str) -> Any:
    """Output ``col`` of the ``len(valid)`` valid rows placed at ``valid`` among ``n`` rows, null elsewhere.

    ``col`` is a 2-d array (vectors), a 1-d array (one value per row) or a list (base64 strings).
    """
    complete = len(valid) == n
    if kind == "arrow":
        import pyarrow as pa

        mask = None
        if not complete:
            mask = np.ones(n, dtype=bool)
            mask[valid] = False
        if isinstance(col, np.ndarray):
            full = col if complete else np.zeros((n, *col.shape[1:]), dtype=col.dtype)
            if not complete:
                full[valid] = col
            if col.ndim == 2:
                flat = pa.array(np.ascontiguousarray(full).reshape(-1))
                return pa.FixedSizeListArray.from_arrays(flat, col.shape[1], mask=None if mask is None else pa.array(mask))
            return pa.array(full, mask=mask)
        rows: list[Any] = [None] * n
        for j, i in enumerate(valid):
            rows[i] = col[j]
        return pa.array(rows, type=pa.string())
    if kind == "dict":
        if isinstance(col, np.ndarray) and col.ndim == 2:
            if complete:
                return col
            out = np.full((n, col.shape[1]), np.nan if col.dtype.kind == "f" else 0, dtype=col.dtype)
            out[valid] = col
            return out
        if isinstance(col, np.ndarray) and complete:
            return col
        obj = np.full(n, None, dtype=object)
        for j, i in enumerate(valid):
            obj[i] = col[j].item() if isinstance(col, np.ndarray) else col[j]
        return obj
    # pandas: numpy columns when nothing is null, nullable pandas dtypes (or object columns) otherwise
    if isinstance(col, np.ndarray) and col.ndim == 1:
        if complete:
            return col
        import pandas as pd

        nullable = {"i": "Int32" if col.dtype.itemsize <= 4 else "Int64", "b": "boolean",
                    "f": "Float32" if col.dtype.itemsize <= 4 else "Float64"}[col.dtype.kind]
        full = pd.array(np.zeros(n, dtype=col.dtype), dtype=nullable)
        mask = np.ones(n, dtype=bool)
        mask[valid] = False
        full[valid] = col
        full[mask] = pd.NA
        return full
    obj = np.full(n, None, dtype=object)
    for j, i in enumerate(valid):
        v = col[j]
        obj[i] = v.item() if isinstance(v, np.generic) else v
    return obj


def _assemble(src: _Batch, keep: Sequence[str], rows: np.ndarray, new: dict[str, Any]) -> Any:
    """Carried columns at ``rows`` plus the new columns (already ``len(rows)`` long), in the input's kind."""
    if src.kind == "pandas":
        out = src.batch[list(keep)].iloc[rows].reset_index(drop=True)
        for name, col in new.items():
            out[name] = col
        return out
    if src.kind == "arrow":
        import pyarrow as pa

        out = src.batch.select(list(keep))
        if len(rows) != src.n:
            out = out.take(pa.array(rows, type=pa.int64()))
        for name, col in new.items():
            out = out.append_column(name, col)
        return out
    out = {name: np.asarray(src.batch[name])[rows] for name in keep}
    out.update(new)
    return out


# ---------------------------------------------------------------------------- the mappers
class _BatchMapper:
    """Shared by both mappers: text checks, bad rows, carried columns, output kinds, lazy model."""

    text_columns: tuple[str, ...] = ()

    def __init__(
        self,
        model: str | None,
        keep_columns: Sequence[str] | None,
        bad_rows: str,
        device: str,
        dtype: str,
        num_threads: int | None,
        model_kwargs: dict[str, Any] | None,
    ):
        if bad_rows not in BAD_ROWS:
            raise InvalidInputError(f"bad_rows must be one of {list(BAD_ROWS)}, not {bad_rows!r}")
        if num_threads is not None and num_threads < 1:
            raise InvalidInputError("num_threads must be at least 1")
        self.model = None if model is None else str(model)
        self.keep_columns = None if keep_columns is None else list(keep_columns)
        self.bad_rows = bad_rows
        self.device = str(device)
        self.dtype = str(dtype)
        self.num_threads = num_threads
        self.model_kwargs = dict(model_kwargs or {})
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # never ship a loaded model: each worker loads its own
        return state

    def _load(self) -> Any:
        raise NotImplementedError

    @property
    def loaded_model(self) -> Any:
        """The model, loaded on first use in this process (and shared by equal mappers in it)."""
        if self._model is None:
            if self.num_threads is not None:
                import torch

                torch.set_num_threads(self.num_threads)
            key = (type(self).__name__, self.model, self.device, self.dtype, tuple(sorted(self.model_kwargs.items())))
            self._model = _cached_model(key, self._load)
        return self._model

    def output_columns(self) -> list[str]:
        raise NotImplementedError

    def _inputs(self, src: _Batch, errors: list[str | None]) -> dict[str, list[str]]:
        """The text inputs of every row (rows already bad get a placeholder); sets ``errors``."""
        raise NotImplementedError

    def _compute(self, inputs: dict[str, list[str]], errors: list[str | None]) -> dict[str, Any]:
        """Outputs of the rows whose error is None (in row order); may flag more rows in ``errors``."""
        raise NotImplementedError

    def keep(self, columns: Sequence[str]) -> list[str]:
        """Columns carried into the output for a batch with ``columns``."""
        if self.keep_columns is None:
            skip = set(self.text_columns) | {READ_ERROR_COLUMN}
            keep = [c for c in columns if c not in skip]
        else:
            missing = [c for c in self.keep_columns if c not in columns]
            if missing:
                raise InvalidInputError(f"keep_columns {missing} are not in the batch (columns: {list(columns)})")
            keep = list(self.keep_columns)
        clash = sorted(set(keep) & set(self.output_columns()))
        if clash:
            raise InvalidInputError(
                f"input columns {clash} have the names of output columns; rename them or leave them out of keep_columns"
            )
        return keep

    def __call__(self, batch: Any) -> Any:
        src = _Batch(batch)
        src.require(self.text_columns)
        keep = self.keep(src.columns)
        errors: list[str | None] = [None] * src.n
        if READ_ERROR_COLUMN in src.columns:
            errors = [None if _is_null(e) else str(e) for e in src.values(READ_ERROR_COLUMN)]
        inputs = self._inputs(src, errors)
        outputs = self._compute(inputs, errors) if any(e is None for e in errors) else {}
        valid = np.asarray([i for i, e in enumerate(errors) if e is None], dtype=np.int64)
        if self.bad_rows == "skip":
            if len(valid) < src.n:
                first = next(e for e in errors if e is not None)
                logger.info("skipped %d bad rows of %d (first: %s)", src.n - len(valid), src.n, first)
            rows, place = valid, np.arange(len(valid))
        else:
            rows, place = np.arange(src.n), valid
        new = {name: _spread(col, place, len(rows), src.kind) for name, col in outputs.items()}
        if not outputs:  # no valid row: all-null output columns of the right names
            new = {name: _spread(self._empty(name), place, len(rows), src.kind) for name in self._value_columns()}
        if self.bad_rows == "flag":
            new[ERROR_COLUMN] = _spread(errors, np.arange(src.n), src.n, src.kind)
        return _assemble(src, keep, rows, new)

    def _value_columns(self) -> list[str]:
        return [c for c in self.output_columns() if c != ERROR_COLUMN]

    def _empty(self, name: str) -> Any:
        raise NotImplementedError


class EmbedBatch(_BatchMapper):
    """Embed the text column(s) of a batch. See the module docstring for the output columns.

    Args:
        model: local directory, Hugging Face id (cache, else download), or None for the bundled all-MiniLM-L6-v2.
        text_column: the column to embed, or several joined with a space (``["title", "text"]``; null or
            empty parts are left out; a row is bad when every part is).
        keep_columns: columns carried into the output (default: every column but the text columns).
        task, dimensions, normalized, embedding_type: as :meth:`tamis.Embedder.embed`.
        truncate: cut over-long rows at the model's limit and set ``truncated`` (default); False flags
            them in ``error`` instead (never failing the batch).
        output_column: name of the vector column (``<name>_<type>`` for several embedding types).
        bad_rows: "flag" (keep the row, null vector, reason in ``error``) or "skip" (drop it).
        device, dtype: where and how the model runs in each worker. ``dtype="auto"`` (default) resolves in each
            worker (bfloat16 where its CPU has native bf16 or on GPUs, float32 elsewhere); pin "float32" for
            identical vectors from unlike workers, or when resuming a job on another machine.
        num_threads: torch intra-op threads in the worker (engines already set OMP_NUM_THREADS to the
            worker's CPUs; this overrides it).
        model_kwargs: more :class:`tamis.Embedder` arguments (``max_tokens_per_batch``, ``max_length``).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        text_column: str | Sequence[str] = "text",
        keep_columns: Sequence[str] | None = None,
        task: str | None = None,
        dimensions: int | None = None,
        normalized: bool = True,
        embedding_type: str | Sequence[str] = "float",
        truncate: bool = True,
        output_column: str = "embedding",
        bad_rows: str = "flag",
        device: str = "cpu",
        dtype: str = "auto",
        num_threads: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(model, keep_columns, bad_rows, device, dtype, num_threads, model_kwargs)
        from tamis.embed import Embedder  # only for the argument checks: no model is loaded here

        self.text_columns = (text_column,) if isinstance(text_column, str) else tuple(text_column)
        if not self.text_columns or not all(isinstance(c, str) for c in self.text_columns):
            raise InvalidInputError("text_column must name one column or a list of columns")
        Embedder.check_embedding_type(embedding_type)
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
            raise InvalidInputError(f"dimensions must be a positive integer, not {dimensions!r}")
        self.embedding_type: str | list[str] = (
            embedding_type if isinstance(embedding_type, str) else list(embedding_type))
        self.task = task
        self.dimensions = dimensions
        self.normalized = normalized
        self.truncate = truncate
        self.output_column = output_column

    def __repr__(self) -> str:
        return (f"EmbedBatch(model={self.model!r}, text_column={list(self.text_columns)}, task={self.task!r}, "
                f"dimensions={self.dimensions}, embedding_type={self.embedding_type!r}, bad_rows={self.bad_rows!r})")

    def describe(self) -> dict[str, Any]:
        """Everything that decides the output values (a batch job's manifest records it)."""
        return {"job": "embed", "model": self.model or "default", "text_column": list(self.text_columns),
                "task": self.task, "dimensions": self.dimensions, "normalized": self.normalized,
                "embedding_type": self.embedding_type, "truncate": self.truncate, "dtype": self.dtype,
                "model_kwargs": self.model_kwargs}

    @property
    def types(self) -> list[str]:
        return [self.embedding_type] if isinstance(self.embedding_type, str) else list(self.embedding_type)

    def vector_columns(self) -> list[str]:
        if isinstance(self.embedding_type, str):
            return [self.output_column]
        return [f"{self.output_column}_{t}" for t in self.types]

    def output_columns(self) -> list[str]:
        flag = [ERROR_COLUMN] if self.bad_rows == "flag" else []
        return [*self.vector_columns(), TOKENS_COLUMN, TRUNCATED_COLUMN, *flag]

    def _load(self) -> Any:
        from tamis.embed import Embedder

        emb = Embedder(self.model, device=self.device, dtype=self.dtype, **self.model_kwargs)
        emb.check_task(self.task)
        emb.check_dimensions(self.dimensions)
        return emb

    def _inputs(self, src: _Batch, errors: list[str | None]) -> dict[str, list[str]]:
        if len(self.text_columns) == 1:
            column = self.text_columns[0]
            texts = []
            for i, v in enumerate(src.values(column)):
                text, why = check_text(v, column)
                if errors[i] is None and why is not None:
                    errors[i] = why
                texts.append(text or "")
            return {"text": texts}
        parts = [src.values(c) for c in self.text_columns]
        texts = []
        for i in range(src.n):
            pieces = []
            for column, values in zip(self.text_columns, parts):
                v = values[i]
                if _is_null(v) or (isinstance(v, str) and not v.strip()):
                    continue
                text, why = check_text(v, column)
                if why is not None and errors[i] is None:
                    errors[i] = why
                pieces.append(text or "")
            if not pieces and errors[i] is None:
                errors[i] = f"{' and '.join(self.text_columns)} are all null or empty"
            texts.append(" ".join(pieces))
        return {"text": texts}

    def _compute(self, inputs: dict[str, list[str]], errors: list[str | None]) -> dict[str, Any]:
        from tamis.embed import TruncationWarning

        emb = self.loaded_model
        if not self.truncate:
            todo = [i for i, e in enumerate(errors) if e is None]
            counts = emb.count_tokens([inputs["text"][i] for i in todo], self.task)
            for i, n_tokens in zip(todo, counts):
                if n_tokens > emb.max_length:
                    errors[i] = (f"{n_tokens} tokens, more than the model's limit of {emb.max_length} "
                                 "(truncate=False)")
        texts = [t for t, e in zip(inputs["text"], errors) if e is None]
        if not texts:
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)  # reported per row instead
            res = emb.embed_result(texts, task=self.task, dimensions=self.dimensions, normalized=self.normalized,
                                   embedding_type=self.embedding_type, truncate=True, show_progress=False)
        vectors = res.embeddings if isinstance(self.embedding_type, list) else {self.embedding_type: res.embeddings}
        out: dict[str, Any] = {}
        for column, t in zip(self.vector_columns(), self.types):
            v = vectors[t]
            out[column] = v if isinstance(v, np.ndarray) else list(v)
        truncated = np.zeros(len(texts), dtype=bool)
        truncated[res.truncated] = True
        out[TOKENS_COLUMN] = np.asarray(res.token_counts, dtype=np.int32)
        out[TRUNCATED_COLUMN] = truncated
        return out

    def _empty(self, name: str) -> Any:
        if name == TOKENS_COLUMN:
            return np.zeros(0, dtype=np.int32)
        if name == TRUNCATED_COLUMN:
            return np.zeros(0, dtype=bool)
        t = self.types[self.vector_columns().index(name)]
        if t == "base64":
            return []
        width = self.dimensions or self._dimension()
        if t == "float":
            return np.zeros((0, width), dtype=np.float32)
        return np.zeros((0, (width + 7) // 8), dtype=np.int8 if t == "binary" else np.uint8)

    def _dimension(self) -> int:
        return int(self.loaded_model.dimension)


class RerankBatch(_BatchMapper):
    """Score (query, document) rows with a reranker; adds ``score``, ``truncated`` and ``error``.

    Rows are grouped by query within the batch and each group goes through
    :meth:`tamis.Reranker(...).rerank <tamis.rerank.RerankerLike.rerank>`, so scores are exactly what
    ``rerank`` returns. Cross-encoder and embedding-similarity scores depend only on the pair; a listwise
    model (jina-reranker-v3) scores a document in the context of the others of its query in the same
    batch, so keep a query's candidates together (sort by query, batch size >= candidates per query).

    Args:
        model: reranker directory or Hugging Face id (cache, else download; None: the default reranker).
        query_column, document_column: the two text columns.
        keep_columns: columns carried into the output (default: every column but the two text columns).
        output_column: name of the score column.
        bad_rows, device, dtype, num_threads: as :class:`EmbedBatch`.
        model_kwargs: more ``tamis.Reranker`` arguments.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        query_column: str = "query",
        document_column: str = "document",
        keep_columns: Sequence[str] | None = None,
        output_column: str = SCORE_COLUMN,
        bad_rows: str = "flag",
        device: str = "cpu",
        dtype: str = "auto",
        num_threads: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(model, keep_columns, bad_rows, device, dtype, num_threads, model_kwargs)
        if query_column == document_column:
            raise InvalidInputError("query_column and document_column must differ")
        self.query_column = query_column
        self.document_column = document_column
        self.text_columns = (query_column, document_column)
        self.output_column = output_column

    def __repr__(self) -> str:
        return (f"RerankBatch(model={self.model!r}, query_column={self.query_column!r}, "
                f"document_column={self.document_column!r}, bad_rows={self.bad_rows!r})")

    def describe(self) -> dict[str, Any]:
        return {"job": "rerank", "model": self.model or "default", "query_column": self.query_column,
                "document_column": self.document_column, "dtype": self.dtype, "model_kwargs": self.model_kwargs}

    def output_columns(self) -> list[str]:
        return [self.output_column, TRUNCATED_COLUMN] + ([ERROR_COLUMN] if self.bad_rows == "flag" else [])

    def _load(self) -> Any:
        from tamis.rerank import Reranker

        return Reranker(self.model, device=self.device, dtype=self.dtype, **self.model_kwargs)

    def _inputs(self, src: _Batch, errors: list[str | None]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for column in self.text_columns:
            texts = []
            for i, v in enumerate(src.values(column)):
                text, why = check_text(v, column)
                if why is not None and errors[i] is None:
                    errors[i] = why
                texts.append(text or "")
            out[column] = texts
        return out

    def _compute(self, inputs: dict[str, list[str]], errors: list[str | None]) -> dict[str, Any]:
        rr = self.loaded_model
        rows = [i for i, e in enumerate(errors) if e is None]
        groups: dict[str, list[int]] = {}
        for j, i in enumerate(rows):
            groups.setdefault(inputs[self.query_column][i], []).append(j)
        scores = np.zeros(len(rows), dtype=np.float32)
        truncated = np.zeros(len(rows), dtype=bool)
        for query, members in groups.items():
            docs = [inputs[self.document_column][rows[j]] for j in members]
            res = rr.rerank(query, docs, return_documents=False)
            for r in res:
                scores[members[r.index]] = r.relevance_score
            for k in res.truncated:
                truncated[members[k]] = True
            if res.extras.get("query_truncated"):
                truncated[members] = True
        return {self.output_column: scores, TRUNCATED_COLUMN: truncated}

    def _empty(self, name: str) -> Any:
        return np.zeros(0, dtype=bool if name == TRUNCATED_COLUMN else np.float32)
