"""Speed-ups that change how fast a run goes, never what it learns.

Each optional accelerator checks that the platform has it and otherwise falls back with a
one-line notice, so one config runs everywhere.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from . import quantization

logger = logging.getLogger("gluetune")


class _MaskedScale(torch.autograd.Function):
    """x * mask * scale that keeps only the 1-byte mask for backward (a plain `x * mask` would
    keep it as a 4-byte float: activation memory is mostly dropout masks in a LoRA model)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


class FastCpuDropout(nn.Dropout):
    """Dropout whose CPU mask costs a fraction of `torch.bernoulli`'s.

    Why by hand: PyTorch draws a CPU dropout mask one float per element through a slow scalar
    path; with LoRA (a dropout before every adapted layer) that was ~30 % of a MiniLM training
    step on our 2-core CPU. Here one 64-bit draw from the same global generator (so `set_seed`
    and checkpointed RNG state still govern it) gives two 32-bit uniform lanes, and an element is
    kept when its lane clears a threshold: the keep probability equals 1 - p to within 2**-32.
    Elsewhere (CUDA, eval mode) it is plain `nn.Dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        if self.p >= 1:
            return x * 0
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 1) // 2,), dtype=torch.int64)
        keep = bits.view(torch.int32)[:n].view_as(x) >= round(self.p * 2**32) - 2**31
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))


def use_fast_cpu_dropout(model: nn.Module) -> int:
    """Swap every plain `nn.Dropout` in `model` for `FastCpuDropout`; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastCpuDropout(child.p, child.inplace))
                swapped += 1
    return swapped


# ---------------------------------------------------------------- optional accelerators


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def accelerator_settings(training: dict[str, Any], cuda: bool) -> tuple[dict[str, Any], list[str]]:
    """Turn off the accelerators a config asks for that this platform lacks, with a notice each."""
    settings, notices = {}, []
    if training.get("use_liger_kernel"):
        if not cuda:
            settings["use_liger_kernel"] = False
            notices.append("use_liger_kernel: Liger kernels need CUDA; running without them")
        elif not _has_module("liger_kernel"):
            settings["use_liger_kernel"] = False
            notices.append("use_liger_kernel: liger-kernel is not installed (pip install liger-kernel); running without it")
    if training.get("torch_compile") and (not hasattr(torch, "compile") or (cuda and not _has_module("triton"))):
        settings["torch_compile"] = False
        notices.append("torch_compile: torch.compile is unavailable here (no triton); running eagerly")
    optim = str(training.get("optim", ""))
    if quantization.is_bitsandbytes_optimizer(optim):
        device = "cuda" if cuda else "mps" if torch.backends.mps.is_available() else "cpu"
        changes, notice = quantization.optimizer_settings(optim, device)
        settings.update(changes)
        notices.append(notice)
    return settings, notices


def limit_cpu_heap_growth(threshold_bytes: int = 2 << 20) -> bool:
    """Serve large CPU allocations by mmap, returned to the OS when freed; True if applied.

    Why: with dynamic padding every batch has a new shape, and glibc's heap keeps the freed
    activation buffers of all past shapes (its mmap threshold rises to 32 MB as it sees large
    frees), so a MiniLM run's resident memory crept up by hundreds of MB over an epoch. A fixed
    2 MB threshold keeps the peak flat at a small cost in speed. glibc only; elsewhere a no-op.
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, threshold_bytes))
    except (OSError, AttributeError):
        return False
