"""Extraction methods: from contrastive activations to a trait vector.

Every method takes ``pos_acts [n_pos, hidden]`` and ``neg_acts [n_neg, hidden]`` (float32, float16 or
bfloat16, on any device) and returns a dict with at least ``vector [hidden]`` in float32 on the input's device,
plus method-specific keys. Computation is in float32 whatever the input dtype.

    method = get_method("probe", C=0.1)            # hyper-parameters in the constructor ...
    result = method.extract(pos, neg, penalty="l1")  # ... or per call (the call wins)
    result["vector"], result["bias"], result["train_acc"]

Except for the random baseline, every vector is oriented so that positives project higher than negatives on
average: ``(mean(pos_acts) - mean(neg_acts)) @ vector >= 0``. Methods whose sign is arbitrary (PCA, ICA, an
optimised direction) flip it when needed and report ``flipped``. Mean difference and probe are oriented by
construction.

Only torch is imported here; scikit-learn is imported by the reference solvers of ICA and the probe, when used.
"""

from __future__ import annotations

import inspect
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from traitlens._validation import (
    all_finite,
    check_choice,
    check_int,
    check_pos_neg,
    check_real,
    did_you_mean,
    same_mean,
    short_list,
    whole_number,
)
from traitlens.compute import _unit


def _orient(
    vector: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """Flip ``vector [hidden]`` if negatives project higher than positives on average; return it and ``flipped``.
    ``delta``: the float64 difference of the class means (computed here unless the caller has it)."""
    if delta is None:  # float64: float32 sums may overflow
        delta = pos.mean(0, dtype=torch.float64) - neg.mean(0, dtype=torch.float64)
    flipped = bool(delta @ vector.double() < 0)
    return (-vector if flipped else vector), flipped


def _generator(seed: int) -> torch.Generator:
    """A CPU generator, so that a seed gives the same numbers on every device (draw on CPU, then move)."""
    return torch.Generator().manual_seed(check_int(seed, "seed"))


def _checked_classes(
    pos_acts: torch.Tensor, neg_acts: torch.Tensor, *, min_per_class: int = 1, method: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``ExtractionMethod.extract`` checks of ``pos_acts [n_pos, hidden]`` and ``neg_acts [n_neg,
    hidden]``: ``check_pos_neg``, then float32 ``pos``, ``neg`` (for ``_extract_checked``), refused where
    float64 values do not fit float32 or where the classes have the same mean (no direction separates them)."""
    pos, neg = check_pos_neg(pos_acts, neg_acts, min_per_class=min_per_class, method=method)
    pos, neg = pos.float(), neg.float()
    for arg, x, given in (("pos_acts", pos, pos_acts), ("neg_acts", neg, neg_acts)):
        if given.dtype == torch.float64 and not all_finite(x):
            raise ValueError(
                f"{arg} has values beyond float32's range (3.4e38), in which the methods compute: rescale it"
            )
    if same_mean(pos.mean(0, dtype=torch.float64), neg.mean(0, dtype=torch.float64)):
        raise ValueError(
            "pos_acts and neg_acts have the same mean in every feature (the same rows on both sides?): no "
            "direction separates them; if the two sides differ only after a shared prompt, read the "
            "activations there (e.g. position='response_mean')"
        )
    return pos, neg


class ExtractionMethod(ABC):
    """Base class: ``extract(pos_acts, neg_acts, **params) -> dict``.

    Args of ``extract``:
        pos_acts: activations of positive examples ``[n_pos, hidden]``.
        neg_acts: activations of negative examples ``[n_neg, hidden]``, same hidden size.
        **params: hyper-parameters of the method; they override those given to the constructor.

    Returns a dict with at least ``vector`` ``[hidden]`` (float32, on the input's device). Inputs may be
    float32, float16 or bfloat16; all computation is in float32. Every method accepts ``seed`` (default 0) so
    that all of them can be called alike; randomised methods are reproducible given it, deterministic ones
    ignore it. Bad input (not 2-D, different hidden sizes, too few rows, NaN/inf) raises ``ValueError``
    naming the argument and its shape; an unknown hyper-parameter raises ``TypeError``.

    A subclass implements ``_extract(self, pos, neg, *, <hyper-parameters with defaults>)`` on float32
    ``[n, hidden]`` tensors; the keyword-only parameters of that signature are the method's hyper-parameters.
    """

    min_per_class: int = 1
    """Fewest examples per class the method accepts."""

    def __init__(self, **params: Any) -> None:
        self.params = self._check_params(params)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The method's hyper-parameters and their default values."""
        signature = inspect.signature(cls._extract)
        found = {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}
        return {"seed": 0, **found}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        valid = list(self.defaults())
        for key in params:
            if key not in valid:
                raise TypeError(
                    f"{type(self).__name__} has no parameter {key!r}{did_you_mean(key, valid)}; "
                    f"valid parameters: {short_list(valid)}"
                )
        return dict(params)

    def extract(self, pos_acts: torch.Tensor, neg_acts: torch.Tensor, **params: Any) -> dict[str, Any]:
        """Extract a trait vector ``[hidden]`` from ``pos_acts [n_pos, hidden]`` and ``neg_acts [n_neg, hidden]``."""
        checked = _checked_classes(pos_acts, neg_acts, min_per_class=self.min_per_class, method=self.name())
        return self._extract_checked(*checked, **params)

    def _extract_checked(self, pos: torch.Tensor, neg: torch.Tensor, **params: Any) -> dict[str, Any]:
        """``extract`` of the float32 ``pos``, ``neg`` that ``_checked_classes`` returned, not checked again:
        the pipeline checks each layer's activations once for all its methods."""
        return self._extract(pos, neg, **self._merged(params))

    def _merged(self, params: dict[str, Any]) -> dict[str, Any]:
        """The constructor's hyper-parameters updated with the checked ``params`` of a call."""
        merged = {**self.params, **self._check_params(params)}
        if "seed" not in inspect.signature(self._extract).parameters:
            merged.pop("seed", None)  # deterministic method
        return merged

    @abstractmethod
    def _extract(self, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, Any]:
        """The method on validated float32 ``pos [n_pos, hidden]``, ``neg [n_neg, hidden]``."""

    def name(self) -> str:
        """The class name, e.g. ``'ProbeMethod'``."""
        return type(self).__name__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class MeanDifferenceMethod(ExtractionMethod):
    """``vector = mean(pos_acts) - mean(neg_acts)`` (means accumulated in float64).

    Parameters:
        normalize: return a unit vector instead of the raw difference (default False, as in traitlens 0.4).

    Returns ``vector [hidden]``, ``pos_mean [hidden]``, ``neg_mean [hidden]``.
    """

    def _extract(self, pos: torch.Tensor, neg: torch.Tensor, *, normalize: bool = False) -> dict[str, Any]:
        pos_mean = pos.mean(0, dtype=torch.float64)  # [hidden]
        neg_mean = neg.mean(0, dtype=torch.float64)  # [hidden]
        vector = (pos_mean - neg_mean).float()  # rounded once (each mean rounded lost 6e-4 at offsets of 1e4)
        pos_mean, neg_mean = pos_mean.float(), neg_mean.float()
        if normalize:
            vector = _unit(vector)
        return {"vector": vector, "pos_mean": pos_mean, "neg_mean": neg_mean}


class ProbeMethod(ExtractionMethod):
    """Logistic-regression probe; the weights are the vector.

    The objective is scikit-learn's: ``C * sum_i logloss_i + penalty(w)`` with ``penalty`` ``'l2'``
    (``||w||^2 / 2``), ``'l1'`` (``||w||_1``) or ``'elasticnet'`` (``l1_ratio * ||w||_1 +
    (1 - l1_ratio) * ||w||^2 / 2``); the bias is not penalised. Residual streams are strongly anisotropic
    (a few dimensions ~1e4 larger than the rest), so with ``standardize=True`` (default) the probe is fitted
    on features scaled to zero mean and unit variance (so the penalty treats dimensions alike) and the
    weights are mapped back: ``acts @ vector + bias`` is the logit for raw activations ``acts [n, hidden]``.

    Parameters:
        penalty: ``'l2'`` (default), ``'l1'`` (sparse: many components exactly zero) or ``'elasticnet'``.
        C: inverse regularisation strength (default 1.0; smaller = stronger).
        l1_ratio: the L1 share for ``'elasticnet'`` (default 0.5).
        solver: ``'torch'`` (default: L-BFGS for l2, FISTA for l1/elasticnet, on the activations' device)
            or ``'sklearn'`` (scikit-learn's LogisticRegression on CPU, lbfgs / saga: the reference).
        max_iter: iteration cap of the solver (default 1000).
        tol: convergence tolerance (default 1e-4; for torch, on the largest component of the gradient of the
            objective / (C n), for l1 / elasticnet of its proximal gradient mapping).
        standardize: fit on standardised features (default True).
        seed: used by the saga solver of scikit-learn only.

    Returns ``vector [hidden]``, ``bias`` (float), ``train_acc`` (float), ``pos_scores [n_pos]`` and
    ``neg_scores [n_neg]`` (probabilities of the positive class), ``n_iter``, ``converged``.
    """

    min_per_class = 2

    def _extract(
        self,
        pos: torch.Tensor,
        neg: torch.Tensor,
        *,
        penalty: str = "l2",
        C: float = 1.0,
        l1_ratio: float = 0.5,
        solver: str = "torch",
        max_iter: int = 1000,
        tol: float = 1e-4,
        standardize: bool = True,
        seed: int = 0,
    ) -> dict[str, Any]:
        check_choice(penalty, "penalty", ("l2", "l1", "elasticnet"))
        check_choice(solver, "solver", ("torch", "sklearn"))
        C = check_real(C, "C", "a finite number > 0 (a large C for almost no penalty)", lambda v: v > 0)
        if penalty == "elasticnet":
            l1_ratio = check_real(l1_ratio, "l1_ratio", "in [0, 1]", lambda v: 0 <= v <= 1)
        max_iter = check_int(max_iter, "max_iter", minimum=1)
        tol = check_real(tol, "tol", ">= 0", lambda v: v >= 0)
        ratio = {"l2": 0.0, "l1": 1.0, "elasticnet": float(l1_ratio)}[penalty]

        x = torch.cat([pos, neg])  # [n, hidden]
        y = torch.cat([pos.new_ones(len(pos)), neg.new_zeros(len(neg))])  # [n]
        if standardize:
            mean = x.mean(0, dtype=torch.float64).float()  # [hidden]
            scale = x.std(0, correction=0)  # [hidden]
            scale = torch.where(scale > 1e-6 * mean.abs(), scale, torch.ones_like(scale))  # constant: keep
        else:
            mean, scale = torch.zeros_like(x[0]), torch.ones_like(x[0])
        z = (x - mean) / scale  # [n, hidden]

        if solver == "torch":
            w, b, n_iter, converged = _fit_logistic_torch(
                z, y, C=C, l1_ratio=ratio, max_iter=max_iter, tol=tol
            )
        else:
            w, b, n_iter, converged = _fit_logistic_sklearn(
                z, y, C=C, l1_ratio=ratio, max_iter=max_iter, tol=tol, seed=seed
            )
        if not converged:
            why = (
                f"did not converge within max_iter={max_iter}; raise max_iter or lower C"
                if n_iter >= max_iter
                else f"stopped at iteration {n_iter} without converging: in {str(z.dtype).removeprefix('torch.')} "
                "its steps no longer lower the loss or move the weights (rounding at this scale); standardize "
                "the activations, lower C, or raise tol"
            )
            warnings.warn(f"ProbeMethod (solver={solver!r}, penalty={penalty!r}) {why}", stacklevel=3)
        if not bool(w.any()):
            warnings.warn(
                f"ProbeMethod: every weight is zero (penalty={penalty!r}, C={C}); raise C", stacklevel=3
            )
        vector = w / scale  # [hidden], raw activation space
        bias = float(b - (vector * mean).sum())
        logits = x @ vector + bias  # [n]
        probs = torch.sigmoid(logits)
        return {
            "vector": vector,
            "bias": bias,
            "train_acc": int(((logits > 0) == (y == 1)).sum()) / len(y),
            "pos_scores": probs[: len(pos)],
            "neg_scores": probs[len(pos) :],
            "n_iter": n_iter,
            "converged": converged,
        }


def _logistic_loss(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log-loss of ``z [n, hidden] @ w + b`` against ``y [n]``, plus ``l2 / 2 * ||w||^2``; and the logits."""
    logits = z @ w + b  # [n]
    return (torch.nn.functional.softplus(logits) - y * logits).mean() + 0.5 * l2 * (w @ w), logits


def _logistic_loss_grad(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_logistic_loss`` and its gradients in ``w [hidden]`` and ``b []``."""
    loss, logits = _logistic_loss(z, y, w, b, l2)
    residual = (torch.sigmoid(logits) - y) / len(y)  # [n]
    return loss, z.T @ residual + l2 * w, residual.sum()


def _fit_logistic_torch(
    z: torch.Tensor, y: torch.Tensor, *, C: float, l1_ratio: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, float, int, bool]:
    """Fit ``w [hidden]``, ``b`` on ``z [n, hidden]``, labels ``y [n]`` in {0, 1}; sklearn's objective / (C n).

    Smooth (``l1_ratio == 0``): L-BFGS (``_lbfgs``). Otherwise FISTA (Beck & Teboulle 2009) with
    backtracking on the step, which may also grow again (a heuristic: unlike Scheinberg, Goldfarb & Bai
    2014, the momentum is not adjusted for it), and adaptive momentum restart (O'Donoghue & Candès 2015);
    the L1 part is applied by soft-thresholding. Returns ``(w, b, iterations, converged)``.
    """
    n, hidden = z.shape
    l2 = (1.0 - l1_ratio) / (C * n)
    l1 = l1_ratio / (C * n)
    theta = z.new_zeros(hidden + 1)  # [w, b]

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[:hidden], t[hidden]

    if l1 == 0.0:

        def loss_grad(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss, grad_w, grad_b = _logistic_loss_grad(z, y, *split(t), l2)
            return loss, torch.cat([grad_w, grad_b[None]])

        theta, n_iter, converged = _lbfgs(loss_grad, theta, max_iter=max_iter, tol=tol)
        w, b = split(theta)
        return w, float(b), n_iter, converged

    def prox(t: torch.Tensor, step: float) -> torch.Tensor:
        w, b = split(t)
        w = torch.sign(w) * (w.abs() - l1 * step).clamp_min(0.0)
        return torch.cat([w, b[None]])

    lipschitz, momentum, current = 1.0, 1.0, theta
    for n_iter in range(1, max_iter + 1):
        loss, grad_w, grad_b = _logistic_loss_grad(z, y, *split(theta), l2)
        grad = torch.cat([grad_w, grad_b[None]])
        # Let the step grow again: without this, one early backtrack fixes a small step for good. On the
        # bundled model's activations this took 3-5 times fewer iterations; the stopping test below is an
        # optimality measure, so a step that is too long can only cost time.
        lipschitz *= 0.8
        # backtracking: the quadratic model at theta must bound the loss at the new point
        for _ in range(100):
            new = prox(theta - grad / lipschitz, 1.0 / lipschitz)
            step = new - theta
            bound = loss + grad @ step + 0.5 * lipschitz * (step @ step)
            excess, loss_value, uphill, moved = torch.stack([
                _logistic_loss(z, y, *split(new), l2)[0] - bound,
                loss,
                (theta - new) @ (new - current),
                step.abs().max(),
            ]).tolist()  # fmt: skip
            if excess <= 1e-7 * abs(loss_value):
                break
            lipschitz *= 2.0
        else:  # no step is short enough: only non-finite values get here
            w, b = split(current)
            return w, float(b), n_iter, False
        # lipschitz * (theta - new) is the gradient mapping: the gradient of the smooth case, with the L1 part
        # folded in, so ``tol`` means the same for every penalty. (A small change of the parameters is no
        # test: FISTA's steps shrink long before its iterate is near the minimum.) When it passes, the
        # optimality conditions are checked at the new point itself: in float32 a step below the weights'
        # resolution moves nothing, which the mapping would read as convergence.
        if lipschitz * moved <= tol:
            violation, size = _l1_optimality(z, y, *split(new), l2, l1)
            if violation <= tol:
                w, b = split(new)
                return w, float(b), n_iter, True
            if moved <= 4 * torch.finfo(z.dtype).eps * size:  # stalled at the dtype's resolution
                w, b = split(new)
                return w, float(b), n_iter, False
        if uphill > 0:  # moving uphill: restart the momentum
            momentum = 1.0
            theta = new
        else:
            next_momentum = (1.0 + math.sqrt(1.0 + 4.0 * momentum**2)) / 2.0
            theta = new + (momentum - 1.0) / next_momentum * (new - current)
            momentum = next_momentum
        current = new
    w, b = split(current)
    return w, float(b), max_iter, False


def _l1_optimality(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float, l1: float
) -> tuple[float, float]:
    """How far ``(w, b)`` is from the minimum of the penalised log-loss: the largest violation of its
    optimality conditions (gradient + ``l1 * sign(w)`` where ``w != 0``, ``|gradient| - l1`` beyond 0 where
    ``w == 0``, the intercept's gradient), and the largest ``|parameter|``; one device read."""
    _, grad_w, grad_b = _logistic_loss_grad(z, y, w, b, l2)
    off = torch.where(w != 0, (grad_w + l1 * torch.sign(w)).abs(), (grad_w.abs() - l1).clamp_min(0.0))
    violation = torch.maximum(off.max(), grad_b.abs())
    size = torch.cat([w, b[None]]).abs().max()
    return tuple(torch.stack([violation, size]).tolist())


def _lbfgs(
    loss_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    theta: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    history: int = 50,
) -> tuple[torch.Tensor, int, bool]:
    """Minimise a smooth convex function from ``theta [p]``; ``loss_grad(theta) -> (loss [], grad [p])``.

    L-BFGS (Nocedal & Wright 2006, ch. 7) with Armijo backtracking from the unit step. On a strictly convex
    function every step has ``s @ y > 0``, so no Wolfe curvature test is needed (pairs without it are skipped).
    The inverse-Hessian product uses the compact form of Byrd, Nocedal & Schnabel (1994, Theorem 2.2): a fixed
    dozen tensor operations whatever the history length. Each trial step reads the device once (almost
    every iteration takes its first trial). The solver is
    bound by per-step overhead, not arithmetic: ``torch.optim.LBFGS`` took ~600 small operations and many host
    reads per fit. ``history`` pairs are kept: on real per-token activations (1655 x 576) 50 took 138
    iterations against 377 with 10, at about the same cost per iteration.
    Stops when the gradient's largest component is ``<= tol``. Returns ``(theta, iterations, converged)``.
    """
    loss, grad = loss_grad(theta)
    loss_value, grad_max, grad_sum = torch.stack([loss, grad.abs().max(), grad.abs().sum()]).tolist()
    if grad_max <= tol:
        return theta, 0, True
    first_step = min(1.0, 1.0 / grad_sum)  # steepest descent's first step, as torch.optim.LBFGS takes it
    steps = changes = None  # s_i and y_i, oldest first: [m, p]
    scale = 1.0  # the initial inverse Hessian is scale * I, with scale = s'y / y'y of the newest pair
    for n_iter in range(1, max_iter + 1):
        if steps is None:
            direction, step = -grad, first_step
        else:
            direction, step = -_inverse_hessian_times(grad, steps, changes, scale), 1.0
        while True:  # backtrack until the loss falls by a fraction of the predicted decrease
            new = theta + step * direction
            new_loss, new_grad = loss_grad(new)
            s, y = new - theta, new_grad - grad
            new_value, rise, slope, sy, yy, grad_max = torch.stack(
                [new_loss, new_loss - loss, grad @ direction, s @ y, y @ y, new_grad.abs().max()]
            ).tolist()
            if slope >= 0 and steps is not None:  # rounding broke the model: restart it from steepest descent
                steps = changes = None
                direction, step = -grad, first_step
                continue
            # the slack of a few float32 roundings lets steps through once decreases fall below resolution
            if rise <= 1e-4 * step * slope + 1e-6 * abs(loss_value):
                break
            step /= 2
            if step < 1e-12:
                return theta, n_iter, False
        theta, loss, grad, loss_value = new, new_loss, new_grad, new_value
        if sy > 1e-10 * yy:
            steps = s[None] if steps is None else torch.cat([steps, s[None]])[-history:]
            changes = y[None] if changes is None else torch.cat([changes, y[None]])[-history:]
            scale = sy / yy
        if grad_max <= tol:
            return theta, n_iter, True
    return theta, max_iter, False


def _inverse_hessian_times(
    grad: torch.Tensor, steps: torch.Tensor, changes: torch.Tensor, scale: float
) -> torch.Tensor:
    """The L-BFGS inverse-Hessian estimate times ``grad [p]``, from ``steps``, ``changes [m, p]`` (oldest first).

    Compact form, Byrd, Nocedal & Schnabel (1994), Theorem 2.2, with ``H0 = scale * I``, ``R`` the upper
    triangle of ``S'Y`` and ``D`` its diagonal (S, Y with the pairs as columns)::

        H g = scale g + S p - scale Y q,   q = R^-1 S'g,   p = R^-T ((D + scale Y'Y) q - scale Y'g)

    computed as ``scale r + S p`` with ``r = g - Y q`` and ``p = R^-T (D q - scale Y'r)``.
    """
    sy = steps @ changes.T  # [m, m], entry (i, j) = s_i @ y_j
    # R is sy's upper triangle, and solve_triangular reads only the triangle that ``upper`` names (as its
    # documentation says): no triu copy, a parallel kernel of its own, slow on a busy machine
    q = torch.linalg.solve_triangular(sy, (steps @ grad)[:, None], upper=True)[:, 0]  # [m]
    r = grad - q @ changes  # [p]: g - Y q, so that Y'Y q - Y'g = -Y'r (no difference of large terms)
    inner = sy.diagonal() * q - scale * (changes @ r)
    p = torch.linalg.solve_triangular(sy.T, inner[:, None], upper=False)[:, 0]  # [m]: R' p = inner
    return scale * r + p @ steps


def _fit_logistic_sklearn(
    z: torch.Tensor, y: torch.Tensor, *, C: float, l1_ratio: float, max_iter: int, tol: float, seed: int
) -> tuple[torch.Tensor, float, int, bool]:
    """scikit-learn's LogisticRegression on ``z [n, hidden]`` (CPU, float64): lbfgs for l2, saga otherwise."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    solver = "lbfgs" if l1_ratio == 0.0 else "saga"
    if LogisticRegression().get_params()["penalty"] == "deprecated":  # scikit-learn >= 1.8: l1_ratio alone
        penalty_args: dict[str, Any] = {"l1_ratio": l1_ratio}
    else:
        penalty = {0.0: "l2", 1.0: "l1"}.get(l1_ratio, "elasticnet")
        penalty_args = {"penalty": penalty, "l1_ratio": l1_ratio if penalty == "elasticnet" else None}
    model = LogisticRegression(
        C=C, solver=solver, max_iter=max_iter, tol=tol, random_state=seed, **penalty_args
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(z.cpu().double().numpy(), y.cpu().numpy())
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    w = torch.from_numpy(model.coef_[0]).to(device=z.device, dtype=torch.float32)
    return w, float(model.intercept_[0]), int(model.n_iter_[0]), converged


class ICAMethod(ExtractionMethod):
    """Independent component analysis (FastICA) of the pooled activations.

    Positives and negatives are stacked ``[n, hidden]``; FastICA whitens them by PCA to ``n_components``
    dimensions (default 10, capped at ``n - 1``, ``hidden`` and, with a warning, the number of dimensions
    the activations span) and unmixes them into independent sources (Hyvärinen & Oja 2000: parallel
    fixed-point iteration with symmetric decorrelation, ``logcosh`` contrast, sources scaled to unit
    variance; scikit-learn's defaults). Each component's direction is its column of the mixing matrix (the
    pattern a source adds to the activations, in activation units). By default the component that best
    separates the classes is chosen: largest ``|mean_pos - mean_neg| / pooled std`` of its source values
    (``separation_scores``).

    Two solvers compute the decomposition; everything after it is shared. ``solver='torch'`` (default) runs
    on the activations' device: whitening by an eigendecomposition in float64 (of the ``[n, n]`` Gram matrix
    or the ``[hidden, hidden]`` covariance, whichever is smaller), iteration in float32 with the small
    ``[k, k]`` decorrelation in float64, and a seeded random start. ``solver='sklearn'`` is scikit-learn's
    ``FastICA`` on CPU in float64, the reference. Both solve the same problem from different random starts, so their
    components agree up to order and sign when the sources are clearly non-Gaussian; on real activations
    the component ranked most separating can differ (ICA has local optima), as it can between two seeds.

    Speed, measured on this project's shared 2-core CPU (load average 4-6 from other jobs; median over 7
    seeds; 10 components; torch 2.13 with MKL, scikit-learn 1.9). Sentiment activations of the bundled model,
    ``[182, 576]``, layers 8 / 15 / 22: torch 220 / 142 / 270 ms, sklearn 209 / 158 / 252 ms with the default 2
    threads (a tie: tiny products dominated by thread contention); with 1 thread torch 47 / 34 / 49 ms,
    sklearn 172 ms at layer 22. Synthetic ``[4000, 576]``: torch 0.41 s, sklearn 2.7 s (1 thread: 0.20 s,
    1.3 s), since torch whitens from the ``[576, 576]`` covariance and scikit-learn by a full SVD. Held-out
    accuracy on the sentiment test split (38 examples, threshold from train), mean of 10 seeds: 100% for
    both at layers 15 and 22; 74.2% (torch) vs 75.0% (sklearn) at layer 8, where FastICA does not converge
    and single seeds of either solver range from 68% to 79%. Hence the default ``solver='torch'``.

    A seed gives the same result on the same machine and thread count, whatever the order of the examples;
    when the iteration does not converge within ``max_iter`` (common on real activations), rounding
    differences between thread counts or devices can end it elsewhere.

    Parameters:
        n_components: number of components (default 10).
        component_idx: take this component instead of the best-separating one (default None).
        solver: ``'torch'`` (default) or ``'sklearn'``.
        max_iter, tol: FastICA's iteration cap and tolerance (defaults 200, 1e-4; convergence when every
            row of the unmixing matrix moves by less than ``tol``: ``max |1 - |<w_new, w_old>|| < tol``).
        seed: seed of the initial unmixing matrix (scikit-learn's ``random_state``); the two solvers draw
            it differently, so the same seed does not give the same start in both.

    Returns ``vector [hidden]`` (the chosen component, oriented), ``component_idx``, ``all_components
    [n_components, hidden]`` (not oriented), ``separation_scores [n_components]``, ``pos_proj [n_pos,
    n_components]`` and ``neg_proj [n_neg, n_components]`` (source values), ``n_iter``, ``converged``,
    ``flipped``. Not converging within ``max_iter`` is not an error (the components are still usable) and
    is reported by ``converged`` only.
    """

    min_per_class = 2

    def _extract(
        self,
        pos: torch.Tensor,
        neg: torch.Tensor,
        *,
        n_components: int = 10,
        component_idx: int | None = None,
        solver: str = "torch",
        max_iter: int = 200,
        tol: float = 1e-4,
        seed: int = 0,
    ) -> dict[str, Any]:
        check_choice(solver, "solver", ("torch", "sklearn"))
        n_components = check_int(n_components, "n_components", minimum=1)
        max_iter = check_int(max_iter, "max_iter", minimum=1)
        tol = check_real(tol, "tol", ">= 0", lambda v: v >= 0)
        x = torch.cat([pos, neg])  # [n, hidden]
        k = min(n_components, len(x) - 1, x.shape[1])
        if component_idx is not None:
            index = whole_number(component_idx)
            if index is None or not 0 <= index < k:
                raise ValueError(
                    f"component_idx must be an int in [0, {k}) (n_components={k}), got {component_idx!r}"
                )
            component_idx = index
        fit = _fastica_torch if solver == "torch" else _fastica_sklearn
        # The fit sums over rows, so their order moves its rounding, and an iteration that does not converge,
        # or data without one best unmixing, ends elsewhere. Fitting the rows in an order of their own (by
        # row sum) makes the result independent of the order of the examples.
        order = torch.sort(x.double().sum(1), stable=True).indices  # [n]
        sources, mixing, n_iter, converged = fit(x[order], k, max_iter=max_iter, tol=tol, seed=seed)
        sources = sources[torch.argsort(order)]  # [n, k], back in the rows' order

        pos_proj, neg_proj = sources[: len(pos)], sources[len(pos) :]  # [n_pos, k], [n_neg, k]
        pooled_var = (pos_proj.var(0) * (len(pos) - 1) + neg_proj.var(0) * (len(neg) - 1)) / (len(x) - 2)
        scores = (pos_proj.mean(0) - neg_proj.mean(0)).abs() / pooled_var.sqrt().clamp_min(1e-12)  # [k]
        if component_idx is None:
            component_idx = int(scores.argmax())
        elif component_idx >= len(mixing):  # fewer components than asked for: the activations span fewer
            raise ValueError(
                f"component_idx={component_idx}, but the activations span only {len(mixing)} components (see the "
                "warning)"
            )
        vector, flipped = _orient(mixing[component_idx], pos, neg)
        return {
            "vector": vector,
            "component_idx": component_idx,
            "all_components": mixing,
            "separation_scores": scores,
            "pos_proj": pos_proj,
            "neg_proj": neg_proj,
            "n_iter": n_iter,
            "converged": converged,
            "flipped": flipped,
        }


def _sym_decorrelation(w: torch.Tensor) -> torch.Tensor:
    """``(W W')^(-1/2) W`` for ``w [k, k]`` in float64: the nearest matrix with orthonormal rows."""
    eigenvalues, eigenvectors = torch.linalg.eigh(w @ w.T)
    inv_sqrt = eigenvalues.clamp_min(torch.finfo(w.dtype).tiny).rsqrt()
    return (eigenvectors * inv_sqrt) @ eigenvectors.T @ w


def _fastica_torch(
    x: torch.Tensor, k: int, *, max_iter: int, tol: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """FastICA of ``x [n, hidden]`` into ``k`` components, in torch on ``x``'s device.

    Returns ``sources [n, k]`` (unit variance), ``mixing [k, hidden]`` (``x ~ mean + sources @ mixing``),
    iterations and whether the iteration converged. The algorithm is that of Hyvärinen & Oja (2000), eqs.
    (44)-(45), with scikit-learn's conventions (whitened data scaled to unit variance, ``logcosh`` with
    ``alpha = 1``, unit-variance sources).
    """
    n, hidden = x.shape
    centered = x.double() - x.mean(0, dtype=torch.float64)  # [n, hidden]
    # PCA whitening to k dimensions, from the smaller of the two Gram matrices (float64: residual streams
    # span several orders of magnitude, and squaring them for the Gram matrix doubles that).
    eigenvalues, eigenvectors = torch.linalg.eigh(
        centered @ centered.T if n <= hidden else centered.T @ centered
    )
    sing = eigenvalues[-k:].flip(0).clamp_min(0).sqrt()  # [k] singular values d_k, descending
    k = _spanned(sing, k)
    sing = sing[:k]
    if n <= hidden:
        v = eigenvectors[:, -k:].flip(1)  # [n, k]: left singular vectors of centered
        basis = centered.T @ v  # [hidden, k] = U_k diag(d_k)
        signs = _largest_entry_signs(basis)
        whitened = (v * signs).T * math.sqrt(n)  # [k, n], rows of unit variance
    else:
        u = eigenvectors[:, -k:].flip(1)  # [hidden, k]
        signs = _largest_entry_signs(u)
        basis = u * sing  # [hidden, k] = U_k diag(d_k)
        whitened = (centered @ (u * signs / sing)).T * math.sqrt(n)  # [k, n]
    basis = basis * signs

    data = whitened.float()  # [k, n]
    w = _sym_decorrelation(torch.randn(k, k, generator=_generator(seed), dtype=torch.float64).to(x.device))
    n_iter, converged = 0, False
    while n_iter < max_iter and not converged:
        n_iter += 1
        g = torch.tanh(w.float() @ data)  # [k, n]: logcosh'(w x)
        g_prime_mean = (1.0 - g * g).mean(1, dtype=torch.float64)  # [k]
        update = (g @ data.T).double() / n - g_prime_mean[:, None] * w  # [k, k]: E[x g(w x)] - E[g'(w x)] w
        new = _sym_decorrelation(update)
        converged = float(((new * w).sum(1).abs() - 1.0).abs().max()) < tol
        w = new

    sources = w @ whitened  # [k, n], float64
    scale = sources.std(1, correction=0)  # [k]: 1 up to rounding (w orthonormal, whitened data white)
    sources = sources / scale[:, None]
    mixing = (scale[:, None] * w) @ basis.T / math.sqrt(n)  # [k, hidden]
    return sources.T.float(), mixing.float(), n_iter, converged


def _spanned(sing: torch.Tensor, k: int) -> int:
    """How many of the ``k`` largest singular values ``sing`` (descending) of the centred activations are
    above 1e-6 of the largest: the components FastICA can fit. Whitening divides by each of them, so one at
    rounding level turns rounding into a source (and made the torch solver's iteration fail, scikit-learn's
    return a zero vector). Fewer than ``k``: a warning, and that many components are fitted (at least one:
    rows that are all the same have the same mean in both classes, which ``extract`` refuses)."""
    spanned = int((sing[:k] > 1e-6 * sing[0]).sum())
    if spanned < k:
        warnings.warn(
            f"ICAMethod: the activations span {spanned} dimensions, fewer than n_components={k} (singular values "
            f"below 1e-6 of the largest, {float(sing[0]):.3g}, beyond that); fitting {spanned} components",
            stacklevel=5,
        )
    return spanned


def _largest_entry_signs(vectors: torch.Tensor) -> torch.Tensor:
    """``[k]`` signs that make the largest-magnitude entry of each column of ``vectors [hidden, k]`` positive.

    Eigenvector signs are arbitrary and differ between devices and LAPACK builds; fixing them keeps the
    start of the iteration (seeded) the same relative to the data.
    """
    rows = vectors.abs().argmax(0)  # [k]
    signs = torch.sign(vectors[rows, torch.arange(vectors.shape[1], device=vectors.device)])
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def _fastica_sklearn(
    x: torch.Tensor, k: int, *, max_iter: int, tol: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """scikit-learn's FastICA of ``x [n, hidden]`` (CPU, float64); same returns as ``_fastica_torch``.

    float64, not float32: on float32 input scikit-learn also iterates in float32, and its decorrelation
    step can then collapse every row of the unmixing matrix onto one (seen on real activations: all ten
    sources identical; 1 of 60 seed x layer runs on the bundled model).
    """
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    centered = x.double() - x.mean(0, dtype=torch.float64)
    k = _spanned(torch.linalg.svdvals(centered), k)
    ica = FastICA(n_components=k, whiten="unit-variance", max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(x.cpu().double().numpy())  # [n, k]
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    sources = torch.from_numpy(sources).to(device=x.device, dtype=torch.float32)
    mixing = torch.from_numpy(ica.mixing_.T).to(device=x.device, dtype=torch.float32)  # [k, hidden]
    return sources, mixing, int(ica.n_iter_), converged


class GradientMethod(ExtractionMethod):
    """A unit vector optimised by gradient ascent (Adam) on a class-separation objective.

    The objective for a unit vector ``v`` is a shrunk Fisher criterion (Cohen's d of the projections)::

        sep(v) = (mean_pos - mean_neg) @ v / sqrt((1 - shrinkage) * v' S v + shrinkage * trace(S) / hidden)

    with ``S`` the pooled within-class covariance ``[hidden, hidden]`` (never formed: only projections are
    used). ``shrinkage`` > 0 keeps the problem well posed when ``n < hidden`` (otherwise directions with zero
    within-class variance give an infinite ratio); ``shrinkage=1`` makes it the normalised mean difference.
    Its maximiser is the regularised LDA direction ``((1 - shrinkage) S + shrinkage * trace(S)/hidden * I)^-1
    (mean_pos - mean_neg)``; the gradient method reaches it approximately in a fixed number of steps and
    extends to other objectives. The start is a seeded random unit vector.

    Parameters:
        num_steps: Adam steps (default 200).
        lr: learning rate (default 0.05, on a parameter of unit norm).
        shrinkage: in (0, 1] (default 0.5).
        seed: seed of the starting vector.

    Returns ``vector [hidden]`` (unit norm, oriented), ``loss_history [num_steps]`` (``-sep``),
    ``final_separation`` (``mean_pos - mean_neg`` of the projections on ``vector``), ``pos_mean_proj``,
    ``neg_mean_proj``, ``flipped``.
    """

    min_per_class = 2

    def _extract(
        self,
        pos: torch.Tensor,
        neg: torch.Tensor,
        *,
        num_steps: int = 200,
        lr: float = 0.05,
        shrinkage: float = 0.5,
        seed: int = 0,
    ) -> dict[str, Any]:
        shrinkage = check_real(shrinkage, "shrinkage", "in (0, 1]", lambda v: 0 < v <= 1)
        num_steps = check_int(num_steps, "num_steps", minimum=1)
        lr = check_real(lr, "lr", "> 0", lambda v: v > 0)
        pos_mean, neg_mean = pos.mean(0, dtype=torch.float64), neg.mean(0, dtype=torch.float64)  # [hidden]
        delta = pos_mean - neg_mean
        centered = torch.cat([pos - pos_mean.float(), neg - neg_mean.float()])  # [n, hidden]
        dof = len(centered) - 2
        mean_var = float(centered.double().square().sum()) / (dof * pos.shape[1])  # trace(S) / hidden
        # sep(v) does not change when the activations are scaled: fit in units where trace(S) / hidden = 1,
        # so that no term under- or overflows float32 (at zero spread q^1.5 underflowed and the vector came
        # out NaN). Without any spread, shrinkage alone is left under the root: the mean difference's direction.
        if mean_var > 0:
            delta, centered = delta / math.sqrt(mean_var), centered / math.sqrt(mean_var)
        delta, mean_var = delta.float(), 1.0

        param = torch.randn(pos.shape[1], generator=_generator(seed)).to(pos.device)
        param = param / param.norm()
        adam = _Adam(param, lr)
        history = []
        for _ in range(num_steps):
            loss, grad = _separation_loss_grad(param, delta, centered, dof, shrinkage, mean_var)
            adam.step(grad)
            history.append(loss)  # read once at the end: no host sync per step

        vector, flipped = _orient(param / param.norm(), pos, neg, pos_mean - neg_mean)
        pos_mean_proj, neg_mean_proj = float(pos_mean @ vector.double()), float(neg_mean @ vector.double())
        return {
            "vector": vector,
            "loss_history": torch.stack(history).to("cpu", torch.float32),
            "final_separation": pos_mean_proj - neg_mean_proj,
            "pos_mean_proj": pos_mean_proj,
            "neg_mean_proj": neg_mean_proj,
            "flipped": flipped,
        }


def _separation_loss_grad(
    param: torch.Tensor,
    delta: torch.Tensor,
    centered: torch.Tensor,
    dof: int,
    shrinkage: float,
    mean_var: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``GradientMethod``'s loss ``-sep(v)`` at ``v = param / |param|`` and its gradient in ``param [hidden]``.

    Written out rather than taken by autograd, which took about half of each step's time at these sizes. With
    ``q = (1 - shrinkage) |centered v|^2 / dof + shrinkage * mean_var`` and ``loss = -(delta @ v) / sqrt(q)``::

        d loss / d v = -delta / sqrt(q) + (delta @ v) (1 - shrinkage) centered' centered v / (dof q^1.5)

    projected onto the tangent space of the sphere and divided by ``|param|``.
    """
    norm = param.norm()
    v = param / norm
    along = centered @ v  # [n]
    q = (1 - shrinkage) * (along @ along) / dof + shrinkage * mean_var
    gain = delta @ v
    grad_v = -delta / q.sqrt() + gain * (1 - shrinkage) / (dof * q**1.5) * (along @ centered)
    return -gain / q.sqrt(), (grad_v - (grad_v @ v) * v) / norm


class _Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1, with PyTorch's defaults: betas (0.9, 0.999), eps 1e-8 added to
    the bias-corrected root of the second moment) on one tensor, updated in place. ``torch.optim.Adam`` does
    the same steps with per-step bookkeeping that cost as much as the arithmetic at these sizes (1.2 s against
    0.6 s for 30 layers of 200 steps on this project's CPU); the test suite checks the two agree."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps=1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.first = torch.zeros_like(param)
        self.second = torch.zeros_like(param)
        self.steps = 0

    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        self.first.lerp_(grad, 1 - beta1)
        self.second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.second.sqrt() / (1 - beta2**self.steps) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.first, denom, value=-self.lr / (1 - beta1**self.steps))


class PCADiffMethod(ExtractionMethod):
    """First principal direction of paired differences ``pos_i - neg_i`` (RepE-style), unit norm, oriented.

    Pairs: with ``pairing='index'`` (default) row ``i`` of ``pos_acts`` is paired with row ``i`` of
    ``neg_acts``, which needs ``n_pos == n_neg`` (the usual contrastive-prompt setup); different counts raise
    ``ValueError``. With ``pairing='random'`` the rows are paired by a seeded random permutation and the larger
    class is subsampled to the size of the smaller one.

    Centering: by default (``center=False``) the differences are not centered: the vector is the top right
    singular vector of the difference matrix, i.e. the direction of largest mean squared projection of the
    differences. This equals the centered PCA of RepE (Zou et al. 2023), which randomly flips the sign of
    each pair, in expectation, and keeps the consistent shift between classes that one is after. With
    ``center=True`` the mean difference is subtracted first, as in repeng's ``pca_diff`` (scikit-learn PCA):
    the vector is then the direction along which the pair differences *vary* most, which finds the trait
    only when its strength varies between pairs more than the noise does.

    Computed by ``torch.linalg.svd`` in float32. The sign is fixed by orientation (``flipped``).

    Returns ``vector [hidden]``, ``explained_variance`` (mean squared projection of the differences on
    ``vector``: divided by ``n_pairs - 1`` when centered, as in scikit-learn, else by ``n_pairs``),
    ``explained_variance_ratio``, ``n_pairs``, ``flipped``.
    """

    min_per_class = 2

    def _extract(
        self,
        pos: torch.Tensor,
        neg: torch.Tensor,
        *,
        pairing: str = "index",
        center: bool = False,
        seed: int = 0,
    ) -> dict[str, Any]:
        check_choice(pairing, "pairing", ("index", "random"))
        if pairing == "index" and len(pos) != len(neg):
            raise ValueError(
                f"pairing='index' pairs row i of pos_acts with row i of neg_acts and needs as many rows in each, "
                f"got pos_acts {tuple(pos.shape)} and neg_acts {tuple(neg.shape)}; pass pairing='random' "
                f"to pair them at random (the larger class is subsampled)"
            )
        if pairing == "random":
            generator = _generator(seed)
            n = min(len(pos), len(neg))
            pick_pos = torch.randperm(len(pos), generator=generator)[:n].to(pos.device)
            pick_neg = torch.randperm(len(neg), generator=generator)[:n].to(neg.device)
            diffs = pos[pick_pos] - neg[pick_neg]
        else:
            diffs = pos - neg  # [n_pairs, hidden]
        if center:
            diffs = diffs - diffs.mean(0)
        _, singular, vh = torch.linalg.svd(diffs, full_matrices=False)
        vector, flipped = _orient(vh[0], pos, neg)  # by every row, also those left out of the pairs
        power = singular**2
        return {
            "vector": vector,
            "explained_variance": float(power[0]) / (len(diffs) - 1 if center else len(diffs)),
            "explained_variance_ratio": float(power[0] / power.sum().clamp_min(1e-30)),
            "n_pairs": len(diffs),
            "flipped": flipped,
        }


class RandomBaselineMethod(ExtractionMethod):
    """A random unit vector (seeded; the data only give its size and device). Not oriented, as the seed
    project's baseline: over many draws its accuracy averages 0.5 by symmetry, whatever the data. As a
    control, orient draws on train as the other methods' vectors are (positives project higher): on a
    residual stream they then reach well above 0.5 (0.59 on the bundled model's sentiment data at layer
    18), the level a trait vector must beat; ``traitlens.pipeline`` does so.

    Returns ``vector [hidden]`` (unit norm) and ``is_random`` (True).
    """

    def _extract(self, pos: torch.Tensor, neg: torch.Tensor, *, seed: int = 0) -> dict[str, Any]:
        return {"vector": self.draw(pos.shape[1], seed, pos.device), "is_random": True}

    @staticmethod
    def draw(hidden: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``[hidden]`` unit vector that ``extract`` returns for ``seed``, without data to check (for
        many draws at once, e.g. the pipeline's control)."""
        vector = torch.randn(hidden, generator=_generator(seed)).to(device)
        return vector / vector.norm()


METHODS: dict[str, type[ExtractionMethod]] = {
    "mean_diff": MeanDifferenceMethod,
    "probe": ProbeMethod,
    "ica": ICAMethod,
    "gradient": GradientMethod,
    "pca_diff": PCADiffMethod,
    "random_baseline": RandomBaselineMethod,
}
"""Method name -> class, for ``get_method``."""


def get_method(name: str, **params: Any) -> ExtractionMethod:
    """The extraction method called ``name`` (a key of ``METHODS``), built with hyper-parameters ``params``.

    >>> get_method("probe", penalty="l1").extract(pos_acts, neg_acts)["vector"]  # doctest: +SKIP
    """
    return METHODS[check_choice(name, "method", list(METHODS))](**params)
