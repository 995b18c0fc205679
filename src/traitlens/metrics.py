"""Judging a trait vector on held-out data.

The separation metrics have the signature ``metric(vector, pos_acts, neg_acts, ...)`` with ``vector``
``[hidden]`` and activations ``[n_pos, hidden]`` / ``[n_neg, hidden]``; the stability metrics take
``(pos_acts, neg_acts, *, method=...)`` and recompute the vector themselves. All return a plain Python float,
bool or dict (JSON-serialisable). Examples are scored by their projection onto the *unit* vector
(:func:`traitlens.compute.projection`), so scores are in activation units along the direction and do not
depend on the vector's norm. Separation metrics and vector properties compute in float64 whatever the
input dtype; stability metrics fit their vectors in float32 (float64 inputs stay float64) and compare them
in float64.

Sign convention: a good vector points from the negative class to the positive one, so ``separation``,
``effect_size`` and ``auroc - 0.5`` are positive for it; a vector with the wrong polarity gets negative
values (and accuracy below 0.5 at the midpoint threshold) rather than silently absolute ones.

Groups: separation (``separation``, ``accuracy``, ``auroc``, ``effect_size``, ``p_value``,
``polarity_correct``), stability (``bootstrap_stability``, ``noise_stability``, ``subsample_stability``),
vector properties (``sparsity``, ``hoyer_sparsity``, ``effective_rank``, ``top_k_concentration``),
relations between vectors (``orthogonality``, ``cross_trait_accuracy``), and ``evaluate_vector``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch

from traitlens._validation import check_int, check_pos_neg, check_real, check_tensor, check_vector, shape_of
from traitlens.compute import _norm, _upcast, cosine_similarity, mean_difference
from traitlens.methods import get_method

#: ``method(pos_acts, neg_acts)`` -> a ``[hidden]`` vector, or a dict with the vector under ``"vector"``; or
#: a method's name (see ``get_method``).
Method = Callable[[torch.Tensor, torch.Tensor], object] | str

# ---------------------------------------------------------------------------------------------------
# Scores: the projections every separation metric is computed from
# ---------------------------------------------------------------------------------------------------


def _scores(
    vector: object, pos_acts: object, neg_acts: object, min_per_class: int = 1, who: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections of ``pos_acts`` and ``neg_acts`` onto the unit ``vector``: ``[n_pos]``, ``[n_neg]``, in
    float64. Every row is reduced in the same order, so an example in both classes gets one score (two
    matrix products of different sizes may round it differently, and AUROC would miss the tie). Different
    rows with the same exact projection tie too wherever float64 sums their products exactly (integer or
    low-precision activations, say: up to 0.07 of AUROC on small integer data): the vector is scaled by a
    power of two, so the products of float32 (or narrower) values with it are exact, and the sums are
    divided by one norm (products with the rounded unit vector gave equal projections different last
    digits)."""
    pos, neg = check_pos_neg(pos_acts, neg_acts, min_per_class=min_per_class, method=who)
    return _projections(vector, pos, neg)


def _projections(vector: object, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_scores`` of ``pos`` and ``neg`` that ``check_pos_neg`` has passed, not checked again (the pipeline
    checks a layer's activations once for all its methods); ``vector`` is checked here."""
    vec = check_vector(vector, "vector", hidden=pos.shape[1], hidden_of=f"pos_acts {shape_of(pos)}")
    vec = vec.detach().to(device=pos.device, dtype=torch.float64)
    vec = torch.ldexp(vec, -torch.frexp(vec.abs().amax()).exponent)  # largest magnitude in [0.5, 1), or 0
    norm = torch.linalg.vector_norm(vec)
    norm = torch.where(norm > 0, norm, 1.0)  # a zero vector scores 0

    # an elementwise product summed per row, not a matrix product: the same reduction for every row (in a
    # float64 copy: the caller's float64 activations must not be scaled in place)
    def score(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=pos.device, dtype=torch.float64, copy=True).mul_(vec).sum(dim=-1).div_(norm)

    return score(pos), score(neg)


# The reductions below take the scores of one direction (``[n_pos]``, ``[n_neg]``) or of several at once,
# one per column (``[n_pos, d]``, ``[n_neg, d]``: the pipeline's random directions), and return tensors
# (``[]`` or ``[d]``).


def _midpoint(pos_s: torch.Tensor, neg_s: torch.Tensor) -> torch.Tensor:
    return (pos_s.mean(0) + neg_s.mean(0)) / 2


def _accuracy(pos_s: torch.Tensor, neg_s: torch.Tensor, threshold, balanced: bool) -> torch.Tensor:
    # An example is called positive when its score is strictly above the threshold.
    pos_right = (pos_s > threshold).double()
    neg_right = (neg_s <= threshold).double()
    if balanced:
        return (pos_right.mean(0) + neg_right.mean(0)) / 2
    return (pos_right.sum(0) + neg_right.sum(0)) / (len(pos_s) + len(neg_s))


def _auroc(pos_s: torch.Tensor, neg_s: torch.Tensor) -> torch.Tensor:
    # Mann-Whitney U / (n_pos * n_neg), ties counted one half: for each positive, the negatives strictly
    # below it plus those not above it (binary searches in the sorted negatives) are twice its share of U.
    neg_sorted = neg_s.movedim(0, -1).sort(dim=-1).values.contiguous()
    pos_rows = pos_s.movedim(0, -1).contiguous()
    twice_u = torch.searchsorted(neg_sorted, pos_rows) + torch.searchsorted(neg_sorted, pos_rows, right=True)
    return twice_u.sum(-1).double() / (2 * len(pos_s) * len(neg_s))


def _moments(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased variance of ``[n]`` scores, taken about the first score: a class of equal scores
    gets exactly its score and exactly 0 (about their own rounded mean, ``var`` of equal values is ~1e-33,
    as large as the rounding of the difference of two such means, which made d and p of equal classes
    arbitrary)."""
    shifted = scores - scores[0]
    return float(scores[0] + shifted.mean()), float(shifted.var())


def _cohens_d(pos_s: torch.Tensor, neg_s: torch.Tensor) -> float:
    n_pos, n_neg = len(pos_s), len(neg_s)
    (mean_pos, var_pos), (mean_neg, var_neg) = _moments(pos_s), _moments(neg_s)
    pooled_var = ((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2)
    diff = mean_pos - mean_neg
    if pooled_var <= 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(pooled_var)


def _welch_p(pos_s: torch.Tensor, neg_s: torch.Tensor) -> float:
    # Welch's t-test, two-sided: t = (m1 - m2) / sqrt(v1/n1 + v2/n2), with the Welch-Satterthwaite degrees of
    # freedom; the Student t tail comes from scipy.special.stdtr (scipy.stats.ttest_ind, the reference in the
    # tests, costs ~5 ms a call in argument handling, which the pipeline pays once per method and layer).
    from scipy.special import stdtr

    n_pos, n_neg = len(pos_s), len(neg_s)
    (mean_pos, var_pos), (mean_neg, var_neg) = _moments(pos_s), _moments(neg_s)
    a, b = var_pos / n_pos, var_neg / n_neg
    diff = mean_pos - mean_neg
    if a + b == 0:
        return 1.0 if diff == 0 else 0.0
    t = diff / math.sqrt(a + b)
    share = a / (a + b)  # in this scale-free form the degrees of freedom neither under- nor overflow
    dof = 1.0 / (share**2 / (n_pos - 1) + (1.0 - share) ** 2 / (n_neg - 1))
    return float(2 * stdtr(dof, -abs(t)))


# ---------------------------------------------------------------------------------------------------
# Separation: does the vector tell the classes apart?
# ---------------------------------------------------------------------------------------------------


def separation(vector: torch.Tensor, pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> float:
    """Mean projection of the positives minus mean projection of the negatives (signed).

    In activation units along the unit vector; negative when the vector points the wrong way.
    :func:`effect_size` is the same difference divided by the pooled standard deviation.

    Args:
        vector: ``[hidden]``.
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
    """
    pos_s, neg_s = _scores(vector, pos_acts, neg_acts)
    return float(pos_s.mean() - neg_s.mean())


def midpoint_threshold(vector: torch.Tensor, pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> float:
    """The midpoint of the two class means of the projections onto the unit ``vector``: the threshold that
    ``accuracy`` uses by default. Fit it on training data and pass it to ``accuracy`` on held-out data."""
    return float(_midpoint(*_scores(vector, pos_acts, neg_acts)))


def accuracy(
    vector: torch.Tensor,
    pos_acts: torch.Tensor,
    neg_acts: torch.Tensor,
    *,
    threshold: float | None = None,
    balanced: bool = False,
) -> float:
    """Fraction of examples on the right side of a threshold on the projection.

    An example is predicted positive when its projection is strictly above ``threshold``.

    Args:
        vector: ``[hidden]``.
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
        threshold: on the projection onto the unit vector; ``None`` uses the midpoint of the two class
            means of the projections (computed on these same data).
        balanced: average the per-class accuracies instead of counting all examples (matters only when
            ``n_pos != n_neg``).
    """
    pos_s, neg_s = _scores(vector, pos_acts, neg_acts)
    return float(_accuracy(pos_s, neg_s, _threshold(threshold, pos_s, neg_s), balanced))


def _threshold(threshold, pos_s: torch.Tensor, neg_s: torch.Tensor) -> float:
    """``threshold``, checked to be a finite number, or the midpoint of the class means for ``None``."""
    if threshold is None:
        return float(_midpoint(pos_s, neg_s))
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number or None, got {type(threshold).__name__} {threshold!r}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return float(threshold)


def auroc(vector: torch.Tensor, pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> float:
    """Area under the ROC curve of the projection as a score for the positive class.

    The probability that a random positive projects higher than a random negative, ties counted as
    one half (rank-based, Mann-Whitney U). 0.5 is chance; ``1 - auroc`` for the negated vector.

    Args:
        vector: ``[hidden]``.
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
    """
    return float(_auroc(*_scores(vector, pos_acts, neg_acts)))


def effect_size(vector: torch.Tensor, pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> float:
    """Cohen's d of the projections: ``(mean_pos - mean_neg) / pooled_std`` (signed).

    ``pooled_std = sqrt(((n_pos - 1) var_pos + (n_neg - 1) var_neg) / (n_pos + n_neg - 2))`` with
    unbiased variances. If both classes have zero spread the result is 0.0 for equal means and
    ``±inf`` otherwise. Needs at least 2 examples per class.

    Args:
        vector: ``[hidden]``.
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
    """
    return _cohens_d(*_scores(vector, pos_acts, neg_acts, 2, "effect_size"))


def p_value(vector: torch.Tensor, pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) between the two sets of projections.

    Equals ``scipy.stats.ttest_ind(..., equal_var=False).pvalue``: the statistic and Welch-Satterthwaite
    degrees of freedom are computed here, the Student t tail by ``scipy.special.stdtr``; scipy is imported
    only when this runs (extra ``traitlens[sklearn]``). If both classes have zero spread, returns 1.0 for
    equal means and 0.0 otherwise (where scipy gives NaN). Needs at least 2 examples per class.

    Args:
        vector: ``[hidden]``.
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
    """
    return _welch_p(*_scores(vector, pos_acts, neg_acts, 2, "p_value"))


def polarity_correct(vector: torch.Tensor, pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> bool:
    """Whether the vector points from negatives to positives: mean positive projection > mean negative.

    If ``False``, use ``-vector``.

    Args:
        vector: ``[hidden]``.
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
    """
    pos_s, neg_s = _scores(vector, pos_acts, neg_acts)
    return bool(pos_s.mean() > neg_s.mean())


# ---------------------------------------------------------------------------------------------------
# Stability: does the vector survive resampling and noise?
# ---------------------------------------------------------------------------------------------------


def _extract(method: Method, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Run ``method`` (a callable, or an extraction method such as ``get_method("probe")``) and return its
    ``[hidden]`` vector (accepting a dict with ``"vector"``)."""
    extract = getattr(method, "extract", None)
    out = extract(pos, neg) if callable(extract) else method(pos, neg)
    if isinstance(out, Mapping):
        if "vector" not in out:
            raise ValueError(f"method returned a dict without a 'vector' key (keys: {sorted(out)})")
        out = out["vector"]
    name = f"the vector returned by {getattr(method, '__name__', type(method).__name__)}"
    return check_vector(out, name, hidden=pos.shape[1], hidden_of=f"pos_acts {shape_of(pos)}")


def _stability(
    pos_acts: object,
    neg_acts: object,
    method: Method | None,
    n_trials: int,
    seed: int,
    perturb: Callable[[torch.Tensor, torch.Tensor, torch.Generator, bool], tuple[torch.Tensor, torch.Tensor]],
    paired: bool | None = None,
) -> dict[str, float]:
    """Cosines between the full-data vector and vectors recomputed on ``perturb(pos, neg, generator,
    paired)``-ed data; ``paired`` (``None``: when the classes have as many rows, which is when row ``i`` may
    be the pair of row ``i``) asks for the same rows of both classes."""
    pos, neg = check_pos_neg(pos_acts, neg_acts)
    pos, neg = _upcast(pos), _upcast(neg)
    n_trials, seed = check_int(n_trials, "n_trials", minimum=1), check_int(seed, "seed")
    if paired is None:
        paired = len(pos) == len(neg)
    elif paired and len(pos) != len(neg):
        raise ValueError(f"paired=True needs as many positives as negatives, got {len(pos)} and {len(neg)}")
    method = mean_difference if method is None else get_method(method) if isinstance(method, str) else method
    full = _extract(method, pos, neg)
    if not full.any():
        raise ValueError(
            "the method's vector from all the data is zero: there is no direction to compare with"
        )
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same draws on every device
    cosines = []
    for _ in range(n_trials):
        vec = _extract(method, *perturb(pos, neg, gen, paired))
        cosines.append(float(cosine_similarity(vec.double(), full.double())))
    cosines = torch.tensor(cosines, dtype=torch.float64)
    std = float(cosines.std()) if n_trials > 1 else 0.0
    return {"mean": float(cosines.mean()), "min": float(cosines.min()), "std": std, "n_trials": n_trials}


def bootstrap_stability(
    pos_acts: torch.Tensor,
    neg_acts: torch.Tensor,
    *,
    method: Method | None = None,
    n_trials: int = 20,
    seed: int = 0,
    paired: bool | None = None,
) -> dict[str, float]:
    """How much the vector moves when the examples are resampled with replacement.

    Each trial draws ``n_pos`` positives and ``n_neg`` negatives with replacement, recomputes the vector
    with ``method`` and takes its cosine with the vector from all the data (signed: a method that flips
    sign at random scores badly). Paired data (row ``i`` of each class from the same prompt, as
    contrastive pairs are) is resampled by pair, so that methods that use the pairing (``pca_diff``) see
    pairs.

    Args:
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
        method: an extraction method or its name (``"probe"``, see ``get_method``), or
            ``method(pos_acts, neg_acts)``
            returning a ``[hidden]`` vector or a dict with key ``"vector"``; default
            :func:`traitlens.compute.mean_difference`.
        n_trials: number of resamples.
        seed: seed of the private random generator (the global torch RNG is not touched).
        paired: draw the same rows of both classes; ``None`` (default): when ``n_pos == n_neg``. For
            independent examples of equal counts this is still a bootstrap of each class.

    Returns:
        ``{"mean", "min", "std"}`` of the cosines, and ``"n_trials"``.
    """

    def resample(n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(n, (n,), generator=gen)

    return _stability(pos_acts, neg_acts, method, n_trials, seed, _rows(resample), paired)


def noise_stability(
    pos_acts: torch.Tensor,
    neg_acts: torch.Tensor,
    *,
    noise_scale: float = 0.1,
    method: Method | None = None,
    n_trials: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """How much the vector moves when Gaussian noise is added to the activations.

    Each example ``x`` gets isotropic noise with per-component standard deviation
    ``noise_scale * |x| / sqrt(hidden)``, so the noise norm is about ``noise_scale`` times the example's
    norm. The vector is recomputed and compared (cosine) with the vector from the clean data.

    Args:
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
        noise_scale: noise norm relative to each example's norm (``>= 0``).
        method, n_trials, seed: as in :func:`bootstrap_stability`.

    Returns:
        ``{"mean", "min", "std"}`` of the cosines, and ``"n_trials"``.
    """
    noise_scale = check_real(noise_scale, "noise_scale", "a number >= 0", lambda v: v >= 0)

    def add_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        std = noise_scale * _norm(x, 1).unsqueeze(1) / math.sqrt(x.shape[1])
        return x + std * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)

    return _stability(
        pos_acts,
        neg_acts,
        method,
        n_trials,
        seed,
        lambda p, n, gen, _: (add_noise(p, gen), add_noise(n, gen)),
    )


def subsample_stability(
    pos_acts: torch.Tensor,
    neg_acts: torch.Tensor,
    *,
    fraction: float = 0.5,
    method: Method | None = None,
    n_trials: int = 20,
    seed: int = 0,
    paired: bool | None = None,
) -> dict[str, float]:
    """How much the vector moves when only a fraction of the examples is used.

    Each trial keeps ``max(1, round(fraction * n))`` examples of each class, drawn without replacement
    (the same rows of both when ``paired``), recomputes the vector and compares it (cosine) with the vector
    from all the data.

    Args:
        pos_acts: ``[n_pos, hidden]``.
        neg_acts: ``[n_neg, hidden]``.
        fraction: share of each class kept, in ``(0, 1]``.
        method, n_trials, seed, paired: as in :func:`bootstrap_stability`.

    Returns:
        ``{"mean", "min", "std"}`` of the cosines, and ``"n_trials"``.
    """
    fraction = check_real(fraction, "fraction", "in (0, 1]", lambda v: 0 < v <= 1)

    fewest = getattr(get_method(method) if isinstance(method, str) else method, "min_per_class", 1)

    def subsample(n: int, gen: torch.Generator) -> torch.Tensor:
        keep = max(1, round(fraction * n))
        if keep < fewest:  # the method would blame the user's input for having too few rows
            raise ValueError(
                f"fraction={fraction} keeps {keep} of the {n} rows of a class, and the method needs at least "
                f"{fewest}: raise fraction"
            )
        return torch.randperm(n, generator=gen)[:keep]

    return _stability(pos_acts, neg_acts, method, n_trials, seed, _rows(subsample), paired)


def _rows(pick: Callable[[int, torch.Generator], torch.Tensor]):
    """A ``_stability`` perturbation keeping the rows ``pick(n, generator)`` chooses: one draw for both
    classes when paired, one each otherwise."""

    def perturb(pos: torch.Tensor, neg: torch.Tensor, gen: torch.Generator, paired: bool):
        rows = pick(len(pos), gen)
        other = rows if paired else pick(len(neg), gen)
        return pos[rows.to(pos.device)], neg[other.to(neg.device)]

    return perturb


# ---------------------------------------------------------------------------------------------------
# Vector properties
# ---------------------------------------------------------------------------------------------------


def _vector64(vector: object, name: str = "vector") -> torch.Tensor:
    return check_vector(vector, name).double()


def sparsity(vector: torch.Tensor, threshold: float = 0.01) -> float:
    """Fraction of components whose magnitude is at most ``threshold`` times the largest magnitude.

    A one-hot vector has sparsity ``(hidden - 1) / hidden``; a zero vector 1.0. See also
    :func:`hoyer_sparsity`, which needs no threshold.

    Args:
        vector: ``[hidden]``.
        threshold: relative threshold in ``[0, 1)``; 0 counts exact zeros only.
    """
    threshold = check_real(threshold, "threshold", "in [0, 1)", lambda v: 0 <= v < 1)
    mags = _vector64(vector).abs()
    return float((mags <= threshold * mags.max()).double().mean())


def hoyer_sparsity(vector: torch.Tensor) -> float:
    """Hoyer's sparsity ``(sqrt(d) - |v|_1 / |v|_2) / (sqrt(d) - 1)``, from 0 (all components of equal
    magnitude) to 1 (one-hot).

    Hoyer, "Non-negative matrix factorization with sparseness constraints", JMLR 2004. A zero vector and
    a vector with a single component give 1.0.

    Args:
        vector: ``[hidden]``.
    """
    v = _vector64(vector)
    d = v.numel()
    l2 = torch.linalg.vector_norm(v)
    if d == 1 or l2 == 0:
        return 1.0
    ratio = float(v.abs().sum() / l2)
    return min(1.0, max(0.0, (math.sqrt(d) - ratio) / (math.sqrt(d) - 1)))


def effective_rank(vectors: torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> float:
    """Effective rank of a set of vectors: ``exp`` of the entropy of the normalised singular values.

    Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007:
    ``p_i = s_i / sum(s)``, ``erank = exp(-sum p_i log p_i)``. Between 1 (rank one) and
    ``min(n, hidden)`` (all singular values equal). The rows are not centred: centre them first to measure
    the spread of activations rather than their offset. A zero matrix gives 0.0.

    Args:
        vectors: ``[n, hidden]`` (activations, or stacked trait vectors), or a dict / list of ``[hidden]``
            vectors.
    """
    x = _stack(vectors, "vectors")
    s = torch.linalg.svdvals(x)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def top_k_concentration(vector: torch.Tensor, k: int = 10) -> float:
    """Share of the squared norm carried by the ``k`` components of largest magnitude, in ``[k/d, 1]``.

    ``k`` larger than the hidden size counts all components (1.0). A zero vector gives 0.0.

    Args:
        vector: ``[hidden]``.
        k: number of components (``>= 1``).
    """
    k = check_int(k, "k", minimum=1)
    sq = _vector64(vector).square()
    total = sq.sum()
    if total == 0:
        return 0.0
    return float(sq.topk(min(k, sq.numel())).values.sum() / total)


# ---------------------------------------------------------------------------------------------------
# Relations between vectors and traits
# ---------------------------------------------------------------------------------------------------


def _named(vectors: object, name: str) -> dict[str, torch.Tensor]:
    """A dict or list/tuple of tensors as a dict (list items are named ``"0"``, ``"1"``, ...)."""
    if isinstance(vectors, Mapping):
        return {str(k): v for k, v in vectors.items()}
    if isinstance(vectors, (list, tuple)):
        return {str(i): v for i, v in enumerate(vectors)}
    raise TypeError(f"{name} must be a dict or a list of [hidden] tensors, got {type(vectors).__name__}")


def _stack(vectors: object, name: str) -> torch.Tensor:
    """``[n, hidden]`` float64 from a 2-D tensor or a dict / list of ``[hidden]`` tensors."""
    if isinstance(vectors, torch.Tensor):
        x = check_tensor(vectors, name, ndim=2, shape_doc="[n, hidden]")
    else:
        items = list(_named(vectors, name).items())
        if not items:
            raise ValueError(f"{name} is empty; need at least one vector")
        first = check_vector(items[0][1], f"{name}[{items[0][0]!r}]")
        x = torch.stack([check_vector(v, f"{name}[{k!r}]", hidden=first.numel()).double() for k, v in items])
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {shape_of(x)}); need at least one vector")
    return x.double()


def orthogonality(
    vector: torch.Tensor, others: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
) -> dict[str, object]:
    """Cosines between ``vector`` and other trait vectors; ideally all near 0.

    Args:
        vector: ``[hidden]``.
        others: a dict ``{name: [hidden]}`` or a list of ``[hidden]`` vectors (named ``"0"``, ``"1"``, ...).

    Returns:
        ``{"cosines": {name: cos}, "max_abs_cos": float, "mean_abs_cos": float, "most_similar": name}``;
        with no others, the maxima are 0.0 and ``most_similar`` is ``None``.
    """
    vec = _vector64(vector)
    cosines = {
        name: float(cosine_similarity(vec, check_vector(v, f"others[{name!r}]", hidden=vec.numel()).double()))
        for name, v in _named(others, "others").items()
    }
    if not cosines:
        return {"cosines": {}, "max_abs_cos": 0.0, "mean_abs_cos": 0.0, "most_similar": None}
    most = max(cosines, key=lambda k: abs(cosines[k]))
    return {
        "cosines": cosines,
        "max_abs_cos": abs(cosines[most]),
        "mean_abs_cos": sum(abs(c) for c in cosines.values()) / len(cosines),
        "most_similar": most,
    }


def cross_trait_accuracy(
    vectors: Mapping[str, torch.Tensor],
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    threshold: float | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy of each trait's vector on each trait's held-out data.

    ``result[a][b]`` is :func:`accuracy` of ``vectors[a]`` on ``datasets[b]``; the diagonal is each
    vector on its own trait. With the default midpoint threshold, ~0.5 off the diagonal means trait ``b``
    does not project on ``a``'s direction; well below 0.5 means it does, with the opposite sign.

    Args:
        vectors: ``{trait: [hidden]}``.
        datasets: ``{trait: (pos_acts [n_pos, hidden], neg_acts [n_neg, hidden])}``.
        threshold: as in :func:`accuracy` (``None``: midpoint on each dataset).
    """
    if not isinstance(vectors, Mapping) or not isinstance(datasets, Mapping):
        raise TypeError(
            "vectors and datasets must be dicts keyed by trait name, got "
            f"{type(vectors).__name__} and {type(datasets).__name__}"
        )
    for name, pair in datasets.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(
                f"datasets[{name!r}] must be a (pos_acts, neg_acts) pair, got {type(pair).__name__}"
            )
    return {
        a: {b: accuracy(v, pos, neg, threshold=threshold) for b, (pos, neg) in datasets.items()}
        for a, v in vectors.items()
    }


# ---------------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------------


def evaluate_vector(
    vector: torch.Tensor,
    pos_acts: torch.Tensor,
    neg_acts: torch.Tensor,
    *,
    threshold: float | None = None,
    sparsity_threshold: float = 0.01,
    top_k: int = 10,
) -> dict[str, float | int | bool]:
    """All per-dataset metrics of a vector on held-out positives and negatives, as one flat dict.

    Projections are computed once. Stability metrics need a method, not a vector: call
    :func:`bootstrap_stability` and friends separately.

    Args:
        vector: ``[hidden]``.
        pos_acts: ``[n_pos, hidden]``, at least 2 rows.
        neg_acts: ``[n_neg, hidden]``, at least 2 rows.
        threshold: for ``accuracy`` (``None``: midpoint of the class means of these projections, fitted on
            the data scored, so optimistic on held-out data: pass ``midpoint_threshold(vector, train_pos,
            train_neg)``).
        sparsity_threshold: passed to :func:`sparsity`.
        top_k: ``k`` of :func:`top_k_concentration`.

    Returns:
        JSON-serialisable dict with keys ``accuracy``, ``balanced_accuracy``, ``threshold``, ``auroc``,
        ``effect_size``, ``p_value``, ``separation``, ``polarity_correct``, ``pos_mean``, ``neg_mean``,
        ``pos_std``, ``neg_std``, ``n_pos``, ``n_neg``, ``vector_norm``, ``sparsity``, ``hoyer_sparsity``,
        ``top_k_concentration``. Projections are onto the unit vector; ``effect_size`` can be ``±inf``
        only if both classes project to constants.
    """
    pos_s, neg_s = _scores(vector, pos_acts, neg_acts, 2, "evaluate_vector")
    t = _threshold(threshold, pos_s, neg_s)
    pos_mean, neg_mean = float(pos_s.mean()), float(neg_s.mean())
    return {
        "accuracy": float(_accuracy(pos_s, neg_s, t, balanced=False)),
        "balanced_accuracy": float(_accuracy(pos_s, neg_s, t, balanced=True)),
        "threshold": t,
        "auroc": float(_auroc(pos_s, neg_s)),
        "effect_size": _cohens_d(pos_s, neg_s),
        "p_value": _welch_p(pos_s, neg_s),
        "separation": pos_mean - neg_mean,
        "polarity_correct": pos_mean > neg_mean,
        "pos_mean": pos_mean,
        "neg_mean": neg_mean,
        "pos_std": float(pos_s.std()),
        "neg_std": float(neg_s.std()),
        "n_pos": len(pos_s),
        "n_neg": len(neg_s),
        "vector_norm": float(torch.linalg.vector_norm(vector.double())),
        "sparsity": sparsity(vector, sparsity_threshold),
        "hoyer_sparsity": hoyer_sparsity(vector),
        "top_k_concentration": top_k_concentration(vector, top_k),
    }
