"""Task metrics from predictions (scikit-learn / scipy), and GLUE's per-task score."""

from __future__ import annotations

import numpy as np

from .tasks import Task


def classification_metrics(labels, predictions, num_labels: int) -> dict[str, float]:
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        matthews_corrcoef,
        precision_score,
        recall_score,
    )

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
