"""traitlens.compute against numpy / scipy / scikit-learn references, plus shape and invariance laws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from traitlens.compute import (
    angular_velocity,
    attention_entropy,
    compute_derivative,
    compute_second_derivative,
    cosine_similarity,
    magnitude,
    mean_difference,
    normalize_vectors,
    pca_reduce,
    projection,
    radial_velocity,
)

PROPS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 12)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --- mean_difference ---------------------------------------------------------------------------------


def test_mean_difference_matches_numpy_for_2d_and_3d():
    pos, neg = randn(7, 5, seed=1), randn(4, 5, seed=2)
    expected = pos.numpy().mean(0) - neg.numpy().mean(0)
    np.testing.assert_allclose(mean_difference(pos, neg).numpy(), expected, rtol=1e-6)

    pos3, neg3 = randn(3, 6, 5, seed=3), randn(2, 4, 5, seed=4)
    expected3 = pos3.numpy().mean((0, 1)) - neg3.numpy().mean((0, 1))
    np.testing.assert_allclose(mean_difference(pos3, neg3).numpy(), expected3, rtol=1e-5, atol=1e-7)
    # explicit dim keeps the seq dimension
    per_token = mean_difference(pos3[:, :4], neg3, dim=0)
    np.testing.assert_allclose(
        per_token.numpy(), pos3[:, :4].numpy().mean(0) - neg3.numpy().mean(0), rtol=1e-5
    )
    # one example a side, [hidden]: the difference itself
    one_pos, one_neg = randn(5, seed=5), randn(5, seed=6)
    np.testing.assert_allclose(
        mean_difference(one_pos, one_neg).numpy(), (one_pos - one_neg).numpy(), rtol=1e-6
    )


def test_mean_difference_errors():
    with pytest.raises(ValueError, match="same shape"):
        mean_difference(randn(3, 5), randn(3, 6))
    with pytest.raises(ValueError, match="neg_acts is empty"):
        mean_difference(randn(3, 5), torch.zeros(0, 5))
    with pytest.raises(TypeError, match=r"pos_acts must be a torch\.Tensor, got ndarray"):
        mean_difference(np.zeros((3, 5)), randn(3, 5))
    with pytest.raises(ValueError, match="non-finite"):
        mean_difference(torch.tensor([[float("nan"), 1.0]]), randn(3, 2))


# --- derivatives ---------------------------------------------------------------------------------------


def test_derivatives_match_numpy_diff():
    x = randn(9, 4, seed=5)
    np.testing.assert_allclose(
        compute_derivative(x, dt=0.5).numpy(), np.diff(x.numpy(), axis=0) / 0.5, rtol=1e-6
    )
    np.testing.assert_allclose(
        compute_second_derivative(x, dt=2.0).numpy(),
        np.diff(x.numpy(), n=2, axis=0) / 4.0,
        rtol=1e-5,
        atol=1e-6,
    )
    batch = randn(2, 6, 4, seed=6)  # [batch, seq, hidden], time along dim 1
    np.testing.assert_allclose(
        compute_derivative(batch, dim=1).numpy(), np.diff(batch.numpy(), axis=1), rtol=1e-6, atol=1e-6
    )
    scalars = randn(5, seed=7)  # one projection per token
    np.testing.assert_allclose(compute_derivative(scalars).numpy(), np.diff(scalars.numpy()), rtol=1e-6)
    # a numpy float32 or a one-element tensor is a step too (numpy float32 is no Python float)
    for dt in (np.float32(0.5), torch.tensor(0.5)):
        assert torch.equal(compute_derivative(x, dt=dt), compute_derivative(x, dt=0.5))


def test_derivative_normalize_gives_unit_vectors_and_keeps_zero_steps():
    x = randn(6, 3, seed=8)
    x[3] = x[2]  # a step of exactly zero
    v = compute_derivative(x, normalize=True)
    norms = v.norm(dim=-1)
    assert torch.all(norms[[0, 1, 3, 4]].sub(1).abs() < 1e-6)
    assert norms[2] == 0 and not torch.isnan(v).any()
    a = compute_second_derivative(x, normalize=True)
    assert torch.allclose(a.norm(dim=-1), torch.ones(4), atol=1e-6)


def test_derivative_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"compute_derivative needs at least 2 points along dim 0.*\(1, 4\)"):
        compute_derivative(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"compute_second_derivative needs at least 3 points.*\(2, 4\)"):
        compute_second_derivative(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dt must be a finite non-zero"):
        compute_derivative(torch.zeros(3, 4), dt=0)
    for bad in (True, float("nan"), "1", torch.ones(2)):
        with pytest.raises(ValueError, match="dt must be a finite non-zero"):
            compute_derivative(torch.zeros(3, 4), dt=bad)
    with pytest.raises(ValueError, match="normalize=True needs vectors"):
        compute_derivative(torch.zeros(3), normalize=True)
    with pytest.raises(ValueError, match="out of range"):
        compute_derivative(torch.zeros(3, 4), dim=2)


@PROPS
@given(seq=st.integers(3, 10), hidden=dims, seed=seeds, dt=st.floats(0.1, 10))
def test_derivative_of_linear_trajectory_is_constant(seq, hidden, seed, dt):
    start, step = randn(hidden, seed=seed), randn(hidden, seed=seed + 1)
    t = torch.arange(seq, dtype=torch.float32)[:, None]
    x = start + t * dt * step  # [seq, hidden], moving by step per unit time
    v = compute_derivative(x, dt=dt)
    assert v.shape == (seq - 1, hidden)
    assert torch.allclose(v, step.expand_as(v), atol=1e-4 * (1 + seq * dt) * (1 + step.abs().max()))
    a = compute_second_derivative(x, dt=dt)
    assert a.shape == (seq - 2, hidden)
    assert a.abs().max() <= 1e-3 * (1 + seq * dt) * (1 + step.abs().max()) / dt


# --- projection ----------------------------------------------------------------------------------------


def test_projection_matches_numpy():
    acts, vec = randn(2, 5, 8, seed=9), randn(8, seed=10)
    expected = acts.numpy() @ (vec.numpy() / np.linalg.norm(vec.numpy()))
    out = projection(acts, vec)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        projection(acts, vec, normalize_vector=False).numpy(),
        acts.numpy() @ vec.numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    assert projection(acts[0, 0], vec).shape == ()


def test_projection_zero_vector_and_errors():
    assert torch.equal(projection(randn(4, 3), torch.zeros(3)), torch.zeros(4))
    with pytest.raises(
        ValueError, match=r"vector must have shape \[hidden\]=\[8\] to match activations \(4, 8\)"
    ):
        projection(randn(4, 8), randn(7))
    with pytest.raises(ValueError, match=r"vector must have shape \[hidden\], got \(2, 8\)"):
        projection(randn(4, 8), randn(2, 8))


@PROPS
@given(n=dims, hidden=dims, seed=seeds, a=st.floats(-5, 5), b=st.floats(-5, 5), scale=st.floats(1e-3, 1e3))
def test_projection_linear_in_activations_and_scale_invariant(n, hidden, seed, a, b, scale):
    x, y, v = randn(n, hidden, seed=seed), randn(n, hidden, seed=seed + 1), randn(hidden, seed=seed + 2)
    x, y, v = x.double(), y.double(), v.double()
    lhs = projection(a * x + b * y, v)
    assert torch.allclose(lhs, a * projection(x, v) + b * projection(y, v), atol=1e-9)
    assert torch.allclose(projection(x, scale * v), projection(x, v), atol=1e-9)
    assert torch.allclose(projection(x, -v), -projection(x, v), atol=1e-12)


# --- cosine, normalize, magnitude ----------------------------------------------------------------------


def test_cosine_matches_scipy_and_broadcasts():
    a, b = randn(5, 7, seed=11), randn(7, seed=12)
    expected = [1 - scipy.spatial.distance.cosine(row, b.numpy()) for row in a.numpy()]
    out = cosine_similarity(a, b)
    assert out.shape == (5,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        cosine_similarity(a.T, b[:, None], dim=0).numpy(), expected, rtol=1e-5, atol=1e-6
    )  # the vector dimension first
    with pytest.raises(ValueError, match="broadcastable"):
        cosine_similarity(randn(3, 4), randn(2, 4))
    # a vector cannot be broadcast along itself: a size-1 (or missing) vector dimension is refused
    for first, second, dim in (
        (randn(3, 5), randn(1, 5), 0),
        (randn(3, 5), randn(5), 0),
        (randn(4, 3), randn(4, 1), -1),
    ):
        with pytest.raises(ValueError, match=f"both have dim={dim} of the same size"):
            cosine_similarity(first, second, dim=dim)
    # a positive dim means the same axis of inputs of different ranks, as torch's broadcasting aligns them
    a3, b2 = randn(2, 3, 4, seed=13), randn(3, 4, seed=14)
    expected3 = torch.nn.functional.cosine_similarity(a3.double(), b2.expand_as(a3).double(), dim=1)
    for dim in (1, -2):
        torch.testing.assert_close(
            cosine_similarity(a3, b2, dim=dim).double(), expected3, rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        cosine_similarity(randn(3, 5), randn(5), dim=2)


def test_cosine_zero_vector_is_zero_and_large_values_do_not_overflow():
    assert float(cosine_similarity(torch.zeros(4), randn(4))) == 0.0
    assert float(cosine_similarity(torch.zeros(4), torch.zeros(4))) == 0.0
    big = torch.full((8,), 3e30)
    assert float(cosine_similarity(big, big)) == pytest.approx(1.0, abs=1e-6)


@PROPS
@given(n=dims, hidden=dims, seed=seeds, s1=st.floats(1e-3, 1e3), s2=st.floats(1e-3, 1e3))
def test_cosine_symmetric_scale_invariant_bounded(n, hidden, seed, s1, s2):
    a, b = randn(n, hidden, seed=seed), randn(n, hidden, seed=seed + 1)
    c = cosine_similarity(a, b)
    assert torch.equal(c, cosine_similarity(b, a))
    assert torch.allclose(cosine_similarity(s1 * a, s2 * b), c, atol=1e-5)
    assert torch.allclose(cosine_similarity(-a, b), -c, atol=1e-6)
    assert torch.all(c.abs() <= 1)


@PROPS
@given(n=dims, hidden=dims, seed=seeds, scale=st.floats(1e-20, 1e20))
def test_normalize_gives_unit_norm(n, hidden, seed, scale):
    x = randn(n, hidden, seed=seed) * scale
    u = normalize_vectors(x)
    assert torch.allclose(u.norm(dim=-1), torch.ones(n), atol=1e-5)
    x64 = x.double()
    assert torch.allclose(u.double(), x64 / x64.norm(dim=-1, keepdim=True), atol=1e-6)


def test_normalize_and_magnitude_against_numpy():
    x = randn(4, 3, 6, seed=13)
    x[1, 2] = 0
    ref_norm = np.linalg.norm(x.numpy(), axis=-1)
    np.testing.assert_allclose(magnitude(x).numpy(), ref_norm, rtol=1e-6)
    np.testing.assert_allclose(magnitude(x, dim=0).numpy(), np.linalg.norm(x.numpy(), axis=0), rtol=1e-6)
    for big in (1e30, 1e-30):  # squares past float32's range: inf / 0 before the scaling
        np.testing.assert_allclose(magnitude(x * big).numpy(), ref_norm * big, rtol=1e-6)
    u = normalize_vectors(x)
    assert torch.equal(u[1, 2], torch.zeros(6))  # zero vector stays zero, no NaN
    ok = ref_norm > 0
    np.testing.assert_allclose(u.numpy()[ok], x.numpy()[ok] / ref_norm[ok][:, None], rtol=1e-6)
    np.testing.assert_allclose(
        normalize_vectors(x, dim=0).numpy(), x.numpy() / np.linalg.norm(x.numpy(), axis=0), rtol=1e-6
    )


# --- radial and angular velocity -----------------------------------------------------------------------


def test_radial_and_angular_velocity_match_references():
    x = randn(5, 3, 8, seed=14)  # [layer, seq, hidden]
    norms = np.linalg.norm(x.numpy(), axis=-1)
    np.testing.assert_allclose(radial_velocity(x).numpy(), np.diff(norms, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        radial_velocity(x, dim=1).numpy(), np.diff(norms, axis=1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        radial_velocity(x, dim=-2).numpy(), np.diff(norms, axis=1), rtol=1e-5, atol=1e-6
    )
    xs = x.numpy()
    expected = np.array(
        [[scipy.spatial.distance.cosine(xs[t, s], xs[t + 1, s]) for s in range(3)] for t in range(4)]
    )
    out = angular_velocity(x)
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    expected_seq = np.array(
        [[scipy.spatial.distance.cosine(xs[t, s], xs[t, s + 1]) for s in range(2)] for t in range(5)]
    )
    np.testing.assert_allclose(angular_velocity(x, dim=1).numpy(), expected_seq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e19, 1e-25])
def test_radial_velocity_takes_norms_without_overflow_or_underflow(scale):
    x = randn(5, 8, seed=15)
    expected = np.diff(np.linalg.norm(x.double().numpy() * scale, axis=-1))  # was NaN / -inf, and 0
    np.testing.assert_allclose(radial_velocity(x * scale).double().numpy(), expected, rtol=1e-5)


def test_angular_velocity_bounds_and_errors():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(angular_velocity(x), torch.tensor([0.0, 2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="hidden"):
        radial_velocity(randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="hidden"):
        angular_velocity(randn(3, 4), dim=1)
    with pytest.raises(ValueError, match="angular_velocity needs at least 2 points"):
        angular_velocity(randn(1, 4))
    with pytest.raises(ValueError, match=r"\[n_points, \.\.\., hidden\]"):
        radial_velocity(randn(4))


# --- pca_reduce ----------------------------------------------------------------------------------------


def test_pca_reduce_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    # Clearly separated variances so that the components are well defined.
    x = randn(40, 6, seed=15) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2]) + randn(6, seed=16)
    x = x @ torch.linalg.qr(randn(6, 6, seed=17))[0]
    reduced, (mean, components) = pca_reduce(x, n_components=3, return_pca=True)
    ref = PCA(n_components=3, svd_solver="full").fit(x.numpy().astype(np.float64))
    signs = np.sign(np.sum(components.numpy() * ref.components_, axis=1))
    assert np.all(signs != 0)
    np.testing.assert_allclose(components.numpy(), signs[:, None] * ref.components_, atol=1e-4)
    np.testing.assert_allclose(reduced.numpy(), ref.transform(x.numpy()) * signs, atol=1e-3)
    np.testing.assert_allclose(mean.numpy(), ref.mean_, atol=1e-5)
    # documented sign convention: the largest-magnitude entry of each component is positive
    c = components.numpy()
    assert np.all(c[np.arange(3), np.abs(c).argmax(axis=1)] > 0)
    # reuse on new data, as in the docstring
    new = randn(5, 6, seed=18)
    np.testing.assert_allclose(
        ((new - mean) @ components.T).numpy(), ref.transform(new.numpy()) * signs, atol=1e-3
    )


def test_pca_reduce_mean_is_accumulated_in_float64():
    # residual streams carry offsets of ~1e4 in some dimensions: a float32 running sum lost 4.6e-3 here
    x = randn(500, 64, seed=40) + 2.6e4
    _, (mean, _) = pca_reduce(x, 2, return_pca=True)
    ulp = float(torch.finfo(torch.float32).eps) * 2.6e4  # the float32 spacing at that magnitude: 3.1e-3
    assert float((mean.double() - x.double().mean(0)).abs().max()) <= ulp / 2


def test_pca_reduce_keeps_leading_dims_and_validates():
    x = randn(4, 5, 7, seed=19)
    assert pca_reduce(x).shape == (4, 5, 2)
    torch.testing.assert_close(pca_reduce(x, 3).reshape(20, 3), pca_reduce(x.reshape(20, 7), 3))
    with pytest.raises(ValueError, match=r"n_components must be between 1 and min\(n_samples, hidden\)=3"):
        pca_reduce(randn(3, 8), n_components=4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        pca_reduce(randn(1, 8), n_components=1)
    with pytest.raises(TypeError, match="n_components must be an int"):
        pca_reduce(randn(5, 8), n_components=2.0)


@PROPS
@given(n=st.integers(2, 12), hidden=st.integers(1, 10), k=st.integers(1, 10), seed=seeds)
def test_pca_reduce_shape_orthonormal_and_centred(n, hidden, k, seed):
    k = min(k, n, hidden)
    x = randn(n, hidden, seed=seed)
    reduced, (mean, comps) = pca_reduce(x, k, return_pca=True)
    assert reduced.shape == (n, k) and comps.shape == (k, hidden) and mean.shape == (hidden,)
    assert torch.allclose(comps @ comps.T, torch.eye(k), atol=1e-4)
    assert torch.allclose(reduced.mean(0), torch.zeros(k), atol=1e-4)
    # variances are non-increasing across components
    var = reduced.var(0, unbiased=False) if n > 1 else torch.zeros(k)
    assert torch.all(var[:-1] >= var[1:] - 1e-4)


# --- attention_entropy ---------------------------------------------------------------------------------


def test_attention_entropy_matches_scipy():
    p = torch.softmax(randn(2, 3, 7, seed=20) * 3, dim=-1)  # [heads, query, key]
    expected = scipy.stats.entropy(p.numpy().astype(np.float64), axis=-1)
    out = attention_entropy(p)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(attention_entropy(p.transpose(0, 2), dim=0).numpy(), expected.T, rtol=1e-5)
    one_hot = torch.zeros(10)
    one_hot[3] = 1
    assert float(attention_entropy(one_hot)) == 0.0
    assert float(attention_entropy(torch.full((10,), 0.1))) == pytest.approx(math.log(10), rel=1e-6)


def test_attention_entropy_rejects_negative_and_warns_on_unnormalised():
    with pytest.raises(ValueError, match="non-negative"):
        attention_entropy(torch.tensor([0.5, 0.6, -0.1]))
    with pytest.warns(UserWarning, match="do not sum to 1"):
        attention_entropy(torch.tensor([0.5, 0.6, 0.1]))


@PROPS
@given(rows=dims, n=st.integers(1, 30), seed=seeds, temp=st.floats(0.01, 100))
def test_attention_entropy_bounds(rows, n, seed, temp):
    p = torch.softmax(randn(rows, n, seed=seed) * temp, dim=-1)
    h = attention_entropy(p)
    assert torch.all(h >= -1e-6) and torch.all(h <= math.log(n) + 1e-5)


# --- dtypes --------------------------------------------------------------------------------------------

X = randn(6, 4, 16, seed=21)  # [layer, seq, hidden]
V = randn(16, seed=22)
P = torch.softmax(X * 2, dim=-1)  # attention-like rows
DTYPE_CASES = {  # name: (function of one tensor, its float32 input)
    "mean_difference": (lambda x: mean_difference(x[:3], x[3:]), X),
    "compute_derivative": (lambda x: compute_derivative(x), X),
    "compute_second_derivative": (lambda x: compute_second_derivative(x, dim=1), X),
    "projection": (lambda x: projection(x, V), X),
    "cosine_similarity": (lambda x: cosine_similarity(x[0], x[1]), X),
    "normalize_vectors": (lambda x: normalize_vectors(x), X),
    "magnitude": (lambda x: magnitude(x), X),
    "radial_velocity": (lambda x: radial_velocity(x), X),
    "angular_velocity": (lambda x: angular_velocity(x), X),
    "pca_reduce": (lambda x: pca_reduce(x, 2), X),
    "attention_entropy": (lambda x: attention_entropy(x), P),
}


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(DTYPE_CASES))
def test_half_inputs_give_float32_close_to_float32_computation(name, low):
    fn, x32 = DTYPE_CASES[name]
    x = x32.to(low)
    out, ref = fn(x), fn(x.float())  # the same (already rounded) values, computed in float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_float64_stays_float64():
    x = randn(5, 4, dtype=torch.float64)
    assert mean_difference(x, x).dtype == torch.float64
    assert projection(x, randn(4)).dtype == torch.float64
    assert pca_reduce(x, 2).dtype == torch.float64


def test_every_dim_argument_is_checked_alike():
    """Some functions named a bad dim; others raised torch's IndexError, or a TypeError from a tuple index."""
    x = randn(5, 8, seed=16)
    calls = [
        lambda dim: normalize_vectors(x, dim=dim),
        lambda dim: magnitude(x, dim=dim),
        lambda dim: attention_entropy(torch.softmax(x, -1), dim=dim),
        lambda dim: mean_difference(x, x + 1, dim=dim),
        lambda dim: compute_derivative(x, dim=dim),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"dim=5 is out of range for .* of shape \(5, 8\)"):
            call(5)
        with pytest.raises(TypeError, match=r"dim must be an int, got 0\.5"):
            call(0.5)
    with pytest.raises(ValueError, match=r"dim=\(0, -2\) names a dimension of pos_acts \(5, 8\) twice"):
        mean_difference(x, x + 1, dim=(0, -2))
    for call in (normalize_vectors, magnitude):  # no vector dimension: "amax(): Expected reduction dim"
        with pytest.raises(
            ValueError, match=r"needs at least 1 point along dim 1 of vectors, got shape \(3, 0\)"
        ):
            call(torch.zeros(3, 0))
    torch.testing.assert_close(mean_difference(x, x + 1, dim=(0,)), mean_difference(x, x + 1))


def test_mean_difference_takes_a_list_of_dims_as_torch_does():
    x = randn(2, 3, 8, seed=17)
    torch.testing.assert_close(mean_difference(x, x + 1, dim=[0, 1]), mean_difference(x, x + 1))
