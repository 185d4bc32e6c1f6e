"""The RT-DETRv4 training loop: DDP + AMP + EMA + DSI/GAM, cached or online teacher features,
two-stage stop-epoch recipe, per-epoch COCO evaluation of the EMA model, full resume.

One step (official ``det_engine.train_one_epoch``, AMP path):
forward under autocast -> criterion in fp32 -> ``loss += lambda * DSI`` -> backward ->
unscale -> clip 0.1 -> GAM measures the AIFI gradient share -> optimizer step -> EMA -> LR step.
Differences from the released code (each one a fix): lambda is identical on every rank and
checkpointed; GAM works without DDP; a non-finite loss skips the step on every rank (and stops
the run after ``max_bad_steps``) instead of poisoning the weights.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from detector import build_detector
from detector.checkpoint import detector_from_checkpoint, load_checkpoint
from detector.criterion import Criterion
from detector.dsi import DSI, DSIConfig
from detector.gam import GAM
from detector.postprocessor import PostProcessor
from detector.rt_co_detr import EncoderTap, RTCODETRConfig, RTCODETRDistiller
from pipeline.train.distributed import DistInfo, all_gather_floats, all_true, barrier, init_distributed, reduce_mean
from pipeline.train.ema import ModelEMA
from pipeline.data.evaluate import CocoEvaluator, format_table
from pipeline.train.optim import FlatCosineSchedule, build_optimizer
from pipeline.train.recipe import Recipe, resolve_recipe
from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainData, build_train_data
from pipeline.train.state import FORMAT, atomic_save, load_train_state, rng_state, set_rng_state

log = logging.getLogger("rtdetrv4.train")


class Student(nn.Module):
    """Detector + training-only DSI projector (or RT-CO-DETR feature projections), wrapped
    together so DDP reduces both and GAM's total gradient mass includes the projector, as in the
    official model."""

    def __init__(self, detector: nn.Module, dsi: DSI | None, codetr: RTCODETRDistiller | None = None):
        nn.Module.__init__(self)
        self.detector = detector
        self.dsi = dsi
        self.codetr = codetr

    def forward(self, images, targets=None):
        return self.detector(images, targets)


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.out = Path(cfg.out)
        recipe = resolve_recipe(cfg.size, cfg.epochs)
        self.recipe: Recipe = recipe
        self.batch_size = cfg.batch_size or max(1, recipe.total_batch_size // self.dist.world_size)
        self.data: TrainData = build_train_data(cfg, recipe, self.dist, self.batch_size)
        self.steps_per_epoch = min(self.data.batches_per_epoch, cfg.max_steps_per_epoch or 10**12)
        if cfg.epochs is not None or cfg.max_steps_per_epoch:
            # a shortened run keeps the warm-up at <= 5% of its iterations
            total = self.steps_per_epoch * recipe.epochs
            self.recipe = recipe = replace(recipe, warmup_iter=min(recipe.warmup_iter, max(1, total // 20)))
        self._build_model()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_ap, self.bad_steps = -1.0, 0
        if cfg.resume:
            self._resume(cfg.resume)
        self.writer = SummaryWriter(self.out / "tb") if self.dist.is_main else None

    # -- construction ----------------------------------------------------------------------
    def _build_model(self) -> None:
        cfg, dev = self.cfg, self.dist.device
        detector = build_detector(cfg.size, num_classes=self.data.num_classes)
        dsi = codetr = None
        if cfg.distill == "dsi":
            dsi = DSI(DSIConfig(student_dim=detector.cfg.hidden_dim, teacher_dim=self.data.teacher_dim))
        elif cfg.distill == "codetr":
            codetr = self._build_codetr(detector)
        elif cfg.distill != "none":
            raise ValueError(f"--distill must be dsi, codetr or none, got {cfg.distill!r}")
        if cfg.finetune:   # an official projector (hidden -> 768, ViT-B) is reused when the teacher is as wide
            fits = dsi is not None and self.data.teacher_dim == 768 and dsi.cfg.projector == "linear"
            report = load_checkpoint(detector, cfg.finetune, dsi=dsi if fits else None)
            log.info("finetune from %s: %s", cfg.finetune, report)
        student = Student(detector, dsi, codetr).to(dev)
        if self.dist.enabled and dev.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.student = student
        self.model = DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None) \
            if self.dist.enabled else student
        self.criterion = Criterion(num_classes=self.data.num_classes)
        self.postprocessor = PostProcessor(num_classes=self.data.num_classes)
        extra = {"encoder.feature_projector": dsi} if dsi else {"codetr": codetr} if codetr else None
        self.optimizer = build_optimizer(detector, self.recipe, extra=extra)
        self.schedule = FlatCosineSchedule.from_recipe(self.optimizer, self.recipe, self.steps_per_epoch)
        self.schedule.step(0)
        self.ema = ModelEMA(detector, decay=self.recipe.ema_decay, warmups=self.recipe.ema_warmups)
        self.student_tap = EncoderTap(detector) if codetr is not None else None  # after the EMA copy
        self.amp_dtype = _amp_dtype(cfg.amp, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        gam_cfg = replace(self.recipe.gam, lambda0=cfg.distill_weight or self.recipe.gam.lambda0)
        self.gam = GAM(gam_cfg, aifi_prefix="detector.encoder.encoder.") if dsi is not None else None
        self.static_weight = gam_cfg.lambda0

    def _build_codetr(self, detector) -> RTCODETRDistiller:
        """RT-CO-DETR: a frozen detector teacher (any of our or the official checkpoints)."""
        if not self.cfg.teacher_checkpoint:
            raise ValueError("--distill codetr needs --teacher-checkpoint (a trained detector, e.g. an X teaching S)")
        teacher = detector_from_checkpoint(self.cfg.teacher_checkpoint).to(self.dist.device).eval()
        self.detector_teacher = teacher.requires_grad_(False)
        self.teacher_tap = EncoderTap(teacher)
        hidden = (detector.cfg.hidden_dim,) * 3
        class_map = {int(k): int(v) for k, v in (self.cfg.class_map or {}).items()} or None
        return RTCODETRDistiller(RTCODETRConfig(student_channels=hidden, teacher_channels=(teacher.cfg.hidden_dim,) * 3,
                                                class_map=class_map, pairing=self.cfg.pairing))

    # -- checkpoints -----------------------------------------------------------------------
    def _state(self) -> dict:
        return dict(format=FORMAT, size=self.cfg.size, num_classes=self.data.num_classes,
                    class_names=self.data.class_names, config=asdict(self.cfg), recipe=asdict(self.recipe),
                    model=self.student.detector.state_dict(), ema=self.ema.state_dict(),
                    dsi=self.student.dsi.state_dict() if self.student.dsi is not None else None,
                    codetr=self.student.codetr.state_dict() if self.student.codetr is not None else None,
                    optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                    gam=self.gam.state_dict() if self.gam else None, last_epoch=self.epoch,
                    epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_step=self.global_step,
                    best_ap=self.best_ap, bad_steps=self.bad_steps, rng=rng_state())

    def save(self, name: str) -> None:
        if self.dist.is_main:
            atomic_save(self._state(), self.out / name)

    def _resume(self, path: str) -> None:
        state = load_train_state(path, self.cfg.size)
        self.student.detector.load_state_dict(state["model"])
        if self.student.dsi is not None and state.get("dsi"):
            self.student.dsi.load_state_dict(state["dsi"])
        if self.student.codetr is not None and state.get("codetr"):
            self.student.codetr.load_state_dict(state["codetr"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.gam is not None and state.get("gam"):
            self.gam.load_state_dict(state["gam"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_ap, self.bad_steps = state["global_step"], state["best_ap"], state["bad_steps"]
        self.schedule.step(self.global_step)
        set_rng_state(state["rng"])
        log.info("resumed %s at epoch %d, batch %d (global step %d)", path, self.epoch, self.step_in_epoch,
                 self.global_step)

    # -- one step --------------------------------------------------------------------------
    def _distill_weight(self) -> float:
        return self.gam.weight if (self.gam is not None and self.cfg.gam) else self.static_weight

    def _losses(self, images, targets, teacher_map):
        dev = self.dist.device
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            outputs = self.model(images, targets)
            projected = None
            if self.student.dsi is not None and teacher_map is not None:
                projected = self.student.dsi.project(outputs["aifi_feature"])
        outputs = _to_float(outputs)
        losses = self.criterion(outputs, targets)
        if self.student.codetr is not None:
            losses.update(self._codetr_losses(images, outputs))
        if projected is not None:
            losses["loss_distill"] = self._distill_weight() * self.student.dsi.alignment_loss(projected, teacher_map)
        return losses, outputs

    def _skip_step(self) -> None:
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()
        log.warning("non-finite loss or gradient at epoch %d batch %d: step skipped (%d/%d)", self.epoch,
                    self.step_in_epoch, self.bad_steps, self.cfg.max_bad_steps)
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise FloatingPointError(f"{self.bad_steps} non-finite steps: stopping (raise --max-bad-steps or lower "
                                     "the learning rate; the last good checkpoint is last.pth)")

    @torch.no_grad()
    def _teacher_detections(self, images):
        out = self.detector_teacher(images)
        return out, [m.float() for m in self.teacher_tap.maps]

    def _codetr_losses(self, images, outputs) -> dict:
        t_out, t_maps = self._teacher_detections(images)
        s_maps = [m.float() for m in self.student_tap.maps]
        return self.student.codetr(outputs, _to_float(t_out), s_maps, t_maps)

    def train_step(self, images, targets, batch_info) -> dict | None:
        images = images.to(self.dist.device, non_blocking=True)
        targets = [{k: (v.to(self.dist.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        teacher_map = self.data.teacher_targets(images, targets, batch_info) if self.student.dsi is not None else None
        losses, outputs = self._losses(images, targets, teacher_map)
        loss = sum(losses.values())
        embed = getattr(self.student.detector.decoder, "denoising_class_embed", None)
        if "dn_meta" not in outputs and embed is not None and self.dist.enabled:
            # no boxes on this rank, so no denoising queries: keep the embedding in the graph with a
            # zero gradient, or DDP (find_unused_parameters=False, as official) waits for it forever
            loss = loss + 0.0 * embed.weight.sum()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_max_norm)
        # The criterion maps NaN terms to 0 (official nan_to_num), so the gradient norm is what
        # reveals a poisoned step; fp16 overflow is the scaler's business, not a bad step.
        finite = torch.isfinite(loss.detach()) & (torch.isfinite(grad_norm) | self.scaler.is_enabled())
        if not all_true(finite):
            return self._skip_step()
        if self.gam is not None:
            self.gam.measure(self.model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.student.detector)
        self.global_step += 1
        self.schedule.step(self.global_step)
        losses["loss"] = loss.detach()
        return losses

    # -- loops -----------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        self.model.train()
        loader = self.data.train_loader(self.epoch, self.step_in_epoch)
        total = self.steps_per_epoch
        bar = tqdm(total=total, initial=self.step_in_epoch, disable=not self.dist.is_main,
                   desc=f"epoch {self.epoch}", dynamic_ncols=True)
        t0, seen, last = time.perf_counter(), 0, {}
        for images, targets, info in loader:
            if self.step_in_epoch >= total:
                break
            losses = self.train_step(images, targets, info)
            self.step_in_epoch += 1
            seen += images.shape[0] * self.dist.world_size
            bar.update(1)
            if losses is not None and (self.step_in_epoch % self.cfg.log_every == 0 or self.step_in_epoch == total):
                last = self._log_step(losses, seen / (time.perf_counter() - t0))
                bar.set_postfix(loss=f"{last['loss']:.3f}")
            if self.cfg.checkpoint_every and self.step_in_epoch % self.cfg.checkpoint_every == 0:
                self.save("last.pth")
        bar.close()
        return last

    def _log_step(self, losses: dict, samples_per_s: float) -> dict:
        values = reduce_mean(losses)
        values.update(lr=self.optimizer.param_groups[0]["lr"], distill_weight=self._distill_weight(),
                      samples_per_s=samples_per_s, **self.data.teacher_stats())
        if self.gam is not None and self.gam.last_share is not None:
            values["aifi_grad_share"] = float(self.gam.last_share)
        if self.dist.is_main:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, self.global_step)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(dict(epoch=self.epoch, step=self.step_in_epoch, global_step=self.global_step,
                                        **values)) + "\n")
        return values

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.ema.module.eval()
        evaluator = CocoEvaluator(self.data.val_coco, self.data.label_to_category_id)
        for i, (images, targets) in enumerate(self.data.val_loader(self.dist.rank, self.dist.world_size)):
            if self.cfg.eval_max_images and i * images.shape[0] >= self.cfg.eval_max_images:
                break
            images = images.to(self.dist.device)
            with torch.autocast(self.dist.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                outputs = model(images)
            sizes = torch.stack([t["orig_size"] for t in targets]).to(self.dist.device)
            preds = self.postprocessor(_to_float(outputs), sizes)
            evaluator.update(preds, torch.stack([t["image_id"] for t in targets]))
        return evaluator.summarize()

    def _end_epoch(self) -> None:
        stats = self.evaluate()
        gam_rec = self.gam.end_epoch(self.epoch) if (self.gam is not None and self.cfg.gam) else None
        if gam_rec is not None:
            gam_rec["lambda_per_rank"] = all_gather_floats(self.gam.weight)
        ap = stats["AP"]
        if self.dist.is_main:
            log.info("epoch %d EMA eval:\n%s", self.epoch, format_table(stats))
            for k, v in stats.items():
                self.writer.add_scalar(f"val/{k}", v, self.epoch)
            if gam_rec:
                log.info("Epoch %d: avg AIFI grad %.3f%% | distill %.4f -> %.4f (%s)", self.epoch,
                         gam_rec["share"], gam_rec["lambda_old"], gam_rec["lambda_new"], gam_rec["reason"])
                self.writer.add_scalar("gam/lambda", gam_rec["lambda_new"], self.epoch)
                self.writer.add_scalar("gam/aifi_share", gam_rec["share"], self.epoch)
                self.gam.plot(self.out / "gam.png")
            with open(self.out / "eval.jsonl", "a") as f:
                f.write(json.dumps(dict(epoch=self.epoch, **stats, gam=gam_rec)) + "\n")
        stage = 1 if self.epoch < self.recipe.stop_epoch else 2
        self.epoch += 1
        self.step_in_epoch = 0
        if ap > self.best_ap:
            self.best_ap = ap
            self.save(f"best_stg{stage}.pth")
            self.save("best.pth")
        self.save("last.pth")
        barrier()   # every rank may read best_stg1.pth at the stage switch

    def _stage_switch(self) -> None:
        """At stop_epoch: continue from the best stage-1 weights with the restart EMA decay
        (official DetSolver; our EMA honours the new decay, the official one ignores it)."""
        best = self.out / "best_stg1.pth"
        if best.is_file():
            state = torch.load(best, map_location="cpu", weights_only=False)
            self.student.detector.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            log.info("stage 2 from %s (AP %.4f)", best, state.get("best_ap", float("nan")))
        self.ema.decay = self.recipe.ema_restart_decay

    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(dict(config=asdict(self.cfg),
                                                                  recipe=asdict(self.recipe)), indent=2))
        try:
            while self.epoch < self.recipe.epochs:
                if self.epoch == self.recipe.stop_epoch and self.step_in_epoch == 0:
                    self._stage_switch()
                self.train_epoch()
                self._end_epoch()
            barrier()
        finally:
            if self.writer is not None:
                self.writer.close()
        return dict(best_ap=self.best_ap, epochs=self.epoch, out=str(self.out))


def _to_float(outputs):
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs
