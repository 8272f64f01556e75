"""Train from each task's shipped config (tiny Qwen, one step), then `gluetune submit` and
`gluetune evaluate`: the files the GLUE leaderboard reads, and the cross-task table."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from conftest import GLUE_DIR, ROOT, tiny_overrides
from synthetic_glue import MNLI_WORDS, TEST_INDEX_START, write_synthetic_glue

from gluetune.cli import main
from gluetune.config.run import load_config
from gluetune.config.tasks import get_task
from gluetune.results.prediction import Classifier
from gluetune.results.submission import load_test_split
from gluetune.training.run import train

LOCAL_TASKS = ["cola", "sst2", "mrpc", "rte", "stsb", "wnli"]  # real files in ../shared
VOCABULARY = {
    "CoLA": {"0", "1"}, "SST-2": {"0", "1"}, "MRPC": {"0", "1"}, "QQP": {"0", "1"}, "WNLI": {"0", "1"},
    "RTE": {"entailment", "not_entailment"}, "QNLI": {"entailment", "not_entailment"},
    "MNLI-m": set(MNLI_WORDS), "MNLI-mm": set(MNLI_WORDS), "AX": set(MNLI_WORDS),
}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_data")
    write_synthetic_glue(root, rows=24, test_rows=10)
    return root


@pytest.fixture(scope="module")
def trained(tiny_qwen, tmp_path_factory, synthetic_dir):
    """Output folders trained from configs/glue_<task>_qwen.yaml, shrunk to one step by --set only."""
    folders = {}

    def trained_folder(name):
        if name not in folders:
            out = tmp_path_factory.mktemp(name) / "run"
            data_dir = GLUE_DIR if name in LOCAL_TASKS else synthetic_dir
            overrides = tiny_overrides(tiny_qwen, out, train=32, evals=16) + [f"dataset.data_dir={data_dir}"]
            train(load_config(ROOT / "configs" / f"glue_{name}_qwen.yaml", overrides))
            folders[name] = out
        return folders[name]

    return trained_folder


def read_submission(path):
    lines = path.read_text().splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    return lines[0], [int(index) for index, _ in rows], [prediction for _, prediction in rows]


def check_file(path, name, expected_index):
    header, index, predictions = read_submission(path)
    assert header == "index\tprediction", name
    assert index == expected_index, name
    if name == "STS-B":
        scores = [float(p) for p in predictions]
        assert all(0 <= s <= 5 for s in scores) and all(len(p.split(".")[1]) == 3 for p in predictions)
    else:
        assert set(predictions) <= VOCABULARY[name], (name, set(predictions))
    return predictions


# cola (single sentences), mrpc (pairs, a label map) and stsb (regression) in the default tier, word labels
# by MNLI below; the other layouts, each another training run of 4-7 s, in the slow one.
@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name in ("sst2", "wnli", "qqp", "qnli", "rte")
                                               else []) for name in [*LOCAL_TASKS, "qqp", "qnli"]])
def test_task_trains_from_its_config_and_submits(trained, tmp_path, capsys, name):
    folder = trained(name)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["task"] == name and metrics["train"]["steps"] == 1
    task = get_task(name)
    assert main(["submit", "--model_path", str(folder), "--output_dir", str(tmp_path / "sub")]) == 0
    (stem,) = task.submission_names.values()
    report = capsys.readouterr().out
    assert f"{stem}.tsv\t" in report and "MISSING" in report and "incomplete" in report

    classifier = Classifier.from_folder(folder)
    test = load_test_split(classifier, task, "test")
    expected_rows = len(test) if name in LOCAL_TASKS else 10
    assert len(test) == expected_rows  # the whole test file, though the run capped evaluation at 16 rows
    predictions = check_file(tmp_path / "sub" / f"{stem}.tsv", stem, test["idx"])
    with zipfile.ZipFile(tmp_path / "sub" / "submission.zip") as archive:
        assert archive.namelist() == [f"{stem}.tsv"]
        assert archive.read(f"{stem}.tsv") == (tmp_path / "sub" / f"{stem}.tsv").read_bytes()

    # Each row is the model's prediction for that row (batching sorts by length; the file must not).
    rows = [0, 1, len(test) // 2, len(test) - 1]
    logits = classifier.logits([tuple(test[c][i] for c in task.text_columns) for i in rows])
    if task.is_regression:
        assert classifier.model.config.problem_type == "regression" and logits.shape == (4, 1)  # MSE on one output
        np.testing.assert_allclose([float(predictions[i]) for i in rows], np.clip(logits[:, 0], 0, 5), atol=6e-4)
    else:
        vocabulary = task.submission_labels or [str(i) for i in range(task.num_labels)]
        assert [predictions[i] for i in rows] == [vocabulary[i] for i in logits.argmax(axis=1)]


def test_mnli_reports_both_validation_splits_and_submits_ax(trained, tmp_path, capsys):
    folder = trained("mnli")
    metrics = json.loads((folder / "metrics.json").read_text())
    for split in ("validation_matched", "validation_mismatched"):
        assert 0 <= metrics[split]["accuracy"] <= 1 and np.isfinite(metrics[split]["loss"])
    assert main(["submit", "--model_path", str(folder), "--output_dir", str(tmp_path / "sub")]) == 0
    for stem in ("MNLI-m", "MNLI-mm", "AX"):  # AX: the diagnostic set, predicted by the MNLI model
        check_file(tmp_path / "sub" / f"{stem}.tsv", stem, list(range(TEST_INDEX_START, TEST_INDEX_START + 10)))
    assert "AX.tsv\t10 rows" in capsys.readouterr().out

    assert main(["evaluate", "--model_path", str(folder)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    matched, mismatched = (metrics[s]["accuracy"] for s in ("validation_matched", "validation_mismatched"))
    assert row[:4] == ["mnli", "accuracy", "(matched/mismatched)", f"{matched:.4f}/{mismatched:.4f}"]


def test_submit_writes_every_task_given_and_zips_them(trained, tmp_path, capsys):
    folders = [trained(name) for name in ("stsb", "rte", "mnli")]
    assert main(["submit", "--model_path", *map(str, folders), "--output_dir", str(tmp_path / "sub")]) == 0
    report = capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "sub" / "submission.zip") as archive:
        assert archive.namelist() == ["STS-B.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "RTE.tsv", "AX.tsv"]  # leaderboard order
    for stem in ("CoLA", "SST-2", "MRPC", "QQP", "QNLI", "WNLI"):
        assert f"{stem}.tsv\tMISSING\tno {get_task(stem).name} output folder given" in report
    assert "5 of 11 files" in report


def test_evaluate_prints_one_table_with_the_glue_average(trained, capsys):
    folders = {name: trained(name) for name in ("cola", "stsb", "mrpc")}
    assert main(["evaluate", "--model_path", *map(str, folders.values())]) == 0
    lines = capsys.readouterr().out.splitlines()
    scores = {}
    for line in lines[1:4]:
        cells = line.split()
        saved = json.loads((folders[cells[0]] / "metrics.json").read_text())["validation"]
        metrics = get_task(cells[0]).score_metrics
        assert cells[1] == "/".join(metrics) and cells[2] == "/".join(f"{saved[m]:.4f}" for m in metrics)
        scores[cells[0]] = np.mean([saved[m] for m in metrics])
        assert cells[3] == f"{scores[cells[0]]:.4f}"
    assert lines[4] == f"GLUE average over 3 task(s) (cola, stsb, mrpc): {np.mean(list(scores.values())):.4f}"


def test_submit_mistakes_are_one_line_errors(trained, tmp_path, capsys):
    folder = str(trained("rte"))
    for args, fragment in [
        ([folder, folder], "task 'rte' is given twice"),
        ([str(tmp_path)], f"{tmp_path}: not a gluetune output folder"),
        ([str(tmp_path / "nope")], "model folder not found"),
    ]:
        assert main(["submit", "--model_path", *args, "--output_dir", str(tmp_path / "sub")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gluetune: error:")]
        assert len(errors) == 1 and fragment in errors[0], errors
    assert not (tmp_path / "sub").exists()
