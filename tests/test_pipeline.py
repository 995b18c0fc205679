"""Pipeline internals and the report's heatmaps on random tensors, batching on a tiny model (the whole
pipeline runs on the real model in tests/integration)."""

import re
import statistics
import warnings

import numpy as np
import pytest
import torch

from conftest import TINY_FAMILIES, make_tiny_model, make_word_tokenizer
from traitlens.dataset import Pair
from traitlens.methods import RandomBaselineMethod
from traitlens.metrics import accuracy, auroc, midpoint_threshold
from traitlens.monitor import TokenScores, heatmap_scale, token_heatmap_html
from traitlens.pipeline import _random_draws, collect_activations, read_spilled, stream_statistics


def test_random_draws_equal_one_direction_at_a_time_through_the_public_metrics():
    g = torch.Generator().manual_seed(0)
    train_pos, train_neg = torch.randn(30, 16, generator=g) + 0.3, torch.randn(25, 16, generator=g)
    pos, neg = torch.randn(11, 16, generator=g) + 0.3, torch.randn(9, 16, generator=g)
    # a zero row on each side projects to exactly 0 under every draw: a tie that AUROC counts one half
    pos, neg = torch.cat([pos, torch.zeros(1, 16)]), torch.cat([neg, torch.zeros(2, 16)])
    scores, aurocs = [], []
    for seed in range(5, 5 + 12):
        vector = RandomBaselineMethod().extract(train_pos, train_neg, seed=seed)["vector"]
        if (train_pos.mean(0) - train_neg.mean(0)) @ vector < 0:  # oriented on train, as every method's
            vector = -vector
        threshold = midpoint_threshold(vector, train_pos, train_neg)
        scores.append(accuracy(vector, pos, neg, threshold=threshold))
        aurocs.append(auroc(vector, pos, neg))
    out = _random_draws(train_pos, train_neg, pos, neg, seed=5, draws=12)
    assert out["draws"] == 12
    assert out["draws_accuracy_mean"] == pytest.approx(statistics.mean(scores), abs=1e-12)
    assert out["draws_accuracy_std"] == pytest.approx(statistics.stdev(scores), abs=1e-12)
    assert out["draws_auroc_mean"] == pytest.approx(statistics.mean(aurocs), abs=1e-12)
    assert out["draws_auroc_std"] == pytest.approx(statistics.stdev(aurocs), abs=1e-12)
    assert (out["draws_accuracy_max"], out["draws_auroc_max"]) == pytest.approx((max(scores), max(aurocs)))
    assert len(set(scores)) > 3 and len(set(aurocs)) > 3  # the draws differ, so the means test something


def test_the_control_shows_how_far_any_direction_gets_on_the_data():
    # classes apart along every dimension: any direction separates them, once it points the right way.
    # Unoriented draws averaged 0.5 whatever the data (a flipped sign turns accuracy a into 1 - a), so the
    # control passed here; oriented, it reaches what the trait vector reaches, and the vector cannot beat it
    g = torch.Generator().manual_seed(1)
    train_pos, train_neg = torch.randn(40, 16, generator=g) + 3.0, torch.randn(40, 16, generator=g)
    pos, neg = torch.randn(20, 16, generator=g) + 3.0, torch.randn(20, 16, generator=g)
    out = _random_draws(train_pos, train_neg, pos, neg, seed=0, draws=32)
    assert out["draws_accuracy_mean"] > 0.7 and out["draws_accuracy_max"] > 0.95
    # no difference between the classes: the oriented draws stay near chance
    out = _random_draws(train_pos, train_pos.flip(0), pos, pos.flip(0), seed=0, draws=32)
    assert out["draws_accuracy_mean"] == pytest.approx(0.5, abs=0.1)


def _alphas(page: str) -> list[float]:
    return [float(a) for a in re.findall(r"rgba\([0-9,]+,([0-9.]+)\)", page)]


@pytest.mark.parametrize("n", [2, 8, 60])
def test_heatmap_default_scale_is_not_washed_out_by_a_massive_first_token(n):
    g = torch.Generator().manual_seed(n)
    rest = torch.randn(n - 1, generator=g) * 5  # [seq - 1]
    scores = TokenScores(
        tokens=[f"t{i}" for i in range(n)],
        scores=torch.cat([torch.tensor([-2500.0]), rest]) - 3.0,  # a massive-activation first token
        response=torch.zeros(n, dtype=torch.bool),
        center=-3.0,
    )
    page = token_heatmap_html(scores)
    alphas = _alphas(page)
    # the first token is grey: in blue at full colour it read as the most negative word of the text
    assert page.count("rgba(128,128,128,0.25)") == 1 and "grey: the first token" in page
    assert max(alphas[1:]) == 1.0 and sum(a > 0.3 for a in alphas[1:]) >= (n - 1) / 2
    # the default scale is the 90th percentile of |deviation| over tokens 1.., as numpy computes it
    scale = float(np.quantile(rest.abs().numpy(), 0.9))
    assert re.search(r"&plusmn;([0-9.]+)", page).group(1) == f"{scale:.2f}"
    expected = [min(abs(d) / scale, 1.0) for d in rest.tolist()]
    assert alphas[1:] == pytest.approx(expected, abs=0.005 + 1e-9)
    # an explicit scale is used as given
    assert _alphas(token_heatmap_html(scores, scale=10.0))[1:] == pytest.approx(
        [min(abs(d) / 10.0, 1.0) for d in rest.tolist()], abs=0.005 + 1e-9
    )
    # one token: its own deviation is the scale
    alone = TokenScores(["t"], torch.tensor([7.0]), torch.zeros(1, dtype=torch.bool), center=3.0)
    assert _alphas(token_heatmap_html(alone)) == [1.0] and "&plusmn;4.00" in token_heatmap_html(alone)
    # a token that adds part of a character only (its text comes with the next) is a dot, not an empty span;
    # the legend speaks of response tokens where there are some
    split = TokenScores(
        ["a", "", "\U0001f600"], torch.tensor([0.0, 1.0, 2.0]), torch.tensor([False, True, True])
    )
    assert ">\u00b7</span>" in token_heatmap_html(split) and "underlined" in token_heatmap_html(split)
    assert "underlined" not in page


def test_token_scores_mean_leaves_out_the_first_token():
    scores = TokenScores(
        tokens=["a", "b", "c", "d"],
        scores=torch.tensor([-900.0, 1.0, 2.0, 6.0]),
        response=torch.tensor([False, False, True, True]),
    )
    assert scores.mean() == pytest.approx(3.0)
    assert scores.mean("prompt") == pytest.approx(1.0) and scores.mean("response") == pytest.approx(4.0)
    plain = TokenScores(["a", "b"], torch.tensor([-900.0, 5.0]), torch.zeros(2, dtype=torch.bool))
    assert plain.mean() == 5.0 and np.isnan(plain.mean("response"))
    alone = TokenScores(["a"], torch.tensor([7.0]), torch.zeros(1, dtype=torch.bool))
    assert alone.mean() == 7.0
    with pytest.raises(ValueError, match="part must be one of"):
        scores.mean("answer")


def test_one_heatmap_scale_for_several_texts():
    g = torch.Generator().manual_seed(4)
    a = TokenScores(["t"] * 6, torch.randn(6, generator=g) * 3, torch.zeros(6, dtype=torch.bool), center=1.0)
    b = TokenScores(["t"] * 9, torch.randn(9, generator=g) * 9, torch.zeros(9, dtype=torch.bool), center=1.0)
    rest = np.concatenate([(a.scores - 1.0)[1:].numpy(), (b.scores - 1.0)[1:].numpy()])
    assert heatmap_scale(a, b) == pytest.approx(float(np.quantile(np.abs(rest), 0.9)), rel=1e-6)
    assert heatmap_scale(a) == pytest.approx(float(np.quantile(np.abs((a.scores - 1.0)[1:].numpy()), 0.9)))
    shared = heatmap_scale(a, b)
    assert f"&plusmn;{shared:.2f}" in token_heatmap_html(a, scale=shared)


LENGTHS = [3, 40, 2, 17, 5, 40, 1, 9, 30]  # one long row in each batch of 4, if batched in this order


def _texts(lengths, offset=0):
    return [" ".join(f"w{(7 * i + j + offset) % 120}" for j in range(n)) for i, n in enumerate(lengths)]


def _batch_shapes(model):
    """Record the ``[batch, seq]`` shape of every forward pass of ``model``."""
    shapes = []
    model.model.embed_tokens.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("position", ["prompt_last", "prompt_mean", "all"])
def test_rows_come_back_in_input_order_from_batches_of_similar_length(position):
    model, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    texts = _texts(LENGTHS)
    shapes = _batch_shapes(model)
    got = collect_activations(model, tokenizer, texts, layers=[0, 1], position=position, batch_size=4)
    assert shapes == [(4, 40), (4, 9), (1, 1)]  # longest first: 40 40 30 17 | 9 5 3 2 | 1
    expected = []
    with torch.no_grad():
        for text in texts:  # one at a time, read from the model's own hidden states
            ids = tokenizer(text, return_tensors="pt").input_ids
            states = model(ids, output_hidden_states=True).hidden_states
            rows = {  # prompt_mean leaves out the first token unless it is the whole text
                "prompt_last": lambda h: h[:, -1:],
                "prompt_mean": lambda h: h[:, 1:].mean(1, keepdim=True) if h.shape[1] > 1 else h,
            }
            pick = rows.get(position, lambda h: h)
            expected.append(torch.cat([pick(states[layer + 1][0][None]) for layer in (0, 1)]))
    expected = torch.cat(expected, dim=1)
    assert got.shape == expected.shape == (2, sum(LENGTHS) if position == "all" else len(texts), 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_streamed_pairs_share_one_order_and_spilled_rows_read_back_in_pair_order(tmp_path):
    model, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    # each pair's longer side decides its place: here sometimes the positive, sometimes the negative
    pos, neg = _texts(LENGTHS), _texts(LENGTHS[::-1], offset=60)
    pairs = [Pair(a, b, "train") for a, b in zip(pos, neg, strict=True)]
    shapes = _batch_shapes(model)
    stats = stream_statistics(model, tokenizer, pairs, layers=[0, 1], batch_size=4, spill_to=tmp_path / "a")
    longest = sorted((max(a, b) for a, b in zip(LENGTHS, LENGTHS[::-1], strict=True)), reverse=True)
    batch_lengths = [max(p[1], n[1]) for p, n in zip(shapes[::2], shapes[1::2], strict=True)]
    assert batch_lengths == [longest[0], longest[4], longest[8]] == [40, 30, 2]  # one order for both sides
    expected_pos = collect_activations(model, tokenizer, pos, layers=[0, 1])
    expected_neg = collect_activations(model, tokenizer, neg, layers=[0, 1])
    spilled_pos, spilled_neg = read_spilled(tmp_path / "a")
    torch.testing.assert_close(spilled_pos, expected_pos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(spilled_neg, expected_neg, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(read_spilled(tmp_path / "a", 1)[1], expected_neg[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"layer_index 2 is out of range: .* holds layers \[0, 1\]; layer_index"
    ):
        read_spilled(tmp_path / "a", 2)
    diff = (expected_pos - expected_neg).mean(1)
    torch.testing.assert_close(stats.mean_difference(), diff, rtol=1e-5, atol=1e-6)

    # two folders (the shards of a distributed run) read as one, each in its own pair order
    stream_statistics(model, tokenizer, pairs[:4], layers=[0, 1], batch_size=3, spill_to=tmp_path / "b")
    stream_statistics(model, tokenizer, pairs[4:], layers=[0, 1], batch_size=3, spill_to=tmp_path / "c")
    torch.testing.assert_close(read_spilled([tmp_path / "b", tmp_path / "c"])[0], expected_pos)


def _windowed(kind: str):
    """Tiny models whose attention window (3 tokens) is shorter than the prompts: a Mistral; Gemma 3 with its
    vision tower (which attends both ways; text does not run through it); Moshi, whose config names a
    window that its masks do not apply (a cache built from the config would drop the prompt's first keys)."""
    import transformers as T

    sizes = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128, pad_token_id=0, sliding_window=3)  # fmt: skip
    if kind == "mistral-sliding":
        config = T.MistralConfig(**sizes, intermediate_size=64)
    elif kind == "gemma3-multimodal":
        config = T.Gemma3Config(
            text_config=T.Gemma3TextConfig(**sizes, intermediate_size=64, head_dim=8, query_pre_attn_scalar=8,
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
            vision_config=T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, image_size=32, patch_size=16),
            mm_tokens_per_image=4, boi_token_index=127, eoi_token_index=126, image_token_index=125,
        )  # fmt: skip
    else:
        config = T.MoshiConfig(**sizes, head_dim=8, ffn_dim=64, audio_vocab_size=64, num_codebooks=2)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "family", ["llama", "gpt2", "qwen2", "mistral-sliding", "gemma3-multimodal", "moshi"]
)
def test_pairs_that_share_a_prompt_run_it_once_and_read_what_the_model_computes_for_each_text(
    family, tmp_path
):
    from traitlens.dataset import tokenize_examples
    from traitlens.hooks import decoder_layer_paths
    from traitlens.pipeline import pair_activations

    model = make_tiny_model(family) if family in TINY_FAMILIES else _windowed(family)
    tokenizer = make_word_tokenizer()
    prompts, answers = _texts([6, 2, 11, 4, 8]), _texts([3, 7, 1, 5, 2, 9, 4, 6, 2, 3], offset=40)
    pairs = [Pair(answers[2 * i], answers[2 * i + 1], "train", prompt=q) for i, q in enumerate(prompts)]
    # a pair whose sides differ in their system prompts: its batch runs one pass per side
    pairs.append(Pair("w5 w6", "w7", "train", prompt="w8 w9 w10", system_pos="w11", system_neg="w12 w13"))
    shapes = []
    model.get_input_embeddings().register_forward_pre_hook(
        lambda _, args: shapes.append(tuple(args[0].shape))
    )
    pos, neg = pair_activations(
        model, tokenizer, pairs, layers=[0, 1], position="response_mean", batch_size=2
    )
    # longest side first: pairs 2 and 0 (prompts of 11 and 6 words, answers up to 9), 4 and 3, then 1 with
    # the system-prompt pair, one pass per side; the word tokenizer drops the prompts' final newline
    assert shapes == [(2, 11), (4, 9), (2, 8), (4, 6), (2, 6), (2, 7)]
    expected = {"pos": [], "neg": []}
    with torch.no_grad():
        for pair in pairs:  # one text at a time, read from the model's own hidden states
            for side in ("pos", "neg"):
                prompt, response = next(tokenize_examples(tokenizer, [getattr(pair, f"{side}_example")]))
                states = model(torch.tensor([prompt + response]), output_hidden_states=True).hidden_states
                expected[side].append(torch.stack([states[k + 1][0, len(prompt) :].mean(0) for k in (0, 1)]))
    torch.testing.assert_close(pos, torch.stack(expected["pos"], 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(neg, torch.stack(expected["neg"], 1), rtol=1e-4, atol=1e-5)
    # streamed and spilled (each batch written to disk) alike
    stats = stream_statistics(model, tokenizer, pairs, layers=[0, 1], position="response_mean", batch_size=2,
                              spill_to=tmp_path)  # fmt: skip
    spilled = read_spilled(tmp_path)
    torch.testing.assert_close(spilled[0], pos, rtol=0, atol=0)
    torch.testing.assert_close(spilled[1], neg, rtol=0, atol=0)
    torch.testing.assert_close(stats.mean_difference(), (pos - neg).mean(1), rtol=1e-5, atol=1e-6)
    # a module inside a layer (the pass stops after it, its layer's keys and values already cached)
    module = decoder_layer_paths(model)[1] + ".mlp"
    got = pair_activations(model, tokenizer, pairs, module=module, position="response_mean", batch_size=2)
    for side, rows in zip(("pos", "neg"), got, strict=True):
        examples = [getattr(pair, f"{side}_example") for pair in pairs]
        one_pass = collect_activations(model, tokenizer, examples, module=module, position="response_mean")
        torch.testing.assert_close(rows, one_pass, rtol=1e-4, atol=1e-5)


def _misread_by_a_shared_prompt(kind: str):
    """Tiny models whose prompt, run apart from its answers into a cache, reads otherwise than in one pass."""
    import transformers as T

    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=128
    )
    if kind == "gemma3-bidirectional":  # the prompt attends to the answer
        config = T.Gemma3TextConfig(
            **sizes, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, pad_token_id=0,
            use_bidirectional_attention=True,
        )  # fmt: skip
    elif kind == "megatron-bert":  # BERT-family layers without is_decoder: bidirectional too
        config = T.MegatronBertConfig(**sizes, pad_token_id=0)
    elif kind == "trocr":  # takes its positions from the cache length, not from position_ids
        config = T.TrOCRConfig(
            d_model=32, decoder_layers=3, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=128,
            pad_token_id=0, max_position_embeddings=128,
        )  # fmt: skip
    elif kind == "roberta":  # counts positions from the pad id + 1, so positions given from 0 are wrong
        config = T.RobertaConfig(**sizes, pad_token_id=0, is_decoder=True, max_position_embeddings=64)
    else:  # phi3 with longrope: rotary factors chosen by each pass's length (original maximum 8)
        config = T.Phi3Config(
            **sizes, num_key_value_heads=2, pad_token_id=0, max_position_embeddings=32,
            original_max_position_embeddings=8,
            rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                             "long_factor": [1.5, 2.0, 3.0, 4.0]},
        )  # fmt: skip
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "kind", ["gemma3-bidirectional", "megatron-bert", "trocr", "phi3-longrope", "roberta"]
)
def test_models_a_shared_prompt_would_misread_get_one_pass_per_side(kind):
    from traitlens.dataset import tokenize_examples
    from traitlens.pipeline import pair_activations

    model, tokenizer = _misread_by_a_shared_prompt(kind), make_word_tokenizer()
    # one pair, so that one pass per side has no padding; prompt + answer cross longrope's original 8
    pairs = [Pair("w7 w8 w9", "w10 w11 w12 w13 w14", "train", prompt="w1 w2 w3 w4 w5 w6")]
    shapes = []
    model.get_input_embeddings().register_forward_pre_hook(
        lambda _, args: shapes.append(tuple(args[0].shape))
    )
    pos, neg = pair_activations(
        model, tokenizer, pairs, layers=[0, 1], position="response_mean", batch_size=1
    )
    assert shapes == [(1, 9), (1, 11)]  # each text in one pass
    for side, got in (("pos", pos), ("neg", neg)):
        prompt, response = next(tokenize_examples(tokenizer, [getattr(pairs[0], f"{side}_example")]))
        outputs = _alone(model, prompt + response)
        expected = outputs[:, len(prompt) :].mean(1)  # [layer, hidden]
        torch.testing.assert_close(got[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_a_model_whose_cache_is_not_a_transformers_cache_gets_one_pass_per_side():
    """XLM keeps its cache in a dict of its own (and no module outputs its residual stream but the last
    norm of each layer, so the module is named)."""
    import transformers as T

    from traitlens.pipeline import pair_activations

    torch.manual_seed(0)
    xlm = T.XLMWithLMHeadModel(
        T.XLMConfig(vocab_size=128, emb_dim=32, n_layers=2, n_heads=4, causal=True)
    ).eval()
    tokenizer, module = make_word_tokenizer(), "transformer.layer_norm2.1"
    pairs = [
        Pair("w7 w8", "w9 w10 w11", "train", prompt="w1 w2 w3"),
        Pair("w4", "w5 w6", "train", prompt="w12"),
    ]
    shapes = []
    xlm.get_input_embeddings().register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    pos, neg = pair_activations(xlm, tokenizer, pairs, module=module, position="response_mean", batch_size=2)
    assert shapes == [(2, 5), (2, 6)]  # one pass per side
    for side, got in (("pos", pos), ("neg", neg)):
        for i, pair in enumerate(pairs):
            example = getattr(pair, f"{side}_example")
            with torch.no_grad():
                ids = tokenizer(f"{example.prompt} {example.response}", return_tensors="pt")["input_ids"]
                states = xlm(ids, output_hidden_states=True).hidden_states[2][0]  # after layer 1
            n_prompt = len(example.prompt.split())
            torch.testing.assert_close(got[0, i], states[n_prompt:].mean(0), rtol=1e-4, atol=1e-5)


def test_layers_whose_positions_are_not_the_inputs_are_refused_not_misread():
    """CPMAnt prepends its own prompt tokens inside the model: the last prompt token's index would read
    another token, silently."""
    import transformers as T

    torch.manual_seed(0)
    config = T.CpmAntConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, dim_head=8, dim_ff=64,
                            num_hidden_layers=2, prompt_length=4)  # fmt: skip
    model, tokenizer = T.CpmAntForCausalLM(config).eval(), make_word_tokenizer()
    with pytest.raises(
        ValueError, match=r"'cpmant.encoder.layers.0' outputs \(2, 7, 32\) for input ids of \(2, 3\)"
    ):
        collect_activations(model, tokenizer, ["w1 w2 w3", "w4"], layers=[0], position="prompt_last")


def test_a_layer_that_runs_twice_in_one_pass_is_refused_not_joined():
    """A recurrent-depth model (Dory) runs its middle layers once per loop: which run is the output?"""
    import transformers as T

    config = T.DoryConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, num_hidden_layers=3, n_input_layers=1,
                          n_recurrent_layers=1, n_output_layers=1, layer_types=["full_attention"] * 3,
                          pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match=r"^'model.layers.1' ran more than once in one forward pass"):
        collect_activations(model, make_word_tokenizer(), ["w1 w2 w3", "w4"], position="prompt_last")


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_right_padded_batches_read_every_token_as_the_text_alone(kind):
    """Right-padded rows get the model's own position numbering: RoBERTa's starts at the pad id + 1."""

    model = make_tiny_model("llama") if kind == "llama" else _misread_by_a_shared_prompt(kind)
    tokenizer, texts = make_word_tokenizer(), _texts([5, 2, 9, 4])
    got = collect_activations(model, tokenizer, texts, layers=[0, 1], position="all", batch_size=4)
    expected = [_alone(model, tokenizer(text)["input_ids"]) for text in texts]
    assert got.shape == (2, 20, 32)
    torch.testing.assert_close(got, torch.cat(expected, dim=1), rtol=1e-4, atol=1e-5)


def _alone(model, ids: list[int]) -> torch.Tensor:
    """``[layer, tokens, hidden]``: the outputs of decoder layers 0 and 1 for ``ids`` alone (no padding, no
    position_ids), read by plain forward hooks."""
    from traitlens.hooks import decoder_layer_paths

    paths, seen = decoder_layer_paths(model), []
    handles = [
        model.get_submodule(paths[k]).register_forward_hook(
            lambda _, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        for k in (0, 1)
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return torch.stack([out[0] for out in seen])


def test_spilled_batches_without_an_index_are_read_in_file_order_and_mixed_runs_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    acts = torch.randn(2, 7, 5)
    for k, rows in enumerate([slice(0, 4), slice(4, 7)]):  # as written before batches were sorted
        part = acts[:, rows].contiguous()
        save_file({"pos": part, "neg": -part}, tmp_path / f"batch_{k:06d}.safetensors")
    pos, neg = read_spilled(tmp_path)
    assert torch.equal(pos, acts) and torch.equal(neg, -acts)
    for k in range(2):  # give both files the same rows
        path = tmp_path / f"batch_{k:06d}.safetensors"
        tensors = load_file(path)
        save_file({**tensors, "index": torch.arange(tensors["pos"].shape[1])}, path)
    with pytest.raises(ValueError, match="do not hold each of their 7 rows once"):
        read_spilled(tmp_path)


def test_a_spill_that_did_not_finish_cannot_be_read_as_a_finished_one(tmp_path):
    """Pairs of one length keep their own order: an interrupted run's batches looked like a whole run of
    fewer pairs (24 of 40, no error)."""
    model, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    pairs = [Pair(f"w{i} w{i + 1}", f"w{i + 2} w{i + 60}", "train") for i in range(12)]
    passes = []

    def interrupt(module, args):
        passes.append(1)
        if len(passes) == 5:  # batch 3 of 4 (two passes a batch)
            raise KeyboardInterrupt

    handle = model.model.embed_tokens.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        stream_statistics(model, tokenizer, pairs, layers=[1], batch_size=3, spill_to=tmp_path)
    handle.remove()
    assert list(tmp_path.iterdir()) == []  # its two batches removed: nothing to read, nothing in the way
    stats = stream_statistics(model, tokenizer, pairs, layers=[1], batch_size=3, spill_to=tmp_path)
    pos, neg = read_spilled(tmp_path)
    assert pos.shape == (1, 12, model.config.hidden_size)
    torch.testing.assert_close((pos - neg).mean(1), stats.mean_difference(), rtol=1e-5, atol=1e-6)

    # a run that was killed leaves its marker: neither read nor written over, as is a run still going
    killed = tmp_path / "killed"
    stream_statistics(model, tokenizer, pairs[:6], layers=[1], batch_size=3, spill_to=killed)
    (killed / ".stream_statistics-running").touch()
    with pytest.raises(
        ValueError, match="being written by stream_statistics, or was by a run that was killed"
    ):
        read_spilled(killed)
    with pytest.raises(FileExistsError, match="being written by another run, or by one that was killed"):
        stream_statistics(model, tokenizer, pairs, layers=[1], spill_to=killed)

    # folders spilled at other layers are not joined as one layer
    stream_statistics(model, tokenizer, pairs[:6], layers=[0, 1], batch_size=3, spill_to=tmp_path / "a")
    stream_statistics(model, tokenizer, pairs[6:], layers=[1, 2], batch_size=3, spill_to=tmp_path / "b")
    with pytest.raises(ValueError, match=r"holds layers \[0, 1\] and .* layers \[1, 2\]: spilled by other"):
        read_spilled([tmp_path / "a", tmp_path / "b"], 0)


def test_non_finite_activations_name_the_module_and_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import traitlens.vector

    model, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    pairs = [Pair(f"w{i} w{i + 1}", f"w{i + 2}", "train") for i in range(6)]
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("w4")] = float("nan")
    with pytest.raises(
        ValueError, match=r"'model.layers.0' output 32 non-finite values"
    ):  # was: "pos contains
        # 32 non-finite values; clean or drop those rows", rows the user does not have
        stream_statistics(model, tokenizer, pairs, layers=[0], batch_size=2)

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(traitlens.vector._safetensors().torch, "save_file", full)
    model = make_tiny_model("llama")
    with pytest.raises(OSError, match=r"could not write .*batch_000000\.safetensors: .*No space left"):
        stream_statistics(model, tokenizer, pairs, layers=[0], batch_size=2, spill_to=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_token_texts_keep_characters_split_over_byte_tokens_whole():
    from traitlens.monitor import _token_strings

    class Bytes:  # one token per UTF-8 byte, as byte-level BPE has for rare characters
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "Ü a 😀!"
    ids = list(text.encode())
    assert [Bytes().decode([i]) for i in ids][:2] == ["\ufffd", "\ufffd"]  # what decoding one by one gives
    labels = _token_strings(Bytes(), ids)
    assert labels == ["", "Ü", " ", "a", " ", "", "", "", "😀", "!"]
    assert "".join(labels) == text
    assert _token_strings(Bytes(), [0xFF] * 5) == ["", "", "", "\ufffd" * 4, "\ufffd"]  # invalid bytes end


def test_examples_a_position_cannot_read_are_named_by_their_index_before_any_forward_pass(tmp_path):
    from traitlens.dataset import Example

    model, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    shapes = _batch_shapes(model)
    examples = [
        Example("w1 w2", "w3 w4"),
        Example("w1", "w5"),
        Example("w1", ""),
        Example("w6 " * 9, "w7 " * 9),
    ]
    with pytest.raises(
        ValueError, match=r"'response_mean' reads response tokens, but examples \[2\] have none"
    ):
        collect_activations(model, tokenizer, examples, layers=[1], position="response_mean", batch_size=2)
    with pytest.raises(ValueError, match=r"examples \[0, 1\] have none \(plain texts"):
        collect_activations(model, tokenizer, ["w1", "w2"], position="response_mean")
    texts = ["w1 w2"] * 300
    texts[299] = ""  # in the second chunk of the tokenizer pass
    with pytest.raises(ValueError, match=r"examples\[299\] is an empty string"):
        collect_activations(model, tokenizer, texts, layers=[1])
    pairs = [Pair(a, b, "train") for a, b in zip(_texts([2, 3]), _texts([3, 2], 50), strict=True)]
    for bad, match in (
        ({"position": "bogus"}, "position must be one of"),
        ({"layers": [99]}, r"layers must be indices in 0\.\.2, got '99'"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ):
        with pytest.raises(ValueError, match=match):
            stream_statistics(model, tokenizer, pairs, spill_to=tmp_path / "spill", **bad)
    with pytest.raises(ValueError, match="pairs is empty"):
        stream_statistics(model, tokenizer, [], spill_to=tmp_path / "spill")
    assert shapes == [] and not (tmp_path / "spill").exists()  # refused before any pass or folder


def test_layers_come_back_in_the_order_given_and_bad_layers_are_refused_before_any_pass():
    import numpy as np

    model, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    texts = _texts([4, 2, 6])
    both = collect_activations(model, tokenizer, texts, layers=[0, 2])
    torch.testing.assert_close(collect_activations(model, tokenizer, texts, layers=[2, 0]), both.flip(0))
    torch.testing.assert_close(collect_activations(model, tokenizer, texts, layers=np.array([0, 2])), both)
    shapes = _batch_shapes(model)
    for layers, error, message in [
        ([2, 2], ValueError, r"layers must each be given once, got \[2, 2\]"),
        ([1.7], TypeError, r"layers must be ints, got 1\.7 \(float\)"),
        ([True], TypeError, r"layers must be ints, got True \(bool\)"),
        (1, TypeError, r"layers must be a sequence of ints \(e\.g\. \[12\]"),
        ([], ValueError, r"layers is empty"),
        ([0, 3], ValueError, r"layers must be indices in 0\.\.2, got '3'"),
    ]:
        with pytest.raises(error, match=message):
            collect_activations(model, tokenizer, texts, layers=layers)
    assert shapes == []


def test_pair_activations_refuse_other_inputs_and_a_prompt_position_where_the_sides_share_the_prompt():
    from traitlens.pipeline import pair_activations

    model, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    shapes = _batch_shapes(model)
    shared = [Pair("w3 w4", "w5", "train", prompt="w1 w2"), Pair("w6", "w7 w8", "train", prompt="w9")]
    for position in ("prompt_last", "prompt_mean"):  # identical rows on both sides: no signal
        with pytest.raises(
            ValueError, match=rf"at position '{position}' the two sides of every pair read the same"
        ):
            pair_activations(model, tokenizer, shared, layers=[1], position=position)
        with pytest.raises(ValueError, match="use position='response_mean'"):
            stream_statistics(model, tokenizer, shared, layers=[1], position=position)
    with pytest.raises(TypeError, match=r"pairs must be Pairs .* got a str; for texts of one side use"):
        pair_activations(model, tokenizer, ["w1", "w2"], layers=[1])
    assert shapes == []
    # one pair whose system prompts differ is enough for a prompt position to read something
    mixed = [*shared, Pair("w3", "w4", "train", prompt="w1", system_pos="w10", system_neg="w11")]
    pos, neg = pair_activations(model, tokenizer, mixed, layers=[1], position="prompt_last")
    assert torch.equal(pos[0, :2], neg[0, :2]) and not torch.equal(pos[0, 2], neg[0, 2])


def test_a_model_in_training_mode_gets_a_warning_at_the_callers_line():
    """Dropout in training mode makes every capture differ; the model's mode is the user's to set."""
    model, tokenizer = make_tiny_model("gpt2").train(), make_word_tokenizer()
    with pytest.warns(UserWarning, match="training mode, so its dropout") as record:
        first = collect_activations(model, tokenizer, ["w1 w2 w3", "w4"], layers=[0])
        second = collect_activations(model, tokenizer, ["w1 w2 w3", "w4"], layers=[0])
    assert record[0].filename == __file__ and model.training
    assert not torch.equal(first, second)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect_activations(model, tokenizer, ["w1 w2 w3", "w4"], layers=[0])


def test_extract_trait_names_the_dataset_it_wants():
    from traitlens.pipeline import extract_trait

    with pytest.raises(
        TypeError, match=r"dataset must be a ContrastiveDataset \(load_dataset\('sentiment'\).* got list"
    ):
        extract_trait(make_tiny_model("llama"), make_word_tokenizer(), [("w1 w2", "w3 w4")])


def test_progress_bars_show_where_a_person_sees_them_by_default(capsys, monkeypatch):
    """``progress=None`` (the default): a bar on a terminal, none in a log or a pipe."""
    import sys

    model, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    texts = _texts([4, 2, 6])

    def bar_after(**kwargs) -> str:
        collect_activations(model, tokenizer, texts, layers=[0], batch_size=1, **kwargs)
        return capsys.readouterr().err

    assert bar_after() == "" and bar_after(progress=False) == ""  # pytest's stderr is not a terminal
    assert "/3 [" in bar_after(progress=True) and "texts: " in bar_after(progress="texts")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert "/3 [" in bar_after() and bar_after(progress=False) == ""


def test_a_text_longer_than_the_models_learned_positions_is_named():
    model, tokenizer = make_tiny_model("gpt2"), make_word_tokenizer()  # a table of 128 positions
    limit = model.config.max_position_embeddings
    with pytest.raises(
        ValueError, match=rf"a text of {limit + 5} tokens is longer than the {limit} positions"
    ):
        collect_activations(model, tokenizer, ["w1 " * (limit + 5)], layers=[0])
    collect_activations(model, tokenizer, ["w1 " * limit], layers=[0])


def test_a_float16_model_that_overflows_is_named_not_the_users_data():
    """Captured in float32, the infs of a float16 model reached the methods as "pos_acts contains 2304
    non-finite values; clean or drop those rows", and residual_norms returned NaN."""
    from traitlens.steering import residual_norms

    model, tokenizer = make_tiny_model("llama").half(), make_word_tokenizer()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e7)
    expected = r"'model.layers.1' output \d+ non-finite values .*float16, which overflows above 65504"
    with pytest.raises(ValueError, match=expected):
        collect_activations(model, tokenizer, ["w1 w2 w3"], layers=[1])
    with pytest.raises(ValueError, match=expected):
        residual_norms(model, tokenizer, ["w1 w2 w3"], layers=[1])


def test_a_model_that_is_not_a_transformers_model_is_captured():
    """Any torch module with decoder layers: the dtype lookup for the float16 hint needs no transformers API."""

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    inner, tokenizer = make_tiny_model("llama"), make_word_tokenizer()
    acts = collect_activations(Wrap(inner).eval(), tokenizer, ["w1 w2"], module="inner.model.layers.1")
    torch.testing.assert_close(acts, collect_activations(inner, tokenizer, ["w1 w2"], layers=[1]))
