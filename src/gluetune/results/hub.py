"""Sharing a run on the Hugging Face hub: `training.push_to_hub: true` (and `hub_model_id`).

The Trainer's own push uploads every checkpoint as it is saved, so a killed run leaves a half run
on the hub. gluetune pushes the finished folder once, after everything is written (adapter, card,
report, metrics), and checks before training that a push can happen at all, so a run does not
train for an hour to fail at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError, one_line

# What stays local: resumable state, the lock, the Trainer's pickled arguments.
NOT_PUSHED = ["checkpoint-*", "checkpoint-*/**", ".gluetune.lock*", "training_args.bin"]


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def repo_id(training: dict, output_dir: Path) -> str:
    return training.get("hub_model_id") or Path(output_dir).name


def check_can_push(training: dict) -> None:
    """Before training: refuse in one line when the finished run could not be pushed."""
    if not training.get("push_to_hub"):
        return
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise UserError("training.push_to_hub: HF_HUB_OFFLINE is set, so the finished run could not be pushed; "
                        "unset HF_HUB_OFFLINE, or set training.push_to_hub=false and upload the folder later")
    try:
        _api().whoami()  # the login's token (hf auth login, HF_TOKEN): never one from the config
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types for "no network / no token"
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise UserError(f"training.push_to_hub: the hub at {endpoint} cannot be reached with a valid token "
                        f"({one_line(err)}); check the network and `hf auth login` (or HF_TOKEN), or set "
                        "training.push_to_hub=false") from None


def push_run(folder: Path, training: dict) -> str:
    """Upload the finished run folder in one commit; returns the repo id."""
    api = _api()
    repo = repo_id(training, folder)
    api.create_repo(repo, private=training.get("hub_private_repo"), exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), ignore_patterns=NOT_PUSHED,
                      commit_message="gluetune: finished run (adapter, model card, report, metrics)")
    return repo
