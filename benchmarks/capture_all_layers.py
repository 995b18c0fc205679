"""Focused check of one CPU target of issue #5: traitlens capture of every layer's full output vs the bare
forward pass (bundled model, 8 batches of 8 x 64 random tokens), alternating the two over ``--rounds``
rounds in one process. Each round captures the whole workload into one capture; every batch is timed bare
and with capture back to back (in a seeded random order), so each batch gives one paired ratio. Prints the
per-round times and ratios and the median of the per-batch ratios with a bootstrap interval.

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
import time

from bench_report import bootstrap_median

SETTINGS = {
    "default allocator": {},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    "glibc keeps freed memory": {"MALLOC_TRIM_THRESHOLD_": str(2**34), "MALLOC_MMAP_THRESHOLD_": str(2**30)},
}


def measure(rounds: int) -> None:
    import random

    import torch

    from traitlens import ActivationCapture, HookManager, decoder_layer_paths, load_model

    model, _ = load_model()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 40000, (8, 64), generator=generator)} for _ in range(8)]
    paths = decoder_layer_paths(model)

    def bare(batch, capture):
        model(**batch)

    def capture_all(batch, capture):
        with HookManager(model) as hooks:
            for i, path in enumerate(paths):
                hooks.add_forward_hook(path, capture.make_hook(str(i)))
            model(**batch)

    with torch.no_grad():
        for batch in batches[:2]:  # warm-up
            bare(batch, None), capture_all(batch, ActivationCapture(device=None))
        # Each round captures the whole workload into one capture, as a user's run would, but every batch is
        # timed on its own, bare and with capture one after the other in a seeded random order: the two
        # sides of a pair are a second apart, so drift on this shared machine (seconds to minutes) hits both.
        times: dict[str, list[float]] = {"bare": [], "capture": []}
        order = random.Random(0)
        for _ in range(rounds):
            capture = ActivationCapture(device=None)
            for batch in batches:
                cases = [("bare", bare), ("capture", capture_all)]
                for name, run in order.sample(cases, 2):
                    start = time.perf_counter()
                    run(batch, capture)
                    times[name].append(time.perf_counter() - start)
            del capture
    n = len(batches)
    per_round = {name: [sum(t[i : i + n]) for i in range(0, len(t), n)] for name, t in times.items()}
    print("  bare s (per round)   ", [round(x, 2) for x in per_round["bare"]])
    print("  capture s (per round)", [round(x, 2) for x in per_round["capture"]])
    round_ratios = [c / b for b, c in zip(per_round["bare"], per_round["capture"], strict=True)]
    print("  per-round ratios", [round(x, 3) for x in round_ratios])
    medians = statistics.median(per_round["capture"]) / statistics.median(per_round["bare"])
    print(f"  ratio of medians {medians:.3f}; median per-round ratio {statistics.median(round_ratios):.3f}")
    pairs = [c / b for b, c in zip(times["bare"], times["capture"], strict=True)]
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
