"""Frozen detector teachers for RT-CO-DETR: ``teacher(images) -> (outputs, [C3, C4, C5])``.

Two sources, one interface:
  * a transformers object-detection directory (``config.json`` + weights, as ``save_pretrained``
    writes it or a hub snapshot): Conditional-DETR (the paper's teacher,
    ``microsoft/conditional-detr-resnet-50``) and any DETR-family model whose outputs are
    ``logits`` / ``pred_boxes`` (DETR, Deformable-DETR, RT-DETR, RT-DETRv2);
  * one of our / the official RT-DETRv4 checkpoints (its fused encoder maps are the features).

The transformers adapter feeds the teacher what it was trained on: our [0,1] batch normalised
with its processor's mean/std (ImageNet for the DETRs; none for RT-DETR, whose processor only
rescales) at its processor's input size (or ``input_size``, 640 as the authors did). Its
backbone's stride-8/16/32 maps (ResNet-50: C3/C4/C5, 512/1024/2048 channels) are captured with a
forward hook during the one forward pass. It runs in fp32, without gradients, outside autocast.
Files are read from the directory only, never from the network; a directory without weights
gives a randomly initialised teacher and a loud warning (demos and tests only).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from teacher_cache.teachers import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
FEATURE_STRIDES = (8, 16, 32)


def is_transformers_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _processor_protocol(path: Path) -> tuple[tuple[int, int] | dict | None, tuple | None, tuple | None]:
    """(size, mean, std) from ``preprocessor_config.json``; mean/std None when it does not normalise."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return None, IMAGENET_MEAN, IMAGENET_STD
    cfg = json.loads(file.read_text())
    size = cfg.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        size = (int(size["height"]), int(size["width"]))
    if not cfg.get("do_normalize", True):
        return size, None, None
    return size, tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD))


def load_transformers_detector(path) -> tuple[nn.Module, str]:
    """(model in eval mode, weights source) from a local directory; never touches the network."""
    from transformers import AutoConfig, AutoModelForObjectDetection

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--teacher-checkpoint {path}: config.json is not a transformers model config ({e}). "
                         "Fix: pass a directory written by save_pretrained or a downloaded hub snapshot") from e
    if hasattr(config, "use_pretrained_backbone"):
        config.use_pretrained_backbone = False   # the detector's own weights hold the backbone
    weights = next((f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        warnings.warn(f"detector teacher {path} has no weights ({' / '.join(WEIGHT_FILES[::2])}): it is "
                      "RANDOMLY INITIALISED. Its predictions are meaningless for distillation; use only for "
                      "demos and tests.", stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForObjectDetection.from_config(config)
        return model.eval(), "random-init"
    model = AutoModelForObjectDetection.from_pretrained(path, config=config, local_files_only=True)
    return model.eval(), weights


def _find_backbone(model: nn.Module) -> nn.Module:
    """The backbone network inside a DETR-family model (``*ConvEncoder.model``)."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("ConvEncoder") and isinstance(getattr(module, "model", None), nn.Module):
            return module.model
    raise ValueError(f"{type(model).__name__} has no *ConvEncoder backbone: not a DETR-family detector "
                     "(DETR, Conditional-DETR, Deformable-DETR, RT-DETR)")


def _feature_maps(output) -> list[Tensor]:
    if hasattr(output, "feature_maps"):
        output = output.feature_maps
    elif isinstance(output, dict):
        output = list(output.values())
    return [m for m in output if torch.is_tensor(m) and m.ndim == 4]


class BackboneTap:
    """Keeps the stride-8/16/32 maps of each backbone forward (a hook, so no second pass)."""

    def __init__(self, backbone: nn.Module):
        self.maps: list[Tensor] | None = None
        self.calls = 0
        self._handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        height = args[0].shape[-2]
        by_stride = {round(height / m.shape[-2]): m for m in _feature_maps(output)}
        missing = [s for s in FEATURE_STRIDES if s not in by_stride]
        if missing:
            raise ValueError(f"the teacher backbone returns strides {sorted(by_stride)}, not {missing}: configure "
                             "it to output C3-C5 (e.g. backbone out_indices covering stages 2-4)")
        self.maps = [by_stride[s] for s in FEATURE_STRIDES]

    def remove(self) -> None:
        self._handle.remove()


class TransformersDetectorTeacher(nn.Module):
    """A transformers DETR-family detector as an RT-CO-DETR teacher.

    ``forward(images [B,3,H,W] in [0,1]) -> ({"pred_logits", "pred_boxes"}, [C3, C4, C5])``;
    ``class_names[i]`` names logit column i (``id2label``; DETR's extra no-object column is the
    last one and has no name), ``channels`` the C3-C5 widths."""

    def __init__(self, model: nn.Module, size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 source: str = "random-init"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size, self.source = size, source
        self.normalise = mean is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0,) * 3).view(1, 3, 1, 1), persistent=False)
        config = model.config
        self.class_names = [str(config.id2label.get(i, "")) for i in range(config.num_labels)]
        self.backbone = _find_backbone(model)
        self.tap = BackboneTap(self.backbone)
        with torch.no_grad():
            self.backbone(torch.zeros(1, 3, 64, 64))
        self.channels = tuple(m.shape[1] for m in self.tap.maps)
        self.tap.calls, self.tap.maps = 0, None

    def train(self, mode: bool = True) -> "TransformersDetectorTeacher":
        return super().train(False)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The size the teacher sees: an explicit (h, w), or its processor's shortest/longest-edge rule."""
        size = self.size
        if size is None:
            return h, w
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)):
            return int(size[0]), int(size[1])
        short, long = size.get("shortest_edge"), size.get("longest_edge")
        scale = short / min(h, w) if short else 1.0
        if long and max(h, w) * scale > long:
            scale = long / max(h, w)
        return round(h * scale), round(w * scale)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        with torch.autocast(images.device.type, enabled=False):
            x = images.float()
            size = self.input_size(*x.shape[-2:])
            if size != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            if self.normalise:
                x = (x - self.mean) / self.std
            out = self.model(pixel_values=x)
            maps = self.tap.maps
        return {"pred_logits": out.logits.float(), "pred_boxes": out.pred_boxes.float()}, [m.float() for m in maps]


class CheckpointDetectorTeacher(nn.Module):
    """One of our / the official RT-DETRv4 checkpoints as teacher: its fused encoder maps
    (captured by :class:`detector.rt_co_detr.EncoderTap`) are the features."""

    def __init__(self, path):
        super().__init__()
        from detector.checkpoint import detector_from_checkpoint
        from detector.rt_co_detr import EncoderTap

        self.model = detector_from_checkpoint(path).eval().requires_grad_(False)
        self.tap = EncoderTap(self.model)
        self.channels = (self.model.cfg.hidden_dim,) * 3
        self.class_names: list[str] | None = None
        self.source = str(path)

    def train(self, mode: bool = True) -> "CheckpointDetectorTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        with torch.autocast(images.device.type, enabled=False):
            out = self.model(images.float())
        return {k: out[k].float() for k in ("pred_logits", "pred_boxes")}, [m.float() for m in self.tap.maps]


def build_detector_teacher(path, input_size: int | None = None) -> nn.Module:
    """The teacher behind ``--teacher-checkpoint``: a transformers directory or a .pth checkpoint.
    ``input_size`` (e.g. 640, the authors' setting) overrides the processor's input size."""
    if not os.path.exists(path):
        raise ValueError(f"--teacher-checkpoint {path}: no such file or directory")
    if not is_transformers_dir(path):
        if Path(path).is_dir():
            raise ValueError(f"--teacher-checkpoint {path} is a directory without config.json: pass a transformers "
                             "model directory (save_pretrained output) or a detector .pth checkpoint")
        return CheckpointDetectorTeacher(path)
    model, source = load_transformers_detector(path)
    size, mean, std = _processor_protocol(Path(path))
    teacher = TransformersDetectorTeacher(model, input_size or size, mean, std, source)
    log.info("detector teacher %s (%s, weights %s): input %s, %s, features %s", path, type(model).__name__, source,
             teacher.size or "as the batch", "ImageNet-normalised" if teacher.normalise else "not normalised",
             teacher.channels)
    return teacher
