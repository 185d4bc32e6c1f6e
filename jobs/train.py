"""Train RT-DETRv4: ``torchrun [--nproc_per_node N] -m jobs.train --size {s,m,l,x} [...]``.

With no ``--data`` it trains on the embedded synthetic dataset; with no ``--weights`` the DINOv3
teacher is randomly initialised (a loud warning says so): both only for trying the pipeline out.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from pipeline.distributed import cleanup
from pipeline.trainer import TrainConfig, Trainer


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["s", "m", "l", "x"], default="s")
    p.add_argument("--data", help="COCO json/dir, YOLO dir (data.yaml) or a jobs.make_shards directory "
                                  "(default: the embedded synthetic dataset)")
    p.add_argument("--val-data", help="validation set (default: the val split of --data)")
    p.add_argument("--out", default="runs/train", help="checkpoints, metrics.jsonl, TensorBoard logs")
    p.add_argument("--epochs", type=int, help="default: the size's recipe; fewer epochs scale every milestone")
    p.add_argument("--batch-size", type=int, help="per process (default: 32 / world size)")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill", choices=["dsi", "codetr", "none"], default="dsi",
                   help="dsi: RT-DETRv4 (VFM teacher, DSI+GAM); codetr: RT-CO-DETR (detector teacher)")
    p.add_argument("--teacher-checkpoint", help="RT-CO-DETR teacher: a detector checkpoint (ours or official)")
    p.add_argument("--class-map", type=json.loads, help='RT-CO-DETR: JSON {"teacher_label": student_label}')
    p.add_argument("--pairing", choices=["hungarian", "index"], default="hungarian",
                   help="RT-CO-DETR query pairing (index = the reference implementation)")
    p.add_argument("--cache", help="teacher-feature store written by jobs.cache_teacher")
    p.add_argument("--vfm", default="dinov3_vitb", help="online teacher (fallback for views the cache lacks)")
    p.add_argument("--weights", help="local teacher weights (.pth / .safetensors)")
    p.add_argument("--teacher-precision", choices=["fp32", "bf16", "auto"], default="auto")
    p.add_argument("--static-lambda", action="store_true", help="disable GAM; keep the DSI weight fixed")
    p.add_argument("--distill-weight", type=float, help="initial (or static) DSI weight lambda")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", help="training checkpoint to continue exactly (e.g. OUT/last.pth)")
    g.add_argument("--finetune", help="weights to start from (ours or an official RT-DETRv4/DEIM .pth)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--max-bad-steps", type=int, default=20, help="stop after this many non-finite losses")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=0, help="also write last.pth every N steps")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap the epoch length (smoke runs)")
    p.add_argument("--eval-max-images", type=int)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    a = p.parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names}
    return TrainConfig(gam=not a.static_lambda, **kw)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    try:
        result = Trainer(cfg).fit()
    finally:
        cleanup()
    logging.getLogger("rtdetrv4.train").info("done: %s", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
