"""Steered generations side by side, and the dose-response experiment: how far a coefficient moves the
trait, and what it costs in coherence.

- ``compare_generations``: greedy generations from each prompt, unsteered and under each coefficient;
- ``dose_response``: for each coefficient, the mean projection of the generated tokens onto the vector and
  the perplexity of the generated text, both measured with the *unsteered* model;
- ``plot_dose_response``: both curves in one PNG.

Each returns plain rows (dicts) that print as a table. Generation is greedy with a fixed
``max_new_tokens``, batched with left padding; a response ends at its first end-of-sequence token, which
counts as one of its tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from traitlens._plot import figure
from traitlens._progress import progress_bar
from traitlens._validation import real_number, warn_if_training
from traitlens.capture import output_tensor
from traitlens.dataset import Example, encode_examples, pad_rows
from traitlens.hooks import HookManager, input_device
from traitlens.steering import _targets, steer


def compare_generations(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    vector,
    coeffs: Sequence[float],
    *,
    layer: int | None = None,
    module: str | None = None,
    op: str = "add",
    positions="all",
    norm=None,
    max_new_tokens: int = 40,
    chat: bool | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Baseline and steered generations for each prompt.

    ``vector``, ``layer``, ``module``, ``op``, ``positions`` and ``norm`` are those of ``steer``; ``chat``:
    render the prompts with the tokenizer's chat template (``None``: when it has one; ``False``: continue
    the raw text); ``progress``: a bar over the settings (on stderr; needs tqdm).

    Returns one row per prompt and setting, prompts in order, the baseline first:
    ``{"prompt": str, "coeff": float | None (baseline), "text": str}``. ``op="ablate"`` takes no coefficient,
    so it gives one steered row per prompt, with ``coeff`` 0.0, whatever ``coeffs`` holds.
    """
    prompts = _check_prompts(prompts)
    coeffs = [0.0] if op == "ablate" else _check_coeffs(coeffs)
    warn_if_training(model, "the generations")
    settings: list[float | None] = [None, *coeffs]
    texts: dict[float | None, list[str]] = {}
    for coeff in progress_bar(settings, "generations" if progress else False, unit="setting"):
        if coeff is None:
            generated = _generate(model, tokenizer, prompts, max_new_tokens, chat, batch_size)
        else:
            with steer(
                model, vector, layer=layer, module=module, coeff=coeff, op=op, positions=positions, norm=norm
            ):
                generated = _generate(model, tokenizer, prompts, max_new_tokens, chat, batch_size)
        texts[coeff] = [tokenizer.decode(response, skip_special_tokens=True) for _, response in generated]
    return [
        {"prompt": prompt, "coeff": coeff, "text": texts[coeff][i]}
        for i, prompt in enumerate(prompts)
        for coeff in settings
    ]


def dose_response(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    vector,
    coeffs: Sequence[float],
    *,
    layer: int | None = None,
    module: str | None = None,
    positions="all",
    norm=None,
    max_new_tokens: int = 32,
    chat: bool | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Trait expression and coherence of steered generations, one row per coefficient.

    For each coefficient the model generates from every prompt while steered (``steer(..., coeff=c)``;
    include 0 for the baseline). The generated text is then scored by one unsteered forward pass over
    prompt + response:

    - ``projection``: the mean, over all generated tokens of all prompts, of the residual at the vector's
      module (the steered one) projected on the unit vector;
    - ``perplexity``: ``exp`` of the mean negative log-likelihood of the generated tokens under the
      unsteered model (low: text the model itself finds likely; it rises when steering breaks coherence).

    Returns ``[{"coeff", "projection", "perplexity", "n_tokens", "example"}]`` in the order of ``coeffs``,
    where ``example`` is the text generated from the first prompt. ``progress``: a bar over the
    coefficients (on stderr; needs tqdm).
    """
    prompts = _check_prompts(prompts)
    coeffs = _check_coeffs(coeffs)
    warn_if_training(model, "the generations and their scores")
    targets = _targets(model, vector, layer, module)
    if len(targets) != 1:
        raise ValueError("dose_response measures at one module: give one vector and one layer or module")
    path, (direction, _) = next(iter(targets.items()))
    unit = direction.detach().to(torch.float32)
    length = unit.norm()
    if float(length) == 0.0:
        raise ValueError("dose_response projects on the vector's direction: it needs a non-zero vector")
    unit = unit / length
    rows = []
    for coeff in progress_bar(coeffs, "dose-response" if progress else False, unit="coeff"):
        with steer(model, direction, module=path, coeff=coeff, positions=positions, norm=norm):
            generated = _generate(model, tokenizer, prompts, max_new_tokens, chat, batch_size)
        projection, nll, count = _score(model, tokenizer, generated, path, unit, batch_size)
        rows.append(
            {
                "coeff": coeff,
                "projection": projection / count,
                "perplexity": math.exp(nll / count),
                "n_tokens": count,
                "example": tokenizer.decode(generated[0][1], skip_special_tokens=True),
            }
        )
    return rows


def plot_dose_response(
    rows: Sequence[dict], path: str | os.PathLike, *, title: str | None = None, xlabel: str = "coefficient"
) -> Path:
    """Write the dose-response curves of ``dose_response`` rows to a PNG at ``path`` and return the path.

    Left: mean trait projection against the coefficient; right: perplexity (log scale); both measured with
    the unsteered model. ``xlabel`` says what the coefficient is in (e.g. the norm it is relative to).
    """
    if not rows:
        raise ValueError("rows is empty; pass the result of dose_response(...)")
    from matplotlib.ticker import LogFormatter

    rows = sorted(rows, key=lambda row: row["coeff"])
    coeffs = [row["coeff"] for row in rows]
    fig = figure((9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(coeffs, [row["projection"] for row in rows], marker="o")
    left.set(xlabel=xlabel, ylabel="mean projection (unsteered model)", title="trait expression")
    right.plot(coeffs, [row["perplexity"] for row in rows], marker="o", color="tab:red")
    right.set(xlabel=xlabel, ylabel="perplexity (unsteered model)", title="coherence", yscale="log")
    # plain numbers (2.2, not 2.2x10^0); minor ticks labelled only while the range spans few decades
    right.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    right.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    for axes in (left, right):
        axes.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        axes.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


# --------------------------------------------------------------------------------------------------------


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    return prompts


def _check_coeffs(coeffs) -> list[float]:
    if real_number(coeffs) is not None:
        coeffs = [coeffs]
    coeffs = list(coeffs)
    values = [real_number(c) for c in coeffs]
    if not values or None in values:
        raise ValueError(f"coeffs must be a non-empty list of finite numbers, got {coeffs!r}")
    return values


@torch.no_grad()
def _generate(
    model, tokenizer, prompts, max_new_tokens, chat, batch_size
) -> list[tuple[list[int], list[int]]]:
    """Greedy generation: ``(prompt ids, response ids)`` per prompt, pads removed, cut after the first EOS."""
    from transformers import GenerationConfig

    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids) or None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0),
    )  # fmt: skip
    items = prompts if chat is False else [Example(prompt=p) for p in prompts]
    out: list[tuple[list[int], list[int]]] = []
    device = input_device(model)
    for start in range(0, len(items), batch_size):
        batch = encode_examples(tokenizer, items[start : start + batch_size], chat=chat, padding_side="left")
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=config).cpu()
        width = ids.shape[1]
        for row in range(ids.shape[0]):
            prompt = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            response = []
            for token in sequences[row, width:].tolist():
                response.append(token)
                if token in eos_ids:
                    break
            out.append((prompt, response))
    return out


@torch.no_grad()
def _score(
    model, tokenizer, generated, path: str, unit: torch.Tensor, batch_size: int
) -> tuple[float, float, int]:
    """Sum of projections and of negative log-likelihoods of the response tokens, and their count."""
    total_projection, total_nll, count = 0.0, 0.0, 0
    seen: list[torch.Tensor] = []
    device = input_device(model)
    with HookManager(model) as hooks:
        hooks.add_forward_hook(path, lambda m, a, out: seen.append(output_tensor(out)))
        for start in range(0, len(generated), batch_size):
            rows = [(p, r) for p, r in generated[start : start + batch_size] if r]
            if not rows:
                continue
            enc = pad_rows(tokenizer, rows).to(device)  # scored where the model ran
            ids, response = enc.input_ids, enc.response_mask
            seen.clear()
            logits = model(**enc.model_inputs()).logits
            hidden = seen[0].detach().float()  # [batch, seq, hidden]
            total_projection += float((hidden[response] @ unit.to(hidden.device)).double().sum())
            # Token t is predicted from position t - 1.
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token_lp = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [batch, seq - 1]
            total_nll -= float(token_lp[response[:, 1:]].double().sum())
            count += int(response.sum())
    if count == 0:
        raise ValueError("nothing was generated; raise max_new_tokens")
    return total_projection, total_nll, count
