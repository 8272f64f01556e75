"""Run folders written by an earlier main (tests/fixtures/legacy_runs, made by make_legacy_runs.py)
still predict, export and resume with today's code: a refactoring must not strand users' runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import GLUE_DIR, run_cli, run_main

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_runs"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


@pytest.fixture(autouse=True)
def needs_minilm(minilm_path):
    """The runs' base model is the MiniLM of the PyPI package (model.name_or_path: pkg:...)."""


def copy_of(name: str, tmp_path: Path) -> Path:
    """A copy in another place (the fixture stays as it was made), read with this machine's GLUE folder."""
    folder = shutil.copytree(LEGACY / name, tmp_path / name)
    config_path = folder / "resolved_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["dataset"]["data_dir"] = str(GLUE_DIR)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def test_a_legacy_run_predicts_what_it_predicted(tmp_path):
    folder = copy_of("finished", tmp_path)
    for expected in EXPECTED["predictions"]:
        result = run_main("-m", "gluetune", "predict", "--model_path", str(folder), "--input_text", expected["text"])
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == expected["output"]


def test_a_legacy_run_exports_to_a_model_that_predicts_the_same(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, export = copy_of("finished", tmp_path), tmp_path / "legacy-export"
    result = run_main("-m", "gluetune", "export", "--model_path", str(folder), "--output_dir", str(export))
    assert result.returncode == 0, result.stderr[-2000:]
    model = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    for expected in EXPECTED["predictions"]:
        with torch.no_grad():
            logits = model(**tokenizer(expected["text"], return_tensors="pt")).logits[0]
        probabilities = torch.softmax(logits, -1).numpy()
        label = model.config.id2label[int(np.argmax(probabilities))]
        assert expected["output"] == f"label={label} probability={probabilities.max():.4f}"


@pytest.mark.slow  # about 9 s; resuming after SIGTERM is in the default tier (training/test_resilience.py)
def test_a_legacy_run_interrupted_by_sigterm_resumes_to_the_run_that_main_finished(tmp_path):
    """In a process of its own, as a user resumes it (the record keeps the command it ran with)."""
    folder = copy_of("interrupted", tmp_path)
    result = run_cli("-m", "gluetune", "train", "--config", str(folder / "resolved_config.yaml"),
                     "--set", f"training.output_dir={folder}", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "checkpoint-4" in result.stderr
    record = json.loads((folder / "run_record.json").read_text())
    assert record["resumed_with"][-1][:2] == ["gluetune", "train"]  # `python -m gluetune`, as a user can paste it
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["best_checkpoint"] == EXPECTED["best_checkpoint"]
    for name, value in EXPECTED["validation"].items():
        assert metrics["validation"][name] == pytest.approx(value, abs=1e-4), name
    state = json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).parent == folder  # the moved folder's own checkpoint, not the fixture's
