"""The length-grouped training order: every example once per epoch on exactly one process, the same
step contents however a step is split, fresh order per epoch, little padding."""

import random

import pytest

from gluetune.data.sampling import LengthGroupedBatches

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(3, 45) for _ in range(1000)]


def padded_tokens(sampler: LengthGroupedBatches) -> int:
    return sum(max(LENGTHS[i] for i in batch) * len(batch) for batch in sampler)


def steps_of(micro: int, accumulation: int, processes: int, seed: int = 1, epoch: int = 0, n: int = len(LENGTHS)):
    """What each optimizer step holds across all processes: a list of sets of example indices."""
    ranks = []
    for rank in range(processes):
        sampler = LengthGroupedBatches(LENGTHS[:n], micro, seed=seed, accumulation=accumulation,
                                       processes=processes, rank=rank)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        ranks.append([batches[i : i + accumulation] for i in range(0, len(batches), accumulation)])
    assert len({len(r) for r in ranks}) == 1, "every process must run the same number of steps"
    return [set().union(*(set(b) for r in ranks for b in r[step])) for step in range(len(ranks[0]))]


@pytest.mark.parametrize("n", [1000, 999, 995, 965])
def test_every_example_once_per_epoch_on_one_process(n):
    for micro, accumulation, processes in [(16, 2, 1), (8, 2, 2), (16, 1, 2), (5, 3, 2)]:
        seen = []
        for rank in range(processes):
            seen += [i for batch in LengthGroupedBatches(LENGTHS[:n], micro, seed=1, accumulation=accumulation,
                                                         processes=processes, rank=rank) for i in batch]
        assert sorted(seen) == list(range(n)), (micro, accumulation, processes)
        assert all(len(b) > 0 for rank in range(processes) for b in LengthGroupedBatches(
            LENGTHS[:n], micro, seed=1, accumulation=accumulation, processes=processes, rank=rank))


def test_a_step_holds_the_same_examples_however_it_is_split():
    """32 x 1, 16 x 2, 16 x 1 on two processes, 8 x 2 on two: the same steps, in the same order."""
    reference = steps_of(32, 1, 1)
    for micro, accumulation, processes in [(16, 2, 1), (16, 1, 2), (8, 2, 2), (4, 4, 2)]:
        assert steps_of(micro, accumulation, processes) == reference, (micro, accumulation, processes)
    # a short last step too: 997 = 31 x 32 + 5
    assert steps_of(16, 2, 1, n=997) == steps_of(32, 1, 1, n=997) == steps_of(8, 2, 2, n=997)


def test_a_tiny_last_step_joins_the_one_before():
    """995 = 31 x 32 + 3: a rest smaller than the pieces of a step cannot be split."""
    steps = steps_of(8, 2, 2, n=992 + 3)  # a rest of 3 examples for 4 pieces
    assert len(steps) == 31 and sum(len(s) for s in steps) == 995


def test_a_new_order_each_epoch_drawn_from_seed_and_epoch_alone():
    first = steps_of(16, 2, 2, epoch=0)
    assert steps_of(16, 2, 2, epoch=1) != first
    random.seed(123)  # the global RNG plays no part: a resumed run sees the same order
    assert steps_of(16, 2, 2, epoch=0) == first
    assert steps_of(16, 2, 2, seed=2) != first


def test_longest_step_first_and_short_step_last():
    sampler = LengthGroupedBatches(LENGTHS, 32, seed=1)
    steps = sampler.steps()
    assert max(LENGTHS[i] for i in steps[0]) == max(LENGTHS)
    assert all(len(s) == 32 for s in steps[:-1]) and len(steps[-1]) == len(LENGTHS) % 32


def test_processes_of_one_slot_carry_similar_lengths():
    """Micro-batch a of each process comes from the same stretch of the length-sorted step."""
    per_rank = [list(LengthGroupedBatches(LENGTHS, 8, seed=1, accumulation=2, processes=2, rank=r)) for r in range(2)]
    # within a step, slot 0 (both processes) holds shorter examples than slot 1
    step0 = [per_rank[r][0] + per_rank[r][1] for r in range(2)]
    assert max(LENGTHS[i] for r in range(2) for i in per_rank[r][0]) <= min(LENGTHS[i] for r in range(2) for i in per_rank[r][1])
    assert sorted(step0[0] + step0[1]) == sorted(LengthGroupedBatches(LENGTHS, 32, seed=1).steps()[0])


def test_group_size_trades_padding_for_mixing():
    padding = [padded_tokens(LengthGroupedBatches(LENGTHS, 32, seed=1, group_steps=m)) for m in (1, 4, 16)]
    assert padding[0] > padding[1] > padding[2] >= sum(LENGTHS)


def test_too_few_examples_for_the_pieces_of_a_step():
    with pytest.raises(ValueError, match="cannot fill 4 micro-batches"):
        LengthGroupedBatches(LENGTHS[:3], 1, seed=1, accumulation=2, processes=2)


def test_drop_last_drops_the_short_last_step(tiny_qwen, tmp_path):
    """96 examples in steps of 20 x 2: two full steps and a short one of 16, which
    training.dataloader_drop_last drops, as it does for transformers' own samplers."""
    from conftest import REFERENCE_CONFIG, tiny_overrides, tiny_training_pieces

    from gluetune.config.run import load_config
    from gluetune.training.speed import fastpath
    from gluetune.training.trainer import GluetuneTrainer

    def batches(*extra):
        overrides = tiny_overrides(tiny_qwen, tmp_path / "run", train=96) + ["training.per_device_train_batch_size=20",
                                                                            "training.report_to=none", *extra]
        config = load_config(REFERENCE_CONFIG, overrides)
        args, tokenizer, model, train_set = tiny_training_pieces(config)
        trainer = GluetuneTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=train_set,
                                  data_collator=fastpath.collator(config, tokenizer, args, False))
        loader = trainer.get_train_dataloader()
        return [len(batch["input_ids"]) for batch in loader]

    assert batches() == [20, 20, 20, 20, 8, 8]
    assert batches("training.dataloader_drop_last=true") == [20, 20, 20, 20]
