"""Exponential moving average of the model (official ``engine/optim/ema.py``, from timm).

Effective decay at update u is ``decay * (1 - exp(-u / warmups))``. Every floating-point entry of
the state dict (parameters AND buffers such as BN running stats) is averaged; integer buffers
(``num_batches_tracked``) keep their initial copy, as in the official code.

Fixed: the official decay function closes over the constructor's ``decay``, so the stage-2
``ema.decay = ema_restart_decay`` (and the per-refresh decrement) never took effect. Here the
decay is read from ``self.decay`` on every update, so assigning it works.
"""
from __future__ import annotations

import math
from copy import deepcopy

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 1000, start: int = 0):
        self.module = deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmups = warmups
        self.start = start
        self.before_start = 0
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        if self.warmups == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.before_start < self.start:
            self.before_start += 1
            return
        self.updates += 1
        d = self.decay_at(self.updates)
        msd = _unwrap(model).state_dict()
        ema, cur = [], []
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                ema.append(v)
                cur.append(msd[k].detach().to(v.dtype))
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, cur, alpha=1.0 - d)

    def to(self, *args, **kwargs) -> "ModelEMA":
        self.module = self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict:
        # ``module`` and ``updates`` as in official checkpoints; the rest lets a resume keep a
        # changed decay (stage 2) and the start counter.
        return dict(module=self.module.state_dict(), updates=self.updates, decay=self.decay,
                    warmups=self.warmups, before_start=self.before_start)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.module.load_state_dict(state["module"], strict=strict)
        self.updates = state.get("updates", self.updates)
        self.decay = state.get("decay", self.decay)
        self.warmups = state.get("warmups", self.warmups)
        self.before_start = state.get("before_start", self.before_start)
