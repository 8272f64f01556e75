"""The `training:` section as `TrainingArguments` keyword arguments: names, defaults, checks.

Pure and machine-independent: a config resolves to the same values on a laptop and on a GPU node,
and `TrainingArguments` itself judges them when the config loads (its device set-up skipped, so
loading a config neither starts a process group nor depends on the GPU). What depends on the
machine (bf16 where the GPU has it, optional kernels where installed) is `training`'s business.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from functools import cached_property
from typing import Any

from ..errors import UserError, did_you_mean, one_line
from ..files import installed_version
from ..validation import check_value
from .tasks import Task

# Keys gluetune adds to TrainingArguments' own (v4 names v5 dropped, and gluetune's switches).
GLUETUNE_KEYS: dict[str, Any] = {
    "logging_dir": str | None,  # TensorBoard event files; default <output_dir>/logs
    "warmup_ratio": float | None,  # v5 takes a fraction < 1 as `warmup_steps`
    "fast_cpu_dropout": bool,  # speedups.FastCpuDropout when training on a CPU (default true)
    "cpu_mmap_threshold": bool,  # speed.cpu.lower_cpu_mmap_threshold, by the command line on a CPU (default true)
    "length_group_batches": int | None,  # optimizer steps per length-sorted group (sampling.LengthGroupedBatches)
    "fast_path": bool,  # fastpath: one micro-batch per step, padded length buckets, compiled layers (default false)
    "cuda_graphs": bool,  # cudagraphs: the fast path's steps as captured CUDA graphs (default false; unproven)
    "overwrite_output_dir": bool,  # run control (v4 name; --overwrite), never saved
}
# Run control: how this command treats the output folder, not what the run is. Kept out of the
# saved config, so re-running a run from its own resolved_config.yaml never deletes or resumes it.
RUN_CONTROL_KEYS = ("resume_from_checkpoint", "overwrite_output_dir")
# Earlier names of gluetune's keys, still read (configs and saved runs that use them): old -> new.
RENAMED_KEYS = {"cpu_heap_limit": "cpu_mmap_threshold"}
# Metrics where lower is better; every other metric gluetune reports is higher-is-better.
LOWER_IS_BETTER = ("loss", "mse")
# The fast path's default evaluation batch: its padded buckets make large batches cheap. An explicit
# per_device_eval_batch_size is kept.
FAST_PATH_EVAL_BATCH = 256


def training_argument_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def lower_is_better(metric: str) -> bool:
    return metric.endswith(LOWER_IS_BETTER)


def split_control(raw: dict[str, Any]) -> dict[str, Any]:
    """Remove the run-control keys from a raw `training:` section and return them."""
    return {key: raw.pop(key) for key in RUN_CONTROL_KEYS if key in raw}


def resolve_training(raw: Any, source: str, task: Task, config_stem: str) -> dict[str, Any]:
    """The `training:` section checked key by key, v4 names translated, and every default that
    matters made explicit (so the saved config shows them)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: 'training' must be a mapping of TrainingArguments names to values")
    types_ = {**training_argument_types(), **GLUETUNE_KEYS}
    for old, new in RENAMED_KEYS.items():
        if old in raw:
            if new in raw:
                raise UserError(f"{source}: training.{old} is the earlier name of training.{new}; give only {new}")
            raw[new] = raw.pop(old)
    for key, value in raw.items():
        if key not in types_:
            raise UserError(
                f"{source}: unknown key 'training.{key}'{did_you_mean(key, types_)}; "
                "expected a transformers.TrainingArguments name"
            )
        raw[key] = check_value(f"{source}: training.{key}", value, types_[key])

    if raw.get("hub_token"):
        raise UserError(f"{source}: training.hub_token: a token would be saved in resolved_config.yaml, run_record.json "
                        "and the model card (and pushed with them); log in with `hf auth login` or set HF_TOKEN instead")
    ratio = raw.pop("warmup_ratio", None)
    if ratio is not None:
        if raw.get("warmup_steps"):
            raise UserError(f"{source}: give training.warmup_ratio or training.warmup_steps, not both")
        if not 0 <= ratio < 1:
            raise UserError(f"{source}: training.warmup_ratio: {ratio} is not valid; expected a number in [0, 1)")
        raw["warmup_steps"] = float(ratio)

    if raw.get("cuda_graphs") and not raw.get("fast_path"):
        raise UserError(f"{source}: training.cuda_graphs needs training.fast_path: true (its padded length buckets are "
                        "the few shapes a graph is captured for); set both, or remove cuda_graphs")
    groups = raw.get("length_group_batches")
    if groups is not None and groups < 1:
        raise UserError(f"{source}: training.length_group_batches: {groups} is not valid; expected a positive integer (or null)")

    # Defaults that make the reference run what users expect from run_glue.py + PEFT.
    defaults = {
        "output_dir": f"./outputs/{config_stem}",
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "logging_strategy": "steps",
        "logging_steps": 10,
        "load_best_model_at_end": True,
        "metric_for_best_model": task.primary_metric,
        "save_total_limit": 2,
        "report_to": ["tensorboard"],
        "seed": 42,
        "per_device_eval_batch_size": FAST_PATH_EVAL_BATCH if raw.get("fast_path") else 64,
        "train_sampling_strategy": "group_by_length",
    }
    resolved = {**defaults, **raw}
    if isinstance(resolved["report_to"], str):
        resolved["report_to"] = [resolved["report_to"]]
    resolved.setdefault("logging_dir", os.path.join(resolved["output_dir"], "logs"))
    metric = resolved["metric_for_best_model"]
    if metric:
        resolved["metric_for_best_model"] = metric = _checked_metric(metric, task, source)
        _check_direction(resolved, metric, "greater_is_better" in raw, source)
    return resolved


def _checked_metric(metric: str, task: Task, source: str) -> str:
    """A metric of the task, as written or with `eval_` or a validation split's name before it."""
    known = {"loss", *task.metrics}
    name = metric.removeprefix("eval_")
    for split in task.validation_splits if len(task.validation_splits) > 1 else ():  # one set: no prefix
        if name.startswith(f"{split}_") and name.removeprefix(f"{split}_") in known:
            return metric
    if name not in known:
        spelled = sorted(known) + [f"{s}_{m}" for s in task.validation_splits[1:] for m in sorted(known)]
        raise UserError(
            f"{source}: training.metric_for_best_model: '{metric}' is not a metric of task "
            f"'{task.name}'{did_you_mean(name, spelled)}; expected one of {', '.join(spelled)}"
        )
    return metric


def _check_direction(resolved: dict[str, Any], metric: str, given: bool, source: str) -> None:
    """`greater_is_better` follows the chosen metric; a value that contradicts it is refused
    (it would keep the worst checkpoint)."""
    greater = not lower_is_better(metric)
    if not given:
        resolved["greater_is_better"] = greater
    elif resolved["greater_is_better"] is not None and resolved["greater_is_better"] != greater:
        raise UserError(
            f"{source}: training.greater_is_better: {str(resolved['greater_is_better']).lower()} contradicts "
            f"metric_for_best_model '{metric}', where {'higher' if greater else 'lower'} is better; "
            f"set it to {str(greater).lower()} or remove it"
        )


def trainer_kwargs(training: dict[str, Any], task: Task) -> dict[str, Any]:
    """The `TrainingArguments` keyword arguments of a resolved `training:` section."""
    kwargs = {k: v for k, v in training.items() if k not in GLUETUNE_KEYS and k not in RUN_CONTROL_KEYS}
    # gluetune pushes the finished folder once (hub.py); the Trainer would push every checkpoint.
    kwargs["push_to_hub"] = False
    kwargs.setdefault("logging_nan_inf_filter", False)  # a NaN loss must be seen, not filtered
    if kwargs.get("gradient_checkpointing"):
        # Non-reentrant checkpointing lets gradients reach LoRA weights although the inputs of
        # the checkpointed blocks (frozen embeddings) do not require grad.
        kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    if not task.validation_splits:
        raise UserError(f"task '{task.name}' has no validation split to train against")
    metric = kwargs.get("metric_for_best_model")
    splits = task.validation_splits
    if metric and len(splits) > 1 and not metric.removeprefix("eval_").startswith(splits):
        # With several eval sets the Trainer prefixes each metric with its split's name; the
        # first split (MNLI: matched) picks the best checkpoint.
        kwargs["metric_for_best_model"] = f"{splits[0]}_{metric.removeprefix('eval_')}"
    return kwargs


def _offline_arguments_class():
    from transformers import TrainingArguments

    class OfflineArguments(TrainingArguments):
        """TrainingArguments whose checks run without setting up devices or a process group."""

        @cached_property
        def _setup_devices(self):
            import torch

            self.distributed_state = None
            self._n_gpu = 0
            return torch.device("cpu")

    return OfflineArguments


# Machine-dependent flags, neutralised for the load-time check (training applies them per machine).
_MACHINE_FLAGS = {"bf16": False, "fp16": False, "tf32": None, "use_liger_kernel": False, "use_cpu": False}


def check_trainer_kwargs(kwargs: dict[str, Any], source: str) -> None:
    """Let TrainingArguments judge the combination of values, before any model loads."""
    if kwargs.get("deepspeed") and installed_version("deepspeed") is None:  # (TrainingArguments raises its own error)
        raise UserError(f"{source}: training.deepspeed: the deepspeed package is not installed (pip install "
                        "deepspeed; it needs CUDA); configs/accelerate/fsdp.yaml shards without it")
    try:
        _offline_arguments_class()(**{**kwargs, **_MACHINE_FLAGS})
    except (ValueError, TypeError) as err:
        raise UserError(f"{source}: training: {one_line(err)}") from None
    except OSError as err:  # a JSON file a value names (accelerator_config, fsdp_config, ...), read as it loads
        keys = [key for key, value in kwargs.items() if isinstance(value, str) and value == err.filename]
        raise UserError(f"{source}: training{'.' + keys[0] if keys else ''}: cannot read {err.filename!r} "
                        f"({err.strerror or one_line(err)}); expected the path of a JSON file, or its settings "
                        "inline") from None
