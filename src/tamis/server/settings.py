"""Server settings: limits, batching, queueing, connections and auth, with defaults from the Jina API."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tamis.batching import DEFAULT_MAX_BATCH_SIZE

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def keys_from_env(var: str = "TAMIS_API_KEYS") -> list[str]:
    """API keys from a comma-separated environment variable (blank entries ignored)."""
    return [k.strip() for k in os.environ.get(var, "").split(",") if k.strip()]


@dataclass
class ServerSettings:
    """Everything the app needs besides the models.

    Limits (all per request):
        max_inputs: most inputs (embeddings) or documents (rerank) in one request; Jina allows 2048.
        max_input_tokens: most tokens in one input when ``truncate`` is false; None = the model's context.
            With ``truncate=true`` inputs are cut at the model's context instead.
        max_request_bytes: largest request body; larger bodies get 413.
        max_json_values: most JSON values (array items, object members) in one body, counted on the raw
            bytes before parsing; more gets 413. None = 32 x max_inputs.
        max_chars_per_token: work is bounded by characters before tokenizing: a text longer than the
            model's token limit x this is cut to that many characters (``truncate=true``, reported as
            truncated) or refused with 400 (``truncate=false``) without being tokenized.
        max_late_chunking_tokens: most tokens of a late-chunking request (all its inputs form one sequence,
            embedded in overlapping windows when longer than the model's context).
        max_request_tokens: most tokens (after truncation) of one embedding request; more is a 400 naming
            the count. None = no cap beyond max_inputs x the model's context.
        max_tokenizing_chars: bound on the characters of admitted requests being tokenized in the thread
            pool at once (per model); a request that would exceed it gets 429 with Retry-After unless
            nothing else is being tokenized.
    Batching (per model):
        max_batch_tokens / max_batch_size: budget of one padded forward pass (rows x longest row).
        gather_batches: the planning window, in batches' worth of the oldest queued rows: before each model
            call the window is length-sorted into batches and the batch holding the oldest row runs.
        tokenize_on_model_thread: tokenize small queued requests (up to 32768 characters) on the model's
            thread between model calls (no CPU competition with the model's own threads) instead of in the
            request's thread pool (overlaps with the model: better for GPUs); None = yes for CPU models.
            Larger requests are always tokenized in the thread pool, never on the model thread.
        max_padding: bound on a batch's padding, as a fraction of its real tokens (0.1 = 10 %): batches
            are grown around the oldest queued row from rows of similar length. None = fill the token budget
            (plan_batches), which suits GPUs better than CPUs. Rows a model runs packed (BERT-family
            embedders, no task adapter) compute no padding: their batches fill the budget in real tokens.
    Queueing (per model):
        max_queued_inputs: bound on admitted-but-unfinished inputs; a request that would exceed it gets
            429 with Retry-After (a request always fits an empty queue, so no valid request starves).
        request_timeout_s: a request not answered within this many seconds of its arrival (reading and
            parsing its body, tokenizing, queue wait and model time) gets 503 with Retry-After at that
            moment; its work is given up (tokenizing stops at its next slice, a running rerank at its next
            batch).
    Connections (``tamis serve``; see :mod:`tamis.server.runner`):
        max_connections: at this many open connections, a new one closes the oldest connection that is
            only waiting (no complete request head yet, or idle on keep-alive); when none is, the new
            connection is closed as soon as it is accepted.
        header_timeout_s: a connection that has not sent a complete request head this long after it
            opened (or after its first byte on a kept-alive connection) is closed.
        body_timeout_s: a request body not received in full this long after its head gets 408.
        keep_alive_timeout_s: an idle kept-alive connection is closed after this long.
        graceful_timeout_s: on SIGTERM / Ctrl-C: new requests get 503, admitted ones run on until
            this long minus a second, then the rest get 503 with Retry-After, and the process exits.
    Auth:
        api_keys: accepted bearer keys; empty = open server. They also guard ``/metrics`` unless
            ``public_metrics``; ``/health`` and the docs are always public.
    """

    max_inputs: int = 2048
    max_input_tokens: int | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    max_json_values: int | None = None
    max_chars_per_token: int = 32
    max_late_chunking_tokens: int = 32768
    max_request_tokens: int | None = None
    max_tokenizing_chars: int = 16 * 1024 * 1024
    max_batch_tokens: int | None = None  # None: the model device's default (tamis.batching.default_token_budget)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    gather_batches: int = 4
    max_padding: float | None = 0.1
    max_queued_inputs: int = 16384
    tokenize_on_model_thread: bool | None = None
    request_timeout_s: float = 120.0
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    graceful_timeout_s: float = 10.0
    api_keys: list[str] = field(default_factory=list)
    public_metrics: bool = False
    default_truncate: bool = False  # embeddings, as the Jina API
    default_rerank_truncate: bool = True  # rerank: as Cohere (max_tokens_per_doc); cuts are reported
    default_normalized: bool = True

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_request_bytes", "max_json_values", "max_chars_per_token",
                     "max_late_chunking_tokens", "max_request_tokens", "max_tokenizing_chars", "max_batch_tokens", "max_batch_size", "gather_batches",
                     "max_queued_inputs", "max_connections"):
            if getattr(self, name) is not None and int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_input_tokens is not None and self.max_input_tokens <= 0:
            raise ValueError("max_input_tokens must be positive (or None for the model's context)")
        if self.max_padding is not None and self.max_padding < 0:
            raise ValueError("max_padding must be >= 0 (or None to fill the token budget)")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s",
                     "graceful_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        self.api_keys = [k for k in self.api_keys if k]

    @property
    def json_value_limit(self) -> int:
        return self.max_json_values or 32 * self.max_inputs
