"""Correctness of capture's GPU path, run on the GPU machine before the GPU benchmarks (issue #5).

On a CUDA device, ``ActivationCapture()`` snapshots each output on the GPU and copies it into pinned host
memory on a side stream, without host syncs; this checks that what comes back is exactly what the model
computed, under many copies in flight, after later in-place edits, and during ``generate``, and how much
pinned memory the slabs take per captured byte. It runs on a CPU too (``--device cpu``), where the copies
are plain ones (and CPU slabs are 256 MiB of mostly untouched virtual memory, so their ratio means nothing).

    python benchmarks/gpu_check.py                 # cuda
    python benchmarks/gpu_check.py --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_cases import build_model

from traitlens import ActivationCapture, HookManager, decoder_layer_paths, last_token_index, output_tensor


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

    # 2. many batches in flight (no sync until get), against on-device copies kept by plain hooks
    capture, kept = ActivationCapture(), {i: [] for i in range(n_layers)}
    batches = [torch.randint(3, model.config.vocab_size, (16, 128), generator=generator).to(device)
               for _ in range(n_batches)]  # fmt: skip

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
    for i in range(n_layers):
        _exact(capture.get(str(i)), torch.cat(kept[i]).cpu(), f"{n_batches} batches, layer {i}")
    chunks = [c for i in range(n_layers) for c in capture.get(str(i), concat=False)]
    captured = sum(c.numel() * c.element_size() for c in chunks)
    slabs = {c.untyped_storage().data_ptr(): c.untyped_storage().nbytes() for c in chunks}
    report.append(
        f"{n_batches} batches x {n_layers} layers with no sync until get: equal bit for bit "
        f"(host loop {launched:.2f} s); {captured / 2**20:.0f} MiB captured in {len(slabs)} slabs of "
        f"{sum(slabs.values()) / 2**20:.0f} MiB (ratio {sum(slabs.values()) / captured:.3f}; one pinned "
        f"allocation per chunk would round each {kept[0][0].numel() * 4 / 2**20:.1f} MiB chunk up to a power of two)"
    )

    # 3. a later hook that edits the output in place does not reach what was copied to the host
    for rows, length in ((4, 33), (16, 64)):  # 0.3 MB chunks go in stream order, 2.4 MB via the side stream
        batch = torch.randint(3, model.config.vocab_size, (rows, length), generator=generator).to(device)
        capture, clean = ActivationCapture(), ActivationCapture()
        with torch.no_grad():
            with HookManager(model) as hooks:
                hooks.add_forward_hook(paths[3], clean.make_hook("3"))
                model(input_ids=batch)
            with HookManager(model) as hooks:
                hooks.add_forward_hook(paths[3], capture.make_hook("3"))
                hooks.add_forward_hook(paths[3], lambda m, a, out: output_tensor(out).mul_(0.0))
                model(input_ids=batch)
        _exact(capture.get("3"), clean.get("3"), f"in-place edit after the capture hook, {rows} x {length}")
    report.append(
        "an in-place edit by a later hook does not reach the captured copy (small and large chunks)"
    )

    # 4. generate: per-token capture == a forward pass over the generated sequence
    capture = ActivationCapture()
    with torch.no_grad(), HookManager(model) as hooks:
        for i, path in enumerate(paths):
            hooks.add_forward_hook(path, capture.make_hook(str(i)))
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
    if worst > 1e-4:
        raise AssertionError(f"generate: relative error {worst:.2e} > 1e-4")
    report.append(
        f"generate (8 new tokens, left padding): every layer equals a forward pass (rel. error <= {worst:.1e})"
    )
    return report


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
