"""Store what hooked modules output, pass after pass, and hand it back in the shape users expect.

``ActivationCapture.make_hook(name)`` makes a forward hook for ``HookManager.add_forward_hook``. Each call
of the hook stores one *chunk* ``[batch, seq, hidden]`` (or what the position selector leaves of it);
``get(name)`` joins the chunks:

- a single forward pass: its chunk;
- several passes of equal shape: concatenated along batch;
- ``model.generate`` with the KV cache: the prompt chunk ``[batch, prompt_len, hidden]`` followed by one
  ``[batch, 1, hidden]`` chunk per decode step is joined along the sequence, giving
  ``[batch, prompt_len + new_tokens - 1, hidden]`` in position order (the last sampled token is never fed
  back through the model). Several ``generate`` calls of equal shape are then concatenated along batch.
  A decode step is recognised by its shape (a pass of one position, same batch, after a longer pass), so a
  prompt of a single token, or a module after the LM head's cut to the last position (``lm_head``), cannot
  be told apart from separate one-token passes: ``get`` joins those along batch with a warning; use
  ``get(name, concat=False)`` there. A selector applies to each pass: with ``positions=-1`` the last
  prompt token and then each decode step's token come back as ``[batch, 1 + decode_steps, hidden]``; a
  slice takes its positions of each pass (``slice(-2, None)``: the prompt's last two, then each step's
  one token) and raises where it leaves none; an index or weights tensor is made for forward passes (its
  chunks are never joined along the sequence) and raises on a decode step. Beam search (``num_beams >
  1``) reorders the beams between steps, and assisted or prompt-lookup decoding feed drafted tokens that
  may be rejected, so captured rows do not follow the returned sequences: capture a forward pass over
  them. A later ``generate`` whose prompt is one token continues an earlier one's run (``clear()``
  between generations), and ``generate(prefill_chunk_size=...)``'s prompt chunks are passes like any
  other. With ``positions=-1`` a generation of one new token is one pass: ``[batch, hidden]``.
  ``generate(use_cache=False)`` runs a whole pass per step, one position longer each time: passes like any
  other, so with a selector that leaves one shape they are joined along batch (step after step); read
  them with ``concat=False``;
- anything else raises a ``ValueError`` that says what to do instead.

Stored chunks are detached; by default they go to the CPU (as in traitlens 0.4). Every chunk stored in
host memory is a copy the capture owns, a piece of a larger slab (see ``_HostSlabs``), so a later hook
that edits the module's output in place does not change it. From a GPU, hooks never wait for the host: a
chunk is copied into pinned memory with ``non_blocking=True``, chunks of 16 MiB or more on a side CUDA stream
(after a snapshot on the GPU) so that the copy overlaps the rest of the forward pass, smaller ones (decode
steps, last tokens, a small model's outputs) in stream order, which costs the host less; ``get`` waits
once, for those copies only (an event after the last one on each stream), not for the rest of the pass
(the LM head) or other streams. With ``device=None`` on a GPU, the stored chunk is the module's output
tensor itself, as with ``output_hidden_states``.
"""

from __future__ import annotations

import functools
import math
import mmap
import warnings
import weakref
from collections.abc import Callable, Mapping

import torch

from traitlens._validation import did_you_mean, short_list
from traitlens.positions import _apply_checked, check_selector, past_the_end, to_device


def output_tensor(output: object) -> torch.Tensor:
    """The activation tensor in a module's output: the tensor itself, the first element of a tuple or
    list, or the first value of a dict / transformers ``ModelOutput``.

    Never ``output[0]`` of a plain tensor: that would be batch row 0.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and output:
        first = next(iter(output.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise TypeError(
        f"cannot find an activation tensor in a module output of type {type(output).__name__}; "
        "hook a module that returns a tensor, a tuple starting with one, or a dict / ModelOutput"
    )


class ActivationCapture:
    """Holds activations captured by the hooks it makes.

    Args:
        device: where stored activations go: ``"cpu"`` (default) or another device; ``None`` keeps them on
            the device the module produced them on.
        dtype: dtype to store in (``None``: as produced). Casting happens on the producing device, unchecked:
            float16 holds values up to 65504 (residual streams reach ~2e4, and more in larger models),
            beyond which it stores inf; bfloat16 has float32's range.
        positions: which positions to keep, applied on the producing device before storing (see
            ``traitlens.positions``): ``None`` (all), an ``int`` or ``slice``, a ``[batch]`` / ``[batch, k]``
            index tensor, or ``[batch, seq]`` weights (their weighted sums come out in float32). An
            attribute: set it before each batch, e.g.
            ``capture.positions = last_token_index(inputs["attention_mask"])``. Weights are for passes of
            one length, and a pass of another length raises; so does an index on a pass of one position
            after longer ones (a decode step of ``generate``).
    """

    def __init__(
        self,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | None = None,
        positions=None,
    ):
        self.device = None if device is None else torch.device(device)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        self.dtype = dtype
        self.positions = positions
        self._store: dict[str, list[torch.Tensor]] = {}
        # per name of a hook from make_hook: the module whose outputs it holds
        self._sources: dict[str, weakref.ref] = {}
        # per chunk: the length of its pass before selection (0: not [batch, seq, hidden])
        self._lengths: dict[str, list[int]] = {}
        self._side: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Event]] = {}
        # per CUDA stream that copies were queued on: an event recorded after the latest one
        self._pending: dict[torch.cuda.Stream, torch.cuda.Event] = {}
        self._pinned = _HostSlabs(pin_memory=True, first=1 << 20)
        # chunks and results on the CPU: under SMALLEST in 1 MiB slabs, larger ones in 256 MiB ones
        self._small = _HostSlabs(pin_memory=False, first=1 << 20, largest=1 << 20)
        self._host = _HostSlabs(pin_memory=False, first=_HostSlabs.LARGEST)

    @property
    def positions(self):
        return self._positions

    @positions.setter
    def positions(self, selector) -> None:
        check_selector(selector)
        self._positions = selector
        self._selector_on: dict[torch.device, torch.Tensor] = {}
        # the pass length a tensor selector is for: weights say it, an index is taken from its first pass
        weights = isinstance(selector, torch.Tensor) and selector.is_floating_point() and selector.ndim == 2
        self._selector_len: int | None = selector.shape[1] if weights else None
        # an index on the host is read once, here: on a GPU, one past a pass's end is a device-side assert
        index_on_host = isinstance(selector, torch.Tensor) and not weights and selector.device.type == "cpu"
        self._index_end = int(selector.max()) + 1 if index_on_host and selector.numel() else None

    def _selector(self, hidden: torch.Tensor):
        """The position selector on ``hidden``'s device: a tensor selector is copied once per device per
        setting of ``positions``, not once per hooked module."""
        selector = self._positions
        if not isinstance(selector, torch.Tensor):
            return selector
        if hidden.ndim == 3:
            length = hidden.shape[1]
            if self._selector_len is None:
                self._selector_len = length
            # weights are made for one length; an index may serve passes of several (its values are not read
            # here: that would wait for the GPU), but not a decode step's single position after longer passes
            elif length != self._selector_len and (selector.is_floating_point() or length == 1):
                raise ValueError(_selector_mismatch(self._selector_len, length))
            if self._index_end is not None and self._index_end > length:
                raise ValueError(
                    f"{past_the_end(self._index_end - 1, length)}; set positions for each batch "
                    "(capture.positions = last_token_index(batch['attention_mask']))"
                )
        if hidden.device not in self._selector_on:  # the dtype of weights is _apply_checked's to choose
            self._selector_on[hidden.device] = to_device(selector, hidden.device)
        return self._selector_on[hidden.device]

    def make_hook(self, name: str) -> Callable:
        """A forward hook ``(module, args, output)`` that stores the output under ``name``.

        A name holds the outputs of one module: a hook of the name called by another module (the same name
        given to hooks on several layers) raises a ``ValueError``, since ``get`` would stack their outputs
        along batch as if they were more examples. ``clear(name)`` frees the name for another module.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")

        def hook(module: torch.nn.Module, args, output) -> None:
            source = self._sources.get(name)
            held = source() if source is not None else None
            if held is None:
                self._sources[name] = weakref.ref(module)
            elif held is not module:
                raise ValueError(
                    f"capture name {name!r} already holds outputs of another module ({type(held).__name__}), "
                    f"and now a {type(module).__name__} called its hook: get({name!r}) would stack both along "
                    "batch as if they were more examples. Give each hooked module a name of its own (e.g. "
                    f"make_hook(f'layer_{{i}}')), or clear({name!r}) before hooking another module"
                )
            self.store(name, output_tensor(output))

        return hook

    def store(self, name: str, activations: torch.Tensor) -> None:
        """Store one chunk under ``name`` (what the hooks call; also usable by hand)."""
        if not isinstance(activations, torch.Tensor):
            raise TypeError(f"activations must be a torch.Tensor, got {type(activations).__name__}")
        selector = self._selector(activations)
        x = _apply_checked(activations.detach(), selector)  # checked when positions were set
        if isinstance(selector, slice) and activations.ndim == 3 and x.shape[1] == 0 < activations.shape[1]:
            step = " (a decode step of generate)" if activations.shape[1] == 1 else ""
            raise ValueError(
                f"positions={selector!r} leaves none of the {activations.shape[1]} positions of a "
                f"pass{step}: a slice applies to each pass's own positions. During generate keep every "
                "position (positions=None) or the last one (-1), or capture a forward pass over the final "
                "sequence"
            )
        target = x.device if self.device is None else self.device
        if target.type == "cpu" and x.device.type == "cuda":
            x = x if self.dtype is None else x.to(self.dtype)  # cast on the GPU: fewer bytes to move
            x = self._copy_to_host(x, source=activations)
        elif target.type == "cpu":  # copied (and cast) into memory the capture owns; see _HostSlabs
            x = self._host_empty(x.shape, self.dtype or x.dtype).copy_(x)
        else:
            x = x.to(device=target, dtype=self.dtype)
            if isinstance(selector, (int, slice)) and _shares_memory(x, activations):
                x = x.clone()  # a view would keep the whole output alive, and see later in-place edits
        self._store.setdefault(name, []).append(x)
        # a tensor selector is made for forward passes (it raises on a decode step): its chunks are never
        # joined along the sequence, even when a batch of one-token texts follows longer ones
        steps = activations.ndim == 3 and not isinstance(selector, torch.Tensor)
        self._lengths.setdefault(name, []).append(activations.shape[1] if steps else 0)

    def _host_empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host memory of the capture's for a chunk or result: a piece of a small slab under ``SMALLEST``
        bytes, else of a large one."""
        small = math.prod(shape) * dtype.itemsize < _HostSlabs.SMALLEST
        return (self._small if small else self._host).empty(shape, dtype)

    def _copy_to_host(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Start copying ``x`` into pinned host memory without a host sync; ``get`` waits for it.

        A chunk under ``SIDE_STREAM_BYTES`` (a decode step, a last token, the outputs of a small model) is
        copied in stream order: that costs the host least, and the GPU the copy's time. A larger one is
        snapshotted (if it is still the module's own output ``source``, not a selection or cast of it) and
        copied on a side stream that waits for the compute stream, so that the copy overlaps the rest of the
        forward pass.
        """
        buffer = self._pinned.empty(x.shape, x.dtype)
        compute = torch.cuda.current_stream(x.device.index)  # an int: the shortest path of this call
        if x.numel() * x.element_size() < SIDE_STREAM_BYTES:
            buffer.copy_(x, non_blocking=True)
            self._queued(compute)
            return buffer
        if _shares_memory(x, source):  # the module's own output: copy it now, before anything edits it
            x = x.clone()
        if x.device not in self._side:
            self._side[x.device] = (torch.cuda.Stream(x.device), torch.cuda.Event())
        side, ready = self._side[x.device]
        ready.record(compute)
        side.wait_event(ready)
        torch.cuda.set_stream(side)
        try:
            buffer.copy_(x, non_blocking=True)
        finally:
            torch.cuda.set_stream(compute)
        x.record_stream(side)  # the allocator must not hand x's memory out before the copy has read it
        self._queued(side)
        return buffer

    def _queued(self, stream: torch.cuda.Stream) -> None:
        """Note that a copy was just queued on ``stream``: ``get`` waits for the point after it."""
        if stream not in self._pending:
            self._pending[stream] = torch.cuda.Event()
        self._pending[stream].record(stream)

    def _sync(self) -> None:
        """Wait for the copies queued so far, and for nothing queued after them: not for the rest of the
        forward pass (the final norm and LM head run after the last hooked layer) nor for other streams."""
        for event in self._pending.values():
            event.synchronize()
        self._pending.clear()

    def get(self, name: str, concat: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """The activations stored under ``name``: joined (see the module docs) or, with ``concat=False``,
        the list of chunks in the order the hooks saw them.

        A single chunk is returned as stored, not copied (an in-place edit of it changes what ``get``
        returns next). It is a piece of one of the capture's slabs (``_HostSlabs``) and keeps that slab
        alive: ``torch.save`` and pickle write the whole slab (up to 1 MiB for a result under 256 KiB, up
        to 256 MiB for a larger one), so ``.clone()`` what you save, or a few results kept out of many.
        Results under 256 KiB (a last token, a single pass's chunk copied from a GPU, a join) are pieces
        of the capture's small slabs, outside the heap that the forward pass's temporaries come from:
        small tensors kept there batch after batch fragment it, and the process grows far past what they
        hold (``docs/benchmarks.md``). Larger joins go into new host memory; from a GPU, into pinned memory
        of their own up to 64 MiB, where blocks freed by earlier results are reused, while new ordinary
        memory has every page faulted in on first write (for a 1B model's every-token ``generate``
        capture, half a gigabyte per batch: ~3x the time of the copy itself; see ``_pinned_join``)."""
        if name not in self._store:
            raise KeyError(
                f"no activations captured under {name!r}; captured: {short_list(self._store)}"
                + did_you_mean(name, list(self._store))
            )
        self._sync()
        chunks = self._store[name]
        if not concat:
            return list(chunks)
        on_host = chunks[0].device.type == "cpu"
        # copied from a GPU: this capture has pinned slabs (asking a tensor is_pinned() could create a CUDA
        # context on a machine whose GPU the user is not using)
        from_gpu = on_host and self._pinned.opened
        if len(chunks) == 1:
            chunk = chunks[0]
            if from_gpu and chunk.nbytes < _HostSlabs.SMALLEST:  # out of the pinned slab it would keep alive
                return self._small.empty(chunk.shape, chunk.dtype).copy_(chunk)
            return chunk
        joined = functools.partial(self._join_memory, from_gpu=from_gpu) if on_host else None
        groups = _generation_runs(chunks, self._lengths[name])
        if len(groups) > 1 and all(length == 1 for length in self._lengths[name]):
            warnings.warn(
                f"{len(groups)} passes of one position each under {name!r} are joined along batch, as "
                "separate forward passes. If they are the steps of one generate (a prompt of a single token, "
                "or a module after the LM head's last-position cut), read them with get(..., concat=False) "
                "and join them along the sequence yourself",
                stacklevel=2,
            )
        runs = [_join_steps(run, joined if len(groups) == 1 else None) for run in groups]
        if len(runs) == 1:
            return runs[0]
        if all(run.shape[1:] == runs[0].shape[1:] for run in runs):
            out = joined((sum(run.shape[0] for run in runs), *runs[0].shape[1:]), runs) if joined else None
            return torch.cat(runs, dim=0, out=out)
        shapes = ", ".join(str(tuple(r.shape)) for r in runs[:4]) + (", ..." if len(runs) > 4 else "")
        raise ValueError(
            f"activations under {name!r} come from {len(runs)} passes whose shapes cannot be joined along "
            f"batch: {shapes}; use get({name!r}, concat=False) for the chunks one by one (one per forward "
            "step), call clear() between passes, or keep a fixed number of positions per pass (e.g. "
            "positions=last_token_index(attention_mask) with forward passes, positions=-1 with generate)"
        )

    def _join_memory(
        self, shape: tuple[int, ...], chunks: list[torch.Tensor], from_gpu: bool
    ) -> torch.Tensor | None:
        """Where host chunks are joined: a piece of a small slab for a result under ``SMALLEST`` bytes, else
        ``_pinned_join``'s choice for chunks copied from a GPU, else ``None`` (new memory)."""
        dtype = functools.reduce(torch.promote_types, (c.dtype for c in chunks))
        if math.prod(shape) * dtype.itemsize < _HostSlabs.SMALLEST:
            return self._small.empty(shape, dtype)
        return _pinned_join(shape, chunks) if from_gpu else None

    def clear(self, name: str | None = None) -> None:
        """Forget everything, or only what is stored under ``name``."""
        if name is None:
            self._store.clear()
            self._lengths.clear()
            self._sources.clear()
        else:
            self._store.pop(name, None)
            self._lengths.pop(name, None)
            self._sources.pop(name, None)

    def keys(self) -> list[str]:
        return list(self._store)

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def __len__(self) -> int:
        return len(self._store)

    @property
    def memory_usage(self) -> dict[str, float]:
        """Megabytes (2**20 bytes) held per name."""
        return {
            name: sum(c.numel() * c.element_size() for c in chunks) / 2**20
            for name, chunks in self._store.items()
        }

    def __repr__(self) -> str:
        total = sum(self.memory_usage.values())
        return f"ActivationCapture({len(self)} names: {short_list(self._store, 5)}, {total:.1f} MB)"


SIDE_STREAM_BYTES = 16 << 20
"""GPU-to-host copies of chunks at least this large go through a side stream (see ``_copy_to_host``).

The side stream hides a copy behind the rest of the pass but costs the host a snapshot, an event and two
stream switches per chunk. Where the host is the bottleneck (small models, small batches) copies in stream
order fill time the GPU would idle anyway. Measured on an H100 (``docs/benchmarks.md``, 2026-11-27), every
layer of a 16 x 512-token batch to CPU: 9.4 MB chunks (135M shape) 1.09x the bare pass in stream order and
1.32x by the side stream; 33.5 MB chunks (1B shape) 1.22x and 1.03x. The chunk size is the proxy: it grows
with batch x length x width, and with it the GPU's share of the pass. A module-level setting: change it
to choose the other path."""


JOIN_PINNED_MAX = 64 << 20
"""Joins of chunks copied from a GPU up to this size go into pinned memory (see ``_pinned_join``)."""


def _pinned_join(shape: tuple[int, ...], chunks: list[torch.Tensor]) -> torch.Tensor | None:
    """Where chunks copied from a GPU are joined (results under 256 KiB go into the capture's small slabs
    before this is asked; see ``ActivationCapture._join_memory``): a pinned block of PyTorch's caching host
    allocator for a result up to 64 MiB, else ``None`` (new ordinary memory).

    The allocator hands out pinned blocks freed by earlier results again, already in RAM; new ordinary memory
    has every page faulted in on first write. A block of its own, not a piece of the capture's slabs: a kept
    result holds only its block (which the allocator rounds up to a power of two), not the chunks captured
    next to it. The upper bound keeps that rounding off one-off joins (every batch of a dataset joined at
    once); pinned memory is locked in RAM."""
    dtype = functools.reduce(torch.promote_types, (c.dtype for c in chunks))
    if math.prod(shape) * dtype.itemsize > JOIN_PINNED_MAX:
        return None
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _HostSlabs:
    """Host memory for stored chunks and ``get``'s small results: pieces of larger slabs.

    Pinned (for copies from a GPU): PyTorch's caching host allocator rounds every pinned allocation up to a
    power of two, so pinning each large chunk separately can nearly double the host memory that captured
    activations take (a 33.5 MB chunk takes 64 MB), and every allocation it cannot serve from blocks freed
    earlier is a ``cudaHostAlloc`` call: once per chunk in the first capture of a process. So every pinned
    chunk, however small (a decode step, a last token), is a piece of a slab; the slabs start at 1 MiB and
    double up to 256 MiB, and are made larger where needed to hold at least four chunks of the size that
    opens them (a power of two: so 4 to 7 such chunks), or two for chunks over 64 MiB (2 or 3 of them).

    Not pinned (activations already on the CPU), each slab is an anonymous memory map of its own, outside
    the heap, whose untouched pages cost no memory. Keeping the model's own output tensors slows the forward
    pass (the retained outputs sit among the allocator's recycled buffers; see ``docs/benchmarks.md``), so
    chunks of 256 KiB or more are copied into 256 MiB slabs. Smaller ones, and ``get``'s small results, go
    into 1 MiB slabs (``largest``): small tensors kept in the heap across batches fragment it.

    A slab is freed once no chunk in it is alive and the capture has moved on to another (or is deleted):
    the capture keeps filling its current slab across ``clear()``. Keeping a single chunk keeps its whole
    slab alive: a few chunks kept from a large capture should be ``.clone()``d.
    """

    ALIGN = 64
    CHUNKS_PER_SLAB = 4
    SMALLEST = 1 << 18
    LARGEST = 1 << 28

    def __init__(self, pin_memory: bool, first: int, largest: int = LARGEST):
        self.pin_memory = pin_memory
        self.largest = largest
        self._slab: torch.Tensor | None = None
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the current slab viewed as each dtype
        self._used = 0
        self._next = first

    @property
    def opened(self) -> bool:
        """Whether a slab was ever opened (for pinned slabs: whether anything was copied from a GPU)."""
        return self._slab is not None

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self._used // self.ALIGN) * self.ALIGN
        if self._slab is None or start + nbytes > self._slab.numel():
            # room for several chunks of this size: a power of two barely above one large chunk would leave up
            # to half of it empty; four of them (two above LARGEST / 4, to bound the pinned memory one
            # large chunk can take)
            chunks = self.CHUNKS_PER_SLAB if nbytes <= self.LARGEST // self.CHUNKS_PER_SLAB else 2
            size = max(self._next, 1 << (chunks * nbytes - 1).bit_length())
            # a slab opened under inference mode must also serve passes outside it
            with torch.inference_mode(False):
                self._slab = _new_slab(size, self.pin_memory)
            self._typed = {}
            self._next = min(2 * self._next, self.largest)
            start = 0
        self._used = start + nbytes
        typed = self._typed.get(dtype)
        if typed is None:  # slab sizes are powers of two and starts multiples of 64: every dtype divides them
            with torch.inference_mode(False):  # a view made under inference mode is an inference tensor
                typed = self._typed[dtype] = self._slab.view(dtype)
        # one as_strided instead of slice + view + view: this runs in every hook call
        return typed.as_strided(shape, _contiguous_strides(shape), start // dtype.itemsize)


def _new_slab(nbytes: int, pin_memory: bool) -> torch.Tensor:
    """``nbytes`` of pinned memory, or of an anonymous private memory map (unmapped when the last tensor
    viewing it is gone)."""
    if pin_memory:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if hasattr(mmap, "MAP_ANONYMOUS"):
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:  # Windows: -1 is an anonymous map there
        region = mmap.mmap(-1, nbytes)
    return torch.frombuffer(region, dtype=torch.uint8)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _generation_runs(chunks: list[torch.Tensor], lengths: list[int]) -> list[list[torch.Tensor]]:
    """Group chunks into passes: a chunk from a pass of one position that follows a longer pass of the same
    batch (or a run already extended that way) is a KV-cache decode step of the same pass. ``lengths``
    are the passes' lengths before any position selection."""
    runs: list[list[torch.Tensor]] = []
    head_len = 0
    for chunk, length in zip(chunks, lengths, strict=True):
        if runs and length == 1 and head_len > 1 and _same_rows(runs[-1][0], chunk):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
            head_len = length
    return runs


def _same_rows(head: torch.Tensor, chunk: torch.Tensor) -> bool:
    """Can ``chunk`` continue ``head`` along the sequence: ``[batch, hidden]`` chunks of one shape, or
    ``[batch, k, hidden]`` ones of the same batch and width."""
    if head.ndim == 2:
        return chunk.shape == head.shape
    return (
        chunk.ndim == 3
        and head.ndim == 3
        and chunk.shape[0] == head.shape[0]
        and chunk.shape[2] == head.shape[2]
    )


def _join_steps(run: list[torch.Tensor], joined: Callable | None = None) -> torch.Tensor:
    """One pass and its decode steps: ``[batch, seq, hidden]`` pieces joined along the sequence; one
    selected position per pass (``[batch, hidden]``) stacked into ``[batch, passes, hidden]``. ``joined(shape,
    run)`` gives the memory to join into (``None``: new memory)."""
    if len(run) == 1:
        return run[0]
    head = run[0]
    if head.ndim == 2:
        out = joined((head.shape[0], len(run), head.shape[1]), run) if joined else None
        return torch.stack(run, dim=1, out=out)
    out = joined((head.shape[0], sum(c.shape[1] for c in run), *head.shape[2:]), run) if joined else None
    return torch.cat(run, dim=1, out=out)


def _selector_mismatch(expected: int, got: int) -> str:
    step = " (a decode step of generate with the KV cache)" if got == 1 else ""
    return (
        f"positions is a tensor for passes of {expected} positions, but a hooked module saw a pass of {got}"
        f"{step}; set positions for each batch (capture.positions = last_token_index(batch['attention_mask'])),"
        " or, during generate, keep every position (positions=None) or give an int or slice (e.g. -1), "
        "which applies to each pass"
    )
