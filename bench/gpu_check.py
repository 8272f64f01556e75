#!/usr/bin/env python
"""Two minutes on a GPU before the long runs: do whole-step CUDA graphs (`training.cuda_graphs`, UNPROVEN)
and the fast path's compiled layers do what cudagraphs.py and fastpath.py say, on the reference model's
layer shapes? bench/gpu_device.sh's `measure` runs it first and stops if it fails.

    python bench/gpu_check.py            # on a CUDA machine: Qwen2.5-1.5B's widths, 4 of its 28 layers
    python bench/gpu_check.py --smoke    # anywhere: a tiny model on the CPU, every check that runs without CUDA

A random-weight model (no download), the real Qwen tokenizer and CoLA, the reference config with the fast
path (and CUDA graphs where there is CUDA), dataset.max_length 32 so that training has two buckets. It
builds the run as `gluetune train` does (training.run's own pieces) and prints one line per check, `ok`,
`skip` (needs CUDA) or `FAIL`; the first failure ends it (exit status 1):

  buckets   the step plan has two training shapes, 32 x 16 and 32 x 32 tokens
  compiled  the rehearsal compiles the plan's graphs and no more: shared by every layer (fastpath.planned_graphs)
  capture   one graph per bucket (on the CPU: cudagraphs.EagerReplays, the tests' stand-in), compiling nothing
            more (the capture runs in the rehearsal's autocast)
  memory    peak GPU memory of an eager step, of the capture and of a replay
  same      with dropout 0, five graphed optimizer steps equal five eager ones from the same start: losses
            within LOSS_RTOL, adapter weights apart by at most MOVED_RTOL of how far the eager steps moved them
  dropout   with dropout 0.1, one batch replayed twice gives two losses (fresh masks at each replay), and
            with dropout 0 the same replay twice gives one
  no-sync   the step captured (a host sync inside a capture raises); a control capture that calls .item()
            must raise one of SYNC_ERRORS, or a clean capture would prove nothing
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
SHARED = ROOT / ".." / "shared"
CONFIG = ROOT / "configs" / "glue_cola_qwen.yaml"

STEPS = 5
# bf16 keeps 8 significant bits; a graphed and an eager step launch the same kernels, so they can only
# differ by the order of a reduction (atomics in an attention backward), far inside these
LOSS_RTOL = 1e-2
MOVED_RTOL = 0.05
# What CUDA and PyTorch say when a capture meets a host sync (none is allowed while a stream captures):
# cudaErrorStreamCaptureUnsupported, then cudaErrorStreamCaptureInvalidated from the capture's end, or
# PyTorch's own check before a copy to the host.
SYNC_ERRORS = ("operation not permitted when stream is capturing", "operation failed due to a previous error during capture",
               "cudaErrorStreamCapture", "during CUDA graph capture")


class Checks:
    """One line per check; the first failure ends the script."""

    def __init__(self):
        self.started = time.perf_counter()

    def ok(self, name: str, text: str) -> None:
        print(f"ok    {name:9s} {text} [{time.perf_counter() - self.started:.0f} s]", flush=True)

    def skip(self, name: str, text: str) -> None:
        print(f"skip  {name:9s} {text}", flush=True)

    def require(self, passed: bool, name: str, text: str) -> None:
        """The check's line: ok, or FAIL and the end."""
        self.unless(passed, name, text)
        self.ok(name, text)

    def unless(self, passed: bool, name: str, text: str) -> None:
        """A FAIL line and the end if not `passed`; nothing otherwise."""
        if not passed:
            print(f"FAIL  {name:9s} {text}", flush=True)
            sys.exit(1)


def build_run(args, folder: Path, cuda: bool):
    """(config, trainer, training split, evaluation splits), built as training.run builds a run."""
    from gpu_qwen import build_random_model
    from transformers import set_seed

    from gluetune.config.run import load_config
    from gluetune.training import run
    from gluetune.training.training_args import training_arguments

    model = folder / "model"
    build_random_model(Path(args.model_config), Path(args.tokenizer), model, smoke=args.smoke, layers=args.layers)
    overrides = [f"model.name_or_path={model}", f"dataset.data_dir={args.glue_dir}", "dataset.max_length=32",
                 "dataset.max_train_samples=256", "dataset.max_eval_samples=64", "dataset.cache_tokenized=false",
                 "training.fast_path=true", f"training.output_dir={folder / 'run'}", "training.report_to=none",
                 *(["training.cuda_graphs=true"] if cuda else [])]
    config = load_config(CONFIG, overrides)
    training_args = training_arguments(config, quiet=True)
    set_seed(training_args.seed)
    tokenizer, classifier = run._load_model(config, training_args)
    _, encoded = run._load_data(config, training_args, tokenizer, classifier)
    evals = {s: encoded[s].sort("length") for s in config.task.validation_splits}
    trainer = run._build_trainer(config, training_args, tokenizer, classifier, encoded["train"], evals, [])
    return config, trainer, encoded["train"], evals


def set_dropout(model, p: float) -> int:
    """Every dropout module's probability (LoRA's: Qwen2 has no other modules); how many."""
    import torch

    modules = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for module in modules:
        module.p = p
    return len(modules)


def on_device(batch: dict, device) -> tuple[dict, object]:
    """A batch's tensors on the device and its example count, as the Trainer counts a step's."""
    inputs = {k: v.to(device) for k, v in batch.items()}
    return inputs, (inputs["labels"] != -100).sum()


def eager_step(trainer, inputs: dict, items):
    """Forward and backward as the Trainer's step runs them (accelerate's autocast, the step's count)."""
    with trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=items)
    loss.backward()
    return loss.detach()


def optimizer_steps(trainer, batches: list[dict], step, start: list) -> tuple[list[float], list]:
    """STEPS optimizer steps from the weights `start` with `step(inputs, items)` for forward and
    backward, the Trainer's clipping, AdamW and zero_grad(set_to_none=True): (losses, final weights)."""
    import torch

    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for parameter, value in zip(trainable, start):
            parameter.copy_(value)  # in place: a captured graph reads these very tensors
    optimizer = torch.optim.AdamW(trainable, lr=trainer.args.learning_rate, weight_decay=trainer.args.weight_decay,
                                  fused=trainer.args.device.type == "cuda")
    trainer.model.train()
    losses = []
    for batch in batches:
        inputs, items = on_device(batch, trainer.args.device)
        loss = step(inputs, items)
        if loss is None:  # GraphedSteps has no graph for this batch
            return [], []
        losses.append(loss.float().item())
        torch.nn.utils.clip_grad_norm_(trainable, trainer.args.max_grad_norm)
        optimizer.step()
        trainer.model.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in trainable]


def distance(a: list, b: list) -> float:
    return math.sqrt(sum(float((x.float() - y.float()).square().sum()) for x, y in zip(a, b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", default=str(SHARED / "data" / "glue"))
    parser.add_argument("--tokenizer", default=str(SHARED / "assets" / "qwen2.5-tokenizer"))
    parser.add_argument("--model_config", default=str(SHARED / "assets" / "qwen2.5-configs" / "Qwen2.5-1.5B"))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random model (the real one has 28)")
    parser.add_argument("--backend", help="torch.compile backend of the layers (default: inductor; --smoke: eager, "
                                          "dynamo's tracing and guards without code generation)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: the checks that run without CUDA")
    args = parser.parse_args()

    import torch

    from gluetune.console import quiet_libraries, setup_logging

    cuda = torch.cuda.is_available() and not args.smoke
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device here: bench/gpu_check.py checks CUDA graphs on a GPU; nothing to do "
              "(--smoke runs every check that can run on a tiny model on the CPU)")
        return
    setup_logging()
    quiet_libraries()
    backend = args.backend or ("eager" if args.smoke else "inductor")
    if backend != "inductor":
        compile_module = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, **kwargs: compile_module(self, **kwargs, backend=backend)

    from torch._dynamo.utils import counters

    from gluetune.training.speed import cudagraphs, fastpath

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    def layer_graphs(layers: list) -> int:
        """The graphs cached on the code every compiled layer runs first (its class's forward, which dynamo
        traces from): one per shape and mode when the layers share them, one per layer and shape when not.
        (What a graph break leaves over is another code object's, counted by graphs() alone.)"""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(type(layers[0]).forward)) if layers else 0

    device = torch.cuda.get_device_name(0) if cuda else "cpu (smoke)"
    print(f"gpu_check: {device}; torch {torch.__version__}; {Path(args.model_config).name} "
          f"{'shrunk, ' if args.smoke else 'widths, '}{args.layers} layers, random weights; layers compiled with "
          f"{backend}", flush=True)
    check = Checks()
    kind = cudagraphs.GraphedSteps if cuda else cudagraphs.EagerReplays
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        config, trainer, train_set, evals = build_run(args, Path(tmp), cuda)
        model, device_ = trainer.model, trainer.args.device
        layers = stack.enter_context(fastpath.compiled_layers(trainer, config))
        train_batches, eval_batches = fastpath.rehearsal_batches(trainer, train_set, evals.values())
        shapes = [tuple(b["input_ids"].shape) for b in train_batches]
        rows = trainer.args.per_device_train_batch_size
        check.require(shapes == [(rows, 16), (rows, 32)], "buckets",
                      f"training shapes {' and '.join('x'.join(map(str, s)) for s in shapes)}, "
                      f"{len(eval_batches)} evaluation shape(s)")
        dropouts = set_dropout(model, 0.0)
        plan = fastpath.planned_graphs(train_batches, eval_batches)
        # +1: the dropout check's bucket (one training shape), compiled again for its dropout probability
        # (dynamo guards on it)
        with fastpath.compile_limits(plan + 1):
            before, before_layer, breaks = graphs(), layer_graphs(layers), sum(counters["graph_break"].values())
            compiled = fastpath.rehearse(trainer, train_batches, eval_batches, layers)
            made, per_layer = graphs() - before, layer_graphs(layers) - before_layer
            breaks = sum(counters["graph_break"].values()) - breaks
            check.require(compiled and per_layer == plan, "compiled",
                          f"{per_layer} graphs for {len(train_batches)} training and {len(eval_batches)} evaluation "
                          f"shapes (plan: {plan}), shared by the {len(layers)} layers; {made} in all, {breaks} graph "
                          f"breaks; rehearsal {'ok' if compiled else 'FAILED'}")

            inputs, items = on_device(train_batches[-1], device_)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            model.train()
            eager_step(trainer, inputs, items)
            model.zero_grad(set_to_none=True)
            peak_eager = torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0

            if cuda:
                torch.cuda.reset_peak_memory_stats()
            said = []
            started = time.perf_counter()
            with catch_gluetune_warnings(said):
                steps = cudagraphs.use_graphs(trainer, train_batches, kind=kind)
            peak_capture = torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0
            if steps is None and any(name in " ".join(said) for name in SYNC_ERRORS):
                check.unless(False, "no-sync", f"a host sync inside the captured step: {' '.join(said)}")
            check.require(steps is not None and sorted(steps.graphs) == shapes and graphs() - before == made
                          and layer_graphs(layers) - before_layer == per_layer, "capture",
                          f"{len(steps.graphs) if steps else 0} graphs ({'CUDA' if cuda else 'eager stand-in'}) in "
                          f"{time.perf_counter() - started:.1f} s, {graphs() - before - made} more compiled graphs"
                          + (f"; {' '.join(said)}" if said else ""))

            if cuda:
                torch.cuda.reset_peak_memory_stats()
                steps(inputs, items)
                model.zero_grad(set_to_none=True)
                peak_replay = torch.cuda.max_memory_allocated() / 1024**3
                check.ok("memory", f"peak GB: eager step {peak_eager:.2f}, capture {peak_capture:.2f}, replay "
                                   f"{peak_replay:.2f}; reserved {torch.cuda.memory_reserved() / 1024**3:.2f} "
                                   f"({args.layers} layers, {rows} x 32 tokens)")
            else:
                check.skip("memory", "GPU memory: CUDA only")

            start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
            batches = [b for _, b in zip(range(STEPS), trainer.get_train_dataloader())]
            eager_losses, eager_weights = optimizer_steps(trainer, batches, lambda i, n: eager_step(trainer, i, n), start)
            graph_losses, graph_weights = optimizer_steps(trainer, batches, steps, start)
            check.unless(len(graph_losses) == STEPS, "same", "a training batch found no captured graph: "
                          f"{sorted({(tuple(b['input_ids'].shape), tuple(sorted(b))) for b in batches})}")
            loss_gap = max(abs(g - e) / max(abs(e), 1e-12) for g, e in zip(graph_losses, eager_losses))
            moved, apart = distance(eager_weights, start), distance(graph_weights, eager_weights)
            check.require(loss_gap <= LOSS_RTOL and moved > 0 and apart <= MOVED_RTOL * moved, "same",
                          f"dropout 0, {STEPS} steps ({', '.join(sorted({'x'.join(map(str, b['input_ids'].shape)) for b in batches}))}): "
                          f"losses {' '.join(f'{v:.4f}' for v in eager_losses)} eager; graphed within {loss_gap:.1e} "
                          f"(limit {LOSS_RTOL:g}); adapters {apart / moved if moved else float('nan'):.1e} of their move "
                          f"apart (limit {MOVED_RTOL:g})")

            inputs, items = on_device(train_batches[0], device_)
            same = [float(steps(inputs, items)) for _ in range(2)]
            set_dropout(model, 0.1)
            with catch_gluetune_warnings(said):
                fresh = cudagraphs.use_graphs(trainer, train_batches[:1], kind=kind)
            check.unless(fresh is not None, "dropout", f"capture with dropout 0.1: {' '.join(said)}")
            masked = [float(fresh(inputs, items)) for _ in range(2)]
            model.zero_grad(set_to_none=True)
            check.require(masked[0] != masked[1] and same[0] == same[1], "dropout",
                          f"one batch replayed twice: dropout 0.1 ({dropouts} modules) {masked[0]:.5f} and "
                          f"{masked[1]:.5f}, dropout 0 {same[0]:.5f} and {same[1]:.5f}")

        if not cuda:
            check.skip("no-sync", "a capture's host-sync error: CUDA only")
            return
        control = sync_inside_a_capture()
        check.require(any(name in control for name in SYNC_ERRORS), "no-sync",
                      f"the step captured with no host sync inside; a control capture calling .item() raised "
                      f"{control[:120]!r}")


def catch_gluetune_warnings(said: list):
    """A context in which the gluetune logger's warnings are also collected into `said`."""
    import contextlib
    import logging

    class Collect(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    @contextlib.contextmanager
    def collecting():
        said.clear()
        handler = Collect(logging.WARNING)
        logging.getLogger("gluetune").addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger("gluetune").removeHandler(handler)

    return collecting()


def sync_inside_a_capture() -> str:
    """What a capture that waits for the GPU from the host raises (last: it may leave the capture's stream
    state behind)."""
    import torch

    x = torch.ones(4, device="cuda")
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            (x * 2).sum().item()
    except Exception as err:  # noqa: BLE001 - what it raises is what is checked
        chain = []
        while err is not None and len(chain) < 4:  # the capture's end may raise over the sync's own error
            chain.append(f"{type(err).__name__}: {err}".replace("\n", " "))
            err = err.__context__
        return " <- ".join(chain)
    return "nothing"


if __name__ == "__main__":
    main()
