"""Why ``prompt_mean`` leaves out the first token: held-out accuracy of mean difference with and without it.

The first position of a sequence sees only itself and is the model's attention sink; on the bundled model
its residual is ~100x as long as the others', so a mean over a short text's tokens is mostly that token.
For the shipped sentiment pairs (plain texts, no BOS token), each text is run alone (no padding), its
residuals at a few layers are averaged over every token or over all but the first, a mean-difference
vector is fitted on the train split, its threshold at the midpoint of the train projections, and it is
scored on the validation and test splits together. Prints one line per layer and variant.

    python benchmarks/prompt_mean_sink.py     # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import torch

from traitlens import load_dataset, load_model, mean_difference
from traitlens.metrics import accuracy, midpoint_threshold

LAYERS = (6, 12, 18)


@torch.no_grad()
def prompt_means(model, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """``{"with": [layer, n, hidden], "without": ...}``: per text, the mean over every token / all but the
    first, from the model's own hidden states."""
    rows = {"with": [], "without": []}
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        states = model(ids, output_hidden_states=True).hidden_states
        stacked = torch.stack([states[layer + 1][0] for layer in LAYERS])  # [layer, seq, hidden]
        rows["with"].append(stacked.mean(1))
        rows["without"].append(stacked[:, 1:].mean(1))
    return {k: torch.stack(v, dim=1) for k, v in rows.items()}


def main() -> None:
    model, tokenizer = load_model()
    data = load_dataset("sentiment")
    train, held_out = data.split("train"), data.split("val") + data.split("test")
    sides = {
        name: [prompt_means(model, tokenizer, [getattr(p, side) for p in pairs]) for side in ("pos", "neg")]
        for name, pairs in (("train", train), ("held_out", held_out))
    }
    print(f"sentiment pairs: {len(train)} train, {len(held_out)} validation + test; bundled SmolLM2-135M")
    for i, layer in enumerate(LAYERS):
        for variant in ("with", "without"):
            (pos, neg), (test_pos, test_neg) = (
                [s[variant][i] for s in sides[k]] for k in ("train", "held_out")
            )
            vector = mean_difference(pos, neg)
            threshold = midpoint_threshold(vector, pos, neg)
            score = accuracy(vector, test_pos, test_neg, threshold=threshold)
            norm = float(pos.norm(dim=-1).mean())
            print(
                f"layer {layer:2d}, first token {variant:7s}: held-out accuracy {score:.3f}, mean row norm {norm:.0f}"
            )


if __name__ == "__main__":
    main()
