"""traitlens.metrics against scikit-learn / scipy / numpy references, planted directions and invariances."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from traitlens.compute import mean_difference
from traitlens.methods import get_method
from traitlens.metrics import (
    accuracy,
    auroc,
    bootstrap_stability,
    cross_trait_accuracy,
    effect_size,
    effective_rank,
    evaluate_vector,
    hoyer_sparsity,
    noise_stability,
    orthogonality,
    p_value,
    polarity_correct,
    separation,
    sparsity,
    subsample_stability,
    top_k_concentration,
)

PROPS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def planted(n_pos: int, n_neg: int, hidden: int, shift: float, seed: int = 0):
    """Unit isotropic noise, the classes at ``±shift/2`` along a random unit direction."""
    direction = randn(hidden, seed=seed)
    direction /= direction.norm()
    pos = randn(n_pos, hidden, seed=seed + 1) + shift / 2 * direction
    neg = randn(n_neg, hidden, seed=seed + 2) - shift / 2 * direction
    return direction, pos, neg


def numpy_scores(vector, pos, neg):
    v = vector.double().numpy()
    v = v / np.linalg.norm(v)
    return pos.double().numpy() @ v, neg.double().numpy() @ v


# --- references ----------------------------------------------------------------------------------------


@pytest.fixture
def data():
    """Overlapping classes, unequal sizes, and a vector that is not the optimal one."""
    direction, pos, neg = planted(23, 31, 12, shift=1.2, seed=3)
    return direction + 0.5 * randn(12, seed=9), pos, neg


def test_accuracy_matches_sklearn(data):
    vector, pos, neg = data
    ps, ns = numpy_scores(vector, pos, neg)
    y = np.r_[np.ones(len(ps)), np.zeros(len(ns))]
    scores = np.r_[ps, ns]
    for threshold in (None, 0.0, 0.3, -5.0):
        t = (ps.mean() + ns.mean()) / 2 if threshold is None else threshold
        pred = scores > t
        assert accuracy(vector, pos, neg, threshold=threshold) == pytest.approx(
            accuracy_score(y, pred), abs=1e-12
        )
        assert accuracy(vector, pos, neg, threshold=threshold, balanced=True) == pytest.approx(
            balanced_accuracy_score(y, pred), abs=1e-12
        )
    assert 0.5 < accuracy(vector, pos, neg) < 1.0  # a non-trivial case


def test_auroc_matches_sklearn_with_and_without_ties(data):
    vector, pos, neg = data
    ps, ns = numpy_scores(vector, pos, neg)
    y = np.r_[np.ones(len(ps)), np.zeros(len(ns))]
    assert auroc(vector, pos, neg) == pytest.approx(roc_auc_score(y, np.r_[ps, ns]), abs=1e-12)
    # integer-valued activations on a one-hot vector: many ties between and within classes
    pos_t, neg_t = torch.randint(0, 4, (30, 5)).float(), torch.randint(0, 3, (20, 5)).float()
    e0 = torch.tensor([1.0, 0, 0, 0, 0])
    y = np.r_[np.ones(30), np.zeros(20)]
    expected = roc_auc_score(y, np.r_[pos_t[:, 0].numpy(), neg_t[:, 0].numpy()])
    assert auroc(e0, pos_t, neg_t) == pytest.approx(expected, abs=1e-12)
    assert auroc(e0, torch.ones(3, 5), torch.ones(4, 5)) == 0.5


def test_effect_size_separation_and_p_value_match_references(data):
    vector, pos, neg = data
    ps, ns = numpy_scores(vector, pos, neg)
    n1, n2 = len(ps), len(ns)
    pooled = np.sqrt(((n1 - 1) * ps.var(ddof=1) + (n2 - 1) * ns.var(ddof=1)) / (n1 + n2 - 2))
    assert effect_size(vector, pos, neg) == pytest.approx((ps.mean() - ns.mean()) / pooled, rel=1e-10)
    assert separation(vector, pos, neg) == pytest.approx(ps.mean() - ns.mean(), rel=1e-10)
    expected_p = scipy.stats.ttest_ind(ps, ns, equal_var=False).pvalue
    assert p_value(vector, pos, neg) == pytest.approx(expected_p, rel=1e-8)
    assert polarity_correct(vector, pos, neg) is True
    assert polarity_correct(-vector, pos, neg) is False
    assert effect_size(-vector, pos, neg) == pytest.approx(-effect_size(vector, pos, neg))


@pytest.mark.parametrize(("n_pos", "n_neg", "shift", "constant_neg"), [(2, 3, 0.1, False), (40, 7, 1.0, False),
                                                                     (12, 30, 0.0, False), (9, 5, 2.0, True)])  # fmt: skip
@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on the constant class
def test_p_value_matches_scipy_welch_test_for_unequal_sizes_and_one_constant_class(
    n_pos, n_neg, shift, constant_neg
):
    g = torch.Generator().manual_seed(n_pos + n_neg)
    pos = torch.randn(n_pos, 4, generator=g, dtype=torch.float64) + shift
    neg = torch.randn(n_neg, 4, generator=g, dtype=torch.float64)
    if constant_neg:
        neg[:, 0] = 0.25
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    expected = scipy.stats.ttest_ind(pos[:, 0].numpy(), neg[:, 0].numpy(), equal_var=False).pvalue
    assert p_value(e0, pos, neg) == pytest.approx(expected, rel=1e-9)
    for scale in (1e-150, 1e150):  # float64 activations far from 1: the same p-value, no under/overflow
        assert p_value(e0, pos * scale, neg * scale) == pytest.approx(expected, rel=1e-9)


def test_degenerate_spread_gives_no_nan():
    e0 = torch.tensor([1.0, 0.0])
    same = torch.tensor([[1.0, 5.0], [1.0, -3.0]])  # both classes project to exactly 1
    assert effect_size(e0, same, same) == 0.0
    assert p_value(e0, same, same) == 1.0
    assert effect_size(e0, same + torch.tensor([1.0, 0]), same) == math.inf
    assert p_value(e0, same + torch.tensor([1.0, 0]), same) == 0.0
    # rows that are all alike: their scores' own rounded mean makes var() ~1e-33, not 0, which gave d = -1.2 and
    # p = 0.05 for two identical classes, and d ~ 6e15, p ~ 1e-95 for two different constants
    ones = torch.ones(2, dtype=torch.float64)
    flat_pos, flat_neg = (
        torch.full((7, 2), 0.1, dtype=torch.float64),
        torch.full((5, 2), 0.1, dtype=torch.float64),
    )
    assert (effect_size(ones, flat_pos, flat_neg), p_value(ones, flat_pos, flat_neg)) == (0.0, 1.0)
    assert (effect_size(ones, flat_pos, flat_neg * 0), p_value(ones, flat_pos, flat_neg * 0)) == (
        math.inf,
        0.0,
    )
    scores = evaluate_vector(ones, flat_pos, flat_neg)
    assert (scores["effect_size"], scores["p_value"]) == (0.0, 1.0)
    # a zero vector projects everything to 0: chance level, no NaN
    assert accuracy(torch.zeros(2), same, same) == 0.5
    assert auroc(torch.zeros(2), same, same) == 0.5


def test_validation_messages():
    pos, neg = randn(5, 8), randn(6, 8)
    with pytest.raises(
        ValueError, match=r"vector must have shape \[hidden\]=\[8\] to match pos_acts \(5, 8\)"
    ):
        accuracy(randn(7), pos, neg)
    with pytest.raises(ValueError, match="same hidden size"):
        auroc(randn(8), pos, randn(6, 9))
    with pytest.raises(ValueError, match=r"neg_acts has 1 rows .* effect_size needs at least 2 examples"):
        effect_size(randn(8), pos, neg[:1])
    with pytest.raises(ValueError, match=r"pos_acts must have shape \[n_pos, hidden\]"):
        separation(randn(8), randn(8), neg)
    with pytest.raises(TypeError, match=r"vector must be a torch\.Tensor"):
        auroc(np.zeros(8), pos, neg)


# --- planted directions --------------------------------------------------------------------------------


def test_planted_direction_is_recovered_and_random_direction_is_chance():
    direction, pos, neg = planted(300, 300, 512, shift=6.0, seed=11)
    vector = mean_difference(pos[:200], neg[:200])  # train split
    held_pos, held_neg = pos[200:], neg[200:]
    assert float(torch.cosine_similarity(vector, direction, dim=0)) > 0.8
    assert accuracy(vector, held_pos, held_neg) > 0.99
    assert auroc(vector, held_pos, held_neg) > 0.999
    assert effect_size(vector, held_pos, held_neg) > 4
    assert p_value(vector, held_pos, held_neg) < 1e-30

    _, pos, neg = planted(300, 300, 1024, shift=2.0, seed=12)
    random_vector = randn(1024, seed=99)
    assert abs(auroc(random_vector, pos, neg) - 0.5) < 0.1
    assert abs(accuracy(random_vector, pos, neg) - 0.5) < 0.1
    assert p_value(random_vector, pos, neg) > 1e-3


# --- invariances ---------------------------------------------------------------------------------------


@PROPS
@given(
    n_pos=st.integers(2, 15),
    n_neg=st.integers(2, 15),
    hidden=st.integers(1, 10),
    seed=seeds,
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-100, 100),
)
def test_metric_invariances(n_pos, n_neg, hidden, seed, scale, shift):
    _, pos, neg = planted(n_pos, n_neg, hidden, shift=1.0, seed=seed)
    pos, neg = pos.double(), neg.double()
    vector = randn(hidden, seed=seed + 3).double()
    a = auroc(vector, pos, neg)
    assert auroc(scale * vector, pos, neg) == pytest.approx(a, abs=1e-12)
    assert auroc(-vector, pos, neg) == pytest.approx(1 - a, abs=1e-12)
    assert 0 <= a <= 1

    acc = accuracy(vector, pos, neg)
    assert accuracy(scale * vector, pos, neg) == pytest.approx(acc, abs=1e-12)
    # shifting every activation along the vector moves both classes and the midpoint together
    moved = shift * vector / vector.norm()
    assert accuracy(vector, pos + moved, neg + moved) == pytest.approx(acc, abs=1e-12)
    # shifting every activation along any direction leaves the separation unchanged
    other = randn(hidden, seed=seed + 4).double()
    assert separation(vector, pos + other, neg + other) == pytest.approx(
        separation(vector, pos, neg), abs=1e-9 * (1 + other.norm().item())
    )
    d = effect_size(vector, pos, neg)
    assert effect_size(scale * vector, pos, neg) == pytest.approx(d, rel=1e-9, abs=1e-12)
    assert effect_size(-vector, pos, neg) == pytest.approx(-d, rel=1e-9, abs=1e-12)


# --- stability -----------------------------------------------------------------------------------------


def test_stability_high_for_strong_signal_low_for_noise():
    _, pos, neg = planted(100, 100, 32, shift=8.0, seed=20)
    strong = bootstrap_stability(pos, neg, n_trials=10)
    assert set(strong) == {"mean", "min", "std", "n_trials"}
    assert strong["mean"] > 0.95 and strong["min"] > 0.9 and strong["n_trials"] == 10

    noise_pos, noise_neg = randn(20, 32, seed=21), randn(20, 32, seed=22)
    weak = bootstrap_stability(noise_pos, noise_neg, n_trials=10)
    assert weak["mean"] < 0.9 and weak["min"] < strong["min"]
    assert subsample_stability(pos, neg, fraction=0.3, n_trials=5)["mean"] > 0.95
    assert subsample_stability(noise_pos, noise_neg, fraction=0.3, n_trials=5)["mean"] < 0.8
    # a method by name, as get_method takes it (was "'str' object is not callable")
    from traitlens import get_method

    by_name = bootstrap_stability(pos, neg, method="pca_diff", n_trials=3)
    assert by_name == bootstrap_stability(pos, neg, method=get_method("pca_diff"), n_trials=3)
    with pytest.raises(ValueError, match="did you mean"):
        bootstrap_stability(pos, neg, method="prob", n_trials=3)
    # a TraitVector where a tensor is wanted: the message says where its tensor is
    from traitlens.vector import TraitVector

    vector = TraitVector(
        pos.mean(0) - neg.mean(0), model="m", module="model.layers.1", position="all", method="x"
    )
    with pytest.raises(TypeError, match=r"got TraitVector; pass its \.vector"):
        evaluate_vector(vector, pos, neg)


def test_stability_edge_values_and_determinism():
    _, pos, neg = planted(12, 9, 16, shift=2.0, seed=30)
    # no noise / all examples: the recomputed vector is the full-data vector
    assert noise_stability(pos, neg, noise_scale=0.0, n_trials=3)["min"] == pytest.approx(1.0, abs=1e-6)
    assert subsample_stability(pos, neg, fraction=1.0, n_trials=3)["min"] == pytest.approx(1.0, abs=1e-6)
    small = noise_stability(pos, neg, noise_scale=0.01, n_trials=5)["mean"]
    large = noise_stability(pos, neg, noise_scale=1.0, n_trials=5)["mean"]
    assert 1.0 > small > large
    # the noise is relative to each example's norm: rescaling the data changes nothing
    scaled = noise_stability(1000 * pos, 1000 * neg, noise_scale=0.5, n_trials=5)
    assert scaled == pytest.approx(noise_stability(pos, neg, noise_scale=0.5, n_trials=5), rel=1e-5)
    # seeded, and the global RNG is left alone
    state = torch.get_rng_state()
    assert bootstrap_stability(pos, neg, seed=5) == bootstrap_stability(pos, neg, seed=5)
    assert bootstrap_stability(pos, neg, seed=5) != bootstrap_stability(pos, neg, seed=6)
    assert torch.equal(state, torch.get_rng_state())


def test_resampling_keeps_pairs_together_for_a_method_that_uses_them():
    """Contrastive pairs: row i of both classes is the same prompt, and prompts differ far more than the
    trait. PCA-diff reads the pairs' differences; resampling the classes apart would hand it mismatched
    pairs (its stability came out near 0 although the vector is stable)."""
    g = torch.Generator().manual_seed(50)
    prompts = 10.0 * torch.randn(60, 16, generator=g)
    trait = torch.zeros(16)
    trait[0] = 3.0
    pos = prompts + trait + 0.3 * torch.randn(60, 16, generator=g)
    neg = prompts + 0.3 * torch.randn(60, 16, generator=g)
    method = get_method("pca_diff")  # an extraction method object is accepted as well as a callable
    assert abs(float(method.extract(pos, neg)["vector"][0])) > 0.95  # the full-data vector is the trait
    for stability in (bootstrap_stability, subsample_stability):
        assert stability(pos, neg, method=method, n_trials=5)["mean"] > 0.95
        assert stability(pos, neg, method=method, n_trials=5, paired=False)["mean"] < 0.5  # pairs broken
    with pytest.raises(ValueError, match="paired=True needs as many positives as negatives, got 60 and 59"):
        bootstrap_stability(pos, neg[:59], paired=True)


def test_stability_with_custom_method():
    _, pos, neg = planted(30, 30, 8, shift=3.0, seed=40)
    calls = []

    def method(p, n):
        calls.append((p.shape, n.shape))
        return {"vector": p.mean(0) - n.mean(0), "extra": 1}

    out = subsample_stability(pos, neg, method=method, fraction=0.5, n_trials=4)
    assert calls[0] == ((30, 8), (30, 8)) and calls[1] == ((15, 8), (15, 8)) and len(calls) == 5
    default = subsample_stability(pos, neg, fraction=0.5, n_trials=4)  # mean difference, same subsets
    assert out == pytest.approx(default, rel=1e-6)
    # a sign-flipping method is caught
    flips = iter([1, -1] * 10)
    flaky = bootstrap_stability(
        pos, neg, method=lambda p, n: next(flips) * (p.mean(0) - n.mean(0)), n_trials=4
    )
    assert flaky["min"] < -0.9
    with pytest.raises(ValueError, match=r"\[hidden\]=\[8\]"):
        bootstrap_stability(pos, neg, method=lambda p, n: p.mean(0)[:4], n_trials=2)
    with pytest.raises(ValueError, match="without a 'vector' key"):
        bootstrap_stability(pos, neg, method=lambda p, n: {"v": p.mean(0)}, n_trials=2)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        subsample_stability(pos, neg, fraction=0)
    with pytest.raises(ValueError, match="noise_scale"):
        noise_stability(pos, neg, noise_scale=-1)
    with pytest.raises(ValueError, match="n_trials"):
        bootstrap_stability(pos, neg, n_trials=0)
    # the method's own vector is zero: every cosine was 0.0, read as "unstable"
    with pytest.raises(ValueError, match="vector from all the data is zero"):
        bootstrap_stability(pos, neg, method=lambda p, n: p.mean(0) * 0, n_trials=2)
    with pytest.raises(ValueError, match=r"fraction=0.5 keeps 1 of the 2 rows of a class.*needs at least 2"):
        subsample_stability(pos[:2], neg[:2], method="probe")  # was: "pos_acts has 1 rows" (the user gave 2)
    # numpy numbers are numbers (sparsity said "must be in [0, 1), got 0.01")
    np_args = {"n_trials": np.int64(2), "seed": np.int32(3)}
    assert noise_stability(pos, neg, noise_scale=np.float32(0.1), **np_args) == noise_stability(
        pos, neg, noise_scale=0.1, n_trials=2, seed=3
    )
    assert sparsity(pos[0], np.float32(0.5)) == sparsity(pos[0], 0.5)
    assert top_k_concentration(pos[0], np.int64(3)) == top_k_concentration(pos[0], 3)
    with pytest.raises(ValueError, match=r"seed must be an int, got 1\.5"):
        bootstrap_stability(pos, neg, n_trials=2, seed=1.5)


def test_noise_stability_of_huge_float64_activations():
    _, pos, neg = planted(30, 30, 8, shift=3.0, seed=41)
    small = noise_stability(pos.double(), neg.double(), n_trials=3)
    big = noise_stability(pos.double() * 1e200, neg.double() * 1e200, n_trials=3)  # the noise norm was inf
    assert big == pytest.approx(small, rel=1e-9)


# --- vector properties ---------------------------------------------------------------------------------


def test_sparsity_and_hoyer_reference_values():
    one_hot = torch.zeros(10)
    one_hot[4] = -3.0
    assert sparsity(one_hot) == pytest.approx(0.9)
    assert hoyer_sparsity(one_hot) == pytest.approx(1.0)
    assert sparsity(torch.ones(10)) == 0.0 and hoyer_sparsity(-torch.ones(10)) == pytest.approx(
        0.0, abs=1e-12
    )
    assert sparsity(torch.zeros(4)) == 1.0 and hoyer_sparsity(torch.zeros(4)) == 1.0
    v = randn(50, seed=50)
    a = np.abs(v.double().numpy())
    assert sparsity(v, threshold=0.2) == pytest.approx(np.mean(a <= 0.2 * a.max()))
    d = a.size
    expected_hoyer = (np.sqrt(d) - a.sum() / np.sqrt((a**2).sum())) / (np.sqrt(d) - 1)
    assert hoyer_sparsity(v) == pytest.approx(expected_hoyer, rel=1e-10)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        sparsity(v, threshold=1.5)


def test_top_k_concentration_reference():
    v = randn(40, seed=51)
    sq = np.sort(v.double().numpy() ** 2)[::-1]
    for k in (1, 5, 40, 100):
        assert top_k_concentration(v, k) == pytest.approx(sq[:k].sum() / sq.sum(), rel=1e-10)
    assert top_k_concentration(torch.zeros(5), 2) == 0.0
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_k_concentration(v, 0)


def test_effective_rank_reference_values():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.outer(randn(5), randn(9, seed=1))) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.zeros(3, 4)) == 0.0
    x = randn(20, 8, seed=52) * torch.linspace(0.1, 3.0, 8)
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(np.exp(scipy.stats.entropy(p)), rel=1e-10)
    # a dict or list of vectors is stacked
    vectors = {"a": torch.tensor([1.0, 0, 0]), "b": torch.tensor([0, 2.0, 0])}
    assert effective_rank(vectors) == pytest.approx(effective_rank(list(vectors.values())))
    assert effective_rank(vectors) == pytest.approx(np.exp(scipy.stats.entropy([2 / 3, 1 / 3])))
    with pytest.raises(ValueError, match=r"vectors\['b'\] must have shape \[hidden\]=\[3\]"):
        effective_rank({"a": torch.ones(3), "b": torch.ones(4)})


@PROPS
@given(n=st.integers(1, 10), hidden=st.integers(1, 10), seed=seeds, k=st.integers(1, 12))
def test_vector_property_bounds(n, hidden, seed, k):
    x = randn(n, hidden, seed=seed)
    r = effective_rank(x)
    assert 1 - 1e-9 <= r <= min(n, hidden) + 1e-9
    v = x[0]
    assert 0 <= sparsity(v) <= 1 and 0 <= hoyer_sparsity(v) <= 1
    c = top_k_concentration(v, k)
    assert min(k, hidden) / hidden - 1e-9 <= c <= 1 + 1e-12
    assert top_k_concentration(3.0 * v, k) == pytest.approx(c, rel=1e-6)  # 3.0 * v is rounded in float32
    assert hoyer_sparsity(-2.0 * v) == pytest.approx(hoyer_sparsity(v), abs=1e-9)


# --- relations between vectors -------------------------------------------------------------------------


def test_orthogonality_matches_scipy():
    v = randn(16, seed=60)
    others = {"x": randn(16, seed=61), "y": -2 * v, "z": randn(16, seed=62)}
    out = orthogonality(v, others)
    for name, other in others.items():
        expected = 1 - scipy.spatial.distance.cosine(v.numpy(), other.numpy())
        assert out["cosines"][name] == pytest.approx(expected, abs=1e-6)
    assert out["most_similar"] == "y" and out["max_abs_cos"] == pytest.approx(1.0)
    assert out["mean_abs_cos"] == pytest.approx(np.mean([abs(c) for c in out["cosines"].values()]))
    as_list = orthogonality(v, list(others.values()))
    assert list(as_list["cosines"].values()) == list(out["cosines"].values())
    assert orthogonality(v, []) == {
        "cosines": {},
        "max_abs_cos": 0.0,
        "mean_abs_cos": 0.0,
        "most_similar": None,
    }
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match=r"others\['x'\] must have shape \[hidden\]=\[16\]"):
        orthogonality(v, {"x": randn(15)})
    with pytest.raises(TypeError, match="others must be a dict or a list"):
        orthogonality(v, randn(3, 16))


def test_cross_trait_accuracy_matrix():
    hidden = 64
    basis = torch.linalg.qr(randn(hidden, hidden, seed=70))[0]
    datasets, vectors = {}, {}
    for i, trait in enumerate(("happy", "formal")):
        d = basis[:, i]
        pos = randn(80, hidden, seed=71 + i) + 3 * d
        neg = randn(80, hidden, seed=81 + i) - 3 * d
        datasets[trait] = (pos[40:], neg[40:])
        vectors[trait] = mean_difference(pos[:40], neg[:40])
    matrix = cross_trait_accuracy(vectors, datasets)
    assert set(matrix) == {"happy", "formal"} and set(matrix["happy"]) == {"happy", "formal"}
    assert matrix["happy"]["happy"] > 0.97 and matrix["formal"]["formal"] > 0.97
    assert abs(matrix["happy"]["formal"] - 0.5) < 0.2 and abs(matrix["formal"]["happy"] - 0.5) < 0.2
    assert matrix["formal"]["happy"] == accuracy(vectors["formal"], *datasets["happy"])
    json.dumps(matrix, allow_nan=False)
    with pytest.raises(TypeError, match=r"datasets\['x'\] must be a \(pos_acts, neg_acts\) pair"):
        cross_trait_accuracy(vectors, {"x": randn(4, hidden)})


# --- evaluate_vector -----------------------------------------------------------------------------------

EXPECTED_KEYS = {
    "accuracy", "balanced_accuracy", "threshold", "auroc", "effect_size", "p_value", "separation",
    "polarity_correct", "pos_mean", "neg_mean", "pos_std", "neg_std", "n_pos", "n_neg", "vector_norm",
    "sparsity", "hoyer_sparsity", "top_k_concentration",
}  # fmt: skip


def test_evaluate_vector_agrees_with_the_single_metrics(data):
    vector, pos, neg = data
    out = evaluate_vector(vector, pos, neg)
    assert set(out) == EXPECTED_KEYS
    json.dumps(out, allow_nan=False)
    assert all(type(v) in (float, int, bool) for v in out.values())
    assert out["accuracy"] == accuracy(vector, pos, neg)
    assert out["balanced_accuracy"] == accuracy(vector, pos, neg, balanced=True)
    assert out["auroc"] == auroc(vector, pos, neg)
    assert out["effect_size"] == effect_size(vector, pos, neg)
    assert out["p_value"] == p_value(vector, pos, neg)
    assert out["separation"] == pytest.approx(separation(vector, pos, neg), abs=1e-12)
    assert out["polarity_correct"] is polarity_correct(vector, pos, neg)
    assert out["sparsity"] == sparsity(vector) and out["hoyer_sparsity"] == hoyer_sparsity(vector)
    assert out["top_k_concentration"] == top_k_concentration(vector, 10)
    assert (out["n_pos"], out["n_neg"]) == (23, 31)
    ps, ns = numpy_scores(vector, pos, neg)
    assert out["threshold"] == pytest.approx((ps.mean() + ns.mean()) / 2, abs=1e-12)
    assert out["vector_norm"] == pytest.approx(float(np.linalg.norm(vector.numpy())), rel=1e-6)
    assert out["pos_std"] == pytest.approx(ps.std(ddof=1), rel=1e-10)
    fixed = evaluate_vector(vector, pos, neg, threshold=0.25)
    assert fixed["threshold"] == 0.25 and fixed["accuracy"] == accuracy(vector, pos, neg, threshold=0.25)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_evaluate_vector_half_inputs_close_to_float32(data, low):
    vector, pos, neg = (t.to(low) for t in data)
    out = evaluate_vector(vector, pos, neg)
    ref = evaluate_vector(vector.float(), pos.float(), neg.float())  # the same rounded values
    for key, value in ref.items():
        assert type(out[key]) is type(value)
        assert out[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_evaluate_vector_validates():
    with pytest.raises(ValueError, match="evaluate_vector needs at least 2 examples per class"):
        evaluate_vector(randn(4), randn(1, 4), randn(3, 4))
    with pytest.raises(ValueError, match=r"vector must have shape \[hidden\]=\[4\] to match pos_acts"):
        evaluate_vector(randn(5), randn(3, 4), randn(3, 4))
    with pytest.raises(ValueError, match="pos_acts contains 1 non-finite"):
        evaluate_vector(randn(4), torch.tensor([[1.0, float("inf"), 0, 0], [0, 0, 0, 0]]), randn(3, 4))


def test_midpoint_threshold_is_the_default_threshold_of_accuracy():
    from traitlens.metrics import midpoint_threshold

    g = torch.Generator().manual_seed(5)
    pos, neg, vector = (
        torch.randn(30, 6, generator=g) + 1,
        torch.randn(20, 6, generator=g),
        torch.randn(6, generator=g),
    )
    t = midpoint_threshold(vector, pos, neg)
    assert t == evaluate_vector(vector, pos, neg)["threshold"]
    assert accuracy(vector, pos, neg, threshold=t) == accuracy(vector, pos, neg)
    assert accuracy(vector, pos, neg, threshold=torch.tensor(t)) == accuracy(vector, pos, neg)
    for bad, error in ((float("nan"), ValueError), (float("inf"), ValueError), ("0.5", TypeError)):
        with pytest.raises(error, match="threshold must be"):
            accuracy(vector, pos, neg, threshold=bad)
        with pytest.raises(error, match="threshold must be"):
            evaluate_vector(vector, pos, neg, threshold=bad)


def test_an_example_in_both_classes_is_a_tie_for_auroc():
    """Against scikit-learn on one score per distinct example: the shared examples must score the same in
    both classes whatever the class sizes (separate matrix products can round them differently)."""
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(60)
    for n_pos, n_neg, hidden in [(8, 30, 576), (5, 17, 576), (3, 50, 100), (30, 8, 576)]:
        acts = 20 * torch.randn(max(n_pos, n_neg), hidden, generator=g, dtype=torch.float64)
        pos, neg = acts[:n_pos], acts[:n_neg]  # the first min(n_pos, n_neg) examples are in both classes
        v = torch.randn(hidden, generator=g, dtype=torch.float64)
        s = (acts @ (v / v.norm())).numpy()  # one score per distinct example
        labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
        before = acts.clone()
        assert auroc(v, pos, neg) == pytest.approx(
            roc_auc_score(labels, np.r_[s[:n_pos], s[:n_neg]]), abs=1e-12
        )
        assert torch.equal(acts, before)  # float64 inputs are scored in a copy, never scaled in place


def test_different_examples_with_the_same_exact_projection_tie_for_auroc():
    """Integer activations and a float32 vector: equal exact projections of different rows must score the
    same (products with the rounded unit vector gave them different last digits: AUROC off by up to 0.07)."""
    v = torch.tensor([2.0, 2.0, 2.0])
    pos = torch.tensor([[1.0, 3, 1], [1, 0, -3], [-3, 1, 1]])
    neg = torch.tensor([[0.0, -3, 2], [2, 0, -2], [2, 0, 3], [-2, -1, 2], [-2, -1, -1]])
    assert auroc(v, pos, neg) == 0.5  # was 0.4333
    g = torch.Generator().manual_seed(61)
    for _ in range(200):
        pos = torch.randint(-3, 4, (6, 4), generator=g).float()
        neg = torch.randint(-3, 4, (7, 4), generator=g).float()
        v = torch.randint(-3, 4, (4,), generator=g).float() * 0.37
        if not v.any() or torch.equal(pos.double().mean(0), neg.double().mean(0)):
            continue
        scores = (torch.cat([pos, neg]).double() @ v.double()).numpy()  # exact: small integers times 0.37
        labels = np.r_[np.ones(6), np.zeros(7)]
        assert auroc(v, pos, neg) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
