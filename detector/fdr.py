"""Fine-grained Distribution Refinement (D-FINE, arXiv 2410.13842, Sec. 3.1) helpers.

A box is predicted as four edge-offset distributions over `reg_max + 1` bins. The bin values are the
non-uniform weighting function W(n) (D-FINE eq. 4); the expected offset is the integral
sum_n Pr(n) W(n) (eq. 3), and offsets are decoded around a reference box (eq. 2). The criterion uses
`bbox2distance` to turn ground-truth boxes into the two-bin targets of the FGL loss.

Arithmetic follows the official `engine/rtv4/dfine_utils.py` operation by operation, so results are
bit-identical to it in fp32.
"""
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

Scale = Union[torch.Tensor, float]


def weighting_function(reg_max: int, up: torch.Tensor, reg_scale: Scale, deploy: bool = False) -> torch.Tensor:
    """W(n) for n = 0..reg_max (D-FINE eq. 4) -> [reg_max + 1].

    `up` ([1] tensor, official 0.5) bounds the range to +-2*up*reg_scale; `reg_scale` sets the
    curvature (flat near 0, steep at the ends). With `deploy=True` the values are computed in Python
    floats and returned as a constant tensor, as the official deploy path does before ONNX export.
    """
    half = reg_max // 2
    if deploy:
        bound = (abs(up[0]) * abs(reg_scale)).item()
        bound2 = (abs(up[0]) * abs(reg_scale) * 2).item()
        step = (bound + 1) ** (2 / (reg_max - 2))
        left = [-(step**i) + 1 for i in range(half - 1, 0, -1)]
        right = [step**i - 1 for i in range(1, half)]
        return torch.tensor([-bound2, *left, 0.0, *right, bound2], dtype=up.dtype, device=up.device)
    bound = abs(up[0]) * abs(reg_scale)
    bound2 = abs(up[0]) * abs(reg_scale) * 2
    step = (bound + 1) ** (2 / (reg_max - 2))
    # One scalar power per bin (not a vectorised pow) keeps the rounding identical to the official code.
    left = [-(step**i) + 1 for i in range(half - 1, 0, -1)]
    right = [step**i - 1 for i in range(1, half)]
    return torch.cat([-bound2, *left, torch.zeros_like(up[0][None]), *right, bound2], 0)


def integral(corners: torch.Tensor, project: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Expected edge offsets sum_n softmax(corners)_n W(n) (D-FINE eq. 3): [..., 4*(reg_max+1)] -> [..., 4]."""
    prob = F.softmax(corners.reshape(-1, reg_max + 1), dim=1)
    return F.linear(prob, project).reshape(*corners.shape[:-1], 4)


def distance2bbox(points: torch.Tensor, distance: torch.Tensor, reg_scale: Scale) -> torch.Tensor:
    """Decode edge offsets around reference boxes (D-FINE eq. 2).

    points: [..., 4] reference boxes cxcywh; distance: [..., 4] offsets (left, top, right, bottom) in
    units of W(n). Returns cxcywh boxes [..., 4].
    """
    reg_scale = abs(reg_scale)
    x1 = points[..., 0] - (0.5 * reg_scale + distance[..., 0]) * (points[..., 2] / reg_scale)
    y1 = points[..., 1] - (0.5 * reg_scale + distance[..., 1]) * (points[..., 3] / reg_scale)
    x2 = points[..., 0] + (0.5 * reg_scale + distance[..., 2]) * (points[..., 2] / reg_scale)
    y2 = points[..., 1] + (0.5 * reg_scale + distance[..., 3]) * (points[..., 3] / reg_scale)
    return box_convert(torch.stack([x1, y1, x2, y2], -1), "xyxy", "cxcywh")


def translate_gt(
    gt: torch.Tensor, reg_max: int, reg_scale: Scale, up: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place continuous offsets between their two neighbouring bins of W(n).

    Returns (left bin index as float, weight of the right bin, weight of the left bin), each [N].
    Offsets below W(0) go fully to bin 0; offsets at or above W(reg_max) get index reg_max - 0.1 and
    right weight 1, as in the official code.
    """
    gt = gt.reshape(-1)
    values = weighting_function(reg_max, up, reg_scale)
    left_idx = (values.unsqueeze(0) - gt.unsqueeze(1) <= 0).sum(dim=1) - 1
    inside = (left_idx >= 0) & (left_idx < reg_max)
    safe = left_idx.clamp(0, reg_max - 1)
    left_diff = torch.abs(gt - values[safe])
    right_diff = torch.abs(values[safe + 1] - gt)
    outside_right = (left_idx >= reg_max).to(gt.dtype)
    weight_right = torch.where(inside, left_diff / (left_diff + right_diff), outside_right)
    weight_left = 1.0 - weight_right
    index = left_idx.to(gt.dtype).clamp(min=0)
    index = torch.where(left_idx >= reg_max, torch.full_like(index, reg_max - 0.1), index)
    return index, weight_right, weight_left


def bbox2distance(
    points: torch.Tensor, bbox: torch.Tensor, reg_max: int, reg_scale: Scale, up: torch.Tensor, eps: float = 0.1
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `distance2bbox` followed by `translate_gt`: the FGL targets.

    points: [N, 4] reference boxes cxcywh; bbox: [N, 4] target boxes xyxy. Returns the detached
    (bin index in [0, reg_max - eps] [4N], right weight [4N], left weight [4N]).
    """
    reg_scale = abs(reg_scale)
    left = (points[:, 0] - bbox[:, 0]) / (points[..., 2] / reg_scale + 1e-16) - 0.5 * reg_scale
    top = (points[:, 1] - bbox[:, 1]) / (points[..., 3] / reg_scale + 1e-16) - 0.5 * reg_scale
    right = (bbox[:, 2] - points[:, 0]) / (points[..., 2] / reg_scale + 1e-16) - 0.5 * reg_scale
    bottom = (bbox[:, 3] - points[:, 1]) / (points[..., 3] / reg_scale + 1e-16) - 0.5 * reg_scale
    offsets = torch.stack([left, top, right, bottom], -1)
    index, weight_right, weight_left = translate_gt(offsets, reg_max, reg_scale, up)
    index = index.clamp(min=0, max=reg_max - eps)
    return index.reshape(-1).detach(), weight_right.detach(), weight_left.detach()
