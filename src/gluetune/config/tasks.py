"""The task registry: what each GLUE task reads, predicts and is scored by.

Column names, label names and label order follow the Hugging Face hub's `nyu-mll/glue`, so a model
trained from the hub and one trained from the original GLUE TSV files are interchangeable. The
`LocalLayout` of a task says how its original `glue_data/<TASK>/*.tsv` files map onto that form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError, did_you_mean


@dataclass(frozen=True)
class LocalLayout:
    """How one task's files in the original GLUE download layout are read.

    `columns` maps our column name to the file's header name, or to a column index for files
    without a header (CoLA's train and dev). `label_map` turns the file's label strings into
    the hub's label ids; without one the label is read as a number.
    """

    dir_name: str
    files: dict[str, str]
    columns: dict[str, str | int]
    label: str | int | None
    test_columns: dict[str, str | int] | None = None
    has_header: bool = True
    test_has_header: bool = True
    label_map: dict[str, int] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]  # empty for regression
    metrics: tuple[str, ...]  # what is reported; the first one selects the best checkpoint
    # The metrics the GLUE paper scores the task by; their mean is the task's GLUE score.
    glue_metrics: tuple[str, ...] = ()
    validation_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    hub_subset: str | None = None
    local: LocalLayout | None = None
    submission_names: dict[str, str] = field(default_factory=dict)  # test split -> GLUE file stem
    submission_labels: tuple[str, ...] = ()  # how the leaderboard wants labels; default: ids
    predict_with: str | None = None  # AX has no training data: it is predicted by the MNLI model

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def score_metrics(self) -> tuple[str, ...]:
        """What the task's one-number score averages: the GLUE metrics, else the primary one."""
        return self.glue_metrics or (self.primary_metric,)


def _pair_layout(dir_name, a, b, label, files=None, label_map=None, test_a=None, test_b=None, index="index"):
    """The common GLUE TSV layout: a header line, two text columns and a label column."""
    return LocalLayout(
        dir_name=dir_name,
        files=files or {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"},
        columns={a[0]: a[1], b[0]: b[1]},
        label=label,
        test_columns={a[0]: test_a or a[1], b[0]: test_b or b[1], "idx": index},
        label_map=label_map,
    )


_NLI = {"entailment": 0, "not_entailment": 1}
_MNLI = {"entailment": 0, "neutral": 1, "contradiction": 2}
_MNLI_LABELS = tuple(_MNLI)


_CLASSIFICATION = ("accuracy", "f1", "precision", "recall", "matthews_correlation")
_NLI_LABELS = ("entailment", "not_entailment")


def _pair_task(name, glue_name, columns, labels, metrics, glue_metrics, label, file_columns=None, label_map=None,
               submission_labels=(), index="index") -> Task:
    """A sentence-pair task in GLUE's common form: hub subset `name`, files in `glue_name`/ with a header."""
    a, b = zip(columns, file_columns or columns)
    return Task(name=name, text_columns=columns, label_names=labels, metrics=metrics, glue_metrics=glue_metrics,
                hub_subset=name, local=_pair_layout(glue_name, a, b, label, label_map=label_map, index=index),
                submission_names={"test": glue_name}, submission_labels=submission_labels)


def _sentence_task(name, glue_name, labels, metrics, glue_metrics, column, label, has_header=True) -> Task:
    """A single-sentence task: hub subset `name`, files in `glue_name`/, the test split with a header."""
    layout = LocalLayout(dir_name=glue_name, files={"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"},
                         columns={"sentence": column}, label=label, has_header=has_header,
                         test_columns={"sentence": "sentence", "idx": "index"})
    return Task(name=name, text_columns=("sentence",), label_names=labels, metrics=metrics, glue_metrics=glue_metrics,
                hub_subset=name, local=layout, submission_names={"test": glue_name})


GLUE_TASKS: dict[str, Task] = {
    "cola": _sentence_task("cola", "CoLA", ("unacceptable", "acceptable"),
                           ("matthews_correlation", "accuracy", "f1", "precision", "recall"), ("matthews_correlation",),
                           # train/dev: no header; source, label, original mark, sentence. test: index, sentence.
                           column=3, label=1, has_header=False),
    "sst2": _sentence_task("sst2", "SST-2", ("negative", "positive"), _CLASSIFICATION, ("accuracy",),
                           column="sentence", label="label"),
    "mrpc": _pair_task("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                       ("combined_score", *_CLASSIFICATION), ("accuracy", "f1"), "Quality",
                       file_columns=("#1 String", "#2 String")),
    "qqp": _pair_task("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
                      ("combined_score", *_CLASSIFICATION), ("accuracy", "f1"), "is_duplicate", index="id"),
    "stsb": _pair_task("stsb", "STS-B", ("sentence1", "sentence2"), (), ("combined_score", "pearson", "spearmanr"),
                       ("pearson", "spearmanr"), "score"),
    "mnli": Task(
        name="mnli", text_columns=("premise", "hypothesis"), label_names=_MNLI_LABELS, metrics=("accuracy",),
        glue_metrics=("accuracy",), hub_subset="mnli",
        validation_splits=("validation_matched", "validation_mismatched"), test_splits=("test_matched", "test_mismatched"),
        local=_pair_layout("MNLI", ("premise", "sentence1"), ("hypothesis", "sentence2"), "gold_label", label_map=_MNLI,
                           files={"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                                  "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
                                  "test_mismatched": "test_mismatched.tsv"}),
        submission_names={"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}, submission_labels=_MNLI_LABELS,
    ),
    "qnli": _pair_task("qnli", "QNLI", ("question", "sentence"), _NLI_LABELS, _CLASSIFICATION, ("accuracy",), "label",
                       label_map=_NLI, submission_labels=_NLI_LABELS),
    "rte": _pair_task("rte", "RTE", ("sentence1", "sentence2"), _NLI_LABELS, _CLASSIFICATION, ("accuracy",), "label",
                      label_map=_NLI, submission_labels=_NLI_LABELS),
    "wnli": _pair_task("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), _CLASSIFICATION,
                       ("accuracy",), "label"),
    "ax": Task(
        name="ax", text_columns=("premise", "hypothesis"), label_names=_MNLI_LABELS, metrics=("matthews_correlation",),
        glue_metrics=("matthews_correlation",), validation_splits=(), hub_subset="ax",
        # The diagnostic set ships as glue_data/diagnostic/diagnostic.tsv, unlabeled.
        local=LocalLayout(dir_name="diagnostic", files={"test": "diagnostic.tsv"}, columns={}, label=None,
                          test_columns={"premise": "sentence1", "hypothesis": "sentence2", "idx": "index"}),
        submission_names={"test": "AX"}, submission_labels=_MNLI_LABELS, predict_with="mnli",
    ),
}

# Names users type for the same task (the GLUE directory names and the leaderboard's spellings).
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli", "diagnostic": "ax"}


def get_task(name: str) -> Task:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise UserError(
            f"unknown GLUE task '{name}'{did_you_mean(key, GLUE_TASKS)}; known: {', '.join(GLUE_TASKS)}"
        )
    return GLUE_TASKS[key]


def custom_task(
    name: str,
    text_columns: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...] | None = None,
) -> Task:
    """A task described entirely by the config (own files, own columns and labels)."""
    if metrics is None:
        if not label_names:
            metrics = ("combined_score", "pearson", "spearmanr")
        elif len(label_names) == 2:
            metrics = ("matthews_correlation", "accuracy", "f1", "precision", "recall")
        else:
            metrics = ("accuracy", "f1_macro", "matthews_correlation")
    return Task(name=name, text_columns=tuple(text_columns), label_names=tuple(label_names), metrics=metrics)
