"""Request bodies: decoded, bounded, parsed and validated, the large ones off the event loop.

FastAPI would parse a body with ``json.loads`` and validate it with pydantic on the event loop, and
pydantic checks a list's length only after validating every item: a 16 MB body of millions of tiny
items held the loop (and every other request, ``/health`` included) for seconds. Here, in order:

1. the body must be UTF-8 (400);
2. its JSON values are counted on the raw bytes, without building them (:func:`count_json_values`:
   the commas, ``[`` and ``{`` outside strings, vectorised with numpy, looked at only when the plain byte
   counts are over the limit); more than ``max_values`` is a 413;
3. ``json.loads`` (NaN / Infinity and numbers beyond a double refused) builds at most that many values;
4. lone surrogate escapes (``"\\ud800"``, invalid Unicode that cannot be encoded back) are refused
   wherever they occur, so no text or echoed field can break a tokenizer or a JSON encoder later;
5. list fields are bounded before validation (``"input"``, ``"documents"``: 400 naming the count);
6. pydantic validates what is left (422 naming the fields).

Bodies above :data:`INLINE_BYTES` run all of this in the thread pool, so the event loop stays free.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from tamis.server.errors import ApiError, validation_error

INLINE_BYTES = 64 * 1024  # smaller bodies parse in well under a millisecond: not worth a thread hop
COUNT_BLOCK = 1 << 20  # count_json_values looks at this many bytes at a time (its temporaries: ~7 x this)

M = TypeVar("M", bound=BaseModel)

_QUOTE, _BACKSLASH, _COMMA, _BRACKET, _BRACE = 34, 92, 44, 91, 123
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def rough_json_values(body: bytes) -> int:
    """Commas, ``[`` and ``{`` anywhere in the body: an upper bound of :func:`count_json_values` (fast)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{")


def count_json_values(body: bytes, block: int = COUNT_BLOCK) -> int:
    """Commas, ``[`` and ``{`` outside strings: about one per JSON value (every value after a container's
    first is preceded by a comma; containers count themselves). Exact for valid JSON, computed on the
    bytes without building anything (numpy, which releases the GIL for most of it), ``block`` bytes at a
    time so that its temporaries stay a few times ``block`` whatever the body's size."""
    total, inside, run = 0, 0, 0
    for start in range(0, len(body), block):
        n, inside, run = _count_block(np.frombuffer(body, np.uint8, min(block, len(body) - start), start),
                                      inside, run)
        total += n
    return total


def _count_block(b: np.ndarray, inside: int, run: int) -> tuple[int, int, int]:
    """:func:`count_json_values` of one block, given the state at its start: ``inside`` a string (0/1) and
    ``run``, the backslashes that end the bytes before it. Returns (count, inside, run) at its end."""
    quote = b == _QUOTE
    is_slash = b == _BACKSLASH
    slashes = np.flatnonzero(is_slash)
    if run % 2 and quote[0]:  # escaped by the odd run of backslashes that ended the previous block
        quote[0] = False
    if slashes.size:
        # a quote is escaped when an odd-length run of backslashes ends right before it
        run_starts = slashes[np.r_[True, np.diff(slashes) != 1]]
        after = slashes + 1
        after = after[after < b.size]
        cand = after[quote[after]]
        if cand.size:
            start = run_starts[np.searchsorted(run_starts, cand - 1, side="right") - 1]
            length = cand - start + np.where(start == 0, run, 0)  # a run from the block's start goes on from before
            quote[cand[length % 2 == 1]] = False
        tail = b.size - int(run_starts[-1]) if is_slash[-1] else 0
        run = tail + run if tail == b.size else tail
    else:
        run = 0
    parity = np.bitwise_xor.accumulate(quote.view(np.uint8))  # quotes so far in this block, mod 2
    if inside:
        parity ^= 1  # 1 from an opening quote to before its closing one
    structural = (b == _COMMA) | (b == _BRACKET) | (b == _BRACE)
    return int(np.count_nonzero(structural & (parity == 0))), int(parity[-1]), run


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use null or a number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the range of a double")
    return value


def _find_surrogate(obj: Any, path: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """Path and text of the first string (value or key) holding a lone surrogate."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return where, value
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, where + ("(key)",)))
                stack.append((v, where + (k,)))
        elif isinstance(value, list):
            stack.extend((v, where + (i,)) for i, v in enumerate(value))
    return None


def _where(path: tuple[Any, ...]) -> str:
    return " -> ".join(["body", *(str(p)[:40] for p in path)])


def parse_body(body: bytes, model: type[M], max_values: int, max_items: Mapping[str, int]) -> M:
    """Decode, bound, parse and validate one JSON body (see the module docstring); raises ApiError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start}): send UTF-8 encoded JSON",
                       code="invalid_encoding") from None
    n_values = rough_json_values(body)
    if n_values > max_values:  # commas and brackets inside strings count here: look closer
        n_values = count_json_values(body)
    if n_values > max_values:
        raise ApiError(413, f"request body holds about {n_values} JSON values (array items, object members), more "
                            f"than the limit of {max_values}; send fewer inputs per request",
                       code="too_many_values")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, NaN / Infinity, integers beyond Python's digit limit
        raise ApiError(400, f"malformed JSON body: {exc}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(body):  # valid pairs (emoji escapes) are fine; json.loads joined them
        found = _find_surrogate(obj)
        if found is not None:
            where, _ = found
            param = next((str(p) for p in where if isinstance(p, str)), None)
            raise ApiError(400, f"{_where(where)} is not valid Unicode: it holds a lone surrogate escape "
                                "(\\ud800-\\udfff without its pair)", code="invalid_input", param=param)
    if isinstance(obj, dict):
        for field, limit in max_items.items():
            items = obj.get(field)
            if isinstance(items, list) and len(items) > limit:
                raise ApiError(400, f"{field} has {len(items)} items, more than the largest allowed size {limit}",
                               code="too_many_inputs", param=field)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False, include_input=False), prefix=("body",)) from None


async def read_body(request: Request, model: type[M], max_values: int, max_items: Mapping[str, int]) -> M:
    """The request's body as ``model``; bodies over :data:`INLINE_BYTES` are handled in the thread pool."""
    body = await request.body()
    if len(body) <= INLINE_BYTES:
        return parse_body(body, model, max_values, max_items)
    return await run_in_threadpool(parse_body, body, model, max_values, max_items)
