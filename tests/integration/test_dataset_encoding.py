"""encode_examples on the real SmolLM2-135M-Instruct tokenizer and model: exact masks, both paddings."""

from __future__ import annotations

import pytest
import torch

from traitlens.dataset import Example, encode_examples, load_dataset

pytestmark = pytest.mark.integration


def _ids(enc, i, mask):
    return enc.input_ids[i][mask[i].bool()].tolist()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_real_tokenizer_masks_decode_to_template_and_answer(real_model, padding_side):
    _, tok = real_model
    pairs = load_dataset("certainty").test[:6]
    pos = [p.pos_example for p in pairs]
    enc = encode_examples(tok, pos, padding_side=padding_side)
    for i, ex in enumerate(pos):
        prompt_text = tok.apply_chat_template(
            [{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True
        )
        assert prompt_text.endswith(f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(_ids(enc, i, enc.prompt_mask)) == prompt_text
        assert tok.decode(_ids(enc, i, enc.response_mask)) == ex.response
        last = int(enc.last_prompt_index[i])
        assert tok.decode(enc.input_ids[i, last : last + 1]) == "\n"  # the newline after "assistant"
    if padding_side == "left":
        assert bool(enc.attention_mask[:, -1].all())
    else:
        assert bool(enc.attention_mask[:, 0].all())


def test_real_tokenizer_boundary_is_exact_where_joint_tokenization_merges(real_model):
    _, tok = real_model
    ex = Example(prompt="Say hello.", response="\n\nHello!")
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tok(ex.response, add_special_tokens=False)["input_ids"]
    joint = tok(prompt_text + ex.response, add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt_ids)] != prompt_ids  # the newlines merge across the boundary
    enc = encode_examples(tok, [ex])
    assert _ids(enc, 0, enc.attention_mask) == prompt_ids + response_ids
    assert tok.decode(_ids(enc, 0, enc.response_mask)) == ex.response


@pytest.mark.parametrize("name", ["sentiment", "formality"])
def test_left_and_right_padding_give_the_same_activations(real_model, name):
    model, tok = real_model
    pos, _ = load_dataset(name).examples("val")
    pos = pos[:3]
    layer = 12
    reads = {}
    for side in ("right", "left"):
        enc = encode_examples(tok, pos, padding_side=side)
        with torch.no_grad():
            hidden = model(**enc.model_inputs(), output_hidden_states=True).hidden_states[layer + 1]
        rows = torch.arange(len(pos))
        last = hidden[rows, enc.last_prompt_index]  # [batch, hidden]
        mask = enc.response_mask if name == "formality" else enc.prompt_mask
        mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # [batch, hidden]
        reads[side] = (last, mean)
    for a, b in zip(reads["right"], reads["left"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
