"""Pipeline internals on random tensors (the whole pipeline runs on the real model in tests/integration)."""

import statistics

import pytest
import torch

from traitlens.methods import RandomBaselineMethod
from traitlens.metrics import accuracy, midpoint_threshold
from traitlens.pipeline import _random_draws


def test_random_draws_equal_one_direction_at_a_time_through_the_public_metrics():
    g = torch.Generator().manual_seed(0)
    train_pos, train_neg = torch.randn(30, 16, generator=g) + 0.3, torch.randn(25, 16, generator=g)
    pos, neg = torch.randn(11, 16, generator=g) + 0.3, torch.randn(9, 16, generator=g)
    scores = []
    for seed in range(5, 5 + 12):
        vector = RandomBaselineMethod().extract(train_pos, train_neg, seed=seed)["vector"]
        threshold = midpoint_threshold(vector, train_pos, train_neg)
        scores.append(accuracy(vector, pos, neg, threshold=threshold))
    out = _random_draws(train_pos, train_neg, pos, neg, seed=5, draws=12)
    assert out["draws"] == 12
    assert out["draws_accuracy_mean"] == pytest.approx(statistics.mean(scores), abs=1e-12)
    assert out["draws_accuracy_std"] == pytest.approx(statistics.stdev(scores), abs=1e-12)
    assert len(set(scores)) > 3  # the draws differ, so the mean and spread test something
