"""Several processes on the CPU (gloo): torchrun and accelerate launch run the reference config with a
tiny Qwen2 as one job, write one complete folder, train what one process trains, and resume after
a SIGKILL of the whole job. FSDP: accelerate shards only on GPUs (on a CPU its processes are
MULTI_CPU, never FSDP; a run launched with fsdp.yaml trains as DDP and says so), so gluetune's own
train() runs sharded only in bench/gpu_fsdp.py, on a GPU machine. Here the shipped config is checked
(parsing, wrap unit) and the sharded-state-dict adapter round trip runs on torch's FSDP2 itself.
The tests that start several processes are in the slow tier, as the project's tiers put them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REFERENCE_CONFIG, ROOT, as_set_args, assert_one_line_error, run_main, tiny_overrides

torch_distributed = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not torch_distributed.is_gloo_available(), reason="needs torch's gloo backend")

BIN = Path(sys.executable).parent
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
# 131 examples: 4 optimizer steps of 32 an epoch and a short one of 3 (split 2 + 1: uneven pieces,
# where a wrong loss normalisation would show), 2 epochs. Dropout off, so one process and two
# processes differ only in the order of float additions (see test_two_processes_train_what_one_trains).
SAME_RUN = {"train": 131, "evals": 64, "epochs": 2}
# 256 examples, 3 epochs: 4 steps of 64 (16 x 2 x 2 processes) an epoch, the reference dropout
# (0.1), a checkpoint every 3 steps: checkpoint-6 is in the middle of epoch 2 (steps 5-8).
KILL_RUN = {"train": 256, "evals": 64, "epochs": 3}
STEP_CHECKPOINTS = ("--set", "training.save_strategy=steps", "--set", "training.save_steps=3",
                    "--set", "training.eval_strategy=steps", "--set", "training.eval_steps=3")


def train_args(out: Path, size: dict, extra: tuple[str, ...], model: Path) -> list[str]:
    """train.py and its arguments: the reference config shrunk to `size`."""
    return ["train.py", "--config", str(REFERENCE_CONFIG), *as_set_args(tiny_overrides(model, out, **size)), *extra]


def launch(*launcher: str, out: Path, size: dict, extra: tuple[str, ...] = (), model: Path) -> subprocess.Popen:
    """The reference config through train.py under a launcher, in its own process group."""
    command = [*launcher, *train_args(out, size, extra, model)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def torchrun(n: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(29500 + os.getpid() % 400)]


def accelerate(config: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ACCELERATE_CONFIGS / config),
            "--main_process_port", str(29900 + os.getpid() % 90)]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it at once (torch's elastic agent starts its
    workers in sessions of their own, out of reach of a process-group kill)."""
    import psutil

    root = psutil.Process(pid)
    processes = [*root.children(recursive=True), root]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    # the workers gone, their port and files let go (the launcher is the caller's to reap: its exit status)
    psutil.wait_procs(processes[:-1], timeout=60)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def predictions(out: Path) -> np.ndarray:
    rows = [json.loads(line) for line in (out / "validation_predictions.jsonl").read_text().splitlines()]
    return np.array([r["logits"] for r in sorted(rows, key=lambda r: r["idx"])])


def listing(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if "checkpoint-" not in str(p) and p.parent != out / "logs"}


@pytest.fixture(scope="module")
def one_process(tiny_qwen, tmp_path_factory):
    """The same run on one process: in this one (its start-up is not what is compared)."""
    from gluetune.config.run import load_config
    from gluetune.training.run import train

    out = tmp_path_factory.mktemp("one") / "run"
    train(load_config(REFERENCE_CONFIG, [*tiny_overrides(tiny_qwen, out, **SAME_RUN), "peft.lora_dropout=0"]))
    return out


@pytest.mark.slow  # two processes (torchrun), about 21 s on 2 cores
def test_two_processes_train_what_one_trains(tiny_qwen, tmp_path, one_process):
    """16 x 2 on one process and 16 x 1 on two are the same optimizer steps over the same examples
    (sampling.LengthGroupedBatches) with the same loss normalisation: the results differ only by
    float summation order (gradients all-reduced instead of accumulated), ~1e-7 relative per step.
    Tolerance: 1e-4 on logits and losses, far below any real difference (a changed example or a
    doubled loss moves them by 1e-2 and more)."""
    out = tmp_path / "two"
    stderr = finish(launch(*torchrun(), out=out, size=SAME_RUN, model=tiny_qwen,
                           extra=("--set", "peft.lora_dropout=0", "--set", "training.gradient_accumulation_steps=1")))
    assert "effective batch 32 = 16 per device x 1 accumulation x 2 process(es) (DDP)" in stderr
    assert stderr.count("effective batch") == 1 and stderr.count("trainable params") == 1  # one process speaks
    np.testing.assert_allclose(predictions(out), predictions(one_process), atol=1e-4)
    one, two = (json.loads((o / "metrics.json").read_text()) for o in (one_process, out))
    assert two["train"]["steps"] == one["train"]["steps"] == 10
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-4)
    assert two["validation"]["loss"] == pytest.approx(one["validation"]["loss"], rel=1e-4)
    assert (two["train"]["processes"], two["train"]["effective_batch_size"]) == (2, 32)
    # one writer: the same files as a one-process run, one TensorBoard event file, no lock left held
    assert listing(out) == listing(one_process)
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert {f"rng_state_{r}.pth" for r in (0, 1)} <= {p.name for p in (out / "checkpoint-10").iterdir()}


@pytest.mark.slow  # two processes compiling with inductor, about 60 s on 2 cores
def test_two_processes_on_the_fast_path_train_what_one_trains(tiny_qwen, tmp_path, one_process):
    """The fast path on two processes (the CPU default's path): each rehearses and compiles its layers
    before the first step, pads its piece of a step to its own rows (the short last step splits 2 + 1,
    both pieces mostly filler rows), and the job trains what one plain process trains, to float rounding."""
    out = tmp_path / "two-fast"
    stderr = finish(launch(*torchrun(), out=out, size=SAME_RUN, model=tiny_qwen,
                           extra=("--set", "peft.lora_dropout=0", "--set", "training.gradient_accumulation_steps=1",
                                  "--set", "training.fast_path=true")))
    assert "effective batch 32 = 16 per device x 1 accumulation x 2 process(es) (DDP)" in stderr
    assert "fast path: compiled in" in stderr and "rehearsal before training failed" not in stderr
    np.testing.assert_allclose(predictions(out), predictions(one_process), atol=1e-4)
    one, two = (json.loads((o / "metrics.json").read_text()) for o in (one_process, out))
    assert two["train"]["steps"] == one["train"]["steps"] == 10
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-4)
    assert listing(out) == listing(one_process)


@pytest.fixture(scope="module")
def uninterrupted_two(tiny_qwen, tmp_path_factory):
    """The reference recipe (dropout 0.1) on two processes, launched with the FSDP config: on a CPU
    accelerate runs it as DDP and gluetune says so."""
    out = tmp_path_factory.mktemp("two") / "uninterrupted"
    stderr = finish(launch(*accelerate("fsdp.yaml"), out=out, size=KILL_RUN, model=tiny_qwen, extra=STEP_CHECKPOINTS))
    assert "FSDP: accelerate shards models only on GPUs" in stderr and "(DDP)" in stderr
    return out


@pytest.mark.slow  # about 40 s on 2 cores; the default tier's kill -9 and resume: test_resilience.py
def test_sigkill_of_the_whole_job_then_resume_ends_where_the_run_would_have(tiny_qwen, tmp_path, uninterrupted_two):
    """Killed at step 8, after checkpoint-6 (mid-epoch 2) and before checkpoint-9, under accelerate
    launch; resumed under torchrun: per-process RNG states, epoch 2's data order (the resume skips
    into it) and the optimizer come back."""
    out = tmp_path / "killed"
    process = launch(*accelerate("ddp.yaml"), out=out, size=KILL_RUN, model=tiny_qwen, extra=STEP_CHECKPOINTS)
    seen = []
    for line in process.stderr:  # the main process logs every step (logging_steps=1)
        seen.append(line)
        if line.startswith("[gluetune] step 8/12"):
            kill_tree(process.pid)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()
    assert not (out / "metrics.json").exists() and not (out / "checkpoint-9").exists()
    # On one process a step would hold half as many examples: refused, the numbers named.
    alone = run_main(*train_args(out, KILL_RUN, (*STEP_CHECKPOINTS, "--resume"), tiny_qwen))
    assert_one_line_error(alone, "64 = 16 per device x 2 accumulation x 2 process(es)")
    resumed = finish(launch(*torchrun(), out=out, size=KILL_RUN, model=tiny_qwen, extra=(*STEP_CHECKPOINTS, "--resume")))
    assert "resuming from" in resumed
    done, reference = (json.loads((o / "metrics.json").read_text()) for o in (out, uninterrupted_two))
    assert done["train"]["resumed_from"] == "checkpoint-6"
    for key, value in reference["validation"].items():
        assert done["validation"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert done["train"]["loss"] == pytest.approx(reference["train"]["loss"], rel=1e-6)
    np.testing.assert_allclose(predictions(out), predictions(uninterrupted_two), atol=1e-6)


@pytest.mark.slow  # two processes, about 11 s on 2 cores
def test_an_error_at_start_stops_every_process_with_one_line(tiny_qwen, tmp_path):
    """A folder that is not empty: the main process refuses, every process exits with status 2,
    the message is printed once, and nothing is written."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    process = launch(*torchrun(), out=out, size=SAME_RUN, model=tiny_qwen)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("gluetune: error:")]
    assert len(errors) == 1 and "not empty" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr.split("gluetune: error:")[0]  # (torchrun then reports the exit itself)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_fsdp_config_wraps_the_decoder_layer(tiny_qwen, monkeypatch):
    """The shipped FSDP config as accelerate reads it, and the wrap unit it gives a Qwen2 + LoRA."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin

    from gluetune.config.run import load_config
    from gluetune.model import classifier as models

    launch_config = load_config_from_file(str(ACCELERATE_CONFIGS / "fsdp.yaml"))
    assert launch_config.distributed_type == "FSDP"
    fsdp = launch_config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    for key, value in fsdp.items():  # what `accelerate launch` puts in the environment
        monkeypatch.setenv(f"FSDP_{key.removeprefix('fsdp_').upper()}", str(value).lower())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tiny_qwen}"])
    model = models.make_trainable(models.load_classifier(config.model, config.task, 0), config)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(model)
    wrapped = {type(m).__name__ for m in model.modules() if plugin.auto_wrap_policy(m, False, 0)}
    assert plugin.fsdp_version == 2 and wrapped == {"Qwen2DecoderLayer"}


@pytest.mark.slow  # two processes, about 14 s on 2 cores
def test_torch_fsdp2_shards_and_saves_a_plain_peft_adapter_but_accelerate_shards_only_on_gpus(tiny_qwen,
                                                                                              tmp_path):
    """FSDP2 (torch's fully_shard, gloo) over two processes: the full state dict gathered from the
    shards gives the same adapter folder as an unsharded model, and plain peft loads it. Not through
    gluetune's train(): accelerate runs FSDP on GPUs only (bench/gpu_fsdp.py runs it there)."""
    script = ROOT / "tests" / "fsdp_roundtrip.py"
    result = subprocess.run([*torchrun(), str(script), str(tiny_qwen), str(tmp_path)], cwd=ROOT, check=False, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ROUNDTRIP OK" in result.stdout, result.stdout[-2000:]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}

