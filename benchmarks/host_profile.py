"""Where the host time of the capture cases goes inside a real forward pass (issue #5 diagnostics).

``hook_overhead.py`` times hook calls in a tight loop; on the H200 (code at 3b8f6eb) it put a small chunk's
store at 69 us, while the suite's cases of the 135M shape cost about 300 us more per hook call than the bare
pass. This runs one batch of each chosen case of the suite's workload under ``torch.profiler`` and prints,
next to the bare case, the operations and CUDA runtime calls with the most host time, and how often each
case calls the CUDA runtime functions that can cost the host most (synchronisations, pinned allocations,
event queries). Counts are exact; times include the profiler's own overhead. Before that, without the
profiler, it times no-op hooks (what a hook costs at all), capture to CPU by each copy path and each way
of waiting in ``get``, and capture during ``generate`` with two ways of joining the chunks.

    python benchmarks/host_profile.py                       # cuda, SmolLM2-135M shape, bf16
    python benchmarks/host_profile.py --device cpu --model tiny
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from bench_cases import CASE_BY_KEY, _traitlens, _with_raw_hooks, make_workload
from run import _sync, time_cases
from torch.profiler import ProfilerActivity, profile

from traitlens import ActivationCapture, capture

WATCHED = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaHostAlloc",
    "cudaEventQuery",
    "cudaEventRecord",
    "cudaStreamWaitEvent",
    "cudaMemcpyAsync",
    "cudaLaunchKernel",
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2-135m-shape")
    parser.add_argument("--cases", default="bare,tl_cpu,tl_last,gen_plain,gen_tl")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rows", type=int, default=12, help="rows of each table")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds without the profiler")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    w = make_workload(
        args.model, args.device, torch.bfloat16 if cuda else torch.float32, n_prompts=16, batch_size=16,
        seq_len=512 if cuda else 32, gen_prompts=16, gen_batch_size=16, gen_prompt_len=512 if cuda else 32,
        new_tokens=args.new_tokens,
    )  # fmt: skip
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"host_profile on {name}, torch {torch.__version__}: {w.describe()}", flush=True)
    time_in_passes(w, args.rounds)  # first: on the GPU machine this runs last, under a time limit
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    counts: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for key in args.cases.split(","):
            case = CASE_BY_KEY[key]
            for _ in range(2):  # warm: allocator caches, pinned blocks, kernels
                case.run(w)
            _sync(device)
            start = time.perf_counter()
            case.run(w)
            _sync(device)
            seconds = time.perf_counter() - start
            with profile(activities=activities) as prof:
                case.run(w)
                _sync(device)
            rows = prof.key_averages()
            counts[key] = {e.key: e.count for e in rows if e.key in WATCHED}
            print(f"\n== {key}: {case.label}\n   one run {seconds * 1e3:.1f} ms unprofiled", flush=True)
            print(rows.table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
    keys = list(counts)
    print("\ncalls per run of the watched CUDA runtime functions")
    print(f"{'':24s}" + "".join(f"{k:>12s}" for k in keys))
    for fn in WATCHED:
        print(f"{fn:24s}" + "".join(f"{counts[k].get(fn, 0):12d}" for k in keys))


def time_in_passes(w, rounds: int) -> None:
    """Timed without the profiler, inside real passes, as ratios to the bare pass (forward) and to plain
    ``generate`` in the same rounds: hooks that do nothing (the cost of having a hook at all on this host),
    capture to CPU with chunks from 1 MiB or from 16 MiB (the default) on the side stream, or every chunk in
    stream order (``SIDE_STREAM_BYTES``), the last token copied in stream order, on the side stream or not at
    all (what the gather costs), ``get`` waiting for the copies (the default) or for the whole device (the
    final norm and LM head queued after the last layer too), and capture during ``generate`` with ``get``
    joining into pinned memory (the default) or into new memory."""

    def patched(key: str, target=capture, **settings):  # the case with settings of traitlens.capture changed
        def run(workload):
            with mock.patch.multiple(target, **settings):
                return CASE_BY_KEY[key].run(workload)

        return run

    def whole_device(self):  # how get waited until 2026-11-27: for all work queued on the device
        for stream in self._pending:
            torch.cuda.synchronize(stream.device)
        self._pending.clear()

    def noop_hooks(run):
        return lambda workload: _with_raw_hooks(workload, lambda x: None, lambda kept: run(workload))

    forward = {
        "bare": CASE_BY_KEY["bare"].run,
        "no-op hooks on every layer": noop_hooks(CASE_BY_KEY["bare"].run),
        "pinned (raw hooks, stream order)": CASE_BY_KEY["pinned"].run,
        "tl_cpu, side stream from 1 MiB": patched("tl_cpu", SIDE_STREAM_BYTES=1 << 20),
        "tl_cpu (default: side stream from 16 MiB)": CASE_BY_KEY["tl_cpu"].run,
        "tl_cpu, all in stream order": patched("tl_cpu", SIDE_STREAM_BYTES=1 << 62),
        "tl_cpu, get waits for the whole device": patched("tl_cpu", ActivationCapture, _sync=whole_device),
        "tl_last": CASE_BY_KEY["tl_last"].run,
        "tl_last, get waits for the whole device": patched("tl_last", ActivationCapture, _sync=whole_device),
        "tl_last, copies on the side stream": patched("tl_last", SIDE_STREAM_BYTES=0),
        "tl_last, kept on the GPU (no copy)": lambda workload: _traitlens(
            workload, ActivationCapture(device=None), last_token=True
        ),
    }
    generate = {
        "gen_plain": CASE_BY_KEY["gen_plain"].run,
        "generate, no-op hooks on every layer": noop_hooks(CASE_BY_KEY["gen_plain"].run),
        "gen_tl": CASE_BY_KEY["gen_tl"].run,
        "gen_tl, joined into new memory": patched("gen_tl", _pinned_join=lambda shape, chunks: None),
    }
    # generate first: its comparison is the one no GPU run has finished yet
    for title, runs in ((f"generate ({w.new_tokens} new tokens)", generate), ("forward", forward)):
        times = time_cases(w, runs, rounds, full_warmup=True)
        base = statistics.median(next(iter(times.values())))
        print(
            f"\n{title}: {rounds} rounds of one batch each, median and min ms, ratio of medians to the first row"
        )
        for name, values in times.items():
            median = statistics.median(values)
            print(
                f"  {name:44s} {median * 1e3:9.2f} {min(values) * 1e3:9.2f} ms  {median / base:6.3f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
