"""A whole training run, ours against the official code's: same initial weights, same batches, every phase.

    python -m benchmarks.recipe_parity --official-src .official/RT-DETRv4 --distill none --out runs/parity_none
    python -m benchmarks.recipe_parity --official-src .official/RT-DETRv4 --distill dsi --sides official ours cached
    python -m benchmarks.recipe_parity --sides ours --epochs 2 --train-images 6 --batch-size 2   # ours alone, tiny

RT-DETRv4-S is trained three times per mode (``--distill none`` and ``dsi``: DSI + GAM with the same
random-init ``--vfm`` teacher on both sides):

* **official**: its ``DetSolver.fit`` as released (model, ``RTv4Criterion`` with GAM, AdamW groups,
  ``ModelEMA``, ``FlatCosineLRScheduler``, ``train_one_epoch``, ``evaluate`` with its post-processor
  and ``CocoEvaluator``, its stage switch and stage-2 reloads of ``best_stg1.pth``), imported from
  ``--official-src`` (``benchmarks/official.py`` says what connects it to our data);
* **ours**: ``pipeline.train.Trainer.fit``, seed 0;
* **ours seed 1** (``--seeds``): the noise band, two of our runs that differ in initial weights and
  batch order;
* **ours cached** (``--sides ... cached``, mode ``dsi``): our seed-0 run again, its teacher targets
  read from an exact int8 store of its plan (``jobs.cache_teacher``) instead of the online teacher.

Both sides start from the same weights (ours, built with seed 0; the official model loads them by
name, ``init`` digests printed) and train on the same batches: our training plan's collated batches
(Mosaic, MixUp, multi-scale, stop-epoch policy) are handed to the official loop by
``official.PlanLoader``. The data is the first ``--train-images`` of the embedded data set (every
epoch a whole epoch of the plan, which the store then holds whole), evaluated on the embedded val
split. The recipe is the size's, compressed to ``--epochs`` (``scale_recipe``): 17
epochs visit every phase: plain (epoch 0), Mosaic + MixUp (1-7), zoom-out / IoU crop (8-14), stage 2
(15-16, after the stop-epoch switch to ``best_stg1.pth``).

Printed per mode and epoch, side by side: val AP / AP50 of each run, ours - official against the band
(ours seed 0 - ours seed 1), the epoch means of the main loss terms and the largest relative
difference over all shared terms, lr (epoch mean), GAM lambda (the epoch's), the AIFI gradient share,
the EMA decay of the epoch's last update and which ``best_stg1.pth`` (of which epoch) was reloaded.
For the cached run: per epoch the largest per-step loss difference cached - online (and of the DSI
term alone, relative), the AP of both and the exact-hit rate. ``--out`` keeps every run and
``parity.json`` (every term of every step).

Expected, explained differences (the official code runs as released otherwise):

1. **Iteration 0's lr**: official base/500 (its ``LinearWarmup`` constructor sets it and is never
   stepped), ours lr(0) = 0 (docs/training.md). Later lrs are the same function of the iteration.
2. **EMA decay after a stage-2 reload**: the official ``ModelEMA`` ignores ``ema.decay`` (official bug 5),
   so its decay stays 0.9999 x ramp; ours lowers it by 1e-4 per reload, as the official code means to.
3. **GAM's name test**: the official model runs under the names a one-rank DDP gives it
   (``official.one_rank_ddp``): in a plain process its AIFI share is 0 % and lambda resets to 20 every
   epoch (official bug 1); the released runs used DDP.
4. **The DSI zeros of aux / dn layers** are created on the CPU instead of a hard-coded ``cuda``
   (official bug 13): they are zeros either way.
5. **Summation order**: the gradient-clip norm runs over the parameters in each model's order (the
   official projector sits inside the encoder, ours after the detector), GAM sums its share in
   float64 on the host (ours in float32 on the device): last-bit differences. With 1 (lr), they let
   the two trajectories drift apart as two seeds do, only more slowly: the verdict compares every
   epoch's AP difference with the seed band, the loss means and the GAM lambdas likewise.

Runs go in parallel processes (``--jobs``, all at once by default, each with ``--threads`` 1); the
official code is only imported in its own process (its ``load_config`` keeps state between configs,
official bug 17). Estimates on 2 idle cores: ``--distill none`` ~25 min (three runs of ~9 min of
2-core time each), ``--distill dsi --sides official ours cached`` ~45 min (four runs with the ViT-B
teacher, and the store); one run alone takes ~10 min.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MAIN_TERMS = ("loss", "loss_mal", "loss_bbox", "loss_giou", "loss_fgl", "loss_distill")   # the final layer's


@dataclass
class Settings:
    """One scaled recipe, the same for every run of a comparison."""
    size: str = "s"
    epochs: int = 17
    img_size: int = 192
    batch_size: int = 8
    train_images: int = 96
    eval_images: int = 64
    vfm: str = "dinov3_vitb"
    device: str = ""            # "": cuda when available, else cpu
    workers: int = 0
    threads: int = 1

    def args(self) -> list[str]:
        return [a for f in fields(self) for a in (f"--{f.name.replace('_', '-')}", str(getattr(self, f.name)))]


def add_settings(p: argparse.ArgumentParser, **defaults) -> None:
    base = Settings(**defaults)
    for f in fields(Settings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(base, f.name)), default=getattr(base, f.name),
                       help=argparse.SUPPRESS if f.name in ("device", "threads") else "(default: %(default)s)")


def settings_of(args) -> Settings:
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    if not s.device:
        import torch
        s.device = "cuda" if torch.cuda.is_available() else "cpu"
    return s


# ---------------------------------------------------------------------------------- a run's configuration
def train_config(s: Settings, data: str, distill: str, seed: int, out: Path, **extra):
    """Our TrainConfig of a comparison run: every step logged, the official precision (fp32 on the
    CPU; fp16 autocast + GradScaler on CUDA) and an fp32 teacher."""
    from pipeline.train.config import TrainConfig
    return TrainConfig(size=s.size, epochs=s.epochs, img_size=s.img_size, batch_size=s.batch_size, workers=s.workers,
                       seed=seed, distill=distill, vfm=s.vfm, data=data, val_data="synthetic",
                       eval_max_images=s.eval_images, log_every=1, out=str(out), exist_ok=True,
                       teacher_precision="fp32", amp="fp16" if s.device == "cuda" else "off", device=s.device, **extra)


def initial_state(student) -> dict:
    """A student's detector + DSI projector weights under the official names, without the anchor
    buffers (a function of the input size, computed by each model for its own)."""
    from benchmarks.official import ours_to_official_state
    state = ours_to_official_state(student.detector, student.dsi)
    return {k: v for k, v in state.items() if k not in ("decoder.anchors", "decoder.valid_mask")}


def digest(state: dict) -> str:
    """sha256 of a state dict's tensors, by sorted key (the official and our layouts share the keys)."""
    import torch
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------- our side
class _Reloads(logging.Handler):
    """The trainer's stage-switch and stage-2 reloads of best_stg1.pth, from its log records."""

    def __init__(self, trainer):
        super().__init__(logging.INFO)
        self.trainer, self.events, self.pending = trainer, [], None

    def emit(self, record) -> None:
        from detector.checkpoint import read_checkpoint
        msg = str(record.msg)
        if msg.startswith("restored model") and "best_stg1" in str(record.args[0]):
            # its "epoch" is the next one to run: the trainer saves after moving its counter on
            best = read_checkpoint(record.args[0], "parity")["epoch"] - 1
            self.pending = {"at": "switch", "epoch": self.trainer.progress.epoch, "best_epoch": best}
            self.events.append(self.pending)
        elif msg.startswith("stage 2:") and self.pending is not None:   # a reload after an evaluated epoch
            self.pending.update(at="after", epoch=self.trainer.progress.epoch - 1)


class _OnlineBeside:
    """The cached run's check at every step, free of the drift that separates two whole runs: the
    online teacher on the very batch tensor the student sees, and ``loss_distill`` at the same
    student (same weights, same projected features) from the stored target and from the online one.
    Their difference is the storage rounding alone. Costs the cached run the online teacher."""

    def __init__(self, trainer):
        import torch
        data, dsi, distill, progress = trainer.data, trainer.distill.dsi, trainer.distill, trainer.progress
        served, align = data.teacher_targets, dsi.alignment_loss
        self.steps: list[dict] = []
        self.online = None

        def teacher_targets(images, targets, batch):   # called inside the trainer's fork_rng
            out = served(images, targets, batch)
            with torch.no_grad():
                self.online = data.online_teacher()(images).float()
            return out

        def alignment_loss(projected, target):
            loss = align(projected, target)
            if self.online is not None and self.online.shape == target.shape:
                with torch.no_grad():   # one host copy per step for the three numbers
                    other = align(projected, self.online)
                    norms = torch.stack([(target - self.online).norm(), self.online.norm(), (loss - other).abs(),
                                         loss.abs()]).tolist()
                    self.steps.append(dict(epoch=progress.epoch, target_rel=norms[0] / norms[1],
                                           distill_diff=norms[2] * distill.weight(),
                                           distill_rel=norms[2] / max(norms[3], 1e-12)))
                self.online = None
            return loss

        data.teacher_targets, dsi.alignment_loss = teacher_targets, alignment_loss


def run_ours(s: Settings, data: str, distill: str, seed: int, out: Path, cache: str | None = None) -> dict:
    """One of our runs; its record per epoch from metrics.jsonl / eval.jsonl."""
    import torch
    from pipeline.train.trainer import Trainer
    trainer = Trainer(train_config(s, data, distill, seed, out, cache=cache))
    init = digest(initial_state(trainer.student))
    beside = _OnlineBeside(trainer) if cache else None
    handler = _Reloads(trainer)
    logger = logging.getLogger("rtdetrv4.train")
    level = logger.level
    logger.setLevel(logging.INFO)   # without it (no logging set-up in a worker) the INFO records are never made
    logger.addHandler(handler)
    torch.manual_seed(seed)   # the official run re-seeds at the same point: its first epoch
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    epochs = ours_epochs(Path(trainer.out), handler.events, distill)
    for ep in epochs if beside else []:
        same = [x for x in beside.steps if x["epoch"] == ep["epoch"]]
        ep["same_step"] = {k: max((x[k] for x in same), default=None)
                           for k in ("distill_diff", "distill_rel", "target_rel")}
    return dict(side="ours" if cache is None else "ours cached", seed=seed, distill=distill, init=init,
                seconds=time.perf_counter() - t0, epochs=epochs)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def ours_epochs(run: Path, reloads: list[dict], distill: str) -> list[dict]:
    steps, evals = _lines(run / "metrics.jsonl"), _lines(run / "eval.jsonl")
    out = []
    for ev in evals:
        e = ev["epoch"]
        s = [x for x in steps if x["epoch"] == e]
        terms = sorted({k for x in s for k in x if k.startswith("loss")})
        out.append(dict(
            epoch=e, steps=len(s), AP=ev["AP"], AP50=ev["AP50"],
            losses={k: _mean(x[k] for x in s if k in x) for k in terms},
            step_losses=[{k: x[k] for k in terms if k in x} for x in s],
            lr=_mean(x["lr"] for x in s), lam=s[0]["distill_weight"] if distill == "dsi" and s else None,
            share=(ev.get("gam") or {}).get("share"), ema_decay=s[-1].get("ema_decay") if s else None,
            exact_hits=_mean(x.get("cache_exact_rate", 0.0) for x in s),
            reload=[r for r in reloads if r["epoch"] == e]))
    return out


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------- official side
def run_official(s: Settings, data: str, distill: str, src: str, out: Path, first_lr_zero: bool = False) -> dict:
    """The official DetSolver.fit from our seed-0 initial weights on our plan's batches."""
    import torch
    from benchmarks import official as O
    from pipeline.data.evaluate import load_ground_truth
    from pipeline.train.trainer import Trainer
    off = O.import_official(src)
    # our trainer of the seed-0 run, never trained: its data (plan, val set) and its initial weights
    ours = Trainer(train_config(s, data, distill, 0, out / "ours_init"))
    state = initial_state(ours.student)
    recipe, dev = ours.recipe, torch.device(s.device)
    cfg = O.official_config(off, s.size, s.img_size, ours.data.num_classes,
                            teacher_dim=ours.data.teacher_dim or 768, epoches=recipe.epochs,
                            flat_epoch=recipe.flat_epoch, no_aug_epoch=recipe.no_aug_epoch,
                            warmup_iter=recipe.warmup_iter, output_dir=str(out / "official"), device=s.device,
                            use_amp=dev.type == "cuda", print_freq=10 ** 6)
    model = cfg.model
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("encoder.feature_projector.", "decoder.anchors", "decoder.valid_mask"))
                         for k in missing):   # no projector without a teacher; anchors of its own size
        raise SystemExit(f"our weights do not fit the official model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    init = digest({k: v for k, v in model.state_dict().items() if k in state})
    if distill == "dsi":
        O.set_parts(cfg, teacher_model=O.official_teacher(s.vfm, dev))
        if dev.type != "cuda":
            O.portable_distill(cfg.criterion)
    else:
        cfg.yaml_cfg.pop("teacher_model", None)
        O.drop_distill(cfg.criterion)
    rec = {"lam": {}, "share": {}, "ema_decay": {}, "reload": [], "evaluated": set(), "steps": {}}

    def on_epoch(e):   # (the closures read ``solver``, made below, when its fit calls them)
        if e == 0:
            torch.manual_seed(0)   # as our seed-0 run before its first epoch
            if first_lr_zero:      # iteration 0 at our lr(0) = 0 instead of its LinearWarmup's base/500
                for group in solver.optimizer.param_groups:
                    group["lr"] = 0.0
        rec["lam"][e] = cfg.criterion.weight_dict.get("loss_distill") if distill == "dsi" else None

    def on_eval():
        ema = solver.ema
        rec["ema_decay"][loader.epoch] = ema.decay_fn(ema.updates)
        rec["evaluated"].add(loader.epoch)

    loader = O.PlanLoader(ours.data, ours.steps_per_epoch, recipe.stop_epoch, recipe.ema_restart_decay,
                          s.img_size, on_epoch=on_epoch)
    O.set_parts(cfg, train_dataloader=loader,
                val_dataloader=O.ValLoader(ours.data, s.batch_size, s.eval_images, on_eval=on_eval),
                evaluator=off.CocoEvaluator(O.coco_ground_truth(load_ground_truth(ours.data.val_coco)), ["bbox"]),
                postprocessor=O.CategoryIds(cfg.postprocessor, ours.data.label_to_category_id))
    criterion, criterion_forward = cfg.criterion, cfg.criterion.forward

    def recording_criterion(*args, **kwargs):   # every training step's weighted terms, as our metrics.jsonl
        losses = criterion_forward(*args, **kwargs)
        if criterion.training:
            rec["steps"].setdefault(loader.epoch, []).append({k: float(v) for k, v in losses.items()})
        return losses

    criterion.forward = recording_criterion
    train_one_epoch = off.det_solver.train_one_epoch

    def recording_train_one_epoch(*args, **kwargs):   # the epoch's AIFI share, as DetSolver.fit averages it
        stats, shares = train_one_epoch(*args, **kwargs)
        rec["share"][loader.epoch] = sum(shares) / len(shares) if shares else None
        return stats, shares

    class Solver(off.DetSolver):
        def _setup(self):
            super()._setup()
            self.model = O.one_rank_ddp(self.model)

        def load_state_dict(self, state):
            if "last_epoch" in state:   # a reload of best_stg1.pth (stage switch or stage-2 refresh)
                rec["reload"].append({"at": "after" if loader.epoch in rec["evaluated"] else "switch",
                                      "epoch": loader.epoch, "best_epoch": state["last_epoch"]})
            super().load_state_dict(state)

    off.det_solver.train_one_epoch = recording_train_one_epoch
    solver = Solver(cfg)
    t0 = time.perf_counter()
    solver.fit()
    seconds = time.perf_counter() - t0
    epochs = []
    for row in _lines(out / "official" / "log.txt"):
        e = row["epoch"]
        bbox = row["test_coco_eval_bbox"]
        epochs.append(dict(epoch=e, steps=ours.steps_per_epoch, AP=bbox[0], AP50=bbox[1],
                           losses={k[len("train_"):]: v for k, v in row.items() if k.startswith("train_loss")},
                           step_losses=rec["steps"].get(e, []),
                           lr=row["train_lr"], lam=rec["lam"].get(e),
                           share=rec["share"].get(e) if distill == "dsi" else None,
                           ema_decay=rec["ema_decay"].get(e), reload=[r for r in rec["reload"] if r["epoch"] == e]))
    return dict(side="official", seed=0, distill=distill, init=init, seconds=seconds, epochs=epochs)


# ------------------------------------------------------------------------------------ tables
def phase(recipe, e: int) -> str:
    e0, e1, e2 = recipe.policy_epochs
    if e >= recipe.stop_epoch:
        return "stage 2"
    name = "plain" if e < e0 else "mosaic" if e < e1 else "crop" if e < e2 else "no-aug"
    return name + ("+mixup" if recipe.mixup_epochs[0] <= e < recipe.mixup_epochs[1] else "")


def _f(v, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def reloads_by_rule(aps: list[float], stop_epoch: int) -> list[list[tuple[str, int]]]:
    """Per epoch, the reloads of best_stg1.pth the official DetSolver rule makes from a run's own val
    APs: at ``stop_epoch`` the switch; after a stage-2 epoch no better than the running best since
    the last reload (``best_stat``, stage 1 included), a refresh that empties that running best (both
    from the best stage-1 epoch). Two runs whose APs differ may reload at different epochs and both
    be right."""
    events: list[list[tuple[str, int]]] = [[] for _ in aps]
    best, best_stage1, since = -1.0, None, None
    for e, ap in enumerate(aps):
        if e == stop_epoch and best_stage1 is not None:
            events[e].append(("switch", best_stage1))
        improved = since is None or ap > since
        since = ap if improved else since
        if ap > best:
            best = ap
            if e < stop_epoch:
                best_stage1 = e
        if e >= stop_epoch and not improved and best_stage1 is not None:
            events[e].append(("after", best_stage1))
            since = None
    return events


def follows_rule(run: dict, stop_epoch: int) -> bool:
    seen = [[(r["at"], r["best_epoch"]) for r in ep["reload"]] for ep in run["epochs"]]
    return seen == reloads_by_rule([ep["AP"] for ep in run["epochs"]], stop_epoch)


def _reload(events: list[dict]) -> str:
    return ",".join(f"{'switch' if r['at'] == 'switch' else 'reload'}<-e{r['best_epoch']}" for r in events) or "-"


def rel(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude, or absolute below 1e-3 (the loss terms that matter are
    0.1-100; DDF terms are ~1e-5 and exactly 0 where the layers agree)."""
    return abs(a - b) / max(abs(a), abs(b), 1e-3)


def first_step(a: dict, b: dict) -> str:
    """The largest difference between two runs' first training steps (same weights, same batch)."""
    sa, sb = a["epochs"][0]["step_losses"], b["epochs"][0]["step_losses"]
    if not sa or not sb:
        return "-"
    shared = sorted(set(sa[0]) & set(sb[0]) - {"loss"})
    worst = max(shared, key=lambda k: abs(sa[0][k] - sb[0][k]))
    total = lambda x: sum(v for k, v in x.items() if k != "loss")  # noqa: E731
    return (f"{abs(sa[0][worst] - sb[0][worst]):.2e} ({worst}; {len(shared)} shared terms; total "
            f"{total(sa[0]):.6f} / {total(sb[0]):.6f})")


def _at(run: dict | None, e: int, key: str):
    """``key`` of epoch ``e`` of ``run`` (None when the run or the epoch is missing)."""
    return run["epochs"][e].get(key) if run and e < len(run["epochs"]) else None


def _inside(d, band) -> int:
    return int(d is not None and band is not None and abs(d) <= band)


def report(s: Settings, runs: list[dict]) -> tuple[str, dict]:
    """The side-by-side tables of one mode and its verdict: per epoch, |ours - official| of AP, AP50,
    the total loss and lambda against the seed band |ours seed 0 - ours seed k| (the largest over k)."""
    from pipeline.train.recipe import resolve_recipe
    recipe = resolve_recipe(s.size, s.epochs)
    by = {(r["side"], r["seed"]): r for r in runs}
    ours, off = by.get(("ours", 0)), by.get(("official", 0))
    seeds = [r for (side, seed), r in by.items() if side == "ours" and seed != 0]
    b = seeds[0] if seeds else None
    n = max(len(r["epochs"]) for r in runs)

    def diff(e, key, other):
        a, x = _at(ours, e, key), _at(other, e, key)
        return None if a is None or x is None else a - x

    def band(e, key):
        d = [diff(e, key, r) for r in seeds]
        return None if not d or None in d else max(abs(x) for x in d)

    def total(r, e):
        losses = _at(r, e, "losses")
        return None if losses is None else losses.get("loss")

    lines = [f"== distill {runs[0]['distill']}: RT-DETRv4-{s.size.upper()}, {s.epochs} epochs of {s.train_images} "
             f"images (batch {s.batch_size}), {s.img_size} px, val {s.eval_images} images, {s.device}"]
    lines += [f"   {r['side']:<8} seed {r['seed']}: init sha256 {r['init'][:16]}, {r['seconds']:.0f} s" for r in runs]
    if ours and off:
        lines.append(f"   same initial weights ours / official: {'yes' if ours['init'] == off['init'] else 'NO'}; "
                     f"first step, largest |ours - official| of a loss term: {first_step(ours, off)}")
    lines += ["", f"{'ep':>2} {'phase':<12} {'AP ours':>8} {'official':>8} {'seed1':>8} {'d(o-f)':>7} {'band':>7}   "
                  f"{'AP50 ours':>9} {'official':>8} {'seed1':>8} {'d(o-f)':>7} {'band':>7}"]
    verdict = dict(epochs=n, ap_inside_band=0, ap50_inside_band=0, loss_inside_band=0, lambda_inside_band=0,
                   max_loss_rel=0.0, max_lr_rel=0.0, max_lambda_rel=None, reloads_same=None)
    for e in range(n):
        d, d50 = diff(e, "AP", off), diff(e, "AP50", off)
        verdict["ap_inside_band"] += _inside(d, band(e, "AP"))
        verdict["ap50_inside_band"] += _inside(d50, band(e, "AP50"))
        lines.append(f"{e:>2} {phase(recipe, e):<12} {_f(_at(ours, e, 'AP')):>8} {_f(_at(off, e, 'AP')):>8} "
                     f"{_f(_at(b, e, 'AP')):>8} {_f(d, '+.4f'):>7} {_f(band(e, 'AP')):>7}   "
                     f"{_f(_at(ours, e, 'AP50')):>9} {_f(_at(off, e, 'AP50')):>8} {_f(_at(b, e, 'AP50')):>8} "
                     f"{_f(d50, '+.4f'):>7} {_f(band(e, 'AP50')):>7}")
    terms = [t for t in MAIN_TERMS if any(t in ep["losses"] for r in runs for ep in r["epochs"])]
    lines += ["", "epoch means of the final layer's loss terms, ours / official / seed 1 (loss: the total); max rel: "
                  "the largest relative difference ours-official of any term both log",
              f"{'ep':>2} " + " ".join(f"{t.removeprefix('loss_'):>22}" for t in terms) + f" {'max rel':>8}"]
    for e in range(n):
        cells = ["/".join(_f((_at(r, e, "losses") or {}).get(t), ".3f") for r in (ours, off, b)).rjust(22)
                 for t in terms]
        a, o = _at(ours, e, "losses"), _at(off, e, "losses")
        worst = max((rel(a[k], o[k]) for k in set(a) & set(o)), default=None) if a and o else None
        verdict["max_loss_rel"] = max(verdict["max_loss_rel"], worst or 0.0)
        dl = None if total(off, e) is None else total(ours, e) - total(off, e)
        bl = None if not seeds or b is None or total(b, e) is None else max(
            abs(total(ours, e) - total(r, e)) for r in seeds)
        verdict["loss_inside_band"] += _inside(dl, bl)
        lines.append(f"{e:>2} " + " ".join(cells) + f" {_f(worst, '.2e'):>8}")
    lines += ["", f"{'ep':>2} {'lr ours':>10} {'official':>10} {'lambda ours':>11} {'official':>9} {'seed1':>9} "
                  f"{'AIFI% ours':>10} {'official':>8} {'EMA decay ours':>14} {'official':>8}   reload ours / official"]
    for e in range(n):
        if _at(off, e, "lr") is not None:
            verdict["max_lr_rel"] = max(verdict["max_lr_rel"], rel(_at(ours, e, "lr"), _at(off, e, "lr")))
        if _at(ours, e, "lam") is not None and _at(off, e, "lam") is not None:
            verdict["max_lambda_rel"] = max(verdict["max_lambda_rel"] or 0.0,
                                            rel(_at(ours, e, "lam"), _at(off, e, "lam")))
            verdict["lambda_inside_band"] += _inside(diff(e, "lam", off), band(e, "lam"))
        lines.append(f"{e:>2} {_f(_at(ours, e, 'lr'), '.4e'):>10} {_f(_at(off, e, 'lr'), '.4e'):>10} "
                     f"{_f(_at(ours, e, 'lam'), '.4g'):>11} {_f(_at(off, e, 'lam'), '.4g'):>9} "
                     f"{_f(_at(b, e, 'lam'), '.4g'):>9} {_f(_at(ours, e, 'share'), '.3f'):>10} "
                     f"{_f(_at(off, e, 'share'), '.3f'):>8} {_f(_at(ours, e, 'ema_decay'), '.6f'):>14} "
                     f"{_f(_at(off, e, 'ema_decay'), '.6f'):>8}   "
                     f"{_reload(_at(ours, e, 'reload') or [])} / {_reload(_at(off, e, 'reload') or [])}")
    if ours and off:
        verdict["reloads_same"] = [ep["reload"] for ep in ours["epochs"]] == [ep["reload"] for ep in off["epochs"]]
        verdict["reloads_by_rule"] = {"ours": follows_rule(ours, recipe.stop_epoch),
                                      "official": follows_rule(off, recipe.stop_epoch)}
        v = verdict
        lines += ["", f"verdict: ours - official inside the seed band in {v['ap_inside_band']}/{n} epochs for AP, "
                      f"{v['ap50_inside_band']}/{n} for AP50, {v['loss_inside_band']}/{n} for the total loss"
                      + (f", {v['lambda_inside_band']}/{n} for lambda" if v["max_lambda_rel"] is not None else "")
                      + f"; final AP ours {_f(ours['epochs'][-1]['AP'])} official {_f(off['epochs'][-1]['AP'])}; "
                      f"largest relative difference of an epoch's loss-term mean {v['max_loss_rel']:.2e}, of lr "
                      f"{v['max_lr_rel']:.2e}, of lambda {_f(v['max_lambda_rel'], '.2e')}; the same reloads: "
                      f"{'yes' if v['reloads_same'] else 'NO'}; each side's reloads follow the official rule from "
                      f"its own APs: ours {'yes' if v['reloads_by_rule']['ours'] else 'NO'}, official "
                      f"{'yes' if v['reloads_by_rule']['official'] else 'NO'}"]
    return "\n".join(lines), verdict


def build_store(s: Settings, data: str, out: Path) -> str:
    """The exact teacher store of the seed-0 run's plan (``jobs.cache_teacher``, int8, fp32 teacher)."""
    cmd = [sys.executable, "-m", "jobs.cache_teacher", "--vfm", s.vfm, "--data", data, "--out", str(out),
           "--size", s.size, "--epochs", str(s.epochs), "--input-size", str(s.img_size), "--seed", "0",
           "--global-batch", str(s.batch_size), "--mixup-group", str(min(4, s.batch_size)), "--precision", "fp32",
           "--no-ray", "--quiet"]
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(2 * s.threads))
    if r.returncode:
        raise SystemExit(f"jobs.cache_teacher failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    print(f"exact store of the plan: {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return str(out)


def cache_report(s: Settings, runs: list[dict]) -> tuple[str, dict]:
    """Cached against online: the same run (seed 0) with teacher targets from the int8 exact store."""
    by = {(r["side"], r["seed"]): r for r in runs}
    online, cached = by[("ours", 0)], by[("ours cached", 0)]
    band_runs = [r for (side, seed), r in by.items() if side == "ours" and seed != 0]
    first_o, first_c = online["epochs"][0]["step_losses"][0], cached["epochs"][0]["step_losses"][0]
    det = [k for k in first_o if k in first_c and k not in ("loss", "loss_distill")]
    lines = [f"== cached (exact int8 store) vs online teacher, distill dsi, seed 0: same initial weights: "
             f"{'yes' if online['init'] == cached['init'] else 'NO'}; first step: largest |cached - online| of the "
             f"{len(det)} detection terms {max(abs(first_c[k] - first_o[k]) for k in det):.2e}, loss_distill "
             f"{first_o['loss_distill']:.6f} / {first_c['loss_distill']:.6f} "
             f"(rel {rel(first_o['loss_distill'], first_c['loss_distill']):.1e}: the int8 rounding of the targets)",
             "same student (every step, the cached run's weights): max |loss_distill from the store - from the "
             "online teacher on the same batch| and max relative error of the stored target",
             f"{'ep':>2} {'AP online':>9} {'cached':>8} {'seed1':>8} {'d(c-o)':>8} {'band':>7}   "
             f"{'max|dloss| step':>15} {'(term)':<18} {'max rel d distill':>17} {'exact hits':>10}   "
             f"{'same student: |d distill|':>25} {'rel':>8} {'target rel':>10}"]
    verdict = {"max_step_loss_diff": 0.0, "ap_inside_band": 0, "epochs": len(online["epochs"]),
               "same_student_distill_diff": None, "same_student_distill_rel": None, "same_student_target_rel": None}
    for e, (eo, ec) in enumerate(zip(online["epochs"], cached["epochs"])):
        worst, term, distill = 0.0, "-", 0.0
        for a, b in zip(eo["step_losses"], ec["step_losses"]):
            for k in set(a) & set(b) - {"loss"}:
                if abs(a[k] - b[k]) > worst:
                    worst, term = abs(a[k] - b[k]), k
            if "loss_distill" in a and "loss_distill" in b:
                distill = max(distill, rel(a["loss_distill"], b["loss_distill"]))
        verdict["max_step_loss_diff"] = max(verdict["max_step_loss_diff"], worst)
        b = band_runs[0]["epochs"][e] if band_runs and e < len(band_runs[0]["epochs"]) else None
        band = None if b is None else max(abs(eo["AP"] - r["epochs"][e]["AP"]) for r in band_runs)
        if band is not None:
            verdict["ap_inside_band"] += abs(ec["AP"] - eo["AP"]) <= band
        same = ec.get("same_step") or {}
        for k in ("distill_diff", "distill_rel", "target_rel"):
            if same.get(k) is not None:
                verdict[f"same_student_{k}"] = max(verdict[f"same_student_{k}"] or 0.0, same[k])
        lines.append(f"{e:>2} {_f(eo['AP']):>9} {_f(ec['AP']):>8} {_f(b and b['AP']):>8} {ec['AP'] - eo['AP']:>+8.4f} "
                     f"{_f(band):>7}   {worst:>15.3e} {term:<18} {distill:>17.2e} {ec['exact_hits']:>10.0%}   "
                     f"{_f(same.get('distill_diff'), '.3e'):>25} {_f(same.get('distill_rel'), '.1e'):>8} "
                     f"{_f(same.get('target_rel'), '.2e'):>10}")
    lines.append(f"verdict: largest per-step loss difference {verdict['max_step_loss_diff']:.3e} between the two "
                 f"runs (they drift apart); at the same student {_f(verdict['same_student_distill_diff'], '.3e')} "
                 f"(relative {_f(verdict['same_student_distill_rel'], '.1e')}) "
                 f"(stored targets within {_f(verdict['same_student_target_rel'], '.2e')} relative of the online "
                 f"teacher's, every step); AP cached - online inside the seed band in "
                 f"{verdict['ap_inside_band']}/{verdict['epochs']} epochs")
    return "\n".join(lines), verdict


# ------------------------------------------------------------------------------------ driver
def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_jobs(jobs: list[tuple[str, list[str]]], parallel: int, threads: int) -> None:
    """Run ``python -m benchmarks.recipe_parity --worker ...`` processes, ``parallel`` at a time."""
    env, t0 = _env(threads), time.perf_counter()
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < max(1, parallel):
            log, args = pending.pop(0)
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w")
            running.append((subprocess.Popen([sys.executable, "-m", "benchmarks.recipe_parity", *args], cwd=REPO,
                                             stdout=f, stderr=subprocess.STDOUT, env=env), f, log))
        time.sleep(0.5)
        for item in list(running):
            proc, f, log = item
            if proc.poll() is not None:
                f.close()
                running.remove(item)
                run = Path(log).parent
                print(f"{run.parent.name}/{run.name} finished after {time.perf_counter() - t0:.0f} s "
                      f"(exit {proc.returncode})", flush=True)
                if proc.returncode:
                    tail = Path(log).read_text(errors="replace")[-3000:]
                    raise SystemExit(f"a run failed (exit {proc.returncode}); its log {log} ends:\n{tail}")


def worker(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    s, out, distill = settings_of(args), Path(args.run_dir), args.distill[0]
    if args.worker == "official":   # its prints go to the run's log.txt
        result = run_official(s, args.data, distill, args.official_src, out, args.first_lr == "ours")
    else:
        result = run_ours(s, args.data, distill, args.seed, out / "ours",
                          cache=args.cache if args.worker == "cached" else None)
    (out / "record.json").write_text(json.dumps(result))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", help="root of an RT-DETRv4 checkout (outside this repo's history)")
    p.add_argument("--distill", nargs="+", default=["none", "dsi"], choices=["none", "dsi"])
    p.add_argument("--sides", nargs="+", default=["official", "ours"], choices=["official", "ours", "cached"],
                   help="cached: with --distill dsi, also our seed-0 run from an exact teacher store of its plan "
                        "(jobs.cache_teacher, int8), compared with the online one")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="ours: 0 (the shared one) and the band's")
    p.add_argument("--jobs", type=int, default=0, help="runs at a time, each its own process (0: all at once)")
    p.add_argument("--first-lr", choices=["released", "ours"], default="released",
                   help="the official run's iteration-0 lr: released (base/500, its LinearWarmup) or ours (0): "
                        "with ours, the two runs differ only in summation order")
    p.add_argument("--out", help="keep the runs and parity.json here (default: a temporary folder)")
    p.add_argument("--worker", choices=["official", "ours", "cached"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    add_settings(p)
    return p


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if "official" in args.sides and not args.official_src:
        p.error("--official-src is required for the official side (or pass --sides ours)")
    if args.seeds[0] != 0:
        p.error("--seeds: the first seed is the one both sides share, 0")
    s = settings_of(args)
    import tempfile
    tmp = None if args.out else tempfile.TemporaryDirectory()
    root = Path(args.out or tmp.name)
    # the first --train-images of the embedded set: every epoch of the plan whole, and small enough to cache
    from pipeline.data import synthetic
    data = synthetic.first_images(s.train_images, root / "data")
    if "cached" in args.sides and "dsi" not in args.distill:
        p.error("--sides cached compares teacher targets: it needs --distill dsi")
    if "cached" in args.sides and "ours" not in args.sides:
        p.error("--sides cached is compared with our online run: add ours")
    store = build_store(s, data, root / "store") if "cached" in args.sides else None
    jobs = []
    for d in args.distill:
        runs = [("official", 0)] * ("official" in args.sides)
        runs += [("ours", x) for x in args.seeds] * ("ours" in args.sides)
        runs += [("cached", 0)] * ("cached" in args.sides and d == "dsi")
        for side, seed in runs:
            run = root / d / f"{side}_seed{seed}"
            jobs.append((str(run / "log.txt"), ["--worker", side, "--distill", d, "--seed", str(seed),
                                                "--run-dir", str(run), "--data", data, *s.args()]
                         + (["--cache", store] if side == "cached" else [])
                         + (["--official-src", str(Path(args.official_src).resolve()), "--first-lr", args.first_lr]
                            if side == "official" else [])))
    t0 = time.perf_counter()
    run_jobs(jobs, args.jobs or len(jobs), s.threads)
    result = {"settings": asdict(s), "seconds": time.perf_counter() - t0, "modes": {}}
    for d in args.distill:
        runs = [json.loads((run / "record.json").read_text()) for run in sorted((root / d).iterdir())
                if (run / "record.json").is_file()]
        runs.sort(key=lambda r: (r["side"] != "ours", r["side"] != "official", r["seed"]))
        text, verdict = report(s, [r for r in runs if r["side"] != "ours cached"])
        print(text + "\n", flush=True)
        result["modes"][d] = {"runs": runs, "verdict": verdict}
        if any(r["side"] == "ours cached" for r in runs):
            text, result["modes"][d]["cache_verdict"] = cache_report(s, runs)
            print(text + "\n", flush=True)
    print(f"total {result['seconds']:.0f} s")
    (root / "parity.json").write_text(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
