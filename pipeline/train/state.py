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
                               "max_bad_steps"})


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


def check_resume_layout(path: str | Path, state: dict, world_size: int, batch_size: int) -> None:
    """An exact resume replays the same per-rank batches and RNG streams, so it needs the world size and
    per-process batch size the checkpoint was written with; anything else is refused, saying why."""
    saved = (state.get("world_size"), state.get("batch_size"))
    if saved[0] is not None and saved[0] != world_size:
        raise ValueError(f"--resume {path}: written by {saved[0]} process(es), this run has {world_size}. An exact "
                         "resume replays each rank's batches and random streams, which depend on the world size: "
                         f"resume with --nproc_per_node {saved[0]}, or start a new run with --finetune {path}")
    if saved[1] is not None and saved[1] != batch_size:
        raise ValueError(f"--resume {path}: written with --batch-size {saved[1]} per process, this run has "
                         f"{batch_size}. The batch plan and the step count depend on it: resume with --batch-size "
                         f"{saved[1]}, or start a new run with --finetune {path}")


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
    if not changed:
        return
    what = [f"the training data's content (its images or labels changed: hash {str(saved[k])[:12]} -> "
            f"{str(plan[k])[:12]})" if k == "dataset_hash" else
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
