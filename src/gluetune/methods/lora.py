"""LoRA through `peft`, with the classification head trained in full and saved beside the adapter."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError, one_line


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


def apply(model, config: Config):
    from peft import LoraConfig, TaskType, get_peft_model

    if config.lora_r < 1:
        raise UserError(f"peft.lora_r: {config.lora_r} is not valid; expected a positive integer")
    if not 0 <= config.lora_dropout < 1:
        raise UserError(f"peft.lora_dropout: {config.lora_dropout} is not valid; expected a number in [0, 1)")
    if config.bias not in ("none", "all", "lora_only"):
        raise UserError(f"peft.bias: '{config.bias}' is not valid; expected none, all or lora_only")
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # makes peft add the head (`score`/`classifier`) to modules_to_save
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
        bias=config.bias,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise UserError(
            f"peft.target_modules {config.target_modules}: {one_line(err)} "
            f"(module names in this model: {', '.join(names[:40])})"
        ) from None


def load(config: Config, load_base, folder):
    from peft import PeftModel

    # The base comes from the run's config, not adapter_config.json: that holds a resolved local
    # path, which need not exist on the machine that predicts.
    model = load_base(None)
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: the adapter does not fit the base model: {one_line(err)}") from None
