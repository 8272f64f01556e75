"""`gluetune report`: report.md and small PNG figures for a finished run, a sweep or a search.

A run's report shows training loss and the primary metric per epoch, the validation confusion
matrix (or, for regression, predicted against true scores), the per-epoch table, the final
metrics and which epoch was kept. A sweep's report shows every seed's primary metric per
setting, with the median, and the summary table. A search's report shows each trial's score in
the order they ran, every trial's metric per evaluation (pruned ones cut short), the parameters'
importances, the trial table and the confirmation of the best trial(s).

Figures are drawn on `matplotlib.figure.Figure` objects rendered by Agg: headless, and without
touching pyplot's global state or backend in the caller's process.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from . import rundir, search_results
from .arguments import lower_is_better
from .config import CONFIG_FILENAME, load_saved_config
from .errors import UserError
from .files import atomic_write_text
from .metrics import read_metrics
from .summary import SUMMARY_CSV, markdown_table, read_summary, read_table, seed_scores
from .tasks import Task

logger = logging.getLogger("gluetune")

REPORT_FILENAME = "report.md"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
SCATTER_PNG = "predictions_vs_labels.png"
SWEEP_PNG = "sweep.png"
PREDICTIONS_FILENAME = "validation_predictions.jsonl"
SWEEP_SUMMARY = SUMMARY_CSV
DPI = 100  # small files; the figures are read on screen
_NOT_METRICS = ("epoch", "step", "train_loss", "loss", "predicted_classes")


def write_report(folder: str | Path) -> Path:
    """Write `folder`/report.md and its figures; `folder` is a finished run or a sweep folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"report: folder not found: {folder}")
    if (folder / search_results.TRIALS_CSV).is_file():
        return write_search_report(folder)
    if (folder / SWEEP_SUMMARY).is_file():
        return write_sweep_report(folder)
    if (folder / CONFIG_FILENAME).is_file() and rundir.is_finished(folder):
        return write_run_report(folder)
    raise UserError(f"report: {folder} is neither a finished gluetune run (no {rundir.METRICS_FILENAME}), a "
                    f"sweep folder (no {SWEEP_SUMMARY}) nor a search folder (no {search_results.TRIALS_CSV}); "
                    "expected one of them")


def _figures_possible() -> bool:
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("report figures need matplotlib (pip install matplotlib); writing the tables only")
        return False
    return True


_NO_FIGURES = "_Figures need matplotlib (`pip install matplotlib`)._"


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
    figures = _figures_possible()
    if metrics.get("history"):
        lines += ["", "## Per epoch", ""]
        if figures:
            plot_training_curves(metrics, folder / CURVES_PNG)
            lines += [f"![training loss and {metrics['primary_metric']} per epoch]({CURVES_PNG})", ""]
        lines.append(history_table(metrics, task))
    if predictions:
        lines += ["", "## Validation predictions (the kept model)", ""]
        if not figures:
            lines.append(_NO_FIGURES)
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


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_training_curves(metrics: dict, path: Path) -> None:
    """Training and validation loss (left) and the primary metric (right) per epoch."""
    from matplotlib.ticker import MaxNLocator

    rows, primary = metrics["history"], history_key(metrics, metrics["primary_metric"])
    epochs = [row["epoch"] for row in rows]
    figure = _new_figure(9, 3.2)
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
    figure = _new_figure(size * len(predictions), size)
    axes = np.atleast_1d(figure.subplots(1, len(predictions)))
    for ax, (split, (labels, logits)) in zip(axes, predictions.items()):
        predicted = np.asarray(logits).argmax(axis=1)
        matrix = confusion_matrix(labels, predicted, labels=list(range(task.num_labels)))
        ConfusionMatrixDisplay(matrix, display_labels=list(task.label_names)).plot(ax=ax, colorbar=False, values_format="d")
        ax.set_title(split)
    figure.savefig(path, dpi=DPI)


def plot_predictions_vs_labels(predictions: dict[str, tuple[list, list]], path: Path) -> None:
    """Regression: each validation example's predicted score against its true one."""
    figure = _new_figure(4.2 * len(predictions), 4)
    axes = figure.subplots(1, len(predictions), squeeze=False)[0]
    for ax, (split, (labels, logits)) in zip(axes, predictions.items()):
        predicted = [row[0] for row in logits]
        ax.scatter(labels, predicted, s=8, alpha=0.5)
        low, high = min(labels + predicted), max(labels + predicted)
        ax.plot([low, high], [low, high], color="grey", linestyle=":", label="predicted = true")
        ax.set(xlabel="true score", ylabel="predicted score", title=split)
        ax.legend()
    figure.savefig(path, dpi=DPI)


# ---------------------------------------------------------------- a sweep


def write_sweep_report(folder: Path) -> Path:
    rows = read_summary(folder / SWEEP_SUMMARY)
    metric = rows[0]["metric"]
    lines = [f"# Sweep report: {folder.name}", "",
             f"{len(rows)} setting(s), {metric} on the validation split of each run (`<setting>/seed-<n>/`).", ""]
    if _figures_possible():
        plot_sweep(rows, folder / SWEEP_PNG)
        lines += [f"![{metric} of every seed per setting, with the median]({SWEEP_PNG})", ""]
    else:
        lines += [_NO_FIGURES, ""]
    lines += ["## Summary", "", markdown_table(rows), "## Every seed", "", seeds_table(rows)]
    path = folder / REPORT_FILENAME
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def seeds_table(rows: list[dict]) -> str:
    lines = [f"| setting | {rows[0]['metric']} per seed |", "|---|---|"]
    for row in rows:
        scores = ", ".join(f"seed {seed}: {score:.4f}" for seed, score in seed_scores(row).items())
        lines.append(f"| `{row['setting']}` | {scores} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Every seed's score per setting as points, the median as a bar across them."""
    import statistics

    metric = rows[0]["metric"]
    figure = _new_figure(max(4.0, 1.5 + 1.1 * len(rows)), 3.6)
    ax = figure.subplots()
    for x, row in enumerate(rows):
        scores = list(seed_scores(row).values())
        # spread the seeds a little sideways so equal scores stay visible
        offsets = [0.08 * (i - (len(scores) - 1) / 2) for i in range(len(scores))]
        ax.scatter([x + o for o in offsets], scores, color="tab:blue", s=18, zorder=3,
                   label="seeds" if x == 0 else None)
        if scores:
            ax.hlines(statistics.median(scores), x - 0.3, x + 0.3, color="tab:red", linewidth=2,
                      label="median" if x == 0 else None)
    ax.set_xticks(range(len(rows)), [row["setting"] for row in rows], rotation=20 if len(rows) > 3 else 0, ha="right"
                  if len(rows) > 3 else "center", fontsize=8)
    ax.set(ylabel=metric, title=f"{metric} per setting")
    ax.legend()
    figure.savefig(path, dpi=DPI)


# ---------------------------------------------------------------- a search

SEARCH_HISTORY_PNG = "search_history.png"
SEARCH_CURVES_PNG = "search_curves.png"
IMPORTANCES_PNG = "importances.png"


def write_search_report(folder: Path) -> Path:
    rows = search_results_table(folder)
    metric = rows[0]["metric"]
    found = json.loads((folder / search_results.IMPORTANCES_FILENAME).read_text()) if (
        folder / search_results.IMPORTANCES_FILENAME).is_file() else {}
    counts = {state: sum(r["state"] == state for r in rows) for state in search_results.STATES}
    lines = [f"# Search report: {folder.name}", "",
             f"{len(rows)} trial(s): " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
             + f"; {metric} on the validation split of each trial (`trials/trial-<n>/`).", ""]
    if _figures_possible():
        plot_search_history(rows, folder / SEARCH_HISTORY_PNG)
        plot_search_curves(rows, folder / SEARCH_CURVES_PNG)
        lines += [f"![{metric} of each trial in the order they ran]({SEARCH_HISTORY_PNG})", "",
                  f"![{metric} after each evaluation; pruned trials end early]({SEARCH_CURVES_PNG})", ""]
        if found:
            plot_importances(found, folder / IMPORTANCES_PNG)
            lines += [f"![parameter importances]({IMPORTANCES_PNG})", ""]
    else:
        lines += [_NO_FIGURES, ""]
    lines += ["## Parameter importances (optuna.importance over the complete trials)", ""]
    lines += [f"- `{k}`: {v:.3f}" for k, v in found.items()] or ["_Fewer than 3 complete trials, or no variation._"]
    lines += ["", "## Trials", "", search_results.trials_markdown(rows)]
    confirmation = folder / search_results.CONFIRMATION_FILENAME
    if confirmation.is_file():
        lines += ["## Confirmed over seeds", ""]
        lines += [f"- {search_results.describe_confirmation(e, metric)}" for e in json.loads(confirmation.read_text())]
        lines.append("")
    if (folder / search_results.BEST_CONFIG_FILENAME).is_file():
        lines += [(f"The best setting: `{search_results.BEST_CONFIG_FILENAME}` (`gluetune train --config "
                  f"{search_results.BEST_CONFIG_FILENAME}`)."), ""]
    path = folder / REPORT_FILENAME
    atomic_write_text(path, "\n".join(lines))
    return path


def search_results_table(folder: Path) -> list[dict]:
    rows = read_table(folder / search_results.TRIALS_CSV)
    if not rows or "state" not in rows[0]:
        raise UserError(f"report: {folder / search_results.TRIALS_CSV} is not a gluetune search table; "
                        "expected the trials.csv that `gluetune search` writes")
    return rows


def _curve(row: dict) -> list[float]:
    return [float(v) for v in str(row.get("curve") or "").split(";") if v]


def plot_search_history(rows: list[dict], path: Path) -> None:
    """Each trial's score by trial number (pruned: its last evaluation, hollow), and the best so far."""
    metric = rows[0]["metric"]
    maximize = not lower_is_better(metric)
    figure = _new_figure(6, 3.4)
    ax = figure.subplots()
    ordered = sorted(rows, key=lambda r: r["trial"])
    for state, style in (("complete", {"color": "tab:blue"}), ("pruned", {"facecolors": "none", "edgecolors": "grey"})):
        points = [(r["trial"], r["value"]) for r in ordered if r["state"] == state and r["value"] is not None]
        if points:
            ax.scatter(*zip(*points), s=22, label=state, zorder=3, **style)
    best, steps = None, []
    for r in ordered:
        if r["state"] == "complete" and r["value"] is not None:
            best = r["value"] if best is None else (max if maximize else min)(best, r["value"])
        if best is not None:
            steps.append((r["trial"], best))
    if steps:
        ax.step(*zip(*steps), where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"{metric} per trial")
    ax.legend()
    figure.savefig(path, dpi=DPI)


def plot_search_curves(rows: list[dict], path: Path) -> None:
    metric = rows[0]["metric"]
    figure = _new_figure(6, 3.4)
    ax = figure.subplots()
    for r in sorted(rows, key=lambda r: r["trial"]):
        curve = _curve(r)
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, alpha=0.8,
                    linestyle="--" if r["state"] == "pruned" else "-", label=f"trial {r['trial']}" if len(rows) <= 10 else None)
    ax.set(xlabel="evaluation (epoch)", ylabel=metric, title=f"{metric} per evaluation (dashed: pruned)")
    if len(rows) <= 10 and ax.lines:
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=DPI)


def plot_importances(found: dict[str, float], path: Path) -> None:
    figure = _new_figure(6, 1.2 + 0.4 * len(found))
    ax = figure.subplots()
    names = list(found)[::-1]
    ax.barh(names, [found[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance", title="parameter importances")
    figure.savefig(path, dpi=DPI)
