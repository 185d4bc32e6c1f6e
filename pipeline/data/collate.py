"""Batch collation with the official batch-level MixUp and multi-scale resize (``BatchImageCollateFunction``).

The batch's random decisions are drawn into a :class:`BatchRecord` from
``np.random.default_rng([seed, epoch, crc32(sample indices)])``, so a batch is reproducible from its
composition and the trainer knows its size and whether it was mixed (a mixed view is not cacheable).
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
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


class Collate:
    """Stack images, keep targets as a list, then MixUp and multi-scale as the official collate.

    MixUp (prob ``mixup_prob`` for epochs in ``[mixup_epochs[0], mixup_epochs[1])``): image i becomes
    ``beta * x_i + (1 - beta) * x_{i-1}`` (roll by 1), beta ~ U(0.45, 0.55) rounded to 6 digits; boxes
    and labels are concatenated with a per-box ``mixup`` weight. Multi-scale (epochs < ``stop_epoch``):
    nearest ``F.interpolate`` of the batch to a size from :func:`multiscale_sizes`. The epoch is read from
    the samples' records when they carry one (works with persistent workers), else from :meth:`set_epoch`.
    Defaults are RT-DETRv4-L's; pass the recipe's numbers for other sizes. Returns
    ``(images [B,3,S,S], targets, BatchRecord)``.
    """

    def __init__(self, seed: int = 0, mixup_prob: float = 0.5, mixup_epochs=(4, 29), stop_epoch: int | None = 50,
                 base_size: int = 640, base_size_repeat: int | None = 4):
        self.seed, self.mixup_prob, self.mixup_epochs = seed, mixup_prob, tuple(mixup_epochs)
        self.stop_epoch = stop_epoch if stop_epoch is not None else -1
        self.scales = multiscale_sizes(base_size, base_size_repeat) if base_size_repeat is not None else None
        self.epoch = 0

    @classmethod
    def from_recipe(cls, recipe, seed: int = 0, base_size: int = 640) -> "Collate":
        """The collate of a :class:`pipeline.train.recipe.Recipe` (mixup epochs/prob, stop_epoch, base_size_repeat)."""
        return cls(seed=seed, mixup_prob=recipe.mixup_prob, mixup_epochs=recipe.mixup_epochs,
                   stop_epoch=recipe.stop_epoch, base_size=base_size, base_size_repeat=recipe.base_size_repeat)

    @classmethod
    def for_eval(cls) -> "Collate":
        return cls(mixup_prob=0.0, mixup_epochs=(0, 0), stop_epoch=None, base_size_repeat=None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample(self, epoch: int, indices: list[int], keys: list[str], size: int) -> BatchRecord:
        """The batch's random decisions; a pure function of (seed, epoch, indices)."""
        crc = zlib.crc32(np.asarray(indices, dtype="<i8").tobytes())
        rng = np.random.default_rng([self.seed, max(epoch, 0), crc])
        mixup = bool(rng.random() < self.mixup_prob) and self.mixup_epochs[0] <= epoch < self.mixup_epochs[1]
        beta = round(float(rng.uniform(0.45, 0.55)), 6) if mixup else None
        resized = self.scales is not None and epoch < self.stop_epoch
        if resized:
            size = int(self.scales[int(rng.integers(len(self.scales)))])
        return BatchRecord(epoch=epoch, size=size, resized=resized, mixup=mixup, beta=beta, indices=list(indices),
                           keys=list(keys))

    def __call__(self, items):
        images = torch.stack([x[0] for x in items])
        targets = [x[1] for x in items]
        records = [t.get("record") for t in targets]
        indices = [r["index"] if r else i for i, r in enumerate(records)]
        epochs = {r["epoch"] for r in records if r and r["epoch"] >= 0}
        epoch = epochs.pop() if len(epochs) == 1 else self.epoch
        batch = self.sample(epoch, indices, [t.get("key", "") for t in targets], images.shape[-1])
        images, targets = apply_batch_record(batch, images, targets)
        return images, targets, batch


def apply_batch_record(batch: BatchRecord, images: torch.Tensor, targets: list[dict]):
    """Replay a :class:`BatchRecord` on stacked images [B,3,H,W] and their targets. With
    ``batch.group`` the official ``roll(1)`` runs inside each group of that many images (elementwise,
    so a group blends to the same bits whichever rank or batch holds it)."""
    if batch.mixup:
        beta, g = batch.beta, batch.group or len(targets)
        if len(targets) % g:
            raise ValueError(f"a batch of {len(targets)} is not whole MixUp groups of {g}")
        x = images.unflatten(0, (-1, g))
        images = x.roll(shifts=1, dims=1).mul_(1.0 - beta).add_(x.mul(beta)).flatten(0, 1)
        shifted = [targets[j + (i - 1) % g] for j in range(0, len(targets), g) for i in range(g)]
        targets = [{**t, "boxes": torch.cat([t["boxes"], s["boxes"]]), "labels": torch.cat([t["labels"], s["labels"]]),
                    "mixup": torch.tensor([beta] * len(t["labels"]) + [1.0 - beta] * len(s["labels"]),
                                          dtype=torch.float32), "mixup_key": s.get("key")}
                   for t, s in zip(targets, shifted)]
    if batch.resized:
        images = F.interpolate(images, size=batch.size)
    return images, targets
