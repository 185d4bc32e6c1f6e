"""The one training configuration: :class:`TrainConfig`, and the ``jobs.train`` flags generated
from its fields (name, type, default and help live here once).

Imports nothing heavy, so ``python -m jobs.train --help`` answers without loading torch.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, dataclass, field, fields, replace
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
    size: str = _f("l", "RT-DETRv4 size", choices=["s", "m", "l", "x"])
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
    epochs: int | None = _f(None, "default: the size's recipe (the demo plan's without --data); fewer epochs "
                                  "scale every milestone")
    batch_size: int | None = _f(None, "per process (default: --global-batch / world size); given with "
                                      "--global-batch, they must agree")
    global_batch: int | None = _f(None, "the run's total batch over all processes, part of the training plan "
                                        "(default: --batch-size x world size, else the recipe's total, 32 for "
                                        "RT-DETRv4; the demo plan's without --data)")
    img_size: int = _f(640, "training input size (the demo plan's without --data)")
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
    cache: str | None = _f(None, "teacher-feature store written by jobs.cache_teacher; the run adopts its plan "
                                 "(size, epochs, image size, seed, global batch, MixUp group, data) for every "
                                 "flag not given (default: a store in cache/ whose plan and teacher match this "
                                 "run's, else the online teacher; none: the online teacher)")
    strict_cache: bool = _f(False, "stop the run (naming shard and view) when a cached view is missing or damaged, "
                                   "instead of computing it with the online teacher")
    mixup_group: int | None = _f(None, "MixUp partners roll(1) inside groups of this many slots of the global batch "
                                       "(default: min(4, global batch), 4 being the official per-GPU batch of "
                                       "L/X); part of the training plan")
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
    max_steps_per_epoch: int | None = _f(None, "cap the epoch length (smoke runs; the demo plan's without --data); "
                                               "a store holds the first N steps of each epoch")
    eval_max_images: int | None = _f(None, "evaluate on at most N validation images (the demo plan's 16 without "
                                           "--data)")
    patience: int | None = _f(None, "early stopping: stop when the monitored value (val AP; the val distillation "
                                    "loss in a label-free stage) has not improved for N epochs (default: the "
                                    "recipe's: 12 / 7 in the RT-CO-DETR distillation stages, none otherwise)")
    save_period: int = _f(0, "also keep epoch<N>.pth (resumable) every N epochs (0: only last.pth and best.pth)")
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)")
    # not a flag: the fields the command line gave (None: a configuration built in code, whose fields
    # differing from their defaults count as given); adopt_store_plan adopts a store's plan for the others
    given: tuple[str, ...] | None = field(default=None, metadata={"flag": False})   # sorted: JSON in config.json

    def __post_init__(self):
        if self.distill is None:   # each recipe's own distillation
            self.distill = "codetr" if self.recipe == "rt-co-detr" else "dsi"


# The flags that define the training plan (pipeline/data/plan.py), shared by jobs.train and jobs.cache_teacher
# (same names, defaults and help: declared once, above); a store records them and a run adopts them.
PLAN_FIELDS = ("size", "epochs", "img_size", "seed", "train_split", "data", "mixup_group", "global_batch",
               "max_steps_per_epoch")


@dataclass(frozen=True)
class DemoPlan:
    """The plan of a run without ``--data`` (the embedded data set), the same in jobs.train and
    jobs.cache_teacher: a few epochs of a few steps at a small size, through every augmentation phase of
    the recipe compressed to ``epochs`` (Mosaic/MixUp, then without, then none; multi-scale), so the three
    headline commands finish in minutes on a CPU."""
    epochs: int = 4
    max_steps_per_epoch: int = 8
    img_size: int = 320
    global_batch: int = 4
    eval_max_images: int = 16   # not part of the plan: jobs.train evaluates on 16 of the 64 val images


DEMO = DemoPlan()


def demo_note(cfg) -> str | None:
    """The line both jobs print for a run without ``--data`` (its plan, flags included)."""
    if cfg.data is not None:
        return None
    steps = f"{cfg.max_steps_per_epoch} steps" if cfg.max_steps_per_epoch else "all steps"
    batch = cfg.global_batch or f"{cfg.batch_size} per process"
    return (f"no --data: the embedded data set, demo plan of {cfg.epochs or 'the recipe'} epochs x {steps} of "
            f"{batch} images at {cfg.img_size} px (the same in jobs.cache_teacher and jobs.train; give --data for "
            "the full recipe)")


def explicit(cfg) -> frozenset:
    """The fields the user set: those given on the command line, or (a configuration built in code)
    those that differ from their defaults."""
    if cfg.given is not None:
        return frozenset(cfg.given)
    return frozenset(f.name for f in fields(cfg) if f.name != "given" and f.default is not MISSING
                     and getattr(cfg, f.name) != f.default)


def with_demo_defaults(cfg):
    """A command line without ``--data`` runs the :data:`DEMO` plan for every plan flag it does not
    give; with ``--data``, with ``--cache STORE`` (the store's plan decides) or in a configuration built
    in code the recipe's defaults stand."""
    if cfg.data is not None or cfg.given is None or cfg.cache not in (None, "none"):
        return cfg
    demo = {k: getattr(DEMO, k) for k in ("epochs", "max_steps_per_epoch", "img_size", "global_batch",
                                          "eval_max_images") if k not in cfg.given}
    if "batch_size" in cfg.given:   # --batch-size alone defines the global batch (x world size)
        demo.pop("global_batch", None)
    return replace(cfg, **demo)


def default_mixup_group(global_batch: int) -> int:
    """The MixUp group when --mixup-group is not given: 4 (the official per-GPU batch of L/X), or the
    global batch when it is smaller; one rule for both jobs."""
    return min(4, global_batch)


def _scalar_type(hint):
    """``int | None`` -> int: the type argparse converts a flag's string with."""
    args = [a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)]
    return args[0]


class Given(argparse.Action):
    """Store the value and record the flag as given (``namespace.given``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


class GivenBool(argparse.BooleanOptionalAction):
    """``--x/--no-x``, recorded as given."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig, only=None) -> argparse.ArgumentParser:
    """One ``--flag`` per dataclass field (``only``: these fields), with its default shown; booleans get
    ``--x/--no-x``. The flags the command line gives are recorded in ``namespace.given``."""
    hints = get_type_hints(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    parser.set_defaults(given=frozenset())
    for f in fields(cls):
        meta = dict(f.metadata)
        if meta.pop("flag", True) is False or (only is not None and f.name not in only):
            continue
        group = meta.pop("group", None)
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = parser if group is None else groups[group]
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        help_ = meta.pop("help")
        typ = _scalar_type(hints[f.name])
        if typ is bool:   # BooleanOptionalAction shows its default itself
            target.add_argument(flag, action=GivenBool, default=default, help=help_)
        else:
            meta.setdefault("type", typ)
            target.add_argument(flag, action=Given, default=default, help=help_ + " (default: %(default)s)", **meta)
    return parser


def plan_config(namespace: argparse.Namespace) -> TrainConfig:
    """The plan flags of a job that only shares them (``add_config_flags(p, only=PLAN_FIELDS)``,
    jobs.cache_teacher) as a TrainConfig, with the demo plan's defaults when there is no ``--data``:
    the very values jobs.train resolves from the same command line."""
    values = {k: getattr(namespace, k) for k in PLAN_FIELDS}
    return with_demo_defaults(TrainConfig(**values, given=tuple(sorted(set(namespace.given) & set(PLAN_FIELDS)))))


def config_from_args(namespace: argparse.Namespace, cls=TrainConfig):
    """The configuration of parsed flags (``given``: the flags typed), with the demo plan's defaults
    when there is no ``--data``."""
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    if "given" in values:
        values["given"] = tuple(sorted(values["given"]))
    return with_demo_defaults(cls(**values))
