"""Overfit RT-DETRv4-S (60 classes, random init) on the first N TACO photographs on CPU.

The real detector, criterion (weighted terms, denoising on), evaluation view (resize to --img-size,
/255), AdamW and the official gradient clipping (0.1) work together; the script prints the total loss
(sum of all weighted terms) per step, the ratio of the first pass to the mean of the last two passes,
the CPU seconds per step and COCO AP/AP50 on the same images before and after training
(``pipeline.data.evaluate.CocoEvaluator``), after training both under the official protocol (boxes
not clipped to the image) and with the boxes clipped (what deployment outputs), and their difference.
``tests/detector/test_overfit.py`` runs the first 120 steps of the default.

    python benchmarks/overfit_taco.py --steps 400 --batch-size 2 --lr 4e-4
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from detector import build_detector
from detector.criterion import Criterion
from pipeline.data.augment import AugmentedDataset
from pipeline.data.load import load_dataset
from pipeline.data.evaluate import CocoEvaluator, format_table, protocol_postprocessor

REPO = Path(__file__).resolve().parents[1]


def first_images(taco_dir, n: int, size: int):
    """The first ``n`` images as one batch (evaluation view), their targets and the COCO ground truth."""
    ds = load_dataset(taco_dir, split="val")
    view = AugmentedDataset(ds, policy=None, size=size)
    items = [view[i] for i in range(n)]
    images = torch.stack([im for im, _ in items])
    targets = [target for _, target in items]
    ids = {int(t["image_id"]) for t in targets}
    gt = ds.to_coco()
    gt = dict(gt, images=[im for im in gt["images"] if im["id"] in ids],
              annotations=[a for a in gt["annotations"] if a["image_id"] in ids])
    return images, targets, gt, ds.label_to_category_id


@torch.no_grad()
def coco_stats(model, images, targets, gt, label_to_category, clip_boxes: bool = False) -> dict[str, float]:
    model.eval()
    sizes = torch.stack([t["orig_size"] for t in targets])
    evaluator = CocoEvaluator(gt, label_to_category=label_to_category)
    evaluator.update(protocol_postprocessor(len(label_to_category), clip_boxes=clip_boxes)(model(images), sizes),
                     [int(t["image_id"]) for t in targets])
    model.train()
    return evaluator.summarize()


def overfit(model, criterion, images, targets, steps: int, batch_size: int, lr: float, clip: float = 0.1,
            log=None) -> list[float]:
    """``steps`` AdamW steps cycling over the images in fixed batches; the total loss of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    losses = []
    for step in range(steps):
        start = step * batch_size % len(images)
        batch = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets[start:start + batch_size]]
        loss = sum(criterion(model(images[start:start + batch_size], batch), batch).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
        if log:
            log(step, losses)
    return losses


def loss_ratio(losses: list[float], per_pass: int, last_passes: int = 2) -> float:
    """Mean loss of the first pass over the images / mean loss of the last ``last_passes`` passes."""
    tail = losses[-per_pass * last_passes:]
    return (sum(losses[:per_pass]) / per_pass) / (sum(tail) / len(tail))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--taco", default=os.environ.get("TACO_DIR", REPO.parent / "shared" / "data" / "taco_val"))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the loss curve and the numbers here (json)")
    a = p.parse_args(argv)
    if a.images % a.batch_size:
        p.error("--images must be a multiple of --batch-size")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    images, targets, gt, l2c = first_images(a.taco, a.images, a.img_size)
    model, criterion = build_detector("s", num_classes=len(l2c)), Criterion(num_classes=len(l2c))
    before = coco_stats(model, images, targets, gt, l2c)
    per_pass = a.images // a.batch_size
    cpu0 = time.process_time()

    def log(step, losses):
        if step % 10 == 0 or step == a.steps - 1:
            recent = losses[-per_pass:]
            print(f"step {step:4d}  loss {losses[-1]:7.3f}  last pass {sum(recent) / len(recent):7.3f}  "
                  f"cpu {time.process_time() - cpu0:7.1f} s", flush=True)

    losses = overfit(model, criterion, images, targets, a.steps, a.batch_size, a.lr, log=log)
    cpu = time.process_time() - cpu0
    after = coco_stats(model, images, targets, gt, l2c)
    clipped = coco_stats(model, images, targets, gt, l2c, clip_boxes=True)
    result = dict(steps=a.steps, batch_size=a.batch_size, lr=a.lr, img_size=a.img_size, images=a.images,
                  loss_first_pass=sum(losses[:per_pass]) / per_pass, loss_ratio=loss_ratio(losses, per_pass),
                  cpu_s=cpu, cpu_s_per_step=cpu / a.steps, threads=a.threads, before=before, after=after,
                  after_clipped=clipped, losses=losses)
    print(f"loss ratio (first pass / last 2 passes): {result['loss_ratio']:.2f}x after {a.steps} steps "
          f"(batch {a.batch_size}, lr {a.lr}); {cpu:.0f} CPU s, {cpu / a.steps:.2f} CPU s/step")
    print("before training:\n" + format_table(before))
    print("after training (official protocol, boxes not clipped):\n" + format_table(after))
    print("after training, boxes clipped to the image (deployment):\n" + format_table(clipped))
    print("clipped - official: " + ", ".join(f"{k} {100 * (clipped[k] - after[k]):+.2f}"
                                             for k in ("AP", "AP50", "AP75")))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
