"""Sweeps: one config over several seeds and a small grid of `--set` values, summarised honestly.

Each run is a normal `gluetune train` in its own process and folder
(`<sweep_dir>/<setting>/seed-<n>`), started with `--resume`: a finished run is skipped and a
killed one continues, so re-running a sweep command finishes what is missing. The summary
gives, per setting, the median (what papers report), mean, std, min and max over seeds.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config.reading import parse_yaml, yaml_value
from ..config.run import check_same_settings, load_config
from ..console import bar
from ..errors import UserError
from ..results import rundir
from ..results.metrics import primary_values
from ..results.rundir import read_metrics
from .report import write_report
from .runner import RunProcess, raise_interrupt, shared_cores_env
from .summary import SUMMARY_CSV, SUMMARY_MD, describe_run, markdown_table, summarize, write_summary

__all__ = ["SUMMARY_CSV", "SUMMARY_MD", "markdown_table", "parse_grid", "parse_seeds", "run_sweep", "summarize",
           "write_summary"]

logger = logging.getLogger("gluetune")

RECORD_FILENAME = rundir.RECORD_FILENAME


@dataclass
class Setting:
    overrides: list[str]  # the grid's `section.key=value` items for this setting
    name: str = field(init=False)

    def __post_init__(self):
        self.name = setting_name(self.overrides)


def setting_name(overrides: list[str]) -> str:
    """A folder name for a setting: `learning_rate=1e-3,lora_r=16`, lists joined by `+`
    (`modules_to_save=pooler+LayerNorm`); `default` without a grid."""
    if not overrides:
        return "default"
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        if value.strip().startswith("["):
            value = "+".join(str(v) for v in parse_yaml(value, f"--grid {key}") or [])
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "_", ",".join(parts))


def parse_grid(items: list[str]) -> list[Setting]:
    """`--grid training.learning_rate=1e-3,2e-3 --grid peft.lora_r=8,16` -> the cartesian product.

    Values that hold commas themselves are given as a YAML list: `peft.target_modules=[[query], [query, value]]`.
    """
    axes = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid {item!r}: expected section.key=value1,value2,...")
        key, values = item.split("=", 1)
        if values.strip().startswith("["):
            parsed = parse_yaml(values, f"--grid {key}")
            if not isinstance(parsed, list):
                raise UserError(f"--grid {item!r}: expected a YAML list of values")
            choices = [yaml_value(v) for v in parsed]
        else:
            choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise UserError(f"--grid {item!r}: no values")
        axes.append([f"{key.strip()}={v}" for v in choices])
    return [Setting(list(combo)) for combo in itertools.product(*axes)] if axes else [Setting([])]


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """Distinct integers separated by commas, as `flag` (--seeds, --confirm_seeds) takes them."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"{flag} {text!r}: expected distinct integers, e.g. 1,2,3")
    return seeds


@dataclass
class Run:
    setting: Setting
    seed: int
    folder: Path

    def overrides(self, base: list[str]) -> list[str]:
        return [*base, *self.setting.overrides, f"training.seed={self.seed}", f"training.output_dir={self.folder}"]


def plan(sweep_dir: Path, settings: list[Setting], seeds: list[int]) -> list[Run]:
    return [Run(s, seed, sweep_dir / s.name / f"seed-{seed}") for s in settings for seed in seeds]


def run_sweep(config_path: str, base_overrides: list[str], settings: list[Setting], seeds: list[int],
              sweep_dir: Path, jobs: int = 1) -> list[dict]:
    """Run every (setting, seed) not finished yet, then write and return the summary rows."""
    runs = plan(sweep_dir, settings, seeds)
    for run in runs:  # validate every combination before the first run starts
        config = load_config(config_path, run.overrides(base_overrides))
        # a finished (or killed) run of this folder must have been made with these settings
        check_same_settings(run.folder, config, "gluetune sweep")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    failures = _execute(runs, config_path, base_overrides, jobs)
    rows = summarize(sweep_dir, settings, seeds)
    write_summary(sweep_dir, rows)
    if rows:
        write_report(sweep_dir)  # the figure of every seed per setting, and report.md
    if failures:
        raise UserError(
            f"{len(failures)} of {len(runs)} runs failed (see their train.log, e.g. {failures[0].folder / 'train.log'}); "
            "the summary covers the finished ones; run the same command again to retry"
        )
    return rows


def _execute(runs: list[Run], config_path: str, base_overrides: list[str], jobs: int) -> list[Run]:
    """Run the unfinished runs, `jobs` at a time, with a progress line each; returns the failed ones.

    Each training runs in its own session, so a Ctrl-C or SIGTERM reaches the sweep alone, which
    passes one SIGTERM on: the trainings save a checkpoint, and the next sweep command resumes them.
    """
    running: list[tuple[int, Run, RunProcess]] = []
    failures: list[Run] = []
    overall = bar(total=len(runs), desc="sweep", unit="run", leave=True)

    def say(message: str, warning: bool = False) -> None:
        if not overall.disable:
            overall.write(f"[gluetune] {message}", file=sys.stderr)
        else:
            (logger.warning if warning else logger.info)("%s", message)

    def wait_for_one():
        while True:
            for entry in running:
                index, run, process = entry
                code = process.poll()
                if code is None:
                    continue
                running.remove(entry)
                label = f"[{index}/{len(runs)}] {run.setting.name} seed {run.seed}"
                if code == 0:
                    say(f"{label}: {describe_run(run.folder)} ({process.seconds:.0f} s)")
                else:
                    failures.append(run)
                    say(f"{label}: failed (exit {code}): {process.last_log_line()}", warning=True)
                overall.update(1)
                return
            if not overall.disable:  # each running run's last logged step, from its train.log
                overall.set_postfix_str(", ".join(f"seed {r.seed} {p.last_step()}" for _, r, p in running))
            time.sleep(0.5)

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        for index, run in enumerate(runs, start=1):
            if rundir.is_finished(run.folder):
                say(f"[{index}/{len(runs)}] {run.setting.name} seed {run.seed}: done before, {describe_run(run.folder)}")
                overall.update(1)
                continue
            while len(running) >= jobs:
                wait_for_one()
            process = RunProcess.start(config_path, run.overrides(base_overrides), run.folder, shared_cores_env(jobs))
            running.append((index, run, process))
            if overall.disable:
                logger.info("[%d/%d] %s seed %d: started (log: %s)", index, len(runs), run.setting.name, run.seed,
                            run.folder / "train.log")
        while running:
            wait_for_one()
    except KeyboardInterrupt:
        for _, _, process in running:
            process.process.send_signal(signal.SIGTERM)
        for _, run, process in running:
            process.wait()
            logger.warning("%s seed %d: stopped with a checkpoint; run the sweep again to resume it",
                           run.setting.name, run.seed)
        raise
    finally:
        overall.close()
        signal.signal(signal.SIGTERM, previous)
    return failures


# ---------------------------------------------------------------- re-running a row from its records


def rerun_setting(sweep_dir: Path, setting: str, target_dir: Path) -> list[tuple[int, float, float]]:
    """Train a summary row's runs again from their records; (seed, recorded, reproduced) per run."""
    folder = sweep_dir / setting
    seed_dirs = sorted(p for p in folder.glob("seed-*") if (p / RECORD_FILENAME).is_file())
    if not seed_dirs:
        known = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else []
        raise UserError(f"no recorded runs for setting '{setting}' in {sweep_dir} (settings: {', '.join(known) or 'none'})")
    results = []
    for seed_dir in seed_dirs:
        record = json.loads((seed_dir / RECORD_FILENAME).read_text())
        config_file = seed_dir / "resolved_config.yaml"
        out = target_dir / setting / seed_dir.name
        cmd = [sys.executable, "-m", "gluetune", "train", "--config", str(config_file), "--resume",
               "--set", f"training.output_dir={out}", "--set", f"training.logging_dir={out / 'logs'}"]
        code = subprocess.run(cmd, check=False).returncode
        if code != 0:
            raise UserError(f"re-running {seed_dir} failed (exit {code})")
        recorded, reproduced = (read_metrics(d) for d in (seed_dir, out))
        new_record = json.loads((out / RECORD_FILENAME).read_text())
        if new_record["data_files"] != record["data_files"]:
            logger.warning("%s: the data files differ from the recorded ones (sha256)", out)
        primary = recorded["primary_metric"]
        results.append((record["seed"], primary_values(recorded)[primary],
                        primary_values(reproduced)[primary]))
    return results
