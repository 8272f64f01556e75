"""Full fine-tuning: every weight trains. The baseline LoRA is measured against."""

from __future__ import annotations

from .config import Config


def apply(model, config: Config):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def parameter_groups(model, config: Config, args):
    return None  # one learning rate: the Trainer's own groups


def load(config: Config, load_base, folder):
    return load_base(str(folder))
