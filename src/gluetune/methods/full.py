"""Full fine-tuning: every weight trains. The baseline LoRA is measured against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    method: str = "full"


def apply(model, config: Config):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def optimizer(model, config: Config, args):
    return None  # the Trainer's own


def load(config: Config, load_base, folder):
    return load_base(str(folder))
