"""YOLO-format directories <-> :class:`pipeline.data.dataset.DetectionDataset` and COCO json.

Layout (Ultralytics): ``data.yaml`` with ``names`` (list or {id: name}) and one entry per split
(``val: images/val``, relative to ``path``); ``labels/<split>/<stem>.txt`` next to
``images/<split>/<stem>.jpg``, one object a line: ``class cx cy w h`` normalised to [0, 1], or a
polygon ``class x1 y1 x2 y2 ...`` (its enclosing box is used). An image without a label file is a
background image and is kept; a label file without an image is a problem (its boxes would be lost;
``classes.txt``, which labelling tools write there, is not a label file). Labels are the class ids;
``label_to_category_id`` is ``0..C-1``.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline.data.dataset import (IMAGE_EXTENSIONS, BadSampleReport, DatasetError, DetectionDataset, Sample,
                               check_on_error, clamp_and_filter, finish_loading)

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # normalised coordinates a hair outside [0, 1] (rounding in exporters) are clamped


def read_data_yaml(path: Path) -> tuple[Path, dict, list[str]]:
    """(yaml file, its dict, class names) of a YOLO dataset directory or data.yaml."""
    yaml_path = path if path.is_file() else path / "data.yaml"
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DatasetError(f"{yaml_path}{line}: not valid YAML ({getattr(e, 'problem', e)}). Fix: repair the "
                           "file.") from e
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{yaml_path}: no 'names' list. Fix: add `names: [class0, class1, ...]` in class-id order.")
    if "nc" in data and int(data["nc"]) != len(names):
        raise DatasetError(f"{yaml_path}: nc is {data['nc']} but 'names' has {len(names)} entries. "
                           "Fix: make them agree.")
    return yaml_path, data, [str(n) for n in names]


def label_path(image_path: Path) -> Path:
    """Ultralytics rule: the last ``images`` path component becomes ``labels``, the suffix ``.txt``."""
    parts = list(image_path.parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def parse_label_file(path: Path, num_classes: int, width: int, height: int, report: BadSampleReport):
    """Boxes XYXY (absolute, clamped), labels of one label file; problems go to ``report`` (None on error)."""
    boxes, labels, ok = [], [], True
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            report.add(path, n, f"expected 5 fields 'class cx cy w h' (or a polygon 'class x1 y1 x2 y2 x3 y3 ...'), "
                                f"got {len(fields)}")
            ok = False
            continue
        try:
            cls = int(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError:
            report.add(path, n, f"not numbers: {line.strip()!r} (class must be an integer id)")
            ok = False
            continue
        if not 0 <= cls < num_classes:
            report.add(path, n, f"class id {cls} out of range 0..{num_classes - 1} (data.yaml names has {num_classes} "
                                "classes)")
            ok = False
            continue
        if not all(math.isfinite(v) and -TOLERANCE <= v <= 1 + TOLERANCE for v in values):
            report.add(path, n, f"coordinates {fields[1:]} outside [0, 1]: YOLO labels are normalised by the image "
                                "width and height (pixels? divide by the image size)")
            ok = False
            continue
        if len(values) == 4:
            cx, cy, w, h = values
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
        else:
            xs, ys = values[0::2], values[1::2]
            boxes.append([min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height])
        labels.append(cls)
    if not ok:
        return None
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64)


def load_yolo(path, split: str = "val", on_error: str = "raise") -> DetectionDataset:
    """Load split ``split`` of a YOLO dataset (directory with data.yaml, or the yaml itself)."""
    check_on_error(on_error)
    yaml_path, data, names = read_data_yaml(Path(path))
    if split not in data:
        splits = [k for k in ("train", "val", "test") if k in data]
        raise DatasetError(f"{yaml_path}: no split {split!r} (it has {splits}). Fix: pass split= one of these or add "
                           f"`{split}: images/{split}` to the yaml.")
    if not isinstance(data[split], str):
        raise DatasetError(f"{yaml_path}: {split!r} is {data[split]!r}; only one image folder per split is supported. "
                           f"Fix: point it to a single folder (e.g. images/{split}) or merge the folders.")
    base = Path(data.get("path") or ".")
    base = base if base.is_absolute() else (yaml_path.parent / base)
    image_dir = (base / data[split]).resolve()
    if not image_dir.is_dir():
        raise DatasetError(f"{yaml_path}: split {split!r} points to {image_dir}, which is not a directory. Fix: "
                           "correct the path in the yaml (relative to its 'path' key).")
    files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    report, samples, degenerate = BadSampleReport(), [], 0
    for image_path in files:
        try:
            with Image.open(image_path) as im:
                width, height = im.size
        except Exception as e:  # PIL raises UnidentifiedImageError / OSError for broken files
            report.add(image_path, 0, f"not a readable image ({e.__class__.__name__}: {e})")
            continue
        lp = label_path(image_path)
        parsed = parse_label_file(lp, len(names), width, height, report) if lp.is_file() else \
            (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        if parsed is None:
            continue
        boxes, labels = parsed
        keep = clamp_and_filter(boxes, width, height)
        degenerate += int((~keep).sum())
        boxes, labels = boxes[keep], labels[keep]
        samples.append(Sample(key=image_path.relative_to(image_dir).with_suffix("").as_posix(), path=image_path,
                              width=width, height=height, image_id=len(samples), boxes=boxes, labels=labels,
                              area=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                              file_size=os.path.getsize(image_path)))
    label_dir = label_path(image_dir / "x").parent if "images" in image_dir.parts else None
    used = {label_path(f) for f in files}
    orphans = sorted(p for p in label_dir.rglob("*.txt") if p not in used and p.name != "classes.txt") \
        if label_dir is not None and label_dir.is_dir() else []
    for orphan in orphans:
        report.add(orphan, 0, f"label file without an image (no {orphan.stem}.* among the images of "
                              f"{image_dir}): its boxes would be lost")
    finish_loading(report, on_error, yaml_path, "correct the listed label lines, remove the broken images, and "
                   "restore the image of each orphaned label file (or delete that label file)")
    if degenerate:
        log.info("%s: dropped %d degenerate box(es)", yaml_path, degenerate)
    return DetectionDataset(samples, names, list(range(len(names))), root=image_dir, source=f"{yaml_path}:{split}",
                            bad_samples=report, stats={"crowd_dropped": 0, "degenerate_dropped": degenerate})
