"""Focused check of one CPU target of issue #5: traitlens capture of every layer's full output
(``ActivationCapture(device=None)``, the suite's ``tl_device`` case) vs the bare forward pass, on the suite's
CPU workload (bundled model, 8 batches of 8 x 64 random tokens), over ``--rounds`` rounds in one process,
timed as the suite times the CPU (``run.time_cases`` with per-batch pairs: every batch bare and with
capture back to back, in a seeded random order). Prints the per-round times and ratios and the median of
the per-batch ratios with a bootstrap interval. (The runs of f23286d in docs/benchmarks.md used a loop of
its own, which kept every batch in one capture without ``get``.)

The cost of keeping every layer's output on a CPU is fresh memory: about 280 MB per run that the kernel
must fault in and zero. So the check runs in three fresh processes that differ only in how memory is
allocated: the default; ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's switch for transparent huge pages on large
CPU allocations: a fault per 2 MB instead of per 4 kB); and glibc told never to give freed memory back to
the kernel (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``), so that a run reuses the pages the
previous run freed. Each is read when the process starts, so none can be set by a library.

    python benchmarks/capture_all_layers.py [--rounds 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from bench_report import bootstrap_median

SETTINGS = {
    "default allocator": {},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    "glibc keeps freed memory": {"MALLOC_TRIM_THRESHOLD_": str(2**34), "MALLOC_MMAP_THRESHOLD_": str(2**30)},
}


def measure(rounds: int) -> None:
    import torch
    from bench_cases import BUNDLED, make_workload
    from run import PROFILES, SIZE_KEYS, time_cases

    w = make_workload(BUNDLED, "cpu", torch.float32, **{k: PROFILES["cpu"][k] for k in SIZE_KEYS})
    batch_times: dict[str, list[float]] = {}
    per_round = time_cases(w, ["bare", "tl_device"], rounds, False, batch_times)  # the suite's CPU timing
    bare, capture = per_round["bare"], per_round["tl_device"]
    print("  bare s (per round)   ", [round(x, 2) for x in bare])
    print("  capture s (per round)", [round(x, 2) for x in capture])
    round_ratios = [c / b for b, c in zip(bare, capture, strict=True)]
    print("  per-round ratios", [round(x, 3) for x in round_ratios])
    medians = statistics.median(capture) / statistics.median(bare)
    print(f"  ratio of medians {medians:.3f}; median per-round ratio {statistics.median(round_ratios):.3f}")
    pairs = [c / b for b, c in zip(batch_times["bare"], batch_times["tl_device"], strict=True)]
    low, high = bootstrap_median(pairs)
    print(
        f"  per-batch pairs: {len(pairs)}, ratios {min(pairs):.3f}-{max(pairs):.3f}, median "
        f"**{statistics.median(pairs):.3f}** (95% bootstrap interval {low:.3f}-{high:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.rounds)
        return
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for label, env in SETTINGS.items():
        print(f"{label}:", flush=True)
        cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        print(out.stdout, end="", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
