"""Checks on an exported deploy graph: interface and absence of training-only parts (parity with
torch: ``pipeline.deploy.compare.compare_detections(..., mode="parity")``).

The interface is the official one (tools/deployment/export_onnx.py): inputs `images` [N,3,H,W]
float in [0,1] and `orig_target_sizes` [N,2] (w,h) int64, outputs `labels`, `boxes` (xyxy
pixels), `scores`, postprocessing (sigmoid, top-k, scaling) inside the graph, dynamic N.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

# Name fragments of modules that exist only for training (DSI projector, VFM teacher).
TRAINING_ONLY = ("projector", "teacher", "dinov", "vfm")


def graph_summary(onnx_path: str | Path) -> dict:
    """Inputs/outputs with their (symbolic) shapes, opset, op-type counts and node count."""
    import onnx
    m = onnx.load(str(onnx_path), load_external_data=False)

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {"inputs": {i.name: shape(i) for i in m.graph.input},
            "outputs": {o.name: shape(o) for o in m.graph.output},
            "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(m.graph.node),
            "op_types": dict(Counter(n.op_type for n in m.graph.node).most_common())}


def training_only_parts(onnx_path: str | Path, patterns=TRAINING_ONLY) -> list[str]:
    """Node, initializer and value names of the graph that contain a training-only fragment."""
    import onnx
    m = onnx.load(str(onnx_path), load_external_data=False)
    names = [n.name for n in m.graph.node] + [i.name for i in m.graph.initializer]
    names += [o for n in m.graph.node for o in list(n.input) + list(n.output)]
    return sorted({n for n in names if any(p in n.lower() for p in patterns)})


def check_interface(onnx_path: str | Path) -> dict:
    """Raise if the graph is invalid (onnx.checker) or lacks the deploy interface; returns `graph_summary`."""
    import onnx
    onnx.checker.check_model(str(onnx_path))
    s = graph_summary(onnx_path)
    want_in, want_out = ["images", "orig_target_sizes"], ["labels", "boxes", "scores"]
    if list(s["inputs"]) != want_in or list(s["outputs"]) != want_out:
        raise ValueError(f"{onnx_path}: expected inputs {want_in} and outputs {want_out}, got "
                         f"{list(s['inputs'])} and {list(s['outputs'])}; re-export with jobs.export")
    batch_dims = [s["inputs"][n][0] for n in want_in]
    if any(isinstance(d, int) and d > 0 for d in batch_dims):
        raise ValueError(f"{onnx_path}: batch dimension is fixed ({batch_dims}); export with dynamic_batch=True")
    return s


def random_inputs(batch: int = 1, size: int = 640, seed: int = 0, orig_size: tuple[int, int] | None = None):
    """Deterministic images in [0,1] and (w,h) sizes for export checks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    w, h = orig_size or (size, size)
    return images, torch.tensor([[w, h]] * batch, dtype=torch.int64)
