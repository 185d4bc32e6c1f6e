"""Everything the trainer reads: the run's plan (its global batch, a teacher store's recorded plan
adopted), the augmented training stream, the validation set, and the teacher grid for every training
batch (from the store where it holds the view, the online teacher otherwise).

The training data follows the world-size-independent :class:`TrainPlan` (pipeline/data/plan.py),
with or without ``--cache``: the cache never changes what the student sees. ``--data`` is a
COCO/YOLO data set, or WebDataset shards (a ``jobs.make_shards`` output, local or ``s3://``) read
by byte range through :class:`ShardDataset`: the same samples, so the same batches on every world
size, and the same exact store.

``--cache`` (resolved by :func:`adopt_store_plan`: a store, one found in cache/, or none) takes either
store kind through one interface (``teacher_cache.stores``):
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
import os
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.data.augment import AugmentedDataset
from pipeline.data.collate import stack_collate
from pipeline.data.load import load_dataset
from pipeline.data.plan import PlanCollate, PlanDataset, PlanSampler, TrainPlan
from pipeline.data.sampler import EvalSampler
from pipeline.data.shards import ShardDataset, is_shard_set
from pipeline.data.views import view_record
from pipeline.train.distill import mode_of
from pipeline.train.config import PLAN_FIELDS, TrainConfig, default_mixup_group, explicit
from pipeline.train.recipe import Recipe, recipe_from_config
from teacher_cache.layout import StoreError
from teacher_cache.quantize import decode
from teacher_cache.stores import TeacherStore, open_store
from teacher_cache.teachers import Teacher, build_teacher, choose_precision

log = logging.getLogger("rtdetrv4.train")


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
    store: TeacherStore | None
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
        sampler = EvalSampler(len(items), rank, world_size)
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
        store.check_teacher(teacher.fingerprint())
        teacher.precision = store.precision
    else:
        # its own generator: a draw from the global RNG here would start an uncached run from other
        # student weights than the same run with --cache (the student is built after the teacher)
        probe = torch.rand(2, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0)).to(device)
        teacher.precision, fidelity = choose_precision(teacher, probe, cfg.teacher_precision)
        log.info("online teacher %s in %s%s", cfg.vfm, teacher.precision,
                 f" (bf16 cosine fidelity {fidelity:.5f})" if fidelity is not None else "")
    return teacher


def _store_teacher(cfg, store: TeacherStore) -> tuple[Teacher | None, str | None]:
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
    store.check_teacher(teacher.fingerprint())
    teacher.precision = store.precision
    return teacher, None


# --- the run's plan: its global batch, a store's recorded plan adopted ---------------------------
DEFAULT_STORE_DIR = "cache"   # where jobs.cache_teacher writes a store without --out
CONFLICTS = ("size", "epochs", "img_size", "seed", "global_batch", "mixup_group")   # plan flags a store fixes


def global_batch(cfg: TrainConfig, recipe: Recipe, world_size: int) -> int:
    """The run's global batch: ``--batch-size`` x world size, else ``--global-batch``, else the
    recipe's (its total, or its per-GPU batch x world size); both flags given must agree."""
    if cfg.batch_size is not None:
        total = cfg.batch_size * world_size
        if cfg.global_batch is not None and cfg.global_batch != total:
            raise ValueError(f"--batch-size {cfg.batch_size} per process x {world_size} process(es) is {total}, "
                             f"but --global-batch is {cfg.global_batch}: give one of them")
        return total
    if cfg.global_batch is not None:
        return cfg.global_batch
    return recipe.batch_per_process * world_size if recipe.batch_per_process else recipe.total_batch_size


def process_batch(cfg: TrainConfig, recipe: Recipe, world_size: int) -> int:
    """The per-process batch: the global batch split over the ``world_size`` processes."""
    total = global_batch(cfg, recipe, world_size)
    if total <= 0 or total % world_size:
        raise ValueError(f"the global batch {total} (--global-batch) does not split over {world_size} processes "
                         f"(--nproc_per_node): use a world size that divides it, or another --global-batch")
    return total // world_size


def plan_fields(cfg: TrainConfig, world_size: int) -> dict:
    """The run's values of the plan flags (PLAN_FIELDS), defaults resolved: what a store records."""
    recipe = recipe_from_config(cfg)
    total = global_batch(cfg, recipe, world_size)
    return {"size": cfg.size, "epochs": recipe.epochs, "img_size": cfg.img_size, "seed": cfg.seed,
            "train_split": cfg.train_split, "data": data_location(cfg.data),
            "mixup_group": cfg.mixup_group if cfg.mixup_group is not None else default_mixup_group(total),
            "global_batch": total, "max_steps_per_epoch": cfg.max_steps_per_epoch}


def data_location(data: str | None) -> str | None:
    """``--data`` as a store records it: None for the embedded data set, a URL as is, a local path
    absolute (a run adopting it may start in another folder)."""
    if data in (None, "synthetic"):
        return None
    return data if "://" in data else os.path.abspath(data)


def _teacher_matches(cfg: TrainConfig, manifest: dict) -> bool:
    teacher = manifest.get("teacher", {})
    weights = os.path.basename(cfg.weights) if cfg.weights else "random-init"
    return cfg.vfm in (teacher.get("name"), teacher.get("arch")) and teacher.get("weights_source") == weights


def _serves(recorded: dict, mine: dict) -> bool:
    """A store's recorded plan serves this run's: the same values, and at least the steps per epoch it runs."""
    if any(mine.get(k) != v for k, v in recorded.items() if k != "max_steps_per_epoch"):
        return False
    held, used = recorded.get("max_steps_per_epoch"), mine.get("max_steps_per_epoch")
    return held is None or (used is not None and used <= held)


def find_store(cfg: TrainConfig, world_size: int, folder: str = DEFAULT_STORE_DIR) -> str | None:
    """A store in ``folder`` (jobs.cache_teacher's default --out) whose recorded plan is this run's
    and whose teacher is this run's --vfm/--weights (the newest when several), or None."""
    if not os.path.isdir(folder):
        return None
    mine, found = plan_fields(cfg, world_size), []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            with open(os.path.join(path, "manifest.json")) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            continue
        recorded = manifest.get("run_plan")
        if recorded and _teacher_matches(cfg, manifest) and _serves(recorded, mine):
            found.append((os.path.getmtime(os.path.join(path, "manifest.json")), path))
    return max(found)[1] if found else None


def adopt_store_plan(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Resolve ``--cache`` and adopt the store's plan.

    ``none``: no store. Not given (a command line with --distill dsi): the store in cache/ whose plan
    and teacher match this run's, logged, else the online teacher. A store: every plan flag the user
    did not give takes the store's recorded value (size, epochs, image size, seed, global batch, MixUp
    group, split, data, steps per epoch); a given flag that contradicts the store is refused, naming
    the fields."""
    if cfg.cache == "none":
        return replace(cfg, cache=None)
    if not mode_of(cfg).vfm_targets:   # a teacher store holds DSI targets only
        return cfg
    if cfg.cache is None:
        if cfg.given is None or "cache" in cfg.given:   # a configuration from code, or --cache none again
            return cfg
        found = find_store(cfg, world_size)
        if found is None:
            log.info("no teacher store in %s/ matches this run's plan and teacher %s: the online teacher runs "
                     "(jobs.cache_teacher with the same plan flags builds one; --cache none silences this)",
                     DEFAULT_STORE_DIR, cfg.vfm)
            return cfg
        log.info("using teacher store %s (matches plan %s and teacher %s)", found,
                 ", ".join(f"{k} {v}" for k, v in plan_fields(cfg, world_size).items() if v is not None), cfg.vfm)
        return replace(cfg, cache=found)
    recorded = open_store(cfg.cache).recorded_plan()
    if recorded is None:   # a store from before plans were recorded: the flags must give its plan
        log.warning("--cache %s records no plan flags (built by an older jobs.cache_teacher): this run's flags "
                    "must give its plan", cfg.cache)
        return cfg
    given, mine = explicit(cfg), plan_fields(cfg, world_size)
    if cfg.batch_size is not None:
        given = given | {"global_batch"}
    differ = [k for k in CONFLICTS if k in recorded and k in given and mine[k] != recorded[k]]
    if differ:
        raise ValueError(f"--cache {cfg.cache} was built for {', '.join(f'{k} {recorded[k]}' for k in differ)}; "
                         f"this run has {', '.join(f'{k} {mine[k]}' for k in differ)}: drop the flags or rebuild "
                         "the store with them")
    adopted = {k: v for k, v in recorded.items() if k in PLAN_FIELDS and k not in given and k != "epochs"}
    cfg = replace(cfg, **adopted)
    if "epochs" in recorded and "epochs" not in given:   # None keeps "the recipe's epochs" (no shortened warm-up)
        full = recipe_from_config(replace(cfg, epochs=None)).epochs
        cfg = replace(cfg, epochs=None if recorded["epochs"] == full else recorded["epochs"])
    if adopted:
        log.info("--cache %s: adopted its plan (%s)", cfg.cache, ", ".join(f"{k} {v}" for k, v in adopted.items()))
    return cfg


# --- the data path ---------------------------------------------------------------------------------
def build_plan(cfg, recipe, num_samples: int, total_batch: int, dataset_hash: str) -> TrainPlan:
    """The run's :class:`TrainPlan` over a global batch of ``total_batch`` (what ``jobs.cache_teacher``
    builds its store for); MixUp groups: ``--mixup-group``, else :func:`default_mixup_group`."""
    group = cfg.mixup_group if cfg.mixup_group is not None else default_mixup_group(total_batch)
    return TrainPlan.from_recipe(recipe, num_samples, total_batch, seed=cfg.seed, base_size=cfg.img_size,
                                 mixup_group=group, dataset_hash=dataset_hash)


def _open_store(cfg, plan: TrainPlan, dist) -> TeacherStore:
    """``--cache``, refused by name when it was made for another plan than this run's."""
    store = open_store(cfg.cache)
    try:
        store.check_plan(plan)
    except StoreError as e:
        raise StoreError(f"{e}. This run's {plan.describe()}: give --cache {cfg.cache} without the plan flags "
                         "(the run adopts the store's), or build a store with this run's flags "
                         "(`python -m jobs.cache_teacher` takes the same ones)") from None
    if dist.is_main:
        log.info("%s; %s", store.describe(), store.coverage(0))
    return store


class StoreRecords:
    """A sample's augmentation record in the DataLoader workers (picklable, for spawned workers): the
    view a budget store replays, else the plan's fresh record."""

    def __init__(self, store: TeacherStore, plan: TrainPlan, num_samples: int, size: int):
        self.store, self.plan, self.num_samples, self.size = store, plan, num_samples, size

    def __call__(self, epoch: int, index: int, a: dict):
        args = self.store.view_args(epoch, index)
        if args is None:
            return self.plan.aug_record(epoch, index, a)
        return view_record(args, index, self.plan.policy, self.num_samples, (a["width"], a["height"]), a["boxes"],
                           self.size)


def build_train_data(cfg, recipe, dist, batch_size: int) -> TrainData:
    size = cfg.img_size
    streaming = is_shard_set(cfg.data)
    # --on-error skip decodes every image once here and trains without the bad ones, as jobs.cache_teacher
    # --on-error skip does: both see the same data set (content hash, plan). raise: the first bad one stops the run
    checked = dict(on_error=cfg.on_error, verify_images=cfg.on_error == "skip")
    val_dataset = load_dataset(cfg.val_data or (None if streaming else cfg.data), split=cfg.val_split, **checked)
    dataset = ShardDataset(cfg.data) if streaming else load_dataset(cfg.data, split=cfg.train_split, **checked)
    plan = build_plan(cfg, recipe, len(dataset), batch_size * dist.world_size, dataset.content_hash())
    sampler = PlanSampler(plan, dist.rank, dist.world_size)
    vfm_targets = mode_of(cfg).vfm_targets
    use_store = cfg.cache not in (None, "none") and vfm_targets
    store = _open_store(cfg, plan, dist) if use_store else None
    join = record_fn = None
    if store is not None:
        join = store.join(cfg.strict_cache)
        record_fn = StoreRecords(store, plan, len(dataset), size)
    train_items = PlanDataset(dataset, plan, join=join, record_fn=record_fn, slots=sampler.slots)
    teacher = unavailable = None
    if vfm_targets:
        if store is None:
            teacher = _build_online_teacher(cfg, None, dist.device)
        else:
            teacher, unavailable = _store_teacher(cfg, store)
    teacher_dim = store.dim if store is not None else teacher.embed_dim if teacher is not None else 0
    return TrainData(cfg=cfg, train_items=train_items, val_dataset=val_dataset,
                     collate=PlanCollate(plan, sampler.slots), sampler=sampler, store=store, device=dist.device,
                     batch_size=batch_size, batches_per_epoch=plan.steps_per_epoch, teacher_dim=teacher_dim,
                     teacher=teacher, plan=plan, teacher_unavailable=unavailable)
