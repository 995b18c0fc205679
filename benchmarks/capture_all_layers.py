"""Focused check of one CPU target of issue #5: traitlens capture of every layer's full output vs the bare
forward pass (bundled model, 8 batches of 8 x 64 random tokens), alternating the two over ``--rounds``
rounds in one process. Prints the per-round times and ratios.

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

SETTINGS = {
    "default allocator": {},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    "glibc keeps freed memory": {"MALLOC_TRIM_THRESHOLD_": str(2**34), "MALLOC_MMAP_THRESHOLD_": str(2**30)},
}


def measure(rounds: int) -> None:
    import torch

    from traitlens import ActivationCapture, HookManager, decoder_layer_paths, load_model

    model, _ = load_model()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 40000, (8, 64), generator=generator)} for _ in range(8)]
    paths = decoder_layer_paths(model)

    def bare():
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    def capture_all():
        capture = ActivationCapture(device=None)
        with torch.no_grad(), HookManager(model) as hooks:
            for i, path in enumerate(paths):
                hooks.add_forward_hook(path, capture.make_hook(str(i)))
            for batch in batches:
                model(**batch)
        return capture

    bare(), capture_all()  # warm-up
    times: dict[str, list[float]] = {"bare": [], "capture": []}
    for r in range(rounds):
        order = [("bare", bare), ("capture", capture_all)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            kept = run()
            times[name].append(time.perf_counter() - start)
            del kept
    ratios = [c / b for b, c in zip(times["bare"], times["capture"], strict=True)]
    print("  bare s    ", [round(x, 2) for x in times["bare"]])
    print("  capture s ", [round(x, 2) for x in times["capture"]])
    print("  per-round ratios", [round(x, 3) for x in ratios])
    median_ratio = statistics.median(times["capture"]) / statistics.median(times["bare"])
    print(f"  ratio of medians {median_ratio:.3f}; median per-round ratio {statistics.median(ratios):.3f}")


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
