"""Box helpers that torchvision.ops does not provide (plain conversions use torchvision.ops.box_convert)."""
import torch
from torch import Tensor
from torchvision.ops import box_convert


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clipped to [0, 1] and both odds terms clamped at `eps` (official RT-DETR helper)."""
    x = x.clip(min=0.0, max=1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """cxcywh -> xyxy with negative widths/heights clamped to 0.

    D-FINE boxes come from edge distances and can have w < 0; the official conversion clamps them
    so that (G)IoU stays defined. Apart from the clamp this is ``torchvision.ops.box_convert``.
    """
    return box_convert(torch.cat([boxes[..., :2], boxes[..., 2:].clamp(min=0.0)], -1), "cxcywh", "xyxy")


def paired_iou_giou(src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
    """Element-wise IoU and GIoU of matched cxcywh boxes [N, 4]; equals diag(box_iou / generalized_box_iou)
    (torchvision only offers the pairwise N x M matrices; the losses need matched pairs)."""
    a, b = cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_a + area_b - inter
    iou = inter / union
    wh_c = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)
    area_c = wh_c[:, 0] * wh_c[:, 1]
    return iou, iou - (area_c - union) / area_c
