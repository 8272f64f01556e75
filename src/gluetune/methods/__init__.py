"""Fine-tuning methods, one module each: a config dataclass beside the code that applies it.

A method module defines `Config` (its `peft:` section; `method` names it), `apply(model, config)`
which makes a freshly loaded base model trainable, `optimizer(model, config, training_args)` (None
for the Trainer's own), and `load(config, load_base, folder)` which rebuilds the trained model from
an output folder. Add a method by adding a module and listing it
in `METHODS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError, did_you_mean
from . import full, lora

METHODS = {"lora": lora, "full": full}


def _module(name: str, source: str = "<config>"):
    if name not in METHODS:
        raise UserError(
            f"{source}: peft.method: '{name}' is not a known method{did_you_mean(name, METHODS)}; "
            f"expected one of {', '.join(METHODS)}"
        )
    return METHODS[name]


def parse(raw: Any, source: str, check) -> Any:
    """The `peft:` section as the chosen method's Config (`check` validates keys and types)."""
    raw = dict(raw or {})
    name = raw.get("method", "lora")
    return check("peft", raw, _module(str(name), source).Config, source)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply(model, config):
    return _module(config.method).apply(model, config)


def optimizer(model, config, args):
    return _module(config.method).optimizer(model, config, args)


def load(config, load_base, folder):
    """The trained model of `folder`. `load_base(path)` loads a model with the run's settings;
    `load_base(None)` loads the run's base model."""
    return _module(config.method).load(config, load_base, folder)
