"""Native memory of a long-running server (issue 34, item E): allocator settings applied at start-up.

A server sees a new batch shape (rows x length) at almost every model call. Each shape allocates its own
set of large activation buffers (a few hundred KB to tens of MB), frees them, and the next shape asks for
other sizes. With glibc's defaults that fragments native memory without bound:

* glibc serves a block over ``M_MMAP_THRESHOLD`` (128 KiB at first) with its own ``mmap`` and gives it back
  to the system when freed, but the first free of such a block *raises* the threshold to the block's size
  (up to 32 MiB). From then on every activation buffer is carved from the heap of the thread that runs
  the model (a non-main thread: an arena made of 64 MiB heaps), freed buffers of one shape are the wrong
  size for the next, and an arena returns memory only from its top: RSS climbs with the variety of shapes
  seen (the probe: 517 MB -> 2 GB over 2,578 requests; one fixed shape stays flat).
* every thread that allocates while another holds the main arena gets an arena of its own (up to 8 per
  core): the request threads that parse bodies and tokenize leave their freed memory there.

:func:`tune_allocator` fixes the threshold at 128 KiB (``mallopt(M_MMAP_THRESHOLD)``, which also turns the
dynamic raise off), so activation buffers always come from ``mmap`` and go back when freed, and bounds the
arenas (``M_ARENA_MAX``); both are set through ``mallopt`` while the process runs, before torch loads (the
``MALLOC_*_`` environment variables would have to be set before the interpreter starts). An environment
variable the user set (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX``) wins. :func:`trim` hands free
pages of every arena back (``malloc_trim``); the model workers call it when their queue runs empty.
oneDNN (the bf16 / int8 CPU paths) caches one compiled kernel per shape, 1,024 by default:
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is set to :data:`ONEDNN_CACHE` unless already set.
Nothing happens on other C libraries (musl, macOS): the functions then report that they did nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

logger = logging.getLogger("tamis.server")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed (no dynamic raise)
ARENA_MAX = 2
ONEDNN_CACHE = "32"
TRIM_EVERY_S = 5.0  # trim at most this often

_libc: ctypes.CDLL | None = None
_lock = threading.Lock()
_last_trim = 0.0


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # glibc only  # noqa: B018
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = libc
        except (OSError, AttributeError):
            return None
    return _libc


def tune_allocator() -> dict[str, str]:
    """Apply the settings of the module docstring; returns what was set (empty when nothing could be)."""
    done: dict[str, str] = {}
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = ONEDNN_CACHE
        done["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = ONEDNN_CACHE
    libc = _glibc()
    if libc is None:
        return done
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
        done["M_MMAP_THRESHOLD"] = str(MMAP_THRESHOLD)
    if "MALLOC_ARENA_MAX" not in os.environ and libc.mallopt(M_ARENA_MAX, ARENA_MAX) == 1:
        done["M_ARENA_MAX"] = str(ARENA_MAX)
    return done


def trim(force: bool = False) -> bool:
    """Give free heap pages back to the system (glibc ``malloc_trim``), at most every :data:`TRIM_EVERY_S`
    unless ``force``; returns whether it ran."""
    global _last_trim
    libc = _glibc()
    if libc is None:
        return False
    now = time.monotonic()
    with _lock:
        if not force and now - _last_trim < TRIM_EVERY_S:
            return False
        _last_trim = now
    libc.malloc_trim(0)
    return True
