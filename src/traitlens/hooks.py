"""Hooks on any module of any PyTorch model, addressed by the model's own dotted paths.

``HookManager`` registers forward (and forward-pre) hooks and removes every one of them on exit from its
``with`` block, also when the body raises. The model itself is never wrapped or modified.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

from traitlens._validation import closest, short_list, suggest


def resolve_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule of ``model`` at dotted ``path`` (``""`` is the model itself).

    Raises a ``ValueError`` that names the first segment that failed and suggests the closest real paths.
    """
    if not isinstance(path, str):
        raise TypeError(
            f"module_path must be a dotted string like 'model.layers.12', got {type(path).__name__}"
        )
    module = model
    done: list[str] = []
    for segment in path.split(".") if path else []:
        child = module._modules.get(segment)
        if child is None:
            raise ValueError(_missing_message(model, path, done, segment, module))
        module = child
        done.append(segment)
    return module


def _missing_message(
    model: torch.nn.Module, path: str, done: list[str], segment: str, parent: torch.nn.Module
) -> str:
    where = ".".join(done)
    head = f"no module {path!r} in {type(model).__name__}: "
    children = list(parent._modules)
    if segment.isdigit() and children and all(c.isdigit() for c in children):
        head += f"{where!r} has {len(children)} entries (0-{len(children) - 1}), got index {segment}"
        return head
    owner = repr(where) if where else "the model"
    head += f"{owner} has no child {segment!r} (its children: {short_list(children, 8)})"
    # Suggest full paths: fix the failing segment, keep the rest, and keep the ones that resolve.
    rest = path.split(".")[len(done) + 1 :]
    fixes = []
    for name in closest(segment, children):
        candidate = ".".join([*done, name, *rest])
        try:
            resolve_module(model, candidate)
            fixes.append(candidate)
        except ValueError:
            pass
    if not fixes:
        fixes = closest(path, [n for n, _ in model.named_modules() if n])
    return head + suggest(fixes)


def list_modules(model: torch.nn.Module, pattern: str | None = None) -> list[str]:
    """Dotted paths of every hookable submodule of ``model``, in definition order.

    ``pattern`` is a regular expression searched in each path (``r"layers\\.\\d+$"`` for decoder layers,
    ``"mlp"`` for anything containing "mlp").
    """
    names = [name for name, _ in model.named_modules() if name]
    if pattern is None:
        return names
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {err}") from None
    return [name for name in names if regex.search(name)]


def decoder_layer_paths(model: torch.nn.Module) -> list[str]:
    """Paths of the model's decoder layers in order (``model.layers.0``, ... or ``transformer.h.0``, ...).

    They are the children of the longest ``ModuleList`` in the model (the one with
    ``num_hidden_layers`` entries where the text decoder's config says so), leaving out lists in a
    multimodal model's vision, image, audio or speech tower, then lists under an ``encoder`` (an
    encoder-decoder's), as long as others are left: the model's own names, nothing invented. Where several
    lists are left, a ``ValueError`` names them (XLM keeps its attention, norm and MLP sub-layers in
    separate lists, so no module outputs the residual stream after a layer).
    """
    config = _text_config(model)
    depths = (
        getattr(config, key, None) for key in ("num_decoder_layers", "decoder_layers", "num_hidden_layers")
    )
    expected = next((depth for depth in depths if isinstance(depth, int)), None)  # T5, BART, the rest
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    for tower in (r"vision|visual|image|audio|speech", r"encoder"):
        lists = [(n, m) for n, m in lists if not re.search(tower, n)] or lists
    if expected is not None:
        lists = [(n, m) for n, m in lists if len(m) == expected] or lists
    if not lists:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: it has no torch.nn.ModuleList; "
            "name the modules to hook yourself (see list_modules(model))"
        )
    longest = max(len(m) for _, m in lists)
    names = [n for n, m in lists if len(m) == longest]
    if len(names) > 1:
        raise ValueError(
            f"cannot tell the decoder layers of {type(model).__name__}: {short_list(names)} all have {longest} "
            "entries; name the module to hook yourself (see list_modules(model))"
        )
    return [f"{names[0]}.{i}" for i in range(longest)]


def residual_width(model) -> int | None:
    """The width of the residual stream (decoder layers' outputs): ``config.hidden_size`` of ``model`` (of
    its text config for multimodal models), or of ``model`` itself when it is a config; ``None`` when it has
    none."""
    size = getattr(_text_config(model), "hidden_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _text_config(model):
    """The config of ``model``'s text decoder (``model`` itself when it is a config or has none): the one
    to read depths and widths from in encoder-decoder and multimodal models too."""
    config = getattr(model, "config", model)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a forward pass's inputs go to: where the input embeddings run.

    For a model dispatched with accelerate (``device_map``, layers on several devices or offloaded to CPU or
    disk) that is the execution device of the embeddings' dispatch hook: their weights may sit on ``meta``,
    so ``next(model.parameters()).device`` would be wrong there.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    weights = itertools.chain(embeddings.parameters() if embeddings is not None else (), model.parameters())
    return next((w.device for w in weights if w.device.type != "meta"), torch.device("cpu"))


class StopForward(Exception):
    """Raised by the hook of ``HookManager.stop_after`` to end a forward pass early; the ``with`` block of
    the manager that raised it (``manager``) swallows it, and no other manager's does."""

    def __init__(self, manager: HookManager | None = None):
        super().__init__("the forward pass was stopped by HookManager.stop_after")
        self.manager = manager


_HookFn = Callable[..., object]


class HookManager:
    """Registers hooks on ``model``'s submodules and removes them all on ``remove_all()`` or ``with`` exit.

    Example::

        with HookManager(model) as hooks:
            hooks.add_forward_hook("model.layers.12", capture.make_hook("layer_12"))
            model(**inputs)
        # no hooks remain here, even if the body raised
    """

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._handles: list[tuple[str, str, RemovableHandle]] = []  # (name, kind, handle)

    def add_forward_hook(
        self, module_path: str, hook_fn: _HookFn, name: str | None = None, *, with_kwargs: bool = False
    ) -> RemovableHandle:
        """Call ``hook_fn(module, args, output)`` after ``module_path`` runs; return the removable handle.

        A hook that returns a value replaces the module's output. With ``with_kwargs=True`` the hook is
        called as ``hook_fn(module, args, kwargs, output)``.
        """
        module = self._module(module_path, hook_fn)
        handle = module.register_forward_hook(hook_fn, with_kwargs=with_kwargs)
        self._handles.append((name or module_path, "forward", handle))
        return handle

    def add_forward_pre_hook(
        self, module_path: str, hook_fn: _HookFn, name: str | None = None, *, with_kwargs: bool = False
    ) -> RemovableHandle:
        """Call ``hook_fn(module, args)`` before ``module_path`` runs; return the removable handle.

        A hook that returns a value replaces the positional inputs. With ``with_kwargs=True`` it is called
        as ``hook_fn(module, args, kwargs)`` and may return ``(args, kwargs)``.
        """
        module = self._module(module_path, hook_fn)
        handle = module.register_forward_pre_hook(hook_fn, with_kwargs=with_kwargs)
        self._handles.append((name or module_path, "forward_pre", handle))
        return handle

    def _module(self, module_path: str, hook_fn: _HookFn) -> torch.nn.Module:
        if not callable(hook_fn):
            raise TypeError(f"hook_fn must be callable, got {type(hook_fn).__name__}")
        if getattr(hook_fn, "__name__", None) == "make_hook":  # it would fail at the next forward pass
            raise TypeError("hook_fn is make_hook itself: pass the hook it makes, capture.make_hook('name')")
        return resolve_module(self.model, module_path)

    def stop_after(self, module_path: str) -> RemovableHandle:
        """End the forward pass right after ``module_path`` runs, skipping every later module (and the LM
        head) when only activations are wanted.

        Add it after the hooks that read that module (hooks run in the order they were added). The pass
        raises ``StopForward``. Call the model through ``run``, which ends the pass there and goes on, so
        that one manager serves a loop of batches. A plain ``model(...)`` call lets it end this manager's
        ``with`` block instead (the block swallows it, and no line after the call in it runs: in a loop,
        the first batch ends the loop). Managers opened inside the block (by traitlens functions too) let it
        through, to this one::

            with HookManager(model) as hooks:
                hooks.add_forward_hook("model.layers.12", capture.make_hook("l12"))
                hooks.stop_after("model.layers.12")
                for batch in batches:
                    hooks.run(**batch)  # stops after layer 12, then the next batch
                    rows.append(capture.get("l12"))
                    capture.clear()
        """

        def stop(module: torch.nn.Module, args, output) -> None:
            raise StopForward(self)

        return self.add_forward_hook(module_path, stop, name=f"stop after {module_path}")

    def run(self, *args, **kwargs) -> object:
        """Call the model with ``args`` and ``kwargs``: its output, or ``None`` when this manager's
        ``stop_after`` ended the pass (which then does not end the ``with`` block)."""
        try:
            return self.model(*args, **kwargs)
        except StopForward as stop:
            if stop.manager is not self:
                raise
            return None

    def get_module(self, module_path: str) -> torch.nn.Module:
        """The submodule at ``module_path`` (same errors and suggestions as the ``add_*`` methods)."""
        return resolve_module(self.model, module_path)

    def list_modules(self, pattern: str | None = None) -> list[str]:
        """Hookable module paths of the model, optionally filtered by a regular expression."""
        return list_modules(self.model, pattern)

    def remove_all(self) -> None:
        """Remove every hook this manager added."""
        for _, _, handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> HookManager:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.remove_all()
        return isinstance(exc, StopForward) and exc.manager is self  # another manager's stop is its own

    def _attached(self) -> list[tuple[str, str, RemovableHandle]]:
        """The hooks added here that are still attached (a handle may have been removed by hand)."""
        return [h for h in self._handles if (d := h[2].hooks_dict_ref()) is not None and h[2].id in d]

    def __len__(self) -> int:
        return len(self._attached())

    def __repr__(self) -> str:
        attached = self._attached()
        hooks = ", ".join(f"{name} ({kind})" for name, kind, _ in attached)
        count = f"{len(attached)} hook{'' if len(attached) == 1 else 's'}"
        return f"HookManager({type(self.model).__name__}, {count}{': ' + hooks if hooks else ''})"
