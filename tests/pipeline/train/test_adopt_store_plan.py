"""A run adopts the plan its teacher store records: flags left out take the store's values, a flag
that contradicts the store is refused by name; without --cache a matching store in cache/ is found."""
import logging

import pytest

from jobs.train import parse_args
from pipeline.train.config import DEMO, PLAN_FIELDS, TrainConfig
from pipeline.train.data import adopt_store_plan, find_store, plan_fields, process_batch
from pipeline.train.recipe import recipe_from_config
from teacher_cache.exact import ExactStore
from teacher_cache.store import Store
from teacher_cache.views import ViewPlan

TEACHER = {"name": "dinov3_vits", "arch": "vit_small_patch16_dinov3", "embed_dim": 8, "weights_sha256": "w" * 64,
           "weights_source": "random-init", "protocol": {"precision": "fp32"}}
RECORDED = {"size": "s", "epochs": 3, "img_size": 96, "seed": 5, "train_split": "train", "data": None,
            "mixup_group": 4, "global_batch": 4, "max_steps_per_epoch": 2}


def exact_store(url, run_plan=RECORDED, teacher=TEACHER):
    return ExactStore.create(str(url), teacher=teacher, plan={"p": 1}, plan_hash="h", epochs=run_plan["epochs"],
                             steps_per_epoch=2, global_batch=run_plan["global_batch"], dataset_hash="d",
                             keys=["a", "b", "c", "d"], grids=[(3, 3)], extra={"run_plan": run_plan})


def test_only_cache_adopts_the_store_plan_on_any_world_size(tmp_path):
    url = exact_store(tmp_path / "s").url
    cfg = adopt_store_plan(parse_args(["--cache", url, "--vfm", "dinov3_vits"]), 2)
    assert {k: getattr(cfg, k) for k in PLAN_FIELDS} == RECORDED
    recipe = recipe_from_config(cfg)
    assert recipe.epochs == 3 and cfg.size == "s"
    # one global batch of 4, whatever the world size: 4 x 1 or 2 x 2, the same plan
    assert [process_batch(cfg, recipe, w) for w in (1, 2, 4)] == [4, 2, 1]
    assert plan_fields(cfg, 1) == plan_fields(cfg, 2) == RECORDED
    # flags that agree with the store are fine, per-process --batch-size included
    same = adopt_store_plan(parse_args(["--cache", url, "--img-size", "96", "--batch-size", "2", "--size", "s"]), 2)
    assert same.img_size == 96 and same.seed == 5 and process_batch(same, recipe, 2) == 2


def test_a_flag_that_contradicts_the_store_is_refused_by_name(tmp_path):
    url = exact_store(tmp_path / "s").url
    with pytest.raises(ValueError, match=r"built for img_size 96, seed 5; this run has img_size 640, seed 0: drop"):
        adopt_store_plan(parse_args(["--cache", url, "--img-size", "640", "--seed", "0"]), 1)
    with pytest.raises(ValueError, match="global_batch 4; this run has global_batch 6"):
        adopt_store_plan(parse_args(["--cache", url, "--batch-size", "3"]), 2)
    # a configuration built in code: fields that differ from their defaults count as given
    with pytest.raises(ValueError, match="epochs 3; this run has epochs 7"):
        adopt_store_plan(TrainConfig(cache=url, epochs=7), 1)


def test_budget_store_plan_is_adopted_too(tmp_path):
    plan = {"size": "m", "epochs": 6, "img_size": 128, "train_split": "train", "data": None}
    store = Store.create(str(tmp_path / "b"), teacher={**TEACHER, "embed_dim": 8}, plan=ViewPlan(k=1, epochs=(1, 2, 3)),
                         dataset_hash="d", keys=["a", "b"], grid=(4, 4), extra={"run_plan": plan})
    cfg = adopt_store_plan(parse_args(["--cache", store.url, "--seed", "3", "--global-batch", "8"]), 2)
    assert (cfg.size, cfg.epochs, cfg.img_size, cfg.seed, cfg.global_batch) == ("m", 6, 128, 3, 8)
    with pytest.raises(ValueError, match="img_size 128; this run has img_size 640"):
        adopt_store_plan(parse_args(["--cache", store.url, "--img-size", "640"]), 1)


def test_default_lookup_and_cache_none(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    argv = ["--size", "s", "--vfm", "dinov3_vits"]
    cfg = parse_args(argv)     # no --data: the demo plan, as jobs.cache_teacher without --data
    assert (cfg.epochs, cfg.img_size, cfg.global_batch, cfg.max_steps_per_epoch) == \
        (DEMO.epochs, DEMO.img_size, DEMO.global_batch, DEMO.max_steps_per_epoch)
    assert find_store(cfg, 1) is None                                   # no cache/ folder
    exact_store(tmp_path / "cache" / "other", {**plan_fields(cfg, 1), "seed": 1})
    exact_store(tmp_path / "cache" / "wrong_teacher", plan_fields(cfg, 1), {**TEACHER, "name": "dinov3_vitb"})
    with caplog.at_level(logging.INFO, logger="rtdetrv4.train"):
        assert adopt_store_plan(cfg, 1).cache is None                   # neither matches: the online teacher
    assert "no teacher store in cache/ matches" in caplog.text
    exact_store(tmp_path / "cache" / "mine", plan_fields(cfg, 1))
    with caplog.at_level(logging.INFO, logger="rtdetrv4.train"):
        found = adopt_store_plan(cfg, 2)                                # the same plan on 2 ranks: 2 x 2
    assert found.cache == "cache/mine" and "using teacher store cache/mine (matches plan" in caplog.text
    # a store holding 8 steps per epoch serves a run of 3, not one of 9
    assert find_store(parse_args([*argv, "--max-steps-per-epoch", "3"]), 1) == "cache/mine"
    assert find_store(parse_args([*argv, "--max-steps-per-epoch", "9"]), 1) is None
    assert adopt_store_plan(parse_args([*argv, "--cache", "none"]), 1).cache is None
    assert adopt_store_plan(parse_args([*argv, "--distill", "none"]), 1).cache is None
    assert adopt_store_plan(TrainConfig(size="s", vfm="dinov3_vits"), 1).cache is None   # code: no lookup


def test_global_batch_errors_name_the_flags():
    recipe = recipe_from_config(TrainConfig(size="s"))
    assert process_batch(TrainConfig(size="s"), recipe, 8) == 4                # the recipe's 32 over 8
    with pytest.raises(ValueError, match="--global-batch.*--nproc_per_node"):
        process_batch(TrainConfig(size="s", global_batch=4), recipe, 3)
    with pytest.raises(ValueError, match=r"--batch-size 2 per process x 2 process\(es\) is 4, but --global-batch is 8"):
        process_batch(TrainConfig(size="s", batch_size=2, global_batch=8), recipe, 2)
