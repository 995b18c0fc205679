"""Memory of small results kept across batches: the last token of every layer, batch after batch, on the
bundled model, each way in a fresh process. Prints the extra peak and the resident memory after the run,
against the bytes of the rows kept, and the loop's time.

On Linux, glibc raises its mmap threshold once a large block is freed (up to 32 MiB), so the forward pass's
large temporaries come from the heap, where small tensors kept between batches fragment it: the process
grows with the batches, unless they are kept outside the heap (``ActivationCapture``'s small slabs).
``MALLOC_MMAP_THRESHOLD_`` fixes the threshold (it is read at process start), at the cost of an mmap and
fresh pages for every large temporary.

    python benchmarks/kept_small_results.py [--batches 96] [--fixed-threshold]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import subprocess
import sys
import time

WAYS = ("capture", "plain", "collect")


def measure(way: str, n_batches: int) -> None:
    import torch
    from run import _reset_peak_rss, _return_freed_memory, _status_kb

    from traitlens import ActivationCapture, HookManager, decoder_layer_paths, load_model
    from traitlens.capture import output_tensor
    from traitlens.pipeline import collect_activations
    from traitlens.positions import last_token_index

    def _mb(field: str) -> float:
        return _status_kb(field) / 1024

    model, tokenizer = load_model()
    paths = decoder_layer_paths(model)
    rng = random.Random(0)
    words = "the a good bad film day night happy sad very quite really not long short story".split()  # noqa: SIM905
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 60))) for _ in range(8 * n_batches)]
    batches = [
        tokenizer(texts[i : i + 8], padding=True, return_tensors="pt") for i in range(0, len(texts), 8)
    ]
    with torch.no_grad():
        model(**batches[0])  # one-time allocations
    gc.collect()
    _return_freed_memory()
    _reset_peak_rss()
    before = _mb("VmRSS")
    start = time.perf_counter()
    kept = []
    with torch.no_grad():
        if way == "collect":
            layers = list(range(len(paths)))
            kept.append(collect_activations(model, tokenizer, texts, layers=layers, batch_size=8, chat=False))
        else:
            with HookManager(model) as hooks:
                capture, last = ActivationCapture(), None

                def keep(module, args, out):  # plain hooks: the last real token, cloned
                    kept.append(output_tensor(out)[torch.arange(len(last)), last].clone())

                for i, path in enumerate(paths):
                    hooks.add_forward_hook(path, capture.make_hook(str(i)) if way == "capture" else keep)
                for batch in batches:
                    last = last_token_index(batch["attention_mask"])
                    capture.positions = last
                    model(**batch)
                    if way == "capture":
                        kept.append([capture.get(str(i)) for i in range(len(paths))])
                        capture.clear()
    seconds = time.perf_counter() - start
    rows = 8 * n_batches * len(paths) * model.config.hidden_size * 4 / 2**20
    print(
        f"{way:8s} {n_batches} batches: rows {rows:.0f} MB, extra peak {_mb('VmHWM') - before:.0f} MB, "
        f"resident after {_mb('VmRSS') - before:.0f} MB, {seconds:.1f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=96)
    parser.add_argument("--fixed-threshold", action="store_true", help="MALLOC_MMAP_THRESHOLD_=131072")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.batches)
        return
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if args.fixed_threshold else {})}
    for way in WAYS:
        cmd = [sys.executable, __file__, "--child", way, "--batches", str(args.batches)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        print(out.stdout, end="", flush=True)


if __name__ == "__main__":
    main()
