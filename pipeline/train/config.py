"""The one training configuration: :class:`TrainConfig`, and the ``jobs.train`` flags generated
from its fields (name, type, default and help live here once).

Imports nothing heavy, so ``python -m jobs.train --help`` answers without loading torch.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, dataclass, field, fields
from typing import get_type_hints


def _f(default, help: str, **flag):
    """A config field with its command-line help (and extra argparse settings such as ``choices``)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class TrainConfig:
    size: str = _f("s", "RT-DETRv4 size", choices=["s", "m", "l", "x"])
    data: str | None = _f(None, "COCO json/dir, YOLO dir (data.yaml) or a jobs.make_shards directory "
                                "(default: the embedded synthetic dataset)")
    val_data: str | None = _f(None, "validation set (default: the val split of --data)")
    out: str = _f("runs/train", "checkpoints, metrics.jsonl, TensorBoard logs")
    epochs: int | None = _f(None, "default: the size's recipe; fewer epochs scale every milestone")
    batch_size: int | None = _f(None, "per process (default: the recipe's total batch / world size)")
    img_size: int = _f(640, "training input size")
    workers: int = _f(2, "DataLoader workers per process")
    seed: int = _f(0, "seed of the augmentation plan and of the model initialisation")
    # distillation
    distill: str = _f("dsi", "dsi: RT-DETRv4 (VFM teacher, DSI+GAM); codetr: RT-CO-DETR (detector teacher)",
                      choices=["dsi", "codetr", "none"])
    teacher_checkpoint: str | None = _f(None, "RT-CO-DETR teacher: a detector checkpoint (ours or official)")
    class_map: dict | None = _f(None, 'RT-CO-DETR: JSON {"teacher_label": student_label}', type=json.loads)
    pairing: str = _f("hungarian", "RT-CO-DETR query pairing (index = the reference implementation)",
                      choices=["hungarian", "index"])
    cache: str | None = _f(None, "teacher-feature store written by jobs.cache_teacher")
    vfm: str = _f("dinov3_vitb", "online teacher (fallback for views the cache lacks)")
    weights: str | None = _f(None, "local teacher weights (.pth / .safetensors); none: random init (loud warning)")
    teacher_precision: str = _f("auto", "teacher precision (auto: bf16 where its cosine to fp32 >= 0.999)",
                                choices=["fp32", "bf16", "auto"])
    gam: bool = _f(True, "GAM adapts the DSI weight (--no-gam: keep it fixed)")
    distill_weight: float | None = _f(None, "initial (or static) DSI weight lambda (default: the size's)")
    # resume / init
    resume: str | None = _f(None, "training checkpoint to continue exactly (e.g. OUT/last.pth)", group="init")
    finetune: str | None = _f(None, "weights to start from (ours or an official RT-DETRv4/DEIM .pth)", group="init")
    # numerics
    amp: str = _f("auto", "mixed precision (auto: bf16 on CUDA where supported, else fp16; off on CPU)",
                  choices=["auto", "bf16", "fp16", "off"])
    max_bad_steps: int = _f(20, "stop after this many non-finite losses")
    # bookkeeping
    log_every: int = _f(10, "log every N steps")
    checkpoint_every: int = _f(0, "also write last.pth every N steps (mid-epoch resume; 0: per epoch only)")
    max_steps_per_epoch: int | None = _f(None, "cap the epoch length (smoke runs)")
    eval_max_images: int | None = _f(None, "evaluate on at most N validation images")
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)")


def _scalar_type(hint):
    """``int | None`` -> int: the type argparse converts a flag's string with."""
    args = [a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)]
    return args[0]


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> argparse.ArgumentParser:
    """One ``--flag`` per dataclass field, with its default shown; booleans get ``--x/--no-x``."""
    hints = get_type_hints(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(cls):
        meta = dict(f.metadata)
        group = meta.pop("group", None)
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = parser if group is None else groups[group]
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        help_ = meta.pop("help")
        typ = _scalar_type(hints[f.name])
        if typ is bool:   # BooleanOptionalAction shows its default itself
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            meta.setdefault("type", typ)
            target.add_argument(flag, default=default, help=help_ + " (default: %(default)s)", **meta)
    return parser


def config_from_args(namespace: argparse.Namespace, cls=TrainConfig):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})
