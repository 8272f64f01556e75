"""Evaluation across tasks: validation metrics of several output folders as one GLUE table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config.run import RunConfig
from ..config.tasks import GLUE_TASKS, Task
from ..data.loading import load_splits
from .metrics import task_metrics, task_score
from .prediction import Classifier


@dataclass
class TaskResult:
    folder: Path
    task: Task
    splits: dict[str, dict[str, float]]  # validation split -> metrics

    @property
    def score(self) -> float:
        return task_score(self.task, self.splits)


def evaluate_folder(folder: str | Path, overrides: list[str] | None = None, batch_size: int = 64) -> tuple[RunConfig, dict]:
    """Validation metrics of a trained folder, computed afresh: {split: {metric: value}}."""
    classifier = Classifier.from_folder(folder, overrides=overrides, batch_size=batch_size)
    config = classifier.config
    results = {}
    splits = list(config.task.validation_splits)
    for split, ds in load_splits(config, splits).items():
        texts = list(zip(*(ds[c] for c in config.task.text_columns)))
        results[split] = task_metrics(config.task, ds["label"], classifier.logits(texts))
    return config, results


def evaluate_folders(folders: list[str | Path], overrides: list[str] | None = None, batch_size: int = 64) -> list[TaskResult]:
    results = []
    for folder in folders:
        config, splits = evaluate_folder(folder, overrides, batch_size=batch_size)
        results.append(TaskResult(Path(folder), config.task, splits))
    return results


def glue_average(results: list[TaskResult]) -> tuple[float | None, str]:
    """The mean GLUE score over the GLUE tasks present, and what it averaged (or why none)."""
    glue = [r for r in results if r.task.name in GLUE_TASKS]
    names = [r.task.name for r in glue]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        # Two runs of one task (seeds, variants) are compared row by row; an average would count it twice.
        return None, f"no GLUE average: more than one folder for {', '.join(twice)}"
    if not glue:
        return None, "no GLUE average: no GLUE task among the folders"
    average = sum(r.score for r in glue) / len(glue)
    return average, f"GLUE average over {len(glue)} task(s) ({', '.join(names)})"


def _metrics_cells(result: TaskResult) -> tuple[str, str]:
    """The task's GLUE metrics and their values, leaderboard style: "accuracy/f1", "0.8500/0.8900";
    a task with several validation splits (MNLI) lists each split's values in turn."""
    metrics = result.task.score_metrics
    label = "/".join(metrics)
    if len(result.splits) > 1:
        label += " (" + "/".join(split.removeprefix("validation_") for split in result.splits) + ")"
    values = "/".join(f"{result.splits[split][m]:.4f}" for split in result.splits for m in metrics)
    return label, values


def glue_table(results: list[TaskResult]) -> str:
    """One row per folder (task, its GLUE metrics, its score, the folder), then the GLUE average."""
    rows = [("task", "metrics", "values", "score", "model")]
    for result in results:
        rows.append((result.task.name, *_metrics_cells(result), f"{result.score:.4f}", str(result.folder)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    average, what = glue_average(results)
    lines.append(f"{what}: {average:.4f}" if average is not None else what)
    return "\n".join(lines)
