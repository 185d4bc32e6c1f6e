"""A training run: its parts built from the configuration, the official two-stage epoch loop, its
checkpoints and its resume.

The parts: the detector and its criterion (``rt_co_detr.build_student``), the distillation mode
(``distill.build_distillation``: none / DSI + GAM / RT-CO-DETR), the data (``data.build_train_data``:
the plan's batches and their teacher targets), the optimizer, flat-cosine schedule, EMA and AMP
scaler; the step and one epoch are ``engine``'s, the per-step log ``metrics``', the start-up summary
``summary``'s, the checkpoint layout ``state``'s. The loop is the official ``DetSolver.fit``: at
``stop_epoch`` continue from best_stg1.pth with the restart EMA decay; a stage-2 epoch that is no new
best since the last reload reloads best_stg1.pth and lowers the EMA decay by 1e-4.
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
from tqdm.contrib.logging import logging_redirect_tqdm

from detector.checkpoint import atomic_write, copy_checkpoint, read_checkpoint, remove_stale_temps
from pipeline.data.evaluate import CocoEvaluator, format_table, protocol_postprocessor
from pipeline.train import engine
from pipeline.train import outputs as run_outputs
from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainData, adopt_store_plan, build_train_data, process_batch
from pipeline.train.distill import build_distillation
from pipeline.train.distributed import DistInfo, all_gather_objects, barrier, init_distributed, weights_digest
from pipeline.train.ema import ModelEMA
from pipeline.train.engine import Progress, Step
from pipeline.train.metrics import StepMetrics
from pipeline.train.optim import build_optimizer, build_schedule
from pipeline.train.recipe import Recipe, recipe_from_config
from pipeline.train.rt_co_detr import build_student, resolve_preset
from pipeline.train.state import (atomic_save, check_resume_layout, check_resume_plan, inference_weights,
                                  load_train_state, restore_weights, rng_state, run_plan, set_rng_state,
                                  training_state)
from pipeline.train.summary import log_summary

log = logging.getLogger("rtdetrv4.train")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """``--amp``: None (fp32) on a CPU under auto; bf16 where the GPU has it, else fp16."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def run_config(cfg: TrainConfig, dist: DistInfo) -> TrainConfig:
    """The configuration this run follows: the recipe preset, the teacher store's plan, the run
    folder (rank 0 claims it, held until it exits, so two runs never share one; every rank uses
    it), the checkpoint ``--resume`` names (a run folder means its last.pth)."""
    if cfg.resume:   # before any collective: a missing checkpoint names the node
        try:
            run_outputs.resolve_resume(cfg.resume)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"rank {dist.rank} on {socket.gethostname()}: {e}. In a multi-node run every node loads the "
                "checkpoint: put --out on shared storage or copy last.pth to the same path on each node") from None
    cfg, _ = resolve_preset(cfg)
    # every rank checks the store (a contradiction fails on all), rank 0's choice is the run's: the
    # default store lookup reads each node's own folder
    cfg = all_gather_objects(adopt_store_plan(cfg, dist.world_size))[0]
    ckpt = str(run_outputs.resolve_resume(cfg.resume)[1]) if cfg.resume else None
    folder = run_outputs.run_dir(cfg.out, cfg.name, cfg.exist_ok, cfg.resume)[0] if dist.is_main else None
    folder = all_gather_objects(str(folder))[0]
    if cfg.teacher_precision == "auto" and dist.device.type != "cuda":
        # a timed choice could differ between ranks and between a run and its resume; on a CPU the
        # bf16 rule (teacher_cache.bf16) is applied once by jobs.cache_teacher and kept in the store
        log.info("online teacher precision: fp32 (--teacher-precision auto on a CPU; a store's precision, "
                 "chosen by jobs.cache_teacher --precision auto, is used for cached runs)")
        cfg = replace(cfg, teacher_precision="fp32")
    return replace(cfg, out=folder, resume=ckpt)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.dist: DistInfo = init_distributed(cfg.device)
        self.preset = resolve_preset(cfg)[1]
        self.cfg = cfg = run_config(cfg, self.dist)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.out = Path(cfg.out)
        recipe = recipe_from_config(cfg)
        self.batch_size = process_batch(cfg, recipe, self.dist.world_size)
        self.data: TrainData = build_train_data(cfg, recipe, self.dist, self.batch_size)
        self.steps_per_epoch = min(self.data.batches_per_epoch, cfg.max_steps_per_epoch or 10**12)
        if cfg.epochs is not None or cfg.max_steps_per_epoch:   # a shortened run keeps warm-up <= 5% of its steps
            total = self.steps_per_epoch * recipe.epochs
            recipe = replace(recipe, warmup_iter=min(recipe.warmup_iter, max(1, total // 20)))
        self.recipe: Recipe = recipe
        # what a resume may not change (image size, seed, data and its content, epochs, ...)
        self.plan = run_plan(asdict(cfg), dataset_hash=self.data.plan.dataset_hash)
        self.plan["train_plan"] = self.data.plan.hash()

        dev = self.dist.device
        detector, self.criterion = build_student(cfg, self.data.num_classes, self.data.class_names)
        self.distill = build_distillation(cfg, recipe, detector, self.data, dev)
        if not cfg.det_loss and not self.distill.mode.detector_teacher:
            raise ValueError("--no-det-loss leaves no loss without --distill codetr or feat")
        if cfg.finetune:
            if cfg.student != "rtdetrv4":
                raise ValueError("--finetune loads RT-DETRv4 weights; start rtdetrv2_r50 from --student-weights DIR")
            self.distill.finetune(detector, cfg.finetune)
        student = self.distill.student(detector).to(dev)
        if self.dist.enabled and dev.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.student = student
        self.model = DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None) \
            if self.dist.enabled else student
        self.postprocessor = protocol_postprocessor(self.data.num_classes)   # official: boxes not clipped
        self.optimizer = build_optimizer(detector, recipe, extra=self.distill.optimizer_extra())
        self.schedule = build_schedule(self.optimizer, recipe, self.steps_per_epoch)
        self.schedule.step(0)
        # --no-ema: decay 0 makes the evaluated copy the raw weights after every step
        self.ema = ModelEMA(detector, decay=recipe.ema_decay if recipe.ema else 0.0, warmups=recipe.ema_warmups)
        self.distill.attach(student)   # after the EMA copy, which must not copy a hook
        self.amp_dtype = amp_dtype(cfg.amp, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)

        self.progress = Progress(best=float("-inf") if recipe.monitor == "kd_loss" else -1.0)
        self.train_step = Step(self.model, student, self.criterion, self.distill, self.optimizer, self.scaler,
                               self.schedule, self.ema, self.progress, dev, self.amp_dtype, recipe.clip_max_norm,
                               cfg.det_loss, self.dist.enabled, cfg.max_bad_steps)
        self.started = time.perf_counter()   # results.csv "time": seconds of training, resumed runs included
        self.time_offset = run_outputs.last_time(self.out / run_outputs.RESULTS) if cfg.resume else 0.0
        self.resume_rng: dict | None = None   # restored once this epoch's loader has drawn its seed
        self.last_cocoeval = None            # the final PR curve / confusion matrix read its arrays
        if cfg.resume:
            self._resume(cfg.resume)
        self.metrics = StepMetrics(self.out, cfg.log_every, self.optimizer, self.ema, self.distill, self.data,
                                   self.dist.world_size, self.dist.is_main, cached=self.data.store is not None)

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, name: str) -> None:
        # every rank's RNG (each draws its own denoising noise); rank 0 writes them all
        rngs = all_gather_objects(rng_state())
        if self.dist.is_main:
            state = training_state(cfg=self.cfg, recipe=self.recipe, plan=self.plan, data=self.data,
                                   student=self.student, ema=self.ema, optimizer=self.optimizer, scaler=self.scaler,
                                   distill=self.distill, progress=self.progress, world_size=self.dist.world_size,
                                   batch_size=self.batch_size)
            atomic_save({**state, "rng": rngs[0], "rng_per_rank": rngs}, self.out / name)

    def save_weights(self, name: str) -> None:
        if self.dist.is_main:
            atomic_save(inference_weights(cfg=self.cfg, data=self.data, ema=self.ema, progress=self.progress),
                        self.out / name)

    def _resume(self, path: str) -> None:
        state = load_train_state(path, self.cfg.size)
        note = check_resume_layout(path, state, self.dist.world_size, self.batch_size)
        check_resume_plan(path, state, self.plan)
        restore_weights(state, self.student, self.ema, self.optimizer, self.scaler)
        self.distill.load_state_dict(state.get("gam"))
        self.progress.load_state_dict(state)
        self.schedule.step(max(self.progress.global_step - 1, 0))  # the lr the next iteration trains with
        # A checkpoint written mid-epoch holds the RNG after this epoch's DataLoader iterator drew its
        # seed; one written at an epoch end, before the next iterator: restore at the same point.
        # On another world size each rank continues a saved stream (its denoising noise differs anyway).
        rngs = state.get("rng_per_rank", [state["rng"]])
        self.resume_rng = rngs[self.dist.rank % len(rngs)]
        if self.progress.step_in_epoch == 0:
            set_rng_state(self.resume_rng)
            self.resume_rng = None
        if note:
            log.info(note)
        log.info("resumed %s at epoch %d, batch %d (global step %d)", path, self.progress.epoch,
                 self.progress.step_in_epoch, self.progress.global_step)

    def _load_best_stage1(self) -> bool:
        """What the official load_resume_state(best_stg1.pth) restores: the model including the DSI
        projector, EMA, optimizer and AMP scaler; the epoch, schedule position, GAM and RNG continue
        (official: the flat-cosine schedule has no state and the epoch loop goes on). False when there
        is no best_stg1.pth (no stage-1 evaluation)."""
        best = self.out / "best_stg1.pth"
        if not best.is_file():
            return False
        state = read_checkpoint(best, "stage-2 restart from")
        restore_weights(state, self.student, self.ema, self.optimizer, self.scaler)
        log.info("restored model, DSI, EMA, optimizer and scaler from %s (AP %.4f)", best,
                 state.get("best_ap", float("nan")))
        return True

    def start_stage_two(self) -> None:
        """At stop_epoch: continue from best_stg1.pth with the restart EMA decay (official DetSolver;
        our EMA honours the new decay, the official one ignores it)."""
        self._load_best_stage1()
        self.ema.decay = self.recipe.ema_restart_decay

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            for tmp in remove_stale_temps(self.out):   # a save killed half-way in an earlier run
                log.info("removed the partial checkpoint %s of a killed run", tmp)
            with atomic_write(self.out / "config.json") as f:
                f.write(json.dumps(dict(config=asdict(self.cfg), recipe=asdict(self.recipe)), indent=2).encode())
            log_summary(self.cfg, self.data, self.dist, self.batch_size, self.steps_per_epoch, self.recipe,
                        self.amp_dtype, self.distill, self.preset, self.out, self.progress.epoch)
        logging.captureWarnings(True)   # warnings.warn too goes through logging, above the bar
        try:
            with logging_redirect_tqdm():
                self._epochs()
        finally:
            logging.captureWarnings(False)
            self.metrics.close()
        return dict(best_ap=self.progress.best, epochs=self.progress.epoch, out=str(self.out))

    def _epochs(self) -> None:
        p = self.progress
        while p.epoch < self.recipe.epochs:
            if p.epoch == self.recipe.stop_epoch and p.step_in_epoch == 0:
                self.start_stage_two()
            self.train_epoch()
            self._end_epoch()
            if all_gather_objects(self.dist.is_main and self._stop_early())[0]:
                break
        barrier()
        if self.dist.is_main and self.last_cocoeval is not None:
            written = run_outputs.final_plots(self.last_cocoeval, self.data.class_names, self.out)
            log.info("wrote %s", ", ".join(str(w) for w in written))

    def train_epoch(self) -> dict:
        batches = iter(self.data.train_loader(self.progress.epoch, self.progress.step_in_epoch))  # draws the loader seed
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)
            self.resume_rng = None
        return engine.train_one_epoch(self.train_step, batches, self.progress, self.steps_per_epoch, self.metrics,
                                      self.cfg.checkpoint_every, lambda: self.save("last.pth"), self.dist.is_main)

    def evaluate(self) -> dict:
        """COCO statistics of the EMA weights on the validation set (official protocol: boxes not clipped)."""
        evaluator = CocoEvaluator(self.data.val_coco, self.data.label_to_category_id)
        stats = engine.evaluate(self.ema.module, self.postprocessor,
                                self.data.val_loader(self.dist.rank, self.dist.world_size), evaluator,
                                self.dist.device, self.amp_dtype, self.cfg.eval_max_images, self.batch_size,
                                self.progress.epoch, self.dist.is_main)
        self.last_cocoeval = evaluator.cocoeval
        return stats

    def evaluate_distill(self) -> dict:
        """{"kd_loss": the validation distillation loss of the EMA weights}: what a label-free stage follows."""
        loader = self.data.val_loader(self.dist.rank, self.dist.world_size)
        limit = -(-self.cfg.eval_max_images // self.batch_size) if self.cfg.eval_max_images else None
        batches = (b for i, b in enumerate(loader) if limit is None or i < limit)
        return {"kd_loss": self.distill.validation_loss(self.ema.module, batches, self.dist.device, self.amp_dtype)}

    def _end_epoch(self) -> None:
        p, by_kd = self.progress, self.recipe.monitor == "kd_loss"
        stats = self.evaluate_distill() if by_kd else self.evaluate()
        gam = self.distill.end_epoch(p.epoch)
        weights_per_rank = all_gather_objects(weights_digest(self.student))
        score = -stats["kd_loss"] if by_kd else stats["AP"]   # the monitored score: higher is better
        if hasattr(self.schedule, "end_epoch"):   # plateau / multi-step schedules step per epoch
            self.schedule.end_epoch(score)
        if self.dist.is_main:
            self._report(stats, gam, weights_per_rank, by_kd)
        stage = 1 if p.epoch < self.recipe.stop_epoch else 2
        p.epoch, p.step_in_epoch = p.epoch + 1, 0
        # official DetSolver.fit: a stage-2 epoch that is not better than the best score since the last
        # reload (the running maximum ``best_stat``, stage 1 included) reloads best_stg1.pth and lowers the
        # EMA decay by 1e-4; the reload empties ``best_stat``, so the epoch after it counts as a new best
        improved = p.since_reload_best is None or score > p.since_reload_best
        if improved:
            p.since_reload_best = score
        if score > p.best:
            p.best = score
            self.save(f"best_stg{stage}.pth")
            self.save_weights("best.pth")
        decay = self.ema.decay   # the stage-2 decay: best_stg1's EMA state holds the stage-1 one
        if stage == 2 and not improved and self._load_best_stage1():
            self.ema.decay = max(decay - 1e-4, 0.0)   # 0: no EMA stays none
            p.since_reload_best = None
            log.info("stage 2: AP %.4f is no new best: reloaded best_stg1.pth, EMA decay %.4f", score, self.ema.decay)
        self.save("last.pth")
        if self.dist.is_main and self.cfg.save_period and p.epoch % self.cfg.save_period == 0:
            copy_checkpoint(self.out / "last.pth", self.out / f"epoch{p.epoch}.pth")   # atomic: never half a file
        barrier()   # every rank may read best_stg1.pth at the stage switch

    def _report(self, stats: dict, gam: dict | None, weights_per_rank: list, by_kd: bool) -> None:
        """Rank 0: the epoch's evaluation in the log, TensorBoard, eval.jsonl and results.csv/png."""
        epoch = self.progress.epoch
        log.info("epoch %d EMA eval:\n%s", epoch,
                 f"val distillation loss {stats['kd_loss']:.5f}" if by_kd else format_table(stats))
        for k, v in stats.items():
            self.metrics.scalar(f"val/{k}", v, epoch)
        if gam:
            self.distill.report_epoch(gam, self.metrics.writer, self.out)
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps(dict(epoch=epoch, **stats, gam=gam, weights_sha256_per_rank=weights_per_rank)) + "\n")
        seconds = self.time_offset + time.perf_counter() - self.started
        run_outputs.Results(self.out).add(run_outputs.results_row(
            epoch, self.metrics.means(), self.optimizer.param_groups[0]["lr"], stats, seconds))

    def _stop_early(self) -> bool:
        """--patience: no val improvement for that many epochs (read from results.csv, so a resumed
        run counts the epochs before the interruption)."""
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
