"""A tiny real detector with the deploy interface, shared by the deploy and predict tests.

`TinyDeployNet` maps (images, orig_target_sizes) -> (labels, boxes, scores) like the real graph and
has a training-only `feature_projector`, so the ONNX checks, onnxruntime parity, divergence check,
timing and report code run end to end in a second.
"""
import torch
from torch import nn

from pipeline.deploy import onnx_check


class TinyDeployNet(nn.Module):
    """Stride-16 conv head: one query per cell, sigmoid scores, top-k over queries x classes."""

    def __init__(self, num_classes: int = 5, top_k: int = 20):
        super().__init__()
        self.num_classes, self.top_k = num_classes, top_k
        self.body = nn.Sequential(nn.Conv2d(3, 16, 4, 4), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 4, 4), nn.ReLU())
        self.cls = nn.Conv2d(32, num_classes, 1)
        self.box = nn.Conv2d(32, 4, 1)
        self.feature_projector = nn.Linear(32, 64)  # training-only, like the DSI projector

    def forward(self, images, orig_target_sizes):
        f = self.body(images)
        if self.training:
            return self.feature_projector(f.flatten(2).transpose(1, 2))
        logits = self.cls(f).flatten(2).transpose(1, 2)            # [B,Q,C]
        cxcywh = self.box(f).flatten(2).transpose(1, 2).sigmoid()  # [B,Q,4]
        xyxy = torch.cat([cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2], -1)
        xyxy = xyxy * orig_target_sizes.repeat(1, 2)[:, None].to(xyxy.dtype)
        scores, idx = logits.sigmoid().flatten(1).topk(self.top_k, dim=1)
        labels = idx % self.num_classes
        boxes = xyxy.gather(1, (idx // self.num_classes)[..., None].expand(-1, -1, 4))
        return labels, boxes, scores


def export_tiny(path, size=64):
    net = TinyDeployNet().eval()
    images, sizes = onnx_check.random_inputs(2, size)
    torch.onnx.export(net, (images, sizes), str(path), input_names=["images", "orig_target_sizes"],
                      output_names=["labels", "boxes", "scores"], opset_version=17, dynamo=False,
                      dynamic_axes={"images": {0: "N"}, "orig_target_sizes": {0: "N"}})
    return net
