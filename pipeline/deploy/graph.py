"""The deploy graph of a checkpoint (fused, eval layer only, postprocessor inside), its ONNX
export with interface/parity checks, and the optional TensorRT engine build."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from detector import build_detector
from detector.checkpoint import extract_state, detect_size, load_checkpoint, read_checkpoint
from detector.deploy import DeployModel, export_onnx
from detector.postprocessor import PostProcessor
from pipeline.deploy import onnx_check
from pipeline.deploy.backends import OnnxRuntimeBackend, TorchBackend
from pipeline.deploy.compare import compare_detections
from pipeline.deploy.trt_engine import build_engine, image_profile, tensorrt_status

PARITY_TOL = 1e-3  # max abs diff on boxes (pixels) and scores after postprocessing


@dataclass
class Built:
    graph: nn.Module  # detector.deploy.DeployModel: (images, orig_target_sizes) -> (labels, boxes, scores)
    size: str
    num_classes: int
    source: str  # checkpoint path or "random weights"


def build_deploy_graph(size: str, checkpoint: str | None = None, num_classes: int | None = None) -> Built:
    """The deploy-mode detector (fused, eval layer only) with its postprocessor, from a checkpoint
    (EMA weights preferred, as official) or from random weights."""
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found; pass --checkpoint PATH or omit it "
                                f"to export random weights")
    if checkpoint is not None and num_classes is None:
        num_classes = _checkpoint_num_classes(checkpoint)
    num_classes = num_classes or 80
    model = build_detector(size, num_classes=num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    graph = DeployModel(model.deploy(), PostProcessor(num_classes=num_classes)).eval()
    return Built(graph, size, num_classes, checkpoint or "random weights")


def _checkpoint_state(path: str) -> dict:
    """The detector weights of a checkpoint (EMA preferred); a file that is not a readable, intact
    RT-DETRv4 checkpoint is refused with its path named (detector.checkpoint.read_checkpoint)."""
    state, _ = extract_state(read_checkpoint(path), str(path))
    return {k.removeprefix("module."): v for k, v in state.items()}


def _checkpoint_num_classes(path: str) -> int:
    """Number of classes from the encoder score head of a checkpoint (EMA or model state)."""
    head = _checkpoint_state(path).get("decoder.enc_score_head.weight")
    if head is None:
        raise ValueError(f"{path}: no decoder.enc_score_head.weight to read the class count from; pass --num-classes")
    return int(head.shape[0])


def checkpoint_size(path: str) -> str:
    """Detector size (s/m/l/x) of a checkpoint, from its tensor shapes."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    size = detect_size(_checkpoint_state(path))
    if size is None:
        raise ValueError(f"{path}: cannot tell the RT-DETRv4 size from its weights; pass --size")
    return size


def export_onnx_checked(built: Built, path: str | Path, image_size: int = 640, opset: int = 17,
                        threads: int = 2) -> dict:
    """Export to ONNX, check the interface, the absence of training-only parts and onnxruntime
    parity with torch (batch 2, non-square original size) after postprocessing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # detector.deploy's own check compares outputs index by index; ours pairs near-tied top-k entries
    export_onnx(built.graph.model, built.graph.postprocessor, path, size=image_size, opset=opset,
                dynamic_batch=True, check=False)
    summary = onnx_check.check_interface(path)
    images, sizes = onnx_check.random_inputs(2, image_size, orig_size=(800, 600))
    parity = compare_detections(TorchBackend(built.graph).detections(images, sizes),
                                OnnxRuntimeBackend(path, threads=threads).detections(images, sizes),
                                "torch fp32 cpu", "onnxruntime fp32 cpu", mode="parity")
    parts = sorted(set(onnx_check.training_only_parts(path)) | set(training_only_modules(built.graph)))
    return {"onnx": str(path), "graph": summary, "parity": parity.to_dict(),
            "parity_ok": parity.max_abs_diff_boxes <= PARITY_TOL and parity.max_abs_diff_scores <= PARITY_TOL,
            "training_only_parts": parts}


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, image_size: int = 128, steps: int = 3, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics from a few noise batches (then eval).

    A randomly initialised ResNet-50 keeps BN statistics (0, 1) that do not fit its activations,
    which then grow layer by layer until the encoder scores saturate: tied top-k scores make
    onnxruntime and torch keep different queries (hundreds of pixels apart) although the graphs are
    the same. Calibrated statistics keep activations O(1), so the export parity check means
    something for random weights too (with them: 1.2e-4 px). Latency does not depend on the values."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None   # cumulative average over the calibration batches
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        model(pixel_values=torch.rand(2, 3, image_size, image_size, generator=g))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def training_only_modules(module: nn.Module) -> list[str]:
    """Parameter and buffer names of a torch module that belong to training-only parts (DSI projector, teacher)."""
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    return [n for n in names if any(p in n.lower() for p in onnx_check.TRAINING_ONLY)]


def maybe_build_engine(onnx_path: str | Path, image_size: int, fp16: bool, max_batch: int = 32,
                       cache_dir: str | Path | None = None, fp32_layers: tuple[str, ...] = (),
                       tf32: bool = True) -> tuple[Path | None, str]:
    """(engine path, message): builds when tensorrt and CUDA are usable, else (None, what is missing)."""
    ok, why = tensorrt_status()
    if not ok:
        return None, f"no TensorRT engine: {why}"
    spec = image_profile(image_size, max_batch=max_batch, fp16=fp16, tf32=tf32, fp32_layers=tuple(fp32_layers))
    path = build_engine(onnx_path, spec, cache_dir=cache_dir)
    return path, f"TensorRT {spec.precision} engine: {path} ({why})"


def build_rtdetrv2_graph(weights: str | None = None, num_classes: int | None = None) -> Built:
    """The RT-CO-DETR student (RT-DETRv2-R50vd from transformers) with our postprocessor, from a
    local transformers directory or random weights (``jobs.benchmark_t4 --student rtdetrv2_r50``)."""
    import warnings

    from detector.rtdetrv2_student import build_rtdetrv2_student

    if weights is not None and num_classes is None:
        import json
        config = json.loads((Path(weights) / "config.json").read_text())
        num_classes = len(config.get("id2label") or {}) or int(config.get("num_labels", 80))
    num_classes = num_classes or 80
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # random weights are what a complexity/latency benchmark needs
        student = build_rtdetrv2_student(num_classes, weights=weights)
    if weights is None:
        calibrate_batchnorm(student.model)
    top = min(300, student.cfg.num_queries * num_classes)   # 300 as officially; fewer for tiny test models
    graph = DeployModel(student.deploy(), PostProcessor(num_classes=num_classes, num_top_queries=top)).eval()
    return Built(graph, "rtdetrv2_r50", num_classes, weights or "random weights")
