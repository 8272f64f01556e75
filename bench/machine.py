"""What the benchmarks print about the machine they ran on (shared by the bench scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_info(field: str) -> str:
    """The first value of a /proc/cpuinfo field ("model name", "flags", "vendor_id", "cpu family"); "" where absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    return cpu_info("model name") or platform.processor() or platform.machine()


def machine_line() -> str:
    """The line a CPU benchmark's output starts with: the CPU and its cores, torch and its threads, python."""
    import torch

    return (f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}")
