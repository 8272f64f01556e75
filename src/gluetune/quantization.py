"""bitsandbytes: a quantized base model (QLoRA, `model.quantization`) and 8-bit optimizers.

`model.quantization` passes transformers' `BitsAndBytesConfig` through: a mapping of its fields
(`load_in_4bit`, `bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`, `bnb_4bit_compute_dtype`,
`load_in_8bit`, ...), or a short spelling for the common cases: `4bit` (NF4, double quantization,
QLoRA's recipe) and `8bit` (LLM.int8). The compute dtype, unless given, is the dtype the run loads
its other weights in (fp32 on a CPU, bf16 under `bf16: true` on a GPU that has it). The config is
validated when it loads; bitsandbytes itself is only needed when a model loads.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Any

from .errors import UserError, did_you_mean, one_line

logger = logging.getLogger("gluetune")
# Without the optional `kernels` package bitsandbytes warns, when imported (peft imports it) on an
# AVX512-BF16 CPU, that its packed-weight inference kernel is missing; gluetune never packs
# (keep_weights_unpacked), so the warning would only mislead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# An 8-bit (LLM.int8) base quantizes each layer's fp32 input to int8 through fp16, as designed; its
# logger says so at every forward of every layer.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

# Since 0.50 bitsandbytes runs its 4-bit layers (forward and backward) and its 8-bit optimizers on a
# plain x86 CPU too (backends/cpu/ops.py registers optimizer_update_8bit_blockwise for "cpu").
MIN_VERSION = "0.50"
INSTALL = "pip install \"gluetune[qlora]\" (or pip install \"bitsandbytes>=0.50\")"
SHORT_SPELLINGS: dict[str, dict[str, Any]] = {
    "4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "8bit": {"load_in_8bit": True},
}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
_DTYPE_KEYS = ("bnb_4bit_compute_dtype",)
_QUANT_TYPES = ("nf4", "fp4")


def bnb_fields(spec: str | dict[str, Any]) -> dict[str, Any]:
    """The `BitsAndBytesConfig` fields a `model.quantization` value stands for (dtypes as names)."""
    if isinstance(spec, str):
        return dict(SHORT_SPELLINGS[spec])
    return {k: DTYPES.get(v, v) if k in _DTYPE_KEYS else v for k, v in spec.items()}


def _config_fields() -> list[str]:
    from transformers import BitsAndBytesConfig

    return [name for name, p in inspect.signature(BitsAndBytesConfig.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def check(spec: Any, method: str, source: str) -> None:
    """Refuse a `model.quantization` value that would not load, in one line naming what would."""
    where = f"{source}: model.quantization"
    if spec is None:
        return
    if isinstance(spec, str):
        if spec not in SHORT_SPELLINGS:
            raise UserError(f"{where}: {spec!r} is not valid{did_you_mean(spec, SHORT_SPELLINGS)}; expected "
                            f"{' or '.join(SHORT_SPELLINGS)}, or a mapping of BitsAndBytesConfig fields")
    else:
        fields = _config_fields()
        for key, value in spec.items():
            if key not in fields:
                raise UserError(f"{where}.{key}: not a BitsAndBytesConfig field{did_you_mean(key, fields)}; "
                                f"expected one of {', '.join(fields)}")
            if key in _DTYPE_KEYS and value not in DTYPES:
                raise UserError(f"{where}.{key}: {value!r} is not valid; expected one of {', '.join(DTYPES)}")
        if spec.get("bnb_4bit_quant_type", "nf4") not in _QUANT_TYPES:
            raise UserError(f"{where}.bnb_4bit_quant_type: {spec['bnb_4bit_quant_type']!r} is not valid; "
                            f"expected {' or '.join(_QUANT_TYPES)}")
        if bool(spec.get("load_in_4bit")) == bool(spec.get("load_in_8bit")):
            raise UserError(f"{where}: set exactly one of load_in_4bit: true or load_in_8bit: true "
                            "(or write 4bit or 8bit)")
        try:
            bnb_config(spec)
        except (TypeError, ValueError) as err:
            raise UserError(f"{where}: {one_line(err)}") from None
    if method != "lora":
        raise UserError(f"{source}: model.quantization trains adapters over a frozen quantized base; peft.method "
                        f"'{method}' would train the quantized weights themselves. Use peft.method: lora, or drop "
                        "model.quantization")


def bnb_config(spec: str | dict[str, Any], compute_dtype=None):
    """transformers' `BitsAndBytesConfig` of a `model.quantization` value; `compute_dtype` (a torch
    dtype) stands in where the value names none."""
    import torch
    from transformers import BitsAndBytesConfig

    fields = bnb_fields(spec)
    for key in _DTYPE_KEYS:
        if key in fields:
            fields[key] = getattr(torch, fields[key])
        elif compute_dtype is not None and fields.get("load_in_4bit"):
            fields[key] = compute_dtype
    return BitsAndBytesConfig(**fields)


def describe(spec: str | dict[str, Any] | None) -> str:
    """A few words for logs and the model card, e.g. '4-bit NF4 base, double quantization'."""
    if spec is None:
        return "none (full-precision base)"
    fields = bnb_fields(spec)
    if fields.get("load_in_8bit"):
        return "8-bit base (bitsandbytes LLM.int8)"
    words = [f"4-bit {str(fields.get('bnb_4bit_quant_type', 'nf4')).upper()} base (bitsandbytes)"]
    if fields.get("bnb_4bit_use_double_quant"):
        words.append("double quantization")
    if fields.get("bnb_4bit_compute_dtype"):
        words.append(f"compute in {fields['bnb_4bit_compute_dtype']}")
    return ", ".join(words)


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


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def _recent_enough(found: str) -> bool:
    from packaging.version import Version

    return Version(found) >= Version(MIN_VERSION)


def check_installed(what: str) -> None:
    """A one-line error when bitsandbytes is missing or too old for `what`."""
    found = installed_version()
    if found is None:
        raise UserError(f"{what} needs bitsandbytes, which is not installed: {INSTALL}")
    if not _recent_enough(found):
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


# ---------------------------------------------------------------- 8-bit optimizers


def is_bitsandbytes_optimizer(optim: str) -> bool:
    """Whether the Trainer builds `optim` from bitsandbytes (adamw_8bit, paged_adamw_8bit, lion_8bit, ...)."""
    try:  # the Trainer's own table, the source of truth
        from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

        return optim in {str(getattr(name, "value", name)) for name in _BITSANDBYTES_OPTIMIZERS}
    except ImportError:
        return ("8bit" in optim or "paged" in optim or "bnb" in optim) and not optim.startswith(("galore", "apollo"))


def optimizer_settings(optim: str, device: str) -> tuple[dict[str, Any], str]:
    """(TrainingArguments changes, a one-line notice) for a bitsandbytes optimizer on `device`
    (cuda, cpu, mps): what the run actually uses."""
    found = installed_version()
    if found is None:
        why = f"needs bitsandbytes, which is not installed ({INSTALL})"
        return {"optim": "adamw_torch"}, f"optim: {optim} {why}; using adamw_torch"
    if device not in ("cuda", "cpu") or (device == "cpu" and not _recent_enough(found)):
        why = f"bitsandbytes {found} has no optimizers on {device} (the CPU needs >= {MIN_VERSION}: {INSTALL})"
        return {"optim": "adamw_torch"}, f"optim: {optim}: {why}; using adamw_torch"
    bits = "8-bit" if "8bit" in optim else "32-bit"
    kind = optim.removeprefix("paged_").split("_")[0]
    small = " (tensors under 4,096 elements keep 32-bit state)" if bits == "8-bit" else ""
    if "paged" not in optim:
        return {}, f"optim: {optim}: bitsandbytes {found} {bits} {kind} on {device}{small}"
    if device == "cuda":
        return {}, f"optim: {optim}: bitsandbytes {found} paged {bits} {kind}{small}"
    import warnings

    # bitsandbytes warns once per optimizer on the CPU; the notice below says the same, once per run.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return {}, (f"optim: {optim}: bitsandbytes {found} {bits} {kind}, not paged (paging needs CUDA; "
                f"on the CPU the state stays in ordinary memory){small}")
