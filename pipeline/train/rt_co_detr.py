"""RT-CO-DETR in the trainer: the ``--recipe rt-co-detr`` preset (the paper's settings, and the
departures the flags make, for the start-up summary), the authors' two stages (distillation
without labels, then fine-tuning on the labels) as one command, and the parts a run of
``--distill codetr`` / ``--distill feat`` needs: the student (RT-DETRv4 of ``--size`` or the
paper's RT-DETRv2-R50vd), its criterion, the frozen teacher, the distillation module and the
validation distillation loss that a label-free stage follows.

The paper is ``nam-htran/RT-CO-DETR``: ``train.py --distill`` (src/distillation/trainer_codetr.py;
the feature-only ablation: trainer_convnext.py / trainer_vit.py of the same history) writes a
distilled student, ``train.py --finetune`` fine-tunes it on TACO (templates/*.yml.template).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from detector import build_detector
from detector.criterion import Criterion
from detector.rt_co_detr import RTCODETRConfig, RTCODETRDistiller, resolve_class_map
from pipeline.train.distill import named_mode
from pipeline.train.recipe import Recipe, recipe_from_config, resolve_recipe, teacher_kind

log = logging.getLogger("rtdetrv4.train")

PAPER_STUDENT = "rtdetrv2_r50"
PAPER_IMG_SIZE = 640
PAPER_EPOCHS = 50    # each stage
PAPER_TEACHER_SIZE = 640
PAPER_WEIGHTS = dict(lambda_feat=1.0, lambda_cls=0.8, lambda_box=1.2, temperature=4.0)
STAGE_TEXT = {
    "distill": "distillation without labels (src/distillation/trainer_codetr.py; ablation: trainer_convnext/vit.py)",
    "finetune": "fine-tuning on the labels (templates/rtdetrv2_taco_finetune_*.yml.template)",
    "joint": "one run, distillation terms added to the detection loss (not the paper's two stages)",
    "both": "distillation without labels into OUT/distill, then fine-tuning on the labels into OUT/finetune",
}


# -- the preset ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One setting of a run next to the paper's, with the flag that departs and what that changes."""
    name: str
    value: str
    paper: str
    flag: str
    change: str

    @property
    def departs(self) -> bool:
        return self.value != self.paper


@dataclass
class Preset:
    """What ``--recipe`` resolved to, for the start-up summary."""
    recipe: str
    stage: str | None = None
    settings: list[Setting] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary_lines(self, precision: str) -> list[str]:
        """``recipe`` lines of the summary: the stage, the settings as the paper, each departure."""
        if self.recipe != "rt-co-detr":
            return [f"recipe    {self.recipe}"] + [f"  note    {n}" for n in self.notes]
        settings = self.settings + [_precision_setting(self.stage, precision)]
        same = [f"{s.name} {s.value}" for s in settings if not s.departs]
        lines = [f"recipe    rt-co-detr (the RT-CO-DETR paper), stage {self.stage}: {STAGE_TEXT[self.stage]}",
                 "  as the paper: " + " | ".join(same)]
        lines += [f"  DEPARTS {s.flag} -> {s.name} {s.value} (paper: {s.paper}): {s.change}"
                  for s in settings if s.departs]
        return lines + [f"  note    {n}" for n in self.notes]


def _precision_setting(stage: str | None, precision: str) -> Setting:
    # the authors: fp32 distillation (no autocast in trainer_codetr.py), fine-tuning with --use-amp (fp16)
    paper = "fp16 amp" if stage == "finetune" else "fp32"
    return Setting("precision", precision, paper, "--amp", "another rounding of the same computation")


def resolve_preset(cfg):
    """(the configuration a run follows, its :class:`Preset`): ``--recipe rt-co-detr`` fills every
    field the user left unset with the paper's value (student, pairing, class map, teacher size,
    stage, early stopping); flags keep their value and are listed as departures. Idempotent."""
    if cfg.teacher_input_size is not None and cfg.teacher_input_size < 0:
        raise ValueError(f"--teacher-input-size {cfg.teacher_input_size}: give a size in pixels, or 0 for the "
                         "teacher preprocessor's own")
    if cfg.recipe != "rt-co-detr":
        if cfg.stage is not None:
            raise ValueError(f"--stage {cfg.stage} is a stage of --recipe rt-co-detr: add --recipe rt-co-detr, or "
                             "drop --stage")
        cfg = replace(cfg, student=cfg.student or "rtdetrv4", pairing=cfg.pairing or "hungarian")
        preset = Preset(cfg.recipe or "rtdetrv4")
        if named_mode(cfg).detector_teacher:
            r = recipe_from_config(cfg)
            preset.notes.append(
                f"--distill {cfg.distill} without --recipe runs the RT-DETRv4 recipe of --size {cfg.size} (AdamW lr "
                f"{r.lr:g}, {r.epochs} epochs, {r.schedule}, {r.augment} augmentation, detection loss on, one "
                "stage); --recipe rt-co-detr runs the RT-CO-DETR paper's")
        return cfg, preset
    mode = named_mode(cfg)
    if mode.vfm_targets:
        raise ValueError("--recipe rt-co-detr distils from a detector (--distill codetr), runs the feature-only "
                         "ablation (--distill feat) or the baseline (--distill none); DSI + GAM is RT-DETRv4's: drop "
                         "--recipe rt-co-detr or pick another --distill")
    stage = cfg.stage or ("both" if mode.distils else "finetune")
    if stage != "finetune" and not mode.distils:
        raise ValueError(f"--stage {stage} distils: give --distill codetr (with --teacher-checkpoint) or --distill "
                         "feat (with --vfm); --distill none is the fine-tuning stage alone (the baseline)")
    if stage == "finetune" and not cfg.det_loss:
        raise ValueError("--stage finetune trains on the labels: drop --no-det-loss")
    cfg = replace(cfg, stage=stage, student=cfg.student or PAPER_STUDENT, pairing=cfg.pairing or "index",
                  class_map="slice" if cfg.class_map is None else cfg.class_map,
                  teacher_input_size=PAPER_TEACHER_SIZE if cfg.teacher_input_size is None else cfg.teacher_input_size,
                  det_loss=False if stage == "distill" else cfg.det_loss)
    _check_student_start(cfg)
    if stage == "both":   # each stage resolves its own settings when it runs
        return cfg, Preset("rt-co-detr", stage, notes=["two stages, each with its own summary; --stage distill / "
                                                      "finetune runs one"])
    # the paper's recipe over this run's epochs (milestones scale with --epochs, which is its own departure)
    paper = resolve_recipe(cfg.size, cfg.epochs, "rt-co-detr", stage="distill" if stage == "joint" else stage,
                           teacher=teacher_kind(cfg.distill, cfg.vfm))
    if cfg.patience is None and paper.early_stop is not None:
        cfg = replace(cfg, patience=paper.early_stop)
    return cfg, Preset("rt-co-detr", stage, settings=_settings(cfg, paper, recipe_from_config(cfg)))


def _check_student_start(cfg) -> None:
    """The paper fine-tunes a COCO-trained RT-DETR: a run that would start from random weights stops."""
    if cfg.random_student or cfg.resume:
        if cfg.random_student and not (cfg.resume or cfg.student_weights or cfg.finetune or cfg.stage == "both"):
            log.warning("--random-student: the RT-CO-DETR student starts from RANDOM WEIGHTS; the paper fine-tunes "
                        "COCO weights, and from scratch the mAP collapses")
        return
    if cfg.student == "rtdetrv2_r50" and not cfg.student_weights:
        raise ValueError("--recipe rt-co-detr fine-tunes a COCO-trained RT-DETRv2-R50vd, as the paper: pass "
                         "--student-weights DIR, a transformers directory of it (e.g. `huggingface-cli download "
                         "PekingU/rtdetr_v2_r50vd --local-dir DIR`), or --random-student to start from random "
                         "weights (the mAP collapses)")
    if cfg.student == "rtdetrv4" and not cfg.finetune:
        raise ValueError("--recipe rt-co-detr with --student rtdetrv4 starts from trained weights: pass --finetune "
                         "an RT-DETRv4 checkpoint (COCO), or --random-student to start from random weights")


def _lrs(r: Recipe) -> str:
    """The optimizer in words: the base lr and the groups whose lr differs from it."""
    groups = [f"{name} {lr:g}" for name, lr in (("backbone", r.backbone_lr), ("encoder", r.encoder_lr))
              if lr is not None and lr != r.lr]
    return f"AdamW lr {r.lr:g}" + (", " + ", ".join(groups) if groups else " (one group)")


def _schedule(r: Recipe) -> str:
    if r.schedule == "plateau":
        return f"plateau x{r.lr_gamma:g} after {r.plateau_patience} epochs without improvement"
    if r.schedule == "multistep":
        # build_schedule's default milestone: two thirds of the run
        return f"multistep x{r.lr_gamma:g} at epochs {list(r.milestones or (round(r.epochs * 2 / 3),))}"
    return f"flat-cosine, warm-up {r.warmup_iter} iterations"


def _batch(cfg, r: Recipe) -> str:
    if cfg.batch_size:
        return f"{cfg.batch_size} per process"
    if cfg.global_batch:
        return f"{cfg.global_batch} in total"
    return f"{r.batch_per_process} per GPU" if r.batch_per_process else f"{r.total_batch_size} in total"


def _settings(cfg, paper: Recipe, ours: Recipe) -> list[Setting]:
    """This stage's settings next to the paper's (``paper``: the paper's recipe over this run's epochs)."""
    init = ("RANDOM (--random-student)" if cfg.random_student and not cfg.student_weights and not cfg.finetune
            else "trained weights")
    rows = [Setting("student", cfg.student, PAPER_STUDENT, "--student",
                    "another detector than the paper's RT-DETR-L (RT-DETRv2-R50vd): not the model of Table I"),
            Setting("init", init, "trained weights", "--random-student",
                    "no COCO detector to distil into or fine-tune: the mAP collapses")]
    if cfg.stage != "finetune" and named_mode(cfg).teacher_outputs:
        rows += [
            Setting("pairing", cfg.pairing, "index", "--pairing",
                    "each student query learns from the teacher query that predicts the same object (Hungarian on "
                    "class and box costs) instead of the query with the same index, which has no correspondence "
                    "between the two models"),
            Setting("classes", "slice" if cfg.class_map == "slice" else "name" if cfg.class_map == "name" else "map",
                    "slice", "--class-map",
                    "teacher classes reach the student class of the same name / of your map instead of the student "
                    "class with the same column index (with a COCO teacher the first columns are unrelated classes)"),
            Setting("teacher input", str(cfg.teacher_input_size or "preprocessor's"), str(PAPER_TEACHER_SIZE),
                    "--teacher-input-size", "the teacher sees another size than the student's 640-px batch (its "
                    "preprocessor's: 800 px for Conditional-DETR, the size it was trained at)")]
    if cfg.stage != "finetune":
        weights = ", ".join(f"{k.removeprefix('lambda_')} {getattr(cfg, k) if getattr(cfg, k) is not None else v:g}"
                            for k, v in PAPER_WEIGHTS.items())
        rows.append(Setting("loss weights", weights, ", ".join(f"{k.removeprefix('lambda_')} {v:g}"
                                                                for k, v in PAPER_WEIGHTS.items()),
                            "--lambda-feat/-cls/-box, --temperature", "another balance of the distillation terms"))
        rows.append(Setting("labels", "unused" if not cfg.det_loss else "detection loss on", "unused",
                            "--stage joint", "one run with the distillation terms added to the detection loss "
                            "instead of distilling, then fine-tuning"))
    follows = {"kd_loss": "val distillation loss", "ap": "val AP"}
    rows.append(Setting("monitor", follows[ours.monitor], follows[paper.monitor], "--stage joint",
                        "the LR plateau, best.pth and early stopping follow the val AP"))
    rows += [
        Setting("optimizer", _lrs(ours), _lrs(paper), "--lr", "another step size (every group scales with it)"),
        Setting("weight decay", f"{ours.weight_decay:g}", f"{paper.weight_decay:g}", "--weight-decay",
                "another regularisation"),
        Setting("epochs", str(ours.epochs), str(PAPER_EPOCHS), "--epochs", "another training length (the schedule's "
                "epochs scale with it)"),
        Setting("batch", _batch(cfg, ours), _batch(replace(cfg, batch_size=None, global_batch=None), paper),
                "--batch-size / --global-batch",
                "another gradient noise and number of steps"),
        Setting("schedule", _schedule(ours), _schedule(paper), "--schedule", "another learning-rate curve"),
        Setting("early stop", f"{cfg.patience} epochs" if cfg.patience else "none",
                f"{paper.early_stop} epochs" if paper.early_stop else "none", "--patience",
                "stops at another epoch"),
        Setting("EMA", "on" if ours.ema else "off", "on" if paper.ema else "off", "--ema",
                "evaluates and keeps an average of the weights instead of the weights themselves"),
        Setting("augmentation", ours.augment, paper.augment, "--augment",
                "other training views (none: resize only; rtdetrv2: photometric, zoom-out, IoU crop, flip, "
                "multi-scale; rtdetrv4: plus Mosaic and MixUp phases)"),
        Setting("image size", str(cfg.img_size), str(PAPER_IMG_SIZE), "--img-size",
                "another input resolution: other features, boxes and AP")]
    return rows


# -- the parts of a run --------------------------------------------------------------------------
def build_student(cfg, num_classes: int, class_names) -> tuple[nn.Module, object]:
    """(detector, criterion) for ``--student``. A label-free stage keeps the label space of
    ``--student-weights`` (the authors distilled into the COCO head, which fine-tuning replaced)."""
    if cfg.student == "rtdetrv2_r50":
        from detector.rtdetrv2_student import RTDETRv2Criterion, build_rtdetrv2_student
        own = cfg.stage == "distill" and cfg.student_weights
        student = build_rtdetrv2_student(None if own else num_classes, weights=cfg.student_weights,
                                         class_names=class_names)
        return student, RTDETRv2Criterion(student.num_classes)
    if cfg.student != "rtdetrv4":
        raise ValueError(f"--student must be rtdetrv4 or rtdetrv2_r50, got {cfg.student!r}")
    if cfg.student_weights:
        raise ValueError("--student-weights is for --student rtdetrv2_r50; RT-DETRv4 starts from --finetune")
    # labels are checked on the loader's host batch in train_step: no per-step device sync
    return build_detector(cfg.size, num_classes=num_classes), Criterion(num_classes=num_classes, check_labels=False)


def student_channels(detector) -> tuple[int, ...]:
    """Widths of the student's three fused encoder maps (P3, P4, P5)."""
    return tuple(getattr(detector, "feature_channels", None) or (detector.cfg.hidden_dim,) * 3)


def _weights(cfg, **extra) -> dict:
    given = dict(feature_weight=cfg.lambda_feat, logit_weight=cfg.lambda_cls, box_weight=cfg.lambda_box,
                 temperature=cfg.temperature, **extra)
    return {k: v for k, v in given.items() if v is not None}


def build_codetr(cfg, detector, class_names, device) -> tuple[nn.Module, RTCODETRDistiller]:
    """(frozen detector teacher, distiller) for ``--distill codetr``; the class map is resolved
    against the student's own classes (its weights' in a label-free stage, else the data's)."""
    from teacher_cache.detector_teachers import build_detector_teacher

    if not cfg.teacher_checkpoint:
        raise ValueError("--distill codetr needs --teacher-checkpoint (a transformers detector directory such as a "
                         "microsoft/conditional-detr-resnet-50 snapshot, or a detector .pth)")
    # --teacher-input-size 0: the teacher preprocessor's size
    teacher = build_detector_teacher(cfg.teacher_checkpoint, input_size=cfg.teacher_input_size or None).to(device)
    class_names = getattr(detector, "class_names", None) or class_names
    columns = len(teacher.class_names) if teacher.class_names is not None else detector.num_classes
    class_map = resolve_class_map(cfg.class_map, teacher.class_names, class_names, columns)
    if class_map is not None:
        covered = sorted(set(class_map.values()))
        missing = [n for i, n in enumerate(class_names) if i not in set(covered)]
        log.info("RT-CO-DETR class map: %d teacher classes -> %d of %d student classes (%s); without a partner, "
                 "no KL: %s", len(class_map), len(covered), len(class_names), cfg.class_map or "name",
                 missing[:10] + (["..."] if len(missing) > 10 else []))
    distiller = RTCODETRDistiller(RTCODETRConfig(student_channels=student_channels(detector),
                                                 teacher_channels=teacher.channels, class_map=class_map,
                                                 pairing=cfg.pairing, **_weights(cfg)))
    return teacher, distiller


def build_feat(cfg, detector, device) -> tuple[nn.Module, RTCODETRDistiller]:
    """(frozen VFM teacher, feature projections) for ``--distill feat``."""
    from teacher_cache.feature_teachers import build_feature_teacher

    teacher = build_feature_teacher(cfg.vfm, cfg.weights).to(device)
    channels = student_channels(detector)
    distiller = RTCODETRDistiller(RTCODETRConfig(student_channels=tuple(channels[i] for i in teacher.levels),
                                                 teacher_channels=teacher.channels, **_weights(cfg)))
    log.info("feature distillation from %s: teacher widths %s onto student levels %s", cfg.vfm, teacher.channels,
             ["P3", "P4", "P5"][teacher.levels[0]:])
    return teacher, distiller


# -- the two stages as one command -----------------------------------------------------------------
def run_training(cfg) -> dict:
    """``jobs.train``: one run, or under ``--recipe rt-co-detr --stage both`` (the default with a
    teacher) the authors' two stages: distillation without labels into OUT/distill (its best student
    exported as the transformers directory OUT/distill/student), then fine-tuning of that student on
    the labels into OUT/finetune. OUT/stages.json reports both; ``--resume OUT`` continues where the
    pair stopped."""
    from pipeline.train.distributed import all_gather_objects, barrier, init_distributed
    from pipeline.train.outputs import increment_run_dir
    from pipeline.train.trainer import Trainer

    resolved, _ = resolve_preset(cfg)
    if resolved.stage != "both":
        return Trainer(cfg).fit()
    info = init_distributed(cfg.device)
    if cfg.resume:
        parent = Path(cfg.resume)
        if not (parent / "distill").is_dir():
            raise FileNotFoundError(f"--resume {cfg.resume}: not a two-stage run directory (no distill/ in it); "
                                    "resume one stage with --stage distill or finetune and --resume STAGE_DIR")
    else:
        parent = Path(all_gather_objects(str(increment_run_dir(cfg.out or Path("runs") / cfg.name, cfg.exist_ok))
                                         if info.is_main else None)[0])
    record_file = parent / "stages.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    base = replace(cfg, out=None, resume=None, exist_ok=True)
    distill_dir, finetune_dir = parent / "distill", parent / "finetune"
    if "distill" not in record:
        _distill_stage(replace(base, stage="distill", out=str(distill_dir), resume=_last(distill_dir, cfg)))
        record["distill"] = stage_report(distill_dir, "kd_loss")
        _write_record(record_file, record, info.is_main)
    init = (dict(student_weights=str(distill_dir / "student")) if resolved.student == "rtdetrv2_r50"
            else dict(finetune=str(distill_dir / "best.pth")))
    Trainer(replace(base, stage="finetune", out=str(finetune_dir), resume=_last(finetune_dir, cfg), **init)).fit()
    record["finetune"] = stage_report(finetune_dir, "AP")
    _write_record(record_file, record, info.is_main)
    barrier()
    d, f = record["distill"], record["finetune"]
    if info.is_main:
        log.info("RT-CO-DETR, two stages (%s):\n  distill   best val distillation loss %.5f (epoch %s of %s) -> %s\n"
                 "  finetune  best val AP %.4f, AP50 %.4f (epoch %s of %s) -> %s", record_file, d["kd_loss"],
                 d["best_epoch"], d["epochs"], d["out"], f["AP"], f.get("AP50", float("nan")), f["best_epoch"],
                 f["epochs"], f["out"])
    return dict(record, out=str(parent))


def _distill_stage(cfg) -> None:
    """Stage 1; an RT-DETRv2 student leaves its best weights as OUT/distill/student (stage 2's start)."""
    from pipeline.train.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.fit()
    if trainer.cfg.student == "rtdetrv2_r50":
        export_student(trainer, Path(cfg.out) / "student")


def _last(folder: Path, cfg) -> str | None:
    """The checkpoint a resumed two-stage run continues this stage from (None: the stage starts)."""
    last = folder / "last.pth"
    return str(last) if cfg.resume and last.is_file() else None


def _write_record(path: Path, record: dict, is_main: bool) -> None:
    if is_main:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(path)


def stage_report(folder: Path, metric: str) -> dict:
    """The best epoch of a finished stage from its eval.jsonl: the lowest ``kd_loss`` or highest ``AP``."""
    rows = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines() if line.strip()]
    pick = min if metric == "kd_loss" else max
    best = pick(rows, key=lambda r: r[metric])
    keep = ("kd_loss",) if metric == "kd_loss" else ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return dict(out=str(folder), epochs=len(rows), best_epoch=best["epoch"], **{k: best[k] for k in keep if k in best})


def export_student(trainer, folder: Path) -> Path:
    """The stage-1 RT-DETRv2 student (best.pth's weights, else the last ones) as a transformers
    directory: the fine-tuning stage's ``--student-weights``, as the authors' ``tuning:`` checkpoint."""
    from detector.checkpoint import read_checkpoint
    from pipeline.train.distributed import barrier

    student = trainer.ema.module
    best = trainer.out / "best.pth"
    if best.is_file():
        student.load_state_dict(read_checkpoint(best, "the distilled student")["ema"]["module"])
    if trainer.dist.is_main:
        student.model.save_pretrained(folder)
        log.info("distilled student (%s) -> %s", best if best.is_file() else "last weights", folder)
    barrier()
    return folder
