"""HybridEncoder ('dfine' version) of RT-DETRv4: input projection, AIFI on S5, CCFF (FPN + PAN).

Reproduces engine/rtv4/hybrid_encoder.py. Module names equal the official state-dict keys
(input_proj.*, encoder.0.layers.0.*, lateral_convs.*, fpn_blocks.*, downsample_convs.*, pan_blocks.*).
The encoder also returns F5, the AIFI output reshaped to [B, hidden, H/32, W/32] before CCFF: the
tap point of the Deep Semantic Injector (paper Sec. 3.2). The DSI projector lives in detector/dsi.py.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A biased conv equal to bn(conv(x)) in eval mode, with the official formula
    t = gamma / sqrt(var + eps), bias = beta - mean * gamma / sqrt(var + eps)
    (engine/rtv4/hybrid_encoder.py _fuse_bn_tensor). torch's fuse_conv_bn_eval uses rsqrt and another
    product order, which differs by an ulp: enough to reorder near-tied queries of the deployed model."""
    std = (bn.running_var + bn.eps).sqrt()
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).to(conv.weight)
    fused.weight.copy_(conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1))
    fused.bias.copy_(bn.bias - bn.running_mean * bn.weight / std)
    return fused


def _act(name: str | None) -> nn.Module:
    return {None: nn.Identity, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}[name]()


class ConvNorm(nn.Module):
    """Conv (no bias) + BatchNorm + optional activation; `fuse()` folds BN into the conv (deploy)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = _act(act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        if isinstance(self.norm, nn.BatchNorm2d):
            self.conv = fold_bn(self.conv, self.norm)
            self.norm = nn.Identity()


class RepVGGBlock(nn.Module):
    """3x3 ConvBN + 1x1 ConvBN, summed, then activation (official VGGBlock); `fuse()` re-parameterises
    both branches into one biased 3x3 conv (RepVGG, Ding et al. 2021)."""

    def __init__(self, c_in: int, c_out: int, act: str = "silu"):
        super().__init__()
        self.conv1 = ConvNorm(c_in, c_out, 3)
        self.conv2 = ConvNorm(c_in, c_out, 1)
        self.act = _act(act)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def fuse(self) -> None:
        if hasattr(self, "conv"):
            return
        k3 = fold_bn(self.conv1.conv, self.conv1.norm)
        k1 = fold_bn(self.conv2.conv, self.conv2.norm)
        k3.weight += F.pad(k1.weight, [1, 1, 1, 1])
        k3.bias += k1.bias
        self.conv = k3
        del self.conv1, self.conv2


class CSPLayer(nn.Module):
    """Two 1x1 branches, RepVGG bottlenecks on one, summed (official CSPLayer, expansion 1: no conv3)."""

    def __init__(self, c_in: int, c_out: int, n: int, act: str = "silu"):
        super().__init__()
        self.conv1 = ConvNorm(c_in, c_out, 1, act=act)
        self.conv2 = ConvNorm(c_in, c_out, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVGGBlock(c_out, c_out, act) for _ in range(n)])

    def forward(self, x):
        return self.bottlenecks(self.conv1(x)) + self.conv2(x)


class RepNCSPELAN4(nn.Module):
    """CSP-ELAN block of CCFF (YOLOv9 RepNCSPELAN4 as configured by D-FINE): c1 -> c2 with c3/2-channel
    halves and two CSP(RepVGG)+3x3 branches of width c4."""

    def __init__(self, c1: int, c2: int, c3: int, c4: int, n: int, act: str = "silu"):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = ConvNorm(c1, c3, 1, act=act)
        self.cv2 = nn.Sequential(CSPLayer(c3 // 2, c4, n, act), ConvNorm(c4, c4, 3, act=act))
        self.cv3 = nn.Sequential(CSPLayer(c4, c4, n, act), ConvNorm(c4, c4, 3, act=act))
        self.cv4 = ConvNorm(c3 + 2 * c4, c2, 1, act=act)

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling (YOLOv10): 1x1 ConvBN then 3x3/2 depthwise ConvBN, no act."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 2):
        super().__init__()
        self.cv1 = ConvNorm(c1, c2, 1)
        self.cv2 = ConvNorm(c2, c2, k, s, groups=c2)

    def forward(self, x):
        return self.cv2(self.cv1(x))


class AIFILayer(nn.Module):
    """Post-norm transformer encoder layer; the position embedding is added to queries and keys only."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, act: str = "gelu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.activation = _act(act)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        # default need_weights path on purpose: bit-identical to the official layer (the SDPA path is not)
        src = self.norm1(src + self.self_attn(q, k, value=src)[0])
        return self.norm2(src + self.linear2(self.activation(self.linear1(src))))


class AIFI(nn.Module):
    """Attention-based intra-scale feature interaction (RT-DETR) on the stride-32 level."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, num_layers: int = 1, act: str = "gelu"):
        super().__init__()
        self.layers = nn.ModuleList([AIFILayer(dim, heads, ffn_dim, act) for _ in range(num_layers)])

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src


def sincos_pos_embed_2d(h: int, w: int, dim: int, temperature: float = 10000.0, device=None) -> torch.Tensor:
    """2D sin-cos embedding [1, h*w, dim] for a row-major (y, x) flattened map.

    Channel layout follows the official build_2d_sincos_position_embedding: [sin, cos] of the first
    grid axis, then [sin, cos] of the second. The official grid is built for (w, h) with 'ij' indexing,
    so for the square maps it is used on, the first axis is the row index y; we keep that meaning for
    any h, w so every size works (identical values to the official table when h == w).
    """
    if dim % 4:
        raise ValueError(f"hidden_dim must be divisible by 4 for the 2D sin-cos embedding, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    out_y = ys.flatten()[:, None] * omega[None]
    out_x = xs.flatten()[:, None] * omega[None]
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)[None]


class HybridEncoder(nn.Module):
    """Returns (fused maps [P3, P4, P5] at strides 8/16/32 with `hidden_dim` channels, F5)."""

    def __init__(self, in_channels: Sequence[int], hidden_dim: int = 256, heads: int = 8, ffn_dim: int = 1024,
                 num_layers: int = 1, enc_act: str = "gelu", csp_channels: int = 128, csp_blocks: int = 3,
                 act: str = "silu", pe_temperature: float = 10000.0):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.pe_temperature = pe_temperature
        self.input_proj = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(c, hidden_dim, 1, bias=False), norm=nn.BatchNorm2d(hidden_dim)))
            for c in in_channels)
        # one AIFI on the last level (official use_encoder_idx=[2]); ModuleList keeps the key encoder.0.*
        self.encoder = nn.ModuleList([AIFI(hidden_dim, heads, ffn_dim, num_layers, enc_act)])
        c4, n = csp_channels, csp_blocks   # RepNCSPELAN4 width and depth (DetectorConfig derives them)
        levels = len(in_channels)
        self.lateral_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 1) for _ in range(levels - 1))
        self.fpn_blocks = nn.ModuleList(
            RepNCSPELAN4(2 * hidden_dim, hidden_dim, 2 * hidden_dim, c4, n, act) for _ in range(levels - 1))
        self.downsample_convs = nn.ModuleList(nn.Sequential(SCDown(hidden_dim, hidden_dim)) for _ in range(levels - 1))
        self.pan_blocks = nn.ModuleList(
            RepNCSPELAN4(2 * hidden_dim, hidden_dim, 2 * hidden_dim, c4, n, act) for _ in range(levels - 1))

    def forward(self, feats: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        b, c, h, w = proj[-1].shape
        pos = sincos_pos_embed_2d(h, w, c, self.pe_temperature, proj[-1].device).to(proj[-1].dtype)
        memory = self.encoder[0](proj[-1].flatten(2).transpose(1, 2), pos)
        f5 = memory.transpose(1, 2).reshape(b, c, h, w).contiguous()
        proj[-1] = f5

        # top-down FPN: inner[0] is always the current coarsest fused map
        inner = [proj[-1]]
        for i, idx in enumerate(range(len(proj) - 1, 0, -1)):
            high = self.lateral_convs[i](inner[0])
            inner[0] = high
            up = F.interpolate(high, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.fpn_blocks[i](torch.cat([up, proj[idx - 1]], dim=1)))
        # bottom-up PAN
        outs = [inner[0]]
        for i in range(len(proj) - 1):
            down = self.downsample_convs[i](outs[-1])
            outs.append(self.pan_blocks[i](torch.cat([down, inner[i + 1]], dim=1)))
        return outs, f5

    def fuse(self) -> None:
        """Deploy form: fold every CCFF BatchNorm into its conv and re-parameterise RepVGG blocks (as the
        official convert_to_deploy; input_proj stays Conv+BN there and here)."""
        for m in list(self.modules()):  # parents first: a RepVGG block fuses before its branches
            if isinstance(m, (ConvNorm, RepVGGBlock)):
                m.fuse()
