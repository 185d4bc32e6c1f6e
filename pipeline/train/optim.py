"""AdamW with the released per-size parameter groups, and the flat-cosine LR schedule
(official ``YAMLConfig.get_optim_params`` and ``FlatCosineLRScheduler``)."""
from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Iterable, Mapping

import torch
from torch import nn

from pipeline.train.recipe import Recipe


def _named(model: nn.Module, extra: Mapping[str, nn.Module] | None) -> list[tuple[str, nn.Parameter]]:
    model = model.module if hasattr(model, "module") else model   # DDP
    named = list(model.named_parameters())
    for prefix, mod in (extra or {}).items():
        named += [(f"{prefix}.{n}", p) for n, p in mod.named_parameters()]
    return named


def param_groups(named: Iterable[tuple[str, nn.Parameter]], recipe: Recipe) -> list[dict]:
    """Official grouping: a parameter joins every group whose regex ``re.findall`` matches (in
    order: backbone, encoder, norm); the rest form the last group (base lr / base wd). Each group carries a
    ``name`` and the parameter names in ``param_names`` for logging. A parameter matched by both
    regexes is an error, as it is for torch.optim in the official code. Frozen parameters
    (requires_grad False, e.g. the decoder's ``up``/``reg_scale``) are left out, as officially."""
    named = [(n, p) for n, p in named if p.requires_grad]
    specs = [("backbone", recipe.backbone_regex, dict(lr=recipe.backbone_lr)),
             ("encoder", recipe.encoder_regex, dict(lr=recipe.encoder_lr)),   # RT-CO-DETR fine-tuning only
             ("norm", recipe.norm_regex, dict(weight_decay=0.0))]
    groups, seen = [], {}
    for gname, pattern, opts in specs:
        sel = [(n, p) for n, p in named if re.findall(pattern, n)]
        for n, _ in sel:
            if n in seen:
                raise ValueError(f"parameter {n} matches both the {seen[n]} and {gname} group regexes")
            seen[n] = gname
        groups.append(dict(params=[p for _, p in sel], param_names=[n for n, _ in sel], name=gname, **opts))
    rest = [(n, p) for n, p in named if n not in seen]
    groups.append(dict(params=[p for _, p in rest], param_names=[n for n, _ in rest], name="rest"))
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, recipe: Recipe, extra: Mapping[str, nn.Module] | None = None,
                    **adamw_kwargs) -> torch.optim.AdamW:
    """AdamW(lr, betas, weight_decay from the recipe) over ``model`` plus training-only modules
    named by ``extra`` (e.g. ``{"encoder.feature_projector": dsi.feature_projector}`` so the DSI
    projector is grouped exactly as in the official model, where it lives under the encoder)."""
    groups = param_groups(_named(model, extra), recipe)
    for g in groups:
        g["initial_lr"] = g.get("lr", recipe.lr)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay,
                             **adamw_kwargs)


def flat_cosine_lr(it: int, base: float, *, total_iter: int, warmup_iter: int, flat_iter: int,
                   no_aug_iter: int, lr_gamma: float) -> float:
    """Quadratic warm-up base*(it/warmup)^2 for it <= warmup, flat base until flat_iter, cosine to
    lr_gamma*base until total-no_aug, then constant (official ``flat_cosine_schedule``)."""
    min_lr = base * lr_gamma
    if it <= warmup_iter:
        return base * (it / float(warmup_iter)) ** 2
    if it <= flat_iter:
        return base
    if it >= total_iter - no_aug_iter:
        return min_lr
    frac = (it - flat_iter) / (total_iter - flat_iter - no_aug_iter)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


class _Schedule:
    """What every schedule shares: the optimizer's current lrs and a resumable state (``step(it)``
    re-applies the lr of the last iteration after a restore)."""

    optimizer: torch.optim.Optimizer
    last_iter: int

    def step(self, it: int) -> None:
        raise NotImplementedError

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.last_iter >= 0:
            self.step(self.last_iter)


class FlatCosineSchedule(_Schedule):
    """Per-iteration schedule for every param group from its ``initial_lr``. The official trainer
    calls ``step(global_iter)`` right AFTER the optimizer step of ``global_iter`` (so iteration i
    trains with lr(i-1)); the Trainer does the same. Construction sets lr(0) = 0 for iteration 0
    (official: base/500 from a LinearWarmup object that is never stepped again)."""

    def __init__(self, optimizer: torch.optim.Optimizer, iters_per_epoch: int, epochs: int,
                 flat_epoch: int, no_aug_epoch: int, warmup_iter: int = 2000, lr_gamma: float = 0.5):
        self.optimizer = optimizer
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.total_iter = int(iters_per_epoch * epochs)
        self.flat_iter = int(iters_per_epoch * flat_epoch)
        self.no_aug_iter = int(iters_per_epoch * no_aug_epoch)
        self.warmup_iter = warmup_iter
        self.lr_gamma = lr_gamma
        self.last_iter = -1
        for g, base in zip(optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(0, base)

    @classmethod
    def from_recipe(cls, optimizer, recipe: Recipe, iters_per_epoch: int) -> "FlatCosineSchedule":
        return cls(optimizer, iters_per_epoch, recipe.epochs, recipe.flat_epoch, recipe.no_aug_epoch,
                   recipe.warmup_iter, recipe.lr_gamma)

    def lr_at(self, it: int, base: float) -> float:
        return flat_cosine_lr(it, base, total_iter=self.total_iter, warmup_iter=self.warmup_iter,
                              flat_iter=self.flat_iter, no_aug_iter=self.no_aug_iter, lr_gamma=self.lr_gamma)

    def step(self, it: int) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(it, base)
        self.last_iter = it


class _EpochSchedule(_Schedule):
    """Base of the per-epoch schedules: a linear warm-up over ``warmup_iter`` iterations, then
    ``base * scale`` where ``scale`` changes only at epoch ends."""

    def __init__(self, optimizer: torch.optim.Optimizer, iters_per_epoch: int, warmup_iter: int = 0):
        self.optimizer = optimizer
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.iters_per_epoch, self.warmup_iter = iters_per_epoch, warmup_iter
        self.scale, self.last_iter = 1.0, -1
        self.step(0)

    def _factor(self, it: int) -> float:
        warm = min(1.0, it / self.warmup_iter) if self.warmup_iter else 1.0
        return warm * self.scale

    def step(self, it: int) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self._factor(it)
        self.last_iter = it



class MultiStepSchedule(_EpochSchedule):
    """lr = base * gamma^(number of milestones passed), milestones in epochs (torch MultiStepLR)."""

    def __init__(self, optimizer, iters_per_epoch: int, milestones, gamma: float = 0.1, warmup_iter: int = 0):
        self.milestones, self.gamma = tuple(milestones), gamma
        super().__init__(optimizer, iters_per_epoch, warmup_iter)

    def _factor(self, it: int) -> float:
        epoch = it // max(1, self.iters_per_epoch)
        self.scale = self.gamma ** sum(epoch >= m for m in self.milestones)
        return super()._factor(it)

    def end_epoch(self, metric: float) -> None:
        pass


class PlateauSchedule(_EpochSchedule):
    """lr *= factor when the validation AP has not improved for ``patience`` epochs (torch
    ReduceLROnPlateau, mode max; the authors monitored their validation distillation loss)."""

    def __init__(self, optimizer, iters_per_epoch: int, factor: float = 0.2, patience: int = 5, warmup_iter: int = 0):
        self.factor, self.patience = factor, patience
        self.best, self.bad_epochs = float("-inf"), 0
        super().__init__(optimizer, iters_per_epoch, warmup_iter)

    def end_epoch(self, metric: float) -> None:
        if metric > self.best:
            self.best, self.bad_epochs = metric, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.bad_epochs = 0
            self.step(self.last_iter)


def build_schedule(optimizer, recipe: Recipe, iters_per_epoch: int):
    """The recipe's LR schedule; every one has ``step(global_iter)`` and ``state_dict``; the epoch
    schedules also ``end_epoch(val_ap)``."""
    if recipe.schedule == "flat-cosine":
        recipe = replace(recipe, warmup_iter=max(1, recipe.warmup_iter))   # its warm-up divides by it
        return FlatCosineSchedule.from_recipe(optimizer, recipe, iters_per_epoch)
    if recipe.schedule == "multistep":
        return MultiStepSchedule(optimizer, iters_per_epoch, recipe.milestones or (round(recipe.epochs * 2 / 3),),
                                 gamma=recipe.lr_gamma, warmup_iter=recipe.warmup_iter)
    if recipe.schedule == "plateau":
        return PlateauSchedule(optimizer, iters_per_epoch, factor=recipe.lr_gamma, patience=recipe.plateau_patience,
                               warmup_iter=recipe.warmup_iter)
    raise ValueError(f"unknown schedule {recipe.schedule!r}: flat-cosine, multistep or plateau")
