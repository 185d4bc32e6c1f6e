"""One training step, one epoch and one evaluation, as the official ``det_engine``.

One step (official ``det_engine.train_one_epoch``, AMP path):
forward under autocast -> criterion in fp32 -> ``+ lambda * DSI`` (or the RT-CO-DETR terms) ->
backward -> unscale -> clip -> GAM measures the AIFI gradient share -> optimizer step -> EMA ->
LR step. Differences from the released code (each one a fix): a non-finite loss skips the step on
every rank (and stops the run after ``max_bad_steps``) instead of poisoning the weights; the labels
are checked on the loader's host batch, not on the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from detector.criterion import check_labels
from pipeline.train.distributed import all_true

log = logging.getLogger("rtdetrv4.train")


@dataclass
class Progress:
    """Where the run is: the one copy of the counters a checkpoint restores."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float = -1.0                      # best monitored score so far: val AP, or -(val distillation loss)
    bad_steps: int = 0
    since_reload_best: float | None = None  # best score since the last stage-2 reload

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_step=self.global_step,
                    best_ap=self.best, bad_steps=self.bad_steps, since_reload_best=self.since_reload_best)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best, self.bad_steps = state["best_ap"], state["bad_steps"]
        self.since_reload_best = state.get("since_reload_best", self.best if self.best >= 0 else None)


class Step:
    """The optimisation step of the run's parts; ``step(images, targets, batch)`` -> the detached
    loss terms (``loss``: their sum), or None when a non-finite loss or gradient skipped it."""

    def __init__(self, model: nn.Module, student, criterion, distill, optimizer, scaler, schedule, ema,
                 progress: Progress, device: torch.device, amp_dtype, max_norm: float, det_loss: bool,
                 distributed: bool, max_bad_steps: int):
        self.model, self.student, self.criterion, self.distill = model, student, criterion, distill
        self.optimizer, self.scaler, self.schedule, self.ema = optimizer, scaler, schedule, ema
        self.progress, self.device, self.amp_dtype = progress, device, amp_dtype
        self.max_norm, self.det_loss, self.distributed, self.max_bad_steps = max_norm, det_loss, distributed, max_bad_steps

    def losses(self, images, targets, batch) -> tuple[dict, dict]:
        """(weighted loss terms, fp32 outputs): the one place the loss dictionary is assembled."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            outputs = self.model(images, targets if self.det_loss else None)
            outputs.update(self.distill.student_outputs(outputs))
        outputs = to_float(outputs)
        losses = self.criterion(outputs, targets) if self.det_loss else {}
        losses.update(self.distill.losses(images, targets, batch, outputs))
        return losses, outputs

    def __call__(self, images, targets, batch) -> dict | None:
        if self.det_loss:   # a label-free stage may keep a student head of another label space
            check_labels(targets, self.criterion.num_classes)
        images = images.to(self.device, non_blocking=True)
        targets = [{k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        losses, outputs = self.losses(images, targets, batch)
        loss = sum(losses.values()) + self._unused_guard(outputs)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # clip_max_norm 0 (RT-CO-DETR): no clipping, the norm is still measured for the finiteness check
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm or float("inf"))
        # The criterion maps NaN terms to 0 (official nan_to_num), so the gradient norm is what
        # reveals a poisoned step; fp16 overflow is the scaler's business, not a bad step.
        finite = torch.isfinite(loss.detach()) & (torch.isfinite(grad_norm) | self.scaler.is_enabled())
        if not all_true(finite):
            return self._skip()
        self.distill.after_backward(self.model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.student.detector)
        # official order (det_engine.train_one_epoch): after the optimizer step of iteration i set lr(i),
        # so iteration i + 1 trains with lr(i); iteration 0 trains with the lr(0) set at construction
        self.schedule.step(self.progress.global_step)
        self.progress.global_step += 1
        losses["loss"] = loss.detach()
        return losses

    def _unused_guard(self, outputs: dict):
        """Zero-gradient terms for parameters a DDP rank may leave out of this step's graph (DDP, with
        find_unused_parameters=False as official, would wait for their gradients forever)."""
        if not self.distributed:
            return 0.0
        detector = self.student.detector
        guard = 0.0
        embed = getattr(detector, "denoising_class_embed", None)   # the transformers student keeps it here
        if embed is None:
            embed = getattr(detector.decoder, "denoising_class_embed", None)
        if "dn_meta" not in outputs and embed is not None:   # no boxes on this rank: no denoising queries
            guard = guard + 0.0 * embed.weight.sum()
        if not self.det_loss:
            # a label-free stage leaves heads (under --distill feat the whole decoder) without gradient: the same
            # guard for all of them (AdamW then also decays them, by lr * wd per step, which one process skips)
            guard = guard + 0.0 * sum(p.sum() for p in detector.parameters() if p.requires_grad)
        return guard

    def _skip(self) -> None:
        self.progress.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()
        log.warning("non-finite loss or gradient at epoch %d batch %d: step skipped (%d/%d)", self.progress.epoch,
                    self.progress.step_in_epoch, self.progress.bad_steps, self.max_bad_steps)
        if self.progress.bad_steps >= self.max_bad_steps:
            raise FloatingPointError(f"{self.progress.bad_steps} non-finite steps: stopping (raise --max-bad-steps or "
                                     "lower the learning rate; the last good checkpoint is last.pth)")
        return None


def train_one_epoch(step: Step, batches, progress: Progress, total: int, metrics, checkpoint_every: int,
                    save_last, show: bool) -> dict:
    """The batches of ``progress.epoch`` from ``progress.step_in_epoch`` on, up to ``total``; logs
    through ``metrics`` (a :class:`pipeline.train.metrics.StepMetrics`) and calls ``save_last()``
    every ``checkpoint_every`` batches. Returns the last logged values."""
    step.model.train()
    bar = tqdm(total=total, initial=progress.step_in_epoch, disable=not show, desc=f"epoch {progress.epoch}",
               dynamic_ncols=True)
    metrics.start_epoch()
    last = {}
    for images, targets, batch in batches:
        if progress.step_in_epoch >= total:
            break
        metrics.first_batch(images, targets)
        losses = step(images, targets, batch)
        progress.step_in_epoch += 1
        metrics.seen(images.shape[0])
        bar.update(1)
        if losses is not None and (progress.step_in_epoch % metrics.every == 0 or progress.step_in_epoch == total):
            last = metrics.log(losses, progress)
            bar.set_postfix_str(metrics.bar_text(last), refresh=False)
        if checkpoint_every and progress.step_in_epoch % checkpoint_every == 0:
            save_last()
    bar.close()
    return last


@torch.no_grad()
def evaluate(model: nn.Module, postprocessor, loader, evaluator, device: torch.device, amp_dtype,
             max_images: int | None, batch_size: int, epoch: int, show: bool) -> dict:
    """COCO statistics of ``model`` (eval mode) over this rank's share of the validation set, at most
    ``max_images`` images (the evaluator gathers the ranks); official ``det_engine.evaluate``."""
    model.eval()
    total = len(loader) if not max_images else min(len(loader), -(-max_images // batch_size))
    bar = tqdm(loader, total=total, desc=f"eval {epoch}", leave=False, disable=not show, dynamic_ncols=True)
    for i, (images, targets) in enumerate(bar):
        if max_images and i * images.shape[0] >= max_images:
            break
        images = images.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        evaluator.update(postprocessor(to_float(outputs), sizes), torch.stack([t["image_id"] for t in targets]))
    bar.close()
    return evaluator.summarize()


def to_float(outputs):
    """Autocast outputs back to fp32 (the criterion runs outside autocast, as official)."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float(v) for v in outputs)
    return outputs
