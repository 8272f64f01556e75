"""Resilience: kills and resumes, no clobbering, one writer per folder, divergence, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    GLUE_DIR,
    REFERENCE_CONFIG,
    ROOT,
    as_set_args,
    assert_one_line_error,
    assert_same_metrics,
    build_tiny_qwen,
    copy_run,
    kill_at,
    run_main,
    tiny_overrides,
    validation,
)

from gluetune.results.rundir import LOCK_FILENAME, OWNER_FILENAME, latest_checkpoint
from gluetune.training.outputdir import OutputDirLock, prepare

# 256 examples, batch 16 x accumulation 2: 8 optimizer steps an epoch, 4 epochs, a checkpoint (and
# an evaluation) every 3 steps, so checkpoints fall inside epochs; every checkpoint kept.
SIZE = {"train": 256, "evals": 64, "epochs": 4}
STEP_CHECKPOINTS = ["training.save_strategy=steps", "training.save_steps=3", "training.eval_strategy=steps",
                    "training.eval_steps=3", "training.save_total_limit=null"]


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train.py", "--config", str(REFERENCE_CONFIG),
            *as_set_args(tiny_overrides(model, out, **SIZE) + STEP_CHECKPOINTS), *extra]


def start_training(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *train_args(model, out, *extra)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended before {path} appeared: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def train_loss(out: Path) -> float:
    return json.loads((out / "metrics.json").read_text())["train"]["loss"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_qwen, tmp_path_factory):
    from gluetune.config.run import load_config
    from gluetune.training.run import train

    out = tmp_path_factory.mktemp("resilience") / "uninterrupted"
    train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, **SIZE) + STEP_CHECKPOINTS))
    return out


@pytest.fixture(scope="module")
def killed(tiny_qwen, tmp_path_factory):
    """A run SIGKILLed at step 13, in epoch 2 (steps 9-16), after checkpoint-12 and before checkpoint-15;
    two tests resume copies of it."""
    out = tmp_path_factory.mktemp("resilience") / "killed"
    process = start_training(tiny_qwen, out)
    kill_at(process, "[gluetune] step 13/32")
    assert process.returncode == -signal.SIGKILL and not (out / "metrics.json").exists()
    assert latest_checkpoint(out).name == "checkpoint-12"
    return out


def test_sigkill_mid_epoch_then_resume_ends_where_the_run_would_have(tiny_qwen, tmp_path, killed, uninterrupted):
    """The resume skips into the middle of epoch 2 and must see that epoch's order, RNG and optimizer state."""
    out = copy_run(killed, tmp_path / "killed")
    resumed = run_main(*train_args(tiny_qwen, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"] == "checkpoint-12"
    assert_same_metrics(validation(out), validation(uninterrupted))
    # the training loss of the whole run, not of the part after the resume
    assert train_loss(out) == pytest.approx(train_loss(uninterrupted), rel=1e-6)


def test_sigterm_saves_a_checkpoint_mid_epoch_and_resume_matches(tiny_qwen, tmp_path, uninterrupted):
    out = tmp_path / "terminated"
    process = start_training(tiny_qwen, out)
    wait_for(out / "checkpoint-9" / "trainer_state.json", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "stopped by signal 15" in stderr
    last = latest_checkpoint(out)
    assert last is not None and last.name != "checkpoint-32" and not (out / "metrics.json").exists()
    resumed = run_main(*train_args(tiny_qwen, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_metrics(validation(out), validation(uninterrupted))
    assert train_loss(out) == pytest.approx(train_loss(uninterrupted), rel=1e-6)


@pytest.mark.slow  # about 10 s; SIGTERM mid-epoch and resume is in the default tier above
def test_sigterm_mid_epoch_neither_evaluates_nor_saves_again_at_the_epoch_end(tiny_qwen, tmp_path):
    """With per-epoch evaluation and saving, a stop during epoch 1 (8 steps) leaves one checkpoint
    and no evaluation of the part-epoch model, which could otherwise become the "best"."""
    out = tmp_path / "stopped"
    command = ["train.py", "--config", str(REFERENCE_CONFIG), *as_set_args(tiny_overrides(tiny_qwen, out, **SIZE))]
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stderr:
        if line.startswith("[gluetune] step 5/32"):
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM
    (checkpoint,) = out.glob("checkpoint-*")  # the one the stop saved, after the step under way
    assert checkpoint.name in ("checkpoint-5", "checkpoint-6")
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert not any("eval_loss" in entry for entry in history)


def test_kill_while_saving_leaves_the_previous_checkpoint_usable(tiny_qwen, tmp_path, killed, uninterrupted):
    out = copy_run(killed, tmp_path / "torn")
    # What a kill during the save of checkpoint-12 leaves: weights written, trainer state not yet.
    (out / "checkpoint-12" / "trainer_state.json").unlink()
    resumed = run_main(*train_args(tiny_qwen, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-9" in resumed.stderr and "was being written" in resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"] == "checkpoint-9"
    assert_same_metrics(validation(out), validation(uninterrupted))


def test_a_checkpoint_without_every_process_rng_state_is_not_resumed(tmp_path, caplog):
    """Two processes save their RNG states without waiting for each other: checkpoint-6 has the main
    process's trainer state but not process 1's RNG state (killed in between), so checkpoint-3 is used."""
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-6").mkdir()
    for checkpoint, files in (("checkpoint-3", ("rng_state_0.pth", "rng_state_1.pth")), ("checkpoint-6", ("rng_state_0.pth",))):
        (out / checkpoint / "trainer_state.json").write_text("{}")
        for name in files:
            (out / checkpoint / name).write_bytes(b"")
    batch = {"per_device": 16, "accumulation": 1, "processes": 2, "gpus_per_process": 1}
    (out / "run_record.json").write_text(json.dumps({"batch": batch}))
    assert latest_checkpoint(out).name == "checkpoint-3"
    with caplog.at_level("WARNING", logger="gluetune"):
        assert prepare(out, "auto", overwrite=False) == out / "checkpoint-3"
    assert "checkpoint-6" in caplog.text and "no rng_state_1.pth" in caplog.text and not (out / "checkpoint-6").exists()


def test_a_checkpoint_records_the_processes_that_wrote_it(finished_tiny_run):
    """What a resume judges it by (results.rundir; tests/training/test_checkpoints.py)."""
    checkpoints = sorted(finished_tiny_run.glob("checkpoint-*"))
    assert checkpoints and all(json.loads((c / "gluetune_checkpoint.json").read_text()) == {"processes": 1}
                               for c in checkpoints)


def test_resume_of_a_folder_without_a_run_starts_without_a_warning(tmp_path, caplog):
    """A sweep starts every run with --resume, its train.log already in the folder: nothing to say.
    A folder that held a run (its config) but no complete checkpoint: the restart is worth a line."""
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "train.log").write_text("")
    with caplog.at_level("WARNING", logger="gluetune"):
        assert prepare(tmp_path / "fresh", "auto", overwrite=False) is None
    assert "starting from the beginning" not in caplog.text
    (tmp_path / "fresh" / "resolved_config.yaml").write_text("")
    with caplog.at_level("WARNING", logger="gluetune"):
        assert prepare(tmp_path / "fresh", "auto", overwrite=False) is None
    assert "no complete checkpoint" in caplog.text and "starting from the beginning" in caplog.text


def test_resume_on_another_number_of_processes_is_refused(tiny_qwen, tmp_path, finished_tiny_run):
    """The run records what a step holds; a resume whose product differs is refused, naming the numbers
    (test_distributed shows it for a real two-process run resumed on one)."""
    out = copy_run(finished_tiny_run, tmp_path / "run")
    (out / "metrics.json").unlink()  # as if stopped before the end
    record = json.loads((out / "run_record.json").read_text())
    assert record["batch"] == {"per_device": 16, "accumulation": 2, "processes": 1, "gpus_per_process": 1}
    record["batch"]["processes"] = 2
    (out / "run_record.json").write_text(json.dumps(record))
    overrides = as_set_args(tiny_overrides(tiny_qwen, out, train=32, evals=16))
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides, "--resume")
    line = assert_one_line_error(result, "64 = 16 per device x 2 accumulation x 2 process(es)",
                                 "32 = 16 per device x 2 accumulation x 1 process(es)", "torchrun --nproc_per_node 2")
    assert "GPU" not in line  # the GPUs are the same: not named


def test_a_resume_refused_for_another_batch_says_what_differs(tmp_path):
    """Trained by one process driving 2 GPUs (DataParallel), resumed where it sees one: the process
    count is the same, so the message must not ask for another one; it names the GPUs."""
    from gluetune.errors import UserError
    from gluetune.training.outputdir import check_same_batch

    (tmp_path / "run_record.json").write_text(json.dumps(
        {"batch": {"per_device": 16, "accumulation": 2, "processes": 1, "gpus_per_process": 2}}))
    with pytest.raises(UserError) as caught:
        check_same_batch(tmp_path, {"per_device": 16, "accumulation": 2, "processes": 1, "gpus_per_process": 1})
    message = str(caught.value)
    assert "64 = 16 per device x 2 accumulation x 1 process(es) x 2 GPUs (DataParallel)" in message
    assert "2 GPU(s)" in message and "CUDA_VISIBLE_DEVICES" in message and "this one sees 1" in message
    assert "process(es) (torchrun" not in message and "\n" not in message
    with pytest.raises(UserError) as caught:  # another accumulation: named, with the setting to change
        check_same_batch(tmp_path, {"per_device": 16, "accumulation": 1, "processes": 1, "gpus_per_process": 2})
    assert "set accumulation 2 as the run had" in str(caught.value) and "torchrun" not in str(caught.value)
    check_same_batch(tmp_path, {"per_device": 16, "accumulation": 2, "processes": 2, "gpus_per_process": 1})  # 64 too


def test_the_record_holds_a_command_a_user_can_paste():
    """`python -m gluetune train ...` (how sweeps and searches start every trial) has gluetune's
    __main__.py as argv[0]; the record says `gluetune train ...`, which runs as written."""
    import gluetune
    from gluetune.training.outputdir import command_line

    main = str(Path(gluetune.__file__).parent / "__main__.py")
    assert command_line([main, "train", "--config", "c.yaml"]) == ["gluetune", "train", "--config", "c.yaml"]
    assert command_line([str(ROOT / "train.py"), "--config", "c.yaml"]) == ["train.py", "--config", "c.yaml"]
    assert command_line(["/venv/bin/gluetune", "train"]) == ["gluetune", "train"]


def test_resume_of_a_finished_run_does_nothing(tiny_qwen, tmp_path, finished_tiny_run):
    out = copy_run(finished_tiny_run, tmp_path / "done")
    overrides = as_set_args(tiny_overrides(tiny_qwen, out, train=32, evals=16))
    before = (out / "metrics.json").read_text()
    again = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides, "--resume")
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert (out / "metrics.json").read_text() == before


def test_non_empty_output_folder_is_never_clobbered(tiny_qwen, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    overrides = as_set_args(tiny_overrides(tiny_qwen, out, train=32, evals=16))
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides)
    assert_one_line_error(result, str(out), "not empty", "--resume", "--overwrite")
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides, "--overwrite")
    assert_one_line_error(result, "does not look like a gluetune output folder")
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_starts_a_gluetune_folder_over(tiny_qwen, tmp_path, finished_tiny_run):
    out = copy_run(finished_tiny_run, tmp_path / "again")
    overrides = as_set_args(tiny_overrides(tiny_qwen, out, train=32, evals=16))
    (out / "stale-marker").write_text("x")
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "stale-marker").exists() and (out / "metrics.json").is_file()


def test_second_writer_is_refused_and_a_dead_lock_does_not_block(tiny_qwen, tmp_path):
    out = tmp_path / "locked"
    overrides = as_set_args(tiny_overrides(tiny_qwen, out, train=32, evals=16))
    with OutputDirLock(out):  # the owner is still starting: no resolved_config.yaml yet
        result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides)
        assert_one_line_error(result, "in use by another run", f"pid {os.getpid()}")
        # The refused run must leave the owner's lock alone, so a third start is refused too.
        assert (out / LOCK_FILENAME).exists() and (out / OWNER_FILENAME).exists()
        result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides)
        assert_one_line_error(result, "in use by another run", f"pid {os.getpid()}")
    # The lock files a process left when it died do not block.
    (out / LOCK_FILENAME).write_text("")
    (out / OWNER_FILENAME).write_text("pid 1 on elsewhere")
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_lock_held_by_a_killed_process_is_released(tmp_path):
    out = tmp_path / "holder"
    code = f"from gluetune.training.outputdir import OutputDirLock; lock = OutputDirLock({str(out)!r}).acquire(); import time; time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code])
    while not (out / OWNER_FILENAME).exists() or not (out / OWNER_FILENAME).read_text():
        time.sleep(0.05)
    with pytest.raises(Exception, match="in use by another run"):
        OutputDirLock(out).acquire()
    holder.kill()
    holder.wait()
    OutputDirLock(out).acquire().release()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_qwen, tmp_path):
    out = tmp_path / "nan"
    overrides = tiny_overrides(tiny_qwen, out, train=128, evals=16) + [
        "training.learning_rate=1e30", "training.max_grad_norm=0",
        "training.save_strategy=steps", "training.save_steps=1", "training.eval_strategy=steps", "training.eval_steps=1",
    ]
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *as_set_args(overrides))
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("gluetune: error:"))
    assert "training diverged" in line and "at step 2" in line and "checkpoint-1, is intact" in line
    assert "learning_rate" in line and "warmup" in line
    assert latest_checkpoint(out).name == "checkpoint-1" and not (out / "checkpoint-2").exists()


# ---------------------------------------------------------------- bad input at the CLI


def test_bad_data_through_the_cli(tiny_qwen, tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\nfine\t1\nbad\t5\n")
    (tmp_path / "dev.tsv").write_text("text\tlabel\nok\t0\n")
    overrides = [f"model.name_or_path={tiny_qwen}", "dataset.subset=null", "dataset.text_column=[text]",
                 "dataset.label_names=[neg, pos]", f"dataset.train_file={tmp_path / 'train.tsv'}",
                 f"dataset.validation_file={tmp_path / 'dev.tsv'}", "training.metric_for_best_model=null",
                 f"training.output_dir={tmp_path / 'out'}"]
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), *as_set_args(overrides))
    assert_one_line_error(result, "train.tsv:3", "label '5'", "0=neg, 1=pos")
    assert not (tmp_path / "out").exists()  # a failed start leaves no folder (not even a lock file)


def test_missing_model_folder_through_the_cli(tmp_path):
    result = run_main("train.py", "--config", str(REFERENCE_CONFIG), "--set", f"model.name_or_path={tmp_path / 'nope'}",
                     "--set", f"dataset.data_dir={GLUE_DIR}", "--set", f"training.output_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "model folder not found", "nope")


def test_empty_input_text_and_overlong_input(finished_tiny_run):
    out = finished_tiny_run
    empty = run_main("inference.py", "--model_path", str(out), "--input_text", "")
    assert_one_line_error(empty, "empty")
    long_text = " ".join(["word"] * 2000)
    result = run_main("inference.py", "--model_path", str(out), "--input_text", long_text)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "truncated" in result.stderr and result.stdout.startswith("label=")


def test_adapter_that_does_not_fit_the_base_model(tiny_qwen, tmp_path, finished_tiny_run):
    out = copy_run(finished_tiny_run, tmp_path / "run")
    wider = build_tiny_qwen(tmp_path / "wider", hidden_size=64)
    saved = out / "resolved_config.yaml"
    saved.write_text(saved.read_text().replace(str(tiny_qwen), str(wider)))
    result = run_main("inference.py", "--model_path", str(out), "--input_text", "A sentence.")
    assert_one_line_error(result, str(out), "does not fit the base model")
