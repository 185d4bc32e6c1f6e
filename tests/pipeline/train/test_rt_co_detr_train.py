"""RT-CO-DETR in the trainer: a transformers Conditional-DETR teacher into RT-DETRv4-S and into
the RT-DETRv2-R50vd student, the authors' two stages, and the feature-only DINOv3 ablation."""
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
    cfg = TrainConfig(**{"size": "s", "epochs": 2, "img_size": 128, "batch_size": 2, "workers": 0,
                         "out": str(tmp_path), "max_steps_per_epoch": 2, "recipe": "rt-co-detr", **kw})
    return Trainer(cfg)


def _step(trainer):
    images, targets, batch = next(iter(trainer.data.train_loader(0)))
    return trainer.train_step(images, targets, batch)


def _check_distilled(trainer, losses, feat_only=False):
    kd = ["loss_kd_feat"] if feat_only else ["loss_kd_logit", "loss_kd_box", "loss_kd_feat"]
    assert losses is not None and set(kd) <= set(losses)
    assert all(math.isfinite(losses[k].item()) and losses[k].item() > 0 for k in kd)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainer.student.codetr.parameters())
    assert not any(p.requires_grad for p in trainer.detector_teacher.parameters())


def test_transformers_teacher_into_rtdetrv4_s(tmp_path, teacher_dir):
    trainer = _trainer(tmp_path, distill="codetr", teacher_checkpoint=str(teacher_dir))
    assert trainer.student.codetr.cfg.class_map == {44: 1, 47: 5}          # by name
    assert [p.out_channels for p in trainer.student.codetr.feature_proj] == [128, 256, 512]   # C3-C5
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 5e-5 and len(trainer.optimizer.param_groups) == 1
    losses = _step(trainer)
    _check_distilled(trainer, losses)
    assert "loss_mal" in losses                                              # the detection loss stays on


def test_transformers_teacher_into_rtdetrv2_r50(tmp_path, teacher_dir):
    trainer = _trainer(tmp_path, distill="codetr", teacher_checkpoint=str(teacher_dir), student="rtdetrv2_r50",
                       class_map="slice", lambda_cls=0.5, temperature=2.0)
    assert trainer.student.codetr.cfg.class_map == {k: k for k in range(6)}
    assert (trainer.student.codetr.cfg.logit_weight, trainer.student.codetr.cfg.temperature) == (0.5, 2.0)
    losses = _step(trainer)
    _check_distilled(trainer, losses)
    assert "loss_vfl" in losses and "loss_vfl_dn_0" in losses                # its own criterion
    stats = trainer.evaluate()                                               # our postprocessor + COCO eval
    assert 0.0 <= stats["AP"] <= 1.0


def test_two_stage_distil_without_labels_then_finetune(tmp_path, teacher_dir):
    trainer = _trainer(tmp_path / "distil", distill="codetr", teacher_checkpoint=str(teacher_dir), det_loss=False,
                       ema=False)
    losses = _step(trainer)
    assert not [k for k in losses if k != "loss" and not k.startswith("loss_kd_")]
    trainer.save("last.pth")
    tuned = _trainer(tmp_path / "tune", distill="none", finetune=str(tmp_path / "distil" / "last.pth"))
    assert tuned.train_step(*next(iter(tuned.data.train_loader(0)))) is not None


@pytest.mark.parametrize("vfm,levels", [("timm:convnext_atto", 3), ("dinov3_vits", 1)])
def test_feature_only_ablation(tmp_path, vfm, levels):
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        trainer = _trainer(tmp_path, distill="feat", vfm=vfm, det_loss=False)
    assert len(trainer.student.codetr.feature_proj) == levels
    _check_distilled(trainer, _step(trainer), feat_only=True)
