"""The run configuration: one YAML file with sections `model`, `dataset`, `peft`, `training`.

Everything is validated here, before any model is loaded: an unknown key names the closest
valid one, a wrong type or value names what is accepted. `--set section.key=value` overrides
are applied to the raw YAML first, so they are validated exactly like the file.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import methods
from .errors import UserError, did_you_mean, one_line
from .tasks import Task, custom_task, get_task

SECTIONS = ("model", "dataset", "peft", "training")
GLUE_DIR_ENV = "GLUE_DIR"  # a local glue_data folder, used when dataset.data_dir is not set
CONFIG_FILENAME = "resolved_config.yaml"  # written into every output folder


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id, local folder, or pkg:<python module> (see models.resolve_model_path)
    num_labels: int | None = None  # defaults to the task's
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    # model config values to change at load, e.g. {hidden_dropout_prob: 0.0} (run_glue.py's --config_overrides)
    config_overrides: dict[str, Any] | None = None
    pooling: str | None = None  # None: the architecture's own head input; "mean": see models.use_mean_pooling


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


@dataclass
class RunConfig:
    model: ModelConfig
    dataset: DatasetConfig
    peft: Any  # the method's own dataclass, see gluetune.methods
    training: dict[str, Any]
    source: str = "<config>"  # the file it came from, for messages
    task: Task | None = field(default=None, repr=False)

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "dataset": dataclasses.asdict(self.dataset),
            "peft": methods.to_dict(self.peft),
            "training": dict(self.training),
        }


# ---------------------------------------------------------------- YAML reading


class _Loader(yaml.SafeLoader):
    """YAML as users mean it (the YAML 1.2 reading): `3e-4` is a float, and only true/false are
    booleans, so `save_strategy: no` stays the string "no" instead of turning into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _no_duplicate_keys(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise UserError(f"line {mark.line + 1}, column {mark.column + 1}: key '{key}' appears twice")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(f"{source}: malformed YAML at {where}{err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{source}: malformed YAML: {one_line(err)}") from None


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise UserError(f"{path}: the config is empty; expected sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """`section.key=value` (value parsed as YAML); nested keys go deeper: `training.a.b=1`."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"{source} {item!r}: expected section.key=value, e.g. training.learning_rate=2e-4")
        path, value_text = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) < 2 or not all(keys):
            raise UserError(f"{source} {item!r}: expected section.key=value, e.g. peft.lora_r=16")
        value = parse_yaml(value_text, f"{source} {path}") if value_text.strip() else None
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise UserError(f"{source} {path}: '{key}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


# ---------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if _enum_choices(tp):  # `SomeEnum | str`: the str stands for the enum's values
            args = [a for a in args if a is not str]
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, str) and value in {m.value for m in tp}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # A str member next to an enum (e.g. `OptimizerNames | str`) stands for the enum's values.
        args = typing.get_args(tp)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and str in args and isinstance(value, str):
            return any(_matches(value, e) for e in enums)
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item_tp) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _enum_choices(tp: Any) -> list[str]:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [str(m.value) for m in tp]
    return [c for a in typing.get_args(tp) for c in _enum_choices(a)]


def check_value(where: str, value: Any, tp: Any) -> Any:
    """Raise a one-line UserError unless `value` fits annotation `tp`; lists accept a scalar."""
    origin = typing.get_origin(tp)
    wants_list = origin in (list, tuple) or any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(tp))
    if wants_list and isinstance(value, str) and not _matches(value, tp):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if _matches(value, tp):
        return value
    choices = _enum_choices(tp)
    hint = did_you_mean(value, choices) if isinstance(value, str) and choices else ""
    raise UserError(f"{where}: {value!r} is not valid{hint}; expected {_type_name(tp)}")


def _check_section(section: str, raw: Any, cls: type, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: '{section}' must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        if key not in hints:
            raise UserError(
                f"{source}: unknown key '{section}.{key}'{did_you_mean(key, names)}; "
                f"valid keys: {', '.join(names)}"
            )
        raw[key] = check_value(f"{source}: {section}.{key}", value, hints[key])
    return cls(**raw)


# ---------------------------------------------------------------- training section

# Keys gluetune adds to TrainingArguments' own: names transformers v4 users write, which v5 dropped.
TRAINING_EXTRAS: dict[str, Any] = {
    "logging_dir": str | None,  # TensorBoard event files; default <output_dir>/logs
    "warmup_ratio": float | None,  # v5 takes a fraction < 1 as `warmup_steps`
    "fast_cpu_dropout": bool,  # speedups.FastCpuDropout when training on a CPU (default true)
    "cpu_heap_limit": bool,  # speedups.limit_cpu_heap_growth when training on a CPU (default true)
    "length_group_batches": int | None,  # batches per length-sorted group (sampling.LengthGroupedSampler)
    "overwrite_output_dir": bool,  # start over in a non-empty output folder (v4 name; --overwrite)
}


def _training_arg_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _check_training(raw: Any, source: str, task: Task, config_stem: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: 'training' must be a mapping of TrainingArguments names to values")
    types_ = {**_training_arg_types(), **TRAINING_EXTRAS}
    for key, value in raw.items():
        if key not in types_:
            raise UserError(
                f"{source}: unknown key 'training.{key}'{did_you_mean(key, types_)}; "
                "expected a transformers.TrainingArguments name"
            )
        raw[key] = check_value(f"{source}: training.{key}", value, types_[key])

    ratio = raw.pop("warmup_ratio", None)
    if ratio is not None:
        if raw.get("warmup_steps"):
            raise UserError(f"{source}: give training.warmup_ratio or training.warmup_steps, not both")
        if not 0 <= ratio < 1:
            raise UserError(f"{source}: training.warmup_ratio: {ratio} is not valid; expected a number in [0, 1)")
        raw["warmup_steps"] = float(ratio)

    groups = raw.get("length_group_batches")
    if groups is not None and groups < 1:
        raise UserError(f"{source}: training.length_group_batches: {groups} is not valid; expected a positive integer (or null)")

    # Defaults that make the reference run what users expect from run_glue.py + PEFT, made explicit
    # so the resolved config shows every value that mattered.
    greater = not task.primary_metric.endswith("loss")
    defaults = {
        "output_dir": f"./outputs/{config_stem}",
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "logging_strategy": "steps",
        "logging_steps": 10,
        "load_best_model_at_end": True,
        "metric_for_best_model": task.primary_metric,
        "greater_is_better": greater,
        "save_total_limit": 2,
        "report_to": ["tensorboard"],
        "seed": 42,
        "per_device_eval_batch_size": 64,
        "train_sampling_strategy": "group_by_length",
    }
    resolved = {**defaults, **raw}
    if isinstance(resolved["report_to"], str):
        resolved["report_to"] = [resolved["report_to"]]
    resolved.setdefault("logging_dir", os.path.join(resolved["output_dir"], "logs"))
    metric = resolved["metric_for_best_model"]
    known = {"loss", *task.metrics, *(m.removeprefix("eval_") for m in task.metrics)}
    if metric and metric.removeprefix("eval_") not in known:
        raise UserError(
            f"{source}: training.metric_for_best_model: '{metric}' is not a metric of task "
            f"'{task.name}'{did_you_mean(metric, known)}; expected one of {', '.join(sorted(known))}"
        )
    return resolved


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


def build_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key in raw:
        if key not in SECTIONS:
            raise UserError(
                f"{source}: unknown section '{key}'{did_you_mean(key, SECTIONS)}; expected {', '.join(SECTIONS)}"
            )
    model = _check_section("model", raw.get("model"), ModelConfig, source)
    if not model.name_or_path:
        raise UserError(f"{source}: model.name_or_path is missing (a hub id such as Qwen/Qwen2.5-1.5B, or a folder)")
    if model.pooling not in POOLINGS:
        raise UserError(f"{source}: model.pooling: {model.pooling!r} is not valid; expected null (the model's own) or mean")
    dataset = _check_section("dataset", raw.get("dataset"), DatasetConfig, source)
    peft = methods.parse(raw.get("peft"), source, check=_check_section)
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
    dataset.text_column = list(task.text_columns)
    for key in ("max_length", "max_train_samples", "max_eval_samples", "pad_to_multiple_of"):
        value = getattr(dataset, key)
        if value is not None and value < 1:
            raise UserError(f"{source}: dataset.{key}: {value} is not valid; expected a positive integer")

    training = _check_training(raw.get("training"), source, task, Path(source).stem)
    config = RunConfig(model=model, dataset=dataset, peft=peft, training=training, source=source, task=task)
    check_training_arguments(config)
    return config


def check_training_arguments(config: RunConfig) -> None:
    """Let TrainingArguments itself judge the combination of values, before any model loads."""
    from .training import training_arguments  # local: training imports this module

    try:
        training_arguments(config, quiet=True)
    except (ValueError, TypeError) as err:
        raise UserError(f"{config.source}: training: {one_line(err)}") from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml_file(path)
    apply_overrides(raw, overrides or [])
    return build_config(raw, source=str(path))


def save_config(config: RunConfig, folder: str | os.PathLike) -> Path:
    from .io import atomic_write_text

    path = Path(folder) / CONFIG_FILENAME
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def load_saved_config(folder: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """The config a run was trained with (its output folder's resolved config)."""
    return load_config(Path(folder) / CONFIG_FILENAME, overrides)
