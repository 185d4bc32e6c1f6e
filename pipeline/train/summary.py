"""The start-up summary of a run: data, classes, device, batch, precision, teacher and cache, output
folder, the recipe (and, for --recipe rt-co-detr, every departure from the paper), and the warnings a
person should read before waiting for the first epoch."""
from __future__ import annotations

import logging

import torch

from pipeline.train import outputs as run_outputs
from pipeline.train.config import demo_note

log = logging.getLogger("rtdetrv4.train")


def precision_text(amp_dtype) -> str:
    return f"{str(amp_dtype).removeprefix('torch.')} amp" if amp_dtype else "fp32"


def log_summary(cfg, data, dist, batch_size: int, steps_per_epoch: int, recipe, amp_dtype, distill, preset,
                out, epoch: int) -> None:
    train_n = len(data.train_items) if data.train_items is not None else "streamed"
    names = ", ".join(data.class_names[:8]) + (", ..." if len(data.class_names) > 8 else "")
    lines = [f"data      {cfg.data or 'embedded synthetic dataset'}: train[{cfg.train_split}] {train_n} images, "
             f"val[{cfg.val_split}] {len(data.val_dataset)} images" + (f" (from {cfg.val_data})" if cfg.val_data else ""),
             f"classes   {data.num_classes}: {names}",
             f"device    {dist.device} x {dist.world_size} process(es); batch {batch_size} per process, "
             f"{steps_per_epoch} steps/epoch, {recipe.epochs} epochs",
             f"precision {'amp ' + str(amp_dtype).removeprefix('torch.') if amp_dtype else 'fp32'} (--amp {cfg.amp}"
             + (": no autocast on a CPU)" if cfg.amp == "auto" and dist.device.type != "cuda" else ")")]
    note = demo_note(cfg)
    if note:
        lines.append(f"plan      {note}")
    lines += distill.summary_lines(cfg, data, epoch)
    lines.append(f"output    {out}" + (f" (resumed from {cfg.resume})" if cfg.resume else ""))
    lines += preset.summary_lines(precision_text(amp_dtype))
    log.info("run summary:\n  %s", "\n  ".join(lines))
    if amp_dtype == torch.bfloat16 and dist.device.type == "cpu":
        from teacher_cache.bf16 import native_bf16_flags
        if not native_bf16_flags():
            log.warning("--amp bf16 on a CPU without native bf16 (no AMX / AVX512-BF16): bf16 is emulated and many "
                        "times slower than fp32; use --amp off")
    overlap = run_outputs.shared_images(data)
    if overlap:
        log.warning("train[%s] and val[%s] share %d images: the val AP does not measure generalisation",
                    cfg.train_split, cfg.val_split, overlap)
