"""LoRA layers under mixed precision without peft's round trip of their input through fp32: the same
arithmetic, bit for bit, with four fewer copies of every activation an adapter reads.

peft's `lora.Linear.forward` casts its input to the adapter weights' dtype (fp32: what trains is held
in fp32, model.precision) before the adapter, and autocast casts it straight back to bf16 (or fp16) for
the adapter's first matmul; the backward casts the gradient the same way twice. When the input already
is bf16 (the output of a frozen bf16 layer: attention's context, the MLP's activation), the round trip
returns the very values it took (bf16 -> fp32 -> bf16 is exact), so it only costs time: two full
copies of the activation each way, for every adapted layer. An fp32 input (a LayerNorm's output under autocast) is not touched by either path's first cast.

Skipped only where the result is the same to the bit: plain LoRA on a linear layer (no DoRA or other
variant, which reads the input in more ways), and no adapter dropout (a dropout on a bf16 input rounds
once where the fp32 round trip rounded twice).
"""

from __future__ import annotations

from torch import nn


def skip_lora_input_casts(model: nn.Module) -> int:
    """Turn off peft's input cast on every LoRA linear layer where it changes nothing but the time (see
    the module's docstring); returns how many. For runs under autocast only: without it, a bf16 input
    would meet the adapter's fp32 weight."""
    from peft.tuners.lora.layer import Linear

    skipped = 0
    for module in model.modules():
        if (type(module) is Linear and not module.lora_variant
                and all(isinstance(dropout, nn.Identity) for dropout in module.lora_dropout.values())):
            module.cast_input_dtype_enabled = False
            skipped += 1
    return skipped
