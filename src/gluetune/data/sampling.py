"""Length-grouped training order: little padding per batch, fresh randomness every epoch, any number
of processes.

Why not transformers' samplers: its LengthGroupedSampler walks each mega-batch from its longest to
its shortest batch (a length curriculum repeated every few dozen steps), draws its permutation from
the global RNG (a run resumed mid-epoch would see another order than the run it continues), and
under several processes accelerate deals its batches out round-robin, repeating examples to even
them out. Its BatchRebalanceSampler balances cost across processes by varying batch sizes, and
drops the last short step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class LengthGroupedBatches:
    """One process's micro-batches: similar lengths together, order drawn from (seed, epoch) alone.

    An optimizer step takes `micro_batch_size x accumulation x processes` examples. Each epoch the
    examples are shuffled, cut into groups of `group_steps` steps, sorted by length inside each
    group and cut into steps; the steps are shuffled, the step with the longest example first (an
    out-of-memory error shows at once), the short step last. A step's examples, in length order,
    are cut into `accumulation x processes` micro-batches: micro-batch `a` of process `r` is piece
    `a x processes + r`, so the processes of one accumulation slot carry similar lengths. So every
    example is used once per epoch by exactly one process, and a step holds the same examples
    whether it runs as 16 x 2, 32 x 1 or 16 x 1 on 2 processes: only the split changes. The last,
    short step is cut as evenly as possible; if it holds fewer examples than pieces (or than
    `smallest_step`), it joins the step before it; with `drop_last` (training.dataloader_drop_last)
    it is left out. The Trainer calls `set_epoch` every epoch.
    """

    def __init__(self, lengths: Sequence[int], micro_batch_size: int, seed: int, accumulation: int = 1,
                 processes: int = 1, rank: int = 0, group_steps: int | None = None, smallest_step: int | None = None,
                 drop_last: bool = False):
        self.lengths = list(lengths)
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation
        self.processes = processes
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.pieces = accumulation * processes
        self.step_size = micro_batch_size * self.pieces
        # A last step shorter than this joins the one before: the pieces of a step, or (fastpath,
        # which runs 16 x 2 as 32 x 1) the pieces of the step as configured, so both agree.
        self.smallest_step = max(self.pieces, smallest_step or 1)
        self.drop_last = drop_last
        if len(self.lengths) < self.pieces:
            raise ValueError(f"{len(self.lengths)} training examples cannot fill {self.pieces} micro-batches of a step")
        if group_steps is None:
            group_steps = max(1, min(len(self.lengths) // (self.step_size * 4), 50))
        self.group_size = group_steps * self.step_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> list[list[int]]:
        """This epoch's optimizer steps, each a list of example indices sorted by length."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        full, partial = [], []
        for start in range(0, len(order), self.group_size):
            group = sorted(order[start : start + self.group_size], key=self.lengths.__getitem__)
            for i in range(0, len(group), self.step_size):
                step = group[i : i + self.step_size]
                (full if len(step) == self.step_size else partial).append(step)
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda s: max(self.lengths[i] for i in full[s]))
            full[0], full[longest] = full[longest], full[0]
        if partial and not self.drop_last:
            # Only the last group can leave a short step.
            (last,) = partial
            if len(last) < self.smallest_step:
                full[-1] = sorted(full[-1] + last, key=self.lengths.__getitem__)
            else:
                full.append(last)
        return full

    def split(self, step: list[int]) -> list[list[int]]:
        """A step's examples as `pieces` micro-batches of (nearly) equal size, in length order."""
        size, extra = divmod(len(step), self.pieces)
        bounds, start = [], 0
        for piece in range(self.pieces):
            end = start + size + (1 if piece < extra else 0)
            bounds.append(step[start:end])
            start = end
        return bounds

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps():
            pieces = self.split(step)
            for slot in range(self.accumulation):
                yield pieces[slot * self.processes + self.rank]

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.step_size)
        steps = full + (1 if rest >= self.smallest_step and not self.drop_last else 0)  # a shorter rest joins the step before
        return steps * self.accumulation
