"""Try something before training (a rehearsal that compiles, a CUDA-graph capture), then put the
run's starting point back as it was: weights only read, gradients dropped, random streams restored.
Used by the fast path (fastpath.rehearse) and by CUDA graphs (cudagraphs.use_graphs)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import distributed


class RandomState:
    """The CPU and CUDA random streams, to put back after a rehearsal drew from them."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def run_and_roll_back(trainer, action: Callable[[], None]) -> str | None:
    """Run `action` (a rehearsal) leaving the run's starting point as it was; None if it worked on
    every process, else what failed (the same answer on every process).

    No optimizer exists yet, the gradients are dropped, the random streams put back, the weights
    only read: the run then starts exactly where it would have without the rehearsal."""
    model = trainer.model
    random_state, was_training = RandomState(), model.training
    failure = None
    try:
        action()
    except Exception as err:  # noqa: BLE001 -- compilers and graph capture fail in many ways; each means: run without them
        message = str(err).strip()
        failure = f"{type(err).__name__}: {message.splitlines()[0]}" if message else type(err).__name__
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    try:
        random_state.restore()
    except Exception as err:  # noqa: BLE001 -- e.g. a generator a failed capture left registered: say so rather than crash
        failure = failure or f"restoring the random streams: {type(err).__name__}: {err}".splitlines()[0]
    if distributed.any_process(failure is not None):
        return failure or "another process failed"
    return None
