"""Running a shared prompt once for both answers of a pair, against one pass per side, on the bundled model.

    python benchmarks/shared_prompt.py [--rounds 3] [--extract-rounds 1]

``pair_activations`` (every layer, each dataset's default position) on the train split of each shipped
dataset. Formality and certainty are prompt-style rows with one question and two answers, read at
``response_mean``, where the prompt (SmolLM2's system prompt and the question) runs once; sentiment is
plain texts at ``prompt_last``, which cannot share and shows that nothing else changed. Then
``extract_trait`` on formality end to end (all splits, six methods, 30 layers).

"one pass per side" is the same code with the shared pass turned off (``_takes_cache`` returning False),
i.e. what the pipeline did before. The two alternate within each round; the table gives the median of
each, the ratio of medians, and the largest difference between the two results' activations, per row,
relative to that row's norm; for ``extract_trait``, also how far each method's vectors moved. Ratios from
one run on one machine, named in the output.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from distributed import machine

from traitlens import pipeline


@contextmanager
def sharing(on: bool):
    takes_cache = pipeline._takes_cache
    if not on:
        pipeline._takes_cache = lambda model: False
    try:
        yield
    finally:
        pipeline._takes_cache = takes_cache


def timed(rounds: int, run) -> tuple[float, float, object, object]:
    """Median seconds without and with sharing, alternating, and the last result of each."""
    times: dict[bool, list[float]] = {False: [], True: []}
    out = {}
    for _ in range(rounds):
        for on in (False, True):
            with sharing(on):
                start = time.perf_counter()
                out[on] = run()
                times[on].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True]), out[False], out[True]


def row_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extract-rounds", type=int, default=1)
    args = parser.parse_args()

    from traitlens import load_dataset, load_model
    from traitlens.pipeline import default_position, extract_trait, pair_activations

    model, tokenizer = load_model()
    print(f"machine: {machine()}")
    print(f"every layer, batch size 16, {args.rounds} rounds, alternating\n")
    print("| workload | pairs | one pass per side s | shared prompt s | ratio | max row difference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ("formality", "certainty", "sentiment"):
        data = load_dataset(name)
        position = default_position(data)

        def run(data=data, position=position):
            return pair_activations(model, tokenizer, data.train, position=position)

        a, b, old, new = timed(args.rounds, run)
        diff = max(row_error(x, y) for x, y in zip(old, new, strict=True))
        print(
            f"| {name} train, {position} | {len(data.train)} | {a:.2f} | {b:.2f} | {b / a:.2f} | {diff:.1e} |"
        )

    data = load_dataset("formality")

    def extract():
        return extract_trait(model, tokenizer, data, progress=False)

    a, b, old, new = timed(args.extract_rounds, extract)
    diff = row_error(old.activations["train"][0], new.activations["train"][0])
    row = f"| extract_trait formality (all splits) | {len(data.pairs)} | {a:.2f} | {b:.2f} | {b / a:.2f}"
    print(f"{row} | {diff:.1e} |")
    print(
        f"\nchosen without sharing: {old.best_method} at layer {old.best_layer}; with it: {new.best_method}"
    )
    print(f"at layer {new.best_layer}. Vectors: largest difference over the layers, relative to their norm:")
    for method in old.methods:
        moved = (old.vectors[method] - new.vectors[method]).norm(dim=-1) / old.vectors[method].norm(dim=-1)
        above = int((moved > 1e-3).sum())
        print(f"- {method}: {float(moved.max()):.1e} ({above} of {len(moved)} layers above 1e-3)")


if __name__ == "__main__":
    main()
