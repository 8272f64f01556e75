"""The config's `TrainingArguments` on this machine: the precision the device has, the optional
accelerators that are installed, bitsandbytes optimizers where they run, a CPU process group
under a launcher. Each switch this machine lacks falls back with a one-line notice, so one config
runs everywhere; the config itself stays machine-independent (config.arguments).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from transformers import TrainingArguments

from ..config import arguments
from ..config.run import RunConfig
from ..errors import UserError
from ..model.precision import cpu_bf16, native_bf16
from . import distributed
from .optimizers import is_bitsandbytes_optimizer, optimizer_settings
from .speed import fastpath

logger = logging.getLogger("gluetune")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name(0) if cuda_available() else "cpu"


def precision_of(args: TrainingArguments) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def optimizer_name(args: TrainingArguments) -> str:
    return str(getattr(args.optim, "value", args.optim))


def precision_settings(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """bf16/fp16 as asked where the device has them natively, else the nearest that runs well.

    The reference config asks for bf16. A GPU without native bf16 gets fp16 mixed precision (fp32
    weights, fp16 compute, a loss scaler). A CPU with AVX512-BF16 or AMX trains under CPU autocast
    to bf16 (the frozen base stored in bf16, adapters and head in fp32), as a GPU does: on the CPU
    default that is 1.5x faster per step with eager attention, at the same MCC (docs/performance.md).
    Other CPUs train in fp32: there bf16 is emulated, slower than fp32. Either way on the CPU one
    line says which.
    """
    notices, settings = [], {}
    if kwargs.get("bf16") and not cuda_available() and native_bf16():
        notices.append(f"bf16 on this CPU ({cpu_bf16()}): training under CPU autocast to bf16")
    elif kwargs.get("bf16") and not native_bf16():
        settings["bf16"] = False
        if cuda_available():
            settings["fp16"] = True
            notices.append(f"bf16 is not native on this device ({device_name()}); training in fp16 mixed precision")
        else:
            notices.append("bf16 is not native on this CPU (no AVX512-BF16 or AMX); training in fp32")
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


def training_arguments(config: RunConfig, quiet: bool = False, precision: str | None = None) -> TrainingArguments:
    """The config's TrainingArguments adjusted for this machine (sets up the process group
    when launched by torchrun or accelerate). `precision` (bf16, fp16, fp32): the one a resumed
    run started in, in place of the config's, where this machine has it."""
    kwargs = arguments.trainer_kwargs(config.training, config.task)
    if precision is not None:
        kwargs.update(bf16=precision == "bf16", fp16=precision == "fp16")
    precision, notices = precision_settings(kwargs)
    accelerators, more = accelerator_settings(kwargs, cuda_available())
    kwargs.update(precision)
    kwargs.update(accelerators)
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


# Optimizers that update the weights inside the backward pass (LOMO and AdaLOMO through
# accelerator.backward(learning_rate=...), the layer-wise GaLore/APOLLO ones through gradient hooks):
# a captured step would skip the update, or freeze it, learning rate included, into the graph.
UPDATE_IN_BACKWARD = ("lomo", "adalomo")


def check_cuda_graphs(config: RunConfig, args: TrainingArguments) -> None:
    """`training.cuda_graphs` where it can run: a CUDA GPU, one process driving one GPU, the backward
    pass the Trainer's own (no DeepSpeed), an optimizer that steps after it (cudagraphs.py)."""
    if not config.training.get("cuda_graphs"):
        return
    where = f"{config.source}: training.cuda_graphs"
    if not cuda_available():
        raise UserError(f"{where}: CUDA graphs need a CUDA GPU and this machine has none ({device_name()}); set "
                        "training.cuda_graphs=false (the fast path runs without them)")
    if args.deepspeed:
        raise UserError(f"{where}: DeepSpeed runs the backward pass itself (accelerator.backward), which a captured "
                        "step skips; remove training.deepspeed or set training.cuda_graphs=false")
    if args.world_size > 1:
        raise UserError(f"{where}: captured steps run in one process, this run has {args.world_size}; set "
                        "training.cuda_graphs=false")
    if args.n_gpu > 1:
        raise UserError(f"{where}: this process sees {args.n_gpu} GPUs and would drive them as DataParallel, but a "
                        "step is captured on one GPU; show it one (CUDA_VISIBLE_DEVICES=0) or set "
                        "training.cuda_graphs=false")
    optim = optimizer_name(args)
    if optim in UPDATE_IN_BACKWARD or optim.endswith("_layerwise"):
        raise UserError(f"{where}: training.optim {optim} updates the weights inside the backward pass, which a "
                        "captured step cannot do; choose another optimizer (e.g. adamw_torch) or set "
                        "training.cuda_graphs=false")


def batch_factors(args: TrainingArguments) -> dict[str, int]:
    """What one optimizer step holds. One process that sees several GPUs without a launcher runs
    them as DataParallel (TrainingArguments.n_gpu > 1): each micro-batch then holds per device x
    GPUs examples."""
    return {"per_device": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
            "processes": args.world_size, "gpus_per_process": max(1, args.n_gpu)}


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def accelerator_settings(training: dict[str, Any], cuda: bool) -> tuple[dict[str, Any], list[str]]:
    """Turn off the accelerators a config asks for that this platform lacks, with a notice each."""
    settings, notices = {}, []
    if training.get("use_liger_kernel"):
        if not cuda:
            settings["use_liger_kernel"] = False
            notices.append("use_liger_kernel: Liger kernels need CUDA; running without them")
        elif not has_module("liger_kernel"):
            settings["use_liger_kernel"] = False
            notices.append("use_liger_kernel: liger-kernel is not installed (pip install liger-kernel); running without it")
    if training.get("torch_compile") and (not hasattr(torch, "compile") or (cuda and not has_module("triton"))):
        settings["torch_compile"] = False
        notices.append("torch_compile: torch.compile is unavailable here (no triton); running eagerly")
    optim = str(training.get("optim", ""))
    if is_bitsandbytes_optimizer(optim):
        device = "cuda" if cuda else "mps" if torch.backends.mps.is_available() else "cpu"
        changes, notice = optimizer_settings(optim, device)
        settings.update(changes)
        notices.append(notice)
    return settings, notices
