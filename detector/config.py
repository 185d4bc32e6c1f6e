"""Typed per-size settings of RT-DETRv4 (official configs/rtv4/rtv4_hgnetv2_{s,m,l,x}_coco.yml).

Each official config resolves dfine_hgnetv2_{size}_coco.yml + base/dfine_hgnetv2.yml + base/rtv4.yml;
the values below are those resolved settings, restated as one dataclass per size.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Tuple


@dataclass(frozen=True)
class DetectorConfig:
    size: str
    # HGNetv2 backbone (official HGNetv2(name, use_lab, return_idx=[1, 2, 3]))
    backbone: str  # "B0" | "B2" | "B4" | "B5"
    use_lab: bool
    backbone_channels: Tuple[int, int, int]  # stride 8/16/32 outputs = encoder in_channels
    # HybridEncoder ('dfine' version)
    hidden_dim: int = 256
    expansion: float = 1.0
    depth_mult: float = 1.0
    aifi_ffn_dim: int = 1024
    aifi_heads: int = 8
    aifi_layers: int = 1
    aifi_act: str = "gelu"
    pe_temperature: float = 10000.0
    ccff_act: str = "silu"
    feat_strides: Tuple[int, int, int] = (8, 16, 32)
    # DFINETransformer decoder
    num_classes: int = 80
    decoder_dim: int = 256
    num_queries: int = 300
    num_decoder_layers: int = 6
    eval_idx: int = -1
    decoder_heads: int = 8
    decoder_ffn_dim: int = 1024
    num_levels: int = 3
    num_points: Tuple[int, int, int] = (3, 6, 3)
    reg_max: int = 32
    reg_scale: int = 4  # int in the YAML: stored as an int64 Parameter in official checkpoints
    layer_scale: float = 1.0
    decoder_act: str = "silu"
    mlp_act: str = "silu"
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    eps: float = 1e-2
    eval_spatial_size: Tuple[int, int] = (640, 640)  # (h, w); only used to size the 640 anchors
    # training-only DSI projector width (detector/dsi.py); DINOv3 ViT-B/16 token dim
    teacher_dim: int = 768
    pretrained_backbone: str | None = field(default=None, compare=False)

    @property
    def csp_channels(self) -> int:
        """RepNCSPELAN4 c4 = round(expansion * hidden // 2) (official HybridEncoder)."""
        return round(self.expansion * self.hidden_dim // 2)

    @property
    def csp_blocks(self) -> int:
        """RepVGG blocks per CSPLayer, n = round(3 * depth_mult)."""
        return round(3 * self.depth_mult)

    def replace(self, **overrides) -> "DetectorConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown DetectorConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return replace(self, **overrides)


SIZES = {
    "s": DetectorConfig(size="s", backbone="B0", use_lab=True, backbone_channels=(256, 512, 1024),
                        expansion=0.5, depth_mult=0.34, num_decoder_layers=3),
    "m": DetectorConfig(size="m", backbone="B2", use_lab=True, backbone_channels=(384, 768, 1536),
                        expansion=1.0, depth_mult=0.67, num_decoder_layers=4),
    "l": DetectorConfig(size="l", backbone="B4", use_lab=False, backbone_channels=(512, 1024, 2048),
                        num_decoder_layers=6),
    "x": DetectorConfig(size="x", backbone="B5", use_lab=False, backbone_channels=(512, 1024, 2048),
                        hidden_dim=384, aifi_ffn_dim=2048, num_decoder_layers=6, reg_scale=8),
}


def get_config(size: str, **overrides) -> DetectorConfig:
    key = size.lower()
    if key not in SIZES:
        raise ValueError(f"unknown detector size {size!r}; expected one of {sorted(SIZES)}")
    return SIZES[key].replace(**overrides) if overrides else SIZES[key]
