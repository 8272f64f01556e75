"""Full fine-tuning: every weight trains. The baseline LoRA is measured against."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..validation import check_section


@dataclass
class Config:
    method: str = "full"


def parse(raw: dict, source: str) -> Config:
    return check_section("peft", raw, Config, source)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def apply(model, config: Config):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def parameter_groups(model, config: Config, args):
    return None  # one learning rate: the Trainer's own groups


def load(config: Config, load_base, folder):
    return load_base(str(folder))
