"""How much arithmetic a LoRA training run does, counted from the model's shapes, and what this CPU
could do at most (shared by the bench scripts).

Per real token, for every linear layer of a transformer with adapters:
  - a frozen weight (in x out): forward 2*in*out, backward only the input's gradient 2*in*out (no
    weight gradient): 4*in*out;
  - a LoRA adapter of rank r on it: A (in x r) and B (r x out) forward 2r(in+out), backward input and
    weight gradients 4r(in+out): 6r(in+out);
  - attention's two matmuls (scores and the weighted sum) at sequence length L: forward 4*L*d,
    backward 8*L*d: 12*L*d per layer (d = the attention width).
Per sequence, a module trained in full (pooler, head; in x out): forward, input and weight gradients
6*in*out. Evaluation is forward only: a third of the frozen weights' share, 2*in*out per token.
Embedding lookups, norms, activations and the optimizer are left out (a few percent here).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from machine import cpu_info  # bench/machine.py (the scripts run as python bench/<name>.py)


def linear_flops(model) -> dict[str, float]:
    """{"frozen": sum in*out of frozen linears, "lora": sum r*(in+out), "full": sum in*out of linears
    trained in full, "attention_width": d x layers}, from the modules of a (peft) model."""
    import torch

    frozen = lora = full = 0.0
    adapted = set()
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear) and hasattr(module, "lora_A"):
            adapted.add(id(base))
            frozen += base.in_features * base.out_features
            lora += sum(a.out_features * (base.in_features + base.out_features) for a in module.lora_A.values())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in adapted and "lora_" not in name:
            if module.weight.requires_grad:
                full += module.in_features * module.out_features
            elif "original_module" not in name:  # peft keeps a frozen copy of modules trained in full
                frozen += module.in_features * module.out_features
    config = model.config
    return {"frozen": frozen, "lora": lora, "full": full,
            "attention_width": config.hidden_size * config.num_hidden_layers}


def run_flops(shapes: dict[str, float], train_tokens: float, train_sequences: float, mean_length: float,
              eval_tokens: float) -> float:
    """FLOPs of a training run: its training steps and its evaluations (see the module's docstring).
    Modules trained in full (pooler, head) read one vector per sequence."""
    per_token = 4 * shapes["frozen"] + 6 * shapes["lora"] + 12 * mean_length * shapes["attention_width"]
    training = per_token * train_tokens + 6 * shapes["full"] * train_sequences
    evaluation = (2 * shapes["frozen"] + 2 * shapes["lora"] + 4 * mean_length * shapes["attention_width"]) * eval_tokens
    return training + evaluation


def clock_ghz() -> float | None:
    """The CPU's nominal clock from /proc/cpuinfo (the reported MHz); None where it is not reported."""
    try:
        speeds = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())]
    except OSError:
        return None
    return max(speeds) / 1000 if speeds else None


# Intel AMX (Sapphire Rapids and later): one tile multiply unit (TMUL) per core; TDPBF16PS multiplies a
# 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 fp32 sums (8,192 multiply-adds, 16,384 FLOP) and
# issues one every 16 cycles: 1,024 bf16 FLOP per cycle per core. Intel states the same rate ("1024
# BF16 operations per cycle" per core for 4th Gen Xeon Scalable: Intel AMX product brief and the
# Intel 64 and IA-32 Architectures Optimization Reference Manual, chapter "Intel Advanced Matrix
# Extensions"); en.wikipedia.org/wiki/Advanced_Matrix_Extensions cites both.
AMX_BF16_FLOP_PER_CYCLE = 1024


def peak_gflops(dtype: str) -> tuple[float | None, str]:
    """An estimate of this CPU's peak for `dtype` (fp32, bf16) over all its cores, and how it was made:
    cores x clock x FLOPs a core issues per cycle. Vector units: two FMA pipes (2 FLOPs per lane) of 16
    fp32 lanes with AVX-512 (8 on AMD before Zen 5, which runs AVX-512 on 256-bit pipes, and with AVX2);
    AVX512-BF16 dot products do twice the fp32 work per lane. bf16 on a CPU with AMX (`amx_bf16`): the
    tile unit's rate above, which is what oneDNN's bf16 matrix multiplies run on there. Turbo clocks above
    the nominal one are not counted."""
    flags, ghz, cores = set(cpu_info("flags").split()), clock_ghz(), os.cpu_count() or 1
    if ghz is None:
        return None, "clock unknown"
    if dtype == "bf16" and "amx_bf16" in flags:
        return cores * ghz * AMX_BF16_FLOP_PER_CYCLE, (
            f"{cores} cores x {ghz:.2f} GHz x {AMX_BF16_FLOP_PER_CYCLE} FLOP/cycle: AMX tiles, one 16x32 by 32x16 "
            "bf16 tile product (16,384 FLOP) per 16 cycles per core")
    amd_256 = cpu_info("vendor_id") == "AuthenticAMD" and int(cpu_info("cpu family") or 0) < 26
    lanes = 16 if "avx512f" in flags and not amd_256 else 8 if "avx2" in flags or "avx512f" in flags else 4
    bf16 = dtype == "bf16" and "avx512_bf16" in flags
    per_cycle = 2 * 2 * lanes * (2 if bf16 else 1)
    return cores * ghz * per_cycle, (f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle: 2 FMA pipes of {lanes} "
                                     f"fp32 lanes{', BF16 dot products' if bf16 else ''}")
