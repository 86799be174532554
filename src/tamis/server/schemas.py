"""Request and response bodies of the Jina, OpenAI and Cohere routes.

Requests are a superset of the three APIs: unknown fields are accepted and ignored (Jina's own gateway
forbids them, which is why the OpenAI client cannot call api.jina.ai; here it can). Values are checked
for type by pydantic (422) and for meaning by the routes (400), so each bad value gets a message that
names it. Bodies are parsed and bounded by :mod:`tamis.server.body` before these models see them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema

EmbeddingType = Literal["float", "base64", "binary", "ubinary", "int8", "uint8"]


class TextDoc(BaseModel):
    """``{"text": ...}``. Image documents (``image`` / ``url`` / ``bytes``) parse, then get a clear 400."""

    model_config = ConfigDict(extra="allow")
    text: str | None = Field(None, description="the text")


# What the schema documents is stricter than what parses: blank strings, empty lists, repeated output types,
# token ids and image documents parse, then get a 400 that names the offending input (clearer than a
# schema error).
_TEXT = {"type": "string", "pattern": "\\S"}  # not empty, not only whitespace
_TEXT_DOC = {"type": "object", "properties": {"text": _TEXT}, "required": ["text"]}
_INPUT_SCHEMA = {
    "anyOf": [_TEXT, _TEXT_DOC, {"type": "array", "minItems": 1, "items": {"anyOf": [_TEXT, _TEXT_DOC]}}],
    "title": "Input",
}
_QUERY = {"type": "string", "pattern": "\\S"}
_QUERY_SCHEMA = {"anyOf": [_QUERY, {"type": "object", "properties": {"text": _QUERY}, "required": ["text"]}],
                 "title": "Query"}
_DOCUMENTS_SCHEMA = {"type": "array", "minItems": 1, "title": "Documents",
                     "items": {"anyOf": [_TEXT, {"type": "object", "properties": {"text": _TEXT}, "required": ["text"]}]}}
_TYPES = ["float", "base64", "binary", "ubinary", "int8", "uint8"]
_TYPES_SCHEMA = {"anyOf": [{"enum": _TYPES}, {"type": "array", "items": {"enum": _TYPES}, "minItems": 1,
                                               "uniqueItems": True}, {"type": "null"}]}
OutputTypes = Annotated[EmbeddingType | list[EmbeddingType] | None, WithJsonSchema(_TYPES_SCHEMA)]


class EmbeddingRequest(BaseModel):
    """Jina ``/v1/embeddings`` fields plus OpenAI's."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"example": {"model": "all-MiniLM-L6-v2", "input": ["a text", "another text"]}},
    )

    model: str | None = Field(None, description="served model name; omitted = the first served embedding model")
    input: Annotated[str | TextDoc | list[str | TextDoc | int | list[int]], WithJsonSchema(_INPUT_SCHEMA)] = Field(
        ...,
        description=(
            "a string, a list of strings, a {text} object or a list of them (at most max_inputs items). "
            "OpenAI token-id arrays are answered 400: send text."
        ),
    )
    task: str | None = Field(None, description="task of multi-task models (e.g. retrieval.query); see GET /v1/models")
    dimensions: int | None = Field(None, description="Matryoshka truncation: 1..model dimension")
    normalized: StrictBool | None = Field(None, description="L2-normalise (default true)")
    truncate: StrictBool | None = Field(
        None, description="cut inputs longer than the model's context instead of answering 400 (default false)"
    )
    late_chunking: StrictBool | None = Field(
        False, description="treat the inputs as consecutive chunks of one document: one sequence, one vector each"
    )
    embedding_type: OutputTypes = Field(
        None, description="float (default), base64 (little-endian float32), binary, ubinary, or a list of these "
                          "(each at most once: the embedding is then an object with one key per type)"
    )
    encoding_type: OutputTypes = Field(None, description="alias of embedding_type")
    encoding_format: OutputTypes = Field(None, description="OpenAI's name for embedding_type")
    return_multivector: StrictBool | None = Field(None, description="not supported: true is answered 400")
    user: str | None = Field(None, description="OpenAI field, ignored")

    def output_type(self) -> str | list[str]:
        for value in (self.embedding_type, self.encoding_type, self.encoding_format):
            if value is not None:
                return list(value) if isinstance(value, list) else value
        return "float"


EmbeddingValue = list[float] | str | list[int] | dict[str, list[float] | str | list[int]]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: EmbeddingValue


class EmbeddingResponse(BaseModel):
    model: str
    object: Literal["list"] = "list"
    usage: Usage
    data: list[EmbeddingItem]


class RerankRequest(BaseModel):
    """Jina / Cohere v1 rerank fields; ``/v2/rerank`` takes the same body (Cohere v2)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "example": {"model": "all-MiniLM-L6-v2", "query": "a question", "documents": ["a doc", "another"]}
        },
    )

    model: str | None = Field(None, description="served reranker name; omitted = the first served reranker")
    query: Annotated[str | TextDoc, WithJsonSchema(_QUERY_SCHEMA)]
    documents: Annotated[list[str | TextDoc], WithJsonSchema(_DOCUMENTS_SCHEMA)] = Field(
        ..., description="strings or {text} objects (at most max_inputs)"
    )
    top_n: Annotated[int | None, WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]})] = Field(
        None, description="how many results (at least 1); null = all")
    return_documents: StrictBool | None = Field(
        None, description="echo each document in its result (default true on /v1, false on /v2)"
    )
    truncate: StrictBool | None = Field(
        None, description="cut a query or document longer than the model's context (default true, reported in the "
                          "X-Truncated-Inputs / X-Truncated-Query headers) instead of answering 400 (false)"
    )


class CohereEmbedRequest(BaseModel):
    """Cohere ``/v2/embed`` and ``/v1/embed``: ``texts`` (or v2 ``inputs`` of text content), ``input_type``,
    ``embedding_types``, ``truncate``, ``output_dimension``."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"example": {"model": "all-MiniLM-L6-v2", "texts": ["a text"], "input_type": "search_query",
                                       "embedding_types": ["float"]}},
    )

    model: str | None = Field(None, description="served model name; omitted = the first served embedding model")
    texts: list[str | TextDoc] | None = Field(None, description="the texts to embed (at most max_inputs)")
    inputs: list[dict[str, Any]] | None = Field(
        None, description='v2 mixed inputs: {"content": [{"type": "text", "text": ...}]}; text content only')
    images: list[str] | None = Field(None, description="not supported: the served models take text only (400)")
    input_type: str | None = Field(
        None, description="search_query / search_document / classification / clustering: the model's matching task "
                          "(or prompt) when it has one, none otherwise")
    embedding_types: list[str] | None = Field(
        None, description="any of float, int8, uint8, binary, ubinary, base64 (v2 default: float; v1 without it: "
                          "the embeddings_floats response)")
    truncate: str | None = Field(
        None, description="NONE (an over-long text is a 400), START (drop the start), END (drop the end; default)")
    output_dimension: int | None = Field(None, description="Matryoshka truncation: 1..model dimension")
    max_tokens: int | None = Field(None, description="not below the model's token limit (400 otherwise)")


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str | None = None


class RerankResultV1(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = Field(None, description="present when return_documents")


class RerankUsage(BaseModel):
    total_tokens: int
    prompt_tokens: int


class RerankResponseV1(BaseModel):
    model: str
    object: Literal["list"] = "list"
    usage: RerankUsage
    results: list[RerankResultV1]


class RerankResultV2(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class ApiVersion(BaseModel):
    version: str
    is_experimental: bool


class BilledUnits(BaseModel):
    search_units: int
    input_tokens: int


class Tokens(BaseModel):
    input_tokens: int
    output_tokens: int


class RerankMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: Tokens


class RerankResponseV2(BaseModel):
    id: str
    results: list[RerankResultV2]
    meta: RerankMeta


class ModelCard(BaseModel):
    id: str = Field(..., description="unique in the list: a reranker served under an embedding model's name is "
                                     "listed as NAME:reranker (also accepted as its request model)")
    served_name: str = Field(..., description="the name the model is served under on its route")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tamis"
    type: Literal["embedding", "reranker"]
    kind: str | None = None
    dimension: int | None = None
    max_length: int | None = None
    tasks: list[str] | None = None
    aliases: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "shutting_down"]
    embedding_models: list[str] | None = Field(
        None, description="served embedding models (absent without a valid key when the server requires one)")
    reranker_models: list[str] | None = Field(
        None, description="served rerankers (absent without a valid key when the server requires one)")
    detail: str | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    detail: str
    error: ErrorInfo


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "invalid input (message names the field / input index)",
        401: "missing or wrong API key",
        408: "request body not received in time",
        413: "request body too large (bytes or JSON values)",
        422: "body does not match the schema",
        429: "queue full; retry after Retry-After seconds",
        503: "models loading, request deadline passed, or shutting down; retry after Retry-After seconds",
    }
    return {c: {"model": ErrorBody, "description": text.get(c, "error")} for c in codes}
