"""GLUE leaderboard submissions: each task's test split predicted by its trained output folder.

The GLUE server reads one `<NAME>.tsv` per test set (`index<TAB>prediction`, the index taken from
the test file's own index/id column), with labels in its own vocabulary (`entailment` for RTE,
0/1 for CoLA, a score in [0, 5] for STS-B, ...), all zipped together at the zip's top level.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.run import CONFIG_FILENAME
from ..config.tasks import GLUE_TASKS, Task
from ..data.loading import load_splits
from ..errors import UserError
from ..files import atomic_write_bytes, atomic_write_text
from .prediction import Classifier, saved_config

logger = logging.getLogger("gluetune")

ZIP_NAME = "submission.zip"
STSB_RANGE = (0.0, 5.0)  # the leaderboard rejects similarity scores outside it


@dataclass(frozen=True)
class SubmissionFile:
    name: str  # the file stem the leaderboard reads, e.g. "MNLI-m"
    task: Task
    split: str

    @property
    def model_task(self) -> str:
        """The task whose trained model predicts this file (AX is predicted by MNLI's)."""
        return self.task.predict_with or self.task.name


def submission_files() -> list[SubmissionFile]:
    """Every file of a complete GLUE submission, in the leaderboard's order."""
    return [
        SubmissionFile(name, task, split)
        for task in GLUE_TASKS.values()
        for split, name in task.submission_names.items()
    ]


def leaderboard_labels(task: Task, logits: np.ndarray) -> list[str]:
    """Predictions as the leaderboard spells them."""
    if task.is_regression:
        return [f"{score:.3f}" for score in np.clip(logits[:, 0], *STSB_RANGE)]
    ids = logits.argmax(axis=1)
    if task.submission_labels:
        return [task.submission_labels[i] for i in ids]
    return [str(int(i)) for i in ids]


def submission_tsv(indices: list[int], labels: list[str]) -> str:
    return "index\tprediction\n" + "".join(f"{i}\t{label}\n" for i, label in zip(indices, labels))


@dataclass
class WrittenFile:
    path: Path
    rows: int
    folder: Path  # the output folder whose model predicted it


@dataclass
class SubmissionReport:
    written: dict[str, WrittenFile]  # file stem -> what was written
    missing: dict[str, str]  # file stem -> why it is not in the submission
    zip_path: Path

    def summary(self) -> str:
        lines = []
        for entry in submission_files():
            if entry.name in self.written:
                done = self.written[entry.name]
                lines.append(f"{entry.name}.tsv\t{done.rows} rows\tfrom {done.folder}")
            else:
                lines.append(f"{entry.name}.tsv\tMISSING\t{self.missing[entry.name]}")
        total = len(self.written) + len(self.missing)
        lines.append(f"{self.zip_path}: {len(self.written)} of {total} files")
        if self.missing:
            lines.append(f"incomplete: the GLUE server expects all {total} files; missing {', '.join(self.missing)}")
        return "\n".join(lines)


def _folders_by_task(folders: list[str | Path], overrides: list[str] | None) -> dict[str, Path]:
    """Which folder holds each task's model; only configs are read, so mistakes show before any model loads."""
    by_task: dict[str, Path] = {}
    for folder in map(Path, folders):
        config = saved_config(folder, overrides)
        if config is None:
            raise UserError(f"{folder}: not a gluetune output folder (no {CONFIG_FILENAME})")
        name = config.task.name
        if name not in GLUE_TASKS:
            raise UserError(f"{folder}: task '{name}' is not a GLUE task; a submission takes {', '.join(GLUE_TASKS)}")
        if name in by_task:
            raise UserError(f"task '{name}' is given twice ({by_task[name]} and {folder}); give one folder per task")
        by_task[name] = folder
    return by_task


def load_test_split(classifier: Classifier, task: Task, split: str):
    """The whole unlabeled test split of `task`, from the GLUE source the model was trained from
    (its local folder or the hub), never from custom files."""
    config = classifier.config
    dataset = dataclasses.replace(config.dataset, train_file=None, validation_file=None, test_file=None)
    source = dataclasses.replace(config, dataset=dataset, task=task)
    return load_splits(source, [split])[split]


def write_submission(
    folders: list[str | Path], output_dir: str | Path, overrides: list[str] | None = None, batch_size: int = 64
) -> SubmissionReport:
    """Predict the test sets of the tasks the folders were trained on, write the `.tsv` files and
    a zip of them into `output_dir`; files no folder can predict are reported as missing."""
    output_dir = Path(output_dir)
    by_task = _folders_by_task(folders, overrides)
    written: dict[str, WrittenFile] = {}
    for model_task, folder in by_task.items():
        # One model in memory at a time: nine 1.5B-parameter models would not fit together.
        classifier = Classifier.from_folder(folder, overrides=overrides, batch_size=batch_size)
        for entry in submission_files():
            if entry.model_task != model_task:
                continue
            test = load_test_split(classifier, entry.task, entry.split)
            texts = list(zip(*(test[column] for column in entry.task.text_columns)))
            labels = leaderboard_labels(entry.task, classifier.logits(texts))
            path = output_dir / f"{entry.name}.tsv"
            atomic_write_text(path, submission_tsv(test["idx"], labels))
            written[entry.name] = WrittenFile(path, len(labels), folder)
            logger.info("%s: %d predictions from %s", path, len(labels), folder)
        del classifier

    order = [entry.name for entry in submission_files()]
    written = {name: written[name] for name in order if name in written}
    missing = {
        entry.name: f"no {entry.model_task} output folder given" for entry in submission_files() if entry.name not in written
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for done in written.values():
            archive.write(done.path, arcname=done.path.name)
    zip_path = output_dir / ZIP_NAME
    atomic_write_bytes(zip_path, buffer.getvalue())
    return SubmissionReport(written=written, missing=missing, zip_path=zip_path)
