"""Training from WebDataset shards (byte-range reads that follow the plan) vs the map-style data set.

Measured side by side in one run on the TACO images (or any --data), both under the same
``TrainPlan`` (L recipe, global batch ``--batch``), through the trainer's own path (``PlanSampler``
+ ``PlanDataset`` + ``PlanCollate`` in a DataLoader with ``--workers`` workers):
  1. JPEG decode: torchvision ``decode_image`` (what the pipeline uses) vs PIL, per image;
  2. samples/s with the full augmentation, in a mosaic epoch and a no-mosaic epoch: the map-style
     data set vs ``ShardDataset`` (alternated, best of ``--repeats``; the batches are checked equal);
  3. the streamed path's I/O over one epoch, counted by its readers in one process: requests per
     step and bytes per epoch from the shards (the step's samples, then their mosaic partners), and
     from an exact store of the plan (filled with random int8 views of 768 channels, joined by
     (epoch, step, slot)); the request counts are the same on object storage (the same calls);
  4. decode only: a sequential pass (``ShardStream``, tar streaming) vs the map-style data set.

    python -m benchmarks.stream_reader [--data ../shared/data/taco_val] [--workers 2] [--batch 8]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image

from pipeline.data.load import load_dataset
from pipeline.data.plan import PlanCollate, PlanDataset, PlanSampler, TrainPlan
from pipeline.data.shards import ShardDataset, ShardStream, write_shards
from pipeline.train.recipe import resolve_recipe
from teacher_cache.exact import ExactStore

warnings.filterwarnings("ignore", category=DeprecationWarning)
TACO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taco_val"


def per_image_ms(fn, blobs) -> float:
    start = time.perf_counter()
    for b in blobs:
        fn(b)
    return (time.perf_counter() - start) / len(blobs) * 1e3


def decode_tv(data: bytes):
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_pil(data: bytes):
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def epoch_batches(dataset, plan: TrainPlan, epoch: int, workers: int, join=None) -> list:
    sampler = PlanSampler(plan)
    sampler.set_epoch(epoch)
    loader = DataLoader(PlanDataset(dataset, plan, join=join), batch_sampler=sampler, num_workers=workers,
                        collate_fn=PlanCollate(plan))
    return [(hashlib.sha256(images.numpy().tobytes()).hexdigest(), [t["key"] for t in targets], batch.size)
            for images, targets, batch in loader]


def fill_exact_store(url: str, plan: TrainPlan, epoch: int) -> ExactStore:
    """An exact store of ``plan`` whose ``epoch`` holds random int8 views (the reads, not the values, count)."""
    teacher = {"name": "bench", "arch": "bench", "embed_dim": 768, "weights_sha256": "0" * 64,
               "weights_source": "random-init", "protocol": {"precision": "fp32"}}
    store = ExactStore.create(url, teacher=teacher, plan=plan.to_dict(), plan_hash=plan.hash(), epochs=plan.epochs,
                              steps_per_epoch=plan.steps_per_epoch, global_batch=plan.global_batch,
                              dataset_hash=plan.dataset_hash, keys=[str(i) for i in range(plan.num_samples)],
                              grids=plan.grids())
    rng = np.random.default_rng(0)
    for b in range(store.blocks_per_epoch):
        views = []
        for s in store.block_steps(b):
            h, w = plan.grid(epoch, s)
            views += [(s, k, i, rng.integers(-127, 128, (h * w, 768), dtype=np.int8),
                       rng.random(h * w, dtype=np.float32).astype(np.float16), (h, w))
                      for k, i in enumerate(plan.samples(epoch, s))]
        store.write_block(epoch, b, views)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(TACO))
    ap.add_argument("--split", default="val")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="the plan's global batch")
    ap.add_argument("--repeats", type=int, default=2, help="loader runs per path, alternating; the best counts")
    ap.add_argument("--shard-size", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as inside DataLoader workers

    dataset = load_dataset(args.data, split=args.split)
    blobs = [dataset.raw(i)[0] for i in range(len(dataset))]
    decode_tv(blobs[0]), decode_pil(blobs[0])
    tv_ms, pil_ms = per_image_ms(decode_tv, blobs), per_image_ms(decode_pil, blobs)
    print(f"{dataset!r}, {args.workers} workers, global batch {args.batch}")
    print(f"decode per image: torchvision {tv_ms:.2f} ms, PIL {pil_ms:.2f} ms -> PIL/torchvision {pil_ms / tv_ms:.2f}x")

    recipe = resolve_recipe("l")
    plan = TrainPlan.from_recipe(recipe, len(dataset), args.batch, dataset_hash=dataset.content_hash())
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(dataset, tmp, shard_size=args.shard_size, progress=False)
        shard_bytes = sum(p.stat().st_size for p in Path(tmp).glob("shard-*.tar"))
        n = plan.steps_per_epoch * plan.global_batch
        for epoch, name in ((recipe.policy_epochs[0], "mosaic epoch"), (recipe.policy_epochs[1], "no-mosaic epoch")):
            rates = {"map-style": 0.0, "shards": 0.0}
            for _ in range(args.repeats):
                got = {}
                for label, source in (("map-style", dataset), ("shards", ShardDataset(tmp))):
                    start = time.perf_counter()
                    got[label] = epoch_batches(source, plan, epoch, args.workers)
                    rates[label] = max(rates[label], n / (time.perf_counter() - start))
                assert got["map-style"] == got["shards"]
            print(f"{name} {epoch}, full augmentation, {n} samples: map-style {rates['map-style']:.1f} samples/s, "
                  f"shards {rates['shards']:.1f} samples/s -> {rates['shards'] / rates['map-style']:.2f}x "
                  "(same batches)")

        for epoch, name in ((recipe.policy_epochs[0], "mosaic epoch"), (recipe.policy_epochs[1], "no-mosaic epoch")):
            reader = ShardDataset(tmp)
            store = fill_exact_store(f"{tmp}/exact_{epoch}", plan, epoch)
            store = ExactStore.open(store.url)
            epoch_batches(reader, plan, epoch, 0, join=store.join(strict=True))
            steps = plan.steps_per_epoch
            mosaics = sum(plan.aug_record(epoch, i, dataset.annotation(i)).mosaic is not None
                          for s in range(steps) for i in plan.samples(epoch, s))
            print(f"{name} {epoch}, I/O per epoch of {steps} steps x {plan.global_batch} (one rank; W ranks "
                  "split each step's requests):")
            print(f"  shards: {reader.io['requests'] / steps:.1f} ranged reads per step in 2 concurrent rounds "
                  f"(samples, then mosaic partners; {(n + 3 * mosaics) / steps:.1f} without the reuse a data set of "
                  f"{len(dataset)} images allows: {mosaics} mosaics x 3 partners), {reader.io['bytes'] / 1e6:.1f} MB "
                  f"per epoch = {reader.io['bytes'] / shard_bytes:.2f}x the shard set ({shard_bytes / 1e6:.1f} MB)")
            io_ = store.reader.io
            print(f"  exact store: {io_['requests'] / steps:.1f} requests per step (per step: 2 shard indexes + the "
                  f"views' ranges, adjacent ones merged; per block: marker + grid + sample chunks), "
                  f"{io_['bytes'] / 1e6:.1f} MB per epoch = {io_['bytes'] / n:,.0f} B per view")

        rates = {"map-style": 0.0, "ShardStream": 0.0}
        for _ in range(args.repeats):
            for label, source in (("map-style", dataset), ("ShardStream", ShardStream(tmp))):
                loader = DataLoader(source, batch_size=8, num_workers=args.workers, collate_fn=list)
                start, count = time.perf_counter(), 0
                for batch in loader:
                    count += len(batch)
                assert count == len(dataset)
                rates[label] = max(rates[label], count / (time.perf_counter() - start))
        print(f"decode only, one pass over {len(dataset)} samples: map-style {rates['map-style']:.1f} samples/s, "
              f"sequential ShardStream {rates['ShardStream']:.1f} -> {rates['ShardStream'] / rates['map-style']:.2f}x")


if __name__ == "__main__":
    main()
