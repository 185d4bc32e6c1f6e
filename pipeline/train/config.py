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


def _class_map_flag(value: str):
    """--class-map: ``name``, ``slice`` or a JSON object."""
    if value in ("name", "slice"):
        return value
    try:
        mapping = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not name, slice or JSON ({e}); e.g. "
                                         '\'{"bottle": "Clear plastic bottle"}\'') from e
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(f"{value!r}: the JSON must be an object {{teacher: student}}")
    return mapping


@dataclass
class TrainConfig:
    size: str = _f("s", "RT-DETRv4 size", choices=["s", "m", "l", "x"])
    student: str | None = _f(None, "student: rtdetrv4 (of --size; the default) or rtdetrv2_r50 (RT-CO-DETR's "
                                   "RT-DETR-L: transformers' RT-DETRv2-R50vd; the default of --recipe rt-co-detr)",
                             choices=["rtdetrv4", "rtdetrv2_r50"])
    student_weights: str | None = _f(None, "rtdetrv2_r50: local transformers directory to start from (e.g. a "
                                           "PekingU/rtdetr_v2_r50vd snapshot); required by --recipe rt-co-detr")
    random_student: bool = _f(False, "let --recipe rt-co-detr start rtdetrv2_r50 from random weights without "
                                     "--student-weights (the paper fine-tunes COCO weights; its mAP collapses)")
    recipe: str | None = _f(None, "training recipe (default: the RT-DETRv4 recipe of --size; rt-co-detr: the "
                                  "RT-CO-DETR paper whole: student, pairing, class map, teacher size, optimizer, "
                                  "schedule, batch and augmentation of each stage, see docs/rt_co_detr.md)",
                            choices=["rtdetrv4", "rt-co-detr"])
    stage: str | None = _f(None, "rt-co-detr: both (default with a teacher: distillation without labels into "
                                 "OUT/distill, then fine-tuning on the labels into OUT/finetune, both reported), "
                                 "distill, finetune (the default of --distill none: the baseline), or joint (one "
                                 "run, distillation terms added to the detection loss)",
                           choices=["both", "distill", "finetune", "joint"])
    augment: str | None = _f(None, "augmentation (default: the recipe's; rt-co-detr: none = resize only in the "
                                   "distillation stage, rtdetrv2 in fine-tuning; rtdetrv4 = the --size recipe's "
                                   "Mosaic/MixUp phases)", choices=["none", "rtdetrv2", "rtdetrv4"])
    lr: float | None = _f(None, "base learning rate (default: the recipe's)")
    weight_decay: float | None = _f(None, "AdamW weight decay (default: the recipe's)")
    schedule: str | None = _f(None, "LR schedule (default: the recipe's; flat-cosine for RT-DETRv4, plateau for "
                                    "rt-co-detr)", choices=["flat-cosine", "multistep", "plateau"])
    ema: bool | None = _f(None, "evaluate and keep an EMA of the weights (--no-ema: the raw weights; default: the "
                                "recipe's, on for RT-DETRv4, off for rt-co-detr as the authors)")
    data: str | None = _f(None, "COCO json/dir, YOLO dir (data.yaml) or a jobs.make_shards directory "
                                "(default: the embedded synthetic dataset)")
    val_data: str | None = _f(None, "validation set (default: the --val-split of --data)")
    train_split: str = _f("train", "split trained on: a YOLO data.yaml key (train, val, ...) or a COCO split "
                                   "(train2017)")
    val_split: str = _f("val", "split evaluated on (of --val-data, else of --data)")
    on_error: str = _f("raise", "bad images or labels: raise (stop, naming the file; an image that cannot be decoded "
                                "stops the run where it is first read) or skip (decode every image once at start, "
                                "list the bad ones and train without them: the data set of jobs.cache_teacher "
                                "--on-error skip)", choices=["raise", "skip"])
    out: str | None = _f(None, "run directory (default: runs/<name>); an existing non-empty one is never written "
                               "into: <out>2, <out>3, ... (like Ultralytics) unless --exist-ok")
    name: str = _f("train", "run name: the run directory is runs/<name> (without --out)")
    exist_ok: bool = _f(False, "write into an existing run directory instead of incrementing its name")
    epochs: int | None = _f(None, "default: the size's recipe; fewer epochs scale every milestone")
    batch_size: int | None = _f(None, "per process (default: the recipe's total batch / world size)")
    img_size: int = _f(640, "training input size")
    workers: int = _f(2, "DataLoader workers per process")
    seed: int = _f(0, "seed of the augmentation plan and of the model initialisation")
    # distillation
    distill: str | None = _f(None, "dsi: RT-DETRv4 (VFM teacher, DSI+GAM; the default); codetr: RT-CO-DETR "
                                   "(detector teacher; the default of --recipe rt-co-detr); feat: feature-only MSE from "
                                   "the --vfm teacher (the RT-DisDINOv3 ablation)",
                             choices=["dsi", "codetr", "feat", "none"])
    teacher_checkpoint: str | None = _f(None, "RT-CO-DETR teacher: a transformers detector directory (Conditional-"
                                              "DETR, DETR, Deformable-DETR, RT-DETR) or a detector .pth (ours/official)")
    teacher_input_size: int | None = _f(None, "RT-CO-DETR teacher input size (default: its preprocessor_config.json, "
                                              "800 px for Conditional-DETR; 640 under --recipe rt-co-detr, the "
                                              "authors' setting; 0: the preprocessor's in any case)")
    class_map: dict | str | None = _f(None, 'RT-CO-DETR classes: name (default: by id2label name), slice (the '
                                            'authors\' first-K columns, the default of --recipe rt-co-detr) or JSON '
                                            '{"teacher": "student"} (indices or names)', type=_class_map_flag)
    lambda_feat: float | None = _f(None, "RT-CO-DETR / feat: feature-MSE weight (default 1.0)")
    lambda_cls: float | None = _f(None, "RT-CO-DETR: tau^2 KL weight (default 0.8)")
    lambda_box: float | None = _f(None, "RT-CO-DETR: box L1 weight (default 1.2)")
    temperature: float | None = _f(None, "RT-CO-DETR: KL temperature tau (default 4)")
    det_loss: bool = _f(True, "the detection loss on the labels (--no-det-loss: distillation terms only, the "
                              "authors' stage 1; --stage distill of --recipe rt-co-detr never uses labels)")
    pairing: str | None = _f(None, "RT-CO-DETR query pairing (default: hungarian; index, the authors', under "
                                   "--recipe rt-co-detr)", choices=["hungarian", "index"])
    cache: str | None = _f(None, "teacher-feature store written by jobs.cache_teacher")
    strict_cache: bool = _f(False, "stop the run (naming shard and view) when a cached view is missing or damaged, "
                                   "instead of computing it with the online teacher")
    mixup_group: int | None = _f(None, "MixUp partners roll(1) inside groups of this many slots of the global batch "
                                       "(default: 4, the official per-GPU batch of L/X; smaller when the per-rank "
                                       "batch is); part of the training plan")
    vfm: str = _f("dinov3_vitb", "online teacher (fallback for views the cache lacks)")
    weights: str | None = _f(None, "local teacher weights (.pth / .safetensors); none: random init (loud warning)")
    teacher_precision: str = _f("auto", "teacher precision (auto: bf16 where its cosine to fp32 >= 0.999)",
                                choices=["fp32", "bf16", "auto"])
    gam: bool = _f(True, "GAM adapts the DSI weight (--no-gam: keep it fixed)")
    gam_rule: str = _f("released", "GAM update: released (the official odds-ratio step) or paper (Eq. 11: "
                       "lambda * (rho +- delta) / share, toward the far band edge)", choices=["released", "paper"])
    distill_weight: float | None = _f(None, "initial (or static) DSI weight lambda (default: the size's)")
    dsi_tap: str = _f("aifi", "DSI ablation: the student map aligned with the teacher (aifi: F5, as released; "
                      "hybrid: the stride-32 CCFF output; backbone: S5)", choices=["aifi", "hybrid", "backbone"])
    dsi_projector: str = _f("linear", "DSI ablation: the projector (linear, as released; mlp; conv1x1)",
                            choices=["linear", "mlp", "conv1x1"])
    dsi_loss: str = _f("cosine", "DSI ablation: the alignment loss (cosine, as released; mse)",
                       choices=["cosine", "mse"])
    # resume / init
    resume: str | None = _f(None, "run directory (its last.pth) or training checkpoint to continue exactly; the run "
                                  "continues in that directory; a command that changes the run's plan (--img-size, "
                                  "--seed, --data, --epochs, ...) is refused, naming the flag", group="init")
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
    patience: int | None = _f(None, "early stopping: stop when the monitored value (val AP; the val distillation "
                                    "loss in a label-free stage) has not improved for N epochs (default: the "
                                    "recipe's: 12 / 7 in the RT-CO-DETR distillation stages, none otherwise)")
    save_period: int = _f(0, "also keep epoch<N>.pth (resumable) every N epochs (0: only last.pth and best.pth)")
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)")

    def __post_init__(self):
        if self.distill is None:   # each recipe's own distillation
            self.distill = "codetr" if self.recipe == "rt-co-detr" else "dsi"


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
