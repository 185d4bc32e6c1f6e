"""Deep Semantic Injector (RT-DETRv4 paper, Sec. DSI; official ``hybrid_encoder.feature_projector``
and ``RTv4Criterion.loss_distillation``).

DSI aligns a student feature map (by default F5, the AIFI output on the stride-32 level) with the
frozen VFM teacher's patch-token grid through a training-only projector. Nothing here runs at
inference; the projector is not part of :class:`RTDETRv4`, so deploy/export never see it.

Official behaviour reproduced by the default config:
  * projector = ``nn.Sequential(nn.Linear(hidden, teacher_dim))`` applied per pixel, channels-last;
  * teacher map bilinearly resized (align_corners=False) to the student grid when sizes differ
    (paper Eq. 3; never triggers in the standard recipe);
  * loss = mean over all B*H*W tokens of ``1 - cos(normalize(s), normalize(t))``.
The loss is computed in fp32 even when the student map arrives in fp16 under autocast (the
official code normalises the fp16 student in fp16); the difference is rounding only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Names under which official checkpoints store the (linear) projector.
OFFICIAL_PROJECTOR_KEYS = ("encoder.feature_projector.0.weight", "encoder.feature_projector.0.bias")

Tap = Literal["aifi", "hybrid", "backbone"]


@dataclass
class DSIConfig:
    """Ablation switches of the paper's DSI study; the defaults are the released model's."""

    student_dim: int = 256          # DetectorConfig.hidden_dim (384 for X) for the AIFI/hybrid taps
    teacher_dim: int = 768          # DINOv3 ViT-B/16 patch-token width
    projector: Literal["linear", "mlp", "conv1x1"] = "linear"
    loss: Literal["cosine", "mse"] = "cosine"
    tap: Tap = "aifi"               # aifi: outputs["aifi_feature"]; hybrid/backbone: map given by caller
    mlp_hidden: int | None = None   # width of the 2-layer MLP projector (default teacher_dim)


class DSI(nn.Module):
    """Projector + alignment loss. ``dsi(student_map, teacher_map)`` returns the unweighted loss;
    the trainer multiplies it by the GAM weight (:mod:`detector.gam`)."""

    def __init__(self, cfg: DSIConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DSIConfig()
        s, t = cfg.student_dim, cfg.teacher_dim
        if cfg.projector == "linear":
            self.feature_projector = nn.Sequential(nn.Linear(s, t))
        elif cfg.projector == "mlp":
            h = cfg.mlp_hidden or t
            self.feature_projector = nn.Sequential(nn.Linear(s, h), nn.GELU(), nn.Linear(h, t))
        elif cfg.projector == "conv1x1":
            self.feature_projector = nn.Sequential(nn.Conv2d(s, t, kernel_size=1))
        else:
            raise ValueError(f"DSIConfig.projector must be linear|mlp|conv1x1, got {cfg.projector!r}")
        if cfg.loss not in ("cosine", "mse"):
            raise ValueError(f"DSIConfig.loss must be cosine|mse, got {cfg.loss!r}")

    # -- tap ---------------------------------------------------------------------------------
    def student_map(self, outputs: Mapping[str, Tensor], tap_feature: Tensor | None = None) -> Tensor:
        """The student map for the configured tap: F5 from the training outputs for ``aifi``;
        for ``hybrid``/``backbone`` the caller passes the chosen level as ``tap_feature``."""
        if self.cfg.tap == "aifi":
            if "aifi_feature" not in outputs:
                raise KeyError("DSI tap 'aifi' needs outputs['aifi_feature']: run the model in train mode")
            return outputs["aifi_feature"]
        if tap_feature is None:
            raise ValueError(f"DSI tap {self.cfg.tap!r} needs the student map passed as tap_feature=")
        return tap_feature

    # -- projector ---------------------------------------------------------------------------
    def project(self, x: Tensor) -> Tensor:
        """[B, student_dim, H, W] -> [B, teacher_dim, H, W]."""
        if x.shape[1] != self.cfg.student_dim:
            raise ValueError(f"DSI expects {self.cfg.student_dim} student channels, got {tuple(x.shape)}; "
                             "set DSIConfig.student_dim to the tapped map's channel count")
        if self.cfg.projector == "conv1x1":
            return self.feature_projector(x)
        return self.feature_projector(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    # -- loss --------------------------------------------------------------------------------
    def alignment_loss(self, projected: Tensor, teacher: Tensor) -> Tensor:
        """Loss between an already projected student map and the teacher map (both [B, Td, H, W]);
        the teacher is resized to the student grid first (paper Eq. 3)."""
        if projected.shape[:2] != teacher.shape[:2]:
            raise ValueError(f"DSI student {tuple(projected.shape)} and teacher {tuple(teacher.shape)} "
                             "differ in batch or channels; check DSIConfig.teacher_dim and the teacher")
        teacher = teacher.detach().float()
        if teacher.shape[-2:] != projected.shape[-2:]:
            warnings.warn(f"DSI: resizing teacher map {tuple(teacher.shape[-2:])} to student "
                          f"{tuple(projected.shape[-2:])}", stacklevel=2)
            teacher = F.interpolate(teacher, size=projected.shape[-2:], mode="bilinear", align_corners=False)
        s = projected.float().flatten(2).transpose(1, 2)      # [B, HW, Td]
        t = teacher.flatten(2).transpose(1, 2)
        if self.cfg.loss == "mse":
            return F.mse_loss(s, t)
        cos = (F.normalize(s, dim=-1) * F.normalize(t, dim=-1)).sum(-1)
        return (1.0 - cos).mean()

    def forward(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return self.alignment_loss(self.project(student_map), teacher_map)

    # -- official checkpoint interop ---------------------------------------------------------
    def load_official_projector(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load ``encoder.feature_projector.0.{weight,bias}`` (optionally ``module.``-prefixed)
        from an official RT-DETRv4 checkpoint state dict (or any dict holding those keys)."""
        found = {}
        for k, v in state_dict.items():
            k = k[len("module."):] if k.startswith("module.") else k
            if k in OFFICIAL_PROJECTOR_KEYS:
                found[k.rsplit(".", 1)[1]] = v
        missing = {"weight", "bias"} - found.keys()
        if missing:
            raise KeyError(f"official projector keys missing: {sorted(missing)}; expected {OFFICIAL_PROJECTOR_KEYS}")
        layer = self.feature_projector[0] if self.cfg.projector != "mlp" else None
        if layer is None:
            raise ValueError("official checkpoints hold a linear projector; DSIConfig.projector is 'mlp'")
        w = found["weight"]
        w = w.reshape(w.shape[0], w.shape[1], 1, 1) if isinstance(layer, nn.Conv2d) else w
        if w.shape != layer.weight.shape or found["bias"].shape != layer.bias.shape:
            raise ValueError(f"official projector weight {tuple(found['weight'].shape)} does not fit "
                             f"DSI({self.cfg.student_dim}->{self.cfg.teacher_dim}); set DSIConfig dims")
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(found["bias"])

    def official_projector_state_dict(self) -> dict[str, Tensor]:
        """The projector under its official names, for writing official-layout checkpoints."""
        if self.cfg.projector == "mlp":
            raise ValueError("the official layout has no MLP projector")
        layer = self.feature_projector[0]
        w = layer.weight.detach().flatten(1)   # conv1x1 [Td,C,1,1] -> linear [Td,C]
        return {OFFICIAL_PROJECTOR_KEYS[0]: w.clone(), OFFICIAL_PROJECTOR_KEYS[1]: layer.bias.detach().clone()}
