"""COCO-format annotations -> :class:`pipeline.data.dataset.DetectionDataset`.

Follows the official ``CocoDetection`` with ``remap_mscoco_category``: sparse category ids are
remapped to contiguous labels 0..C-1 in id order (``label_to_category_id`` maps back), crowd
annotations are dropped, boxes are clamped to the image and degenerate ones removed (counted in
``dataset.stats``). Images without boxes are kept.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.data.dataset import (BadSampleReport, DatasetError, DetectionDataset, Sample, check_on_error,
                               clamp_and_filter, finish_loading, read_json)

log = logging.getLogger(__name__)


def find_coco_split(root: Path, split: str) -> tuple[Path, Path | None]:
    """Locate ``annotations/instances_<split>*.json`` (or ``<split>*.json``) and its image folder in a COCO dir."""
    patterns = (f"annotations/instances_{split}*.json", f"annotations/{split}*.json", f"instances_{split}*.json",
                f"{split}*.json")
    candidates = [p for pattern in patterns for p in sorted(root.glob(pattern))]
    if not candidates:
        raise DatasetError(f"{root}: no COCO annotation file for split {split!r} (looked for "
                           f"annotations/instances_{split}*.json and no data.yaml). Fix: pass the COCO json path "
                           "itself, or a YOLO directory with data.yaml.")
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


def _is_bbox(b) -> bool:
    return (isinstance(b, list) and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b))


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
    image_row = {im["id"]: k for k, im in enumerate(images)}
    if len(image_row) != len(images):
        dup = next(i for i, n in Counter(im["id"] for im in images).items() if n > 1)
        raise DatasetError(f"{json_path}: image id {dup} appears more than once in 'images'. Fix: give every image "
                           "a unique id.")
    # vectorised over the annotations (COCO train has 860k): rows, labels, boxes, crowd, area
    anns = data["annotations"]
    rows = np.array([image_row.get(a.get("image_id"), -1) for a in anns], dtype=np.int64)
    labels = np.array([cat_to_label.get(a.get("category_id"), -1) for a in anns], dtype=np.int64)
    bboxes = [a.get("bbox") for a in anns]
    try:
        boxes = np.array(bboxes, dtype=np.float64).reshape(len(anns), 4)
        box_ok = np.isfinite(boxes).all(1)
    except (ValueError, TypeError):  # ragged / missing / non-numeric somewhere: check one by one
        box_ok = np.array([_is_bbox(b) for b in bboxes], dtype=bool)
        boxes = np.array([b if ok else [0.0] * 4 for b, ok in zip(bboxes, box_ok)], dtype=np.float64).reshape(-1, 4)
    ok = (rows >= 0) & (labels >= 0) & box_ok
    bad_rows = set()
    for j in np.flatnonzero(~ok).tolist():
        a, where = anns[j], f"annotation id {anns[j].get('id')}"
        if rows[j] < 0:
            report.add(json_path, 0, f"{where}: image_id {a.get('image_id')} is not in 'images'")
            continue
        bad_rows.add(int(rows[j]))
        if labels[j] < 0:
            report.add(json_path, 0, f"{where}: category_id {a.get('category_id')} is not in 'categories'")
        else:
            report.add(json_path, 0, f"{where}: bbox {bboxes[j]!r} is not 4 finite numbers [x, y, w, h]")
    iscrowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool).reshape(-1)
    area = np.array([a.get("area", -1.0) for a in anns], dtype=np.float64).reshape(-1)
    area = np.where(area < 0, boxes[:, 2] * boxes[:, 3], area)
    crowd = int((ok & iscrowd).sum())
    good = ok & ~iscrowd
    row, label, boxes, area = rows[good], labels[good], boxes[good].astype(np.float32), area[good].astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    size = np.array([(im["width"], im["height"]) for im in images], dtype=np.float32).reshape(-1, 2)
    keep = clamp_and_filter(boxes, size[row, 0:1], size[row, 1:2])
    degenerate = int((~keep).sum())
    order = np.argsort(row[keep], kind="stable")
    row, boxes, area, label = row[keep][order], boxes[keep][order], area[keep][order], label[keep][order]
    starts = np.searchsorted(row, np.arange(len(images) + 1))

    samples = []
    for k, im in enumerate(images):
        path = os.path.join(root, im["file_name"])
        try:
            file_size = os.stat(path).st_size
        except OSError:
            report.add(path, 0, f"image file missing (image id {im['id']} in {json_path.name})")
            continue
        if k in bad_rows:
            continue
        sl = slice(starts[k], starts[k + 1])
        samples.append(Sample(key=os.path.splitext(im["file_name"])[0], path=Path(path), width=int(im["width"]),
                              height=int(im["height"]), image_id=int(im["id"]), boxes=boxes[sl], labels=label[sl],
                              area=area[sl], file_size=file_size))
    finish_loading(report, on_error, json_path, "correct the listed entries or restore the missing images")
    if degenerate:
        log.info("%s: dropped %d degenerate box(es) (zero width/height after clamping)", json_path, degenerate)
    return DetectionDataset(samples, [c.get("name", str(c["id"])) for c in categories], label_to_category_id,
                            root=root, source=str(json_path), bad_samples=report, coco_json=json_path,
                            stats={"crowd_dropped": crowd, "degenerate_dropped": degenerate})
