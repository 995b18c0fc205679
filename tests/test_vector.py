"""TraitVector: metadata, safetensors round trips, refusals of bad files, arithmetic against plain torch."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import traitlens
from conftest import TINY_HIDDEN, layer_path
from traitlens.vector import (
    FORMAT,
    FORMAT_VERSION,
    HEADER_KEY,
    TENSOR_NAME,
    TraitVector,
    load_vector,
    read_metadata,
    save_vector,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make(hidden: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> TraitVector:
    g = torch.Generator().manual_seed(seed)
    fields = dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        revision="abc123",
        module="model.layers.12",
        position="prompt_last",
        method="mean_diff",
        method_params={"normalize": False, "C": 0.5, "layers": [1, 2]},
        dataset="honesty_pairs",
        dataset_hash="sha256:" + "0" * 64,
        split_sizes={"train": 80, "val": 20},
        metrics={"auroc": 0.93, "accuracy": 0.875, "per_layer": {"12": [0.5, 0.75]}, "undefined": None},
        trait="honesty",
        extra={"note": "héllo", "nested": {"a": [1, {"b": True}]}},
    )
    tensor = overrides.pop("vector", None)
    fields.update(overrides)
    return TraitVector(torch.randn(hidden, generator=g).to(dtype) if tensor is None else tensor, **fields)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so that equality is bitwise (-0.0 differs from 0.0)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def header_meta(**overrides) -> dict:
    """A valid metadata JSON object for a float32 [8] tensor, with overrides (None deletes a key)."""
    meta = make(hidden=8).metadata()
    for k, v in overrides.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return meta


def write(path, tensors: dict, meta: dict | str | None):
    header = None if meta is None else {HEADER_KEY: meta if isinstance(meta, str) else json.dumps(meta)}
    save_file(tensors, str(path), metadata=header)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_identical_with_equal_metadata(tmp_path, dtype):
    v = make(dtype=dtype)
    v.vector[3] = -0.0  # a signed zero must survive too
    path = v.save(tmp_path / "honesty.safetensors")
    w = TraitVector.load(path)
    assert w.vector.dtype == dtype
    assert w.vector.shape == (16,)
    assert torch.equal(bits(w.vector), bits(v.vector))
    for name in ("model", "revision", "module", "layer", "position", "method", "method_params", "dataset"):
        assert getattr(w, name) == getattr(v, name), name
    for name in ("dataset_hash", "split_sizes", "metrics", "trait", "traitlens_version", "extra"):
        assert getattr(w, name) == getattr(v, name), name
    assert w == v
    assert w.metadata() == v.metadata()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["honesty.safetensors"]  # one file, no sidecar


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_file_is_readable_by_plain_safetensors(tmp_path, dtype):
    v = make(dtype=dtype)
    path = save_vector(v, tmp_path / "v.safetensors")
    tensors = load_file(str(path))
    assert list(tensors) == [TENSOR_NAME] == ["vector"]
    assert torch.equal(bits(tensors["vector"]), bits(v.vector))
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert list(header) == [HEADER_KEY]
    meta = json.loads(header[HEADER_KEY])
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION == 1
    assert meta["hidden_size"] == 16
    assert meta["dtype"] == str(dtype).removeprefix("torch.")
    assert meta["model"] == v.model and meta["metrics"]["auroc"] == 0.93
    assert read_metadata(path) == meta


def test_save_vector_load_vector_pair_with_non_contiguous_input(tmp_path):
    strided = torch.randn(32, generator=torch.Generator().manual_seed(2))[::2]  # [16], stride 2
    v = TraitVector(strided, model="m", module="transformer.h.3", position="response_mean", method="probe")
    assert not v.vector.is_contiguous()
    path = save_vector(v, tmp_path / "strided.safetensors")
    w = load_vector(path)
    assert w == v and w.vector.is_contiguous() and w.layer == 3
    with pytest.raises(TypeError, match=r"vector must be a TraitVector, got Tensor; wrap a tensor"):
        save_vector(strided, tmp_path / "raw.safetensors")


def test_sidecar_json_matches_header_and_is_ignored_on_load(tmp_path):
    v = make()
    path = v.save(tmp_path / "v.safetensors", sidecar=True)
    side = tmp_path / "v.json"
    assert json.loads(side.read_text(encoding="utf-8")) == read_metadata(path) == v.metadata()
    side.write_text("{ this is not json", encoding="utf-8")  # a broken sidecar must not matter
    assert TraitVector.load(path) == v
    with pytest.raises(ValueError, match=r"ends in \.json"):
        v.save(tmp_path / "v.json", sidecar=True)
    # the vector file has the permissions of any new file (safetensors 0.8 alone leaves 0600)
    assert path.stat().st_mode & 0o777 == side.stat().st_mode & 0o777


def test_numpy_and_tensor_metadata_are_converted_and_round_trip(tmp_path):
    v = make(
        metrics={"auroc": np.float32(0.75), "acc": torch.tensor(0.5), "curve": np.array([0.25, 0.5])},
        method_params={
            "C": np.float64(2.0),
            "max_iter": np.int64(100),
            "shape": (3, 4),
            "t": torch.arange(3),
        },
        split_sizes={"train": np.int64(7)},
    )
    assert v.metrics == {"auroc": 0.75, "acc": 0.5, "curve": [0.25, 0.5]}
    assert type(v.metrics["auroc"]) is float
    assert v.method_params == {"C": 2.0, "max_iter": 100, "shape": [3, 4], "t": [0, 1, 2]}
    assert type(v.method_params["max_iter"]) is int and type(v.split_sizes["train"]) is int
    w = TraitVector.load(v.save(tmp_path / "v.safetensors"))
    assert w == v and w.metrics == v.metrics and w.method_params == v.method_params


def test_values_assigned_after_construction_are_converted_on_save(tmp_path):
    v = make()
    v.metrics["late"] = np.float32(0.5)
    w = TraitVector.load(v.save(tmp_path / "v.safetensors"))
    assert w.metrics["late"] == 0.5 and type(w.metrics["late"]) is float


def test_nan_metric_round_trips(tmp_path):
    v = make(metrics={"auroc": float("nan")})
    w = TraitVector.load(v.save(tmp_path / "v.safetensors"))
    assert np.isnan(w.metrics["auroc"])
    assert w == v  # compared as JSON, so NaN metrics are equal


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method_params": {"dtype": torch.float32}}, r"method_params\['dtype'\] is a torch\.dtype"),
        ({"metrics": {"curves": [1.0, object()]}}, r"metrics\['curves'\]\[1\] is a builtins\.object"),
        (
            {"metrics": {12: 0.5}},
            r"metrics has a key 12 of type int; metadata dict keys must be str \(use '12'\)",
        ),
        ({"extra": {"z": 1j}}, r"extra\['z'\] is a builtins\.complex"),
        ({"extra": {"z": torch.ones(2, dtype=torch.complex64)}}, r"extra\['z'\] is a complex tensor"),
    ],
)
def test_unserialisable_metadata_raises_type_error_naming_the_key(overrides, message):
    with pytest.raises(TypeError, match=message):
        make(**overrides)


def test_unserialisable_value_added_later_is_refused_on_save(tmp_path):
    v = make()
    v.extra["device"] = torch.device("cpu")
    with pytest.raises(TypeError, match=r"extra\['device'\] is a torch\.device"):
        v.save(tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# Construction


def test_layer_is_read_from_the_module_path():
    assert make(module="model.layers.12").layer == 12
    assert make(module="transformer.h.3.mlp").layer == 3
    assert make(module="model.embed_tokens").layer is None
    assert make(module="model.layers.12", layer=7).layer == 7


def test_a_float16_vector_scaled_past_its_range_is_refused_saying_why():
    v = make(dtype=torch.float16)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\); float16 overflows above 65504"):
        v * 40000.0
    assert float((v.to(dtype=torch.float32) * 40000.0).vector.abs().max()) > 65504


def test_default_version_is_the_running_traitlens():
    assert make().traitlens_version == traitlens.__version__


@pytest.mark.parametrize(
    ("vector", "overrides", "error", "message"),
    [
        (torch.randn(2, 16), {}, ValueError, r"vector must have shape \[hidden\], got \(2, 16\)"),
        (torch.arange(16), {}, TypeError, r"vector must be a floating-point tensor, got dtype torch\.int64"),
        (torch.tensor([1.0, float("nan")]), {}, ValueError, r"vector contains 1 non-finite"),
        ([1.0, 2.0], {}, TypeError, r"vector must be a torch\.Tensor, got list"),
        (torch.randn(4), {"model": None}, TypeError, r"model must be a str, got NoneType"),
        (torch.randn(4), {"module": ""}, ValueError, r"module must be a non-empty string"),
        (torch.randn(4), {"layer": "12"}, TypeError, r"layer must be an int or None, got str"),
        (torch.randn(4), {"trait": 3}, TypeError, r"trait must be a str or None, got int"),
        (torch.randn(4), {"metrics": [0.5]}, TypeError, r"metrics must be a dict, got list"),
        (
            torch.randn(4),
            {"split_sizes": {"train": -1}},
            ValueError,
            r"split_sizes\['train'\] must be an int >= 0",
        ),
        # the monitor read these as a centre of 0.0 (a string) or 1.0 (a bool); NaN stayed NaN
        *[
            (torch.randn(4), {"method_params": {"threshold": bad}}, ValueError, r"it must be a finite number")
            for bad in ("0.5", True, float("nan"), None)
        ],
    ],
)
def test_constructor_refuses_bad_fields(vector, overrides, error, message):
    fields = dict(model="m", module="model.layers.1", position="prompt_last", method="mean_diff")
    fields.update(overrides)
    with pytest.raises(error, match=message):
        TraitVector(vector, **fields)


def test_repr_is_readable():
    text = repr(make(hidden=576))
    assert text.startswith("TraitVector(trait='honesty', model='HuggingFaceTB/SmolLM2-135M-Instruct', ")
    for part in (
        "module='model.layers.12'",
        "method='mean_diff'",
        "hidden_size=576",
        "dtype=float32",
        "auroc=0.93",
    ):
        assert part in text
    v = make()
    assert f"norm={v.norm():.4g}" in repr(v)
    assert "accuracy=0.5" in repr(make(metrics={"n": "x", "accuracy": 0.5}))  # skips non-numbers
    assert "derived" in repr(-v) and "derived" not in repr(v)


def test_to_changes_dtype_keeps_metadata():
    v = make()
    w = v.to(torch.bfloat16)
    assert w.dtype == torch.bfloat16 and torch.equal(w.vector, v.vector.to(torch.bfloat16))
    assert w.metadata() | {"dtype": "float32"} == v.metadata()
    assert w.to("cpu", torch.float32).vector.dtype == torch.float32
    assert len(v) == v.hidden_size == 16 and v.device == torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Refusals on load


def test_torch_save_file_is_refused_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "vector.pt"
    torch.save(torch.randn(16), path)

    def forbidden(*args, **kwargs):
        raise AssertionError("traitlens must never unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    with pytest.raises(ValueError) as info:
        TraitVector.load(path)
    message = str(info.value)
    assert str(path) in message
    assert (
        "is not a safetensors file: it looks like a zip archive, which is what torch.save writes" in message
    )
    assert "never unpickles" in message and "weights_only=True" in message


def test_legacy_pickle_is_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(torch.randn(16), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"it looks like a Python pickle .*never unpickles"):
        load_vector(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"vector": [1.0, 2.0]}))
    with pytest.raises(ValueError, match=r"it looks like a Python pickle"):
        load_vector(plain)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"is not a safetensors file: it looks like empty"),
        (b'{"model": "m"}', r"it looks like a JSON file \(the sidecar\?"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 32, r"it looks like a GGUF file"),
        (b"\x01\x02\x03\x04garbage", r"is not a safetensors file \("),
    ],
)
def test_other_non_safetensors_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_vector(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no vector file at .*nope\.safetensors"):
        load_vector(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError, match=r"is a directory"):
        load_vector(tmp_path)
    vector = TraitVector(torch.ones(4), model="m", module="model.layers.1", position="prompt_last",
                         method="mean_diff")  # fmt: skip
    with pytest.raises(
        IsADirectoryError, match=r"it is a folder; give a file name"
    ):  # was safetensors' I/O error
        vector.save(tmp_path)


def test_safetensors_file_that_is_not_a_traitlens_vector(tmp_path):
    path = write(tmp_path / "model.safetensors", {"lm_head.weight": torch.randn(4, 8)}, None)
    with pytest.raises(
        ValueError, match=r"is a safetensors file but not a traitlens vector: .*'lm_head\.weight'"
    ):
        load_vector(path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"direction": torch.randn(8)}, r"has no tensor named 'vector'.*tensors found: 'direction'"),
        ({"vectors": torch.randn(8)}, r"has no tensor named 'vector'.*did you mean 'vectors'\?"),
        ({"vector": torch.randn(8), "bias": torch.randn(1)}, r"has extra tensors 'bias'"),
        ({"vector": torch.randn(2, 8)}, r"tensor 'vector' must have shape \[hidden\], got \(2, 8\)"),
        ({"vector": torch.randn(())}, r"tensor 'vector' must have shape \[hidden\], got \(\)"),
        ({"vector": torch.arange(8)}, r"tensor 'vector' must be floating point .* got safetensors dtype I64"),
        ({"vector": torch.ones(8, dtype=torch.bool)}, r"got safetensors dtype BOOL"),
    ],
)
def test_bad_tensors_are_refused(tmp_path, tensors, message):
    path = write(tmp_path / "v.safetensors", tensors, header_meta())
    with pytest.raises(ValueError, match=message) as info:
        load_vector(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ("{not json", r"the 'traitlens' header metadata is not valid JSON"),
        ("[1, 2]", r"header metadata must be a JSON object, got list"),
        (header_meta(format=None), r"metadata 'format' must be 'traitlens\.vector', got None"),
        (header_meta(format="repeng"), r"metadata 'format' must be 'traitlens\.vector', got 'repeng'"),
        (header_meta(format_version=2), r"unsupported format_version 2 .*upgrade traitlens to read it"),
        (header_meta(format_version="1"), r"unsupported format_version '1' \(this traitlens reads 1\)$"),
        (header_meta(format_version=True), r"unsupported format_version True \(this traitlens reads 1\)$"),
        (header_meta(format_version=1.0), r"unsupported format_version 1.0 \(this traitlens reads 1\)$"),
        (header_meta(model=None), r"metadata is missing required keys 'model'"),
        (header_meta(module=None, method=None), r"missing required keys 'module', 'method'"),
        (header_meta(position=None), r"missing required keys 'position'"),
        (header_meta(traitlens_version=None), r"missing required keys 'traitlens_version'"),
        (header_meta(hidden_size=None), r"missing required keys 'hidden_size'"),
        (header_meta(dtype=None), r"missing required keys 'dtype'"),
        (header_meta(hidden_size=576), r"metadata says hidden_size 576 but tensor 'vector' has shape \(8,\)"),
        (header_meta(dtype="bfloat16"), r"metadata says dtype 'bfloat16' but tensor 'vector' is float32"),
        (header_meta(layer="12"), r": layer must be an int or None, got str"),
        (header_meta(split_sizes={"train": 1.5}), r"split_sizes\['train'\] must be an int >= 0, got 1\.5"),
        (header_meta(metrics=[0.9]), r"metrics must be a dict, got list"),
    ],
)
def test_bad_metadata_is_refused(tmp_path, meta, message):
    path = write(tmp_path / "v.safetensors", {"vector": torch.randn(8)}, meta)
    with pytest.raises(ValueError, match=message) as info:
        load_vector(path)
    assert str(path) in str(info.value)


def test_non_finite_tensor_is_refused(tmp_path):
    path = write(tmp_path / "v.safetensors", {"vector": torch.tensor([1.0, float("inf")] * 4)}, header_meta())
    with pytest.raises(ValueError, match=r"v\.safetensors: vector contains 4 non-finite values"):
        load_vector(path)


def test_optional_keys_default_and_unknown_keys_warn(tmp_path):
    meta = header_meta()
    for key in ("revision", "layer", "method_params", "dataset", "dataset_hash", "split_sizes", "extra"):
        meta.pop(key)
    meta["from_the_future"] = 1
    path = write(tmp_path / "v.safetensors", {"vector": torch.randn(8)}, meta)
    with pytest.warns(UserWarning, match=r"ignoring unknown metadata keys 'from_the_future'") as seen:
        v = load_vector(path)
    assert v.revision is None and v.layer == 12 and v.method_params == {} and v.extra == {}
    with pytest.warns(UserWarning, match="from_the_future") as again:
        TraitVector.load(path)
    assert [w.filename for w in (*seen, *again)] == [__file__] * 2  # the warning names the caller's line


def test_hidden_size_check(tmp_path):
    path = make(hidden=16).save(tmp_path / "v.safetensors")
    assert load_vector(path, hidden_size=16).hidden_size == 16
    with pytest.raises(
        ValueError, match=r"v\.safetensors: vector has hidden size 16 .*expected 576; it was made "
    ):
        load_vector(path, hidden_size=576)
    with pytest.raises(TypeError, match=r"hidden_size must be an int, got str"):
        load_vector(path, hidden_size="16")


def test_model_check_hidden_size_and_module(tmp_path, tiny):
    family, model = tiny
    good = make(hidden=TINY_HIDDEN, module=layer_path(family, 1)).save(tmp_path / "good.safetensors")
    v = load_vector(good, model=model)
    assert v.module == layer_path(family, 1)
    load_vector(good, model=model.config)  # a config works too (no module check)

    wrong_size = make(hidden=TINY_HIDDEN * 2, module=layer_path(family, 1)).save(tmp_path / "big.safetensors")
    with pytest.raises(
        ValueError, match=rf"vector has hidden size 64 but \w+ has config\.hidden_size {TINY_HIDDEN}"
    ):
        load_vector(wrong_size, model=model)

    other = "transformer.h.1" if family != "gpt2" else "model.layers.1"
    wrong_module = make(hidden=TINY_HIDDEN, module=other).save(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match=rf"read at module '{other}', which \w+ does not have") as info:
        load_vector(wrong_module, model=model)
    assert "(modules: " in str(info.value)
    typo = layer_path(family, 1).replace(".1", "s.1")  # model.layerss.1 / transformer.hs.1
    misspelt = make(hidden=TINY_HIDDEN, module=typo).save(tmp_path / "typo.safetensors")
    with pytest.raises(ValueError, match=rf"did you mean[^?]*'{layer_path(family, 1)}'"):
        load_vector(misspelt, model=model)

    with pytest.raises(TypeError, match=r"pass hidden_size= instead"):
        load_vector(good, model=object())

    # a submodule's output need not be the residual width: an MLP's inner activation is 2x here
    inner = "model.layers.1.mlp.act_fn" if family != "gpt2" else "transformer.h.1.mlp.act"
    wide = make(hidden=TINY_HIDDEN * 2 if family != "gpt2" else TINY_HIDDEN * 4, module=inner)
    assert load_vector(wide.save(tmp_path / "inner.safetensors"), model=model).module == inner


def test_layer_given_as_numpy_or_tensor_integers_and_read_from_an_experts_path():
    assert make(layer=np.int64(3)).layer == 3 and type(make(layer=np.int64(3)).layer) is int
    assert make(layer=torch.tensor(4)).layer == 4
    with pytest.raises(TypeError, match="layer must be an int or None, got float"):
        make(layer=2.0)
    assert make(module="model.layers.3.mlp.experts.7", layer=None).layer == 3  # the 7 is an expert


def test_saving_again_without_a_sidecar_removes_the_stale_one_and_nothing_else(tmp_path):
    path = make().save(tmp_path / "v.safetensors", sidecar=True)
    side = tmp_path / "v.json"
    assert side.exists()
    make(layer=5).save(path)  # the sidecar would describe layer 12
    assert not side.exists() and load_vector(path).layer == 5
    mine = json.dumps({**make().metadata(), "note": "mine"})  # of this format, but not this file's
    for text in ('{"important": true}', "not json", '["traitlens.vector"]', mine):  # the user's files stay
        side.write_text(text)
        make().save(path)
        assert side.read_text() == text
    # names without .safetensors get their own sidecar: saving one never touches another's
    for layer in (12, 13):
        make(layer=layer).save(tmp_path / f"v.layer{layer}", sidecar=True)
    assert json.loads((tmp_path / "v.layer12.json").read_text())["layer"] == 12
    make(layer=14).save(tmp_path / "v.layer14")
    assert json.loads((tmp_path / "v.layer13.json").read_text())["layer"] == 13
    make(metrics={"auroc": float("nan")}).save(path, sidecar=True)  # NaN metrics: still recognised as stale
    make().save(path)
    assert not side.exists()


def test_saving_through_a_symbolic_link_writes_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "store" / "v.safetensors"
    target.parent.mkdir()
    make().save(target)
    link = tmp_path / "current.safetensors"
    link.symlink_to(target)
    make(layer=5).save(link)
    assert link.is_symlink() and load_vector(target).layer == 5
    dangling = tmp_path / "later.safetensors"
    dangling.symlink_to(tmp_path / "store" / "new.safetensors")
    make().save(dangling)
    assert dangling.is_symlink() and load_vector(tmp_path / "store" / "new.safetensors") == make()
    nowhere = tmp_path / "nowhere.safetensors"
    nowhere.symlink_to(tmp_path / "no_such_dir" / "v.safetensors")
    with pytest.raises(FileNotFoundError, match=r"its folder .*no_such_dir does not exist"):
        make().save(nowhere)


def test_save_checks_the_sidecar_name_and_folder_before_writing_anything(tmp_path):
    mine = tmp_path / "config.json"
    mine.write_text('{"important": true}')
    with pytest.raises(ValueError, match=r"ends in \.json"):
        make().save(mine, sidecar=True)
    assert mine.read_text() == '{"important": true}'
    with pytest.raises(FileNotFoundError, match=r"its folder .*no_such_dir does not exist"):
        make().save(tmp_path / "no_such_dir" / "v.safetensors")


def test_to_is_a_copy_even_where_nothing_moves():
    v = make()
    w = v.to("cpu")
    w.vector += 1
    assert not torch.equal(v.vector, w.vector)


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_arithmetic_matches_plain_torch(dtype):
    a, b = make(dtype=dtype, seed=1), make(dtype=dtype, seed=2)
    x, y = a.vector, b.vector
    cases = {
        "2 * a": (2 * a, 2 * x),
        "a * 2": (a * 2, x * 2),
        "a * -0.5": (a * -0.5, x * -0.5),
        "np * a": (np.float32(3.0) * a, x * 3.0),
        "tensor * a": (a * torch.tensor(1.5), x * 1.5),
        "a / 4": (a / 4, x / 4),
        "-a": (-a, -x),
        "a + b": (a + b, x + y),
        "a - b": (a - b, x - y),
    }
    for name, (got, want) in cases.items():
        assert got.dtype == want.dtype == dtype, name
        assert torch.equal(bits(got.vector), bits(want)), name
    # laws
    assert torch.equal((a + b).vector, (b + a).vector)
    assert torch.equal((a - b).vector, (a + (-b)).vector)
    assert torch.equal((a + a).vector, (2 * a).vector)
    assert torch.equal((-a).__neg__().vector, a.vector)


def test_norm_normalized_and_cosine_against_numpy():
    a, b = make(hidden=576, seed=3), make(hidden=576, seed=4)
    x, y = a.vector.numpy().astype(np.float64), b.vector.numpy().astype(np.float64)
    assert a.norm() == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert a.cosine(b) == pytest.approx(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), rel=1e-12)
    assert a.cosine(b.vector) == pytest.approx(a.cosine(b), rel=1e-15)
    assert a.cosine(3 * a) == pytest.approx(1.0) and a.cosine(-a) == pytest.approx(-1.0)
    u = a.normalized()
    np.testing.assert_allclose(u.vector.numpy(), x / np.linalg.norm(x), rtol=1e-6, atol=1e-7)
    assert u.norm() == pytest.approx(1.0, abs=1e-6)
    assert u.extra["derivation"][-1] == {"op": "normalize", "norm_before": pytest.approx(a.norm(), rel=1e-6)}

    for scale in (1e20, 1e-25):  # a float32 norm overflowed (a zero "unit" vector) or was refused as zero
        big = TraitVector(
            a.vector * scale, model="m", module="model.layers.1", position="prompt_last", method="x"
        )
        np.testing.assert_allclose(big.normalized().vector.numpy(), u.vector.numpy(), rtol=1e-6, atol=1e-7)
        assert big.normalized().extra["derivation"][-1]["norm_before"] == pytest.approx(
            a.norm() * scale, rel=1e-6
        )

    h = make(hidden=576, dtype=torch.bfloat16, seed=3).normalized()
    assert h.dtype == torch.bfloat16 and h.norm() == pytest.approx(1.0, abs=1e-2)
    assert h.cosine(a) == pytest.approx(1.0, abs=1e-3)


def test_metadata_rule_for_arithmetic():
    a = make(seed=1, trait="honesty")
    b = make(seed=2, trait="sycophancy", method="probe", dataset_hash="sha256:beef")
    # direction unchanged: metrics kept, one derivation step added, rest of metadata unchanged
    for result, step in [
        (2 * a, {"op": "scale", "factor": 2.0}),
        (a / 2, {"op": "divide", "divisor": 2.0}),
        (a.normalized(), None),
    ]:
        assert result.metrics == a.metrics
        assert result.trait == "honesty" and result.model == a.model and result.method == "mean_diff"
        assert len(result.extra["derivation"]) == 1
        if step is not None:
            assert result.extra["derivation"] == [step]
        assert {k: v for k, v in result.extra.items() if k != "derivation"} == a.extra
    # direction changed: metrics emptied
    for result in (-a, a * -1, 0 * a, a + b, a - b, a / -2):
        assert result.metrics == {}
    step = (a - b).extra["derivation"][-1]
    assert step["op"] == "subtract"
    assert step["other"]["trait"] == "sycophancy" and step["other"]["method"] == "probe"
    assert step["other"]["dataset_hash"] == "sha256:beef" and step["other"]["norm"] == pytest.approx(b.norm())
    # chains accumulate, and the operand's own derivation is kept inside the summary
    c = (2 * a).normalized() + (-b)
    assert [s["op"] for s in c.extra["derivation"]] == ["scale", "normalize", "add"]
    assert c.extra["derivation"][-1]["other"]["derivation"] == [{"op": "negate"}]
    # operands are not modified
    assert "derivation" not in a.extra and a.metrics and b.metrics


def test_threshold_and_norm_follow_the_vector_through_arithmetic():
    # A fitted vector as the pipeline records it: threshold = midpoint of the class means of the
    # projections onto the unit vector, metrics from evaluate_vector with the "val_" prefix.
    g = torch.Generator().manual_seed(5)
    planted = torch.randn(16, generator=g)
    pos = torch.randn(40, 16, generator=g) + 1.5 * planted  # [n, hidden]
    neg = torch.randn(30, 16, generator=g) - 0.5 * planted  # [n, hidden]
    direction = pos.mean(0) - neg.mean(0)  # [hidden]

    def midpoint(vector: torch.Tensor) -> float:  # numpy reference of metrics.midpoint_threshold
        unit = vector.double().numpy() / np.linalg.norm(vector.double().numpy())
        return float(((pos.double().numpy() @ unit).mean() + (neg.double().numpy() @ unit).mean()) / 2)

    v = make(
        vector=direction,
        method_params={"normalize": False, "threshold": midpoint(direction)},
        metrics={
            "val_accuracy": 0.9,
            "val_threshold": midpoint(direction),
            "val_vector_norm": float(np.linalg.norm(direction.double().numpy())),
        },
    )
    assert abs(midpoint(direction)) > 0.5  # a threshold whose sign matters
    b = make(seed=7, method_params={"threshold": 3.0})
    # a multiple of the vector: the threshold is the one fitted for the multiple
    multiples = {"2 * v": 2 * v, "v / 3": v / 3, "normalized": v.normalized()}
    negatives = {"-v": -v, "v * -2": v * -2, "v / -4": v / -4}
    for name, w in {**multiples, **negatives}.items():
        assert w.method_params["threshold"] == pytest.approx(midpoint(w.vector), rel=1e-5), name
        assert w.method_params["normalize"] is False, name
    # a positive multiple keeps its metrics, with the norm that of the new vector
    for name, w in multiples.items():
        assert w.metrics["val_vector_norm"] == pytest.approx(w.norm(), rel=1e-6), name
        assert {k: x for k, x in w.metrics.items() if k != "val_vector_norm"} == {
            k: x for k, x in v.metrics.items() if k != "val_vector_norm"
        }, name
    # no multiple (or the zero vector): nobody fitted a threshold for it
    for name, w in {"0 * v": 0 * v, "v + b": v + b, "v - b": v - b, "b + v": b + v}.items():
        assert "threshold" not in w.method_params, name
        assert w.metrics == {}, name
    # the operands and a plain copy are unchanged
    assert v.method_params["threshold"] == midpoint(direction) and b.method_params["threshold"] == 3.0
    assert v.to(torch.float64).metadata() | {"dtype": "float32"} == v.metadata()


def test_arithmetic_result_round_trips(tmp_path):
    c = (2 * make(seed=1)).normalized() - make(seed=2)
    assert TraitVector.load(c.save(tmp_path / "c.safetensors")) == c


def test_arithmetic_refusals():
    a = make(hidden=16)
    with pytest.raises(
        ValueError, match=r"cannot add TraitVectors of different hidden sizes: left is \[hidden\]=\[16\]"
    ):
        a + make(hidden=8)
    with pytest.raises(ValueError, match=r"cannot subtract TraitVectors of different hidden sizes"):
        a - make(hidden=8)
    with pytest.raises(ValueError, match=r"other must have shape \[hidden\]=\[16\], got \(8,\)"):
        a.cosine(torch.randn(8))
    with pytest.raises(ValueError, match=r"cosine is undefined: other is all zeros"):
        a.cosine(torch.zeros(16))
    with pytest.raises(ValueError, match=r"cannot normalize a zero vector"):
        (0 * a).normalized()
    with pytest.raises(ValueError, match=r"cannot divide a TraitVector by 0\.0"):
        a / 0
    with pytest.raises(ValueError, match=r"the factor must be finite"):
        a * float("inf")
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(TypeError):
        a * "2"
    with pytest.raises(TypeError):
        a * True
    with pytest.raises(TypeError):
        1 / a


def test_combining_different_modules_warns():
    a, b = make(module="model.layers.3"), make(module="model.layers.5")
    with pytest.warns(UserWarning, match=r"different module 'model\.layers\.3' vs 'model\.layers\.5'"):
        c = a + b
    assert c.module == "model.layers.3"


def test_equality_is_exact():
    a = make()
    assert a == make()
    assert a != make(metrics={"auroc": 0.5})
    assert a != a.to(torch.float64)
    assert a != make(seed=1)
    assert make(metrics={"n": 1}) != make(metrics={"n": 1.0})
    with pytest.raises(TypeError):
        hash(a)


def test_import_traitlens_vector_does_not_import_safetensors():
    code = "import sys, traitlens.vector; print('safetensors' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_prompt_mean_vector_of_0_5_0_says_its_position_changed_meaning(tmp_path):
    # 0.5.0's prompt_mean included the first token (the attention sink); 0.5.1's leaves it out
    old = write(tmp_path / "old.safetensors", {"vector": torch.ones(8)},
                header_meta(position="prompt_mean", traitlens_version="0.5.0"))  # fmt: skip
    with pytest.warns(UserWarning, match="'prompt_mean' by traitlens 0.5.0.*extract it again") as record:
        load_vector(old)
    assert record[0].filename == __file__
    for meta in (
        header_meta(position="prompt_mean"),
        header_meta(position="prompt_last", traitlens_version="0.5.0"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_vector(write(tmp_path / "new.safetensors", {"vector": torch.ones(8)}, meta))
