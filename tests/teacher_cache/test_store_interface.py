"""Both store kinds behind one interface: open_store picks the kind from the manifest; teacher and
plan checks name the field; coverage, join and view_args serve the trainer without asking the kind."""
import numpy as np
import pytest
import torch

from pipeline.data.plan import TrainPlan
from pipeline.train.recipe import resolve_recipe
from teacher_cache.exact import ExactStore
from teacher_cache.layout import StoreError, StoreMismatch
from teacher_cache.quantize import encode
from teacher_cache.store import Store
from teacher_cache.stores import open_store
from teacher_cache.views import ViewPlan

TEACHER = {"name": "t", "arch": "a", "embed_dim": 8, "weights_sha256": "w" * 64, "weights_source": "random-init",
           "protocol": {"precision": "bf16"}}


def _plan(**kw):
    return TrainPlan.from_recipe(resolve_recipe("l", 4), 8, 4, base_size=64, dataset_hash="d", **kw)


def _exact(tmp_path, plan):
    store = ExactStore.create(str(tmp_path / "exact"), teacher=TEACHER, plan=plan.to_dict(), plan_hash=plan.hash(),
                              epochs=plan.epochs, steps_per_epoch=plan.steps_per_epoch, global_batch=4,
                              dataset_hash="d", keys=[f"k{i}" for i in range(8)], grids=plan.grids(),
                              steps_per_block=2)
    views = []
    for step in range(2):
        grid = plan.grid(0, step)
        tokens, scale = encode(torch.randn(4, 8, *grid, generator=torch.Generator().manual_seed(step)), "int8")
        views += [(step, k, i, tokens[k].numpy(), scale[k].numpy(), grid) for k, i in enumerate(plan.samples(0, step))]
    store.write_block(0, 0, views)
    return store


def _budget(tmp_path, plan):
    store = Store.create(str(tmp_path / "budget"), teacher=TEACHER, plan=ViewPlan(k=1, epochs=plan.policy.epochs,
                         input_size=(64, 64)), dataset_hash="d", keys=[f"k{i}" for i in range(8)], grid=(2, 2),
                         shard_size=8, extra={"policy": plan.policy.to_dict()})
    tokens, scale = encode(torch.randn(8 * store.num_views, 8, 2, 2), "int8")
    store.write_shard(0, tokens.reshape(8, store.num_views, 4, 8).numpy(), scale.reshape(8, store.num_views, 4).numpy())
    return store


def test_open_store_returns_the_kind_its_manifest_declares(tmp_path):
    plan = _plan()
    for made in (_exact(tmp_path, plan), _budget(tmp_path, plan)):
        store = open_store(made.url)
        assert type(store) is type(made) and store.dim == 8 and store.precision == "bf16"
        store.check_teacher(TEACHER)
        with pytest.raises(StoreMismatch, match="teacher \\(weights_sha256"):
            store.check_teacher({**TEACHER, "weights_sha256": "x" * 64})
        store.check_plan(plan)
        other = TrainPlan.from_recipe(resolve_recipe("l", 4), 8, 4, base_size=96, dataset_hash="d")
        with pytest.raises(StoreMismatch, match="64"):          # another image size: named
            store.check_plan(other)
        assert "epoch 0" in store.coverage(0) or "shards complete" in store.coverage(0)
        assert store.describe().startswith(("exact", "budget"))


def test_exact_check_plan_names_the_differing_fields(tmp_path):
    store = _exact(tmp_path, _plan())
    with pytest.raises(StoreMismatch, match="seed 0; this run has seed 3"):
        store.check_plan(_plan(seed=3))


def test_join_serves_both_kinds_as_target_dicts(tmp_path):
    plan = _plan()
    exact, budget = _exact(tmp_path, plan), _budget(tmp_path, plan)
    items = [(0, 0, k, i) for k, i in enumerate(plan.samples(0, 0))] + [(1, 0, 0, plan.samples(1, 0)[0])]
    got = exact.join(strict=False)(items)
    assert all("teacher_tokens" in g and g["teacher_grid"] == plan.grid(0, 0) for g in got[:4])
    assert got[4]["teacher_miss"] == "missing"                     # epoch 1 not written
    with pytest.raises(StoreError, match="--strict-cache"):
        exact.join(strict=True)(items)
    assert exact.view_args(0, 1) is None                           # the plan's own record
    got = budget.join(strict=False)(items)
    assert all(g["teacher"].shape == (8, 2, 2) for g in got)
    assert budget.view_args(0, 1) == budget.plan.record_args(budget.plan.view_for(0, 1))   # the replayed view
    assert np.isfinite(got[0]["teacher"].numpy()).all()


def test_one_message_for_a_missing_manifest(tmp_path):
    messages = set()
    for open_ in (open_store, ExactStore.open, Store.open):
        with pytest.raises(StoreError) as e:
            open_(str(tmp_path / "nothing"))
        messages.add(str(e.value))
    assert len(messages) == 1 and "manifest.json missing" in messages.pop()
