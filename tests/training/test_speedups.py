"""The CPU speedups: a cheaper dropout that is still dropout, and accelerators that fall back cleanly."""

import platform

import pytest
import torch
from torch import nn

from gluetune.files import installed_version
from gluetune.training.speed.cpu import FastCpuDropout, lower_cpu_mmap_threshold, use_fast_cpu_dropout
from gluetune.training.training_args import accelerator_settings


def test_fast_dropout_keeps_one_minus_p_and_scales_like_dropout():
    torch.manual_seed(0)
    dropout = FastCpuDropout(0.1).train()
    x = torch.ones(64, 40, 384, requires_grad=True)
    y = dropout(x)
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


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_mmap_threshold_applies_on_glibc():
    assert lower_cpu_mmap_threshold() is True


def test_accelerators_fall_back_with_a_notice_without_cuda():
    """Liger kernels need CUDA; bitsandbytes' 8-bit optimizers run on the CPU (>= 0.50), not paged there."""
    settings, notices = accelerator_settings({"use_liger_kernel": True, "optim": "paged_adamw_8bit"}, cuda=False)
    bnb_here = installed_version("bitsandbytes") is not None
    assert settings == {"use_liger_kernel": False, **({} if bnb_here else {"optim": "adamw_torch"})}
    assert len(notices) == 2 and all("\n" not in n for n in notices)
    assert ("not paged" if bnb_here else "not installed") in notices[1]
