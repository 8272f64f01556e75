"""Checkpoints judged by what they record themselves: a resume on another number of processes
rewrites run_record.json, and the older checkpoints, written by as many processes as they record,
must stay complete (issue 28)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REFERENCE_CONFIG, ROOT, as_set_args, tiny_overrides

torch_distributed = pytest.importorskip("torch.distributed")

# 64 examples, 16 x 2 a process: one optimizer step an epoch on two processes, a checkpoint each epoch.
SIZE = {"train": 64, "evals": 16, "epochs": 2}
# One process that reports its batch as DataParallel over two GPUs (16 x 2 x 1 process x 2 GPUs = 64,
# the two-process run's effective batch), which is how a GPU machine resumes a 2-process run in one
# process; on the CPU the process trains 16 x 2 itself. The checkpoints' judging is what is tested.
AS_DATA_PARALLEL = ("import sys; import gluetune.training.run as run; factors = run.batch_factors; "
                    "run.batch_factors = lambda args: {**factors(args), 'gpus_per_process': 2}; "
                    "from gluetune.cli import main; sys.exit(main(sys.argv[1:]))")


def command(model: Path, out: Path) -> list[str]:
    return ["train", "--config", str(REFERENCE_CONFIG), *as_set_args(tiny_overrides(model, out, **SIZE)),
            "--set", "training.report_to=none"]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fake_checkpoint(folder: Path, rng_states: tuple[str, ...], processes: int | None, state: bool = True) -> Path:
    folder.mkdir(parents=True)
    if state:  # the main process's trainer_state.json, written last
        (folder / "trainer_state.json").write_text("{}")
    for name in rng_states:
        (folder / name).write_bytes(b"")
    if processes is not None:
        (folder / "gluetune_checkpoint.json").write_text(json.dumps({"processes": processes}))
    return folder


def test_each_checkpoint_is_judged_by_the_processes_it_records(tmp_path, caplog):
    """The run record says 1 process (a resume on one rewrote it); checkpoint-3 and -6 were written by 2
    and hold both RNG states: complete. checkpoint-9, of the 1-process start, was being written (no
    trainer state yet): partial. A checkpoint of old (no record of its own) is judged by the run record."""
    from gluetune.results.rundir import latest_checkpoint
    from gluetune.training.outputdir import prepare

    out = tmp_path / "run"
    for step in (3, 6):
        fake_checkpoint(out / f"checkpoint-{step}", ("rng_state_0.pth", "rng_state_1.pth"), processes=2)
    fake_checkpoint(out / "checkpoint-9", ("rng_state.pth",), processes=1, state=False)
    batch = {"per_device": 16, "accumulation": 2, "processes": 1, "gpus_per_process": 2}
    (out / "run_record.json").write_text(json.dumps({"batch": batch}))
    assert latest_checkpoint(out).name == "checkpoint-6"
    with caplog.at_level("WARNING", logger="gluetune"):
        assert prepare(out, "auto", overwrite=False) == out / "checkpoint-6"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert "checkpoint-9" in caplog.text and "no trainer_state.json" in caplog.text

    old = tmp_path / "old"
    fake_checkpoint(old / "checkpoint-2", ("rng_state_0.pth", "rng_state_1.pth"), processes=None)
    fake_checkpoint(old / "checkpoint-4", ("rng_state_0.pth",), processes=None)
    (old / "run_record.json").write_text(json.dumps({"batch": {**batch, "processes": 2, "gpus_per_process": 1}}))
    assert latest_checkpoint(old).name == "checkpoint-2"


@pytest.mark.slow  # three launches, one of them two processes: about 50 s of CPU, minutes on busy cores
@pytest.mark.skipif(not torch_distributed.is_gloo_available(), reason="needs torch's gloo backend")
def test_a_resume_on_fewer_processes_keeps_the_checkpoints_of_more(tiny_qwen, tmp_path):
    """Trained on 2 processes (torchrun, gloo); resumed on 1 at the same effective batch and SIGKILLed
    before its first new checkpoint (its run record now says 1 process); the next --resume keeps the
    2-process checkpoint (it records its 2 processes and holds their 2 RNG states) and resumes from it,
    where judging it by the run record deleted it as partial and started over."""
    out = tmp_path / "run"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 400)]
    two = start([*torchrun, "-m", "gluetune", *command(tiny_qwen, out)])
    _, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    # as if stopped in epoch 2, after checkpoint-1
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "checkpoint-2")
    first = out / "checkpoint-1"
    assert json.loads((first / "gluetune_checkpoint.json").read_text()) == {"processes": 2}
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in first.iterdir()}

    one = start([sys.executable, "-c", AS_DATA_PARALLEL, *command(tiny_qwen, out), "--resume"])
    seen = []
    for line in one.stderr:
        seen.append(line)
        if "resuming from" in line:  # the run record is rewritten by then; training has not begun
            one.kill()
            break
    one.wait()
    assert one.returncode == -9, "".join(seen)[-3000:]
    record = json.loads((out / "run_record.json").read_text())
    assert record["batch"]["processes"] == 1 and record["batch"]["gpus_per_process"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]

    again = start([sys.executable, "-c", AS_DATA_PARALLEL, *command(tiny_qwen, out), "--resume"])
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert "removing" not in stderr and f"resuming from {first}" in stderr, stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"] == "checkpoint-1"
    assert first.is_dir()
