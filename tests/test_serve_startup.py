"""`tamis serve` start-up as a process (issue 36, items 1 and 6): a model that cannot load ends the process with
status 1 and one line; Ctrl-C at any moment of start-up stops it cleanly (no ``terminate called without an active
exception``, exit 134, from an interpreter shutting down beside the loader thread inside torch)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path: Path, *args: str, log_level: str = "warning") -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tamis.cli", "serve", "--port", str(port), "--log-level", log_level,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, port


def _status(port: int, path: str) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code
    except httpx.HTTPError:
        return None


def test_serve_exits_1_when_a_local_model_directory_is_missing(tmp_path: Path) -> None:
    proc, _ = _serve(tmp_path, "--offline", "--embedding-model", "./nope/model")
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("tamis: error:")]
    assert len(lines) == 1 and "model loading failed" in lines[0] and "nope/model" in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("moment", ["before-port", "port-open", "loading-1", "loading-3", "loading-6", "ready"])
def test_ctrl_c_at_any_moment_of_start_up_stops_cleanly(tmp_path: Path, moment: str) -> None:
    """SIGINT at points of start-up found by watching the process (not by the clock): once it logs that it is
    about to serve (the port not yet open), as soon as /livez answers, after 1 / 3 / 6 polls of /health
    answering "loading", and once ready."""
    proc, port = _serve(tmp_path, log_level="info")
    seen = "started"
    early: list[str] = []
    try:
        if moment == "before-port":
            assert proc.stderr is not None
            for line in proc.stderr:
                early.append(line)
                if "serving on http://" in line:
                    break
            seen = "before the port opens"
        else:
            while proc.poll() is None and _status(port, "/livez") != 200:
                time.sleep(0.05)
            seen = "port-open"
            if moment.startswith("loading-"):
                polls = 0
                while proc.poll() is None and polls < int(moment.split("-")[1]) and _status(port, "/health") == 503:
                    polls += 1
                    time.sleep(0.25)
                seen = f"loading ({polls} polls)"
            elif moment == "ready":
                while proc.poll() is None and _status(port, "/health") != 200:
                    time.sleep(0.1)
                seen = "ready"
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        err = "".join(early) + err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, 130), (seen, proc.returncode, err)
    assert "terminate called" not in err and "Traceback" not in err, (seen, err)
