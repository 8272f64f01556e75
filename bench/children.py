"""What the benchmarks' child processes share (each contender runs in a process of its own): the
environment it starts in, and a callback that every Trainer of the process gets."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(src: Path | str = ROOT / "src", **extra: str) -> dict[str, str]:
    """This process's environment for a child, with `extra`: gluetune imported from `src`, ahead of the
    caller's PYTHONPATH, which stays (packages carried onto a device machine live there), and the
    tokenizers' thread pool off (a child that forks after tokenizing would warn and could deadlock)."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", **extra,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}


def every_trainer_adds(make_callback) -> None:
    """Every transformers Trainer of this process gets `make_callback()` when its train() starts:
    gluetune's and a plain baseline's alike, from any gluetune version, with their code untouched."""
    from transformers import Trainer

    train = Trainer.train

    def train_with_callback(self, *args, **kwargs):
        self.add_callback(make_callback())
        return train(self, *args, **kwargs)

    Trainer.train = train_with_callback
