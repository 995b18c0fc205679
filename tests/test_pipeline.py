"""Pipeline internals and the report's heatmaps on random tensors (the whole pipeline runs on the real model
in tests/integration)."""

import re
import statistics

import numpy as np
import pytest
import torch

from traitlens.methods import RandomBaselineMethod
from traitlens.metrics import accuracy, auroc, midpoint_threshold
from traitlens.monitor import TokenScores, heatmap_scale, token_heatmap_html
from traitlens.pipeline import _random_draws


def test_random_draws_equal_one_direction_at_a_time_through_the_public_metrics():
    g = torch.Generator().manual_seed(0)
    train_pos, train_neg = torch.randn(30, 16, generator=g) + 0.3, torch.randn(25, 16, generator=g)
    pos, neg = torch.randn(11, 16, generator=g) + 0.3, torch.randn(9, 16, generator=g)
    # a zero row on each side projects to exactly 0 under every draw: a tie that AUROC counts one half
    pos, neg = torch.cat([pos, torch.zeros(1, 16)]), torch.cat([neg, torch.zeros(2, 16)])
    scores, aurocs = [], []
    for seed in range(5, 5 + 12):
        vector = RandomBaselineMethod().extract(train_pos, train_neg, seed=seed)["vector"]
        threshold = midpoint_threshold(vector, train_pos, train_neg)
        scores.append(accuracy(vector, pos, neg, threshold=threshold))
        aurocs.append(auroc(vector, pos, neg))
    out = _random_draws(train_pos, train_neg, pos, neg, seed=5, draws=12)
    assert out["draws"] == 12
    assert out["draws_accuracy_mean"] == pytest.approx(statistics.mean(scores), abs=1e-12)
    assert out["draws_accuracy_std"] == pytest.approx(statistics.stdev(scores), abs=1e-12)
    assert out["draws_auroc_mean"] == pytest.approx(statistics.mean(aurocs), abs=1e-12)
    assert out["draws_auroc_std"] == pytest.approx(statistics.stdev(aurocs), abs=1e-12)
    assert len(set(scores)) > 3 and len(set(aurocs)) > 3  # the draws differ, so the means test something


def _alphas(page: str) -> list[float]:
    return [float(a) for a in re.findall(r"rgba\([0-9,]+,([0-9.]+)\)", page)]


@pytest.mark.parametrize("n", [2, 8, 60])
def test_heatmap_default_scale_is_not_washed_out_by_a_massive_first_token(n):
    g = torch.Generator().manual_seed(n)
    rest = torch.randn(n - 1, generator=g) * 5  # [seq - 1]
    scores = TokenScores(
        tokens=[f"t{i}" for i in range(n)],
        scores=torch.cat([torch.tensor([-2500.0]), rest]) - 3.0,  # a massive-activation first token
        response=torch.zeros(n, dtype=torch.bool),
        center=-3.0,
    )
    page = token_heatmap_html(scores)
    alphas = _alphas(page)
    assert alphas[0] == 1.0
    assert max(alphas[1:]) == 1.0 and sum(a > 0.3 for a in alphas[1:]) >= (n - 1) / 2
    # the default scale is the 90th percentile of |deviation| over tokens 1.., as numpy computes it
    scale = float(np.quantile(rest.abs().numpy(), 0.9))
    assert re.search(r"&plusmn;([0-9.]+)", page).group(1) == f"{scale:.2f}"
    expected = [min(abs(d) / scale, 1.0) for d in rest.tolist()]
    assert alphas[1:] == pytest.approx(expected, abs=0.005 + 1e-9)
    # an explicit scale is used as given
    assert _alphas(token_heatmap_html(scores, scale=10.0))[1:] == pytest.approx(
        [min(abs(d) / 10.0, 1.0) for d in rest.tolist()], abs=0.005 + 1e-9
    )
    # one token: its own deviation is the scale
    alone = TokenScores(["t"], torch.tensor([7.0]), torch.zeros(1, dtype=torch.bool), center=3.0)
    assert _alphas(token_heatmap_html(alone)) == [1.0] and "&plusmn;4.00" in token_heatmap_html(alone)


def test_token_scores_mean_leaves_out_the_first_token():
    scores = TokenScores(
        tokens=["a", "b", "c", "d"],
        scores=torch.tensor([-900.0, 1.0, 2.0, 6.0]),
        response=torch.tensor([False, False, True, True]),
    )
    assert scores.mean() == pytest.approx(3.0)
    assert scores.mean("prompt") == pytest.approx(1.0) and scores.mean("response") == pytest.approx(4.0)
    plain = TokenScores(["a", "b"], torch.tensor([-900.0, 5.0]), torch.zeros(2, dtype=torch.bool))
    assert plain.mean() == 5.0 and np.isnan(plain.mean("response"))
    alone = TokenScores(["a"], torch.tensor([7.0]), torch.zeros(1, dtype=torch.bool))
    assert alone.mean() == 7.0
    with pytest.raises(ValueError, match="part must be one of"):
        scores.mean("answer")


def test_one_heatmap_scale_for_several_texts():
    g = torch.Generator().manual_seed(4)
    a = TokenScores(["t"] * 6, torch.randn(6, generator=g) * 3, torch.zeros(6, dtype=torch.bool), center=1.0)
    b = TokenScores(["t"] * 9, torch.randn(9, generator=g) * 9, torch.zeros(9, dtype=torch.bool), center=1.0)
    rest = np.concatenate([(a.scores - 1.0)[1:].numpy(), (b.scores - 1.0)[1:].numpy()])
    assert heatmap_scale(a, b) == pytest.approx(float(np.quantile(np.abs(rest), 0.9)), rel=1e-6)
    assert heatmap_scale(a) == pytest.approx(float(np.quantile(np.abs((a.scores - 1.0)[1:].numpy()), 0.9)))
    shared = heatmap_scale(a, b)
    assert f"&plusmn;{shared:.2f}" in token_heatmap_html(a, scale=shared)
