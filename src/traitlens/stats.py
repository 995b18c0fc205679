"""Streaming statistics: per-layer running moments of activations, in float64, mergeable.

Memory does not grow with the number of examples: a ``RunningMoments`` holds a count, the sum of rows
``[layer, hidden]`` and, when asked, the sum of their outer products ``[layer, hidden, hidden]``. Two of them
merge by adding those (so shards computed on different workers combine into the statistics of the whole
dataset, up to float64 rounding). ``ContrastiveStats`` keeps one for the positives, one for the negatives
and one for the paired differences ``pos_i - neg_i``, which is all that mean difference, PCA-diff and the
moment-based metrics need.
"""

from __future__ import annotations

import torch

from traitlens._validation import check_tensor, shape_of


class RunningMoments:
    """Count, sum and (with ``outer=True``) sum of outer products of rows, per layer, in float64.

    ``update`` takes ``[layer, n, hidden]`` (or ``[n, hidden]`` for a single layer). The sums stay on the
    device of the first update unless ``device`` is given.
    """

    def __init__(self, *, outer: bool = False, device: str | torch.device | None = None):
        self.outer = outer
        self.device = None if device is None else torch.device(device)
        self.count = 0
        self.sum: torch.Tensor | None = None  # [layer, hidden] float64
        self.outer_sum: torch.Tensor | None = None  # [layer, hidden, hidden] float64

    def update(self, rows: torch.Tensor) -> RunningMoments:
        rows = check_tensor(rows, "rows")
        if rows.ndim == 2:
            rows = rows.unsqueeze(0)
        if rows.ndim != 3:
            raise ValueError(f"rows must have shape [layer, n, hidden] or [n, hidden], got {shape_of(rows)}")
        x = rows.to(device=self.device or rows.device, dtype=torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64, device=x.device)
            if self.outer:
                self.outer_sum = torch.zeros(
                    x.shape[0], x.shape[2], x.shape[2], dtype=torch.float64, device=x.device
                )
        elif (x.shape[0], x.shape[2]) != tuple(self.sum.shape):
            raise ValueError(
                f"rows must have shape [layer, n, hidden]=[{self.sum.shape[0]}, n, {self.sum.shape[1]}] like "
                f"the earlier updates, got {shape_of(rows)}"
            )
        self.count += x.shape[1]
        self.sum += x.sum(dim=1)
        if self.outer:
            self.outer_sum += x.transpose(1, 2) @ x
        return self

    def _require(self, what: str) -> None:
        if self.count == 0:
            raise ValueError(f"{what} needs at least one update; none was made")

    @property
    def mean(self) -> torch.Tensor:
        """``[layer, hidden]`` float64."""
        self._require("mean")
        return self.sum / self.count

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """``[layer, hidden, hidden]`` float64 (needs ``outer=True`` and more than ``ddof`` rows)."""
        if not self.outer:
            raise ValueError("covariance needs RunningMoments(outer=True)")
        self._require("covariance")
        if self.count <= ddof:
            raise ValueError(f"covariance with ddof={ddof} needs more than {ddof} rows, got {self.count}")
        mean = self.mean
        centered = self.outer_sum - self.count * mean.unsqueeze(2) * mean.unsqueeze(1)
        return centered / (self.count - ddof)

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
            if merged.sum is None:
                merged.sum = part.sum.clone()
                merged.outer_sum = None if part.outer_sum is None else part.outer_sum.clone()
            else:
                if part.sum.shape != merged.sum.shape:
                    raise ValueError(
                        f"cannot merge moments of shapes {shape_of(merged.sum)} and {shape_of(part.sum)}"
                    )
                merged.sum += part.sum.to(merged.sum.device)
                if merged.outer_sum is not None:
                    merged.outer_sum += part.outer_sum.to(merged.outer_sum.device)
            merged.count += part.count
        return merged

    __add__ = merge

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (for safetensors files or sending between processes)."""
        state = {"count": torch.tensor(self.count, dtype=torch.int64), "outer": torch.tensor(self.outer)}
        if self.sum is not None:
            state["sum"] = self.sum.cpu()
        if self.outer_sum is not None:
            state["outer_sum"] = self.outer_sum.cpu()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> RunningMoments:
        moments = cls(outer=bool(state["outer"]))
        moments.count = int(state["count"])
        moments.sum = state.get("sum")
        moments.outer_sum = state.get("outer_sum")
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
        self.pos.update(pos)
        self.neg.update(neg)
        if pos.shape == neg.shape:
            self.diff.update(pos.double() - neg.double())
        return self

    def mean_difference(self) -> torch.Tensor:
        """``mean(pos) - mean(neg)``: ``[layer, hidden]`` float32 (as ``MeanDifferenceMethod``)."""
        return (self.pos.mean - self.neg.mean).float()

    def pca_diff(self) -> torch.Tensor:
        """Top eigenvector of the uncentered second moment of the paired differences, oriented so that
        positives project higher: ``[layer, hidden]`` float32, unit norm (as ``PCADiffMethod``'s default,
        ``center=False``)."""
        if not self.diff.outer:
            raise ValueError("pca_diff needs ContrastiveStats(outer=True)")
        if self.diff.count == 0:
            raise ValueError("pca_diff needs paired updates (pos and neg of the same shape); none was made")
        second = self.diff.outer_sum / self.diff.count  # [layer, hidden, hidden]
        _, vectors = torch.linalg.eigh(second)
        top = vectors[..., -1]  # [layer, hidden]
        sign = torch.sign((top * (self.pos.mean - self.neg.mean)).sum(-1, keepdim=True))
        return (top * torch.where(sign == 0, 1.0, sign)).float()

    def effect_size(self, vectors: torch.Tensor) -> torch.Tensor:
        """Cohen's d of the projections onto ``vectors`` ``[layer, hidden]``, from moments alone: ``[layer]``.

        ``(mean_pos - mean_neg) . u / sqrt(pooled variance of u . x)`` with ``u`` the unit vectors; the same
        number ``traitlens.metrics.effect_size`` computes from the rows.
        """
        if not self.pos.outer:
            raise ValueError("effect_size needs ContrastiveStats(outer=True)")
        units = vectors.double().to(self.pos.sum.device)
        units = units / units.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        gap = ((self.pos.mean - self.neg.mean) * units).sum(-1)
        var_pos = torch.einsum("lh,lhk,lk->l", units, self.pos.covariance(), units)
        var_neg = torch.einsum("lh,lhk,lk->l", units, self.neg.covariance(), units)
        n_pos, n_neg = self.pos.count, self.neg.count
        pooled = ((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2)
        return gap / pooled.sqrt()

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
