"""Throughput of sharded extraction on a local Ray instance: 1 vs 2 workers, and one process for reference.

    python benchmarks/distributed.py [--pairs 128] [--layers 6,14,22] [--shard-size 16]

Each run computes the streaming statistics (``stream_statistics``) of the same pairs of the shipped data
(all splits, repeated to ``--pairs``) on the bundled model. Reported per run: wall time (including the
workers' model loading), pairs per second over the wall time, and pairs per second while the workers were
computing (the shard time summed over workers). Numbers are ratios from one run on one machine: the
machine is named in the output.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), load average {load:.1f}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--layers", default="6,14,22")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import ray

    from traitlens import load_dataset, load_model
    from traitlens.distributed import RayCluster, distributed_statistics
    from traitlens.pipeline import stream_statistics

    layers = [int(x) for x in args.layers.split(",")]
    shipped = load_dataset("sentiment").pairs
    pairs = [shipped[i % len(shipped)] for i in range(args.pairs)]
    print(f"machine: {machine()}")
    print(f"{args.pairs} pairs, layers {layers}, shard size {args.shard_size}, batch size {args.batch_size}")

    model, tokenizer = load_model()
    torch.set_num_threads(1)  # the same budget as one worker (each Ray worker gets num_cpus=1)
    start = time.perf_counter()
    reference = stream_statistics(model, tokenizer, pairs, layers=layers, batch_size=args.batch_size)
    single = time.perf_counter() - start
    print(f"{'run':<22}{'wall s':>9}{'pairs/s wall':>14}{'pairs/s busy':>14}")
    print(f"{'one process, 1 thread':<22}{single:9.1f}{args.pairs / single:14.2f}{args.pairs / single:14.2f}")
    del model

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(f"(Ray start: {time.perf_counter() - start:.1f} s, not counted below)")
    for workers in (1, 2):
        shards: list = []
        with tempfile.TemporaryDirectory() as out:
            cluster = RayCluster(workers=workers, out_dir=out, shard_size=args.shard_size)
            start = time.perf_counter()
            stats = distributed_statistics(
                pairs, layers=layers, batch_size=args.batch_size, cluster=cluster, progress=False,
                on_shard=shards.append,
            )  # fmt: skip
            wall = time.perf_counter() - start
        busy = sum(s.seconds for s in shards) / workers
        error = float(
            (stats.mean_difference() - reference.mean_difference()).norm()
            / reference.mean_difference().norm()
        )
        label = f"Ray, {workers} worker{'s' if workers > 1 else ''}"
        print(f"{label:<22}{wall:9.1f}{args.pairs / wall:14.2f}{args.pairs / busy:14.2f}"
              f"   (mean difference vs one process: {error:.1e} relative)")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
