"""View plan: exact layout, deterministic mapping, every cached view used, stable hash."""
import pytest

from teacher_cache.views import ViewPlan


def test_layout_and_record_args():
    plan = ViewPlan(seed=3, k=4, epochs=(4, 29, 50))
    assert plan.num_views == 2 + 4 * 2
    assert plan.record_args(0) == {"kind": "plain", "flip": False}
    assert plan.record_args(1) == {"kind": "plain", "flip": True}
    phase2 = [plan.record_args(v) for v in range(2, 6)]
    phase3 = [plan.record_args(v) for v in range(6, 10)]
    assert [a["phase"] for a in phase2] == [2] * 4 and [a["phase"] for a in phase3] == [3] * 4
    assert [a["epoch"] for a in phase2] == [4, 10, 16, 22]  # spread over [4, 29)
    assert all(a["seed"] == 3 for a in phase2 + phase3)
    assert all(plan.phase(a["epoch"]) == a["phase"] for a in phase2 + phase3)
    with pytest.raises(IndexError):
        plan.record_args(10)


def test_more_views_than_epochs_draw_new_rounds():
    plan = ViewPlan(seed=0, k=3, epochs=(0, 2, 2))  # phase 2 has 2 epochs, phase 3 none
    assert plan.num_views == 5
    args = [plan.record_args(v) for v in range(2, 5)]
    assert [(a["epoch"], a["seed"] != 0) for a in args] == [(0, False), (1, False), (0, True)]
    assert len({(a["epoch"], a["seed"]) for a in args}) == 3


def test_view_for_is_deterministic_and_covers_the_phase():
    plan = ViewPlan(seed=1, k=4, epochs=(4, 29, 50))
    for index in range(20):
        views = [plan.view_for(e, index) for e in range(4, 8)]  # 4 consecutive phase-2 epochs
        assert sorted(views) == [2, 3, 4, 5]  # each cached view once
        assert all(plan.view_for(e, index) in (0, 1) for e in (0, 1, 2, 3, 50, 51))
        assert all(6 <= plan.view_for(e, index) < 10 for e in range(29, 50))
    assert [plan.view_for(e, 7) for e in range(60)] == [plan.view_for(e, 7) for e in range(60)]
    flips = [plan.view_for(0, i) for i in range(400)]
    assert 150 < sum(flips) < 250  # plain epochs: flip about half the time


def test_hash_identity():
    a, b = ViewPlan(seed=0, k=4), ViewPlan(seed=0, k=4)
    assert a.hash() == b.hash() and ViewPlan.from_dict(a.to_dict()) == a
    assert len({ViewPlan(seed=1, k=4).hash(), ViewPlan(k=5).hash(), a.hash(),
                ViewPlan(k=4, input_size=(512, 512)).hash(), ViewPlan(k=4, epochs=(4, 64, 120)).hash()}) == 5
