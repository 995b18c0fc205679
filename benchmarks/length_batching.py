"""Batching examples longest first against batching them in the order given, on the bundled model.

    python benchmarks/length_batching.py [--rounds 3] [--batch-size 16] [--long-tokens 300]

``collect_activations`` (every layer, ``prompt_last``) over three workloads:

- each shipped dataset's positive texts, as they are (lengths within a dataset are alike);
- the sentiment texts with every 16th replaced by a long one (about ``--long-tokens`` tokens, made of the
  formality texts): a dataset with a few long rows, where input order puts one long row in each batch.

"in order" is the same code fed the identity order, i.e. what ``collect_activations`` did before it sorted;
both include tokenizing. The two alternate within each round; the table gives the median of each and the
ratio of medians, plus the largest difference between the two results relative to their largest value
(rows in input order; padding changes float32 rounding only). Ratios from one run on one machine, named
in the output.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from distributed import machine


def workloads(tokenizer, long_tokens: int) -> dict[str, list]:
    from traitlens import load_dataset
    from traitlens.dataset import encode_examples

    shipped = {
        name: load_dataset(name).examples("train")[0] for name in ("sentiment", "formality", "certainty")
    }
    words = " ".join(str(e.response or e.prompt) for e in shipped["formality"]).split()
    long, n = [], 0
    while n < long_tokens:  # grow one text until it has long_tokens tokens
        long.append(words[len(long) % len(words)])
        n = int(encode_examples(tokenizer, [" ".join(long)]).attention_mask.sum())
    mixed = [" ".join(long) if i % 16 == 5 else text for i, text in enumerate(shipped["sentiment"])]
    return {**shipped, f"sentiment, every 16th row {n} tokens": mixed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=300)
    args = parser.parse_args()

    from traitlens import load_model
    from traitlens.pipeline import _activation_batches, _hooked_layers, _tokenized, collect_activations

    model, tokenizer = load_model()
    print(f"machine: {machine()}")
    print(f"every layer, prompt_last, batch size {args.batch_size}, {args.rounds} rounds, alternating\n")
    print("| workload | rows | in order s | longest first s | ratio | max relative difference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, examples in workloads(tokenizer, args.long_tokens).items():
        given = list(range(len(examples)))
        times: dict[str, list[float]] = {"in order": [], "longest first": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            tokens = _tokenized(tokenizer, examples, None, "prompt_last")
            paths, layers = _hooked_layers(model, None, args.batch_size)
            batches = _activation_batches(
                model, tokenizer, tokens, given, paths, layers, "prompt_last", args.batch_size, False
            )
            in_order = torch.cat(list(batches), dim=1)
            times["in order"].append(time.perf_counter() - start)
            start = time.perf_counter()
            sorted_ = collect_activations(model, tokenizer, examples, batch_size=args.batch_size)
            times["longest first"].append(time.perf_counter() - start)
        a, b = (statistics.median(t) for t in times.values())
        diff = float((in_order - sorted_).abs().max() / in_order.abs().max())
        print(f"| {name} | {len(examples)} | {a:.2f} | {b:.2f} | {b / a:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
