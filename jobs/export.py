"""Export RT-DETRv4 for deployment: ONNX (checked against torch with onnxruntime) and, where
TensorRT and a CUDA GPU exist, a TensorRT engine.

    python -m jobs.export --size l --checkpoint runs/l/best.pth --out export/
    python -m jobs.export --size s --engine --fp16        # + TensorRT engine (GPU machine)

The ONNX graph has the official interface (tools/deployment/export_onnx.py): inputs `images`
[N,3,H,W] in [0,1] and `orig_target_sizes` [N,2] (w,h); outputs `labels`, `boxes` (xyxy pixels of
the original image), `scores`; postprocessing inside the graph; dynamic N. Then, without this
job, `trtexec --onnx=rtdetrv4_l.onnx --saveEngine=rtdetrv4_l.engine --fp16` also works.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import deploy_onnx
from pipeline.deploy_backends import OnnxRuntimeBackend, TorchBackend
from pipeline.trt_engine import build_engine, image_profile, tensorrt_status

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
    from detector import build_detector
    from detector.deploy import DeployModel
    from detector.postprocessor import PostProcessor

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found; pass --checkpoint PATH or omit it "
                                f"to export random weights")
    if checkpoint is not None and num_classes is None:
        num_classes = _checkpoint_num_classes(checkpoint)
    num_classes = num_classes or 80
    model = build_detector(size, num_classes=num_classes)
    if checkpoint is not None:
        from detector.checkpoint import load_checkpoint
        load_checkpoint(model, checkpoint)
    graph = DeployModel(model.deploy(), PostProcessor(num_classes=num_classes)).eval()
    return Built(graph, size, num_classes, checkpoint or "random weights")


def _checkpoint_state(path: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict):
        return {}
    state = (ckpt.get("ema") or {}).get("module") or ckpt.get("model") or ckpt
    return {k.removeprefix("module."): v for k, v in state.items()}


def _checkpoint_num_classes(path: str) -> int:
    """Number of classes from the encoder score head of a checkpoint (EMA or model state)."""
    head = _checkpoint_state(path).get("decoder.enc_score_head.weight")
    if head is None:
        raise ValueError(f"{path}: no decoder.enc_score_head.weight to read the class count from; pass --num-classes")
    return int(head.shape[0])


def checkpoint_size(path: str) -> str:
    """Detector size (s/m/l/x) of a checkpoint, from its tensor shapes."""
    from detector.checkpoint import detect_size
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
    from detector.deploy import export_onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # detector.deploy's own check compares outputs index by index; ours pairs near-tied top-k entries
    export_onnx(built.graph.model, built.graph.postprocessor, path, size=image_size, opset=opset,
                dynamic_batch=True, check=False)
    summary = deploy_onnx.check_interface(path)
    images, sizes = deploy_onnx.random_inputs(2, image_size, orig_size=(800, 600))
    parity = deploy_onnx.compare_outputs(TorchBackend(built.graph).detections(images, sizes),
                                         OnnxRuntimeBackend(path, threads=threads).detections(images, sizes),
                                         reference="torch fp32 cpu", candidate="onnxruntime fp32 cpu")
    parts = sorted(set(deploy_onnx.training_only_parts(path)) | set(training_only_modules(built.graph)))
    return {"onnx": str(path), "graph": summary, "parity": parity.to_dict(),
            "parity_ok": parity.max_abs_diff_boxes <= PARITY_TOL and parity.max_abs_diff_scores <= PARITY_TOL,
            "training_only_parts": parts}


def training_only_modules(module: nn.Module) -> list[str]:
    """Parameter and buffer names of a torch module that belong to training-only parts (DSI projector, teacher)."""
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    return [n for n in names if any(p in n.lower() for p in deploy_onnx.TRAINING_ONLY)]


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["s", "m", "l", "x"], help="default: detected from --checkpoint")
    p.add_argument("--checkpoint", help="training checkpoint (EMA weights used when present); random weights if omitted")
    p.add_argument("--num-classes", type=int, help="default: read from the checkpoint, else 80")
    p.add_argument("--out", default="export", help="output folder")
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--opset", type=int, default=17, help="17 (TorchScript exporter; 18+ needs onnxscript)")
    p.add_argument("--engine", action="store_true", help="also build a TensorRT engine (needs tensorrt + CUDA)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="engine precision")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the engine's dynamic profile")
    p.add_argument("--fp32-layers", nargs="*", default=[],
                   help="pin TensorRT layers whose name contains these strings to fp32 (FP16 accuracy fix)")
    p.add_argument("--no-tf32", action="store_true", help="disable TF32 in the engine (D-FINE #44 fix)")
    args = p.parse_args(argv)

    if args.size is None:
        if args.checkpoint is None:
            p.error("give --size (random weights) or --checkpoint")
        args.size = checkpoint_size(args.checkpoint)
    built = build_deploy_graph(args.size, args.checkpoint, args.num_classes)
    out = Path(args.out)
    info = export_onnx_checked(built, out / f"rtdetrv4_{args.size}.onnx", args.image_size, args.opset)
    par = info["parity"]
    print(f"ONNX: {info['onnx']} ({built.source}, {built.num_classes} classes, {info['graph']['nodes']} nodes)")
    print(f"onnxruntime vs torch: max abs diff boxes {par['max_abs_diff_boxes']:.2e} px, "
          f"scores {par['max_abs_diff_scores']:.2e}, labels agree {par['label_agreement']:.3f} "
          f"-> {'OK' if info['parity_ok'] else f'FAILED (tolerance {PARITY_TOL})'}")
    print(f"training-only parts in the deploy graph: {info['training_only_parts'] or 'none'}")
    if args.engine:
        engine, msg = maybe_build_engine(info["onnx"], args.image_size, args.fp16, args.max_batch,
                                         out / "engines", tuple(args.fp32_layers), tf32=not args.no_tf32)
        info["engine"] = str(engine) if engine else None
        print(msg)
    (out / f"rtdetrv4_{args.size}.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    if not info["parity_ok"]:
        raise SystemExit(f"onnxruntime output differs from torch by more than {PARITY_TOL}; see {out}")
    return info


if __name__ == "__main__":
    main()
