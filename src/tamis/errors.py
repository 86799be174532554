"""Typed errors. Each carries what the caller needs to fix the call.

The server maps these to HTTP status codes in one place (``tamis.server``); library users catch them
directly. All derive from :class:`TamisError`; input problems also derive from :class:`ValueError`.
"""

from __future__ import annotations


class TamisError(Exception):
    """Base class of every error tamis raises on purpose."""


class ModelNotFoundError(TamisError, FileNotFoundError):
    """A model name or path could not be resolved to a local directory (not a directory, not in the Hugging
    Face cache, and not downloadable: offline, or the Hub unreachable). ``hint`` replaces the default advice."""

    def __init__(self, name: str, looked_in: list[str], hint: str | None = None):
        self.name = name
        self.looked_in = list(looked_in)
        where = "; ".join(self.looked_in) or "nowhere"
        super().__init__(f"model {name!r} was not found locally (looked in: {where}). {hint or DEFAULT_MODEL_HINT}")


DEFAULT_MODEL_HINT = (
    "Give a local directory (config.json, model.safetensors, tokenizer.json), a Hugging Face id (org/name, "
    "downloaded into the Hugging Face cache unless HF_HUB_OFFLINE=1; fill the cache ahead with `tamis pull "
    "org/name` or `hf download org/name`), or 'default' (or no name) for the bundled all-MiniLM-L6-v2."
)


class HubError(TamisError):
    """The Hugging Face Hub refused a model or had none to give: ``status`` is the HTTP status (401 private or
    missing without a token, 403 gated or forbidden, 404 missing) or None (unreachable, unusable repo)."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


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

    def __init__(self, index: int | None, n_tokens: int, limit: int, what: str = "input",
                 n_chars: int | None = None, char_limit: int | None = None):
        self.index = index
        self.n_tokens = n_tokens
        self.limit = limit
        self.what = what
        self.n_chars = n_chars  # set when the input was refused by its length in characters, before tokenizing
        self.char_limit = char_limit
        self.label = what if index is None else f"{what} {index}"
        if n_chars is not None:
            size = (f"{n_chars:,} characters, more than the {char_limit:,} that fit the model's limit of {limit} "
                    "tokens (texts over 32 characters per token are refused without tokenizing them)")
        else:
            size = f"{n_tokens} tokens, more than the model's limit of {limit}"
        super().__init__(f"{self.label} has {size}; shorten it or pass truncate=True to drop the tail")


class UnknownModelError(InvalidInputError):
    """A request named a model that is not served / loaded."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = list(available)
        super().__init__(f"model {name!r} is not available; served models: {', '.join(self.available)}")
