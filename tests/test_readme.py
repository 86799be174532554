"""README's runnable blocks, run as they stand on the bundled model, offline (issue 38).

Every ```python and ```bash block of README.md runs, in order, in a fresh directory: the Python blocks in one
namespace (one session, as a reader pastes them), each shell block in its own ``bash -euo pipefail``. A block
that cannot run here says so in an HTML comment right above its fence:

    <!-- readme-test: skip (why: needs a GPU, Ray, the Hub, ../shared/data, runs until stopped, ...) -->
    <!-- readme-test: from "TEXT" (why) -->     run the block from the first TEXT on (e.g. after an install)

Other fences (nginx, yaml) are not run here; tests/test_replicas.py runs README's nginx block. The docs site is
checked by ``mkdocs build --strict`` in .ci/run; README's own links into docs/ are checked below.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash", "console": None}
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```([\w+-]*)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directive: str | None  # the text after "readme-test:", if any

    @property
    def kind(self) -> str | None:
        return RUNNABLE.get(self.lang)

    @property
    def skip_reason(self) -> str | None:
        m = re.fullmatch(r"skip\s*\((.+)\)", self.directive or "")
        return m.group(1).strip() if m else None

    @property
    def start_at(self) -> str | None:
        m = re.fullmatch(r'from\s+"([^"]+)"(\s*\(.*\))?', self.directive or "")
        return m.group(1) if m else None

    def runnable_code(self) -> str:
        if self.start_at is None:
            return self.code
        i = self.code.find(self.start_at)
        assert i >= 0, f'README line {self.line}: readme-test from "{self.start_at}" is not in the block'
        return self.code[i:]


def blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        directive = None
        k = start - 1
        while k >= 0 and lines[k].strip().startswith("<!--") and lines[k].strip().endswith("-->"):
            d = DIRECTIVE.search(lines[k])
            if d:
                directive = d.group(1)
            k -= 1
        out.append(Block(start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", directive))
        i = j + 1
    return out


BLOCKS = blocks(README.read_text(encoding="utf-8"))
PY = [b for b in BLOCKS if b.kind == "python"]
SH = [b for b in BLOCKS if b.kind == "bash"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TAMIS_COMPILE="0", PYTHONUNBUFFERED="1")
    # `tamis` and `python` as installed beside the interpreter running the tests
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# ------------------------------------------------------------------------------------------- the markers


def test_every_code_block_runs_or_says_why_not() -> None:
    assert PY and SH, "README should have Python and shell blocks"
    for b in BLOCKS:
        if b.directive is None:
            continue
        assert b.skip_reason or b.start_at, (
            f"README line {b.line}: 'readme-test: {b.directive}' is neither 'skip (reason)' nor 'from \"TEXT\"'")
    running = [b for b in PY + SH if b.skip_reason is None]
    assert len(running) >= 3, "most of README's tour should run; only blocks that cannot run offline are skipped"


def test_readme_stays_a_front_door() -> None:
    """Issue 38: README is the front door (~200 lines); the long stories live on docs pages it links to."""
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 230, f"README has {n} lines: move measurements and stories to a docs/ page and link it"


def test_readme_links_into_docs_exist() -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs/)[^)#\s]+)(?:#[^)\s]*)?\)", text)
    assert links, "README should link into docs/"
    for link in links:
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_readme_test_command_is_what_ci_runs() -> None:
    """README's "run the checks" command, the docs build included, is .ci/run's last line, word for word."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert "mkdocs build --strict" in ci and "'.[test,docs]'" in ci
    assert any(b.code.strip() == ci for b in SH), "README should show .ci/run's command as it is"


# -------------------------------------------------------------------------------------- running them


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*were truncated")  # the tour's over-long text: the warning it shows
def test_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = [b for b in PY if b.skip_reason is None]
    if not run:
        pytest.skip("no runnable Python block")
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "__readme__"}
    for b in run:
        code = compile(b.runnable_code(), f"{README}:{b.line}", "exec")
        try:
            exec(code, scope)
        except Exception as exc:  # say which block, then the original traceback
            raise AssertionError(f"README's Python block at line {b.line} failed: {exc!r}") from exc


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in SH if b.skip_reason is None], ids=lambda b: f"line{b.line}")
def test_shell_block_runs(block: Block, tmp_path: Path) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.runnable_code()], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (f"README's shell block at line {block.line} exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
