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
import sys

from pipeline import cli
from pipeline.cli import parser


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser("jobs.make_shards", __doc__)
    ap.add_argument("--data", default=None,
                    help="YOLO dir / data.yaml, COCO json or COCO dir; omitted: the generated default dataset")
    ap.add_argument("--out", required=True, help="output directory or fsspec URL, e.g. s3://bucket/shards (created; reused to resume)")
    ap.add_argument("--split", default="train", help="split to write (a YOLO yaml key or a COCO split)")
    ap.add_argument("--shard-size", type=int, default=250,
                    help="samples per shard (training reads samples by byte range in the plan's order: the size "
                         "changes no batch, only the number of objects)")
    ap.add_argument("--image-root", default=None, help="image folder of a COCO json (None: guessed)")
    ap.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                    help="bad images or labels: stop with the file named (raise) or leave them out, listed (skip); "
                         "every image is decoded once first either way")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)   # before the heavy imports: --help answers at once
    from pipeline.data.load import load_dataset
    from pipeline.data.shards import write_shards

    cli.writable_folder(args.out)   # an unusable --out is named before any image is read (URLs: at the first write)
    # every image is decoded once: an undecodable one stops the job (raise) or is dropped (skip); a
    # DatasetError names the file or folder and the fix (one line through cli.run)
    dataset = load_dataset(args.data, split=args.split, on_error=args.on_error, image_root=args.image_root,
                           verify_images=True)
    if dataset.bad_samples:
        print(dataset.bad_samples.summary())
    manifest = write_shards(dataset, args.out, shard_size=args.shard_size)
    print(json.dumps({k: manifest[k] for k in ("num_samples", "num_shards", "shard_size", "dataset_hash")}))
    print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shards to {args.out}")
    return manifest


if __name__ == "__main__":
    sys.exit(cli.run("jobs.make_shards", main, on_interrupt="re-run the same command to continue: complete shards "
                     "are kept"))
