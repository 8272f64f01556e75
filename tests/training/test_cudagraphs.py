"""Whole-step CUDA graphs (cudagraphs.py), the pieces that run without CUDA: static input buffers,
gradient buffers that survive the Trainer's zero_grad, and the graphed-step plumbing through a whole
run (with a stand-in that runs each "replay" eagerly from the same static buffers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import REFERENCE_CONFIG, UNEVEN_SIZE, assert_same_training, tiny_overrides, tiny_training_pieces

from gluetune.config.run import load_config
from gluetune.errors import UserError
from gluetune.training import run as training
from gluetune.training import training_args
from gluetune.training.speed import cudagraphs, fastpath
from gluetune.training.trainer import GluetuneTrainer


def test_static_batch_copies_into_the_same_storage():
    first = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.tensor([0, 1])}
    static = cudagraphs.StaticBatch(first)
    address = static.tensors["input_ids"].data_ptr()
    assert static.shape == (2, 3) and static.tensors["input_ids"] is not first["input_ids"]
    static.load({"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([1, 1])})
    assert static.tensors["input_ids"].data_ptr() == address and (static.tensors["input_ids"] == 1).all()
    with pytest.raises(ValueError, match="differ from the captured"):
        static.load({"input_ids": torch.ones(2, 3, dtype=torch.long)})


def test_gradient_buffers_survive_zero_grad_set_to_none():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    grads = cudagraphs.GradientBuffers(model.parameters())
    assert len(grads.buffers) == 3  # the frozen weight has none
    grads.attach()
    model(torch.ones(4, 3)).sum().backward()
    written = [b.clone() for b in grads.buffers]
    assert all(p.grad is b for p, b in zip(grads.parameters, grads.buffers)) and any(w.abs().sum() > 0 for w in written)
    model.zero_grad(set_to_none=True)  # what the Trainer does after every optimizer step
    assert all(p.grad is None for p in grads.parameters)
    grads.attach()
    assert all(p.grad is b for p, b in zip(grads.parameters, grads.buffers))
    grads.zero()
    assert all((b == 0).all() for b in grads.buffers)


def test_graphed_steps_learn_what_the_plain_path_learns(tiny_qwen, tmp_path, monkeypatch):
    """Through the Trainer's whole loop (zero_grad(set_to_none), clipping, fused schedule, evaluation):
    every step runs from the static buffers and gradient buffers, and the run ends as a plain one."""
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    monkeypatch.setattr(training_args, "check_cuda_graphs", lambda config, args: None)  # this machine has no CUDA
    captured, shapes, trainers = [], [], []
    real_use_graphs = cudagraphs.use_graphs

    def use_eager_replays(trainer, train_batches):
        captured.append(real_use_graphs(trainer, train_batches, kind=cudagraphs.EagerReplays))
        shapes.extend(captured[-1].graphs)
        trainers.append(trainer)
        return captured[-1]

    monkeypatch.setattr(cudagraphs, "use_graphs", use_eager_replays)
    runs = {}
    for name, extra in (("plain", []), ("graphed", ["training.fast_path=true", "training.cuda_graphs=true"])):
        out = tmp_path / name
        config = load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, **UNEVEN_SIZE) + ["peft.lora_dropout=0", *extra])
        runs[name] = (out, training.train(config).metrics)
    assert captured[0] is not None and shapes  # one per shape of the step plan
    assert all(rows == 32 and width % fastpath.BUCKET == 0 for rows, width in shapes)
    assert captured[0].replays == runs["graphed"][1]["train"]["steps"]  # every step was a "replay"
    assert_same_training(runs["plain"], runs["graphed"], rel=1e-4)
    # released when training ended: no graph, and no reference cycle keeping them with the trainer
    assert not captured[0].graphs and captured[0].trainer is None and trainers[0].graphed_steps is None


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp32", marks=pytest.mark.slow)])  # fp32: 5 s more
def test_capture_steps_and_evaluation_share_one_autocast(tiny_qwen, tmp_path, monkeypatch, precision):
    """CUDA graphs need autocast without its weight cache, and dynamo guards on that flag: a capture in an
    autocast of its own compiled every training shape again (the budget counted them twice). The fast
    path runs the whole job in accelerate's autocast with the cache off and the capture enters that very
    autocast: the rehearsal compiles the plan's graphs, and the capture (its warm-up, in the stand-in),
    the steps, evaluations and predictions add none. bf16 forced on (a CPU without AVX512-BF16 would run
    fp32); in fp32 there is no autocast, and the capture enters none either. dynamo's eager backend keeps
    the tracing, guards and graphs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    monkeypatch.setattr(training_args, "native_bf16", lambda: True)
    monkeypatch.setattr(training_args, "check_cuda_graphs", lambda config, args: None)  # this machine has no CUDA
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: original(self, **kwargs, backend="eager"))
    counted, plan, captured, autocasts = {}, [], [], set()
    real_rehearse, real_use_graphs = fastpath.rehearse, cudagraphs.use_graphs

    def rehearse(trainer, train_batches, eval_batches, layers):
        plan.append(len(train_batches) + len(eval_batches))
        compiled = real_rehearse(trainer, train_batches, eval_batches, layers)
        counted["rehearsal"] = graphs() - counted["start"]
        return compiled

    def use_eager_replays(trainer, train_batches):
        # the autocast of every forward from here on: the capture's, the steps' and the evaluations'
        trainer.model.get_input_embeddings().register_forward_hook(lambda *_: autocasts.add(
            (torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled())))
        captured.append(real_use_graphs(trainer, train_batches, kind=cudagraphs.EagerReplays))
        counted["capture"] = graphs() - counted["start"]
        return captured[-1]

    monkeypatch.setattr(fastpath, "rehearse", rehearse)
    monkeypatch.setattr(cudagraphs, "use_graphs", use_eager_replays)
    overrides = tiny_overrides(tiny_qwen, tmp_path / "run", train=64, evals=32, fp32=precision == "fp32") + [
        "peft.lora_dropout=0", "training.fast_path=true", "training.cuda_graphs=true", "training.report_to=none"]
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
            counted["start"] = graphs()
            summary = training.train(load_config(REFERENCE_CONFIG, overrides)).metrics
            counted["end"] = graphs() - counted["start"]
    finally:
        torch._dynamo.reset()
    assert summary["precision"] == precision and captured[0] is not None and captured[0].replays == summary["train"]["steps"]
    assert counted == {"start": counted["start"], "rehearsal": plan[0], "capture": plan[0], "end": plan[0]}
    # bf16: autocast without its weight cache everywhere; fp32: no autocast anywhere (the cache flag as it was)
    assert autocasts == ({(True, False)} if precision == "bf16" else {(False, True)})


ONE_GPU = {"deepspeed": None, "world_size": 1, "n_gpu": 1, "optim": "adamw_torch_fused"}


@pytest.mark.parametrize("change, fragments", [
    ({"n_gpu": 2}, ["sees 2 GPUs", "DataParallel", "CUDA_VISIBLE_DEVICES=0", "cuda_graphs=false"]),
    ({"deepspeed": "ds_config.json"}, ["DeepSpeed runs the backward pass itself", "remove training.deepspeed"]),
    ({"optim": "lomo"}, ["training.optim lomo updates the weights inside the backward pass", "cuda_graphs=false"]),
    ({"optim": "adalomo"}, ["training.optim adalomo"]),
    ({"optim": "galore_adamw_layerwise"}, ["training.optim galore_adamw_layerwise"]),
], ids=["data-parallel", "deepspeed", "lomo", "adalomo", "layerwise"])
def test_cuda_graphs_refuse_what_a_captured_step_cannot_serve(monkeypatch, change, fragments):
    """One line each, before anything loads: several GPUs in one process (DataParallel would split each
    batch over them, the step is captured on one), DeepSpeed (its backward is accelerator.backward,
    which a replay skips), and optimizers that update inside the backward pass."""
    from transformers.training_args import OptimizerNames

    monkeypatch.setattr(training_args, "cuda_available", lambda: True)
    config = load_config(REFERENCE_CONFIG, ["training.fast_path=true", "training.cuda_graphs=true"])
    training_args.check_cuda_graphs(config, SimpleNamespace(**ONE_GPU))  # one GPU, the fused AdamW: fine
    if "optim" in change:
        change = {"optim": OptimizerNames(change["optim"])}  # as TrainingArguments holds it
    with pytest.raises(UserError) as caught:
        training_args.check_cuda_graphs(config, SimpleNamespace(**{**ONE_GPU, **change}))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{config.source}: training.cuda_graphs: "), message
    assert all(fragment in message for fragment in fragments), message


def test_a_graphed_step_puts_model_and_optimizer_in_training_mode(tiny_qwen, tmp_path):
    """As the Trainer's own training_step does: after an evaluation the model is in eval mode, and a
    schedule-free optimizer (which has train()/eval()) holds its averaged weights until train()."""
    config = load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, tmp_path / "run", train=32) + [
        "training.fast_path=true", "training.report_to=none"])
    args, tokenizer, model, train_set = tiny_training_pieces(config)
    trainer = GluetuneTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=train_set,
                              data_collator=fastpath.collator(config, tokenizer, args, False))

    class ScheduleFree:  # the one part of a schedule-free optimizer the step touches
        mode = "eval"

        def train(self):
            self.mode = "train"

    seen = []
    trainer.optimizer = ScheduleFree()
    trainer.use_graphed_steps(lambda inputs, items: seen.append((model.training, trainer.optimizer.mode)) or
                              torch.tensor(0.5))
    model.eval()
    batch = trainer.data_collator(fastpath.features_of(train_set, range(4)))
    assert trainer.training_step(model, batch, num_items_in_batch=torch.tensor(4)).item() == 0.5
    assert seen == [(True, "train")]
