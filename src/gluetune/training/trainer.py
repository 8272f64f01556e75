"""The Hugging Face Trainer, with the few things gluetune needs that it does not do itself.

- **The loss of a whole optimizer step.** transformers 5 normalises a loss by the number of
  examples in the step (`num_items_in_batch`) only when the model does, and skips its division by
  the accumulation steps whenever the model's `forward` takes `**kwargs`; the sequence-
  classification heads take them and ignore them, so with accumulation 2 the loss and the
  gradients were doubled. Here the loss is the sum over the micro-batch's examples divided by the
  step's example count (over all processes), so 16 x 2, 32 x 1 and 2 processes x 16 give the same
  gradients, and the logged loss is the mean per-example loss.
- **Length-grouped micro-batches for N processes** (sampling.LengthGroupedBatches).
- **Per-role learning rates** as parameter groups under the Trainer's own optimizer (`optim`,
  `optim_args`, fused and 8-bit variants all apply).
- **No host-device sync per micro-batch**: a non-finite loss is noted on the device and checked
  where the Trainer syncs anyway (callbacks.LossWatch); the per-micro-batch FLOP count does not
  walk every module, nor do the Trainer's per-step `model.train()` and `model.parameters()`
  (speed.walks).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from accelerate.utils import AutocastKwargs
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, seed_worker

from ..data.sampling import LengthGroupedBatches
from ..errors import UserError
from ..results import rundir
from .speed.walks import FewerModuleWalks


class GluetuneTrainer(Trainer):
    # compute_loss already divides by the step's example count: the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, group_steps: int | None = None, parameter_groups=None, loss_watch=None,
                 train_collator=None, split_of_a_step: int | None = None, autocast_cache: bool = True, **kwargs):
        """`group_steps`: optimizer steps per length-sorted group (None: the sampler's default);
        `parameter_groups(model)`: optimizer groups with their own learning rates, or None;
        `loss_watch`: a callbacks.LossWatch that sees every micro-batch's loss;
        `train_collator`: the training batches' collator, if not `data_collator` (fastpath);
        `split_of_a_step`: micro-batches x processes per step as configured, when the fast path runs
        the step as one micro-batch (so a short last step is treated the same way);
        `autocast_cache=False`: mixed precision's autocast without its weight-cast cache, for the
        whole job (accelerate's AutocastKwargs): what a CUDA-graph capture needs, and dynamo guards on
        it, so the fast path's rehearsal, capture, steps and evaluations share their compiled graphs.
        It costs nothing here: autocast caches only casts of trainable fp32 weights, and a weight used
        once per forward (each LoRA factor, the head) is cast once either way."""
        self.autocast_cache = autocast_cache  # read by _build_accelerator_args, inside Trainer.__init__
        super().__init__(*args, **kwargs)
        self.group_steps = group_steps
        self.split_of_a_step = split_of_a_step
        self.train_collator = train_collator or self.data_collator
        self.parameter_groups = parameter_groups
        self.loss_watch = loss_watch
        self._flops_per_token: int | None = None
        self.graphed_steps = None
        self._is_regression: bool | None = None
        # The Trainer counts the step's examples (num_items_in_batch) only for models it believes
        # normalise by it; compute_loss below always does.
        self.model_accepts_loss_kwargs = True
        self.epoch_of_batches = _EpochOfBatches()
        self.add_callback(self.epoch_of_batches)
        # FSDP and DeepSpeed register other weights around each step than those the steps began with
        self.fewer_walks = None if self.is_fsdp_enabled or self.is_deepspeed_enabled else FewerModuleWalks()
        if self.fewer_walks is not None:
            self.add_callback(self.fewer_walks)

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        if not self.autocast_cache:
            args["kwargs_handlers"] = [*args.get("kwargs_handlers", []), AutocastKwargs(cache_enabled=False)]
        return args

    # ---------------------------------------------------------------- data

    def get_train_dataloader(self) -> DataLoader:
        if self.args.train_sampling_strategy != "group_by_length":
            # transformers' samplers: the Trainer builds the loader with data_collator; lend it ours
            evaluation_collator, self.data_collator = self.data_collator, self.train_collator
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = evaluation_collator
        if self.args.accelerator_config.split_batches or self.args.accelerator_config.dispatch_batches:
            raise UserError("training.accelerator_config: split_batches / dispatch_batches do not apply to gluetune's "
                            "length-grouped steps (each process already gets its own); remove them")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        batches = LengthGroupedBatches(
            self.train_dataset[self.args.length_column_name], self._train_batch_size, seed=seed,
            accumulation=self.args.gradient_accumulation_steps, processes=self.args.world_size,
            rank=self.args.process_index, group_steps=self.group_steps, smallest_step=self.split_of_a_step,
            drop_last=self.args.dataloader_drop_last,
        )
        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        params = {
            "batch_sampler": batches, "collate_fn": self.train_collator,
            "num_workers": self.args.dataloader_num_workers, "pin_memory": self.args.dataloader_pin_memory,
            "in_order": self.args.dataloader_in_order,
            "worker_init_fn": partial(seed_worker, num_workers=self.args.dataloader_num_workers,
                                      rank=self.args.process_index),
        }
        if self.args.dataloader_num_workers > 0:
            params.update(persistent_workers=self.args.dataloader_persistent_workers,
                          prefetch_factor=self.args.dataloader_prefetch_factor,
                          multiprocessing_context=self.args.dataloader_multiprocessing_context)
        self.epoch_of_batches.batches = batches
        loader = self.accelerator.prepare(DataLoader(dataset, **params))
        # The batches are already this process's own: accelerate's round-robin dealer must pass
        # them through, as the Trainer arranges for its own rank-aware BatchRebalanceSampler.
        dealer = getattr(loader, "batch_sampler", None)
        if dealer is not batches and getattr(dealer, "batch_sampler", None) is batches:
            dealer.num_processes, dealer.process_index = 1, 0
        return loader

    def _get_eval_sampler(self, eval_dataset):
        # In order: gluetune's evaluation sets are sorted by length already (little padding), and
        # predictions must come back in the set's order. transformers 5 would draw a random
        # length-grouped order for them whenever training groups by length.
        if self.args.world_size > 1:
            return None  # accelerate deals out consecutive batches and gathers them back in order
        return SequentialSampler(eval_dataset)

    # ---------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        kept = labels != -100  # -100: a filler row (fastpath), as in transformers' losses
        if self._regression(model):
            # masked rather than indexed: boolean indexing waits for the device (and cannot be captured)
            total = torch.where(kept, logits.view(-1) - labels.float(), 0).square().sum()
        else:
            total = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100,
                                                      label_smoothing=self.args.label_smoothing_factor, reduction="sum")
        if num_items_in_batch is None:  # not from the Trainer's loops, which always count the step
            num_items_in_batch = kept.sum().clamp(min=1)
        loss = total / num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # num_items_in_batch counts every process's examples; DDP then averages the gradients
            # over processes, which this undoes (the Trainer does the same).
            loss = loss * self.args.world_size
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def _regression(self, model) -> bool:
        # Asked once: accelerate's unwrap_model walks every module of the model on each call (looking
        # for compiled regions); per micro-batch that was half the module walks of a step
        # (docs/performance.md, host overhead).
        if self._is_regression is None:
            self._is_regression = getattr(self.accelerator.unwrap_model(model).config, "problem_type", None) == "regression"
        return self._is_regression

    def use_graphed_steps(self, steps) -> None:
        """`steps(inputs, num_items_in_batch)` runs forward and backward of a batch (a captured CUDA
        graph, cudagraphs.GraphedSteps) and returns the loss, or None for a batch it cannot run;
        `steps.release()` lets go of them when training ends."""
        self.graphed_steps = steps

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.fewer_walks is not None:
                self.fewer_walks.remove()  # a run that raised ends without the Trainer's on_train_end
            # The graphs (and their memory pool) hold the trainer and it holds them: without this they
            # would live until the cycle is collected, through the final predictions and after.
            if self.graphed_steps is not None:
                self.graphed_steps.release()
                self.graphed_steps = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = None
        if self.graphed_steps is not None:
            # What the Trainer's own training_step does first: after an evaluation (model.eval(), and
            # a schedule-free optimizer's eval(), which swaps in its averaged weights) back to training.
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            loss = self.graphed_steps(self._prepare_inputs(inputs), num_items_in_batch)
        if loss is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_watch is not None:
            self.loss_watch.note(loss, self.state.global_step + 1)
        return loss

    # ---------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        # Each checkpoint records how many processes write it, first: a resume on another count
        # rewrites run_record.json, and the older checkpoints must still be judged complete by their
        # own count of RNG states (results.rundir).
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            rundir.write_checkpoint_record(folder, self.args.world_size)
        super()._save_checkpoint(model, trial)

    def floating_point_ops(self, inputs) -> int:
        # The Trainer's version counts the model's parameters (a walk over every module) for
        # each micro-batch; the count does not change during a run.
        ids = inputs.get("input_ids")
        if ids is None or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flops_per_token is None:
            self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
        return self._flops_per_token * ids.numel()

    # ---------------------------------------------------------------- optimizer

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        # torch's AdamW updates weights one at a time in a Python loop unless told `foreach` (its default
        # only where every weight is on a GPU): on the CPU that loop was host work every step, for the
        # same arithmetic (the foreach kernels give the same weights to the bit; tested).
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if (optimizer_cls is torch.optim.AdamW and args.use_cpu and not optimizer_kwargs.get("fused")
                and optimizer_kwargs.get("foreach") is None):
            optimizer_kwargs = {**optimizer_kwargs, "foreach": True}
        return optimizer_cls, optimizer_kwargs

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        groups = self.parameter_groups(opt_model) if self.parameter_groups and self.optimizer is None else None
        if groups is None:
            return super().create_optimizer(model)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise UserError(f"training.optim: {self.args.optim} builds its own parameter groups; it cannot take "
                            "peft.loraplus_lr_ratio or peft.modules_to_save_lr (remove those, or choose adamw_torch)")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class _EpochOfBatches(TrainerCallback):
    """Tells the length-grouped batches which epoch begins. The Trainer's own `set_epoch` (transformers
    5.25, `_run_epoch`) reaches one wrapper down (`loader.batch_sampler.batch_sampler`); a run resumed
    mid-epoch on several processes puts the batches two down (accelerate's `SkipBatchSampler`, then
    `BatchSamplerShard`, neither with a `set_epoch`), so without this it would replay epoch 0's order
    (checked against both libraries' sources: one process, or no resume, is reached; that case is not)."""

    def __init__(self):
        self.batches = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.batches is not None:
            steps_per_epoch = max(1, len(self.batches) // args.gradient_accumulation_steps)
            self.batches.set_epoch(state.global_step // steps_per_epoch)
