"""What a search leaves people to act on, whichever engine ran it (Optuna or Ray Tune):

- `trials/trial-<n>/trial.json`: the trial's parameters, state (complete, pruned, failed), score,
  the metric after each evaluation, and why it ended (a pruned trial says so here and in its log);
- `trials.csv` / `trials.md`: one row per trial, the best first (summary.write_table, as sweeps);
- `importances.json`: each parameter's importance (optuna.importance) over the complete trials;
- `best_config.yaml`: the winning trial's config, which `gluetune train --config` runs as is;
- `confirm/`: the best trial(s) again over several seeds, a sweep (its summary.csv), and
  `confirmation.json`: how far the confirmed median lies from the trial's own score.
"""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..config.reading import yaml_value
from ..config.run import CONFIG_FILENAME
from ..files import atomic_write_json, atomic_write_text
from .runner import LOG_FILENAME
from .summary import seed_scores, write_table

TRIAL_FILENAME = "trial.json"
TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
IMPORTANCES_FILENAME = "importances.json"
BEST_CONFIG_FILENAME = "best_config.yaml"
CONFIRM_DIR = "confirm"
CONFIRMATION_FILENAME = "confirmation.json"
STATES = ("complete", "pruned", "failed", "running")


@dataclass
class TrialRecord:
    number: int
    params: dict  # {section.key: config value}
    folder: str
    engine: str
    study_trial: int | None = None  # the engine's own id of the latest attempt (Optuna number, Ray trial id)
    state: str = "running"
    value: float | None = None  # a complete trial's kept-model score; a pruned one's last evaluation
    curve: list = field(default_factory=list)  # the metric after each evaluation
    seconds: float | None = None
    reason: str = ""

    @property
    def setting(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())

    def save(self) -> None:
        atomic_write_json(Path(self.folder) / TRIAL_FILENAME, asdict(self))

    def finish(self, state: str, value: float | None, seconds: float, reason: str) -> None:
        self.state, self.value, self.seconds, self.reason = state, value, round(seconds, 1), reason
        self.save()
        if reason:  # the run's own log says how it ended, beside "stopped by signal 15"
            self.log(reason)

    def log(self, text: str) -> None:
        """A line in the run's own log, from the search."""
        with open(Path(self.folder) / LOG_FILENAME, "a") as log:
            log.write(f"[gluetune] search: trial {self.number} {text}\n")

    @classmethod
    def read(cls, folder: Path) -> TrialRecord:
        return cls(**json.loads((Path(folder) / TRIAL_FILENAME).read_text()))


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else yaml_value(value)


def read_trials(search_dir: Path) -> list[TrialRecord]:
    folders = sorted(Path(search_dir).glob(f"trials/trial-*/{TRIAL_FILENAME}"),
                     key=lambda p: int(p.parent.name.removeprefix("trial-")))
    return [TrialRecord.read(p.parent) for p in folders]


def ranked(trials: list[TrialRecord], maximize: bool) -> list[TrialRecord]:
    """Complete trials best first, then pruned ones by their last value, then the rest."""
    def key(t: TrialRecord):
        value = t.value if t.value is not None else float("-inf" if maximize else "inf")
        return (STATES.index(t.state), -value if maximize else value, t.number)

    return sorted(trials, key=key)


def trial_rows(trials: list[TrialRecord], metric: str) -> list[dict]:
    """The table's rows, one per trial, from trials ranked best first (`ranked`)."""
    best = trials[0] if trials and trials[0].state == "complete" else None
    return [{"trial": t.number, "state": t.state, "metric": metric, "value": t.value, "evaluations": len(t.curve),
             "curve": ";".join(f"{v:.4f}" for v in t.curve if v is not None), "seconds": t.seconds, "best": t is best,
             **{f"param:{k}": v for k, v in t.params.items()}, "setting": t.setting, "reason": t.reason}
            for t in trials]


def trials_markdown(rows: list[dict]) -> str:
    metric = rows[0]["metric"]
    lines = [f"| trial | state | {metric} | evaluations | seconds | setting |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        mark = " **(best)**" if r["best"] else ""
        lines.append(f"| {r['trial']}{mark} | {r['state']} | {value} | {r['evaluations']} | {seconds} | "
                     f"`{r['setting']}` |")
    return "\n".join(lines) + "\n"


def importances(trials: list[TrialRecord], space, maximize: bool) -> dict[str, float]:
    """Each parameter's importance to the complete trials' scores (optuna.importance's default
    evaluator, PED-ANOVA in Optuna 5), from the trial records, so Ray searches get the same figure;
    {} with fewer than 3 complete trials."""
    import optuna

    complete = [t for t in trials if t.state == "complete" and t.value is not None]
    if len(complete) < 3:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if maximize else "minimize")
    distributions = {p.key: p.distribution() for p in space.parameters}
    for t in complete:
        params = space.sampled(t.params)
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: distributions[k] for k in params},
                                                  value=t.value))
    try:
        with warnings.catch_warnings():  # "importances will be equal" for a single parameter: that is the answer
            warnings.simplefilter("ignore", UserWarning)
            found = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # every trial with the same values: nothing to apportion
        return {}
    # most important first; ties by name (the order must not depend on the machine that computes it)
    return dict(sorted(((k, float(v)) for k, v in found.items()), key=lambda kv: (-kv[1], kv[0])))


def write_best_config(search_dir: Path, best: TrialRecord, config_of) -> Path:
    """The best trial's resolved config, writing to `<search_dir>/best` instead of the trial's folder:
    read from the trial's folder, or made by `config_of(best)` where the folder is on another machine."""
    saved = Path(best.folder) / CONFIG_FILENAME
    config = yaml.safe_load(saved.read_text()) if saved.is_file() else config_of(best)
    out = (Path(search_dir) / "best").resolve()
    config["training"]["output_dir"] = str(out)
    config["training"]["logging_dir"] = str(out / "logs")
    header = (f"# The best trial of the search in {Path(search_dir).resolve()}: trial {best.number} "
              f"({best.setting}), score {best.value:.4f}\n# gluetune train --config {BEST_CONFIG_FILENAME}\n")
    path = Path(search_dir) / BEST_CONFIG_FILENAME
    atomic_write_text(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def write_results(search_dir: Path, metric: str, maximize: bool, space, records: list[TrialRecord],
                  config_of) -> list[dict]:
    """trials.csv/.md, importances.json and best_config.yaml from `records`; the table's rows."""
    trials = ranked(records, maximize)
    if not trials:
        return []
    rows = trial_rows(trials, metric)
    write_table(Path(search_dir), rows, TRIALS_CSV, TRIALS_MD, trials_markdown(rows))
    atomic_write_json(Path(search_dir) / IMPORTANCES_FILENAME, importances(trials, space, maximize))
    if trials[0].state == "complete":  # ranked: the best complete trial first
        write_best_config(search_dir, trials[0], config_of)
    return rows


def best_trials(records: list[TrialRecord], maximize: bool, count: int) -> list[TrialRecord]:
    return [t for t in ranked(records, maximize) if t.state == "complete"][:count]


def confirmation(trial: TrialRecord, row: dict) -> dict:
    """A confirmed trial against its own score: the sweep row of its seeds."""
    by_seed = seed_scores(row)
    scores = list(by_seed.values())
    median = statistics.median(scores)
    return {"trial": trial.number, "setting": trial.setting, "searched": trial.value, "seeds": list(by_seed),
            "scores": scores, "median": median, "difference": median - trial.value}


def describe_confirmation(entry: dict, metric: str) -> str:
    return (f"trial {entry['trial']} ({entry['setting']}): {metric} {entry['searched']:.4f} in the search; "
            f"median {entry['median']:.4f} over seeds {','.join(map(str, entry['seeds']))} "
            f"({', '.join(f'{s:.4f}' for s in entry['scores'])}): difference {entry['difference']:+.4f}")
