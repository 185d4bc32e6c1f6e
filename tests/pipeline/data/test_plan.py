"""The training plan: world-size independent batches, step-level draws, MixUp inside fixed groups."""
import pytest
import torch

from pipeline.data.collate import BatchRecord, apply_batch_record
from pipeline.data.plan import PlanSampler, TrainPlan
from pipeline.train.recipe import resolve_recipe


def _plan(**kw):
    kw = {"num_samples": 1000, "global_batch": 32, **kw}
    return TrainPlan.from_recipe(resolve_recipe("l"), kw.pop("num_samples"), kw.pop("global_batch"), **kw)


def test_every_world_size_sees_the_same_global_batches():
    plan = _plan()
    assert plan.mixup_group == 4 and plan.steps_per_epoch == 31
    for epoch in (0, 7):
        want = [plan.samples(epoch, s) for s in range(plan.steps_per_epoch)]
        assert sorted(i for b in want for i in b) == sorted(plan.order(epoch)[:31 * 32])  # each sample once
        for world in (1, 2, 4, 8):
            samplers = [PlanSampler(plan, r, world) for r in range(world)]
            for s in samplers:
                s.set_epoch(epoch)
            got = [[item[3] for batch in step for item in batch] for step in zip(*samplers)]
            assert got == want
    assert plan.samples(0, 0) != plan.samples(1, 0)                     # reshuffled every epoch
    assert plan.check_world(16) == 2        # 2 per rank < group of 4: the partner from the other rank is loaded
    with pytest.raises(ValueError, match="does not divide"):
        plan.check_world(3)


def test_step_draws_follow_the_recipe():
    plan = _plan(num_samples=32 * 400)
    recs = [plan.step_record(e, s) for e in (5, 20) for s in range(400)]
    mixed = [r for r in recs if r.mixup]
    assert 0.42 < len(mixed) / len(recs) < 0.58 and all(0.45 <= r.beta <= 0.55 for r in mixed)
    sizes = [r.size for r in recs]
    assert set(sizes) == set(plan.scales) and 0.2 < sizes.count(640) / len(sizes) < 0.37    # 4 of 14
    assert not any(plan.step_record(30, s).mixup for s in range(50))   # mixup epochs [4, 29)
    assert all(plan.step_record(2, s).size in plan.scales for s in range(50))
    late = [plan.step_record(55, s) for s in range(50)]                # multi-scale stops at 50
    assert all(not r.resized and r.size == 640 for r in late)
    assert plan.step_record(5, 3) == plan.step_record(5, 3)
    a, b = plan.aug_record(5, 7, {"width": 64, "height": 48, "boxes": [[1, 1, 20, 20]]}), \
        plan.aug_record(6, 7, {"width": 64, "height": 48, "boxes": [[1, 1, 20, 20]]})
    assert a.epoch == 5 and b.epoch == 6 and a.to_dict() != b.to_dict()   # fresh draw each epoch


def test_group_mixup_is_the_same_bits_on_any_split():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 6, 6, generator=g)
    targets = [{"boxes": torch.rand(1, 4, generator=g), "labels": torch.tensor([i]), "key": f"k{i}"} for i in range(8)]
    rec = BatchRecord(epoch=5, size=6, resized=False, mixup=True, beta=0.4731, indices=list(range(8)), keys=[],
                      group=4)
    whole, t_whole = apply_batch_record(rec, images.clone(), targets)
    halves = [apply_batch_record(rec, images[i:i + 4].clone(), targets[i:i + 4]) for i in (0, 4)]
    assert torch.equal(whole, torch.cat([h[0] for h in halves]))
    assert [t["mixup_key"] for t in t_whole] == ["k3", "k0", "k1", "k2", "k7", "k4", "k5", "k6"]


def test_plan_identity_and_world_sizes():
    a, b = _plan(), _plan()
    assert a.hash() == b.hash()
    assert len({a.hash(), _plan(seed=1).hash(), _plan(global_batch=64).hash(), _plan(mixup_group=2).hash(),
                _plan(num_samples=999).hash()}) == 5
    # L and X differ in their multi-scale list (640 four vs three times), so in their plans
    x = TrainPlan.from_recipe(resolve_recipe("x"), 1000, 32)
    assert x.hash() != a.hash() and x.scales.count(640) == 3
    b.check_world(2), b.check_world(16)                  # the same plan on any world size dividing the batch
    with pytest.raises(ValueError, match="does not divide"):
        b.check_world(3)
