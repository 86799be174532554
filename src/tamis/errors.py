"""Typed errors. Each carries what the caller needs to fix the call.

The server maps these to HTTP status codes in one place (``tamis.server``); library users catch them
directly. All derive from :class:`TamisError`; input problems also derive from :class:`ValueError`.
"""

from __future__ import annotations


class TamisError(Exception):
    """Base class of every error tamis raises on purpose."""


class ModelNotFoundError(TamisError, FileNotFoundError):
    """A model name or path could not be resolved to a local directory (no network is used)."""

    def __init__(self, name: str, looked_in: list[str]):
        self.name = name
        self.looked_in = list(looked_in)
        where = "\n".join(f"  - {p}" for p in self.looked_in) or "  (nowhere)"
        super().__init__(
            f"model {name!r} was not found locally. Looked in:\n{where}\n"
            "tamis never downloads. Provide the model as a local directory (config.json, model.safetensors, "
            "tokenizer.json), or put it in the Hugging Face cache (HF_HUB_CACHE / HF_HOME), e.g. on a "
            "machine with network access: `hf download <id>` (huggingface_hub's CLI) and copy the cache over. "
            "Use 'default' (or no name) for the bundled all-MiniLM-L6-v2."
        )


class DeviceError(TamisError, ValueError):
    """The requested device cannot be used by this torch build on this machine (e.g. CUDA on a CPU-only torch)."""


class UnsupportedModelError(TamisError, ValueError):
    """The directory holds a model whose architecture tamis does not implement."""


class CheckpointError(TamisError, ValueError):
    """The checkpoint's tensors do not match the architecture its config describes."""


class InvalidInputError(TamisError, ValueError):
    """The request itself is malformed (empty input, wrong types, bad parameter values)."""


class UnknownTaskError(InvalidInputError):
    def __init__(self, task: str, valid: list[str]):
        self.task = task
        self.valid = list(valid)
        options = ", ".join(repr(v) for v in self.valid) if self.valid else "none (this model has no tasks)"
        super().__init__(f"unknown task {task!r}; valid tasks for this model: {options}")


class InputTooLongError(InvalidInputError):
    """An input exceeds the model's context and truncation was disabled.

    ``what`` names the input kind ("input", "document", "query"); ``index`` is None for a single input
    such as a rerank query.
    """

    def __init__(self, index: int | None, n_tokens: int, limit: int, what: str = "input"):
        self.index = index
        self.n_tokens = n_tokens
        self.limit = limit
        self.what = what
        self.label = what if index is None else f"{what} {index}"
        super().__init__(
            f"{self.label} has {n_tokens} tokens, more than the model's limit of {limit}; "
            "shorten it or pass truncate=True to drop the tail"
        )


class UnknownModelError(InvalidInputError):
    """A request named a model that is not served / loaded."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = list(available)
        super().__init__(f"model {name!r} is not available; served models: {', '.join(self.available)}")
