"""``traitlens extract / evaluate / monitor / modules`` on the real model and the shipped sentiment data."""

import json

import pytest
import torch
from safetensors.torch import load_file

from traitlens import TraitVector, load_dataset, load_vector
from traitlens.cli import RUN_FILES, main
from traitlens.dataset import Example, encode_examples
from traitlens.metrics import evaluate_vector
from traitlens.monitor import token_projections
from traitlens.pipeline import pair_activations

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_model):
    out = tmp_path_factory.mktemp("sentiment")
    assert main(["extract", "--trait", "sentiment", "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_extract_chooses_a_layer_that_generalises_and_beats_the_control(run):
    _, summary = run
    assert len(summary["layers"]) == 30 and len(summary["methods"]) == 6
    chosen = summary["chosen"]
    assert chosen["method"] != "random_baseline"
    assert chosen["test"]["accuracy"] >= 0.9
    # random directions oriented on train get past chance on a residual stream (its variance sits in a few
    # directions), and the chosen vector beats the best of them
    # the choice is the best (method, layer) on validation by accuracy, then AUROC, then effect size (the
    # shallower layer, then the method listed first, on a tie); the control is never chosen
    val, layers = summary["validation"], summary["layers"]
    ranked = [(m, i) for m in summary["methods"] if m != "random_baseline" for i in range(len(layers))]

    def rank(candidate):
        method, i = candidate
        scores = val[method][str(layers[i])]
        return (scores["accuracy"], scores["auroc"], scores["effect_size"]), -i

    best_method, best_i = max(ranked, key=rank)
    assert (chosen["method"], chosen["layer"]) == (best_method, layers[best_i])
    control = summary["control"]["test"]
    assert 0.5 < control["draws_accuracy_mean"] < control["draws_accuracy_max"] < chosen["test"]["accuracy"]
    assert summary["control"]["ok"] and summary["control"]["rule"]
    # the rule as summary.json states it, read from its own validation scores
    layer = str(summary["control"]["layer"])
    draws = summary["validation"]["random_baseline"][layer]
    mine = summary["validation"][chosen["method"]][layer]
    assert (mine["accuracy"], mine["auroc"]) > (draws["draws_accuracy_max"], draws["draws_auroc_max"])


def test_saved_vectors_reload_bit_identically(run, real_model):
    out, summary = run
    model, _ = real_model
    vector = load_vector(out / "trait_vector.safetensors", model=model)
    assert vector.layer == summary["chosen"]["layer"] and vector.method == summary["chosen"]["method"]
    all_layers = load_file(out / "all_layers.safetensors")
    row = summary["layers"].index(vector.layer)
    assert torch.equal(vector.vector, all_layers[vector.method][row])
    assert vector.dataset_hash == load_dataset("sentiment").sha256
    assert vector.metrics["test_accuracy"] == summary["chosen"]["test"]["accuracy"]
    saved = sorted((out / "vectors").glob("*.safetensors"))
    assert len(saved) == len(summary["methods"])  # each method's best layer (the control's at the chosen one)
    for path in saved:  # each equals its row of all_layers, at the layer its name gives
        again = load_vector(path)
        assert path.name == f"{again.method}_layer{again.layer}.safetensors"
        assert torch.equal(again.vector, all_layers[again.method][summary["layers"].index(again.layer)])
    # the control is saved at the chosen layer: its "best" layer would be its luckiest random direction
    assert (out / "vectors" / f"random_baseline_layer{vector.layer}.safetensors").is_file()
    assert (out / "report.html").stat().st_size > 10_000
    assert all((out / name).is_file() for name in ("layers.png", "histogram.png", "cosines.png"))
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # what --overwrite clears is all of it


def test_monitor_projects_positive_texts_higher(run, real_model):
    out, _ = run
    model, tokenizer = real_model
    vector = load_vector(out / "trait_vector.safetensors")
    pairs = load_dataset("sentiment").test
    pos = [token_projections(model, tokenizer, vector, p.pos_example).mean() for p in pairs]
    neg = [token_projections(model, tokenizer, vector, p.neg_example).mean() for p in pairs]
    assert sum(pos) / len(pos) > sum(neg) / len(neg)
    # The vector was read at the last token: there each pair must come out the right way round.
    last = [
        float(token_projections(model, tokenizer, vector, p.pos_example).scores[-1])
        - float(token_projections(model, tokenizer, vector, p.neg_example).scores[-1])
        for p in pairs
    ]
    assert sum(d > 0 for d in last) >= 0.9 * len(pairs)


def test_live_token_texts_add_up_to_the_text_also_when_it_ends_inside_a_character(real_model):
    from transformers import LogitsProcessor, LogitsProcessorList

    from traitlens.monitor import generate_with_projections

    model, tokenizer = real_model
    emoji = tokenizer.encode("é😀", add_special_tokens=False)  # é, then 3 byte tokens for the emoji
    assert len(emoji) == 4

    class Force(LogitsProcessor):  # generates the emoji's tokens, whatever the model would
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, emoji[input_ids.shape[1] - start]] = 0.0
            return forced

    vector = TraitVector(torch.randn(576), model="smollm2", module="model.layers.5", position="all",
                         method="mean_diff")  # fmt: skip
    start = encode_examples(tokenizer, ["Smile"]).input_ids.shape[1]
    for new_tokens in (3, 4):  # ends inside the emoji, then after it
        live = []
        scores = generate_with_projections(
            model, tokenizer, vector, "Smile", max_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([Force()]), on_token=lambda t, v, live=live: live.append((t, v)),
        )  # fmt: skip
        assert [t for t, _ in live] == scores.tokens
        assert torch.equal(torch.tensor([v for _, v in live]), scores.scores)
        assert "".join(scores.tokens[start:]) == tokenizer.decode(emoji[:new_tokens])
    assert scores.tokens[start:] == ["é", "", "", "😀"]


def test_generation_with_stop_strings_and_a_sampling_config_is_scored_as_generated(real_model):
    from transformers import GenerationConfig

    from traitlens.monitor import generate_with_projections

    model, tokenizer = real_model
    vector = TraitVector(torch.randn(576), model="smollm2", module="model.layers.5", position="all",
                         method="mean_diff")  # fmt: skip
    prompt = Example(prompt="Count from one to ten in words.")
    free = generate_with_projections(model, tokenizer, vector, prompt, max_new_tokens=12)
    text = "".join(free.tokens[int((~free.response).sum()) :])
    stop = text.strip().split()[1]  # a word the greedy answer reaches: generate stops on it
    # stop_strings needs the tokenizer inside generate: it raised transformers' error, and tokenizer= clashed
    stopped = generate_with_projections(
        model, tokenizer, vector, prompt, max_new_tokens=12, stop_strings=[stop]
    )
    assert stop in "".join(stopped.tokens) and len(stopped.tokens) < len(free.tokens)
    torch.testing.assert_close(stopped.scores, free.scores[: len(stopped.scores)], rtol=1e-4, atol=1e-4)
    # a sampling generation config is followed (do_sample=False overrode it): seeds give different texts
    config = GenerationConfig(do_sample=True, temperature=1.5, top_k=0)
    texts = set()
    for seed in range(3):
        torch.manual_seed(seed)
        texts.add("".join(generate_with_projections(model, tokenizer, vector, prompt, max_new_tokens=8,
                                                    generation_config=config).tokens))  # fmt: skip
    assert len(texts) > 1


def test_cli_evaluate_monitor_modules(run, tmp_path, capsys):
    out, summary = run
    vector = str(out / "trait_vector.safetensors")
    plot = tmp_path / "projections"  # written as named, without a suffix added
    assert (
        main(["evaluate", vector, "--trait", "sentiment", "--split", "test", "--json", "--plot", str(plot)])
        == 0
    )
    assert plot.read_bytes().startswith(b"\x89PNG")
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(summary["chosen"]["test"]["accuracy"])
    page = tmp_path / "m.html"
    assert (
        main(
            [
                "monitor",
                vector,
                "--prompt",
                "Describe your best day.",
                "--max-new-tokens",
                "8",
                "--out",
                str(page),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "mean projection" in printed and page.read_text().count("<span") > 8
    assert main(["modules", "--pattern", r"layers\.\d+$"]) == 0
    assert capsys.readouterr().out.split() == [f"model.layers.{i}" for i in range(30)]


def test_cli_bad_arguments_get_one_line(run, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.safetensors"), "--trait", "sentiment"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("traitlens evaluate: error:") and "\n" not in err
    # a prompt_last vector on data whose sides share every prompt would score chance: refused, no model load
    out, _ = run
    assert main(["evaluate", str(out / "trait_vector.safetensors"), "--trait", "formality"]) == 2
    err = capsys.readouterr().err
    assert "at position 'prompt_last'" in err and "every row" in err and "loaded" not in err
    assert "a vector read at a prompt position cannot be scored on this data" in err
    assert main(["extract", "--trait", "sentimnt"]) == 2
    assert "did you mean 'sentiment'" in capsys.readouterr().err


def _last_token_outputs(model, tokenizer, texts, path: str) -> torch.Tensor:
    """``[n, hidden]`` float32: the output of module ``path`` at each text's last token, read with a plain
    torch hook (the reference for where ``evaluate`` must read)."""
    enc = encode_examples(tokenizer, texts)
    seen = []
    handle = model.get_submodule(path).register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            model(**enc.model_inputs())
    finally:
        handle.remove()
    return seen[0][torch.arange(len(texts)), enc.last_prompt_index].float()


def test_cli_evaluate_reads_the_module_the_vector_was_read_at(real_model, tmp_path, capsys):
    model, tokenizer = real_model
    data = load_dataset("sentiment")
    path = "model.layers.12.mlp"  # not the layer-12 residual stream
    train_pos, train_neg = (
        _last_token_outputs(model, tokenizer, side, path) for side in data.examples("train")
    )
    test_pos, test_neg = (_last_token_outputs(model, tokenizer, side, path) for side in data.examples("test"))
    direction = train_pos.mean(0) - train_neg.mean(0)  # [hidden]
    unit = direction / direction.norm()
    threshold = float(((train_pos @ unit).mean() + (train_neg @ unit).mean()) / 2)
    vector = TraitVector(
        direction, model="HuggingFaceTB/SmolLM2-135M-Instruct", module=path, position="prompt_last",
        method="mean_diff", method_params={"threshold": threshold},
    )  # fmt: skip
    file = vector.save(tmp_path / "mlp12.safetensors")
    assert main(["evaluate", str(file), "--trait", "sentiment", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    pos_s, neg_s = test_pos @ unit, test_neg @ unit  # [n]
    assert metrics["pos_mean"] == pytest.approx(float(pos_s.mean()), rel=1e-3)
    assert metrics["neg_mean"] == pytest.approx(float(neg_s.mean()), rel=1e-3)
    right = int((pos_s > threshold).sum()) + int((neg_s <= threshold).sum())
    assert metrics["accuracy"] == pytest.approx(right / (len(pos_s) + len(neg_s)), abs=1.01 / len(pos_s))
    # a module whose output is not [batch, seq, hidden] cannot be scored: refused, not read elsewhere
    k_proj = TraitVector(
        direction, model="HuggingFaceTB/SmolLM2-135M-Instruct", module="model.layers.12.self_attn.k_proj",
        position="prompt_last", method="mean_diff",
    )  # fmt: skip
    assert main(["evaluate", str(k_proj.save(tmp_path / "k.safetensors")), "--trait", "sentiment"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model-loading lines
    assert err.startswith("traitlens evaluate: error:")
    assert "'model.layers.12.self_attn.k_proj'" in err and "192" in err and "576" in err


def test_cli_steer_refuses_an_op_that_dose_response_cannot_apply(tmp_path, capsys):
    vector = TraitVector(
        torch.randn(576, generator=torch.Generator().manual_seed(0)),
        model="HuggingFaceTB/SmolLM2-135M-Instruct", module="model.layers.12", position="prompt_last",
        method="mean_diff",
    )  # fmt: skip
    file = str(vector.save(tmp_path / "v.safetensors"))
    for op in ("ablate", "clamp"):
        args = ["steer", file, "--prompt", "Hi.", "--max-new-tokens", "2", "--dose-response", "--op", op]
        assert main([*args, "--out", str(tmp_path / "dose.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("traitlens steer: error:") and "\n" not in err
        assert f"--op {op}" in err and "--dose-response" in err
        assert not (tmp_path / "dose.png").exists()
    # a vector in no decoder layer has no residual norm for a relative --coeff
    final_norm = TraitVector(
        torch.randn(576, generator=torch.Generator().manual_seed(1)),
        model="HuggingFaceTB/SmolLM2-135M-Instruct", module="model.norm", position="prompt_last",
        method="mean_diff",
    )  # fmt: skip
    args = [
        "steer",
        str(final_norm.save(tmp_path / "n.safetensors")),
        "--prompt",
        "Hi.",
        "--max-new-tokens",
        "2",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("traitlens steer: error:") and "'model.norm'" in err and "--absolute" in err


def test_cli_steer_dose_response_and_export(run, tmp_path, capsys):
    from traitlens.controlvector import load_control_vector

    out, summary = run
    vector = str(out / "trait_vector.safetensors")
    args = ["steer", vector, "--prompt", "Tell me about your weekend.", "--max-new-tokens", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- ") == 3 and "baseline" in printed and "add +0.3" in printed
    plot = tmp_path / "dose.png"
    dose = [*args[:-1], "20", "--coeff", "-0.3", "0.3", "--dose-response", "--out", str(plot)]
    assert main(dose) == 0
    table = capsys.readouterr().out.splitlines()
    projections = [float(line.split()[1]) for line in table[1:4]]  # the text's trait at -0.3, 0, +0.3
    assert projections[0] < projections[1] <= projections[2] and projections[0] < projections[2]
    assert plot.read_bytes().startswith(b"\x89PNG")
    gguf = tmp_path / "cv.gguf"
    assert main(["export", str(out), "--method", "mean_diff", "--out", str(gguf)]) == 0
    control = load_control_vector(gguf)
    assert control.layers == list(range(1, 30))
    all_layers = load_file(out / "all_layers.safetensors")["mean_diff"]
    assert torch.equal(control.directions[12], all_layers[12])
    assert main(["export", str(out)]) == 0  # by default the method the run chose
    chosen = summary["chosen"]["method"]
    control = load_control_vector(out / f"{chosen}.gguf")
    assert torch.equal(control.directions[12], load_file(out / "all_layers.safetensors")[chosen][12])
    assert summary["model_type"] == control.model_hint == "llama"  # the run's model_type


def test_prompt_style_data_reads_the_answers_and_refuses_a_shared_prompt(real_model):
    from traitlens.pipeline import default_position, extract_trait

    model, tokenizer = real_model
    data = load_dataset("formality")
    assert (
        default_position(data) == "response_mean"
        and default_position(load_dataset("sentiment")) == "prompt_last"
    )
    result = extract_trait(model, tokenizer, data, layers=[3, 12], progress=False)
    assert result.position == "response_mean" and result.test["accuracy"] >= 0.8
    # the test split is read after the choice, at the chosen layer alone, as a read of every layer holds it
    every = pair_activations(
        model, tokenizer, data.split("test"), layers=[3, 12], position="response_mean", progress=False
    )
    i = result.index(result.best_layer)
    test = result.activations["test"]
    assert [side.shape[0] for side in test] == [1, 1] and result.activations["val"][0].shape[0] == 2
    for got, expected in zip(test, every, strict=True):
        torch.testing.assert_close(got[0], expected[i], rtol=0, atol=1e-4)
    vector, threshold = result.vectors[result.best_method][i], result.thresholds[result.best_method][i]
    scores = evaluate_vector(vector, every[0][i], every[1][i], threshold=threshold)
    assert scores["accuracy"] == result.test["accuracy"]
    assert abs(scores["auroc"] - result.test["auroc"]) < 1e-6
    with pytest.raises(ValueError, match=r"position 'prompt_last' .* every row .*response_mean"):
        extract_trait(model, tokenizer, data, layers=[3], position="prompt_last", progress=False)


def test_report_shows_the_random_baseline_as_the_mean_over_its_draws(run):
    import re

    from traitlens.pipeline import CONTROL

    out, summary = run
    text = (out / "report.html").read_text()
    test = summary["control"]["test"]
    # the control's AUROC is the mean over its draws oriented on train, with the best of them
    assert test["draws_auroc_mean"] > 0.5
    shown = f"{test['draws_auroc_mean']:.3f} +/- {test['draws_auroc_std']:.3f} (best {test['draws_auroc_max']:.3f})"
    assert shown in text and "the chosen vector beats the best of 32 random directions" in text
    assert f"<td>{CONTROL} (mean of 32 oriented draws, chosen layer)</td>" in text
    # the per-token heatmaps of the short test sentences are coloured past their first token
    heatmaps = re.findall(r'<div class="traitlens-heatmap">.*?</div></div>', text)
    assert heatmaps
    for heatmap in heatmaps:
        alphas = [float(a) for a in re.findall(r"rgba\([0-9,]+,([0-9.]+)\)", heatmap)]
        assert len(alphas) < 20 and max(alphas[1:]) >= 0.9
    assert len(set(re.findall(r"&plusmn;([0-9.]+)", text))) == 1  # one colour scale: they compare
