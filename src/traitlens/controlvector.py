"""llama.cpp control vectors: write per-layer vectors to the GGUF file that ``llama-cli --control-vector``
reads, and read such files back.

The format (as read by llama.cpp's ``common_control_vector_load`` and written by its ``cvector-generator``
and by repeng's ``ControlVector.export_gguf``):

- a GGUF file whose ``general.architecture`` is ``"controlvector"``;
- metadata ``controlvector.model_hint`` (the model family, e.g. ``"llama"``; llama.cpp ignores it, other
  readers such as vLLM require it) and ``controlvector.layer_count`` (the number of direction tensors,
  written as int32 as llama.cpp's own writer does);
- one 1-D float32 tensor ``direction.{N}`` of length ``n_embd`` per steered layer.

**Layer numbering.** llama.cpp adds ``direction.N`` to the *output* of its layer ``N`` (counted from 0, the
same order as Hugging Face's ``model.layers``), after the layer's last residual addition, at every token.
``direction.0`` is rejected by llama.cpp's loader: the output of the first layer cannot be steered from a
file. So traitlens layer ``i`` (the output of ``model.layers.i``, what ``steer(layer=i)`` means) is written
as ``direction.i`` unchanged, and ``i`` must be at least 1. A ``TraitVector`` is written only when its
``module`` is a decoder layer itself (``model.layers.12``, ``transformer.h.3``): one read inside a layer
(``model.layers.12.self_attn``, ``.mlp``, ``.input_layernorm``) was steered there, not at the layer's output,
so the file would add it elsewhere. Give ``{layer: tensor}`` to write such a vector at a layer output anyway.

**Strength.** llama.cpp adds the stored vector times the scale of ``--control-vector-scaled FILE SCALE``
(1 for ``--control-vector``). Store the vector you want added at scale 1, e.g. ``4 * v``: then
``steer(model, load_control_vector(path).directions)`` in traitlens and ``--control-vector path`` in
llama.cpp add the same thing (llama.cpp also steers every position, the prompt included).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from traitlens._validation import check_vector, short_list

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = f"{ARCHITECTURE}.model_hint"
LAYER_COUNT_KEY = f"{ARCHITECTURE}.layer_count"
TENSOR_PREFIX = "direction."


@dataclass
class ControlVector:
    """The contents of a control-vector file.

    Attributes:
        directions: ``{layer: [hidden] float32 tensor}``, keyed by traitlens layer index (the output of
            ``model.layers.{layer}``), sorted by layer. Pass it to ``steer(model, cv.directions)``.
        model_hint: the file's ``controlvector.model_hint`` (``None`` when absent).
    """

    directions: dict[int, torch.Tensor]
    model_hint: str | None = None

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])


def save_control_vector(path: str | os.PathLike, directions, *, model_hint: str) -> Path:
    """Write ``directions`` to ``path`` as a llama.cpp control-vector GGUF file and return the path.

    Args:
        directions: ``{layer: [hidden] tensor or TraitVector}``, or a single ``TraitVector`` / a list of
            them (each written at its ``.layer``, which needs its ``module`` to be a decoder layer such as
            ``"model.layers.12"``: see the module docs). Layers are traitlens indices, at least 1; values
            are written as float32.
        model_hint: the model family llama.cpp users should load it with, e.g. ``model.config.model_type``
            (``"llama"`` for the bundled SmolLM2).
    """
    from gguf import GGUFWriter

    rows = _as_directions(directions)
    if not isinstance(model_hint, str) or not model_hint:
        raise ValueError(
            f"model_hint must be a non-empty string such as model.config.model_type, got {model_hint!r}"
        )
    path = Path(path)
    writer = GGUFWriter(path, ARCHITECTURE)
    writer.add_string(MODEL_HINT_KEY, model_hint)
    writer.add_int32(LAYER_COUNT_KEY, len(rows))
    for layer, vector in rows.items():
        writer.add_tensor(f"{TENSOR_PREFIX}{layer}", vector.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_control_vector(path: str | os.PathLike) -> ControlVector:
    """Read a control-vector GGUF file (written by traitlens, repeng or llama.cpp's cvector-generator)."""
    from gguf import GGMLQuantizationType, GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no control-vector file at {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as err:  # gguf's own words ("GGUF magic invalid", an mmap error) say little
        raise ValueError(f"{path} is not a readable GGUF file ({err}); expected a control vector") from None
    arch = _string_field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(
            f"{path} is not a control vector: its general.architecture is {arch!r}, expected {ARCHITECTURE!r}"
        )
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        suffix = tensor.name.removeprefix(TENSOR_PREFIX)
        if suffix == tensor.name or not suffix.isdigit() or int(suffix) < 1:
            raise ValueError(
                f"{path}: tensor {tensor.name!r} is not a control-vector direction "
                f"('{TENSOR_PREFIX}N' with N >= 1, as llama.cpp requires)"
            )
        if tensor.tensor_type != GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ValueError(
                f"{path}: {tensor.name} must be a 1-D F32 tensor, got {tensor.tensor_type.name} with shape "
                f"{tuple(int(s) for s in tensor.shape)}"
            )
        layer = int(suffix)
        vector = torch.tensor(tensor.data, dtype=torch.float32).reshape(-1)
        try:  # as save_control_vector refuses to write them: an empty, NaN or infinite direction
            check_vector(vector, tensor.name)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        # A file may hold several directions for one layer; llama.cpp sums them.
        directions[layer] = directions[layer] + vector if layer in directions else vector
    if not directions:
        raise ValueError(f"{path} holds no {TENSOR_PREFIX}N tensors")
    sizes = {int(v.shape[0]) for v in directions.values()}
    if len(sizes) > 1:
        raise ValueError(f"{path}: direction tensors have different lengths {sorted(sizes)}")
    return ControlVector(
        directions=dict(sorted(directions.items())), model_hint=_string_field(reader, MODEL_HINT_KEY)
    )


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def _as_directions(directions) -> dict[int, torch.Tensor]:
    """``{layer: [hidden] float32 CPU tensor}``, sorted, validated."""
    if hasattr(directions, "vector") and hasattr(directions, "layer"):
        directions = [directions]
    if isinstance(directions, (list, tuple)):
        items = []
        for item in directions:
            if not hasattr(item, "layer") or not hasattr(item, "module"):
                raise TypeError(
                    f"a list of directions must hold TraitVectors, got {type(item).__name__}; "
                    "or pass {layer: vector}"
                )
            items.append((_decoder_layer(item), item))
    elif isinstance(directions, Mapping):
        items = list(directions.items())
        for layer, vector in items:  # a TraitVector given at a layer: the one it was read at
            if hasattr(vector, "vector") and hasattr(vector, "module") and _decoder_layer(vector) != layer:
                raise ValueError(
                    f"directions[{layer}] is a vector read at {vector.module!r}, so it belongs at layer "
                    f"{vector.layer}, not {layer}"
                )
    else:
        raise TypeError(
            f"directions must be {{layer: vector}}, a TraitVector or a list of them, got {type(directions).__name__}"
        )
    if not items:
        raise ValueError("directions is empty; give at least one {layer: vector}")
    rows: dict[int, torch.Tensor] = {}
    for layer, vector in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must be ints, got {type(layer).__name__} {layer!r}")
        if layer < 1:
            raise ValueError(
                f"layer {layer} cannot be written: llama.cpp adds direction.N to the output of layer N and "
                "rejects N = 0, so layers start at 1 (see traitlens.controlvector)"
            )
        if layer in rows:
            raise ValueError(f"layer {layer} is given twice")
        tensor = check_vector(getattr(vector, "vector", vector), f"directions[{layer}]")
        rows[layer] = tensor.detach().to("cpu", torch.float32).contiguous()  # what the file stores
        if not bool(torch.isfinite(rows[layer]).all()):
            raise ValueError(
                f"directions[{layer}] has values beyond float32's range (3.4e38), which the file stores"
            )
    sizes = {layer: int(v.shape[0]) for layer, v in rows.items()}
    if len(set(sizes.values())) > 1:
        shown = short_list([f"{layer}: {size}" for layer, size in sizes.items()])
        raise ValueError(f"all directions must have the same hidden size, got {shown}")
    return dict(sorted(rows.items()))


def _decoder_layer(vector) -> int:
    """The layer a ``TraitVector`` is written at: its ``module`` must be a decoder layer's own path (a
    dotted path whose one all-digit part is the last, e.g. ``model.layers.12``), equal to its ``.layer``.

    llama.cpp adds ``direction.N`` to the output of decoder layer ``N``; a vector read (and steered) at a
    submodule such as ``model.layers.12.self_attn`` would be added somewhere else. Without the model the
    path is all there is to go by, so an expert (``model.layers.3.mlp.experts.7``) is refused too.
    """
    module, layer = vector.module, vector.layer
    parts = module.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    if len(parts) >= 2 and digits == [len(parts) - 1]:  # a decoder layer's own path
        if int(parts[-1]) != layer:
            raise ValueError(
                f"TraitVector with module {module!r} has layer {layer}, which is not its module's index "
                f"{parts[-1]}; fix one of them, or pass {{layer: vector.vector}}"
            )
        return layer
    example = ".".join(parts[: digits[0] + 1]) if digits else "model.layers.N"
    raise ValueError(
        f"TraitVector with module {module!r} (layer {layer}) cannot be written: llama.cpp adds direction.N "
        f"to the output of decoder layer N (a module such as {example!r}), while this vector was read, and "
        f"is steered by steer(), at {module!r}, so the file would steer a different place. Extract the "
        "vector at a decoder layer, or pass {N: vector.vector} to add it at the output of layer N anyway"
    )
