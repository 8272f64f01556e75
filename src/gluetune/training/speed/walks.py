"""Fewer walks of the whole module tree per optimizer step, the same steps.

The Trainer's loop calls, for every micro-batch, `model.train()`: a recursive walk that sets every
module's flag, which after the first step are all set already; and for every optimizer step
`model.parameters()` twice (gradient clipping, `model.zero_grad()`): a recursive walk of every module
for the weights, in a LoRA model mostly frozen ones without gradients. On the host-overhead benchmark
(bench/host_overhead.py) those walks were about a fifth of gluetune's host work per step, and on a GPU,
where short CoLA batches are launch-bound, host work is what the device waits for.

While the training steps run (from the Trainer's `on_train_begin` to the end of its last epoch), the
model answers both from what it held when they began: `train(mode)` returns at once when every module
already is in that mode (else it walks, as before); `parameters()` returns the same weights in the same
order without walking. Nothing adds or replaces a module or a weight during those steps (the optimizer,
built before them, holds the same weights); the best checkpoint is loaded after them, with the
shortcuts gone. Exact: the run's arithmetic does not change (tested).
"""

from __future__ import annotations

from transformers import TrainerCallback


class FewerModuleWalks(TrainerCallback):
    """Installs the two shortcuts on the trainer's model for the training steps (see the module's docstring)."""

    def __init__(self):
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.install(model)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            self.remove()

    def on_train_end(self, args, state, control, **kwargs):
        self.remove()

    def install(self, model) -> None:
        self.remove()
        modules, weights = list(model.modules()), list(model.parameters())
        walk_train, walk_parameters = model.train, model.parameters

        def train(mode: bool = True):
            if isinstance(mode, bool) and all(module.training is mode for module in modules):
                return model
            return walk_train(mode)

        def parameters(recurse: bool = True):
            return iter(weights) if recurse else walk_parameters(recurse)

        # instance attributes shadow the class's methods (nn.Module stores plain functions in __dict__)
        model.train, model.parameters = train, parameters
        self.model = model

    def remove(self) -> None:
        if self.model is not None:
            for name in ("train", "parameters"):
                self.model.__dict__.pop(name, None)
            self.model = None
