"""Which reduced precisions this machine computes natively: where bf16 is worth running.

Training (training.training_args) and prediction (results.prediction) ask the same questions, so a
folder predicts in the precision it was trained and evaluated in wherever the machine has it.
"""

from __future__ import annotations

import torch


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
