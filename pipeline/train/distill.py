"""Distillation modes as one table, each behind one small interface.

    none    detection loss only
    dsi     RT-DETRv4: DSI projector + alignment loss on the VFM teacher's grid (paper Eq. 3),
            weighted by GAM (paper Sec. 3.3; the released update rule, fixed: detector/gam.py)
    codetr  RT-CO-DETR: feature MSE, logit KL and box L1 from a detector teacher
    feat    RT-CO-DETR ablation: feature MSE from a VFM feature teacher (ConvNeXt / ViT)

``mode_of(cfg)`` is the one place that reads ``cfg.distill``; ``build_distillation`` the one
factory. The trainer holds a :class:`Distillation` and never asks which mode it is: a mode brings
its trainable modules (trained with the detector, in the optimizer and the checkpoint), the
student outputs it taps inside autocast, its weighted loss terms, its per-epoch update (GAM) and
its lines of the start-up summary.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from detector.checkpoint import load_checkpoint
from detector.dsi import DSI, DSIConfig
from detector.gam import GAM
from detector.rt_co_detr import EncoderTap
from pipeline.train.distributed import all_gather_floats

log = logging.getLogger("rtdetrv4.train")


@dataclass(frozen=True)
class Mode:
    name: str
    vfm_targets: bool        # every batch needs the VFM teacher's grid (a teacher store or the online teacher)
    detector_teacher: bool   # a teacher model (detector or feature teacher) runs on the batch itself
    teacher_outputs: bool    # the teacher's logits and boxes are targets too (query pairing, class map)

    @property
    def distils(self) -> bool:
        return self.name != "none"


MODES = {"none": Mode("none", vfm_targets=False, detector_teacher=False, teacher_outputs=False),
         "dsi": Mode("dsi", vfm_targets=True, detector_teacher=False, teacher_outputs=False),
         "codetr": Mode("codetr", vfm_targets=False, detector_teacher=True, teacher_outputs=True),
         "feat": Mode("feat", vfm_targets=False, detector_teacher=True, teacher_outputs=False)}


def mode_of(cfg) -> Mode:
    """The mode that runs: none in the fine-tuning stage of a two-stage RT-CO-DETR run (``--distill``
    then only names the teacher of the first stage), else ``--distill``."""
    name = "none" if getattr(cfg, "stage", None) == "finetune" else cfg.distill
    if name not in MODES:
        raise ValueError(f"--distill must be one of {', '.join(MODES)}, got {name!r}")
    return MODES[name]


def named_mode(cfg) -> Mode:
    """The mode ``--distill`` names, whatever the stage (the preset's checks)."""
    return mode_of(replace(cfg, stage=None)) if getattr(cfg, "stage", None) else mode_of(cfg)


class Student(nn.Module):
    """Detector + the mode's trainable modules (DSI projector, or RT-CO-DETR projections), wrapped
    together so DDP reduces both and GAM's total gradient mass includes the projector, as in the
    official model. ``tap`` (RT-CO-DETR) hands the fused encoder maps out through the forward."""

    def __init__(self, detector: nn.Module, dsi: DSI | None = None, codetr: nn.Module | None = None):
        super().__init__()
        self.detector = detector
        self.dsi = dsi
        self.codetr = codetr
        self.tap: EncoderTap | None = None

    def forward(self, images, targets=None):
        outputs = self.detector(images, targets)
        if self.tap is not None:   # the fused maps leave through the (DDP) forward, so a loss on them alone syncs
            outputs = {**outputs, "encoder_maps": self.tap.maps}
        return outputs


class Distillation:
    """No distillation; the base of the modes (every hook a no-op)."""

    def __init__(self, mode: Mode):
        self.mode = mode

    def student(self, detector: nn.Module) -> Student:
        return Student(detector)

    def optimizer_extra(self) -> dict[str, nn.Module] | None:
        """Training-only modules and the name their parameters are grouped under."""
        return None

    def finetune(self, detector: nn.Module, path: str) -> None:
        """``--finetune``: RT-DETRv4 weights into ``detector`` (class heads re-initialised on another class count)."""
        log.info("finetune from %s: %s", path, load_checkpoint(detector, path))

    def attach(self, student: Student) -> None:
        """Called once the EMA copy of the detector exists (a hook must not be copied into it)."""

    def student_outputs(self, outputs: dict) -> dict:
        """Extra student tensors, computed inside the step's autocast."""
        return {}

    def losses(self, images: torch.Tensor, targets: list[dict], batch, outputs: dict) -> dict:
        """The weighted distillation terms (fp32, outside autocast)."""
        return {}

    def log_values(self) -> dict:
        """What the mode adds to the per-step log."""
        return {}

    def after_backward(self, model: nn.Module) -> None:
        """After the gradients are unscaled and clipped, before the optimizer step (GAM's measurement)."""

    def end_epoch(self, epoch: int) -> dict | None:
        """The per-epoch update, identical on every rank; its record for eval.jsonl (None: none)."""
        return None

    def report_epoch(self, record: dict, writer, out) -> None:
        """Rank 0: log and plot the record of :meth:`end_epoch`."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def summary_lines(self, cfg, data, epoch: int) -> list[str]:
        return []

    def validation_loss(self, model, batches, device, amp_dtype) -> float:
        raise ValueError(f"--distill {self.mode.name} has no validation distillation loss to follow: "
                         "a label-free stage needs --distill codetr or feat")


class DSIDistillation(Distillation):
    """RT-DETRv4: ``loss_distill = lambda * L_align(project(F5), teacher grid)`` (paper Eq. 3) with
    lambda from GAM, updated once per epoch from the AIFI gradient share (``--no-gam``: static)."""

    def __init__(self, mode: Mode, dsi: DSI, gam: GAM, adaptive: bool, data):
        super().__init__(mode)
        self.dsi, self.gam, self.adaptive, self.data = dsi, gam, adaptive, data
        self.static_weight = gam.cfg.lambda0

    def student(self, detector: nn.Module) -> Student:
        return Student(detector, dsi=self.dsi)

    def optimizer_extra(self) -> dict[str, nn.Module]:
        return {"encoder.feature_projector": self.dsi}   # where the official model keeps the projector

    def finetune(self, detector: nn.Module, path: str) -> None:
        """As the base, and an official projector (hidden -> 768, ViT-B) is reused when this run's has its shape."""
        cfg = self.dsi.cfg
        fits = cfg.teacher_dim == 768 and cfg.projector == "linear" and cfg.tap == "aifi"
        log.info("finetune from %s: %s", path, load_checkpoint(detector, path, dsi=self.dsi if fits else None))

    def student_outputs(self, outputs: dict) -> dict:
        tap = self.dsi.cfg.tap
        return {"dsi_projected": self.dsi.project(self.dsi.student_map(outputs, outputs[f"{tap}_feature"]))}

    def losses(self, images, targets, batch, outputs) -> dict:
        device = images.device
        # the teacher's lazy start-up draws a precision probe: keep it out of the training stream,
        # or a resumed run (whose teacher starts at another step) draws other denoising noise
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            teacher_map = self.data.teacher_targets(images, targets, batch)
        return {"loss_distill": self.weight() * self.dsi.alignment_loss(outputs["dsi_projected"], teacher_map)}

    def weight(self) -> float:
        return self.gam.weight if self.adaptive else self.static_weight

    def log_values(self) -> dict:
        share = self.gam.last_share
        return {"distill_weight": self.weight(), **({} if share is None else {"aifi_grad_share": float(share)})}

    def after_backward(self, model) -> None:
        self.gam.measure(model)

    def end_epoch(self, epoch: int) -> dict | None:
        if not self.adaptive:
            return None
        record = self.gam.end_epoch(epoch)
        record["lambda_per_rank"] = all_gather_floats(self.gam.weight)
        return record

    def report_epoch(self, record: dict, writer, out) -> None:
        log.info("Epoch %d: avg AIFI grad %.3f%% | distill %.4f -> %.4f (%s)", record["epoch"], record["share"],
                 record["lambda_old"], record["lambda_new"], record["reason"])
        writer.add_scalar("gam/lambda", record["lambda_new"], record["epoch"])
        writer.add_scalar("gam/aifi_share", record["share"], record["epoch"])
        self.gam.plot(out / "gam.png")

    def state_dict(self) -> dict:
        return self.gam.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.gam.load_state_dict(state)

    def summary_lines(self, cfg, data, epoch: int) -> list[str]:
        store = data.store
        stored = store.manifest["teacher"] if store is not None else None
        source = stored.get("weights_source", "random-init") if stored else (cfg.weights or "random-init")
        precision = (stored["protocol"]["precision"] if stored else
                     data.teacher.precision if data.teacher is not None else cfg.teacher_precision)
        lines = [f"teacher   {cfg.vfm} ({precision}), weights: "
                 + ("RANDOM INIT (features meaningless)" if source == "random-init" else source),
                 f"cache     {cfg.cache}: {store.coverage(epoch)}; hit rate in the bar" if store is not None
                 else "cache     none: every view goes through the online teacher"]
        if source == "random-init":
            log.warning("the DSI teacher %s is RANDOMLY INITIALISED (no --weights, or a cache built without them): "
                        "distillation targets are meaningless; use only to try the pipeline out", cfg.vfm)
        return lines


class DetectorDistillation(Distillation):
    """RT-CO-DETR: a frozen teacher on the batch itself; ``codetr`` (a detector teacher): feature
    MSE + temperature KL on paired logits + L1 on paired boxes; ``feat`` (a VFM feature teacher):
    feature MSE alone. The student's fused encoder maps come out of its forward (``EncoderTap``)."""

    def __init__(self, mode: Mode, distiller: nn.Module, teacher: nn.Module, teacher_text: str):
        super().__init__(mode)
        self.distiller, self.teacher, self.teacher_text = distiller, teacher, teacher_text

    def student(self, detector: nn.Module) -> Student:
        return Student(detector, codetr=self.distiller)

    def optimizer_extra(self) -> dict[str, nn.Module]:
        return {"codetr": self.distiller}

    def attach(self, student: Student) -> None:
        student.tap = EncoderTap(student.detector)

    def losses(self, images, targets, batch, outputs) -> dict:
        return self.terms(images, outputs, outputs["encoder_maps"])

    def terms(self, images, outputs: dict, student_maps) -> dict:
        """The weighted terms of one batch (teacher in fp32, no grad, outside autocast)."""
        s_maps = [m.float() for m in student_maps]
        if not self.mode.teacher_outputs:   # feat: the feature term on the teacher's levels
            t_maps = self.teacher(images)
            s_maps = [s_maps[i] for i in self.teacher.levels]
            return {"loss_kd_feat": self.distiller.cfg.feature_weight * self.distiller.feature_loss(s_maps, t_maps)}
        t_out, t_maps = self.teacher(images)
        return self.distiller(outputs, t_out, s_maps, t_maps)

    @torch.no_grad()
    def validation_loss(self, model, batches, device, amp_dtype) -> float:
        """Mean weighted distillation loss of ``model`` (eval mode) over the validation ``batches``: what
        the authors' label-free stages followed for ReduceLROnPlateau, the best checkpoint and early stopping."""
        from pipeline.train.distributed import reduce_mean

        tap = EncoderTap(model)
        total, count = 0.0, 0
        try:
            for images, _ in batches:
                images = images.to(device)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    outputs = model(images)
                outputs = {k: v.float() for k, v in outputs.items() if torch.is_tensor(v)}
                total += float(sum(self.terms(images, outputs, tap.maps).values()))
                count += 1
        finally:
            tap.remove()
        return reduce_mean({"kd_loss": torch.tensor(total / max(count, 1), device=device)})["kd_loss"]

    def summary_lines(self, cfg, data, epoch: int) -> list[str]:
        return [f"teacher   {self.mode.name}: {self.teacher_text}"]


def build_distillation(cfg, recipe, detector: nn.Module, data, device: torch.device) -> Distillation:
    """The mode's :class:`Distillation` for ``detector`` (the one factory of the table)."""
    mode = mode_of(cfg)
    return _BUILDERS[mode.name](mode, cfg, recipe, detector, data, device)


def _none(mode, cfg, recipe, detector, data, device) -> Distillation:
    return Distillation(mode)


def _dsi(mode, cfg, recipe, detector, data, device) -> Distillation:
    if cfg.student != "rtdetrv4":
        raise ValueError("--distill dsi (DSI + GAM) is for the RT-DETRv4 student; use codetr, feat or none")
    width = detector.cfg.backbone_channels[-1] if cfg.dsi_tap == "backbone" else detector.cfg.hidden_dim
    dsi = DSI(DSIConfig(student_dim=width, teacher_dim=data.teacher_dim, projector=cfg.dsi_projector,
                        loss=cfg.dsi_loss, tap=cfg.dsi_tap))
    gam_cfg = replace(recipe.gam, lambda0=cfg.distill_weight or recipe.gam.lambda0, rule=cfg.gam_rule)
    return DSIDistillation(mode, dsi, GAM(gam_cfg, aifi_prefix="detector.encoder.encoder."), cfg.gam, data)


def _detector_kd(mode, cfg, recipe, detector, data, device) -> Distillation:
    from pipeline.train.rt_co_detr import build_codetr, build_feat

    if mode.teacher_outputs:
        teacher, distiller = build_codetr(cfg, detector, data.class_names, device)
        return DetectorDistillation(mode, distiller, teacher, cfg.teacher_checkpoint)
    teacher, distiller = build_feat(cfg, detector, device)
    return DetectorDistillation(mode, distiller, teacher, f"{cfg.vfm}, weights {cfg.weights or 'RANDOM INIT'}")


_BUILDERS = {"none": _none, "dsi": _dsi, "codetr": _detector_kd, "feat": _detector_kd}
