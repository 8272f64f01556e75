"""Training: the run a config describes, on this machine, in one process or many.

The same code runs in every process of a `torchrun` / `accelerate launch` job (a single process is
a job of one): only the main process takes the output folder's lock, prepares the folder and
writes files; the others wait for it where they must and take every decision with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .. import methods
from ..config import quantization
from ..config.run import RunConfig, check_same_settings, save_config
from ..data.loading import hub_source, load_splits, source_files
from ..data.tokenizing import tokenize
from ..errors import RunInterrupted, UserError
from ..files import atomic_write_json, atomic_write_text
from ..model import classifier as models
from ..model import precision, provenance
from ..model.precision import cpu_bf16
from ..results import card, hub, metrics, rundir
from ..results.report import write_run_report
from . import distributed, outputdir
from .callbacks import CompleteLossLog, GracefulStop, LossWatch, RunTensorBoard, SingleClassWarning
from .progress import ConsoleProgress
from .speed import cudagraphs, fastpath
from .speed.cpu import use_fast_cpu_dropout
from .speed.lora import skip_lora_input_casts
from .trainer import GluetuneTrainer
from .training_args import (
    batch_factors,
    cuda_available,
    device_name,
    optimizer_name,
    precision_of,
    reporting,
    training_arguments,
)

logger = logging.getLogger("gluetune")


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]  # what metrics.json holds
    model: Any = None  # the trained model as saved (the best checkpoint's weights); None if not trained now
    tokenizer: Any = None
    predictions: dict[str, Any] | None = None  # validation split -> PredictionOutput of the final model


def train(config: RunConfig, callbacks: list | None = None) -> TrainOutcome:
    """Train, keep the best checkpoint, save adapter + head + tokenizer + config + metrics.
    `callbacks`: more TrainerCallbacks for this run (e.g. a benchmark's timers)."""
    args = training_arguments(config)
    output_dir = config.output_dir
    created = not output_dir.exists()
    lock = outputdir.OutputDirLock(output_dir) if distributed.is_main_process() else None
    try:
        finished, checkpoint, started_in = distributed.run_on_main(
            lambda: _prepare_folder(config, lock, batch_factors(args)), UserError)
        if finished:
            logger.info("%s already holds a finished run; nothing to do (--overwrite to train again)", output_dir)
            return TrainOutcome(metrics=rundir.read_metrics(output_dir))
        if checkpoint is not None and started_in not in (None, precision_of(args)):
            if distributed.is_main_process():
                logger.warning("resuming in %s, the precision this run started in", started_in)
            args = training_arguments(config, quiet=True, precision=started_in)
        return _train_in(config, args, checkpoint, callbacks or [])
    finally:
        # Only the lock's holder may clean up, and before it lets go: a refused start must not take
        # away the lock of the run that holds the folder.
        if lock is not None and lock.held:
            outputdir.remove_if_unused(output_dir, created)
            lock.release()


def _prepare_folder(config: RunConfig, lock: outputdir.OutputDirLock,
                    batch: dict[str, int]) -> tuple[bool, Path | None, str | None]:
    """(whether the folder holds this run finished, the checkpoint to resume, the precision the run
    started in). Main process only."""
    hub.check_can_push(config.training)
    lock.acquire()
    output_dir, control = config.output_dir, config.control
    if control.resume and not control.overwrite:
        check_same_settings(output_dir, config, "--resume")
        if rundir.is_finished(output_dir):
            return True, None, None
        outputdir.check_same_batch(output_dir, batch)
    checkpoint = outputdir.prepare(output_dir, control.resume, control.overwrite)
    # Runs recorded before the precision was: on the CPU they trained in fp32 (bf16 ran on GPUs only).
    started_in = rundir.read_record(output_dir).get("precision") or (None if cuda_available() else "fp32")
    return False, checkpoint, started_in if checkpoint is not None else None


def _train_in(config: RunConfig, args: TrainingArguments, checkpoint: Path | None, callbacks: list) -> TrainOutcome:
    started = time.time()
    set_seed(args.seed)  # before the model is built: the new head's initial weights are drawn from it
    tokenizer, model = _load_model(_as_started(config, checkpoint), args)
    raw, encoded = _load_data(config, args, tokenizer, model)
    # Evaluation order does not change any metric; sorted by length, batches carry little padding.
    evals = {s: encoded[s].sort("length") for s in config.task.validation_splits}
    stop, board = GracefulStop(), _tensorboard(config)
    trainer = _build_trainer(config, args, tokenizer, model, encoded["train"], evals, [board, stop, *callbacks])
    with _fast_path(config, trainer, encoded["train"], evals):  # its compiling and capture come first
        if distributed.is_main_process():
            _record_start(config, args, trainer, raw, checkpoint)
        stop.install()
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            stop.uninstall()
        if stop.received is not None:
            raise RunInterrupted(
                f"stopped by signal {stop.received} at step {trainer.state.global_step}; checkpoint "
                f"{rundir.latest_checkpoint(config.output_dir)} saved. Continue with: gluetune train --config ... --resume",
                stop.received,
            )
        predictions = {split: trainer.predict(ds, metric_key_prefix="final") for split, ds in evals.items()}
    trainer.save_model(str(config.output_dir))  # every process: a sharded model is gathered first
    summary = _summary(config, args, trainer, result, predictions, checkpoint, started)
    if distributed.is_main_process():
        _write_outputs(config, trainer, tokenizer, evals, predictions, summary, board)
    distributed.wait_for_everyone()
    return TrainOutcome(metrics=summary, model=trainer.model, tokenizer=tokenizer, predictions=predictions)


def _record_start(config: RunConfig, args: TrainingArguments, trainer, raw: dict, checkpoint: Path | None) -> None:
    """The run's config and record in its folder, and how it trains (main process)."""
    save_config(config, config.output_dir)
    batch = batch_factors(args)
    outputdir.write_record(config.output_dir, args.seed, source_files(config, list(raw)), checkpoint, batch,
                           precision_of(args),
                           quantization.describe(config.model.quantization) if config.model.quantization else None,
                           optimizer=optimizer_name(args), model_source=provenance.model_source(config.model),
                           hub_data=hub_source(config, raw))
    logger.info("effective batch %s%s", rundir.describe_batch(batch), _parallelism(trainer))
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)


def _as_started(config: RunConfig, checkpoint: Path | None) -> RunConfig:
    """For a resumed run, the config with the hub commit its start recorded (rundir.pin_recorded_revision):
    the branch may have moved since. The config saved in the folder stays as the user wrote it."""
    if checkpoint is None:
        return config
    pinned = dataclasses.replace(config, model=dataclasses.replace(config.model))
    rundir.pin_recorded_revision(pinned, config.output_dir)
    return pinned


def _load_model(config: RunConfig, args: TrainingArguments):
    # model.precision's rule, which every reading of the folder follows too
    dtype = precision.of_run(precision_of(args), config.peft.method == "full").load_dtype
    with args.main_process_first(desc="fetching the model"):  # one download or GGUF conversion, then the cache
        tokenizer = models.load_tokenizer(config.model)
        model = models.load_classifier(config.model, config.task, tokenizer.pad_token_id, dtype=dtype)
    model = models.make_trainable(model, config)
    if distributed.is_main_process():
        if config.model.quantization:
            logger.info("base model: %s; LoRA and the head train in fp32", quantization.describe(config.model.quantization))
        logger.info("%s", models.describe_parameters(model))
    if not cuda_available() and config.training.get("fast_cpu_dropout", True):
        use_fast_cpu_dropout(model)
    if precision_of(args) != "fp32":  # the run's forward passes are under autocast
        skip_lora_input_casts(model)
    return tokenizer, model


def _load_data(config: RunConfig, args: TrainingArguments, tokenizer, model) -> tuple[dict, dict]:
    """The raw splits and their tokenized form (read and tokenized by the main process first; the
    others then read the cache)."""
    max_length, limit = config.dataset.max_length, models.max_model_length(model)
    if limit and max_length > limit:
        logger.warning("dataset.max_length=%d exceeds the model's limit of %d tokens; using %d", max_length, limit, limit)
        max_length = limit
    with args.main_process_first(desc="reading and tokenizing the data"):
        raw = load_splits(config, ["train", *config.task.validation_splits])
        encoded = {split: tokenize(ds, tokenizer, config.task, max_length, split, cache=config.dataset.cache_tokenized)
                   for split, ds in raw.items()}
    return raw, encoded


def _tensorboard(config: RunConfig) -> RunTensorBoard | None:
    _, tensorboard = reporting(config.training.get("report_to"))
    return RunTensorBoard(config.training["logging_dir"]) if tensorboard else None


def _build_trainer(config: RunConfig, args, tokenizer, model, train_set, evals: dict, first_callbacks: list):
    watch = LossWatch(config.output_dir)
    callbacks = [c for c in (*first_callbacks, CompleteLossLog(), watch, ConsoleProgress(list(config.task.metrics)),
                             SingleClassWarning()) if c is not None]
    trainer = GluetuneTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=next(iter(evals.values())) if len(evals) == 1 else evals,
        data_collator=fastpath.collator(config, tokenizer, args, cuda_available()),
        train_collator=fastpath.collator(config, tokenizer, args, cuda_available(), training=True),
        processing_class=tokenizer,
        compute_metrics=metrics.trainer_metrics_fn(config.task),
        callbacks=callbacks,
        group_steps=config.training.get("length_group_batches"),
        split_of_a_step=config.training.get("gradient_accumulation_steps", 1) * args.world_size,
        parameter_groups=lambda m: methods.parameter_groups(m, config.peft, args),
        loss_watch=watch,
        autocast_cache=not fastpath.enabled(config),  # one autocast for its rehearsal, capture and steps
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        logger.warning("FSDP: accelerate shards models only on GPUs; on this machine the processes run plain DDP "
                       "(the same training, each process holding the whole model)")
    trainer.remove_callback(PrinterCallback)  # progress.ConsoleProgress shows progress instead
    trainer.remove_callback(ProgressCallback)
    return trainer


@contextlib.contextmanager
def _fast_path(config: RunConfig, trainer, train_set, evals: dict):
    """With the fast path: its compiled layers, compiled before the first step, and its captured steps;
    dynamo's recompile limits hold every graph the run makes until the block ends (the last prediction),
    and the model is eager again after it."""
    if not fastpath.enabled(config):
        yield
        return
    train_batches, eval_batches = fastpath.rehearsal_batches(trainer, train_set, evals.values())
    with fastpath.compiled_layers(trainer, config) as layers, \
            fastpath.compile_limits(fastpath.planned_graphs(train_batches, eval_batches)):
        fastpath.rehearse(trainer, train_batches, eval_batches, layers)
        if config.training.get("cuda_graphs"):
            cudagraphs.use_graphs(trainer, train_batches)
        yield


def _summary(config: RunConfig, args, trainer, result, predictions: dict, checkpoint: Path | None, started: float) -> dict:
    """What metrics.json holds."""
    task, batch = config.task, batch_factors(args)
    validation = {split: {k.removeprefix("final_"): v for k, v in p.metrics.items()
                          if k.removeprefix("final_") not in metrics.TIMING_KEYS}
                  for split, p in predictions.items()}
    trainable, total = models.count_parameters(trainer.model)
    best = trainer.state.best_model_checkpoint
    history = metrics.epoch_history(trainer.state.log_history)
    return {
        "task": task.name,
        "primary_metric": task.primary_metric,
        "primary_split": task.validation_splits[0],
        **validation,
        "best_checkpoint": Path(best).name if best else None,
        "best_epoch": metrics.epoch_of_step(history, rundir.checkpoint_step(Path(best))) if best else None,
        "best_metric": trainer.state.best_metric,
        "history": history,
        "train": {
            "runtime_s": result.metrics.get("train_runtime"),
            "samples_per_second": result.metrics.get("train_samples_per_second"),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "loss": metrics.train_loss_of(trainer.state.log_history),
            "effective_batch_size": math.prod(batch.values()),
            "processes": args.world_size,
            "gpus_per_process": batch["gpus_per_process"],
            "resumed_from": checkpoint.name if checkpoint else None,
        },
        "wall_s": round(time.time() - started, 2),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": device_name(),
        "precision": precision_of(args),
        "cpu_bf16": cpu_bf16(),  # bf16 kernels differ by CPU (AVX512-BF16, AMX): so do a bf16 run's figures
    }


def _write_outputs(config: RunConfig, trainer, tokenizer, evals: dict, predictions: dict, summary: dict, board) -> None:
    """The main process's files after training; metrics.json marks the run finished."""
    output_dir, primary_split = config.output_dir, config.task.validation_splits[0]
    methods.name_base_model(output_dir, config.peft, config.model.name_or_path)
    tokenizer.save_pretrained(str(output_dir))
    write_validation_predictions(output_dir, evals, predictions)
    if board is not None:
        board.write_final(summary[primary_split], trainer.state.global_step)
    atomic_write_json(output_dir / rundir.METRICS_FILENAME, summary)
    card.write_card(output_dir)
    write_run_report(output_dir)
    _say_how_it_ended(summary, output_dir)
    if config.training.get("push_to_hub"):
        logger.info("pushed to the hub as %s", hub.push_run(output_dir, config.training))


def _parallelism(trainer) -> str:
    """How the processes share the work, as accelerate set it up: ' (DDP)', ' (FSDP2)', ..."""
    kind = trainer.accelerator.distributed_type.value
    if kind == "NO":
        return ""
    if kind == "FSDP":
        return f" (FSDP{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', '')})"
    return " (DDP)" if kind.startswith("MULTI_") else f" ({kind})"


def write_validation_predictions(output_dir: Path, evals: dict, predictions: dict) -> None:
    """The final model's logits for every validation example (for the report's confusion matrix
    or scatter): one JSON object per line, {split, idx, label, logits}, in the split's own order."""
    import json

    import numpy as np

    lines = []
    for split, output in predictions.items():
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        order = np.argsort(np.asarray(evals[split]["idx"]), kind="stable")
        idx, labels = np.asarray(evals[split]["idx"]), np.asarray(output.label_ids)
        for i in order:
            label = labels[i].item()
            lines.append(json.dumps({"split": split, "idx": int(idx[i]), "label": label,
                                     "logits": [round(float(v), 6) for v in np.atleast_1d(logits[i])]}))
    atomic_write_text(output_dir / rundir.PREDICTIONS_FILENAME, "\n".join(lines) + "\n")


def _say_how_it_ended(summary: dict, output_dir: Path) -> None:
    primary, split = summary["primary_metric"], summary["primary_split"]
    values = summary[split]
    best = (f"best epoch {summary['best_epoch']:g} ({summary['best_checkpoint']})" if summary.get("best_epoch")
            else "final model")
    accuracy = f" (accuracy {values['accuracy']:.4f})" if "accuracy" in values else ""
    logger.info("%s: %s %s = %.4f%s; saved to %s", best, split, primary, values[primary], accuracy, output_dir)
    if values.get("predicted_classes") == 1:
        logger.warning("DEGENERATE RUN: the final model predicts one class for every validation example")
