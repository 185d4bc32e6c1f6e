"""RT-DETRv4 detector: HGNetv2 backbone -> HybridEncoder (AIFI + CCFF) -> D-FINE decoder.

Same composition as the official engine/rtv4/rtv4.py (module names backbone/encoder/decoder, so
state-dict keys match). The DSI projector and the teacher are not part of the model: training
outputs carry "aifi_feature" (F5) for detector/dsi.py instead.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import DetectorConfig, get_config
from .dfine_decoder import DFINEDecoder
from .hgnetv2 import HGNetv2
from .hybrid_encoder import HybridEncoder


class RTDETRv4(nn.Module):
    """forward(images, targets=None): images float [B,3,H,W] in [0,1] (not mean/std normalised),
    H and W multiples of 32. Eval returns {"pred_logits", "pred_boxes"}; training returns the D-FINE
    training dict plus the stride-32 DSI taps: "aifi_feature" (F5) and "hybrid_feature" [B, hidden,
    H/32, W/32], and "backbone_feature" (S5) [B, backbone_channels[-1], H/32, W/32]."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = HGNetv2(cfg.backbone, cfg.use_lab, pretrained=cfg.pretrained_backbone)
        self.encoder = HybridEncoder(
            cfg.backbone_channels, cfg.hidden_dim, heads=cfg.aifi_heads, ffn_dim=cfg.aifi_ffn_dim,
            num_layers=cfg.aifi_layers, enc_act=cfg.aifi_act, csp_channels=cfg.csp_channels, csp_blocks=cfg.csp_blocks,
            act=cfg.ccff_act, pe_temperature=cfg.pe_temperature)
        self.decoder = DFINEDecoder(
            num_classes=cfg.num_classes, hidden_dim=cfg.decoder_dim, num_queries=cfg.num_queries,
            feat_channels=(cfg.hidden_dim,) * 3, feat_strides=cfg.feat_strides, num_levels=cfg.num_levels,
            num_points=cfg.num_points, nhead=cfg.decoder_heads, num_layers=cfg.num_decoder_layers,
            dim_feedforward=cfg.decoder_ffn_dim, activation=cfg.decoder_act, mlp_act=cfg.mlp_act,
            num_denoising=cfg.num_denoising, label_noise_ratio=cfg.label_noise_ratio,
            box_noise_scale=cfg.box_noise_scale, eval_spatial_size=cfg.eval_spatial_size, eval_idx=cfg.eval_idx,
            eps=cfg.eps, reg_max=cfg.reg_max, reg_scale=cfg.reg_scale)
        self.deployed = False
        self._range_checked = False

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def forward(self, images: torch.Tensor, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict:
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            check_images(images)
            # the first batch only, train or eval: reading the range is a host sync, which would break
            # CUDA-graph capture and torch.compile and stall every inference on a GPU
            if not self._range_checked and not _capturing(images):
                self._range_checked = True
                warn_on_range(images)
        feats = self.backbone(images)
        fused, f5 = self.encoder(feats)
        out = self.decoder(fused, targets)
        if self.training:   # the DSI taps of the paper's ablation (F5 is the released one)
            out.update(aifi_feature=f5, hybrid_feature=fused[-1], backbone_feature=feats[-1])
        return out

    def deploy(self) -> "RTDETRv4":
        """Official deploy form (RTv4.deploy): eval mode, CCFF Conv-BN folding and RepVGG
        re-parameterisation, decoder cut at eval_idx with a single eval head, FDR projection
        precomputed. Eval outputs are unchanged up to float rounding. Irreversible."""
        self.eval()
        self.encoder.fuse()
        self.decoder.convert_to_deploy()
        self.deployed = True
        return self


def check_images(images) -> None:
    """Reject inputs the official model would silently mis-handle."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape [B,3,H,W], got {type(images).__name__}")
    if not images.is_floating_point():
        hint = " (convert uint8 images with images.float() / 255)" if images.dtype == torch.uint8 else ""
        raise ValueError(f"images must be a float tensor in [0, 1] of shape [B,3,H,W], got dtype {images.dtype}{hint}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B,3,H,W] (float in [0, 1]), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % 32 or w % 32:
        raise ValueError(f"image height and width must be multiples of 32 (the stride-32 level), got {h}x{w}; "
                         "resize or pad, e.g. to 640x640")


def _capturing(images: torch.Tensor) -> bool:
    return images.is_cuda and torch.cuda.is_current_stream_capturing()


_warned_range = False


def warn_on_range(images: torch.Tensor) -> None:
    """Warn once per process when float images fall outside [0, 1] (e.g. 0-255 floats or mean/std
    normalised inputs): the model normalises nothing itself, so it would run but detect poorly."""
    global _warned_range
    if _warned_range or images.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if lo < 0.0 or hi > 1.0:
        _warned_range = True
        hint = "divide 0-255 images by 255" if hi > 1.5 else "pass un-normalised images (no mean/std)"
        warnings.warn(f"images hold values in [{lo:.3g}, {hi:.3g}], outside the [0, 1] the model expects: {hint}",
                      stacklevel=3)


def build_detector(size: str, num_classes: int = 80, **overrides) -> RTDETRv4:
    """RT-DETRv4-{S,M,L,X} with the official configuration; `overrides` are DetectorConfig fields
    (e.g. pretrained_backbone='PPHGNetV2_B0_stage1.pth', num_denoising=0)."""
    return RTDETRv4(get_config(size, num_classes=num_classes, **overrides))
