"""jobs.cache_teacher takes jobs.train's plan flags and records them in the store: the default store
is found by jobs.train without --cache, and --cache STORE alone gives the store's plan."""
import json

import pytest

from jobs import cache_teacher
from jobs.train import parse_args
from pipeline.data.load import load_dataset
from pipeline.train.data import adopt_store_plan, build_plan, find_store, plan_fields, process_batch
from pipeline.train.recipe import recipe_from_config
from teacher_cache.stores import open_store

PLAN = ["--size", "s", "--epochs", "1", "--img-size", "64", "--global-batch", "4", "--max-steps-per-epoch", "2"]
TEACHER = ["--vfm", "dinov3_vits"]


def test_store_records_the_plan_and_a_run_adopts_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # the default --out: cache/<vfm>_<size>_<img>_<hash>
    assert cache_teacher.main([*TEACHER, *PLAN, "--model-kwargs", '{"depth": 1}', "--steps-per-block", "2",
                               "--teacher-batch", "4", "--no-ray", "--quiet"]) == 0
    assert "no --data: the embedded data set, demo plan of 1 epochs x 2 steps of 4 images at 64 px" in \
        capsys.readouterr().err
    cfg = parse_args([*TEACHER, *PLAN])
    path = find_store(cfg, 1)
    assert path is not None and path.startswith("cache/dinov3_vits_s_64_")
    store = open_store(path)
    assert store.recorded_plan() == plan_fields(cfg, 1) and store.steps_per_epoch == 2
    assert store.coverage(0) == "1/1 blocks of epoch 0 written"
    # --cache alone: the store's plan, on 1 or 2 processes (a MixUp group of 4 straddles the 2 ranks)
    for world in (1, 2):
        run = adopt_store_plan(parse_args([*TEACHER, "--cache", path]), world)
        assert plan_fields(run, world) == store.recorded_plan()
        recipe = recipe_from_config(run)
        data = load_dataset(run.data, split=run.train_split)
        plan = build_plan(run, recipe, len(data), process_batch(run, recipe, world) * world, data.content_hash())
        store.check_plan(plan)
        assert plan.check_world(world) == 4 // world
    with pytest.raises(ValueError, match="built for seed 0; this run has seed 1"):
        adopt_store_plan(parse_args([*TEACHER, "--cache", path, "--seed", "1"]), 1)
    manifest = json.loads((tmp_path / path / "manifest.json").read_text())
    assert manifest["plan_hash"] == store.plan_hash and manifest["run_plan"]["global_batch"] == 4


def test_batch_size_is_not_the_teacher_batch(capsys):
    with pytest.raises(SystemExit) as e:
        cache_teacher.parse_args(["--batch-size", "8"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
