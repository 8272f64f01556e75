"""LoRA (peft): `config` is the `peft:` section, `model` applies it to a base model and loads it back."""

from .config import Config, parse, to_dict
from .model import apply, load, name_base_model, parameter_groups

__all__ = ["Config", "apply", "load", "name_base_model", "parameter_groups", "parse", "to_dict"]
