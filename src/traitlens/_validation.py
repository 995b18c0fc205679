"""Argument checks and error wording, kept in one place so that every message reads the same.

A message names the argument, what was expected, what was received, and how to fix it when it can.
"""

from __future__ import annotations

import difflib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch


def shape_of(x: torch.Tensor) -> str:
    """``(2, 576)``: a shape written as users see it in their own code."""
    return str(tuple(x.shape))


def short_list(items: Iterable[str], limit: int = 10) -> str:
    """``'a', 'b', 'c', ... (27 more)``."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown or "(none)"


def closest(name: str, options: Sequence[str], n: int = 3) -> list[str]:
    """The options that look most like ``name`` (possibly none)."""
    return difflib.get_close_matches(name, list(options), n=n, cutoff=0.5)


def did_you_mean(name: str, options: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` or an empty string."""
    return suggest(closest(name, options))


def suggest(matches: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` (or ``one of [...]``) for ready-made ``matches``, or an empty string."""
    if not matches:
        return ""
    if len(matches) == 1:
        return f"; did you mean {matches[0]!r}?"
    return f"; did you mean one of {short_list(matches)}?"


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The floating-point dtypes activations and vectors may have."""


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite, in one pass over it where it is: a NaN or inf makes the sum NaN
    or inf, so a finite sum (of half precision in float32) settles it; only a sum that is not finite (a
    non-finite value, or an overflow) is checked value by value. ``torch.isfinite(x).all()`` runs five
    kernels over ``x``: on the pipeline's ``[n, hidden]`` activations, checked for every method and layer,
    they were most of the checks' time, more on a loaded machine, where each parallel kernel may wait for
    a busy core."""
    total = x.sum(dtype=torch.promote_types(x.dtype, torch.float32))
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | None = None,
    shape_doc: str | None = None,
    finite: bool = True,
    floating: bool = True,
) -> torch.Tensor:
    """Validate a tensor argument and return it unchanged.

    ``shape_doc`` is the documented shape (``"[n, hidden]"``) quoted in the message when ``ndim`` fails.
    """
    if not isinstance(x, torch.Tensor):
        hint = "; pass its .vector" if isinstance(getattr(x, "vector", None), torch.Tensor) else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
    if x.is_meta:
        raise ValueError(
            f"{name} is on the 'meta' device and holds no data (a model built without its weights?); "
            "load the weights, or move it to a real device"
        )
    if ndim is not None and x.ndim != ndim:
        expected = shape_doc or f"{ndim}-D"
        hint = ""
        if ndim == 2 and x.ndim == 1:
            hint = f"; for a single example use {name}.unsqueeze(0)"
        elif ndim == 2 and x.ndim == 3:
            hint = "; select one position per example first (e.g. x[:, -1]) or flatten with x.flatten(0, 1)"
        raise ValueError(f"{name} must have shape {expected}, got {shape_of(x)}{hint}")
    if floating and not x.is_floating_point():  # complex too: its imaginary part would be dropped silently
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if floating and x.dtype not in FLOATS:  # float8: no isfinite, no arithmetic
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}; cast it with .float()"
        )
    if finite and x.numel() and not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        fix = "clean or drop those rows"
        if x.dtype == torch.float16 and bool(torch.isinf(x).any()):  # e.g. a vector scaled in float16
            fix = "float16 overflows above 65504: compute in float32 (.float()) or " + fix
        raise ValueError(f"{name} contains {bad} non-finite values (NaN or inf); {fix}")
    return x


def check_vector(
    vector: object, name: str = "vector", hidden: int | None = None, *, hidden_of: str | None = None
) -> torch.Tensor:
    """A direction ``[hidden]``; optionally of a known hidden size.

    ``hidden_of`` names where ``hidden`` comes from (``"pos_acts (20, 576)"``) for the message.
    """
    vector = check_tensor(vector, name, ndim=1, shape_doc="[hidden]")
    if vector.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape (0,)); a direction needs at least one dimension")
    if hidden is not None and vector.shape[0] != hidden:
        source = f" to match {hidden_of}" if hidden_of else ""
        raise ValueError(f"{name} must have shape [hidden]=[{hidden}]{source}, got {shape_of(vector)}")
    return vector


def check_pos_neg(
    pos_acts: object, neg_acts: object, *, min_per_class: int = 1, method: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a contrastive pair of activation sets, each ``[n, hidden]``, and return them detached (a
    direction read from them is not a function to differentiate)."""
    pos = check_tensor(pos_acts, "pos_acts", ndim=2, shape_doc="[n_pos, hidden]")
    neg = check_tensor(neg_acts, "neg_acts", ndim=2, shape_doc="[n_neg, hidden]")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(
            f"pos_acts and neg_acts must have the same hidden size, got pos_acts {shape_of(pos)} "
            f"and neg_acts {shape_of(neg)}"
        )
    if pos.shape[1] == 0:
        raise ValueError(f"pos_acts and neg_acts have no features (hidden size 0): {shape_of(pos)}")
    who = f"{method} needs" if method else "need"
    for arg, x in (("pos_acts", pos), ("neg_acts", neg)):
        if x.shape[0] < min_per_class:
            what = "is empty" if x.shape[0] == 0 else f"has {x.shape[0]} rows"
            raise ValueError(
                f"{arg} {what} (shape {shape_of(x)}); {who} at least {min_per_class} example"
                f"{'s' if min_per_class != 1 else ''} per class"
            )
    return pos.detach(), neg.detach()


def same_mean(pos_mean: torch.Tensor, neg_mean: torch.Tensor) -> torch.Tensor:
    """Whether two float64 means ``[..., hidden]`` are the same in every feature (to 1e-12 of their size,
    the rounding of means of the same rows in another order): ``[...]`` bool. No direction separates such
    classes; a method would return rounding noise, a zero vector or its random start."""
    return ((pos_mean - neg_mean).abs() <= 1e-12 * torch.maximum(pos_mean.abs(), neg_mean.abs())).all(-1)


def check_outputs(x: torch.Tensor, where: str, dtype: Callable[[], torch.dtype]) -> None:
    """Raise if ``x``, what the module ``where`` of a model computing in ``dtype()`` output, holds NaN or
    inf (the model's doing, not the user's data: a float16 model overflows above 65504)."""
    if not all_finite(x):
        hint = ""
        if dtype() == torch.float16:
            hint = "; the model runs in float16, which overflows above 65504: load it in bfloat16 or float32"
        raise ValueError(
            f"{where} output {int((~torch.isfinite(x)).sum())} non-finite values (NaN or inf){hint}"
        )


def check_choice(value: object, name: str, options: Sequence[str]) -> str:
    """A string argument that must be one of ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(
            f"{name} must be one of {short_list(options)}, got {value!r}"
            + (did_you_mean(value, options) if isinstance(value, str) else "")
        )
    return value


def real_number(x: object) -> float | None:
    """``x`` as a finite float when it is a real number (a Python or numpy number, or a one-element tensor
    that is not bool or complex), else ``None``."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dtype == torch.bool or x.is_complex():
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def whole_number(x: object) -> int | None:
    """``x`` as an int when it is a whole number (a Python or numpy integer, or a one-element integer
    tensor; not a bool), else ``None``."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        return None
    return int(x)


def check_int(x: object, name: str, minimum: int | None = None) -> int:
    """A whole-number argument (see ``whole_number``), at least ``minimum``, as an int."""
    value = whole_number(x)
    if value is None or (minimum is not None and value < minimum):
        kind = "an int" if minimum is None else "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {x!r}")
    return value


def check_real(x: object, name: str, interval: str, inside: Callable[[float], bool]) -> float:
    """A real-number argument (see ``real_number``) for which ``inside`` holds, as a float; ``interval``
    says where it must be (``"in (0, 1]"``, ``"> 0"``) in the message."""
    value = real_number(x)
    if value is None or not inside(value):
        raise ValueError(f"{name} must be {interval}, got {x!r}")
    return value


def warn_if_training(model: torch.nn.Module, what: str, stacklevel: int = 3) -> None:
    """Warn that ``model`` is in training mode: dropout makes ``what`` differ from run to run (the model is
    the user's to switch; traitlens does not change its mode)."""
    if model.training:
        warnings.warn(
            f"the model is in training mode, so its dropout (if it has any) changes {what} from run to run; "
            "call model.eval() first (load_model and from_pretrained return models in eval mode)",
            stacklevel=stacklevel,
        )
