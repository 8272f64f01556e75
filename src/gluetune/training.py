"""Training: the Hugging Face Trainer, set up for the run a config describes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from . import data, methods, models, rundir
from .callbacks import GracefulStop, SingleClassWarning, tensorboard_callback
from .config import TRAINING_EXTRAS, RunConfig, save_config
from .errors import RunInterrupted, TrainingDiverged, UserError
from .io import atomic_write_json
from .metrics import trainer_metrics_fn
from .sampling import LengthGroupedSampler
from .speedups import accelerator_settings, limit_cpu_heap_growth, use_fast_cpu_dropout

logger = logging.getLogger("gluetune")

_TIMING_KEYS = {"runtime", "samples_per_second", "steps_per_second", "epoch"}


# ---------------------------------------------------------------- device and arguments


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name(0) if cuda_available() else "cpu"


def precision_settings(training: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """bf16/fp16 as asked where the device has them, else fp32 with a notice.

    The reference config asks for bf16; on a CPU without native bf16 it must still run, and
    CPU autocast to bf16 is both slow and a numerics change nobody asked for.
    """
    notices, settings = [], {}
    cuda = cuda_available()
    if training.get("bf16") and not (cuda and torch.cuda.is_bf16_supported()):
        settings["bf16"] = False
        notices.append(f"bf16 is not supported on this device ({device_name()}); training in fp32")
    if training.get("fp16") and not cuda:
        settings["fp16"] = False
        notices.append(f"fp16 is not supported on this device ({device_name()}); training in fp32")
    if training.get("tf32") and not cuda:
        settings["tf32"] = None
    return settings, notices


def effective_training(config: RunConfig, quiet: bool = False) -> dict[str, Any]:
    """The TrainingArguments keyword arguments for this run on this machine."""
    training = dict(config.training)
    for key in (*TRAINING_EXTRAS, "resume_from_checkpoint"):  # handled by gluetune, not TrainingArguments
        training.pop(key, None)
    precision, notices = precision_settings(training)
    accelerators, more_notices = accelerator_settings(training, cuda_available())
    training.update(precision)
    training.update(accelerators)
    for notice in [] if quiet else notices + more_notices:
        logger.warning(notice)

    # TensorBoard is written by our own callback into <output_dir>/logs; other reporters pass through.
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
    if not validation_splits:
        raise UserError(f"task '{config.task.name}' has no validation split to train against")
    metric = training.get("metric_for_best_model")
    if metric and len(validation_splits) > 1 and not metric.startswith(validation_splits):
        # With several eval sets the Trainer prefixes each metric with its split's name.
        training["metric_for_best_model"] = f"{validation_splits[0]}_{metric.removeprefix('eval_')}"
    return training


def training_arguments(config: RunConfig, quiet: bool = False) -> TrainingArguments:
    return TrainingArguments(**effective_training(config, quiet=quiet))


# ---------------------------------------------------------------- the trainer


class GluetuneTrainer(Trainer):
    """The Hugging Face Trainer with two changes: our length-grouped sampler, and a loss check."""

    def __init__(self, *args, length_group_batches: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.length_group_batches = length_group_batches  # None: the sampler's default

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length" or self.args.world_size > 1:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Lengths come from the tokenized set (the Trainer drops the column before sampling).
        return LengthGroupedSampler(self.train_dataset["length"], self._train_batch_size, seed=seed,
                                    mega_batch_mult=self.length_group_batches)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(self._divergence_message(loss.item()))
        return loss

    def _divergence_message(self, loss: float) -> str:
        last = rundir.latest_checkpoint(Path(self.args.output_dir))
        kept = f"the last good checkpoint, {last.name}, is intact" if last else "no checkpoint was saved yet"
        remedies = ["a lower training.learning_rate"]
        if not self.args.warmup_steps:
            remedies.append("warmup (training.warmup_ratio=0.1)")
        if self.args.bf16 or self.args.fp16:
            remedies.append("fp32 (training.bf16=false)")
        if not self.args.max_grad_norm:
            remedies.append("gradient clipping (training.max_grad_norm=1.0)")
        return (
            f"training diverged: the loss is {loss} at step {self.state.global_step + 1} "
            f"(epoch {self.state.epoch or 0:.2f}); {kept}. Usual remedies: {', '.join(remedies)}"
        )


# ---------------------------------------------------------------- the run


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]  # what metrics.json holds
    model: Any = None  # the trained model as saved (the best checkpoint's weights); None if not trained now
    tokenizer: Any = None


def train(config: RunConfig) -> TrainOutcome:
    """Train, keep the best checkpoint, save adapter + head + tokenizer + config + metrics."""
    output_dir = config.output_dir
    resume = config.training.get("resume_from_checkpoint")
    with rundir.OutputDirLock(output_dir):
        if resume and rundir.is_finished(output_dir):
            logger.info("%s already holds a finished run; nothing to do (--overwrite to train again)", output_dir)
            return TrainOutcome(metrics=rundir.read_metrics(output_dir))
        checkpoint = rundir.prepare(output_dir, resume, bool(config.training.get("overwrite_output_dir")))
        return _train_in(config, checkpoint)


def _train_in(config: RunConfig, checkpoint: Path | None) -> TrainOutcome:
    started = time.time()
    task, output_dir = config.task, config.output_dir
    args = training_arguments(config)
    set_seed(args.seed)  # before the model is built: the new head's initial weights are drawn from it

    tokenizer = models.load_tokenizer(config.model)
    raw = data.load_splits(config, ["train", *task.validation_splits])

    # Frozen base weights need no fp32 master copy: under bf16 they load in bf16 (half the memory).
    dtype = torch.bfloat16 if args.bf16 and config.peft.method != "full" else torch.float32
    model = models.load_classifier(config.model, task, tokenizer.pad_token_id, dtype=dtype)
    model = models.make_trainable(model, config)
    logger.info("%s", models.describe_parameters(model))
    if not cuda_available():
        if config.training.get("fast_cpu_dropout", True):
            use_fast_cpu_dropout(model)
        if config.training.get("cpu_heap_limit", True):
            limit_cpu_heap_growth()

    max_length = config.dataset.max_length
    limit = models.max_model_length(model)
    if limit and max_length > limit:
        logger.warning("dataset.max_length=%d exceeds the model's limit of %d tokens; using %d", max_length, limit, limit)
        max_length = limit
    encoded = {split: data.tokenize(ds, tokenizer, task, max_length, split, cache=config.dataset.cache_tokenized)
               for split, ds in raw.items()}
    # Evaluation order does not change any metric; sorted by length, batches carry little padding.
    evals = {s: encoded[s].sort("length") for s in task.validation_splits}
    eval_dataset = evals[task.validation_splits[0]] if len(evals) == 1 else evals

    stop = GracefulStop()
    pad_multiple = config.dataset.pad_to_multiple_of or (8 if cuda_available() else None)
    trainer = GluetuneTrainer(
        model=model,
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=eval_dataset,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple),
        processing_class=tokenizer,
        compute_metrics=trainer_metrics_fn(task),
        optimizers=(methods.optimizer(model, config.peft, args), None),
        callbacks=[tensorboard_callback(config.training["logging_dir"]), stop, SingleClassWarning()],
        length_group_batches=config.training.get("length_group_batches"),
    )
    save_config(config, output_dir)
    rundir.write_record(output_dir, args.seed, data.source_files(config, list(raw)), checkpoint)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        stop.uninstall()
    if stop.received is not None:
        last = rundir.latest_checkpoint(output_dir)
        raise RunInterrupted(
            f"stopped by signal {stop.received} at step {trainer.state.global_step}; checkpoint {last} saved. "
            "Continue with: gluetune train --config ... --resume", stop.received
        )

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
        "primary_split": task.validation_splits[0],
        **validation,
        "best_checkpoint": Path(best).name if best else None,
        "best_metric": trainer.state.best_metric,
        "train": {
            "runtime_s": result.metrics.get("train_runtime"),
            "samples_per_second": result.metrics.get("train_samples_per_second"),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "loss": result.metrics.get("train_loss"),
            "resumed_from": checkpoint.name if checkpoint else None,
        },
        "wall_s": round(time.time() - started, 2),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": device_name(),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }
    atomic_write_json(output_dir / rundir.METRICS_FILENAME, metrics)
    primary = validation[task.validation_splits[0]]
    logger.info(
        "validation %s = %.4f (accuracy %.4f); saved to %s",
        task.primary_metric, primary[task.primary_metric], primary.get("accuracy", float("nan")), output_dir,
    )
    if primary.get("predicted_classes") == 1:
        logger.warning("DEGENERATE RUN: the final model predicts one class for every validation example")
    return TrainOutcome(metrics=metrics, model=trainer.model, tokenizer=tokenizer)
