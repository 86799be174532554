"""CPU kernels that torch does not offer at the speed tamis needs, compiled on first use.

``attention_bf16`` (``attention_bf16.cpp``): packed multi-head attention for bf16 inference, every run of a
packed batch in one call, the scores of each (sequence, head) kept in cache (README "Speed"). Used by the packed
bf16 attention on CPUs with AVX-512 BF16 (:func:`tamis.models.packed.use_matmul_attention`).

The source is compiled once per (source, torch, compiler) into ``$TAMIS_CACHE/kernels`` (default
``~/.cache/tamis/kernels``) with the C++ compiler and OpenMP that ``torch.compile`` already needs, and loaded with
``torch.ops.load_library``: no build step at install time, no ninja. Where the CPU lacks the instructions, no
compiler is found or the build fails, :func:`attention_bf16` returns None (the failure logged once) and callers
keep torch's kernel. ``TAMIS_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from tamis.hardware import cpu_info

logger = logging.getLogger(__name__)

# Instructions the kernel is compiled for; it is loaded only where the CPU reports all of them.
_NEEDS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
_ARCH_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
# Head sizes attention_bf16.cpp is instantiated for (it rejects others; callers keep torch's path for them).
ATTENTION_HEAD_SIZES = (32, 64, 128)


def kernels_off() -> bool:
    """``TAMIS_KERNELS=0`` (or false / off / no): torch's kernels everywhere."""
    return os.environ.get("TAMIS_KERNELS", "").strip().lower() in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """Where built kernels are kept: ``$TAMIS_CACHE/kernels``, default ``~/.cache/tamis/kernels``."""
    root = Path(os.environ["TAMIS_CACHE"]).expanduser() if os.environ.get("TAMIS_CACHE") else \
        Path("~/.cache/tamis").expanduser()
    return root / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(source: Path, compiler: str) -> Path:
    """Compile ``source`` into a shared library in :func:`cache_dir` (reused when it is there already)."""
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *_ARCH_FLAGS]
    key = hashlib.sha256(b"\0".join([source.read_bytes(), torch.__version__.encode(), compiler.encode(),
                                     " ".join(flags).encode()])).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        cmd = [compiler, *flags, *includes, str(source), "-o", str(part), *libs, "-lc10", "-ltorch_cpu"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"{Path(compiler).name} failed: {errors[0].strip() if errors else done.returncode}")
        os.replace(part, out)  # atomic: a process beside this one sees the whole library or none
    return out


def _registered(op: str) -> bool:
    """Whether ``namespace::name`` is in torch's registry already (a library loads once per process)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    except RuntimeError:  # "operator ... does not exist"
        return False


_OFF: dict[str, str] = {}  # kernel -> why it is off in this process


@functools.cache
def _load(stem: str, op: str) -> bool:
    """Build (or find) ``<stem>.cpp`` and load its ops into ``torch.ops``; False where it cannot run here (the
    reason in :func:`why_off`)."""
    _OFF.pop(stem, None)
    if kernels_off():
        _OFF[stem] = "TAMIS_KERNELS=0"
        return False
    missing = _NEEDS - cpu_info().flags
    if missing:
        _OFF[stem] = f"the CPU lacks {', '.join(sorted(missing))}"
        return False
    if _registered(op):
        return True
    compiler = _compiler()
    if compiler is None:
        _OFF[stem] = "no C++ compiler"
        logger.info("no C++ compiler: tamis's %s kernel is off (torch's kernels are used)", stem)
        return False
    try:
        torch.ops.load_library(str(_build(Path(__file__).with_name(f"{stem}.cpp"), compiler)))
    except Exception as exc:  # a failed build must not stop a model from running: torch's kernels are used
        _OFF[stem] = f"build failed: {exc}"
        logger.warning("tamis's %s kernel did not build, torch's kernels are used (%s)", stem, exc)
        return False
    return True


def why_off(stem: str) -> str | None:
    """Why kernel ``stem`` is not used in this process (None: it is loaded, or was not asked for yet)."""
    return _OFF.get(stem)


def attention_path() -> str:
    """What packed bf16 CPU attention runs here, for ``tamis bench`` and start-up logs (builds the kernel if
    it can)."""
    if attention_bf16() is not None:
        return "tamis fused bf16 kernel (AVX-512 BF16)"
    return f"torch matmul + softmax ({why_off('attention_bf16')})"


def attention_bf16() -> Callable[..., torch.Tensor] | None:
    """``f(q, k, v, runs, n_heads, scale)``: packed attention (see ``attention_bf16.cpp``); None where the kernel
    cannot run here."""
    return torch.ops.tamis_attention.attention_bf16 if _load("attention_bf16", "tamis_attention::attention_bf16") \
        else None
