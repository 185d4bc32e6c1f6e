"""--recipe rt-co-detr: alone it is the paper (student, pairing, class map, teacher size, optimizer,
schedule, batch, augmentation of each stage) and the start-up summary says so; every departure is a
flag and is printed; without the recipe, --distill codetr says which recipe it runs; the multi-step
and plateau schedules."""
import argparse
import logging

import pytest
import torch

from pipeline.train.config import TrainConfig, add_config_flags, config_from_args
from pipeline.train.data import process_batch
from pipeline.train.optim import MultiStepSchedule, PlateauSchedule, build_optimizer, build_schedule, param_groups
from pipeline.train.recipe import recipe_from_config, resolve_recipe
from pipeline.train.rt_co_detr import resolve_preset

PATHS = ("--teacher-checkpoint", "weights/conditional-detr-r50", "--student-weights", "weights/rtdetr_v2_r50vd")


def _cfg(*argv):
    """A command line with --data (the recipe; without it, the demo plan of jobs.train)."""
    argv = list(argv) + ([] if "--data" in argv else ["--data", "data/taco"])
    return config_from_args(add_config_flags(argparse.ArgumentParser()).parse_args(argv))


def _stage(cfg, stage):
    """The configuration, recipe and summary of one stage, as the trainer resolves them."""
    from dataclasses import replace
    resolved, preset = resolve_preset(replace(cfg, stage=stage))
    return resolved, recipe_from_config(resolved), "\n".join(preset.summary_lines("fp32"))


def test_recipe_alone_is_the_paper():
    cfg, preset = resolve_preset(_cfg("--recipe", "rt-co-detr", *PATHS))
    assert (cfg.distill, cfg.stage, cfg.student, cfg.pairing, cfg.class_map, cfg.teacher_input_size) == \
        ("codetr", "both", "rtdetrv2_r50", "index", "slice", 640)

    cfg1, r, summary = _stage(cfg, "distill")      # src/distillation/trainer_codetr.py
    assert not cfg1.det_loss and cfg1.patience == 12
    assert (r.lr, r.backbone_lr, r.weight_decay, r.epochs, process_batch(cfg1, r, 8), r.schedule, r.lr_gamma,
            r.plateau_patience, r.monitor) == (5e-5, 5e-5, 1e-4, 50, 4, "plateau", 0.2, 5, "kd_loss")
    assert (r.ema, r.warmup_iter, r.clip_max_norm, cfg1.img_size) == (False, 0, 0.0, 640)
    assert (r.augment, r.flip_prob, r.policy_epochs, r.stop_epoch, r.mixup_prob, r.mosaic_prob) == \
        ("none", 0.0, (0, 0, 0), 0, 0.0, 0.0)                   # T.Resize((640, 640)) only
    groups = param_groups([("model.model.backbone.w", torch.nn.Parameter(torch.zeros(1))),
                           ("codetr.feature_proj.0.weight", torch.nn.Parameter(torch.zeros(1)))], r)
    assert len(groups) == 1                                     # one AdamW group, projections included
    for text in ("stage distill", "student rtdetrv2_r50", "pairing index", "classes slice", "teacher input 640",
                 "AdamW lr 5e-05 (one group)", "weight decay 0.0001", "epochs 50", "batch 4 per GPU",
                 "plateau x0.2 after 5 epochs", "monitor val distillation loss", "early stop 12 epochs", "EMA off",
                 "augmentation none", "labels unused", "loss weights feat 1, cls 0.8, box 1.2, temperature 4"):
        assert text in summary, text
    assert "DEPARTS" not in summary

    cfg2, r, summary = _stage(cfg, "finetune")     # templates/rtdetrv2_taco_finetune_distilled.yml.template
    assert cfg2.det_loss and cfg2.patience is None
    assert (r.lr, r.backbone_lr, r.encoder_lr, r.weight_decay, r.epochs, process_batch(cfg2, r, 2), r.schedule,
            r.milestones, r.lr_gamma, r.monitor, r.ema) == (1e-4, 1e-5, 1e-5, 1e-4, 50, 8, "multistep", (40,), 0.1,
                                                            "ap", False)
    assert (r.augment, r.flip_prob, r.policy_epochs, r.stop_epoch, r.mixup_prob, r.mosaic_prob, r.base_size_repeat) \
        == ("rtdetrv2", 0.5, (0, 0, 50), 50, 0.0, 0.0, 3)
    for text in ("stage finetune", "AdamW lr 0.0001, backbone 1e-05, encoder 1e-05", "batch 16 in total",
                 "multistep x0.1 at epochs [40]", "augmentation rtdetrv2"):
        assert text in summary, text
    assert summary.count("DEPARTS") == 1 and "DEPARTS --amp -> precision fp32 (paper: fp16 amp)" in summary

    assert resolve_preset(cfg1)[0] == cfg1 and resolve_preset(cfg2)[0] == cfg2   # idempotent
    assert resolve_preset(_cfg("--recipe", "rt-co-detr", "--distill", "none", "--student-weights", "S"))[0].stage == \
        "finetune"                                                                # the baseline


def test_feature_ablation_stages():
    cfg = _cfg("--recipe", "rt-co-detr", "--distill", "feat", "--vfm", "dinov3_convnext_base", "--student-weights", "S")
    cfg1, r, _ = _stage(cfg, "distill")             # trainer_convnext.py
    assert (r.lr, r.weight_decay, process_batch(cfg1, r, 1), r.lr_gamma, r.plateau_patience, cfg1.patience) == \
        (1e-4, 1e-5, 16, 0.1, 3, 7)
    assert (_stage(cfg, "finetune")[1].encoder_lr, _stage(cfg, "finetune")[1].backbone_lr) == (5e-5, 1e-5)
    vit = _stage(_cfg("--recipe", "rt-co-detr", "--distill", "feat", "--vfm", "dinov3_vitb", "--student-weights", "S"),
                 "finetune")[1]
    assert (vit.lr, vit.backbone_lr, vit.encoder_lr) == (2e-5, 2e-5, 2e-5)


def test_every_departure_is_a_flag_and_is_printed():
    cfg = _cfg("--recipe", "rt-co-detr", *PATHS, "--stage", "distill", "--pairing", "hungarian", "--class-map", "name",
               "--teacher-input-size", "0", "--lr", "1e-4", "--weight-decay", "0.05", "--schedule", "multistep",
               "--ema", "--epochs", "10", "--batch-size", "2", "--augment", "rtdetrv4", "--img-size", "320",
               "--lambda-cls", "0.5", "--patience", "3", "--student", "rtdetrv4", "--finetune", "coco.pth")
    cfg, r, summary = _stage(cfg, "distill")
    assert (cfg.pairing, cfg.class_map, cfg.teacher_input_size, cfg.patience, cfg.student) == \
        ("hungarian", "name", 0, 3, "rtdetrv4")
    assert (r.lr, r.weight_decay, r.schedule, r.ema, r.epochs, r.augment) == (1e-4, 0.05, "multistep", True, 10,
                                                                             "rtdetrv4")
    assert r.ema_restart_decay > 0 and r.mosaic_prob == 0.5
    for flag in ("--pairing -> pairing hungarian (paper: index)", "--class-map -> classes name (paper: slice)",
                 "--teacher-input-size -> teacher input preprocessor's (paper: 640)",
                 "--lr -> optimizer AdamW lr 0.0001", "--weight-decay -> weight decay 0.05", "--schedule -> schedule "
                 "multistep", "--ema -> EMA on", "--epochs -> epochs 10", "--batch-size / --global-batch -> batch 2 per process",
                 "--augment -> augmentation rtdetrv4", "--img-size -> image size 320", "--lambda-feat/-cls/-box",
                 "--patience -> early stop 3 epochs", "--student -> student rtdetrv4"):
        assert f"DEPARTS {flag}" in summary, flag
    joint = _stage(_cfg("--recipe", "rt-co-detr", *PATHS), "joint")[2]
    assert "DEPARTS --stage joint -> labels detection loss on (paper: unused)" in joint


def test_distill_codetr_without_recipe_says_which_recipe():
    cfg, preset = resolve_preset(_cfg("--distill", "codetr", "--teacher-checkpoint", "T", "--size", "s"))
    assert (cfg.student, cfg.pairing, cfg.teacher_input_size) == ("rtdetrv4", "hungarian", None)
    text = "\n".join(preset.summary_lines("fp32"))
    assert "--distill codetr without --recipe runs the RT-DETRv4 recipe of --size s (AdamW lr 0.0004, 132" in text
    assert "--recipe rt-co-detr runs the RT-CO-DETR paper's" in text
    assert recipe_from_config(cfg) == resolve_recipe("s")       # RT-DETRv4 unchanged
    assert recipe_from_config(TrainConfig(size="s")) == resolve_recipe("s")


def test_random_student_stops_unless_asked(caplog):
    with pytest.raises(ValueError, match=r"pass --student-weights DIR.*PekingU/rtdetr_v2_r50vd.*--random-student"):
        resolve_preset(_cfg("--recipe", "rt-co-detr", "--teacher-checkpoint", "T"))
    with pytest.raises(ValueError, match="--finetune an RT-DETRv4 checkpoint"):
        resolve_preset(_cfg("--recipe", "rt-co-detr", "--teacher-checkpoint", "T", "--student", "rtdetrv4"))
    with caplog.at_level(logging.WARNING):
        cfg, _ = resolve_preset(_cfg("--recipe", "rt-co-detr", "--teacher-checkpoint", "T", "--random-student",
                                     "--stage", "distill"))
    assert "RANDOM WEIGHTS" in caplog.text
    assert "DEPARTS --random-student -> init RANDOM" in _stage(cfg, "distill")[2]
    with pytest.raises(ValueError, match="--stage both is a stage of --recipe rt-co-detr"):
        resolve_preset(_cfg("--stage", "both"))
    with pytest.raises(ValueError, match="DSI \\+ GAM is RT-DETRv4's"):
        resolve_preset(_cfg("--recipe", "rt-co-detr", "--distill", "dsi", "--student-weights", "S"))


def test_jobs_train_refuses_a_random_student_in_one_line(capsys):
    from jobs.train import main
    assert main(["--recipe", "rt-co-detr", "--teacher-checkpoint", "T"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jobs.train: error: --recipe rt-co-detr fine-tunes") and "\n" not in err


def test_finetune_groups_on_transformers_names():
    """The authors' '^(?=.*backbone)' / '^(?=.*encoder)' groups on transformers' names: the backbone's
    own 'encoder' stays in the backbone group, the decoder's cross-attention (encoder_attn) in the rest."""
    r = resolve_recipe("l", name="rt-co-detr", stage="finetune")
    names = ["model.model.backbone.model.encoder.stages.0.layers.0.convolution.weight",
             "model.model.encoder.aifi.0.layers.0.fc1.weight", "model.model.encoder_input_proj.0.0.weight",
             "model.model.decoder.layers.0.encoder_attn.value_proj.weight", "model.model.enc_score_head.weight",
             "codetr.feature_proj.0.weight"]
    groups = param_groups([(n, torch.nn.Parameter(torch.zeros(1))) for n in names], r)
    assert {g["name"]: (g["param_names"], g.get("lr")) for g in groups} == {
        "backbone": ([names[0]], 1e-5), "encoder": (names[1:3], 1e-5), "rest": (names[3:], None)}


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
    assert resolve_recipe("l", 10, "rt-co-detr", stage="finetune").milestones == (8,)   # epoch 40 of 50, scaled


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
