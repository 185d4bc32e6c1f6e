"""Contrastive denoising queries (DN-DETR / DINO, as in the official RT-DETR/D-FINE/RT-DETRv4 code).

The ground-truth boxes of a batch are padded to the largest count M and repeated in G groups of 2M
queries: M positives (box jittered by less than half its size, label flipped with probability
label_noise_ratio / 2) then M negatives (jittered by between one and two half-sizes). G = num_denoising
// M (at least 1). The random draws happen in the official order (label mask, new labels, box signs,
box magnitudes), so with the same generator state the queries match the official ones exactly.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert

from .box_ops import inverse_sigmoid

DenoisingGroup = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict]


def denoising_attn_mask(max_gt: int, num_group: int, num_queries: int, device=None) -> torch.Tensor:
    """Self-attention mask [T, T] (True = blocked), T = 2*max_gt*num_group + num_queries.

    Matching queries cannot see any denoising query and a denoising group cannot see the other groups;
    denoising queries may see the matching queries.
    """
    num_dn = 2 * max_gt * num_group
    group = torch.arange(num_dn, device=device) // (2 * max_gt)
    mask = torch.zeros(num_dn + num_queries, num_dn + num_queries, dtype=torch.bool, device=device)
    mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
    mask[num_dn:, :num_dn] = True
    return mask


def contrastive_denoising_group(
    targets: List[Dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> Optional[DenoisingGroup]:
    """Build the denoising queries for a batch.

    targets: per image {"labels" int64 [N], "boxes" normalised cxcywh [N, 4]}. Returns None when
    num_denoising <= 0 or the batch has no boxes, else (content [B, T_dn, D] from `class_embed`,
    reference boxes in logit space [B, T_dn, 4], attention mask [T_dn+Q, T_dn+Q], dn_meta) with
    dn_meta = {"dn_positive_idx": per-image int64 indices of the positive queries (grouped),
    "dn_num_group": G, "dn_num_split": [T_dn, num_queries]}.
    """
    if num_denoising <= 0:
        return None
    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts)
    if max_gt == 0:
        return None
    device = targets[0]["labels"].device
    num_group = max(num_denoising // max_gt, 1)
    bs = len(targets)

    labels = torch.full([bs, max_gt], num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros([bs, max_gt, 4], device=device)
    real = torch.zeros([bs, max_gt], dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, num_gts)):
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"]
        real[i, :n] = True
    labels = labels.tile([1, 2 * num_group])
    boxes = boxes.tile([1, 2 * num_group, 1])
    real = real.tile([1, 2 * num_group])
    negative = torch.zeros([bs, 2 * max_gt, 1], device=device)
    negative[:, max_gt:] = 1
    negative = negative.tile([1, num_group, 1])
    # the positives of image i sit at g * 2M + j (group g, box j < n_i): built, not searched (no nonzero sync)
    offsets = torch.arange(num_group, device=device)[:, None] * (2 * max_gt)
    positive_idx = tuple((offsets + torch.arange(n, device=device)).flatten() for n in num_gts)
    num_dn = 2 * max_gt * num_group

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        new_labels = torch.randint(0, num_classes, labels.shape, dtype=labels.dtype, device=device)
        labels = torch.where(flip & real, new_labels, labels)

    if box_noise_scale > 0:
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        half_wh = torch.tile(boxes[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        sign = torch.randint(0, 2, boxes.shape, dtype=boxes.dtype, device=device) * 2.0 - 1.0
        magnitude = torch.rand(boxes.shape, device=device)
        # Positives move by [0, 1) half-sizes, negatives by [1, 2).
        magnitude = (magnitude + 1.0) * negative + magnitude * (1 - negative)
        xyxy = torch.clip(xyxy + sign * magnitude * half_wh, min=0.0, max=1.0)
        boxes = box_convert(xyxy, "xyxy", "cxcywh").abs()
    boxes_unact = inverse_sigmoid(boxes)

    content = class_embed(labels)
    attn_mask = denoising_attn_mask(max_gt, num_group, num_queries, device)
    dn_meta = {"dn_positive_idx": positive_idx, "dn_num_group": num_group, "dn_num_split": [num_dn, num_queries]}
    return content, boxes_unact, attn_mask, dn_meta
