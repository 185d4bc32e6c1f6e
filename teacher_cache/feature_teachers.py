"""Multi-level VFM features for the feature-only ablation of RT-CO-DETR (``--distill feat``, the
"RT-DisDINOv3" rows): a DINOv3 ConvNeXt's last three stages (strides 8/16/32, for the three
encoder maps) or a ViT's final-norm patch grid (resampled to stride 32, for the stride-32 map).

Built on :class:`teacher_cache.teachers.Teacher` (same normalisation, local weights only, random
init with a loud warning), so the ViT grid is exactly the RT-DETRv4 DSI target.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from teacher_cache.teachers import Teacher, build_teacher


class MultiLevelTeacher(nn.Module):
    """``forward(images [B,3,H,W] in [0,1]) -> list of maps``; ``channels`` their widths and
    ``levels`` which of the student's (P3, P4, P5) each one supervises."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher
        if teacher.is_vit:
            self.channels, self.levels = (teacher.embed_dim,), (2,)
        else:
            info = teacher.model.feature_info[-3:]
            self.channels, self.levels = tuple(i["num_chs"] for i in info), (0, 1, 2)
            reductions = [i["reduction"] for i in info]
            if reductions != [8, 16, 32]:
                raise ValueError(f"feature teacher {teacher.vfm}: last three stages have strides {reductions}, "
                                 "not 8/16/32; use a ConvNeXt or a ViT")

    def train(self, mode: bool = True) -> "MultiLevelTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        if self.teacher.is_vit:
            return [self.teacher(images)]
        t = self.teacher
        with torch.autocast(images.device.type, enabled=False):
            x = (images.float() - t.mean) / t.std
            maps = t.model.forward_intermediates(x, indices=3, intermediates_only=True)
        return [m.float() for m in maps]


def build_feature_teacher(vfm: str, weights=None) -> MultiLevelTeacher:
    return MultiLevelTeacher(build_teacher(vfm, weights=weights))
