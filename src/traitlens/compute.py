"""Basic computations on activations and trait vectors.

The compute functions of the traitlens v0.4 README, with the same names, argument names and defaults:
difference of means, token-to-token derivatives, projections, cosines, norms, PCA and attention entropy.

Conventions shared by every function here:

- The hidden dimension is the last one: shapes are written ``[n, hidden]``, ``[seq, hidden]``,
  ``[batch, seq, hidden]`` or ``[..., hidden]``.
- Results are float32 whatever the input dtype (float16 and bfloat16 are upcast before any arithmetic);
  float64 inputs stay float64. Means are accumulated in float64.
- A zero vector has no direction: normalising it gives a zero vector, and its cosine with anything is 0.
  No function here returns NaN for finite input.
"""

from __future__ import annotations

import warnings

import torch

from traitlens._validation import check_tensor, check_vector, real_number, shape_of, whole_number


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged if it is already float64 (fp16/bf16 are never computed in)."""
    return x if x.dtype == torch.float64 else x.float()


def _at_least_1d(x: torch.Tensor, name: str, shape_doc: str) -> torch.Tensor:
    if x.ndim == 0:
        raise ValueError(f"{name} must have shape {shape_doc}, got a scalar ()")
    return x


def _size_along(x: torch.Tensor, name: str, dim: int, need: int, who: str) -> int:
    """Normalise ``dim`` for ``x`` and check that ``x`` has at least ``need`` points along it."""
    if whole_number(dim) is None:
        raise TypeError(f"dim must be an int, got {dim!r}")
    dim = int(dim)
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim={dim} is out of range for {name} of shape {shape_of(x)}")
    dim %= x.ndim
    if x.shape[dim] < need:
        raise ValueError(
            f"{who} needs at least {need} point{'s' if need > 1 else ''} along dim {dim} of {name}, got shape "
            f"{shape_of(x)}"
        )
    return dim


def mean_difference(
    pos_acts: torch.Tensor, neg_acts: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``pos_acts`` minus mean of ``neg_acts``: the plain difference-of-means trait vector.

    Args:
        pos_acts: ``[n_pos, hidden]`` or ``[batch, seq, hidden]`` (any ``[..., hidden]``). Every position
            of ``[batch, seq, hidden]`` counts, padding included (on the bundled model, two right-padded
            sentences a side gave a vector at cosine 0.50 to the one without pads): pass the real tokens'
            rows, ``hidden[attention_mask.bool()]``, or capture with ``positions=`` (``traitlens.positions``).
        neg_acts: the same layout as ``pos_acts``; the number of examples may differ.
        dim: dimension(s) to average over. ``None`` averages over every dimension but the last
            (the hidden one), so ``[n, hidden]`` and ``[batch, seq, hidden]`` both give ``[hidden]``.

    Returns:
        ``[hidden]`` for the default ``dim`` (in general: the input shape without ``dim``), float32.
        The means are accumulated in float64.
    """
    pos = _at_least_1d(check_tensor(pos_acts, "pos_acts"), "pos_acts", "[n_pos, hidden]")
    neg = _at_least_1d(check_tensor(neg_acts, "neg_acts"), "neg_acts", "[n_neg, hidden]")
    means = []
    for name, x in (("pos_acts", pos), ("neg_acts", neg)):
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {shape_of(x)}); need at least one example")
        if dim is None:
            dims = tuple(range(x.ndim - 1))
        else:
            several = isinstance(dim, (tuple, list))
            dims = [_size_along(x, name, d, 1, "mean_difference") for d in (dim if several else [dim])]
            if len(set(dims)) != len(dims):
                raise ValueError(f"dim={dim!r} names a dimension of {name} {shape_of(x)} twice")
            dims = tuple(dims) if several else dims[0]
        x = x.to(torch.float64)
        means.append(x.mean(dim=dims) if dims != () else x)  # [hidden]: one example, its own mean
    if means[0].shape != means[1].shape:
        raise ValueError(
            f"pos_acts and neg_acts must give means of the same shape, got pos_acts {shape_of(pos)} -> "
            f"{shape_of(means[0])} and neg_acts {shape_of(neg)} -> {shape_of(means[1])}"
        )
    out_dtype = torch.float64 if torch.float64 in (pos.dtype, neg.dtype) else torch.float32
    return (means[0] - means[1].to(means[0].device)).to(out_dtype)  # on pos_acts' device


def compute_derivative(
    expression_trajectory: torch.Tensor, dt: float = 1.0, normalize: bool = False, *, dim: int = 0
) -> torch.Tensor:
    """Velocity of a trajectory: finite differences ``(x[t+1] - x[t]) / dt`` along ``dim``.

    Args:
        expression_trajectory: ``[seq, hidden]`` (one vector per token), ``[seq]`` (one projection per
            token), or any shape with time along ``dim`` (``dim=1`` for ``[batch, seq, hidden]``).
        dt: time step between consecutive points (non-zero).
        normalize: return unit vectors along the last (hidden) dimension; zero differences stay zero.
            Needs at least 2 dimensions.
        dim: the time dimension.

    Returns:
        The input shape with ``seq - 1`` points along ``dim``, float32.

    Raises:
        ValueError: fewer than 2 points along ``dim``.
    """
    return _difference(expression_trajectory, 1, dt, normalize, dim, "compute_derivative")


def compute_second_derivative(
    expression_trajectory: torch.Tensor, dt: float = 1.0, normalize: bool = False, *, dim: int = 0
) -> torch.Tensor:
    """Acceleration of a trajectory: ``(x[t+2] - 2 x[t+1] + x[t]) / dt**2`` along ``dim``.

    Arguments as for :func:`compute_derivative`. Returns the input shape with ``seq - 2`` points along
    ``dim``, float32; needs at least 3 points.
    """
    return _difference(expression_trajectory, 2, dt, normalize, dim, "compute_second_derivative")


def _difference(x: object, order: int, dt: float, normalize: bool, dim: int, who: str) -> torch.Tensor:
    x = check_tensor(x, "expression_trajectory")
    x = _at_least_1d(x, "expression_trajectory", "[seq, hidden]")
    dim = _size_along(x, "expression_trajectory", dim, order + 1, who)
    step = real_number(dt)
    if not step:  # None (not a finite real number) or 0
        raise ValueError(f"dt must be a finite non-zero number, got {dt!r}")
    if normalize and x.ndim < 2:
        raise ValueError(
            f"normalize=True needs vectors ([seq, hidden]), got expression_trajectory of shape {shape_of(x)}"
        )
    out = torch.diff(_upcast(x), n=order, dim=dim) / step**order
    return _unit(out) if normalize else out


def projection(
    activations: torch.Tensor, vector: torch.Tensor, normalize_vector: bool = True
) -> torch.Tensor:
    """Scalar projection of activations onto a trait vector: ``activations @ vector / |vector|``.

    Args:
        activations: ``[..., hidden]``, e.g. ``[hidden]``, ``[n, hidden]`` or ``[batch, seq, hidden]``.
        vector: ``[hidden]``; moved to the device of ``activations``.
        normalize_vector: divide by the norm of ``vector`` first, so the result is in activation units
            along the direction (the default). A zero vector then gives zero projections.

    Returns:
        ``[...]``: the input shape without the hidden dimension, float32 (float64 if either input is).
    """
    acts = _at_least_1d(check_tensor(activations, "activations"), "activations", "[..., hidden]")
    vec = check_vector(vector, "vector", hidden=acts.shape[-1], hidden_of=f"activations {shape_of(acts)}")
    dtype = torch.float64 if torch.float64 in (acts.dtype, vec.dtype) else torch.float32
    vec = vec.to(device=acts.device, dtype=dtype)
    if normalize_vector:
        vec = _unit(vec)
    return torch.matmul(acts.to(dtype), vec)


def cosine_similarity(vec1: torch.Tensor, vec2: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Cosine of the angle between vectors along ``dim`` (broadcasting like ``vec1 * vec2``).

    Args:
        vec1: ``[hidden]``, ``[n, hidden]`` or any ``[..., hidden]``.
        vec2: broadcastable with ``vec1``, with the same size along ``dim``.
        dim: the vector dimension.

    Returns:
        The broadcast shape without ``dim``, float32, in ``[-1, 1]``. The cosine with a zero vector is 0.
    """
    a = _at_least_1d(check_tensor(vec1, "vec1"), "vec1", "[..., hidden]")
    b = _at_least_1d(check_tensor(vec2, "vec2"), "vec2", "[..., hidden]")
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"vec1 and vec2 must have broadcastable shapes, got vec1 {shape_of(a)} and vec2 {shape_of(b)}"
        ) from None
    if not -len(shape) <= dim < len(shape):
        raise ValueError(f"dim={dim} is out of range for the broadcast shape {list(shape)}")
    axis = dim % len(shape) - len(shape)  # counted from the end: the same axis of both inputs
    if min(a.ndim, b.ndim) < -axis or a.shape[axis] != b.shape[axis]:  # no broadcasting along the vectors
        raise ValueError(
            f"vec1 and vec2 must both have dim={dim} of the same size, got vec1 {shape_of(a)} and vec2 "
            f"{shape_of(b)}"
        )
    return _cosine(a, b.to(a.device), axis)


def _cosine(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``cosine_similarity`` of checked tensors on one device."""
    # Normalising first (rather than dividing the dot product) cannot overflow for large activations.
    return (_unit(a, dim) * _unit(b, dim)).sum(dim=dim).clamp(-1.0, 1.0)


def normalize_vectors(vectors: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Scale vectors to unit L2 norm along ``dim``.

    Args:
        vectors: ``[hidden]``, ``[n, hidden]`` or any ``[..., hidden]``.
        dim: the vector dimension.

    Returns:
        Same shape, float32. Zero vectors stay zero (no epsilon is added to other norms); very large or
        very small vectors are scaled before squaring, so they neither overflow nor underflow.
    """
    x = _at_least_1d(check_tensor(vectors, "vectors"), "vectors", "[..., hidden]")
    return _unit(x, _size_along(x, "vectors", dim, 1, "normalize_vectors"))


def _unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``normalize_vectors`` of a checked tensor (no second scan of its values)."""
    scaled, biggest = _scaled(_upcast(x), dim)
    return torch.where(biggest > 0, scaled / torch.linalg.vector_norm(scaled, dim=dim, keepdim=True), 0.0)


def _scaled(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` divided by its largest magnitude along ``dim`` (kept, 0 for a zero vector, which stays zero), so
    that squaring it for a norm can neither overflow nor underflow."""
    biggest = x.abs().amax(dim=dim, keepdim=True)
    return x / torch.where(biggest > 0, biggest, 1.0), biggest


def magnitude(vectors: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2 norm of vectors along ``dim``.

    Args:
        vectors: ``[..., hidden]``, e.g. ``[layer, seq, hidden]``.
        dim: the vector dimension.

    Returns:
        The input shape without ``dim`` (``[layer, seq]``), float32.
    """
    x = _at_least_1d(check_tensor(vectors, "vectors"), "vectors", "[..., hidden]")
    return _norm(x, _size_along(x, "vectors", dim, 1, "magnitude"))


def _norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``magnitude`` of a checked tensor."""
    scaled, biggest = _scaled(_upcast(x), dim)
    return (torch.linalg.vector_norm(scaled, dim=dim, keepdim=True) * biggest).squeeze(dim)


def radial_velocity(trajectory: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Change of norm between consecutive points: ``|x[t+1]| - |x[t]|`` (positive = growing).

    Args:
        trajectory: ``[n_points, ..., hidden]``, e.g. ``[layer, seq, hidden]``; norms are taken over the
            last dimension.
        dim: the dimension along which points follow each other (not the hidden one).

    Returns:
        ``[n_points - 1, ...]``: the input shape without hidden and with one point fewer along ``dim``.
    """
    x = _trajectory(trajectory, dim, "radial_velocity")
    return torch.diff(_norm(x), dim=dim % x.ndim)


def angular_velocity(trajectory: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Change of direction between consecutive points: ``1 - cos(x[t], x[t+1])``.

    0 means the same direction, 1 orthogonal (or a zero vector at either end), 2 opposite.

    Args:
        trajectory: ``[n_points, ..., hidden]``, e.g. ``[layer, seq, hidden]``.
        dim: the dimension along which points follow each other (not the hidden one).

    Returns:
        ``[n_points - 1, ...]``: the input shape without hidden and with one point fewer along ``dim``.
    """
    x = _trajectory(trajectory, dim, "angular_velocity")
    n = x.shape[dim]
    return 1.0 - _cosine(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), -1)


def _trajectory(trajectory: object, dim: int, who: str) -> torch.Tensor:
    x = check_tensor(trajectory, "trajectory")
    if x.ndim < 2:
        raise ValueError(f"trajectory must have shape [n_points, ..., hidden], got {shape_of(x)}")
    if dim in (-1, x.ndim - 1):
        raise ValueError(
            f"dim={dim} is the hidden (last) dimension of trajectory {shape_of(x)}; pick another"
        )
    _size_along(x, "trajectory", dim, 2, who)
    return x


def pca_reduce(
    activations: torch.Tensor, n_components: int = 2, return_pca: bool = False
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Project activations onto their top principal components (no scikit-learn needed).

    All leading dimensions are pooled into one set of samples, which is centred and decomposed with a
    thin SVD (``torch.linalg.svd``), in float32 (float64 if the input is).

    Sign convention (deterministic): each component is flipped so that its entry of largest absolute
    value is positive (the first such entry on ties), as scikit-learn's PCA does from version 1.5.

    Args:
        activations: ``[..., hidden]``, e.g. ``[n, hidden]`` or ``[layer, seq, hidden]``; at least 2 samples.
        n_components: number of components, ``1 <= n_components <= min(n_samples, hidden)``.
        return_pca: also return ``(mean, components)`` to reduce new data the same way:
            ``(new - mean) @ components.T``.

    Returns:
        ``[..., n_components]``; with ``return_pca``: ``(reduced, (mean [hidden], components
        [n_components, hidden]))``, components orthonormal and ordered by explained variance.
    """
    x = _at_least_1d(check_tensor(activations, "activations"), "activations", "[..., hidden]")
    if x.ndim < 2:
        raise ValueError(f"activations must have shape [n, hidden] or [..., hidden], got {shape_of(x)}")
    flat = _upcast(x).reshape(-1, x.shape[-1])  # [n, hidden]
    n, hidden = flat.shape
    if n < 2:
        raise ValueError(f"pca_reduce needs at least 2 samples, got activations of shape {shape_of(x)}")
    if whole_number(n_components) is None:
        raise TypeError(f"n_components must be an int, got {type(n_components).__name__}")
    n_components = int(n_components)
    if not 1 <= n_components <= min(n, hidden):
        raise ValueError(
            f"n_components must be between 1 and min(n_samples, hidden)={min(n, hidden)} for activations "
            f"of shape {shape_of(x)}, got {n_components}"
        )
    mean = flat.mean(dim=0, dtype=torch.float64).to(flat.dtype)  # [hidden], accumulated in float64
    centered = flat - mean
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    components = vh[:n_components]  # [n_components, hidden]
    biggest = components.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(components.gather(1, biggest))
    components = components * torch.where(signs == 0, 1.0, signs)
    reduced = (centered @ components.T).reshape(*x.shape[:-1], n_components)
    return (reduced, (mean, components)) if return_pca else reduced


def attention_entropy(attention_weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (in nats) of attention distributions: ``-sum(p * log p)`` with ``0 log 0 = 0``.

    Higher means more diffuse attention; the range is ``[0, log(n_keys)]``.

    Args:
        attention_weights: ``[..., n_keys]`` of non-negative weights that sum to 1 along ``dim``, e.g.
            ``[batch, heads, query, key]`` from ``output_attentions=True``. Weights are used as given:
            a warning is issued if some rows are more than 1e-2 away from summing to 1.
        dim: the distribution dimension.

    Returns:
        The input shape without ``dim``, float32.
    """
    p = check_tensor(attention_weights, "attention_weights")
    p = _upcast(_at_least_1d(p, "attention_weights", "[..., n_keys]"))
    dim = _size_along(p, "attention_weights", dim, 1, "attention_entropy")
    if bool((p < 0).any()):
        raise ValueError(
            f"attention_weights must be non-negative probabilities, got {int((p < 0).sum())} negative "
            "values; apply softmax to scores first"
        )
    if p.numel() and float((p.sum(dim=dim) - 1).abs().max()) > 1e-2:
        warnings.warn(
            "attention_weights do not sum to 1 along dim (max deviation > 1e-2); entropy is computed "
            "on the weights as given",
            stacklevel=2,
        )
    return -torch.special.xlogy(p, p).sum(dim=dim)
