"""Start ``python -m tamis.server`` on a free 127.0.0.1 port for the benchmark scripts (loopback only), and
nginx in front of replicas with README's block as written (also used by tests/test_replicas.py)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
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
    return wait_healthy(proc, port, timeout_s, "server", lambda: f"exited with {proc.returncode}; see its log")


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float, what: str,
                 exit_reason: Callable[[], str]) -> subprocess.Popen:
    """Return ``proc`` once ``http://127.0.0.1:{port}/health`` answers 200; raise if it exits first
    (with ``exit_reason()``) or is not ready in ``timeout_s`` (then it is killed)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} {exit_reason()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} not ready in {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


README = Path(__file__).resolve().parents[1] / "README.md"
README_PORTS = ("127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8080")  # two replicas, then the balancer


def readme_nginx_block() -> str:
    """README's one ``nginx`` code block."""
    blocks = re.findall(r"```nginx\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    if len(blocks) != 1:
        raise RuntimeError(f"README should hold one nginx example, found {len(blocks)}")
    return blocks[0]


def start_nginx(tmp: Path, backends: list[int], port: int, connections: int = 64) -> subprocess.Popen:
    """nginx (foreground, files under ``tmp``) running README's block with its replica ports replaced by
    ``backends`` and its listening port by ``port``; returns once ``/health`` answers through it."""
    block = readme_nginx_block()
    for readme_port, real in zip(README_PORTS, [*backends, port]):
        if readme_port not in block:
            raise RuntimeError(f"README's nginx block no longer names {readme_port}")
        block = block.replace(readme_port, f"127.0.0.1:{real}")
    temp = "\n".join(f"    {k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(("user root;\n" if os.geteuid() == 0 else "")  # workers must reach the private temp dirs
                    + f"worker_processes 1;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} warn;\n"
                    + f"events {{ worker_connections {connections}; }}\n"
                    + f"http {{\n    access_log off;\n{temp}\n{block}}}\n")
    proc = subprocess.Popen([shutil.which("nginx") or "nginx", "-p", str(tmp), "-c", str(conf), "-e",
                             str(tmp / "error.log"), "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    return wait_healthy(proc, port, 30, "nginx", lambda: f"exited: {proc.stderr.read().decode()[-2000:]}")
