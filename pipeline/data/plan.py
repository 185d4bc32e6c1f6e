"""The training plan: every random decision of a run fixed per (epoch, global step), independent
of the world size. The trainer (with or without ``--cache``) and ``jobs.cache_teacher`` read the
same plan, so the cache job can render every step exactly as the trainer will.

For epoch ``e`` and global step ``s`` the plan fixes
- the global batch: ``randperm(N)`` seeded by ``seed + e`` (as ``DistributedSampler``), step ``s``
  taking positions ``[s*G, (s+1)*G)``; the ``N mod G`` leftover samples of the epoch are dropped;
- each sample's augmentation record: ``sample_record(seed, e, index, ...)``, fresh every epoch;
- the step's multi-scale size and MixUp decision and weight, drawn once for the whole global
  batch from ``default_rng([seed, e, s, _STEP])``;
- the MixUp partners: ``roll(1)`` inside consecutive groups of ``mixup_group`` slots.

Rank ``r`` of ``W`` takes the contiguous slots ``[r*G/W, (r+1)*G/W)`` (``W`` must divide ``G``); when a
MixUp group straddles two ranks, a rank also loads the partner its first slot of the group mixes
with (one extra sample, dropped after the blend), so any such world size sees the same samples,
images and targets at every step.
Departures from the official per-rank draws are listed (with why they are equivalent in
distribution) in docs/cache.md, section "The training plan".
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Sampler

from pipeline.data.augment import AugRecord, apply_record, sample_record
from pipeline.data.collate import BatchRecord, apply_batch_record, mix_pairs, multiscale_sizes
from pipeline.data.load import load_dataset
from pipeline.data.policy import AugPolicy

PLAN_VERSION = 1
_STEP = 0x5CA1E  # the random stream of the step-level draws (apart from the per-sample ops)


@dataclass(frozen=True)
class TrainPlan:
    num_samples: int
    global_batch: int
    epochs: int
    policy: AugPolicy = field(default_factory=AugPolicy)
    seed: int = 0
    mixup_prob: float = 0.5
    mixup_epochs: tuple[int, int] = (4, 29)
    stop_epoch: int = 50                      # multi-scale for epochs < stop_epoch
    scales: tuple[int, ...] | None = None     # None: no multi-scale
    mixup_group: int = 4                      # official: roll(1) inside each rank's batch of 4 (L, 8 GPUs)
    dataset_hash: str = ""

    def __post_init__(self):
        object.__setattr__(self, "mixup_epochs", tuple(int(e) for e in self.mixup_epochs))
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        if self.global_batch <= 0 or self.global_batch % self.mixup_group:
            raise ValueError(f"the global batch {self.global_batch} must be a positive multiple of the MixUp "
                             f"group {self.mixup_group} (--mixup-group)")
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_samples} training samples make no global batch of {self.global_batch}: "
                             "lower --batch-size")

    @classmethod
    def from_recipe(cls, recipe, num_samples: int, global_batch: int, seed: int = 0, base_size: int = 640,
                    mixup_group: int | None = None, dataset_hash: str = "") -> "TrainPlan":
        """The plan of a :class:`pipeline.train.recipe.Recipe` (phases, MixUp, multi-scale list)."""
        group = mixup_group if mixup_group is not None else min(4, global_batch)
        return cls(num_samples=num_samples, global_batch=global_batch, epochs=recipe.epochs,
                   policy=AugPolicy.from_recipe(recipe, output_size=base_size), seed=seed,
                   mixup_prob=recipe.mixup_prob, mixup_epochs=recipe.mixup_epochs, stop_epoch=recipe.stop_epoch,
                   scales=tuple(multiscale_sizes(base_size, recipe.base_size_repeat)), mixup_group=group,
                   dataset_hash=dataset_hash)

    # --- the global schedule ---------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def base_size(self) -> int:
        return self.policy.output_size[0]

    def order(self, epoch: int) -> list[int]:
        return _order(self.num_samples, self.seed + epoch)

    def samples(self, epoch: int, step: int) -> list[int]:
        """The dataset indices of the global batch of ``step``, slot by slot."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside the plan's {self.steps_per_epoch} steps per epoch")
        return self.order(epoch)[step * self.global_batch:(step + 1) * self.global_batch]

    def step_record(self, epoch: int, step: int) -> BatchRecord:
        """The step's size and MixUp draw, shared by every rank (``indices``: the global batch)."""
        rng = np.random.default_rng([self.seed, epoch, step, _STEP])
        mixup = bool(rng.random() < self.mixup_prob) and self.mixup_epochs[0] <= epoch < self.mixup_epochs[1]
        beta = round(float(rng.uniform(0.45, 0.55)), 6) if mixup else None
        resized = self.scales is not None and epoch < self.stop_epoch
        size = int(self.scales[int(rng.integers(len(self.scales)))]) if resized else self.base_size
        return BatchRecord(epoch=epoch, size=size, resized=resized, mixup=mixup, beta=beta,
                           indices=self.samples(epoch, step), keys=[], step=step, group=self.mixup_group)

    def grid(self, epoch: int, step: int) -> tuple[int, int]:
        """The teacher grid (stride 32) of the step's images."""
        size = self.step_record(epoch, step).size
        return size // 32, size // 32

    def grids(self) -> list[tuple[int, int]]:
        """Every teacher grid a step of the plan can have (the exact store keeps one array each)."""
        sizes = {self.base_size} | (set(self.scales) if self.scales is not None and self.stop_epoch > 0 else set())
        return sorted((s // 32, s // 32) for s in sizes)

    def aug_record(self, epoch: int, index: int, annotation: dict) -> AugRecord:
        return sample_record(self.seed, epoch, index, self.policy, self.num_samples,
                             (annotation["width"], annotation["height"]), annotation["boxes"])

    # --- ranks ----------------------------------------------------------------------------
    def check_world(self, world_size: int) -> int:
        """The per-rank batch for ``world_size``; a clear error when it does not divide the global batch."""
        G = self.global_batch
        if world_size <= 0 or G % world_size:
            ok = [w for w in range(1, G + 1) if G % w == 0]
            raise ValueError(f"world size {world_size} does not divide the plan's global batch {G}: use a world "
                             f"size in {ok} (--nproc_per_node), or another --global-batch (which makes another plan)")
        return G // world_size

    def rank_slots(self, rank: int, world_size: int) -> range:
        b = self.check_world(world_size)
        return range(rank * b, (rank + 1) * b)

    def partner(self, slot: int) -> int:
        """The slot whose image ``slot`` is blended with in a MixUp step: ``roll(1)`` inside its group."""
        start = slot - slot % self.mixup_group
        return start + (slot - start - 1) % self.mixup_group

    # --- identity -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        return {"version": PLAN_VERSION, **json.loads(json.dumps(d))}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (f"plan {self.hash()}: {self.num_samples} samples, {self.epochs} epochs x {self.steps_per_epoch} "
                f"steps of {self.global_batch} (MixUp groups of {self.mixup_group}), seed {self.seed}")


@lru_cache(maxsize=4)
def _order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


# --- the data path ---------------------------------------------------------------------------
class PlanSampler(Sampler):
    """Batch sampler of one rank: per global step, its slots as ``(epoch, step, slot, index)``
    items, then (in MixUp steps) the partners of its slots that another rank holds;
    :meth:`set_epoch` can start part-way through an epoch (mid-epoch resume)."""

    def __init__(self, plan: TrainPlan, rank: int = 0, world_size: int = 1):
        self.plan, self.slots = plan, plan.rank_slots(rank, world_size)
        # partners of this rank's slots held by another rank (a MixUp group straddling ranks): loaded too
        self.extra = sorted({plan.partner(k) for k in self.slots} - set(self.slots))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __iter__(self):
        order, G = self.plan.order(self.epoch), self.plan.global_batch
        for step in range(self.start, self.plan.steps_per_epoch):
            extra = self.extra if self.extra and self.plan.step_record(self.epoch, step).mixup else []
            yield [(self.epoch, step, slot, order[step * G + slot]) for slot in [*self.slots, *extra]]

    def __len__(self) -> int:
        return self.plan.steps_per_epoch - self.start


class PlanDataset(torch.utils.data.Dataset):
    """Item ``(epoch, step, slot, index)`` -> the planned sample (``convert=True``: model input).
    ``join(items) -> [dict]`` (the cached teacher views of a store's ``join``) is merged into the
    targets; ``record_fn(epoch, index, annotation)`` replaces the plan's fresh record (budget stores
    replay a cached view's). A DataLoader fetches a rank's step at once (:meth:`__getitems__`): a
    data set with ``prefetch`` (shards on object storage) reads the step's samples in one round and
    their mosaic partners in a second, and the join reads the step's views in one."""

    def __init__(self, dataset, plan: TrainPlan, join=None, convert: bool = True, record_fn=None,
                 slots: range | None = None):
        self.dataset, self.plan, self.join, self.convert = dataset, plan, join, convert
        self.record_fn = record_fn or plan.aug_record
        self.slots = slots   # the rank's slots: only they are joined (a partner from another rank is not)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        return self.__getitems__([item])[0]

    def __getitems__(self, items):
        prefetch = getattr(self.dataset, "prefetch", None)
        if prefetch is not None:
            prefetch([index for *_, index in items])
        records = [self.record_fn(epoch, index, self.dataset.annotation(index)) for epoch, _, _, index in items]
        if prefetch is not None:
            prefetch([p for r in records if r.mosaic is not None for p in r.mosaic["partners"]])
        extras = [{}] * len(items)
        joined = [r for r, item in enumerate(items) if self.slots is None or item[2] in self.slots]
        if self.join is not None and joined:
            for r, extra in zip(joined, self.join([items[r] for r in joined])):
                extras[r] = extra
        return [self._sample(item, record, extra) for item, record, extra in zip(items, records, extras)]

    def _sample(self, item, record, extra: dict):
        epoch, step, slot, index = item
        image, target = self.dataset[index]
        image, target = apply_record(record, image, target, load_partner=self.dataset.__getitem__,
                                     convert=self.convert)
        target.update(step=step, slot=slot, index=index)
        target.update(extra)
        return image, target


class PlanCollate:
    """Stack a rank's slots of one step and replay the step's MixUp and multi-scale resize.
    Returns ``(images [B,3,S,S], targets, BatchRecord)`` (``indices``/``keys``: this rank's); the
    partners another rank holds (items after the rank's slots) are blended in, then dropped."""

    def __init__(self, plan: TrainPlan, slots: range | None = None):
        self.plan, self.slots = plan, slots   # None: the whole global batch (the cache job)

    def __call__(self, items):
        images = torch.stack([x[0] for x in items])
        targets = [x[1] for x in items]
        epoch = targets[0]["record"]["epoch"]
        steps = {t["step"] for t in targets}
        if len(steps) != 1:
            raise ValueError(f"a plan batch must hold one step, got steps {sorted(steps)}")
        batch = self.plan.step_record(epoch, steps.pop())
        slots = [t["slot"] for t in targets]
        own = [i for i, k in enumerate(slots) if self.slots is None or k in self.slots]
        batch.indices, batch.keys = [targets[i]["index"] for i in own], [targets[i].get("key", "") for i in own]
        if batch.mixup:
            where = {k: i for i, k in enumerate(slots)}
            images, targets = mix_pairs(images, targets, own, [where[self.plan.partner(slots[i])] for i in own],
                                        batch.beta)
        elif len(own) != len(targets):
            images, targets = images[own], [targets[i] for i in own]
        images, targets = apply_batch_record(replace(batch, mixup=False), images, targets)
        return images, targets, batch


def render_step(plan: TrainPlan, dataset, epoch: int, step: int):
    """The whole global batch of a step exactly as the trainer's ranks build it (float32
    [G,3,S,S] after MixUp and resize), its targets and record: what the cache job feeds the teacher."""
    items = PlanDataset(dataset, plan)
    return PlanCollate(plan)([items[(epoch, step, slot, index)] for slot, index in
                              enumerate(plan.samples(epoch, step))])


class PlanRenderer:
    """``render(epoch, step) -> (float32 [G,3,S,S], sample indices)`` for the cache job's workers
    (the dataset is loaded lazily in each worker; the object pickles small). ``on_error`` and ``skip``
    (the keys the job's ``--on-error skip`` check dropped) make each worker's data set the job's."""

    def __init__(self, data: str | None, split: str, plan: TrainPlan, on_error: str = "raise", skip=()):
        self.data, self.split, self.plan, self._dataset = data, split, plan, None
        self.on_error, self.skip = on_error, tuple(skip)

    def __getstate__(self):
        return {**self.__dict__, "_dataset": None}

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = load_dataset(self.data, split=self.split, on_error=self.on_error).without(self.skip)
        return self._dataset

    def __call__(self, epoch: int, step: int):
        images, _, batch = render_step(self.plan, self.dataset, epoch, step)
        return images.numpy(), batch.indices
