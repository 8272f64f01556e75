"""Length-grouped training order: little padding per batch, fresh randomness every epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Batches of similar length, in random order, drawn from (seed, epoch) alone.

    Why not transformers' LengthGroupedSampler: it walks each mega-batch from its longest to its
    shortest batch (a length curriculum repeated every few dozen steps), and draws its permutation
    from the global RNG, so a run resumed mid-epoch would see another order than the run it
    continues. Here examples are shuffled, cut into mega-batches, sorted by length inside each,
    cut into batches, and the batches shuffled; the batch with the longest example goes first so
    an out-of-memory error shows at once. The Trainer calls `set_epoch` every epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int | None = None):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        if mega_batch_mult is None:
            mega_batch_mult = max(1, min(len(self.lengths) // (batch_size * 4), 50))
        self.mega_batch_size = mega_batch_mult * batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        full, partial = [], []
        for start in range(0, len(order), self.mega_batch_size):
            mega = sorted(order[start : start + self.mega_batch_size], key=self.lengths.__getitem__)
            for i in range(0, len(mega), self.batch_size):
                (full if len(mega[i : i + self.batch_size]) == self.batch_size else partial).append(mega[i : i + self.batch_size])
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda b: max(self.lengths[i] for i in full[b]))
            full[0], full[longest] = full[longest], full[0]
        # A short batch can only come last: the DataLoader cuts the index stream every batch_size.
        return full + partial

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch
