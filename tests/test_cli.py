"""Command-line argument parsing, without a model (the commands run on the real model in integration)."""

from __future__ import annotations

import argparse
import json

import pytest

from traitlens.cli import _parse_layers


def test_layer_lists_and_ranges():
    assert _parse_layers("12") == [12]
    assert _parse_layers("5,10-12") == [5, 10, 11, 12]
    with pytest.raises(argparse.ArgumentTypeError, match=r"layer range '5-3' is empty: give it as 3-5"):
        _parse_layers("5-3")
    with pytest.raises(argparse.ArgumentTypeError, match=r"layers must look like '12' or '5,10-20', got 'a'"):
        _parse_layers("a")
    with pytest.raises(argparse.ArgumentTypeError, match=r"got '10-'"):  # was read as [10]
        _parse_layers("10-")


def test_export_says_why_layer_0_is_left_out_and_prints_the_norms(tmp_path, capsys):
    import torch

    from traitlens.cli import main
    from traitlens.controlvector import load_control_vector
    from traitlens.vector import save_tensors

    def run_with(layers):
        vectors = torch.arange(1.0, len(layers) + 1)[:, None] * torch.ones(len(layers), 4)  # norms 2, 4, ...
        meta = {"layers": str(layers), "model": "m", "trait": "t"}
        save_tensors(
            {"mean_diff": vectors, "probe": vectors.clone()},
            tmp_path / "all_layers.safetensors",
            metadata=meta,
        )

    run_with([0])
    assert main(["export", str(tmp_path), "--method", "mean_diff"]) == 2
    assert "extracted layer 0 only" in capsys.readouterr().err
    run_with([0, 3, 5])
    assert main(["export", str(tmp_path), "--method", "probe"]) == 0
    out, err = capsys.readouterr()
    assert "layer 0 left out" in err and "classifier weights" in err
    assert "wrote 2 layers (3-5, norms 4-6) to" in out
    assert load_control_vector(tmp_path / "probe.gguf").layers == [3, 5]
    # the model hint: --model-hint, else the run's model_type, else llama (a run from before model_type)
    assert load_control_vector(tmp_path / "probe.gguf").model_hint == "llama"
    assert "the run records no model_type" in err
    (tmp_path / "summary.json").write_text(json.dumps({"chosen": {"method": "probe"}, "model_type": "qwen2"}))
    assert main(["export", str(tmp_path)]) == 0
    assert load_control_vector(tmp_path / "probe.gguf").model_hint == "qwen2"
    assert main(["export", str(tmp_path), "--model-hint", "gemma2"]) == 0
    with pytest.raises(SystemExit):  # export takes no --model: it was read as --model-hint, abbreviated
        main(["export", str(tmp_path), "--model", "x"])
    assert load_control_vector(tmp_path / "probe.gguf").model_hint == "gemma2"


def test_extract_checks_the_data_before_loading_the_model(monkeypatch, capsys):
    import traitlens.cli
    from traitlens.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(traitlens.cli, "_load", no_load)
    assert main(["extract", "--trait", "sentiment", "--position", "response_mean"]) == 2
    assert "reads the mean over each row's answer" in capsys.readouterr().err
    assert main(["extract", "--trait", "sentiment", "--methods", "random_baseline"]) == 2
    assert "at least one method besides" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused by argparse
        main(["extract", "--trait", "sentiment", "--batch-size", "0"])
    assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err
    # a method given twice crashed after every fit, leaving a run without summary.json
    assert main(["extract", "--trait", "sentiment", "--methods", "probe", "probe"]) == 2
    assert "methods must each be given once" in capsys.readouterr().err


def test_extract_refuses_a_split_without_signal_at_its_position_before_loading(monkeypatch, tmp_path, capsys):
    import traitlens.cli
    from traitlens.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(traitlens.cli, "_load", no_load)
    plain = [{"pos": f"good {i}", "neg": f"bad {i}", "split": "train"} for i in range(2)]
    answers = [{"prompt": f"q{i}", "pos": "yes", "neg": "no", "split": s}
               for i, s in enumerate(["train", "train", "val", "val", "test", "test"])]  # fmt: skip
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in plain + answers))
    # the whole file has rows whose prompts differ, so this failed only after the model loaded and train ran
    assert main(["extract", "--data", str(data), "--position", "prompt_last"]) == 2
    err = capsys.readouterr().err
    assert "the two sides of every 'val' row of dataset 'mixed' read the same tokens" in err
    assert err.count("warning:") == 1  # the rows of train without signal, named once


def test_extract_keeps_an_earlier_run_unless_told_to_replace_it(monkeypatch, tmp_path, capsys):
    import traitlens.cli
    from traitlens.cli import RUN_FILES, _prepare_run_folder, _remove_run, main

    class Loaded(Exception):
        pass

    def no_load(args):
        raise Loaded

    monkeypatch.setattr(traitlens.cli, "_load", no_load)
    afile = tmp_path / "afile"
    afile.write_text("hi")
    for out in (afile, afile / "sub"):  # failed after the whole extraction
        assert main(["extract", "--trait", "sentiment", "--out", str(out)]) == 2
        assert "afile" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "vectors").mkdir(parents=True)
    (run / "vectors" / "ica_layer10.safetensors").write_text("old")
    (run / "summary.json").write_text("{}")
    (run / "shards").mkdir()  # the Ray backend's finished shards: reused, not removed
    (run / "notes.txt").write_text("the user's own")
    assert main(["extract", "--trait", "sentiment", "--out", str(run)]) == 2  # before the model loads
    assert f"{run} already holds a run (summary.json, vectors); pass --overwrite" in capsys.readouterr().err
    assert (run / "vectors" / "ica_layer10.safetensors").is_file()
    with pytest.raises(Loaded):  # a run that fails keeps the old one (it was deleted before the model loaded)
        main(["extract", "--trait", "sentiment", "--out", str(run), "--overwrite"])
    assert (run / "vectors" / "ica_layer10.safetensors").is_file() and (run / "summary.json").is_file()
    _remove_run(run, _prepare_run_folder(run, overwrite=True))  # what a run that succeeds does before saving
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "shards"]  # the old run's files are gone
    assert "summary.json" in RUN_FILES and "vectors" in RUN_FILES
    with pytest.raises(Loaded):  # the shipped name given as --data, as no file is called that
        main(["extract", "--data", "sentiment", "--out", str(tmp_path / "new")])


def test_steer_checks_its_inputs_before_loading_the_model(monkeypatch, tmp_path, capsys):
    import torch

    import traitlens.cli
    from traitlens import TraitVector
    from traitlens.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(traitlens.cli, "_load", no_load)
    vector = TraitVector(torch.ones(576), model="m", module="model.layers.3", layer=3, position="prompt_last",
                         method="mean_diff").save(tmp_path / "v.safetensors")  # fmt: skip
    for argv, message in (
        (["steer", str(tmp_path / "nope.safetensors"), "--prompt", "hi"], "nope.safetensors"),
        (["monitor", str(tmp_path / "nope.safetensors"), "--text", "hi"], "nope.safetensors"),
        (["steer", str(vector), "--prompts-file", str(tmp_path / "nope.txt")], "nope.txt"),
        (["steer", str(vector), "--prompt", ""], "--prompt: a prompt is an empty string"),
        (
            ["steer", str(vector), "--prompt", "hi", "--coeff", "nan"],
            "--coeff must be finite numbers, got [nan]",
        ),
        (["steer", str(vector), "--prompt", "hi", "--op", "ablate", "--coeff", "1"], "takes no --coeff"),
    ):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_evaluate_checks_the_data_against_the_vector_before_loading_the_model(monkeypatch, tmp_path, capsys):
    import json

    import torch

    import traitlens.cli
    from traitlens import TraitVector
    from traitlens.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(traitlens.cli, "_load", no_load)
    vector = TraitVector(
        torch.ones(576), model="HuggingFaceTB/SmolLM2-135M-Instruct", module="model.layers.3",
        position="response_mean", method="mean_diff",
    ).save(tmp_path / "v.safetensors")  # fmt: skip
    assert main(["evaluate", str(vector), "--trait", "sentiment"]) == 2  # plain texts: no answers to read
    err = capsys.readouterr().err
    assert "position 'response_mean' (the vector's)" in err
    assert "can be scored on rows with answers only" in err and "use position=" not in err
    splits = ["train", "train", "val", "val", "test"]
    rows = [{"prompt": f"q{i}", "pos": "yes", "neg": "no", "split": s} for i, s in enumerate(splits)]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["evaluate", str(vector), "--data", str(data), "--split", "test"]) == 2  # one test pair
    assert "has 1 'test' pair; scoring needs at least 2 (choose another --split)" in capsys.readouterr().err
    # rows without answers elsewhere in the file do not stop the scoring of a split that has them
    rows = [*rows, {"pos": "w1", "neg": "w2", "split": "train"}, {**rows[-1], "prompt": "q5"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["evaluate", str(vector), "--data", str(data), "--split", "test"])
    assert main(["evaluate", str(vector), "--data", str(data), "--split", "train"]) == 2
    assert "lines 6" in capsys.readouterr().err  # the train row without an answer, by its line
    # an output file that cannot be written is refused before the model loads, for every command
    missing = tmp_path / "no_such_dir" / "out.png"
    for command in (
        ["evaluate", str(vector), "--data", str(data), "--split", "test", "--plot", str(missing)],
        ["monitor", str(vector), "--text", "hi", "--out", str(missing)],
        ["steer", str(vector), "--prompt", "hi", "--dose-response", "--out", str(missing)],
    ):
        assert main(command) == 2, command
        assert f"its folder {missing.parent} does not exist" in capsys.readouterr().err
    assert (
        main(["evaluate", str(vector), "--data", str(data), "--split", "test", "--plot", str(tmp_path)]) == 2
    )
    assert "it is a folder; give a file name" in capsys.readouterr().err
    assert main(["steer", str(vector), "--prompt", "hi", "--out", str(tmp_path / "d.png")]) == 2
    assert "--out names the dose-response plot; add --dose-response" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(missing)]) == 2  # before reading the run
    assert f"its folder {missing.parent} does not exist" in capsys.readouterr().err


def test_a_vector_of_another_model_is_noted(capsys):
    from types import SimpleNamespace

    import torch

    from traitlens import TraitVector
    from traitlens.cli import _note_other_model

    vector = TraitVector(torch.ones(4), model="org/model-a", module="model.layers.1", position="prompt_last",
                         method="mean_diff")  # fmt: skip
    for loaded, noted in (("org/model-b", True), ("/local/copy/model-a", False), ("", False)):
        _note_other_model(vector, SimpleNamespace(config=SimpleNamespace(_name_or_path=loaded)))
        err = capsys.readouterr().err
        assert ("made for model 'org/model-a', and the model here is 'org/model-b'" in err) == noted, loaded


def test_warnings_are_one_line_each_and_shown_once(monkeypatch, capsys):
    import warnings

    import traitlens.cli
    from traitlens.cli import main

    def twice(args):  # as extract's data checks: before the model loads, and again in extract_trait
        for _ in range(2):
            warnings.warn("rows 3-4 read the same tokens on both sides", UserWarning, stacklevel=1)

    monkeypatch.setattr(traitlens.cli, "cmd_modules", twice)
    assert main(["modules"]) == 0
    assert (
        capsys.readouterr().err == "traitlens modules: warning: rows 3-4 read the same tokens on both sides\n"
    )


def test_the_model_dtype_is_chosen_with_dtype_and_said_when_loaded(monkeypatch, capsys):
    import torch

    import traitlens.models
    from conftest import make_tiny_model, make_word_tokenizer
    from traitlens.cli import main

    asked = []

    def fake_load(name, *, dtype=None, **kwargs):
        asked.append(dtype)
        model = make_tiny_model("llama")
        return model.to(torch.float16) if dtype == "float16" else model, make_word_tokenizer()

    monkeypatch.setattr(traitlens.models, "load_model", fake_load)
    assert main(["modules", "--dtype", "float16", "--pattern", "layers.0$"]) == 0
    out = capsys.readouterr()
    assert asked == ["float16"] and "(float16) in" in out.err and "model.layers.0" in out.out
    main(["modules", "--pattern", "layers.0$"])
    assert asked[-1] is None and "(float32) in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["modules", "--dtype", "half"])
