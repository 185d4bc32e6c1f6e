"""Gradient-guided Adaptive Modulation (RT-DETRv4 paper, Sec. GAM; official ``det_engine.py`` /
``det_solver.py``).

GAM watches how much of the gradient L1 mass lands in the AIFI layer (parameters named
``encoder.encoder.*``) and, once per epoch, moves the DSI loss weight lambda so that share stays
inside a per-size band [rho - delta, rho + delta] (in %).

When the share p leaves the band, lambda moves so that the share heads for the FAR band edge
(p below the band: toward rho + delta; above it: toward rho - delta), in both rules:
``rule="released"`` reproduces the released update exactly (see :func:`released_update`), an
odds-ratio step; ``rule="paper"`` is the paper's Eq. 11, lambda * (rho + delta) / p below the band and
lambda * (rho - delta) / p above it (shares in %), without the released code's clamps.

Fixed relative to the released code:
  * works with and without DDP (``module.`` / ``_orig_mod.`` prefixes are stripped first);
  * lambda is identical on every rank: the epoch statistic is all-reduced and the new lambda is
    broadcast from rank 0 (released: only rank 0 changes lambda);
  * ``state_dict()`` holds lambda, the running statistics and the history (released: lambda is lost
    on resume);
  * no per-parameter host syncs: per-step shares are accumulated on device with one
    ``torch._foreach_norm`` call and synced once per epoch;
  * optional ``skip_nonfinite`` drops AMP-overflow steps instead of averaging in a 0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

AIFI_PREFIX = "encoder.encoder."


@dataclass
class GAMConfig:
    lambda0: float          # initial DSI weight (config ``weight_dict.loss_distill``)
    rho: float              # target AIFI share, %
    delta: float            # tolerance, % points
    default_weight: float   # used when the share is ~0 and for every epoch >= stop_epoch
    stop_epoch: int | None = None
    rule: Literal["released", "paper"] = "released"
    skip_nonfinite: bool = False   # False = released: an overflow step counts as share 0

    @classmethod
    def for_size(cls, size: str, **overrides) -> "GAMConfig":
        if size not in GAM_SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {sorted(GAM_SIZES)}")
        return replace(GAM_SIZES[size], **overrides)


#: Released per-size settings (configs/rtv4/rtv4_hgnetv2_*_coco.yml, ``distill_adaptive_params``).
GAM_SIZES = {
    "s": GAMConfig(lambda0=5.0, rho=11.0, delta=1.0, default_weight=20.0),
    "m": GAMConfig(lambda0=5.0, rho=3.5, delta=0.25, default_weight=15.0),
    "l": GAMConfig(lambda0=15.0, rho=2.0, delta=0.1, default_weight=15.0),
    "x": GAMConfig(lambda0=20.0, rho=2.0, delta=0.25, default_weight=20.0),
}


def released_update(p: float, lam: float, epoch: int, cfg: GAMConfig) -> tuple[float, str]:
    """One end-of-epoch update; ``p`` is the epoch-mean AIFI share in %. First matching case:
    p < 1e-6 -> default; epoch >= stop_epoch -> default; p outside the band, only if lam > 1e-6 ->
    a step toward the FAR band edge t (t = rho + delta when p < rho - delta, else rho - delta):
    released: odds ratio t(1-p) / (p(1-t)) (fractions), ratio >= 0.1, result clamped to
    [lam/10, 10 lam]; paper (Eq. 11): lam * t / p; otherwise unchanged."""
    if p < 1e-6:
        return cfg.default_weight, "reset_to_default_zero_grad"
    if cfg.stop_epoch is not None and epoch >= cfg.stop_epoch:
        return cfg.default_weight, "ema_phase_default"
    lo, hi = cfg.rho - cfg.delta, cfg.rho + cfg.delta
    if lo <= p <= hi or lam <= 1e-6:
        return lam, "unchanged"
    target = hi if p < lo else lo
    if cfg.rule == "paper":
        return lam * target / p, f"adjusted_to_{target:.2f}%"
    if cfg.rule != "released":
        raise ValueError(f"unknown GAM rule {cfg.rule!r}; choose 'released' or 'paper' (--gam-rule)")
    pc, pt = p / 100.0, target / 100.0
    den = pc * (1.0 - pt)
    if abs(den) < 1e-9:
        return lam, "unchanged"
    ratio = max(pt * (1.0 - pc) / den, 0.1)
    return min(max(lam * ratio, lam / 10.0), lam * 10.0), f"adjusted_to_{target:.2f}%"


def _strip(name: str) -> str:
    """Drop wrapper prefixes: DDP's ``module.`` and torch.compile's ``_orig_mod.``."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


class GAM:
    """Controller. Per step, after backward (and unscale/clip): ``gam.measure(model, dsi)``; at the
    end of each epoch, on every rank: ``gam.end_epoch(epoch)``; the DSI term is ``gam.weight * loss``."""

    def __init__(self, cfg: GAMConfig, aifi_prefix: str = AIFI_PREFIX):
        self.cfg = cfg
        self.aifi_prefix = aifi_prefix
        self.weight = float(cfg.lambda0)
        self.history: list[dict] = []
        self._sum: Tensor | None = None     # device accumulators (float64)
        self._count: Tensor | None = None
        self._pending = (0.0, 0.0)          # restored running stats, added at the next sync
        self._params: list[tuple[nn.Parameter, bool]] | None = None
        self._model_id: tuple[int, ...] | None = None
        self.last_share: Tensor | None = None

    # -- per step (no host sync) ---------------------------------------------------------------
    def _bind(self, model: nn.Module, extra: tuple[nn.Module, ...]) -> None:
        self._params = [(p, _strip(n).startswith(self.aifi_prefix)) for n, p in model.named_parameters()]
        self._params += [(p, False) for m in extra for p in m.parameters()]
        if not any(a for _, a in self._params):
            raise ValueError(f"GAM found no parameter named {self.aifi_prefix}* in the model; "
                             "the AIFI share would always be 0")
        self._model_id = (id(model),) + tuple(id(m) for m in extra)

    def _share(self, model: nn.Module, extra: tuple[nn.Module, ...] = ()) -> tuple[Tensor, Tensor]:
        if self._model_id != (id(model),) + tuple(id(m) for m in extra):
            self._bind(model, extra)
        aifi, rest = [], []
        for p, is_aifi in self._params:
            if p.grad is not None:
                (aifi if is_aifi else rest).append(p.grad.detach())
        if not aifi and not rest:
            zero = torch.zeros((), dtype=torch.float64)
            return zero, zero.bool()
        num, other = (torch.stack(torch._foreach_norm(g, 1)).double().sum() if g else None for g in (aifi, rest))
        num = num if num is not None else torch.zeros_like(other)
        total = num + other if other is not None else num
        ok = torch.isfinite(total) & (total > 0)
        return torch.where(ok, 100.0 * num / total.clamp_min(1e-300), torch.zeros_like(total)), ok

    def step_share(self, model: nn.Module, *extra: nn.Module) -> Tensor:
        """AIFI share (%) of this step's gradient L1 mass (sum |g| over ``encoder.encoder.*`` /
        over all parameters with a gradient) as a 0-d device tensor; 0 when the total is
        non-finite or <= 0 (released behaviour). ``extra`` modules (the DSI projector, which the
        official model holds as ``encoder.feature_projector``) count in the total only."""
        return self._share(model, extra)[0]

    def measure(self, model: nn.Module, *extra: nn.Module) -> Tensor:
        """Accumulate this step's share on device; returns it (``.item()`` only if you log it).
        Pass the detector (DDP-wrapped or not) and the DSI module: ``gam.measure(model, dsi)``."""
        share, ok = self._share(model, extra)
        if self._sum is None or self._sum.device != share.device:
            self._sum = torch.zeros((), dtype=torch.float64, device=share.device)
            self._count = torch.zeros((), dtype=torch.float64, device=share.device)
        self._sum += share                  # a non-finite step adds 0 ...
        self._count += ok.double() if self.cfg.skip_nonfinite else 1.0   # ... and counts unless skipped
        self.last_share = share
        return share

    # -- per epoch (one sync) --------------------------------------------------------------------
    @staticmethod
    def _comm_device() -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _epoch_stats(self) -> tuple[float, float]:
        """(sum of shares, number of steps) over this epoch on all ranks: the one sync per epoch."""
        stats = torch.tensor(self._pending, dtype=torch.float64)
        if self._sum is not None:
            stats = stats.to(self._sum.device) + torch.stack([self._sum, self._count])
        if dist.is_available() and dist.is_initialized():
            stats = stats.to(self._comm_device())
            dist.all_reduce(stats)
        s, c = stats.tolist()
        return s, c

    def end_epoch(self, epoch: int) -> dict:
        """Apply the update rule to the epoch-mean share (all ranks' steps) and reset the stats.
        Call it on every rank; the returned record is also appended to ``history``."""
        s, c = self._epoch_stats()
        p = s / c if c > 0 else 0.0
        old = self.weight
        new, reason = released_update(p, old, epoch, self.cfg)
        if dist.is_available() and dist.is_initialized():
            # Every rank computed the same value from the all-reduced statistic; broadcasting
            # rank 0's makes it bit-identical regardless of reduction order.
            t = torch.tensor([new], dtype=torch.float64, device=self._comm_device())
            dist.broadcast(t, src=0)
            new = t.item()
        self.weight = new
        rec = dict(epoch=int(epoch), share=p, lambda_old=old, lambda_new=new, reason=reason, steps=int(c))
        self.history.append(rec)
        self._sum = self._count = None
        self._pending = (0.0, 0.0)
        return rec

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = float(self._sum) + self._pending[0] if self._sum is not None else self._pending[0]
        c = float(self._count) + self._pending[1] if self._count is not None else self._pending[1]
        return dict(weight=self.weight, running_sum=s, running_count=c,
                    history=[dict(r) for r in self.history], config=asdict(self.cfg))

    def load_state_dict(self, state: dict) -> None:
        self.weight = float(state["weight"])
        self.history = [dict(r) for r in state.get("history", [])]
        self._pending = (float(state.get("running_sum", 0.0)), float(state.get("running_count", 0.0)))
        self._sum = self._count = None

    def plot(self, path) -> None:
        plot_gam(self.history, path, band=(self.cfg.rho - self.cfg.delta, self.cfg.rho + self.cfg.delta))


def plot_gam(history: list[dict], path, band: tuple[float, float] | None = None) -> None:
    """PNG of lambda (left axis) and the AIFI share with its target band (right axis) per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [r["lambda_new"] for r in history], "o-", color="tab:blue", label="lambda (after update)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("DSI weight lambda", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, [r["share"] for r in history], "s--", color="tab:red", label="AIFI share %")
    if band is not None:
        ax2.axhspan(band[0], band[1], color="tab:red", alpha=0.15, label="target band")
    ax2.set_ylabel("AIFI gradient share (%)", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="best", fontsize=8)
    ax.set_title("GAM")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["GAM", "GAMConfig", "GAM_SIZES", "released_update", "plot_gam", "AIFI_PREFIX"]
