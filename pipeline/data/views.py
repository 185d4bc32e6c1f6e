"""The planned-view mapping: which augmentation record a cached teacher view stands for.

The cache job renders the view the plan assigns to (epoch, index) and the trainer replays the very
same record (a budget store's ``view_args`` through :func:`view_record`), so the two must share
this one mapping for a cached grid to match its image.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.augment import AugRecord, apply_record, plain_record, sample_record
from pipeline.data.load import load_dataset
from pipeline.data.policy import AugPolicy
from teacher_cache.views import ViewPlan


def view_record(view_args: dict, index: int, policy: AugPolicy, dataset_len: int, image_size: tuple[int, int],
                boxes, size=640) -> AugRecord:
    """The record of a cached teacher view, from ``ViewPlan.record_args(view)``: the one mapping the
    cache job and the trainer must share for a cached view to be replayed bit-for-bit."""
    if view_args["kind"] == "plain":
        return plain_record(index, view_args["flip"], size)
    return sample_record(view_args["seed"], view_args["epoch"], index, policy, dataset_len, image_size, boxes)


class Renderer:
    """``render(index, view) -> uint8 [3, H, W]``: the exact view the trainer replays (the data
    pipeline's records, bit-exact); the decoded source image is reused across its views."""

    def __init__(self, data: str | None, split: str, plan: ViewPlan, policy: AugPolicy, on_error: str = "raise",
                 skip=()):
        self.data, self.split, self.plan, self.policy = data, split, plan, policy
        self.on_error, self.skip = on_error, tuple(skip)   # the job's --on-error and the keys its check dropped
        self._dataset, self._last = None, (None, None)

    def __getstate__(self):
        return {**self.__dict__, "_dataset": None, "_last": (None, None)}

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = load_dataset(self.data, split=self.split, on_error=self.on_error).without(self.skip)
        return self._dataset

    def record(self, index: int, view: int):
        a = self.dataset.annotation(index)
        return view_record(self.plan.record_args(view), index, self.policy, len(self.dataset),
                           (a["width"], a["height"]), a["boxes"], self.plan.input_size)

    def __call__(self, index: int, view: int) -> np.ndarray:
        if self._last[0] != index:
            self._last = (index, self.dataset[index])
        image, target = self._last[1]
        out, _ = apply_record(self.record(index, view), image, target,
                              load_partner=self.dataset.__getitem__, convert=False)
        return out.as_subclass(torch.Tensor).numpy()
