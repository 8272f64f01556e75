"""A run records exactly which model and data it read (a hub model's commit, a local folder's content
hash, a hub dataset's commit and fingerprints), and its folder reloads that commit: offline, with a
hub-layout cache whose main branch moves after the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REFERENCE_CONFIG, build_tiny_qwen, tiny_overrides

from gluetune.config.run import load_config

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
REPO = "gluetune-test/tiny-qwen"


def add_snapshot(cache: Path, commit: str, model: Path) -> None:
    """`model` as the hub cache holds a repository's commit, and the main branch pointing at it."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, tiny_qwen, monkeypatch) -> Path:
    """A hub cache (HF_HUB_CACHE) holding the tiny Qwen2 as commit A of REPO; the suite runs offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    add_snapshot(cache, COMMIT_A, tiny_qwen)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import; transformers reads it from there
    assert constants.HF_HUB_OFFLINE
    return cache


def validation_logits(run: Path) -> tuple[list[tuple[str]], np.ndarray]:
    from conftest import GLUE_DIR

    from gluetune.config.tasks import get_task
    from gluetune.data.loading import read_glue_split

    rows = [json.loads(line) for line in (run / "validation_predictions.jsonl").read_text().splitlines()]
    sentences = read_glue_split(GLUE_DIR, get_task("cola"), "validation")["sentence"]
    return [(sentences[r["idx"]],) for r in rows], np.array([r["logits"] for r in rows])


def test_a_folder_reloads_the_hub_commit_it_trained_on(hub_cache, tmp_path):
    from gluetune.results.export import export_folder
    from gluetune.results.prediction import Classifier
    from gluetune.training.run import train

    run = tmp_path / "run"
    train(load_config(REFERENCE_CONFIG, tiny_overrides(REPO, run, train=32, evals=16)
                      + ["training.report_to=none"]))
    record = json.loads((run / "run_record.json").read_text())
    assert record["model_source"] == {"name_or_path": REPO, "revision": None, "commit": COMMIT_A}
    assert f"| base model | `{REPO}` at commit `{COMMIT_A}` |" in (run / "README.md").read_text()

    # the hub's main moves on: another model (other weights) at commit B
    add_snapshot(hub_cache, COMMIT_B, build_tiny_qwen(tmp_path / "other", seed=1))
    classifier = Classifier.from_folder(run)
    assert classifier.config.model.revision == COMMIT_A
    texts, logits = validation_logits(run)
    np.testing.assert_allclose(classifier.logits(texts), logits, atol=1e-5)  # the run's own, not commit B's

    from safetensors.torch import load_file

    exported = load_file(export_folder(run, tmp_path / "export") / "model.safetensors")["model.norm.weight"]
    expected = load_file(hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_A / "model.safetensors")
    assert np.array_equal(exported.float().numpy(), expected["model.norm.weight"].float().numpy())

    # an explicit revision still wins
    assert Classifier.from_folder(run, overrides=[f"model.revision={COMMIT_B}"]).config.model.revision == COMMIT_B


def test_a_local_model_is_recorded_by_its_content(finished_tiny_run, tiny_qwen):
    from gluetune.model.provenance import folder_digest

    record = json.loads((finished_tiny_run / "run_record.json").read_text())
    assert record["model_source"] == {"name_or_path": str(tiny_qwen), "revision": None,
                                      "sha256": folder_digest(tiny_qwen)}
    assert record["hub_data"] is None  # a local GLUE folder: its files' hashes are in data_files
    assert f"(sha256 of its files `{folder_digest(tiny_qwen)[:16]}...`)" in (finished_tiny_run / "README.md").read_text()


def test_a_hub_dataset_is_recorded_by_its_commit_and_fingerprints():
    import datasets

    from gluetune.data.loading import hub_source

    config = load_config(REFERENCE_CONFIG)  # nyu-mll/glue from the hub
    train = datasets.Dataset.from_dict({"sentence": ["One."], "label": [1], "idx": [0]})
    source = hub_source(config, {"train": train})
    # offline with no such dataset cached, the commit cannot be told; the fingerprint names what was read
    assert source == {"name": "nyu-mll/glue", "subset": "cola", "commit": None, "fingerprints": {"train": train._fingerprint}}
