"""CPU speed-ups that change how fast a run goes, never what it learns: a cheaper dropout mask, and
the process-wide memory settings `gluetune train` makes on a CPU (a heap that gives freed activation
buffers back, a bounded cache of oneDNN operations)."""

from __future__ import annotations

import os

import torch
from torch import nn


class FastCpuDropout(nn.Dropout):
    """Dropout whose CPU mask costs a fraction of `torch.bernoulli`'s.

    Why by hand: PyTorch draws a CPU dropout mask one float per element through a slow scalar
    path; with LoRA (a dropout before every adapted layer) that was ~30 % of a MiniLM training
    step on our 2-core CPU. Here one 64-bit draw from the same global generator (so `set_seed`
    and checkpointed RNG state still govern it) gives two 32-bit uniform lanes, and an element is
    kept when its lane clears a threshold: the keep probability equals 1 - p to within 2**-32.
    The output is `x * keep * scale` in plain autograd ops, which keep only the 1-byte mask for the
    backward (a multiplication saves the other operand as it is: the bool mask, and the scale as a
    number). Elsewhere (CUDA, eval mode) it is plain `nn.Dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        if self.p >= 1:
            return x * 0
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 1) // 2,), dtype=torch.int64)
        keep = bits.view(torch.int32)[:n].view_as(x) >= round(self.p * 2**32) - 2**31
        return x * keep * (1.0 / (1.0 - self.p))


def use_fast_cpu_dropout(model: nn.Module) -> int:
    """Swap every plain `nn.Dropout` in `model` for `FastCpuDropout`; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastCpuDropout(child.p, child.inplace))
                swapped += 1
    return swapped


def prepare_cpu_process(training: dict) -> None:
    """What `gluetune train` sets for its whole process before a CPU run (the library never does: they
    are process-wide; the CPU benchmarks call this as the command does). `training`: the config's section."""
    if training.get("cpu_mmap_threshold", True):
        lower_cpu_mmap_threshold()
    bound_ideep_cache()


# ideep, PyTorch's bridge to oneDNN, keeps the primitives it built in an LRU cache of this many entries,
# read from the environment at its first use (pytorch/pytorch#22910); oneDNN's own primitive cache
# (ONEDNN_PRIMITIVE_CACHE_CAPACITY) is another.
IDEEP_CACHE_ENV = "LRU_CACHE_CAPACITY"


def bound_ideep_cache(capacity: int = 1) -> bool:
    """Keep ideep's cache of matmul operations at `capacity` entries, unless the environment already sets
    it; True if set here. Effective only before the process's first oneDNN matmul.

    Why: under CPU bf16 every linear layer runs through oneDNN, and every new batch shape (dynamic padding:
    dozens per run, training and evaluation) adds entries to ideep's cache that stay; on the CPU default
    (Intel Xeon, AMX) the heap held about 160 MB more after the first epoch, growing with each new shape.
    With one entry the steps are as fast (oneDNN's own cache still keeps the compiled kernels; measured,
    docs/performance.md). The setting is the one pytorch/pytorch#27971 gives for this growth."""
    if IDEEP_CACHE_ENV in os.environ:
        return False
    os.environ[IDEEP_CACHE_ENV] = str(capacity)
    return True


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
