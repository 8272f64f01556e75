"""LoRA through `peft`: adapters on the base model, the classification head trained in full and
saved beside the adapter, per-role learning rates, and the trained model loaded back from a folder."""

from __future__ import annotations

from ...errors import UserError, one_line
from .config import Config, lora_config


def apply(model, config: Config):
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(config))
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise UserError(
            f"peft.target_modules {config.target_modules}: {one_line(err)} "
            f"(module names in this model: {', '.join(names[:40])})"
        ) from None


def parameter_groups(model, config: Config, args) -> list[dict] | None:
    """Optimizer parameter groups with per-role learning rates, or None when all share one.

    Only the groups: the Trainer builds its own optimizer (`training.optim` with its arguments,
    fused or 8-bit) over them. Why not peft's `create_loraplus_optimizer`: it gives every 1-d
    weight (the head's biases included) lora_B's raised rate, and has no rate for fully trained
    modules, which want far less than the adapters (a pretrained pooler at an adapter's 1e-3
    saturates).
    """
    if config.loraplus_lr_ratio is None and config.modules_to_save_lr is None:
        return None
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
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def name_base_model(folder, name: str) -> None:
    """adapter_config.json names the base as the user did (peft writes the path it loaded from)."""
    import json
    from pathlib import Path

    from ...files import atomic_write_json

    path = Path(folder) / "adapter_config.json"
    adapter = json.loads(path.read_text())
    adapter["base_model_name_or_path"] = name
    atomic_write_json(path, adapter)


def load(config: Config, load_base, folder):
    from peft import PeftModel

    # The base comes from the run's config (re-resolved on this machine), not from
    # adapter_config.json, which names it as the user did (a hub id or a pkg: name).
    model = load_base(None)
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: the adapter does not fit the base model: {one_line(err)}") from None
