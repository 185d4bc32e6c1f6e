"""COCO-format annotations -> :class:`pipeline.datasets.DetectionDataset`.

Follows the official ``CocoDetection`` with ``remap_mscoco_category``: sparse category ids are
remapped to contiguous labels 0..C-1 in id order (``label_to_category_id`` maps back), crowd
annotations are dropped, boxes are clamped to the image and degenerate ones removed (counted in
``dataset.stats``). Images without boxes are kept.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.datasets import (BadSampleReport, DatasetError, DetectionDataset, Sample, check_on_error,
                               clamp_and_filter, finish_loading)

log = logging.getLogger(__name__)


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


def find_coco_split(root: Path, split: str) -> tuple[Path, Path | None]:
    """Locate ``annotations/instances_<split>*.json`` (or ``<split>*.json``) and its image folder in a COCO dir."""
    patterns = (f"annotations/instances_{split}*.json", f"annotations/{split}*.json", f"instances_{split}*.json",
                f"{split}*.json")
    candidates = [p for pattern in patterns for p in sorted(root.glob(pattern))]
    if not candidates:
        raise DatasetError(f"{root}: no COCO annotation file for split {split!r} (looked for "
                           f"annotations/instances_{split}*.json and no data.yaml). Fix: pass the COCO json path itself, "
                           "or a YOLO directory with data.yaml.")
    ann = candidates[0]
    stem = re.sub(r"^instances_", "", ann.stem)
    for d in (root / stem, root / "images" / stem, root / split, root / "images" / split, root / "images"):
        if d.is_dir():
            return ann, d
    return ann, None


def _guess_image_root(json_path: Path, first_file: str | None) -> Path:
    stem = re.sub(r"^instances_", "", json_path.stem)
    parent = json_path.parent
    options = [parent, parent / "images", parent.parent / stem, parent.parent / "images" / stem,
               parent.parent / "images", parent.parent]
    if first_file is None:
        return parent
    for d in options:
        if (d / first_file).is_file():
            return d
    raise DatasetError(f"{json_path}: cannot find the image folder (looked for {first_file!r} in "
                       f"{', '.join(str(o) for o in options)}). Fix: pass image_root=<folder with the images>.")


def load_coco(json_path, image_root=None, on_error: str = "raise") -> DetectionDataset:
    """Load a COCO detection json; ``image_root`` is the folder ``file_name`` is relative to."""
    check_on_error(on_error)
    json_path = Path(json_path)
    data = read_json(json_path)
    for k in ("images", "annotations", "categories"):
        if not isinstance(data.get(k), list):
            raise DatasetError(f"{json_path}: missing or non-list {k!r}. Fix: a COCO detection file has "
                               "'images', 'annotations' and 'categories' lists.")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_to_category_id = [int(c["id"]) for c in categories]
    cat_to_label = {c: i for i, c in enumerate(label_to_category_id)}
    images = data["images"]
    root = Path(image_root) if image_root else _guess_image_root(json_path, images[0]["file_name"] if images else None)

    report = BadSampleReport()
    by_image: dict[int, list] = {im["id"]: [] for im in images}
    if len(by_image) != len(images):
        dup = next(i for i, n in Counter(im["id"] for im in images).items() if n > 1)
        raise DatasetError(f"{json_path}: image id {dup} appears more than once in 'images'. Fix: give every image "
                           "a unique id.")
    bad_images: set[int] = set()
    for ann in data["annotations"]:
        where = f"annotation id {ann.get('id')}"
        if ann.get("image_id") not in by_image:
            report.add(json_path, 0, f"{where}: image_id {ann.get('image_id')} is not in 'images'")
            continue
        if ann.get("category_id") not in cat_to_label:
            report.add(json_path, 0, f"{where}: category_id {ann.get('category_id')} is not in 'categories'")
            bad_images.add(ann["image_id"])
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            report.add(json_path, 0, f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
            bad_images.add(ann["image_id"])
            continue
        by_image[ann["image_id"]].append(ann)

    samples, crowd, degenerate = [], 0, 0
    for im in images:
        path = root / im["file_name"]
        try:
            size = path.stat().st_size
        except OSError:
            report.add(path, 0, f"image file missing (image id {im['id']} in {json_path.name})")
            continue
        if im["id"] in bad_images:
            continue
        anns = [a for a in by_image[im["id"]] if not a.get("iscrowd", 0)]
        crowd += len(by_image[im["id"]]) - len(anns)
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        keep = clamp_and_filter(boxes, im["width"], im["height"])
        degenerate += int((~keep).sum())
        labels = np.array([cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        area = np.array([a.get("area", (a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=np.float32)
        samples.append(Sample(key=Path(im["file_name"]).with_suffix("").as_posix(), path=path,
                              width=int(im["width"]), height=int(im["height"]), image_id=int(im["id"]),
                              boxes=boxes[keep], labels=labels[keep], area=area[keep], file_size=size))
    finish_loading(report, on_error, json_path, "correct the listed entries or restore the missing images")
    if degenerate:
        log.info("%s: dropped %d degenerate box(es) (zero width/height after clamping)", json_path, degenerate)
    return DetectionDataset(samples, [c.get("name", str(c["id"])) for c in categories], label_to_category_id,
                            root=root, source=str(json_path), bad_samples=report, coco_json=json_path,
                            stats={"crowd_dropped": crowd, "degenerate_dropped": degenerate})
