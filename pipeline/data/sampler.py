"""The validation sampler of one rank (training batches come from ``pipeline.data.plan.PlanSampler``).

``torch.utils.data.DistributedSampler(shuffle=False, drop_last=False)``'s split: padded by wrapping
to a multiple of the world size, strided by rank; the evaluator gathers and de-duplicates.
"""
from __future__ import annotations

import math

from torch.utils.data import Sampler


class EvalSampler(Sampler):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise ValueError("EvalSampler needs a non-empty dataset")
        total = math.ceil(num_samples / world_size) * world_size
        order = list(range(num_samples))
        self.indices = (order + order[: total - num_samples])[rank:total:world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
