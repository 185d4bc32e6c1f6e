"""Deterministic, resumable distributed sampler for map-style datasets.

Same shuffle as ``torch.utils.data.DistributedSampler`` (``randperm`` seeded by seed + epoch,
padded by wrapping, strided by rank), but it yields ``(epoch, index)`` pairs so the augmentation
record of every sample is a function of (seed, epoch, index) no matter which worker draws it,
and it can start part-way through an epoch, which is what a mid-epoch resume needs.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, batch_size: int = 1, drop_last: bool = True):
        if num_samples <= 0:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        self.n, self.rank, self.world, self.seed = num_samples, rank, world_size, seed
        self.shuffle, self.batch_size, self.drop_last = shuffle, batch_size, drop_last
        self.epoch, self.start = 0, 0
        per_rank = math.ceil(num_samples / world_size)
        self.per_rank = per_rank // batch_size * batch_size if drop_last else per_rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Begin ``epoch`` at batch ``start_batch`` (0 for a full epoch)."""
        self.epoch, self.start = epoch, start_batch * self.batch_size

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = math.ceil(self.n / self.world) * self.world
        order += order[: total - len(order)]
        return order[self.rank:total:self.world][: self.per_rank]

    def __iter__(self):
        for i in self.indices(self.epoch)[self.start:]:
            yield self.epoch, i

    def __len__(self) -> int:
        return self.per_rank - self.start
