"""The output folder of a run being trained: one writer at a time, nothing clobbered, the checkpoint
to resume, and the record of how to run it again. (What the folder holds: results.rundir.)"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path

from ..config.run import CONFIG_FILENAME
from ..errors import UserError
from ..files import atomic_write_json, installed_version, sha256_of
from ..model.precision import cpu_bf16
from ..results.rundir import (
    LOCK_FILENAME,
    LOCK_FILES,
    OWNER_FILENAME,
    RECORD_FILENAME,
    describe_batch,
    missing_from_checkpoint,
    read_record,
    recorded_processes,
    sort_checkpoints,
)

logger = logging.getLogger("gluetune")

RECORDED_PACKAGES = ("gluetune", "torch", "transformers", "peft", "datasets", "accelerate", "tokenizers", "numpy",
                     "scikit-learn", "bitsandbytes")


class OutputDirLock:
    """An exclusive lock on an output folder for the life of this process (the main one, in a
    multi-process run).

    `filelock` (fcntl on POSIX, LockFileEx on Windows) is released by the kernel when its holder
    dies, even by SIGKILL, so a stale lock file left by a dead run never blocks the next one. Who
    holds it is written beside it, for the refusal message.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILENAME
        self.owner_path = Path(folder) / OWNER_FILENAME
        self._lock = None

    def acquire(self) -> OutputDirLock:
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = self.owner_path.read_text().strip() or "another process"
            except OSError:
                holder = "another process"
            raise UserError(
                f"output folder {self.path.parent} is in use by another run ({holder}); "
                "wait for it, or choose another training.output_dir"
            ) from None
        self.owner_path.write_text(f"pid {os.getpid()} on {socket.gethostname()}")
        self._lock = lock
        return self

    @property
    def held(self) -> bool:
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None:
            self.owner_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> OutputDirLock:  # noqa: PYI034 (no typing.Self before Python 3.11)
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_same_batch(folder: Path, batch: dict[str, int]) -> None:
    """Refuse to resume with another effective batch (e.g. on another number of processes): the
    step would map to another epoch and sample offset, and per-process RNG states would be lost.
    The message says what differs: the processes, the GPUs one process drives (DataParallel), or the
    batch settings."""
    recorded = read_record(folder).get("batch")
    if not recorded or math.prod(recorded.values()) == math.prod(batch.values()):
        return
    fixes = []
    if recorded.get("processes", 1) != batch.get("processes", 1):
        n = recorded.get("processes", 1)
        fixes.append(f"resume with {n} process(es) (torchrun --nproc_per_node {n} / accelerate launch "
                     f"--num_processes {n})")
    gpus, now = recorded.get("gpus_per_process", 1), batch.get("gpus_per_process", 1)
    if gpus != now:
        fixes.append(f"show each process {gpus} GPU(s) as the run's did (CUDA_VISIBLE_DEVICES; this one sees {now}, "
                     "and one process drives every GPU it sees as DataParallel)")
    changed = [key for key in ("per_device", "accumulation") if recorded.get(key) != batch.get(key)]
    if changed:
        fixes.append("set " + " and ".join(f"{key.replace('_', ' ')} {recorded.get(key)}" for key in changed)
                     + " as the run had (training.per_device_train_batch_size, training.gradient_accumulation_steps)")
    raise UserError(f"--resume: {folder} was trained with an effective batch of {describe_batch(recorded)}; this "
                    f"start would have {describe_batch(batch)}. To resume, {'; '.join(fixes)}; or --overwrite to "
                    "start over")


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command that started this process, as a user can paste it: `python -m gluetune train ...`
    (argv[0] is then gluetune's __main__.py, as for every sweep and search trial) becomes
    `gluetune train ...`; the console script and entry scripts (train.py) keep their names."""
    import sys

    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0])
    if program.name == "__main__.py" and program.resolve().parent == Path(__file__).resolve().parents[1]:
        return ["gluetune", *argv[1:]]
    return [program.name, *argv[1:]]


def write_record(folder: Path, seed: int, data_files: list[Path], resumed_from: Path | None,
                 batch: dict[str, int], precision: str, quantization: str | None = None,
                 optimizer: str | None = None, model_source: dict | None = None, hub_data: dict | None = None) -> None:
    """What it takes to run this again: the exact command, seed, package versions, data hashes
    (the resolved config sits beside it), what a step holds (per device, accumulation, processes),
    the precision it trains in on this machine, the base's quantization in words, the optimizer
    that runs (the config's, or what this machine put in its place: training.optimizers), the base
    model exactly (`model_source`: a hub commit or a content hash, model.provenance) and a hub
    dataset's commit and fingerprints (`hub_data`). A resumed run appends its command."""
    import platform
    import time

    path = Path(folder) / RECORD_FILENAME
    previous = json.loads(path.read_text()) if resumed_from is not None and path.is_file() else {}
    versions = {name: installed_version(name) for name in RECORDED_PACKAGES}
    command = command_line()
    atomic_write_json(path, {
        "command": previous.get("command", command),
        "resumed_with": previous.get("resumed_with", []) + ([command] if previous else []),
        "cwd": os.getcwd(),
        "seed": seed,
        "batch": batch,
        "precision": precision,
        "cpu_bf16": cpu_bf16(),  # how this CPU computes bf16 (AVX512-BF16, AMX; None: emulated)
        "config": CONFIG_FILENAME,
        "python": platform.python_version(),
        "packages": versions,
        "quantization": quantization,
        "optimizer": optimizer,
        "model_source": previous.get("model_source", model_source),  # a resumed run loads what its start recorded
        "data_files": {str(p): sha256_of(p) for p in data_files if Path(p).is_file()},
        "hub_data": hub_data,
        "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
    })


def remove_if_unused(folder: Path, created: bool) -> None:
    """After a run that stopped before writing its config (a failed start): take away its lock
    files, and the folder itself if this run created it and it is empty. Only the lock's holder may
    call this, before releasing it."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / CONFIG_FILENAME).exists():
        return
    for name in LOCK_FILES:
        (folder / name).unlink(missing_ok=True)
    if created and not any(folder.iterdir()):
        folder.rmdir()


def _contents(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in LOCK_FILES) if Path(folder).is_dir() else []


def prepare(folder: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Make `folder` ready for this run (its lock must be held) and return the checkpoint to resume.

    resume: None (a fresh run), "auto" (the latest complete checkpoint if there is one), or a
    checkpoint path. A fresh run refuses a folder with anything in it unless `overwrite`.
    """
    folder = Path(folder)
    contents = _contents(folder)
    if overwrite:
        if contents and not (folder / CONFIG_FILENAME).is_file():
            raise UserError(
                f"--overwrite: {folder} does not look like a gluetune output folder (no {CONFIG_FILENAME}); "
                "refusing to delete its contents"
            )
        for name in contents:
            target = folder / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        return None
    if resume is None:
        if contents:
            shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
            raise UserError(
                f"output folder {folder} is not empty ({shown}); pass --resume to continue its run, "
                "--overwrite to start it over, or choose another training.output_dir"
            )
        return None
    complete, torn = sort_checkpoints(folder)
    for partial, missing in torn.items():
        logger.warning("removing %s: it was being written when the run stopped (no %s)", partial, ", ".join(missing))
        shutil.rmtree(partial)
    if resume == "auto":
        checkpoint = complete[-1] if complete else None
        if checkpoint is None and CONFIG_FILENAME in contents:  # a run began here (not a sweep's fresh folder)
            logger.warning("no complete checkpoint in %s: starting from the beginning", folder)
        return checkpoint
    checkpoint = Path(resume)
    missing = missing_from_checkpoint(checkpoint, recorded_processes(checkpoint.parent))
    if missing:
        raise UserError(f"training.resume_from_checkpoint: {resume} is not a complete checkpoint folder "
                        f"(no {', '.join(missing)})")
    return checkpoint
