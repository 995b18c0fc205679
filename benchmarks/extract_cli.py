"""Wall time and peak memory of ``traitlens extract --trait sentiment`` (all layers x all methods, model load,
report included), each run in a fresh process. Prints a markdown table row per run.

    python benchmarks/extract_cli.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trait", default="sentiment")
    args = parser.parse_args()
    import torch
    import transformers

    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| run | wall time (s) | peak RSS (GB) |")
    print("| --- | --- | --- |")
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            subprocess.run(
                [sys.executable, "-m", "traitlens.cli", "extract", "--trait", args.trait, "--out", out],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wall = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB, max over children so far
        note = "" if peak > before else " (not above an earlier run's peak)"
        print(f"| {run + 1} | {wall:.1f} | {peak / 2**20:.2f}{note} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
