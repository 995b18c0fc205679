"""Mean difference and probe vectors separate held-out sentiment pairs on the real model."""

import pytest

from traitlens import get_method
from traitlens.metrics import accuracy, evaluate_vector

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("method", ["mean_diff", "probe"])
def test_middle_layer_vector_separates_held_out_pairs(sentiment_acts, method):
    (train_pos, train_neg), (test_pos, test_neg) = sentiment_acts["train"], sentiment_acts["test"]
    vector = get_method(method).extract(train_pos, train_neg)["vector"]
    threshold = evaluate_vector(vector, train_pos, train_neg)["threshold"]  # fitted on train only
    assert accuracy(vector, test_pos, test_neg, threshold=threshold) >= 0.85


def test_prompt_mean_leaves_out_the_first_token_which_would_drown_the_signal(real_model):
    """The first position sees only itself and is the attention sink, with a residual ~100x the others':
    a prompt mean that includes it is mostly that token. Checked against output_hidden_states."""
    import torch

    from traitlens import load_dataset, mean_difference
    from traitlens.pipeline import pair_activations

    model, tokenizer = real_model
    data, layer = load_dataset("sentiment"), 12

    def by_hand(texts, first):  # one text at a time, no padding: prompt means from the model's own states
        rows = []
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids
                states = model(ids, output_hidden_states=True).hidden_states[layer + 1][0]
                rows.append(states[first:].mean(0))
        return torch.stack(rows)

    sides = {}
    for split in ("train", "test"):
        pairs = data.split(split)
        pos, neg = pair_activations(model, tokenizer, pairs, layers=[layer], position="prompt_mean")
        sides[split] = pos[0], neg[0]
        hand = by_hand([p.pos for p in pairs], first=1), by_hand([p.neg for p in pairs], first=1)
        torch.testing.assert_close(pos[0], hand[0], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(neg[0], hand[1], rtol=1e-4, atol=1e-3)
        if split == "train":  # with the first token, by hand
            with_first = by_hand([p.pos for p in pairs], first=0), by_hand([p.neg for p in pairs], first=0)

    def held_out(train_pos, train_neg):
        vector = mean_difference(train_pos, train_neg)
        threshold = evaluate_vector(vector, train_pos, train_neg)["threshold"]
        return accuracy(vector, *sides["test"], threshold=threshold)

    without = held_out(*sides["train"])
    test_with_first = (
        by_hand([p.pos for p in data.split("test")], 0),
        by_hand([p.neg for p in data.split("test")], 0),
    )
    vector = mean_difference(*with_first)
    threshold = evaluate_vector(vector, *with_first)["threshold"]
    with_sink = accuracy(vector, *test_with_first, threshold=threshold)
    assert without >= 0.9 and with_sink < without - 0.2, (without, with_sink)
