"""Where in the sequence activations are read: the position rules, as selectors for ``ActivationCapture``.

A *selector* is what ``ActivationCapture(positions=...)`` accepts: ``None`` (every position), an ``int`` or a
``slice`` (the same positions in every row), a ``[batch]`` or ``[batch, k]`` integer tensor (per-row
positions, in ``0 .. seq - 1``: negative values are not counted from the end; use the int ``-1`` for the last
position. An index on the host is checked when it is set, one on a GPU is not, as reading it would make the
host wait for the GPU), or a ``[batch, seq]`` floating tensor
of weights (a weighted sum over positions, e.g. a mean over the prompt). Selection runs on the activations'
device, so hooks never synchronise with the host.

The rules of the pipeline, one vocabulary everywhere:

- ``"prompt_last"``: the last real token of the prompt (for plain texts, the last token of the text);
- ``"prompt_mean"``: the mean over the prompt's real tokens but the first (unless it is the only one; since
  0.5.1). The first position sees nothing but itself and is the model's attention sink: on the bundled model
  its residual is ~100x as long as the others', so a mean that includes it is mostly that token. On the
  shipped sentiment pairs, mean difference at layer 12 scored 0.605 accuracy on validation + test with it
  and 0.947 without;
- ``"response_mean"``: the mean over the response's tokens;
- ``"all"``: every position (``[batch, seq, hidden]``; pads included, mask them yourself; the first token
  too, an outlier as said above).

All are padding-safe for left and right padding because they come from masks, never from ``shape[1]``.
"""

from __future__ import annotations

import torch

from traitlens._validation import all_finite, check_choice, shape_of

POSITION_RULES = ("prompt_last", "prompt_mean", "response_mean", "all")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) token of each row: ``[batch]``, on the mask's device.

    Correct for right padding (``mask.sum(-1) - 1`` would be too) and for left padding (where it is
    ``seq - 1``); a row with no real token gets 0.
    """
    mask = _check_mask(attention_mask, "attention_mask")
    steps = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * steps).argmax(dim=-1)


def select_positions(
    rule: str,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The selector for ``rule`` on a batch: pass it as ``ActivationCapture.positions`` for that batch.

    Args:
        rule: one of ``POSITION_RULES``.
        attention_mask: ``[batch, seq]``, 1 on real tokens.
        response_mask: ``[batch, seq]``, 1 on response tokens (prompt = real tokens that are not response).
            Needed for every rule but ``"all"``; ``None`` means the whole text is the prompt.

    Returns a ``[batch]`` index (``prompt_last``), ``[batch, seq]`` float32 weights that sum to 1 per row
    (the means), or ``None`` (``all``).
    """
    check_choice(rule, "position", POSITION_RULES)
    mask = _check_mask(attention_mask, "attention_mask").bool()
    if rule == "all":
        return None
    response = (
        torch.zeros_like(mask) if response_mask is None else _check_mask(response_mask, "response_mask")
    )
    if response.shape != mask.shape:
        raise ValueError(
            f"response_mask must have the shape of attention_mask {shape_of(mask)}, got {shape_of(response)}"
        )
    prompt = mask & ~response.bool()
    chosen = response.bool() & mask if rule == "response_mean" else prompt
    if rule == "prompt_mean":  # leave out each row's first token, unless it is the whole prompt
        first = torch.nn.functional.one_hot(mask.long().argmax(dim=-1), mask.shape[1]).bool()
        chosen = chosen & ~(first & (chosen.sum(dim=-1, keepdim=True) > 1))
    counts = chosen.sum(dim=-1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        part = "response" if rule == "response_mean" else "prompt"
        raise ValueError(f"position {rule!r} needs {part} tokens, but rows {rows[:10]} have none")
    if rule == "prompt_last":
        return last_token_index(prompt)
    return chosen.float() / counts.unsqueeze(-1).float()


def apply_selector(hidden: torch.Tensor, selector) -> torch.Tensor:
    """Apply a selector to ``hidden`` ``[batch, seq, hidden]`` on its own device.

    Returns ``[batch, seq, hidden]`` (``None``), ``[batch, hidden]`` (``int``, ``[batch]`` index or
    ``[batch, seq]`` weights) or ``[batch, k, hidden]`` (``slice``, ``[batch, k]`` index). Weighted sums are
    computed and returned in float32 (float64 for float64 activations); selections keep the dtype.
    """
    check_selector(selector)  # an int or a slice passes (not a bool); a tensor's values are read on the host
    return _apply_checked(hidden, selector)


def _apply_checked(hidden: torch.Tensor, selector) -> torch.Tensor:
    """``apply_selector`` of a selector that ``check_selector`` has passed, without checking it again: the
    capture checks its positions once, when they are set, not in every hook call."""
    if selector is None:
        return hidden
    if hidden.ndim != 3:
        raise ValueError(f"positions need activations of shape [batch, seq, hidden], got {shape_of(hidden)}")
    if not isinstance(selector, torch.Tensor):
        return hidden[:, selector]
    batch, seq, width = hidden.shape
    if selector.is_floating_point():
        if selector.shape != (batch, seq):
            raise ValueError(
                f"position weights must have shape [batch, seq]=[{batch}, {seq}], got {shape_of(selector)}"
            )
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # a mean in bf16 is off by ~1e-3
        return torch.einsum("bs,bsh->bh", to_device(selector, hidden.device).to(dtype), hidden.to(dtype))
    if selector.ndim not in (1, 2) or selector.shape[0] != batch:
        raise ValueError(
            f"position index must have shape [batch]=[{batch}] or [batch, k], got {shape_of(selector)}"
        )
    on_host = selector.device.type == "cpu"
    if on_host and hidden.device.type != "cpu" and selector.numel() and int(selector.max()) >= seq:
        # read on the host for free; on the GPU it would be a device-side assert that ends the process
        raise ValueError(past_the_end(int(selector.max()), seq))
    index = to_device(selector, hidden.device).view(batch, -1, 1).expand(-1, -1, width)
    picked = hidden.gather(1, index)  # [batch, k, hidden]
    return picked.squeeze(1) if selector.ndim == 1 else picked


def check_selector(selector) -> None:
    """Raise for what cannot be a selector, before any forward pass (shapes are checked against each pass)."""
    if selector is None or isinstance(selector, slice) or type(selector) is int:
        return
    if not isinstance(selector, torch.Tensor):
        hint = "; give a tensor, e.g. torch.tensor(positions)" if isinstance(selector, (list, tuple)) else ""
        raise TypeError(
            f"positions must be None, an int, a slice or a tensor, got {type(selector).__name__}{hint}"
        )
    if selector.dtype == torch.bool:
        raise TypeError(
            "positions cannot be a bool mask; give weights (mask.float() / mask.sum(-1, keepdim=True) for a "
            "mean, or select_positions), or indices (last_token_index(mask))"
        )
    if selector.is_complex() or not (
        selector.is_floating_point() or selector.dtype in (torch.int64, torch.int32)
    ):
        raise TypeError(
            f"positions must be int64 or int32 indices or float weights, got dtype {selector.dtype}"
        )
    if selector.is_floating_point() and selector.ndim != 2:
        raise ValueError(f"position weights must have shape [batch, seq], got {shape_of(selector)}")
    if selector.is_floating_point() and selector.device.type == "cpu" and not all_finite(selector):
        raise ValueError("position weights contain NaN or inf")
    if not selector.is_floating_point() and selector.ndim not in (1, 2):
        raise ValueError(f"position index must have shape [batch] or [batch, k], got {shape_of(selector)}")
    if not selector.is_floating_point() and selector.device.type == "cpu" and selector.numel():
        # read here, on the host, for free; on a GPU a bad index is a device-side assert that ends the process
        low, high = selector.aminmax()
        if low < 0:
            raise ValueError(
                f"position indices count from 0 (got {int(low)}): negative ones are not counted from the "
                "end; use the int -1 for the last position, or last_token_index(attention_mask)"
            )
        if selector.ndim == 2 and selector.shape[1] > 2 and high <= 1:
            raise ValueError(
                f"this [batch, k] index of 0s and 1s (shape {shape_of(selector)}) looks like an attention "
                "mask, which would pick positions 0 and 1 over and over; give weights (mask.float() / "
                "mask.sum(-1, keepdim=True) for a mean, or select_positions), or indices "
                "(last_token_index(mask))"
            )


def past_the_end(index: int, length: int) -> str:
    """The message for an index ``>= length``, found on the host (on a GPU, ``gather`` would assert)."""
    return f"position index {index} is past the end of a pass of {length} positions"


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (a selector, position indices) on ``device``, without making the host wait for a GPU.

    PyTorch copies ordinary host memory to a GPU blocking, after the work queued on the GPU's stream, which
    inside a hook would stall the forward pass; ``x`` goes through pinned memory with an asynchronous copy
    instead.
    """
    device = torch.device(device)
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _check_mask(mask: object, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [batch, seq], got {type(mask).__name__}")
    if mask.ndim != 2 or mask.shape[1] == 0:
        raise ValueError(f"{name} must have shape [batch, seq] with seq >= 1, got {shape_of(mask)}")
    return mask
