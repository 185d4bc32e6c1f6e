"""Everything the trainer reads: the augmented training stream, the validation set, and the
teacher grid for every training batch (cached where the store holds the exact view, the online
teacher otherwise).

Training data comes from a COCO/YOLO dataset (map-style, :class:`ResumableSampler`) or from
WebDataset shards (``--data`` pointing at a ``jobs.make_shards`` output; :class:`ShardStream`).
With ``--cache``, each sample's augmentation is the cached view that the store's
:class:`ViewPlan` assigns to (epoch, index), so its teacher grid is read from the store by sample
key; batches the store cannot serve (MixUp blends two views, an incomplete store) fall back to
the online teacher, batched on the device.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.data.augment import AugmentedDataset, apply_record
from pipeline.data.collate import Collate, stack_collate
from pipeline.data.load import load_dataset
from pipeline.data.policy import AugPolicy
from pipeline.data.sampler import ResumableSampler
from pipeline.data.shards import MANIFEST, ShardIndex, ShardStream
from pipeline.data.views import PlannedViews
from teacher_cache.store import Store
from teacher_cache.teachers import Teacher, build_teacher, choose_precision
from teacher_cache.views import ViewPlan

log = logging.getLogger("rtdetrv4.train")


class CachedViewDataset(Dataset):
    """Map-style training samples replaying the planned cached view, with the store's grid
    joined by sample key as ``target["teacher"]`` (``None`` where the store lacks it)."""

    def __init__(self, dataset, views: PlannedViews):
        self.dataset, self.views = dataset, views

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        ann = self.dataset.annotation(index)
        record = self.views.record(epoch, index, ann["width"], ann["height"], ann["boxes"])
        image, target = self.dataset[index]
        image, target = apply_record(record, image, target, load_partner=self.dataset.__getitem__)
        target["teacher"] = self.views.grid(ann["key"], epoch, index)
        return image, target


@dataclass
class TeacherStats:
    hits: int = 0
    misses: int = 0
    online_ms: float = 0.0
    steps: int = 0

    def as_dict(self) -> dict:
        n = self.hits + self.misses
        return dict(cache_hit_rate=self.hits / n if n else 0.0,
                    teacher_ms_per_step=self.online_ms / self.steps if self.steps else 0.0)


@dataclass
class TrainData:
    cfg: object
    train_items: object                 # map-style Dataset fed by ``sampler``, or None when streaming
    val_dataset: object
    collate: Collate
    sampler: ResumableSampler | None
    stream: ShardStream | None
    store: Store | None
    device: torch.device
    batch_size: int
    batches_per_epoch: int
    teacher_dim: int
    teacher: Teacher | None = None      # built up front without a cache, at the first miss with one
    stats: TeacherStats = field(default_factory=TeacherStats)

    # -- metadata --------------------------------------------------------------------------
    num_classes = property(lambda self: self.val_dataset.num_classes)
    class_names = property(lambda self: self.val_dataset.class_names)
    label_to_category_id = property(lambda self: self.val_dataset.label_to_category_id)

    @property
    def val_coco(self):
        """The original ground truth (crowd boxes included, as the official evaluation scores it)."""
        return self.val_dataset.coco

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, data, batch_size: int, sampler=None, collate_fn=None):
        return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=self.cfg.workers,
                          collate_fn=collate_fn, pin_memory=self.device.type == "cuda",
                          drop_last=sampler is not None)

    def train_loader(self, epoch: int, start_batch: int = 0):
        """Batches of ``epoch`` from batch ``start_batch`` on (mid-epoch resume)."""
        self.collate.set_epoch(epoch)
        if self.stream is not None:
            self.stream.set_epoch(epoch)
            return islice(self._loader(self.stream, self.batch_size, collate_fn=self.collate), start_batch, None)
        self.sampler.set_epoch(epoch, start_batch)
        return self._loader(self.train_items, self.batch_size, sampler=self.sampler, collate_fn=self.collate)

    def val_loader(self, rank: int = 0, world_size: int = 1):
        """This rank's share of the validation set (the evaluator gathers and de-duplicates)."""
        items = AugmentedDataset(self.val_dataset, policy=None, size=self.cfg.img_size)
        sampler = ResumableSampler(len(items), rank, world_size, shuffle=False, drop_last=False)
        return DataLoader(items, batch_size=self.batch_size, sampler=sampler, num_workers=self.cfg.workers,
                          collate_fn=stack_collate, pin_memory=self.device.type == "cuda")

    # -- teacher targets ---------------------------------------------------------------------
    def online_teacher(self) -> Teacher:
        if self.teacher is None:
            self.teacher = _build_online_teacher(self.cfg, self.store, self.device)
        return self.teacher

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor, targets: list[dict], batch) -> torch.Tensor:
        """[B, C, H/32, W/32] teacher grids at the batch's (multi-scale) size: cached grids are
        resized to it bilinearly (paper Eq. 3); MixUp batches and misses use the online teacher."""
        grid = (images.shape[-2] // 32, images.shape[-1] // 32)
        cached = [None if batch.mixup else t.get("teacher") for t in targets]
        hit = [i for i, c in enumerate(cached) if c is not None]
        miss = [i for i, c in enumerate(cached) if c is None]
        out = torch.empty(images.shape[0], self.teacher_dim, *grid, device=self.device)
        if hit:
            maps = torch.stack([cached[i] for i in hit]).to(self.device, torch.float32)
            if maps.shape[-2:] != grid:
                maps = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
            out[hit] = maps
        if miss:
            t0 = time.perf_counter()
            out[miss] = self.online_teacher()(images[miss])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stats.online_ms += 1000 * (time.perf_counter() - t0)
        self.stats.hits += len(hit)
        self.stats.misses += len(miss)
        self.stats.steps += 1
        return out

    def teacher_stats(self) -> dict:
        """Hit rate and online-teacher time since the last call (for logging)."""
        values, self.stats = self.stats.as_dict(), TeacherStats()
        return values


def _build_online_teacher(cfg, store: Store | None, device: torch.device) -> Teacher:
    """The online teacher; with a cache it must be the store's teacher, in the store's precision."""
    teacher = build_teacher(cfg.vfm, weights=cfg.weights).to(device)
    if store is not None:
        store.check_compatible(teacher=teacher)
        teacher.precision = store.manifest["teacher"]["protocol"]["precision"]
    else:
        probe = torch.rand(2, 3, cfg.img_size, cfg.img_size, device=device)
        teacher.precision, fidelity = choose_precision(teacher, probe, cfg.teacher_precision)
        log.info("online teacher %s in %s%s", cfg.vfm, teacher.precision,
                 f" (bf16 cosine fidelity {fidelity:.5f})" if fidelity is not None else "")
    return teacher


def _open_store(cfg, recipe, policy: AugPolicy, dataset_hash: str | None) -> Store:
    """The store, refused by name when it was made for another teacher, resolution, dataset or
    augmentation plan than this run's."""
    store = Store.open(cfg.cache)
    store.check_compatible(teacher=cfg.vfm, input_size=cfg.img_size, dataset_hash=dataset_hash)
    fix = f"re-run jobs.cache_teacher with this run's --size {cfg.size} --epochs {recipe.epochs} --input-size {cfg.img_size}"
    if tuple(store.plan.epochs) != tuple(recipe.policy_epochs):
        raise ValueError(f"--cache {cfg.cache} was planned for augmentation phases {tuple(store.plan.epochs)} "
                         f"but this run's recipe uses {tuple(recipe.policy_epochs)}: {fix}")
    stored = store.manifest.get("policy")
    if stored is not None and json.loads(json.dumps(stored)) != json.loads(json.dumps(policy.to_dict())):
        diff = sorted(k for k in stored if stored[k] != json.loads(json.dumps(policy.to_dict())).get(k))
        raise ValueError(f"--cache {cfg.cache} was rendered with another augmentation policy ({', '.join(diff)}): {fix}")
    return store


def build_train_data(cfg, recipe, dist, batch_size: int) -> TrainData:
    size = cfg.img_size
    policy = AugPolicy.from_recipe(recipe, output_size=size)
    collate = Collate.from_recipe(recipe, seed=cfg.seed, base_size=size)
    streaming = cfg.data is not None and Path(cfg.data, MANIFEST).is_file()
    val_dataset = load_dataset(cfg.val_data or (None if streaming else cfg.data), split="val")
    store = sampler = stream = train_items = None
    if streaming:
        index = ShardIndex(cfg.data)
        if cfg.cache and cfg.distill == "dsi":
            store = _open_store(cfg, recipe, policy, index.manifest["dataset_hash"])
            views = PlannedViews(store.plan, store, policy, size, len(index))
            record_fn = lambda e, i, a: views.record(e, i, a["width"], a["height"], a["boxes"])  # noqa: E731
            join = lambda key, t: {"teacher": views.grid(key, t["record_epoch"], t["index"])}  # noqa: E731
            stream = ShardStream(cfg.data, mode="train", rank=dist.rank, world_size=dist.world_size,
                                 seed=cfg.seed, policy=policy, record_fn=record_fn, join=join)
        else:
            stream = ShardStream(cfg.data, mode="train", rank=dist.rank, world_size=dist.world_size,
                                 seed=cfg.seed, policy=policy)
        batches = stream.epoch_length(dist.world_size) // batch_size
    else:
        dataset = load_dataset(cfg.data, split="train")
        sampler = ResumableSampler(len(dataset), dist.rank, dist.world_size, seed=cfg.seed, batch_size=batch_size)
        if cfg.cache and cfg.distill == "dsi":
            store = _open_store(cfg, recipe, policy, dataset.content_hash())
            train_items = CachedViewDataset(dataset, PlannedViews(store.plan, store, policy, size, len(dataset)))
        else:
            train_items = AugmentedDataset(dataset, policy, seed=cfg.seed)
        batches = sampler.batches_per_epoch()
    if batches == 0:
        raise ValueError(f"--data has too few training samples for one batch of {batch_size} per rank on "
                         f"{dist.world_size} rank(s); lower --batch-size")
    teacher = None
    if cfg.distill == "dsi" and store is None:
        teacher = _build_online_teacher(cfg, None, dist.device)
    teacher_dim = store.dim if store is not None else teacher.embed_dim if teacher is not None else 0
    return TrainData(cfg=cfg, train_items=train_items, val_dataset=val_dataset, collate=collate, sampler=sampler,
                     stream=stream, store=store, device=dist.device, batch_size=batch_size,
                     batches_per_epoch=batches, teacher_dim=teacher_dim, teacher=teacher)
