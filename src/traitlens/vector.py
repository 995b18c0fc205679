"""A trait vector together with everything needed to trust, reuse and reproduce it.

``TraitVector`` carries a direction ``[hidden]`` and its provenance: the model (name and revision), where in
the model it was read (module path and layer), which token positions were used, the extraction method and its
parameters, the dataset (name and content hash) and split sizes, the metrics measured on it, and the
traitlens version that made it. Vectors support the arithmetic users reach for (``2 * v``, ``a - b``,
``v.normalized()``, ``a.cosine(b)``) and are written with ``save_vector`` / ``load_vector`` (or the methods
``v.save(path)`` / ``TraitVector.load(path)``).

File format (format version 1)
------------------------------
One ``.safetensors`` file, so that tensor and metadata cannot get separated:

- exactly one tensor, named ``"vector"``: shape ``[hidden]``, a floating dtype (float32, float16, bfloat16
  or float64), stored contiguous, on CPU, in the vector's own dtype, so a round trip is bit-identical;
- the safetensors header's ``__metadata__`` (a str -> str map) holds one key, ``"traitlens"``, whose value
  is a JSON object with ``"format": "traitlens.vector"``, ``"format_version": 1``, ``"hidden_size"`` and
  ``"dtype"`` (copies of the tensor's, checked on load), and one entry per metadata field of
  ``TraitVector`` (``model``, ``revision``, ``module``, ``layer``, ``position``, ``method``,
  ``method_params``, ``dataset``, ``dataset_hash``, ``split_sizes``, ``metrics``, ``trait``,
  ``traitlens_version``, ``extra``).

``save(..., sidecar=True)`` also writes the same JSON, indented, next to the file (``x.json`` for
``x.safetensors``, else the name with ``.json`` appended), for people and tools that want to read it
without safetensors. Loading never reads the sidecar: the header is the one source of truth. Loading never
unpickles anything (there is no ``torch.load`` here), so a file from ``torch.save`` is refused with a message
saying so.

Any safetensors reader can read the file: ``safetensors.torch.load_file(path)["vector"]`` gives the tensor
and ``json.loads(safe_open(path, "pt").metadata()["traitlens"])`` the metadata.

Metadata values must be JSON-serialisable. Tensors and numpy values (scalars and arrays) are converted to
Python numbers and lists when the ``TraitVector`` is built (and again on save), tuples become lists, so that
the object in memory equals the one loaded back. Anything else (a ``torch.dtype``, a custom object, a dict
with non-string keys) raises ``TypeError`` naming the key. Non-finite floats (a NaN metric) are written as
JSON's ``NaN`` extension, which Python's ``json`` reads back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import operator
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from traitlens._validation import check_vector, did_you_mean, real_number, shape_of, short_list
from traitlens.compute import _norm, _unit
from traitlens.hooks import decoder_layer_paths, residual_width
from traitlens.models import locate_module

TENSOR_NAME = "vector"
"""Name of the one tensor in a traitlens vector file."""

HEADER_KEY = "traitlens"
"""Key of the safetensors ``__metadata__`` entry that holds the metadata JSON."""

FORMAT = "traitlens.vector"
FORMAT_VERSION = 1

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
# safetensors header dtype codes of the dtypes above.
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}

# Metadata fields without a default: a file must have them.
_REQUIRED = ("model", "module", "position", "method", "traitlens_version")
# Keys of the JSON object that describe the file rather than a field.
_FORMAT_KEYS = ("format", "format_version", "hidden_size", "dtype")

# Metrics that are the vector's norm ("vector_norm", "val_vector_norm", ...): rescaled with the vector.
_NORM_METRIC = "vector_norm"

# Metrics shown in repr, first one present wins; otherwise the first numeric metric.
_REPR_METRICS = ("auroc", "accuracy", "val_accuracy", "test_accuracy", "heldout_accuracy", "separation")


def _current_version() -> str:
    # Imported late: traitlens/__init__.py imports this module.
    import traitlens

    return traitlens.__version__


@dataclass(eq=False)
class TraitVector:
    """A direction ``[hidden]`` in a model's activation space and the metadata that says what it is.

    Attributes:
        vector: the direction, ``[hidden]``, floating point (float32, float16, bfloat16 or float64), finite.
            Kept as given (dtype, device); ``save`` writes a CPU copy.
        model: the model it was computed on: a hub id or local name, e.g.
            ``"HuggingFaceTB/SmolLM2-135M-Instruct"``.
        module: dotted path of the module whose output was read, in the model's own naming, e.g.
            ``"model.layers.12"`` (Llama) or ``"transformer.h.3"`` (GPT-2).
        position: the rule that chose token positions, e.g. ``"prompt_last"`` or ``"response_mean"``.
        method: the extraction method's name, e.g. ``"mean_diff"`` or ``"probe"``.
        revision: the model revision (commit hash or tag) if known.
        layer: decoder layer index; when ``None`` it is read from ``module`` (its last all-digit component,
            so ``"model.layers.12.mlp"`` gives 12) and stays ``None`` if there is none.
        method_params: the method's parameters, e.g. ``{"normalize": True}``. ``"threshold"``, if present,
            is the decision threshold on the projection onto the unit vector (an example is called positive
            above it), as ``traitlens.metrics.midpoint_threshold`` fits it; ``evaluate`` and the monitor
            read it.
        dataset: the dataset's name or path.
        dataset_hash: a content hash of the dataset (the exact examples used).
        split_sizes: number of examples per split, e.g. ``{"train": 80, "val": 20}``; values ints >= 0.
        metrics: measurements of this vector, e.g. ``{"auroc": 0.97}``. They are taken to describe the
            direction: arithmetic keeps them only when the direction is unchanged (see below).
        trait: the trait's name, e.g. ``"honesty"``.
        traitlens_version: the traitlens version that made the vector (default: the running one; a loaded
            vector keeps the version recorded in its file).
        extra: anything else, JSON-serialisable. Arithmetic records its steps in ``extra["derivation"]``.

    Arithmetic (``2 * v``, ``v * 2``, ``v / 2``, ``-v``, ``a + b``, ``a - b``, ``v.normalized()``) returns a new
    ``TraitVector`` whose tensor is exactly what plain torch gives on ``.vector`` (``a + b`` moves ``b`` to
    ``a``'s device first; ``normalized`` computes in float32 and returns the input dtype). The result keeps
    the metadata of its left ``TraitVector`` operand, appends one step to ``extra["derivation"]`` (for
    ``a ± b`` the step holds a summary of ``b``, with ``b``'s own derivation), and keeps ``metrics`` only
    when the direction is unchanged (scaling by a positive number, normalizing), with the metrics that are
    the vector's norm (``"vector_norm"``, ``"val_vector_norm"``, ...) rescaled; negation, scaling by a
    number <= 0, and adding or subtracting another vector empty them. ``method_params["threshold"]`` is on
    the projection onto the unit vector, so it is kept by a positive scaling, negated by a negative one
    (``-v`` included), and dropped by scaling by 0 and by ``a ± b`` (nobody fitted one for the result).
    ``a ± b`` requires equal hidden sizes and warns when the two come from different models, modules or
    positions.

    ``a == b`` is exact identity: same dtype and shape, equal values, and metadata that is equal as JSON
    (device is ignored).
    """

    vector: torch.Tensor
    model: str
    module: str
    position: str
    method: str
    revision: str | None = None
    layer: int | None = None
    method_params: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    dataset_hash: str | None = None
    split_sizes: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    trait: str | None = None
    traitlens_version: str = field(default_factory=_current_version)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_vector(self.vector, "vector")
        if not self.vector.is_floating_point():
            raise TypeError(f"vector must be a floating-point tensor, got dtype {self.vector.dtype}")
        if self.vector.dtype not in _DTYPES:
            raise TypeError(
                f"vector dtype must be one of {short_list(_DTYPES.values())}, got {self.vector.dtype}"
            )
        for name in ("model", "module", "position", "method", "traitlens_version"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            if not value:
                raise ValueError(f"{name} must be a non-empty string, got ''")
        for name in ("revision", "dataset", "dataset_hash", "trait"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        if self.layer is None:
            self.layer = _layer_from_module(self.module)
        elif isinstance(self.layer, bool):
            raise TypeError("layer must be an int or None, got bool")
        else:
            try:  # numpy and 0-d tensor integers too (np.argmax, torch.argmax)
                self.layer = operator.index(self.layer)
            except TypeError:
                raise TypeError(f"layer must be an int or None, got {type(self.layer).__name__}") from None
        for name in ("method_params", "split_sizes", "metrics", "extra"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
            setattr(self, name, _jsonable(value, name))
        if "threshold" in self.method_params and real_number(self.method_params["threshold"]) is None:
            raise ValueError(
                "method_params['threshold'] is the decision threshold on the projection: it must be a finite "
                f"number, got {self.method_params['threshold']!r}"
            )
        for split, size in self.split_sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"split_sizes[{split!r}] must be an int >= 0, got {size!r}")

    # ----------------------------------------------------------------------------------------------------------
    # Basic properties

    @property
    def hidden_size(self) -> int:
        """Length of the vector (the model's hidden size)."""
        return int(self.vector.shape[0])

    def __len__(self) -> int:
        return self.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vector.dtype

    @property
    def device(self) -> torch.device:
        return self.vector.device

    def norm(self) -> float:
        """Euclidean norm of the vector, computed in float64."""
        return float(torch.linalg.vector_norm(self.vector.detach().to(torch.float64)))

    def cosine(self, other: TraitVector | torch.Tensor) -> float:
        """Cosine similarity with another vector (a ``TraitVector`` or a tensor ``[hidden]``), in float64.

        Raises ``ValueError`` if the hidden sizes differ or either vector is zero.
        """
        other_t = other.vector if isinstance(other, TraitVector) else check_vector(other, "other")
        if other_t.shape[0] != self.hidden_size:
            raise ValueError(
                f"cannot compare vectors of hidden size {self.hidden_size} and {other_t.shape[0]}: "
                f"other must have shape [hidden]=[{self.hidden_size}], got {shape_of(other_t)}"
            )
        a = self.vector.detach().to("cpu", torch.float64)
        b = other_t.detach().to("cpu", torch.float64)
        na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
        if na == 0 or nb == 0:
            which = "this vector" if na == 0 else "other"
            raise ValueError(f"cosine is undefined: {which} is all zeros")
        return float(a @ b / (na * nb))

    def to(self, *args: Any, **kwargs: Any) -> TraitVector:
        """A copy with ``vector.to(*args, **kwargs)`` (device and/or dtype), metadata unchanged; its tensor is
        a copy too, also where ``Tensor.to`` would return the same tensor."""
        moved = self.vector.to(*args, **kwargs)
        return self._derive(moved.clone() if moved is self.vector else moved, step=None, scale=1.0)

    def metadata(self) -> dict[str, Any]:
        """The metadata as a JSON-ready dict (everything but the tensor), as written to the file."""
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "dtype": _DTYPES[self.vector.dtype],
        }
        for f in dataclasses.fields(self):
            if f.name != "vector":
                meta[f.name] = _jsonable(getattr(self, f.name), f.name)
        return meta

    def summary(self) -> dict[str, Any]:
        """A short description (trait, model, module, method, dataset hash, norm, derivation)."""
        out: dict[str, Any] = {
            "trait": self.trait,
            "model": self.model,
            "module": self.module,
            "position": self.position,
            "method": self.method,
            "dataset_hash": self.dataset_hash,
            "norm": self.norm(),
        }
        if "derivation" in self.extra:
            out["derivation"] = copy.deepcopy(self.extra["derivation"])
        return out

    def __repr__(self) -> str:
        parts = [
            f"trait={self.trait!r}",
            f"model={self.model!r}",
            f"module={self.module!r}",
            f"method={self.method!r}",
            f"hidden_size={self.hidden_size}",
            f"norm={self.norm():.4g}",
            f"dtype={_DTYPES[self.vector.dtype]}",
        ]
        metric = _key_metric(self.metrics)
        if metric is not None:
            parts.append(f"{metric[0]}={metric[1]:.4g}")
        if "derivation" in self.extra:
            parts.append("derived")
        return f"TraitVector({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraitVector):
            return NotImplemented
        if self.vector.dtype != other.vector.dtype or self.vector.shape != other.vector.shape:
            return False
        if not torch.equal(self.vector.detach().cpu(), other.vector.detach().cpu()):
            return False
        # Compared as JSON text: 1 and 1.0 differ, NaN metrics compare equal, key order does not matter.
        return json.dumps(self.metadata(), sort_keys=True) == json.dumps(other.metadata(), sort_keys=True)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dict

    # ----------------------------------------------------------------------------------------------------------
    # Arithmetic

    def _derive(self, tensor: torch.Tensor, step: dict[str, Any] | None, scale: float | None) -> TraitVector:
        """A copy holding ``tensor`` ``[hidden]``, with ``step`` appended to ``extra["derivation"]``.

        ``scale``: ``tensor`` is ``scale * self.vector`` (``None``: it is no multiple of it, as ``a + b``).
        What was measured on the direction follows it (see the class docstring): the threshold, on the
        projection onto the unit vector, is kept for ``scale > 0``, negated for ``scale < 0`` and dropped
        for 0 or ``None``; metrics are kept only for ``scale > 0``, with the vector norms rescaled.
        """
        extra = copy.deepcopy(self.extra)
        if step is not None:
            previous = extra.get("derivation", [])
            extra["derivation"] = [*(previous if isinstance(previous, list) else [previous]), step]
        method_params = copy.deepcopy(self.method_params)
        metrics: dict[str, Any] = {}
        if "threshold" in method_params and not (scale is not None and scale > 0):
            threshold = method_params.pop("threshold")
            if scale is not None and scale < 0 and _is_number(threshold):
                method_params["threshold"] = -threshold
        if scale is not None and scale > 0:
            metrics = copy.deepcopy(self.metrics)
            if scale != 1:  # 1 keeps the values as they are (an int stays an int)
                for key, value in metrics.items():
                    if (key == _NORM_METRIC or key.endswith("_" + _NORM_METRIC)) and _is_number(value):
                        metrics[key] = value * scale
        return dataclasses.replace(
            self,
            vector=tensor,
            method_params=method_params,
            split_sizes=dict(self.split_sizes),
            metrics=metrics,
            extra=extra,
        )

    def __mul__(self, factor: object) -> TraitVector:
        if isinstance(factor, torch.Tensor) and factor.numel() == 1:
            factor = factor.item()
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        factor = float(factor)
        if not math.isfinite(factor):
            raise ValueError(f"cannot scale a TraitVector by {factor}: the factor must be finite")
        return self._derive(self.vector * factor, {"op": "scale", "factor": factor}, scale=factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: object) -> TraitVector:
        if isinstance(divisor, torch.Tensor) and divisor.numel() == 1:
            divisor = divisor.item()
        if isinstance(divisor, bool) or not isinstance(divisor, numbers.Real):
            return NotImplemented
        divisor = float(divisor)
        if divisor == 0 or not math.isfinite(divisor):
            raise ValueError(
                f"cannot divide a TraitVector by {divisor}: the divisor must be finite and non-zero"
            )
        return self._derive(self.vector / divisor, {"op": "divide", "divisor": divisor}, scale=1 / divisor)

    def __neg__(self) -> TraitVector:
        return self._derive(-self.vector, {"op": "negate"}, scale=-1.0)

    def _combine(self, other: object, op: str) -> TraitVector:
        if not isinstance(other, TraitVector):
            return NotImplemented
        if other.hidden_size != self.hidden_size:
            raise ValueError(
                f"cannot {op} TraitVectors of different hidden sizes: left is [hidden]=[{self.hidden_size}] "
                f"({self.model!r}, {self.module!r}), right is [hidden]=[{other.hidden_size}] "
                f"({other.model!r}, {other.module!r})"
            )
        differ = [
            f"{name} {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in ("model", "module", "position")
            if getattr(self, name) != getattr(other, name)
        ]
        if differ:
            warnings.warn(
                f"combining TraitVectors with different {', '.join(differ)}; the result keeps the left "
                "operand's metadata",
                stacklevel=3,
            )
        b = other.vector.to(self.vector.device)
        tensor = self.vector + b if op == "add" else self.vector - b
        return self._derive(tensor, {"op": op, "other": other.summary()}, scale=None)

    def __add__(self, other: object) -> TraitVector:
        return self._combine(other, "add")

    def __sub__(self, other: object) -> TraitVector:
        return self._combine(other, "subtract")

    def normalized(self) -> TraitVector:
        """The unit vector (norm 1), computed in float32 and returned in the vector's dtype.

        Metrics are kept (the direction is unchanged). Raises ``ValueError`` for a zero vector.
        """
        norm = float(_norm(self.vector))  # scaled: no overflow or underflow in the squares
        if norm == 0:
            raise ValueError("cannot normalize a zero vector (its norm is 0)")
        unit = _unit(self.vector).to(self.vector.dtype)
        return self._derive(unit, {"op": "normalize", "norm_before": norm}, scale=1 / norm)

    def check_model(self, model: torch.nn.Module) -> str:
        """Raise a ``ValueError`` naming the model this vector was made for if it does not fit ``model``: no
        module where it was read, or, read at a decoder layer, a length other than ``config.hidden_size``
        (other modules' outputs, such as an MLP's inner activations, can be wider or narrower: their width
        is checked where the vector is used). Returns the module's path in ``model`` (``module_in``)."""
        path = self.module_in(model)
        try:
            at_layer = path in decoder_layer_paths(model)
        except ValueError:  # no ModuleList of layers: only the module's presence can be checked
            at_layer = False
        self._check_width(model, at_layer)
        return path

    def module_in(self, model: torch.nn.Module) -> str:
        """The path of the module this vector was read at, in ``model``: ``module`` itself, or, in a wrapper
        such as a PEFT model, ``module`` under the transformers model it holds (``model.layers.3`` is
        ``base_model.model.model.layers.3`` there). Raises a ``ValueError`` when ``model`` has neither."""
        path = locate_module(model, self.module)
        if path is not None:
            return path
        modules = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"vector was read at module {self.module!r}, which {type(model).__name__} does not have"
            f"{did_you_mean(self.module, modules)} (modules: {short_list(modules)}); it was made for "
            f"model {self.model!r}"
        )

    def _check_width(self, model: Any, at_layer: bool) -> None:
        """Raise if the vector, read at a decoder layer (``at_layer``), is not ``config.hidden_size`` long."""
        expected = residual_width(model)
        if at_layer and expected is not None and self.hidden_size != expected:
            raise ValueError(
                f"vector has hidden size {self.hidden_size} but {type(model).__name__} has config.hidden_size "
                f"{expected}; the vector was made for model {self.model!r} at {self.module!r}"
            )

    # ----------------------------------------------------------------------------------------------------------
    # Files

    def save(self, path: str | os.PathLike, *, sidecar: bool = False) -> Path:
        """Write the vector to ``path`` (a ``.safetensors`` file; see the module docstring for the format).

        Args:
            path: the file to write (overwritten if it exists; a symbolic link is written through). The
                suffix ``.safetensors`` is conventional but not added or required.
            sidecar: also write the metadata, indented, to a JSON file next to ``path``: ``x.json`` for
                ``x.safetensors``, ``.json`` appended to any other name (``x.layer12.json``). It is for
                reading only; ``load`` ignores it. Without it, the sidecar an earlier save of this file
                wrote is removed (one that holds exactly the file's old metadata), so that it cannot
                describe a vector the file no longer holds.

        Returns the path written. Raises ``TypeError`` naming the key if a metadata value cannot be written
        as JSON.
        """
        self.__post_init__()  # fields may have been reassigned since construction
        path = Path(path)
        side = _sidecar_path(path)
        # checked before anything is written: a .json file may be the user's own
        if sidecar and path.suffix == ".json":
            raise ValueError(f"path {str(path)!r} ends in .json; with sidecar=True use a .safetensors name")
        folder = Path(os.path.realpath(path)).parent  # through a symbolic link, the target's
        if not folder.is_dir():
            raise FileNotFoundError(f"cannot write {path}: its folder {folder} does not exist")
        if Path(path).is_dir():
            raise IsADirectoryError(
                f"cannot write {path}: it is a folder; give a file name (e.g. vector.safetensors)"
            )
        meta = self.metadata()
        text = json.dumps(meta, ensure_ascii=False)
        tensor = self.vector.detach().to("cpu").contiguous()
        stale = not sidecar and _describes(side, path)  # read before the file is replaced
        save_tensors({TENSOR_NAME: tensor}, path, metadata={HEADER_KEY: text})
        if sidecar:
            side.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        elif stale:
            side.unlink()
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        hidden_size: int | None = None,
        model: Any = None,
    ) -> TraitVector:
        """Read a vector written by ``save``; nothing is unpickled.

        Args:
            path: a traitlens ``.safetensors`` vector file.
            hidden_size: if given, the vector must have this length.
            model: if given (a transformers model, or its config): for a model, the recorded ``module`` must
                exist in it; a vector read at a decoder layer must be ``config.hidden_size`` long (other
                modules' outputs, such as an MLP's inner activations, can be wider or narrower).

        Returns the vector on CPU in its stored dtype.

        Raises ``ValueError`` naming the file and the problem: not a safetensors file (e.g. a pickle from
        ``torch.save``), not a traitlens vector, missing or extra tensors, a tensor that is not ``[hidden]``
        or not floating point, missing or invalid metadata, or a hidden size or module that does not fit.
        """
        return _load(cls, path, hidden_size, model)

    @classmethod
    def _from_parts(cls, tensor: torch.Tensor, meta: dict[str, Any]) -> TraitVector:
        names = {f.name for f in dataclasses.fields(cls)} - {"vector"}
        unknown = sorted(set(meta) - names - set(_FORMAT_KEYS))
        if unknown:
            warnings.warn(
                f"ignoring unknown metadata keys {short_list(unknown)} (written by traitlens "
                f"{meta.get('traitlens_version')!r})",
                stacklevel=4,  # the caller of TraitVector.load or load_vector, both one frame above _load
            )
        if meta.get("position") == "prompt_mean" and meta.get("traitlens_version") == "0.5.0":
            warnings.warn(
                "this vector was read at position 'prompt_mean' by traitlens 0.5.0, whose mean included each "
                "text's first token (the attention sink, ~100x the other tokens' norm); since 0.5.1 the "
                "mean leaves it out, so activations read at its position now are not what it was fitted on: "
                "extract it again",
                stacklevel=4,
            )
        return cls(tensor, **{k: v for k, v in meta.items() if k in names})


def save_vector(vector: TraitVector, path: str | os.PathLike, *, sidecar: bool = False) -> Path:
    """Write ``vector`` to ``path``; the same as ``vector.save(path, sidecar=sidecar)``."""
    if not isinstance(vector, TraitVector):
        raise TypeError(
            f"vector must be a TraitVector, got {type(vector).__name__}; wrap a tensor with "
            "TraitVector(tensor, model=..., module=..., position=..., method=...)"
        )
    return vector.save(path, sidecar=sidecar)


def load_vector(path: str | os.PathLike, *, hidden_size: int | None = None, model: Any = None) -> TraitVector:
    """Read a vector file written by ``save_vector``; the same as ``TraitVector.load``."""
    return _load(TraitVector, path, hidden_size, model)


def _load(
    cls: type[TraitVector], path: str | os.PathLike, hidden_size: int | None, model: Any
) -> TraitVector:
    path = Path(path)
    meta, tensor = _read(path, with_tensor=True)
    try:
        vec = cls._from_parts(tensor, meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    _check_fits(vec, path, hidden_size=hidden_size, model=model)
    return vec


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a vector file, without reading the tensor. The file is checked as ``load_vector``
    checks its layout (a traitlens vector of the known format and version, one ``[hidden]`` tensor, the
    required keys); the fields' types and values are checked only when a ``TraitVector`` is built from them
    (``load_vector``)."""
    meta, _ = _read(Path(path), with_tensor=False)
    return meta


# --------------------------------------------------------------------------------------------------------------
# Helpers


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """``safetensors.torch.save_file``, leaving the file with the permissions the umask gives a new file.

    safetensors 0.8 writes through a temporary file created with mode 0600 and renames it into place, so
    its files were readable by their owner only, unlike the rest of a run's folder (safetensors issue #782).
    A ``path`` that is a symbolic link is written through, as ``open`` would, and stays a link.
    """
    path = os.path.realpath(path)  # through a symbolic link: the rename would replace the link itself
    try:
        _safetensors().torch.save_file(tensors, path, metadata=metadata)
    except Exception as err:  # safetensors' errors are not OSErrors, and name no file
        if "I/O error" in str(err):
            raise OSError(f"could not write {path}: {err}") from err
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sidecar_path(path: str | os.PathLike) -> Path:
    """Where ``save(path, sidecar=True)`` writes the metadata as JSON: ``x.json`` for ``x.safetensors``,
    and ``.json`` appended to any other name, so that ``v.layer12`` and ``v.layer13`` do not share one."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix == ".safetensors" else path.with_name(path.name + ".json")


def _describes(side: Path, path: Path) -> bool:
    """Whether ``side`` holds exactly the metadata of the vector file now at ``path`` (compared as JSON text,
    so that NaN metrics compare equal)."""
    try:
        found = json.loads(side.read_text(encoding="utf-8"))
        return json.dumps(found, sort_keys=True) == json.dumps(read_metadata(path), sort_keys=True)
    except (OSError, ValueError):  # no file or sidecar, not JSON, not a traitlens vector: not this file's
        return False


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "saving and loading trait vectors needs the package safetensors; install it with "
            "`pip install safetensors`"
        ) from None
    return safetensors


def _layer_from_module(module: str) -> int | None:
    """The decoder layer of a module path: its first all-digit part (``model.layers.3.mlp.experts.7`` is in
    layer 3; the 7 is an expert)."""
    digits = [part for part in module.split(".") if part.isdigit()]
    return int(digits[0]) if digits else None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _key_metric(metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    numeric = {k: v for k, v in metrics.items() if _is_number(v)}
    for name in _REPR_METRICS:
        if name in numeric:
            return name, float(numeric[name])
    if numeric:
        name = next(iter(numeric))
        return name, float(numeric[name])
    return None


def _jsonable(value: Any, key: str) -> Any:
    """``value`` with tensors, numpy values and tuples turned into JSON types; ``TypeError`` names ``key``."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"{key} is a complex tensor, which JSON cannot hold")
        return _jsonable(value.detach().cpu().tolist(), key)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # numpy scalars and arrays
        converted = value.tolist()
        if isinstance(converted, complex):
            raise TypeError(f"{key} is a complex number, which JSON cannot hold")
        return _jsonable(converted, key)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{key} has a key {k!r} of type {type(k).__name__}; metadata dict keys must be str "
                    f"(use {str(k)!r})"
                )
            out[k] = _jsonable(v, f"{key}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{key} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be saved as JSON; "
        "use str, int, float, bool, None, lists and dicts with str keys (e.g. str(value))"
    )


def _sniff(path: Path) -> str | None:
    """A guess at what a non-safetensors file is, for the error message."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, which is what torch.save writes (a pickle inside)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "a Python pickle (e.g. from torch.save)"
    if head.startswith(b"GGUF"):
        return "a GGUF file (e.g. a llama.cpp control vector)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file (the sidecar? load the .safetensors file next to it)"
    if not head:
        return "empty"
    return None


def _read(path: Path, *, with_tensor: bool) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Open ``path`` with safetensors and check its layout and metadata; never unpickles."""
    st = _safetensors()
    if not path.exists():
        raise FileNotFoundError(f"no vector file at {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; give the path of a .safetensors vector file")
    try:
        handle = st.safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        what = _sniff(path)
        msg = f"{path} is not a safetensors file ({e})"
        if what:
            msg = f"{path} is not a safetensors file: it looks like {what}"
        msg += (
            ". traitlens reads vectors only from safetensors files and never unpickles (loading a pickle can "
            "run arbitrary code). If you trust a torch.save file, convert it once: "
            "TraitVector(torch.load(f, weights_only=True), model=..., module=..., position=..., "
            "method=...).save('vector.safetensors')"
        )
        raise ValueError(msg) from None

    with handle as f:
        names = list(f.keys())
        header = f.metadata() or {}
        if HEADER_KEY not in header:
            raise ValueError(
                f"{path} is a safetensors file but not a traitlens vector: its header metadata has no "
                f"{HEADER_KEY!r} entry (metadata keys: {short_list(header)}; tensors: {short_list(names)})"
            )
        if TENSOR_NAME not in names:
            raise ValueError(
                f"{path} has no tensor named {TENSOR_NAME!r}; a traitlens vector file holds exactly one "
                f"(tensors found: {short_list(names)}{did_you_mean(TENSOR_NAME, names)})"
            )
        if len(names) > 1:
            others = [n for n in names if n != TENSOR_NAME]
            raise ValueError(
                f"{path} has extra tensors {short_list(others)}; a traitlens vector file holds exactly one "
                f"tensor, {TENSOR_NAME!r}"
            )
        tslice = f.get_slice(TENSOR_NAME)
        shape, code = list(tslice.get_shape()), tslice.get_dtype()
        if len(shape) != 1:
            raise ValueError(
                f"{path}: tensor {TENSOR_NAME!r} must have shape [hidden], got {tuple(shape)}; a traitlens "
                "vector file holds one direction for one module"
            )
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"{path}: tensor {TENSOR_NAME!r} must be floating point "
                f"({short_list(_DTYPES.values())}), got safetensors dtype {code}"
            )
        meta = _parse_meta(header[HEADER_KEY], path)
        dtype = _SAFETENSORS_DTYPES[code]
        if meta["hidden_size"] != shape[0]:
            raise ValueError(
                f"{path}: metadata says hidden_size {meta['hidden_size']} but tensor {TENSOR_NAME!r} has "
                f"shape {tuple(shape)}"
            )
        if meta["dtype"] != _DTYPES[dtype]:
            raise ValueError(
                f"{path}: metadata says dtype {meta['dtype']!r} but tensor {TENSOR_NAME!r} is {_DTYPES[dtype]}"
            )
        tensor = f.get_tensor(TENSOR_NAME) if with_tensor else None
    return meta, tensor


def _parse_meta(text: str, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {HEADER_KEY!r} header metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"{path}: the {HEADER_KEY!r} header metadata must be a JSON object, got {type(meta).__name__}"
        )
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not true or 1.0, which equal 1
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        hint = (
            f"; it was written by traitlens {meta.get('traitlens_version')!r}, upgrade traitlens to read it"
            if newer
            else ""
        )
        raise ValueError(
            f"{path}: unsupported format_version {version!r} (this traitlens reads {FORMAT_VERSION}){hint}"
        )
    missing = [k for k in (*_REQUIRED, "hidden_size", "dtype") if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata is missing required keys {short_list(missing)}")
    return meta


def _check_fits(vec: TraitVector, path: Path, *, hidden_size: int | None, model: Any) -> None:
    if hidden_size is not None:
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size must be an int, got {type(hidden_size).__name__}")
        if vec.hidden_size != hidden_size:
            raise ValueError(
                f"{path}: vector has hidden size {vec.hidden_size} (shape {shape_of(vec.vector)}), expected "
                f"{hidden_size}; it was made for model {vec.model!r}"
            )
    if model is None:
        return
    if residual_width(model) is None:
        raise TypeError(
            f"model must be a transformers model or config with an int config.hidden_size, got "
            f"{type(model).__name__}; pass hidden_size= instead"
        )
    try:
        if isinstance(model, torch.nn.Module):
            vec.check_model(model)
        else:  # a config: the path is all there is to go by
            vec._check_width(model, at_layer=vec.layer is not None and vec.module.endswith(f".{vec.layer}"))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
