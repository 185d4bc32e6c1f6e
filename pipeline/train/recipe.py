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
    encoder_regex: str = r"(?!)"   # group 0 (RT-CO-DETR fine-tuning): encoder lr, base wd; matches nothing here
    encoder_lr: float | None = None
    flip_prob: float = 0.5
    augment: str = "rtdetrv4"      # the augmentation family (see with_augmentation), for the run summary
    monitor: str = "ap"            # what the schedule, best.pth and early stopping follow: val AP, or
    #                                "kd_loss": the validation distillation loss (a label-free stage)
    early_stop: int | None = None  # epochs without improvement before stopping (None: train them all)

    def iters(self, iters_per_epoch: int) -> int:
        return self.epochs * iters_per_epoch


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
# Their fine-tuning configs name the groups '^(?=.*backbone)' / '^(?=.*encoder)' on RT-DETRv2's own names; on
# transformers' names the backbone lives under model.backbone.model.encoder and the decoder's cross-attention is
# encoder_attn, so the encoder group is the hybrid encoder and its input projection, outside the backbone.
_BACKBONE = r"(?:^|\.)backbone\."
_ENCODER = r"^(?!.*backbone)(?:.*\.)?encoder(?:_input_proj)?\."

AUGMENTATIONS = ("none", "rtdetrv2", "rtdetrv4")
STAGES = ("distill", "finetune", "joint")
TEACHER_KINDS = ("detector", "convnext", "vit")


def with_augmentation(recipe: Recipe, kind: str, size: str = "l") -> Recipe:
    """``recipe`` with the augmentation ``kind`` over its epochs:

    * ``none``: resize only (the authors' distillation stages: ``T.Resize((640, 640))``, no flip, no
      multi-scale, no Mosaic / MixUp);
    * ``rtdetrv2``: RT-DETRv2's dataloader.yml (the authors' fine-tuning): PhotometricDistort, ZoomOut,
      IoUCrop, flip, multi-scale 480-800 for every epoch (its stop_epoch 71 lies past their 50 epochs),
      no Mosaic / MixUp;
    * ``rtdetrv4``: the phases of the RT-DETRv4 recipe of ``size`` compressed to the epochs (Mosaic, MixUp,
      a final no-augmentation phase)."""
    n = recipe.epochs
    if kind == "none":
        return replace(recipe, augment=kind, policy_epochs=(0, 0, 0), mixup_epochs=(0, 0), stop_epoch=0,
                       no_aug_epoch=n, flip_prob=0.0, mosaic_prob=0.0, mixup_prob=0.0)
    if kind == "rtdetrv2":
        return replace(recipe, augment=kind, policy_epochs=(0, 0, n), mixup_epochs=(0, 0), stop_epoch=n,
                       no_aug_epoch=0, flip_prob=0.5, mosaic_prob=0.0, mixup_prob=0.0, base_size_repeat=3)
    if kind == "rtdetrv4":
        v4 = scale_recipe(RECIPES[size], n)
        return replace(recipe, augment=kind, policy_epochs=v4.policy_epochs, mixup_epochs=v4.mixup_epochs,
                       stop_epoch=v4.stop_epoch, no_aug_epoch=v4.no_aug_epoch, flip_prob=0.5,
                       mosaic_prob=v4.mosaic_prob, mixup_prob=v4.mixup_prob, base_size_repeat=v4.base_size_repeat)
    raise ValueError(f"unknown --augment {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")


def rt_co_detr_recipe(size: str = "l", stage: str = "distill", teacher: str = "detector") -> Recipe:
    """The RT-CO-DETR authors' settings (``nam-htran/RT-CO-DETR``) for one stage, 50 epochs each:

    * ``distill`` (labels unused), ``teacher="detector"`` (src/distillation/trainer_codetr.py): AdamW lr 5e-5,
      wd 1e-4, one group, batch 4 per GPU, ReduceLROnPlateau(factor 0.2, patience 5) and early stopping
      (12) on the validation distillation loss, best checkpoint by that loss, resize only, fp32, no EMA,
      no warm-up, no clipping. The feature-only ablation's mimic stage (``convnext`` / ``vit``,
      trainer_convnext.py / trainer_vit.py): lr 1e-4, wd 1e-5, batch 16 per GPU, factor 0.1, patience 3,
      early stopping 7;
    * ``finetune`` (templates/rtdetrv2_taco_finetune_*.yml): AdamW lr 1e-4 with backbone and encoder at 1e-5
      (ConvNeXt: encoder 5e-5; ViT: 2e-5 everywhere), wd 1e-4, total batch 16, MultiStepLR x0.1 at epoch 40,
      RT-DETRv2 augmentation, no EMA, no warm-up, no clipping (their configs leave optimizer.yml out);
    * ``joint``: the distillation stage's optimizer with the detection loss on, followed by the val AP."""
    if stage not in STAGES or teacher not in TEACHER_KINDS:
        raise ValueError(f"RT-CO-DETR stage {stage!r} / teacher {teacher!r}: choose a stage of {STAGES} and a "
                         f"teacher kind of {TEACHER_KINDS}")
    base = replace(scale_recipe(RECIPES[size], 50), warmup_iter=0, ema=False, clip_max_norm=0.0,
                   backbone_regex=_NOTHING, norm_regex=_NOTHING, milestones=(), early_stop=None)
    if stage == "finetune":
        lr, backbone_lr, encoder_lr = {"detector": (1e-4, 1e-5, 1e-5), "convnext": (1e-4, 1e-5, 5e-5),
                                       "vit": (2e-5, 2e-5, 2e-5)}[teacher]
        recipe = replace(base, lr=lr, backbone_regex=_BACKBONE, backbone_lr=backbone_lr, encoder_regex=_ENCODER,
                         encoder_lr=encoder_lr, weight_decay=1e-4, total_batch_size=16, schedule="multistep",
                         milestones=(40,), lr_gamma=0.1)
        return with_augmentation(recipe, "rtdetrv2")
    lr, wd, batch, factor, patience, stop = (5e-5, 1e-4, 4, 0.2, 5, 12) if teacher == "detector" else \
        (1e-4, 1e-5, 16, 0.1, 3, 7)
    recipe = replace(base, lr=lr, backbone_lr=lr, weight_decay=wd, batch_per_process=batch, schedule="plateau",
                     lr_gamma=factor, plateau_patience=patience, early_stop=stop,
                     monitor="kd_loss" if stage == "distill" else "ap")
    return with_augmentation(recipe, "none")


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


def resolve_recipe(size: str, epochs: int | None = None, name: str | None = None, stage: str | None = None,
                   teacher: str = "detector", augment: str | None = None, **overrides) -> Recipe:
    """The recipe a run of ``size`` follows (``name="rt-co-detr"``: the RT-CO-DETR authors' for ``stage``
    and ``teacher``, see :func:`rt_co_detr_recipe`), compressed to ``epochs`` when given, with the
    ``augment`` family and ``overrides`` (lr, weight_decay, schedule, ema; None = keep): the one resolver
    that ``jobs.train`` and ``jobs.cache_teacher`` share, so both see the same phases."""
    if name not in (None, "rtdetrv4", "rt-co-detr"):
        raise ValueError(f"unknown --recipe {name!r}; choose rtdetrv4 or rt-co-detr")
    if name == "rt-co-detr":
        recipe = rt_co_detr_recipe(size, stage or "distill", teacher)
    elif stage is not None:
        raise ValueError("--stage is a part of --recipe rt-co-detr")
    else:
        recipe = get_recipe(size)
    if epochs is not None and epochs != recipe.epochs:
        f = epochs / recipe.epochs
        milestones = tuple(max(1, round(m * f)) for m in recipe.milestones)
        recipe = replace(scale_recipe(recipe, epochs), milestones=milestones)
        if recipe.augment != "rtdetrv4":   # the flat families span the whole run, whatever its length
            recipe = with_augmentation(recipe, recipe.augment, size)
    if augment is not None and augment != recipe.augment:
        recipe = with_augmentation(recipe, augment, size)
    lr = overrides.get("lr")
    if lr is not None:   # keep the backbone (and encoder) / base ratios of the released configs
        overrides["backbone_lr"] = recipe.backbone_lr * lr / recipe.lr
        if recipe.encoder_lr is not None:
            overrides["encoder_lr"] = recipe.encoder_lr * lr / recipe.lr
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    # no EMA: the stage-2 restart decay must not switch one on (the RT-CO-DETR distillation stage starts in
    # "stage 2", its stop epoch being 0)
    return recipe if recipe.ema else replace(recipe, ema_restart_decay=0.0)


def teacher_kind(distill: str, vfm: str) -> str:
    """Which of the authors' stage settings a distillation mode follows: detector (``codetr`` and the
    baseline), or the feature-only ablation's ConvNeXt / ViT teacher (``feat``)."""
    if distill != "feat":
        return "detector"
    return "vit" if "vit" in vfm.lower() else "convnext"


def recipe_from_config(cfg) -> Recipe:
    """The recipe of a :class:`pipeline.train.config.TrainConfig` (already resolved by
    ``pipeline.train.rt_co_detr.resolve_preset``: its ``stage`` is distill, finetune, joint or None)."""
    if cfg.stage == "both":
        raise ValueError("--stage both is two runs, one recipe each: run it with jobs.train (pipeline.train."
                         "rt_co_detr.run_training), or pick --stage distill or finetune")
    return resolve_recipe(cfg.size, cfg.epochs, cfg.recipe, stage=cfg.stage,
                          teacher=teacher_kind(cfg.distill, cfg.vfm), augment=cfg.augment, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, schedule=cfg.schedule, ema=cfg.ema)
