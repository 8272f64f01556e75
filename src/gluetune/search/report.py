"""`gluetune report`: report.md and small PNG figures for a finished run, a sweep or a search.

A sweep's report shows every seed's primary metric per setting, with the median, and the summary
table. A search's report shows each trial's score in the order they ran, every trial's metric per
evaluation (pruned ones cut short), the parameters' importances, the trial table and the
confirmation of the best trial(s). A run's own report is results.report's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config.arguments import lower_is_better
from ..config.run import CONFIG_FILENAME
from ..errors import UserError
from ..files import atomic_write_text
from ..results import rundir
from ..results.report import DPI, NO_FIGURES, REPORT_FILENAME, figures_possible, new_figure, write_run_report
from . import trials
from .summary import SUMMARY_CSV, markdown_table, read_summary, read_table, seed_scores

SWEEP_PNG = "sweep.png"


def write_report(folder: str | Path) -> Path:
    """Write `folder`/report.md and its figures; `folder` is a finished run, a sweep or a search folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"report: folder not found: {folder}")
    if (folder / trials.TRIALS_CSV).is_file():
        return write_search_report(folder)
    if (folder / SUMMARY_CSV).is_file():
        return write_sweep_report(folder)
    if (folder / CONFIG_FILENAME).is_file() and rundir.is_finished(folder):
        return write_run_report(folder)
    raise UserError(f"report: {folder} is neither a finished gluetune run (no {rundir.METRICS_FILENAME}), a "
                    f"sweep folder (no {SUMMARY_CSV}) nor a search folder (no {trials.TRIALS_CSV}); "
                    "expected one of them")


# ---------------------------------------------------------------- a sweep


def write_sweep_report(folder: Path) -> Path:
    rows = read_summary(folder / SUMMARY_CSV)
    metric = rows[0]["metric"]
    lines = [f"# Sweep report: {folder.name}", "",
             f"{len(rows)} setting(s), {metric} on the validation split of each run (`<setting>/seed-<n>/`).", ""]
    if figures_possible():
        plot_sweep(rows, folder / SWEEP_PNG)
        lines += [f"![{metric} of every seed per setting, with the median]({SWEEP_PNG})", ""]
    else:
        lines += [NO_FIGURES, ""]
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
    figure = new_figure(max(4.0, 1.5 + 1.1 * len(rows)), 3.6)
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
    found = json.loads((folder / trials.IMPORTANCES_FILENAME).read_text()) if (
        folder / trials.IMPORTANCES_FILENAME).is_file() else {}
    counts = {state: sum(r["state"] == state for r in rows) for state in trials.STATES}
    lines = [f"# Search report: {folder.name}", "",
             f"{len(rows)} trial(s): " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
             + f"; {metric} on the validation split of each trial (`trials/trial-<n>/`).", ""]
    if figures_possible():
        plot_search_history(rows, folder / SEARCH_HISTORY_PNG)
        plot_search_curves(rows, folder / SEARCH_CURVES_PNG)
        lines += [f"![{metric} of each trial in the order they ran]({SEARCH_HISTORY_PNG})", "",
                  f"![{metric} after each evaluation; pruned trials end early]({SEARCH_CURVES_PNG})", ""]
        if found:
            plot_importances(found, folder / IMPORTANCES_PNG)
            lines += [f"![parameter importances]({IMPORTANCES_PNG})", ""]
    else:
        lines += [NO_FIGURES, ""]
    lines += ["## Parameter importances (optuna.importance over the complete trials)", ""]
    lines += [f"- `{k}`: {v:.3f}" for k, v in found.items()] or ["_Fewer than 3 complete trials, or no variation._"]
    lines += ["", "## Trials", "", trials.trials_markdown(rows)]
    confirmation = folder / trials.CONFIRMATION_FILENAME
    if confirmation.is_file():
        lines += ["## Confirmed over seeds", ""]
        lines += [f"- {trials.describe_confirmation(e, metric)}" for e in json.loads(confirmation.read_text())]
        lines.append("")
    if (folder / trials.BEST_CONFIG_FILENAME).is_file():
        lines += [(f"The best setting: `{trials.BEST_CONFIG_FILENAME}` (`gluetune train --config "
                  f"{trials.BEST_CONFIG_FILENAME}`)."), ""]
    path = folder / REPORT_FILENAME
    atomic_write_text(path, "\n".join(lines))
    return path


def search_results_table(folder: Path) -> list[dict]:
    rows = read_table(folder / trials.TRIALS_CSV)
    if not rows or "state" not in rows[0]:
        raise UserError(f"report: {folder / trials.TRIALS_CSV} is not a gluetune search table; "
                        "expected the trials.csv that `gluetune search` writes")
    return rows


def _curve(row: dict) -> list[float]:
    return [float(v) for v in str(row.get("curve") or "").split(";") if v]


def plot_search_history(rows: list[dict], path: Path) -> None:
    """Each trial's score by trial number (pruned: its last evaluation, hollow), and the best so far."""
    metric = rows[0]["metric"]
    maximize = not lower_is_better(metric)
    figure = new_figure(6, 3.4)
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
    figure = new_figure(6, 3.4)
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
    figure = new_figure(6, 1.2 + 0.4 * len(found))
    ax = figure.subplots()
    names = list(found)[::-1]
    ax.barh(names, [found[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance", title="parameter importances")
    figure.savefig(path, dpi=DPI)
