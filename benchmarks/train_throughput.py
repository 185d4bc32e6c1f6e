"""Training samples/s with the teacher-feature cache vs the online teacher vs no distillation,
measured side by side in one run (same data, same steps, same machine state).

    python benchmarks/train_throughput.py --sizes s l --img-size 320 --steps 6

It builds a small cache of the embedded dataset first (jobs.cache_teacher, in-process), whose
plan matches the trainer's recipe. Timing excludes the first step (allocator and thread warm-up)
and the data loader's start. The target: with the cache, distillation costs <= 5% over none.
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
from pipeline.recipe import get_recipe  # noqa: E402
from pipeline.trainer import TrainConfig, Trainer, scale_recipe  # noqa: E402


def samples_per_s(cfg: TrainConfig, steps: int) -> float:
    trainer = Trainer(cfg)
    trainer.model.train()
    it = iter(trainer.data.train_loader(trainer.recipe.policy_epochs[0]))   # an augmented phase
    batches = [next(it) for _ in range(steps)]
    trainer.train_step(*batches[0])                                            # warm-up
    t0 = time.perf_counter()
    for images, targets, info in batches[1:]:
        trainer.train_step(images, targets, info)
    return (steps - 1) * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["s", "l"])
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
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
            cache_teacher.main(["--vfm", args.vfm, "--out", store, "--size", size, "--input-size", str(args.img_size),
                                "--policy-epochs", *map(str, recipe.policy_epochs), "--views", "2",
                                "--no-ray", "--quiet"])
            base = dict(size=size, epochs=args.epochs, img_size=args.img_size, batch_size=args.batch_size,
                        workers=0, vfm=args.vfm, out=f"{tmp}/run_{size}")
            none = samples_per_s(TrainConfig(distill="none", **base), args.steps)
            online = samples_per_s(TrainConfig(distill="dsi", **base), args.steps)
            cached = samples_per_s(TrainConfig(distill="dsi", cache=store, **base), args.steps)
            print(f"[{size}] samples/s  none {none:.3f} | online teacher {online:.3f} | cache {cached:.3f}")
            print(f"[{size}] cost of distillation: online {none / online - 1:+.1%}, cache {none / cached - 1:+.1%}; "
                  f"cache speed-up over online x{cached / online:.2f}")


if __name__ == "__main__":
    main()
