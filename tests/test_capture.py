import itertools

import pytest
import torch
from tests.conftest import TINY_HIDDEN, TINY_LAYERS, layer_path, make_tiny_model

from traitlens import ActivationCapture, HookManager, last_token_index, output_tensor
from traitlens import capture as capture_module


def _capture_layers(model, family, **forward_kwargs):
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        for i in range(TINY_LAYERS):
            hooks.add_forward_hook(layer_path(family, i), capture.make_hook(f"layer_{i}"))
        with torch.no_grad():
            out = model(**forward_kwargs, output_hidden_states=True)
    return capture, out


def test_layer_outputs_equal_output_hidden_states(tiny):
    family, model = tiny
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    capture, out = _capture_layers(model, family, input_ids=ids)
    # hidden_states[i + 1] is the output of layer i; the last entry is after the final norm instead.
    for i in range(TINY_LAYERS - 1):
        got = capture.get(f"layer_{i}")
        assert got.shape == (2, 7, TINY_HIDDEN)
        torch.testing.assert_close(got, out.hidden_states[i + 1], rtol=0, atol=0)


def test_passes_of_equal_shape_concatenate_along_batch():
    model = make_tiny_model("llama")
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model.layers.1", capture.make_hook("l1"))
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
            model(torch.tensor([[8, 9, 10], [11, 12, 13]]))
    assert capture.get("l1").shape == (3, 3, TINY_HIDDEN)
    assert [c.shape[0] for c in capture.get("l1", concat=False)] == [1, 2]


def test_one_name_holds_the_outputs_of_one_module():
    model = make_tiny_model("llama")
    capture = ActivationCapture()
    ids = torch.tensor([[5, 6, 7]])
    with HookManager(model) as hooks, torch.no_grad():  # the same name on every layer: stacked along batch
        for i in range(TINY_LAYERS):
            hooks.add_forward_hook(f"model.layers.{i}", capture.make_hook("resid"))
        with pytest.raises(ValueError, match=r"'resid' already holds outputs of another module.*make_hook"):
            model(ids)
    assert capture.get("resid").shape == (1, 3, TINY_HIDDEN)  # layer 0's, stored before layer 1 refused
    capture.clear("resid")  # frees the name for another module
    with HookManager(model) as hooks, torch.no_grad():
        hooks.add_forward_hook("model.layers.1", capture.make_hook("resid"))
        model(ids)
        model(ids)  # the same module again: more examples, as before
    assert capture.get("resid").shape == (2, 3, TINY_HIDDEN)


def test_mixed_shapes_raise_with_advice():
    model = make_tiny_model("gpt2")
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook("transformer.h.0", capture.make_hook("h0"))
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
            model(torch.tensor([[5, 6, 7, 8, 9]]))
    with pytest.raises(ValueError, match=r"\(1, 3, 32\), \(1, 5, 32\).*concat=False.*clear\(\)"):
        capture.get("h0")


def test_generate_capture_has_promised_shape_and_matches_full_forward(tiny):
    family, model = tiny
    prompt = torch.tensor([[5, 17, 33, 9], [4, 8, 15, 16]])
    new_tokens = 6
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook(layer_path(family, 1), capture.make_hook("l1"))
        with torch.no_grad():
            seq = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
    got = capture.get("l1")
    assert got.shape == (2, 4 + new_tokens - 1, TINY_HIDDEN)
    # The same positions from one forward pass over the generated sequence (minus the last token).
    reference, _ = _capture_layers(model, family, input_ids=seq[:, :-1])
    torch.testing.assert_close(got, reference.get("layer_1"), rtol=1e-4, atol=1e-5)


def test_generate_with_left_padding_matches_forward_on_real_tokens():
    model = make_tiny_model("qwen2")
    prompt = torch.tensor([[0, 0, 5, 17], [4, 8, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model.layers.2", capture.make_hook("l2"))
        with torch.no_grad():
            seq = model.generate(
                prompt,
                attention_mask=mask,
                max_new_tokens=3,
                min_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
            )
    got = capture.get("l2")
    assert got.shape == (2, 4 + 3 - 1, TINY_HIDDEN)
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], dim=1)
    reference, _ = _capture_layers(model, "qwen2", input_ids=seq[:, :-1], attention_mask=full_mask)
    real = full_mask.bool()
    torch.testing.assert_close(got[real], reference.get("layer_2")[real], rtol=1e-4, atol=1e-5)


def _generate_capture(capture, prompt, mask, new_tokens=3):
    model = make_tiny_model("qwen2")
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model.layers.2", capture.make_hook("l2"))
        with torch.no_grad():
            seq = model.generate(
                prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
    return model, seq


@pytest.mark.parametrize("positions", [-1, slice(-1, None)])
def test_a_position_per_pass_in_generate_comes_back_in_step_order(positions):
    """With a selector, the prompt pass and each decode step give one position each: they must be joined
    along the sequence ([batch, passes, hidden]), not stacked as more examples along batch."""
    prompt = torch.tensor([[0, 0, 5, 17], [4, 8, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    capture = ActivationCapture(positions=positions)
    model, seq = _generate_capture(capture, prompt, mask)
    got = capture.get("l2")
    assert got.shape == (2, 1 + 2, TINY_HIDDEN)  # the last prompt token, then the 2 decode steps
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], dim=1)
    reference, _ = _capture_layers(model, "qwen2", input_ids=seq[:, :-1], attention_mask=full_mask)
    torch.testing.assert_close(got, reference.get("layer_2")[:, 3:], rtol=1e-4, atol=1e-5)


def test_an_index_made_for_the_prompt_refuses_the_decode_steps_of_generate():
    prompt = torch.tensor([[0, 0, 5, 17], [4, 8, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    index = ActivationCapture(positions=torch.zeros(2, dtype=torch.long))  # one index, passes of 5 and 7
    for length in (5, 7):
        index.store("x", torch.randn(2, length, 8))
    assert [tuple(c.shape) for c in index.get("x", concat=False)] == [(2, 8), (2, 8)]
    capture = ActivationCapture(positions=last_token_index(mask))  # index 3 does not exist in a step
    with pytest.raises(ValueError, match=r"passes of 4 positions.*a pass of 1 \(a decode step.*e.g. -1"):
        _generate_capture(capture, prompt, mask)


def test_a_selected_position_kept_on_the_device_is_a_copy_not_a_view_of_the_whole_output():
    """With ``device=None`` off the CPU (a GPU; here the meta device, which needs no GPU), an int or slice
    selection is a view: stored as is, it would keep the whole ``[batch, seq, hidden]`` output alive."""
    output = torch.empty(2, 5, 8, device="meta")
    for positions in (-1, slice(-2, None)):
        capture = ActivationCapture(device=None, positions=positions)
        capture.store("x", output)
        chunk = capture.get("x")
        assert chunk.device.type == "meta" and chunk.untyped_storage().nbytes() == chunk.nbytes


def test_weighted_positions_average_bf16_activations_in_float32():
    torch.manual_seed(0)
    hidden = (torch.randn(2, 33, 64) * 4 + 10).to(torch.bfloat16)
    weights = torch.ones(2, 33) / 33  # 1/33 is not a bf16 number
    capture = ActivationCapture(device=None, positions=weights)
    capture.store("x", hidden)
    got = capture.get("x")
    want = hidden.double().mean(dim=1)
    assert got.dtype == torch.float32
    assert float(((got.double() - want).abs() / want.abs()).max()) < 1e-6


def test_tuple_output_takes_first_element_not_batch_row():
    model = make_tiny_model("llama")
    capture = ActivationCapture()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model.layers.0.self_attn", capture.make_hook("attn"))
        hooks.add_forward_hook("model.layers.0.self_attn.o_proj", capture.make_hook("o_proj"))
        with torch.no_grad():
            model(ids)
    assert capture.get("attn").shape == (2, 3, TINY_HIDDEN)
    torch.testing.assert_close(capture.get("attn"), capture.get("o_proj"))


def test_output_tensor_of_each_structure():
    x = torch.randn(2, 3, 4)
    assert output_tensor(x) is x
    assert output_tensor((x, None)) is x
    assert output_tensor({"hidden": x, "other": 1}) is x
    with pytest.raises(TypeError, match="cannot find an activation tensor"):
        output_tensor((None, x))


def test_model_output_from_a_whole_submodel():
    model = make_tiny_model("llama")
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model", capture.make_hook("base"))
        with torch.no_grad():
            out = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    torch.testing.assert_close(capture.get("base"), out.hidden_states[-1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_positions_are_padding_safe(side):
    model = make_tiny_model("llama")
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    capture = ActivationCapture(positions=last_token_index(mask))
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model.layers.2", capture.make_hook("last"))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    got = capture.get("last")
    assert got.shape == (2, TINY_HIDDEN)
    for i, r in enumerate(rows):  # each row alone, unpadded
        alone, _ = _capture_layers(model, "llama", input_ids=torch.tensor([r]))
        torch.testing.assert_close(got[i], alone.get("layer_2")[0, -1], rtol=1e-4, atol=1e-5)


def test_dtype_device_and_bookkeeping():
    model = make_tiny_model("gpt2")
    capture = ActivationCapture(device=None, dtype=torch.bfloat16, positions=slice(-2, None))
    with HookManager(model) as hooks:
        hooks.add_forward_hook("transformer.h.1", capture.make_hook("h1"))
        hooks.add_forward_hook("transformer.h.2", capture.make_hook("h2"))
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7, 8]]))
    got = capture.get("h1")
    assert got.dtype == torch.bfloat16 and got.shape == (1, 2, TINY_HIDDEN) and not got.requires_grad
    assert capture.keys() == ["h1", "h2"] and len(capture) == 2 and "h1" in capture
    assert capture.memory_usage["h1"] == pytest.approx(2 * TINY_HIDDEN * 2 / 2**20)
    capture.clear("h1")
    assert "h1" not in capture and len(capture) == 1
    with pytest.raises(KeyError, match=r"captured: 'h2'; did you mean 'h2'\?"):
        capture.get("h1")
    capture.clear()
    assert len(capture) == 0


def test_stored_activations_are_detached_copies_not_views_of_grad_graph():
    model = make_tiny_model("llama")
    capture = ActivationCapture()
    with HookManager(model) as hooks:
        hooks.add_forward_hook("model.layers.0", capture.make_hook("l0"))
        model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    assert not capture.get("l0").requires_grad


def test_host_slabs_hand_out_disjoint_aligned_views_that_outlive_the_allocator():
    from traitlens.capture import _HostSlabs

    slabs = _HostSlabs(pin_memory=False, first=1 << 20)  # the bookkeeping is the same; pinning needs a GPU
    big = 1 << 18
    shapes = [(big // 2,), (2, big // 2), (600_000,), (big,), (4, 3), (3, 5)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.uint8, torch.uint8, torch.float32]
    pieces = [slabs.empty(torch.Size(s), d) for s, d in zip(shapes, dtypes, strict=True)]
    for piece, shape, dtype in zip(pieces, shapes, dtypes, strict=True):
        assert piece.shape == shape and piece.dtype == dtype and piece.is_contiguous()
        assert piece.data_ptr() % _HostSlabs.ALIGN == 0
    for i, piece in enumerate(pieces):  # write distinct values everywhere, then check none was overwritten
        piece.copy_(torch.full(piece.shape, i + 1).to(piece.dtype))
    for i, piece in enumerate(pieces):
        assert bool((piece == i + 1).all())
    storage = [p.untyped_storage() for p in pieces]
    # the 0.5 MiB chunk opened a slab for four of its size (2 MiB); the next 0.5 MiB went in with it
    assert storage[0].nbytes() == 1 << 21 and storage[0].data_ptr() == storage[1].data_ptr()
    # the 2.4 MB chunk did not fit the 1 MiB left: it opened a 16 MiB slab (4 x 2.4 MB, rounded up to a
    # power of two), and the 256 KiB one and the small ones after it went into that slab's free tail
    assert storage[2].nbytes() == 1 << 24
    assert {s.data_ptr() for s in storage[2:]} == {storage[2].data_ptr()}
    del slabs  # the allocator is gone; the pieces keep their slabs alive
    assert bool((pieces[1] == 2).all())


def test_host_slabs_grow_geometrically_up_to_the_largest_size():
    from traitlens.capture import _HostSlabs

    slabs = _HostSlabs(pin_memory=False, first=1 << 20)
    sizes = []
    for _ in range(6):
        piece = slabs.empty(torch.Size([1 << 18]), torch.uint8)  # 256 KiB: fills a slab, or opens one
        sizes.append(piece.untyped_storage().nbytes())
    assert sizes == [1 << 20] * 4 + [1 << 21] * 2  # four fill the first slab; the next one is twice as large
    slabs._next = _HostSlabs.LARGEST
    slabs.empty(torch.Size([(1 << 21) + 1]), torch.uint8)
    assert slabs._next == _HostSlabs.LARGEST


def test_host_slabs_hold_several_large_chunks_each():
    """A chunk just over half a power of two must not get a slab of its own (pinned: nearly twice the
    memory it needs): a slab opened by a chunk holds at least four of its size."""
    from traitlens.capture import _HostSlabs

    slabs = _HostSlabs(pin_memory=False, first=1 << 20)
    chunk = torch.Size([(1 << 21) + 4096])  # 2 MiB + 4 KiB: a power of two above it would be 4 MiB
    pieces = [slabs.empty(chunk, torch.uint8) for _ in range(8)]
    slab_of = [p.untyped_storage().data_ptr() for p in pieces]
    assert len(set(slab_of[:7])) == 1 and slab_of[7] != slab_of[0]  # 16 MiB: seven of them, the eighth next
    held = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in pieces}.values())
    assert pieces[0].untyped_storage().nbytes() == 1 << 24 and held / (8 * chunk[0]) < 2.0

    class Small(_HostSlabs):  # chunks above LARGEST / 4 get room for two, not four: pinned memory is bounded
        LARGEST = 1 << 22

    big = Small(pin_memory=False, first=1 << 20).empty(chunk, torch.uint8)
    assert big.untyped_storage().nbytes() == 1 << 23  # 2 x (2 MiB + 4 KiB), rounded up to a power of two


def test_host_slabs_put_every_chunk_however_small_in_a_slab():
    from traitlens.capture import _HostSlabs

    slabs = _HostSlabs(pin_memory=False, first=1 << 20)
    shapes = [(16, 1, 576), (3,), (16, 1, 576), (0, 5), (7, 9)]
    dtypes = [torch.bfloat16, torch.float64, torch.float32, torch.float32, torch.int8]
    pieces = [slabs.empty(torch.Size(s), d) for s, d in zip(shapes, dtypes, strict=True)]
    for i, (piece, shape, dtype) in enumerate(zip(pieces, shapes, dtypes, strict=True)):
        assert piece.shape == shape and piece.dtype == dtype and piece.is_contiguous()
        assert piece.data_ptr() % _HostSlabs.ALIGN == 0
        assert piece.untyped_storage().nbytes() == 1 << 20  # all in the first slab
        piece.copy_(torch.full(shape, i + 1).to(dtype))
    for i, piece in enumerate(pieces):
        assert bool((piece == i + 1).all())
    ends = sorted((p.data_ptr(), p.data_ptr() + p.nbytes) for p in pieces if p.numel())
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(ends))  # disjoint


def test_get_returns_a_single_chunk_as_stored_and_joins_small_results_into_the_small_slabs():
    capture = ActivationCapture()
    small, big = torch.randn(16, 576), torch.randn(8, 64, 576)  # 36 KiB and 1.1 MiB
    capture.store("small", small)
    capture.store("big", big)
    capture.store("passes", small)
    capture.store("passes", small)  # two chunks: joined by get
    out, stored = capture.get("small"), capture.get("small", concat=False)[0]
    assert out.data_ptr() == stored.data_ptr()  # no copy
    assert out.untyped_storage().nbytes() == 1 << 20  # a piece of a 1 MiB slab
    torch.testing.assert_close(out, small, rtol=0, atol=0)
    whole = capture.get("big")
    assert whole.data_ptr() == capture.get("big", concat=False)[0].data_ptr()
    assert whole.untyped_storage().nbytes() == 1 << 28  # a piece of a 256 MiB slab
    joined = capture.get("passes")
    assert joined.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()  # the same small slab
    torch.testing.assert_close(joined, torch.cat([small, small]), rtol=0, atol=0)
    again = capture.get("passes")  # a new piece each time: the first result is not overwritten
    assert again.data_ptr() != joined.data_ptr()
    large = ActivationCapture()
    large.store("x", big)
    large.store("x", big)
    assert large.get("x").untyped_storage().nbytes() == 2 * big.nbytes  # 256 KiB or more: new memory


def test_a_small_single_chunk_copied_from_a_gpu_is_handed_out_of_the_pinned_slab():
    """A last token copied from a GPU sits in a pinned slab of 1 MiB or more: ``get`` copies it into the
    capture's small host slab, so that a kept result does not hold pinned memory. Simulated on the CPU."""
    capture = ActivationCapture()
    capture._pinned = type(capture._pinned)(pin_memory=False, first=1 << 20)  # as on a GPU, pinned
    small, big = torch.randn(16, 576), torch.randn(8, 64, 576)
    for name, x in (("small", small), ("big", big)):
        capture._store.setdefault(name, []).append(capture._pinned.empty(x.shape, x.dtype).copy_(x))
        capture._lengths.setdefault(name, []).append(0)
    out, stored = capture.get("small"), capture.get("small", concat=False)[0]
    assert out.untyped_storage().data_ptr() != stored.untyped_storage().data_ptr()
    assert out.untyped_storage().data_ptr() == capture._small._slab.data_ptr()
    torch.testing.assert_close(out, small, rtol=0, atol=0)
    assert capture.get("big").data_ptr() == capture.get("big", concat=False)[0].data_ptr()  # large: as stored


def test_small_results_kept_batch_after_batch_fill_shared_slabs_that_outlive_clear_and_the_capture():
    capture = ActivationCapture()
    rows = [torch.full((8, 576), float(i)) for i in range(80)]  # 18 KiB each, as a last token per batch
    kept = []
    for row in rows:
        capture.store("last", row)
        kept.append(capture.get("last"))
        capture.clear()
    slabs = {k.untyped_storage().data_ptr() for k in kept}
    assert len(slabs) == 2  # 80 x 18 KiB (64-byte aligned) fill one 1 MiB slab and start a second
    assert all(k.untyped_storage().nbytes() == 1 << 20 for k in kept)
    del capture
    for row, k in zip(rows, kept, strict=True):
        torch.testing.assert_close(k, row, rtol=0, atol=0)


def test_chunks_from_a_gpu_are_joined_into_pinned_blocks_of_their_own_within_a_size_range(tiny, monkeypatch):
    """From a GPU, ``get`` joins results of 256 KiB to 64 MiB into pinned memory of their own (recycled by
    PyTorch's caching host allocator: no page faults), not into the capture's slabs, whose other chunks a
    kept result would then keep alive. Simulated on the CPU: slabs opened as by a copy from a GPU, and
    ``torch.empty(pin_memory=True)`` recorded instead of pinned. The values are those of the plain joins."""
    family, model = tiny
    real_empty, pinned = torch.empty, []

    def empty(*args, pin_memory=False, **kwargs):
        out = real_empty(*args, **kwargs)
        if pin_memory:
            pinned.append(out)
        return out

    capture = ActivationCapture()
    capture._pinned = type(capture._pinned)(pin_memory=False, first=1 << 20)
    capture._pinned.empty(torch.Size([16]), torch.uint8)  # as by a copy from a GPU
    monkeypatch.setattr(torch, "empty", empty)

    def joined_into_pinned(result):
        return any(result.data_ptr() == p.data_ptr() for p in pinned) and result.nbytes == (
            result.untyped_storage().nbytes()
        )

    prompt = torch.tensor([[5, 17, 33, 9], [4, 8, 15, 16]])
    with HookManager(model) as hooks, torch.no_grad():
        hooks.add_forward_hook(layer_path(family, 1), capture.make_hook("gen"))
        model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    steps = capture.get("gen", concat=False)
    capture.store("big", torch.randn(4, 64, 576))
    capture.store("big", torch.randn(4, 64, 576))
    joined = capture.get("big")  # 2 x 4 x 64 x 576 float32, 1.1 MiB, joined along batch
    assert joined_into_pinned(joined)
    torch.testing.assert_close(joined, torch.cat(capture.get("big", concat=False)), rtol=0, atol=0)
    gen = capture.get("gen")  # [2, 8, 32] float32, 2 KiB: under 256 KiB, a piece of a small slab
    assert not joined_into_pinned(gen)
    torch.testing.assert_close(gen, torch.cat(steps, dim=1), rtol=0, atol=0)
    monkeypatch.setattr(capture_module, "JOIN_PINNED_MAX", 1 << 20)  # over 1 MiB: ordinary memory
    assert not joined_into_pinned(capture.get("big"))
    monkeypatch.setattr(capture_module._HostSlabs, "SMALLEST", 0)  # every small join: pinned
    gen = capture.get("gen")
    assert joined_into_pinned(gen)
    torch.testing.assert_close(gen, torch.cat(steps, dim=1), rtol=0, atol=0)
    rows = [s[:, -1] for s in steps]  # as positions=-1 during generate: stacked along the sequence
    stacked = capture_module._join_steps(rows, capture_module._pinned_join)
    assert joined_into_pinned(stacked)
    torch.testing.assert_close(stacked, torch.stack(rows, dim=1), rtol=0, atol=0)
    # two generate calls: each is joined along the sequence in ordinary memory, only the batch join is pinned
    for chunk in steps:
        capture.store("gen", chunk)
    before = len(pinned)
    both = capture.get("gen")
    assert len(pinned) == before + 1 and joined_into_pinned(both)
    torch.testing.assert_close(both, torch.cat([torch.cat(steps, dim=1)] * 2), rtol=0, atol=0)


def test_capture_fills_its_slabs_across_clear():
    capture = ActivationCapture()
    big, small = torch.randn(8, 64, 576), torch.randn(8, 576)  # 1.2 MB and 18 KB
    capture.store("a", big)
    capture.store("b", small)
    first, first_small = capture.get("a"), capture.get("b")
    capture.clear()
    capture.store("a", big * 2)
    capture.store("b", small * 2)
    second, second_small = capture.get("a"), capture.get("b")
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # the same slab
    assert second_small.untyped_storage().data_ptr() == first_small.untyped_storage().data_ptr()
    assert first_small.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()  # small: apart
    torch.testing.assert_close(first, big, rtol=0, atol=0)  # not overwritten by what came after clear()
    torch.testing.assert_close(second, big * 2, rtol=0, atol=0)
    torch.testing.assert_close(first_small, small, rtol=0, atol=0)
    torch.testing.assert_close(second_small, small * 2, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", None])
def test_stored_chunks_are_copies_that_later_in_place_edits_do_not_reach(device):
    model = make_tiny_model("llama")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    path = layer_path("llama", 1)
    clean, capture, cast = (
        ActivationCapture(),
        ActivationCapture(device=device),
        ActivationCapture(dtype=torch.float64),
    )
    with torch.no_grad():
        with HookManager(model) as hooks:
            hooks.add_forward_hook(path, clean.make_hook("h"))
            model(input_ids=ids)
        with HookManager(model) as hooks:
            hooks.add_forward_hook(path, capture.make_hook("h"))
            hooks.add_forward_hook(path, cast.make_hook("h"))
            hooks.add_forward_hook(path, lambda m, a, out: output_tensor(out).mul_(0.0))  # after capturing
            model(input_ids=ids)
    assert clean.get("h").abs().sum() > 0
    torch.testing.assert_close(capture.get("h"), clean.get("h"), rtol=0, atol=0)
    assert cast.get("h").dtype == torch.float64
    torch.testing.assert_close(cast.get("h"), clean.get("h").double(), rtol=0, atol=0)


def test_a_capture_first_used_under_inference_mode_serves_later_passes():
    """The capture's host slabs outlive a pass: opened under ``torch.inference_mode`` they must still take
    chunks stored outside it (an inference tensor refuses in-place writes there)."""
    capture = ActivationCapture()
    first, second = torch.randn(4, 300, 64), torch.randn(4, 300, 64)  # 300 KiB chunks: pieces of a slab
    with torch.inference_mode():
        capture.store("x", first)
        capture.store("h", first.half())  # a second dtype view of the same slab
    capture.store("x", second)
    capture.store("h", second.half())
    assert torch.equal(capture.get("x"), torch.cat([first, second]))
    assert torch.equal(capture.get("h"), torch.cat([first, second]).half())


def test_a_slice_takes_its_positions_of_each_pass_in_generate_and_refuses_to_leave_none():
    prompt = torch.tensor([[0, 0, 5, 17], [4, 8, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    capture = ActivationCapture(positions=slice(-2, None))
    model, seq = _generate_capture(capture, prompt, mask)
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], dim=1)
    reference, _ = _capture_layers(model, "qwen2", input_ids=seq[:, :-1], attention_mask=full_mask)
    # the prompt's last two positions, then each decode step's token
    torch.testing.assert_close(capture.get("l2"), reference.get("layer_2")[:, 2:], rtol=1e-4, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"slice\(1, 3, None\) leaves none of the 1 positions of a pass \(a decode"
    ):
        _generate_capture(ActivationCapture(positions=slice(1, 3)), prompt, mask)


def test_an_index_set_per_batch_keeps_a_batch_of_one_token_texts_a_batch_of_its_own():
    """Batches of one-token texts after longer ones, each read at its last token: four examples, not two
    examples of two positions (a one-position pass after a longer one looks like a decode step)."""
    capture = ActivationCapture()
    batches = [torch.randn(2, 5, 8), torch.randn(2, 1, 8)]
    for x in batches:
        capture.positions = last_token_index(torch.ones(2, x.shape[1], dtype=torch.long))
        capture.store("x", x)
    assert torch.equal(capture.get("x"), torch.cat([batches[0][:, -1], batches[1][:, -1]]))


def test_passes_that_cannot_be_told_from_the_steps_of_generate_are_joined_with_a_warning():
    """The LM head sees only the last position in every pass of generate (logits_to_keep), the prompt's
    too: its chunks look like separate one-token passes."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    capture = ActivationCapture()
    with HookManager(model) as hooks, torch.no_grad():
        hooks.add_forward_hook("lm_head", capture.make_hook("logits"))
        out = model.generate(
            ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
            return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"3 passes of one position each under 'logits' are joined along batch"
    ):
        assert capture.get("logits").shape == (6, 1, 128)
    steps = torch.cat(capture.get("logits", concat=False), dim=1)  # what the warning says to do
    torch.testing.assert_close(steps, torch.stack(out.logits, dim=1))


def test_small_chunks_stored_under_inference_mode_serve_autograd_outside_it():
    capture = ActivationCapture()
    with torch.inference_mode():
        capture.store("small", torch.randn(2, 6, 32))  # under 256 KiB: an allocation of its own
        capture.store("large", torch.randn(64, 64, 32))  # a piece of a slab
    w = torch.randn(32, requires_grad=True)
    for name in ("small", "large"):
        assert not capture.get(name).is_inference()
        (capture.get(name) @ w).sigmoid().mean().backward()
    assert w.grad is not None
