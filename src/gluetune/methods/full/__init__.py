"""Full fine-tuning: `config` is the `peft:` section (`method: full`), `model` trains every weight."""

from .config import Config, parse, to_dict
from .model import apply, load, parameter_groups

__all__ = ["Config", "apply", "load", "parameter_groups", "parse", "to_dict"]
