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
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detector.checkpoint import atomic_write, copy_checkpoint, load_checkpoint, read_checkpoint, remove_stale_temps
from detector.criterion import check_labels
from detector.dsi import DSI, DSIConfig
from detector.gam import GAM
from detector.rt_co_detr import EncoderTap
from pipeline.train.distributed import (DistInfo, all_gather_floats, all_gather_objects, all_true, barrier,
                                        init_distributed, reduce_mean, weights_digest)
from pipeline.train.ema import ModelEMA
from pipeline.data.evaluate import CocoEvaluator, format_table, protocol_postprocessor
from pipeline.train.optim import build_optimizer, build_schedule
from pipeline.train.recipe import Recipe, recipe_from_config
from pipeline.train.rt_co_detr import (active_distill, build_codetr, build_feat, build_student, distill_losses,
                                       resolve_preset, validation_distill_loss)
from pipeline.train import outputs as run_outputs
from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainData, build_train_data
from pipeline.train.state import (FORMAT, atomic_save, check_resume_layout, check_resume_plan, load_train_state,
                                  rng_state, run_plan, set_rng_state)

log = logging.getLogger("rtdetrv4.train")


class Student(nn.Module):
    """Detector + training-only DSI projector (or RT-CO-DETR feature projections), wrapped
    together so DDP reduces both and GAM's total gradient mass includes the projector, as in the
    official model."""

    def __init__(self, detector: nn.Module, dsi: DSI | None, codetr: nn.Module | None = None):
        nn.Module.__init__(self)
        self.detector = detector
        self.dsi = dsi
        self.codetr = codetr
        self.tap: EncoderTap | None = None   # RT-CO-DETR: set after the EMA copy, which must not copy its hook

    def forward(self, images, targets=None):
        outputs = self.detector(images, targets)
        if self.tap is not None:   # the fused maps leave through the (DDP) forward, so a loss on them alone syncs
            outputs = {**outputs, "encoder_maps": self.tap.maps}
        return outputs


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
        self.dist: DistInfo = init_distributed(cfg.device)
        if cfg.resume:   # before any collective: a run directory means its last.pth; a missing one names the node
            try:
                run_outputs.resolve_resume(cfg.resume)
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"rank {self.dist.rank} on {socket.gethostname()}: {e}. In a multi-node run every node loads "
                    "the checkpoint: put --out on shared storage or copy last.pth to the same path on each node"
                ) from None
        cfg, self.preset = resolve_preset(cfg)   # --recipe rt-co-detr fills the paper's settings
        self.cfg = cfg = self._run_dir(cfg)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.out = Path(cfg.out)
        recipe = recipe_from_config(cfg)
        self.recipe: Recipe = recipe
        self.batch_size = cfg.batch_size or recipe.process_batch(self.dist.world_size)
        self.data: TrainData = build_train_data(cfg, recipe, self.dist, self.batch_size)
        self.steps_per_epoch = min(self.data.batches_per_epoch, cfg.max_steps_per_epoch or 10**12)
        if cfg.epochs is not None or cfg.max_steps_per_epoch:
            # a shortened run keeps the warm-up at <= 5% of its iterations
            total = self.steps_per_epoch * recipe.epochs
            self.recipe = recipe = replace(recipe, warmup_iter=min(recipe.warmup_iter, max(1, total // 20)))
        # what a resume may not change (image size, seed, data and its content, epochs, ...): checked by _resume
        self.plan = run_plan(asdict(cfg), dataset_hash=self.data.plan.dataset_hash)
        self._build_model()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_ap, self.bad_steps = -1.0, 0   # best monitored score: val AP, or -(val distillation loss)
        self.started = time.perf_counter()   # results.csv "time": seconds of training, resumed runs included
        self.time_offset = run_outputs.last_time(self.out / run_outputs.RESULTS) if cfg.resume else 0.0
        if self.recipe.monitor == "kd_loss":
            self.best_ap = float("-inf")
        self.since_reload_best: float | None = None   # best AP since the last stage-2 reload
        if cfg.resume:
            self._resume(cfg.resume)
        self.writer = SummaryWriter(self.out / "tb") if self.dist.is_main else None

    def _run_dir(self, cfg: TrainConfig) -> TrainConfig:
        """This run's directory (rank 0 picks and creates it, every rank uses that one) and the
        checkpoint ``--resume`` names (a run directory means its last.pth)."""
        ckpt = str(run_outputs.resolve_resume(cfg.resume)[1]) if cfg.resume else None
        # rank 0 claims the folder (held until it exits: two runs never share one), every rank uses it
        folder = run_outputs.run_dir(cfg.out, cfg.name, cfg.exist_ok, cfg.resume)[0] if self.dist.is_main else None
        folder = all_gather_objects(str(folder))[0]
        if cfg.teacher_precision == "auto" and self.dist.device.type != "cuda":
            # a timed choice could differ between ranks and between a run and its resume; on a CPU the
            # bf16 rule (teacher_cache.bf16) is applied once by jobs.cache_teacher and kept in the store
            log.info("online teacher precision: fp32 (--teacher-precision auto on a CPU; a store's precision, "
                     "chosen by jobs.cache_teacher --precision auto, is used for cached runs)")
            cfg = replace(cfg, teacher_precision="fp32")
        return replace(cfg, out=folder, resume=ckpt)

    # -- construction ----------------------------------------------------------------------
    def _build_model(self) -> None:
        cfg, dev = self.cfg, self.dist.device
        detector, criterion = build_student(cfg, self.data.num_classes, self.data.class_names)
        dsi = codetr = None
        mode = active_distill(cfg)
        if mode == "dsi":
            if cfg.student != "rtdetrv4":
                raise ValueError("--distill dsi (DSI + GAM) is for the RT-DETRv4 student; use codetr, feat or none")
            width = detector.cfg.backbone_channels[-1] if cfg.dsi_tap == "backbone" else detector.cfg.hidden_dim
            dsi = DSI(DSIConfig(student_dim=width, teacher_dim=self.data.teacher_dim, projector=cfg.dsi_projector,
                                loss=cfg.dsi_loss, tap=cfg.dsi_tap))
        elif mode == "codetr":
            self.detector_teacher, codetr = build_codetr(cfg, detector, self.data.class_names, dev)
        elif mode == "feat":
            self.detector_teacher, codetr = build_feat(cfg, detector, dev)
        elif mode != "none":
            raise ValueError(f"--distill must be dsi, codetr, feat or none, got {cfg.distill!r}")
        if not cfg.det_loss and codetr is None:
            raise ValueError("--no-det-loss leaves no loss without --distill codetr or feat")
        if cfg.finetune and cfg.student != "rtdetrv4":
            raise ValueError("--finetune loads RT-DETRv4 weights; start rtdetrv2_r50 from --student-weights DIR")
        if cfg.finetune:   # an official projector (hidden -> 768, ViT-B) is reused when the teacher is as wide
            fits = (dsi is not None and self.data.teacher_dim == 768 and dsi.cfg.projector == "linear"
                    and dsi.cfg.tap == "aifi")
            report = load_checkpoint(detector, cfg.finetune, dsi=dsi if fits else None)
            log.info("finetune from %s: %s", cfg.finetune, report)
        student = Student(detector, dsi, codetr).to(dev)
        if self.dist.enabled and dev.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.student = student
        self.model = DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None) \
            if self.dist.enabled else student
        # labels are checked on the loader's host batch in train_step: no per-step device sync
        self.criterion = criterion
        self.postprocessor = protocol_postprocessor(self.data.num_classes)   # official: boxes not clipped
        extra = {"encoder.feature_projector": dsi} if dsi else {"codetr": codetr} if codetr else None
        self.optimizer = build_optimizer(detector, self.recipe, extra=extra)
        self.schedule = build_schedule(self.optimizer, self.recipe, self.steps_per_epoch)
        self.schedule.step(0)
        # --no-ema: decay 0 makes the evaluated copy the raw weights after every step
        self.ema = ModelEMA(detector, decay=self.recipe.ema_decay if self.recipe.ema else 0.0,
                            warmups=self.recipe.ema_warmups)
        student.tap = EncoderTap(detector) if codetr is not None else None  # after the EMA copy
        self.amp_dtype = _amp_dtype(cfg.amp, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        gam_cfg = replace(self.recipe.gam, lambda0=cfg.distill_weight or self.recipe.gam.lambda0, rule=cfg.gam_rule)
        self.gam = GAM(gam_cfg, aifi_prefix="detector.encoder.encoder.") if dsi is not None else None
        self.static_weight = gam_cfg.lambda0

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
                    best_ap=self.best_ap, bad_steps=self.bad_steps, since_reload_best=self.since_reload_best,
                    world_size=self.dist.world_size,
                    batch_size=self.batch_size, plan=self.plan)

    def save(self, name: str) -> None:
        # every rank's RNG (each draws its own denoising noise); rank 0 writes them all
        rngs = all_gather_objects(rng_state())
        if self.dist.is_main:
            atomic_save({**self._state(), "rng": rngs[0], "rng_per_rank": rngs}, self.out / name)

    def _load_weights_and_optimizer(self, state: dict) -> None:
        """Model, DSI projector / RT-CO-DETR projections, EMA, optimizer and AMP scaler from a training state."""
        self.student.detector.load_state_dict(state["model"])
        if self.student.dsi is not None and state.get("dsi"):
            self.student.dsi.load_state_dict(state["dsi"])
        if self.student.codetr is not None and state.get("codetr"):
            self.student.codetr.load_state_dict(state["codetr"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def _resume(self, path: str) -> None:
        state = load_train_state(path, self.cfg.size)
        check_resume_layout(path, state, self.dist.world_size, self.batch_size)
        check_resume_plan(path, state, self.plan)
        self._load_weights_and_optimizer(state)
        if self.gam is not None and state.get("gam"):
            self.gam.load_state_dict(state["gam"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_ap, self.bad_steps = state["global_step"], state["best_ap"], state["bad_steps"]
        self.since_reload_best = state.get("since_reload_best", self.best_ap if self.best_ap >= 0 else None)
        self.schedule.step(max(self.global_step - 1, 0))  # the lr the next iteration trains with
        # A checkpoint written mid-epoch holds the RNG after this epoch's DataLoader iterator drew its
        # seed; one written at an epoch end, before the next iterator: restore at the same point.
        self._resume_rng = state.get("rng_per_rank", [state["rng"]])[self.dist.rank]
        if self.step_in_epoch == 0:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        log.info("resumed %s at epoch %d, batch %d (global step %d)", path, self.epoch, self.step_in_epoch,
                 self.global_step)

    # -- one step --------------------------------------------------------------------------
    def _distill_weight(self) -> float:
        return self.gam.weight if (self.gam is not None and self.cfg.gam) else self.static_weight

    def _losses(self, images, targets, teacher_map):
        dev = self.dist.device
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            outputs = self.model(images, targets if self.cfg.det_loss else None)
            projected = None
            if self.student.dsi is not None and teacher_map is not None:
                tap = self.student.dsi.cfg.tap
                projected = self.student.dsi.project(self.student.dsi.student_map(outputs, outputs[f"{tap}_feature"]))
        outputs = _to_float(outputs)
        losses = self.criterion(outputs, targets) if self.cfg.det_loss else {}
        if self.student.codetr is not None:
            losses.update(distill_losses(self.cfg.distill, self.student.codetr, self.detector_teacher, images,
                                         outputs, outputs["encoder_maps"]))
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

    def train_step(self, images, targets, batch_info) -> dict | None:
        if self.cfg.det_loss:   # a label-free stage may keep a student head of another label space
            check_labels(targets, self.criterion.num_classes)
        images = images.to(self.dist.device, non_blocking=True)
        targets = [{k: (v.to(self.dist.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        teacher_map = None
        if self.student.dsi is not None:
            # the teacher's lazy start-up draws a precision probe: keep it out of the training stream,
            # or a resumed run (whose teacher starts at another step) draws other denoising noise
            with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
                teacher_map = self.data.teacher_targets(images, targets, batch_info)
        losses, outputs = self._losses(images, targets, teacher_map)
        loss = sum(losses.values())
        detector = self.student.detector
        embed = getattr(detector, "denoising_class_embed", None)   # the transformers student keeps it here
        if embed is None:
            embed = getattr(detector.decoder, "denoising_class_embed", None)
        if "dn_meta" not in outputs and embed is not None and self.dist.enabled:
            # no boxes on this rank, so no denoising queries: keep the embedding in the graph with a
            # zero gradient, or DDP (find_unused_parameters=False, as official) waits for it forever
            loss = loss + 0.0 * embed.weight.sum()
        if not self.cfg.det_loss and self.dist.enabled:
            # a label-free stage leaves heads (under --distill feat the whole decoder) without gradient: the same
            # guard for all of them (AdamW then also decays them, by lr * wd per step, which one process skips)
            loss = loss + 0.0 * sum(p.sum() for p in detector.parameters() if p.requires_grad)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # clip_max_norm 0 (RT-CO-DETR): no clipping, the norm is still measured for the finiteness check
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_max_norm or float("inf"))
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
        # official order (det_engine.train_one_epoch): after the optimizer step of iteration i set lr(i),
        # so iteration i + 1 trains with lr(i); iteration 0 trains with the lr(0) set at construction
        self.schedule.step(self.global_step)
        self.global_step += 1
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
        self.epoch_means = _Means()
        batches = iter(loader)   # draws the loader's base seed from the global RNG
        if getattr(self, "_resume_rng", None) is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        for images, targets, info in batches:
            if self.step_in_epoch >= total:
                break
            if self.dist.is_main and not (self.out / "train_batch0.jpg").exists():
                run_outputs.save_batch(images, targets, self.out / "train_batch0.jpg", self.data.class_names)
            losses = self.train_step(images, targets, info)
            self.step_in_epoch += 1
            seen += images.shape[0] * self.dist.world_size
            bar.update(1)
            if losses is not None and (self.step_in_epoch % self.cfg.log_every == 0 or self.step_in_epoch == total):
                last = self._log_step(losses, seen / (time.perf_counter() - t0))
                self.epoch_means.add(last)
                bar.set_postfix_str(_bar_text(last, cached=self.data.store is not None), refresh=False)
            if self.cfg.checkpoint_every and self.step_in_epoch % self.cfg.checkpoint_every == 0:
                self.save("last.pth")
        bar.close()
        return last

    def _log_step(self, losses: dict, samples_per_s: float) -> dict:
        values = reduce_mean(losses)
        values.update(lr=self.optimizer.param_groups[0]["lr"], distill_weight=self._distill_weight(),
                      ema_decay=self.ema.decay_at(self.ema.updates), samples_per_s=samples_per_s,
                      **self.data.teacher_stats())
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
        loader = self.data.val_loader(self.dist.rank, self.dist.world_size)
        total = len(loader) if not self.cfg.eval_max_images else min(
            len(loader), -(-self.cfg.eval_max_images // self.batch_size))
        bar = tqdm(loader, total=total, desc=f"eval {self.epoch}", leave=False, disable=not self.dist.is_main,
                   dynamic_ncols=True)
        for i, (images, targets) in enumerate(bar):
            if self.cfg.eval_max_images and i * images.shape[0] >= self.cfg.eval_max_images:
                break
            images = images.to(self.dist.device)
            with torch.autocast(self.dist.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                outputs = model(images)
            sizes = torch.stack([t["orig_size"] for t in targets]).to(self.dist.device)
            preds = self.postprocessor(_to_float(outputs), sizes)
            evaluator.update(preds, torch.stack([t["image_id"] for t in targets]))
        bar.close()
        stats = evaluator.summarize()
        self.last_cocoeval = evaluator.cocoeval   # the final PR curve / confusion matrix read its arrays
        return stats

    def evaluate_distill(self) -> dict:
        """{"kd_loss": the validation distillation loss of the EMA weights}: what a label-free stage follows."""
        loader = self.data.val_loader(self.dist.rank, self.dist.world_size)
        limit = -(-self.cfg.eval_max_images // self.batch_size) if self.cfg.eval_max_images else None
        batches = (b for i, b in enumerate(loader) if limit is None or i < limit)
        return {"kd_loss": validation_distill_loss(self.cfg.distill, self.ema.module, self.student.codetr,
                                                   self.detector_teacher, batches, self.dist.device, self.amp_dtype)}

    def _end_epoch(self) -> None:
        by_kd = self.recipe.monitor == "kd_loss"
        stats = self.evaluate_distill() if by_kd else self.evaluate()
        gam_rec = self.gam.end_epoch(self.epoch) if (self.gam is not None and self.cfg.gam) else None
        if gam_rec is not None:
            gam_rec["lambda_per_rank"] = all_gather_floats(self.gam.weight)
        weights_per_rank = all_gather_objects(weights_digest(self.student))
        ap = -stats["kd_loss"] if by_kd else stats["AP"]   # the monitored score: higher is better
        if hasattr(self.schedule, "end_epoch"):   # plateau / multi-step schedules step per epoch
            self.schedule.end_epoch(ap)
        if self.dist.is_main:
            log.info("epoch %d EMA eval:\n%s", self.epoch,
                     f"val distillation loss {stats['kd_loss']:.5f}" if by_kd else format_table(stats))
            for k, v in stats.items():
                self.writer.add_scalar(f"val/{k}", v, self.epoch)
            if gam_rec:
                log.info("Epoch %d: avg AIFI grad %.3f%% | distill %.4f -> %.4f (%s)", self.epoch,
                         gam_rec["share"], gam_rec["lambda_old"], gam_rec["lambda_new"], gam_rec["reason"])
                self.writer.add_scalar("gam/lambda", gam_rec["lambda_new"], self.epoch)
                self.writer.add_scalar("gam/aifi_share", gam_rec["share"], self.epoch)
                self.gam.plot(self.out / "gam.png")
            with open(self.out / "eval.jsonl", "a") as f:
                f.write(json.dumps(dict(epoch=self.epoch, **stats, gam=gam_rec,
                                        weights_sha256_per_rank=weights_per_rank)) + "\n")
            self._results_row(stats)
        stage = 1 if self.epoch < self.recipe.stop_epoch else 2
        self.epoch += 1
        self.step_in_epoch = 0
        # official DetSolver.fit: a stage-2 epoch that is not better than the best AP since the last
        # reload (stage 1 included) reloads best_stg1.pth and lowers the EMA decay by 1e-4
        improved = self.since_reload_best is None or ap > self.since_reload_best
        self.since_reload_best = ap if improved else None
        if ap > self.best_ap:
            self.best_ap = ap
            self.save(f"best_stg{stage}.pth")
            self.save_weights("best.pth")
        decay = self.ema.decay   # the stage-2 decay: best_stg1's EMA state holds the stage-1 one
        if stage == 2 and not improved and self._load_best_stage1():
            self.ema.decay = max(decay - 1e-4, 0.0)   # 0: no EMA stays none
            log.info("stage 2: AP %.4f is no new best: reloaded best_stg1.pth, EMA decay %.4f", ap, self.ema.decay)
        self.save("last.pth")
        if self.dist.is_main and self.cfg.save_period and self.epoch % self.cfg.save_period == 0:
            copy_checkpoint(self.out / "last.pth", self.out / f"epoch{self.epoch}.pth")   # atomic: never half a file
        barrier()   # every rank may read best_stg1.pth at the stage switch

    def save_weights(self, name: str) -> None:
        """Inference weights only (the EMA, as the official best checkpoints are read): no optimizer,
        no model copy; ``jobs.evaluate / export / predict`` and ``load_checkpoint`` read it."""
        if self.dist.is_main:
            atomic_save(dict(format=FORMAT + "-weights", size=self.cfg.size, num_classes=self.data.num_classes,
                             class_names=self.data.class_names, config=asdict(self.cfg),
                             ema={"module": self.ema.module.state_dict()}, epoch=self.epoch, best_ap=self.best_ap),
                        self.out / name)

    def _results_row(self, stats: dict) -> None:
        """results.csv / results.png (layout: ``run_outputs.results_row``; every loss term stays in
        metrics.jsonl, every statistic in eval.jsonl)."""
        train = getattr(self, "epoch_means", None)
        means = train.means() if train is not None else {}
        seconds = self.time_offset + time.perf_counter() - self.started
        run_outputs.Results(self.out).add(run_outputs.results_row(
            self.epoch, means, self.optimizer.param_groups[0]["lr"], stats, seconds))

    def _stop_early(self) -> bool:
        """--patience: no val AP improvement for that many epochs (read from results.csv, so a
        resumed run counts the epochs before the interruption)."""
        if not self.cfg.patience:
            return False
        by_kd = self.recipe.monitor == "kd_loss"
        since = run_outputs.epochs_since_best(self.out / run_outputs.RESULTS, "val/kd_loss" if by_kd else "val/AP",
                                              lower_is_better=by_kd)
        if since >= self.cfg.patience:
            log.info("early stop: no val %s improvement in the last %d epochs (--patience %d)",
                     "distillation loss" if by_kd else "AP", since, self.cfg.patience)
            return True
        return False

    def _load_best_stage1(self) -> bool:
        """Restore what the official load_resume_state(best_stg1.pth) restores: the model including the
        DSI projector (official encoder.feature_projector), EMA, optimizer and AMP scaler. The epoch,
        schedule position, GAM and RNG continue (official: the flat-cosine schedule has no state and the
        epoch loop variable goes on). False when there is no best_stg1.pth (no stage-1 evaluation)."""
        best = self.out / "best_stg1.pth"
        if not best.is_file():
            return False
        state = read_checkpoint(best, "stage-2 restart from")
        self._load_weights_and_optimizer(state)
        log.info("restored model, DSI, EMA, optimizer and scaler from %s (AP %.4f)", best,
                 state.get("best_ap", float("nan")))
        return True

    def _stage_switch(self) -> None:
        """At stop_epoch: continue from best_stg1.pth with the restart EMA decay (official DetSolver;
        our EMA honours the new decay, the official one ignores it)."""
        self._load_best_stage1()
        self.ema.decay = self.recipe.ema_restart_decay

    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            for tmp in remove_stale_temps(self.out):   # a save killed half-way in an earlier run
                log.info("removed the partial checkpoint %s of a killed run", tmp)
        if self.dist.is_main:
            with atomic_write(self.out / "config.json") as f:
                f.write(json.dumps(dict(config=asdict(self.cfg), recipe=asdict(self.recipe)), indent=2).encode())
        if self.dist.is_main:
            self._summary()
        logging.captureWarnings(True)   # warnings.warn too goes through logging, above the bar
        try:
            with logging_redirect_tqdm():
                self._epochs()
        finally:
            logging.captureWarnings(False)
            if self.writer is not None:
                self.writer.close()
        return dict(best_ap=self.best_ap, epochs=self.epoch, out=str(self.out))

    def _epochs(self) -> None:
        while self.epoch < self.recipe.epochs:
            if self.epoch == self.recipe.stop_epoch and self.step_in_epoch == 0:
                self._stage_switch()
            self.train_epoch()
            self._end_epoch()
            if all_gather_objects(self.dist.is_main and self._stop_early())[0]:
                break
        barrier()
        if self.dist.is_main and getattr(self, "last_cocoeval", None) is not None:
            written = run_outputs.final_plots(self.last_cocoeval, self.data.class_names, self.out)
            log.info("wrote %s", ", ".join(str(w) for w in written))

    def _summary(self) -> None:
        """The start-up summary: data, classes, device, precision, teacher, cache, output folder."""
        cfg, data = self.cfg, self.data
        train_n = len(data.train_items) if data.train_items is not None else "streamed"
        names = ", ".join(data.class_names[:8]) + (", ..." if len(data.class_names) > 8 else "")
        lines = [f"data      {cfg.data or 'embedded synthetic dataset'}: train[{cfg.train_split}] {train_n} images, "
                 f"val[{cfg.val_split}] {len(data.val_dataset)} images"
                 + (f" (from {cfg.val_data})" if cfg.val_data else ""),
                 f"classes   {data.num_classes}: {names}",
                 f"device    {self.dist.device} x {self.dist.world_size} process(es); batch {self.batch_size} per "
                 f"process, {self.steps_per_epoch} steps/epoch, {self.recipe.epochs} epochs",
                 f"precision {'amp ' + str(self.amp_dtype).removeprefix('torch.') if self.amp_dtype else 'fp32'}"
                 f" (--amp {cfg.amp}" + (": no autocast on a CPU)" if cfg.amp == "auto" and self.dist.device.type != "cuda"
                                         else ")")]
        if self.amp_dtype == torch.bfloat16 and self.dist.device.type == "cpu":
            from teacher_cache.bf16 import native_bf16_flags
            if not native_bf16_flags():
                log.warning("--amp bf16 on a CPU without native bf16 (no AMX / AVX512-BF16): bf16 is emulated and "
                            "many times slower than fp32; use --amp off")
        random_teacher = None
        if cfg.distill == "dsi":
            stored = data.store.manifest["teacher"] if data.store is not None else None
            source = stored.get("weights_source", "random-init") if stored else (cfg.weights or "random-init")
            random_teacher = source == "random-init"
            prec = stored["protocol"]["precision"] if stored else getattr(data.teacher, "precision", cfg.teacher_precision)
            lines.append(f"teacher   {cfg.vfm} ({prec}), weights: "
                         + ("RANDOM INIT (features meaningless)" if random_teacher else source))
        elif active_distill(cfg) != "none":
            lines.append(f"teacher   {cfg.distill}: " + (cfg.teacher_checkpoint if cfg.distill == "codetr" else
                                                         f"{cfg.vfm}, weights {cfg.weights or 'RANDOM INIT'}"))
        if data.store is not None:
            lines.append(f"cache     {cfg.cache}: {data.store.coverage(self.epoch)}; hit rate in the bar")
        elif cfg.distill == "dsi":
            lines.append("cache     none: every view goes through the online teacher")
        lines.append(f"output    {self.out}" + (f" (resumed from {cfg.resume})" if cfg.resume else ""))
        precision = f"{str(self.amp_dtype).removeprefix('torch.')} amp" if self.amp_dtype else "fp32"
        lines += self.preset.summary_lines(precision)
        overlap = run_outputs.shared_images(data)
        log.info("run summary:\n  %s", "\n  ".join(lines))
        if random_teacher:
            log.warning("the DSI teacher %s is RANDOMLY INITIALISED (no --weights, or a cache built without them): "
                        "distillation targets are meaningless; use only to try the pipeline out", cfg.vfm)
        if overlap:
            log.warning("train[%s] and val[%s] share %d images: the val AP does not measure generalisation",
                        cfg.train_split, cfg.val_split, overlap)




class _Means:
    """Running means of the logged step values over an epoch (the results.csv train columns)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, values: dict) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _bar_text(values: dict, cached: bool) -> str:
    """loss, lr, samples/s and, with a teacher cache, its hit rate, for the progress bar."""
    text = f"loss={values['loss']:.3f} lr={values['lr']:.2e} {values['samples_per_s']:.1f} img/s"
    if cached and "cache_hit_rate" in values:
        text += f" cache={100 * values['cache_hit_rate']:.0f}%"
    return text


def _to_float(outputs):
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs
