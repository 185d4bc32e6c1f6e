"""Training checkpoints that restore everything a resumed run needs to reproduce the
uninterrupted run: model, EMA, DSI projector, optimizer, AMP scaler, schedule position, GAM
state, data position (epoch, batch) and the RNG streams (torch, CUDA, numpy, python).

The layout keeps the official top-level names (``model``, ``ema: {module, updates}``,
``optimizer``, ``scaler``, ``last_epoch``) so ``detector.load_checkpoint`` and the official
tools read the weights; the rest is ours. Writes are atomic (temp file + rename), so a job killed
while saving leaves the previous checkpoint intact, and carry a sha256 of every tensor, checked at load.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from detector.checkpoint import read_checkpoint, save_verified

FORMAT = "rtdetrv4-train-v1"
# TrainConfig fields a resumed run may change: where it writes, how it logs and checkpoints, how a new run
# would start, where the teacher's targets come from (a store holds the online teacher's own), the device.
# Every other field (and the data set's content) is the run's plan: an exact resume keeps it.
RESUME_MAY_CHANGE = frozenset({"out", "name", "exist_ok", "resume", "finetune", "student_weights", "random_student",
                               "workers", "log_every", "checkpoint_every", "save_period", "patience", "device",
                               "cache", "strict_cache", "weights", "teacher_checkpoint", "teacher_precision",
                               "max_bad_steps", "batch_size", "given"})
# batch_size (per process) may change with the world size: check_resume_layout holds the global batch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: dict, path: str | Path) -> Path:
    """Atomic write with a checksum of every tensor (detector.checkpoint.save_verified)."""
    return save_verified(obj, path)


def check_resume_layout(path: str | Path, state: dict, world_size: int, batch_size: int) -> str | None:
    """A resume continues the same global batches: on the world size the checkpoint was written with and
    the same per-process batch (exact: the same per-rank random streams), or on another world size with
    the same global batch (the plan's samples, augmentations and teacher targets at every global step are
    the same; each rank's denoising noise is drawn anew). Returns the note for the log on a world-size
    change; refuses a different global batch."""
    saved_world, saved_batch = state.get("world_size"), state.get("batch_size")
    if saved_world is None or saved_batch is None:
        return None
    if saved_world * saved_batch != world_size * batch_size:
        raise ValueError(f"--resume {path}: written with a global batch of {saved_world * saved_batch} "
                         f"({saved_world} process(es) x {saved_batch}), this run has {world_size * batch_size} "
                         f"({world_size} x {batch_size}). The plan's steps are global batches: resume with "
                         f"--nproc_per_node and --batch-size giving {saved_world * saved_batch}, or start a new run "
                         f"with --finetune {path}")
    if saved_world == world_size:
        return None
    return (f"resumed on {world_size} process(es) a run written by {saved_world}: the same samples, augmentations "
            "and teacher targets at every global step (the plan does not depend on the world size); each rank's "
            "denoising noise is drawn anew, so the steps are not bit-identical to the uninterrupted run")


def training_state(*, cfg, recipe, plan: dict, data, student, ema, optimizer, scaler, distill, progress,
                   world_size: int, batch_size: int) -> dict:
    """Everything a resumed run restores (the official top-level names where the official code has them)."""
    return dict(format=FORMAT, size=cfg.size, num_classes=data.num_classes, class_names=data.class_names,
                config=asdict(cfg), recipe=asdict(recipe), plan=plan,
                model=student.detector.state_dict(), ema=ema.state_dict(),
                dsi=student.dsi.state_dict() if student.dsi is not None else None,
                codetr=student.codetr.state_dict() if student.codetr is not None else None,
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), gam=distill.state_dict(),
                last_epoch=progress.epoch, **progress.state_dict(), world_size=world_size, batch_size=batch_size)


def restore_weights(state: dict, student, ema, optimizer, scaler) -> None:
    """Model, DSI projector / RT-CO-DETR projections, EMA, optimizer and AMP scaler from a training state
    (what the official ``load_resume_state`` restores; also the stage-2 reload of best_stg1.pth)."""
    student.detector.load_state_dict(state["model"])
    if student.dsi is not None and state.get("dsi"):
        student.dsi.load_state_dict(state["dsi"])
    if student.codetr is not None and state.get("codetr"):
        student.codetr.load_state_dict(state["codetr"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])


def inference_weights(*, cfg, data, ema, progress) -> dict:
    """best.pth: the EMA weights only (as the official best checkpoints are read), for jobs.evaluate,
    export, predict and ``detector.load_checkpoint``."""
    return dict(format=FORMAT + "-weights", size=cfg.size, num_classes=data.num_classes,
                class_names=data.class_names, config=asdict(cfg), ema={"module": ema.module.state_dict()},
                epoch=progress.epoch, best_ap=progress.best)


def run_plan(config: dict, dataset_hash: str | None = None) -> dict:
    """What defines a run: the config fields a resume may not change, and the training data's content hash
    (the same flags over edited files are another run). Stored in every training checkpoint."""
    plan = {k: v for k, v in config.items() if k not in RESUME_MAY_CHANGE}
    return {**plan, "dataset_hash": dataset_hash}


def check_resume_plan(path: str | Path, state: dict, plan: dict) -> None:
    """Refuse a resume whose command changes the run's plan, naming each changed flag with the run's value
    (a checkpoint without a stored plan is compared on its stored config)."""
    saved = state.get("plan") or run_plan(state.get("config") or {}, None)
    text = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    changed = [k for k in plan if k in saved and text(saved[k]) != text(plan[k])
               and not (k == "dataset_hash" and None in (saved[k], plan[k]))]
    if len(changed) > 1 and "train_plan" in changed:   # the flags that changed it say more than its hash
        changed.remove("train_plan")
    if not changed:
        return
    what = [f"the training data's content (its images or labels changed: hash {str(saved[k])[:12]} -> "
            f"{str(plan[k])[:12]})" if k == "dataset_hash" else
            f"the augmentation plan (hash {str(saved[k])[:12]} -> {str(plan[k])[:12]})" if k == "train_plan" else
            f"{_flag(k, plan[k])} (the run: {_flag(k, saved[k]).split(' ', 1)[-1]})" for k in changed]
    raise ValueError(f"--resume {path}: this command changes the run's plan: {'; '.join(what)}. An exact resume "
                     "continues the same run: give the run's values (its config.json lists them), or start a new run "
                     f"from these weights with --finetune {path}")


def _flag(field: str, value) -> str:
    """A config value as the flag that gives it: --img-size 640, --no-ema, --epochs default."""
    name = field.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} " + ("default" if value is None else json.dumps(value) if isinstance(value, (dict, list))
                           else str(value))


def load_train_state(path: str | Path, size: str) -> dict:
    """Reads a training checkpoint for ``--resume``; refuses other formats and other sizes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint (the trainer writes <out>/last.pth)")
    state = read_checkpoint(path, "--resume")  # refuses damaged, truncated and non-finite checkpoints
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"--resume {path}: not a training checkpoint of this project (no format={FORMAT!r}); "
                         "to start from weights only use --finetune")
    if state.get("size") != size:
        raise ValueError(f"--resume {path}: checkpoint is for size {state.get('size')!r} but --size is {size!r}")
    return state
