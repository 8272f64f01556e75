"""A run folder's layout: the files a run leaves, how to tell a finished run and a complete checkpoint.

A checkpoint counts as complete once its `trainer_state.json` parses and every process's RNG state
is there: the main process writes the trainer state after its own weights, optimizer, scheduler and
RNG state, but the other processes write their RNG states without waiting for each other, so a kill
while saving leaves a folder short of one of them, which is ignored (and cleared on resume) while
the previous one stays usable. How many processes wrote a checkpoint is in the checkpoint itself
(`gluetune_checkpoint.json`, written by the main process before anything else of it): a resume on
another process count rewrites `run_record.json`, which only checkpoints of old fall back to.
A run counts as finished once `metrics.json` exists; it is written last, atomically.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_json

LOCK_FILENAME = ".gluetune.lock"  # held by the run that writes the folder (training.outputdir)
OWNER_FILENAME = ".gluetune.lock.owner"  # who holds the lock
LOCK_FILES = (LOCK_FILENAME, OWNER_FILENAME)
METRICS_FILENAME = "metrics.json"  # written last: its presence means the run finished
RECORD_FILENAME = "run_record.json"  # how to reproduce the run: command, seed, versions, data hashes
PREDICTIONS_FILENAME = "validation_predictions.jsonl"  # the final model's logits for every validation example
CHECKPOINT_RECORD = "gluetune_checkpoint.json"  # in each checkpoint folder: how many processes wrote it
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def recorded_processes(folder: Path) -> int | None:
    """How many processes the run's latest start had (run_record.json); None for a run of old."""
    return (read_record(folder).get("batch") or {}).get("processes")


def write_checkpoint_record(path: Path, processes: int) -> None:
    """Mark a checkpoint folder with the number of processes writing it (before they write it)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path) / CHECKPOINT_RECORD, {"processes": processes})


def checkpoint_processes(path: Path, fallback: int | None) -> int | None:
    """How many processes wrote the checkpoint at `path`: its own record, else (a checkpoint of old)
    `fallback`, the run record's count."""
    try:
        processes = json.loads((Path(path) / CHECKPOINT_RECORD).read_text())["processes"]
    except (OSError, ValueError, KeyError, TypeError):
        return fallback
    return processes if isinstance(processes, int) and processes > 0 else fallback


def missing_from_checkpoint(path: Path, processes: int | None) -> list[str]:
    """The files a checkpoint lacks to resume exactly; [] when it is complete. `processes`: the run
    record's count, for a checkpoint that does not record its own."""
    path = Path(path)
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return ["trainer_state.json"]
    processes = checkpoint_processes(path, processes)
    present = {p.name for p in path.glob("rng_state*.pth")}
    if not present or processes is None:  # training.save_only_model (no RNG states, by choice); a run of old
        return []
    wanted = ["rng_state.pth"] if processes == 1 else [f"rng_state_{i}.pth" for i in range(processes)]
    return [name for name in wanted if name not in present]


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders, oldest step first (complete or not)."""
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def sort_checkpoints(folder: Path) -> tuple[list[Path], dict[Path, list[str]]]:
    """(the complete checkpoints, oldest step first; {a checkpoint cut short: the files it lacks})."""
    processes = recorded_processes(folder)  # read once: for checkpoints of old, which do not record their own
    complete, torn = [], {}
    for path in checkpoints(folder):
        missing = missing_from_checkpoint(path, processes)
        if missing:
            torn[path] = missing
        else:
            complete.append(path)
    return complete, torn


def latest_checkpoint(folder: Path) -> Path | None:
    complete, _ = sort_checkpoints(folder)
    return complete[-1] if complete else None


def is_finished(folder: Path) -> bool:
    return (Path(folder) / METRICS_FILENAME).is_file()


def read_record(folder: Path) -> dict:
    path = Path(folder) / RECORD_FILENAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def pin_recorded_revision(config, folder: Path) -> None:
    """Read the run in `folder` back from the hub commit its base model resolved to (run_record.json's
    `model_source`), where the config names that model with the revision it was recorded with (a
    `--set` of another model or revision wins): with `revision: null` the hub's main may have moved
    on since. Nothing for a local or `pkg:` base, or a run recorded before commits were."""
    source = read_record(folder).get("model_source") or {}
    model = config.model
    if source.get("commit") and (source.get("name_or_path"), source.get("revision")) == (model.name_or_path,
                                                                                          model.revision):
        model.revision = source["commit"]


def trained_precision(folder: Path) -> str | None:
    """The precision (bf16, fp16, fp32) the run in `folder`, or the run a checkpoint-N folder belongs
    to, trained in: from metrics.json, else from its run record; None for a folder gluetune did not write."""
    for candidate in (Path(folder), Path(folder).parent):
        try:
            found = json.loads((candidate / METRICS_FILENAME).read_text()).get("precision")
        except (OSError, ValueError):
            found = read_record(candidate).get("precision")
        if found:
            return found
    return None


def evaluated_in(folder: Path, config) -> str:
    """The precision the run in `folder` trained and evaluated in (model.precision reads it back the
    same way): as recorded, else (a folder gluetune did not write) the one its config asks for."""
    return trained_precision(folder) or ("bf16" if config.training.get("bf16") else "fp32")


def read_metrics(folder: Path) -> dict:
    path = Path(folder) / METRICS_FILENAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the run's metrics ({err})") from None


def describe_batch(batch: dict[str, int]) -> str:
    """'64 = 16 per device x 2 accumulation x 2 process(es)' (x GPUs when one process drives several)."""
    text = (f"{math.prod(batch.values())} = {batch['per_device']} per device x {batch['accumulation']} accumulation "
            f"x {batch['processes']} process(es)")
    return text + (f" x {batch['gpus_per_process']} GPUs (DataParallel)" if batch.get("gpus_per_process", 1) > 1 else "")
