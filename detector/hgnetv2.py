"""HGNetv2 backbone (PP-HGNetV2 B0/B2/B4/B5) built from timm's `hgnetv2_b*`.

timm's HighPerfGpuNet is the same network as the official engine/backbone/hgnetv2.py (StemV2, four
HG stages with 'se' aggregation, light blocks in stages 3-4, learnable affine blocks for B0-B3) and
its `stem.*` / `stages.*` module names equal the official state-dict keys, so official checkpoints
load by name. Only the classifier head is dropped, and drop-path is off (the official model has none).
Checked numerically against the official module in tests/detector/test_detector_parity.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from timm.models.hgnet import HighPerfGpuNet, model_cfgs
from torch import nn

# out_channels of stages 1..3 (strides 8/16/32), official arch_configs
OUT_CHANNELS = {"B0": (256, 512, 1024), "B2": (384, 768, 1536), "B4": (512, 1024, 2048), "B5": (512, 1024, 2048)}


class HGNetv2(nn.Module):
    """Returns the stride-8/16/32 feature maps (official `return_idx=[1, 2, 3]`)."""

    def __init__(self, name: str, use_lab: bool, return_idx=(1, 2, 3), pretrained: str | Path | None = None):
        super().__init__()
        if name not in OUT_CHANNELS:
            raise ValueError(f"unsupported HGNetv2 variant {name!r}; expected one of {sorted(OUT_CHANNELS)}")
        net = HighPerfGpuNet(model_cfgs[f"hgnetv2_{name.lower()}"], num_classes=0, use_lab=use_lab,
                             drop_path_rate=0.0)
        self.stem = net.stem
        self.stages = net.stages
        self.return_idx = tuple(return_idx)
        self.out_channels = [net.feature_info[i]["num_chs"] for i in self.return_idx]
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def load_pretrained(self, path: str | Path) -> None:
        """Load a PPHGNetV2_{B*}_stage1.pth (official key names; a classifier `head.*` is ignored)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"HGNetv2 weights not found at {path}; download PPHGNetV2_*_stage1.pth from the D-FINE "
                "release (github.com/Peterande/storage/releases/tag/dfinev1.0) and pass its local path")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc."))}
        self.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
