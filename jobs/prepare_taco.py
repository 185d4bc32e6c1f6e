"""Prepare TACO as the RT-CO-DETR paper did: perceptual de-duplication, 640x640, the authors' split.

    python -m jobs.prepare_taco --annotations TACO/data/annotations.json --images TACO/data --out data/taco \
        --val-list RT-CO-DETR/benchmark/benchmark_output/taco_yolo_for_eval/images/val

``--val-list`` names the authors' 225 validation images (the folder of their evaluation copy, whose
files are ``<image id>.jpg``, or a text file of image ids or file names); without it the split is a
seeded 85/15 shuffle (for other data; on TACO it shares about 30 val images with the authors').

Writes COCO json (``OUT/annotations/instances_{train,val}.json`` with ``OUT/images/{train,val}``),
a YOLO directory (``OUT/yolo``) and ``OUT/prepare_report.json`` (the removed duplicates, the split
sizes). On the official 1,500-image release the split is 1,273 / 225 images.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.cli import parser


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser("jobs.prepare_taco", __doc__)
    ap.add_argument("--annotations", required=True, help="the official TACO annotations.json (COCO format)")
    ap.add_argument("--images", required=True, help="folder the json's file_name entries are relative to")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--size", type=int, default=640, help="square output size")
    ap.add_argument("--val-list", default=None,
                    help="the validation images: a folder of <image id>.jpg files (the authors' taco_yolo_for_eval/"
                         "images/val) or a text file of image ids or file names; the rest is train")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="fraction of the kept images in val (no "
                                                                     "--val-list)")
    ap.add_argument("--seed", type=int, default=0, help="split seed (no --val-list)")
    ap.add_argument("--max-distance", type=int, default=4,
                    help="perceptual-hash Hamming distance at or below which an image is a duplicate")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.data.dataset import DatasetError
    from pipeline.data.taco import prepare_taco

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        report = prepare_taco(args.annotations, args.images, args.out, size=args.size, val_fraction=args.val_fraction,
                              seed=args.seed, max_distance=args.max_distance, val_list=args.val_list)
    except DatasetError as e:   # names the file and the fix
        print(f"jobs.prepare_taco: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dict(duplicates_removed=len(report["duplicates_removed"]), splits=report["splits"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
