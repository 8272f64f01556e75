"""The one precision rule: how a run holds its model's weights and computes with them, in training, in
its evaluations, and whenever its folder is read back (predict, evaluate, export and the export's
`modeling_gluetune.py`), so that a folder gives its run's figures.

- A run trains in bf16, fp16 or fp32: the precision the config asks for where the device computes it
  natively (training.training_args), recorded in `metrics.json` and `run_record.json`.
- Its forward passes run under the autocast of that precision (bf16 or fp16; none for fp32), the one
  accelerate's mixed precision wraps the Trainer's training and evaluation in (`run_autocast`).
- Weights: what trains is held in fp32 (adapters, the head, `modules_to_save`, and on a quantized base
  every weight bitsandbytes does not quantize, as peft's `prepare_model_for_kbit_training` leaves
  them). A frozen base under bf16 is stored in bf16 (half the memory; autocast computes in bf16
  anyway). Full fine-tuning keeps every weight in fp32 (the optimizer updates fp32 master weights),
  and so does a folder read back from it. fp16 (GPUs without native bf16) keeps fp32 weights.
- Read back on a machine that lacks the run's precision natively (bf16 on a CPU without AVX512-BF16
  or AMX, fp16 without CUDA), the folder is read in fp32: the same weights, computed more exactly.

On CUDA the rule is the same (a bf16 LoRA base in bf16, the rest in fp32, autocast on the GPU); bf16
kernels differ between devices, as between CPUs (AVX512-BF16 alone or AMX), so the last digits of a
bf16 run's figures belong to the device that printed them (metrics.json records `cpu_bf16`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger("gluetune")


def cpu_bf16() -> str | None:
    """The instructions this CPU computes bf16 with (AVX512-BF16, AMX), by torch's own query; None
    where it would only emulate bf16."""
    found = [name for name, query in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
             if getattr(torch.cpu, query, lambda: False)()]
    return " and ".join(found) or None


def native_bf16() -> bool:
    """Whether this machine's training device (the first GPU, else the CPU) computes bf16 natively."""
    if torch.cuda.is_available():
        # Without `including_emulation=False`, pre-Ampere GPUs (T4, V100) answer True: bf16 runs
        # there, emulated and slow.
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_bf16() is not None


@dataclass(frozen=True)
class Precision:
    """How a run's model holds and computes: `name` (bf16, fp16, fp32), the dtype its weights load in
    (`load_dtype`; what trains is then held in fp32), and the autocast of its forward passes."""

    name: str
    load_dtype: torch.dtype

    def autocast(self, device_type: str):
        return run_autocast(self.name, device_type)


def of_run(name: str, full_fine_tuning: bool) -> Precision:
    """The rule for a run that trains in `name`."""
    frozen_in_bf16 = name == "bf16" and not full_fine_tuning
    return Precision(name, torch.bfloat16 if frozen_in_bf16 else torch.float32)


def for_reading(trained_in: str, full_fine_tuning: bool) -> Precision:
    """The rule for reading back a folder whose run trained (and evaluated) in `trained_in`: the run's,
    where this machine computes it natively, else fp32."""
    here = native_bf16() if trained_in == "bf16" else torch.cuda.is_available() if trained_in == "fp16" else True
    if not here:
        logger.warning("this run trained and evaluated in %s, which this machine does not compute natively; "
                       "reading it in fp32 (its figures may differ in the last digits)", trained_in)
        trained_in = "fp32"
    return of_run(trained_in, full_fine_tuning)


def run_autocast(precision: str | None, device_type: str):
    """The autocast a run's forward passes ran under: accelerate's mixed precision, bf16 or fp16 on the
    device's type; none for fp32. (Shipped as is in the `modeling_gluetune.py` of an export.)"""
    import contextlib

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def hold_trained_weights_in_fp32(model) -> None:
    """What a run trained (LoRA's adapters, `modules_to_save` copies, the head), back in the fp32 that
    training held it in: a folder read back loads them into a copy of a base module, in its dtype."""
    for name, param in model.named_parameters():
        if ("lora_" in name or ".modules_to_save." in name) and param.dtype != torch.float32:
            param.data = param.data.float()

