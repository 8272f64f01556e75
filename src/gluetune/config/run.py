"""The run configuration: one YAML file with sections `model`, `dataset`, `peft`, `training`.

Everything is validated here, before any model is loaded: an unknown key names the closest
valid one, a wrong type or value names what is accepted. `--set section.key=value` overrides
are applied to the raw YAML first (config.reading), so they are validated exactly like the file.
Loading a config imports no model code: a typo is reported before torch has loaded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import methods
from ..errors import UserError, did_you_mean
from ..files import atomic_write_text, is_local_path
from ..validation import check_section
from . import arguments, quantization
from .reading import SECTIONS, apply_overrides, read_yaml_file
from .tasks import Task, custom_task, get_task

GLUE_DIR_ENV = "GLUE_DIR"  # a local glue_data folder, used when dataset.data_dir is not set
CONFIG_FILENAME = "resolved_config.yaml"  # written into every output folder
# Where a run's files go, not what it learns: a run may be moved or resumed under another name.
OUTPUT_KEYS = ("training.output_dir", "training.logging_dir")


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id, local folder, or pkg:<python module> (see model.sources.resolve)
    num_labels: int | None = None  # defaults to the task's
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    # a GGUF checkpoint: a file name inside name_or_path (folder or hub repo), or a path (see model.sources)
    gguf_file: str | None = None
    # model config values to change at load, e.g. {hidden_dropout_prob: 0.0} (run_glue.py's --config_overrides)
    config_overrides: dict[str, Any] | None = None
    pooling: str | None = None  # None: the architecture's own head input; "mean": see model.classifier.use_mean_pooling
    # a quantized, frozen base under the adapters (QLoRA): 4bit, 8bit or BitsAndBytesConfig fields (see config.quantization)
    quantization: str | dict[str, Any] | None = None


POOLINGS = (None, "mean")


@dataclass
class DatasetConfig:
    name: str = "nyu-mll/glue"  # hub dataset, used when no local folder or files are given
    subset: str | None = None  # the GLUE task (cola, sst2, ...); None for a custom task
    data_dir: str | None = None  # local GLUE folder (glue_data layout); GLUE_DIR works too
    train_file: str | None = None  # custom CSV / TSV / JSONL / Parquet files
    validation_file: str | None = None
    test_file: str | None = None
    text_column: list[str] | None = None  # defaults to the task's input columns
    label_column: str = "label"
    label_names: list[str] | None = None  # custom tasks; [] means regression
    num_labels: int | None = None
    max_length: int = 256  # truncation only; batches are padded dynamically
    pad_to_multiple_of: int | None = None  # None: 8 on CUDA, none on the CPU
    cache_tokenized: bool = True  # keep tokenized splits on disk ($GLUETUNE_CACHE_DIR, ~/.cache/gluetune)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


_PATH_KEYS = ("data_dir", "train_file", "validation_file", "test_file")


@dataclass
class RunControl:
    """How this command treats the output folder: never part of the saved config."""

    resume: str | None = None  # None (a fresh run), "auto" (the latest complete checkpoint) or a checkpoint path
    overwrite: bool = False  # delete a previous gluetune run in the output folder first


@dataclass
class RunConfig:
    model: ModelConfig
    dataset: DatasetConfig
    peft: Any  # the method's own dataclass, see gluetune.methods
    training: dict[str, Any]
    source: str = "<config>"  # the file it came from, for messages
    task: Task | None = field(default=None, repr=False)
    control: RunControl = field(default_factory=RunControl, repr=False)

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_dict(self) -> dict[str, Any]:
        """The config as saved: every setting, no run control."""
        return {
            "model": dataclasses.asdict(self.model),
            "dataset": dataclasses.asdict(self.dataset),
            "peft": methods.to_dict(self.peft),
            "training": dict(self.training),
        }


# ---------------------------------------------------------------- the whole config


def _resolve_task(dataset: DatasetConfig, source: str) -> Task:
    if dataset.subset:
        try:
            task = get_task(dataset.subset)
        except UserError as err:
            raise UserError(f"{source}: dataset.subset: {err}") from None
        if dataset.text_column and tuple(dataset.text_column) != task.text_columns:
            raise UserError(
                f"{source}: dataset.text_column {dataset.text_column} does not match GLUE task "
                f"'{task.name}', whose input columns are {list(task.text_columns)}"
            )
        return task
    if not dataset.train_file:
        raise UserError(
            f"{source}: dataset.subset is missing; name a GLUE task (e.g. subset: cola) "
            "or give dataset.train_file with text_column and label_names for a custom task"
        )
    if not dataset.text_column:
        raise UserError(f"{source}: a custom dataset needs dataset.text_column (one or two column names)")
    if dataset.label_names is None:
        if not dataset.num_labels:
            raise UserError(f"{source}: a custom dataset needs dataset.label_names (or num_labels; [] for regression)")
        dataset.label_names = [str(i) for i in range(dataset.num_labels)]
    return custom_task(Path(dataset.train_file).stem, tuple(dataset.text_column), tuple(dataset.label_names))


def _absolute(path: str | None) -> str | None:
    """A local path as an absolute one: the saved config must not depend on where the run started."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def build_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key in raw:
        if key not in SECTIONS:
            raise UserError(
                f"{source}: unknown section '{key}'{did_you_mean(key, SECTIONS)}; expected {', '.join(SECTIONS)}"
            )
    model = check_section("model", raw.get("model"), ModelConfig, source)
    if not model.name_or_path:
        raise UserError(f"{source}: model.name_or_path is missing (a hub id such as Qwen/Qwen2.5-1.5B, or a folder)")
    if model.pooling not in POOLINGS:
        raise UserError(f"{source}: model.pooling: {model.pooling!r} is not valid; expected null (the model's own) or mean")
    if is_local_path(model.name_or_path):
        model.name_or_path = _absolute(model.name_or_path)
    if model.gguf_file and os.path.exists(os.path.expanduser(model.gguf_file)):
        model.gguf_file = _absolute(model.gguf_file)
    dataset = check_section("dataset", raw.get("dataset"), DatasetConfig, source)
    peft = methods.parse(raw.get("peft"), source)
    quantization.check(model.quantization, peft.method, source)
    task = _resolve_task(dataset, source)
    if len(task.text_columns) not in (1, 2):
        raise UserError(f"{source}: dataset.text_column: expected one or two columns, got {list(task.text_columns)}")

    for where, n in (("model.num_labels", model.num_labels), ("dataset.num_labels", dataset.num_labels)):
        if n is not None and n != task.num_labels:
            raise UserError(
                f"{source}: {where}: {n} does not match task '{task.name}', which has {task.num_labels} "
                f"label(s) ({', '.join(task.label_names) or 'regression'})"
            )
    model.num_labels = dataset.num_labels = task.num_labels
    if not dataset.data_dir and not dataset.train_file and os.environ.get(GLUE_DIR_ENV):
        dataset.data_dir = os.environ[GLUE_DIR_ENV]  # recorded, so the resolved config says where data came from
    for key in _PATH_KEYS:
        setattr(dataset, key, _absolute(getattr(dataset, key)))
    dataset.text_column = list(task.text_columns)
    for key in ("max_length", "max_train_samples", "max_eval_samples", "pad_to_multiple_of"):
        value = getattr(dataset, key)
        if value is not None and value < 1:
            raise UserError(f"{source}: dataset.{key}: {value} is not valid; expected a positive integer")

    training_raw = raw.get("training")
    control_raw = arguments.split_control(training_raw) if isinstance(training_raw, dict) else {}
    training = arguments.resolve_training(training_raw, source, task, Path(source).stem)
    arguments.check_trainer_kwargs(arguments.trainer_kwargs(training, task), source)
    control = RunControl(resume=control_raw.get("resume_from_checkpoint"),
                         overwrite=bool(control_raw.get("overwrite_output_dir")))
    return RunConfig(model=model, dataset=dataset, peft=peft, training=training, source=source, task=task,
                     control=control)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml_file(path)
    apply_overrides(raw, overrides or [])
    return build_config(raw, source=str(path))


def save_config(config: RunConfig, folder: str | os.PathLike) -> Path:
    path = Path(folder) / CONFIG_FILENAME
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def load_saved_config(folder: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """The config a run was trained with (its output folder's resolved config)."""
    return load_config(Path(folder) / CONFIG_FILENAME, overrides)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def setting_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`section.key (saved -> now)` for every setting that differs, output paths aside."""
    old, new = _flatten(saved), _flatten(current)
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in OUTPUT_KEYS]
    return [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys if old.get(k) != new.get(k)]


def check_same_settings(folder: str | os.PathLike, config: RunConfig, what: str) -> None:
    """Refuse to continue or reuse the run in `folder` when it was made with other settings."""
    path = Path(folder) / CONFIG_FILENAME
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    differences = setting_differences(saved, config.to_dict())
    if differences:
        shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        raise UserError(
            f"{what}: {folder} holds a run made with other settings: {shown}. Use the same settings, "
            "--overwrite to start it over, or another training.output_dir"
        )
