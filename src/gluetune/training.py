"""Training: the Hugging Face Trainer, set up for the run a config describes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TRAINING_EXTRAS, RunConfig, save_config
from .errors import UserError
from .io import atomic_write_json
from .speedups import accelerator_settings, use_fast_cpu_dropout

logger = logging.getLogger("gluetune")

METRICS_FILENAME = "metrics.json"
_TIMING_KEYS = {"runtime", "samples_per_second", "steps_per_second", "epoch"}


# ---------------------------------------------------------------- device and arguments


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_settings(training: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """bf16/fp16 as asked where the device has them, else fp32 with a notice.

    The reference config asks for bf16; on a CPU without native bf16 it must still run, and
    CPU autocast to bf16 is both slow and a numerics change nobody asked for.
    """
    import torch

    notices, settings = [], {}
    cuda = cuda_available()
    if training.get("bf16") and not (cuda and torch.cuda.is_bf16_supported()):
        settings["bf16"] = False
        notices.append(f"bf16 is not supported on this device ({_device_name()}); training in fp32")
    if training.get("fp16") and not cuda:
        settings["fp16"] = False
        notices.append(f"fp16 is not supported on this device ({_device_name()}); training in fp32")
    if training.get("tf32") and not cuda:
        settings["tf32"] = None
    return settings, notices


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def effective_training(config: RunConfig, quiet: bool = False) -> dict[str, Any]:
    """The TrainingArguments keyword arguments for this run on this machine."""
    training = dict(config.training)
    for key in TRAINING_EXTRAS:  # gluetune's own keys, handled here, not by TrainingArguments
        training.pop(key, None)
    precision, notices = precision_settings(training)
    training.update(precision)
    accelerators, more_notices = accelerator_settings(training, cuda_available())
    training.update(accelerators)
    notices += more_notices
    for notice in notices if not quiet else []:
        logger.warning(notice)

    # TensorBoard is written by our own callback into <output_dir>/logs (transformers v5 dropped
    # `logging_dir`); other reporters pass through.
    report_to = [r for r in training.get("report_to") or [] if r not in ("tensorboard", "all", "none")]
    training["report_to"] = report_to or "none"
    training.setdefault("logging_nan_inf_filter", False)  # a NaN loss must be seen, not filtered
    if not cuda_available():
        training.setdefault("dataloader_pin_memory", False)

    if training.get("gradient_checkpointing"):
        # Non-reentrant checkpointing lets gradients reach LoRA weights although the inputs of
        # the checkpointed blocks (frozen embeddings) do not require grad.
        training.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})

    validation_splits = config.task.validation_splits
    metric = training.get("metric_for_best_model")
    if metric and len(validation_splits) > 1 and not metric.startswith(validation_splits):
        # With several eval sets the Trainer prefixes each metric with its split's name.
        training["metric_for_best_model"] = f"{validation_splits[0]}_{metric.removeprefix('eval_')}"
    if not validation_splits:
        raise UserError(f"task '{config.task.name}' has no validation split to train against")
    return training


def training_arguments(config: RunConfig, quiet: bool = False):
    from transformers import TrainingArguments

    return TrainingArguments(**effective_training(config, quiet=quiet))


# ---------------------------------------------------------------- the run


def tensorboard_callback(log_dir: str):
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = log_dir  # the callback reopens its writer here after training, too
    return callback


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]  # what metrics.json holds
    model: Any  # the trained model as it was saved (the best checkpoint's weights)
    tokenizer: Any


def train(config: RunConfig) -> TrainOutcome:
    """Train, keep the best checkpoint, save adapter + head + tokenizer + config + metrics."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from . import data, models
    from .metrics import trainer_metrics_fn

    started = time.time()
    task, output_dir = config.task, config.output_dir
    args = training_arguments(config)
    set_seed(args.seed)  # before the model is built: the new head's initial weights are drawn from it

    tokenizer = models.load_tokenizer(config.model)
    raw = data.load_splits(config, ["train", *task.validation_splits])

    dtype = None
    if args.bf16 and config.peft.method != "full":
        dtype = torch.bfloat16  # frozen base weights need no fp32 master copy
    model = models.load_classifier(config.model, task, tokenizer.pad_token_id, dtype=dtype)
    model = models.make_trainable(model, config)
    logger.info("%s", models.describe_parameters(model))
    if config.training.get("fast_cpu_dropout", True) and not cuda_available():
        use_fast_cpu_dropout(model)

    max_length = config.dataset.max_length
    limit = models.max_model_length(model)
    if limit and max_length > limit:
        logger.warning("dataset.max_length=%d exceeds the model's limit of %d tokens; using %d", max_length, limit, limit)
        max_length = limit
    encoded = {split: data.tokenize(ds, tokenizer, task, max_length, split) for split, ds in raw.items()}
    # Evaluation order does not change any metric; sorted by length, batches carry little padding.
    evals = {s: encoded[s].sort("length") for s in task.validation_splits}
    eval_dataset = evals[task.validation_splits[0]] if len(evals) == 1 else evals

    pad_multiple = config.dataset.pad_to_multiple_of or (8 if cuda_available() else None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=eval_dataset,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple),
        processing_class=tokenizer,
        compute_metrics=trainer_metrics_fn(task),
        callbacks=[tensorboard_callback(config.training["logging_dir"])],
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir)
    result = trainer.train()

    validation = {}
    for split, ds in evals.items():
        scores = trainer.evaluate(eval_dataset=ds, metric_key_prefix="final")
        validation[split] = {
            k.removeprefix("final_"): v for k, v in scores.items() if k.removeprefix("final_") not in _TIMING_KEYS
        }
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))

    trainable, total = models.count_parameters(model)
    best = trainer.state.best_model_checkpoint
    metrics = {
        "task": task.name,
        "primary_metric": task.primary_metric,
        **validation,
        "best_checkpoint": Path(best).name if best else None,
        "best_metric": trainer.state.best_metric,
        "train": {
            "runtime_s": result.metrics.get("train_runtime"),
            "samples_per_second": result.metrics.get("train_samples_per_second"),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "loss": result.metrics.get("train_loss"),
        },
        "wall_s": round(time.time() - started, 2),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": _device_name(),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }
    atomic_write_json(output_dir / METRICS_FILENAME, metrics)
    primary = validation[task.validation_splits[0]]
    logger.info(
        "validation %s = %.4f (accuracy %.4f); saved to %s",
        task.primary_metric, primary[task.primary_metric], primary.get("accuracy", float("nan")), output_dir,
    )
    return TrainOutcome(metrics=metrics, model=trainer.model, tokenizer=tokenizer)
