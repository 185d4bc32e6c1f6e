"""Write a COCO or YOLO dataset (or the generated default) as WebDataset tar shards.

    python -m jobs.make_shards --data /data/coco --split train --out /data/shards/coco-train
    python -m jobs.make_shards --out shards/synthetic       # the embedded synthetic dataset

Resumable: run the same command again after an interruption; complete shards are kept. The
output directory holds shard-NNNNNN.tar, manifest.json (counts, classes, label -> category id
map, content hash) and index.json (member offsets for random access). Copy the directory to
object storage as is to stream it from s3:// or gs:// URLs.
"""
from __future__ import annotations

import argparse
import json

from pipeline.cli import parser


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser("jobs.make_shards", __doc__)
    ap.add_argument("--data", default=None,
                    help="YOLO dir / data.yaml, COCO json or COCO dir; omitted: the generated default dataset")
    ap.add_argument("--out", required=True, help="output directory or fsspec URL, e.g. s3://bucket/shards (created; reused to resume)")
    ap.add_argument("--split", default="train", help="split to write (a YOLO yaml key or a COCO split)")
    ap.add_argument("--shard-size", type=int, default=250,
                    help="samples per shard; small shards mix better under DDP")
    ap.add_argument("--image-root", default=None, help="image folder of a COCO json (None: guessed)")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="bad images/labels: stop with the file named (raise) or drop and report them (skip)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)   # before the heavy imports: --help answers at once
    from pipeline.data.load import load_dataset
    from pipeline.data.shards import write_shards

    try:   # every image is decoded once: an undecodable one stops the job (raise) or is dropped (skip)
        dataset = load_dataset(args.data, split=args.split, on_error=args.on_error, image_root=args.image_root,
                               verify_images=True)
    except ValueError as e:   # DatasetError names the file or folder and the fix
        raise SystemExit(f"error: {e}") from None
    if dataset.bad_samples:
        print(dataset.bad_samples.summary())
    try:
        manifest = write_shards(dataset, args.out, shard_size=args.shard_size)
    except ValueError as e:   # DatasetError / StoreError: they name the location and the fix
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: manifest[k] for k in ("num_samples", "num_shards", "shard_size", "dataset_hash")}))
    print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shards to {args.out}")
    return manifest


if __name__ == "__main__":
    main()
