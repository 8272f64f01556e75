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


class EagerReplays(cudagraphs.GraphedSteps):
    """A graph per shape without CUDA: "capture" keeps the static buffers (the stand-in's "graph"), a
    "replay" runs the very step a capture records (zero the buffers, loss over `items`, backward) from
    them and, as a replay does, writes the gradients into the captured gradient buffers whatever
    `.grad` holds: no new `.grad` tensor. So a step whose `.grad` is not its buffer (the Trainer's
    zero_grad(set_to_none=True) left None) reaches the optimizer without gradients, as on a GPU."""

    replays = 0

    def record(self, static):
        return static, None

    def replay(self, graph, loss):
        EagerReplays.replays += 1
        found = [p.grad for p in self.grads.parameters]
        self.grads.attach()  # the captured backward writes into the buffers
        loss = self.forward_backward(graph)
        for parameter, grad in zip(self.grads.parameters, found):
            parameter.grad = grad  # what the caller left there, as a replay leaves it
        return loss


def test_graphed_steps_learn_what_the_plain_path_learns(tiny_qwen, tmp_path, monkeypatch):
    """Through the Trainer's whole loop (zero_grad(set_to_none), clipping, fused schedule, evaluation):
    every step runs from the static buffers and gradient buffers, and the run ends as a plain one."""
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    monkeypatch.setattr(training_args, "check_cuda_graphs", lambda config, args: None)  # this machine has no CUDA
    captured, shapes, trainers = [], [], []
    real_use_graphs = cudagraphs.use_graphs

    def use_eager_replays(trainer, train_batches):
        captured.append(real_use_graphs(trainer, train_batches, kind=EagerReplays))
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
    assert EagerReplays.replays == runs["graphed"][1]["train"]["steps"]  # every step was a "replay"
    assert_same_training(runs["plain"], runs["graphed"], rel=1e-4)
    # released when training ended: no graph, and no reference cycle keeping them with the trainer
    assert not captured[0].graphs and captured[0].trainer is None and trainers[0].graphed_steps is None


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
