"""What the benchmarks print about the machine they ran on (shared by the bench scripts)."""

from __future__ import annotations

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
