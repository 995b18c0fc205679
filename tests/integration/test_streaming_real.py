"""Streaming statistics and spilled activations on the real model equal the in-memory path."""

import pytest
import torch

from traitlens import get_method, load_dataset
from traitlens.pipeline import collect_activations, read_spilled, stream_statistics

pytestmark = pytest.mark.integration

LAYERS = [4, 15, 27]


def test_streaming_mean_difference_and_spill_match_collected_rows(real_model, tmp_path):
    model, tokenizer = real_model
    pairs = load_dataset("sentiment").train[:40]
    stats = stream_statistics(model, tokenizer, pairs, layers=LAYERS, batch_size=16, spill_to=tmp_path)
    pos = collect_activations(model, tokenizer, [p.pos_example for p in pairs], layers=LAYERS, batch_size=40)
    neg = collect_activations(model, tokenizer, [p.neg_example for p in pairs], layers=LAYERS, batch_size=40)
    assert stats.pos.count == stats.neg.count == stats.diff.count == 40
    for i in range(len(LAYERS)):
        expected = get_method("mean_diff").extract(pos[i], neg[i])["vector"]
        got = stats.mean_difference()[i]
        assert float((got - expected).norm() / expected.norm()) < 1e-5  # padding differs between batchings
        spilled_pos, spilled_neg = read_spilled(tmp_path, i)
        torch.testing.assert_close(spilled_pos, pos[i], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(spilled_neg, neg[i], rtol=1e-4, atol=1e-3)
    assert len(list(tmp_path.glob("batch_*.safetensors"))) == 3
    every_pos, every_neg = read_spilled(tmp_path)  # all layers in one read of each file
    assert every_pos.shape == pos.shape and torch.equal(every_neg[1], read_spilled(tmp_path, 1)[1])
    with pytest.raises(FileExistsError, match="already holds 3 spilled batches"):  # a rerun into the folder
        stream_statistics(model, tokenizer, pairs[:4], layers=LAYERS, spill_to=tmp_path)
    assert read_spilled(tmp_path)[0].shape == pos.shape  # the earlier run's files are left as they were


def test_pairs_with_one_prompt_run_it_once_and_equal_a_pass_per_side(real_model):
    from traitlens.pipeline import pair_activations

    model, tokenizer = real_model
    pairs = load_dataset("formality").train[:24]  # one chat prompt (system + question), two answers
    shapes = []
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda _, args: shapes.append(tuple(args[0].shape))
    )
    try:
        pos, neg = pair_activations(model, tokenizer, pairs, layers=LAYERS, position="response_mean")
    finally:
        handle.remove()
    assert [batch for batch, _ in shapes] == [16, 32, 8, 16]  # each batch: the prompts, then both answers
    for got, side in zip((pos, neg), ("pos", "neg"), strict=True):
        examples = [getattr(p, f"{side}_example") for p in pairs]
        expected = collect_activations(model, tokenizer, examples, layers=LAYERS, position="response_mean")
        error = (got - expected).norm(dim=-1) / expected.norm(dim=-1)
        assert float(error.max()) < 1e-5
