"""COCO box metrics of a detector checkpoint on a COCO or YOLO split.

    python -m jobs.evaluate --checkpoint model.pth --data /data/coco --split val2017 --size l --out runs/eval
    torchrun --nproc_per_node 8 -m jobs.evaluate --checkpoint model.pth --data /data/coco --split val2017

Images go through the official val transform (Resize 640x640, /255: ``AugmentedDataset(policy=None)``,
the view the trainer evaluates on); detections (top-300, no NMS, boxes not clipped to the image: the
official protocol, as the trainer's per-epoch evaluation; ``--clip-boxes`` scores them clipped, as
the deploy graph and ``jobs.predict`` output them) are scored against the dataset's ground truth in
original-image pixels (for a COCO source, the original annotation file, crowd boxes included).
Prints the COCO table and writes metrics.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline import cli
from pipeline.cli import parser


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser("jobs.evaluate", __doc__)
    ap.add_argument("--checkpoint", required=True, help="our or an official RT-DETRv4 checkpoint (.pth)")
    ap.add_argument("--data", default=None, help="YOLO dir / data.yaml, COCO json or dir (None: the embedded dataset)")
    ap.add_argument("--val-split", "--split", dest="split", default="val",
                    help="split to score: a YOLO yaml key (val, test, ...) or a COCO split (val2017)")
    ap.add_argument("--size", default="s", choices=("s", "m", "l", "x"), help="model size")
    ap.add_argument("--student", default="rtdetrv4", choices=("rtdetrv4", "rtdetrv2_r50"),
                    help="rtdetrv2_r50: a jobs.train --student rtdetrv2_r50 checkpoint or a transformers directory")
    ap.add_argument("--image-size", type=int, default=640, help="network input size")
    ap.add_argument("--batch-size", type=int, default=8, help="images per batch")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    ap.add_argument("--device", default=None, help="cpu or cuda (None: cuda when available)")
    ap.add_argument("--backend", default="faster-coco-eval", help="COCOeval: faster-coco-eval or pycocotools")
    ap.add_argument("--clip-boxes", action="store_true",
                    help="clip boxes to the image before scoring, as deployment outputs them (default: the "
                         "official protocol, unclipped; clipping can only raise AP)")
    ap.add_argument("--out", default=None, help="directory for metrics.json")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="bad images or labels: stop, naming the file (raise), or decode every image once first "
                         "and score the split without the bad ones, listed (skip; as every job's --on-error skip)")
    return ap.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)   # before the heavy imports: --help answers at once
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from detector import build_detector
    from detector.checkpoint import load_checkpoint
    from pipeline.data.augment import AugmentedDataset
    from pipeline.data.collate import stack_collate
    from pipeline.data.evaluate import CocoEvaluator, evaluate_detector, format_table, protocol_postprocessor
    from pipeline.data.load import load_dataset
    from pipeline.train.distributed import init_distributed

    if args.out:   # an unusable --out is named before any data or model is loaded
        cli.writable_folder(args.out)
    info = init_distributed(args.device)
    dataset = load_dataset(args.data, split=args.split, on_error=args.on_error, verify_images=args.on_error == "skip")
    num_classes = dataset.num_classes
    if args.student == "rtdetrv2_r50":
        from detector.rtdetrv2_student import load_rtdetrv2_student
        model, reinitialised = load_rtdetrv2_student(args.checkpoint, num_classes), False
    else:
        model = build_detector(args.size, num_classes=num_classes)
        reinitialised = load_checkpoint(model, args.checkpoint).reinitialised
    if reinitialised:
        raise ValueError(f"{args.checkpoint} was trained on a different number of classes than {dataset!r} "
                         f"({num_classes}); evaluating re-initialised class heads is meaningless. Fix: evaluate on "
                         "the data set the checkpoint was trained for.")
    model.to(info.device)

    val = AugmentedDataset(dataset, policy=None, size=args.image_size)  # the trainer's val view
    if args.limit:
        val = Subset(val, range(min(args.limit, len(val))))
    sampler = DistributedSampler(val, shuffle=False) if info.enabled else None
    loader = DataLoader(val, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=stack_collate)
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category_id, backend=args.backend)
    start = time.perf_counter()
    stats = evaluate_detector(model, protocol_postprocessor(num_classes, clip_boxes=args.clip_boxes), loader,
                              evaluator, info.device)
    seconds = time.perf_counter() - start
    if info.is_main:
        print(format_table(stats))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            record = {"stats": stats, "checkpoint": str(args.checkpoint), "data": str(args.data or "synthetic"),
                      "split": args.split, "size": args.size, "images": len(val), "backend": args.backend,
                      "clip_boxes": args.clip_boxes,
                      "seconds": round(seconds, 2),
                      "skipped": [{"file": f, "line": n, "problem": why} for f, n, why in dataset.bad_samples.problems]}
            (out / "metrics.json").write_text(json.dumps(record, indent=1))
            print(f"wrote {out / 'metrics.json'}")
    return stats


if __name__ == "__main__":
    sys.exit(cli.run("jobs.evaluate", main))
