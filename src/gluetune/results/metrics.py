"""Task metrics from predictions (scikit-learn / scipy), GLUE's per-task score, a run's history."""

from __future__ import annotations

import numpy as np

from ..config.tasks import Task


def classification_metrics(labels, predictions, num_labels: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, precision_score, recall_score

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    # Binary tasks report the positive class (label 1), as GLUE does for MRPC/QQP F1.
    average = "binary" if num_labels == 2 else "macro"
    metrics = {
        "matthews_correlation": float(matthews_corrcoef(labels, predictions)),
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average=average, zero_division=0)),
        "precision": float(precision_score(labels, predictions, average=average, zero_division=0)),
        "recall": float(recall_score(labels, predictions, average=average, zero_division=0)),
    }
    if num_labels > 2:
        metrics["f1_macro"] = metrics["f1"]
    # How many distinct classes the model predicted: 1 means a degenerate (single-class) model.
    metrics["predicted_classes"] = len(np.unique(predictions))
    return metrics


def regression_metrics(labels, predictions) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    labels, predictions = np.asarray(labels, dtype=float), np.asarray(predictions, dtype=float)
    constant = np.ptp(predictions) == 0 or np.ptp(labels) == 0
    pearson = 0.0 if constant else float(pearsonr(predictions, labels)[0])
    spearman = 0.0 if constant else float(spearmanr(predictions, labels)[0])
    return {
        "pearson": pearson,
        "spearmanr": spearman,
        "combined_score": (pearson + spearman) / 2,
        "mse": float(np.mean((predictions - labels) ** 2)),
    }


def predictions_from_logits(logits, task: Task):
    logits = np.asarray(logits)
    if task.is_regression:
        return logits.reshape(-1)
    return logits.argmax(axis=-1)


def task_metrics(task: Task, labels, logits) -> dict[str, float]:
    predictions = predictions_from_logits(logits, task)
    if task.is_regression:
        return regression_metrics(labels, predictions)
    metrics = classification_metrics(labels, predictions, task.num_labels)
    if "combined_score" in task.metrics:  # GLUE's score for MRPC and QQP: (accuracy + F1) / 2
        metrics["combined_score"] = (metrics["accuracy"] + metrics["f1"]) / 2
    return metrics


def glue_score(task: Task, metrics: dict[str, float]) -> float:
    """GLUE's one number for a task on one split: the mean of the task's GLUE metrics (MCC for
    CoLA, (acc+F1)/2 for MRPC and QQP, (Pearson+Spearman)/2 for STS-B, accuracy otherwise)."""
    return float(np.mean([metrics[m] for m in task.score_metrics]))


def task_score(task: Task, results: dict[str, dict[str, float]]) -> float:
    """A task's GLUE score over its validation splits ({split: metrics}): MNLI counts once, as
    the mean of matched and mismatched, as on the GLUE leaderboard."""
    return float(np.mean([glue_score(task, metrics) for metrics in results.values()]))


def trainer_metrics_fn(task: Task):
    """`compute_metrics` for the Hugging Face Trainer."""

    def compute(eval_prediction):
        logits = eval_prediction.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        return task_metrics(task, eval_prediction.label_ids, logits)

    return compute


# ---------------------------------------------------------------- a run's metrics.json (results.rundir reads it)


def primary_values(metrics: dict) -> dict:
    """The validation metrics that select the best checkpoint (MNLI: the matched split)."""
    return metrics[metrics["primary_split"]]


# ---------------------------------------------------------------- a run's history (Trainer log_history)

TIMING_KEYS = {"runtime", "samples_per_second", "steps_per_second", "epoch"}


def train_loss_of(log_history: list[dict]) -> float | None:
    """The whole run's mean training loss: the logged losses, each weighted by the steps it covers.

    callbacks.CompleteLossLog logs before every checkpoint and at the last step, so the history
    a resumed run carries on covers every step, whichever way the run got there.
    """
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else None


def epoch_history(log_history: list[dict]) -> list[dict]:
    """One row per evaluation: epoch, step, the mean training loss since the previous evaluation,
    and the evaluation's metrics (without their `eval_` prefix)."""
    rows, total, steps, previous = [], 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
        elif any(k.startswith("eval_") for k in entry):
            row = {"epoch": round(entry.get("epoch", 0.0), 4), "step": entry.get("step"),
                   "train_loss": total / steps if steps else None}
            row.update({k.removeprefix("eval_"): v for k, v in entry.items()
                        if k.startswith("eval_") and k.removeprefix("eval_") not in TIMING_KEYS})
            rows.append(row)
            total, steps = 0.0, 0
    return rows


def epoch_of_step(history: list[dict], step: int | None) -> float | None:
    """The epoch of the evaluation at `step` (that of a checkpoint)."""
    for row in history:
        if row["step"] == step:
            return row["epoch"]
    return None
