"""traitlens benchmark suite: capture cost as ratios to the bare forward pass, measured side by side in one run.

    python benchmarks/run.py                                # CPU: the bundled model, float32
    python benchmarks/run.py --device cuda --dtype bfloat16 # GPU: random-weight 135M and 1B Llama shapes
    python benchmarks/run.py --quick --out /tmp/b.md        # seconds, a tiny random model (smoke test)

Every case is warmed up first, then all cases run in rounds (in a new seeded random order each round, and
the bare forward pass runs in every round, so drift shows in its spread); the generation cases run in rounds
of their own (``--gen-reps``; more of them on a GPU). On a GPU each case runs the whole workload per round;
on the CPU each round goes batch by batch, every case on each batch back to back, so that every batch gives
a paired ratio to the bare pass on it. Reported: the median time, its ratio to the bare forward pass
(generation cases: to plain ``generate``), the same ratio of the fastest rounds, the spread (max - min) /
median over rounds, and on the CPU the median of the paired per-batch ratios with a bootstrap interval,
on which the targets are judged there. Peak memory: on CPU the
extra peak resident memory of a fresh process per case (``VmHWM`` after a reset via
``/proc/self/clear_refs``, minus the resident memory before the case, the model loaded and warmed up, and
memory freed by the warm-up given back with ``malloc_trim``); on a GPU ``torch.cuda.max_memory_allocated``
above the memory allocated before the case. Peers run in their own process (``benchmarks/peers.py``, any
Python given with ``--peer-python``) against a bare forward pass: the Hugging Face model's, or for
TransformerLens its own. Results are written into the CPU or GPU section of the markdown file (``--out``,
default docs/benchmarks.md) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bench_cases
import bench_report
import torch
from bench_cases import BUNDLED, CASE_BY_KEY, CASES, Workload

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Workload sizes per profile.
PROFILES = {
    "cpu": dict(n_prompts=64, batch_size=8, seq_len=64, gen_prompts=16, gen_batch_size=8, gen_prompt_len=64,
                new_tokens=32, reps=5, gen_reps=5),
    # on a GPU the small model's pass and generate are bound by the host and jittery (spreads of 5-243% over
    # 5 forward rounds on the H100, 30-50% over 5 generate rounds on an H200), and a forward round is short
    # (4.7 s over both shapes): more rounds than on the CPU
    "cuda": dict(n_prompts=64, batch_size=16, seq_len=512, gen_prompts=16, gen_batch_size=16,
                 gen_prompt_len=512, new_tokens=64, reps=9, gen_reps=8),
    "quick": dict(n_prompts=8, batch_size=4, seq_len=16, gen_prompts=4, gen_batch_size=4, gen_prompt_len=8,
                  new_tokens=4, reps=2, gen_reps=2),
}  # fmt: skip
SIZE_KEYS = (
    "n_prompts",
    "batch_size",
    "seq_len",
    "gen_prompts",
    "gen_batch_size",
    "gen_prompt_len",
    "new_tokens",
)
STREAM_PAIRS = {"quick": 4, "cpu": 128, "cuda": 256}
"""N of the streaming memory check (pairs); it is run with N and 10 N. Large enough that the rows of 10 N
pairs, collected, raise the peak well past 10% (CPU: 1280 pairs x 2 x 30 layers x 576 floats = 177 MB
against a process of about 1 GB), so that the check can fail."""


# ----------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(
    w: Workload,
    keys: list[str] | dict[str, Callable],
    reps: int,
    full_warmup: bool,
    per_batch: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per round of each case (keys of ``CASE_BY_KEY``, or names mapped to ``run(workload)``),
    ``reps`` rounds, in a new seeded random order each round (a rotation would keep every case after the
    same neighbour, and what a case leaves behind slows the next one), with Python's cyclic garbage
    collector run before each case and off during it.

    With ``per_batch`` (cases of one group, keys of ``CASE_BY_KEY``), each round goes batch by batch instead:
    every case runs on that batch alone, in a new random order per batch, and its seconds are appended to
    ``per_batch[key]`` (round by round, batch by batch, so the lists of two cases pair up); what the cases
    keep is held to the end of the round, as a whole-workload run holds it. A round's time is the sum over
    its batches. The two runs of a pair are seconds apart, so drift on a shared machine, which moves whole
    rounds by 10-20% here, hits both: the per-batch ratios resolve what rounds cannot. On a GPU it would add
    a sync per batch to every case (the bare pass too), so the suite uses it on the CPU only."""
    runs = keys if isinstance(keys, dict) else {key: CASE_BY_KEY[key].run for key in keys}
    keys = list(runs)
    warm = w if full_warmup else dataclasses.replace(w, batches=w.batches[:1], gen_batches=w.gen_batches[:1])
    times: dict[str, list[float]] = {k: [] for k in keys}

    def timed(key: str, workload: Workload) -> tuple[float, object]:
        gc.collect()
        gc.disable()  # as timeit does: a collection inside one case's timing is noise
        try:
            _sync(w.device)
            start = time.perf_counter()
            kept = runs[key](workload)
            _sync(w.device)
            return time.perf_counter() - start, kept
        finally:
            gc.enable()

    with torch.no_grad():
        for key in keys:
            kept = runs[key](warm)
            del kept
        for rep in range(reps):
            rng = random.Random(rep)
            if per_batch is None:
                for key in rng.sample(keys, len(keys)):
                    seconds, kept = timed(key, w)
                    times[key].append(seconds)
                    del kept
            else:
                generate = CASE_BY_KEY[keys[0]].group == "generate"
                n = len(w.gen_batches if generate else w.batches)
                held, total = [], dict.fromkeys(keys, 0.0)
                for j in range(n):
                    one = dataclasses.replace(
                        w, batches=w.batches[j : j + 1], gen_batches=w.gen_batches[j : j + 1]
                    )
                    for key in rng.sample(keys, len(keys)):
                        seconds, kept = timed(key, one)
                        per_batch.setdefault(key, []).append(seconds)
                        total[key] += seconds
                        held.append(kept)
                del held
                for key in keys:
                    times[key].append(total[key])
            print(f"  round {rep + 1}/{reps} done (load {os.getloadavg()[0]:.2f})", flush=True)
    return times


# ----------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _return_freed_memory() -> None:
    """Give memory freed earlier (the warm-up's activations) back to the OS, so that the resident memory
    grows with what a case allocates: without it, glibc hands freed blocks out again and a case holding
    tens of MB measured 0 extra."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the extra column is a lower bound then
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_memory(w: Workload, run, device: torch.device) -> float | None:
    """Extra peak memory in MB (2**20) while ``run(w)`` runs and its result is alive."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        kept = run(w)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del kept
        return peak / 2**20
    _return_freed_memory()
    if not _reset_peak_rss():
        return None
    before = _status_kb("VmRSS")
    kept = run(w)
    peak = _status_kb("VmHWM") - before
    del kept
    return peak / 1024


STREAM_TOKENS, STREAM_BATCH = 8, 64
"""Length of each random sequence of the streaming check, and pairs per forward pass: short sequences, because
the check is about rows kept per example (one per layer and side at the last token), not about tokens."""


def stream_run(args, key: str):
    """The run of one row of the streaming check: ``key`` is one of ``STREAM_KEYS`` (``"collect_10N"``:
    rows collected, 10 N pairs)."""
    kind, factor = key.split("_")
    return stream_case(args.stream_pairs * int(factor.removesuffix("N")), kind == "stream")


def stream_case(n_pairs: int, streaming: bool):
    """Mean difference at the last token of every layer over ``n_pairs`` random pairs: streamed through
    ``traitlens.stats.ContrastiveStats``, or collected first (all rows kept) then averaged, the control that
    shows the check can fail. Rows stay on the model's device (the GPU, where the peak is measured)."""

    def run(w: Workload):
        from traitlens.capture import ActivationCapture
        from traitlens.hooks import HookManager
        from traitlens.stats import ContrastiveStats

        generator = torch.Generator().manual_seed(1)
        vocab = w.model.config.vocab_size
        capture = ActivationCapture(device=w.device, dtype=torch.float32, positions=-1)
        stats, rows = ContrastiveStats(), {"pos": [], "neg": []}
        for start in range(0, n_pairs, STREAM_BATCH):
            sides = {}
            for side in ("pos", "neg"):
                shape = (min(STREAM_BATCH, n_pairs - start), STREAM_TOKENS)
                ids = torch.randint(3, vocab, shape, generator=generator).to(w.device)
                with HookManager(w.model) as hooks:
                    for i, path in enumerate(w.paths):
                        hooks.add_forward_hook(path, capture.make_hook(str(i)))
                    hooks.stop_after(w.paths[-1])
                    w.model(input_ids=ids, attention_mask=torch.ones_like(ids))
                sides[side] = torch.stack(
                    [capture.get(str(i)) for i in range(w.n_layers)]
                )  # [layer, n, hidden]
                capture.clear()
            if streaming:
                stats.update(sides["pos"], sides["neg"])
            else:
                rows["pos"].append(sides["pos"])
                rows["neg"].append(sides["neg"])
        if streaming:
            return stats.mean_difference()
        return torch.cat(rows["pos"], 1).double().mean(1) - torch.cat(rows["neg"], 1).double().mean(1)

    return run


def memory_child(args) -> None:
    """In a fresh process: build the workload, warm up, measure each of ``args.memory_child`` in turn."""
    w = _workload(args, args.model)
    results = {}
    with torch.no_grad():
        CASE_BY_KEY["bare"].run(dataclasses.replace(w, batches=w.batches[:1]))  # one-time allocations
        for key in args.memory_child.split(","):
            if key.startswith("stream_") or key.startswith("collect_"):
                run = stream_run(args, key)
            else:
                run = CASE_BY_KEY[key].run
            results[key] = measure_memory(w, run, w.device)
    if w.device.type == "cpu":
        results["_rss_total_mb"] = _status_kb("VmHWM") / 1024
    print("MEMORY " + json.dumps(results), flush=True)


def memory_in_children(args, model: str, keys: list[str], one_process_each: bool) -> dict[str, float | None]:
    groups = [[k] for k in keys] if one_process_each else [keys]
    out: dict[str, float | None] = {}
    for group in groups:
        cmd = [sys.executable, str(HERE / "run.py"), "--memory-child", ",".join(group), "--model", model,
               "--device", args.device, "--dtype", args.dtype, "--stream-pairs", str(args.stream_pairs),
               *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SIZE_KEYS],
               *(["--quick"] if args.quick else [])]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")), None)
        if line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            out.update({k: None for k in group})
            continue
        values = json.loads(line.removeprefix("MEMORY "))
        out.update({k: values.get(k) for k in group})
        if len(group) == 1 and "_rss_total_mb" in values:
            out[f"_rss_total_mb:{group[0]}"] = values["_rss_total_mb"]
    return out


# ----------------------------------------------------------------------------------------------- methods


def methods_benchmark(args) -> dict:
    """Time every extraction method on real activations (the bundled model, sentiment, one layer) and
    compare the torch and scikit-learn solvers of the probe and ICA by held-out accuracy, on the last prompt
    token of each example and on every token (a larger problem with the same hidden size)."""
    from traitlens.compute import cosine_similarity
    from traitlens.methods import METHODS, get_method
    from traitlens.metrics import accuracy, midpoint_threshold

    device = torch.device(args.device)
    try:
        sets, source = _method_activations(args, device)
    except Exception as e:  # the bundled model is optional on a GPU machine
        return {"status": f"not measured: {type(e).__name__}: {e}".splitlines()[0]}
    rows = []

    def fit(acts, name: str, **params):
        (train_pos, train_neg), (test_pos, test_neg) = acts["train"], acts["test"]
        method = get_method(name, **params)
        method.extract(train_pos, train_neg)  # warm-up
        times, out = [], None
        for _ in range(args.method_reps):
            _sync(device)
            start = time.perf_counter()
            out = method.extract(train_pos, train_neg)
            _sync(device)
            times.append(time.perf_counter() - start)
        vector = out["vector"].float()
        # the train midpoint on the projection onto the unit vector, the scale ``accuracy`` uses
        threshold = midpoint_threshold(vector, train_pos, train_neg)
        held_out = accuracy(vector.cpu(), test_pos.cpu(), test_neg.cpu(), threshold=threshold)
        rows.append({
            "method": name,
            "params": ", ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults",
            "rows": f"{len(train_pos) + len(train_neg)} x {train_pos.shape[1]}",
            "ms": statistics.median(times) * 1e3,
            "held_out_accuracy": held_out,
        })  # fmt: skip
        return vector

    import warnings

    cosine = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings are reported as numbers instead
        for name in METHODS:
            fit(sets["last token"], name)
        for data, acts in sets.items():
            for name in ("probe", "ica"):
                vectors = []
                for solver in ("torch", "sklearn"):
                    try:
                        vectors.append(fit(acts, name, solver=solver).double().cpu())
                    except ImportError as e:
                        rows.append({"method": name, "params": f"solver={solver!r}", "status": str(e)})
                if len(vectors) == 2:
                    cosine[f"{name}, {data}"] = float(cosine_similarity(*vectors))
    return {"status": "ok", "source": source, "rows": rows, "solver_cosine": cosine}


def _method_activations(args, device) -> tuple[dict, str]:
    """``({data: {"train": (pos, neg), "test": (pos, neg)}}, source)``; data is 'last token' (one row per
    example) and, except in quick mode, 'every token' (one row per real token)."""
    if args.quick:  # synthetic: a planted direction in anisotropic noise (no tokenizer needed)
        generator = torch.Generator().manual_seed(0)
        hidden = 64
        scale = torch.ones(hidden)
        scale[:3] = 30.0
        direction = torch.randn(hidden, generator=generator)

        def draw(n, sign):
            return (torch.randn(n, hidden, generator=generator) * scale + sign * direction).to(device)

        acts = {"train": (draw(48, 1), draw(48, -1)), "test": (draw(16, 1), draw(16, -1))}
        return {"last token": acts}, "synthetic activations (quick mode): 48+48 train, 16+16 test, hidden 64"
    saved_at = Path(args.method_activations) if args.method_activations else None
    meta_at = saved_at.with_suffix(".json") if saved_at else None
    meta = json.loads(meta_at.read_text()) if meta_at and meta_at.exists() and saved_at.exists() else {}
    if "keys" in meta:  # saved by an earlier run (a file from before the two sets has no "keys": recomputed)
        from safetensors.torch import load_file

        saved = load_file(saved_at)
        sets = {data: {split: (saved[f"{key}/{split}_pos"].to(device), saved[f"{key}/{split}_neg"].to(device))
                       for split in ("train", "test")} for data, key in meta["keys"].items()}  # fmt: skip
        return sets, f"{meta['source']} and saved ({saved_at.name})"
    from traitlens.dataset import load_dataset
    from traitlens.models import load_model
    from traitlens.pipeline import collect_activations

    dtype = torch.float32 if device.type == "cpu" else getattr(torch, args.dtype)
    model, tokenizer = load_model(dtype=dtype, device=device)
    layer = model.config.num_hidden_layers // 2
    data = load_dataset("sentiment")
    sets = {}
    for name, position in (("last token", "prompt_last"), ("every token", "all")):
        acts = sets[name] = {}
        for split, splits in (("train", ("train",)), ("test", ("val", "test"))):
            sides = []
            for side in (0, 1):
                examples = [ex for s in splits for ex in data.examples(s)[side]]
                rows = collect_activations(model, tokenizer, examples, layers=[layer], position=position)
                sides.append(rows[0].to(device))  # [n, hidden]
            acts[split] = tuple(sides)
    del model
    sizes = "; ".join(
        f"{name}: train {len(a['train'][0])}+{len(a['train'][1])}, held out (val+test) "
        f"{len(a['test'][0])}+{len(a['test'][1])}"
        for name, a in sets.items()
    )
    source = (
        f"bundled SmolLM2-135M-Instruct, sentiment data, layer {layer}, hidden {sets['last token']['train'][0].shape[1]}"
        f" ({sizes}), activations computed on {device.type}"
    )
    if saved_at:  # keep them for a machine without the bundled model (a GPU machine)
        from safetensors.torch import save_file

        saved_at.parent.mkdir(parents=True, exist_ok=True)
        keys = {name: f"set{i}" for i, name in enumerate(sets)}
        save_file({f"{keys[name]}/{split}_{side}": acts[split][i].cpu().contiguous() for name, acts in sets.items()
                   for split in acts for i, side in enumerate(("pos", "neg"))}, saved_at)  # fmt: skip
        saved_at.with_suffix(".json").write_text(json.dumps({"source": source, "keys": keys}))
    return sets, source


# ----------------------------------------------------------------------------------------------- peers


def peers_benchmark(args, model: str) -> list[dict]:
    from bench_cases import SHAPES
    from peers import PEERS

    if model == BUNDLED:
        from traitlens.models import bundled_cache_folder

        folder = bundled_cache_folder()
        if not (folder / "model.safetensors").is_file():
            return [{"key": p, "peer": p, "status": "not measured", "reason": "bundled model not cached"}
                    for p in PEERS]  # fmt: skip
        where = ["--folder", str(folder)]
    else:
        where = ["--shape", json.dumps(SHAPES[model])]
    sizes = ["--n-prompts", str(args.n_prompts), "--batch-size", str(args.batch_size), "--seq-len",
             str(args.seq_len), "--reps", str(args.peer_reps), "--device", args.device, "--dtype", args.dtype]  # fmt: skip
    pythons = args.peer_python or [sys.executable]
    rows: dict[str, dict] = {}
    for peer in PEERS:
        for python in pythons:
            print(f"  peer {peer} with {python}", flush=True)
            proc = subprocess.run([python, str(HERE / "peers.py"), "--peer", peer, *where, *sizes],
                                  capture_output=True, text=True, cwd=ROOT)  # fmt: skip
            try:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"key": peer, "peer": peer, "status": "failed", "reason": tail[:200]}
            row["python"] = python
            if _rank(row) > _rank(rows.get(peer)):
                rows[peer] = row
    return [rows[p] for p in PEERS]


def _rank(row: dict | None) -> int:
    return -1 if row is None else {"ok": 3, "failed": 2, "not installed": 1}.get(row.get("status"), 0)


# ----------------------------------------------------------------------------------------------- machine


def machine_info(device: torch.device) -> dict:
    import transformers

    import traitlens

    cpu = "unknown CPU"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else platform.processor() or cpu
    except OSError:
        cpu = platform.processor() or cpu
    mem = None
    with contextlib.suppress(OSError, AttributeError):
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "traitlens": traitlens.__version__,
        "commit": _git_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _git_commit() -> str | None:
    """The commit checked out, with ``-dirty`` appended when tracked files differ from it: a run from an
    edited tree must say so (the H200 run 1's results record 00f7371, while its files are named for 3b8f6eb,
    and nothing in them tells which code ran)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        return out.stdout.strip() or None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------- main


def _workload(args, model: str) -> Workload:
    return bench_cases.make_workload(
        model, args.device, getattr(torch, args.dtype), **{k: getattr(args, k) for k in SIZE_KEYS}
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", help="model dtype (default float32 on CPU, bfloat16 on a GPU)")
    parser.add_argument("--models", help=f"comma-separated: {BUNDLED}, {', '.join(bench_cases.SHAPES)}")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, seconds (smoke test)")
    parser.add_argument("--reps", type=int, help="timed rounds per forward case")
    parser.add_argument("--gen-reps", type=int, help="timed rounds per generation case")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to update")
    parser.add_argument("--plot", help="PNG path (default: benchmarks_<cpu|cuda>.png next to --out)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--peer-python", action="append", help="a Python with peers installed (repeatable)")
    parser.add_argument("--peer-reps", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--method-reps", type=int, default=5)
    parser.add_argument("--method-activations", help="safetensors file: load the methods' activations from "
                        "it if it exists, else compute them (bundled model) and save them there")  # fmt: skip
    parser.add_argument("--stream-pairs", type=int, help="N of the streaming memory check (run with N, 10 N)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    for key in SIZE_KEYS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int)
    args = parser.parse_args(argv)
    profile = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    args.profile = profile
    args.dtype = args.dtype or ("float32" if profile != "cuda" else "bfloat16")
    for key, value in PROFILES[profile].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.stream_pairs = args.stream_pairs or STREAM_PAIRS[profile]
    if args.quick:
        args.method_reps = 1
        torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
    if args.models is None:
        args.models = {"quick": "tiny", "cpu": BUNDLED, "cuda": "smollm2-135m-shape,llama-1b-shape"}[profile]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    device = torch.device(args.device)
    results = {
        "section": "cuda" if device.type == "cuda" else "cpu",
        "quick": args.quick,
        "machine": machine_info(device),
        "load_before": os.getloadavg(),
        "settings": {k: getattr(args, k) for k in (*SIZE_KEYS, "reps", "gen_reps", "dtype", "device")},
        "models": [],
    }
    from traitlens.capture import SIDE_STREAM_BYTES

    results["side_stream_bytes"] = SIDE_STREAM_BYTES
    started = time.perf_counter()
    # On the CPU the methods first: short, and measured even if the run is cut short. On a GPU after the
    # models: their scikit-learn fits load the host's cores (the H100 run 4's load average was 10.75 in the
    # first round of the 135M shape, which they preceded), and the small model's pass is bound by the host.
    methods_first = device.type != "cuda"
    if methods_first:
        _methods_into(args, results, started)
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        w = _workload(args, model)
        entry = {"model": model, "workload": w.describe(), "n_layers": w.n_layers, "stop_layer": w.stop_layer}
        keys = [c.key for c in CASES]
        times, per_batch = {}, (None if device.type == "cuda" else {})  # paired per batch on the CPU
        for group, reps in (("forward", args.reps), ("generate", args.gen_reps)):
            group_keys = [c.key for c in CASES if c.group == group]
            times.update(time_cases(w, group_keys, reps, device.type == "cuda", per_batch))
        entry["times"] = times
        if per_batch is not None:
            entry["batch_times"] = per_batch
        results["models"].append(entry)
        _write(args, results, started)  # what is measured so far survives a run cut short
        if args.no_memory:
            entry["memory"] = {}
        elif device.type == "cuda":
            with torch.no_grad():
                entry["memory"] = {k: measure_memory(w, CASE_BY_KEY[k].run, device) for k in keys}
            entry["streaming"] = _streaming_cuda(args, w)
        del w
        gc.collect()
        if not args.no_memory and device.type != "cuda":
            print("  memory (fresh processes)", flush=True)
            values = memory_in_children(args, model, keys + STREAM_KEYS, one_process_each=not args.quick)
            entry["memory"] = {k: values[k] for k in keys}
            entry["streaming"] = _streaming(args, values)
        if args.no_peers or args.quick:
            reason = "--no-peers" if args.no_peers else "--quick"
            entry["peers"] = [{"key": "peers", "status": "skipped", "reason": reason}]
        else:
            _write(args, results, started)  # before the peers, the longest part
            entry["peers"] = peers_benchmark(args, model)
        out, plot = _write(args, results, started)
    if not methods_first:
        out, plot = _methods_into(args, results, started)
    print(f"wrote {out} and {plot} in {results['seconds']:.0f} s", flush=True)
    return results


def _methods_into(args, results: dict, started: float) -> tuple[Path, Path]:
    print("== methods", flush=True)
    results["methods"] = methods_benchmark(args)
    return _write(args, results, started)


def _write(args, results: dict, started: float) -> tuple[Path, Path]:
    results["load_after"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_name(f"benchmarks_{results['section']}.png")
    bench_report.write(results, out, plot)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return out, plot


STREAM_KEYS = ["stream_1N", "stream_10N", "collect_1N", "collect_10N"]


def _streaming(args, values: dict) -> dict:
    """Peak memory of mean difference over N and 10 N pairs, streamed and collected (CPU: from the fresh
    processes of ``memory_in_children``)."""
    total = {k: values.get(f"_rss_total_mb:{k}") for k in STREAM_KEYS}
    extra = {k: values[k] for k in STREAM_KEYS}
    return {"status": "ok", "pairs": args.stream_pairs, "extra_mb": extra, "total_mb": total}


def _streaming_cuda(args, w: Workload) -> dict:
    """On a GPU: peak device memory (rows and statistics stay on the GPU) of mean difference over N and 10 N
    pairs, streamed and collected, in this process."""
    values = {}
    with torch.no_grad():
        for key in STREAM_KEYS:
            values[key] = measure_memory(w, stream_run(args, key), w.device)
    return {"status": "ok", "pairs": args.stream_pairs, "extra_mb": values, "total_mb": {}}


if __name__ == "__main__":
    main()
