"""Correctness of capture's GPU path, run on the GPU machine before the GPU benchmarks (issue #5).

On a CUDA device, ``ActivationCapture()`` copies each output into pinned host memory asynchronously (chunks
of ``SIDE_STREAM_BYTES`` or more from a snapshot on a side stream, smaller ones in stream order), without host
syncs. This checks, on both copy paths whatever the default threshold, that what comes back is exactly
what the model computed, under many copies in flight, after later in-place edits, during ``generate`` and in
joins along batch; that ``get`` waits for the copies and not for GPU work queued after them; how much
pinned memory the slabs take per captured byte; and, with CUDA's sync debug mode set to raise, that no
capture or steering hook makes the host wait for the GPU. It runs on a CPU too (``--device cpu``, without
the GPU-only checks), where the copies are plain ones (and CPU slabs are 256 MiB of mostly untouched
virtual memory, so their ratio means nothing).

    python benchmarks/gpu_check.py                 # cuda
    python benchmarks/gpu_check.py --device cpu
"""

from __future__ import annotations

import argparse
import itertools
import time
from unittest import mock

import torch
from bench_cases import build_model

from traitlens import (
    ActivationCapture,
    HookManager,
    decoder_layer_paths,
    last_token_index,
    output_tensor,
    select_positions,
)
from traitlens import capture as capture_module
from traitlens.steering import steer


def _exact(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or not torch.equal(got, want.to(got.device)):
        diff = (
            (got.float() - want.to(got.device).float()).abs().max().item()
            if got.shape == want.shape
            else None
        )
        raise AssertionError(f"{what}: got {tuple(got.shape)}, want {tuple(want.shape)}, max |diff| {diff}")


def check(device: torch.device, n_batches: int) -> list[str]:
    model = build_model("smollm2-135m-shape", device, torch.float32)
    paths = decoder_layer_paths(model)
    n_layers, report = len(paths), []
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 33), generator=generator).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on one row

    # 1. every layer, full sequence, to CPU == output_hidden_states, bit for bit; and the last real token
    for name, positions in (("full sequence", None), ("last token", last_token_index(mask))):
        capture = ActivationCapture(positions=positions)
        with torch.no_grad(), HookManager(model) as hooks:
            for i, path in enumerate(paths):
                hooks.add_forward_hook(path, capture.make_hook(str(i)))
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for i in range(n_layers - 1):  # hidden_states[-1] is after the final norm
            want = hidden[i + 1] if positions is None else hidden[i + 1][torch.arange(4), positions]
            got = capture.get(str(i))
            _exact(got, want.cpu(), f"{name}, layer {i}")
            stored = capture.get(str(i), concat=False)[0]  # get copies a small chunk out of its slab
            if device.type == "cuda" and not stored.is_pinned():
                raise AssertionError(f"{name}, layer {i}: not stored in pinned memory")
        report.append(f"{name}: {n_layers - 1} layers equal output_hidden_states bit for bit")

    for copy_path in COPY_PATHS if device.type == "cuda" else ("on the CPU",):
        with _copy_path(copy_path):
            report += _in_flight_and_in_place(model, paths, generator, n_batches, copy_path)

    # 4. generate: per-token capture == a forward pass over the generated sequence; the last position of
    # each pass (positions=-1) == those positions of it, bit for bit
    capture, last = ActivationCapture(), ActivationCapture(positions=-1)
    with torch.no_grad(), HookManager(model) as hooks:
        for i, path in enumerate(paths):
            hooks.add_forward_hook(path, capture.make_hook(str(i)))
            hooks.add_forward_hook(path, last.make_hook(str(i)))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    full_mask = torch.cat([mask, torch.ones(4, 8, dtype=mask.dtype, device=device)], 1)
    with torch.no_grad():
        hidden = model(
            input_ids=out[:, :-1], attention_mask=full_mask[:, :-1], output_hidden_states=True
        ).hidden_states
    worst, real = 0.0, full_mask[:, :-1].bool().cpu()
    for i in range(n_layers - 1):
        got, want = capture.get(str(i)), hidden[i + 1].cpu()
        if got.shape != want.shape:
            raise AssertionError(f"generate, layer {i}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
        rel = ((got - want)[real].norm() / want[real].norm()).item()
        worst = max(worst, rel)
        _exact(last.get(str(i)), got[:, ids.shape[1] - 1 :], f"generate, positions=-1, layer {i}")
    if worst > 1e-4:
        raise AssertionError(f"generate: relative error {worst:.2e} > 1e-4")
    report.append(
        f"generate (8 new tokens, left padding): every layer equals a forward pass (rel. error <= {worst:.1e}); "
        "with positions=-1, the last position of each pass equals those positions bit for bit"
    )

    # 5. passes joined along batch by get (from a GPU: into pinned memory of their own)
    capture, parts = ActivationCapture(), []
    with torch.no_grad(), HookManager(model) as hooks:
        hooks.add_forward_hook(paths[5], capture.make_hook("5"))
        for batch in batches_of(generator, model, device, n=3, rows=4, length=40):
            model(input_ids=batch)
            parts.append(capture.get("5", concat=False)[-1].clone())
    joined = capture.get("5")
    _exact(joined, torch.cat(parts), "3 passes joined along batch")
    if device.type == "cuda" and not joined.is_pinned():
        raise AssertionError("3 passes joined along batch: not in pinned memory")
    report.append(
        "3 passes joined along batch by get equal the passes bit for bit"
        + (", in pinned memory" if device.type == "cuda" else "")
    )
    if device.type == "cuda":
        report.append(_no_sync_in_hooks(model, paths, ids, mask))
    return report


def batches_of(generator, model, device, n: int, rows: int, length: int) -> list[torch.Tensor]:
    return [torch.randint(3, model.config.vocab_size, (rows, length), generator=generator).to(device)
            for _ in range(n)]  # fmt: skip


COPY_PATHS = ("side stream", "stream order")


def _copy_path(path: str):
    """Copy this check's chunks (0.3 MB in stream order always; 2.4 and 4.7 MB by ``path``) one way,
    whatever ``SIDE_STREAM_BYTES`` is by default."""
    return mock.patch.object(
        capture_module, "SIDE_STREAM_BYTES", 1 << 20 if path == "side stream" else 1 << 62
    )


def _in_flight_and_in_place(model, paths, generator, n_batches: int, copy_path: str) -> list[str]:
    """2 and 3, by one copy path."""
    device, n_layers, report = model.device, len(paths), []
    # 2. many batches in flight (no sync until get), against on-device copies kept by plain hooks
    capture, kept = ActivationCapture(), {i: [] for i in range(n_layers)}
    batches = batches_of(generator, model, device, n=n_batches, rows=16, length=128)

    def keep(i):
        return lambda m, a, out: kept[i].append(output_tensor(out).detach().clone())

    with torch.no_grad(), HookManager(model) as hooks:
        for i, path in enumerate(paths):
            hooks.add_forward_hook(path, capture.make_hook(str(i)))
            hooks.add_forward_hook(path, keep(i))
        start = time.perf_counter()
        for batch in batches:
            model(input_ids=batch)
        launched = time.perf_counter() - start
    if device.type == "cuda" and bool(capture._side) != (copy_path == "side stream"):
        raise AssertionError(f"{copy_path}: the side stream was {'not ' if not capture._side else ''}used")
    for i in range(n_layers):
        _exact(capture.get(str(i)), torch.cat(kept[i]).cpu(), f"{n_batches} batches, layer {i}")
    if device.type == "cuda":
        report.append(_get_waits_for_copies_only(model, paths, generator, copy_path))
    chunks = [c for i in range(n_layers) for c in capture.get(str(i), concat=False)]
    captured = sum(c.numel() * c.element_size() for c in chunks)
    slabs = {c.untyped_storage().data_ptr(): c.untyped_storage().nbytes() for c in chunks}
    report.append(
        f"{copy_path}: {n_batches} batches x {n_layers} layers with no sync until get: equal bit for bit "
        f"(host loop {launched:.2f} s); {captured / 2**20:.0f} MiB captured in {len(slabs)} slabs of "
        f"{sum(slabs.values()) / 2**20:.0f} MiB (ratio {sum(slabs.values()) / captured:.3f}; one pinned "
        f"allocation per chunk would round each {kept[0][0].numel() * 4 / 2**20:.1f} MiB chunk up to a power of two)"
    )

    # 3. a later hook that edits the output in place does not reach what was copied to the host
    for rows, length in ((4, 33), (16, 64)):  # chunks of 0.3 and 2.4 MB
        (batch,) = batches_of(generator, model, device, n=1, rows=rows, length=length)
        capture, clean = ActivationCapture(), ActivationCapture()
        with torch.no_grad():
            with HookManager(model) as hooks:
                hooks.add_forward_hook(paths[3], clean.make_hook("3"))
                model(input_ids=batch)
            with HookManager(model) as hooks:
                hooks.add_forward_hook(paths[3], capture.make_hook("3"))
                hooks.add_forward_hook(paths[3], lambda m, a, out: output_tensor(out).mul_(0.0))
                model(input_ids=batch)
        _exact(
            capture.get("3"),
            clean.get("3"),
            f"{copy_path}, in-place edit after a capture hook, {rows} x {length}",
        )
    report.append(
        f"{copy_path}: an in-place edit by a later hook does not reach the captured copy (small and large chunks)"
    )

    return report


def _get_waits_for_copies_only(model, paths, generator, copy_path: str) -> str:
    """2b. ``get`` returns once the copies have landed, while GPU work queued after them still runs."""
    device = model.device
    (batch,) = batches_of(generator, model, device, n=1, rows=16, length=64)  # 2.4 MB chunks
    capture, kept = ActivationCapture(), ActivationCapture(device=None)
    with torch.no_grad(), HookManager(model) as hooks:
        hooks.add_forward_hook(paths[-1], capture.make_hook("last"))
        hooks.add_forward_hook(paths[-1], kept.make_hook("last"))
        model(input_ids=batch)
    torch.cuda._sleep(1 << 29)  # about 0.3 s of GPU time, queued after the pass
    got = capture.get("last")
    busy = not torch.cuda.current_stream(device).query()
    torch.cuda.synchronize(device)
    _exact(got, kept.get("last").cpu(), f"{copy_path}, get before later GPU work ends")
    if not busy:
        raise AssertionError(f"{copy_path}: get waited for GPU work queued after the copies")
    return f"{copy_path}: get returns the copies (bit for bit) while GPU work queued after them still runs"


def _strict_hooks(model: torch.nn.Module) -> None:
    """Run every forward (pre-)hook now on ``model`` under CUDA's sync debug mode "error": a host sync
    inside one of them (``.item()``, a blocking copy, ``synchronize``) raises instead of passing silently."""

    def strict(hook):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return hook(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in hooks:
                hooks[key] = strict(hooks[key])


def _no_sync_in_hooks(model, paths, ids: torch.Tensor, mask: torch.Tensor) -> str:
    """6. No hook of traitlens waits for the GPU: capture (both copy paths, a cast, positions given as
    indices or weights on the host or on the GPU), per-token capture in ``generate``, and steering at given
    token indices during ``generate``."""
    cpu_mask = mask.cpu()
    weights = select_positions("prompt_mean", cpu_mask)
    cases = {
        "full sequence": {},
        "bf16": {"dtype": torch.bfloat16},
        "last token, index on the GPU": {"positions": last_token_index(mask)},
        "last token, index on the host": {"positions": last_token_index(cpu_mask)},
        "prompt mean, weights on the host": {"positions": weights},
    }
    big = torch.randint(3, model.config.vocab_size, (16, 64), device=ids.device)
    for name, kwargs in cases.items():
        for (batch, batch_mask), copy_path in itertools.product(
            ((ids, mask), (big, torch.ones_like(big))), COPY_PATHS
        ):
            if "positions" in kwargs and batch is big:
                continue
            capture = ActivationCapture(**kwargs)
            with torch.no_grad(), HookManager(model) as hooks, _copy_path(copy_path):
                for i, path in enumerate(paths):
                    hooks.add_forward_hook(path, capture.make_hook(str(i)))
                _strict_hooks(model)
                try:
                    model(input_ids=batch, attention_mask=batch_mask)
                except RuntimeError as err:
                    raise AssertionError(
                        f"capture, {name}, {tuple(batch.shape)}, {copy_path}: {err}"
                    ) from err
            capture.get("0")
    capture = ActivationCapture()
    v = torch.randn(model.config.hidden_size)
    with torch.no_grad(), steer(model, v, layer=[3, 7], coeff=2.0, positions=[0, 34, 36]) as handle:
        for i, path in enumerate(paths):
            handle.hooks.add_forward_hook(path, capture.make_hook(str(i)))
        _strict_hooks(model)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=0)  # fmt: skip
    capture.get("0")
    return (
        f"no host sync inside any hook (torch.cuda sync debug mode 'error'): capture of {len(cases)} kinds, "
        "small and large chunks, both copy paths; generate with per-token capture and steering at token indices"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, default=32)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    for line in check(device, args.batches):
        print("  ok:", line, flush=True)


if __name__ == "__main__":
    main()
