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
import sys
from pathlib import Path

from pipeline import cli
from pipeline.cli import parser


def main(argv=None) -> dict:
    p = parser("jobs.export", __doc__)
    p.add_argument("--size", choices=["s", "m", "l", "x"], help="None: detected from --checkpoint")
    p.add_argument("--checkpoint", help="training checkpoint (EMA weights used when present); random weights if omitted")
    p.add_argument("--num-classes", type=int, help="None: read from the checkpoint, else 80")
    p.add_argument("--out", default="export", help="output folder")
    p.add_argument("--image-size", type=int, default=640, help="network input size")
    p.add_argument("--opset", type=int, default=17, help="17 (TorchScript exporter; 18+ needs onnxscript)")
    p.add_argument("--engine", action="store_true", help="also build a TensorRT engine (needs tensorrt + CUDA)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="engine precision")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the engine's dynamic profile")
    p.add_argument("--fp32-layers", nargs="*", default=[],
                   help="pin TensorRT layers whose name contains these strings to fp32 (FP16 accuracy fix)")
    p.add_argument("--no-tf32", action="store_true", help="disable TF32 in the engine (D-FINE #44 fix)")
    args = p.parse_args(argv)   # before the heavy imports: --help answers at once
    from pipeline.deploy.graph import (PARITY_TOL, build_deploy_graph, checkpoint_size, export_onnx_checked,
                                       maybe_build_engine)

    cli.writable_folder(args.out)   # before the model is built: an unusable --out is named at once
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
    sys.exit(cli.run("jobs.export", main))
