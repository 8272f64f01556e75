"""CPU speed-ups that change how fast a run goes, never what it learns: a cheaper dropout mask,
and a heap that gives freed activation buffers back."""

from __future__ import annotations

import torch
from torch import nn


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


def lower_cpu_mmap_threshold(threshold_bytes: int = 2 << 20) -> bool:
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
