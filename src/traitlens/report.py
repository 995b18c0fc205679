"""The extraction report: PNG plots and one self-contained HTML page (images embedded) per run.

Plots: validation accuracy and AUROC by layer for each method; histogram of positive and negative test
projections at the chosen layer; cosine similarity between the methods' vectors at that layer. The page adds
the chosen vector's test scores, the random-baseline control, and per-token heatmaps of a few test examples.
Needs matplotlib (the ``pipeline`` extra).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import torch

from traitlens._plot import figure
from traitlens.compute import cosine_similarity, projection
from traitlens.dataset import ContrastiveDataset
from traitlens.monitor import heatmap_scale, token_heatmap_html, token_projections
from traitlens.pipeline import CONTROL, ExtractionResult


def plot_layers(result: ExtractionResult, path: Path) -> Path:
    """Validation accuracy, AUROC and effect size by layer, one line per method (the selection rule's keys,
    in its order: ties in the first are broken by the next); the random baseline's line is the mean over its
    random directions, each oriented on train (the control), and the chosen layer is marked."""
    from matplotlib.ticker import MaxNLocator

    fig = figure((16, 4))
    axes = fig.subplots(1, 3, sharex=True)
    chosen = f"chosen: {result.best_method} at layer {result.best_layer}"
    for ax, key in zip(axes, ("accuracy", "auroc", "effect_size"), strict=True):
        for method in result.methods:
            control = method == CONTROL  # mean over random directions
            if control and key == "effect_size":  # not computed for the draws
                continue
            values = [v[f"draws_{key}_mean" if control else key] for v in result.val[method]]
            style = {"linestyle": ":", "color": "grey"} if control else {}
            draws = result.val[method][0]["draws"] if control else 0
            label = f"random directions (mean of {draws}, oriented)" if control else method
            ax.plot(result.layers, values, marker=".", label=label, **style)
        ax.axvline(result.best_layer, color="black", linewidth=0.8, linestyle="--", label=chosen)
        name = key.replace("_", " ")
        ax.set(xlabel="layer", ylabel=f"validation {name}", title=f"validation {name} by layer")
        if key != "effect_size":
            ax.axhline(0.5, color="black", linewidth=0.5)
            ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"{result.trait}: {result.model_name}, position {result.position} (chosen by accuracy, then AUROC, "
        "then effect size)"
    )
    fig.savefig(path, format="png", dpi=110)
    return path


def plot_histogram(result: ExtractionResult, path: Path) -> Path:
    """Test projections of positives and negatives onto the chosen vector, with its train threshold."""
    i = result.index(result.best_layer)
    vector = result.vectors[result.best_method][i]
    pos, neg = (side[0] for side in result.activations["test"])  # the chosen layer
    title = f"{result.best_method}, layer {result.best_layer}: test accuracy {result.test['accuracy']:.2f}"
    return plot_projections(vector, pos, neg, result.thresholds[result.best_method][i], title, path)


def plot_projections(
    vector: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, threshold: float, title: str, path: Path
) -> Path:
    """Histogram of the projections of ``pos`` and ``neg`` (``[n, hidden]``) onto the unit ``vector``, with
    the accuracy ``threshold`` as a dashed line."""
    pos, neg = projection(pos, vector), projection(neg, vector)
    fig = figure((7, 4))
    ax = fig.subplots()
    bins = torch.linspace(float(min(pos.min(), neg.min())), float(max(pos.max(), neg.max())), 25).tolist()
    ax.hist(pos.tolist(), bins=bins, alpha=0.6, label=f"positive ({len(pos)})", color="tab:red")
    ax.hist(neg.tolist(), bins=bins, alpha=0.6, label=f"negative ({len(neg)})", color="tab:blue")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set(xlabel="projection onto the unit vector", ylabel="examples", title=title)
    ax.legend()
    fig.savefig(path, format="png", dpi=110)
    return path


def plot_cosines(result: ExtractionResult, path: Path) -> Path:
    """Cosine similarity between the methods' vectors at the chosen layer."""
    i = result.index(result.best_layer)
    stacked = torch.stack([result.vectors[m][i] for m in result.methods])
    matrix = cosine_similarity(stacked.unsqueeze(1), stacked.unsqueeze(0))
    fig = figure((6, 5))
    ax = fig.subplots()
    image = ax.imshow(matrix.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    names = [f"{m} (one draw)" if m == CONTROL else m for m in result.methods]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    n = len(result.methods)
    for r in range(n):
        for c in range(n):
            value = float(matrix[r, c])
            color = "white" if abs(value) > 0.6 else "black"  # readable on the dark ends of the colour map
            # three decimals: methods that agree closely (0.995, 0.999) must not read as the diagonal's 1
            ax.text(c, r, f"{value:.3f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax)
    ax.set_title(f"cosine between methods, layer {result.best_layer}")
    fig.savefig(path, format="png", dpi=110)
    return path


def write_report(
    result: ExtractionResult,
    folder: str | Path,
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    dataset: ContrastiveDataset | None = None,
    n_examples: int = 3,
) -> Path:
    """Write the PNG plots and ``report.html`` into ``folder``; return the HTML path.

    With ``model``, ``tokenizer`` and ``dataset``, the page also shows per-token heatmaps of the first
    ``n_examples`` test pairs under the chosen vector.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = {
        "Validation scores by layer": plot_layers(result, folder / "layers.png"),
        "Test projections at the chosen layer": plot_histogram(result, folder / "histogram.png"),
        "Agreement between methods": plot_cosines(result, folder / "cosines.png"),
    }
    parts = [f"<h1>traitlens: {html.escape(result.trait)}</h1>", _summary_table(result)]
    for title, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f'<h2>{title}</h2><img alt="{title}" src="data:image/png;base64,{data}" style="max-width:100%">'
        )
    if model is not None and tokenizer is not None and dataset is not None:
        vector = result.trait_vector()
        examples = [
            (f"{label} (line {pair.line})", token_projections(model, tokenizer, vector, example))
            for pair in dataset.test[:n_examples]
            for label, example in (("positive", pair.pos_example), ("negative", pair.neg_example))
        ]
        scale = heatmap_scale(*(scores for _, scores in examples))  # one colour scale, so they compare
        parts.append("<h2>Per-token projections (test examples, one colour scale)</h2>")
        parts += [token_heatmap_html(scores, title=title, scale=scale) for title, scores in examples]
    page = folder / "report.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>traitlens report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        ".warn{color:#b00}</style></head><body>" + "\n".join(parts) + "</body></html>",
        encoding="utf-8",  # as declared, whatever the locale's encoding
    )
    return page


def _summary_table(result: ExtractionResult) -> str:
    test, control = result.test, result.control_test
    rows = [
        ("model", result.model_name),
        ("position", result.position),
        ("split sizes (pairs)", ", ".join(f"{k} {v}" for k, v in result.split_sizes.items())),
        (
            "chosen",
            f"{result.best_method} at layer {result.best_layer} ({result.module_paths[result.index(result.best_layer)]})",
        ),
        (
            "test accuracy / AUROC / effect size",
            f"{test['accuracy']:.3f} / {test['auroc']:.3f} / {test['effect_size']:.2f}",
        ),
        (
            f"control: {control['draws']} random directions, same layer, each oriented on train: test "
            "accuracy / AUROC",
            f"{control['draws_accuracy_mean']:.3f} +/- {control['draws_accuracy_std']:.3f} (best "
            f"{control['draws_accuracy_max']:.3f}) / {control['draws_auroc_mean']:.3f} +/- "
            f"{control['draws_auroc_std']:.3f} (best {control['draws_auroc_max']:.3f})",
        ),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    beaten = f"the best of {control['draws']} random directions oriented on train"
    note = (
        f"<p>On validation the chosen vector beats {beaten}: its separation is not what any direction of "
        "this residual stream shows.</p>"
        if result.control_ok
        else f"<p class='warn'>On validation the chosen vector does no better than {beaten}: its separation "
        "may be what any direction of this residual stream shows, not the trait, or the validation split "
        "is too small to tell. Treat the scores with care.</p>"
    )
    rows = []
    for m in result.methods:
        layer = result.best_layer_of(m)  # the chosen layer for the control
        scores = result.val[m][result.index(layer)]
        if m == CONTROL:  # the mean over its random directions, at the chosen layer
            name = f"{m} (mean of {scores['draws']} oriented draws, chosen layer)"
            accuracy, auroc = scores["draws_accuracy_mean"], scores["draws_auroc_mean"]
        else:
            name, accuracy, auroc = m, scores["accuracy"], scores["auroc"]
        rows.append(f"<tr><td>{name}</td><td>{layer}</td><td>{accuracy:.3f}</td><td>{auroc:.3f}</td></tr>")
    best = "".join(rows)
    return (
        f"<table>{body}</table>{note}<h3>Best layer per method (validation)</h3>"
        f"<table><tr><th>method</th><th>layer</th><th>accuracy</th><th>AUROC</th></tr>{best}</table>"
    )
