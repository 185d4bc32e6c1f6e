"""Prepare TACO as the RT-CO-DETR paper did: perceptual de-duplication, 640x640, seeded 85/15 split.

    python -m jobs.prepare_taco --annotations TACO/data/annotations.json --images TACO/data --out data/taco

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
    ap.add_argument("--val-fraction", type=float, default=0.15, help="fraction of the kept images in val")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--max-distance", type=int, default=4,
                    help="perceptual-hash Hamming distance at or below which an image is a duplicate")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.data.taco import prepare_taco

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    report = prepare_taco(args.annotations, args.images, args.out, size=args.size, val_fraction=args.val_fraction,
                          seed=args.seed, max_distance=args.max_distance)
    print(json.dumps(dict(duplicates_removed=len(report["duplicates_removed"]), splits=report["splits"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
