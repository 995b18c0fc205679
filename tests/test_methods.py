"""Extraction methods: planted directions, references (numpy / scikit-learn), dtypes, seeds, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA, FastICA
from sklearn.linear_model import LogisticRegression

from traitlens.methods import (
    METHODS,
    ExtractionMethod,
    GradientMethod,
    ICAMethod,
    MeanDifferenceMethod,
    PCADiffMethod,
    ProbeMethod,
    RandomBaselineMethod,
    _fit_logistic_torch,
    _inverse_hessian_times,
    _lbfgs,
    _separation_loss_grad,
    get_method,
)


def planted(n=400, hidden=32, shift=2.0, big=0.0, seed=0):
    """``pos, neg [n, hidden]``: unit-variance noise -/+ ``shift`` along a random unit direction ``d``.

    With ``big`` > 0, a quarter of the dimensions (orthogonal to ``d``) get noise ``big`` times larger, and all
    dimensions a large offset: the anisotropy of real residual streams.
    """
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(hidden, generator=g)
    noise = torch.randn(2 * n, hidden, generator=g)
    if big:
        loud = torch.randperm(hidden, generator=g)[: hidden // 4]
        d[loud] = 0.0
        noise[:, loud] *= big
        noise += 10 * big * torch.randn(hidden, generator=g)
    d = d / d.norm()
    return noise[:n] + shift * d, noise[n:] - shift * d, d


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def accuracy(pos, neg, vector, bias):
    logits = torch.cat([pos, neg]) @ vector + bias
    return float(((logits > 0) == (torch.arange(len(logits)) < len(pos))).float().mean())


# Name, parameters and the cosine each must reach with the planted direction on isotropic noise.
PLANTED = [
    ("mean_diff", {}, 0.99),
    ("pca_diff", {}, 0.99),
    ("gradient", {}, 0.98),  # shrunk LDA: a little noisier than the mean on isotropic noise
    ("probe", {"C": 0.01}, 0.95),
    ("probe", {"C": 0.1, "penalty": "l1"}, 0.95),
    ("probe", {"C": 0.01, "solver": "sklearn"}, 0.95),
    ("ica", {}, 0.95),
    ("ica", {"solver": "sklearn"}, 0.95),
]


@pytest.mark.parametrize(("name", "params", "min_cos"), PLANTED)
def test_planted_direction_is_recovered_with_the_right_sign(name, params, min_cos):
    pos, neg, d = planted()
    vector = get_method(name, **params).extract(pos, neg)["vector"]
    assert vector.shape == (32,) and vector.dtype == torch.float32
    assert cos(vector, d) > min_cos
    assert float((pos.mean(0) - neg.mean(0)) @ vector) > 0


@pytest.mark.parametrize(("name", "params"), [("probe", {"C": 0.01}), ("gradient", {"shrinkage": 0.1})])
def test_probe_and_gradient_see_through_anisotropic_noise_where_mean_difference_fails(name, params):
    pos, neg, d = planted(big=100.0)
    assert cos(MeanDifferenceMethod().extract(pos, neg)["vector"], d) < 0.5
    assert cos(get_method(name, **params).extract(pos, neg)["vector"], d) > 0.9


@pytest.mark.parametrize(
    ("name", "params"), [("pca_diff", {}), ("ica", {}), ("ica", {"solver": "sklearn"}), ("gradient", {})]
)
def test_arbitrary_sign_methods_are_oriented_and_swap_sign_with_the_classes(name, params):
    pos, neg, _ = planted(seed=3)
    a = get_method(name, **params).extract(pos, neg)
    b = get_method(name, **params).extract(neg, pos)
    assert isinstance(a["flipped"], bool)
    assert float((pos.mean(0) - neg.mean(0)) @ a["vector"]) > 0
    assert cos(a["vector"], b["vector"]) < -0.99


def test_mean_difference_matches_numpy():
    pos, neg, _ = planted(n=50, seed=1)
    pos, neg = pos, neg[:37]  # classes of other sizes: a paired mean would pass with equal ones
    result = MeanDifferenceMethod().extract(pos, neg)
    expected = pos.double().numpy().mean(0) - neg.double().numpy().mean(0)
    np.testing.assert_allclose(result["vector"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["pos_mean"].numpy(), pos.double().numpy().mean(0), rtol=1e-5, atol=1e-6)
    unit = MeanDifferenceMethod(normalize=True).extract(pos, neg)["vector"]
    np.testing.assert_allclose(unit.numpy(), expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)
    # at the offsets of residual streams (~1e4): each mean rounded to float32 lost 6e-4 of a 0.7 gap
    pos, neg = pos + 1e4, neg + 1e4
    expected = pos.double().numpy().mean(0) - neg.double().numpy().mean(0)
    vector = MeanDifferenceMethod().extract(pos, neg)["vector"].double().numpy()
    np.testing.assert_allclose(vector, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
@pytest.mark.parametrize("big", [0.0, 1e3])
def test_probe_l2_matches_standardised_sklearn_logistic_regression(big, C):
    pos, neg, _ = planted(n=150, hidden=48, shift=0.3, big=big, seed=2)
    test_pos, test_neg, _ = planted(n=1000, hidden=48, shift=0.3, big=big, seed=2)  # same d, fresh noise
    result = ProbeMethod(C=C).extract(pos, neg)

    # Independent reference: scikit-learn on standardised features, weights mapped back by hand.
    x = torch.cat([pos, neg]).double().numpy()
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    mean, std = x.mean(0), x.std(0)
    reference = LogisticRegression(C=C, max_iter=10_000, tol=1e-8).fit((x - mean) / std, y)
    coef = torch.from_numpy(reference.coef_[0] / std).float()
    intercept = float(reference.intercept_[0] - (reference.coef_[0] / std) @ mean)

    # the size of the vector and the bias too, not only the direction: a penalty off by 3x kept cos > 0.999
    assert float((result["vector"] - coef).norm() / coef.norm()) < 1e-2
    assert result["bias"] == pytest.approx(intercept, rel=1e-2, abs=1e-2)
    assert (
        abs(
            accuracy(test_pos, test_neg, result["vector"], result["bias"])
            - accuracy(test_pos, test_neg, coef, intercept)
        )
        <= 0.005
    )
    # one training example lies 0.002 from the boundary: at tol=1e-4 it may fall on either side
    assert result["train_acc"] == pytest.approx(reference.score((x - mean) / std, y), abs=1 / len(y) + 1e-9)
    own = (pos @ result["vector"] + result["bias"] > 0).sum() + (
        neg @ result["vector"] + result["bias"] <= 0
    ).sum()
    assert result["train_acc"] == pytest.approx(int(own) / len(y), abs=1e-12)


def test_probe_vector_and_bias_give_the_logit_on_raw_activations():
    pos, neg, _ = planted(n=100, shift=0.5, big=1e3, seed=4)
    result = ProbeMethod().extract(pos, neg)
    torch.testing.assert_close(torch.sigmoid(pos @ result["vector"] + result["bias"]), result["pos_scores"])
    torch.testing.assert_close(torch.sigmoid(neg @ result["vector"] + result["bias"]), result["neg_scores"])
    assert result["train_acc"] == pytest.approx(accuracy(pos, neg, result["vector"], result["bias"]))
    assert result["converged"] and isinstance(result["bias"], float)


@pytest.mark.parametrize("penalty", ["l1", "elasticnet"])
@pytest.mark.parametrize("big", [0.0, 1e3])
def test_probe_torch_and_sklearn_solvers_agree_on_sparse_penalties(penalty, big):
    pos, neg, _ = planted(n=150, hidden=48, shift=0.3, big=big, seed=5)
    test_pos, test_neg, _ = planted(n=1000, hidden=48, shift=0.3, big=big, seed=5)
    ours = ProbeMethod(penalty=penalty, C=0.05, tol=1e-6).extract(pos, neg)
    ref = ProbeMethod(penalty=penalty, C=0.05, tol=1e-6, solver="sklearn", max_iter=20_000).extract(pos, neg)
    assert ref["converged"]
    assert float((ours["vector"] - ref["vector"]).norm() / ref["vector"].norm()) < 1e-3
    assert ours["bias"] == pytest.approx(ref["bias"], rel=1e-3, abs=1e-3)
    # and scikit-learn called by hand, not through traitlens's standardisation and mapping of the weights
    x = torch.cat([pos, neg]).double().numpy()
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    mean, std = x.mean(0), x.std(0)
    l1_ratio = {"l1": 1.0, "elasticnet": 0.5}[penalty]
    old_api = LogisticRegression().get_params()["penalty"] != "deprecated"  # scikit-learn < 1.8
    hand = LogisticRegression(C=0.05, l1_ratio=l1_ratio, solver="saga", max_iter=100_000, tol=1e-10,
                              **({"penalty": "elasticnet"} if old_api else {}))  # fmt: skip
    hand.fit((x - mean) / std, y)
    coef = torch.from_numpy(hand.coef_[0] / std).float()
    assert float((ours["vector"] - coef).norm() / coef.norm()) < 1e-3  # 1e-6 to 3e-5 measured
    gap = accuracy(test_pos, test_neg, ours["vector"], ours["bias"])
    gap -= accuracy(test_pos, test_neg, ref["vector"], ref["bias"])
    assert abs(gap) <= 0.005


def test_l1_probe_is_sparse_and_l2_is_not():
    pos, neg, _ = planted(n=200, hidden=64, shift=0.5, seed=6)
    l1 = ProbeMethod(C=0.05).extract(pos, neg, penalty="l1")["vector"]  # the seed README's call
    l2 = ProbeMethod(C=0.05).extract(pos, neg)["vector"]
    assert (l1 == 0).float().mean() > 0.5
    assert (l2 == 0).sum() == 0


def test_extract_parameters_override_constructor_parameters():
    pos, neg, _ = planted(n=100, seed=7)
    method = ProbeMethod(penalty="l1", C=0.1)
    assert (method.extract(pos, neg)["vector"] == 0).any()
    assert not (method.extract(pos, neg, penalty="l2")["vector"] == 0).any()
    assert method.params == {"penalty": "l1", "C": 0.1}
    assert repr(method) == "ProbeMethod(penalty='l1', C=0.1)"


def test_probe_warns_when_the_solver_hits_max_iter():
    pos, neg, _ = planted(n=100, shift=0.3, seed=8)
    with pytest.warns(UserWarning, match="max_iter=2"):
        result = ProbeMethod(max_iter=2).extract(pos, neg)
    assert not result["converged"]


def two_loop_recursion(grad, pairs, scale):
    """The textbook L-BFGS product H g (Nocedal & Wright 2006, Algorithm 7.4), in float64 numpy."""
    q, alphas = grad.copy(), []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (y @ s)
        q -= alpha * y
        alphas.append(alpha)
    r = scale * q
    for (s, y), alpha in zip(pairs, reversed(alphas), strict=True):
        r += (alpha - (y @ r) / (y @ s)) * s
    return r


def test_compact_inverse_hessian_product_equals_the_two_loop_recursion():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 30))
    hessian = a @ a.T + np.eye(30)  # convex quadratic: every pair has s @ y > 0
    steps = rng.standard_normal((7, 30))
    changes = steps @ hessian
    grad = rng.standard_normal(30)
    scale = (steps[-1] @ changes[-1]) / (changes[-1] @ changes[-1])
    expected = two_loop_recursion(grad, list(zip(steps, changes, strict=True)), scale)
    ours = _inverse_hessian_times(*(torch.from_numpy(t) for t in (grad, steps, changes)), scale)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_lbfgs_minimises_an_ill_conditioned_quadratic_to_numpy_solution():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    hessian = (q * np.logspace(0, 4, 40)) @ q.T  # condition number 1e4
    b = rng.standard_normal(40)
    h, bt = torch.from_numpy(hessian), torch.from_numpy(b)

    def loss_grad(x):
        return 0.5 * x @ h @ x - bt @ x, h @ x - bt

    x, n_iter, converged = _lbfgs(loss_grad, torch.zeros(40, dtype=torch.float64), max_iter=2000, tol=1e-9)
    assert converged and 0 < n_iter < 2000
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(hessian, b), rtol=1e-6, atol=1e-9)
    _, n_iter, converged = _lbfgs(loss_grad, torch.zeros(40, dtype=torch.float64), max_iter=3, tol=1e-9)
    assert (n_iter, converged) == (3, False)


@pytest.mark.parametrize("l1_ratio", [0.0, 1.0])
def test_torch_probe_solvers_stop_on_non_finite_values_instead_of_looping(l1_ratio):
    # extract() rejects such inputs; the solvers themselves must still end (backtracking never succeeds)
    z = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    z[3, 1] = float("nan")
    y = (torch.arange(20) % 2).float()
    *_, converged = _fit_logistic_torch(z, y, C=1.0, l1_ratio=l1_ratio, max_iter=50, tol=1e-4)
    assert converged is False


def _l1_violation(z: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, C: float) -> float:
    """Largest violation of the optimality conditions of sklearn's l1 objective / (C n), in numpy float64."""
    n, l1 = len(y), 1.0 / (C * len(y))
    residual = 1.0 / (1.0 + np.exp(-(z @ w + b))) - y
    grad = z.T @ residual / n
    off = np.where(w != 0, np.abs(grad + l1 * np.sign(w)), np.clip(np.abs(grad) - l1, 0.0, None))
    return max(float(off.max()), abs(float(residual.mean())))


def test_fista_claims_convergence_only_at_the_optimality_tolerance():
    """Unstandardised data and a tight tol: in float32 the step falls below the weights' resolution and
    nothing moves, which the gradient mapping alone read as convergence (violation 47 x tol)."""
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(30, 8, generator=g) + 0.5, torch.randn(30, 8, generator=g) * 2 + 3
    z, y = torch.cat([pos, neg]), torch.cat([torch.ones(30), torch.zeros(30)])
    for dtype in (torch.float32, torch.float64):
        w, b, _, converged = _fit_logistic_torch(
            z.to(dtype), y.to(dtype), C=1.0, l1_ratio=1.0, max_iter=5000, tol=1e-6
        )
        violation = _l1_violation(z.double().numpy(), y.double().numpy(), w.double().numpy(), b, C=1.0)
        assert not converged or violation <= 1e-6, (dtype, violation)
        if dtype == torch.float64:
            assert converged


def test_probe_warns_when_the_penalty_zeroes_every_weight():
    pos, neg, _ = planted(n=100, shift=0.3, seed=8)
    with pytest.warns(UserWarning, match="every weight is zero"):
        result = ProbeMethod(penalty="l1", C=1e-4).extract(pos, neg)
    assert not result["vector"].any()


def test_ica_sklearn_solver_is_sklearn_fastica_and_the_best_separating_one_is_chosen():
    pos, neg, _ = planted(n=100, seed=9)
    result = ICAMethod(n_components=6, seed=3, solver="sklearn").extract(pos, neg)
    x = torch.cat([pos, neg]).double().numpy()
    reference = FastICA(n_components=6, whiten="unit-variance", random_state=3).fit(x)
    np.testing.assert_allclose(result["all_components"].numpy(), reference.mixing_.T, rtol=1e-4, atol=1e-5)

    sources = reference.transform(x)
    a, b = sources[:100], sources[100:]
    d = np.abs(a.mean(0) - b.mean(0)) / np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
    assert result["component_idx"] == int(np.argmax(d))
    np.testing.assert_allclose(result["separation_scores"].numpy(), d, rtol=1e-3)
    chosen = result["all_components"][result["component_idx"]]
    expected = -chosen if result["flipped"] else chosen
    torch.testing.assert_close(result["vector"], expected)
    assert result["pos_proj"].shape == (100, 6) and result["neg_proj"].shape == (100, 6)
    assert result["n_iter"] == reference.n_iter_ and result["converged"]


def independent_mixture(n=3000, hidden=24, seed=0):
    """``x [n, hidden]``: 4 independent non-Gaussian sources (Laplace, uniform, centred exponential, a
    two-level mixture), unit variance, mixed by a random ``mixing [4, hidden]``, plus faint Gaussian noise
    and a large offset. Returns ``x``, ``sources [n, 4]``, ``mixing``."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.rand(n, 4, generator=g)
    sources = torch.stack(
        [
            -torch.sign(uniform[:, 0] - 0.5) * torch.log1p(-2 * (uniform[:, 0] - 0.5).abs()) / 2**0.5,
            (uniform[:, 1] - 0.5) * 12**0.5,
            -torch.log1p(-uniform[:, 2]) - 1.0,
            torch.where(uniform[:, 3] < 0.2, 2.0, -0.5) / 0.8,
        ],
        1,
    )
    mixing = torch.randn(4, hidden, generator=g) * torch.tensor([[2.0], [1.0], [3.0], [1.5]])
    x = sources @ mixing + 0.01 * torch.randn(n, hidden, generator=g) + 50 * torch.randn(hidden, generator=g)
    return x, sources, mixing


def matched_abs_cos(a, b):
    """``|cos|`` of the rows of ``a [k, d]`` with the rows of ``b [k, d]``, after the best matching."""
    from scipy.optimize import linear_sum_assignment

    sims = (torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T).abs()
    rows, cols = linear_sum_assignment(-sims.double().numpy())
    return sims[rows, cols]


@pytest.mark.parametrize("seed", [0, 1])
def test_ica_torch_and_sklearn_solvers_recover_the_same_independent_sources(seed):
    x, sources, mixing = independent_mixture(seed=seed)
    pos, neg = x[:1500], x[1500:]
    ours = ICAMethod(n_components=4, seed=seed).extract(pos, neg)
    ref = ICAMethod(n_components=4, seed=seed, solver="sklearn").extract(pos, neg)
    assert ours["converged"] and ref["converged"]
    assert matched_abs_cos(ours["all_components"], ref["all_components"]).min() > 0.99
    # The true directions, up to the finite-sample correlations of the sources (~1/sqrt(n)).
    assert matched_abs_cos(ours["all_components"], mixing).min() > 0.98
    recovered = torch.cat([ours["pos_proj"], ours["neg_proj"]])  # [n, 4]
    assert matched_abs_cos((recovered - recovered.mean(0)).T, (sources - sources.mean(0)).T).min() > 0.99


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
@pytest.mark.parametrize(("n", "hidden"), [(40, 64), (300, 16)])  # Gram-matrix and covariance whitening
def test_ica_sources_are_white_and_rebuild_the_pca_projection(solver, n, hidden):
    pos, neg, _ = planted(n=n // 2, hidden=hidden, big=10.0, seed=19)
    result = ICAMethod(n_components=5, solver=solver).extract(pos, neg)
    sources = torch.cat([result["pos_proj"], result["neg_proj"]]).double()  # [n, 5]
    torch.testing.assert_close(sources.T @ sources / n, torch.eye(5, dtype=torch.float64), atol=1e-4, rtol=0)

    # Independent reference: the data projected on their top-5 principal subspace (scikit-learn PCA).
    x = torch.cat([pos, neg]).double().numpy()
    pca = PCA(n_components=5).fit(x)
    expected = pca.inverse_transform(pca.transform(x))
    rebuilt = x.mean(0) + sources.numpy() @ result["all_components"].double().numpy()
    np.testing.assert_allclose(rebuilt, expected, atol=1e-3 * np.abs(x).max())


def test_ica_torch_solver_is_seeded_and_reports_convergence():
    pos, neg, _ = planted(n=100, seed=20)
    a = ICAMethod(seed=1).extract(pos, neg)
    b = ICAMethod(seed=2).extract(pos, neg)
    assert not torch.equal(a["all_components"], b["all_components"])  # another random start
    assert torch.equal(a["all_components"], ICAMethod(seed=1).extract(pos, neg)["all_components"])
    for solver in ("torch", "sklearn"):
        capped = ICAMethod(max_iter=1, solver=solver).extract(pos, neg)
        assert capped["n_iter"] == 1 and capped["converged"] is False


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_ica_does_not_depend_on_the_order_of_the_examples(solver):
    """Near-Gaussian data (no single best unmixing) over few rows: reordering the rows used to move the
    vector to cosine 0.93 by rounding alone."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(18, 576, generator=g) @ torch.randn(576, 576, generator=g) * 0.05
    pos = base + torch.randn(18, 576, generator=g) * 0.5
    pos[:, 3] += 1.0
    neg = base + torch.randn(18, 576, generator=g) * 0.5
    a = ICAMethod(solver=solver).extract(pos, neg)
    for _ in range(3):
        p, n = torch.randperm(18, generator=g), torch.randperm(18, generator=g)
        b = ICAMethod(solver=solver).extract(pos[p], neg[n])
        torch.testing.assert_close(
            b["vector"], a["vector"], rtol=0, atol=1e-6 * float(a["vector"].abs().max())
        )
        torch.testing.assert_close(b["pos_proj"], a["pos_proj"][p], rtol=0, atol=1e-5)
        torch.testing.assert_close(b["neg_proj"], a["neg_proj"][n], rtol=0, atol=1e-5)


def test_ica_torch_solver_runs_on_the_input_device_without_scikit_learn(tmp_path):
    # A fresh interpreter: this test module itself imports scikit-learn.
    script = tmp_path / "ica_no_sklearn.py"
    script.write_text(
        "import sys, torch\n"
        "from traitlens.methods import ICAMethod\n"
        "devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])\n"
        "for device in devices:\n"
        "    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)\n"
        "    result = ICAMethod().extract(x[:30], x[30:])\n"
        "    for key in ('vector', 'all_components', 'separation_scores', 'pos_proj', 'neg_proj'):\n"
        "        assert result[key].device.type == device and result[key].dtype == torch.float32, key\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("center", [False, True])
def test_pca_diff_matches_sklearn_pca_of_the_differences(center):
    # Pair strength varies (variance 12 vs noise 2), so the centered variant finds the direction too.
    pos, neg, d = planted(n=200, shift=0.0, seed=11)
    strength = 12.0 * torch.rand(200, 1, generator=torch.Generator().manual_seed(0))
    pos = pos + strength * d
    result = PCADiffMethod(center=center).extract(pos, neg)
    diffs = (pos - neg).double().numpy()
    # Uncentered PCA = centered PCA of the sign-symmetrised differences (RepE's random flips, exactly).
    pca = PCA(n_components=1).fit(diffs if center else np.concatenate([diffs, -diffs]))
    component = torch.from_numpy(pca.components_[0]).float()
    assert abs(cos(result["vector"], component)) > 0.9999
    assert result["explained_variance_ratio"] == pytest.approx(pca.explained_variance_ratio_[0], rel=1e-4)
    if center:
        assert result["explained_variance"] == pytest.approx(pca.explained_variance_[0], rel=1e-4)
    else:
        assert result["explained_variance"] == pytest.approx(
            float(((pos - neg) @ result["vector"]).pow(2).mean()), rel=1e-4
        )
    assert result["n_pairs"] == 200
    assert float(result["vector"].norm()) == pytest.approx(1.0, abs=1e-5)
    assert cos(result["vector"], d) > 0.9


def test_pca_diff_pairing():
    pos, neg, d = planted(n=60, seed=12)
    with pytest.raises(ValueError, match=r"pairing='index'.*\(60, 32\).*\(45, 32\).*pairing='random'"):
        PCADiffMethod().extract(pos, neg[:45])
    result = PCADiffMethod(pairing="random", seed=1).extract(pos, neg[:45])
    assert result["n_pairs"] == 45 and cos(result["vector"], d) > 0.95
    again = PCADiffMethod(pairing="random", seed=1).extract(pos, neg[:45])
    assert torch.equal(result["vector"], again["vector"])


def test_pca_diff_random_pairing_is_oriented_by_every_row_not_only_the_paired_ones():
    # 4 positives against 9 negatives: the 4 negatives drawn can lie on the other side of the positives than
    # all 9 do; the orientation must follow the class means (the methods' contract), not the subsample's
    generator, wrong = torch.Generator().manual_seed(0), 0
    for seed in range(60):
        pos = torch.randn(4, 3, generator=generator) + 0.2
        neg = torch.randn(9, 3, generator=generator)
        vector = PCADiffMethod(pairing="random", seed=seed).extract(pos, neg)["vector"]
        wrong += float((pos.mean(0) - neg.mean(0)) @ vector) < 0
    assert wrong == 0


def test_classes_without_spread_give_the_mean_difference_direction():
    pos, neg = torch.ones(5, 3), torch.zeros(5, 3)  # every row of a class alike: no within-class variance
    expected = torch.full((3,), 3**-0.5)
    assert cos(GradientMethod().extract(pos, neg)["vector"], expected) > 0.9999  # was NaN (Adam: not exact)
    for solver in ("torch", "sklearn"):  # the torch iteration failed; scikit-learn's gave a zero vector
        with pytest.warns(UserWarning, match="span 1 dimensions, fewer than n_components=3.*fitting 1"):
            result = ICAMethod(solver=solver).extract(pos, neg)
        assert result["all_components"].shape == (1, 3)
        torch.testing.assert_close(result["vector"] / result["vector"].norm(), expected)
    with pytest.raises(ValueError, match="same mean in every feature"):
        ICAMethod().extract(pos, pos)


def test_ica_fits_only_the_dimensions_the_activations_span():
    generator = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    pos, neg = pos.repeat(2, 1), neg.repeat(2, 1)  # 12 rows, 6 distinct: 5 dimensions about their mean
    for solver in ("torch", "sklearn"):
        with pytest.warns(UserWarning, match="span 5 dimensions, fewer than n_components=8"):
            result = ICAMethod(solver=solver).extract(pos, neg)
        assert result["all_components"].shape == (5, 8) and result["vector"].norm() > 0.1
        assert result["pos_proj"].shape == (6, 5)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"component_idx=6, but .* only 5"):
        ICAMethod(component_idx=6).extract(pos, neg)


@pytest.mark.parametrize("shrinkage", [0.05, 0.5, 1.0])
def test_separation_gradient_equals_autograd(shrinkage):
    pos, neg, _ = planted(n=20, hidden=12, shift=0.5, big=3.0, seed=14)
    pos, neg = pos.double(), neg.double()
    delta = pos.mean(0) - neg.mean(0)
    centered = torch.cat([pos - pos.mean(0), neg - neg.mean(0)])
    dof, mean_var = len(centered) - 2, float((centered**2).sum()) / ((len(centered) - 2) * 12)
    param = 3.0 * torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss, grad = _separation_loss_grad(param, delta, centered, dof, shrinkage, mean_var)

    leaf = param.clone().requires_grad_(True)  # the objective as GradientMethod's docstring states it
    v = leaf / leaf.norm()
    spread = (1 - shrinkage) * v @ (centered.T @ centered / dof) @ v + shrinkage * mean_var
    expected = -(delta @ v) / spread.sqrt()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-10, atol=1e-14)


def test_gradient_reaches_the_regularised_lda_direction():
    pos, neg, _ = planted(n=100, shift=0.5, big=10.0, seed=13)
    shrinkage = 0.3
    result = GradientMethod(shrinkage=shrinkage).extract(pos, neg)
    p, q = pos.double().numpy(), neg.double().numpy()
    centered = np.concatenate([p - p.mean(0), q - q.mean(0)])
    within = centered.T @ centered / (len(centered) - 2)
    ridge = shrinkage * np.trace(within) / within.shape[0]
    lda = np.linalg.solve((1 - shrinkage) * within + ridge * np.eye(32), p.mean(0) - q.mean(0))
    assert cos(result["vector"], torch.from_numpy(lda).float()) > 0.999
    history = result["loss_history"]
    assert history.shape == (200,) and history[-1] < history[0]
    assert float(result["vector"].norm()) == pytest.approx(1.0, abs=1e-5)
    assert result["final_separation"] == pytest.approx(
        float((pos.mean(0) - neg.mean(0)) @ result["vector"]), rel=1e-4
    )


def test_random_baseline_is_a_seeded_unit_vector_unrelated_to_the_data():
    pos, neg, d = planted(n=20, hidden=2048, seed=14)
    result = RandomBaselineMethod().extract(pos, neg, seed=5)
    assert result["is_random"] and result["vector"].dtype == torch.float32
    assert float(result["vector"].norm()) == pytest.approx(1.0, abs=1e-5)
    assert abs(cos(result["vector"], d)) < 4 / 2048**0.5  # 4 standard deviations
    assert torch.equal(result["vector"], RandomBaselineMethod(seed=5).extract(pos, neg)["vector"])
    assert not torch.equal(result["vector"], RandomBaselineMethod(seed=6).extract(pos, neg)["vector"])


ALL = [
    ("mean_diff", {}),
    ("probe", {}),
    ("probe", {"penalty": "l1", "C": 0.1}),
    ("probe", {"solver": "sklearn"}),
    ("ica", {}),
    ("ica", {"solver": "sklearn"}),
    ("gradient", {"num_steps": 20}),
    ("pca_diff", {}),
    ("random_baseline", {}),
]


@pytest.mark.parametrize(("name", "params"), ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32_vectors_computed_in_float32(name, params, dtype):
    pos, neg, _ = planted(n=30, seed=15)
    pos, neg = pos.to(dtype), neg.to(dtype)
    result = get_method(name, **params).extract(pos, neg)
    reference = get_method(name, **params).extract(pos.float(), neg.float())
    assert result["vector"].dtype == torch.float32
    torch.testing.assert_close(result["vector"], reference["vector"])


@pytest.mark.parametrize(("name", "params"), ALL)
def test_results_are_reproducible_given_a_seed(name, params):
    pos, neg, _ = planted(n=30, seed=16)
    first = get_method(name, **params).extract(pos, neg, seed=3)["vector"]
    second = get_method(name, seed=3, **params).extract(pos, neg)["vector"]
    assert torch.equal(first, second)


def test_get_method_and_registry():
    assert set(METHODS) == {"mean_diff", "probe", "ica", "gradient", "pca_diff", "random_baseline"}
    for name, cls in METHODS.items():
        method = get_method(name)
        assert type(method) is cls and isinstance(method, ExtractionMethod)
        assert method.name() == cls.__name__
    assert get_method("probe", C=0.5).params == {"C": 0.5}
    with pytest.raises(
        ValueError, match=r"method must be one of 'mean_diff'.*'random_baseline'.*did you mean 'probe'"
    ):
        get_method("prob")
    with pytest.raises(TypeError, match=r"ProbeMethod has no parameter 'penalt'; did you mean 'penalty'"):
        get_method("probe", penalt="l1")
    with pytest.raises(TypeError, match="MeanDifferenceMethod has no parameter 'C'"):
        MeanDifferenceMethod().extract(*planted(n=3)[:2], C=1.0)
    with pytest.raises(TypeError):
        ExtractionMethod()


@pytest.mark.parametrize(("name", "params"), ALL)
def test_bad_input_raises_an_error_naming_the_argument_and_its_shape(name, params):
    method = get_method(name, **params)
    pos, neg, _ = planted(n=5, hidden=8, seed=17)
    with pytest.raises(ValueError, match=r"pos_acts must have shape \[n_pos, hidden\], got \(8,\)"):
        method.extract(pos[0], neg)
    with pytest.raises(ValueError, match=r"neg_acts must have shape \[n_neg, hidden\], got \(1, 5, 8\)"):
        method.extract(pos, neg[None])
    with pytest.raises(ValueError, match=r"same hidden size.*\(5, 8\).*\(5, 7\)"):
        method.extract(pos, neg[:, :7])
    with pytest.raises(ValueError, match=r"neg_acts is empty \(shape \(0, 8\)\)"):
        method.extract(pos, neg[:0])
    bad = pos.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="pos_acts contains 1 non-finite"):
        method.extract(bad, neg)
    with pytest.raises(TypeError, match=r"pos_acts must be a torch\.Tensor, got ndarray"):
        method.extract(pos.numpy(), neg)
    with pytest.raises(ValueError, match="neg_acts is on the 'meta' device and holds no data"):
        method.extract(pos, neg.to("meta"))
    if method.min_per_class > 1:
        with pytest.raises(
            ValueError, match=rf"pos_acts has 1 rows.*{type(method).__name__} needs at least 2"
        ):
            method.extract(pos[:1], neg)
    with pytest.raises(ValueError, match=r"no features \(hidden size 0\): \(5, 0\)"):
        method.extract(pos[:, :0], neg[:, :0])
    with pytest.raises(
        TypeError, match=r"pos_acts must be a floating-point tensor, got dtype torch\.complex64"
    ):
        method.extract(torch.complex(pos, pos), neg)
    with pytest.raises(TypeError, match=r"got torch\.float8_e4m3fn; cast it with \.float\(\)"):
        method.extract(pos.to(torch.float8_e4m3fn), neg)
    with pytest.raises(ValueError, match=r"pos_acts has values beyond float32's range"):
        method.extract(pos.double() * 1e200, neg.double())
    # the same rows on both sides (a prompt position on pairs that differ only in their answers): every
    # method gave something that looked like a direction (gradient its random start, pca_diff e_0)
    with pytest.raises(ValueError, match=r"same mean in every feature.*position=.response_mean."):
        method.extract(pos, pos.flip(0))


@pytest.mark.parametrize(("name", "params"), ALL)
def test_activations_that_require_grad_give_a_plain_vector(name, params):
    pos, neg, _ = planted(n=20, hidden=8, seed=19)
    out = get_method(name, **params).extract(pos.requires_grad_(), neg)  # sklearn solvers raised
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in out.values())
    expected = get_method(name, **params).extract(pos.detach(), neg)["vector"]
    torch.testing.assert_close(out["vector"], expected)


@pytest.mark.parametrize("scale", [1e-15, 1e20])
def test_normalized_mean_difference_is_a_unit_vector_at_any_scale(scale):
    pos, neg, d = planted(n=20, hidden=8, seed=20)
    vector = MeanDifferenceMethod(normalize=True).extract(pos * scale, neg * scale)["vector"]
    assert abs(float(vector.norm()) - 1) < 1e-6 and cos(vector, d) > 0.9  # was 0.0 at 1e20, 0.003 at 1e-15


def test_huge_activations_are_oriented_and_fitted_as_at_unit_scale():
    """float32 sums overflowed: the means that orient PCA / ICA became NaN (a wrong sign, flipped=False), and
    the gradient method's scale went to inf, so it returned its random start."""
    pos, neg, _ = planted(n=100, hidden=16, seed=21)
    pos, neg = pos + 30, neg + 30  # an offset, as residual streams have
    for name in ("pca_diff", "ica", "gradient"):
        small = get_method(name).extract(pos, neg)["vector"]
        big = get_method(name).extract(pos * 1e36, neg * 1e36)["vector"]
        assert cos(small.double(), big.double()) > 0.98, name  # ICA: 0.989 (its iteration rounds anew)
        assert float((pos.double().mean(0) - neg.double().mean(0)) @ big.double()) > 0
    big = GradientMethod().extract(pos * 1e18, neg * 1e18)["vector"]
    assert abs(cos(big, RandomBaselineMethod().extract(pos, neg)["vector"])) < 0.9  # the start, maybe flipped


def test_bad_hyper_parameters_are_named():
    pos, neg, _ = planted(n=10, seed=18)
    with pytest.raises(ValueError, match=r"penalty must be one of 'l2', 'l1', 'elasticnet', got 'l3'"):
        ProbeMethod(penalty="l3").extract(pos, neg)
    with pytest.raises(
        ValueError, match="solver must be one of 'torch', 'sklearn', got 'sklern'; did you mean 'sklearn'"
    ):
        ProbeMethod(solver="sklern").extract(pos, neg)
    with pytest.raises(ValueError, match=r"C must be a finite number > 0 .*, got 0"):
        ProbeMethod(C=0).extract(pos, neg)
    with pytest.raises(ValueError, match="shrinkage must be in"):
        GradientMethod(shrinkage=0.0).extract(pos, neg)
    with pytest.raises(ValueError, match="pairing must be one of"):
        PCADiffMethod(pairing="sorted").extract(pos, neg)
    with pytest.raises(ValueError, match="n_components must be a positive int"):
        ICAMethod(n_components=0).extract(pos, neg)
    with pytest.raises(ValueError, match="solver must be one of 'torch', 'sklearn', got 'fastica'"):
        ICAMethod(solver="fastica").extract(pos, neg)
    with pytest.raises(ValueError, match="max_iter must be a positive int, got 0"):
        ICAMethod(max_iter=0).extract(pos, neg)
    # each was taken as given, then failed inside (or gave a zero / random / NaN vector)
    for method, message in [
        (ProbeMethod(max_iter=0), "max_iter must be a positive int, got 0"),
        (ProbeMethod(max_iter=10.0), r"max_iter must be a positive int, got 10\.0"),
        (ProbeMethod(C="1"), r"C must be a finite number > 0 .*, got '1'"),
        (ProbeMethod(tol=float("nan")), "tol must be >= 0, got nan"),
        (ICAMethod(tol=float("nan")), "tol must be >= 0, got nan"),
        (ICAMethod(component_idx=True), r"component_idx must be an int in \[0, "),
        (GradientMethod(lr=float("nan")), "lr must be > 0, got nan"),
        (GradientMethod(lr=0), "lr must be > 0, got 0"),
        (GradientMethod(seed=1.7), r"seed must be an int, got 1\.7"),
    ]:
        with pytest.raises(ValueError, match=message):
            method.extract(pos, neg)
    # numpy and 0-d tensor numbers are numbers
    expected = ICAMethod(n_components=3, component_idx=1).extract(pos, neg)["vector"]
    got = ICAMethod(n_components=np.int64(3), component_idx=torch.tensor(1)).extract(pos, neg)["vector"]
    torch.testing.assert_close(got, expected)


def test_the_gradient_methods_adam_takes_the_steps_of_torch_optim_adam():
    from traitlens.methods import _Adam

    g = torch.Generator().manual_seed(3)
    start = torch.randn(40, generator=g)
    ours, reference = start.clone(), start.clone().requires_grad_(True)
    adam, optimizer = _Adam(ours, lr=0.05), torch.optim.Adam([reference], lr=0.05)
    for _ in range(50):
        grad = torch.randn(40, generator=g) * 10 ** float(torch.randint(-3, 3, (1,), generator=g))
        adam.step(grad)
        reference.grad = grad.clone()
        optimizer.step()
        assert torch.equal(ours, reference.detach())
