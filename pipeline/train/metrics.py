"""The per-step log of a run: loss terms averaged over the ranks, teacher-cache statistics over all
ranks (not rank 0's), lr, the distillation weight, throughput; written to metrics.jsonl and
TensorBoard by rank 0, shown in the progress bar, and averaged per epoch for results.csv."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.train import outputs as run_outputs
from pipeline.train.distributed import all_gather_objects, reduce_mean

COUNTS = ("cache_damaged",)   # teacher statistics that add up over ranks; the others are per-view rates


class StepMetrics:
    def __init__(self, out: Path, every: int, optimizer, ema, distill, data, world_size: int, is_main: bool,
                 cached: bool):
        self.out, self.every, self.optimizer, self.ema, self.distill, self.data = out, every, optimizer, ema, distill, data
        self.world_size, self.is_main, self.cached = world_size, is_main, cached
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(out / "tb")
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.t0, self.samples = time.perf_counter(), 0

    def start_epoch(self) -> None:
        self.sums, self.counts = {}, {}
        self.t0, self.samples = time.perf_counter(), 0

    def first_batch(self, images, targets) -> None:
        """train_batch0.jpg: the first training batch of the run, drawn once."""
        picture = self.out / "train_batch0.jpg"
        if self.is_main and not picture.exists():
            run_outputs.save_batch(images, targets, picture, self.data.class_names)

    def seen(self, per_rank: int) -> None:
        self.samples += per_rank * self.world_size

    def log(self, losses: dict, progress) -> dict:
        values = reduce_mean(losses)
        values.update(lr=self.optimizer.param_groups[0]["lr"], ema_decay=self.ema.decay_at(self.ema.updates),
                      samples_per_s=self.samples / max(time.perf_counter() - self.t0, 1e-9),
                      **self.distill.log_values(), **self.teacher_stats())
        if self.is_main:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, progress.global_step)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(dict(epoch=progress.epoch, step=progress.step_in_epoch,
                                        global_step=progress.global_step, **values)) + "\n")
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        return values

    def teacher_stats(self) -> dict:
        """The teacher-target statistics since the last log, over every rank: rates averaged (each rank
        serves the same number of views per step), counts summed."""
        per_rank = all_gather_objects(self.data.teacher_stats())
        keys = per_rank[0].keys()
        return {k: (sum if k in COUNTS else _mean)([r[k] for r in per_rank]) for k in keys}

    def means(self) -> dict:
        """The epoch means of the logged values (results.csv's train columns)."""
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def bar_text(self, values: dict) -> str:
        """loss, lr, samples/s and, with a teacher cache, its hit rate."""
        text = f"loss={values['loss']:.3f} lr={values['lr']:.2e} {values['samples_per_s']:.1f} img/s"
        if self.cached and "cache_hit_rate" in values:
            text += f" cache={100 * values['cache_hit_rate']:.0f}%"
        return text

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
