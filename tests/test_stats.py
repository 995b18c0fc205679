import math

import numpy as np
import pytest
import torch

from traitlens.methods import MeanDifferenceMethod, PCADiffMethod
from traitlens.metrics import effect_size
from traitlens.stats import ContrastiveStats, RunningMoments


def _rows(seed: int, layers: int = 3, n: int = 40, hidden: int = 8, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 3, hidden)  # anisotropic, like residual streams
    return torch.randn(layers, n, hidden, generator=g) * scales + shift


def test_running_moments_match_numpy_over_several_updates():
    rows = _rows(0)
    moments = RunningMoments(outer=True)
    for chunk in rows.split(7, dim=1):
        moments.update(chunk)
    assert moments.count == 40
    for layer in range(3):
        x = rows[layer].double().numpy()
        np.testing.assert_allclose(moments.mean[layer].numpy(), x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(
            moments.covariance()[layer].numpy(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9
        )


def test_merge_equals_one_pass_and_state_dict_round_trips():
    rows = _rows(1)
    whole = RunningMoments(outer=True).update(rows)
    a = RunningMoments(outer=True).update(rows[:, :13])
    b = RunningMoments(outer=True).update(rows[:, 13:])
    merged = RunningMoments.from_state_dict(a.state_dict()) + b
    assert merged.count == whole.count and a.count == 13  # inputs unchanged
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-12, atol=1e-10)
    assert (RunningMoments() + RunningMoments()).count == 0


def test_covariance_stays_accurate_far_from_the_origin():
    # residual dimensions reach ~1e4 with a far smaller spread; raw sums of outer products minus n mean mean^T
    # lost ~eps (mean / std)^2 of the covariance here (relative error 4e-4) and went negative for equal rows
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(1, 80, 4, generator=g, dtype=torch.float64) * 0.01 + 1e4
    reference = np.cov(rows[0].numpy(), rowvar=False)
    streamed = RunningMoments(outer=True)
    for chunk in rows.split(7, dim=1):
        streamed.update(chunk)
    merged = RunningMoments(outer=True).update(rows[:, :30]) + RunningMoments(outer=True).update(rows[:, 30:])
    for moments in (streamed, merged):
        np.testing.assert_allclose(moments.covariance()[0].numpy(), reference, rtol=1e-8, atol=1e-12)
    equal = RunningMoments(outer=True).update(torch.full((7, 2), 1000.1, dtype=torch.float64))
    equal = equal + RunningMoments(outer=True).update(torch.full((3, 2), 1000.1, dtype=torch.float64))
    assert equal.covariance().abs().max() == 0 and (equal.mean == 1000.1).all()


def test_state_dict_of_the_raw_sums_written_before_centring_still_loads():
    rows = _rows(4)
    count, total = rows.shape[1], rows.double().sum(1)
    old = {
        "count": torch.tensor(count),
        "outer": torch.tensor(True),
        "sum": total,
        "outer_sum": rows.double().transpose(1, 2) @ rows.double(),
    }
    moments, reference = RunningMoments.from_state_dict(old), RunningMoments(outer=True).update(rows)
    torch.testing.assert_close(moments.mean, reference.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moments.covariance(), reference.covariance(), rtol=1e-6, atol=1e-6)


def test_running_moments_errors():
    moments = RunningMoments()
    with pytest.raises(ValueError, match="needs at least one update"):
        _ = moments.mean
    with pytest.raises(ValueError, match="outer=True"):
        moments.update(_rows(0)).covariance()
    with pytest.raises(ValueError, match=r"\[layer, n, hidden\]=\[3, n, 8\]"):
        moments.update(torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="non-finite"):
        RunningMoments().update(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="with and without outer"):
        RunningMoments(outer=True).merge(RunningMoments())


def test_contrastive_stats_agree_with_the_row_based_methods_and_metrics():
    pos, neg = _rows(2, shift=0.5), _rows(3)
    stats = ContrastiveStats(outer=True)
    for p, n in zip(pos.split(16, dim=1), neg.split(16, dim=1), strict=True):
        stats.update(p, n)
    mean_diff, pca = stats.mean_difference(), stats.pca_diff()
    sizes = stats.effect_size(mean_diff)
    for layer in range(3):
        expected = MeanDifferenceMethod().extract(pos[layer], neg[layer])["vector"]
        torch.testing.assert_close(mean_diff[layer], expected, rtol=1e-5, atol=1e-5)
        reference = PCADiffMethod().extract(pos[layer], neg[layer])["vector"]
        assert float(torch.dot(pca[layer], reference)) > 0.9999  # same direction, same sign
        assert float(sizes[layer]) == pytest.approx(
            effect_size(mean_diff[layer], pos[layer], neg[layer]), rel=1e-6
        )


def test_unpaired_updates_skip_differences():
    stats = ContrastiveStats(outer=True).update(_rows(0, n=5), _rows(1, n=6))
    assert stats.diff.count == 0 and stats.pos.count == 5
    with pytest.raises(
        ValueError, match="only 0 of the 5 pos and 6 neg rows came in updates of equal shapes"
    ):
        stats.pca_diff()
    merged = ContrastiveStats.from_state_dict(stats.state_dict()) + stats
    assert merged.neg.count == 12
    # chunks of equal size by chance were paired row by row, the others skipped: a vector that changed
    # with the batch size, where PCADiffMethod refuses the same rows
    stats.update(_rows(2, n=4), _rows(3, n=4))
    with pytest.raises(ValueError, match="only 4 of the 9 pos and 10 neg rows"):
        stats.pca_diff()


def test_streamed_vectors_refuse_what_the_methods_refuse():
    rows = _rows(4, n=6)
    same = ContrastiveStats(outer=True).update(rows, rows.flip(1))  # the same rows on both sides
    for vector in (same.mean_difference, same.pca_diff):
        with pytest.raises(
            ValueError,
            match=r"at layer indices 0, 1, 2 \(positions in the layers given\) pos and neg have the same mean",
        ):
            vector()  # were a zero vector and an arbitrary unit vector
    one = ContrastiveStats(outer=True).update(rows[:, :1], rows[:, 1:3] + 1)
    with pytest.raises(
        ValueError, match="effect_size needs at least 2 rows of each class, got 1 pos and 2 neg"
    ):
        one.effect_size(one.mean_difference())  # was "covariance with ddof=1 needs more than 1 rows"
    with pytest.raises(ValueError, match="mean_difference needs at least 1 row of each class, got 0 pos"):
        ContrastiveStats().mean_difference()


def test_effect_size_of_classes_without_spread_matches_the_metric():
    pos = torch.full((7, 2), 0.1, dtype=torch.float64)
    vector = torch.ones(1, 2)
    for neg, expected in ((torch.full((5, 2), 0.1, dtype=torch.float64), 0.0), (torch.zeros(5, 2), math.inf)):
        stats = ContrastiveStats(outer=True).update(pos, neg)
        assert float(stats.effect_size(vector)[0]) == expected == effect_size(vector[0], pos, neg)


def test_a_bad_update_changes_nothing_and_says_why():
    stats = ContrastiveStats(outer=True).update(_rows(0, n=4), _rows(1, n=4))
    with pytest.raises(ValueError, match="same layers and hidden size"):  # caught at the first update
        ContrastiveStats().update(_rows(0, n=4), _rows(1, n=4, hidden=5))
    with pytest.raises(ValueError, match=r"neg must have shape \[layer, n, hidden\]=\[3, n, 8\]"):
        stats.update(_rows(0, n=4), _rows(1, n=4, hidden=5))
    nan = _rows(1, n=4)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="neg contains 1 non-finite"):
        stats.update(_rows(0, n=4), nan)
    assert (stats.pos.count, stats.neg.count, stats.diff.count) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"vectors must have shape \[layer, hidden\]=\[3, 8\]"):
        stats.effect_size(torch.ones(8))
