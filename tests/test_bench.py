"""The benchmark scripts run: the GPU one exits cleanly without CUDA, stops at a failing probe, and works
end to end in --smoke (slow tier)."""

from __future__ import annotations

import pytest
from conftest import run_cli


def test_gpu_bench_without_cuda_says_so_and_exits_cleanly():
    result = run_cli("bench/gpu_qwen.py")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device here" in result.stdout


@pytest.mark.slow  # about 50 s on 2 cores; the default tier runs the bench's probe (the next test)
def test_gpu_bench_pipeline_on_a_tiny_model():
    """The prepared GPU command, shrunk (--smoke, 3-step probes): random-weight model folder, gluetune, baseline."""
    result = run_cli("bench/gpu_qwen.py", "--smoke", "--epochs", "1", "--probe_steps", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("gluetune ") and "wall_s=" in line and "peak_gpu_gb=" in line for line in lines), lines
    # every figure the full run prints is computed in smoke mode too (a token count once broke only on the GPU)
    assert all(float(line.split("real_tokens/s=")[1].split()[0]) > 0 for line in lines if "real_tokens/s=" in line), lines
    assert any(line.startswith("baseline ") and "mcc=" in line for line in lines), lines
    # each kind first ran its short probe; each run printed its epochs' train and evaluation seconds
    probes = [line.split() for line in lines if line.startswith("probe ")]
    assert [(probe[1], probe[2]) for probe in probes] == [("gluetune", "3"), ("baseline", "3")], lines
    per_epoch = [line for line in lines if "per epoch: train_s" in line]
    assert len(per_epoch) == 2 and all(len(line.split("train_s")[1].split("|")[0].split()) == 1 for line in per_epoch)


def test_gpu_bench_stops_at_a_failing_probe_before_the_long_runs():
    result = run_cli("bench/gpu_qwen.py", "--smoke", "--epochs", "1", "--skip_baseline", "--set", "training.no_such_key=1")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "gluetune: the 20-step probe failed; stopping before the long runs" in result.stdout
    assert "no_such_key" in result.stdout and "wall_s=" not in result.stdout


@pytest.mark.slow
def test_host_overhead_bench_prints_its_table_and_profile():
    result = run_cli("bench/host_overhead.py", "--examples", "736", "--epochs", "1", "--only", "plain", "--only", "baseline")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line[:26].strip(): line[26:].split() for line in result.stdout.splitlines() if "gluetune (plain" in line[:26]
            or "Trainer + PEFT" in line[:26]}
    assert rows["Trainer + PEFT baseline"][3] == "1.00" and float(rows["gluetune (plain path)"][1]) > 0, result.stdout
    assert "ms of profiled host time per step" in result.stdout


@pytest.mark.slow
def test_cpu_bench_quick_prints_the_result_line():
    result = run_cli("bench/cpu_cola.py", "--quick", timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT speedup_vs_runglue=") and "peak_rss_gb=" in last
