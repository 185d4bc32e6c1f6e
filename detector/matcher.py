"""Hungarian matcher of DETR with the focal-loss class cost used by D-FINE/DEIM/RT-DETRv4.

Cost = cost_class * focal + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU), solved per image with
scipy's ``linear_sum_assignment`` on the CPU, all decoder layers' costs copied to the host at once (official ``HungarianMatcher`` with
``use_focal_loss=True``; defaults are the official 2 / 5 / 2 weights, alpha 0.25, gamma 2).
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from .box_ops import cxcywh_to_xyxy

Indices = list[tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets (DETR, Carion et al. 2020, Sec. 3.1)."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; set at least one of cost_class/bbox/giou")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Indices:
        """Match ``outputs["pred_logits"]`` [B,Q,C] / ``outputs["pred_boxes"]`` [B,Q,4] to targets.

        Returns, per image, ``(query_idx, target_idx)`` int64 CPU tensors of length
        min(Q, num_targets).
        """
        return self.match_many([outputs], [targets])[0]

    @torch.no_grad()
    def match_many(self, outputs: list[dict[str, Tensor]], targets: list[list[dict[str, Tensor]]]) -> list[Indices]:
        """``[forward(o, t) for o, t in zip(outputs, targets)]`` with one device-to-host copy for all
        layers (the costs are computed on the device and stacked) instead of one per layer."""
        costs = [self._cost(o, t) for o, t in zip(outputs, targets)]
        if len({c.shape for c in costs}) == 1:
            host = torch.stack(costs).cpu().unbind(0)
        else:  # layers with different query counts: one copy of the flattened costs
            host = torch.cat([c.flatten() for c in costs]).cpu().split([c.numel() for c in costs])
            host = [h.view(c.shape) for h, c in zip(host, costs)]
        return [self._assign(c, t) for c, t in zip(host, targets)]

    def _cost(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        bs, num_queries = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])

        # Focal-loss cost (Deformable DETR): positive minus negative focal term of the target class.
        prob = prob[:, tgt_ids]
        neg = (1 - self.alpha) * (prob ** self.gamma) * (-(1 - prob + 1e-8).log())
        pos = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
        cost_class = pos - neg
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(cxcywh_to_xyxy(out_bbox), cxcywh_to_xyxy(tgt_bbox))

        # Same summation order as the official code, so near-ties resolve identically.
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return torch.nan_to_num(cost.view(bs, num_queries, -1), nan=1.0)

    @staticmethod
    def _assign(cost: Tensor, targets: list[dict[str, Tensor]]) -> Indices:
        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[i])
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
