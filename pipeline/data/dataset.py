"""Detection datasets: one in-memory form for COCO and YOLO data, decoded to the official sample form.

A dataset item is ``(image, target)``: ``tv_tensors.Image`` uint8 [3,H,W] and a dict with ``boxes``
(``tv_tensors.BoundingBoxes`` XYXY, absolute pixels), ``labels`` (int64, contiguous 0..C-1),
``image_id`` (int64), ``orig_size`` (int64 (w, h)), ``area`` and ``key`` (stable sample key). This is
what the official ``CocoDetection`` + ``ConvertCocoPolysToMask`` produce with
``remap_mscoco_category`` (crowd boxes dropped, boxes clamped, degenerate boxes removed).

Parsing lives in :mod:`pipeline.data.coco` and :mod:`pipeline.data.yolo`; :func:`load_dataset` picks one.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """Bad input data. The message names the file (and line) and how to fix it."""


@dataclass
class BadSampleReport:
    """Problems found in the input, each with its file and line (0 when not line-specific)."""

    problems: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, path, line: int, reason: str) -> None:
        self.problems.append((str(path), int(line), reason))

    def __len__(self) -> int:
        return len(self.problems)

    def summary(self, limit: int = 10) -> str:
        files = {p for p, _, _ in self.problems}
        lines = [f"{len(self.problems)} problem(s) in {len(files)} file(s):"]
        for path, line, reason in self.problems[:limit]:
            lines.append(f"  {path}:{line}: {reason}" if line else f"  {path}: {reason}")
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


@dataclass
class Sample:
    """One image and its (already validated) annotations, boxes XYXY in absolute pixels."""

    key: str
    path: Path
    width: int
    height: int
    image_id: int
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N]
    area: np.ndarray  # float32 [N]
    file_size: int = 0


def finish_loading(report: BadSampleReport, on_error: str, source, fix: str) -> None:
    """Raise on problems (default) or log the skip-and-count summary (``on_error="skip"``)."""
    if not report:
        return
    if on_error == "raise":
        raise DatasetError(f"{source}: {report.summary()}\nFix: {fix}, or pass --on-error skip (Python: "
                           "on_error='skip') to skip these samples and count them.")
    log.warning("%s: skipped bad samples; %s", source, report.summary())
    print(f"[pipeline.data.dataset] {source}: skipped {len(report)} bad sample(s):\n{report.summary()}")


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def read_json(path: Path) -> dict:
    """Parse a json file; a syntax error names the file, line and column."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror}). Fix: check the path.") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}). Fix: repair the file at that "
                           f"spot (`python -m json.tool {path}` shows it) or re-export the annotations.") from e


def clamp_and_filter(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clamp XYXY boxes to the image in place; return the keep mask of non-degenerate boxes (official)."""
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def decode(data: bytes, annotation: dict, source: str = "<bytes>"):
    """Decode encoded image bytes + a :meth:`DetectionDataset.annotation` dict into ``(image, target)``.

    ``decode(*dataset.raw(i))`` equals ``dataset[i]``; streamed shards use it to yield the same samples.
    """
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates io in favour of torchcodec (not installed)
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError/ValueError with libjpeg's message
        raise DatasetError(f"{source}: cannot decode image ({e}). Fix: replace or re-encode the file, or drop "
                           "it with --on-error skip (Python: load_dataset(..., verify_images=True, "
                           "on_error='skip')).") from e
    h, w = image.shape[-2:]
    if (w, h) != (annotation["width"], annotation["height"]):
        raise DatasetError(f"{source}: image is {w}x{h} but its annotation says {annotation['width']}x"
                           f"{annotation['height']}. Fix: correct width/height in the annotation file (boxes "
                           "are in the annotated frame) or re-export the dataset.")
    boxes = torch.as_tensor(annotation["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(annotation["labels"], dtype=torch.int64).reshape(-1)
    area = annotation.get("area")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) if area is None else \
        torch.as_tensor(area, dtype=torch.float32).reshape(-1)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": labels,
        "area": area,
        "image_id": torch.tensor(annotation["image_id"], dtype=torch.int64),
        "orig_size": torch.tensor([w, h], dtype=torch.int64),
        "key": annotation["key"],
    }
    return tv_tensors.Image(image), target


class DetectionDataset(torch.utils.data.Dataset):
    """Map-style detection dataset over validated :class:`Sample` records (COCO or YOLO source)."""

    def __init__(self, samples: list[Sample], class_names: list[str], label_to_category_id: list[int],
                 root: Path, source: str, stats: dict | None = None, bad_samples: BadSampleReport | None = None,
                 coco_json: Path | None = None):
        keys = [s.key for s in samples]
        if len(set(keys)) != len(keys):
            dup = next(k for k, n in Counter(keys).items() if n > 1)
            raise DatasetError(f"{source}: two images share the sample key {dup!r} (same path without extension). "
                               "Fix: rename one; keys identify samples in shards and the teacher cache.")
        self.samples = samples
        self.class_names = list(class_names)
        self.label_to_category_id = [int(c) for c in label_to_category_id]
        self.category_id_to_label = {c: i for i, c in enumerate(self.label_to_category_id)}
        self.root = Path(root)
        self.source = source
        self.stats = dict(stats or {})
        self.stats.update(images=len(samples), boxes=int(sum(len(s.labels) for s in samples)))
        self.bad_samples = bad_samples or BadSampleReport()
        self._coco_json = coco_json
        self._coco = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"DetectionDataset({self.source!r}, images={len(self)}, boxes={self.stats['boxes']}, "
                f"classes={self.num_classes})")

    def key(self, i: int) -> str:
        return self.samples[i].key

    def image_path(self, i: int) -> Path:
        return self.samples[i].path

    def annotation(self, i: int) -> dict:
        """JSON-serialisable annotations of sample ``i`` (no image decode)."""
        s = self.samples[i]
        return {"key": s.key, "image_id": s.image_id, "width": s.width, "height": s.height,
                "boxes": s.boxes.tolist(), "labels": s.labels.tolist(), "area": s.area.tolist()}

    def raw(self, i: int) -> tuple[bytes, dict]:
        """(encoded image file bytes, :meth:`annotation`), for writing shards."""
        path = self.image_path(i)
        try:
            return path.read_bytes(), self.annotation(i)
        except OSError as e:
            raise DatasetError(f"{path}: cannot read image ({e.strerror}). Fix: restore the file or drop it "
                               "with --on-error skip (Python: load_dataset(..., on_error='skip')).") from e

    def __getitem__(self, i: int):
        data, annotation = self.raw(i)
        return decode(data, annotation, source=str(self.image_path(i)))

    def content_hash(self) -> str:
        """sha256 over class names, keys, sizes, annotations and file sizes (not pixel bytes: it is quick)."""
        h = hashlib.sha256(json.dumps([self.class_names, self.label_to_category_id]).encode())
        for s in self.samples:
            h.update(f"{s.key}|{s.image_id}|{s.width}|{s.height}|{s.file_size}|".encode())
            h.update(np.ascontiguousarray(s.boxes, dtype="<f4").tobytes())
            h.update(np.ascontiguousarray(s.labels, dtype="<i8").tobytes())
        return h.hexdigest()

    def verify_images(self, on_error: str = "raise") -> "DetectionDataset":
        """Decode every image once; raise on the first bad ones, or drop and count them (``on_error="skip"``)."""
        check_on_error(on_error)
        report, keep = BadSampleReport(), []
        for i, s in enumerate(self.samples):
            try:
                self[i]
                keep.append(s)
            except DatasetError as e:
                report.add(s.path, 0, str(e).split(": ", 1)[-1].split(". Fix:")[0])
        finish_loading(report, on_error, self.source, "replace or re-encode the listed images")
        self.samples = keep
        self.bad_samples.problems.extend(report.problems)
        self.stats.update(images=len(keep), boxes=int(sum(len(s.labels) for s in keep)))
        return self

    def to_coco(self, out_json=None) -> dict:
        """This dataset as a COCO dict (original category ids, xywh boxes); written to ``out_json`` if given."""
        images, annotations = [], []
        for s in self.samples:
            images.append({"id": s.image_id, "file_name": s.path.relative_to(self.root).as_posix(),
                           "width": s.width, "height": s.height})
            for box, label, area in zip(s.boxes.tolist(), s.labels.tolist(), s.area.tolist()):
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": s.image_id,
                                    "category_id": self.label_to_category_id[label],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0})
        categories = [{"id": c, "name": n} for c, n in zip(self.label_to_category_id, self.class_names)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        if out_json is not None:
            Path(out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(out_json).write_text(json.dumps(coco))
        return coco

    @property
    def coco(self):
        """pycocotools ``COCO`` ground truth for evaluation.

        For a COCO source this is the original file (crowd annotations included, as COCOeval expects);
        restrict evaluation to ``[s.image_id for s in dataset.samples]`` when samples were skipped.
        """
        if self._coco is None:
            from pycocotools.coco import COCO
            coco = COCO()
            with contextlib.redirect_stdout(io.StringIO()):
                coco.dataset = read_json(self._coco_json) if self._coco_json else self.to_coco()
                coco.createIndex()
            self._coco = coco
        return self._coco
