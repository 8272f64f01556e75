"""The CPU speedups: a cheaper dropout that is still dropout, and accelerators that fall back cleanly."""

import platform

import pytest
import torch
from torch import nn

from gluetune.files import installed_version
from gluetune.training.speed.cpu import FastCpuDropout, use_fast_cpu_dropout
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
