"""Start ``python -m tamis.server`` on a free 127.0.0.1 port for the benchmark scripts (loopback only)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, server_args: list[str], log: Any, timeout_s: float = 180) -> subprocess.Popen:
    """Run the server with ``server_args`` and wait until ``/health`` answers 200 (or raise)."""
    cmd = [sys.executable, "-m", "tamis.server", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *server_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
