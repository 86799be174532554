"""What the machine can do, read at run time: CPU model and features, the dtype ``"auto"`` picks, threads.

``dtype="auto"`` (the default everywhere) resolves per device:

- CUDA: bfloat16 where the GPU computes it natively (compute capability >= 8.0), else float32;
- CPU: bfloat16 only with native bf16 matrix instructions (``avx512_bf16`` or AMX ``amx_bf16``); anywhere
  else float32: without them bf16 matmuls are emulated and run *slower* than float32 (measured on an
  AVX2-only AMD EPYC, see README "Speed");
- other devices (MPS, XPU, ...): float32.

An explicit dtype always wins. ``"int8"`` is an option, never chosen by ``"auto"``: dynamic per-channel int8
Linear layers (see :mod:`tamis.models.quantize`), offered with its measured quality (README "Speed").

Features come from ``torch.cpu.get_capabilities()`` (cpuinfo, the library torch dispatches on) when this
torch has it, else from ``/proc/cpuinfo``; nothing is assumed from the CPU's name.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from tamis.errors import InvalidInputError

logger = logging.getLogger("tamis")

AUTO = "auto"
INT8 = "int8"
FLOAT_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "int8")

# features worth showing (x86 names as cpuinfo / Linux spell them, normalised to the Linux spelling)
_SHOWN = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
          "amx_int8", "amx_fp16", "asimd", "sve", "bf16", "i8mm")
_TORCH_NAMES = {"avx512_f": "avx512f", "avx512_bw": "avx512bw", "fma3": "fma"}


@dataclass(frozen=True)
class CPUInfo:
    """The CPU as torch sees it."""

    model: str
    arch: str
    capability: str  # torch's kernel dispatch level: AVX2, AVX512, DEFAULT, ...
    flags: frozenset[str] = field(default_factory=frozenset)
    physical_cores: int = 1
    logical_cpus: int = 1

    @property
    def bf16_native(self) -> bool:
        """bf16 matrix instructions (AVX-512 BF16 or AMX-BF16): bf16 GEMMs faster than float32."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def int8_native(self) -> bool:
        """int8 dot-product instructions (VNNI or AMX-INT8); without them int8 GEMMs use AVX2 u8*s8 pairs."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def features(self) -> list[str]:
        return [f for f in _SHOWN if f in self.flags]

    def describe(self) -> str:
        """One line, e.g. ``AMD EPYC, x86_64, 2 cores, AVX2 (avx2 fma); no native bf16, no VNNI``."""
        extra = []
        extra.append("native bf16" if self.bf16_native else "no native bf16")
        extra.append("int8 VNNI/AMX" if self.int8_native else "no VNNI")
        feats = " ".join(self.features) or "-"
        return (f"{self.model}, {self.arch}, {self.physical_cores} cores, {self.capability} ({feats}); "
                f"{', '.join(extra)}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "arch": self.arch, "capability": self.capability,
                "features": self.features, "bf16_native": self.bf16_native, "int8_native": self.int8_native,
                "physical_cores": self.physical_cores, "logical_cpus": self.logical_cpus}


def _proc_cpuinfo() -> tuple[str, set[str], int]:
    """(model name, flags, physical cores) from /proc/cpuinfo; empty values where it is missing."""
    model, flags, cores = "", set(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("model name", "Model Name", "cpu model") and not model:
                    model = value
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and phys is not None and core is not None:
                    cores.add((phys, core))
                    phys = core = None
            if phys is not None and core is not None:
                cores.add((phys, core))
    except OSError:
        pass
    return model, flags, len(cores)


def _available_cpus() -> int:
    """CPUs this process may run on: affinity mask and cgroup v2 quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


@lru_cache(maxsize=1)
def cpu_info() -> CPUInfo:
    """The CPU's model, features and core count (cached for the process)."""
    model, flags, phys = _proc_cpuinfo()
    logical = os.cpu_count() or 1
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        try:
            c = caps()
            model = model or str(c.get("cpu_name") or "")
            phys = int(c.get("num_physical_cores") or phys or 0)
            logical = int(c.get("num_logical_cores") or logical)
            for name, on in c.items():
                if on is True:
                    flags.add(_TORCH_NAMES.get(name, name))
                elif on is False:  # cpuinfo knows better than /proc flags that the OS may not enable
                    flags.discard(_TORCH_NAMES.get(name, name))
        except Exception:  # noqa: BLE001 - a probe, never fatal
            pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        capability = "unknown"
    cores = min(phys or logical, _available_cpus())
    return CPUInfo(model=model or platform.processor() or "unknown CPU", arch=platform.machine(),
                   capability=capability, flags=frozenset(flags), physical_cores=max(1, cores),
                   logical_cpus=logical)


# ------------------------------------------------------------------------------------------ dtype


@dataclass(frozen=True)
class Precision:
    """What a model computes in: a float ``dtype`` for weights and activations, optionally int8 Linears."""

    dtype: torch.dtype
    int8: bool = False
    requested: str = AUTO
    reason: str = ""

    @property
    def name(self) -> str:
        return INT8 if self.int8 else str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        return self.name


def auto_dtype(device: str | torch.device = "cpu", cpu: CPUInfo | None = None) -> tuple[torch.dtype, str]:
    """The dtype ``"auto"`` picks for ``device``, and why."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "GPU with native bf16"
        return torch.float32, "GPU without native bf16"
    if dev.type == "cpu":
        cpu = cpu or cpu_info()
        if cpu.bf16_native:
            native = "AMX" if "amx_bf16" in cpu.flags else "AVX-512 BF16"
            return torch.bfloat16, f"CPU with native bf16 ({native})"
        return torch.float32, f"CPU without native bf16 ({cpu.capability}): bf16 would be emulated"
    return torch.float32, f"{dev.type}: float32"


def resolve_precision(dtype: str | torch.dtype | None, device: str | torch.device = "cpu",
                      cpu: CPUInfo | None = None) -> Precision:
    """``"auto"`` / None, a float dtype name or ``torch.dtype``, or ``"int8"`` -> :class:`Precision`."""
    if isinstance(dtype, torch.dtype):
        return Precision(dtype, False, str(dtype).removeprefix("torch."), "explicit")
    name = AUTO if dtype is None else str(dtype).lower()
    if name == AUTO:
        chosen, why = auto_dtype(device, cpu)
        return Precision(chosen, False, AUTO, why)
    if name == INT8:
        if torch.device(device).type != "cpu":
            raise InvalidInputError("dtype='int8' (dynamic int8 Linear layers) runs on CPU only")
        return Precision(torch.float32, True, INT8, "explicit: dynamic int8 Linear layers, float32 elsewhere")
    if name in FLOAT_DTYPES:
        return Precision(FLOAT_DTYPES[name], False, name, "explicit")
    raise InvalidInputError(f"unknown dtype {dtype!r}; use one of {list(DTYPE_CHOICES)}")


# ------------------------------------------------------------------------------------------ compile

COMPILE_ENV = "TAMIS_COMPILE"


def compile_env_off() -> bool:
    """Whether ``TAMIS_COMPILE`` (0 / false / off / no) turns ``compile="auto"`` off."""
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("0", "false", "off", "no")


def auto_compile(device: str | torch.device, precision: Precision, cpu: CPUInfo | None = None) -> tuple[bool, str]:
    """Whether ``compile="auto"`` compiles a packed BERT-family forward here, and why.

    Yes only where it was measured to pay: bf16 on a CPU with native bf16, where inductor's freezing
    (prepacked oneDNN weights, GELU and residual adds fused into the Linear layers) made embedding 1.2x and
    short inputs 1.1x faster than the eager packed path (README "Speed"). Not on float32 / emulated-bf16 CPUs
    (measured there without freezing: no gain) nor on GPUs (not measured). ``TAMIS_COMPILE=0`` turns the
    automatic choice off (an explicit ``compile=True`` still compiles)."""
    if compile_env_off():
        return False, f"{COMPILE_ENV}={os.environ[COMPILE_ENV]}"
    if torch.device(device).type != "cpu":
        return False, f"{torch.device(device).type}: not measured, eager"
    if precision.int8 or precision.dtype != torch.bfloat16:
        return False, f"{precision.name} on CPU: compiling measured no gain, eager"
    cpu = cpu or cpu_info()
    if not cpu.bf16_native:
        return False, "bf16 without native bf16: eager"
    return True, "bf16 on a CPU with native bf16: inductor with frozen weights"


def resolve_compile(compile: bool | str, device: str | torch.device, precision: Precision,
                    cpu: CPUInfo | None = None) -> tuple[bool, str]:
    """``compile`` as the models take it (True, False or ``"auto"``) -> (compile or not, why)."""
    if isinstance(compile, str):
        if compile.strip().lower() != AUTO:
            raise InvalidInputError(f"compile must be True, False or 'auto', not {compile!r}")
        return auto_compile(device, precision, cpu)
    return bool(compile), "explicit"


# ------------------------------------------------------------------------------------------ threads

_threads_set = False


def configure_threads() -> int:
    """Use one intra-op thread per physical core this process may use, unless the user chose already.

    Left alone when ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is set or ``torch.set_num_threads`` was
    called with another value before; called once per process by the model loaders. Returns the count.
    """
    global _threads_set
    if _threads_set or os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return torch.get_num_threads()
    _threads_set = True
    want = cpu_info().physical_cores
    if torch.get_num_threads() != want:
        logger.debug("torch threads %d -> %d (physical cores available)", torch.get_num_threads(), want)
        torch.set_num_threads(want)
    return want


def tokenize_beside_model(device: str | torch.device) -> bool:
    """Whether a large input's next slab of texts should be tokenized on a helper thread while the model runs
    the current one: on an accelerator (which would otherwise wait for the host), and on a CPU only when one is
    left over beside torch's intra-op threads. On a CPU it measured worth little either way (tokenizing is
    1.7-3.2 % of embedding time; benchmarks/tokenize_overlap.py, README "Speed"), so where torch's threads own
    every core tokenizing stays in turn."""
    if torch.device(device).type != "cpu":
        return True
    return _available_cpus() > torch.get_num_threads()


def runtime_summary(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, features, threads and torch build, for ``tamis bench`` and start-up logs."""
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    out["cpu"] = cpu_info().to_dict()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out
