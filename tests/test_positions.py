import pytest
import torch

from traitlens.positions import POSITION_RULES, apply_selector, last_token_index, select_positions, to_device

# Two rows, seq 6. Row 0 right-padded: prompt 0-2, response 3-4, pad 5. Row 1 left-padded: pad 0-1,
# prompt 2-3, response 4-5.
MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
RESPONSE = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
HIDDEN = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)


def test_last_token_index_right_and_left_padding():
    assert last_token_index(MASK).tolist() == [4, 5]
    assert last_token_index(torch.tensor([[1, 0, 0]])).tolist() == [0]


def test_prompt_last():
    index = select_positions("prompt_last", MASK, RESPONSE)
    assert index.tolist() == [2, 3]
    torch.testing.assert_close(apply_selector(HIDDEN, index), torch.stack([HIDDEN[0, 2], HIDDEN[1, 3]]))


def test_means_match_numpy_style_reference():
    # prompt_mean leaves out each row's first real token (the attention sink), unless it is the whole prompt
    one_token_prompt = torch.tensor([[0, 1, 1, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    for rule, (mask, response), rows in [
        ("prompt_mean", (MASK, RESPONSE), [[1, 2], [3]]),
        ("prompt_mean", one_token_prompt, [[1]]),
        ("response_mean", (MASK, RESPONSE), [[3, 4], [4, 5]]),
    ]:
        got = apply_selector(HIDDEN[: len(mask)], select_positions(rule, mask, response))
        expected = torch.stack([HIDDEN[i, r].mean(0) for i, r in enumerate(rows)])
        torch.testing.assert_close(got, expected)


def test_plain_text_is_all_prompt():
    index = select_positions("prompt_last", MASK)
    assert index.tolist() == [4, 5]
    assert select_positions("all", MASK) is None


def test_rule_errors():
    with pytest.raises(
        ValueError, match=r"position must be one of .*got 'prompt_lst'; did you mean one of 'prompt_last'"
    ):
        select_positions("prompt_lst", MASK, RESPONSE)
    with pytest.raises(ValueError, match=r"needs response tokens, but rows \[0, 1\] have none"):
        select_positions("response_mean", MASK)
    with pytest.raises(ValueError, match="response_mask must have the shape"):
        select_positions("prompt_mean", MASK, RESPONSE[:, :3])
    empty = torch.zeros(2, 0, dtype=torch.long)  # argmax() of an empty dimension, from inside torch
    for call in (lambda: last_token_index(empty), lambda: select_positions("prompt_mean", empty)):
        with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, seq\] with seq >= 1"):
            call()
    assert set(POSITION_RULES) == {"prompt_last", "prompt_mean", "response_mean", "all"}


def test_selector_shapes_and_errors():
    assert apply_selector(HIDDEN, None) is HIDDEN
    assert apply_selector(HIDDEN, -1).shape == (2, 3)
    assert apply_selector(HIDDEN, slice(1, 3)).shape == (2, 2, 3)
    assert apply_selector(HIDDEN, torch.tensor([[0, 1], [2, 3]])).shape == (2, 2, 3)
    with pytest.raises(ValueError, match=r"position index must have shape \[batch\]=\[2\]"):
        apply_selector(HIDDEN, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"position weights must have shape \[batch, seq\]=\[2, 6\]"):
        apply_selector(HIDDEN, torch.ones(2, 5))
    with pytest.raises(TypeError, match="positions must be None"):
        apply_selector(HIDDEN, [0, 1])
    with pytest.raises(ValueError, match=r"\[batch, seq, hidden\]"):
        apply_selector(HIDDEN[0], 0)
    # the checks the capture makes when its positions are set, for a tensor given here too
    with pytest.raises(ValueError, match="looks like an attention mask"):  # was gathered as indices
        apply_selector(HIDDEN, torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]))
    for dtype in (torch.uint8, torch.int16, torch.complex64):  # gather() / aminmax errors from torch
        with pytest.raises(TypeError, match=rf"int64 or int32 indices or float weights, got dtype {dtype}"):
            apply_selector(HIDDEN, torch.ones(2, dtype=dtype))
    weights = torch.zeros(2, 6)
    weights[0, 0] = float("nan")
    with pytest.raises(ValueError, match="position weights contain NaN or inf"):  # was a NaN row
        apply_selector(HIDDEN, weights)
    torch.testing.assert_close(
        apply_selector(HIDDEN, torch.tensor([1, 2], dtype=torch.int32)), HIDDEN[[0, 1], [1, 2]]
    )


def test_capture_refuses_a_bad_selector_when_it_is_set():
    from traitlens.capture import ActivationCapture

    for bad, error, match in (
        ("last", TypeError, "got str"),
        ([0, 1], TypeError, r"got list; give a tensor"),
        (True, TypeError, "got bool"),
        (MASK.bool(), TypeError, "cannot be a bool mask"),
        (torch.ones(2, 3, 4), ValueError, r"weights must have shape \[batch, seq\], got \(2, 3, 4\)"),
        (torch.zeros(2, 3, 4, dtype=torch.long), ValueError, r"index must have shape \[batch\] or"),
        # an int64 attention mask was read as [batch, k] indices: positions 0 and 1 over and over, in the shape
        # of positions=None
        (MASK, ValueError, r"looks like an attention mask"),
        (torch.tensor([-1, -1]), ValueError, r"count from 0 \(got -1\)"),
    ):
        with pytest.raises(error, match=match):
            ActivationCapture(positions=bad)
        capture = ActivationCapture()
        with pytest.raises(error, match=match):
            capture.positions = bad
    for good in (None, -1, slice(0, 2), torch.tensor([1, 2]), torch.tensor([[0, 1], [1, 0]]), MASK.float()):
        ActivationCapture(positions=good)
    with pytest.raises(TypeError, match=r"activations must be a torch\.Tensor, got list"):
        ActivationCapture().store("x", [1, 2])


def test_to_device_leaves_a_tensor_already_there_alone():
    index = torch.tensor([1, 2])
    assert to_device(index, "cpu") is index
    assert to_device(index, torch.device("meta")).device.type == "meta"


def test_an_index_past_the_end_is_refused_before_it_reaches_a_device():
    from traitlens.capture import ActivationCapture

    # on a GPU, gather with such an index is a device-side assert that ends the process; the host copy is read
    capture = ActivationCapture(positions=torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="position index 6 is past the end of a pass of 6 positions"):
        capture.store("x", HIDDEN)
    with pytest.raises(ValueError, match="position index 6 is past the end of a pass of 6 positions"):
        apply_selector(HIDDEN.to("meta"), torch.tensor([3, 6]))
    assert apply_selector(HIDDEN.to("meta"), torch.tensor([3, 5])).shape == (2, 3)
    capture.positions = torch.tensor([3, 5])
    capture.store("x", HIDDEN)
    assert torch.equal(capture.get("x"), HIDDEN[[0, 1], [3, 5]])
