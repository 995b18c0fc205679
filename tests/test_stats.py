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
    torch.testing.assert_close(merged.sum, whole.sum, rtol=1e-14, atol=1e-10)
    torch.testing.assert_close(merged.outer_sum, whole.outer_sum, rtol=1e-14, atol=1e-8)
    assert (RunningMoments() + RunningMoments()).count == 0


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
    with pytest.raises(ValueError, match="paired updates"):
        stats.pca_diff()
    merged = ContrastiveStats.from_state_dict(stats.state_dict()) + stats
    assert merged.neg.count == 12
