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
