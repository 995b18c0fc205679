"""Focused check of one CPU target of issue #5: traitlens capture of every layer's full output vs the bare
forward pass, alternating the two over 8 rounds in one process (bundled model, 8 batches of 8 x 64 random
tokens). Prints the per-round times and ratios.

    python benchmarks/capture_all_layers.py
"""

from __future__ import annotations

import statistics
import time

import torch

from traitlens import ActivationCapture, HookManager, decoder_layer_paths, load_model


def main(rounds: int = 8) -> None:
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
    print("bare s   ", [round(x, 2) for x in times["bare"]])
    print("capture s", [round(x, 2) for x in times["capture"]])
    print("per-round ratios", [round(c / b, 3) for b, c in zip(times["bare"], times["capture"], strict=True)])
    print(
        "ratio of medians", round(statistics.median(times["capture"]) / statistics.median(times["bare"]), 3)
    )


if __name__ == "__main__":
    main()
