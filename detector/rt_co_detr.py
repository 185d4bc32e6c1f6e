"""RT-CO-DETR multi-level distillation from a detector teacher (``nam-htran/RT-CO-DETR``,
``src/distillation/trainer_codetr.py``), with its query and class correspondence fixed.

Total = w_feat * sum_levels MSE(conv1x1(student_l), resize(teacher_l))
      + w_logit * T^2 * KL(softmax(t/T) || softmax(s/T))      over paired queries, shared classes
      + w_box * L1(student boxes, teacher boxes)               over paired queries
with the reference's weights 1.0 / 0.8 / 1.2 and T = 4.

Differences from the reference (see docs/detector.md, section RT-CO-DETR):
  * queries are paired by Hungarian matching on the two models' predictions (class-probability
    L1 distance + box L1 + GIoU) instead of by index (``pairing="index"`` keeps the reference);
  * classes are aligned by an explicit teacher->student ``class_map`` instead of slicing the first
    min(C_s, C_t) columns. Teacher classes absent from the map are dropped, so the teacher softmax
    is renormalised over the mapped classes; several teacher classes mapped to one student class are
    merged by logsumexp (their probabilities add); student classes no teacher class maps to are
    left out of the KL. Without a map the label spaces must have the same size (identity).
The logit and box terms use the FINAL decoder layer only, like the reference; the feature term uses
the fused encoder maps (after AIFI and CCFF), captured without a second forward by
:class:`EncoderTap`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from .box_ops import cxcywh_to_xyxy


@dataclass
class RTCODETRConfig:
    student_channels: Sequence[int] = (256, 256, 256)   # fused encoder maps, strides 8/16/32
    teacher_channels: Sequence[int] = (512, 1024, 2048)  # reference teacher: ResNet-50 C3/C4/C5
    feature_weight: float = 1.0
    logit_weight: float = 0.8
    box_weight: float = 1.2
    temperature: float = 4.0
    pairing: Literal["hungarian", "index"] = "hungarian"
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    class_map: Mapping[int, int] | None = None           # teacher class -> student class
    kl_reduction: Literal["batchmean", "pair_mean"] = "batchmean"  # reference: sum / B


def align_teacher_logits(teacher_logits: Tensor, student_classes: int,
                         class_map: Mapping[int, int] | None) -> tuple[Tensor, Tensor]:
    """Teacher logits [.., C_t] -> (logits over the mapped student classes [.., K], the K student
    class indices). Several teacher classes on one student class are merged by logsumexp."""
    c_t = teacher_logits.shape[-1]
    if class_map is None:
        if c_t != student_classes:
            raise ValueError(f"teacher has {c_t} classes and student {student_classes}: pass "
                             "RTCODETRConfig.class_map={teacher_idx: student_idx, ...}")
        return teacher_logits, torch.arange(student_classes, device=teacher_logits.device)
    bad = [(t, s) for t, s in class_map.items() if not (0 <= t < c_t and 0 <= s < student_classes)]
    if bad:
        raise ValueError(f"class_map entries out of range (teacher {c_t}, student {student_classes} "
                         f"classes): {bad[:5]}")
    sources: dict[int, list[int]] = {}
    for t, s in class_map.items():
        sources.setdefault(s, []).append(t)
    targets = sorted(sources)
    dev = teacher_logits.device
    # One gather for all columns (a single class's logsumexp is the logit itself); only merged
    # classes need a logsumexp of their own.
    first = torch.tensor([sources[s][0] for s in targets], device=dev)
    aligned = teacher_logits.index_select(-1, first)
    for j, s in enumerate(targets):
        if len(sources[s]) > 1:
            aligned[..., j] = teacher_logits[..., sources[s]].logsumexp(-1)
    return aligned, torch.tensor(targets, device=dev)


def _norm_name(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def _is_named(name: str) -> bool:
    """id2label placeholders (COCO's unused 'N/A' slots, transformers' default 'LABEL_k') name nothing."""
    n = _norm_name(name)
    return bool(n) and n != "n/a" and not (n.startswith("label ") and n[6:].isdigit())


def resolve_class_map(spec, teacher_names: Sequence[str] | None, student_names: Sequence[str],
                      teacher_columns: int) -> dict[int, int] | None:
    """The teacher->student class map of ``--class-map``:

    * ``None`` / ``"name"`` (default): teacher classes whose name (``id2label``) equals a student class
      name (case, ``_`` and ``-`` ignored); a teacher without names keeps the identity (same label space);
    * ``"slice"``: column k -> class k for the first K = min(C_s, C_t) columns, the authors' behaviour. With a
      COCO teacher this misaligns: COCO detectors use 91 DETR-style category-id slots (column 0 is the
      unused "N/A", column 1 "person", ...), so student class k learns from an unrelated COCO class;
    * a dict (JSON): ``{teacher: student}``, each side a column index or a class name.
    Student classes without a partner take no KL term."""
    student_index = {_norm_name(n): i for i, n in enumerate(student_names)}
    if spec == "slice":
        return {k: k for k in range(min(teacher_columns, len(student_names)))}
    if spec is None or spec == "name":
        if teacher_names is None:
            return None
        mapping = {t: student_index[_norm_name(n)] for t, n in enumerate(teacher_names)
                   if _is_named(n) and _norm_name(n) in student_index}
        if not mapping:
            raise ValueError("no teacher class name (id2label) equals a student class name: pass --class-map "
                             "'{\"teacher class\": \"student class\", ...}' or --class-map slice (the authors' mapping)")
        return mapping
    if not isinstance(spec, Mapping):
        raise ValueError(f"--class-map must be name, slice or a JSON object, got {spec!r}")
    teacher_index = {_norm_name(n): i for i, n in enumerate(teacher_names or []) if _is_named(n)}

    def index(key, table, side):
        if isinstance(key, int) or (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            return int(key)
        if _norm_name(key) not in table:
            raise ValueError(f"--class-map: {side} class {key!r} is not a {side} class name")
        return table[_norm_name(key)]
    return {index(t, teacher_index, "teacher"): index(s, student_index, "student") for t, s in spec.items()}


@torch.no_grad()
def hungarian_pairs(s_prob: Tensor, s_boxes: Tensor, t_prob: Tensor, t_boxes: Tensor,
                    cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> tuple[Tensor, Tensor]:
    """Pair one image's student queries with teacher queries by minimum total cost
    (class-probability L1 distance, cxcywh L1, -GIoU). Returns (student_idx, teacher_idx)."""
    c = (cost_class * torch.cdist(s_prob.float(), t_prob.float(), p=1)
         + cost_bbox * torch.cdist(s_boxes.float(), t_boxes.float(), p=1)
         - cost_giou * generalized_box_iou(cxcywh_to_xyxy(s_boxes.float()), cxcywh_to_xyxy(t_boxes.float())))
    i, j = linear_sum_assignment(c.cpu().numpy())
    dev = s_boxes.device
    return torch.as_tensor(i, dtype=torch.long, device=dev), torch.as_tensor(j, dtype=torch.long, device=dev)


class EncoderTap:
    """Captures the fused encoder maps of a model whose ``encoder`` returns ``(maps, ...)`` or a
    list of maps (our HybridEncoder returns ``([P3, P4, P5], F5)``) with a forward hook, so the
    student and the teacher run once per step (the reference ran backbone+encoder a second time).

        tap = EncoderTap(student)          # keeps the hook until tap.remove()
        out = student(images, targets)
        maps = tap.maps                    # [P3, P4, P5] of that forward, graph attached
    """

    def __init__(self, model: nn.Module):
        model = model.module if hasattr(model, "module") else model
        if not hasattr(model, "encoder"):
            raise ValueError(f"{type(model).__name__} has no .encoder to tap; pass the maps yourself")
        self.maps: list[Tensor] | None = None
        self._handle = model.encoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if hasattr(output, "last_hidden_state"):   # transformers RT-DETR(v2) HybridEncoder
            output = output.last_hidden_state
        maps = output[0] if isinstance(output, tuple) else output
        self.maps = list(maps)

    def remove(self) -> None:
        self._handle.remove()


class RTCODETRDistiller(nn.Module):
    """Holds the 1x1 feature projections (student -> teacher width, like the reference) and
    computes the weighted distillation terms. Add its parameters to the optimizer."""

    def __init__(self, cfg: RTCODETRConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RTCODETRConfig()
        if len(cfg.student_channels) != len(cfg.teacher_channels):
            raise ValueError("RTCODETRConfig.student_channels and teacher_channels must list the same levels")
        self.feature_proj = nn.ModuleList(nn.Conv2d(s, t, kernel_size=1)
                                          for s, t in zip(cfg.student_channels, cfg.teacher_channels))

    def feature_loss(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """Sum over levels of MSE(proj(student), teacher resized bilinearly to the student grid)."""
        if len(student_feats) != len(self.feature_proj) or len(teacher_feats) != len(self.feature_proj):
            raise ValueError(f"expected {len(self.feature_proj)} feature levels, got "
                             f"{len(student_feats)} student / {len(teacher_feats)} teacher")
        loss = student_feats[0].new_zeros((), dtype=torch.float32)
        for proj, s, t in zip(self.feature_proj, student_feats, teacher_feats):
            t = t.detach().float()
            if t.shape[-2:] != s.shape[-2:]:
                t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + F.mse_loss(proj(s).float(), t)
        return loss

    def pair(self, s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per image (student_idx, teacher_idx). ``t_logits`` already in the aligned class space,
        ``s_logits`` restricted to the same classes."""
        B, qs = s_logits.shape[:2]
        qt = t_logits.shape[1]
        if self.cfg.pairing == "index":
            idx = torch.arange(min(qs, qt), device=s_logits.device)
            return [(idx, idx)] * B
        cfg = self.cfg
        return [hungarian_pairs(s_logits[b].sigmoid(), s_boxes[b], t_logits[b].sigmoid(), t_boxes[b],
                                cfg.cost_class, cfg.cost_bbox, cfg.cost_giou) for b in range(B)]

    def prediction_losses(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Unweighted (KL * T^2, box L1) between paired queries of the final decoder layer."""
        s_logits, s_boxes = student["pred_logits"], student["pred_boxes"]
        t_logits, t_boxes = teacher["pred_logits"].detach().float(), teacher["pred_boxes"].detach().float()
        t_al, cls = align_teacher_logits(t_logits, s_logits.shape[-1], self.cfg.class_map)
        s_al = s_logits.float()[..., cls]
        pairs = self.pair(s_al.detach(), s_boxes.detach(), t_al, t_boxes)
        si = torch.cat([torch.full_like(i, b) for b, (i, _) in enumerate(pairs)])
        s_idx = torch.cat([i for i, _ in pairs])
        t_idx = torch.cat([j for _, j in pairs])
        s_sel, t_sel = s_al[si, s_idx], t_al[si, t_idx]            # [P, K]
        T = self.cfg.temperature
        kl = F.kl_div(F.log_softmax(s_sel / T, -1), F.softmax(t_sel / T, -1), reduction="sum") * T * T
        kl = kl / (s_logits.shape[0] if self.cfg.kl_reduction == "batchmean" else max(len(s_idx), 1))
        box = F.l1_loss(s_boxes.float()[si, s_idx], t_boxes[si, t_idx])
        return kl, box

    def forward(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor],
                student_feats: Sequence[Tensor] | None = None,
                teacher_feats: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """Weighted terms ``loss_kd_feat`` (only with feature lists), ``loss_kd_logit``,
        ``loss_kd_box``; the total is their sum."""
        kl, box = self.prediction_losses(student, teacher)
        out = {"loss_kd_logit": self.cfg.logit_weight * kl, "loss_kd_box": self.cfg.box_weight * box}
        if student_feats is not None or teacher_feats is not None:
            if student_feats is None or teacher_feats is None:
                raise ValueError("pass both student_feats and teacher_feats (or neither)")
            out["loss_kd_feat"] = self.cfg.feature_weight * self.feature_loss(student_feats, teacher_feats)
        return out
