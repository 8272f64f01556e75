"""`gluetune report` and model cards: a run's report.md with its figures (classification and
regression), a sweep's figure and table, and a card whose hub metadata parses back."""

from __future__ import annotations

import json
import shlex
import shutil
import struct
from pathlib import Path

import pytest
from conftest import REFERENCE_CONFIG, ROOT, tiny_overrides

from gluetune.config.run import load_config
from gluetune.errors import UserError
from gluetune.results.card import write_card
from gluetune.results.report import read_predictions
from gluetune.search import sweep
from gluetune.search.report import write_report
from gluetune.training.run import train

STSB_CONFIG = ROOT / "configs" / "glue_stsb_qwen.yaml"


@pytest.fixture(scope="module")
def cola_run(tiny_qwen, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cola") / "run"
    train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, epochs=2)))
    return out


@pytest.fixture(scope="module")
def stsb_run(tiny_qwen, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stsb") / "run"
    train(load_config(STSB_CONFIG, tiny_overrides(tiny_qwen, out, train=32, evals=16, epochs=1)))
    return out


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file; fails for anything else or a tiny/huge file."""
    content = path.read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n", path
    assert 2_000 < len(content) < 300_000, (path, len(content))  # a drawing, and a small one
    return struct.unpack(">II", content[16:24])


def image_links(report: Path) -> list[str]:
    return [line.split("](", 1)[1].rstrip(")") for line in report.read_text().splitlines() if line.startswith("![")]


def test_run_report_shows_curves_confusion_matrix_and_kept_epoch(cola_run):
    report = write_report(cola_run)
    assert report == cola_run / "report.md"
    assert image_links(report) == ["training_curves.png", "confusion_matrix.png"]
    for name in image_links(report):
        width, height = png_size(cola_run / name)
        assert 200 < width < 1200 and 200 < height < 1200
    metrics = json.loads((cola_run / "metrics.json").read_text())
    text = report.read_text()
    assert f"`{metrics['best_checkpoint']}` (epoch {metrics['best_epoch']:g})" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and sum(row.endswith("| **kept** |") for row in rows) == 1
    kept = next(row for row in rows if row.endswith("| **kept** |"))
    assert kept.startswith(f"| {metrics['best_epoch']:g} |")
    assert f"| validation | {metrics['validation']['matthews_correlation']:.4f} |" in text


def test_confusion_matrix_reads_every_validation_prediction(cola_run):
    labels, logits = read_predictions(cola_run / "validation_predictions.jsonl")["validation"]
    assert len(labels) == len(logits) == 32 and set(labels) <= {0, 1} and all(len(row) == 2 for row in logits)


def test_regression_report_plots_predictions_against_labels(stsb_run):
    report = write_report(stsb_run)
    assert image_links(report) == ["training_curves.png", "predictions_vs_labels.png"]
    png_size(stsb_run / "predictions_vs_labels.png")
    assert not (stsb_run / "confusion_matrix.png").exists()


def test_sweep_report_plots_every_seed_per_setting(cola_run, tmp_path):
    """A sweep folder as `gluetune sweep` leaves it, its runs' metrics copied from a real run."""
    sweep_dir = tmp_path / "sweep"
    settings = sweep.parse_grid(["training.learning_rate=1e-3,2e-3"])
    seeds = [1, 2, 3]
    metrics = json.loads((cola_run / "metrics.json").read_text())
    for i, setting in enumerate(settings):
        for seed in seeds:
            folder = sweep_dir / setting.name / f"seed-{seed}"
            folder.mkdir(parents=True)
            metrics["validation"]["matthews_correlation"] = 0.1 * i + 0.01 * seed
            (folder / "metrics.json").write_text(json.dumps(metrics))
    sweep.write_summary(sweep_dir, sweep.summarize(sweep_dir, settings, seeds))

    report = write_report(sweep_dir)
    assert image_links(report) == ["sweep.png"]
    png_size(sweep_dir / "sweep.png")
    text = report.read_text()
    assert "| `learning_rate=2e-3` **(best)** | 3 | 0.1200 |" in text  # the summary table, medians
    assert "| `learning_rate=1e-3` | seed 1: 0.0100, seed 2: 0.0200, seed 3: 0.0300 |" in text


def test_folders_that_are_neither_are_refused(cola_run, tmp_path):
    with pytest.raises(UserError, match="neither a finished gluetune run"):
        write_report(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(cola_run / "resolved_config.yaml", unfinished)
    with pytest.raises(UserError, match="no metrics.json"):
        write_report(unfinished)
    with pytest.raises(UserError, match="not found"):
        write_report(tmp_path / "missing")


def test_run_card_metadata_parses_back_and_says_how_to_reproduce(cola_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(write_card(cola_run))
    metrics = json.loads((cola_run / "metrics.json").read_text())
    config = load_config(cola_run / "resolved_config.yaml")
    assert card.data.base_model == config.model.name_or_path
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-classification"
    assert card.data.datasets == ["nyu-mll/glue"]
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("validation", m): metrics["validation"][m] for m in config.task.metrics}
    assert {r.dataset_config for r in card.data.eval_results} == {"cola"}
    text = card.text
    assert "| LoRA r / alpha / dropout | 8 / 16 / 0.1 |" in text
    assert "| batch | 16 per device x 2 accumulation x 1 process(es) = 32 |" in text
    assert f"`{metrics['best_checkpoint']}` of epoch {metrics['best_epoch']:g}" in text
    assert "| 0 | unacceptable |" in text and "| 1 | acceptable |" in text
    assert "not for production decisions" in text and "Matthews correlation" in text
    command = json.loads((cola_run / "run_record.json").read_text())["command"]
    assert f"```bash\n{shlex.join(command)}\n```" in text


def test_regression_card_lists_its_results(stsb_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(write_card(stsb_run))
    metrics = json.loads((stsb_run / "metrics.json").read_text())
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values and all(values[k] == metrics["validation"][k] for k in values)
    assert "regression" in card.text
