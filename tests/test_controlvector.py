"""llama.cpp control-vector files: round trip, and the layout llama.cpp's loader expects, read back with an
independent GGUF header parser."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from conftest import TINY_HIDDEN, layer_path, make_tiny_model
from traitlens.capture import ActivationCapture
from traitlens.controlvector import ControlVector, load_control_vector, save_control_vector
from traitlens.hooks import HookManager
from traitlens.steering import steer
from traitlens.vector import TraitVector

HIDDEN = 576


def _directions(layers=(1, 5, 29), dtype=torch.float32) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {layer: torch.randn(HIDDEN, generator=g).to(dtype) for layer in layers}


def test_round_trip_gives_the_same_tensors_and_layers(tmp_path):
    directions = _directions()
    path = save_control_vector(tmp_path / "cv.gguf", directions, model_hint="llama")
    loaded = load_control_vector(path)
    assert isinstance(loaded, ControlVector)
    assert loaded.layers == [1, 5, 29]
    assert loaded.model_hint == "llama"
    assert loaded.hidden_size == HIDDEN
    for layer, vector in directions.items():
        assert loaded.directions[layer].dtype == torch.float32
        assert torch.equal(loaded.directions[layer], vector)


def test_bf16_and_trait_vectors_are_written_as_float32(tmp_path):
    bf16 = _directions((3,), torch.bfloat16)[3]
    tv = TraitVector(
        vector=bf16, model="tiny", module="model.layers.7", position="prompt_last", method="mean_diff"
    )
    path = save_control_vector(tmp_path / "cv.gguf", [tv], model_hint="llama")
    loaded = load_control_vector(path)
    assert loaded.layers == [7]
    assert torch.equal(loaded.directions[7], bf16.float())


def test_file_layout_is_what_llama_cpp_reads(tmp_path):
    directions = _directions((2, 12))
    path = save_control_vector(tmp_path / "cv.gguf", directions, model_hint="llama")
    header = _parse_gguf(path.read_bytes())
    assert header["version"] == 3
    assert header["kv"]["general.architecture"] == (8, "controlvector")  # type 8 = string
    assert header["kv"]["controlvector.model_hint"] == (8, "llama")
    assert header["kv"]["controlvector.layer_count"] == (5, 2)  # type 5 = int32
    names = [t["name"] for t in header["tensors"]]
    assert names == ["direction.2", "direction.12"]
    for info in header["tensors"]:
        assert info["dims"] == [HIDDEN]  # 1-D, n_embd elements
        assert info["type"] == 0  # GGML_TYPE_F32
        layer = int(info["name"].split(".")[1])
        np.testing.assert_array_equal(info["data"], directions[layer].numpy())


def test_layer_zero_and_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="rejects N = 0"):
        save_control_vector(tmp_path / "a.gguf", {0: torch.randn(HIDDEN)}, model_hint="llama")
    with pytest.raises(ValueError, match="same hidden size"):
        save_control_vector(
            tmp_path / "b.gguf", {1: torch.randn(HIDDEN), 2: torch.randn(8)}, model_hint="llama"
        )
    with pytest.raises(ValueError, match="model_hint"):
        save_control_vector(tmp_path / "c.gguf", _directions(), model_hint="")
    with pytest.raises(TypeError, match="layers must be ints"):
        save_control_vector(tmp_path / "d.gguf", {"1": torch.randn(HIDDEN)}, model_hint="llama")
    with pytest.raises(ValueError, match="empty"):
        save_control_vector(tmp_path / "e.gguf", {}, model_hint="llama")
    with pytest.raises(ValueError, match=r"directions\[1\] is empty"):  # was written, shape [0]
        save_control_vector(tmp_path / "f.gguf", {1: torch.empty(0)}, model_hint="llama")
    big = torch.tensor([1e39, 1.0], dtype=torch.float64)  # finite in float64, inf in the file's float32
    with pytest.raises(ValueError, match="beyond float32's range"):
        save_control_vector(tmp_path / "g.gguf", {1: big}, model_hint="llama")
    with pytest.raises(ValueError, match=r"read at 'model.layers.5', so it belongs at layer 5, not 9"):
        save_control_vector(tmp_path / "h.gguf", {9: _trait_vector("model.layers.5")}, model_hint="llama")
    assert not list(tmp_path.glob("*.gguf"))


def test_loading_refuses_other_files(tmp_path):
    from gguf import GGUFWriter

    model_file = tmp_path / "model.gguf"
    writer = GGUFWriter(model_file, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    _finish(writer)
    with pytest.raises(ValueError, match="not a control vector"):
        load_control_vector(model_file)

    zero = tmp_path / "zero.gguf"
    writer = GGUFWriter(zero, "controlvector")
    writer.add_tensor("direction.0", np.zeros(8, dtype=np.float32))
    _finish(writer)
    with pytest.raises(ValueError, match="N >= 1"):
        load_control_vector(zero)
    with pytest.raises(FileNotFoundError):
        load_control_vector(tmp_path / "missing.gguf")
    for name, values in (("nan", [float("nan"), 1.0]), ("inf", [float("inf"), 1.0]), ("empty", [])):
        bad = tmp_path / f"{name}.gguf"  # what save_control_vector refuses to write, refused on reading too
        writer = GGUFWriter(bad, "controlvector")
        writer.add_tensor("direction.1", np.array(values, dtype=np.float32))
        _finish(writer)
        with pytest.raises(ValueError, match=rf"{name}\.gguf: direction\.1 (contains 1 non-finite|is empty)"):
            load_control_vector(bad)
    for name, content in (
        ("vector.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 8),
        ("empty.gguf", b""),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(
            ValueError, match=rf"{name} is not a readable GGUF file .*expected a control vector"
        ):
            load_control_vector(tmp_path / name)


def test_loaded_directions_steer_the_same_layers():
    model = make_tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    directions = {1: torch.randn(TINY_HIDDEN, generator=g), 2: torch.randn(TINY_HIDDEN, generator=g)}
    ids = torch.randint(3, 128, (1, 5), generator=g)
    capture = ActivationCapture(device=None)
    with HookManager(model) as hooks:
        for i in (1, 2):
            hooks.add_forward_hook(layer_path("llama", i), capture.make_hook(f"raw{i}"))
        with steer(model, directions) as handle:
            for i in (1, 2):
                handle.hooks.add_forward_hook(layer_path("llama", i), capture.make_hook(f"out{i}"))
            model(input_ids=ids)
    for i in (1, 2):
        assert torch.equal(capture.get(f"out{i}"), capture.get(f"raw{i}") + directions[i])


def _trait_vector(module: str, layer: int | None = None, hidden: int = HIDDEN) -> TraitVector:
    g = torch.Generator().manual_seed(2)
    return TraitVector(
        vector=torch.randn(hidden, generator=g), model="tiny", module=module, layer=layer,
        position="prompt_last", method="mean_diff",
    )  # fmt: skip


@pytest.mark.parametrize(
    "module",
    [
        "model.layers.12.self_attn",
        "model.layers.12.mlp",
        "model.layers.12.input_layernorm",
        "model.layers.3.mlp.experts.12",  # an expert of layer 3, not layer 12
        "model.norm",
    ],
)
def test_trait_vectors_read_inside_a_layer_are_refused(tmp_path, module):
    # llama.cpp adds direction.N to decoder layer N's output; a vector read at a submodule was steered there.
    vector = _trait_vector(module)
    for directions in (vector, [vector]):
        with pytest.raises(
            ValueError, match=r"module '.*' \(layer .*\) cannot be written.*output of decoder layer N"
        ):
            save_control_vector(tmp_path / "cv.gguf", directions, model_hint="llama")
    assert not (tmp_path / "cv.gguf").exists()


def test_a_layer_that_disagrees_with_the_module_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"'model.layers.12' has layer 5, which is not its module's index 12"
    ):
        save_control_vector(
            tmp_path / "cv.gguf", _trait_vector("model.layers.12", layer=5), model_hint="llama"
        )


def test_explicit_layers_and_decoder_layer_vectors_are_written(tmp_path):
    attn = _trait_vector("model.layers.12.self_attn")
    path = save_control_vector(
        tmp_path / "a.gguf", {12: attn.vector}, model_hint="llama"
    )  # the user's choice
    assert torch.equal(load_control_vector(path).directions[12], attn.vector)
    gpt2 = _trait_vector("transformer.h.3")
    path = save_control_vector(tmp_path / "b.gguf", gpt2, model_hint="gpt2")
    assert torch.equal(load_control_vector(path).directions[3], gpt2.vector)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_written_trait_vector_steers_like_the_vector_itself(tmp_path, family):
    model = make_tiny_model(family)
    vector = _trait_vector(layer_path(family, 2), hidden=TINY_HIDDEN)
    loaded = load_control_vector(save_control_vector(tmp_path / "cv.gguf", vector, model_hint=family))
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steer(model, vector, coeff=4.0):
            expected = model(input_ids=ids).logits
        with steer(model, {layer: 4.0 * d for layer, d in loaded.directions.items()}):
            got = model(input_ids=ids).logits
    assert loaded.layers == [2]
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _parse_gguf(data: bytes) -> dict:
    """A minimal GGUF v3 reader (little endian), independent of the gguf package: header, key/values of the
    scalar and string types, tensor infos, and F32 tensor data."""
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        length = take("Q")
        text = data[pos : pos + length].decode("utf-8")
        pos += length
        return text

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    assert data[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        key, kind = string(), take("I")
        kv[key] = (kind, string() if kind == 8 else take(scalar[kind]))
    tensors = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        dims = [take("Q") for _ in range(n_dims)]
        tensors.append({"name": name, "dims": dims, "type": take("I"), "offset": take("Q")})
    alignment = kv.get("general.alignment", (4, 32))[1]
    start = (pos + alignment - 1) // alignment * alignment
    for info in tensors:
        count = int(np.prod(info["dims"]))
        info["data"] = np.frombuffer(data, dtype="<f4", count=count, offset=start + info["offset"])
    return {"version": version, "kv": kv, "tensors": tensors}
