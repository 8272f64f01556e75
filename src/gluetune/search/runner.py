"""One training run as sweeps and searches start it: `gluetune train --resume` in its own process
and folder, its output in the folder's train.log, watched from outside through the run's own records.

The run is a normal gluetune run (a finished one is left alone, a killed one continues), so the
runner adds nothing a plain `gluetune train` would not do. It reads each evaluation from the latest
complete checkpoint (the Trainer saves after evaluating, and `trainer_state.json` carries the whole
evaluation history across resumes), and stops a run through the run's own graceful stop (SIGTERM:
finish the step, save a checkpoint, exit), so a stopped run's folder is complete and resumable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..results import rundir
from ..results.metrics import epoch_history, primary_values
from ..results.rundir import read_metrics

LOG_FILENAME = "train.log"


def train_command(config_path: str | os.PathLike, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "gluetune", "train", "--config", str(config_path), "--resume",
            *[arg for o in overrides for arg in ("--set", o)]]


def shared_cores_env(jobs: int, env: dict | None = None) -> dict:
    """The environment for one of `jobs` runs at once on this machine: the cores shared out."""
    env = dict(os.environ if env is None else env)
    if jobs > 1:  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def _prctl():
    if sys.platform != "linux":
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


# Looked up here, not in the forked child: a dlopen there could wait on a lock another thread held.
_PRCTL = _prctl()


def _stop_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the process that started it dies, even by
    SIGKILL, so a killed sweep or search leaves its runs stopped with a checkpoint, not orphaned.
    Python has no wrapper for prctl(PR_SET_PDEATHSIG); elsewhere the run outlives its starter."""
    _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_tied(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """A child process in its own session (a Ctrl-C or SIGTERM reaches the caller alone, which
    decides what to pass on) that gets SIGTERM when the caller dies (Linux)."""
    return subprocess.Popen(command, start_new_session=True, **popen_kwargs,
                            # a single foreign call, nothing that takes a lock
                            preexec_fn=_stop_with_parent if _PRCTL else None)  # noqa: PLW1509


class RunProcess:
    """A started run: its folder, its process, when it started."""

    def __init__(self, folder: Path, process: subprocess.Popen, started: float):
        self.folder, self.process, self.started = Path(folder), process, started

    @classmethod
    def start(cls, config_path: str | os.PathLike, overrides: list[str], folder: Path, env: dict | None = None,
              cwd: str | os.PathLike | None = None) -> RunProcess:
        """`overrides` must put the run's output_dir at `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOG_FILENAME, "a") as log:
            process = start_tied(train_command(config_path, overrides), stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=cwd)
        return cls(folder, process, time.time())

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self) -> int:
        return self.process.wait()

    def stop(self) -> int:
        """The run's graceful stop (a checkpoint after this step), and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait()

    @property
    def seconds(self) -> float:
        return time.time() - self.started

    def last_log_line(self) -> str:
        lines = _log_tail(self.folder).strip().splitlines()
        return lines[-1] if lines else "no output"

    def last_step(self) -> str:
        """'step 120/1876' from the end of the run's train.log ('' before its first logged step)."""
        found = re.findall(r"step (\d+/\d+)", _log_tail(self.folder))
        return f"step {found[-1]}" if found else ""


def raise_interrupt(signum, frame):
    """A SIGTERM handler: stop the way Ctrl-C does, so a sweep or search stops its runs first."""
    raise KeyboardInterrupt


def _log_tail(folder: Path, size: int = 4096) -> str:
    try:
        with open(Path(folder) / LOG_FILENAME, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def progress(folder: Path) -> tuple[list[dict], int | None]:
    """The run's evaluations so far, oldest first (`metrics.epoch_history` rows: from metrics.json
    once finished, else from the latest complete checkpoint; [] before the first one), and its last
    optimizer step, `max_steps`, as the Trainer computed it (from num_train_epochs, its default 3, or
    training.max_steps), read from the same checkpoint; None once the run has finished or before its
    first checkpoint."""
    folder = Path(folder)
    if rundir.is_finished(folder):
        return read_metrics(folder).get("history", []), None
    checkpoint = rundir.latest_checkpoint(folder)
    if checkpoint is None:
        return [], None
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):  # removed by the run's save_total_limit while being read
        return [], None
    return epoch_history(state.get("log_history", [])), state.get("max_steps")


def is_last_evaluation(row: dict, max_steps: int | None) -> bool:
    """Whether an evaluation is the run's last: at its last optimizer step (`progress`). Stopping the
    run then would save nothing but its final metrics, and its graceful stop may be gone already, so
    neither engine offers it to a pruner. Unknown (no max_steps): taken as the last."""
    return max_steps is None or (row.get("step") or 0) >= max_steps


def final_score(folder: Path) -> float:
    """The primary metric of a finished run's kept model."""
    metrics = read_metrics(folder)
    return primary_values(metrics)[metrics["primary_metric"]]
