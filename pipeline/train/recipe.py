"""Per-size training recipe of the released RT-DETRv4 configs (configs/rtv4/rtv4_hgnetv2_*_coco.yml
and the files they include). One source of truth for the trainer, the optimizer, the data policy
and GAM: ``RECIPES[size]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from detector.gam import GAMConfig

# S/M: backbone params except BN (``lab`` included) get the backbone lr; every norm/bn param,
# backbone BN included, gets wd 0 at the BASE lr.
_SM_BACKBONE = r"^(?=.*backbone)(?!.*bn).*$"
_SM_NORM = r"^(?=.*(?:norm|bn)).*$"
# L/X: ``(?!.*norm|bn)`` parses as "not (.*norm) and not (starts with bn)", so EVERY backbone param,
# BN included, gets the backbone lr and the base weight decay; group 2 is encoder/decoder norm/bn.
_LX_BACKBONE = r"^(?=.*backbone)(?!.*norm|bn).*$"
_LX_NORM = r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$"


@dataclass(frozen=True)
class Recipe:
    size: str
    epochs: int
    lr: float
    backbone_lr: float
    weight_decay: float
    backbone_regex: str            # group 1: backbone lr, base wd
    norm_regex: str                # group 2: base lr, wd 0
    flat_epoch: int
    no_aug_epoch: int
    policy_epochs: tuple[int, int, int]   # stop_epoch policy [e0, e1, e2]
    mixup_epochs: tuple[int, int]
    stop_epoch: int                # multi-scale off, stage 2, GAM default weight
    base_size_repeat: int          # how many times 640 appears in the multi-scale list
    ema_restart_decay: float
    gam: GAMConfig = field(default=None)   # filled from detector.gam.GAM_SIZES
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iter: int = 2000
    lr_gamma: float = 0.5
    ema_decay: float = 0.9999
    ema_warmups: int = 1000
    clip_max_norm: float = 0.1
    total_batch_size: int = 32
    mosaic_prob: float = 0.5
    mixup_prob: float = 0.5
    schedule: str = "flat-cosine"  # or "multistep" (x lr_gamma at each milestone) / "plateau" (val AP)
    milestones: tuple[int, ...] = ()
    plateau_patience: int = 5
    batch_per_process: int | None = None   # a per-GPU batch (RT-CO-DETR) instead of total / world size
    ema: bool = True

    def iters(self, iters_per_epoch: int) -> int:
        return self.epochs * iters_per_epoch

    def process_batch(self, world_size: int) -> int:
        return self.batch_per_process or max(1, self.total_batch_size // world_size)


def _recipe(size, epochs, lr, backbone_lr, wd, bb, nr, flat, no_aug, policy, stop, repeat, restart):
    return Recipe(size=size, epochs=epochs, lr=lr, backbone_lr=backbone_lr, weight_decay=wd,
                  backbone_regex=bb, norm_regex=nr, flat_epoch=flat, no_aug_epoch=no_aug,
                  policy_epochs=policy, mixup_epochs=(policy[0], policy[1]), stop_epoch=stop,
                  base_size_repeat=repeat, ema_restart_decay=restart,
                  gam=GAMConfig.for_size(size, stop_epoch=stop))


RECIPES: dict[str, Recipe] = {
    "s": _recipe("s", 132, 4e-4, 2e-4, 1e-4, _SM_BACKBONE, _SM_NORM, 64, 12, (4, 64, 120), 120, 20, 0.9999),
    "m": _recipe("m", 102, 4e-4, 4e-5, 1e-4, _SM_BACKBONE, _SM_NORM, 49, 12, (4, 49, 90), 90, 6, 0.9999),
    "l": _recipe("l", 58, 5e-4, 2.5e-5, 1.25e-4, _LX_BACKBONE, _LX_NORM, 29, 8, (4, 29, 50), 50, 4, 0.9999),
    "x": _recipe("x", 58, 5e-4, 5e-6, 1.25e-4, _LX_BACKBONE, _LX_NORM, 29, 8, (4, 29, 50), 50, 3, 0.9998),
}


_NOTHING = r"(?!)"   # a group regex that matches no parameter: one AdamW group, as the authors used

# RT-CO-DETR (nam-htran/RT-CO-DETR, src/distillation/trainer_codetr.py): AdamW lr 5e-5, wd 1e-4 on every
# parameter, batch 16 per GPU at 640, 50 epochs, ReduceLROnPlateau(factor 0.2, patience 5) with no
# warm-up. The augmentation phases are those of the --size recipe, compressed to 50 epochs.
def rt_co_detr_recipe(size: str = "l") -> Recipe:
    base = scale_recipe(RECIPES[size], 50)
    return replace(base, lr=5e-5, backbone_lr=5e-5, weight_decay=1e-4, backbone_regex=_NOTHING, norm_regex=_NOTHING,
                   warmup_iter=0, schedule="plateau", lr_gamma=0.2, plateau_patience=5, milestones=(33,),
                   batch_per_process=16, clip_max_norm=0.1)


def get_recipe(size: str, **overrides) -> Recipe:
    if size not in RECIPES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(RECIPES)}")
    return replace(RECIPES[size], **overrides)


def scale_recipe(recipe: Recipe, epochs: int) -> Recipe:
    """The recipe compressed to ``epochs``: every epoch milestone (policy phases, mixup, flat,
    no-aug, stop) scales by epochs / recipe.epochs, so a short run still visits every phase in
    order; the 2000-iteration warm-up is left to the schedule, which caps it at 5% of the run."""
    f = epochs / recipe.epochs
    s = lambda e: min(epochs, round(e * f))  # noqa: E731
    e0, e1, e2 = (s(e) for e in recipe.policy_epochs)
    stop = s(recipe.stop_epoch)
    return replace(recipe, epochs=epochs, policy_epochs=(e0, e1, e2), mixup_epochs=(e0, e1),
                   flat_epoch=s(recipe.flat_epoch), no_aug_epoch=epochs - stop, stop_epoch=stop,
                   gam=replace(recipe.gam, stop_epoch=stop))


def resolve_recipe(size: str, epochs: int | None = None, name: str | None = None, **overrides) -> Recipe:
    """The recipe a run of ``size`` follows (``name="rt-co-detr"``: the RT-CO-DETR paper's), compressed
    to ``epochs`` when given, with ``overrides`` (lr, weight_decay, schedule, ema; None = keep): the
    one resolver that ``jobs.train`` and ``jobs.cache_teacher`` share, so both see the same phases."""
    if name not in (None, "rtdetrv4", "rt-co-detr"):
        raise ValueError(f"unknown --recipe {name!r}; choose rtdetrv4 or rt-co-detr")
    recipe = rt_co_detr_recipe(size) if name == "rt-co-detr" else get_recipe(size)
    if epochs is not None and epochs != recipe.epochs:
        f = epochs / recipe.epochs
        recipe = replace(scale_recipe(recipe, epochs), milestones=tuple(max(1, round(m * f)) for m in recipe.milestones))
    if overrides.get("lr") is not None and recipe.backbone_lr == recipe.lr:
        overrides["backbone_lr"] = overrides["lr"]
    elif overrides.get("lr") is not None:   # keep the backbone / base ratio of the released configs
        overrides["backbone_lr"] = recipe.backbone_lr * overrides["lr"] / recipe.lr
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def recipe_from_config(cfg) -> Recipe:
    """The recipe of a :class:`pipeline.train.config.TrainConfig`."""
    return resolve_recipe(cfg.size, cfg.epochs, getattr(cfg, "recipe", None), lr=getattr(cfg, "lr", None),
                          weight_decay=getattr(cfg, "weight_decay", None), schedule=getattr(cfg, "schedule", None),
                          ema=getattr(cfg, "ema", None))
