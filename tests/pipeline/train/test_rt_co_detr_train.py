"""RT-CO-DETR in the trainer: a transformers Conditional-DETR teacher into RT-DETRv4-S and into
the RT-DETRv2-R50vd student, the whole --recipe rt-co-detr (two stages) on the TACO sample, and the
feature-only DINOv3 ablation's two stages."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from pipeline.train.trainer import TrainConfig, Trainer  # noqa: E402


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection
    names = {i: "N/A" for i in range(91)}
    names.update({1: "person", 44: "green square", 47: "cyan ring"})   # two synthetic classes have partners
    cfg = ConditionalDetrConfig(backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, d_model=32,
                                encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=20,
                                num_labels=91, id2label=names)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("conditional_detr")
    ConditionalDetrForObjectDetection(cfg).save_pretrained(path)
    return path


def _trainer(tmp_path, **kw) -> Trainer:
    """A short run of --recipe rt-co-detr; these tests depart from it (student, stage, random init)."""
    cfg = TrainConfig(**{"size": "s", "epochs": 2, "img_size": 128, "batch_size": 2, "workers": 0,
                         "out": str(tmp_path), "max_steps_per_epoch": 2, "recipe": "rt-co-detr",
                         "random_student": True, **kw})
    return Trainer(cfg)


def _step(trainer):
    images, targets, batch = next(iter(trainer.data.train_loader(0)))
    return trainer.train_step(images, targets, batch)


def _check_distilled(trainer, losses, feat_only=False):
    kd = ["loss_kd_feat"] if feat_only else ["loss_kd_logit", "loss_kd_box", "loss_kd_feat"]
    assert losses is not None and set(kd) <= set(losses)
    assert all(math.isfinite(losses[k].item()) and losses[k].item() > 0 for k in kd)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainer.student.codetr.parameters())
    assert not any(p.requires_grad for p in trainer.distill.teacher.parameters())


def test_transformers_teacher_into_rtdetrv4_s(tmp_path, teacher_dir):
    trainer = _trainer(tmp_path, teacher_checkpoint=str(teacher_dir), student="rtdetrv4", stage="joint",
                       class_map="name", pairing="hungarian")
    assert trainer.student.codetr.cfg.class_map == {44: 1, 47: 5}          # by name
    assert [p.out_channels for p in trainer.student.codetr.feature_proj] == [128, 256, 512]   # C3-C5
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 5e-5 and len(trainer.optimizer.param_groups) == 1
    losses = _step(trainer)
    _check_distilled(trainer, losses)
    assert "loss_mal" in losses                                              # the detection loss stays on


def test_transformers_teacher_into_rtdetrv2_r50(tmp_path, teacher_dir):
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        trainer = _trainer(tmp_path, teacher_checkpoint=str(teacher_dir), stage="joint", lambda_cls=0.5,
                           temperature=2.0)
    assert trainer.student.codetr.cfg.class_map == {k: k for k in range(6)}   # the paper's slice
    assert trainer.student.codetr.cfg.pairing == "index"
    assert (trainer.student.codetr.cfg.logit_weight, trainer.student.codetr.cfg.temperature) == (0.5, 2.0)
    losses = _step(trainer)
    _check_distilled(trainer, losses)
    assert "loss_vfl" in losses and "loss_vfl_dn_0" in losses                # its own criterion
    stats = trainer.evaluate()                                               # our postprocessor + COCO eval
    assert 0.0 <= stats["AP"] <= 1.0


@pytest.mark.slow
def test_whole_preset_two_stages_on_taco(tmp_path, teacher_dir, taco_dir, caplog):
    """--recipe rt-co-detr with nothing but the paths, 2 steps per stage on the TACO sample: stage 1
    distils (labels unused, the student's own COCO head, the paper's settings), exports the best student,
    stage 2 fine-tunes it on the 60 classes; stages.json reports both."""
    import json
    import logging

    from pipeline.train.rt_co_detr import run_training
    from tiny_rtdetrv2 import tiny_student_dir

    weights = tiny_student_dir(tmp_path / "coco_student", num_classes=80)
    cfg = TrainConfig(recipe="rt-co-detr", teacher_checkpoint=str(teacher_dir), student_weights=str(weights),
                      data=str(taco_dir), train_split="val", epochs=1, max_steps_per_epoch=2, eval_max_images=4,
                      workers=0, out=str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="rtdetrv4.train"):
        record = run_training(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "stages.json").read_text()) == {k: record[k] for k in ("distill", "finetune")}
    assert math.isfinite(record["distill"]["kd_loss"]) and record["distill"]["kd_loss"] > 0
    assert 0.0 <= record["finetune"]["AP"] <= 1.0 and record["finetune"]["epochs"] == 1

    assert (run / "distill" / "best.pth").is_file()                         # the lowest val distillation loss
    first = json.loads((run / "distill" / "config.json").read_text())
    assert (first["config"]["pairing"], first["config"]["class_map"], first["config"]["teacher_input_size"],
            first["config"]["det_loss"], first["config"]["img_size"]) == ("index", "slice", 640, False, 640)
    assert (first["recipe"]["lr"], first["recipe"]["weight_decay"], first["recipe"]["augment"]) == (5e-5, 1e-4, "none")
    steps = [json.loads(line) for line in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(k for k in s if k.startswith("loss")) == {"loss", "loss_kd_logit", "loss_kd_box", "loss_kd_feat"}
               for s in steps)                                               # no detection loss in stage 1
    exported = json.loads((run / "distill" / "student" / "config.json").read_text())
    assert len(exported["id2label"]) == 80 and exported["id2label"]["0"] == "coco_0"   # its COCO head was kept

    second = json.loads((run / "finetune" / "config.json").read_text())
    assert second["config"]["student_weights"] == str(run / "distill" / "student")
    assert (second["recipe"]["lr"], second["recipe"]["encoder_lr"], second["recipe"]["schedule"]) == \
        (1e-4, 1e-5, "multistep")
    best = torch.load(run / "finetune" / "best.pth", map_location="cpu", weights_only=False)
    assert best["num_classes"] == 60 and best["ema"]["module"]["model.model.enc_score_head.weight"].shape[0] == 60
    assert "as the paper: student rtdetrv2_r50 | init trained weights | pairing index | classes slice | " \
           "teacher input 640" in caplog.text
    assert "batch 4 per GPU" in caplog.text and "batch 16 in total" in caplog.text


@pytest.mark.parametrize("vfm,levels", [("timm:convnext_atto", 3), ("dinov3_vits", 1)])
def test_feature_only_ablation_two_stages(tmp_path, vfm, levels):
    """The feature-only ablation as the authors ran it, one command: mimic the VFM teacher without labels
    (only the feature term), then fine-tune; both stages reported."""
    import json

    from pipeline.train.rt_co_detr import run_training
    from tiny_rtdetrv2 import tiny_student_dir

    weights = tiny_student_dir(tmp_path / "coco_student", num_classes=80, num_queries=60)   # 6 classes x 60 > top 300
    cfg = TrainConfig(recipe="rt-co-detr", distill="feat", vfm=vfm, student_weights=str(weights), epochs=1,
                      max_steps_per_epoch=2, batch_size=2, img_size=128, eval_max_images=4, workers=0,
                      out=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        record = run_training(cfg)
    assert set(record) == {"distill", "finetune", "out"}
    assert math.isfinite(record["distill"]["kd_loss"]) and 0.0 <= record["finetune"]["AP"] <= 1.0
    steps = [json.loads(line) for line in (tmp_path / "run" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(k for k in s if k.startswith("loss")) == {"loss", "loss_kd_feat"} for s in steps)
    state = torch.load(tmp_path / "run" / "distill" / "last.pth", map_location="cpu", weights_only=False)
    assert len([k for k in state["codetr"] if k.endswith("weight")]) == levels
    recipe = json.loads((tmp_path / "run" / "distill" / "config.json").read_text())["recipe"]
    assert (recipe["lr"], recipe["weight_decay"]) == (1e-4, 1e-5)               # trainer_convnext / trainer_vit


@pytest.mark.slow
def test_two_gloo_ranks_run_both_stages_with_one_set_of_weights(tmp_path):
    """Under torchrun the label-free stage leaves the class heads (and under --distill feat the decoder)
    without gradient and calls the projections outside the DDP forward: both stages still train, and
    every rank holds the same weights at each epoch end."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from tiny_rtdetrv2 import tiny_student_dir

    weights = tiny_student_dir(tmp_path / "coco_student", num_classes=80, num_queries=60)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "jobs.train", "--recipe", "rt-co-detr", "--distill", "feat", "--vfm", "timm:convnext_atto",
           "--student-weights", str(weights), "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "2",
           "--img-size", "128", "--eval-max-images", "4", "--workers", "0", "--device", "cpu",
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[3], env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("distill", "finetune"):
        rows = [json.loads(line) for line in (tmp_path / "run" / stage / "eval.jsonl").read_text().splitlines()]
        assert all(len(r["weights_sha256_per_rank"]) == 2 and len(set(r["weights_sha256_per_rank"])) == 1
                   for r in rows)
    assert (tmp_path / "run" / "distill" / "best.pth").is_file() and (tmp_path / "run" / "stages.json").is_file()


def test_two_stage_run_resumes_where_it_stopped(tmp_path):
    """--resume OUT of a two-stage run: a finished stage is not trained again, a stopped one continues from
    its last.pth, and the report is rebuilt."""
    import json
    import shutil
    from dataclasses import replace

    from pipeline.train.rt_co_detr import run_training
    from tiny_rtdetrv2 import tiny_student_dir

    weights = tiny_student_dir(tmp_path / "coco_student", num_classes=80, num_queries=60)
    run = tmp_path / "run"
    cfg = TrainConfig(recipe="rt-co-detr", distill="feat", vfm="timm:convnext_atto", student_weights=str(weights),
                      epochs=1, max_steps_per_epoch=2, batch_size=2, img_size=128, eval_max_images=4, workers=0,
                      out=str(run))
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        record = run_training(cfg)
    steps = {s: (run / s / "metrics.jsonl").read_text() for s in ("distill", "finetune")}
    (run / "stages.json").write_text(json.dumps({"distill": record["distill"]}))   # killed in stage 2 ...
    shutil.rmtree(run / "finetune")                                               # ... before its first epoch end
    again = run_training(replace(cfg, out=None, resume=str(run)))                   # no teacher: no warning
    assert (run / "distill" / "metrics.jsonl").read_text() == steps["distill"]       # stage 1 not trained again
    assert again["distill"] == record["distill"] and again["finetune"]["epochs"] == 1
    steps["finetune"] = (run / "finetune" / "metrics.jsonl").read_text()
    (run / "stages.json").unlink()                                                # killed after both last.pth
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        third = run_training(replace(cfg, out=None, resume=str(run)))
    assert {s: (run / s / "metrics.jsonl").read_text() for s in steps} == steps   # both continue at their end
    assert third["distill"] == record["distill"] and third["finetune"] == again["finetune"]
    with pytest.raises(FileNotFoundError, match="not a two-stage run directory"):
        run_training(replace(cfg, out=None, resume=str(run / "distill")))
