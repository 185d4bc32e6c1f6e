"""Batch-level transforms of the official ``BatchImageCollateFunction``: MixUp and multi-scale resize.

A batch's random decisions are a :class:`BatchRecord` (drawn per global step by
:class:`pipeline.data.plan.TrainPlan`), replayed here, so the trainer knows the batch's size and
whether it was mixed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


def multiscale_sizes(base_size: int = 640, base_size_repeat: int = 3) -> list[int]:
    """Official ``generate_scales``: 480..608, ``base_size`` x repeat, 800..672 (for 640)."""
    low = int(base_size * 0.75 / 32) * 32
    n = (base_size - low) // 32
    high = int(base_size * 1.25 / 32) * 32
    return [low + 32 * i for i in range(n)] + [base_size] * base_size_repeat + [high - 32 * i for i in range(n)]


def stack_collate(items):
    """Plain collate of ``(image, target)`` pairs: stacked images [B,3,H,W] and the list of targets
    (evaluation, where there is no MixUp or multi-scale)."""
    images, targets = zip(*items)
    return torch.stack(images), list(targets)


@dataclass
class BatchRecord:
    """What the collate did to a batch: ``size`` (output side; ``resized``: multi-scale fired), ``mixup``, ``beta``."""

    epoch: int
    size: int
    resized: bool
    mixup: bool
    beta: float | None
    indices: list[int]
    keys: list[str]
    step: int | None = None       # the global step of a :class:`pipeline.data.plan.TrainPlan`
    group: int | None = None      # MixUp partners roll within consecutive groups of this many

    def to_dict(self) -> dict:
        return asdict(self)


def apply_batch_record(batch: BatchRecord, images: torch.Tensor, targets: list[dict]):
    """Replay a :class:`BatchRecord` on stacked images [B,3,H,W] and their targets. With
    ``batch.group`` the official ``roll(1)`` runs inside each group of that many images (elementwise,
    so a group blends to the same bits whichever rank or batch holds it)."""
    if batch.mixup:
        g = batch.group or len(targets)
        if len(targets) % g:
            raise ValueError(f"a batch of {len(targets)} is not whole MixUp groups of {g}")
        rows = range(len(targets))
        images, targets = mix_pairs(images, targets, rows, [j - j % g + (j % g - 1) % g for j in rows], batch.beta)
    if batch.resized:
        images = F.interpolate(images, size=batch.size)
    return images, targets


def mix_pairs(images: torch.Tensor, targets: list[dict], rows, partners, beta: float):
    """The official MixUp of rows ``rows`` with rows ``partners`` (``beta * x + (1 - beta) * partner``,
    elementwise, so the bits do not depend on which batch holds the pair): the blended images and
    targets (boxes and labels concatenated, per-box ``mixup`` weights, ``mixup_key``)."""
    rows, partners = list(rows), list(partners)
    x = images[rows]
    mixed = images[partners].mul_(1.0 - beta).add_(x.mul(beta))
    out = []
    for r, p in zip(rows, partners):
        t, s = targets[r], targets[p]
        out.append({**t, "boxes": torch.cat([t["boxes"], s["boxes"]]), "labels": torch.cat([t["labels"], s["labels"]]),
                    "mixup": torch.tensor([beta] * len(t["labels"]) + [1.0 - beta] * len(s["labels"]),
                                          dtype=torch.float32), "mixup_key": s.get("key")})
    return mixed, out
