"""Every GLUE task: registry vs the hub, the real local files vs PROVENANCE.md, the synthetic
QQP/MNLI/QNLI/AX layouts, pair encoding, GLUE scores, the evaluation table, leaderboard labels."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import GLUE_DIR
from synthetic_glue import MNLI_WORDS, QNLI_WORDS, TEST_INDEX_START, write_synthetic_glue

from gluetune.config.tasks import GLUE_TASKS, get_task
from gluetune.data.loading import read_glue_split
from gluetune.data.tokenizing import encode_texts
from gluetune.errors import UserError
from gluetune.results.evaluation import TaskResult, glue_table
from gluetune.results.metrics import glue_score, task_metrics, task_score
from gluetune.results.submission import leaderboard_labels, submission_files

# nyu-mll/glue on the hub: input columns and label names, in label-id order ([] = regression).
HUB = {
    "cola": (["sentence"], ["unacceptable", "acceptable"]),
    "sst2": (["sentence"], ["negative", "positive"]),
    "mrpc": (["sentence1", "sentence2"], ["not_equivalent", "equivalent"]),
    "qqp": (["question1", "question2"], ["not_duplicate", "duplicate"]),
    "stsb": (["sentence1", "sentence2"], []),
    "mnli": (["premise", "hypothesis"], ["entailment", "neutral", "contradiction"]),
    "qnli": (["question", "sentence"], ["entailment", "not_entailment"]),
    "rte": (["sentence1", "sentence2"], ["entailment", "not_entailment"]),
    "wnli": (["sentence1", "sentence2"], ["not_entailment", "entailment"]),
    "ax": (["premise", "hypothesis"], ["entailment", "neutral", "contradiction"]),
}

# What each local file's label column means, in the hub's names; None: the words are the names.
RAW_LABEL_MEANING = {
    "cola": {"0": "unacceptable", "1": "acceptable"},
    "sst2": {"0": "negative", "1": "positive"},
    "mrpc": {"0": "not_equivalent", "1": "equivalent"},
    "qqp": {"0": "not_duplicate", "1": "duplicate"},
    "wnli": {"0": "not_entailment", "1": "entailment"},
    "rte": None,
    "qnli": None,
    "mnli": None,
}

# How the local files name their columns: (label column, text columns, test index column).
RAW_COLUMNS = {
    "cola": (1, [3], "index"),  # no header in train/dev
    "sst2": ("label", ["sentence"], "index"),
    "mrpc": ("Quality", ["#1 String", "#2 String"], "index"),
    "rte": ("label", ["sentence1", "sentence2"], "index"),
    "stsb": ("score", ["sentence1", "sentence2"], "index"),
    "wnli": ("label", ["sentence1", "sentence2"], "index"),
}
LOCAL_DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "wnli": "WNLI"}
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def provenance_rows() -> dict[str, int]:
    """Data rows per file, from the table in ../shared/data/glue/PROVENANCE.md."""
    rows = {}
    for line in (GLUE_DIR / "PROVENANCE.md").read_text().splitlines():
        match = re.match(r"\| `([^`]+\.tsv)` \|(?:[^|]*\|){3} (\d+) \|", line)
        if match:
            rows[match.group(1)] = int(match.group(2))
    return rows


def raw_table(path: Path, has_header: bool = True) -> tuple[list[str] | None, list[list[str]]]:
    """A TSV read the plain way (no csv module), to check the reader against."""
    lines = [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line]
    fields = [line.split("\t") for line in lines]
    return (fields[0], fields[1:]) if has_header else (None, fields)


def raw_column(header, rows, column) -> list[str]:
    index = column if isinstance(column, int) else header.index(column)
    return [row[index] for row in rows]


# ---------------------------------------------------------------- the registry


def test_registry_has_every_glue_task_with_hub_columns_and_labels():
    assert list(GLUE_TASKS) == list(HUB)
    for name, (columns, labels) in HUB.items():
        task = GLUE_TASKS[name]
        assert list(task.text_columns) == columns, name
        assert list(task.label_names) == labels, name
    assert GLUE_TASKS["stsb"].is_regression and GLUE_TASKS["stsb"].num_labels == 1
    assert GLUE_TASKS["mnli"].validation_splits == ("validation_matched", "validation_mismatched")
    assert get_task("SST-2").name == "sst2" and get_task("MNLI-mm").name == "mnli" and get_task("diagnostic").name == "ax"
    with pytest.raises(UserError, match="unknown GLUE task 'mnly'.*did you mean 'mnli'"):
        get_task("mnly")


def test_submission_covers_the_eleven_leaderboard_files():
    files = submission_files()
    assert [f.name for f in files] == ["CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI", "AX"]
    assert {f.name: f.model_task for f in files}["AX"] == "mnli"


# ---------------------------------------------------------------- the real local files


@pytest.mark.parametrize("name", list(LOCAL_DIRS))
def test_local_files_match_provenance_row_counts(name):
    task, expected = get_task(name), provenance_rows()
    for split, file in SPLIT_FILES.items():
        ds = read_glue_split(GLUE_DIR, task, split)
        assert len(ds) == expected[f"{LOCAL_DIRS[name]}/{file}"], (name, split)
        assert ds.column_names == [*task.text_columns, "label", "idx"]


@pytest.mark.parametrize("name", list(LOCAL_DIRS))
def test_local_labels_and_texts_map_onto_the_hub_form(name):
    task = get_task(name)
    label_column, text_columns, index_column = RAW_COLUMNS[name]
    for split in ("train", "validation"):
        header, rows = raw_table(GLUE_DIR / LOCAL_DIRS[name] / SPLIT_FILES[split], has_header=name != "cola")
        ds = read_glue_split(GLUE_DIR, task, split)
        raw_labels = raw_column(header, rows, label_column)
        if task.is_regression:
            np.testing.assert_allclose(ds["label"], [float(v) for v in raw_labels], rtol=1e-6)
        else:
            meaning = RAW_LABEL_MEANING[name] or {}
            assert [task.label_names[i] for i in ds["label"]] == [meaning.get(v, v) for v in raw_labels], (name, split)
        for ours, theirs in zip(task.text_columns, text_columns):
            assert ds[ours] == raw_column(header, rows, theirs), (name, split, ours)
    header, rows = raw_table(GLUE_DIR / LOCAL_DIRS[name] / "test.tsv")
    test = read_glue_split(GLUE_DIR, task, "test")
    assert test["idx"] == [int(i) for i in raw_column(header, rows, index_column)]
    assert set(test["label"]) == {-1}


def test_mrpc_header_byte_order_mark_is_not_part_of_the_label_column():
    assert (GLUE_DIR / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    labels = read_glue_split(GLUE_DIR, get_task("mrpc"), "train")["label"]
    assert (labels.count(1), labels.count(0)) == (2474, 1194)


# ---------------------------------------------------------------- QQP, MNLI, QNLI, AX (synthetic)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_data")
    return root, write_synthetic_glue(root, rows=24, test_rows=10)


@pytest.mark.parametrize(
    "name, files",
    [
        ("qqp", {"train": "QQP/train.tsv", "validation": "QQP/dev.tsv"}),
        ("qnli", {"train": "QNLI/train.tsv", "validation": "QNLI/dev.tsv"}),
        ("mnli", {"train": "MNLI/train.tsv", "validation_matched": "MNLI/dev_matched.tsv",
                  "validation_mismatched": "MNLI/dev_mismatched.tsv"}),
    ],
)
def test_synthetic_labeled_splits_map_onto_hub_labels(synthetic, name, files):
    root, raw_labels = synthetic
    task = get_task(name)
    meaning = RAW_LABEL_MEANING[name] or {}
    for split, file in files.items():
        ds = read_glue_split(root, task, split)
        assert [task.label_names[i] for i in ds["label"]] == [meaning.get(v, v) for v in raw_labels[file]], split
        header, rows = raw_table(root / file)
        assert ds[task.text_columns[0]] == raw_column(header, rows, {"qqp": "question1", "qnli": "question"}.get(name, "sentence1"))
        assert ds[task.text_columns[1]] == raw_column(header, rows, {"qqp": "question2", "qnli": "sentence"}.get(name, "sentence2"))
    assert set(raw_labels[files["train"]]) == (set(MNLI_WORDS) if name == "mnli" else set(QNLI_WORDS) if name == "qnli" else {"0", "1"})


@pytest.mark.parametrize("name", ["qqp", "qnli", "mnli", "ax"])
def test_synthetic_test_splits_keep_the_files_index(synthetic, name):
    root, _ = synthetic
    task = get_task(name)
    for split in task.test_splits:
        ds = read_glue_split(root, task, split)
        assert ds["idx"] == list(range(TEST_INDEX_START, TEST_INDEX_START + 10)), split
        assert set(ds["label"]) == {-1} and all(ds[c][0] for c in task.text_columns)


def test_unknown_nli_label_names_the_file_line_and_the_choices(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tA.\tB.\tcontradiction\n")
    with pytest.raises(UserError, match=r"RTE/dev.tsv:3: label 'contradiction' is not valid; expected one of entailment, not_entailment"):
        read_glue_split(tmp_path, get_task("rte"), "validation")
    with pytest.raises(UserError, match=r"diagnostic/diagnostic.tsv not found.*data_dir"):
        read_glue_split(tmp_path, get_task("ax"), "test")


# ---------------------------------------------------------------- pair encoding


def test_encoders_get_a_real_sentence_pair(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    enc, _ = encode_texts(tokenizer, [("A cat sat.", "A cat was sitting.")], 256)
    assert tokenizer.decode(enc["input_ids"][0]) == "[CLS] a cat sat. [SEP] a cat was sitting. [SEP]"
    segments = enc["token_type_ids"][0]
    assert segments[0] == 0 and segments[-1] == 1 and sorted(segments) == segments


# ---------------------------------------------------------------- scores, table, leaderboard labels


def test_glue_scores_follow_the_paper():
    labels, logits = [0, 1, 1, 0, 1], np.array([[2, 1], [0, 3], [1, 0], [3, 0], [0, 1]], dtype=float)
    cola = task_metrics(get_task("cola"), labels, logits)
    assert glue_score(get_task("cola"), cola) == pytest.approx(cola["matthews_correlation"])
    assert "combined_score" not in cola  # GLUE combines accuracy and F1 for MRPC and QQP only
    mrpc = task_metrics(get_task("mrpc"), labels, logits)
    assert mrpc["combined_score"] == pytest.approx((0.8 + 0.8) / 2)  # 4 of 5 right; F1 of class 1 is 0.8
    assert glue_score(get_task("mrpc"), mrpc) == pytest.approx(mrpc["combined_score"])
    stsb = task_metrics(get_task("stsb"), [0.0, 1.0, 2.5, 4.0], np.array([[0.1], [1.2], [2.0], [4.5]]))
    assert glue_score(get_task("stsb"), stsb) == pytest.approx((stsb["pearson"] + stsb["spearmanr"]) / 2)
    assert stsb["spearmanr"] == pytest.approx(1.0)
    mnli = {"validation_matched": {"accuracy": 0.8}, "validation_mismatched": {"accuracy": 0.7}}
    assert task_score(get_task("mnli"), mnli) == pytest.approx(0.75)  # counted once, as on the leaderboard


def test_glue_table_has_a_row_per_task_and_the_average():
    results = [
        TaskResult(Path("out/cola"), get_task("cola"), {"validation": {"matthews_correlation": 0.5, "accuracy": 0.8}}),
        TaskResult(Path("out/mrpc"), get_task("mrpc"), {"validation": {"accuracy": 0.8, "f1": 0.9}}),
        TaskResult(Path("out/mnli"), get_task("mnli"),
                   {"validation_matched": {"accuracy": 0.84}, "validation_mismatched": {"accuracy": 0.82}}),
    ]
    lines = glue_table(results).splitlines()
    assert lines[0].split() == ["task", "metrics", "values", "score", "model"]
    assert lines[1].split() == ["cola", "matthews_correlation", "0.5000", "0.5000", "out/cola"]
    assert lines[2].split() == ["mrpc", "accuracy/f1", "0.8000/0.9000", "0.8500", "out/mrpc"]
    assert lines[3].split() == ["mnli", "accuracy", "(matched/mismatched)", "0.8400/0.8200", "0.8300", "out/mnli"]
    assert lines[4] == "GLUE average over 3 task(s) (cola, mrpc, mnli): 0.7267"  # (0.5 + 0.85 + 0.83) / 3
    assert glue_table(results + results[:1]).splitlines()[-1] == "no GLUE average: more than one folder for cola"


def test_leaderboard_labels_are_in_the_leaderboards_vocabulary():
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert leaderboard_labels(get_task("rte"), logits) == ["not_entailment", "entailment"]
    assert leaderboard_labels(get_task("qnli"), logits) == ["not_entailment", "entailment"]
    assert leaderboard_labels(get_task("cola"), logits) == ["1", "0"]
    assert leaderboard_labels(get_task("wnli"), logits) == ["1", "0"]
    assert leaderboard_labels(get_task("ax"), np.array([[0, 0, 1.0]])) == ["contradiction"]
    assert leaderboard_labels(get_task("stsb"), np.array([[-0.4], [2.34567], [5.6]])) == ["0.000", "2.346", "5.000"]
