"""A detector that learns on a CPU: RT-DETRv4-S from scratch on the embedded data set, AP per epoch.

    python -m benchmarks.convergence                     # 2 CPU cores: 16 epochs of 40 steps; val AP50 passed 0.5 at the 7th (docs/measured.md)
    python -m benchmarks.convergence --epochs 2 --steps-per-epoch 5 --train-images 64   # a quick look

``jobs.train``'s trainer (``pipeline.train.Trainer``) trains S from random weights, no teacher, on
``--train-images`` images drawn by the embedded data set's generator (the first 256 are the embedded
train split; more images are written once next to it, under ``$RTDETRV4_CACHE``), and evaluates its
EMA weights on the embedded 64 val images after every epoch of ``--steps-per-epoch`` steps. The
augmentation is ``--augment none`` (resize only): train and val come from one generator, so the
recipe's Mosaic / MixUp / multi-scale phases would only slow a short run down; the optimiser,
schedule (flat, then half the lr from the recipe's flat epoch on), EMA and criterion are the recipe's.

Prints one line per epoch (steps so far, minutes of training so far, the epoch's mean detection
loss, val AP / AP50 / AP75) and when val AP50 first reached ``--target``. The run folder
(``--out``, default a temporary one) keeps results.csv/png, eval.jsonl and the checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def training_images(n: int) -> str:
    """The annotation file of ``n`` generated training images (the embedded split when n <= 256: its
    first n; else a larger split from the same generator, written once next to it)."""
    from pipeline.data import synthetic
    root = synthetic.cache_root()
    if n > synthetic.SPLITS["train"]:
        root = root.with_name(f"{root.name}-train{n}")
        if not (root / "DONE").is_file():
            root.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
            synthetic.generate(tmp, splits={"train": n, "val": synthetic.SPLITS["val"]})   # val: the embedded one
            (tmp / "DONE").write_text(json.dumps({"version": synthetic.VERSION, "train": n}))
            try:
                tmp.rename(root)
            except OSError:   # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        return str(root / "annotations" / "instances_train.json")
    if n == synthetic.SPLITS["train"]:
        return str(synthetic.ensure_generated("train") / "annotations" / "instances_train.json")
    return synthetic.first_images(n, root.with_name(f"{root.name}-first{n}"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=16, help="evaluations (default: %(default)s)")
    p.add_argument("--steps-per-epoch", type=int, default=40, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--img-size", type=int, default=192, help="(default: %(default)s)")
    p.add_argument("--train-images", type=int, default=2048, help="generated training images (default: %(default)s)")
    p.add_argument("--eval-images", type=int, default=64, help="(default: %(default)s, the whole val split)")
    p.add_argument("--augment", default="none", choices=["none", "rtdetrv2", "rtdetrv4"],
                   help="(default: %(default)s; rtdetrv4: the recipe's phases compressed to --epochs)")
    p.add_argument("--lr", type=float, default=None, help="base lr (default: the recipe's, 4e-4)")
    p.add_argument("--target", type=float, default=0.5, help="the val AP50 to reach (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder to keep (default: a temporary one)")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    from pipeline.train.config import TrainConfig
    from pipeline.train.outputs import read_results
    from pipeline.train.trainer import Trainer
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = training_images(args.train_images)
    made = time.perf_counter() - t0
    tmp = None if args.out else tempfile.TemporaryDirectory()
    out = Path(args.out or tmp.name) / "convergence"
    cfg = TrainConfig(size="s", data=data, val_data="synthetic", distill="none", epochs=args.epochs,
                      max_steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, img_size=args.img_size,
                      augment=args.augment, lr=args.lr, eval_max_images=args.eval_images, workers=args.workers,
                      amp=args.amp, device=args.device, seed=args.seed, log_every=1, out=str(out), exist_ok=True)
    trainer = Trainer(cfg)
    trainer.fit()
    cols = read_results(out / "results.csv")
    lines = [f"RT-DETRv4-S from scratch on {args.train_images} generated images ({made:.0f} s to load or make them), "
             f"{args.img_size} px, batch {args.batch_size}, --augment {args.augment}, lr {trainer.recipe.lr:g}; "
             f"{trainer.dist.device}, {torch.get_num_threads()} threads",
             f"{'epoch':>5} {'steps':>6} {'minutes':>7} {'loss':>8} {'AP':>6} {'AP50':>6} {'AP75':>6}"]
    reached = None
    for i, epoch in enumerate(cols["epoch"]):
        ap50 = cols["val/AP50"][i]
        if reached is None and ap50 >= args.target:
            reached = (int(epoch), cols["time"][i] / 60)
        lines.append(f"{int(epoch):>5} {(int(epoch) + 1) * trainer.steps_per_epoch:>6} {cols['time'][i] / 60:>7.1f} "
                     f"{cols['train/loss'][i]:>8.3f} {cols['val/AP'][i]:>6.3f} {ap50:>6.3f} "
                     f"{cols['val/AP75'][i]:>6.3f}")
    lines.append(f"val AP50 >= {args.target}: "
                 + (f"first at epoch {reached[0]}, after {reached[1]:.1f} min of training" if reached
                    else f"not reached (best {max(cols['val/AP50']):.3f})"))
    print("\n".join(lines), flush=True)
    result = {"settings": vars(args), "epochs": {k: v for k, v in cols.items()}, "reached": reached,
              "seconds": time.perf_counter() - t0}
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
