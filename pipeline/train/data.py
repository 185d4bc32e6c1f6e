"""Everything the trainer reads: the augmented training stream, the validation set, and the
teacher grid for every training batch (from the cache where it holds the view, the online
teacher otherwise).

The training data follows the world-size-independent :class:`TrainPlan` (pipeline/data/plan.py),
with or without ``--cache``: the cache never changes what the student sees. ``--data`` is a
COCO/YOLO data set, or WebDataset shards (a ``jobs.make_shards`` output, local or ``s3://``) read
by byte range through :class:`ShardDataset`: the same samples, so the same batches on every world
size, and the same exact store.

``--cache`` takes either store kind:
- exact (``jobs.cache_teacher`` default): the teacher's output for every (epoch, step, slot) of
  the plan, at the step's size, MixUp included; DataLoader workers read the quantised view
  (checksum checked), the training device dequantises it; nothing is resized;
- budget (``--views K``): each sample replays one of K cached views per phase (fewer distinct
  augmentations than the recipe), its 640-px grid resized to the step's size; MixUp batches run
  the online teacher.
Views the store cannot serve (not written yet, damaged) run the online teacher on the device,
counted in :meth:`TrainData.teacher_stats`; ``--strict-cache`` stops the run instead.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.data.augment import AugmentedDataset
from pipeline.data.collate import stack_collate
from pipeline.data.load import load_dataset
from pipeline.data.policy import AugPolicy
from pipeline.data.plan import PlanCollate, PlanDataset, PlanSampler, TrainPlan
from pipeline.data.sampler import ResumableSampler
from pipeline.data.shards import ShardDataset, is_shard_set
from pipeline.data.views import PlannedViews
from teacher_cache.exact import FORMAT as EXACT_FORMAT, ExactStore
from teacher_cache.layout import StoreError, ViewError, store_format
from teacher_cache.quantize import decode
from teacher_cache.store import Store
from teacher_cache.teachers import Teacher, build_teacher, choose_precision

log = logging.getLogger("rtdetrv4.train")


class ExactJoin:
    """Worker side of an exact store: the quantised view of (epoch, step, slot) joined to the
    sample (``teacher_tokens``/``teacher_scale``, CPU, pinned by the loader), or why it is not."""

    def __init__(self, store: ExactStore, strict: bool):
        self.store, self.strict = store, strict

    def __call__(self, epoch: int, step: int, slot: int, index: int) -> dict:
        return self.many([(epoch, step, slot, index)])[0]

    def many(self, items) -> list[dict]:
        """The views of a rank's step, read in one concurrent round."""
        out = []
        for got in self.store.read_many(items):
            if isinstance(got, ViewError):
                if self.strict:
                    raise StoreError(f"--strict-cache: {got}") from None
                out.append({"teacher_miss": got.kind, "teacher_error": str(got)})
                continue
            tokens, scale, grid = got
            out.append({"teacher_tokens": tokens, "teacher_grid": grid}
                       | ({} if scale is None else {"teacher_scale": scale}))
        return out


class BudgetJoin:
    """Worker side of a budget (``--views K``) store: the planned view's grid, or why it is not
    served (a view failing its CRC-32C is "damaged": recomputed online, or ``--strict-cache`` stops)."""

    def __init__(self, views: PlannedViews, strict: bool):
        self.views, self.strict = views, strict

    def __call__(self, key: str, epoch: int, index: int) -> dict:
        try:
            return {"teacher": self.views.grid(key, epoch, index)}
        except ViewError as e:
            if self.strict:
                raise StoreError(f"--strict-cache: {e}") from None
            return {"teacher": None, "teacher_miss": e.kind, "teacher_error": str(e)}


@dataclass
class TeacherStats:
    exact: int = 0          # exact-store views (the teacher's output on this very batch)
    resized: int = 0        # budget-store grids resized to the batch's size
    missing: int = 0        # not in the store (not written yet, or no store): online teacher
    damaged: int = 0        # failed a checksum / truncated: online teacher
    online_ms: float = 0.0
    steps: int = 0

    @property
    def hits(self) -> int:
        return self.exact + self.resized

    @property
    def misses(self) -> int:
        return self.missing + self.damaged

    def as_dict(self) -> dict:
        n = self.hits + self.misses
        rate = (lambda k: k / n if n else 0.0)  # noqa: E731
        return dict(cache_hit_rate=rate(self.hits), cache_exact_rate=rate(self.exact),
                    cache_resized_rate=rate(self.resized), online_rate=rate(self.misses),
                    cache_damaged=self.damaged, teacher_ms_per_step=self.online_ms / self.steps if self.steps else 0.0)


@dataclass
class TrainData:
    cfg: object
    train_items: PlanDataset            # the plan's samples (from a data set or shards), fed by ``sampler``
    val_dataset: object
    collate: PlanCollate
    sampler: PlanSampler
    store: Store | ExactStore | None
    device: torch.device
    batch_size: int
    batches_per_epoch: int
    teacher_dim: int
    teacher: Teacher | None = None      # built up front (checked against the store's weights when cached)
    plan: TrainPlan | None = None
    teacher_unavailable: str | None = None   # why misses cannot be served (store from other weights)
    stats: TeacherStats = field(default_factory=TeacherStats)
    _logged_miss: dict = field(default_factory=dict)

    # -- metadata --------------------------------------------------------------------------
    num_classes = property(lambda self: self.val_dataset.num_classes)
    class_names = property(lambda self: self.val_dataset.class_names)
    label_to_category_id = property(lambda self: self.val_dataset.label_to_category_id)

    @property
    def val_coco(self):
        """The original ground truth (crowd boxes included, as the official evaluation scores it)."""
        return self.val_dataset.coco

    # -- loaders ---------------------------------------------------------------------------
    def train_loader(self, epoch: int, start_batch: int = 0):
        """Batches of ``epoch`` from batch ``start_batch`` on (mid-epoch resume): a DataLoader worker
        builds a whole step, so ``workers`` x ``prefetch_factor`` (2) steps are read ahead."""
        self.sampler.set_epoch(epoch, start_batch)
        return DataLoader(self.train_items, batch_sampler=self.sampler, num_workers=self.cfg.workers,
                          collate_fn=self.collate, pin_memory=self.device.type == "cuda")

    def val_loader(self, rank: int = 0, world_size: int = 1):
        """This rank's share of the validation set (the evaluator gathers and de-duplicates)."""
        items = AugmentedDataset(self.val_dataset, policy=None, size=self.cfg.img_size)
        sampler = ResumableSampler(len(items), rank, world_size, shuffle=False, drop_last=False)
        return DataLoader(items, batch_size=self.batch_size, sampler=sampler, num_workers=self.cfg.workers,
                          collate_fn=stack_collate, pin_memory=self.device.type == "cuda")

    # -- teacher targets ---------------------------------------------------------------------
    def online_teacher(self) -> Teacher:
        if self.teacher_unavailable:
            raise StoreError(self.teacher_unavailable)
        if self.teacher is None:
            self.teacher = _build_online_teacher(self.cfg, self.store, self.device)
        if self.teacher.mean.device != self.device:   # a store's teacher waits on the CPU until its first miss
            self.teacher.to(self.device)
        return self.teacher

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor, targets: list[dict], batch) -> torch.Tensor:
        """[B, C, H/32, W/32] teacher grids at the batch's size. Exact-store views are dequantised
        here, on the device; budget-store grids are resized bilinearly (paper Eq. 3) and skip MixUp
        batches; everything else runs the online teacher on the batch itself."""
        grid = (images.shape[-2] // 32, images.shape[-1] // 32)
        out = torch.empty(images.shape[0], self.teacher_dim, *grid, device=self.device)
        exact = [i for i, t in enumerate(targets) if "teacher_tokens" in t and tuple(t["teacher_grid"]) == grid]
        if exact:
            tokens = torch.stack([targets[i]["teacher_tokens"] for i in exact]).to(self.device, non_blocking=True)
            scale = (torch.stack([targets[i]["teacher_scale"] for i in exact]).to(self.device, non_blocking=True)
                     if "teacher_scale" in targets[exact[0]] else None)
            out[exact] = decode(tokens, scale, grid)
        resized = [i for i, t in enumerate(targets) if i not in exact and not batch.mixup and t.get("teacher") is not None]
        if resized:
            maps = torch.stack([targets[i]["teacher"] for i in resized]).to(self.device, torch.float32)
            if maps.shape[-2:] != grid:
                maps = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
            out[resized] = maps
        served = set(exact) | set(resized)
        miss = [i for i in range(len(targets)) if i not in served]
        damaged = [i for i in miss if targets[i].get("teacher_miss") == "damaged"]
        for i in damaged[:3]:
            log.warning("cached teacher view damaged, recomputed online: %s", targets[i]["teacher_error"])
        if miss:
            t0 = time.perf_counter()
            out[miss] = self.online_teacher()(images[miss])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stats.online_ms += 1000 * (time.perf_counter() - t0)
        if miss and self.store is not None and not self._logged_miss.get(batch.epoch):
            self._logged_miss[batch.epoch] = True
            log.info("epoch %d: views the store lacks run the online teacher (first: %s)", batch.epoch,
                     targets[miss[0]].get("teacher_error", "not in the store"))
        self.stats.exact += len(exact)
        self.stats.resized += len(resized)
        self.stats.damaged += len(damaged)
        self.stats.missing += len(miss) - len(damaged)
        self.stats.steps += 1
        return out

    def teacher_stats(self) -> dict:
        """Hit rate and online-teacher time since the last call (for logging)."""
        values, self.stats = self.stats.as_dict(), TeacherStats()
        return values


def _build_online_teacher(cfg, store, device: torch.device) -> Teacher:
    """The online teacher; with a cache it must be the store's teacher, in the store's precision."""
    teacher = build_teacher(cfg.vfm, weights=cfg.weights).to(device)
    if store is not None:
        _check_store_teacher(store, teacher.fingerprint())
        teacher.precision = store.manifest["teacher"]["protocol"]["precision"]
    else:
        # its own generator: a draw from the global RNG here would start an uncached run from other
        # student weights than the same run with --cache (the student is built after the teacher)
        probe = torch.rand(2, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0)).to(device)
        teacher.precision, fidelity = choose_precision(teacher, probe, cfg.teacher_precision)
        log.info("online teacher %s in %s%s", cfg.vfm, teacher.precision,
                 f" (bf16 cosine fidelity {fidelity:.5f})" if fidelity is not None else "")
    return teacher


def _check_store_teacher(store, fingerprint: dict) -> None:
    if isinstance(store, ExactStore):
        store.check_teacher(fingerprint)
    else:
        store.check_compatible(teacher=fingerprint)


def _store_teacher(cfg, store) -> tuple[Teacher | None, str | None]:
    """At start, not at the first miss: the online teacher checked against the store's (a store from
    other weights is refused); with no --weights on a store built from real weights, the reason
    why misses cannot be served (then any miss stops the run)."""
    stored = store.manifest["teacher"]
    if cfg.weights is None and stored.get("weights_source", "random-init") != "random-init":
        why = (f"--cache {cfg.cache} was built from teacher weights {stored['weights_source']} but this run has no "
               "--weights, so views the store lacks cannot be served by the online teacher: pass --weights "
               f"{stored['weights_source']}")
        log.warning(why)
        return None, why
    teacher = build_teacher(cfg.vfm, weights=cfg.weights)   # on the CPU until the first miss
    _check_store_teacher(store, teacher.fingerprint())
    teacher.precision = stored["protocol"]["precision"]
    return teacher, None


def store_kind(url: str) -> str:
    """"exact" or "budget", from the store's manifest (a clear error when there is none)."""
    return "exact" if store_format(url) == EXACT_FORMAT else "budget"


def _open_store(cfg, recipe, policy: AugPolicy, dataset_hash: str | None) -> Store:
    """The budget store, refused by name when it was made for another teacher, resolution, dataset
    or augmentation plan than this run's."""
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
    log.warning("--cache %s is a budget store (--views %d): each sample replays one of %d cached views per phase "
                "instead of a fresh draw each epoch, its grid is resized to the step's size, and MixUp batches run "
                "the online teacher; an exact store (jobs.cache_teacher without --views) serves the recipe as is",
                cfg.cache, store.plan.k, store.plan.k)
    return store


def build_plan(cfg, recipe, num_samples: int, batch_size: int, world_size: int, dataset_hash: str) -> TrainPlan:
    """The run's :class:`TrainPlan` (what ``jobs.cache_teacher`` must be given to build its store).
    MixUp groups: ``--mixup-group``, else 4 (the official per-GPU batch of L/X on 8 GPUs), or the
    per-rank batch when it is smaller (the official roll(1) never crosses a rank)."""
    group = cfg.mixup_group if cfg.mixup_group is not None else min(4, batch_size)
    return TrainPlan.from_recipe(recipe, num_samples, batch_size * world_size, seed=cfg.seed, base_size=cfg.img_size,
                                 mixup_group=group, dataset_hash=dataset_hash)


def _open_exact(cfg, plan: TrainPlan, dist) -> ExactStore:
    store = ExactStore.open(cfg.cache)
    try:
        store.check_plan(plan.hash())
    except StoreError as e:
        raise StoreError(f"{e}. This run's {plan.describe()}: build its store with `python -m jobs.cache_teacher "
                         f"--size {cfg.size} --epochs {plan.epochs} --input-size {cfg.img_size} --seed {cfg.seed} "
                         f"--global-batch {plan.global_batch} --mixup-group {plan.mixup_group}`") from None
    done = [e for e in range(plan.epochs) if store.epoch_complete(e)]
    if dist.is_main:
        log.info("exact teacher store %s: %d of %d epochs complete; views not stored yet run the online teacher",
                 cfg.cache, len(done), plan.epochs)
    return store


def build_train_data(cfg, recipe, dist, batch_size: int) -> TrainData:
    size = cfg.img_size
    policy = AugPolicy.from_recipe(recipe, output_size=size)
    streaming = is_shard_set(cfg.data)
    # --on-error skip decodes every image once here and trains without the bad ones, as jobs.cache_teacher
    # --on-error skip does: both see the same data set (content hash, plan). raise: the first bad one stops the run
    checked = dict(on_error=cfg.on_error, verify_images=cfg.on_error == "skip")
    val_dataset = load_dataset(cfg.val_data or (None if streaming else cfg.data), split=cfg.val_split, **checked)
    dataset = ShardDataset(cfg.data) if streaming else load_dataset(cfg.data, split=cfg.train_split, **checked)
    plan = build_plan(cfg, recipe, len(dataset), batch_size, dist.world_size, dataset.content_hash())
    sampler = PlanSampler(plan, dist.rank, dist.world_size)
    kind = store_kind(cfg.cache) if cfg.cache and cfg.distill == "dsi" else None
    store = join = record_fn = None
    if kind == "exact":
        store = _open_exact(cfg, plan, dist)
        join = ExactJoin(store, cfg.strict_cache)
    elif kind == "budget":
        store = _open_store(cfg, recipe, policy, plan.dataset_hash)
        views = PlannedViews(store.plan, store, policy, size, len(dataset))
        record_fn = lambda e, i, a: views.record(e, i, a["width"], a["height"], a["boxes"])  # noqa: E731
        budget = BudgetJoin(views, cfg.strict_cache)
        join = lambda e, s, k, i: budget(dataset.key(i), e, i)  # noqa: E731
    train_items = PlanDataset(dataset, plan, join=join, record_fn=record_fn)
    teacher = unavailable = None
    if cfg.distill == "dsi":
        if store is None:
            teacher = _build_online_teacher(cfg, None, dist.device)
        else:
            teacher, unavailable = _store_teacher(cfg, store)
    teacher_dim = store.dim if store is not None else teacher.embed_dim if teacher is not None else 0
    return TrainData(cfg=cfg, train_items=train_items, val_dataset=val_dataset, collate=PlanCollate(plan),
                     sampler=sampler, store=store, device=dist.device, batch_size=batch_size,
                     batches_per_epoch=sampler.batches_per_epoch(), teacher_dim=teacher_dim, teacher=teacher,
                     plan=plan, teacher_unavailable=unavailable)
