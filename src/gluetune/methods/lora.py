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
    # LoRA+: lora_B learns this many times faster than lora_A; None is plain LoRA.
    loraplus_lr_ratio: float | None = None
    # The learning rate of the modules trained in full (head, modules_to_save); None: training.learning_rate.
    modules_to_save_lr: float | None = None


def apply(model, config: Config):
    from peft import LoraConfig, TaskType, get_peft_model

    if config.lora_r < 1:
        raise UserError(f"peft.lora_r: {config.lora_r} is not valid; expected a positive integer")
    if not 0 <= config.lora_dropout < 1:
        raise UserError(f"peft.lora_dropout: {config.lora_dropout} is not valid; expected a number in [0, 1)")
    if config.loraplus_lr_ratio is not None and config.loraplus_lr_ratio < 1:
        raise UserError(f"peft.loraplus_lr_ratio: {config.loraplus_lr_ratio} is not valid; expected a number >= 1 (or null)")
    if config.modules_to_save_lr is not None and config.modules_to_save_lr <= 0:
        raise UserError(f"peft.modules_to_save_lr: {config.modules_to_save_lr} is not valid; expected a positive number (or null)")
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


def optimizer(model, config: Config, args):
    """AdamW with per-role learning rates, or None (the Trainer's own) when all share one.

    Why not peft's `create_loraplus_optimizer`: it gives every 1-d weight (the head's biases
    included) lora_B's raised rate, and has no rate for fully trained modules, which want far
    less than the adapters (a pretrained pooler at an adapter's 1e-3 saturates).
    """
    if config.loraplus_lr_ratio is None and config.modules_to_save_lr is None:
        return None
    import torch

    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = args.learning_rate
        if config.modules_to_save_lr is not None and ".modules_to_save." in name:
            lr = config.modules_to_save_lr
        elif config.loraplus_lr_ratio is not None and "lora_B" in name:
            lr = args.learning_rate * config.loraplus_lr_ratio
        weight_decay = args.weight_decay if param.ndim > 1 else 0.0  # no decay on biases and norms
        groups.setdefault((lr, weight_decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )


def load(config: Config, load_base, folder):
    from peft import PeftModel

    # The base comes from the run's config, not adapter_config.json: that holds a resolved local
    # path, which need not exist on the machine that predicts.
    model = load_base(None)
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: the adapter does not fit the base model: {one_line(err)}") from None
