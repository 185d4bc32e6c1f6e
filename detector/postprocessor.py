"""Detection post-processing without NMS (official RT-DETR/D-FINE/RT-DETRv4 PostProcessor, focal-loss mode).

Scores are sigmoid(logits); the top `num_top_queries` (query, class) pairs over the flattened
[Q x C] score matrix are kept, so one query can yield several labels. Boxes go from normalised cxcywh
to xyxy pixels of the original image, clipped to it (`clip_boxes`; the official code leaves boxes that
overhang the image unclipped, `clip_boxes=False` reproduces it).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision.ops import box_convert


class PostProcessor(nn.Module):
    """outputs {"pred_logits" [B,Q,C], "pred_boxes" [B,Q,4]} + orig_target_sizes [B,2] as (w, h) ->
    per image {"labels" [K], "boxes" [K,4] xyxy pixels, "scores" [K]}, K = num_top_queries, sorted by score.

    category_ids: optional label -> dataset category id table (for COCO, the sorted annotation category
    ids, i.e. the official `remap_mscoco_category`). After `deploy()` the forward returns the tensors
    (labels, boxes, scores) with contiguous labels, ONNX-exportable with a dynamic batch.
    """

    def __init__(self, num_classes: int = 80, num_top_queries: int = 300,
                 category_ids: Optional[Sequence[int]] = None, clip_boxes: bool = True):
        super().__init__()
        self.num_classes = int(num_classes)
        self.clip_boxes = clip_boxes
        self.num_top_queries = num_top_queries
        self.deploy_mode = False
        if category_ids is not None and len(category_ids) != self.num_classes:
            raise ValueError(f"category_ids has {len(category_ids)} entries, expected num_classes={self.num_classes}")
        self.register_buffer("category_ids", None if category_ids is None else torch.as_tensor(category_ids,
                                                                                                dtype=torch.int64),
                             persistent=False)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_top_queries={self.num_top_queries}, clip_boxes={self.clip_boxes}"

    def forward(self, outputs: Dict[str, torch.Tensor], orig_target_sizes: torch.Tensor
                ) -> Union[List[Dict[str, torch.Tensor]], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        wh = orig_target_sizes.repeat(1, 2).unsqueeze(1)
        boxes = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy") * wh
        if self.clip_boxes:   # to [0, w] x [0, h] of each image (elementwise max/min: ONNX Max/Min)
            boxes = torch.minimum(boxes.clamp(min=0), wh.to(boxes.dtype))
        scores, index = torch.topk(torch.sigmoid(logits).flatten(1), self.num_top_queries, dim=-1)
        # a - a // b * b instead of %, which older TensorRT versions do not parse (official).
        labels = index - index // self.num_classes * self.num_classes
        query = index // self.num_classes
        boxes = boxes.gather(dim=1, index=query.unsqueeze(-1).repeat(1, 1, boxes.shape[-1]))
        if self.deploy_mode:
            return labels, boxes, scores
        if self.category_ids is not None:
            labels = self.category_ids[labels]
        return [{"labels": lab, "boxes": box, "scores": sco} for lab, box, sco in zip(labels, boxes, scores)]

    def deploy(self) -> "PostProcessor":
        self.eval()
        self.deploy_mode = True
        return self
