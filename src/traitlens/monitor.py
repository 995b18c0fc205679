"""Per-token monitoring: the projection of every token's activation onto a trait vector.

``token_projections`` scores a given text; ``generate_with_projections`` scores a prompt and each new
token as it is produced (``on_token`` is called once per token, live). ``token_heatmap_html`` draws the
result as a self-contained HTML fragment. Projections are onto the unit vector, read at the output of the
vector's module, in float32.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

import torch

from traitlens._validation import check_choice, warn_if_training
from traitlens.capture import ActivationCapture, output_tensor
from traitlens.compute import projection
from traitlens.dataset import Example, encode_examples
from traitlens.hooks import HookManager, input_device
from traitlens.models import cache_keyword, cache_length, transformers_model_path
from traitlens.pipeline import _capture_pass, _ran_twice
from traitlens.vector import TraitVector


@dataclass
class TokenScores:
    """Tokens and their projections. ``scores`` is ``[seq]`` float32; ``response`` marks response (or
    generated) tokens; ``center`` is the score that counts as neutral (the vector's decision threshold
    when it has one, else 0)."""

    tokens: list[str]
    scores: torch.Tensor
    response: torch.Tensor
    center: float = 0.0

    @property
    def counted(self) -> torch.Tensor:
        """``[seq]`` bool: the tokens that means and the heatmap scale count, all but the first when there are
        others (its activation is an outlier of hundreds or thousands in most models)."""
        counted = torch.ones_like(self.response)
        if len(counted) > 1:
            counted[0] = False
        return counted

    def mean(self, part: str = "all") -> float:
        """Mean score over the ``counted`` tokens: ``"all"`` of them, the ``"prompt"``'s or the
        ``"response"``'s (``nan`` where there are none)."""
        check_choice(part, "part", ("all", "prompt", "response"))
        counted = self.counted
        mask = {"all": counted, "prompt": counted & ~self.response, "response": counted & self.response}[part]
        return float(self.scores[mask].mean()) if bool(mask.any()) else float("nan")

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "scores": [round(float(s), 5) for s in self.scores],
            "response": self.response.tolist(),
            "center": self.center,
        }


def _center(vector: TraitVector) -> float:
    return float(vector.method_params.get("threshold", 0.0))  # a number: TraitVector checks it


class _TokenText:
    """The text each token adds, fed one token id at a time. A character split over several byte tokens
    ("Ü" is two in SmolLM2's vocabulary, an emoji up to four) comes whole with the token that completes it;
    the tokens before it add "" (decoded alone, each would be U+FFFD). Told by the decoded text, so a token
    that is itself U+FFFD shows with the token after it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def __call__(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:  # a UTF-8 character has at most 4 bytes
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """What the pending bytes decode to (U+FFFD for an unfinished character), for the last token of a
        text that ends inside a character; empties them."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    text = _TokenText(tokenizer)
    strings = [text(i) for i in ids]
    if text.pending:  # the text ends inside a character: show what its bytes decode to on the last token
        strings[-1] = text.flush()
    return strings


def _check_text(text: object, name: str) -> None:
    """The argument's own name in the message (``encode_examples`` would say ``examples[0]``)."""
    if not isinstance(text, (str, Example)):
        raise TypeError(f"{name} must be a str or an Example, got {type(text).__name__}")
    if text == "":
        raise ValueError(f"{name} is an empty string: there is no token to score")


def _module_path(vector: TraitVector, model: torch.nn.Module) -> str:
    """The path of ``vector``'s module in ``model`` (under a PEFT wrapper's model), checked."""
    if not isinstance(vector, TraitVector):
        raise TypeError(
            f"vector must be a TraitVector (it names the module to read), got {type(vector).__name__}; load "
            "one with load_vector, or make one with TraitVector(tensor, model=..., module=..., position=..., "
            "method=...)"
        )
    return vector.check_model(model)


def token_projections(
    model: torch.nn.Module, tokenizer, vector: TraitVector, text: str | Example, *, chat: bool | None = None
) -> TokenScores:
    """Projection of every token of ``text`` (a plain string or a prompt-style ``Example``) onto
    ``vector`` at ``vector.module``."""
    _check_text(text, "text")
    warn_if_training(model, "the scores")
    path = _module_path(vector, model)
    enc = encode_examples(tokenizer, [text], chat=chat)
    capture = ActivationCapture(dtype=torch.float32)
    hidden = _capture_pass(model, [path], [0], capture, enc.model_inputs())[0, 0]  # [seq, hidden]
    scores = projection(hidden, vector.vector.float())
    return TokenScores(
        tokens=_token_strings(tokenizer, enc.input_ids[0].tolist()),
        scores=scores,
        response=enc.response_mask[0].bool(),
        center=_center(vector),
    )


def generate_with_projections(
    model: torch.nn.Module,
    tokenizer,
    vector: TraitVector,
    prompt: str | Example,
    *,
    max_new_tokens: int = 40,
    on_token: Callable[[str, float], None] | None = None,
    chat: bool | None = None,
    **generate_kwargs,
) -> TokenScores:
    """Generate from ``prompt`` (greedy unless ``generate_kwargs`` say otherwise: ``do_sample=True``, or a
    ``generation_config``) and score every prompt and generated token; ``on_token(token, score)`` is called
    for each as soon as its activation exists. ``max_new_tokens`` is this function's, whatever a
    ``generation_config`` or ``max_length`` says.

    A prompt-style ``Example`` is rendered with the chat template and the generation prompt, so the model
    answers as the assistant. It scores one sequence, fed token by token with the KV cache, so it refuses
    ``use_cache=False`` as a keyword (it passes ``use_cache=True`` over any config's), and, as keywords or in
    the generation config: ``num_beams`` or ``num_return_sequences`` other than 1, assisted, prompt-lookup,
    early-exit or multi-token-prediction decoding (they feed draft tokens that may be rejected), a static
    cache (sized to the generation, with no slot for the last token's feed), and a cache that already holds
    positions (the prompt would be fed only in part). ``token_projections`` scores any finished text.
    """
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(key: str, default=None):
        return generate_kwargs[key] if key in generate_kwargs else getattr(config, key, default)

    refused = [
        f"{key}={type(value).__name__ if key == 'assistant_model' else repr(value)}"
        for key, value, fine in (
            # use_cache=True is passed to generate, over any config's (MPT's own says False)
            ("use_cache", generate_kwargs.get("use_cache", True), lambda v: v is not False),
            ("num_beams", setting("num_beams", 1), lambda v: v in (None, 1)),
            ("num_return_sequences", setting("num_return_sequences", 1), lambda v: v in (None, 1)),
            ("prompt_lookup_num_tokens", setting("prompt_lookup_num_tokens"), lambda v: v is None),
            ("assistant_model", generate_kwargs.get("assistant_model"), lambda v: v is None),
            ("assistant_early_exit", setting("assistant_early_exit"), lambda v: v is None),  # drafts too
            ("use_mtp", setting("use_mtp"), lambda v: not v),
            ("cache_implementation", setting("cache_implementation"), lambda v: "static" not in str(v)),
        )
        if not fine(value)
    ]
    for key in ("cache", "past_key_values"):  # generate would feed the prompt's uncached part alone
        cache, held = generate_kwargs.get(key), cache_length(generate_kwargs.get(key))
        if held or "Static" in type(cache).__name__:
            refused.append(f"{key}={type(cache).__name__}" + (f" (holding {held} positions)" if held else ""))
    if refused:
        raise ValueError(
            "generate_with_projections scores one sequence fed token by token with the KV cache, so it does "
            f"not take {', '.join(refused)}; generate the text yourself and score it with token_projections"
        )
    body = transformers_model_path(model)
    inner = model.get_submodule(body)  # what generate calls (the model inside a PEFT model)
    keyword = cache_keyword(inner)
    if keyword is None:
        raise ValueError(
            f"generate_with_projections feeds tokens one by one onto a key/value cache, and "
            f"{type(model).__name__} takes none by the names it knows (cache, past_key_values); generate the "
            "text yourself and score it with token_projections"
        )
    _check_text(prompt, "prompt")
    warn_if_training(model, "the scores and the generated text")
    path = _module_path(vector, model)
    enc = encode_examples(tokenizer, [prompt], chat=chat)
    device = input_device(model)
    unit = vector.vector.float().to(device)
    unit = unit / unit.norm().clamp_min(1e-12)
    fed: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    live_text = _TokenText(tokenizer)
    last_feed = False  # set for the pass that feeds the last token

    # the last position generate gave its latest pass, where it gave one (copied before the pass: XGLM adds
    # its offset to position_ids in place)
    where: dict[str, torch.Tensor] = {}

    def read_ids(module, args, kwargs):
        fed.append(kwargs["input_ids"][0])
        where.clear()
        where.update(
            (k, kwargs[k][..., -1:].clone())
            for k in ("position_ids", "cache_position")
            if kwargs.get(k) is not None
        )

    def score(module, args, output):
        if len(scores) == len(fed):  # a second call in one forward pass
            raise ValueError(_ran_twice([path]))
        hidden = output_tensor(output)[0]  # [seq, hidden], on this layer's device
        step = hidden.float() @ unit.to(hidden.device)  # [positions]
        scores.append(step)
        if on_token is not None:
            ids, values = fed[-1].tolist(), step.tolist()
            texts = [live_text(token_id) for token_id in ids[-len(values) :]]
            if last_feed and live_text.pending:  # it ends inside a character: as `_token_strings` shows it
                texts[-1] = live_text.flush()
            for text, value in zip(texts, values, strict=True):
                on_token(text, value)

    inputs = {k: v.to(device) for k, v in enc.model_inputs().items()}
    settings = {
        "use_cache": True,
        "pad_token_id": tokenizer.pad_token_id,
        **generate_kwargs,
        "return_dict_in_generate": True,
    }
    if "do_sample" not in generate_kwargs and "generation_config" not in generate_kwargs:
        settings["do_sample"] = False  # greedy, whatever the model's own generation config says
    if setting("stop_strings"):  # generate matches them on text, with the tokenizer
        settings["tokenizer"] = tokenizer
    with torch.no_grad(), HookManager(model) as hooks:
        hooks.add_forward_pre_hook(body, read_ids, with_kwargs=True)
        hooks.add_forward_hook(path, score)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **settings)
        sequence = out.sequences[0]
        if sequence.shape[0] > enc.input_ids.shape[1]:  # the last sampled token was never fed: feed it
            last_feed = True
            # as a step of generate: its cache, a mask over the whole sequence, and the positions generate
            # gave its last pass, one further on (models count positions their own way: RoBERTa's start
            # after the pad index; transformers 4's hybrid models need cache_position)
            length = sequence.shape[0]
            step = {keyword: out["cache"] if "cache" in out else out["past_key_values"], "use_cache": True}
            step["attention_mask"] = torch.ones(1, length, dtype=torch.long, device=sequence.device)
            step.update((k, v + 1) for k, v in where.items())
            inner(input_ids=sequence[-1:].unsqueeze(0), **step)
    values = torch.cat(scores).cpu()
    prompt_len = enc.input_ids.shape[1]
    response = torch.zeros(sequence.shape[0], dtype=torch.bool)
    response[prompt_len:] = True
    return TokenScores(
        tokens=_token_strings(tokenizer, sequence.tolist()),
        scores=values[: sequence.shape[0]],
        response=response,
        center=_center(vector),
    )


def heatmap_scale(*scores: TokenScores) -> float:
    """The deviation from the center that ``token_heatmap_html`` colours fully by default: the 90th
    percentile of the absolute deviations of the ``counted`` tokens, so that the first token does not wash
    out the rest of a short text. Give several texts to draw them on one scale."""
    deviations = [(s.scores - s.center)[s.counted] for s in scores]
    return float(torch.cat(deviations).abs().quantile(0.9).clamp_min(1e-6))


def token_heatmap_html(scores: TokenScores, title: str | None = None, scale: float | None = None) -> str:
    """A self-contained HTML fragment: each token on a background from blue (below the center) through
    white to red (above), with its score in a tooltip. ``scale`` is the deviation that gets full colour
    (default: ``heatmap_scale(scores)``; give one scale to heatmaps that are compared). A token left out of
    the means and the scale (the first, see ``TokenScores.counted``) is drawn grey: coloured, its outlier
    score would read as the strongest word of the text."""
    deviation = scores.scores - scores.center
    scale = scale or heatmap_scale(scores)
    spans = []
    for token, dev, value, is_response, counted in zip(
        scores.tokens,
        deviation.tolist(),
        scores.scores.tolist(),
        scores.response.tolist(),
        scores.counted.tolist(),
        strict=True,
    ):
        alpha = min(abs(dev) / scale, 1.0)
        rgb = "214,39,40" if dev > 0 else "31,119,180"
        background = f"rgba({rgb},{alpha:.2f})" if counted else "rgba(128,128,128,0.25)"
        border = "border-bottom:2px solid #555;" if is_response else ""
        # a token that adds only part of a character (its text comes with the next token) gets a dot
        text = html.escape(token).replace("\n", "\u21b5<br>") if token else "\u00b7"
        spans.append(
            f'<span title="{value:.3f}" style="background:{background};{border}'
            f'white-space:pre-wrap;font-family:monospace">{text}</span>'
        )
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    notes = [
        f"blue: below {scores.center:.2f} (neutral: the vector's threshold, or 0), red: above; full colour at "
        f"{scores.center:.2f} &plusmn;{scale:.2f}"
    ]
    if not bool(scores.counted.all()):
        notes.append(
            "grey: the first token, left out of the colour scale and the means (its score is an outlier)"
        )
    if bool(scores.response.any()):
        notes.append("underlined: response tokens")
    notes.append("hover for values")
    legend = f'<div style="font-size:12px;color:#555">{"; ".join(notes)}</div>'
    return f'<div class="traitlens-heatmap">{head}<div style="line-height:1.8">{"".join(spans)}</div>{legend}</div>'
