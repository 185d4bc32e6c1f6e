"""Deploy graph and ONNX export (official tools/deployment/export_onnx.py behaviour).

The exported graph is model.deploy() + postprocessor.deploy(): inputs `images` [N,3,S,S] float in
[0,1] (not normalised) and `orig_target_sizes` [N,2] int64 as (w, h); outputs `labels` [N,K] int64,
`boxes` [N,K,4] xyxy in original-image pixels and `scores` [N,K], K = num_top_queries. Sigmoid,
top-k and box scaling are inside the graph; there is no NMS. Then e.g.
`trtexec --onnx=model.onnx --saveEngine=model.engine --fp16`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class DeployModel(nn.Module):
    """(images, orig_target_sizes) -> (labels, boxes, scores): the official export wrapper."""

    def __init__(self, model: nn.Module, postprocessor: nn.Module):
        super().__init__()
        self.model = model if getattr(model, "deployed", False) else copy.deepcopy(model).deploy()
        self.postprocessor = copy.deepcopy(postprocessor).deploy()

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor):
        return self.postprocessor(self.model(images), orig_target_sizes)


@dataclass
class ExportReport:
    path: Path
    size: int
    opset: int
    max_abs_diff: dict  # onnxruntime vs torch deploy graph on the check input (detection_differences)


def export_onnx(model: nn.Module, postprocessor: nn.Module, path: str | Path, size: int = 640, opset: int = 17,
                dynamic_batch: bool = True, check: bool = True) -> ExportReport:
    """Export the deploy graph at a fixed `size` x `size` input (TorchScript exporter, dynamo=False).

    The model is copied, so the caller's model is not converted. With `check`, the file is validated
    with onnx.checker and run in onnxruntime on a random batch (2 images when the batch is dynamic);
    the report holds the max |onnxruntime - torch| per output ("labels": detections without an equal
    partner; see detection_differences).
    """
    if size % 32:
        raise ValueError(f"export size must be a multiple of 32, got {size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = DeployModel(model, postprocessor).eval()
    # a dynamic graph is traced at batch 2 so that batch-dependent ops (anchor repeat) are traced as such;
    # a static one is a batch-1 graph
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, size, size, generator=g)
    sizes = torch.tensor([[size, size], [2 * size, size]], dtype=torch.int64)
    if not dynamic_batch:
        images, sizes = images[:1], sizes[:1]
    axes = {"images": {0: "N"}, "orig_target_sizes": {0: "N"}, "labels": {0: "N"}, "boxes": {0: "N"},
            "scores": {0: "N"}} if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(net, (images, sizes), str(path), input_names=["images", "orig_target_sizes"],
                          output_names=["labels", "boxes", "scores"], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    declare_output_shapes(path, net.postprocessor.num_top_queries, "N" if dynamic_batch else 1)
    diffs = {}
    if check:
        diffs = check_onnx(net, path, images, sizes)
    return ExportReport(path=path, size=size, opset=opset, max_abs_diff=diffs)


def declare_output_shapes(path: Path, k: int, batch: str | int) -> None:
    """Declare labels [batch,K], boxes [batch,K,4], scores [batch,K] on the graph outputs of `path`.

    The TorchScript exporter names its own symbols for the top-k axis and even puts the batch symbol
    on the box axis (`[N, GatherElementsboxes_dim_1, N]`), and onnx shape inference cannot recover
    them through the decoder's computed reshapes; serving tools and engine builders read these
    declarations. strict shape inference afterwards checks they agree with every inferable node.
    """
    import onnx

    proto = onnx.load(str(path))
    want = {"labels": [batch, k], "boxes": [batch, k, 4], "scores": [batch, k]}
    for out in proto.graph.output:
        shape = out.type.tensor_type.shape
        shape.ClearField("dim")
        for d in want[out.name]:
            dim = shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.save(proto, str(path))


def check_onnx(net: nn.Module, path: Path, images: torch.Tensor, sizes: torch.Tensor) -> dict:
    """onnx.checker + onnxruntime run; returns max abs differences to the torch deploy graph."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    with torch.no_grad():
        want = net(images, sizes)
    return detection_differences([torch.from_numpy(g) for g in got], want)


def detection_differences(got, want, tie_atol: float = 1e-5) -> dict:
    """Max |got - want| of (labels, boxes, scores) from two top-k postprocessors, robust to ties.

    Scores are sorted, so they are compared rank by rank. Two detections whose scores differ by less
    than float rounding may come out in either order, so each detection of `got` is matched to the
    detection of `want` with the same label and a score within `tie_atol` that has the closest box;
    "labels" counts detections with no such partner.
    """
    (gl, gb, gs), (wl, wb, ws) = got, want
    score_diff = float((gs.double() - ws.double()).abs().max())
    unmatched, box_diff = 0, 0.0
    for b in range(gl.shape[0]):
        near = (gs[b, :, None].double() - ws[b, None, :].double()).abs() <= tie_atol + score_diff
        near &= gl[b, :, None] == wl[b, None, :]
        dist = (gb[b, :, None, :].double() - wb[b, None, :, :].double()).abs().amax(-1)
        dist = torch.where(near, dist, torch.inf).amin(-1)
        unmatched += int(torch.isinf(dist).sum())
        box_diff = max(box_diff, float(dist[torch.isfinite(dist)].max()) if torch.isfinite(dist).any() else 0.0)
    return {"labels": unmatched, "boxes": box_diff, "scores": score_diff}
