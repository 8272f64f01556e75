"""Where the data comes from: a task's splits from the hub, a local GLUE folder or plain files.

Every source yields the same form: the task's text columns (hub names), `label` (an int id, a
float for regression, -1 where the split is unlabeled) and `idx` (the row's index in its split).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..config.run import GLUE_DIR_ENV, DatasetConfig, RunConfig
from ..config.tasks import Task
from ..errors import UserError, one_line

logger = logging.getLogger("gluetune")

UNLABELED = -1


# ---------------------------------------------------------------- where the data comes from


def glue_dir(dataset: DatasetConfig) -> Path | None:
    """The local GLUE folder (config.build_config already folded GLUE_DIR into data_dir)."""
    return Path(dataset.data_dir).expanduser() if dataset.data_dir else None


def source_files(config: RunConfig, splits: list[str]) -> list[Path]:
    """The local files a run reads (for provenance records); empty for the hub."""
    dataset, task = config.dataset, config.task
    custom = {"train": dataset.train_file, "validation": dataset.validation_file, "test": dataset.test_file}
    if any(custom.values()):
        return [Path(custom[s]) for s in splits if custom.get(s)]
    folder = glue_dir(dataset)
    if folder and task.local:
        return [folder / task.local.dir_name / task.local.files[s] for s in splits if s in task.local.files]
    return []


def hub_source(config: RunConfig, loaded: dict) -> dict | None:
    """What a run read from a hub dataset, for its record: name, subset, the commit of the dataset's
    repository where it can be told (None offline with nothing cached), and each split's `datasets`
    fingerprint (a digest of what was read); None for local files (their hashes are recorded instead)."""
    dataset = config.dataset
    if any((dataset.train_file, dataset.validation_file, dataset.test_file)) or glue_dir(dataset):
        return None  # as load_splits decides
    return {"name": dataset.name, "subset": config.task.hub_subset, "commit": _hub_dataset_commit(dataset.name),
            "fingerprints": {split: getattr(ds, "_fingerprint", None) for split, ds in loaded.items()}}


def _hub_dataset_commit(name: str) -> str | None:
    try:
        from huggingface_hub import HfApi, constants

        return HfApi().resolve_revision(name, repo_type="dataset", local_files_only=constants.HF_HUB_OFFLINE).resolved
    except Exception:  # noqa: BLE001 - unreachable, unknown or uncached: recorded as unknown
        return None


def load_splits(config: RunConfig, splits: list[str]):
    """The named splits as `datasets.Dataset`s, checked and limited by max_*_samples."""
    dataset, task = config.dataset, config.task
    custom = {"train": dataset.train_file, "validation": dataset.validation_file, "test": dataset.test_file}
    if any(custom.values()):
        loaded = {}
        for split in splits:
            if not custom.get(split):
                raise UserError(f"{config.source}: dataset.{split}_file is needed for the {split} split")
            loaded[split] = read_data_file(custom[split], task, dataset.label_column, labeled=split != "test")
    elif glue_dir(dataset):
        loaded = {split: read_glue_split(glue_dir(dataset), task, split) for split in splits}
    else:
        loaded = load_hub_splits(dataset.name, task, splits)
    for split, ds in loaded.items():
        # Test splits are never cut: a submission must cover every test example.
        limit = dataset.max_train_samples if split == "train" else None if split.startswith("test") else dataset.max_eval_samples
        if limit is not None and len(ds) > limit:
            loaded[split] = ds.select(range(limit))
    return loaded


def load_hub_splits(name: str, task: Task, splits: list[str]):
    import datasets

    subset = task.hub_subset
    try:
        ds = datasets.load_dataset(name, subset)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "not reachable / not found"
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise UserError(
            f"could not load dataset '{name}' subset '{subset}' from the hub at {endpoint}{offline}: "
            f"{one_line(err)}. Either set HF_ENDPOINT to a reachable mirror, or point dataset.data_dir "
            f"(or {GLUE_DIR_ENV}) at a local glue_data folder"
        ) from None
    missing = [s for s in splits if s not in ds]
    if missing:
        raise UserError(f"hub dataset '{name}/{subset}' has no split {missing[0]}; it has {', '.join(ds)}")
    return {s: ds[s] for s in splits}


# ---------------------------------------------------------------- reading files
# The csv module, not pandas/datasets' loaders: GLUE files must be read with quoting off, each
# task has its own column layout, and a bad row must be reported as file:line.


def _decode(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # MRPC's files start with a byte-order mark
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    return text


def read_delimited(path: Path, delimiter: str, quoting: int, has_header: bool):
    """(header or None, [(line number, fields)]) with every row's field count checked."""
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delimiter, quoting=quoting)
    header, rows = None, []
    try:
        for fields in reader:
            if not fields or fields == [""]:
                continue
            if has_header and header is None:
                header = [f.strip() for f in fields]
                continue
            rows.append((reader.line_num, fields))
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed row: {err}") from None
    width = len(header) if header else len(rows[0][1]) if rows else 0
    for line, fields in rows:
        if len(fields) != width:
            what = f"the header's {width} ({', '.join(header)})" if header else f"{width} like the first row"
            raise UserError(f"{path}:{line}: {len(fields)} fields, expected {what}")
    if not rows:
        raise UserError(f"{path}: no data rows")
    return header, rows


def parse_label(value: Any, task: Task, where: str, label_map: dict[str, int] | None = None) -> int | float:
    """A label id (or a float for regression) from a file's label value."""
    if task.is_regression:
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: label {value!r} is not a number (task '{task.name}' is regression)") from None
        if not math.isfinite(score):  # a NaN or infinite target makes every loss after it NaN
            raise UserError(f"{where}: label {value!r} is not a finite number (task '{task.name}' is regression)")
        return score
    names = task.label_names
    if label_map is not None:
        if value in label_map:
            return label_map[value]
        raise UserError(f"{where}: label {value!r} is not valid; expected one of {', '.join(label_map)}")
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    try:
        number = float(value)
        label = int(number)
        ok = number == label
    except (TypeError, ValueError, OverflowError):  # (OverflowError: 'inf')
        ok = False
    if ok and 0 <= label < len(names):
        return label
    choices = ", ".join(f"{i}={n}" for i, n in enumerate(names))
    raise UserError(f"{where}: label {value!r} is not valid for task '{task.name}'; expected one of {choices}")


def _to_dataset(columns: dict[str, list], task: Task):
    import datasets

    features = {c: datasets.Value("string") for c in task.text_columns}
    features["label"] = datasets.Value("float32" if task.is_regression else "int64")
    features["idx"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def read_glue_split(folder: Path, task: Task, split: str):
    """One split of a task from the original GLUE download layout (glue_data/<TASK>/<file>.tsv)."""
    layout = task.local
    if layout is None:
        raise UserError(f"task '{task.name}' has no local GLUE layout; use the hub or dataset.*_file")
    if split not in layout.files:
        raise UserError(f"task '{task.name}' has no split '{split}' (it has {', '.join(layout.files)})")
    path = folder / layout.dir_name / layout.files[split]
    if not path.is_file():
        raise UserError(
            f"{path} not found: dataset.data_dir (or {GLUE_DIR_ENV}) must be a glue_data folder "
            f"holding {layout.dir_name}/{layout.files[split]}"
        )
    is_test = split.startswith("test")
    columns = layout.test_columns if is_test else dict(layout.columns)
    has_header = layout.test_has_header if is_test else layout.has_header
    header, rows = read_delimited(path, "\t", csv.QUOTE_NONE, has_header)

    def index_of(name: str | int) -> int:
        if isinstance(name, int):
            return name
        if name not in header:
            raise UserError(f"{path}: column '{name}' not found; the header has {', '.join(header)}")
        return header.index(name)

    text_idx = {col: index_of(columns[col]) for col in task.text_columns}
    idx_col = index_of(columns["idx"]) if "idx" in columns else None
    label_idx = None if is_test or layout.label is None else index_of(layout.label)
    # A file without a header is read by position (CoLA: source, label, original label, sentence).
    needed = 1 + max(i for i in (*text_idx.values(), idx_col, label_idx) if i is not None)
    line, fields = rows[0]  # (read_delimited: every row as wide as the first)
    if len(fields) < needed:
        raise UserError(f"{path}:{line}: {len(fields)} fields; task '{task.name}' reads {needed} from its {split} file "
                        f"({layout.dir_name}/{layout.files[split]} as GLUE ships it)")
    out: dict[str, list] = {c: [] for c in (*task.text_columns, "label", "idx")}
    for row_number, (line, fields) in enumerate(rows):
        for col, i in text_idx.items():
            out[col].append(fields[i])
        if label_idx is None:
            out["label"].append(UNLABELED)
        else:
            out["label"].append(parse_label(fields[label_idx], task, f"{path}:{line}", layout.label_map))
        out["idx"].append(_index(fields[idx_col], f"{path}:{line}") if idx_col is not None else row_number)
    return _to_dataset(out, task)


def _index(value: str, where: str) -> int:
    """A test file's example index: the submission's row key."""
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{where}: index {value!r} is not an integer (a test example's number, for the submission)") from None


def read_data_file(path: str | os.PathLike, task: Task, label_column: str = "label", labeled: bool = True):
    """A custom CSV / TSV / JSON Lines / Parquet file with named columns."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        # TSV has no quoting convention; CSV does (RFC 4180).
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        header, rows = read_delimited(path, delimiter, quoting, has_header=True)
        records = [(f"{path}:{line}", dict(zip(header, fields))) for line, fields in rows]
        columns = header
    elif suffix in (".jsonl", ".json"):
        records = []
        for line, text in enumerate(_decode(path).splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line}: not valid JSON: {err.msg}") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line}: expected a JSON object per line")
            records.append((f"{path}:{line}", record))
        if not records:
            raise UserError(f"{path}: no data rows")
        columns = list(records[0][1])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow's error types vary by fault
            raise UserError(f"{path}: not a readable Parquet file: {one_line(err)}") from None
        columns = table.column_names
        records = [(f"{path}: row {i + 1}", r) for i, r in enumerate(table.to_pylist())]
        if not records:
            raise UserError(f"{path}: no data rows")
    else:
        raise UserError(f"{path}: unsupported file type '{suffix}'; expected .csv, .tsv, .jsonl or .parquet")

    for col in task.text_columns:
        if col not in columns:
            raise UserError(f"{path}: text column '{col}' not found; the file has columns {', '.join(columns)}")
    if labeled and label_column not in columns:
        raise UserError(f"{path}: label column '{label_column}' not found; the file has columns {', '.join(columns)}")
    out: dict[str, list] = {c: [] for c in (*task.text_columns, "label", "idx")}
    for i, (where, record) in enumerate(records):
        for col in task.text_columns:
            value = record.get(col)
            if value is None:
                raise UserError(f"{where}: column '{col}' is empty")
            out[col].append(str(value))
        out["label"].append(parse_label(record.get(label_column), task, where) if labeled else UNLABELED)
        out["idx"].append(i)
    return _to_dataset(out, task)


def read_input_file(path: str | os.PathLike, task: Task) -> list[tuple[str, ...]]:
    """Texts to classify: a CSV/TSV/JSONL/Parquet with the task's columns, or one text per line."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        ds = read_data_file(path, task, labeled=False)
        return list(zip(*(ds[c] for c in task.text_columns)))
    if len(task.text_columns) != 1:
        raise UserError(
            f"{path}: task '{task.name}' takes pairs ({', '.join(task.text_columns)}); "
            "give a .csv, .tsv or .jsonl file with those columns"
        )
    lines = [line.rstrip("\r") for line in _decode(path).split("\n")]
    texts = [(line,) for line in lines if line.strip()]
    if not texts:
        raise UserError(f"{path}: no texts (expected one text per line)")
    return texts
