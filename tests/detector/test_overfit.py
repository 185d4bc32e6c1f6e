"""A 60-class RT-DETRv4-S (random init) learns 8 real TACO photographs on CPU: the detector, the
criterion with denoising, the evaluation view at 320 px, AdamW with the official clipping (0.1) and
the COCO evaluator together. ``benchmarks/overfit_taco.py`` runs the same loop longer.

Measured (seed 0, 1 thread): the total loss (sum of all weighted terms) falls 1.35x in these 120
steps and AP50 on the 8 images rises from 0.0 to 0.59 (3.5 CPU minutes, 1 thread). After 400 steps the
loss has fallen ~1.9x and AP50 is 0.98.
The total falls slowly by construction: GIoU/L1 drop fast (13.6+3.3 -> 5.4+0.7 in 160 steps) but the
FGL terms are weighted by the matched IoU and rise as boxes improve (3.9 -> 7.2), and MAL's soft
targets follow the IoU too; see ``benchmarks/overfit_taco.py`` for the longer curve.
"""
from __future__ import annotations

import torch

from detector import build_detector
from detector.criterion import Criterion
from detector.postprocessor import PostProcessor
from pipeline.data.augment import AugmentedDataset
from pipeline.data.load import load_dataset
from pipeline.data.evaluate import CocoEvaluator

IMAGES, SIZE, BATCH, LR, STEPS = 8, 320, 2, 4e-4, 120


def _first_images(taco_dir):
    """The first 8 images in the official evaluation view (resize to 320, /255, normalised cxcywh boxes)
    and the COCO ground truth of those 8 images."""
    ds = load_dataset(taco_dir, split="val")
    view = AugmentedDataset(ds, policy=None, size=SIZE)
    items = [view[i] for i in range(IMAGES)]
    images = torch.stack([image for image, _ in items])
    targets = [target for _, target in items]
    ids = {int(t["image_id"]) for t in targets}
    gt = ds.to_coco()
    gt = dict(gt, images=[im for im in gt["images"] if im["id"] in ids],
              annotations=[a for a in gt["annotations"] if a["image_id"] in ids])
    return images, targets, CocoEvaluator(gt, label_to_category=ds.label_to_category_id)


@torch.no_grad()
def _ap50(model, images, targets, evaluator) -> float:
    model.eval()
    evaluator.reset()
    sizes = torch.stack([t["orig_size"] for t in targets])
    evaluator.update(PostProcessor(60)(model(images), sizes), [int(t["image_id"]) for t in targets])
    model.train()
    return evaluator.summarize()["AP50"]


def test_detector_overfits_eight_taco_images(taco_dir):
    images, targets, evaluator = _first_images(taco_dir)
    assert images.shape == (IMAGES, 3, SIZE, SIZE) and len(evaluator.label_to_category) == 60
    model, criterion = build_detector("s", num_classes=60), Criterion(num_classes=60)
    ap50_before = _ap50(model, images, targets, evaluator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    model.train()
    losses = []
    for step in range(STEPS):
        start = step * BATCH % IMAGES
        batch = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets[start:start + BATCH]]
        outputs = model(images[start:start + BATCH], batch)
        assert "dn_outputs" in outputs  # denoising is on, as in training
        loss = sum(criterion(outputs, batch).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(loss.item())
    per_pass = IMAGES // BATCH
    first, last = sum(losses[:per_pass]) / per_pass, sum(losses[-2 * per_pass:]) / (2 * per_pass)
    ap50_after = _ap50(model, images, targets, evaluator)
    print(f"loss {first:.3f} -> {last:.3f} ({first / last:.3f}x); AP50 {ap50_before:.3f} -> {ap50_after:.3f}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert first / last >= 1.2, f"loss fell only {first / last:.2f}x in {STEPS} steps"
    assert ap50_after >= ap50_before + 0.3, f"AP50 {ap50_before:.3f} -> {ap50_after:.3f}"
