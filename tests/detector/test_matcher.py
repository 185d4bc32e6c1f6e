"""HungarianMatcher: costs and assignment on tiny cases computed by hand."""
import itertools
import math

import pytest
import torch

from detector.box_ops import cxcywh_to_xyxy
from detector.matcher import HungarianMatcher


def _giou(a, b):
    """GIoU of two cxcywh boxes, written out in plain Python."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _cost(logit, box, label, tgt_box, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit[label]))
    focal = alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, tgt_box))
    return 5 * l1 + 2 * focal - 2 * _giou(box, tgt_box)


def test_assignment_is_the_brute_force_optimum():
    logits = [[2.0, -3.0, 0.5], [-1.0, 1.5, -2.0], [0.3, 0.2, -0.1], [-4.0, -4.0, 3.0]]
    boxes = [[0.30, 0.30, 0.20, 0.20], [0.62, 0.55, 0.30, 0.25], [0.33, 0.28, 0.25, 0.18], [0.7, 0.2, 0.1, 0.1]]
    labels, tgt = [0, 1, 2], [[0.32, 0.31, 0.22, 0.2], [0.6, 0.56, 0.3, 0.2], [0.68, 0.22, 0.12, 0.1]]
    cost = [[_cost(lg, b, l, t) for l, t in zip(labels, tgt)] for lg, b in zip(logits, boxes)]
    best = min(itertools.permutations(range(4), 3), key=lambda rows: sum(cost[r][c] for c, r in enumerate(rows)))

    out = {"pred_logits": torch.tensor([logits]), "pred_boxes": torch.tensor([boxes])}
    (rows, cols), = HungarianMatcher()(out, [{"labels": torch.tensor(labels), "boxes": torch.tensor(tgt)}])
    assert dict(zip(cols.tolist(), rows.tolist())) == dict(enumerate(best))
    assert rows.dtype == cols.dtype == torch.int64


def test_class_cost_decides_between_identical_boxes():
    """Both queries sit exactly on both (identical) targets: only the focal class cost can decide."""
    box = [0.5, 0.5, 0.4, 0.4]
    out = {"pred_logits": torch.tensor([[[-3.0, 3.0], [3.0, -3.0]]]), "pred_boxes": torch.tensor([[box, box]])}
    tgt = {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([box, box])}
    (rows, cols), = HungarianMatcher()(out, [tgt])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_per_image_split_empty_image_and_nan():
    out = {"pred_logits": torch.zeros(3, 5, 4), "pred_boxes": torch.rand(3, 5, 4) * 0.5 + 0.1}
    out["pred_boxes"][2, 0] = float("nan")  # NaN costs become 1.0 instead of crashing scipy
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4) * 0.5 + 0.1},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([3, 0, 1]), "boxes": torch.rand(3, 4) * 0.5 + 0.1}]
    indices = HungarianMatcher()(out, targets)
    assert [len(r) for r, _ in indices] == [2, 0, 3]
    for rows, cols in indices:
        assert len(set(rows.tolist())) == len(rows) and sorted(cols.tolist()) == list(range(len(cols)))


def test_negative_width_is_clamped_like_official():
    boxes = torch.tensor([[0.5, 0.5, -0.2, 0.4]])
    assert torch.equal(cxcywh_to_xyxy(boxes), torch.tensor([[0.5, 0.3, 0.5, 0.7]]))


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0, 0, 0)
