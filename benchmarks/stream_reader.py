"""Streaming reader (WebDataset shards) vs the map-style dataset, both with the full augmentation.

Measured side by side in one run on the TACO images (or any --data):
  1. JPEG decode: torchvision ``decode_image`` (what the pipeline uses) vs PIL, per image;
  2. decode share of the per-sample time with the full training augmentation (one process,
     phase 2 = mosaic epochs and phase 3 = no-mosaic epochs), for the map-style and the stream path;
  3. samples/s through a DataLoader with the same workers: map-style ``AugmentedDataset`` vs
     ``ShardStream(mode="train")``, augmented and plain (decode only), both drawing with replacement
     so that epochs longer than the data set amortise the shuffle buffer as in real training.

    python -m benchmarks.stream_reader [--data ../shared/data/taco_val] [--workers 2] [--samples 225]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from itertools import islice
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image

import pipeline.data.dataset
import pipeline.data.shards
from pipeline.data.augment import AugmentedDataset
from pipeline.data.load import load_dataset
from pipeline.data.policy import AugPolicy
from pipeline.data.shards import ShardStream, write_shards

warnings.filterwarnings("ignore", category=DeprecationWarning)
TACO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taco_val"


def keep(batch):
    return batch


def per_image_ms(fn, blobs) -> float:
    start = time.perf_counter()
    for b in blobs:
        fn(b)
    return (time.perf_counter() - start) / len(blobs) * 1e3


def decode_tv(data: bytes):
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_pil(data: bytes):
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


class DecodeTimer:
    """Wraps ``pipeline.data.dataset.decode`` (used by the dataset and the stream) to time it."""

    def __init__(self):
        self.seconds, self.calls, self.original = 0.0, 0, pipeline.data.dataset.decode

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.original(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def __enter__(self):
        pipeline.data.dataset.decode = pipeline.data.shards.decode = self
        return self

    def __exit__(self, *exc):
        pipeline.data.dataset.decode = pipeline.data.shards.decode = self.original


def samples_per_second(loader, n: int) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch)
    assert count == n, (count, n)
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(TACO))
    ap.add_argument("--split", default="val")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=900,
                    help="samples per measured epoch, decode only (drawn with replacement, as resampled shards)")
    ap.add_argument("--aug-samples", type=int, default=96, help="samples per measured epoch (augmented)")
    ap.add_argument("--repeats", type=int, default=2, help="loader runs per path, alternating; the best counts")
    ap.add_argument("--shard-size", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as inside DataLoader workers

    dataset = load_dataset(args.data, split=args.split)
    n = args.samples
    blobs = [dataset.raw(i)[0] for i in range(len(dataset))]
    decode_tv(blobs[0]), decode_pil(blobs[0])
    tv_ms, pil_ms = per_image_ms(decode_tv, blobs), per_image_ms(decode_pil, blobs)
    print(f"{dataset!r}, {args.workers} workers")
    print(f"decode per image: torchvision {tv_ms:.2f} ms, PIL {pil_ms:.2f} ms -> PIL/torchvision {pil_ms / tv_ms:.2f}x")

    policy = AugPolicy()
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(dataset, tmp, shard_size=args.shard_size, progress=False)
        m = min(args.aug_samples, len(dataset))  # single process: the same first m samples on both paths
        for epoch, name in ((policy.epochs[0], "phase 2 (mosaic)"), (policy.epochs[1], "phase 3")):
            mapped = AugmentedDataset(dataset, policy, seed=0)
            stream = ShardStream(tmp, rank=0, world_size=1, policy=policy, epoch=epoch)  # in order
            for label, items in (("map-style", lambda: (mapped[(epoch, i)] for i in range(m))),
                                 ("stream", lambda: islice(stream, m))):
                with DecodeTimer() as timer:
                    start = time.perf_counter()
                    for _ in items():
                        pass
                    total = time.perf_counter() - start
                print(f"{name:>17} {label:>9}: {total / m * 1e3:6.1f} ms/sample, "
                      f"{timer.calls / m:.2f} decodes/sample, decode share {timer.seconds / total:.0%}")

        epoch = policy.epochs[0]
        kw = dict(batch_size=8, num_workers=args.workers, collate_fn=keep)
        for aug in (True, False):
            k = m if aug else n
            mapped = AugmentedDataset(dataset, policy, seed=0) if aug else dataset
            if aug:
                mapped.set_epoch(epoch)
            sampler = torch.utils.data.RandomSampler(range(len(dataset)), replacement=True, num_samples=k,
                                                     generator=torch.Generator().manual_seed(0))
            loaders = {"map-style": DataLoader(mapped, sampler=sampler, **kw)}
            for buffer in (None, 0):  # default sample shuffle buffer, and none (raw tar-reading cost)
                stream = ShardStream(tmp, mode="train", policy=policy if aug else None, rank=0, world_size=1,
                                     epoch=epoch, samples_per_epoch=k, shuffle_buffer=buffer)
                loaders[f"stream (buffer {stream.shuffle_buffer})"] = DataLoader(stream, **kw)
            runs = [{name: samples_per_second(loader, k) for name, loader in loaders.items()}
                    for _ in range(args.repeats)]
            best = {name: max(r[name] for r in runs) for name in loaders}
            print(f"{'full augmentation (mosaic phase)' if aug else 'decode only'}, {k} samples:")
            for name, rate in best.items():
                print(f"  {name:>20}: {rate:6.1f} samples/s -> {rate / best['map-style']:.2f}x map-style")

if __name__ == "__main__":
    main()
