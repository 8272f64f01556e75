"""Which process this is, and deciding things once for all processes.

A run started by `torchrun` or `accelerate launch` is N copies of the same program sharing one
output folder. Every decision that ends or shapes the run (the checkpoint to resume, an error while
preparing the folder, a stop signal, a diverged loss) must be taken once and seen by every process,
or one process waits forever in a collective while another has exited. Built on accelerate's
`PartialState`, the state `TrainingArguments` and the `Trainer` use, so all share one process group.
A single process is the same code with a world of one: every helper here is then a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher); usable before
    the process group exists, e.g. to keep config errors from printing once per process."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return launched_rank() == 0


def _state():
    from accelerate import PartialState

    return PartialState()


def initialized() -> bool:
    """Whether this process is part of a process group (a launched multi-process run)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def wait_for_everyone() -> None:
    if initialized():
        _state().wait_for_everyone()


def broadcast_from_main(value: T) -> T:
    """The main process's `value`, on every process (any picklable object)."""
    if not initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flag: bool | Any) -> bool:
    """True on every process when `flag` is true on at least one (a bool or a 0-dim tensor)."""
    if not initialized():
        return bool(flag)
    import torch
    import torch.distributed as dist

    state = _state()
    value = flag.detach().to(state.device, torch.float32) if torch.is_tensor(flag) else torch.tensor(
        float(bool(flag)), device=state.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def run_on_main(fn: Callable[[], T], error_type: type[Exception]) -> T:
    """Run `fn` on the main process only and give its result to every process.

    An `error_type` raised by `fn` is raised on every process with the same message (so each
    exits the same way instead of the others waiting for a main process that has gone)."""
    result, error = None, None
    if is_main_process() or not initialized():
        try:
            result = fn()
        except error_type as err:
            err.shared = True  # every process raises it: one of them says it
            error = err
    result, error = broadcast_from_main((result, error))
    if error is not None:
        raise error
    return result
