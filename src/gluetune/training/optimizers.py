"""bitsandbytes' optimizers (`training.optim: adamw_8bit`, `paged_adamw_8bit`, ...) on this machine:
what the run actually uses, said in one line (and recorded: run_record.json's `optimizer`, the card)."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..files import installed_version
from ..model.quantization import INSTALL, MIN_VERSION, recent_enough


def is_bitsandbytes_optimizer(optim: str) -> bool:
    """Whether the Trainer builds `optim` from bitsandbytes (adamw_8bit, paged_adamw_8bit, lion_8bit, ...)."""
    try:  # the Trainer's own table, the source of truth
        from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

        return optim in {str(getattr(name, "value", name)) for name in _BITSANDBYTES_OPTIMIZERS}
    except ImportError:
        return ("8bit" in optim or "paged" in optim or "bnb" in optim) and not optim.startswith(("galore", "apollo"))


# bitsandbytes' AdamW (8-bit state, or 32-bit paged): where bitsandbytes cannot run, torch's AdamW is
# the same algorithm (full-precision state, more memory). Its other optimizers (Lion, RMSprop,
# AdEMAMix) have no such stand-in: a run would silently learn with another algorithm, so they are refused.
ADAMW = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def optimizer_settings(optim: str, device: str) -> tuple[dict[str, Any], str]:
    """(TrainingArguments changes, a one-line notice) for a bitsandbytes optimizer on `device`
    (cuda, cpu, mps): what the run actually uses. Where bitsandbytes cannot run it, an AdamW becomes
    torch's AdamW and any other is refused (UserError)."""
    found = installed_version("bitsandbytes")
    if found is None:
        why, fix = "needs bitsandbytes, which is not installed", INSTALL
    elif device == "cpu" and not recent_enough(found):
        why, fix = f"needs bitsandbytes >= {MIN_VERSION} on the CPU, found {found}", INSTALL
    elif device not in ("cuda", "cpu"):
        why, fix = f"needs bitsandbytes, which has no optimizers on {device}", None
    else:
        why = fix = None
    if why is not None:
        if optim not in ADAMW:
            raise UserError(f"training.optim: {optim} {why}, and no other optimizer runs its algorithm: "
                            + (f"{fix}, or " if fix else "") + "choose an optimizer without bitsandbytes (e.g. adamw_torch)")
        return {"optim": "adamw_torch"}, (f"optim: {optim} {why}" + (f": {fix}" if fix else "")
                                          + "; using adamw_torch, the same algorithm")
    bits = "8-bit" if "8bit" in optim else "32-bit"
    kind = optim.removeprefix("paged_").split("_")[0]
    small = " (tensors under 4,096 elements keep 32-bit state)" if bits == "8-bit" else ""
    if "paged" not in optim:
        return {}, f"optim: {optim}: bitsandbytes {found} {bits} {kind} on {device}{small}"
    if device == "cuda":
        return {}, f"optim: {optim}: bitsandbytes {found} paged {bits} {kind}{small}"
    import warnings

    # bitsandbytes warns once per optimizer on the CPU; the notice below says the same, once per run.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return {}, (f"optim: {optim}: bitsandbytes {found} {bits} {kind}, not paged (paging needs CUDA; "
                f"on the CPU the state stays in ordinary memory){small}")
