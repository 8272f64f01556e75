"""A finished run's report.md and small PNG figures (sweeps and searches: search.report).

A run's report shows training loss and the primary metric per epoch, the validation confusion
matrix (or, for regression, predicted against true scores), the per-epoch table, the final
metrics and which epoch was kept.

Figures are drawn on `matplotlib.figure.Figure` objects rendered by Agg: headless, and without
touching pyplot's global state or backend in the caller's process.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from ..config.run import load_saved_config
from ..config.tasks import Task
from ..files import atomic_write_text
from .rundir import PREDICTIONS_FILENAME, read_metrics

logger = logging.getLogger("gluetune")

REPORT_FILENAME = "report.md"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
SCATTER_PNG = "predictions_vs_labels.png"
DPI = 100  # small files; the figures are read on screen
_NOT_METRICS = ("epoch", "step", "train_loss", "loss", "predicted_classes")


def figures_possible() -> bool:
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("report figures need matplotlib (pip install matplotlib); writing the tables only")
        return False
    return True


NO_FIGURES = "_Figures need matplotlib (`pip install matplotlib`)._"


# ---------------------------------------------------------------- a run


def write_run_report(folder: Path) -> Path:
    task = load_saved_config(folder).task
    metrics = read_metrics(folder)
    predictions = read_predictions(folder / PREDICTIONS_FILENAME)
    kept = kept_row(metrics)
    lines = [f"# Report: {folder.name}", "",
             f"Task {task.name}; the kept model is "
             + (f"`{metrics['best_checkpoint']}` (epoch {kept['epoch']:g}), " if kept else "the final one, ")
             + f"chosen by {metrics['primary_metric']} on the {metrics.get('primary_split', 'validation')} split.",
             "", "## Final metrics", "", final_metrics_table(metrics, task)]
    figures = figures_possible()
    if metrics.get("history"):
        lines += ["", "## Per epoch", ""]
        if figures:
            plot_training_curves(metrics, folder / CURVES_PNG)
            lines += [f"![training loss and {metrics['primary_metric']} per epoch]({CURVES_PNG})", ""]
        lines.append(history_table(metrics, task))
    if predictions:
        lines += ["", "## Validation predictions (the kept model)", ""]
        if not figures:
            lines.append(NO_FIGURES)
        elif task.is_regression:
            plot_predictions_vs_labels(predictions, folder / SCATTER_PNG)
            lines.append(f"![predicted against true scores]({SCATTER_PNG})")
        else:
            plot_confusion_matrices(predictions, task, folder / CONFUSION_PNG)
            lines.append(f"![confusion matrix: true label by row, predicted label by column]({CONFUSION_PNG})")
    path = folder / REPORT_FILENAME
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_predictions(path: Path) -> dict[str, tuple[list, list]]:
    """{split: (labels, logits)} of the labelled rows of validation_predictions.jsonl; {} if missing."""
    if not path.is_file():
        return {}
    by_split: dict[str, tuple[list, list]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["label"] is not None and row["label"] != -1:  # -1: unlabelled
                labels, logits = by_split.setdefault(row["split"], ([], []))
                labels.append(row["label"])
                logits.append(row["logits"])
    return by_split


def kept_row(metrics: dict) -> dict | None:
    """The history row of the checkpoint that was kept, if the run recorded one."""
    best = metrics.get("best_checkpoint") or ""
    step = int(best.rsplit("-", 1)[1]) if best.startswith("checkpoint-") else None
    for row in metrics.get("history", []):
        if (step is not None and row.get("step") == step) or (step is None and row.get("epoch") == metrics.get("best_epoch")):
            return row
    return None


def _metric_columns(rows: list[dict], task: Task) -> list[str]:
    """The metrics in `rows`: the task's own first, in its order, then any others (e.g. per split)."""
    present = [k for row in rows for k in row if k not in _NOT_METRICS and not k.endswith("_predicted_classes")]
    present = list(dict.fromkeys(present))
    return [m for m in task.metrics if m in present] + [k for k in present if k not in task.metrics]


def _number(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def history_table(metrics: dict, task: Task) -> str:
    """The per-epoch evaluations as a markdown table, the kept one marked."""
    rows = metrics.get("history", [])
    if not rows:
        return "_No per-epoch evaluations were recorded._"
    loss = history_key(metrics, "loss")
    columns = [c for c in _metric_columns(rows, task) if c != loss]
    kept = kept_row(metrics)
    lines = ["| epoch | step | train loss | validation loss | " + " | ".join(columns) + " | kept |",
             "|" + "---|" * (len(columns) + 5)]
    for row in rows:
        cells = [f"{row.get('epoch', 0):g}", str(row.get("step", "")), _number(row.get("train_loss")),
                 _number(row.get(loss)), *(_number(row.get(c)) for c in columns), "**kept**" if row is kept else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_metrics_table(metrics: dict, task: Task) -> str:
    """The kept model's metrics on each validation split, as a markdown table."""
    splits = [s for s in task.validation_splits if isinstance(metrics.get(s), dict)]
    if not splits:
        return "_No validation metrics were recorded._"
    columns = _metric_columns([metrics[s] for s in splits], task)
    lines = ["| split | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for split in splits:
        lines.append(f"| {split} | " + " | ".join(_number(metrics[split].get(c)) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- run figures


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_training_curves(metrics: dict, path: Path) -> None:
    """Training and validation loss (left) and the primary metric (right) per epoch."""
    from matplotlib.ticker import MaxNLocator

    rows, primary = metrics["history"], history_key(metrics, metrics["primary_metric"])
    epochs = [row["epoch"] for row in rows]
    figure = new_figure(9, 3.2)
    loss_axes, metric_axes = figure.subplots(1, 2)
    for axes in (loss_axes, metric_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for key, name in (("train_loss", "training loss"), (history_key(metrics, "loss"), "validation loss")):
        points = [(e, row[key]) for e, row in zip(epochs, rows) if row.get(key) is not None]
        if points:
            loss_axes.plot(*zip(*points), marker="o", label=name)
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    if loss_axes.lines:
        loss_axes.legend()
    points = [(e, row[primary]) for e, row in zip(epochs, rows) if row.get(primary) is not None]
    if points:
        metric_axes.plot(*zip(*points), marker="o", color="tab:green")
    kept = kept_row(metrics)
    if kept is not None:
        metric_axes.axvline(kept["epoch"], color="grey", linestyle=":", label=f"kept (epoch {kept['epoch']:g})")
        metric_axes.legend()
    split = metrics.get("primary_split", "validation")
    metric_axes.set(xlabel="epoch", ylabel=metrics["primary_metric"], title=f"{split} {metrics['primary_metric']}")
    figure.savefig(path, dpi=DPI)


def history_key(metrics: dict, name: str) -> str:
    """A metric's name in history rows: prefixed by the primary split where a task has several
    validation splits (MNLI's `validation_matched_accuracy`)."""
    rows = metrics.get("history", [])
    if not rows or any(name in row for row in rows):
        return name
    return f"{metrics.get('primary_split', 'validation')}_{name}"


def plot_confusion_matrices(predictions: dict[str, tuple[list, list]], task: Task, path: Path) -> None:
    """One confusion matrix per validation split, the labels named."""
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    size = 2.2 + 0.6 * task.num_labels
    figure = new_figure(size * len(predictions), size)
    axes = np.atleast_1d(figure.subplots(1, len(predictions)))
    for ax, (split, (labels, logits)) in zip(axes, predictions.items()):
        predicted = np.asarray(logits).argmax(axis=1)
        matrix = confusion_matrix(labels, predicted, labels=list(range(task.num_labels)))
        ConfusionMatrixDisplay(matrix, display_labels=list(task.label_names)).plot(ax=ax, colorbar=False, values_format="d")
        ax.set_title(split)
    figure.savefig(path, dpi=DPI)


def plot_predictions_vs_labels(predictions: dict[str, tuple[list, list]], path: Path) -> None:
    """Regression: each validation example's predicted score against its true one."""
    figure = new_figure(4.2 * len(predictions), 4)
    axes = figure.subplots(1, len(predictions), squeeze=False)[0]
    for ax, (split, (labels, logits)) in zip(axes, predictions.items()):
        predicted = [row[0] for row in logits]
        ax.scatter(labels, predicted, s=8, alpha=0.5)
        low, high = min(labels + predicted), max(labels + predicted)
        ax.plot([low, high], [low, high], color="grey", linestyle=":", label="predicted = true")
        ax.set(xlabel="true score", ylabel="predicted score", title=split)
        ax.legend()
    figure.savefig(path, dpi=DPI)
