"""Sweeps: folder layout, summary figures checked by hand, resuming, degenerate runs, re-runs."""

from __future__ import annotations

import csv
import json
import math

import pytest
from conftest import REFERENCE_CONFIG, as_set_args, assert_one_line_error, run_main, tiny_overrides

from gluetune.search.sweep import parse_grid, setting_name


def sweep_args(tiny_qwen, sweep_dir, seeds="1,2", grid=("training.learning_rate=1e-3,5e-3",)):
    base = [o for o in tiny_overrides(tiny_qwen, sweep_dir / "unused", train=32, evals=32) if "output_dir" not in o]
    return ["-m", "gluetune", "sweep", "--config", str(REFERENCE_CONFIG), *as_set_args(base),
            *[arg for g in grid for arg in ("--grid", g)], "--seeds", seeds, "--sweep_dir", str(sweep_dir)]


def primary(folder) -> tuple[float, float]:
    metrics = json.loads((folder / "metrics.json").read_text())["validation"]
    return metrics["matthews_correlation"], metrics["accuracy"]


@pytest.fixture(scope="module")
def half_then_full(tiny_qwen, tmp_path_factory):
    """A sweep stopped after its first seed, then the full command: (first result, second result, dir)."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "lr"
    first = run_main(*sweep_args(tiny_qwen, sweep_dir, seeds="1"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_main(*sweep_args(tiny_qwen, sweep_dir, seeds="1,2"))
    assert second.returncode == 0, second.stderr[-3000:]
    return first, second, sweep_dir


def test_grid_and_setting_names():
    settings = parse_grid(["training.learning_rate=1e-3,2e-3", "peft.lora_r=8,16"])
    assert [s.name for s in settings] == ["learning_rate=1e-3,lora_r=8", "learning_rate=1e-3,lora_r=16",
                                          "learning_rate=2e-3,lora_r=8", "learning_rate=2e-3,lora_r=16"]
    targets = parse_grid(["peft.target_modules=[[query], [query, value]]"])
    assert [s.overrides for s in targets] == [["peft.target_modules=[query]"], ["peft.target_modules=[query, value]"]]
    assert [s.name for s in targets] == ["target_modules=query", "target_modules=query+value"]
    assert setting_name([]) == "default"


def test_sweep_layout_and_progress(half_then_full):
    first, _second, sweep_dir = half_then_full
    for setting in ("learning_rate=1e-3", "learning_rate=5e-3"):
        for seed in (1, 2):
            run = sweep_dir / setting / f"seed-{seed}"
            assert (run / "metrics.json").is_file() and (run / "run_record.json").is_file()
            assert json.loads((run / "run_record.json").read_text())["seed"] == seed
    assert "[1/2] learning_rate=1e-3 seed 1: matthews_correlation" in first.stderr
    assert (sweep_dir / "summary.csv").is_file() and (sweep_dir / "summary.md").is_file()


def test_resumed_sweep_skips_finished_runs(half_then_full):
    _, second, _ = half_then_full
    assert second.stderr.count("done before") == 2
    assert "[2/4] learning_rate=1e-3 seed 2: matthews_correlation" in second.stderr


def test_a_sweep_folder_made_with_other_base_settings_is_refused(tiny_qwen, half_then_full):
    _, _, sweep_dir = half_then_full
    summary = (sweep_dir / "summary.csv").read_text()
    other = run_main(*sweep_args(tiny_qwen, sweep_dir), "--set", "training.weight_decay=0.1")
    assert_one_line_error(other, "other settings", "training.weight_decay")
    assert (sweep_dir / "summary.csv").read_text() == summary


def test_summary_figures_match_the_runs(half_then_full):
    _, _, sweep_dir = half_then_full
    rows = {r["setting"]: r for r in csv.DictReader((sweep_dir / "summary.csv").open())}
    medians = {}
    for setting, row in rows.items():
        (m1, a1), (m2, a2) = (primary(sweep_dir / setting / f"seed-{s}") for s in (1, 2))
        assert int(row["seeds"]) == 2
        # Two seeds: median = mean = the midpoint, sample std = |difference| / sqrt(2).
        assert float(row["matthews_correlation_median"]) == pytest.approx((m1 + m2) / 2)
        assert float(row["matthews_correlation_mean"]) == pytest.approx((m1 + m2) / 2)
        assert float(row["matthews_correlation_std"]) == pytest.approx(abs(m1 - m2) / math.sqrt(2))
        assert float(row["matthews_correlation_min"]) == pytest.approx(min(m1, m2))
        assert float(row["matthews_correlation_max"]) == pytest.approx(max(m1, m2))
        assert float(row["accuracy_median"]) == pytest.approx((a1 + a2) / 2)
        medians[setting] = (m1 + m2) / 2
    best = max(medians, key=medians.get)
    assert [s for s, r in rows.items() if r["best"] == "True"] == [best]
    assert f"`{best}` **(best)**" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow  # about 19 s: two more runs
def test_rerun_a_summary_row_from_its_records(half_then_full, tmp_path):
    _, _, sweep_dir = half_then_full
    result = run_main("-m", "gluetune", "sweep", "--sweep_dir", str(sweep_dir), "--rerun", "learning_rate=1e-3",
                     "--rerun_dir", str(tmp_path / "again"))
    assert result.returncode == 0, result.stderr[-3000:]
    for seed in (1, 2):
        assert primary(tmp_path / "again" / "learning_rate=1e-3" / f"seed-{seed}") == primary(
            sweep_dir / "learning_rate=1e-3" / f"seed-{seed}")
    assert "reproduced" in result.stdout


@pytest.mark.slow  # about 11 s: a sweep of its own
def test_single_class_runs_are_called_out(tiny_qwen, tmp_path):
    """A validation set of one repeated sentence gets one class, whatever the model: the log and
    the summary must call that out."""
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"sentence number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(32)))
    (tmp_path / "dev.csv").write_text("text,label\n" + "".join(f"the same sentence,{'pos' if i % 2 else 'neg'}\n" for i in range(16)))
    overrides = [f"model.name_or_path={tiny_qwen}", "dataset.subset=null", "dataset.text_column=[text]",
                 "dataset.label_names=[neg, pos]", f"dataset.train_file={tmp_path / 'train.csv'}",
                 f"dataset.validation_file={tmp_path / 'dev.csv'}"]
    result = run_main("-m", "gluetune", "sweep", "--config", str(REFERENCE_CONFIG), *as_set_args(overrides),
                     "--seeds", "1", "--sweep_dir", str(tmp_path / "sweep"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEGENERATE" in result.stderr
    log = (tmp_path / "sweep" / "default" / "seed-1" / "train.log").read_text()
    assert "predicts a single class for every example" in log
    row = next(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert row["degenerate_runs"] == "1" and float(row["matthews_correlation_median"]) == 0.0


@pytest.mark.slow  # about 20 s on 2 cores; a SIGTERM mid-run in the default tier: test_resilience.py
def test_interrupted_sweep_stops_its_runs_with_a_checkpoint(tiny_qwen, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    sweep_dir = tmp_path / "sweep"
    base = [o for o in tiny_overrides(tiny_qwen, tmp_path / "unused", train=512, evals=32, epochs=3) if "output_dir" not in o]
    args = ["-m", "gluetune", "sweep", "--config", str(REFERENCE_CONFIG), *as_set_args(base), "--seeds", "1",
            "--sweep_dir", str(sweep_dir)]
    sweep = subprocess.Popen([sys.executable, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    first_checkpoint = sweep_dir / "default" / "seed-1" / "checkpoint-16" / "trainer_state.json"
    while not first_checkpoint.exists():
        assert sweep.poll() is None, sweep.stderr.read()
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "stopped with a checkpoint" in stderr, stderr
    log = (sweep_dir / "default" / "seed-1" / "train.log").read_text()
    assert "stopped by signal 15" in log
    # this sweep's runs only: another test module may be running its own sweep at the same time
    assert not any(str(sweep_dir) in line for line in os.popen("ps -eo args").read().splitlines())
    again = run_main(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in (sweep_dir / "default" / "seed-1" / "train.log").read_text()


@pytest.mark.parametrize("metric, best", [("mse", "b"), ("matthews_correlation", "a")])
def test_the_best_row_follows_the_metrics_direction(tmp_path, metric, best):
    """A lower-is-better metric (a custom task scored by mse, metric_for_best_model: loss) marks the lowest median."""
    from gluetune.search.summary import summarize
    from gluetune.search.sweep import Setting

    settings = [Setting([f"training.learning_rate={lr}"]) for lr in ("1e-3", "2e-3")]
    for setting, score in zip(settings, (0.9, 0.1)):
        folder = tmp_path / setting.name / "seed-1"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"primary_metric": metric, "primary_split": "validation",
                                                         "validation": {metric: score, "accuracy": 0.5}}))
    rows = summarize(tmp_path, settings, [1])
    assert [row["best"] for row in rows] == ([True, False] if best == "a" else [False, True])
