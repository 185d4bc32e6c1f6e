"""What the trainer needs for RT-CO-DETR (``--distill codetr``) and its feature-only ablation
(``--distill feat``): the student (RT-DETRv4 of ``--size`` or the paper's RT-DETRv2-R50vd), its
criterion, the frozen teacher and the distillation module with the flags' weights.

The two-stage variant of the authors is two runs: ``--no-det-loss`` (distillation terms only),
then ``--distill none --finetune OUT/best.pth`` on the labels.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from detector import build_detector
from detector.criterion import Criterion
from detector.rt_co_detr import RTCODETRConfig, RTCODETRDistiller, resolve_class_map

log = logging.getLogger("rtdetrv4.train")


def build_student(cfg, num_classes: int, class_names) -> tuple[nn.Module, object]:
    """(detector, criterion) for ``--student``."""
    if cfg.student == "rtdetrv2_r50":
        from detector.rtdetrv2_student import RTDETRv2Criterion, build_rtdetrv2_student
        student = build_rtdetrv2_student(num_classes, weights=cfg.student_weights, class_names=class_names)
        return student, RTDETRv2Criterion(num_classes)
    if cfg.student != "rtdetrv4":
        raise ValueError(f"--student must be rtdetrv4 or rtdetrv2_r50, got {cfg.student!r}")
    if cfg.student_weights:
        raise ValueError("--student-weights is for --student rtdetrv2_r50; RT-DETRv4 starts from --finetune")
    # labels are checked on the loader's host batch in train_step: no per-step device sync
    return build_detector(cfg.size, num_classes=num_classes), Criterion(num_classes=num_classes, check_labels=False)


def student_channels(detector) -> tuple[int, ...]:
    """Widths of the student's three fused encoder maps (P3, P4, P5)."""
    return tuple(getattr(detector, "feature_channels", None) or (detector.cfg.hidden_dim,) * 3)


def _weights(cfg, **extra) -> dict:
    given = dict(feature_weight=cfg.lambda_feat, logit_weight=cfg.lambda_cls, box_weight=cfg.lambda_box,
                 temperature=cfg.temperature, **extra)
    return {k: v for k, v in given.items() if v is not None}


def build_codetr(cfg, detector, class_names, device) -> tuple[nn.Module, RTCODETRDistiller]:
    """(frozen detector teacher, distiller) for ``--distill codetr``."""
    from teacher_cache.detector_teachers import build_detector_teacher

    if not cfg.teacher_checkpoint:
        raise ValueError("--distill codetr needs --teacher-checkpoint (a transformers detector directory such as a "
                         "microsoft/conditional-detr-resnet-50 snapshot, or a detector .pth)")
    teacher = build_detector_teacher(cfg.teacher_checkpoint, input_size=cfg.teacher_input_size).to(device)
    columns = len(teacher.class_names) if teacher.class_names is not None else detector.num_classes
    class_map = resolve_class_map(cfg.class_map, teacher.class_names, class_names, columns)
    if class_map is not None:
        covered = sorted(set(class_map.values()))
        missing = [n for i, n in enumerate(class_names) if i not in set(covered)]
        log.info("RT-CO-DETR class map: %d teacher classes -> %d of %d student classes (%s); without a partner, "
                 "no KL: %s", len(class_map), len(covered), len(class_names), cfg.class_map or "name",
                 missing[:10] + (["..."] if len(missing) > 10 else []))
    distiller = RTCODETRDistiller(RTCODETRConfig(student_channels=student_channels(detector),
                                                 teacher_channels=teacher.channels, class_map=class_map,
                                                 pairing=cfg.pairing, **_weights(cfg)))
    return teacher, distiller


def build_feat(cfg, detector, device) -> tuple[nn.Module, RTCODETRDistiller]:
    """(frozen VFM teacher, feature projections) for ``--distill feat``."""
    from teacher_cache.feature_teachers import build_feature_teacher

    teacher = build_feature_teacher(cfg.vfm, cfg.weights).to(device)
    channels = student_channels(detector)
    distiller = RTCODETRDistiller(RTCODETRConfig(student_channels=tuple(channels[i] for i in teacher.levels),
                                                 teacher_channels=teacher.channels, **_weights(cfg)))
    log.info("feature distillation from %s: teacher widths %s onto student levels %s", cfg.vfm, teacher.channels,
             ["P3", "P4", "P5"][teacher.levels[0]:])
    return teacher, distiller


def distill_losses(mode: str, distiller: RTCODETRDistiller, teacher: nn.Module, images: torch.Tensor,
                   outputs: dict, student_maps) -> dict:
    """The weighted distillation terms of one step (teacher in fp32, no grad, outside autocast)."""
    s_maps = [m.float() for m in student_maps]
    if mode == "feat":
        t_maps = teacher(images)
        s_maps = [s_maps[i] for i in teacher.levels]
        return {"loss_kd_feat": distiller.cfg.feature_weight * distiller.feature_loss(s_maps, t_maps)}
    t_out, t_maps = teacher(images)
    return distiller(outputs, t_out, s_maps, t_maps)
