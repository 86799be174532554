"""Start-up time of the command line: wall time of ``tamis --help``, an argument error and ``import tamis``,
median of N fresh processes each, with the CPU model.

    python benchmarks/cli_startup.py [--runs 5] [--src path/to/other/checkout/src]

``--src`` times another checkout (e.g. the commit before a change) with the same interpreter, so the two
are compared on one machine in one run. The console script ``tamis`` is ``python -m tamis.cli`` plus the
entry-point shim, so the module form is what is timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tamis.train.card import cpu_model

CASES = {
    "tamis --help": ["-m", "tamis.cli", "--help"],
    "tamis embed --dimensions 0 (argument error)": ["-m", "tamis.cli", "embed", "--dimensions", "0"],
    "python -c 'import tamis'": ["-c", "import tamis"],
}


def median_seconds(args: list[str], src: str, runs: int) -> float:
    env = dict(os.environ, PYTHONPATH=src)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--src", action="append", default=[], help="another checkout's src/ to time beside this one")
    a = p.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    sources = [("this checkout", here)] + [(s, s) for s in a.src]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); python {platform.python_version()}; "
          f"median of {a.runs} runs, seconds")
    for name, args in CASES.items():
        cells = [f"{label}: {median_seconds(args, src, a.runs):.3f}" for label, src in sources]
        print(f"{name:<46} " + "   ".join(cells))


if __name__ == "__main__":
    main()
