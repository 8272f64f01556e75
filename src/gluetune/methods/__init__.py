"""Fine-tuning methods, one folder each (peft-style): the `peft:` section's dataclass beside the code
that applies it.

A method folder has `config.py` with `Config` (its `peft:` section; `method` names it), `parse(raw,
source)` and `to_dict(config)`, and `model.py` with `apply(model, config)`, which makes a freshly
loaded base model trainable, `parameter_groups(model, config, training_args)` (None when every
trainable weight shares the Trainer's learning rate) and `load(config, load_base, folder)`, which
rebuilds the trained model from an output folder. Add a method by adding a folder and listing it
in `METHODS`. Methods sit below `config` (which parses their sections) and `model` (which applies
them): they import nothing of gluetune but its foundations, and peft only when a model is built.
"""

from __future__ import annotations

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


def parse(raw: Any, source: str) -> Any:
    """The `peft:` section as the chosen method's Config, validated."""
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"{source}: 'peft' must be a mapping of keys to values, got {raw!r}")
    raw = dict(raw or {})
    name = raw.get("method", "lora")
    return _module(str(name), source).parse(raw, source)


def to_dict(config: Any) -> dict[str, Any]:
    return _module(config.method).to_dict(config)


def apply(model, config):
    return _module(config.method).apply(model, config)


def parameter_groups(model, config, args):
    return _module(config.method).parameter_groups(model, config, args)


def name_base_model(folder, config, name: str) -> None:
    """Record the base model as the user named it (a hub id, a pkg: name), not as resolved on this
    machine, in what the method saved in `folder`: a run folder must load on another machine."""
    hook = getattr(_module(config.method), "name_base_model", None)
    if hook is not None:
        hook(folder, name)


def load(config, load_base, folder):
    """The trained model of `folder`. `load_base(path)` loads a model with the run's settings;
    `load_base(None)` loads the run's base model."""
    return _module(config.method).load(config, load_base, folder)
