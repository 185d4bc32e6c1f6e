"""Training samples/s with the exact teacher cache vs the online teacher vs no distillation,
measured side by side in one run (same data, same steps, same machine state).

    python benchmarks/train_throughput.py --sizes s l --img-size 320 --steps 6

It writes an exact store of the first steps of one epoch of the trainer's plan first
(jobs.cache_teacher, in-process; MixUp and multi-scale as the plan draws them), then times the
same planned batches in each mode, stepped round-robin. Every cached target is an exact hit.
Timing excludes the first step (allocator and thread warm-up) and data loading (decode,
augmentation and the store read run in loader workers); the cache's dequantisation on the
device is timed. The target: the exact cache within 3% of no distillation.
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
from pipeline.train.trainer import TrainConfig, Trainer  # noqa: E402


def prepared(cfg: TrainConfig, steps: int, epoch: int):
    """A trainer and the first ``steps`` planned batches of ``epoch`` (the cached ones)."""
    trainer = Trainer(cfg)
    trainer.model.train()
    batches = [b for b, _ in zip(trainer.data.train_loader(epoch), range(steps))]
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
    p.add_argument("--epoch", type=int, default=1, help="the epoch timed (1 of 8: mosaic phase, MixUp on)")
    p.add_argument("--vfm", default="dinov3_vitb")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {device}; teacher {args.vfm} (random init), {args.img_size}px, batch {args.batch_size}, "
          f"{args.steps - 1} timed steps")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            store = f"{tmp}/cache_{size}"
            # the first block of the timed epoch holds exactly the timed steps
            cache_teacher.main(["--vfm", args.vfm, "--out", store, "--size", size, "--epochs", str(args.epochs),
                                "--input-size", str(args.img_size), "--global-batch", str(args.batch_size),
                                "--steps-per-block", str(args.steps), "--no-ray", "--quiet", "--only-epochs",
                                str(args.epoch), "--max-shards", "1"])
            base = dict(size=size, epochs=args.epochs, img_size=args.img_size, batch_size=args.batch_size,
                        workers=0, vfm=args.vfm, out=f"{tmp}/run_{size}")
            epoch = args.epoch
            runs = {"none": prepared(TrainConfig(distill="none", **base), args.steps, epoch),
                    "online": prepared(TrainConfig(distill="dsi", **base), args.steps, epoch),
                    "cache": prepared(TrainConfig(distill="dsi", cache=store, **base), args.steps, epoch)}
            rate = round_robin(runs, args.batch_size)
            none, online, cached = rate["none"], rate["online"], rate["cache"]
            hits = runs["cache"][0].data.teacher_stats()["cache_exact_rate"]
            mixed = sum(b[2].mixup for b in runs["cache"][1])
            print(f"[{size}] samples/s  none {none:.3f} | online teacher {online:.3f} | exact cache {cached:.3f} "
                  f"(exact hits {hits:.0%}; {mixed} of {len(runs['cache'][1])} timed steps MixUp)")
            print(f"[{size}] cost of distillation: online {none / online - 1:+.1%}, cache {none / cached - 1:+.1%}; "
                  f"cache speed-up over online x{cached / online:.2f}")

if __name__ == "__main__":
    main()
