"""Steering hooks on tiny random models: exact arithmetic, positions under the KV cache and left padding,
dtypes, hook cleanup, relative strength."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch

from conftest import TINY_HIDDEN, TINY_LAYERS, layer_path, make_tiny_model
from traitlens.capture import ActivationCapture
from traitlens.hooks import HookManager
from traitlens.models import cache_keyword
from traitlens.steering import (
    SequenceTracker,
    ablate_direction,
    add_vector,
    clamp_direction,
    residual_norms,
    steer,
)

LAYER = 1
COEFF = 3.0


def _plain(output):
    """A decoder layer's output tensor: transformers < 4.54 (and GPT-2 before 5.x) return a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _vector(seed: int = 1) -> torch.Tensor:
    return torch.randn(TINY_HIDDEN, generator=torch.Generator().manual_seed(seed))


def _ids(batch: int = 2, seq: int = 6, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _left_padded(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 6 columns; row 1 has 2 left pads (pad id 0)."""
    ids = _ids(2, 6, seed)
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    return ids, mask


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _steered_run(model, family, run, vector, **steer_kwargs):
    """Run ``run()`` under ``steer(model, vector, layer=LAYER, ...)`` with captures of the layer's output
    before and after the steering hook (hooks run in registration order), so that both come from the same
    pass. Returns the chunks before, the chunks after, and what ``run`` returned."""
    path = layer_path(family, LAYER)
    before, after = ActivationCapture(device=None), ActivationCapture(device=None)
    with HookManager(model) as first:
        first.add_forward_hook(path, before.make_hook("h"))
        with steer(model, vector, layer=LAYER, **steer_kwargs) as handle:
            handle.hooks.add_forward_hook(path, after.make_hook("h"))
            result = run()
    assert _hook_count(model) == 0
    return before.get("h", concat=False), after.get("h", concat=False), result


def test_add_is_exact_and_earlier_layers_are_bit_identical(tiny):
    family, model = tiny
    v, ids = _vector(), _ids()
    capture = ActivationCapture(device=None)
    with HookManager(model) as hooks:
        for i in range(TINY_LAYERS):
            hooks.add_forward_hook(layer_path(family, i), capture.make_hook(f"plain{i}"))
        model(input_ids=ids)
    with steer(model, v, layer=LAYER, coeff=COEFF) as handle:
        for i in range(TINY_LAYERS):
            handle.hooks.add_forward_hook(layer_path(family, i), capture.make_hook(f"steered{i}"))
        model(input_ids=ids)
    for i in range(LAYER):
        assert torch.equal(capture.get(f"steered{i}"), capture.get(f"plain{i}"))
    assert torch.equal(capture.get(f"steered{LAYER}"), capture.get(f"plain{LAYER}") + COEFF * v)
    assert not torch.equal(capture.get(f"steered{LAYER + 1}"), capture.get(f"plain{LAYER + 1}"))
    assert _hook_count(model) == 0


def test_given_indices_are_steered_and_others_untouched(tiny):
    family, model = tiny
    v, ids = _vector(), _ids()
    (raw,), (out,), _ = _steered_run(
        model, family, lambda: model(input_ids=ids), v, coeff=COEFF, positions=[1, 4]
    )
    chosen = torch.zeros(ids.shape, dtype=torch.bool)
    chosen[:, [1, 4]] = True
    assert torch.equal(out[chosen], (raw + COEFF * v)[chosen])
    assert torch.equal(out[~chosen], raw[~chosen])


def test_indices_set_again_on_an_intervention_take_effect(tiny):
    """The index positions are moved to the device once and kept; setting new ones must not reuse them."""
    family, model = tiny
    v, ids = _vector(), _ids()
    tracker = SequenceTracker()
    intervention = add_vector(v, COEFF, positions=[1], tracker=tracker)
    capture = ActivationCapture(device=None)
    with HookManager(model) as hooks:
        tracker.attach(hooks)
        hooks.add_forward_hook(layer_path(family, LAYER), intervention)
        hooks.add_forward_hook(layer_path(family, LAYER), capture.make_hook("h"))
        model(input_ids=ids)
        intervention.positions = torch.tensor([4])
        model(input_ids=ids)
        intervention.positions[0] = 2  # an edit in place is seen too
        model(input_ids=ids)
    first, second, third = capture.get("h", concat=False)
    moved = (first - second).abs().amax(dim=(0, 2))  # [seq]: where the two passes differ
    assert moved.nonzero().flatten().tolist() == [1, 4]
    assert (second - third).abs().amax(dim=(0, 2)).nonzero().flatten().tolist() == [2, 4]


@pytest.mark.parametrize("positions", ["all", [0, 3]])
def test_ablation_removes_the_component_at_selected_positions(tiny, positions):
    family, model = tiny
    v, ids = _vector(), _ids()
    (raw,), (out,), _ = _steered_run(
        model, family, lambda: model(input_ids=ids), v, op="ablate", positions=positions
    )
    unit = v / v.norm()
    along = (out @ unit).abs() / out.norm(dim=-1)
    chosen = torch.ones(ids.shape, dtype=torch.bool)
    if positions != "all":
        chosen[:] = False
        chosen[:, positions] = True
    assert float(along[chosen].max()) < 1e-5
    assert torch.equal(out[~chosen], raw[~chosen])
    # Independent reference in float64 numpy: h - (h . u) u.
    h, u = raw.double().numpy(), unit.double().numpy()
    expected = h - (h @ u)[..., None] * u
    np.testing.assert_allclose(out[chosen].numpy(), expected[chosen.numpy()], rtol=1e-5, atol=1e-5)


def test_clamp_sets_the_component_and_keeps_the_rest(tiny):
    family, model = tiny
    v, ids = _vector(), _ids()
    (raw,), (out,), _ = _steered_run(model, family, lambda: model(input_ids=ids), v, op="clamp", coeff=2.5)
    unit = v / v.norm()
    torch.testing.assert_close(out @ unit, torch.full(ids.shape, 2.5), rtol=1e-5, atol=1e-5)
    rest = lambda h: h - (h @ unit).unsqueeze(-1) * unit  # noqa: E731
    torch.testing.assert_close(rest(out), rest(raw), rtol=1e-5, atol=1e-5)


def test_generated_positions_under_the_kv_cache(tiny):
    family, model = tiny
    v, ids = _vector(), _ids(1, 5)
    new = 6
    generate = dict(
        max_new_tokens=new, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    raw, out, result = _steered_run(
        model,
        family,
        lambda: model.generate(input_ids=ids, **generate),
        v,
        coeff=COEFF,
        positions="generated",
    )
    # The prompt pass is untouched; each of the new-1 decode steps (one position each) is steered.
    assert [tuple(c.shape[:2]) for c in out] == [(1, 5)] + [(1, 1)] * (new - 1)
    assert torch.equal(out[0], raw[0])
    for before, after in zip(raw[1:], out[1:], strict=True):
        assert torch.equal(after, before + COEFF * v)
    # Reference without the cache: one forward pass over the whole sequence, steering its generated
    # indices explicitly, gives the logits generate saw at each step.
    sequence = result.sequences
    with steer(model, v, layer=LAYER, coeff=COEFF, positions=range(5, sequence.shape[1])):
        logits = model(input_ids=sequence).logits[0, 4:-1]
    torch.testing.assert_close(torch.stack(result.logits, 1)[0], logits, rtol=1e-4, atol=1e-4)
    # And generate(use_cache=False) re-feeds the whole sequence each step: same tokens, same logits.
    with steer(model, v, layer=LAYER, coeff=COEFF, positions="generated"):
        no_cache = model.generate(input_ids=ids, use_cache=False, **generate)
    assert torch.equal(no_cache.sequences, sequence)
    torch.testing.assert_close(torch.stack(no_cache.logits, 1)[0], logits, rtol=1e-4, atol=1e-4)
    assert _hook_count(model) == 0


def test_generated_steering_changes_the_continuation_only_after_the_prompt(tiny):
    _, model = tiny
    v, ids = _vector(), _ids(1, 5)
    kwargs = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    plain = model.generate(input_ids=ids, **kwargs)
    with steer(model, 20 * v, layer=LAYER, positions="generated"):
        steered = model.generate(input_ids=ids, **kwargs)
    # The first new token comes from the prompt pass, which "generated" does not touch.
    assert torch.equal(steered.logits[0], plain.logits[0])
    assert not torch.allclose(steered.logits[1], plain.logits[1])
    # A forward pass over the whole text (teacher forcing) is all prompt: steering nothing says so
    with (
        pytest.warns(
            UserWarning, match="positions='generated' steered nothing: none of the 1 forward passes"
        ),
        steer(model, 20 * v, layer=LAYER, positions="generated"),
    ):
        unchanged = model(steered.sequences).logits
    assert torch.equal(unchanged, model(steered.sequences).logits)
    with warnings.catch_warnings():  # generate's decode steps are generated tokens: no warning
        warnings.filterwarnings("error", message="positions='generated' steered nothing")
        with steer(model, 20 * v, layer=LAYER, positions="generated"):
            model.generate(input_ids=ids, **kwargs)


def test_prompt_positions_under_the_kv_cache(tiny):
    family, model = tiny
    v, ids = _vector(), _ids(1, 5)
    raw, out, _ = _steered_run(
        model,
        family,
        lambda: model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0),
        v,
        coeff=COEFF,
        positions="prompt",
    )
    assert torch.equal(out[0], raw[0] + COEFF * v)
    for before, after in zip(raw[1:], out[1:], strict=True):
        assert torch.equal(after, before)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_a_second_turn_that_repeats_the_first_is_a_new_prompt(tiny, positions, use_cache):
    """Multi-turn chat in one steer block: the second prompt starts with the first prompt and its answer,
    then more tokens. Its whole prompt pass is prompt, not a continuation of the first generation."""
    family, model = tiny
    v, first = _vector(), _ids(1, 5)
    generate = dict(do_sample=False, pad_token_id=0, use_cache=use_cache)

    def run():
        answer = model.generate(input_ids=first, max_new_tokens=3, **generate)  # [1, 8]
        second = torch.cat([answer, _ids(1, 4, seed=7)], dim=1)  # [1, 12], starts with `first`
        model.generate(input_ids=second, max_new_tokens=2, **generate)
        model(input_ids=second)  # a plain forward pass of the same prompt: also a new sequence
        return second

    raw, out, second = _steered_run(model, family, run, v, coeff=COEFF, positions=positions)
    assert torch.equal(second[:, :5], first)
    widths = [c.shape[1] for c in out]
    # Turn 1: the prompt, then 2 steps; turn 2: its prompt, then 1 step; then the forward pass.
    assert widths == ([5, 1, 1, 12, 1, 12] if use_cache else [5, 6, 7, 12, 13, 12])
    prompt_passes = [3, 5]
    for i in prompt_passes:
        expected = raw[i] + COEFF * v if positions == "prompt" else raw[i]
        assert torch.equal(out[i], expected), f"pass {i} of width {widths[i]}"
    # The decode step of turn 2 is generated: steered with "generated" only (under use_cache=False it
    # re-feeds the 12 prompt columns, which stay prompt, and one generated column).
    step = torch.zeros(widths[4], dtype=torch.bool)
    step[-1] = True
    chosen = step if positions == "generated" else ~step
    assert torch.equal(out[4][:, chosen], raw[4][:, chosen] + COEFF * v)
    assert torch.equal(out[4][:, ~chosen], raw[4][:, ~chosen])


def test_beam_search_without_the_cache_steers_the_generated_positions(tiny):
    """Beam search reorders its rows between steps; generate(use_cache=False) must still see one sequence."""
    _, model = tiny
    v, ids = 5 * _vector(), _ids(1, 5)
    kwargs = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    with steer(model, v, layer=LAYER, positions="generated"):
        cached = model.generate(input_ids=ids, **kwargs)
        uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    plain = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(uncached, cached)
    assert not torch.equal(cached, plain)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_pads_of_left_padded_rows_are_never_steered(tiny, positions):
    family, model = tiny
    v = _vector()
    ids, mask = _left_padded()

    def run():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
        )

    raw, out, _ = _steered_run(model, family, run, v, coeff=COEFF, positions=positions)
    pads = mask == 0
    assert torch.equal(out[0][pads], raw[0][pads])
    if positions in ("all", "prompt"):
        assert torch.equal(out[0][~pads], (raw[0] + COEFF * v)[~pads])
    for before, after in zip(raw[1:], out[1:], strict=True):
        expected = before + COEFF * v if positions in ("all", "generated") else before
        assert torch.equal(after, expected)


def test_indices_count_from_the_first_real_token(tiny):
    """Row 1 of a left-padded batch, steered at indices [0, 2], behaves like the same row alone."""
    _, model = tiny
    v = 5 * _vector()
    ids, mask = _left_padded()
    kwargs = dict(
        max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    with steer(model, v, layer=LAYER, positions=[0, 2]):
        batch = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        alone = model.generate(input_ids=ids[1:, 2:], attention_mask=mask[1:, 2:], **kwargs)
    without = model.generate(input_ids=ids[1:, 2:], attention_mask=mask[1:, 2:], **kwargs)
    torch.testing.assert_close(batch.logits[0][1], alone.logits[0][0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone.logits[0], without.logits[0], atol=1e-3)


def test_bf16_model_steers_in_its_dtype_and_leaves_the_vector_alone():
    family, model = "llama", make_tiny_model("llama").to(torch.bfloat16)
    v, ids = _vector(), _ids()
    original = v.clone()
    (raw,), (out,), _ = _steered_run(model, family, lambda: model(input_ids=ids), v, coeff=COEFF)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, raw + (COEFF * v).to(torch.bfloat16))
    assert torch.equal(v, original) and v.dtype == torch.float32
    with steer(model, v, layer=LAYER, op="ablate"):
        model(input_ids=ids)  # runs in bf16 without dtype errors


def test_half_precision_vectors_are_steered_at_float32_precision_trainable_or_not():
    """A trainable float16 vector was normalised in float16: a norm past 65504 is inf, its unit vector 0,
    and ablation did nothing; coeff * v past 65504 made the logits NaN. A frozen one was right."""
    family, model = "llama", make_tiny_model("llama")
    ids = _ids()
    big = (2e4 * _vector(5).sign()).half()  # norm 1.1e5
    for vector in (big, big.clone().requires_grad_()):
        (raw,), (out,), _ = _steered_run(
            model, family, lambda v=vector: model(input_ids=ids), vector, op="ablate"
        )
        unit = big.double() / big.double().norm()
        assert (out.double() @ unit).abs().max() < 1e-6 < (raw.double() @ unit).abs().max()
        small = torch.zeros(TINY_HIDDEN, dtype=torch.float16)
        small[3] = 70.0
        small.requires_grad_(vector.requires_grad)
        with steer(model, small, layer=LAYER, coeff=1000.0):  # 7e4 in float16 is inf
            assert torch.isfinite(model(input_ids=ids).logits).all()
    # a float64 model is steered at float64 precision (a float32 copy left ~1e-6 of the projection)
    model64 = make_tiny_model("llama").double()
    v = _vector(6).double()
    (raw,), (out,), _ = _steered_run(model64, family, lambda: model64(input_ids=ids), v, op="ablate")
    assert (out @ (v / v.norm())).abs().max() < 1e-12


def test_a_steering_vector_beyond_a_float16_models_range_is_refused():
    model = make_tiny_model("llama").half()
    v = torch.zeros(TINY_HIDDEN)
    v[3] = 1.0
    with steer(model, v, layer=LAYER, coeff=5e4):
        assert torch.isfinite(model(input_ids=_ids()).logits).all()
    for op in ("add", "clamp"):  # every logit was NaN, without a word
        with (
            pytest.raises(ValueError, match=r"70000 \(.*\) exceeds float16's range \(largest 65504\)"),
            steer(model, v, layer=LAYER, op=op, coeff=7e4),
        ):
            model(input_ids=_ids())
    # a vector past float32's norm (1.8e19) had an inf norm, so its unit vector was 0: ablation did nothing
    model = make_tiny_model("llama")
    big = _vector(9) * 1e20
    (raw,), (out,), _ = _steered_run(model, "llama", lambda: model(input_ids=_ids()), big, op="ablate")
    unit = big.double() / big.double().norm()
    assert (out.double() @ unit).abs().max() < 1e-6 < (raw.double() @ unit).abs().max()


def test_a_trained_vector_frozen_afterwards_still_steers():
    model = make_tiny_model("llama")
    v = _vector(10).requires_grad_()
    with steer(model, v, layer=LAYER, coeff=2.0):
        model(input_ids=_ids()).logits.sum().backward()
        v.requires_grad_(False)  # raised AttributeError: '_largest'
        frozen = model(input_ids=_ids()).logits
    with steer(model, v.detach().clone(), layer=LAYER, coeff=2.0):
        torch.testing.assert_close(frozen, model(input_ids=_ids()).logits)


def test_a_scoring_pass_that_asks_for_some_logits_is_all_prompt():
    """logits_to_keep marks drafted tokens only on generate's cache: scoring code passes it too."""
    model = make_tiny_model("llama")
    ids = _ids(1, 8)
    for kwargs in ({}, {"logits_to_keep": 4}):
        with pytest.warns(UserWarning, match="steered nothing"):
            (raw,), (out,), _ = _steered_run(
                model,
                "llama",
                lambda kwargs=kwargs: model(input_ids=ids, **kwargs),
                _vector(),
                positions="generated",
            )
        assert torch.equal(raw, out)


def test_no_hooks_remain_after_an_exception(tiny):
    _, model = tiny
    with (
        pytest.raises(RuntimeError, match="boom"),
        steer(model, _vector(), layer=LAYER, positions="generated"),
    ):
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    # An error raised inside the forward pass, by the tracker's hook (a 4-D mask), with the hooks attached
    with (
        pytest.raises(ValueError, match="2-D attention_mask"),
        steer(model, _vector(), layer=LAYER, positions="prompt"),
    ):
        assert _hook_count(model) > 0
        model(input_ids=_ids(), attention_mask=torch.ones(2, 1, 6, 6))
    assert _hook_count(model) == 0


def test_handle_remove_outside_with(tiny):
    family, model = tiny
    ids = _ids()
    plain = model(input_ids=ids).logits
    handle = steer(model, _vector(), layer=[0, 2], coeff=COEFF)
    assert sorted(handle.interventions) == [layer_path(family, 0), layer_path(family, 2)]
    assert not torch.allclose(model(input_ids=ids).logits, plain)
    handle.remove()
    handle.remove()
    assert _hook_count(model) == 0
    assert torch.equal(model(input_ids=ids).logits, plain)


def test_a_vector_per_layer_and_a_submodule_with_tuple_output(tiny):
    family, model = tiny
    v0, v2, ids = _vector(1), _vector(2), _ids()
    capture = ActivationCapture(device=None)
    with HookManager(model) as hooks:
        for i in (0, 2):
            hooks.add_forward_hook(layer_path(family, i), capture.make_hook(f"raw{i}"))
        with steer(model, {0: v0, layer_path(family, 2): v2}, coeff=COEFF) as handle:
            for i in (0, 2):
                handle.hooks.add_forward_hook(layer_path(family, i), capture.make_hook(f"out{i}"))
            model(input_ids=ids)
    assert torch.equal(capture.get("out0"), capture.get("raw0") + COEFF * v0)
    assert torch.equal(capture.get("out2"), capture.get("raw2") + COEFF * v2)
    # Attention modules return tuples; the first element is steered and the structure kept.
    attn = f"{layer_path(family, LAYER)}.{'attn' if family == 'gpt2' else 'self_attn'}"
    seen = []
    with steer(model, _vector(), module=attn, coeff=COEFF) as handle:
        handle.hooks.add_forward_hook(attn, lambda m, a, out: seen.append(type(out)))
        model(input_ids=ids)
    assert seen == [tuple]


def test_composable_hooks_with_a_hook_manager(tiny):
    family, model = tiny
    v, ids = _vector(), _ids()
    tracker = SequenceTracker()
    capture = ActivationCapture(device=None)
    with HookManager(model) as hooks:
        path = layer_path(family, LAYER)
        hooks.add_forward_hook(path, capture.make_hook("raw"))
        tracker.attach(hooks)
        hooks.add_forward_hook(path, add_vector(v, COEFF, positions=[2], tracker=tracker))
        hooks.add_forward_hook(path, clamp_direction(v, 0.0, positions=[3], tracker=tracker))
        hooks.add_forward_hook(path, capture.make_hook("out"))
        model(input_ids=ids)
    raw, out = capture.get("raw"), capture.get("out")
    assert torch.equal(out[:, 2], raw[:, 2] + COEFF * v)
    assert float((out[:, 3] @ (v / v.norm())).abs().max()) < 1e-5
    assert torch.equal(out[:, [0, 1, 4, 5]], raw[:, [0, 1, 4, 5]])
    # Without a tracker only positions="all" is possible.
    with pytest.raises(ValueError, match="SequenceTracker"):
        ablate_direction(v, positions="generated")


def test_relative_strength_uses_the_measured_norm(tiny):
    family, model = tiny
    texts = ["a b c d", "e f", "g h i", "j k l m n o"]
    norms = residual_norms(model, _FakeTokenizer(), texts, batch_size=3)
    assert sorted(norms) == list(range(TINY_LAYERS))
    # Reference: plain hooks on one padded batch, numpy median over the real tokens.
    batch = _FakeTokenizer()(texts, padding=True, return_tensors="pt")
    outputs = {}
    with HookManager(model) as hooks, torch.no_grad():
        for i in range(TINY_LAYERS):
            hooks.add_forward_hook(
                layer_path(family, i), lambda m, a, out, i=i: outputs.__setitem__(i, _plain(out))
            )
        model(**batch)
    real = batch["attention_mask"].bool().numpy()
    for i in range(TINY_LAYERS):
        expected = np.median(np.linalg.norm(outputs[i].double().numpy(), axis=-1)[real])
        assert norms[i] == pytest.approx(expected, rel=1e-5)
    # each text is read as it reads alone, whatever side the tokenizer pads on (absolute position embeddings
    # shifted by left padding changed GPT-2's norms by ~1%)
    alone = residual_norms(model, _FakeTokenizer(), texts, batch_size=1)
    assert norms == pytest.approx(alone, rel=1e-5)
    assert residual_norms(model, _FakeTokenizer("left"), texts, batch_size=3) == pytest.approx(
        alone, rel=1e-5
    )
    v, ids = _vector(), _ids()
    (raw,), (out,), _ = _steered_run(model, family, lambda: model(input_ids=ids), v, coeff=0.5, norm=norms)
    torch.testing.assert_close(
        out - raw, (0.5 * norms[LAYER] * v / v.norm()).expand_as(raw), rtol=1e-5, atol=1e-5
    )
    for bad in (-100.0, 0.0, float("nan"), "12"):  # -100 steered the other way, 0 not at all
        with pytest.raises(ValueError, match=rf"norm\[{LAYER}\] must be a positive number, got"):
            steer(model, v, layer=LAYER, coeff=0.5, norm={**norms, LAYER: bad})


def test_argument_errors(tiny):
    family, model = tiny
    v = _vector()
    with pytest.raises(ValueError, match="did you mean 'generated'"):
        steer(model, v, layer=LAYER, positions="generate")
    with pytest.raises(ValueError, match=">= 0"):
        steer(model, v, layer=LAYER, positions=[-1])
    with pytest.raises(TypeError, match="not a boolean mask"):  # was read as the indices 0 and 1
        steer(model, v, layer=LAYER, positions=torch.tensor([False, False, True]))
    with pytest.raises(ValueError, match=r"1-D tensor of token indices.*got shape \(2, 1\)"):  # was flattened
        steer(model, v, layer=LAYER, positions=torch.tensor([[0], [3]]))
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 2\]"):
        steer(model, v, layer=3)
    with pytest.raises(ValueError, match="say where"):
        steer(model, v)
    with pytest.raises(ValueError, match="did you mean 'clamp'"):
        steer(model, v, layer=LAYER, op="clam")
    with pytest.raises(ValueError, match="non-zero"):
        steer(model, torch.zeros(TINY_HIDDEN), layer=LAYER, op="ablate")
    with pytest.raises(ValueError, match="2-D attention_mask"), steer(model, v, layer=LAYER):
        model(input_ids=_ids(), attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match="already given"):
        steer(model, v, layer=[1, -2])
    # a TraitVector of another model: its module is missing here, and the message says whose vector it is
    from traitlens.monitor import token_projections
    from traitlens.vector import TraitVector

    other = TraitVector(v, model="HuggingFaceTB/SmolLM2-135M-Instruct", module="model.layers.18",
                        position="prompt_last", method="mean_diff")  # fmt: skip
    made_for = r"model\.layers\.18', which .* it was made for model 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    with pytest.raises(ValueError, match=made_for):
        steer(model, other)
    with pytest.raises(ValueError, match=made_for):
        token_projections(model, _FakeTokenizer(), other, "a b c")
    from traitlens.monitor import generate_with_projections

    here = TraitVector(v, model="tiny", module=layer_path(family, LAYER), position="prompt_last",
                       method="mean_diff")  # fmt: skip
    from transformers import GenerationConfig

    for option in (
        {"use_cache": False},
        {"num_beams": 3},
        {"num_return_sequences": 2},
        # draft tokens that generate may reject were scored and passed to on_token
        {"prompt_lookup_num_tokens": 3},
        # no slot for the last token's feed: an IndexError after the whole generation
        {"cache_implementation": "static"},
        # self-speculative decoding: the prompt's scores came back as the answer's, on_token called 19 times
        {"assistant_early_exit": 1},
    ):
        with pytest.raises(
            ValueError, match=rf"one sequence fed token by token .* take {next(iter(option))}="
        ):
            generate_with_projections(model, _FakeTokenizer(), here, "a b c", **option)
    from transformers import DynamicCache

    keyword = cache_keyword(model)
    filled = DynamicCache()
    with torch.no_grad():
        model(
            input_ids=_ids(1, 2), **{keyword: filled}, use_cache=True
        )  # a chat so far: 8 scores for 10 tokens
    with pytest.raises(ValueError, match=rf"take {keyword}=DynamicCache \(holding 2 positions\)"):
        generate_with_projections(model, _FakeTokenizer(), here, "a b c", **{keyword: filled})
    with pytest.raises(
        ValueError, match="take num_beams=2"
    ):  # in a generation config too: was a RuntimeError
        generate_with_projections(
            model, _FakeTokenizer(), here, "a b c", generation_config=GenerationConfig(num_beams=2)
        )
    with pytest.raises(ValueError, match="text is an empty string"):  # was 'examples[0] is ...'
        token_projections(model, _FakeTokenizer(), here, "")
    with pytest.raises(ValueError, match="prompt is an empty string"):
        generate_with_projections(model, _FakeTokenizer(), here, "")
    for monitor in (token_projections, generate_with_projections):  # was an AttributeError: 'check_model'
        with pytest.raises(TypeError, match=r"vector must be a TraitVector .* got Tensor"):
            monitor(model, _FakeTokenizer(), v, "a b c")
    assert _hook_count(model) == 0


class _FakeTokenizer:
    """Maps each whitespace-separated word to an id; a list of texts comes back right-padded with 0, as a
    batch; a single text as its ids (as ``encode_examples`` asks). No pad token, no chat template."""

    chat_template = None

    def __init__(self, padding_side: str = "right"):
        self.padding_side = padding_side

    def __call__(self, texts, return_tensors="pt", padding=True, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": [3 + (sum(map(ord, w)) % 120) for w in texts.split()]}
        rows = [self(t)["input_ids"] for t in texts]
        width = max(map(len, rows))

        def pad(row, value):
            fill = [value] * (width - len(row))
            return fill + row if self.padding_side == "left" else row + fill

        ids = torch.tensor([pad(r, 0) for r in rows])
        mask = torch.tensor([pad([1] * len(r), 0) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------------
# dose_response on a tiny model with a character tokenizer


class _CharTokenizer:
    """One id per character (3 + code % 120); pad 0, eos 2; no chat template."""

    pad_token_id, eos_token_id, chat_template = 0, 2, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + (i - 3) % 26) for i in ids if not (skip_special_tokens and i < 3))


def test_dose_response_scores_with_the_unsteered_model(tiny):
    from traitlens.dose_response import _score, compare_generations, dose_response

    family, model = tiny
    tokenizer, v = _CharTokenizer(), _vector()
    prompts = ["the cat", "a longer prompt here"]
    rows = compare_generations(
        model, tokenizer, prompts, v, [0.0, 30.0], layer=LAYER, max_new_tokens=5, chat=False
    )
    assert [(r["prompt"], r["coeff"]) for r in rows] == [(p, c) for p in prompts for c in (None, 0.0, 30.0)]
    assert all(rows[i]["text"] == rows[i + 1]["text"] for i in (0, 3))  # adding 0 * v changes nothing
    ablated = compare_generations(  # ablation takes no coefficient: one steered row per prompt
        model, tokenizer, prompts, v, [-0.3, 0.3], layer=LAYER, op="ablate", max_new_tokens=5, chat=False
    )
    assert [(r["prompt"], r["coeff"]) for r in ablated] == [(p, c) for p in prompts for c in (None, 0.0)]
    table = dose_response(
        model, tokenizer, prompts, v, [-30.0, 0.0, 30.0], layer=LAYER, max_new_tokens=5, chat=False
    )
    assert [r["coeff"] for r in table] == [-30.0, 0.0, 30.0]
    same = dose_response(  # numpy float32 coefficients are numbers too
        model, tokenizer, prompts, v, np.array([-30.0, 0.0, 30.0], dtype=np.float32), layer=LAYER,
        max_new_tokens=5, chat=False,
    )  # fmt: skip
    assert same == table
    assert all(np.isfinite(r["projection"]) and r["perplexity"] > 1.0 and r["n_tokens"] > 0 for r in table)
    # _score against a reference: transformers' own loss over the response tokens, and hooks on the layer.
    generated = [([5, 9, 14, 7], [11, 3, 2]), ([8, 8], [40, 41, 42, 43])]
    unit = v / v.norm()
    projection, nll, count = _score(
        model, _CharTokenizer(), generated, layer_path(family, LAYER), unit, batch_size=1
    )
    expected_nll, expected_projection = 0.0, 0.0
    for prompt, response in generated:
        ids = torch.tensor([prompt + response])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        seen: list[torch.Tensor] = []
        with HookManager(model) as hooks, torch.no_grad():
            hooks.add_forward_hook(
                layer_path(family, LAYER), lambda m, a, out, seen=seen: seen.append(_plain(out))
            )
            expected_nll += float(model(input_ids=ids, labels=labels).loss) * len(response)
        expected_projection += float((seen[0][0, len(prompt) :] @ unit).sum())
    assert count == 7
    assert nll == pytest.approx(expected_nll, rel=1e-5)
    assert projection == pytest.approx(expected_projection, rel=1e-5, abs=1e-5)


def test_dose_response_refuses_what_it_cannot_measure_and_warns_of_dropout():
    from traitlens.dose_response import compare_generations, dose_response

    model, tokenizer = make_tiny_model("gpt2"), _CharTokenizer()
    run = functools.partial(
        dose_response, model, tokenizer, ["the cat"], layer=LAYER, max_new_tokens=2, chat=False
    )
    with pytest.raises(ValueError, match="needs a non-zero vector"):
        run(torch.zeros(TINY_HIDDEN), [1.0])  # its projections were NaN
    for bad in (0, -1, 2.0, True):  # -1 said "nothing was generated"; 0 and 2.0 failed inside range()
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bad!r}"):
            run(_vector(), [1.0], batch_size=bad)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bad!r}"):
            compare_generations(model, tokenizer, ["the cat"], _vector(), [1.0], layer=LAYER, batch_size=bad)
    model.train()  # GPT-2's dropout made two runs of the same call differ, silently
    with pytest.warns(UserWarning, match="training mode, so its dropout"):
        run(_vector(), [1.0])
    assert model.training  # the mode is the user's


@pytest.mark.parametrize("op", ["add", "ablate", "clamp"])
def test_a_first_pass_under_inference_mode_does_not_break_a_later_backward(tiny, op):
    _, model = tiny
    v, ids = _vector(), _ids()
    with steer(model, v, layer=LAYER, op=op, coeff=2.0):
        with torch.inference_mode():
            model(input_ids=ids)
        model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    with torch.inference_mode():  # made under inference mode (its vector copy and position indices too)
        handle = steer(model, v, layer=LAYER, op=op, coeff=2.0, positions=[0, 2])
    with handle:
        model(input_ids=ids).logits.sum().backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("op", ["add", "ablate"])
def test_a_vector_that_requires_grad_gets_the_gradient_of_a_manual_hook(tiny, op):
    family, model = tiny
    ids, start = _ids(), _vector()
    path = layer_path(family, LAYER)

    def manual(module, args, output):
        h, unit = output[0] if isinstance(output, tuple) else output, w / w.norm()
        new = h + 2.0 * w if op == "add" else h - (h @ unit).unsqueeze(-1) * unit
        return (new, *output[1:]) if isinstance(output, tuple) else new

    w = start.clone().requires_grad_()
    with HookManager(model) as hooks:
        hooks.add_forward_hook(path, manual)
        model(input_ids=ids).logits.square().mean().backward()
    v = start.clone().requires_grad_()
    with steer(model, v, layer=LAYER, op=op, coeff=2.0):
        model(input_ids=ids).logits.square().mean().backward()
        model(input_ids=ids).logits.square().mean().backward()  # a second pass builds its own graph
    torch.testing.assert_close(v.grad, 2 * w.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="norm=None"):
        steer(model, v, layer=LAYER, coeff=0.5, norm=10.0)
    model.zero_grad(set_to_none=True)


def test_a_new_or_edited_vector_applies_from_the_next_call(tiny):
    _, model = tiny
    ids, v, w = _ids(), _vector(1), _vector(2)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steer(model, w, layer=LAYER, coeff=3.0):
            want = model(input_ids=ids).logits
        with steer(model, v, layer=LAYER, coeff=3.0) as handle:
            model(input_ids=ids)
            (intervention,) = handle.interventions.values()
            intervention.vector = w
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
            intervention.vector.mul_(0.0)  # in place: adds zeros from now on
            torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_a_next_turn_fed_onto_the_cache_and_a_chunked_prefill_are_prompt(positions):
    """Several positions on a filled cache are more prompt, not generated tokens: the second turn of a
    chat that reuses the first turn's cache, and the chunks of generate(prefill_chunk_size=...)."""
    family, model = "llama", make_tiny_model("llama")
    v, first = _vector(), _ids(1, 5)
    generate = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)

    def run():
        turn = model.generate(input_ids=first, max_new_tokens=3, **generate)  # prompt, then 2 steps
        second = torch.cat([turn.sequences, _ids(1, 4, seed=7)], dim=1)  # [1, 12]; the cache holds 7
        cache = {cache_keyword(model): turn.past_key_values}
        model.generate(input_ids=second, **cache, max_new_tokens=2, **generate)
        model.generate(input_ids=_ids(1, 6, seed=8), prefill_chunk_size=2, max_new_tokens=2, **generate)

    raw, out, _ = _steered_run(model, family, run, v, coeff=COEFF, positions=positions)
    assert [c.shape[1] for c in out] == [5, 1, 1, 5, 1, 2, 2, 2, 1]
    prompt_passes = {0, 3, 5, 6, 7}  # turn 1's prompt, turn 2's new columns, the three chunks
    for i, (before, after) in enumerate(zip(raw, out, strict=True)):
        steered = (i in prompt_passes) == (positions == "prompt")
        assert torch.equal(after, before + COEFF * v if steered else before), f"pass {i}"


def test_growing_prefixes_of_your_own_are_each_a_new_prompt(tiny):
    """Only a pass with use_cache=False (as generate(use_cache=False) makes) that extends the last one by a
    token counts as a generation step; scoring prefixes one after the other reads each as a prompt."""
    family, model = tiny
    v, ids = _vector(), _ids(1, 6)

    def run():
        model(input_ids=ids[:, :5])
        model(input_ids=ids)
        model(input_ids=ids[:, :5], use_cache=False)
        model(input_ids=ids, use_cache=False)

    raw, out, _ = _steered_run(model, family, run, v, coeff=COEFF, positions="prompt")
    for i in range(3):
        assert torch.equal(out[i], raw[i] + COEFF * v), f"pass {i}"
    assert torch.equal(out[3][:, :5], raw[3][:, :5] + COEFF * v)  # a step of generate(use_cache=False)
    assert torch.equal(out[3][:, 5:], raw[3][:, 5:])


def test_positions_set_on_an_intervention_are_checked_as_in_the_constructor(tiny):
    family, model = tiny
    v, ids, path = _vector(), _ids(), layer_path(family, LAYER)
    before, after = ActivationCapture(device=None), ActivationCapture(device=None)
    with HookManager(model) as first:
        first.add_forward_hook(path, before.make_hook("h"))
        with steer(model, v, layer=LAYER, coeff=COEFF, positions="prompt") as handle:
            handle.hooks.add_forward_hook(path, after.make_hook("h"))
            (intervention,) = handle.interventions.values()
            with pytest.raises(ValueError, match="did you mean 'generated'"):
                intervention.positions = "generate"
            assert intervention.positions == "prompt"
            intervention.positions = [0, 2]  # a list, as steer(positions=[0, 2]) takes
            model(input_ids=ids)
    moved = (after.get("h") - before.get("h")).abs().amax(dim=(0, 2))  # [seq]
    assert moved.nonzero().flatten().tolist() == [0, 2]
    lone = add_vector(v, COEFF)  # no tracker: only "all"
    with pytest.raises(ValueError, match="needs a SequenceTracker"):
        lone.positions = "prompt"


def test_a_vector_of_another_width_is_refused_before_any_hook_is_added(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match=r"(model\.layers|transformer\.h)\.2'.*hidden size 100.*output 32"):
        steer(model, {1: _vector(), 2: torch.randn(100)})
    assert _hook_count(model) == 0
    with pytest.raises(ValueError, match="static cache"), steer(model, _vector(), layer=LAYER):
        model(input_ids=_ids(), attention_mask=torch.ones(2, 1, 6, 6))


def test_a_peft_wrapped_model_is_steered_during_its_generate_as_the_model_inside():
    """A PEFT model's generate calls the model inside, not its own forward: the tracker sits on that model."""
    import peft

    model = make_tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    settings = dict(attention_mask=(ids > 0).long(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    v = torch.randn(TINY_HIDDEN, generator=torch.Generator().manual_seed(0))
    for positions in ("generated", "prompt"):
        with steer(wrapped, v, layer=1, coeff=4.0, positions=positions):
            got = wrapped.generate(input_ids=ids, **settings)
        with steer(
            model, v, layer=1, coeff=4.0, positions=positions
        ):  # the same weights, LoRA layers included
            expected = model.generate(input_ids=ids, **settings)
        assert torch.equal(got, expected)
    assert not torch.equal(got, wrapped.generate(input_ids=ids, **settings))  # the steering does something
    # a module path as in the plain model names the same layer in the wrapper; one neither has is refused
    with steer(wrapped, v, module="model.layers.1", coeff=4.0, positions="prompt") as handle:
        assert list(handle.interventions) == ["base_model.model.model.layers.1"]
        assert torch.equal(wrapped.generate(input_ids=ids, **settings), expected)
    with pytest.raises(ValueError, match=r"no module 'model\.layers\.9'"):
        steer(wrapped, v, module="model.layers.9")
    from traitlens.monitor import generate_with_projections
    from traitlens.vector import TraitVector

    # a vector names its module as in the plain model; the wrapper finds it under the model inside
    vector = TraitVector(v, model="tiny", module="model.layers.1", position="all", method="mean_diff")
    assert vector.module_in(wrapped) == "base_model.model.model.layers.1"
    assert vector.module_in(model) == "model.layers.1"
    with steer(wrapped, vector, coeff=4.0, positions="prompt"):  # as the last `expected`
        assert torch.equal(wrapped.generate(input_ids=ids, **settings), expected)
    scores = [  # the plain model's path, then each model's own
        generate_with_projections(m, _CharTokenizer(), vec, "abc", max_new_tokens=4, chat=False).scores
        for m in (wrapped, model)
        for vec in (vector, dataclasses.replace(vector, module=vector.module_in(m)))
    ]
    assert all(torch.equal(scores[0], s) for s in scores[1:]) and len(scores[0]) == 3 + 4
    from traitlens.monitor import token_projections

    assert torch.equal(
        token_projections(wrapped, _CharTokenizer(), vector, "abcd", chat=False).scores,
        token_projections(model, _CharTokenizer(), vector, "abcd", chat=False).scores,
    )


def test_assisted_and_prompt_lookup_decoding_are_steered_as_plain_generate():
    """Their passes check drafted tokens several at a time on the cache: read as more prompt, "generated"
    steered nothing with an assistant model (the unsteered text) and half with prompt lookup."""
    import copy

    model = make_tiny_model("qwen2")
    draft = copy.deepcopy(model)
    v, prompt = 3 * _vector(7), torch.tensor([[5, 17, 33, 9, 40]])
    settings = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": 8, "min_new_tokens": 8}
    with torch.no_grad():
        plain = model.generate(prompt, **settings)
        for positions in ("generated", "prompt"):
            with steer(model, v, layer=LAYER, positions=positions):
                expected = model.generate(prompt, **settings)
            assert not torch.equal(expected, plain)
            for how in ({"assistant_model": draft}, {"prompt_lookup_num_tokens": 3}):
                with steer(model, v, layer=LAYER, positions=positions):
                    assert torch.equal(model.generate(prompt, **how, **settings), expected), (positions, how)


def test_a_generation_from_a_cache_of_its_own_prefix_is_a_new_sequence():
    """An earlier, longer generation in the same block made this one's generated tokens count as prompt."""
    import copy

    from transformers import DynamicCache

    model = make_tiny_model("llama")
    v, keyword = 3 * _vector(8), cache_keyword(model)

    def prefix_cache(prompt):  # all but the prompt's last token, computed before steering
        cache = DynamicCache()
        with torch.no_grad():
            model(prompt[:, :-1], **{keyword: cache}, use_cache=True)
        return cache

    long, short = torch.arange(5, 16)[None], torch.arange(20, 25)[None]
    caches = prefix_cache(long), prefix_cache(short)
    settings = {"do_sample": False, "max_new_tokens": 5, "min_new_tokens": 5, "pad_token_id": 0}
    with torch.no_grad():
        with steer(model, v, layer=LAYER, positions="generated"):
            alone = model.generate(short, **{keyword: copy.deepcopy(caches[1])}, **settings)
        with steer(model, v, layer=LAYER, positions="generated"):
            model.generate(long, **{keyword: copy.deepcopy(caches[0])}, **settings)
            after = model.generate(short, **{keyword: copy.deepcopy(caches[1])}, **settings)
        plain = model.generate(short, **{keyword: copy.deepcopy(caches[1])}, **settings)
    assert torch.equal(after, alone) and not torch.equal(alone, plain)


def test_a_static_cache_is_named_whatever_form_its_mask_takes():
    model = make_tiny_model("qwen2")  # its static-cache masks come as a dict (sliding-window option)
    ids = torch.tensor([[5, 17, 33, 9]])
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "cache_implementation": "static"}
    with (
        pytest.raises(ValueError, match=r"got dict .* generate with a static cache"),  # was "pass the mask"
        steer(model, _vector(), layer=LAYER, positions="generated"),
        torch.no_grad(),
    ):
        model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
