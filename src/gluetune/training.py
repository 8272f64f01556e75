"""Training: the run a config describes, on this machine, in one process or many.

The same code runs in every process of a `torchrun` / `accelerate launch` job (a single process is
a job of one): only the main process takes the output folder's lock, prepares the folder and
writes files; the others wait for it where they must and take every decision with it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import (
    arguments,
    card,
    cudagraphs,
    data,
    distributed,
    fastpath,
    hub,
    methods,
    metrics,
    models,
    quantization,
    report,
    rundir,
)
from .callbacks import CompleteLossLog, GracefulStop, LossWatch, RunTensorBoard, SingleClassWarning
from .config import RunConfig, check_same_settings, save_config
from .errors import RunInterrupted, UserError
from .files import atomic_write_json, atomic_write_text
from .progress import ConsoleProgress
from .speedups import accelerator_settings, use_fast_cpu_dropout
from .trainer import GluetuneTrainer

logger = logging.getLogger("gluetune")


# ---------------------------------------------------------------- this machine


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name(0) if cuda_available() else "cpu"


def native_bf16() -> bool:
    # Without `including_emulation=False`, pre-Ampere GPUs (T4, V100) answer True: bf16 runs
    # there, emulated and slow.
    return cuda_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def precision_settings(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """bf16/fp16 as asked where the device has them natively, else the nearest that runs well.

    The reference config asks for bf16. A GPU without native bf16 gets fp16 mixed precision (fp32
    weights, fp16 compute, a loss scaler); a CPU gets fp32: CPU autocast to bf16 is both slow and
    a numerics change nobody asked for.
    """
    notices, settings = [], {}
    if kwargs.get("bf16") and not native_bf16():
        settings["bf16"] = False
        if cuda_available():
            settings["fp16"] = True
            notices.append(f"bf16 is not native on this device ({device_name()}); training in fp16 mixed precision")
        else:
            notices.append(f"bf16 is not supported on this device ({device_name()}); training in fp32")
    if kwargs.get("fp16") and not cuda_available():
        settings["fp16"] = False
        notices.append(f"fp16 is not supported on this device ({device_name()}); training in fp32")
    if kwargs.get("tf32") and not cuda_available():
        settings["tf32"] = None
    return settings, notices


def reporting(report_to: list[str]) -> tuple[list[str] | str, bool]:
    """(what the Trainer reports to, whether gluetune writes TensorBoard itself).

    TensorBoard is written by gluetune's own callback, into `logging_dir` (transformers v5 has no
    such argument); every other reporter (wandb, mlflow, ...) is the Trainer's.
    """
    wanted = list(report_to or [])
    if "none" in wanted:
        return "none", False
    if "all" in wanted:
        from transformers.integrations import get_available_reporting_integrations

        wanted = [r for r in wanted if r != "all"] + get_available_reporting_integrations()
    others = list(dict.fromkeys(r for r in wanted if r != "tensorboard"))
    return others or "none", "tensorboard" in wanted


def training_arguments(config: RunConfig, quiet: bool = False) -> TrainingArguments:
    """The config's TrainingArguments adjusted for this machine (sets up the process group
    when launched by torchrun or accelerate)."""
    kwargs = arguments.trainer_kwargs(config.training, config.task)
    precision, notices = precision_settings(kwargs)
    accelerators, more = accelerator_settings(kwargs, cuda_available())
    kwargs.update(precision)
    kwargs.update(accelerators)
    if kwargs.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{config.source}: training.deepspeed: the deepspeed package is not installed (pip install "
                        "deepspeed; it needs CUDA); configs/accelerate/fsdp.yaml shards without it")
    kwargs["report_to"], _ = reporting(kwargs.get("report_to"))
    kwargs["disable_tqdm"] = True  # progress.ConsoleProgress shows progress instead
    kwargs.update(fastpath.argument_changes(config, kwargs, cuda_available()))
    if not cuda_available():
        kwargs.setdefault("dataloader_pin_memory", False)
    if not cuda_available() and not torch.backends.mps.is_available():
        # accelerate sets up a CPU process group (gloo) for torchrun / accelerate launch only when
        # told it runs on the CPU; otherwise each process would train alone.
        kwargs["use_cpu"] = True
    # Every trainable weight (adapters, head) takes part in each forward pass: no extra graph walk.
    kwargs.setdefault("ddp_find_unused_parameters", False)
    for notice in [] if quiet or not distributed.is_main_process() else notices + more:
        logger.warning(notice)
    try:
        args = TrainingArguments(**kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"{config.source}: training: {err}".splitlines()[0]) from None
    check_cuda_graphs(config, args)
    return args


def check_cuda_graphs(config: RunConfig, args: TrainingArguments) -> None:
    """`training.cuda_graphs` where it can run: a CUDA GPU, one process (cudagraphs.py)."""
    if not config.training.get("cuda_graphs"):
        return
    if not cuda_available():
        raise UserError(f"{config.source}: training.cuda_graphs: CUDA graphs need a CUDA GPU and this machine has none "
                        f"({device_name()}); set training.cuda_graphs=false (the fast path runs without them)")
    if args.world_size > 1:
        raise UserError(f"{config.source}: training.cuda_graphs: captured steps run in one process, this run has "
                        f"{args.world_size}; set training.cuda_graphs=false")


def batch_factors(args: TrainingArguments) -> dict[str, int]:
    """What one optimizer step holds. One process that sees several GPUs without a launcher runs
    them as DataParallel (TrainingArguments.n_gpu > 1): each micro-batch then holds per device x
    GPUs examples."""
    return {"per_device": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
            "processes": args.world_size, "gpus_per_process": max(1, args.n_gpu)}


# ---------------------------------------------------------------- the run


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
    lock = rundir.OutputDirLock(output_dir) if distributed.is_main_process() else None
    try:
        finished, checkpoint = distributed.run_on_main(lambda: _prepare_folder(config, lock, batch_factors(args)),
                                                       UserError)
        if finished:
            logger.info("%s already holds a finished run; nothing to do (--overwrite to train again)", output_dir)
            return TrainOutcome(metrics=metrics.read_metrics(output_dir))
        return _train_in(config, args, checkpoint, callbacks or [])
    finally:
        # Only the lock's holder may clean up, and before it lets go: a refused start must not take
        # away the lock of the run that holds the folder.
        if lock is not None and lock.held:
            rundir.remove_if_unused(output_dir, created)
            lock.release()


def _prepare_folder(config: RunConfig, lock: rundir.OutputDirLock, batch: dict[str, int]) -> tuple[bool, Path | None]:
    """(whether the folder holds this run finished, the checkpoint to resume). Main process only."""
    hub.check_can_push(config.training)
    lock.acquire()
    output_dir, control = config.output_dir, config.control
    if control.resume and not control.overwrite:
        check_same_settings(output_dir, config, "--resume")
        if rundir.is_finished(output_dir):
            return True, None
        rundir.check_same_batch(output_dir, batch)
    return False, rundir.prepare(output_dir, control.resume, control.overwrite)


def _train_in(config: RunConfig, args: TrainingArguments, checkpoint: Path | None, callbacks: list) -> TrainOutcome:
    started = time.time()
    set_seed(args.seed)  # before the model is built: the new head's initial weights are drawn from it
    tokenizer, model = _load_model(config, args)
    raw, encoded = _load_data(config, args, tokenizer, model)
    # Evaluation order does not change any metric; sorted by length, batches carry little padding.
    evals = {s: encoded[s].sort("length") for s in config.task.validation_splits}
    stop, board = GracefulStop(), _tensorboard(config)
    trainer = _build_trainer(config, args, tokenizer, model, encoded["train"], evals, [board, stop, *callbacks])
    if distributed.is_main_process():
        save_config(config, config.output_dir)
        batch = batch_factors(args)
        rundir.write_record(config.output_dir, args.seed, data.source_files(config, list(raw)), checkpoint, batch,
                            quantization.describe(config.model.quantization) if config.model.quantization else None)
        logger.info("effective batch %s%s", rundir.describe_batch(batch), _parallelism(trainer))
        if checkpoint is not None:
            logger.info("resuming from %s", checkpoint)
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


def _load_model(config: RunConfig, args: TrainingArguments):
    # Frozen base weights need no fp32 master copy: under bf16 they load in bf16 (half the memory).
    dtype = torch.bfloat16 if args.bf16 and config.peft.method != "full" else torch.float32
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
    return tokenizer, model


def _load_data(config: RunConfig, args: TrainingArguments, tokenizer, model) -> tuple[dict, dict]:
    """The raw splits and their tokenized form (read and tokenized by the main process first; the
    others then read the cache)."""
    max_length, limit = config.dataset.max_length, models.max_model_length(model)
    if limit and max_length > limit:
        logger.warning("dataset.max_length=%d exceeds the model's limit of %d tokens; using %d", max_length, limit, limit)
        max_length = limit
    with args.main_process_first(desc="reading and tokenizing the data"):
        raw = data.load_splits(config, ["train", *config.task.validation_splits])
        encoded = {split: data.tokenize(ds, tokenizer, config.task, max_length, split, cache=config.dataset.cache_tokenized)
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
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        logger.warning("FSDP: accelerate shards models only on GPUs; on this machine the processes run plain DDP "
                       "(the same training, each process holding the whole model)")
    trainer.remove_callback(PrinterCallback)  # progress.ConsoleProgress shows progress instead
    trainer.remove_callback(ProgressCallback)
    if fastpath.enabled(config):
        layers = fastpath.prepare_model(trainer, config)
        train_batches, eval_batches = fastpath.rehearsal_batches(trainer, train_set, evals.values())
        fastpath.rehearse(trainer, train_batches, eval_batches, layers)
        if config.training.get("cuda_graphs"):
            cudagraphs.use_graphs(trainer, train_batches)
    return trainer


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
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
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
    report.write_report(output_dir)
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


PREDICTIONS_FILENAME = "validation_predictions.jsonl"


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
    atomic_write_text(output_dir / PREDICTIONS_FILENAME, "\n".join(lines) + "\n")


def _say_how_it_ended(summary: dict, output_dir: Path) -> None:
    primary, split = summary["primary_metric"], summary["primary_split"]
    values = summary[split]
    best = (f"best epoch {summary['best_epoch']:g} ({summary['best_checkpoint']})" if summary.get("best_epoch")
            else "final model")
    accuracy = f" (accuracy {values['accuracy']:.4f})" if "accuracy" in values else ""
    logger.info("%s: %s %s = %.4f%s; saved to %s", best, split, primary, values[primary], accuracy, output_dir)
    if values.get("predicted_classes") == 1:
        logger.warning("DEGENERATE RUN: the final model predicts one class for every validation example")
