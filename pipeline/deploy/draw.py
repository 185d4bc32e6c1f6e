"""Draw detections (xyxy pixel boxes, labels, scores) on an image with torchvision."""
from __future__ import annotations

import torch
from torchvision.utils import draw_bounding_boxes

_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
            "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def draw_detections(image: torch.Tensor, labels, boxes, scores, score_thr: float = 0.5,
                    names: list[str] | None = None, width: int = 2) -> tuple[torch.Tensor, int]:
    """Return (uint8 [3,H,W] image with the boxes scoring >= `score_thr`, number drawn).

    `image` is uint8 [3,H,W] or float [3,H,W] in [0,1]; boxes are in that image's pixels.
    """
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    labels, boxes, scores = (torch.as_tensor(x).cpu() for x in (labels, boxes, scores))
    keep = scores >= score_thr
    labels, boxes, scores = labels[keep], boxes[keep].float(), scores[keep]
    if len(boxes) == 0:
        return image, 0
    h, w = image.shape[-2:]
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    text = [f"{names[int(l)] if names and int(l) < len(names) else int(l)} {float(s):.2f}"
            for l, s in zip(labels, scores)]
    colors = [_PALETTE[int(l) % len(_PALETTE)] for l in labels]
    return draw_bounding_boxes(image, boxes, labels=text, colors=colors, width=width), int(len(boxes))
