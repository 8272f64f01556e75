"""The benchmark scripts run: the GPU one exits cleanly without CUDA and works end to end in --smoke."""

from __future__ import annotations

import pytest
from conftest import run_cli


def test_gpu_bench_without_cuda_says_so_and_exits_cleanly():
    result = run_cli("bench/gpu_qwen.py")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device here" in result.stdout


def test_gpu_bench_pipeline_on_a_tiny_model():
    """The prepared GPU command, shrunk (--smoke): random-weight model folder, gluetune, baseline."""
    result = run_cli("bench/gpu_qwen.py", "--smoke", "--epochs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("gluetune ") and "wall_s=" in line and "peak_gpu_gb=" in line for line in lines), lines
    # every figure the full run prints is computed in smoke mode too (a token count once broke only on the GPU)
    assert all(float(line.split("real_tokens/s=")[1].split()[0]) > 0 for line in lines if "real_tokens/s=" in line), lines
    assert any(line.startswith("baseline ") and "mcc=" in line for line in lines), lines


@pytest.mark.slow
def test_cpu_bench_quick_prints_the_result_line():
    result = run_cli("bench/cpu_cola.py", "--quick", timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT speedup_vs_runglue=") and "peak_rss_gb=" in last
