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
import struct
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# what torchvision.io.decode_image reads (JPEG, PNG, GIF, WebP, AVIF/HEIC); anything else (BMP, TIFF) goes to PIL
TORCHVISION_MAGIC = (b"\xff\xd8\xff", PNG_SIGNATURE, b"GIF8")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}   # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


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
    skip = "or pass --on-error skip (Python: on_error='skip') to skip these samples and count them."
    if on_error == "raise" and len(report) == 1:   # one problem: one line
        path, line, reason = report.problems[0]
        raise DatasetError(f"{path}{f':{line}' if line else ''}: {reason} (in {source}). Fix: {fix}, {skip}")
    if on_error == "raise":
        raise DatasetError(f"{source}: {report.summary()}\nFix: {fix}, {skip}")
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
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a text (JSON) file (byte {e.start} is not UTF-8). Fix: pass the COCO "
                           "annotation json, a YOLO directory (with data.yaml) or a COCO directory.") from e
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


def png_problem(data: bytes) -> str | None:
    """Why a PNG holds less pixel data than its header promises (None when it holds all of it).

    On such a file (a truncated download whose zlib stream still ends cleanly) torchvision's libpng
    decoder crashes the process with a segmentation fault and PIL fills the missing rows with black
    without a word, so the IDAT stream is inflated once (bytes counted, not kept) and measured
    against the rows and filter bytes that the IHDR width, height, bit depth, colour type and
    interlacing call for (PNG spec, sections 7 and 8).
    """
    pos, header, stream = len(PNG_SIGNATURE), None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = data[pos + 8:pos + 8 + length]
        elif kind == b"IDAT":
            stream.append(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or len(header) < 13:
        return "no PNG header (IHDR chunk)"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header[:13])
    if color not in _PNG_CHANNELS:
        return f"unknown PNG colour type {color}"
    bits = depth * _PNG_CHANNELS[color]
    want = 0
    for x0, y0, dx, dy in (_ADAM7 if interlace else ((0, 0, 1, 1),)):
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            want += h * (1 + (w * bits + 7) // 8)   # one filter byte per row
    inflate, got, rest = zlib.decompressobj(), 0, b"".join(stream)
    try:
        while rest and got < want:
            got += len(inflate.decompress(rest, 1 << 22))
            rest = inflate.unconsumed_tail
    except zlib.error as e:
        return f"its pixel data is damaged ({e})"
    if got < want:
        return (f"holds {got:,} of the {want:,} bytes of pixel data its {width}x{height} header promises "
                "(a truncated download or a damaged file)")
    return None


def decode_rgb(data: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W] RGB: the one image decoder of every job.

    JPEG, PNG, GIF and WebP go through torchvision (libjpeg-turbo, libpng; PNGs are first checked by
    :func:`png_problem`, since a short one crashes libpng), other formats (BMP, TIFF) through PIL.
    16-bit images are scaled to 8 bits here, once (``to_dtype(..., scale=True)``: the high byte), so
    every job sees [0, 255]. A file that cannot be decoded raises :class:`DatasetError` naming ``source``.
    """
    fix = ("Fix: replace or re-encode the file, or leave it out with --on-error skip (Python: "
           "load_dataset(..., on_error='skip', verify_images=True)).")
    if data.startswith(PNG_SIGNATURE):
        problem = png_problem(data)
        if problem:
            raise DatasetError(f"{source}: cannot decode image: the PNG {problem}. {fix}")
    try:
        if data.startswith(TORCHVISION_MAGIC) or data[8:12] in (b"WEBP", b"avif", b"heic"):
            with warnings.catch_warnings():  # torchvision 0.29 deprecates io in favour of torchcodec (not installed)
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            image = _decode_pil(data)
    except Exception as e:  # torchvision raises RuntimeError/ValueError with libjpeg's message, PIL OSError
        raise DatasetError(f"{source}: cannot decode image ({type(e).__name__}: {str(e).strip()[:200]}). "
                           f"{fix}") from e
    return to_dtype(image, torch.uint8, scale=True) if image.dtype != torch.uint8 else image


def _decode_pil(data: bytes) -> torch.Tensor:
    """BMP, TIFF, ... through PIL: uint8 [3, H, W], or uint16 for 16-bit images (scaled by the caller)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode.startswith("I;16") or im.mode == "I":   # 16-bit grey (PIL reads 16-bit TIFF/PNG as these)
            grey = torch.from_numpy(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
            return grey.expand(3, *grey.shape).contiguous()
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def decode(data: bytes, annotation: dict, source: str = "<bytes>"):
    """Decode encoded image bytes + a :meth:`DetectionDataset.annotation` dict into ``(image, target)``.

    ``decode(*dataset.raw(i))`` equals ``dataset[i]``; streamed shards use it to yield the same samples.
    """
    image = decode_rgb(data, source)
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
        self.skipped: list[str] = []   # keys of the samples verify_images / without dropped
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
        """Decode every image once; raise on the first bad ones, or drop and count them (``on_error="skip"``).

        The keys dropped are kept in ``skipped``: ``without(skipped)`` repeats the drop elsewhere (the
        cache job's workers) without decoding again."""
        check_on_error(on_error)
        report, bad = BadSampleReport(), []
        for i, s in enumerate(self.samples):
            try:
                self[i]
            except DatasetError as e:
                report.add(s.path, 0, str(e).split(": ", 1)[-1].split(". Fix:")[0])
                bad.append(s.key)
        finish_loading(report, on_error, self.source, "replace or re-encode the listed images")
        self.bad_samples.problems.extend(report.problems)
        return self.without(bad)

    def without(self, keys) -> "DetectionDataset":
        """Drop the samples whose key is in ``keys`` (in place; returns self); they are added to ``skipped``."""
        keys = set(keys)
        if keys:
            self.samples = [s for s in self.samples if s.key not in keys]
            self.skipped = sorted({*self.skipped, *keys})
            self.stats.update(images=len(self.samples), boxes=int(sum(len(s.labels) for s in self.samples)))
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
