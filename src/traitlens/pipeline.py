"""From contrastive examples to a trusted trait vector, built only from traitlens's public primitives.

1. ``collect_activations``: one batched forward pass per batch with hooks on every chosen decoder layer at
   once; the position rule is applied inside the hooks (on the model's device), and the pass stops after
   the last hooked layer, so the LM head is never computed. Examples are batched longest first, so that
   rows of similar length share a batch and pad little, and come back in the order given. Pairs
   (``pair_activations``) that share their prompt and are read at ``"response_mean"`` run the prompt once
   and both answers on its key/value cache.
2. ``extract_trait``: every extraction method at every layer on the train split, every (method, layer)
   scored on the validation split, the best one chosen on validation and reported once on the untouched
   test split, which is read after the choice and at the chosen layer only. Random directions are the
   control: the chosen vector must beat them.

Selection rule: highest validation accuracy, then AUROC, then effect size, then the earlier layer; the
random baseline is never chosen. Accuracy uses the threshold fitted on the train split (the midpoint of
the class means of the projections), so held-out splits are never used to fit anything.

The control: random directions, each oriented on the train split as every method's vector is (so that
positives project higher), scored on the held-out splits with its train threshold. An unoriented random
direction scores 0.5 on average over draws whatever the data (flipping its sign turns accuracy ``a`` into
``1 - a``), so it can show nothing; oriented, it shows how far a direction that knows nothing of the trait
gets on this data. On a residual stream that is far: its variance sits in a few directions, along which
the classes often differ a little (on SmolLM2 with the sentiment data, 0.59 +/- 0.10 test accuracy at layer
18, the best of 32 draws 0.79). ``random_baseline`` is scored over ``control_draws`` seeded draws
(``draws_accuracy_mean`` / ``_std`` / ``_max``, the same for AUROC, next to the single seed-``seed``
vector's own unoriented scores), and the chosen vector passes the control (``control_ok``) when it beats
every draw on validation (accuracy, then AUROC); otherwise a warning says that a random direction does as
well.
"""

from __future__ import annotations

import math
import operator
import warnings
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from traitlens import __version__
from traitlens._progress import progress_bar
from traitlens._validation import check_choice, check_outputs, short_list, warn_if_training
from traitlens.capture import ActivationCapture, output_tensor
from traitlens.compute import normalize_vectors
from traitlens.dataset import (
    SPLITS,
    ContrastiveDataset,
    Example,
    Pair,
    check_position,
    pad_rows,
    tokenize_examples,
)
from traitlens.hooks import HookManager, _text_config, decoder_layer_paths, input_device, resolve_module
from traitlens.methods import METHODS as METHOD_CLASSES
from traitlens.methods import RandomBaselineMethod, _checked_classes, get_method
from traitlens.metrics import _accuracy, _auroc, _midpoint, _projections, evaluate_vector
from traitlens.models import cache_keyword, dtype_name, model_dtype, transformers_model_path
from traitlens.positions import POSITION_RULES, select_positions
from traitlens.stats import ContrastiveStats
from traitlens.vector import TraitVector, save_tensors

METHODS = tuple(METHOD_CLASSES)
CONTROL = "random_baseline"
"""The method whose row holds the control: random directions oriented on train (see the module docs)."""


def collect_activations(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[str | Example],
    *,
    layers: Sequence[int] | None = None,
    position: str = "prompt_last",
    batch_size: int = 16,
    chat: bool | None = None,
    progress: bool | str | None = None,
    module: str | None = None,
) -> torch.Tensor:
    """Activations of ``examples`` at the outputs of decoder ``layers`` (in the order given; default all):
    ``[layer, n, hidden]`` float32, CPU.

    ``position`` is one of ``POSITION_RULES``; with ``"all"`` every real token is a row, so ``n`` is the
    total number of real tokens. ``progress``: a bar over the batches where a person sees it (``None``: on a
    terminal or in a notebook, not in a log file), always (``True``, or a string: its label) or never.
    ``module`` reads the output of that module (a dotted path, e.g. ``"model.layers.12.mlp"``; its output
    must be ``[batch, seq, hidden]``) instead of decoder layers: ``[1, n, hidden]``. Examples are batched
    longest first; rows come in the order of ``examples``.
    """
    tokens = _tokenized(tokenizer, examples, chat, position)
    counts = _lengths(tokens)
    order = _longest_first(counts)
    rows = counts if position == "all" else torch.ones_like(counts)  # rows of each example in the result
    ends = rows.cumsum(0)
    out = None
    paths, layers = _hooked_layers(model, layers, batch_size, module)
    batches = _activation_batches(
        model, tokenizer, tokens, order, paths, layers, position, batch_size, progress
    )
    for start, acts in zip(range(0, len(order), batch_size), batches, strict=True):
        if out is None:
            out = acts.new_empty(acts.shape[0], int(ends[-1]), acts.shape[-1])
        index = order[start : start + batch_size]
        out[:, torch.cat([torch.arange(ends[i] - rows[i], ends[i]) for i in index])] = acts
    return out


def _tokenized(
    tokenizer, examples: Sequence[str | Example], chat: bool | None, position: str
) -> list[tuple[array, array]]:
    """The ``(prompt ids, response ids)`` of each example (``tokenize_examples``), kept compact (4 bytes a
    token) so that the examples are tokenized once, to sort them by length and to batch them. Examples
    that cannot be encoded, or that ``position`` cannot read (no answer for ``"response_mean"``), are
    refused here, by their index, before any forward pass."""
    check_choice(position, "position", POSITION_RULES)
    rows = [(array("i", p), array("i", r)) for p, r in tokenize_examples(tokenizer, examples, chat=chat)]
    if position != "all":
        part = 1 if position == "response_mean" else 0
        unread = [i for i, row in enumerate(rows) if not row[part]]
        if unread:
            raise ValueError(
                f"position {position!r} reads {('prompt', 'response')[part]} tokens, but examples "
                f"{unread[:10]}{f' and {len(unread) - 10} more' if len(unread) > 10 else ''} have none"
                + (" (plain texts and Examples without an answer)" if part else "")
            )
    return rows


def _pairs(
    tokenizer, pairs: Sequence[Pair], position: str
) -> tuple[list[list[tuple[array, array]]], list[int]]:
    """The ``_tokenized`` positive and negative sides of ``pairs``, and the order to batch the pairs in
    (``_longest_first``, by the longer side of each)."""
    if len(pairs) == 0:
        raise ValueError("pairs is empty; give at least one Pair")
    wrong = next((p for p in pairs if not isinstance(p, Pair)), None)
    if wrong is not None:
        raise TypeError(
            f"pairs must be Pairs (e.g. load_dataset(...).train), got a {type(wrong).__name__}; for texts of "
            "one side use collect_activations"
        )
    if position in ("prompt_last", "prompt_mean") and not any(p.prompts_differ for p in pairs):
        raise ValueError(
            f"at position {position!r} the two sides of every pair read the same tokens (they differ only in "
            "their answers), so their rows would be identical: use position='response_mean'"
        )
    sides = [
        _tokenized(tokenizer, [getattr(p, f"{side}_example") for p in pairs], None, position)
        for side in ("pos", "neg")
    ]
    return sides, _longest_first(*map(_lengths, sides))


def pair_activations(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    layers: Sequence[int] | None = None,
    position: str = "prompt_last",
    batch_size: int = 16,
    progress: bool | str | None = None,
    module: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, neg)`` activations of both sides of ``pairs`` at the outputs of decoder ``layers`` (in the
    order given; default all) or of ``module``, each ``[layer, n, hidden]`` float32 on CPU, rows in the order
    of ``pairs``: ``collect_activations`` of each side, computed pair by pair.

    With ``position="response_mean"``, pairs whose two sides share their prompt (the same question, two
    answers) run the prompt once and both answers from its key/value cache, which is faster by the length
    of the prompt (see ``_shared_prompt_pass``). ``position="all"`` is refused: its rows do not pair up.
    """
    check_one_row_per_example(position, "pair_activations")
    sides, order = _pairs(tokenizer, pairs, position)
    paths, layers = _hooked_layers(model, layers, batch_size, module)
    batches = _pair_batches(model, tokenizer, sides, order, paths, layers, position, batch_size, progress)
    out = []
    for start, acts in zip(range(0, len(order), batch_size), batches, strict=True):
        if not out:
            out = [side.new_empty(side.shape[0], len(order), side.shape[-1]) for side in acts]
        for full, side in zip(out, acts, strict=True):
            full[:, order[start : start + batch_size]] = side
    return out[0], out[1]


def _lengths(rows: list[tuple[array, array]]) -> torch.Tensor:
    """``[n]`` int64: the number of tokens of each row."""
    return torch.tensor([len(p) + len(r) for p, r in rows], dtype=torch.long)


def _longest_first(*counts: torch.Tensor) -> list[int]:
    """Example indices, longest first (by the longest of ``counts``: both sides of a pair go in one order),
    ties in their given order. Batches of similar lengths pad little, where one long row in a batch of
    short ones would pad them all; and the first batch shows the peak memory, as in Hugging Face's
    ``group_by_length``."""
    longest = torch.stack(counts).amax(0)
    return torch.sort(longest, descending=True, stable=True).indices.tolist()


def _activation_batches(model, tokenizer, tokens, order, paths, layers, position, batch_size, progress):
    """``[layer, batch, hidden]`` float32 CPU activations of the ``_tokenized`` examples ``tokens`` (which has
    checked ``position``) at ``_hooked_layers``, ``batch_size`` at a time in the order of the indices
    ``order``."""
    capture = ActivationCapture(device="cpu", dtype=torch.float32)
    for start in progress_bar(range(0, len(order), batch_size), progress, unit="batch"):
        rows = [tokens[i] for i in order[start : start + batch_size]]
        yield _one_pass(model, tokenizer, rows, paths, layers, position, capture)


def _pair_batches(model, tokenizer, sides, order, paths, layers, position, batch_size, progress):
    """``(pos, neg)`` activations of ``_pairs`` at ``_hooked_layers``, ``[layer, batch, hidden]`` float32 CPU
    each, ``batch_size`` pairs at a time in the order of ``order``.

    Where every pair of a batch has one prompt for both sides and ``position`` reads the responses only
    (``"response_mean"``), the prompts run once and both answers continue from their key/value cache
    (``_shared_prompt_pass``); otherwise each side gets its own pass."""
    capture = ActivationCapture(device="cpu", dtype=torch.float32)
    share = position == "response_mean" and _takes_cache(model)
    for start in progress_bar(range(0, len(order), batch_size), progress, unit="batch"):
        pos, neg = ([side[i] for i in order[start : start + batch_size]] for side in sides)
        if share and all(p[0] == n[0] for p, n in zip(pos, neg, strict=True)):
            yield _shared_prompt_pass(model, tokenizer, pos, neg, paths, layers, capture)
        else:
            yield tuple(
                _one_pass(model, tokenizer, rows, paths, layers, position, capture) for rows in (pos, neg)
            )


def _hooked_layers(model, layers, batch_size, module=None) -> tuple[list[str], list[int]]:
    """The module paths to hook and the checked ``layers`` (indices into the paths)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    warn_if_training(model, "the activations", stacklevel=4)  # at the caller of the public function
    if module is None:
        paths = decoder_layer_paths(model)
        return paths, _check_layers(layers, len(paths))
    if layers is not None:
        raise ValueError(f"give layers or module, not both (got layers={layers!r}, module={module!r})")
    resolve_module(model, module)  # a wrong path fails here, with suggestions
    return [module], [0]


def _one_pass(model, tokenizer, rows, paths, layers, position, capture) -> torch.Tensor:
    """``[layer, batch, hidden]`` at ``position`` of the ``(prompt ids, response ids)`` ``rows``, in one pass
    (``[layer, tokens, hidden]``, every real token, for ``"all"``)."""
    enc = pad_rows(tokenizer, rows)
    capture.positions = select_positions(position, enc.attention_mask, enc.response_mask)
    acts = _capture_pass(model, paths, layers, capture, enc.model_inputs())
    return acts[:, enc.attention_mask.bool()] if position == "all" else acts


def _run(model, inputs, last: str, hooked: dict[str, object] | None = None, **kwargs) -> None:
    """One forward pass of ``model`` on the tensors ``inputs`` (moved to its input device) and ``kwargs``,
    with the forward hooks ``hooked`` (module path -> hook), stopping after the module ``last``."""
    device = input_device(model)
    with torch.no_grad(), HookManager(model) as hooks:
        for path, hook in (hooked or {}).items():
            hooks.add_forward_hook(path, hook)
        hooks.stop_after(last)
        try:
            hooks.run(**{k: v.to(device) for k, v in inputs.items()}, **kwargs)
        except IndexError as err:  # a learned position embedding looked up past its table
            ids = inputs.get("position_ids")  # a shared prompt's answers continue after it
            length = int(ids.max()) + 1 if ids is not None else inputs["input_ids"].shape[-1]
            limit = getattr(_text_config(model), "max_position_embeddings", None)
            if isinstance(limit, int) and length > limit:
                raise ValueError(
                    f"a text of {length} tokens is longer than the {limit} positions the model has "
                    "(max_position_embeddings): shorten it"
                ) from err
            raise


def _capture_pass(model, paths, layers, capture, inputs, **kwargs) -> torch.Tensor:
    """``_run`` with ``capture``'s hooks on ``layers``, stopping after the last of them: ``[layer, ...]`` of
    what ``capture`` read."""
    hooked = {paths[layer]: capture.make_hook(str(layer)) for layer in layers}
    first, given = paths[layers[0]], tuple(inputs["input_ids"].shape)

    def check_positions(module, args, output, capture_hook=hooked[first]):
        shape = tuple(output_tensor(output).shape)  # metadata: no wait for the device
        if len(shape) != 3 or shape[:2] != given:  # positions are read by the input's masks
            raise ValueError(
                f"{first!r} outputs {shape} for input ids of {given}, not [batch, seq, hidden] at the input's "
                "positions: the model adds, drops or regroups positions (CPMAnt prepends tokens, ProphetNet "
                "adds n-gram streams, XLNet puts the sequence first, Gemma 3n keeps several streams), so "
                "traitlens cannot tell which row is which token; capture the module with ActivationCapture "
                "and select the positions yourself"
            )
        return capture_hook(module, args, output)

    _run(model, inputs, paths[max(layers)], {**hooked, first: check_positions}, **kwargs)
    if str(layers[0]) not in capture:
        raise ValueError(f"module {paths[layers[0]]!r} did not run in the forward pass")
    repeated = [paths[layer] for layer in layers if len(capture.get(str(layer), concat=False)) > 1]
    if repeated:
        raise ValueError(_ran_twice(repeated))
    acts = torch.stack([capture.get(str(layer)) for layer in layers])
    capture.clear()
    for i, layer in enumerate(layers):  # said here, where the module is known: no data of the user's is bad
        check_outputs(acts[i], repr(paths[layer]), lambda: model_dtype(model))
    return acts


def _ran_twice(paths: list[str]) -> str:
    return (
        f"{short_list(paths)} ran more than once in one forward pass (the model reuses its layers, as "
        "recurrent-depth models do), so which run is the layer's output is a choice to make: capture the "
        "module with ActivationCapture and read each run with get(name, concat=False)"
    )


def _shared_prompt_pass(
    model, tokenizer, pos, neg, paths, layers, capture
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"response_mean"`` activations of pairs whose sides share their prompt, the prompt computed once.

    The prompts run into a key/value cache, up to the last hooked layer; the cache is repeated for the two
    sides, and both answers of every pair run in one batch (``2 x`` the pairs) on it, with the positions
    they have after their prompt, as generation does. The prompts are left-padded, so that no pad sits
    between a prompt and its answers, where a sliding attention window, which counts positions, would
    count it. A pair costs its prompt once and both answers, instead of its prompt twice: see
    ``benchmarks/shared_prompt.py`` (0.65-0.74x of the time of one pass per side on the shipped
    prompt-style datasets with SmolLM2, whose chat template adds a system prompt). Equal to one pass per
    side up to float rounding: ~1e-6 relative in float32; in bfloat16 both paths are as far from float32
    (~6e-3), and a row may differ between them by ~1e-2.
    """
    from transformers import DynamicCache

    prompts = pad_rows(tokenizer, [(p, array("i")) for p, _ in pos], padding_side="left")
    answers = pad_rows(
        tokenizer, [(array("i"), side[1]) for pair in zip(pos, neg, strict=True) for side in pair]
    )
    cache = DynamicCache()  # keeps every key: the model's masks apply its windows (moshi's config has a
    # window its masks do not apply, which a cache built from the config would enforce)
    on_cache = {cache_keyword(model): cache, "use_cache": True}
    _run(model, prompts.model_inputs(), paths[max(layers)], **on_cache)  # keys and values of hooked layers
    cache.batch_repeat_interleave(2)  # rows: pair 0 pos, pair 0 neg, pair 1 pos, ...
    mask = torch.cat([prompts.attention_mask.repeat_interleave(2, dim=0), answers.attention_mask], dim=1)
    position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)[:, prompts.input_ids.shape[1] :]
    capture.positions = select_positions("response_mean", answers.attention_mask, answers.response_mask)
    inputs = {"input_ids": answers.input_ids, "attention_mask": mask, "position_ids": position_ids}
    acts = _capture_pass(model, paths, layers, capture, inputs, **on_cache)
    return acts[:, 0::2].contiguous(), acts[:, 1::2].contiguous()  # spilled batches must be contiguous


def _takes_cache(model) -> bool:
    """Whether ``_shared_prompt_pass`` computes what one pass per text computes for ``model``. Checked on
    every causal-LM family of transformers 5.24 with random weights (``tests/test_families.py``); it holds
    for a decoder-only transformers model
    - that takes a transformers cache (not XLM's dict) and ``position_ids`` counted from 0 (TrOCR takes its
      positions from the cache length; RoBERTa-family models count them from the pad id + 1),
    - whose cache holds keys and values only (not xLSTM's, Mamba's or a hybrid's recurrent state, which
      repeating the cache's rows would not cover),
    - whose text decoder's attention modules all say ``is_causal=True`` (a cached prompt cannot attend to
      its answer; a multimodal model's vision tower, which text does not run through, may attend both ways).
      Not Gemma 3's ``use_bidirectional_attention`` (Gemma 4's ``"vision"``, for image tokens, is fine), nor
      BERT-family models without ``is_decoder``; GIT (which widens the mask over its cached image tokens)
      and a few older families (BigBird, Doge, GPT-NeoX-Japanese, MegatronBERT, RemBERT, XGLM) say nothing
      and get one pass per side too,
    - and whose rotary frequencies do not depend on the pass's length (``"dynamic"`` and ``"longrope"``
      scaling choose them from each pass's longest position, which differs between the two passes).
    Other models get one pass per side."""
    import inspect

    from transformers import DynamicCache, PreTrainedModel
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if not isinstance(model, PreTrainedModel) or getattr(model, "_is_stateful", False):
        return False
    config = _text_config(model)
    takes, keyword = inspect.signature(model.forward).parameters, cache_keyword(model)
    if model.config.is_encoder_decoder or keyword is None or "position_ids" not in takes:
        return False
    if "dict" in str(takes[keyword].annotation).lower():  # XLM's cache of its own
        return False
    if any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules()):  # from the pad id + 1
        return False
    try:
        first = decoder_layer_paths(model)[0]
    except ValueError:  # no one list of layers (XLM, HRM): no attention to check
        return False
    owner = first.rsplit(".", 2)[0] if first.count(".") >= 2 else ""  # of the list of layers
    decoder = model.get_submodule(owner)
    causal = [m.is_causal for m in decoder.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    both_ways = getattr(config, "use_bidirectional_attention", None) not in (None, False, "vision")  # images'
    if not causal or not all(causal) or both_ways:
        return False
    rope = _values(getattr(config, "rope_parameters", None), "rope_type", "type")
    rope |= _values(getattr(config, "rope_scaling", None), "rope_type", "type")
    if any("dynamic" in kind or kind in ("longrope", "su") for kind in rope):
        return False
    layers = DynamicCache(config=model.config).layers
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


def _values(settings, *keys: str) -> set[str]:
    """The string values of ``keys`` in the dict ``settings`` and the dicts nested in it (rope settings may
    be given per layer type)."""
    if not isinstance(settings, dict):
        return set()
    own = {settings[key] for key in keys if isinstance(settings.get(key), str)}
    return own.union(*(_values(value, *keys) for value in settings.values()))


def check_one_row_per_example(position: str, who: str) -> None:
    """Refuse ``position="all"`` for ``who``, which reads one row per example."""
    if position == "all":
        raise ValueError(
            f"{who} reads one row per example, and position='all' gives one per token (a different number "
            "on each side, which paired methods and per-example scores cannot take); use 'prompt_mean' or "
            "'response_mean' for a mean over tokens, or collect_activations(..., position='all') and call "
            "the methods yourself"
        )


def stream_statistics(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    layers: Sequence[int] | None = None,
    position: str = "prompt_last",
    batch_size: int = 16,
    outer: bool = False,
    spill_to: str | Path | None = None,
    progress: bool | str | None = None,
) -> ContrastiveStats:
    """Per-layer running moments of the positives, negatives and their paired differences, batch by batch.

    Memory grows with ``len(pairs)`` by their token ids alone (about 0.5 KB a pair of ~15 tokens, measured:
    Python's arrays and lists), not by their activations: each batch's activations are folded into
    float64 moments and dropped (see ``traitlens.stats``). With ``spill_to`` each batch is also written to
    ``spill_to/batch_<k>.safetensors`` (tensors ``pos`` and ``neg``, ``[layer, n, hidden]``, and ``index``,
    ``[n]``: which pairs its rows are; metadata ``layers``), so that methods that need every row (probe,
    ICA, gradient) can read one layer at a time from disk with ``read_spilled``, in the order of ``pairs``.
    The folder is claimed before the first batch: one that already holds spilled batches, or that another
    run is writing, is refused; a run that raises (or is interrupted) removes the batches it wrote. The
    files stay after a run that finishes: they are its product. ``position="all"`` is refused: its positive
    and negative rows do not pair up.

    Pairs are batched longest first (as in ``collect_activations``), both sides in one order; pairs that
    share their prompt run it once at ``"response_mean"`` (as in ``pair_activations``); ``progress`` as in
    ``collect_activations``.
    """
    check_one_row_per_example(position, "stream_statistics")
    sides, order = _pairs(tokenizer, pairs, position)
    paths, layers = _hooked_layers(model, layers, batch_size)  # layers are recorded in the spilled files
    batches = _pair_batches(model, tokenizer, sides, order, paths, layers, position, batch_size, progress)
    stats = ContrastiveStats(outer=outer)
    if spill_to is None:
        for pos_acts, neg_acts in batches:
            stats.update(pos_acts, neg_acts)
        return stats
    spill_to = Path(spill_to)
    running = _claim_spill_folder(spill_to)
    written = []
    try:
        for k, (pos_acts, neg_acts) in enumerate(batches):
            stats.update(pos_acts, neg_acts)
            index = torch.tensor(order[k * batch_size : (k + 1) * batch_size])
            spilled = {"pos": pos_acts, "neg": neg_acts, "index": index}
            written.append(spill_to / f"batch_{k:06d}.safetensors")
            save_tensors(spilled, written[-1], metadata={"layers": str(layers)})
    except BaseException:  # a run that did not finish leaves nothing to be read as if it had
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        running.unlink(missing_ok=True)
    return stats


_RUNNING = ".stream_statistics-running"
"""The file that marks a spill folder as being written (by a run that has not finished, or was killed)."""


def _claim_spill_folder(folder: Path) -> Path:
    """Make ``folder`` (if needed) and claim it for one run, before any forward pass: an unwritable folder,
    one that holds spilled batches (``read_spilled`` would read them as part of this run) or one another run
    is writing is refused. Returns the marker to remove when the run ends."""
    folder.mkdir(parents=True, exist_ok=True)
    running = folder / _RUNNING
    try:
        running.touch(exist_ok=False)  # atomic: of two runs started together, one gets it
    except FileExistsError:
        raise FileExistsError(
            f"spill_to={str(folder)!r} is being written by another run, or by one that was killed (then delete "
            f"{running.name} and the batch files there)"
        ) from None
    earlier = sorted(folder.glob("batch_*.safetensors"))
    if earlier:
        running.unlink()
        raise FileExistsError(
            f"spill_to={str(folder)!r} already holds {len(earlier)} spilled batches (e.g. {earlier[0].name}) "
            "from an earlier run; give an empty or new folder, or delete them"
        )
    return running


def read_spilled(
    folder: str | Path | Sequence[str | Path], layer_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, neg)`` from the files that ``stream_statistics(spill_to=folder)`` wrote, each file read once,
    rows in the order of the pairs: ``[layer, n, hidden]``, or ``[n, hidden]`` of one layer (its index
    among the spilled layers, e.g. 1 for layer 12 of ``layers=[4, 12, 25]``), in which case only that
    layer's slices are read from disk. ``folder`` may also be several such folders, read in order as one
    (the shards of a distributed run)."""
    from safetensors import safe_open

    folders = []  # the batch files of each folder
    for one in [folder] if isinstance(folder, (str, Path)) else folder:
        if (Path(one) / _RUNNING).exists():
            raise ValueError(
                f"{one} is being written by stream_statistics, or was by a run that was killed: its batches "
                f"are not all there (delete {_RUNNING} only if the run did finish)"
            )
        batches = sorted(Path(one).glob("batch_*.safetensors"))
        if not batches:
            raise FileNotFoundError(
                f"no batch_*.safetensors files in {one}; run stream_statistics(spill_to=...)"
            )
        folders.append(batches)
    parts: dict[str, list[torch.Tensor]] = {"pos": [], "neg": []}
    rows: list[torch.Tensor] = []  # where each file's rows go in the result
    total = 0  # rows read so far
    layers: dict[str, Path] = {}  # the layers files record -> the first file that does
    for batches in folders:
        start = total  # this folder's first row
        for path in batches:
            with safe_open(path, framework="pt") as f:
                spilled = f.get_slice("pos").get_shape()[0]  # layers in this file
                recorded = (f.metadata() or {}).get("layers")  # files of before 2026-11-27 have none
                if recorded is not None:
                    layers.setdefault(recorded, path)
                if len(layers) > 1:  # rows of one layer would be joined with another's
                    (a, first), (b, second) = layers.items()
                    raise ValueError(
                        f"{first} holds layers {a} and {second} layers {b}: spilled by other runs"
                    )
                if layer_index is not None and not -spilled <= layer_index < spilled:
                    held = f"layers {recorded}" if recorded else f"{spilled} layers"
                    raise ValueError(
                        f"layer_index {layer_index} is out of range: {path} holds {held}; layer_index is a "
                        "position among them, not a layer number"
                    )
                for name in parts:
                    whole = layer_index is None
                    parts[name].append(f.get_tensor(name) if whole else f.get_slice(name)[layer_index])
                n = parts["pos"][-1].shape[-2]
                if "index" in set(f.keys()):
                    rows.append(start + f.get_tensor("index"))
                else:  # written before batches were sorted by length: rows in pair order
                    rows.append(torch.arange(total, total + n))
                total += n
    if not torch.equal(torch.cat(rows).sort().values, torch.arange(total)):  # else rows would be left unset
        raise ValueError(
            f"the spilled batches in {folder} do not hold each of their {total} rows once (their 'index' "
            "tensors overlap or leave gaps): are files from different runs mixed there?"
        )
    joined = []
    for name in ("pos", "neg"):
        out = parts[name][0].new_empty(*parts[name][0].shape[:-2], total, parts[name][0].shape[-1])
        for part, index in zip(parts[name], rows, strict=True):
            out.index_copy_(-2, index, part)
        joined.append(out)
    return joined[0], joined[1]


@dataclass
class ExtractionResult:
    """Everything ``extract_trait`` found: vectors, validation scores, the choice and its test scores.

    ``vectors[method]`` is ``[layer, hidden]`` over ``layers``; ``val[method][i]`` and ``details[method][i]``
    belong to ``layers[i]``.
    """

    trait: str
    model_name: str
    revision: str | None
    module_paths: list[str]
    layers: list[int]
    position: str
    methods: list[str]
    dataset_hash: str
    split_sizes: dict[str, int]
    vectors: dict[str, torch.Tensor]
    thresholds: dict[str, list[float]]
    val: dict[str, list[dict]]
    details: dict[str, list[dict]]
    best_method: str
    best_layer: int
    test: dict
    control_test: dict
    control_ok: bool
    model_type: str | None = None
    """The model's ``config.model_type`` (its family, e.g. ``"llama"``), where it has one."""
    model_dtype: str | None = None
    """The dtype the model computed the activations in (``"bfloat16"``); the vectors are float32 whatever
    it was, and their files' ``dtype`` is the tensor's."""
    activations: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    """split -> (pos, neg): train and val ``[layer, n, hidden]`` over ``layers``, test ``[1, n, hidden]`` at
    ``best_layer`` alone (the test split is read only where the choice fell); kept in memory for reports,
    never saved."""

    def index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not extracted; extracted layers: {self.layers}")
        return self.layers.index(layer)

    def trait_vector(self, method: str | None = None, layer: int | None = None) -> TraitVector:
        """The vector of ``method`` at ``layer`` (default: the chosen one) with its full metadata."""
        method = method or self.best_method
        layer = self.best_layer if layer is None else layer
        check_choice(method, "method", self.methods)
        i = self.index(layer)
        metrics = {f"val_{k}": v for k, v in self.val[method][i].items()}
        if (method, layer) == (self.best_method, self.best_layer):
            metrics.update({f"test_{k}": v for k, v in self.test.items()})
        return TraitVector(
            vector=self.vectors[method][i].clone(),
            model=self.model_name,
            revision=self.revision,
            module=self.module_paths[i],
            layer=layer,
            position=self.position,
            method=method,
            method_params={**self.details[method][i], "threshold": self.thresholds[method][i]},
            dataset=self.trait,
            dataset_hash=self.dataset_hash,
            split_sizes=self.split_sizes,
            metrics=metrics,
            trait=self.trait,
            extra={"model_dtype": self.model_dtype} if self.model_dtype else {},
        )

    def summary(self) -> dict:
        """A JSON-serialisable summary (no tensors)."""
        return {
            "trait": self.trait,
            "model": self.model_name,
            "model_type": self.model_type,
            "model_dtype": self.model_dtype,
            "revision": self.revision,
            "position": self.position,
            "layers": self.layers,
            "methods": self.methods,
            "dataset_hash": self.dataset_hash,
            "split_sizes": self.split_sizes,
            "chosen": {"method": self.best_method, "layer": self.best_layer, "test": self.test},
            "control": {
                "method": CONTROL,
                "layer": self.best_layer,
                "what": "draws_*: random directions oriented on train, the control; the other scores: the "
                "single unoriented vector that random_baseline returns",
                "test": self.control_test,
                # what "ok" means, so that it can be told from runs before 2026-11-27, whose "ok" meant the
                # mean accuracy of unoriented draws was near 0.5 (which no data could fail)
                "rule": "validation (accuracy, AUROC) of the chosen vector above the best draw's",
                "ok": self.control_ok,
            },
            "validation": {
                m: dict(zip(map(str, self.layers), self.val[m], strict=True)) for m in self.methods
            },
            "details": {
                m: dict(zip(map(str, self.layers), self.details[m], strict=True)) for m in self.methods
            },
            "traitlens_version": __version__,
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``trait_vector.safetensors`` (the chosen one), ``vectors/<method>_layer<L>.safetensors`` (the
        best layer of each method, see ``best_layer_of``), ``all_layers.safetensors`` (``[layer, hidden]`` per
        method) and ``summary.json`` into ``folder``."""
        import json

        folder = Path(folder)
        (folder / "vectors").mkdir(parents=True, exist_ok=True)
        self.trait_vector().save(folder / "trait_vector.safetensors")
        for method in self.methods:
            layer = self.best_layer_of(method)
            self.trait_vector(method, layer).save(folder / "vectors" / f"{method}_layer{layer}.safetensors")
        save_tensors(
            {m: v.contiguous() for m, v in self.vectors.items()},
            folder / "all_layers.safetensors",
            metadata={"layers": json.dumps(self.layers), "model": self.model_name, "trait": self.trait},
        )
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=2))
        return folder

    def best_layer_of(self, method: str) -> int:
        """The layer where ``method`` scores best on validation (same rule as the overall choice); for the
        random baseline, the chosen layer: picking its best layer would pick its luckiest direction."""
        if method == CONTROL:
            return self.best_layer
        scores = [_rank_key(v) for v in self.val[method]]
        return self.layers[max(range(len(scores)), key=lambda i: (scores[i], -i))]


def extract_trait(
    model: torch.nn.Module,
    tokenizer,
    dataset: ContrastiveDataset,
    *,
    layers: Sequence[int] | None = None,
    methods: Sequence[str] = METHODS,
    position: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    control_draws: int = 32,
    progress: bool = True,
    backend: str = "local",
    cluster=None,
) -> ExtractionResult:
    """Extract, score and choose a trait vector; see the module docs for the procedure.

    ``position`` is one of ``POSITION_RULES``; ``None`` picks ``default_position(dataset)``.
    ``control_draws`` random directions make the random-baseline control. ``backend="ray"`` computes the
    activations on a Ray cluster (``cluster``: a ``traitlens.distributed.RayCluster``, default a local
    instance with 2 workers) instead of in this process; the rest is the same.
    """
    check_choice(backend, "backend", ("local", "ray"))
    position, methods = check_extraction(dataset, position, methods)
    paths = decoder_layer_paths(model)
    layers = sorted(_check_layers(layers, len(paths)))  # a sweep, reported by layer
    # vectors name their module as in the transformers model: model.layers.N also inside a PEFT wrapper
    body = transformers_model_path(model)
    inner = f"{body}." if body else ""

    acts: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def read(split: str, at: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_activations(
            model,
            tokenizer,
            dataset.split(split),
            layers=at,
            position=position,
            batch_size=batch_size,
            progress=f"{dataset.name} {split}" if progress else False,
        )

    if backend == "ray":
        from traitlens.distributed import distributed_activations

        acts = distributed_activations(
            model, dataset, layers=layers, position=position, batch_size=batch_size, cluster=cluster,
            progress=progress,
        )  # fmt: skip
    else:  # the test split is read after the choice, at the chosen layer alone
        acts = {split: read(split, layers) for split in ("train", "val")}

    if torch.equal(*acts["train"]):
        raise ValueError(
            f"positive and negative activations are identical at position {position!r}: the two sides of "
            f"{dataset.name!r} share what is read there (e.g. the same prompt with different answers); "
            "use position='response_mean'"
        )
    vectors: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    thresholds: dict[str, list[float]] = {m: [] for m in methods}
    val: dict[str, list[dict]] = {m: [] for m in methods}
    details: dict[str, list[dict]] = {m: [] for m in methods}
    (train_pos, train_neg), (val_pos, val_neg) = acts["train"], acts["val"]
    jobs = [(m, i) for i in range(len(layers)) for m in methods]
    fits = {m: get_method(m) for m in methods}
    # each layer's train activations checked once for all the methods, as extract checks them (float32
    # already: the checked tensors are views, no copies)
    checked = [_checked_classes(pos, neg) for pos, neg in zip(train_pos, train_neg, strict=True)]
    for method, i in progress_bar(jobs, "methods x layers" if progress else False, unit="fit"):
        out = fits[method]._extract_checked(*checked[i], seed=seed)
        vector = out["vector"].float().cpu()
        threshold = float(_midpoint(*_projections(vector, *checked[i])))  # as midpoint_threshold
        vectors[method].append(vector)
        thresholds[method].append(threshold)
        val[method].append(_clean(evaluate_vector(vector, val_pos[i], val_neg[i], threshold=threshold)))
        details[method].append(_scalars(out))
        if method == CONTROL:
            val[method][-1].update(
                _random_draws(train_pos[i], train_neg[i], val_pos[i], val_neg[i], seed, control_draws)
            )

    candidates = [(m, i) for m in methods if m != CONTROL for i in range(len(layers))]
    best_method, best_i = max(candidates, key=lambda mi: (_rank_key(val[mi[0]][mi[1]]), -mi[1]))
    if "test" in acts:  # read at every layer on the cluster: keep the chosen one, as a local run reads it
        acts["test"] = tuple(side[best_i : best_i + 1] for side in acts["test"])
    else:
        acts["test"] = read("test", [layers[best_i]])
    test_pos, test_neg = (side[0] for side in acts["test"])

    def on_test(method: str) -> dict:
        i = best_i
        scores = evaluate_vector(vectors[method][i], test_pos, test_neg, threshold=thresholds[method][i])
        if method == CONTROL:
            scores.update(_random_draws(train_pos[i], train_neg[i], test_pos, test_neg, seed, control_draws))
        return _clean(scores)

    chosen, control = val[best_method][best_i], val[CONTROL][best_i]
    control_ok = (chosen["accuracy"], chosen["auroc"]) > (
        control["draws_accuracy_max"],
        control["draws_auroc_max"],
    )
    if not control_ok:
        warnings.warn(
            f"{best_method} at layer {layers[best_i]} does no better on validation (accuracy "
            f"{chosen['accuracy']:.3f}, AUROC {chosen['auroc']:.3f}) than the best of {control['draws']} random "
            f"directions oriented on train ({control['draws_accuracy_max']:.3f}, {control['draws_auroc_max']:.3f}): "
            "its separation may be what any direction of this residual stream shows, not the trait; or the "
            "validation split is too small to tell",
            stacklevel=2,
        )
    return ExtractionResult(
        trait=dataset.name,
        # a model built from a config has no name: its class names it (the model inside a PEFT wrapper's)
        model_name=str(
            getattr(model.config, "_name_or_path", "") or type(model.get_submodule(body)).__name__
        ),
        revision=getattr(model.config, "_commit_hash", None),
        module_paths=[paths[layer].removeprefix(inner) for layer in layers],
        layers=layers,
        position=position,
        methods=methods,
        dataset_hash=dataset.sha256,
        split_sizes=dataset.sizes,
        vectors={m: torch.stack(v) for m, v in vectors.items()},
        thresholds=thresholds,
        val=val,
        details=details,
        best_method=best_method,
        best_layer=layers[best_i],
        test=on_test(best_method),
        control_test=on_test(CONTROL),
        control_ok=control_ok,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        model_dtype=dtype_name(model_dtype(model)),
        activations=acts,
    )


def check_extraction(
    dataset: ContrastiveDataset, position: str | None = None, methods: Sequence[str] = METHODS
) -> tuple[str, list[str]]:
    """What ``extract_trait`` checks before any model work, for callers that load the model next (the CLI).

    Returns the position (``default_position(dataset)`` for ``None``) and the methods, the random baseline
    added. Raises a ``ValueError`` for a position some rows cannot be read at, an unknown method, a list of
    the control alone, or a split too small to fit or score.
    """
    if not isinstance(dataset, ContrastiveDataset):
        raise TypeError(
            "dataset must be a ContrastiveDataset (load_dataset('sentiment') or load_dataset('pairs.jsonl'), "
            f"see FORMAT.md), got {type(dataset).__name__}"
        )
    default = position is None
    position = default_position(dataset) if default else position
    check_position(dataset, position, default=default)  # every row readable there
    check_one_row_per_example(position, "extract_trait")
    if position in ("prompt_last", "prompt_mean"):  # the whole file has signal there; does every split?
        for split in SPLITS:
            rows = dataset.split(split)
            if rows and not any(p.prompts_differ for p in rows):
                raise ValueError(
                    f"at position {position!r} the two sides of every {split!r} row of dataset {dataset.name!r} "
                    "read the same tokens (they differ only in their answers), so that split would measure "
                    "nothing there: give it rows whose prompts differ, or use position='response_mean'"
                )
    methods = list(methods)
    for method in methods:
        check_choice(method, "method", METHODS)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods must each be given once, got {methods}")
    if not [m for m in methods if m != CONTROL]:
        raise ValueError(f"methods must include at least one method besides {CONTROL!r}, got {methods}")
    if CONTROL not in methods:
        methods.append(CONTROL)
    # the fits need min_per_class pairs (2 for most methods); scoring needs 2 of each class
    needs = {"train": max(get_method(m).min_per_class for m in methods), "val": 2, "test": 2}
    for split in SPLITS:
        have = len(dataset.split(split))
        if have < needs[split]:
            what = (
                f"has {have} {split!r} pair{'s' if have > 1 else ''}"
                if have
                else f"has no {split!r} examples"
            )
            raise ValueError(
                f"dataset {dataset.name!r} {what}; every split is needed, with at least {needs[split]} pairs "
                f"in {split!r}" + (" (for the methods' fits)" if split == "train" else " (to score on)")
            )
    return position, methods


def _random_draws(
    train_pos: torch.Tensor,
    train_neg: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    seed: int,
    draws: int,
) -> dict:
    """Accuracy (each with its train midpoint threshold) and AUROC of ``draws`` random directions (seeds
    ``seed``, ``seed + 1``, ...), each oriented on train as the methods' vectors are (positives project
    higher on average): mean, standard deviation and maximum over the draws. What ``midpoint_threshold``,
    ``accuracy`` and ``auroc`` give for each oriented direction, computed for all of them in one matrix
    product and the metrics' reductions applied per column."""
    hidden, device = train_pos.shape[1], train_pos.device
    vectors = [RandomBaselineMethod.draw(hidden, seed + k, device) for k in range(draws)]
    units = normalize_vectors(torch.stack(vectors).double())  # [draws, hidden]
    gap = train_pos.double().mean(0) - train_neg.double().mean(0)  # [hidden]
    units = units * torch.where(units @ gap < 0, -1.0, 1.0).unsqueeze(1)  # as _orient in methods

    def scores(acts: torch.Tensor) -> torch.Tensor:
        return acts.double() @ units.T  # [n, draws]

    thresholds = _midpoint(scores(train_pos), scores(train_neg))  # [draws]
    pos_s, neg_s = scores(pos), scores(neg)  # [n_pos, draws], [n_neg, draws]
    values = _accuracy(pos_s, neg_s, thresholds, balanced=False)  # [draws]
    aurocs = _auroc(pos_s, neg_s)  # [draws]
    return {
        "draws_accuracy_mean": float(values.mean()),
        "draws_accuracy_std": float(values.std()),
        "draws_accuracy_max": float(values.max()),
        "draws_auroc_mean": float(aurocs.mean()),
        "draws_auroc_std": float(aurocs.std()),
        "draws_auroc_max": float(aurocs.max()),
        "draws": draws,
    }


def default_position(dataset: ContrastiveDataset) -> str:
    """``"response_mean"`` when the pairs differ in their answers (the prompt is shared, so its last token
    reads the same for both sides), else ``"prompt_last"`` (plain texts, or pairs that differ in the system
    prompt only).

    ``"response_mean"`` needs answers in every row: for a file that mixes rows with answers and rows without,
    ``extract_trait`` refuses it up front and names the rows without (see ``dataset.check_position``).
    """
    answers = any(p.has_answers for p in dataset.pairs)
    return "response_mean" if answers else "prompt_last"


def _rank_key(metrics: dict) -> tuple[float, float, float]:
    return tuple(_finite(metrics[k]) for k in ("accuracy", "auroc", "effect_size"))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else (1e9 if x > 0 else -1e9)


def _scalars(out: dict) -> dict:
    """The JSON-friendly scalars of a method's result (booleans, numbers, strings)."""
    keep = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float, str)):
            keep[key] = _clean(value)
    return keep


def _clean(value):
    """NaN floats become None, inside dicts too; +/-inf stays (an effect size of a perfect split), written
    as JSON's ``Infinity`` extension, which Python's ``json`` reads back."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def _check_layers(layers: Sequence[int] | None, n_layers: int | None) -> list[int] | None:
    """``layers`` as a list of ints in the order given (all ``n_layers`` when ``None``): integers (numpy's
    too, not bools or floats), each once, each in ``0 .. n_layers - 1``. ``n_layers=None``: the depth is not
    known yet (a Ray driver before its workers load the model), so only ``>= 0`` is checked, and ``None``
    stays ``None``."""
    if layers is None:
        return None if n_layers is None else list(range(n_layers))
    if isinstance(layers, (int, str)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a sequence of ints (e.g. [12] or range(8, 20)), got {layers!r}")
    checked = []
    for layer in layers:
        if isinstance(layer, bool) or not hasattr(type(layer), "__index__"):
            raise TypeError(f"layers must be ints, got {layer!r} ({type(layer).__name__}) in {layers!r}")
        checked.append(operator.index(layer))
    if not checked:
        raise ValueError("layers is empty; give at least one layer index")
    bad = [layer for layer in checked if layer < 0 or (n_layers is not None and layer >= n_layers)]
    if bad:
        allowed = ">= 0" if n_layers is None else f"in 0..{n_layers - 1}"
        raise ValueError(f"layers must be indices {allowed}, got {short_list(map(str, bad))}")
    if len(set(checked)) != len(checked):
        raise ValueError(f"layers must each be given once, got {checked}")
    return checked
