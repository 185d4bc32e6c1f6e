"""The RT-CO-DETR paper's student, RT-DETR-L (the authors' repository: RT-DETRv2 with a
ResNet-50vd backbone, 40.92 M parameters / 136.06 GFLOPs as they report it), built from
transformers' ``RTDetrV2ForObjectDetection`` behind our detector's interface:

    student = build_rtdetrv2_student(num_classes=60)           # random init (or weights=DIR)
    out = student(images, targets)       # training: pred_logits/pred_boxes of the final layer with
                                         # the denoising queries split off, dn_meta, hf_losses
    losses = RTDETRv2Criterion()(out, targets)   # its own criterion (VFL + L1 + GIoU, aux, dn, enc)
    student.eval(); student(images)      # {"pred_logits", "pred_boxes"} for our PostProcessor

``images`` are our [0,1] batch (RT-DETR's processor only rescales, it does not normalise);
``targets`` our dicts (``labels`` 0..C-1, ``boxes`` normalised cxcywh). ``student.encoder`` is the
hybrid encoder, whose three fused maps :class:`detector.rt_co_detr.EncoderTap` captures.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PAPER_PARAMS_M = 40.92
PAPER_GFLOPS = 136.06


def _hf_labels(targets) -> list[dict[str, Tensor]]:
    return [{"class_labels": t["labels"].long(), "boxes": t["boxes"].float()} for t in targets]


class RTDETRv2Student(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config = model.config
        self.cfg = SimpleNamespace(hidden_dim=config.encoder_hidden_dim, num_classes=config.num_labels,
                                   num_queries=config.num_queries, name="rtdetrv2_r50")
        self.deployed = False

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    @property
    def class_names(self) -> list[str]:
        """Its classes in logit order (``id2label``): the data's, or a COCO snapshot's own 80."""
        config = self.model.config
        return [str(config.id2label.get(i, i)) for i in range(config.num_labels)]

    @property
    def encoder(self) -> nn.Module:
        return self.model.model.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.decoder

    @property
    def denoising_class_embed(self) -> nn.Module:
        """transformers keeps it on the model, not the decoder (ours: ``decoder.denoising_class_embed``)."""
        return self.model.model.denoising_class_embed

    @property
    def feature_channels(self) -> tuple[int, ...]:
        return (self.model.config.encoder_hidden_dim,) * len(self.model.config.encoder_in_channels)

    def forward(self, images: Tensor, targets=None) -> dict:
        labels = _hf_labels(targets) if self.training and targets is not None else None
        out = self.model(pixel_values=images, labels=labels)
        logits, boxes = out.logits, out.pred_boxes
        if not self.training:
            return {"pred_logits": logits, "pred_boxes": boxes}
        result = {}
        dn_meta = out.denoising_meta_values
        if dn_meta is not None:   # the first dn_num_split[0] queries are denoising groups
            n_dn = dn_meta["dn_num_split"][0]
            result["dn_pred_logits"], logits = logits[:, :n_dn], logits[:, n_dn:]
            result["dn_pred_boxes"], boxes = boxes[:, :n_dn], boxes[:, n_dn:]
            result["dn_meta"] = dn_meta
        result.update(pred_logits=logits, pred_boxes=boxes)
        if out.loss_dict is not None:
            result["hf_losses"] = dict(out.loss_dict)
        return result

    def deploy(self) -> "RTDETRv2Student":
        self.eval()
        self.deployed = True
        return self


class RTDETRv2Criterion:
    """The student's own loss terms (transformers' ``RTDetrLoss``, already weighted; their sum is
    its ``loss``), read from the training outputs: the labels went in with the forward because
    RT-DETR builds its denoising queries from them."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, outputs: dict, targets) -> dict[str, Tensor]:
        if "hf_losses" not in outputs:
            raise ValueError("RT-DETRv2 outputs carry no loss: call the student in training mode with targets")
        return {k: v.float() for k, v in outputs["hf_losses"].items()}


def rtdetrv2_config(num_classes: int = 80, class_names=None, **overrides):
    """transformers' RT-DETRv2 default configuration, which is the R50vd model (``rtdetr_v2_r50vd``)."""
    from transformers import RTDetrV2Config

    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    return RTDetrV2Config(num_labels=num_classes, id2label=dict(enumerate(names)),
                          label2id={n: i for i, n in enumerate(names)}, **overrides)


def build_rtdetrv2_student(num_classes: int | None = 80, weights: str | Path | None = None, class_names=None,
                           **overrides) -> RTDETRv2Student:
    """RT-DETRv2-R50vd: random init (seeded by the caller), or local ``weights`` (a transformers
    directory, e.g. a PekingU/rtdetr_v2_r50vd snapshot) whose class head is re-initialised when its
    number of classes differs; ``num_classes=None`` keeps the label space of ``weights`` (the
    RT-CO-DETR authors' label-free distillation stage trained the COCO head as it was). Never reads
    the network."""
    from transformers import RTDetrV2ForObjectDetection

    if num_classes is None and weights is not None:
        if not Path(weights, "config.json").is_file():
            raise ValueError(f"--student-weights {weights}: expected a transformers directory with config.json")
        log.info("RT-DETRv2 student from %s, with its own classes", weights)
        return RTDETRv2Student(RTDetrV2ForObjectDetection.from_pretrained(weights, local_files_only=True, **overrides))
    config = rtdetrv2_config(num_classes or 80, class_names, **overrides)
    if weights is None:
        warnings.warn("RT-DETRv2-R50vd student is RANDOMLY INITIALISED (no --student-weights): the paper starts "
                      "from COCO weights; expect far lower AP", stacklevel=2)
        return RTDETRv2Student(RTDetrV2ForObjectDetection(config))
    if not Path(weights, "config.json").is_file():
        raise ValueError(f"--student-weights {weights}: expected a transformers directory with config.json")
    model = RTDetrV2ForObjectDetection.from_pretrained(weights, local_files_only=True, num_labels=num_classes,
                                                       id2label=config.id2label, label2id=config.label2id,
                                                       ignore_mismatched_sizes=True, **overrides)
    log.info("RT-DETRv2 student from %s", weights)
    return RTDETRv2Student(model)


def load_rtdetrv2_student(path: str | Path, num_classes: int) -> RTDETRv2Student:
    """The student from a ``jobs.train --student rtdetrv2_r50`` checkpoint (EMA weights preferred,
    as for our detector) or from a transformers directory."""
    if Path(path).is_dir():
        return build_rtdetrv2_student(num_classes, weights=path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = (ckpt.get("ema") or {}).get("module") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not state or not any(k.startswith("model.") for k in state):
        raise ValueError(f"{path} is not a --student rtdetrv2_r50 training checkpoint (no model.* weights)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the weights are loaded right below
        student = build_rtdetrv2_student(num_classes)
    student.load_state_dict(state)
    return student
