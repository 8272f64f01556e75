"""LoRA's `peft:` section: gluetune's LoRA keys and every other peft `LoraConfig` field.

The section passes peft through, as `training:` passes TrainingArguments through: besides
the usage document's spellings (`lora_r`, `lora_alpha`, `lora_dropout`, ...), every `LoraConfig`
field is accepted (`rank_pattern`, `alpha_pattern`, `layers_to_transform`, `init_lora_weights:
pissa`, ...) and the whole section is validated by constructing `LoraConfig` when the config loads.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError, did_you_mean, one_line
from ...validation import check_value


@dataclass
class Config:
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    # None: peft's default for the architecture; "all-linear" targets every linear layer but the head.
    target_modules: list[str] | str | None = None
    # Extra modules trained in full and saved. The head (`score` / `classifier`) always is.
    modules_to_save: list[str] | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    # LoRA+: lora_B learns this many times faster than lora_A; None is plain LoRA.
    loraplus_lr_ratio: float | None = None
    # The learning rate of the modules trained in full (head, modules_to_save); None: training.learning_rate.
    modules_to_save_lr: float | None = None
    # Any other LoraConfig field, under its peft name (rank_pattern, layers_to_transform, ...).
    options: dict[str, Any] = field(default_factory=dict)


# LoraConfig fields gluetune sets itself, or that describe a saved adapter rather than a recipe.
_NOT_SETTABLE = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "r"}
_GLUETUNE_ONLY = ("method", "loraplus_lr_ratio", "modules_to_save_lr")
_ALIASES = {"r": "lora_r"}  # peft's spelling of the documented name


def _lora_config_types() -> dict[str, Any]:
    from peft import LoraConfig

    hints = typing.get_type_hints(LoraConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(LoraConfig) if f.init and f.name not in _NOT_SETTABLE}


def parse(raw: dict[str, Any], source: str) -> Config:
    own = typing.get_type_hints(Config)
    own.pop("options")
    passthrough = {k: t for k, t in _lora_config_types().items() if k not in own}
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        name = _ALIASES.get(key, key)
        if name in values:
            raise UserError(f"{source}: peft.{key} and peft.{name} name the same setting; give one")
        if name in own:
            values[name] = check_value(f"{source}: peft.{key}", value, own[name])
        elif name in passthrough:
            options[name] = check_value(f"{source}: peft.{key}", value, passthrough[name])
        else:
            valid = [*own, *passthrough]
            raise UserError(
                f"{source}: unknown key 'peft.{key}'{did_you_mean(key, valid)}; expected a gluetune LoRA key "
                f"({', '.join(own)}) or a peft LoraConfig field"
            )
    config = Config(**values, options=options)
    _check_ranges(config, source)
    try:
        lora_config(config)
    except (ValueError, TypeError) as err:
        raise UserError(f"{source}: peft: {one_line(err)}") from None
    return config


def _check_ranges(config: Config, source: str) -> None:
    if config.lora_r < 1:
        raise UserError(f"{source}: peft.lora_r: {config.lora_r} is not valid; expected a positive integer")
    if not 0 <= config.lora_dropout < 1:
        raise UserError(f"{source}: peft.lora_dropout: {config.lora_dropout} is not valid; expected a number in [0, 1)")
    if config.loraplus_lr_ratio is not None and config.loraplus_lr_ratio < 1:
        raise UserError(f"{source}: peft.loraplus_lr_ratio: {config.loraplus_lr_ratio} is not valid; expected a number >= 1 (or null)")
    if config.modules_to_save_lr is not None and config.modules_to_save_lr <= 0:
        raise UserError(f"{source}: peft.modules_to_save_lr: {config.modules_to_save_lr} is not valid; expected a positive number (or null)")
    if config.bias not in ("none", "all", "lora_only"):
        raise UserError(f"{source}: peft.bias: '{config.bias}' is not valid; expected none, all or lora_only")


def to_dict(config: Config) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    return {**{k: v for k, v in values.items() if k != "options"}, **values["options"]}


def lora_config(config: Config):
    """The peft `LoraConfig` of a `peft:` section."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_CLS,  # makes peft add the head (`score`/`classifier`) to modules_to_save
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # copies: peft appends the head's name to the lists it is given
        target_modules=list(config.target_modules) if isinstance(config.target_modules, list) else config.target_modules,
        modules_to_save=list(config.modules_to_save) if config.modules_to_save is not None else None,
        bias=config.bias,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        **config.options,
    )
