"""A plan's MixUp group may straddle ranks: each rank loads the partner another rank holds, so every
world size that divides the global batch trains on the same bits as one process."""
import pytest
import torch

from pipeline.data.load import load_dataset
from pipeline.data.plan import PlanCollate, PlanDataset, PlanSampler, TrainPlan, render_step
from pipeline.train.recipe import resolve_recipe


@pytest.fixture(scope="module")
def data():
    return load_dataset(None, split="train")


def _plan(data, global_batch=4, group=None):
    # 4 epochs of L: MixUp in epochs 0-1 (the demo plan's recipe), 64 px
    return TrainPlan.from_recipe(resolve_recipe("l", 4), len(data), global_batch, base_size=64, mixup_group=group)


def _rank_batches(data, plan, world, epoch, steps):
    out = []
    for rank in range(world):
        sampler = PlanSampler(plan, rank, world)
        sampler.set_epoch(epoch)
        items, collate = PlanDataset(data, plan, slots=sampler.slots), PlanCollate(plan, sampler.slots)
        out.append([collate(items.__getitems__(batch)) for batch, _ in zip(sampler, range(steps))])
    return out


def test_a_group_of_4_over_2_ranks_is_the_one_process_batch_bit_for_bit(data):
    plan = _plan(data)
    assert plan.mixup_group == 4 and plan.check_world(2) == 2   # the default group: min(4, global batch)
    mixed = [s for s in range(12) if plan.step_record(0, s).mixup]
    plain = [s for s in range(12) if not plan.step_record(0, s).mixup]
    assert mixed and plain
    ranks = _rank_batches(data, plan, 2, 0, 12)
    for step in range(12):
        whole, targets, batch = render_step(plan, data, 0, step)
        got = torch.cat([ranks[r][step][0] for r in (0, 1)])
        assert torch.equal(got, whole), step
        assert [t["index"] for r in (0, 1) for t in ranks[r][step][1]] == batch.indices == plan.samples(0, step)
        assert [t.get("mixup_key") for r in (0, 1) for t in ranks[r][step][1]] == [t.get("mixup_key") for t in targets]
        assert all(ranks[r][step][2].indices == plan.samples(0, step)[2 * r:2 * r + 2] for r in (0, 1))


def test_a_rank_loads_the_partner_only_in_mixup_steps(data):
    plan = _plan(data)
    sampler = PlanSampler(plan, 1, 2)
    assert list(sampler.slots) == [2, 3] and sampler.extra == [1]   # slot 2 blends with slot 1 (rank 0's)
    for step, batch in zip(range(12), sampler):
        assert [slot for _, _, slot, _ in batch] == ([2, 3, 1] if plan.step_record(0, step).mixup else [2, 3])
    assert PlanSampler(plan, 0, 1).extra == []                      # one process holds every group whole


def test_every_world_size_that_divides_the_global_batch_sees_the_same_steps(data):
    plan = _plan(data, global_batch=8)
    want = [plan.samples(1, s) for s in range(6)]
    for world in (1, 2, 4, 8):
        samplers = [PlanSampler(plan, r, world) for r in range(world)]
        for s in samplers:
            s.set_epoch(1)
        got = [[i for r, batch in enumerate(step) for _, _, slot, i in batch if slot in samplers[r].slots]
               for step, _ in zip(zip(*samplers), range(6))]
        assert got == want
    with pytest.raises(ValueError, match="--nproc_per_node"):
        PlanSampler(plan, 0, 3)


def test_pairwise_mixup_is_the_bits_of_the_official_grouped_roll():
    from pipeline.data.collate import BatchRecord, apply_batch_record
    images = torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([i])} for i in range(8)]
    rec = BatchRecord(epoch=0, size=5, resized=False, mixup=True, beta=0.512345, indices=list(range(8)), keys=[],
                      group=4)
    x = images.unflatten(0, (-1, 4))   # the official roll(1) per group of 4, as the code before mix_pairs did it
    official = x.roll(shifts=1, dims=1).mul_(1.0 - 0.512345).add_(x.mul(0.512345)).flatten(0, 1)
    assert torch.equal(apply_batch_record(rec, images.clone(), targets)[0], official)
