"""The fast path (`training.fast_path: true`): the same run with less host work per step.

A LoRA step on short sentences (CoLA: ~9 tokens) costs the GPU little; what costs is the host
launching thousands of small kernels per micro-batch. The fast path changes how the run executes,
not what it computes (same examples per optimizer step, same schedule, same loss): without dropout a
fast run is the plain run, step for step, to float rounding. With dropout (the reference config's
`lora_dropout: 0.1`) it is another run of the same recipe, as another seed is: the masks come from a
random stream whose use depends on the shapes drawn from it (bucket padding, filler rows, 32 x 1 in
place of 16 x 2; CUDA graphs draw at other offsets), so a fast run draws other masks than the plain
run with the same seed, and reaches the same validation score only within the spread between seeds
(tested on MiniLM and real CoLA, docs/performance.md).

- **One micro-batch per optimizer step.** `per_device_train_batch_size x gradient_accumulation_steps`
  in one micro-batch (16 x 2 runs as 32 x 1): the step's examples are the same (sampling groups
  by the whole step), and the loss is normalised over the step (trainer.compute_loss), so the
  update is the same. The config keeps the values as written. CUDA graphs and accumulation do not
  mix well (a captured graph cannot skip the gradient sync or zeroing of a half-step); this avoids it.
- **Padded length buckets.** Batches are padded to a multiple of `BUCKET` tokens and to the full
  micro-batch's rows (filler rows carry label -100: no loss, not counted), so a whole epoch runs
  on a handful of shapes; compiled code and CUDA graphs are reused instead of rebuilt.
- **Compiled decoder layers** (regional `torch.compile` of each repeated block), without CUDA
  graphs: `reduce-overhead` on a block that runs 28 times a step crashed on an H200 (CUDA-graph trees
  free a block's outputs when it is entered again, while the next block and the backward still read
  them; pytorch/pytorch#152887). Whole-step CUDA graphs are `training.cuda_graphs` (cudagraphs.py).
  Every layer shares one graph per shape and mode (planned_graphs): the model's KV cache off, the first
  layer's input made to require grad as the others' do (layer_inputs_require_grad); dynamo's two
  recompile limits are raised to hold them for the run, and put back after (compile_limits). The
  model is eager again when the run ends (compiled_layers).
- **A rehearsal before training** (`rehearse`): every training shape runs forward and backward once,
  every evaluation shape forward once, so compilation happens (and fails) before the first step; on a
  failure the run says so in one line and trains with eager layers (the same arithmetic), nothing
  lost. The rehearsal changes no weight, gradient or random stream, and no step is counted
  (rollback.run_and_roll_back).
- **Fused AdamW** on CUDA, non-blocking host-to-device copies, and a larger default
  evaluation batch (arguments.FAST_PATH_EVAL_BATCH; an explicit `per_device_eval_batch_size` is kept).

The sync-free divergence check (callbacks.LossWatch) and the cheap FLOP count (trainer) are on
every path.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from transformers import DataCollatorWithPadding

from .rollback import run_and_roll_back

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


def compile_regions(model) -> list[torch.nn.Module]:
    """The modules compiled one by one: the repeated decoder or encoder layers, found as the classes
    transformers names in `_no_split_modules` (what FSDP wraps and device maps keep whole) that occur more
    than once. A class that occurs once (BERT's `BertEmbeddings` is named too) would make graphs of its
    own for every shape, shared with nothing: on the CPU default they cost 13 s of a cold first
    compilation (61 s with them, 48 s without) for no measurable gain per step (docs/performance.md)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    regions = [m for m in model.modules() if type(m).__name__ in names]
    count = collections.Counter(type(m) for m in regions)
    return [m for m in regions if count[type(m)] > 1]


def layer_inputs_require_grad(model) -> torch.utils.hooks.RemovableHandle:
    """In training, the input embeddings' output requires grad, so that the first layer's input does, as
    every later layer's does: dynamo guards on it, and without this the first layer made a graph of its
    own for each training shape (twice the compilation). The price is the first layer's input gradient,
    computed and dropped: one layer's share of the backward's input-gradient products. In evaluation
    (no grad) nothing changes, so evaluation keeps one graph per shape. (transformers'
    `enable_input_require_grads` sets it under no_grad too, which would split evaluation instead.)"""

    def require_grad(module, inputs, output):
        if torch.is_grad_enabled():
            output.requires_grad_(True)

    return model.get_input_embeddings().register_forward_hook(require_grad)


@contextlib.contextmanager
def compiled_layers(trainer, config):
    """Each repeated layer compiled in place (regional compilation) while the block runs; yields the
    compiled layers (none without the fast path). After the block the model is eager again, as a
    folder loads it: the model a run returns would otherwise compile a graph for every new shape it is
    given, outside the run's plan and past the limits the run set (compile_limits).

    No `mode="reduce-overhead"` on CUDA: one compiled block entered 28 times a step and CUDA-graph
    trees do not mix (see the module's docstring); whole-step graphs are cudagraphs.py's."""
    if not enabled(config):
        yield []
        return
    layers = compile_regions(trainer.model)
    # dynamic=False makes one graph per input shape and mode, shared by every layer (one code object;
    # planned_graphs counts them) as long as the traced forward reads no int attribute that differs
    # per layer: dynamo specialises on those, and a KV cache's update reads `layer_idx`, so a model
    # run with its cache on compiles a graph per layer (28 per shape for Qwen2.5-1.5B). A classifier
    # never reads its cache back. The Trainer set the config's flag from training.use_cache (off by default).
    cached = [m.config for m in trainer.model.modules() if getattr(getattr(m, "config", None), "use_cache", False)]
    if cached:
        logger.warning("fast path: the model's KV cache off (training.use_cache asked for it): a classifier never reads "
                       "it, and with it each compiled layer would make graphs of its own")
    for model_config in cached:
        model_config.use_cache = False
    for layer in layers:
        layer.compile(dynamic=False)
    hook = layer_inputs_require_grad(trainer.model) if layers else None
    logger.info("fast path: one micro-batch per step (%d rows), %d-token buckets, %d compiled layers",
                trainer.args.per_device_train_batch_size, BUCKET, len(layers))
    try:
        yield layers
    finally:
        uncompile(layers)
        if hook is not None:
            hook.remove()


def planned_graphs(train_batches: list, eval_batches: list) -> int:
    """The graphs the compiled layers make in a run, shared by every layer: one per training shape (every
    layer's input requires grad: layer_inputs_require_grad) and one per evaluation shape. The rehearsal,
    the CUDA-graph capture, the steps and the evaluations all run in one autocast (GluetuneTrainer's
    `autocast_cache`), so they make no others."""
    return len(train_batches) + len(eval_batches)


@contextlib.contextmanager
def compile_limits(graphs: int):
    """dynamo's two recompile limits raised, while the block runs, to hold `graphs` more compilations
    of the layers' code; one line says so when they would not have held them.

    Past `recompile_limit` (a code object's cache entries, 8 by default) or `accumulated_recompile_limit`
    (its compilations in this process, 256) dynamo stops compiling the layers and runs them eagerly
    from then on, with no more than a warning in its own log. Both count what the process compiled
    before the run (an earlier run of the same process left its entries), so the room is counted from
    the compilations of dynamo's busiest code object so far. Process-wide settings: put back after."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo import convert_frame

    before = max(getattr(convert_frame, "FRAME_COMPILE_COUNTER", {}).values(), default=0)
    needed = before + graphs
    short = {name: getattr(dynamo_config, name) for name in ("recompile_limit", "accumulated_recompile_limit")
             if getattr(dynamo_config, name) < needed}
    if short:
        logger.info("fast path: the layers' code may hold up to %d compiled graphs (%d of them from before this run), "
                    "past dynamo's %s; raised to %d for this run", needed, before,
                    " and ".join(f"{k} {v}" for k, v in short.items()), needed)
    with dynamo_config.patch(**{name: needed for name in short}):
        yield


def uncompile(layers: Iterable[torch.nn.Module]) -> None:
    """Back to eager execution (undoes nn.Module.compile)."""
    for layer in layers:
        layer._compiled_call_impl = None


# ---------------------------------------------------------------- the rehearsal


def padded(length: int, bucket: int = BUCKET) -> int:
    return -(-length // bucket) * bucket


def evaluation_batches(lengths: list[int], batch_size: int) -> list[range]:
    """One index range per distinct (rows, width, without padding) among an evaluation set's in-order
    batches (a batch without padding makes a graph of its own: see rehearsal_batches)."""
    seen, picked = set(), []
    for start in range(0, len(lengths), batch_size):
        rows = range(start, min(start + batch_size, len(lengths)))
        width = padded(max(lengths[i] for i in rows))
        shape = (len(rows), width, all(lengths[i] == width for i in rows))
        if shape not in seen:
            seen.add(shape)
            picked.append(rows)
    return picked


MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def features_of(dataset, indices: Iterable[int]) -> list[dict[str, Any]]:
    """Collator input for these rows of a tokenized split (labels as the Trainer passes them)."""
    rows = dataset.select(list(indices))
    columns = [c for c in MODEL_COLUMNS if c in rows.column_names]
    return [{**{c: row[c] for c in columns}, "labels": row["label"]} for row in rows]


def rehearsal_batches(trainer, train_set, eval_sets: Iterable) -> tuple[list[dict], list[dict]]:
    """Real collated batches, one per training shape and one per evaluation shape.

    A batch whose every row fills its bucket exactly has no padding, and for it the model drops the
    attention mask before its layers (BERT's and Qwen2's with SDPA do: the mask is all ones), so the
    layers see `None` where a mask was and make a graph of their own. Such a batch is a shape of its
    own here wherever one can occur (a full micro-batch of examples exactly a bucket long: the filler
    rows of a short batch are padding); unplanned, it compiled in the middle of a run, past the
    limits the plan set, and ran eagerly from then on (the CPU default on the fast path did). A width's
    padded batch comes first (cudagraphs captures it: see GraphedSteps.capture)."""
    lengths = train_set["length"]
    rows = trainer.args.per_device_train_batch_size
    examples = {}  # width -> indices of examples that make a batch that wide
    for index, length in enumerate(lengths):
        examples.setdefault(padded(length), []).append(index)
    train_batches = [trainer.train_collator(features_of(train_set, indices)) for width in sorted(examples)
                     for indices in batches_of_a_width(examples[width], lengths, width, rows)]
    eval_batches = [trainer.data_collator(features_of(ds, indices)) for ds in eval_sets
                    for indices in evaluation_batches(ds["length"], trainer.args.per_device_eval_batch_size)]
    return train_batches, eval_batches


def batches_of_a_width(indices: list[int], lengths: list[int], width: int, rows: int) -> list[list[int]]:
    """The rows of one training batch `width` tokens wide (`indices`: the examples that wide) and, where a
    batch without padding can occur too, of one such: the padded one first."""
    exact = [i for i in indices if lengths[i] == width]
    shorter = [i for i in indices if lengths[i] < width]
    first = (shorter + exact)[:rows]  # padded by a shorter example, or by filler rows if too few
    if not shorter and len(first) == rows:  # all exact: only a short batch's filler rows pad
        return [first[:-1], first] if rows > 1 else [first]
    if len(exact) >= rows:  # a full batch of exact ones beside the padded ones
        return [first, exact[:rows]]
    return [first]


def rehearsal_loss(trainer, batch: dict) -> torch.Tensor:
    """The loss of one batch, computed as the Trainer's training and evaluation steps compute it.

    Under mixed precision those run the model's forward in the autocast accelerate wraps it in
    (`Accelerator.prepare_model`, inside `train()`; the Trainer's `compute_loss_context_manager` adds
    none). The rehearsal comes before that, so it enters the very same autocast itself
    (`Accelerator.autocast`: the same state, a null context without mixed precision): dynamo guards on
    the autocast state, and a rehearsal in another precision would compile graphs the first step
    compiles again, or fail where the fp32 head meets bf16 hidden states."""
    inputs = {k: v.to(trainer.args.device) for k, v in batch.items()}
    with trainer.accelerator.autocast(), trainer.compute_loss_context_manager():
        return trainer.compute_loss(trainer.model, inputs, num_items_in_batch=torch.ones((), device=trainer.args.device))


def rehearse(trainer, train_batches: list[dict], eval_batches: list[dict], layers: list[torch.nn.Module]) -> bool:
    """Run every training shape (forward and backward) and every evaluation shape (forward) once
    before training, so the compiled layers compile now; True if they did. On a failure the layers
    go back to eager on every process, with one line saying why: the same run, slower."""
    if not layers:
        return True
    model, started = trainer.model, time.perf_counter()
    logger.info("fast path: compiling for %d training and %d evaluation shapes before the first step",
                len(train_batches), len(eval_batches))

    where = ["before the first batch"]  # what the rehearsal was running, for the message if it fails

    def run_every_shape():
        try:
            model.train()
            for batch in train_batches:
                where[0] = "on a training batch of {} x {} tokens".format(*batch["input_ids"].shape)
                rehearsal_loss(trainer, batch).backward()
                model.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad():
                for batch in eval_batches:
                    where[0] = "on an evaluation batch of {} x {} tokens".format(*batch["input_ids"].shape)
                    rehearsal_loss(trainer, batch)
            where[0] = ""  # done here (another process may have failed)
        except torch._dynamo.exc.TorchDynamoException:
            where[0] += ", compiling the layers"  # dynamo's or its backend's own failure, not the model's
            raise

    failure = run_and_roll_back(trainer, run_every_shape)
    if failure is not None:
        uncompile(layers)
        logger.warning("fast path: the rehearsal before training failed%s (%s); training with eager layers instead "
                       "(same results, slower)", f" {where[0]}" if where[0] else "", failure)
        return False
    logger.info("fast path: compiled in %.0f s", time.perf_counter() - started)
    return True
