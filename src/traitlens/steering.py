"""Steering and ablation: interventions on the residual stream as hooks, and a ``steer`` context manager.

Three operations, each a forward hook for ``HookManager.add_forward_hook`` that returns a new output and
never edits the input, the vector or the model:

- ``add_vector(v, coeff)``: activation addition, ``h + coeff * v``;
- ``ablate_direction(v)``: directional ablation, ``h - (h . u) u`` with ``u = v / |v|``;
- ``clamp_direction(v, value)``: set the component along ``u`` to ``value``, ``h + (value - h . u) u``.

The vector is cast to each hidden state's device and dtype on use (bf16 models and models split over
devices with ``device_map`` work). Addition runs in the hidden state's dtype, so that in float32 the
steered output is exactly ``h + coeff * v``; the projections of ablation and clamping run in float32 (in
float64 on a float64 model). On a float16 model, a vector or clamp value past float16's range (65504) is
refused: every logit would be NaN.

**Where in the sequence.** ``positions`` is ``"all"``, ``"prompt"``, ``"generated"``, or a sequence of
token indices counted from each row's first real token (so that index 0 is the same token in every row,
whatever its left padding). Pads are never steered. A module's hook cannot know these things by itself:
during ``generate`` with the KV cache a layer sees the whole prompt once and then one position per step,
and decoder layers get a 4-D causal mask in which pads are no longer marked. So a ``SequenceTracker``
puts a forward pre-hook (``with_kwargs=True``) on the outermost transformers model in ``model``: the model
itself, or the one inside a wrapper such as a PEFT model, whose ``generate`` calls the model inside
(every forward pass and every ``generate`` step goes through it; not always through
``model.base_model``: OPT's and the BART family's causal LMs call their decoder directly), and records,
for that pass:

- the 2-D ``attention_mask`` (which columns are real tokens; during ``generate`` it grows one column per
  step), or all-real when none is given;
- how many positions the cache already holds, so that the positions of this pass are
  ``past .. past + seq - 1``: the mask's width less ``seq`` (the mask covers the cached positions too;
  transformers 5 no longer passes ``cache_position``), else ``cache.get_seq_length()``, else, for a cache
  that cannot say (Mamba's), what went into the same cache object in the passes seen; when nothing tells
  (Reformer's cache, made inside the model, without a mask), positions other than ``"all"`` raise;
- where the prompt ends. A pass with an empty cache starts a sequence: all of it is prompt. A pass of one
  position on the cache the previous pass filled is a generated token; a pass of several positions there
  is more prompt (a chunk of a chunked prefill, or a chat's next turn fed onto the cache of the last one;
  the last token generated before it counts as prompt too, as it first goes through the model there). A
  pass on a filled cache other than the previous pass's (``generate`` given the cache of a prefix made
  earlier) starts a sequence whose prompt ends with the pass.
  ``generate(use_cache=False)`` re-feeds the whole sequence at each step with ``use_cache=False``, one
  token more each time: a pass with ``use_cache=False`` whose input is the previous pass's input plus one
  token is recognised as such a step, so "generated" means the same with and without the cache (and for
  models that take no cache, such as GPT-1, whose ``generate`` always re-feeds). Calls of your own, such
  as scoring growing prefixes, therefore count as new sequences unless they pass ``use_cache=False``.
  Assisted and prompt-lookup decoding check several drafted tokens in one pass on the cache, asking for
  the logits of the last ``logits_to_keep``: those drafted ``logits_to_keep - 1`` are generated, so both
  are steered as plain ``generate`` (checked: the same tokens). A pass with no cache object is never
  read that way (scoring code passes ``logits_to_keep`` too).

The interventions read that record. A forward hook on the same module clears it after each pass, so an
intervention used outside a forward pass of the model (a layer called by hand) steers every position
for ``positions="all"`` and raises otherwise. ``steer`` sets all of this up for you.

**Strength.** ``coeff`` is absolute by default: the vector is added as given, times ``coeff``. Unit
vectors make absolute coefficients depend on the layer, because the residual norm grows with depth; pass
``norm=residual_norms(...)[layer]`` (or the whole dict) and ``coeff`` becomes relative: the vector is
scaled to unit length and then to ``coeff`` times that typical norm.

**Trainable vectors.** A vector that requires grad is used as given (not copied), so a loss through the
steered model reaches it: optimise it with the absolute ``coeff`` (``norm=None``).

**Reading the steered activations.** Hooks on a module run in the order they were added: a capture added
before ``steer`` on the steered module sees its unsteered output, one added after (or on ``Steering.hooks``)
the steered one; later modules see the steering either way. Do not read it with ``output_hidden_states``:
transformers 5 collects hidden states with hooks of its own, added at the first call that asks for them,
so whether they include the steering depends on which came first.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from traitlens._validation import (
    check_choice,
    check_outputs,
    check_real,
    check_vector,
    real_number,
    shape_of,
    short_list,
)
from traitlens.capture import output_tensor
from traitlens.compute import _unit
from traitlens.dataset import Example, encode_examples
from traitlens.hooks import HookManager, decoder_layer_paths, input_device, residual_width, resolve_module
from traitlens.models import cache_keyword, cache_length, locate_module, model_dtype, transformers_model_path
from traitlens.positions import to_device

POSITIONS = ("all", "prompt", "generated")
OPERATIONS = ("add", "ablate", "clamp")


# --------------------------------------------------------------------------------------------------------
# Where each forward pass is in the sequence


@dataclass
class _Step:
    """What one forward pass of the model covers."""

    real: torch.Tensor  # [batch, seq] bool, False on pads
    index: torch.Tensor  # [batch, seq] long, position among the row's real tokens (0 = first real token)
    column: torch.Tensor  # [seq] long, absolute column in the (padded) sequence
    prompt_len: int  # columns before this are the prompt, from it on generated


class SequenceTracker:
    """Records, for each forward pass of a model, which positions it covers and which of them are pads.

    Attach it to a ``HookManager`` before the interventions that use it::

        tracker = SequenceTracker()
        with HookManager(model) as hooks:
            tracker.attach(hooks)
            hooks.add_forward_hook("model.layers.12", add_vector(v, 4.0, positions="generated", tracker=tracker))
            model.generate(**inputs, max_new_tokens=20)
    """

    def __init__(self):
        self.step: _Step | None = None
        self._prompt_len: int | None = None
        # The input of the previous pass when it had an empty cache (ids [batch, seq] or embeds
        # [batch, seq, hidden]), to recognise the next step of generate(use_cache=False); None otherwise.
        self._last_input: torch.Tensor | None = None
        # The previous pass's cache (a weak reference) and how many positions it held after that pass, for
        # caches that cannot say (Mamba's) when generate passes no attention_mask either.
        self._last_cache: weakref.ref | None = None
        self._filled = 0
        self._cacheless = False  # the model takes no cache: generate re-feeds the whole sequence
        self._lost: str | None = None  # why the current pass's place in the sequence is unknown
        # forward passes recorded, and those that held generated positions (for Steering's warning)
        self.passes = 0
        self.generated_passes = 0

    def attach(self, hooks: HookManager) -> None:
        """Register the recording hooks on the outermost transformers model in ``hooks.model`` (the model
        itself when it is one, or has none)."""
        if not isinstance(hooks, HookManager):
            raise TypeError(f"hooks must be a traitlens HookManager, got {type(hooks).__name__}")
        path = transformers_model_path(hooks.model)
        self._cacheless = cache_keyword(hooks.model.get_submodule(path)) is None
        hooks.add_forward_pre_hook(path, self._before, name="steering tracker", with_kwargs=True)
        hooks.add_forward_hook(path, self._after, name="steering tracker (clear)")

    def reset(self) -> None:
        """Forget the recorded prompt (the next pass starts a new sequence)."""
        self.step = None
        self._prompt_len = None
        self._last_input = None
        self._last_cache = None
        self._filled = 0
        self._lost = None

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        given = ids if ids is not None else embeds
        if given is None:
            self.step = None
            return
        batch, seq = given.shape[:2]
        device = given.device
        # cache= or past_key_values=, or a name of the model's own (Mamba's cache_params in transformers 4,
        # Reformer's past_buckets_states)
        cache = next((value for key, value in kwargs.items() if _holds_cache(key, value)), None)
        mask = kwargs.get("attention_mask")
        if mask is not None and (
            not isinstance(mask, torch.Tensor)
            or mask.ndim != 2
            or mask.shape[0] != batch
            or mask.shape[1] < seq
        ):
            got = shape_of(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
            # generate with a static cache gives 4-D masks (or a dict of them, with sliding windows)
            four_d = isinstance(mask, Mapping) or (isinstance(mask, torch.Tensor) and mask.ndim == 4)
            raise ValueError(
                f"steering needs the 2-D attention_mask [batch, past + seq] to tell pads apart; got "
                f"{got} for inputs of shape {shape_of(given)}. "
                + (
                    "Such a mask comes from generate with a static cache (cache_implementation='static' or a "
                    "StaticCache) or from a caller that builds its own mask: use the default dynamic cache, or "
                    "pass the tokenizer's 2-D attention_mask"
                    if four_d
                    else "Pass the tokenizer's attention_mask"
                )
            )
        past = mask.shape[1] - seq if mask is not None else cache_length(cache)  # the mask covers past + seq
        # a cache other than the last pass's (generate fills one in place) holds another sequence's start; a
        # pass without a cache object before (some models make theirs in the prompt pass) says nothing
        new_cache = (
            _weak(cache) is not None and self._last_cache is not None and self._last_cache() is not cache
        )
        # assisted and prompt-lookup decoding check drafted tokens in one pass, asking for the logits of them
        # and one more: the last logits_to_keep - 1 positions are generated, not prompt
        keep = kwargs.get("logits_to_keep")  # (generate passes a cache object; a scoring pass may not)
        drafts = keep - 1 if cache is not None and type(keep) is int and keep > 1 else 0
        if past is None and cache is not None:  # the same cache as the last pass's holds what that left
            same = self._last_cache is not None and self._last_cache() is cache
            if not same or self._filled is None:  # made inside the model (Reformer's): its length is unknown
                self.step, self._last_cache, self._filled = None, _weak(cache), None
                self._lost = (
                    f"this forward pass of {shape_of(given)} came with a {type(cache).__name__} that does not "
                    "say how many positions it holds, and without an attention_mask, so where it is in the "
                    "sequence is unknown; pass the attention_mask (generate does for most models)"
                )
                return
            past = self._filled
        elif past is None:
            past = 0
        self._last_cache, self._filled, self._lost = _weak(cache), past + seq, None
        if mask is None:
            real = torch.ones(batch, seq, dtype=torch.bool, device=device)
            index = (torch.arange(seq, device=device) + past).expand(batch, seq)
        else:
            mask = mask.to(device).bool()
            real = mask[:, -seq:]
            index = (mask.long().cumsum(dim=1) - 1)[:, -seq:]
        no_cache = kwargs.get("use_cache") is False or self._cacheless  # as generate(use_cache=False) feeds
        if past == 0:
            if not (no_cache and self._continues(given)):
                self._prompt_len = seq - drafts
        elif new_cache:  # e.g. generate given a cache of a shared prefix: this pass ends its prompt
            self._prompt_len = past + seq - drafts
        elif seq > 1 and not drafts:  # more prompt on a filled cache: a chunked prefill, a chat's next turn
            self._prompt_len = past + seq
        self._last_input = given.detach() if no_cache else None  # kept only to compare the next pass with
        if self._prompt_len is None:  # the cache was filled before the tracker came: this pass is prompt too
            self._prompt_len = past + seq
        column = torch.arange(past, past + seq, device=device)
        self.step = _Step(real=real, index=index, column=column, prompt_len=self._prompt_len)
        self.passes += 1
        self.generated_passes += past + seq > self._prompt_len

    def _continues(self, given: torch.Tensor) -> bool:
        """Is this pass (empty cache) the previous one plus one token, a step of generate(use_cache=False)?

        Only the shapes are read unless the width is exactly one more, so a new prompt costs no host sync.
        """
        last = self._last_input
        if last is None or given.ndim != last.ndim or given.shape[0] != last.shape[0]:
            return False
        if given.shape[1] != last.shape[1] + 1 or given.shape[2:] != last.shape[2:]:
            return False
        head = given[:, :-1].to(last.device)
        if head.ndim != 2:  # embeddings (generate's later steps feed ids): compare the rows in place
            return bool(torch.equal(head, last))
        # Beam search reorders and repeats rows between steps: each row must extend some previous row.
        return bool((head[:, None, :] == last[None, :, :]).all(dim=-1).any(dim=1).all())

    def _after(self, module, args, output) -> None:
        self.step, self._lost = None, None

    def select(self, positions, batch: int, seq: int, device: torch.device) -> torch.Tensor | None:
        """``[batch, seq]`` bool: which positions of the current pass to steer (``None``: all of them)."""
        step = self.step
        if step is None:
            if isinstance(positions, str) and positions == "all":
                return None
            if self._lost is not None:
                raise ValueError(f"positions={positions!r}: {self._lost}")
            raise ValueError(
                f"positions={positions!r} needs to know where the forward pass is in the sequence, but the "
                "steered module ran outside a forward pass of the model the tracker is attached to; call "
                "the model itself (or use positions='all')"
            )
        if step.real.shape != (batch, seq):
            raise ValueError(
                f"the steered module saw [batch, seq]=[{batch}, {seq}] positions, but the model's forward "
                f"pass has {list(step.real.shape)}; steer modules whose outputs are [batch, seq, hidden]"
            )
        chosen = step.real
        if positions == "prompt":
            chosen = chosen & (step.column < step.prompt_len)
        elif positions == "generated":
            chosen = chosen & (step.column >= step.prompt_len)
        elif not isinstance(positions, str):
            wanted = positions.to(step.index.device)
            chosen = chosen & torch.isin(step.index, wanted)
        return chosen.to(device, non_blocking=True)


def _holds_cache(key: str, value: object) -> bool:
    return (
        ("cache" in key or "past" in key)
        and value is not None
        and not isinstance(value, (torch.Tensor, bool))
    )


def _weak(cache: object) -> weakref.ref | None:
    try:
        return weakref.ref(cache) if cache is not None else None
    except TypeError:  # an object that takes no weak reference (a tuple of tensors)
        return None


# --------------------------------------------------------------------------------------------------------
# Interventions


class Intervention:
    """A forward hook ``(module, args, output) -> new output`` that steers ``[batch, seq, hidden]`` outputs.

    Made by ``add_vector``, ``ablate_direction`` and ``clamp_direction``; ``op``, ``vector`` (see the
    property), ``value`` (the coefficient or the clamp value) and ``positions`` are attributes. A new
    ``vector`` (set, or edited in place), ``value`` or ``positions`` applies from the next call; ``op`` is
    fixed.
    """

    def __init__(self, op: str, vector: object, value: float, positions, tracker: SequenceTracker | None):
        self.op = check_choice(op, "op", OPERATIONS)
        self.vector = vector
        self.value = real_number(value)
        if self.value is None:
            raise TypeError(f"coeff/value must be a finite number, got {value!r}")
        if tracker is not None and not isinstance(tracker, SequenceTracker):
            raise TypeError(f"tracker must be a SequenceTracker, got {type(tracker).__name__}")
        self.tracker = tracker
        self._index_on: dict[torch.device, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self.positions = positions

    @property
    def positions(self) -> str | torch.Tensor:
        """``"all"``, ``"prompt"``, ``"generated"``, or ``[n]`` int64 token indices (see the module docs);
        checked when set, as in the constructor."""
        return self._positions

    @positions.setter
    def positions(self, positions) -> None:
        checked = _check_positions(positions)
        if self.tracker is None and not (isinstance(checked, str) and checked == "all"):
            raise ValueError(
                f"positions={positions!r} needs a SequenceTracker attached to the same HookManager "
                "(tracker=...); steer() sets one up for you"
            )
        self._positions = checked

    @property
    def vector(self) -> torch.Tensor:
        """``[hidden]``: a copy of the vector given in float32 (float64 stays float64), scaled to unit length
        for ablate and clamp, or, when the vector given requires grad, that tensor itself, so that gradients
        reach it (trainable steering vectors; it is then scaled, and for ablate and clamp normalised, in
        float32 or wider in every call)."""
        return self._vector

    @vector.setter
    def vector(self, vector: object) -> None:
        vector = check_vector(vector, "vector")
        if self.op != "add" and not bool(vector.detach().any()):
            raise ValueError(f"{self.op} needs a non-zero vector, got one of norm 0")
        if not vector.requires_grad:
            with torch.inference_mode(False):  # a copy that passes outside inference mode can use
                vector = vector.detach().to(_wide(vector.dtype)).clone()
                if self.op != "add":
                    vector = _unit(vector)  # scaled: a norm past 1.8e19 was inf in float32
        self._vector = vector
        self._largest: float | None = None  # the largest magnitude, read when a float16 model needs it
        # scale * vector per (device, dtype, scale), made for this vector at this version (in-place edits)
        self._cast: dict[tuple[torch.device, torch.dtype, float], torch.Tensor] = {}
        self._cast_version = _version(vector)

    def __call__(self, module: torch.nn.Module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
            what = shape_of(hidden) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(
                f"steering needs a module whose output is [batch, seq, hidden], got {what} from "
                f"{type(module).__name__}; hook a decoder layer or another residual-stream module"
            )
        if hidden.shape[-1] != self.vector.shape[0]:
            raise ValueError(
                f"vector has hidden size {self.vector.shape[0]} but {type(module).__name__} outputs "
                f"{shape_of(hidden)}; use a vector made for this model and layer"
            )
        chosen = None
        if self.tracker is not None:
            positions, step = self.positions, self.tracker.step
            if isinstance(positions, torch.Tensor) and step is not None:
                positions = self._positions_on(step.index.device)
            chosen = self.tracker.select(positions, hidden.shape[0], hidden.shape[1], hidden.device)
        steered = self._apply(hidden)
        if chosen is not None:
            steered = torch.where(chosen.unsqueeze(-1), steered, hidden)
        if isinstance(output, tuple):  # a named tuple (Reformer's layers) stays one
            return (
                type(output)(steered, *output[1:]) if hasattr(output, "_fields") else (steered, *output[1:])
            )
        if isinstance(output, list):
            return [steered, *output[1:]]
        return steered

    def _apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.op == "add":
            return hidden + self._on(hidden.device, hidden.dtype, self.value)
        if self.op == "clamp" and hidden.dtype == torch.float16:
            _check_half(abs(self.value), "the clamp value")
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # projections in float32 (or float64)
        unit = self._on(hidden.device, dtype)  # [hidden]
        h = hidden.to(dtype)
        along = h @ unit  # [batch, seq]
        target = 0.0 if self.op == "ablate" else self.value
        return (h + (target - along).unsqueeze(-1) * unit).to(hidden.dtype)

    def _on(self, device: torch.device, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        """``scale * vector`` on ``device`` in ``dtype``, made once per (device, dtype, scale), or in every
        call for a vector that requires grad."""
        vector = self._vector
        if vector.requires_grad:  # float16 norms and products overflow: computed wider, the graph kept
            wide = vector.to(_wide(vector.dtype))
            unit = wide if self.op == "add" else _unit(wide)
            return (scale * unit).to(device=device, dtype=dtype)
        if _version(vector) != self._cast_version:  # edited in place since the casts were made
            self._cast, self._cast_version, self._largest = {}, _version(vector), None
        key = (device, dtype, scale)
        if key not in self._cast:
            if dtype == torch.float16:  # the one dtype a vector overflows (read once: a wait, after an edit)
                if self._largest is None:
                    self._largest = float(vector.abs().max())
                _check_half(abs(scale) * self._largest, "x the vector" if scale != 1.0 else "the vector")
            with torch.inference_mode(False):  # made under inference mode, it could not serve autograd later
                self._cast[key] = to_device(scale * self.vector, device).to(dtype)
        return self._cast[key]

    def _positions_on(self, device: torch.device) -> torch.Tensor:
        """The position indices on ``device``, copied once per device and setting (or in-place edit, seen by
        the tensor's version counter) of ``positions``: a copy from host memory in every hook call would make
        each call wait for the GPU."""
        positions = self.positions
        cached = self._index_on.get(device)
        if cached is None or cached[0] is not positions or cached[1] != _version(positions):
            with torch.inference_mode(False):
                cached = self._index_on[device] = (
                    positions,
                    _version(positions),
                    to_device(positions, device),
                )
        return cached[2]

    def __repr__(self) -> str:
        value = "" if self.op == "ablate" else f", {'coeff' if self.op == 'add' else 'value'}={self.value:g}"
        return (
            f"Intervention({self.op}, vector [{self.vector.shape[0]}] norm {float(self.vector.norm()):.4g}"
            f"{value}, positions={self.positions!r})"
        )


def _check_half(size: float, what: str) -> None:
    """Refuse what a float16 model would turn into inf (and then every logit into NaN)."""
    if size > torch.finfo(torch.float16).max:
        raise ValueError(
            f"{size:g} ({what}) exceeds float16's range (largest 65504): lower the coefficient, or run the "
            "model in bfloat16 or float32"
        )


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64: the precision steering computes a vector in."""
    return torch.promote_types(dtype, torch.float32)


def _version(tensor: torch.Tensor) -> int:
    """The in-place edit counter of ``tensor``; an inference tensor has none (and cannot be edited outside
    inference mode), so it counts as never edited."""
    return -1 if tensor.is_inference() else tensor._version


def add_vector(
    vector: torch.Tensor, coeff: float = 1.0, *, positions="all", tracker: SequenceTracker | None = None
) -> Intervention:
    """A hook that adds ``coeff * vector`` ``[hidden]`` to the module's output at ``positions``."""
    return Intervention("add", vector, coeff, positions, tracker)


def ablate_direction(
    vector: torch.Tensor, *, positions="all", tracker: SequenceTracker | None = None
) -> Intervention:
    """A hook that removes the component of the module's output along ``vector`` ``[hidden]``."""
    return Intervention("ablate", vector, 0.0, positions, tracker)


def clamp_direction(
    vector: torch.Tensor, value: float, *, positions="all", tracker: SequenceTracker | None = None
) -> Intervention:
    """A hook that sets the component along the unit ``vector`` ``[hidden]`` to ``value``."""
    return Intervention("clamp", vector, value, positions, tracker)


def _check_positions(positions):
    if isinstance(positions, str):
        return check_choice(positions, "positions", POSITIONS)
    if isinstance(positions, torch.Tensor):
        if positions.dtype == torch.bool:  # .long() would make a mask's False/True the indices 0 and 1
            raise TypeError(
                "positions must be token indices, not a boolean mask; pass mask.nonzero().flatten() for the "
                "same positions in every row"
            )
        if positions.ndim > 1:  # flattening [batch, k] would steer every row at every row's positions
            raise ValueError(
                f"positions must be a 1-D tensor of token indices, the same for every row, got shape "
                f"{tuple(positions.shape)}; steer rows with different positions in separate calls"
            )
        indices = positions.reshape(-1)
    elif isinstance(positions, Iterable):
        indices = list(positions)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise TypeError(
                f"positions must be {short_list(POSITIONS)} or a sequence of ints, got {positions!r}"
            )
        indices = torch.tensor(indices, dtype=torch.long)
    else:
        raise TypeError(
            f"positions must be one of {short_list(POSITIONS)} or a sequence of token indices, "
            f"got {type(positions).__name__}"
        )
    if indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"position indices must be integers, got dtype {indices.dtype}")
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(
            "position indices count from each row's first real token and must be >= 0 (the end of a "
            f"sequence being generated is not known yet), got {indices.tolist()[:10]}"
        )
    return indices.to(torch.long)


# --------------------------------------------------------------------------------------------------------
# The convenience: steer(...)


class Steering:
    """Handle of the hooks that ``steer`` registered: ``.remove()`` them, or use it in a ``with`` block.

    ``interventions`` maps each steered module path to its ``Intervention``; ``hooks`` is the
    ``HookManager`` that holds them (more hooks, e.g. captures, may be added to it).
    """

    def __init__(self, hooks: HookManager, tracker: SequenceTracker, interventions: dict[str, Intervention]):
        self.hooks = hooks
        self.tracker = tracker
        self.interventions = interventions

    def remove(self) -> None:
        """Remove every hook of this handle (safe to call twice). Warns when ``positions="generated"`` steered
        nothing: passes ran, and none of them held a generated token (a forward pass over a whole text,
        teacher forcing, is all prompt to the tracker)."""
        tracker = self.tracker
        generated = any(
            isinstance(i.positions, str) and i.positions == "generated" for i in self.interventions.values()
        )
        if generated and len(self.hooks) and tracker.passes and not tracker.generated_passes:
            warnings.warn(
                f"positions='generated' steered nothing: none of the {tracker.passes} forward passes under "
                "steer held a generated token (generated positions are generate's decode steps: "
                "generate(max_new_tokens=1) has none, and a forward pass over a whole text is all prompt). "
                "To steer the answer of a text you score, give its token indices as positions",
                stacklevel=3,
            )
        self.hooks.remove_all()

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Steering({len(self.interventions)} modules: {short_list(self.interventions, 5)})"


def steer(
    model: torch.nn.Module,
    vector,
    *,
    layer: int | Sequence[int] | None = None,
    module: str | Sequence[str] | None = None,
    coeff: float = 1.0,
    op: str = "add",
    positions="all",
    norm: float | Mapping | None = None,
) -> Steering:
    """Steer ``model`` until the returned handle is removed (or its ``with`` block ends, also on errors).

    Example::

        with steer(model, vector, layer=12, coeff=4.0, positions="generated"):
            out = model.generate(**inputs, max_new_tokens=40)

    Args:
        vector: a ``[hidden]`` tensor; a ``TraitVector`` (its ``layer``/``module`` are used when neither is
            given here); or a mapping ``{layer index or module path: [hidden] tensor or TraitVector}`` for a
            vector per layer (e.g. ``load_control_vector(path).directions``).
        layer: decoder layer index (or indices) whose output is steered; negative counts from the end.
        module: dotted module path(s) instead of ``layer``, e.g. ``"model.layers.12.mlp"``; in a wrapper such
            as a PEFT model, also a path in the transformers model inside it.
        coeff: for ``op="add"`` the multiplier of the vector; for ``op="clamp"`` the value the component
            along the unit vector is set to; ignored by ``op="ablate"``.
        op: ``"add"``, ``"ablate"`` or ``"clamp"``.
        positions: ``"all"``, ``"prompt"``, ``"generated"`` or token indices (see the module docs).
        norm: the typical residual norm at the layer (a number, or ``{layer: number}`` from
            ``residual_norms``). When given, ``coeff`` is relative: the vector is scaled to unit length
            and to ``coeff * norm``.
    """
    targets = _targets(model, vector, layer, module)
    check_choice(op, "op", OPERATIONS)
    width = residual_width(model)
    for path, (vec, layer_index) in targets.items():  # other modules' widths show in the first pass
        if layer_index is not None and width is not None and vec.shape[0] != width:
            raise ValueError(
                f"the vector for {path!r} has hidden size {vec.shape[0]}, but {type(model).__name__}'s "
                f"decoder layers output {width}; use a vector made for this model"
            )
    tracker = SequenceTracker()
    hooks = HookManager(model)
    interventions: dict[str, Intervention] = {}
    try:
        tracker.attach(hooks)
        for path, (vec, layer_index) in targets.items():
            value = coeff
            if norm is not None:
                scale = _norm_for(norm, layer_index, path)
                if op == "add":
                    if vec.requires_grad:
                        raise ValueError(
                            "a relative coeff (norm=...) rescales the vector, which would cut it off from "
                            "its gradients; steer a vector that requires grad with norm=None"
                        )
                    vec = vec.detach().to(torch.float32)
                    if not bool(vec.any()):
                        raise ValueError(
                            "a relative coeff (norm=...) needs a non-zero vector, got one of norm 0"
                        )
                    vec = _unit(vec) * scale
                else:
                    value = coeff * scale
            intervention = Intervention(op, vec, value, positions, tracker)
            hooks.add_forward_hook(path, intervention, name=f"steer {op} {path}")
            interventions[path] = intervention
    except BaseException:
        hooks.remove_all()
        raise
    return Steering(hooks, tracker, interventions)


def _targets(model, vector, layer, module) -> dict[str, tuple[torch.Tensor, int | None]]:
    """``{module path: (vector, layer index or None)}`` from the arguments of ``steer``."""
    if layer is not None and module is not None:
        raise ValueError("give either layer=... or module=..., not both")
    if isinstance(vector, Mapping):
        if layer is not None or module is not None:
            raise ValueError(
                "vector is a mapping {layer or module: vector}; do not also pass layer= or module="
            )
        if not vector:
            raise ValueError("vector mapping is empty; give at least one {layer: vector}")
        out = {}
        for key, vec in vector.items():
            path, index = _where(model, key)
            if path in out:
                raise ValueError(f"{key!r} names {path!r}, which is already given; one vector per module")
            out[path] = (_as_tensor(vec), index)
        return out
    tensor = _as_tensor(vector)
    if layer is None and module is None:
        if hasattr(vector, "check_model"):  # a TraitVector steers where it was read, on a model it fits
            module = vector.check_model(model)  # its path in model (under a PEFT wrapper's model)
        else:
            module = getattr(vector, "module", None)
        if module is None:
            layer = getattr(vector, "layer", None)
        if layer is None and module is None:
            raise ValueError("say where to steer: layer=12 (decoder layer index) or module='model.layers.12'")
    keys = layer if layer is not None else module
    if isinstance(keys, (int, str)):
        keys = [keys]
    out = {}
    for key in keys:
        path, index = _where(model, key)
        if path in out:
            raise ValueError(f"{key!r} names {path!r}, which is already given; give each layer once")
        out[path] = (tensor, index)
    return out


def _as_tensor(vector) -> torch.Tensor:
    tensor = getattr(vector, "vector", vector)  # a TraitVector carries its tensor in .vector
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"vector must be a [hidden] tensor or a TraitVector, got {type(vector).__name__}")
    return check_vector(tensor, "vector")


def _where(model: torch.nn.Module, key) -> tuple[str, int | None]:
    """Module path and layer index of a ``layer`` (int) or ``module`` (str) key."""
    if isinstance(key, str):
        path = locate_module(model, key) or key  # in a PEFT wrapper, also a path in the model inside
        resolve_module(model, path)  # raises, with the closest paths, if neither has it
        try:
            paths = decoder_layer_paths(model)
        except ValueError:  # a model without a ModuleList of layers: any module path still works
            paths = []
        return path, paths.index(path) if path in paths else None
    if isinstance(key, int) and not isinstance(key, bool):
        paths = decoder_layer_paths(model)
        if not -len(paths) <= key < len(paths):
            raise ValueError(f"layer must be in [{-len(paths)}, {len(paths) - 1}] for this model, got {key}")
        index = key % len(paths)
        return paths[index], index
    raise TypeError(f"layer must be an int and module a dotted path string, got {type(key).__name__} {key!r}")


def _norm_for(norm, layer_index: int | None, path: str) -> float:
    if isinstance(norm, Mapping):
        for key in (layer_index, path):
            if key is not None and key in norm:  # a negative norm would steer the other way, 0 not at all
                return check_real(norm[key], f"norm[{key!r}]", "a positive number", lambda v: v > 0)
        raise ValueError(
            f"norm has no entry for layer {layer_index} ({path!r}); it has {short_list(map(str, norm))}"
        )
    return check_real(norm, "norm", "a positive number or a {layer: norm} mapping", lambda v: v > 0)


# --------------------------------------------------------------------------------------------------------
# Typical residual norms, for relative coefficients


@torch.no_grad()
def residual_norms(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str | Example],
    layers: int | Sequence[int] | None = None,
    *,
    batch_size: int = 8,
) -> dict[int, float]:
    """The typical residual norm at each decoder layer's output, measured on ``texts``: plain texts, or
    prompt-style ``Example``s, rendered as ``encode_examples`` renders them (with the chat template, where
    the tokenizer has one). Measure on what will be steered: a short plain text is mostly its first token,
    whose norm is an outlier (the bundled model's layer 20: ~24000 for ``"hi"``, ~240 for the chat-templated
    prompt).

    Returns ``{layer: median L2 norm over every real (non-pad) token}``, keyed by layer indices counted
    from 0 (a negative layer given comes back as its index from the front: -1 as 29 on a 30-layer model,
    as ``steer`` looks it up). The median, because a few positions (often the first token) carry norms
    orders of magnitude above the rest.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    paths = decoder_layer_paths(model)
    if layers is None:
        layers = range(len(paths))
    elif isinstance(layers, int):
        layers = [layers]
    chosen = {index: path for path, index in (_where(model, i) for i in layers)}
    norms: dict[int, list[torch.Tensor]] = {i: [] for i in chosen}

    def recorder(index: int) -> Callable:
        def hook(module, args, output):  # [batch, seq] norms stay on the device; pads are dropped after
            norms[index].append(output_tensor(output).detach().to(torch.float32).norm(dim=-1))

        return hook

    device = input_device(model)
    with HookManager(model) as hooks:
        for index, path in chosen.items():
            hooks.add_forward_hook(path, recorder(index))
        for start in range(0, len(texts), batch_size):
            # right-padded as each text alone starts, pads filled with EOS where the tokenizer has no pad
            batch = encode_examples(tokenizer, list(texts[start : start + batch_size]))
            model(**{k: v.to(device) for k, v in batch.model_inputs().items()})
            real = batch.attention_mask.bool()  # on the CPU, where each layer's norms go once
            for values in norms.values():
                values[-1] = values[-1].cpu()[real]
    for index, values in norms.items():  # a NaN norm would pass on to steer(norm=...)
        check_outputs(torch.cat(values), repr(chosen[index]), lambda: model_dtype(model))
    return {i: float(torch.quantile(torch.cat(v).double(), 0.5)) for i, v in norms.items()}
