"""--recipe rt-co-detr, the flags that change it, and the multi-step / plateau schedules."""
import pytest
import torch

from pipeline.train.config import TrainConfig, add_config_flags, config_from_args
from pipeline.train.optim import MultiStepSchedule, PlateauSchedule, build_optimizer, build_schedule
from pipeline.train.recipe import recipe_from_config, resolve_recipe


def _cfg(*argv):
    import argparse
    return config_from_args(add_config_flags(argparse.ArgumentParser()).parse_args(list(argv)))


def test_paper_settings():
    r = resolve_recipe("l", name="rt-co-detr")
    assert (r.lr, r.weight_decay, r.epochs, r.process_batch(8), r.schedule, r.ema) == (5e-5, 1e-4, 50, 16, "plateau", True)
    assert r.warmup_iter == 0
    from detector.rt_co_detr import RTCODETRConfig
    c = RTCODETRConfig()
    assert (c.feature_weight, c.logit_weight, c.box_weight, c.temperature) == (1.0, 0.8, 1.2, 4.0)


def test_flags_change_each_setting():
    cfg = _cfg("--recipe", "rt-co-detr", "--lr", "1e-4", "--weight-decay", "0.05", "--schedule", "multistep",
               "--no-ema", "--epochs", "10", "--lambda-feat", "2", "--lambda-cls", "0.5", "--lambda-box", "3",
               "--temperature", "2", "--no-det-loss", "--class-map", "slice", "--student", "rtdetrv2_r50",
               "--teacher-input-size", "640")
    r = recipe_from_config(cfg)
    assert (r.lr, r.backbone_lr, r.weight_decay, r.schedule, r.ema, r.epochs) == (1e-4, 1e-4, 0.05, "multistep", False, 10)
    assert r.milestones == (7,)                        # 33 of 50 epochs, scaled to 10
    assert (cfg.lambda_feat, cfg.lambda_cls, cfg.lambda_box, cfg.temperature) == (2.0, 0.5, 3.0, 2.0)
    assert (cfg.det_loss, cfg.class_map, cfg.student, cfg.teacher_input_size) == (False, "slice", "rtdetrv2_r50", 640)
    assert _cfg("--class-map", '{"bottle": "Bottle"}').class_map == {"bottle": "Bottle"}
    assert recipe_from_config(TrainConfig(size="s")) == resolve_recipe("s")   # RT-DETRv4 unchanged by default


def _opt(lr=1.0):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_multistep_schedule():
    opt = _opt()
    s = MultiStepSchedule(opt, iters_per_epoch=10, milestones=(2, 4), gamma=0.1)
    lrs = {}
    for it in (0, 19, 20, 39, 40):
        s.step(it)
        lrs[it] = opt.param_groups[0]["lr"]
    assert lrs == pytest.approx({0: 1.0, 19: 1.0, 20: 0.1, 39: 0.1, 40: 0.01})


def test_plateau_schedule_on_val_ap_and_state():
    opt = _opt()
    s = PlateauSchedule(opt, iters_per_epoch=10, factor=0.2, patience=1)
    for ap in (0.1, 0.2, 0.2, 0.15):      # best 0.2, then two epochs without improvement > patience 1
        s.end_epoch(ap)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    s.step(50)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    state = s.state_dict()
    opt2 = _opt()
    s2 = PlateauSchedule(opt2, iters_per_epoch=10, factor=0.2, patience=1)
    s2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.2) and s2.best == 0.2


def test_build_schedule_for_each_kind():
    model = torch.nn.Linear(2, 2)
    for kind in ("flat-cosine", "multistep", "plateau"):
        r = resolve_recipe("s", name="rt-co-detr", schedule=kind)
        opt = build_optimizer(model, r)
        sched = build_schedule(opt, r, 5)
        sched.step(3)
        assert 0.0 < opt.param_groups[0]["lr"] <= 5e-5
