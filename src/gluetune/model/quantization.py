"""A quantized base model (QLoRA) on this machine: bitsandbytes there and recent enough, the base
made ready for adapters, its 4-bit weights kept in the layout training needs.

What `model.quantization` means is config.quantization's; 8-bit optimizers are training.optimizers'.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import UserError
from ..files import installed_version

logger = logging.getLogger("gluetune")

# Since 0.50 bitsandbytes runs its 4-bit layers (forward and backward) and its 8-bit optimizers on a
# plain x86 CPU too (backends/cpu/ops.py registers optimizer_update_8bit_blockwise for "cpu").
MIN_VERSION = "0.50"
INSTALL = "pip install \"gluetune[qlora]\" (or pip install \"bitsandbytes>=0.50\")"


def wait_passively_on_cpu(raw: dict[str, Any]) -> bool:
    """OMP_WAIT_POLICY=PASSIVE (unless set) for a raw config with `model.quantization`, before torch
    loads (OpenMP reads it once, at start); True if set.

    Why: with OpenMP's default (threads spin after each parallel region) a 4-bit SmolLM2-135M
    training step on our 2 shared cores took 7-66 s instead of 1.6-2.1 s with passive waits:
    bitsandbytes' CPU kernels and torch's ops alternate in many small parallel regions, and
    spinning threads take the cores the next region needs. Left as it was for other runs, whose
    figures were measured with the default.
    """
    import os
    import sys

    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("quantization") or "torch" in sys.modules:
        return False
    if "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def recent_enough(found: str) -> bool:
    from packaging.version import Version

    return Version(found) >= Version(MIN_VERSION)


def check_installed(what: str) -> None:
    """A one-line error when bitsandbytes is missing or too old for `what`."""
    found = installed_version("bitsandbytes")
    if found is None:
        raise UserError(f"{what} needs bitsandbytes, which is not installed: {INSTALL}")
    if not recent_enough(found):
        raise UserError(f"{what} needs bitsandbytes >= {MIN_VERSION} (4-bit layers and 8-bit optimizers on the CPU); "
                        f"found {found}: {INSTALL}")


def prepare_for_training(model):
    """A quantized base made ready for adapters: peft's `prepare_model_for_kbit_training` (every
    weight frozen, the unquantized ones, head included, in fp32). The Trainer turns on gradient
    checkpointing itself when the config asks (non-reentrant: no input-gradient hook needed)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def keep_weights_unpacked(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    Why: on a CPU with AVX512-BF16, `bnb.nn.Linear4bit.forward` (bitsandbytes 0.50) converts its
    weight in place into a packed inference layout the first time it runs in eval mode without
    gradients (`functional._convert_weight_packed_for_cpu`), and nothing converts it back when
    training resumes: `matmul_4bit` then takes the inference-only `gemv_4bit` path, outside
    autograd, so the next training step fails ("a view of a leaf Variable ... in-place" with a
    bias) or, without a bias, silently drops the frozen layer's share of the gradient. A run
    evaluates every epoch and trains on. The packed layout also computes in bf16 whatever the
    configured compute dtype (prediction would then differ from the run's own evaluation), its
    inverse (run by every `state_dict()`, so by every checkpoint save) re-quantizes the scales,
    and it fails on layers whose output count is not a multiple of 32. So gluetune never packs:
    the layer reads the switch from its own attribute `support_avx512bf16_for_cpu` (set from the
    CPU's flags in `__init__`); clearing it keeps the ordinary dequantize-and-matmul path in
    training, evaluation and prediction alike.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
