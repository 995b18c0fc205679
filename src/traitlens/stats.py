"""Streaming statistics: per-layer running moments of activations, in float64, mergeable.

Memory does not grow with the number of examples: a ``RunningMoments`` holds a count, the mean of rows
``[layer, hidden]`` and, when asked, the sum of outer products of the rows minus that mean
``[layer, hidden, hidden]``. Each update and each merge combines two such parts by the pairwise rule of
Chan, Golub & LeVeque (1979), so shards computed on different workers combine into the statistics of the
whole dataset, and the covariance stays accurate where the mean is large next to the spread (residual
dimensions reach ~1e4): a sum of raw outer products minus ``n mean mean^T`` loses about
``eps (mean / std)^2`` of it, and turns negative for constant rows. ``ContrastiveStats`` keeps one for the
positives, one for the negatives and one for the paired differences ``pos_i - neg_i``, which is all that mean
difference, PCA-diff and the moment-based metrics need.
"""

from __future__ import annotations

import math

import torch

from traitlens._validation import check_tensor, same_mean, shape_of


class RunningMoments:
    """Count, mean and (with ``outer=True``) centred sum of outer products of rows, per layer, in float64.

    ``update`` takes ``[layer, n, hidden]`` (or ``[n, hidden]`` for a single layer). The moments stay on the
    device of the first update unless ``device`` is given.
    """

    def __init__(self, *, outer: bool = False, device: str | torch.device | None = None):
        self.outer = outer
        self.device = None if device is None else torch.device(device)
        self.count = 0
        self._mean: torch.Tensor | None = None  # [layer, hidden] float64
        self.m2: torch.Tensor | None = None  # [layer, hidden, hidden] float64: sum of (x - mean)(x - mean)^T

    def check(self, rows: torch.Tensor, name: str = "rows") -> torch.Tensor:
        """``rows`` as ``[layer, n, hidden]`` float64 on this object's device, or a ``ValueError`` saying why
        they cannot be added (changes nothing)."""
        rows = check_tensor(rows, name)
        if rows.ndim == 2:
            rows = rows.unsqueeze(0)
        if rows.ndim != 3:
            raise ValueError(
                f"{name} must have shape [layer, n, hidden] or [n, hidden], got {shape_of(rows)}"
            )
        if self._mean is not None and (rows.shape[0], rows.shape[2]) != tuple(self._mean.shape):
            raise ValueError(
                f"{name} must have shape [layer, n, hidden]=[{self._mean.shape[0]}, n, {self._mean.shape[1]}] "
                f"like the earlier updates, got {shape_of(rows)}"
            )
        device = self.device or (rows.device if self._mean is None else self._mean.device)
        return rows.to(device=device, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> RunningMoments:
        return self._update(self.check(rows))

    def _update(self, x: torch.Tensor) -> RunningMoments:
        """``update`` of rows that passed ``check``."""
        if x.shape[1] == 0:
            return self
        # the mean taken about the first row: exact for equal rows, whose centred sum is then exactly 0
        first = x[:, :1]
        mean = first.squeeze(1) + (x - first).mean(dim=1)
        m2 = None
        if self.outer:
            centred = x - mean.unsqueeze(1)
            m2 = centred.transpose(1, 2) @ centred
        self._add(x.shape[1], mean, m2)
        return self

    def _add(self, count: int, mean: torch.Tensor, m2: torch.Tensor | None) -> None:
        """Combine the moments of ``count`` more rows into these (Chan, Golub & LeVeque 1979)."""
        if self._mean is None:
            self.count, self._mean, self.m2 = count, mean.clone(), None if m2 is None else m2.clone()
            return
        total = self.count + count
        delta = mean.to(self._mean.device) - self._mean
        if self.m2 is not None:
            self.m2 += m2.to(self.m2.device)
            self.m2 += (delta.unsqueeze(2) * delta.unsqueeze(1)) * (self.count * count / total)
        self._mean += delta * (count / total)
        self.count = total

    def _require(self, what: str) -> None:
        if self.count == 0:
            raise ValueError(f"{what} needs at least one update; none was made")

    @property
    def mean(self) -> torch.Tensor:
        """``[layer, hidden]`` float64."""
        self._require("mean")
        return self._mean.clone()

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """``[layer, hidden, hidden]`` float64 (needs ``outer=True`` and more than ``ddof`` rows)."""
        if not self.outer:
            raise ValueError("covariance needs RunningMoments(outer=True)")
        self._require("covariance")
        if self.count <= ddof:
            raise ValueError(f"covariance with ddof={ddof} needs more than {ddof} rows, got {self.count}")
        return self.m2 / (self.count - ddof)

    def second_moment(self) -> torch.Tensor:
        """The uncentred second moment ``mean of x x^T``: ``[layer, hidden, hidden]`` float64."""
        if not self.outer:
            raise ValueError("second_moment needs RunningMoments(outer=True)")
        self._require("second_moment")
        return self.m2 / self.count + self._mean.unsqueeze(2) * self._mean.unsqueeze(1)

    def merge(self, other: RunningMoments) -> RunningMoments:
        """A new ``RunningMoments`` holding both (neither input changes)."""
        if not isinstance(other, RunningMoments):
            raise TypeError(f"can only merge RunningMoments, got {type(other).__name__}")
        if self.outer != other.outer:
            raise ValueError("cannot merge moments with and without outer products")
        merged = RunningMoments(outer=self.outer, device=self.device)
        for part in (self, other):
            if part.count == 0:
                continue
            if merged._mean is not None and part._mean.shape != merged._mean.shape:
                raise ValueError(
                    f"cannot merge moments of shapes {shape_of(merged._mean)} and {shape_of(part._mean)}"
                )
            merged._add(part.count, part._mean, part.m2)
        return merged

    __add__ = merge

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (for safetensors files or sending between processes)."""
        state = {"count": torch.tensor(self.count, dtype=torch.int64), "outer": torch.tensor(self.outer)}
        if self._mean is not None:
            state["mean"] = self._mean.cpu()
        if self.m2 is not None:
            state["m2"] = self.m2.cpu()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> RunningMoments:
        """Also reads the raw sums that traitlens 0.5 wrote before its moments were centred (``sum``,
        ``outer_sum``), e.g. the shards of an extraction started with it."""
        moments = cls(outer=bool(state["outer"]))
        moments.count = int(state["count"])
        if "sum" in state and moments.count:
            mean = moments._mean = state["sum"].double() / moments.count
            if "outer_sum" in state:
                outer_of_mean = mean.unsqueeze(2) * mean.unsqueeze(1)
                moments.m2 = state["outer_sum"].double() - moments.count * outer_of_mean
        elif moments.count:
            moments._mean = state["mean"]
            moments.m2 = state.get("m2")
        return moments


class ContrastiveStats:
    """Running moments of positives, negatives and paired differences ``pos_i - neg_i`` per layer.

    ``update(pos, neg)`` takes ``[layer, n, hidden]`` each; when both have the same ``n`` the rows are taken
    as pairs and their differences are accumulated too (needed by ``pca_diff``). With ``outer=True`` the
    outer-product sums are kept (``[layer, hidden, hidden]`` per part, float64: 2.6 MB per layer at hidden
    576, 134 MB per layer at hidden 4096), for ``pca_diff`` and ``effect_size``.
    """

    PARTS = ("pos", "neg", "diff")

    def __init__(self, *, outer: bool = False, device: str | torch.device | None = None):
        self.pos = RunningMoments(outer=outer, device=device)
        self.neg = RunningMoments(outer=outer, device=device)
        self.diff = RunningMoments(outer=outer, device=device)

    def update(self, pos: torch.Tensor, neg: torch.Tensor) -> ContrastiveStats:
        """Add ``pos`` and ``neg`` (each ``[layer, n, hidden]`` or ``[n, hidden]``). Both are checked before
        anything is added, so an update that raises leaves the statistics as they were."""
        pos_rows, neg_rows = self.pos.check(pos, "pos"), self.neg.check(neg, "neg")
        if (pos_rows.shape[0], pos_rows.shape[2]) != (neg_rows.shape[0], neg_rows.shape[2]):
            raise ValueError(
                f"pos and neg must have the same layers and hidden size, got pos {shape_of(pos_rows)} and "
                f"neg {shape_of(neg_rows)} (as [layer, n, hidden])"
            )
        self.pos._update(pos_rows)
        self.neg._update(neg_rows)
        if pos_rows.shape == neg_rows.shape:
            self.diff._update(pos_rows - neg_rows)
        return self

    def _need(self, what: str, fewest: int) -> None:
        if min(self.pos.count, self.neg.count) < fewest:
            raise ValueError(
                f"{what} needs at least {fewest} row{'s' if fewest > 1 else ''} of each class, got "
                f"{self.pos.count} pos and {self.neg.count} neg"
            )

    def _gap(self, what: str) -> torch.Tensor:
        """``mean(pos) - mean(neg)``, ``[layer, hidden]`` float64, for ``what``, which needs, like the
        extraction methods, a gap at every layer."""
        self._need(what, 1)
        pos_mean, neg_mean = self.pos.mean, self.neg.mean  # copies: read once
        same = same_mean(pos_mean, neg_mean).nonzero().flatten().tolist()
        if same:
            raise ValueError(
                f"at layer indices {', '.join(map(str, same))} (positions in the layers given) pos and neg have "
                "the same mean in every feature (the same rows on both sides?): no direction separates them"
            )
        return pos_mean - neg_mean

    def mean_difference(self) -> torch.Tensor:
        """``mean(pos) - mean(neg)``: ``[layer, hidden]`` float32 (as ``MeanDifferenceMethod``)."""
        return self._gap("mean_difference").float()

    def pca_diff(self) -> torch.Tensor:
        """Top eigenvector of the uncentered second moment of the paired differences, oriented so that
        positives project higher: ``[layer, hidden]`` float32, unit norm (as ``PCADiffMethod``'s default,
        ``center=False``). Every row must have come in a pair (``pos`` and ``neg`` of one shape in each
        update)."""
        if not self.diff.outer:
            raise ValueError("pca_diff needs ContrastiveStats(outer=True)")
        gap = self._gap("pca_diff")
        if not self.diff.count == self.pos.count == self.neg.count:  # unrelated rows paired by chance
            raise ValueError(
                f"pca_diff pairs row i of pos with row i of neg, but only {self.diff.count} of the "
                f"{self.pos.count} pos and {self.neg.count} neg rows came in updates of equal shapes"
            )
        _, vectors = torch.linalg.eigh(self.diff.second_moment())  # [layer, hidden, hidden]
        top = vectors[..., -1]  # [layer, hidden]
        sign = torch.sign((top * gap).sum(-1, keepdim=True))
        return (top * torch.where(sign == 0, 1.0, sign)).float()

    def effect_size(self, vectors: torch.Tensor) -> torch.Tensor:
        """Cohen's d of the projections onto ``vectors`` ``[layer, hidden]``, from moments alone: ``[layer]``.

        ``(mean_pos - mean_neg) . u / sqrt(pooled variance of u . x)`` with ``u`` the unit vectors; the same
        number ``traitlens.metrics.effect_size`` computes from the rows.
        """
        if not self.pos.outer:
            raise ValueError("effect_size needs ContrastiveStats(outer=True)")
        self._need("effect_size", 2)  # a variance of each class
        gap = self.pos.mean - self.neg.mean
        vectors = check_tensor(vectors, "vectors")
        if vectors.shape != gap.shape:
            raise ValueError(
                f"vectors must have shape [layer, hidden]={list(gap.shape)}, one per layer, got {shape_of(vectors)}"
            )
        units = vectors.double().to(gap.device)
        units = units / units.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        gap = (gap * units).sum(-1)
        var_pos = torch.einsum("lh,lhk,lk->l", units, self.pos.covariance(), units)
        var_neg = torch.einsum("lh,lhk,lk->l", units, self.neg.covariance(), units)
        n_pos, n_neg = self.pos.count, self.neg.count
        pooled = ((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2)
        # no spread in either class: 0 for equal means, +/-inf otherwise (as the row-based metric)
        spread = pooled > 0
        flat = torch.where(gap == 0, 0.0, gap.sign() * math.inf)
        return torch.where(spread, gap / torch.where(spread, pooled, 1.0).sqrt(), flat)

    def merge(self, other: ContrastiveStats) -> ContrastiveStats:
        """A new ``ContrastiveStats`` holding both (neither input changes: use the result, e.g.
        ``total = total.merge(part)`` or ``total += part``)."""
        merged = ContrastiveStats.__new__(ContrastiveStats)
        for part in self.PARTS:
            setattr(merged, part, getattr(self, part).merge(getattr(other, part)))
        return merged

    __add__ = merge

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{part}.{k}": v for part in self.PARTS for k, v in getattr(self, part).state_dict().items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ContrastiveStats:
        stats = cls.__new__(cls)
        for part in cls.PARTS:
            prefix = f"{part}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            setattr(stats, part, RunningMoments.from_state_dict(sub))
        return stats
