"""The CPU speedups: a cheaper dropout that is still dropout, and accelerators that fall back cleanly."""

import platform

import pytest
import torch
from conftest import REFERENCE_CONFIG, tiny_overrides
from torch import nn

from gluetune.files import installed_version
from gluetune.training.speed.cpu import FastCpuDropout, use_fast_cpu_dropout
from gluetune.training.training_args import accelerator_settings


def test_fast_dropout_keeps_one_minus_p_and_scales_like_dropout():
    torch.manual_seed(0)
    dropout = FastCpuDropout(0.1).train()
    x = torch.ones(64, 40, 384, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x)
    # the backward keeps the 1-byte mask only (and the scale as a number), not a float copy of it or of x
    assert [t.dtype for t in saved if t.numel() > 1] == [torch.bool]
    kept = y > 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask * scale)/dx = mask * scale
    adjacent = torch.stack([kept.flatten()[:-1].float(), kept.flatten()[1:].float()])
    assert abs(torch.corrcoef(adjacent)[0, 1].item()) < 0.01  # lanes are independent


def test_fast_dropout_follows_the_global_seed_and_is_identity_in_eval():
    dropout = FastCpuDropout(0.3).train()
    x = torch.randn(8, 100)
    torch.manual_seed(5)
    first = dropout(x)
    torch.manual_seed(5)
    assert torch.equal(dropout(x), first)
    assert torch.equal(dropout.eval()(x), x)


def test_swap_replaces_plain_dropout_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 2)))
    assert use_fast_cpu_dropout(model) == 2
    assert isinstance(model[1], FastCpuDropout) and model[2][0].p == 0.2
    assert use_fast_cpu_dropout(model) == 0



def test_the_command_bounds_ideeps_cache_unless_the_environment_sets_it(monkeypatch):
    import os

    from gluetune.training.speed import cpu

    lowered = []
    monkeypatch.setattr(cpu, "lower_cpu_mmap_threshold", lambda: lowered.append(True) or True)
    monkeypatch.setenv(cpu.IDEEP_CACHE_ENV, "")
    monkeypatch.delenv(cpu.IDEEP_CACHE_ENV)  # (undone to what it was before the test)
    cpu.prepare_cpu_process({})
    assert os.environ[cpu.IDEEP_CACHE_ENV] == "1" and lowered == [True]
    monkeypatch.setenv(cpu.IDEEP_CACHE_ENV, "64")  # the user's own choice stays
    cpu.prepare_cpu_process({"cpu_mmap_threshold": False})
    assert os.environ[cpu.IDEEP_CACHE_ENV] == "64" and lowered == [True]

# A run's batches as glibc sees them: the longest so far (30 MB) raised its mmap threshold, then batches
# of new shapes (dynamic padding), each freed in turn, with something smaller outliving each. Run in a
# process of its own: mallopt's threshold cannot be set back, and the test worker's heap stays as it was.
HEAP_SCRIPT = """
import torch
from gluetune.training.speed.cpu import lower_cpu_mmap_threshold


def retained_mb():
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1])
    longest = torch.ones(30 * 2**18)
    del longest
    kept = []
    for mb in range(4, 24):
        batch = torch.ones(mb * 2**18)
        kept.append(torch.ones(50_000))
        del batch
    with open("/proc/self/statm") as statm:
        return (int(statm.read().split()[1]) - before) * 4096 / 2**20


print(f"glibc {retained_mb():.1f}")
print("applied", lower_cpu_mmap_threshold())
print(f"limited {retained_mb():.1f}")
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's threshold is glibc's")
def test_the_mmap_threshold_gives_freed_batches_back_to_the_system(tmp_path):
    """What lower_cpu_mmap_threshold is for: with glibc's own thresholds the freed batches stay resident
    (here 30 MB to 273 MB, the sum of the 20 batches, from run to run); with the 2 MB threshold each goes
    back to the system when freed (what stays is at most the 4 MB of small tensors kept)."""
    from conftest import run_cli

    result = run_cli("-c", HEAP_SCRIPT, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    figures = dict(line.split() for line in result.stdout.splitlines())
    assert figures["applied"] == "True"
    assert float(figures["glibc"]) > 16, result.stdout  # what the limit is for happens here
    assert float(figures["limited"]) < 6, result.stdout


def test_accelerators_fall_back_with_a_notice_without_cuda():
    """Liger kernels need CUDA; bitsandbytes' 8-bit optimizers run on the CPU (>= 0.50), not paged there."""
    settings, notices = accelerator_settings({"use_liger_kernel": True, "optim": "paged_adamw_8bit"}, cuda=False)
    bnb_here = installed_version("bitsandbytes") is not None
    assert settings == {"use_liger_kernel": False, **({} if bnb_here else {"optim": "adamw_torch"})}
    assert len(notices) == 2 and all("\n" not in n for n in notices)
    assert ("not paged" if bnb_here else "not installed") in notices[1]


def _tiny_lora_bert(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertForSequenceClassification(config).to(torch.bfloat16)  # the frozen base in bf16, as a bf16 run holds it
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=r".*encoder.*(query|key|value|dense)",
                      modules_to_save=["classifier"])
    model = get_peft_model(model, lora)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # what trains is held in fp32 (model.precision)
    return model


def _train_and_count_casts(model, steps: int = 3) -> tuple[list[torch.Tensor], int]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                CountCasts.casts += 1
            return func(*args, **(kwargs or {}))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids = torch.randint(1, 100, (4, 7), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0
        with CountCasts(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 1, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters() if p.requires_grad], CountCasts.casts


def test_lora_layers_skip_the_input_round_trip_and_learn_the_same_to_the_bit():
    """Under bf16 autocast, a LoRA layer without peft's cast of its input to fp32 (and autocast's back)
    trains to the very same weights, with fewer copies: the run learns the same, only faster."""
    from gluetune.training.speed.lora import skip_lora_input_casts

    plain, skipping = _tiny_lora_bert(0.0), _tiny_lora_bert(0.0)
    assert skip_lora_input_casts(skipping) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    expected, plain_casts = _train_and_count_casts(plain)
    got, fewer_casts = _train_and_count_casts(skipping)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert fewer_casts < plain_casts
    assert skip_lora_input_casts(_tiny_lora_bert(0.1)) == 0  # with adapter dropout the round trip rounds: kept


def test_module_walk_shortcuts_answer_as_the_walks_do():
    """speed.walks on a small model: train() returns at once when every module is in the mode asked (and
    walks when one is not, whoever changed it), parameters() gives the same weights in the same order;
    removed, the model is as it was."""
    from gluetune.training.speed.walks import FewerModuleWalks

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.2)))
    expected = list(model.parameters())
    shortcuts = FewerModuleWalks()
    shortcuts.install(model)
    walks = []
    model[2].train = lambda mode=True: walks.append(mode) or nn.Module.train(model[2], mode)
    assert model.train() is model and walks == []  # all in training mode already: no walk
    model[2][1].eval()  # a submodule switched by someone else: the next train() walks
    model.train()
    assert walks == [True] and all(m.training for m in model.modules())
    model.eval()
    assert walks == [True, False] and not any(m.training for m in model.modules())
    assert list(model.parameters()) == expected and list(model.parameters(recurse=False)) == []
    shortcuts.remove()
    assert "train" not in model.__dict__ and "parameters" not in model.__dict__ and list(model.parameters()) == expected


@pytest.mark.slow
def test_the_steps_walk_the_module_tree_only_where_a_mode_changes(tiny_qwen, tmp_path, monkeypatch):
    """The Trainer's model.train() per micro-batch and model.parameters() per step (clipping, zero_grad)
    answered without walking every module (speed.walks): far fewer walks over 2 epochs with their
    evaluations (train/eval switches), and the very same trained weights as with the walks."""
    from gluetune.config.run import load_config
    from gluetune.training.run import train
    from gluetune.training.speed import walks

    calls = {"train": 0, "parameters": 0}
    walk_train, walk_parameters = nn.Module.train, nn.Module.parameters

    def counted(name, method):
        def count(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)
        return count

    monkeypatch.setattr(nn.Module, "train", counted("train", walk_train))
    monkeypatch.setattr(nn.Module, "parameters", counted("parameters", walk_parameters))

    def run(name: str) -> tuple[list[torch.Tensor], dict, int]:
        calls.update(train=0, parameters=0)
        overrides = tiny_overrides(tiny_qwen, tmp_path / name, train=96, evals=16, epochs=2)
        model = train(load_config(REFERENCE_CONFIG, overrides)).model
        return [p.detach().clone() for p in model.parameters() if p.requires_grad], dict(calls), len(list(model.modules()))

    fewer, fewer_calls, modules = run("shortcuts")
    monkeypatch.setattr(walks.FewerModuleWalks, "install", lambda self, model: None)
    walked, walked_calls, _ = run("walks")
    assert all(torch.equal(a, b) for a, b in zip(fewer, walked, strict=True))
    # 6 steps of 16 x 2: each of the 12 micro-batches walked every module's train(); with the shortcut only
    # the first after each evaluation does. parameters(): twice per step, now never during the steps.
    assert fewer_calls["train"] <= walked_calls["train"] - 10 * modules, (fewer_calls, walked_calls, modules)
    assert fewer_calls["parameters"] <= walked_calls["parameters"] - 2 * 6, (fewer_calls, walked_calls)


def test_adamw_on_the_cpu_updates_all_weights_at_once_to_the_same_bits(tmp_path):
    """torch's AdamW on the CPU loops over the weights in Python unless asked for `foreach`; gluetune asks
    (GluetuneTrainer.get_optimizer_cls_and_kwargs): the same updates to the bit, with weight decay and a
    changing learning rate, over weights of many shapes and gradients of many scales."""
    from transformers import TrainingArguments

    from gluetune.training.trainer import GluetuneTrainer

    args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", weight_decay=0.01, use_cpu=True,
                             report_to="none")
    optimizer_cls, kwargs = GluetuneTrainer.get_optimizer_cls_and_kwargs(args)
    assert optimizer_cls is torch.optim.AdamW and kwargs["foreach"] is True
    fused = TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch_fused", use_cpu=True, report_to="none")
    assert "foreach" not in GluetuneTrainer.get_optimizer_cls_and_kwargs(fused)[1]

    torch.manual_seed(0)
    start = [torch.randn(*shape) for shape in [(64, 32), (32,), (1,), (8, 384), (2, 3, 5)]]
    results = []
    for foreach in (False, True):
        weights = [w.clone().requires_grad_() for w in start]
        optimizer = optimizer_cls(weights, lr=3e-4, weight_decay=0.01, foreach=foreach)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1, (step + 1) / 10) * (1 - step / 200))
        generator = torch.Generator().manual_seed(1)
        for _ in range(100):
            for w in weights:
                w.grad = torch.randn(w.shape, generator=generator) * 10.0 ** torch.randint(-6, 3, (1,), generator=generator).item()
            optimizer.step()
            schedule.step()
        results.append(weights)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
