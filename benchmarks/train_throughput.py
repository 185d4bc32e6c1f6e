"""Training samples/s with the teacher-feature cache vs the online teacher vs no distillation,
measured side by side in one run (same data, same steps, same machine state).

    python benchmarks/train_throughput.py --sizes s l --img-size 320 --steps 6

It caches the benchmark's images of the embedded dataset first (jobs.cache_teacher, in-process,
the plan of the trainer's recipe), then times the same batches of a phase-3 epoch (no MixUp, so
every sample is a cache hit) in each mode. Timing excludes the first step (allocator and thread
warm-up) and data loading (decode, augmentation and the store read run in loader workers). The target: with the cache, distillation costs <= 5% over none.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from jobs import cache_teacher  # noqa: E402
from pipeline.train.recipe import get_recipe  # noqa: E402
from pipeline.train.trainer import TrainConfig, Trainer, scale_recipe  # noqa: E402


def prepared(cfg: TrainConfig, steps: int, epoch: int):
    """A trainer and ``steps`` collated batches of images 0.. (the cached ones) at ``epoch``."""
    trainer = Trainer(cfg)
    trainer.model.train()
    items, collate, bs = trainer.data.train_items, trainer.data.collate, cfg.batch_size
    collate.set_epoch(epoch)
    batches = [collate([items[(epoch, i)] for i in range(b * bs, (b + 1) * bs)]) for b in range(steps)]
    trainer.train_step(*batches[0])                                            # warm-up
    trainer.data.teacher_stats()
    return trainer, batches[1:]


def round_robin(runs: dict, batch_size: int) -> dict:
    """Step every mode in turn so that load from other processes hits all of them alike."""
    spent = dict.fromkeys(runs, 0.0)
    order = list(runs)
    for step in range(len(next(iter(runs.values()))[1])):
        order = order[1:] + order[:1]        # rotate who goes first: no mode always follows another
        for mode in order:
            trainer, batches = runs[mode]
            t0 = time.perf_counter()
            trainer.train_step(*batches[step])
            spent[mode] += time.perf_counter() - t0
    n = len(next(iter(runs.values()))[1]) * batch_size
    return {mode: n / t for mode, t in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["s", "l"])
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="batches per mode, the first one untimed")
    p.add_argument("--epochs", type=int, default=8, help="scaled recipe length (every phase present)")
    p.add_argument("--vfm", default="dinov3_vitb")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {device}; teacher {args.vfm} (random init), {args.img_size}px, batch {args.batch_size}, "
          f"{args.steps - 1} timed steps")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            recipe = scale_recipe(get_recipe(size), args.epochs)
            store = f"{tmp}/cache_{size}"
            shard = args.steps * args.batch_size   # the benchmark's images 0..shard-1 are all cached
            cache_teacher.main(["--vfm", args.vfm, "--out", store, "--size", size, "--epochs", str(args.epochs),
                                "--input-size", str(args.img_size), "--views", "2", "--shard-size", str(shard),
                                "--max-shards", "1", "--no-ray", "--quiet"])
            base = dict(size=size, epochs=args.epochs, img_size=args.img_size, batch_size=args.batch_size,
                        workers=0, vfm=args.vfm, out=f"{tmp}/run_{size}")
            epoch = recipe.policy_epochs[1]        # phase 3: zoom-out/IoU crop, no MixUp
            runs = {"none": prepared(TrainConfig(distill="none", **base), args.steps, epoch),
                    "online": prepared(TrainConfig(distill="dsi", **base), args.steps, epoch),
                    "cache": prepared(TrainConfig(distill="dsi", cache=store, **base), args.steps, epoch)}
            rate = round_robin(runs, args.batch_size)
            none, online, cached = rate["none"], rate["online"], rate["cache"]
            hits = runs["cache"][0].data.teacher_stats()["cache_hit_rate"]
            print(f"[{size}] samples/s  none {none:.3f} | online teacher {online:.3f} | cache {cached:.3f} "
                  f"(hit rate {hits:.0%})")
            print(f"[{size}] cost of distillation: online {none / online - 1:+.1%}, cache {none / cached - 1:+.1%}; "
                  f"cache speed-up over online x{cached / online:.2f}")

if __name__ == "__main__":
    main()
