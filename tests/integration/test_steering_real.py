"""Steering the real SmolLM2-135M-Instruct with a sentiment vector built from the shipped data."""

from __future__ import annotations

import pytest
import torch

from traitlens.dataset import encode_examples, load_dataset
from traitlens.dose_response import compare_generations, dose_response, plot_dose_response
from traitlens.hooks import HookManager
from traitlens.steering import decoder_layer_paths, steer
from traitlens.vector import TraitVector

pytestmark = pytest.mark.integration

LAYER = 12
COEFF = 4.0  # times the raw mean-difference vector (norm ~10 at layer 12)
POSITIVE = [" good", " great", " happy", " wonderful", " excellent"]
NEGATIVE = [" bad", " terrible", " sad", " awful", " horrible"]
NEUTRAL_PROMPTS = [
    "I think the movie was",
    "Today I feel",
    "The food at the restaurant was",
    "My day at work was",
    "The weather this weekend is",
    "Overall, the experience was",
]


@torch.no_grad()
def _last_token_residuals(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """``[n, hidden]``: output of layer ``LAYER`` at each text's last token."""
    encoding = encode_examples(tokenizer, texts, padding_side="right")
    seen = []
    with HookManager(model) as hooks:
        hooks.add_forward_hook(decoder_layer_paths(model)[LAYER], lambda m, a, out: seen.append(out))
        model(**encoding.model_inputs())
    return seen[0][torch.arange(len(texts)), encoding.last_prompt_index].float()


@pytest.fixture(scope="module")
def sentiment(real_model):
    """The mean-difference sentiment vector at layer 12 (train split) and held-out test residuals."""
    model, tokenizer = real_model
    data = load_dataset("sentiment")
    train_pos = _last_token_residuals(model, tokenizer, [p.pos for p in data.train])
    train_neg = _last_token_residuals(model, tokenizer, [p.neg for p in data.train])
    vector = TraitVector(
        vector=train_pos.mean(0) - train_neg.mean(0),
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        module=decoder_layer_paths(model)[LAYER],
        position="prompt_last",
        method="mean_diff",
    )
    unit = vector.vector / vector.vector.norm()
    threshold = float(((train_pos @ unit).mean() + (train_neg @ unit).mean()) / 2)
    return {"vector": vector, "unit": unit, "threshold": threshold, "test": data.test}


@torch.no_grad()
def _log_odds(model, tokenizer) -> torch.Tensor:
    """``[prompt]``: log P(positive next word) - log P(negative next word) after each neutral prompt."""
    first = lambda words: [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]  # noqa: E731
    inputs = tokenizer(NEUTRAL_PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    logprobs = torch.log_softmax(model(**inputs).logits[:, -1].float(), dim=-1)
    return torch.logsumexp(logprobs[:, first(POSITIVE)], -1) - torch.logsumexp(
        logprobs[:, first(NEGATIVE)], -1
    )


def test_steering_moves_the_sentiment_log_odds_both_ways(real_model, sentiment):
    model, tokenizer = real_model
    base = _log_odds(model, tokenizer)
    with steer(model, sentiment["vector"], coeff=COEFF):  # at the vector's own layer, 12
        up = _log_odds(model, tokenizer) - base
    with steer(model, sentiment["vector"], coeff=-COEFF):
        down = _log_odds(model, tokenizer) - base
    print(f"log-odds shift at layer {LAYER}, coeff +-{COEFF}: {up.tolist()} / {down.tolist()}")
    assert float(up.mean()) >= 1.0 and bool((up > 0).all())
    assert float(down.mean()) <= -1.0 and bool((down < 0).all())


def test_ablating_the_vector_everywhere_brings_classification_to_chance(real_model, sentiment):
    model, tokenizer = real_model
    unit, threshold, test = sentiment["unit"], sentiment["threshold"], sentiment["test"]
    texts = [p.pos for p in test] + [p.neg for p in test]
    labels = torch.tensor([1] * len(test) + [0] * len(test), dtype=torch.bool)

    def accuracy(residuals: torch.Tensor) -> float:
        return float(((residuals @ unit > threshold) == labels).float().mean())

    plain = _last_token_residuals(model, tokenizer, texts)
    with steer(model, sentiment["vector"], layer=range(len(decoder_layer_paths(model))), op="ablate"):
        ablated = _last_token_residuals(model, tokenizer, texts)
    print(f"held-out accuracy at layer {LAYER}: {accuracy(plain):.3f} plain, {accuracy(ablated):.3f} ablated")
    assert accuracy(plain) >= 0.85
    assert float(((ablated @ unit).abs() / ablated.norm(dim=-1)).max()) < 1e-5
    assert abs(accuracy(ablated) - 0.5) <= 0.1


def test_generations_and_dose_response(real_model, sentiment, tmp_path):
    model, tokenizer = real_model
    vector = sentiment["vector"]
    prompts = ["Write one sentence about your weekend.", "Describe the park near your house."]
    rows = compare_generations(model, tokenizer, prompts[:1], vector, [0.0, 8.0], max_new_tokens=8)
    assert [(r["prompt"], r["coeff"]) for r in rows] == [
        (prompts[0], None),
        (prompts[0], 0.0),
        (prompts[0], 8.0),
    ]
    assert rows[0]["text"] == rows[1]["text"] and rows[0]["text"]  # adding 0 * v changes nothing
    assert rows[2]["text"] != rows[0]["text"]

    table = dose_response(model, tokenizer, prompts, vector, [-6.0, 0.0, 6.0], max_new_tokens=10)
    print(
        "dose response:", [(r["coeff"], round(r["projection"], 2), round(r["perplexity"], 1)) for r in table]
    )
    assert [r["coeff"] for r in table] == [-6.0, 0.0, 6.0]
    projections = [r["projection"] for r in table]
    assert projections[0] < projections[1] < projections[2]
    assert all(r["perplexity"] > 1.0 and r["n_tokens"] > 0 for r in table)
    png = plot_dose_response(table, tmp_path / "dose.png", title="sentiment")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
