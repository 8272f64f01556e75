"""The summaries sweeps and searches share: one line per finished run, the per-setting table over
seeds (median, mean, std, min, max) as CSV and markdown, and reading a summary back typed.

`sweep`, `search` and `report` all import this module; it imports none of them.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from ..config.arguments import lower_is_better
from ..errors import UserError
from ..files import atomic_write_text
from ..results import rundir
from ..results.metrics import primary_values
from ..results.rundir import read_metrics

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


def describe_run(folder: Path) -> str:
    metrics = read_metrics(folder)
    primary = metrics["primary_metric"]
    values = primary_values(metrics)
    text = f"{primary} {values[primary]:.4f}"
    if "accuracy" in values:
        text += f", accuracy {values['accuracy']:.4f}"
    if values.get("predicted_classes") == 1:
        text += " (DEGENERATE: one class predicted for every validation example)"
    return text


def _best_epoch(folder: Path, metrics: dict) -> float | None:
    name = metrics.get("best_checkpoint")
    state = folder / name / "trainer_state.json" if name else None
    if state and state.is_file():
        return json.loads(state.read_text()).get("epoch")
    return None


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarize(sweep_dir: Path, settings: list, seeds: list[int]) -> list[dict]:
    """One row per setting (anything with a `.name`: its folder in `sweep_dir`) over its finished seeds
    (`seed-<n>`); the best median of the primary metric is marked (the lowest for a loss or mse)."""
    rows = []
    for setting in settings:
        finished = []
        for seed in seeds:
            folder = sweep_dir / setting.name / f"seed-{seed}"
            if rundir.is_finished(folder):
                finished.append((seed, folder, read_metrics(folder)))
        if not finished:
            continue
        primary = finished[0][2]["primary_metric"]
        values = [primary_values(m) for _, _, m in finished]
        scores = [v[primary] for v in values]
        accuracies = [v.get("accuracy", float("nan")) for v in values]
        epochs = [e for e in (_best_epoch(f, m) for _, f, m in finished) if e is not None]
        row = {"setting": setting.name, "metric": primary, "seeds": len(finished)}
        row.update({f"{primary}_{k}": v for k, v in stats(scores).items()})
        row.update({f"accuracy_{k}": v for k, v in stats(accuracies).items()})
        row["best_epoch_median"] = statistics.median(epochs) if epochs else None
        row["degenerate_runs"] = sum(1 for v in values if v.get("predicted_classes") == 1)
        row["per_seed"] = ";".join(f"{seed}:{score:.4f}" for (seed, _, _), score in zip(finished, scores))
        rows.append(row)
    if rows:
        key = f"{rows[0]['metric']}_median"
        # the metric's own direction, as the runs choose their best checkpoint (a loss or mse: lowest)
        best = (min if lower_is_better(rows[0]["metric"]) else max)(rows, key=lambda r: r[key])
        for row in rows:
            row["best"] = row is best
    return rows


def write_summary(sweep_dir: Path, rows: list[dict]) -> None:
    if rows:
        write_table(sweep_dir, rows, SUMMARY_CSV, SUMMARY_MD, markdown_table(rows))


def write_table(folder: Path, rows: list[dict], csv_name: str, md_name: str, markdown: str) -> None:
    """`rows` as CSV (every key a column) and their markdown table, each written whole."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / csv_name, buffer.getvalue())
    atomic_write_text(folder / md_name, markdown)


def markdown_table(rows: list[dict]) -> str:
    metric = rows[0]["metric"]
    header = (f"| setting | seeds | {metric} median | mean ± std | min | max | accuracy median | "
              "best epoch (median) | degenerate runs |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        mark = " **(best)**" if r["best"] else ""
        epoch = "" if r["best_epoch_median"] is None else f"{r['best_epoch_median']:g}"
        lines.append(
            f"| `{r['setting']}`{mark} | {r['seeds']} | {r[f'{metric}_median']:.4f} | "
            f"{r[f'{metric}_mean']:.4f} ± {r[f'{metric}_std']:.4f} | {r[f'{metric}_min']:.4f} | "
            f"{r[f'{metric}_max']:.4f} | {r['accuracy_median']:.4f} | {epoch} | {r['degenerate_runs']} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- reading a summary back

_SWEEP_COLUMNS = ("setting", "metric", "seeds", "per_seed", "best", "accuracy_median", "best_epoch_median",
                  "degenerate_runs")
_SWEEP_STATS = ("median", "mean", "std", "min", "max")


def read_summary(path: Path) -> list[dict]:
    """The rows of a sweep's summary.csv, values typed as `summarize` made them."""
    rows = read_table(path)
    needed = [*_SWEEP_COLUMNS, *(f"{rows[0].get('metric')}_{s}" for s in _SWEEP_STATS)] if rows else _SWEEP_COLUMNS
    missing = [c for c in needed if not rows or c not in rows[0]]
    if missing:
        raise UserError(f"report: {path} is not a gluetune sweep summary (no rows, or no column {missing[0]}); "
                        "expected the summary.csv that `gluetune sweep` writes")
    return rows


def read_table(path: Path) -> list[dict]:
    """The rows of a CSV that `write_table` wrote, each value typed back (int, float, bool, None, text)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{key: _typed(value) for key, value in row.items()} for row in csv.DictReader(f)]


def _typed(text: str):
    if text in ("", None):
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def seed_scores(row: dict) -> dict[int, float]:
    """The per_seed column `1:0.3716;2:0.3989` as {seed: score}."""
    scores = {}
    for item in filter(None, str(row["per_seed"] or "").split(";")):
        seed, score = item.split(":", 1)
        scores[int(seed)] = float(score)
    return scores
