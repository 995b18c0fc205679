"""The ``traitlens`` command: extract, evaluate, monitor, steer, export, modules.

With no ``--model`` every command uses the bundled SmolLM2-135M-Instruct, offline. Bad arguments get one
clear line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib.util
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

EPILOG = "Run 'traitlens COMMAND --help' for the options of each command."


def _parse_layers(text: str) -> list[int]:
    """``"5,10-12"`` -> ``[5, 10, 11, 12]``."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            start, dash, end = part.partition("-")
            first, last = int(start), int(end if dash else start)  # "10-" is no range: int("") raises
            if last < first:
                raise argparse.ArgumentTypeError(f"layer range {part!r} is empty: give it as {last}-{first}")
            layers.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like '12' or '5,10-20', got {text!r}") from None
    return layers


def _positive_int(text: str) -> int:
    """An argparse type: an int >= 1, refused while the arguments are parsed (before a model loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="hub id or local folder of a causal LM (default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--revision", default=None, help="hub revision of --model")
    parser.add_argument("--device", default=None, help="torch device for the model (default: cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype to load the model in (default: float32 for the bundled model, the checkpoint's own, "
        "'auto', for --model; float16 overflows above 65504 in some models: prefer bfloat16)",
    )


def build_parser() -> argparse.ArgumentParser:
    from traitlens import __version__
    from traitlens.methods import METHODS
    from traitlens.positions import POSITION_RULES

    parser = argparse.ArgumentParser(
        prog="traitlens",
        description="Find, test and use trait vectors in transformer language models.",
        epilog=EPILOG,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"traitlens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        # no abbreviations: 'export --model x' was taken as --model-hint x
        return commands.add_parser(name, allow_abbrev=False, **kwargs)

    p = command(
        "extract",
        help="contrastive dataset -> vectors at every layer and method, chosen on validation, report",
        description="Collect activations of a contrastive dataset at every layer in one batched pass, run every "
        "extraction method at every layer on the train split, score each on the validation split, pick the best, "
        "report it once on the test split, and write vectors, summary.json and report.html.",
    )
    data = p.add_mutually_exclusive_group()
    data.add_argument("--trait", default=None, help="a shipped dataset: sentiment, formality, certainty")
    data.add_argument(
        "--data", type=Path, default=None, help="a JSONL dataset file (see the data format docs)"
    )
    _add_model(p)
    p.add_argument(
        "--layers", type=_parse_layers, default=None, help="layers to extract, e.g. '5,10-20' (default: all)"
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"extraction methods (default: all of {', '.join(METHODS)})")  # fmt: skip
    p.add_argument(
        "--position",
        default=None,
        choices=[rule for rule in POSITION_RULES if rule != "all"],  # one row per example
        help="where activations are read (default: response_mean when the pairs differ in their answers, "
        "else prompt_last)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<trait>)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report and plots")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the output folder (without it, such a folder is refused)")  # fmt: skip
    p.add_argument("--backend", default="local", choices=("local", "ray"),
                   help="where activations are computed: this process, or a Ray cluster (needs traitlens[ray])")  # fmt: skip
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. HEAD_IP:6379 (default: $RAY_ADDRESS, else a local instance)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="Ray workers, each holding the model (default: 2)")
    p.add_argument("--shard-size", type=int, default=64,
                   help="pairs per shard; shards done are kept in OUT/shards and skipped on a rerun")  # fmt: skip

    p = command("evaluate", help="score a saved vector on a dataset split",
                       description="Score a saved trait vector on a dataset split (accuracy with its saved "
                       "threshold, AUROC, effect size, p-value, ...), reading activations where it was extracted.")  # fmt: skip
    p.add_argument("vector", type=Path, help="a .safetensors vector written by 'traitlens extract'")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--trait", default=None, help="a shipped dataset name")
    data.add_argument("--data", type=Path, default=None, help="a JSONL dataset file")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--plot", type=Path, default=None,
                   help="also write a PNG histogram of the two classes' projections, with the threshold")  # fmt: skip
    _add_model(p)

    p = command("monitor", help="per-token projections of a text or a generation, as an HTML heatmap",
                       description="Project every token of a text (or of a prompt and the model's answer, "
                       "scored live as it is generated) onto a saved vector; print the scores and write a heatmap.")  # fmt: skip
    p.add_argument("vector", type=Path, help="a .safetensors vector")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text to score as it is")
    what.add_argument("--prompt", help="a user message to answer (chat template) and score token by token")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument(
        "--out", type=Path, default=Path("monitor.html"), help="HTML heatmap file (default: monitor.html)"
    )
    _add_model(p)

    p = command(
        "steer",
        help="baseline and steered generations, one after the other, or a dose-response table and plot",
        description="Generate from prompts without and with the vector added at its layer (greedy), for each "
        "coefficient. With --dose-response, report for each coefficient the mean projection of the generated "
        "tokens onto the vector and their perplexity under the unsteered model, as a table and a PNG plot.",
    )
    p.add_argument("vector", type=Path, help="a .safetensors vector")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", nargs="+", help="one or more user messages")
    what.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    p.add_argument(
        "--coeff", type=float, nargs="+", default=None,
        help="coefficients, relative to the typical residual norm at the vector's layer (measured on the "
        "prompts) unless --absolute (default: -0.3 0.3)",
    )  # fmt: skip
    p.add_argument(
        "--absolute", action="store_true", help="add coeff * vector as saved, not scaled to the layer's norm"
    )
    p.add_argument(
        "--op", default="add", choices=("add", "ablate", "clamp"),
        help="add coeff x vector, remove the component along the vector (ablate: one setting, no --coeff), or "
        "set that component to coeff (clamp); default: add",
    )  # fmt: skip
    p.add_argument("--positions", default="all", choices=("all", "prompt", "generated"))
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument(
        "--dose-response", action="store_true", help="report projection and perplexity per coefficient"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="PNG of the dose-response plot (default: dose_response.png)"
    )
    _add_model(p)

    p = command(
        "export",
        help="write a run's per-layer vectors as a llama.cpp control-vector GGUF file",
        description="Write one method's vectors at every extracted layer (from all_layers.safetensors of an "
        "'extract' run) as a control vector for llama.cpp's --control-vector option. traitlens layer i (the "
        "output of model.layers.i) is written as direction.i; layer 0 has no slot in that format and is left "
        "out.",
    )
    p.add_argument("run", type=Path, help="an output folder of 'traitlens extract'")
    p.add_argument(
        "--method", default=None, choices=list(METHODS),
        help="whose vectors to write (default: the method the run chose, from its summary.json)",
    )  # fmt: skip
    p.add_argument("--scale", type=float, default=1.0, help="multiply every vector by this")
    p.add_argument("--model-hint", help="model family written into the file (default: the run's model_type, "
                   "else llama)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="GGUF file (default: RUN/<method>.gguf)")

    p = command("modules", help="list a model's hookable module paths",
                       description="List the dotted paths of a model's modules, for HookManager.add_forward_hook.")  # fmt: skip
    p.add_argument("--pattern", default=None, help=r"regular expression to filter paths, e.g. 'layers\.\d+$'")
    _add_model(p)

    return parser


def _load(args):
    from traitlens.models import dtype_name, load_model, model_dtype

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, revision=args.revision, device=args.device, dtype=args.dtype)
    took = time.perf_counter() - start
    _info(f"loaded {model.config._name_or_path} ({dtype_name(model_dtype(model))}) in {took:.1f} s")
    return model, tokenizer


def _fits(vector, path: Path, model):
    """``vector``, read from ``path`` before the model loaded, checked against the model as
    ``load_vector(path, model=model)`` checks it (without reading the file again); and a note when it was
    made for a model of another name."""
    from traitlens.vector import _check_fits

    _check_fits(vector, path, hidden_size=None, model=model)
    _note_other_model(vector, model)
    return vector


def _note_other_model(vector, model) -> None:
    """Say so when the vector was made for a model of another name: one of the same width loads without
    complaint, and its directions mean nothing here. Names compare by their last part, so a hub id and a
    local copy of it (``org/name``, ``/models/name``) count as one."""
    made_for, loaded = str(vector.model or ""), str(getattr(model.config, "_name_or_path", "") or "")
    if made_for and loaded and Path(made_for).name != Path(loaded).name:
        _info(f"note: this vector was made for model {made_for!r}, and the model here is {loaded!r}")


def _info(message: str) -> None:
    print(f"traitlens: {message}", file=sys.stderr)


def _check_output(path: Path | None, *, plot: bool = False) -> None:
    """Refuse an output file that cannot be written, or a plot without matplotlib, before any model work."""
    if path is None:
        return
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: its folder {path.parent} does not exist")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"writing {path} needs matplotlib: pip install 'traitlens[pipeline]'")


def _dataset(args):
    from traitlens.dataset import load_dataset

    if args.data is not None:  # a shipped name given as --data, when no file has that name, is that dataset
        return load_dataset(args.data if args.data.exists() else str(args.data))
    return load_dataset(args.trait or "sentiment")


# what 'extract' writes into its folder (ExtractionResult.save, then write_report); OUT/shards, the Ray
# backend's finished shards, is kept: a rerun with the same settings resumes from it
RUN_FILES = (
    "summary.json", "trait_vector.safetensors", "all_layers.safetensors", "vectors",
    "report.html", "layers.png", "histogram.png", "cosines.png",
)  # fmt: skip


def _prepare_run_folder(out: Path, *, overwrite: bool) -> list[str]:
    """Make ``out`` (before the model loads, so that a path that cannot be a folder fails first) and refuse
    one that holds a finished run unless ``overwrite``. Returns that run's files, for ``_remove_run`` once the
    new run is done: a run over an older one would otherwise leave its vectors and report beside the new
    ones, and one that fails (or is refused, as a Ray job over shards of other data) keeps the old run."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    old = [name for name in RUN_FILES if (out / name).exists()]
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}); pass --overwrite "
            "to replace it, or --out another folder"
        )
    return old


def _remove_run(out: Path, names: list[str]) -> None:
    for name in names:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        elif (out / name).exists():
            (out / name).unlink()
    if names:
        _info(f"replacing the run in {out}")


def cmd_extract(args) -> None:
    from traitlens.pipeline import check_extraction, extract_trait

    dataset = _dataset(args)
    check_extraction(dataset, args.position, args.methods)  # before the model loads
    out = args.out or Path("runs") / dataset.name
    old_run = _prepare_run_folder(out, overwrite=args.overwrite)
    cluster = None
    if args.backend == "ray":
        from traitlens.distributed import RayCluster, require_ray

        require_ray()
        cluster = RayCluster(
            address=args.ray_address, workers=args.workers, model=args.model, shard_size=args.shard_size,
            model_kwargs={"revision": args.revision} if args.revision else {}, out_dir=out,
        )  # fmt: skip
    model, tokenizer = _load(args)
    start = time.perf_counter()
    result = extract_trait(
        model, tokenizer, dataset, layers=args.layers, methods=args.methods, position=args.position,
        batch_size=args.batch_size, seed=args.seed, backend=args.backend, cluster=cluster,
    )  # fmt: skip
    _remove_run(out, old_run)
    result.save(out)
    _info(
        f"extracted {len(result.methods)} methods x {len(result.layers)} layers in {time.perf_counter() - start:.1f} s"
    )
    if not args.no_report:
        from traitlens.report import write_report

        page = write_report(result, out, model=model, tokenizer=tokenizer, dataset=dataset)
        _info(f"report: {page}")
    test, control = result.test, result.control_test
    print(f"chosen: {result.best_method} at layer {result.best_layer} ({result.position})")
    print(
        f"test:   accuracy {test['accuracy']:.3f}  AUROC {test['auroc']:.3f}  effect size {test['effect_size']:.2f}"
    )
    print(
        f"control, {control['draws']} random directions at that layer, each oriented on train: test accuracy "
        f"{control['draws_accuracy_mean']:.3f} +/- {control['draws_accuracy_std']:.3f} (best "
        f"{control['draws_accuracy_max']:.3f}), AUROC {control['draws_auroc_mean']:.3f} (best "
        f"{control['draws_auroc_max']:.3f}); on validation the chosen vector "
        + ("beats them all" if result.control_ok else "does NOT beat them all")
    )
    print(f"vector: {out / 'trait_vector.safetensors'}")


def cmd_evaluate(args) -> None:
    from traitlens.dataset import check_position
    from traitlens.metrics import evaluate_vector
    from traitlens.pipeline import collect_activations, pair_activations
    from traitlens.vector import load_vector

    saved = load_vector(args.vector)  # a bad file or dataset fails here, before the slow model load
    _check_output(args.plot, plot=True)
    dataset = _dataset(args)
    scored = dataset.split(args.split)
    try:  # rows of the scored split that cannot be read there, named by file line
        check_position(dataclasses.replace(dataset, pairs=scored), saved.position, vector=True)
    except ValueError as err:
        raise ValueError(f"{args.vector}: {err}") from None
    if len(scored) < 2:  # before the model loads
        raise ValueError(
            f"dataset {dataset.name!r} has {len(scored)} {args.split!r} pair{'' if len(scored) == 1 else 's'}; "
            "scoring needs at least 2 (choose another --split)"
        )
    if args.split != "test" and saved.dataset_hash == dataset.sha256:  # in-sample: said before the wait
        used = "fitted" if args.split == "train" else "chosen among methods and layers"
        _info(
            f"note: this vector was {used} on this {args.split!r} split, so its scores there are not held out"
        )
    model, tokenizer = _load(args)
    vector = _fits(saved, args.vector, model)
    read = {
        "module": vector.module,
        "position": vector.position,
        "batch_size": args.batch_size,
        "progress": f"{dataset.name} {args.split}",  # on stderr: --json output stays clean
    }
    try:  # the output of the module the vector was read at, as the pipeline reads it
        if vector.position == "all":  # a row per token: the sides do not pair up
            acts = [
                collect_activations(model, tokenizer, side, **read)[0]
                for side in dataset.examples(args.split)
            ]
        else:
            acts = [side[0] for side in pair_activations(model, tokenizer, scored, **read)]
    except (TypeError, ValueError) as err:  # an output the capture cannot read at that position
        raise ValueError(f"cannot read activations at the vector's module {vector.module!r}: {err}") from None
    if acts[0].ndim != 2 or acts[0].shape[1] != vector.hidden_size:
        raise ValueError(
            f"module {vector.module!r} gives activations of shape {tuple(acts[0].shape)} at position "
            f"{vector.position!r}, expected [n, hidden]=[n, {vector.hidden_size}] to score the vector"
        )
    threshold = vector.method_params.get("threshold")
    if threshold is None:
        _info(
            f"{args.vector} records no threshold; accuracy uses the midpoint of the class means on "
            f"{args.split} itself, which is optimistic"
        )
    metrics = evaluate_vector(vector.vector.float(), *acts, threshold=threshold)
    if args.plot is not None:
        from traitlens.report import plot_projections

        title = (
            f"{vector.method}, {vector.module} on {dataset.name}/{args.split}: accuracy {metrics['accuracy']:.2f}, "
            f"AUROC {metrics['auroc']:.2f}"
        )
        _info(
            f"plot: {plot_projections(vector.vector.float(), *acts, metrics['threshold'], title, args.plot)}"
        )
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    print(f"{vector.trait or '?'} vector ({vector.method}, {vector.module}) on {dataset.name}/{args.split}:")
    for key in (
        "accuracy",
        "auroc",
        "effect_size",
        "p_value",
        "separation",
        "polarity_correct",
        "n_pos",
        "n_neg",
    ):
        print(f"  {key:18s} {metrics[key]}")


def cmd_monitor(args) -> None:
    from traitlens.dataset import Example
    from traitlens.monitor import generate_with_projections, token_heatmap_html, token_projections
    from traitlens.vector import load_vector

    _check_output(args.out)
    vector = load_vector(args.vector)  # a bad file fails here, before the slow model load
    model, tokenizer = _load(args)
    _fits(vector, args.vector, model)
    if args.text is not None:
        scores = token_projections(model, tokenizer, vector, args.text)
        for token, value in zip(scores.tokens, scores.scores.tolist(), strict=True):
            print(f"{value:10.3f}  {token!r}")
    else:
        scores = generate_with_projections(
            model, tokenizer, vector, Example(prompt=args.prompt), max_new_tokens=args.max_new_tokens,
            on_token=lambda token, value: print(f"{value:10.3f}  {token!r}", flush=True),
        )  # fmt: skip
    title = f"{args.vector}: {vector.trait or 'trait'} vector, {vector.method} at {vector.module}"
    args.out.write_text(  # UTF-8 as declared, whatever the locale's encoding
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        + token_heatmap_html(scores, title=title),
        encoding="utf-8",
    )
    means = f"mean projection (the first token left out): {scores.mean():.3f}"
    if bool(scores.response.any()):
        means += f" (prompt {scores.mean('prompt'):.3f}, response {scores.mean('response'):.3f})"
    print(means)
    _info(f"heatmap: {args.out}")


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        if not all(args.prompt):
            raise ValueError("--prompt: a prompt is an empty string")
        return args.prompt
    lines = [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"{args.prompts_file} holds no prompts (one per line)")
    return prompts


def cmd_steer(args) -> None:
    from traitlens.dataset import Example
    from traitlens.dose_response import compare_generations, dose_response, plot_dose_response
    from traitlens.steering import residual_norms
    from traitlens.vector import load_vector

    if args.dose_response and args.op != "add":  # dose_response only adds; refused before the model load
        raise ValueError(
            f"--op {args.op} cannot be used with --dose-response, which measures adding the vector "
            "(--op add); drop --op, or drop --dose-response to compare generations with --op "
            f"{args.op}"
        )
    if args.out is not None and not args.dose_response:
        raise ValueError("--out names the dose-response plot; add --dose-response, or drop --out")
    if args.op == "ablate" and args.coeff is not None:
        raise ValueError("--op ablate removes the vector's component and takes no --coeff; drop --coeff")
    coeffs = [-0.3, 0.3] if args.coeff is None else args.coeff
    bad = [c for c in coeffs if not math.isfinite(c)]
    if bad:
        raise ValueError(f"--coeff must be finite numbers, got {bad}")
    plot = args.out or Path("dose_response.png")
    _check_output(plot if args.dose_response else None, plot=True)
    vector = load_vector(args.vector)  # bad files fail here, before the slow model load
    prompts = _prompts(args)
    relative = not args.absolute and args.op != "ablate"  # ablation takes no coefficient
    if vector.layer is None and relative:
        raise ValueError(
            f"{args.vector} was read at {vector.module!r}, which is in no decoder layer, so there is no "
            "residual norm to make --coeff relative to; pass --absolute"
        )
    model, tokenizer = _load(args)
    _fits(vector, args.vector, model)
    # measured on the prompts as they are generated from (chat-templated, as compare_generations renders
    # them): a one-token raw prompt is all first token, whose norm is an outlier (~100x at layer 20)
    as_generated = [Example(prompt=p) for p in prompts]
    norm = residual_norms(model, tokenizer, as_generated, vector.layer)[vector.layer] if relative else None
    if norm is not None:
        _info(
            f"--coeff is relative to the median residual norm at layer {vector.layer} on these prompts: {norm:.1f}"
        )
    settings = {"positions": args.positions, "norm": norm, "max_new_tokens": args.max_new_tokens}
    if args.dose_response:
        coeffs = sorted(set(coeffs) | {0.0})
        rows = dose_response(model, tokenizer, prompts, vector, coeffs, **settings)
        print(f"{'coeff':>8} {'projection':>11} {'perplexity':>11}  example")
        for row in rows:
            print(
                f"{row['coeff']:8.2f} {row['projection']:11.3f} {row['perplexity']:11.2f}  {row['example'][:60]!r}"
            )
        unit = f"x {norm:.1f}: median norm at layer {vector.layer}" if norm is not None else "absolute"
        count = f"{len(prompts)} prompt" + ("s" if len(prompts) > 1 else "")
        plot_dose_response(
            rows,
            plot,
            title=f"{vector.trait or 'trait'} vector, layer {vector.layer}: {count}",
            xlabel=f"coefficient ({unit})",
        )
        _info(f"plot: {plot}")
        return
    rows = compare_generations(model, tokenizer, prompts, vector, coeffs, op=args.op, **settings)
    for prompt in prompts:
        print(f"=== {prompt}")
        for row in (r for r in rows if r["prompt"] == prompt):
            if row["coeff"] is None:
                label = "baseline"
            else:  # ablation takes no coefficient
                label = args.op if args.op == "ablate" else f"{args.op} {row['coeff']:+g}"
            print(f"--- {label}\n{row['text']}")


def cmd_export(args) -> None:
    import json

    from safetensors import safe_open

    from traitlens.controlvector import save_control_vector

    _check_output(args.out)
    source = args.run / "all_layers.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found; give an output folder of 'traitlens extract'")
    method, hint = args.method, args.model_hint
    summary_path = args.run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if method is None:
        if not summary:
            raise FileNotFoundError(
                f"{summary_path} not found, so the run's chosen method is unknown; pass --method"
            )
        method = summary["chosen"]["method"]
        _info(f"method: {method} (the run's choice)")
    if hint is None:
        hint = summary.get("model_type") or "llama"  # runs before model_type was recorded: llama
        _info(
            f"model hint: {hint}" + ("" if summary.get("model_type") else " (the run records no model_type)")
        )
    with safe_open(source, framework="pt") as f:
        if method not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise ValueError(f"{source} has no {method!r} vectors; it has {sorted(f.keys())}")
        layers = json.loads(f.metadata()["layers"])
        vectors = f.get_tensor(method)
    directions = {layer: args.scale * vectors[i] for i, layer in enumerate(layers) if layer > 0}
    if not directions:
        raise ValueError(
            "the run extracted layer 0 only, and llama.cpp's control-vector format has no slot for layer 0 "
            "(direction.N is added to the output of layer N, N >= 1); extract layers from 1 on"
        )
    if 0 in layers:
        _info("layer 0 left out: llama.cpp's format has no slot for it")
    if method == "probe":
        _info(
            "probe vectors are classifier weights, whose norms follow the inverse of each layer's activation "
            "scale: as a control vector their strength per layer is arbitrary. --method mean_diff writes "
            "differences of class means, in activation units"
        )
    out = save_control_vector(args.out or args.run / f"{method}.gguf", directions, model_hint=hint)
    norms = [float(v.norm()) for v in directions.values()]
    print(
        f"wrote {len(directions)} layers ({min(directions)}-{max(directions)}, norms {min(norms):.3g}-"
        f"{max(norms):.3g}) to {out}"
    )


def cmd_modules(args) -> None:
    from traitlens.hooks import list_modules

    model, _ = _load(args)
    names = list_modules(model, args.pattern)
    for name in names:
        print(name)
    if not names:
        _info(f"no module path of {type(model).__name__} matches {args.pattern!r}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = globals()[f"cmd_{args.command}"]
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        # one line per warning, each once (the data checks run before the model loads and again inside
        # extract_trait), without Python's source line
        if str(message) not in shown:
            shown.add(str(message))
            print(f"traitlens {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            command(args)
    except (ValueError, OSError, ImportError) as err:  # bad input: one line; anything else is a bug
        print(f"traitlens {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
