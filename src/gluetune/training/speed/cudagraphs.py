"""Whole-step CUDA graphs (`training.cuda_graphs: true`, with the fast path): UNPROVEN, off by default.

Written without a GPU at hand: the pieces that run without CUDA are tested (static buffers, gradient
buffers, the per-bucket step plan of fastpath.rehearsal_batches, a whole run with an eager stand-in
for capture and replay, EagerReplays), the capture itself has not run yet; bench/gpu_check.py checks it
on a GPU first. A failure to capture is caught before training (the run says so in one line and trains
without graphs).

Why: a LoRA step on CoLA-sized batches is thousands of small kernels, each launched by the host; a
CUDA graph launches a recorded step in one call. The fast path gives each epoch a handful of shapes
(one per padded length bucket, always the full micro-batch's rows), so one graph per bucket covers
every step. Per bucket, forward and backward (into fixed gradient buffers) are captured once and
replayed each step; the Trainer still clips (a few foreach kernels, and it logs the norm), steps the
optimizer and the schedule outside the graph, so the learning rate is never a number frozen into it.

The known pitfalls, and what is done about each:
- the Trainer's `zero_grad(set_to_none=True)` drops `.grad`: the fixed buffers are re-attached before
  every replay, and the graph zeroes them itself;
- the step's example count changes per step: it is a device tensor the graph reads (`items`), filled
  before each replay; the learning rate lives outside the graph;
- warm-up and capture must not change the starting weights: they run forward and backward only (no
  optimizer exists yet), and the gradients and random streams are put back (rollback.run_and_roll_back);
- no host sync inside: the loss is normalised by a device tensor; the Trainer's NaN filter is off
  (arguments.trainer_kwargs) and token counting is not asked for; a sync that remains fails the
  capture, which the rehearsal turns into a run without graphs;
- autocast's weight-cast cache must be off in a graph: the fast path runs the whole job's autocast
  without it (GluetuneTrainer's `autocast_cache`), and the capture enters that same autocast, so it
  reuses the compiled layers' graphs (dynamo guards on the flag) instead of compiling each shape again;
- LoRA dropout's random numbers: `torch.cuda.graph` registers the default CUDA generator, and each
  replay advances its offset, so every replay draws fresh masks (PyTorch's "graph-safe" RNG);
- evaluation never runs in a graph, and the only graph output read (the loss) is copied at once;
- the graphs and their memory pool are released when training ends (GluetuneTrainer.train), not
  whenever the trainer, which they reference, is collected.

Single process, bf16 or fp32 only (fp16's loss scaler skips steps by a host-side check).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

from .rollback import run_and_roll_back

logger = logging.getLogger("gluetune")

WARMUP_STEPS = 3  # side-stream iterations before capture (lazy inits, autograd's stream set-up), per PyTorch's notes


class StaticBatch:
    """Fixed device tensors a graph reads its inputs from: a step's batch is copied into them."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.tensors = {key: value.clone() for key, value in batch.items()}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensors["input_ids"].shape)

    def load(self, batch: dict[str, torch.Tensor]) -> None:
        if set(batch) != set(self.tensors):
            raise ValueError(f"batch keys {sorted(batch)} differ from the captured {sorted(self.tensors)}")
        for key, value in batch.items():
            self.tensors[key].copy_(value, non_blocking=True)


class GradientBuffers:
    """One fixed gradient tensor per trainable parameter, which captured backwards write into."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.buffers = [torch.zeros_like(p) for p in self.parameters]

    def attach(self) -> None:
        """`.grad` of each parameter is its buffer again (after a zero_grad(set_to_none=True))."""
        for parameter, buffer in zip(self.parameters, self.buffers):
            parameter.grad = buffer

    def zero(self) -> None:
        torch._foreach_zero_(self.buffers)


class GraphedSteps:
    """Forward + backward captured once per batch shape, replayed for every step of that shape."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.model = trainer.model
        self.device = trainer.args.device
        self.grads = GradientBuffers(self.model.parameters())
        self.items = torch.ones((), device=self.device)  # the step's example count, read by every graph
        self.pool = None
        self.graphs: dict[tuple[int, ...], tuple[StaticBatch, object, torch.Tensor | None]] = {}

    def forward_backward(self, static: StaticBatch) -> torch.Tensor:
        """The step as captured: zero the gradient buffers, loss over the step's examples, backward."""
        self.grads.zero()
        # The autocast the Trainer's steps run in (Accelerator.autocast: the same state; accelerate wraps
        # the forward in it only once train() starts), which the fast path builds without its weight-cast
        # cache (GluetuneTrainer's autocast_cache): a graph must not hold cached casts (PyTorch's CUDA-graph
        # notes), and dynamo guards on the flag, so the capture reuses the rehearsal's compiled graphs.
        with self.trainer.accelerator.autocast():
            loss = self.trainer.compute_loss(self.model, dict(static.tensors), num_items_in_batch=self.items)
        loss.backward()
        return loss.detach()

    def capture(self, batch: dict[str, torch.Tensor]) -> None:
        """One graph per shape, from the first batch of that shape (fastpath.rehearsal_batches puts a padded
        one first). The model decides on the host whether to read the attention mask (not when it is all
        ones), so a graph recorded from a batch without padding would skip the mask for every batch it
        replays; one recorded from a padded batch reads it, which is right for an all-ones mask too."""
        if tuple(batch["input_ids"].shape) in self.graphs:
            return
        static = StaticBatch({k: v.to(self.device) for k, v in batch.items()})
        self.model.train()
        self.grads.attach()
        self.graphs[static.shape] = (static, *self.record(static))
        self.grads.zero()

    def record(self, static: StaticBatch) -> tuple[object, torch.Tensor]:
        """(the captured graph, its loss tensor): warm-up on a side stream, then one captured step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.forward_backward(static)
        torch.cuda.current_stream().wait_stream(side)
        # one pool for all graphs: one replays at a time, and what outlives a replay (the loss, the
        # gradients) is copied at once or lives outside the pool
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self.forward_backward(static)
        torch.cuda.synchronize()
        return graph, loss

    def replay(self, graph, loss: torch.Tensor) -> torch.Tensor:
        graph.replay()
        return loss

    def release(self) -> None:
        """Let go of the graphs (their memory pool goes with them), their static inputs and gradient
        buffers, and the trainer: the end of training."""
        self.graphs.clear()
        self.pool = self.grads = None
        self.trainer = self.model = None

    def __call__(self, inputs: dict[str, torch.Tensor], num_items_in_batch) -> torch.Tensor | None:
        """The step's loss (its gradients in `.grad`), or None for a shape without a graph."""
        captured = self.graphs.get(tuple(inputs["input_ids"].shape))
        if captured is None or num_items_in_batch is None or set(inputs) != set(captured[0].tensors):
            return None
        static, graph, loss = captured
        static.load(inputs)
        if torch.is_tensor(num_items_in_batch):
            self.items.copy_(num_items_in_batch, non_blocking=True)
        else:
            self.items.fill_(num_items_in_batch)
        self.grads.attach()
        return self.replay(graph, loss).clone()


class EagerReplays(GraphedSteps):
    """A stand-in for machines without CUDA (the tests, bench/gpu_check.py --smoke): a graph per shape
    whose "capture" runs the warm-up step a capture runs and keeps the static buffers, and whose "replay"
    runs the very step a capture records (zero the buffers, loss over `items`, backward) from them. Like
    a replay it writes the gradients into the captured gradient buffers whatever `.grad` holds: a step
    whose `.grad` is not its buffer (the Trainer's zero_grad(set_to_none=True) left None) reaches the
    optimizer without gradients, as on a GPU. Dropout draws from the CPU generator at each "replay"."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.replays = 0

    def record(self, static: StaticBatch) -> tuple[object, torch.Tensor | None]:
        self.forward_backward(static)  # the warm-up (compiled layers compile here if a shape is new)
        return static, None

    def replay(self, graph, loss: torch.Tensor | None) -> torch.Tensor:
        self.replays += 1
        found = [p.grad for p in self.grads.parameters]
        self.grads.attach()  # the captured backward writes into the buffers
        loss = self.forward_backward(graph)
        for parameter, grad in zip(self.grads.parameters, found):
            parameter.grad = grad  # what the caller left there, as a replay leaves it
        return loss


def use_graphs(trainer, train_batches: list[dict], kind: type[GraphedSteps] = GraphedSteps) -> GraphedSteps | None:
    """Capture a graph per training shape and hand them to the trainer; None (one line said why) if
    this run cannot use them. (`kind`: EagerReplays without CUDA.)"""
    if trainer.args.fp16:
        logger.warning("training.cuda_graphs: fp16's loss scaler checks every step on the host; training without "
                       "CUDA graphs (bf16 or fp32 run with them)")
        return None
    started = time.perf_counter()
    steps = kind(trainer)

    def capture_every_shape():
        for batch in train_batches:
            steps.capture(batch)

    failure = run_and_roll_back(trainer, capture_every_shape)
    if failure is not None:
        logger.warning("training.cuda_graphs: capturing the training step failed (%s); training without CUDA graphs "
                       "instead (same results, slower)", failure)
        return None
    trainer.use_graphed_steps(steps)
    logger.info("training.cuda_graphs: %d step graphs captured in %.0f s", len(steps.graphs), time.perf_counter() - started)
    return steps
