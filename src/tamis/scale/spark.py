"""Spark adapter (``pip install 'tamis[spark]'``): the batch mappers inside ``mapInPandas``.

``embed_dataframe(df, ...)`` / ``rerank_dataframe(df, ...)`` return a lazy Spark DataFrame: the carried
columns with their Spark types, plus the mapper's outputs (``array<float>`` vectors, ``array<tinyint>``
for ``binary``, ``array<smallint>`` for ``ubinary``, ``string`` for ``base64``). Each Python worker
loads the model once and keeps it across tasks (Spark reuses its Python workers by default).

Workers run the Python that ``PYSPARK_PYTHON`` names (the system one if unset): point it at the
environment where tamis is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tamis.scale.mapper import (
    ERROR_COLUMN,
    SCORE_COLUMN,
    TOKENS_COLUMN,
    TRUNCATED_COLUMN,
    EmbedBatch,
    RerankBatch,
)


def _output_schema(df: Any, mapper: EmbedBatch | RerankBatch) -> Any:
    from pyspark.sql import types as T

    keep = mapper.keep(df.columns)
    fields = [df.schema[c] for c in keep]
    if isinstance(mapper, EmbedBatch):
        element = {"float": T.FloatType(), "binary": T.ByteType(), "ubinary": T.ShortType()}
        for column, t in zip(mapper.vector_columns(), mapper.types):
            kind = T.StringType() if t == "base64" else T.ArrayType(element[t], containsNull=False)
            fields.append(T.StructField(column, kind, nullable=True))
        fields.append(T.StructField(TOKENS_COLUMN, T.IntegerType(), nullable=True))
    else:
        fields.append(T.StructField(mapper.output_column or SCORE_COLUMN, T.FloatType(), nullable=True))
    fields.append(T.StructField(TRUNCATED_COLUMN, T.BooleanType(), nullable=True))
    if mapper.bad_rows == "flag":
        fields.append(T.StructField(ERROR_COLUMN, T.StringType(), nullable=True))
    return T.StructType(fields)


def map_dataframe(df: Any, mapper: EmbedBatch | RerankBatch) -> Any:
    """``df.mapInPandas`` with ``mapper`` (each pandas batch in, the mapped batch out)."""
    schema = _output_schema(df, mapper)
    ubinary = [c for c, t in zip(mapper.vector_columns(), mapper.types) if t == "ubinary"] if isinstance(
        mapper, EmbedBatch) else []

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        for pdf in batches:
            out = mapper(pdf)
            for column in ubinary:  # Spark has no unsigned bytes: widen to smallint
                out[column] = [None if v is None else v.astype("int16") for v in out[column]]
            yield out

    return df.mapInPandas(run, schema)


def embed_dataframe(
    df: Any,
    model: str | None = None,
    *,
    text_column: str | list[str] = "text",
    keep_columns: list[str] | None = None,
    task: str | None = None,
    dimensions: int | None = None,
    normalized: bool = True,
    embedding_type: str | list[str] = "float",
    truncate: bool = True,
    output_column: str = "embedding",
    bad_rows: str = "flag",
    device: str = "cpu",
    dtype: str = "auto",
    num_threads: int | None = None,
    **model_kwargs: Any,
) -> Any:
    """Embed a Spark DataFrame's text column; arguments as :class:`tamis.scale.EmbedBatch`.

    Rows per pandas batch: ``spark.sql.execution.arrow.maxRecordsPerBatch`` (Spark's default 10,000).
    """
    mapper = EmbedBatch(model, text_column=text_column, keep_columns=keep_columns, task=task,
                        dimensions=dimensions, normalized=normalized, embedding_type=embedding_type,
                        truncate=truncate, output_column=output_column, bad_rows=bad_rows, device=device,
                        dtype=dtype, num_threads=num_threads, model_kwargs=model_kwargs)
    return map_dataframe(df, mapper)


def rerank_dataframe(
    df: Any,
    model: str | None = None,
    *,
    query_column: str = "query",
    document_column: str = "document",
    keep_columns: list[str] | None = None,
    output_column: str = "score",
    bad_rows: str = "flag",
    device: str = "cpu",
    dtype: str = "auto",
    num_threads: int | None = None,
    **model_kwargs: Any,
) -> Any:
    """Score a Spark DataFrame of (query, document) rows; arguments as :class:`tamis.scale.RerankBatch`."""
    mapper = RerankBatch(model, query_column=query_column, document_column=document_column,
                         keep_columns=keep_columns, output_column=output_column, bad_rows=bad_rows, device=device,
                         dtype=dtype, num_threads=num_threads, model_kwargs=model_kwargs)
    return map_dataframe(df, mapper)
