"""The fast path (`training.fast_path: true`): the same run with less host work per step.

A LoRA step on short sentences (CoLA: ~9 tokens) costs the GPU little; what costs is the host
launching thousands of small kernels per micro-batch. The fast path changes how the run executes,
never what it learns (same examples per optimizer step, same schedule):

- **One micro-batch per optimizer step.** `per_device_train_batch_size x gradient_accumulation_steps`
  in one micro-batch (16 x 2 runs as 32 x 1): the step's examples are the same (sampling groups
  by the whole step), and the loss is normalised over the step (trainer.compute_loss), so the
  update is the same. The config keeps the values as written. CUDA graphs and accumulation do not
  mix well (a captured graph cannot skip the gradient sync or zeroing of a half-step); this avoids it.
- **Padded length buckets.** Batches are padded to a multiple of `BUCKET` tokens and to the full
  micro-batch's rows (filler rows carry label -100: no loss, not counted), so a whole epoch runs
  on a handful of shapes; compiled code and CUDA graphs are reused instead of rebuilt.
- **Compiled decoder layers** (regional `torch.compile`, one compiled layer reused by every
  layer), in `reduce-overhead` mode (CUDA graphs) on CUDA.
- **Fused AdamW** on CUDA, non-blocking host-to-device copies, and a larger default
  evaluation batch (arguments.FAST_PATH_EVAL_BATCH; an explicit `per_device_eval_batch_size` is kept).

The sync-free divergence check (callbacks.LossWatch) and the cheap FLOP count (trainer) are on
every path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import DataCollatorWithPadding

logger = logging.getLogger("gluetune")

BUCKET = 16  # tokens: CoLA's sentences (at most ~50 tokens) fall in 3-4 buckets


def enabled(config) -> bool:
    return bool(config.training.get("fast_path"))


def argument_changes(config, kwargs: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """TrainingArguments values the fast path changes (none without it)."""
    if not enabled(config):
        return {}
    accumulation = kwargs.get("gradient_accumulation_steps", 1)
    changes = {
        "per_device_train_batch_size": kwargs.get("per_device_train_batch_size", 8) * accumulation,
        "gradient_accumulation_steps": 1,
    }
    if cuda:
        if kwargs.get("optim", "adamw_torch") in ("adamw_torch", "adamw_torch_fused"):
            changes["optim"] = "adamw_torch_fused"
        changes["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "non_blocking": True}
    return changes


def collator(config, tokenizer, args, cuda: bool, training: bool = False):
    """The batch collator: dynamic padding; with the fast path, padded buckets (and, for
    training batches, the full micro-batch's rows)."""
    if not enabled(config):
        multiple = config.dataset.pad_to_multiple_of or (8 if cuda else None)
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    return BucketCollator(tokenizer, BUCKET, rows=args.per_device_train_batch_size if training else None)


class BucketCollator:
    """Pads each batch to a multiple of `bucket` tokens and, if `rows` is set, to `rows` rows.

    A filler row is one attended pad token (an all-masked row would make attention NaN) with
    label -100: it adds no loss, no gradient and is not counted in the step's examples.
    """

    def __init__(self, tokenizer, bucket: int, rows: int | None = None):
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=bucket)
        self.rows = rows
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, features):
        batch = self.pad(features)
        missing = (self.rows or 0) - batch["input_ids"].shape[0]
        if missing <= 0:
            return batch
        width = batch["input_ids"].shape[1]
        filler = {
            "input_ids": torch.full((missing, width), self.pad_token_id, dtype=batch["input_ids"].dtype),
            "attention_mask": torch.zeros((missing, width), dtype=batch["attention_mask"].dtype),
        }
        filler["attention_mask"][:, 0] = 1
        if "token_type_ids" in batch:
            filler["token_type_ids"] = torch.zeros((missing, width), dtype=batch["token_type_ids"].dtype)
        if "labels" in batch:
            filler["labels"] = torch.full((missing,), -100, dtype=batch["labels"].dtype)
        for key, value in filler.items():
            batch[key] = torch.cat([batch[key], value])
        return batch


def repeated_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks (decoder or encoder layers), found by the names transformers
    gives them in `_no_split_modules` (what FSDP wraps and device maps keep whole)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def prepare_model(trainer, config, cuda: bool) -> int:
    """Compile each repeated layer in place (regional compilation); returns how many."""
    if not enabled(config):
        return 0
    layers = repeated_layers(trainer.model)
    mode = "reduce-overhead" if cuda else None  # CUDA graphs where there is CUDA
    # dynamic=False makes one graph per input shape and mode (training, evaluation); past dynamo's
    # recompile_limit (8) the layers run eager for good, which long texts (RTE: every bucket up to
    # max_length) reach within an epoch. Room for every shape the run can make: each bucket in
    # training, in full evaluation batches, and in each validation split's last batch.
    shapes = -(-config.dataset.max_length // BUCKET) * (2 + len(config.task.validation_splits))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
    for layer in layers:
        layer.compile(mode=mode, dynamic=False)
    logger.info("fast path: one micro-batch per step (%d rows), %d-token buckets, %d compiled layers%s",
                trainer.args.per_device_train_batch_size, BUCKET, len(layers), " with CUDA graphs" if cuda else "")
    return len(layers)
