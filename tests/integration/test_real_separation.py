"""Mean difference and probe vectors separate held-out sentiment pairs on the real model."""

import pytest

from traitlens import get_method, load_dataset
from traitlens.metrics import accuracy, evaluate_vector
from traitlens.pipeline import collect_activations

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sentiment_acts(real_model):
    model, tokenizer = real_model
    data = load_dataset("sentiment")
    return {
        split: [collect_activations(model, tokenizer, side, layers=[15])[0] for side in data.examples(split)]
        for split in ("train", "test")
    }


@pytest.mark.parametrize("method", ["mean_diff", "probe"])
def test_middle_layer_vector_separates_held_out_pairs(sentiment_acts, method):
    (train_pos, train_neg), (test_pos, test_neg) = sentiment_acts["train"], sentiment_acts["test"]
    vector = get_method(method).extract(train_pos, train_neg)["vector"]
    threshold = evaluate_vector(vector, train_pos, train_neg)["threshold"]  # fitted on train only
    assert accuracy(vector, test_pos, test_neg, threshold=threshold) >= 0.85
