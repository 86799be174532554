"""Server settings: limits, batching, queueing and auth, with defaults from the Jina API."""

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
        max_late_chunking_tokens: most tokens of a late-chunking request (all its inputs form one sequence,
            embedded in overlapping windows when longer than the model's context).
    Batching (per model):
        max_batch_tokens / max_batch_size: budget of one padded forward pass (rows x longest row).
        gather_batches: the planning window, in batches' worth of the oldest queued rows: before each model
            call the window is length-sorted into batches and the batch holding the oldest row runs.
        tokenize_on_model_thread: tokenize queued requests on the model's thread between model calls (no
            CPU competition with the model's own threads) instead of in the request's thread pool (overlaps
            with the model: better for GPUs); None = on the model thread for CPU models.
        max_padding: bound on a batch's padding, as a fraction of its real tokens (0.1 = 10 %): batches
            are grown around the oldest queued row from rows of similar length. None = fill the token budget
            (plan_batches), which suits GPUs better than CPUs.
    Queueing (per model):
        max_queued_inputs: bound on admitted-but-unfinished inputs; a request that would exceed it gets
            429 with Retry-After (a request always fits an empty queue, so no valid request starves).
        request_timeout_s: queued work not started within this many seconds is dropped (503).
    Auth:
        api_keys: accepted bearer keys; empty = open server.
    """

    max_inputs: int = 2048
    max_input_tokens: int | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    max_late_chunking_tokens: int = 32768
    max_batch_tokens: int | None = None  # None: the model device's default (tamis.batching.default_token_budget)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    gather_batches: int = 4
    max_padding: float | None = 0.1
    max_queued_inputs: int = 16384
    tokenize_on_model_thread: bool | None = None
    request_timeout_s: float = 120.0
    api_keys: list[str] = field(default_factory=list)
    default_truncate: bool = False
    default_normalized: bool = True

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_request_bytes", "max_late_chunking_tokens", "max_batch_tokens", "max_batch_size",
                     "gather_batches", "max_queued_inputs"):
            if getattr(self, name) is not None and int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_input_tokens is not None and self.max_input_tokens <= 0:
            raise ValueError("max_input_tokens must be positive (or None for the model's context)")
        if self.max_padding is not None and self.max_padding < 0:
            raise ValueError("max_padding must be >= 0 (or None to fill the token budget)")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        self.api_keys = [k for k in self.api_keys if k]
