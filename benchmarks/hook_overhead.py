"""Host time per hook call of ways to move a module output from a GPU to the host (issue #5 diagnostics).

A small model's forward pass and every ``generate`` decode step are bound by the host (kernel launches),
so whatever a capture hook spends on the host adds to the run one for one. This times ``n`` calls of each
way on a decode-step chunk (16 x 1 x 576 bf16) and a full-sequence chunk (16 x 512 x 576 bf16): the host
time for the calls alone, and until every copy has landed. Then it profiles ``ActivationCapture.store``.
Since ``SIDE_STREAM_BYTES`` became 16 MiB (2026-11-27), ``store`` copies the 9.4 MB chunk in stream order;
earlier runs (``docs/gpu-runs/``) copied it on the side stream.

    python benchmarks/hook_overhead.py          # needs a GPU
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

from traitlens.capture import ActivationCapture, _HostSlabs


def ways():
    slabs = _HostSlabs(pin_memory=True, first=1 << 20)  # as ActivationCapture's pinned slabs
    side = torch.cuda.Stream()
    event = torch.cuda.Event()

    def seed_cpu(x):
        return x.detach().cpu()

    def pinned_each(x):
        return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)

    def slab_same_stream(x):
        return slabs.empty(x.shape, x.dtype).copy_(x, non_blocking=True)

    def slab_side_stream_reused_event(x):
        compute = torch.cuda.current_stream()
        event.record(compute)
        side.wait_event(event)
        buffer = slabs.empty(x.shape, x.dtype)
        torch.cuda.set_stream(side)
        buffer.copy_(x, non_blocking=True)
        torch.cuda.set_stream(compute)
        x.record_stream(side)
        return buffer

    capture = ActivationCapture()

    def traitlens(x):
        capture.store("x", x)

    return {
        "seed .cpu()": seed_cpu,
        "pinned buffer per chunk, same stream": pinned_each,
        "pinned slab, same stream": slab_same_stream,
        "pinned slab, side stream, one reused event": slab_side_stream_reused_event,
        "traitlens ActivationCapture().store": traitlens,  # chunks of 16 MiB or more on the side stream
    }, capture


def empty_host_cache() -> bool:
    """Free the blocks PyTorch's caching host allocator keeps, so that the next pinned allocations are cold
    (``cudaHostAlloc``); False where this torch has no such call (private; its name changed across versions)."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache", "_cuda_hostEmptyCache"):
        call = getattr(torch._C, name, None)
        if call is None:
            continue
        torch.cuda.synchronize()
        try:
            call()
        except (RuntimeError, TypeError):  # a diagnostic: report "not cold" rather than stop
            continue
        return True
    return False


def main(n: int = 2000) -> None:
    print(f"hook_overhead on {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for shape in ((16, 1, 576), (16, 512, 576)):
        calls = n if shape[1] == 1 else n // 10
        xs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        print(
            f"\nchunk {shape} bf16, {calls} calls: host us per call; cold = the first round, after emptying the "
            "caching host allocator (a cudaHostAlloc per new pinned block), warm = the second (calls only / "
            "until copies landed)"
        )
        for name in ways()[0]:
            rounds = []
            for rep in range(2):
                if rep == 0 and not empty_host_cache():
                    print("  (this torch cannot empty the host cache: 'cold' is only a first round)")
                table, capture = ways()
                way = table[name]
                kept = []
                torch.cuda.synchronize()
                start = time.perf_counter()
                for i in range(calls):
                    kept.append(way(xs[i % 8]))
                issued = time.perf_counter() - start
                torch.cuda.synchronize()
                rounds.append((issued, time.perf_counter() - start))
                capture.clear()
                del kept
            (cold, _), (warm, warm_done) = rounds
            print(
                f"  {name:46s} cold {cold / calls * 1e6:8.1f}   warm {warm / calls * 1e6:8.1f} / "
                f"{warm_done / calls * 1e6:8.1f}",
                flush=True,
            )
    xs = [torch.randn(16, 1, 576, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    capture = ActivationCapture()
    profile = cProfile.Profile()
    profile.enable()
    for i in range(n):
        capture.store("x", xs[i % 8])
    torch.cuda.synchronize()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(18)
    print(out.getvalue())


if __name__ == "__main__":
    main()
