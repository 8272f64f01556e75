"""`model.quantization`: the spec of a quantized base model (QLoRA), checked when a config loads.

`model.quantization` passes transformers' `BitsAndBytesConfig` through: a mapping of its fields
(`load_in_4bit`, `bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`, `bnb_4bit_compute_dtype`,
`load_in_8bit`, ...), or a short spelling for the common cases: `4bit` (NF4, double quantization,
QLoRA's recipe) and `8bit` (LLM.int8). The compute dtype, unless given, is the dtype the run loads
its other weights in (fp32 on a CPU, bf16 under `bf16: true` on a GPU that has it). The config is
validated when it loads; bitsandbytes itself is only needed when a model loads (model.quantization).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from ..errors import UserError, did_you_mean, one_line

SHORT_SPELLINGS: dict[str, dict[str, Any]] = {
    "4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "8bit": {"load_in_8bit": True},
}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
_DTYPE_KEYS = ("bnb_4bit_compute_dtype",)
_QUANT_TYPES = ("nf4", "fp4")

# bitsandbytes warns when imported (peft imports it, as a config's peft section is validated) on an
# AVX512-BF16 CPU without its optional kernels, that its packed-weight inference kernel is missing; gluetune never packs
# (model.quantization.keep_weights_unpacked), so the warning would only mislead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# An 8-bit (LLM.int8) base quantizes each layer's fp32 input to int8 through fp16, as designed; its
# logger says so at every forward of every layer.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


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
