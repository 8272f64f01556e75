"""The length-grouped training order: every example once per epoch, fresh order per epoch, little padding."""

import random

from gluetune.sampling import LengthGroupedSampler

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(3, 45) for _ in range(1000)]


def padded_tokens(sampler: LengthGroupedSampler) -> int:
    return sum(max(LENGTHS[i] for i in batch) * len(batch) for batch in sampler.batches())


def test_every_example_once_per_epoch_and_a_new_order_each_epoch():
    sampler = LengthGroupedSampler(LENGTHS, batch_size=32, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(len(LENGTHS)))
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == sorted(first) and second != first


def test_order_depends_on_seed_and_epoch_alone():
    a, b = LengthGroupedSampler(LENGTHS, 32, seed=7), LengthGroupedSampler(LENGTHS, 32, seed=7)
    a.set_epoch(3)
    random.seed(123)  # the global RNG plays no part: a resumed run sees the same order
    b.set_epoch(3)
    assert list(a) == list(b)
    assert list(LengthGroupedSampler(LENGTHS, 32, seed=8)) != list(LengthGroupedSampler(LENGTHS, 32, seed=7))


def test_longest_batch_first_and_short_batch_last():
    batches = LengthGroupedSampler(LENGTHS, 32, seed=1).batches()
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS)
    assert all(len(b) == 32 for b in batches[:-1]) and len(batches[-1]) == len(LENGTHS) % 32


def test_group_size_trades_padding_for_mixing():
    padding = [padded_tokens(LengthGroupedSampler(LENGTHS, 32, seed=1, mega_batch_mult=m)) for m in (1, 4, 16)]
    assert padding[0] > padding[1] > padding[2] >= sum(LENGTHS)
