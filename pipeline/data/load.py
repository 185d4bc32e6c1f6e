"""One entry point for every dataset format: the only module that imports the readers."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.data import synthetic
from pipeline.data.coco import find_coco_split, load_coco
from pipeline.data.dataset import DatasetError, DetectionDataset, check_on_error
from pipeline.data.yolo import load_yolo


def default_dataset(split: str = "train", root=None) -> DetectionDataset:
    """The embedded synthetic dataset's ``split`` ("train": 256 images, "val": 64), generated on first use."""
    root = synthetic.ensure_generated(split, root)
    return load_coco(root / "annotations" / f"instances_{split}.json", image_root=root / split)


def load_dataset(path_or_spec=None, split: str = "train", on_error: str = "raise", image_root=None,
                 verify_images: bool = False) -> DetectionDataset:
    """Load a detection dataset, detecting its format.

    ``path_or_spec``: ``None`` or ``"synthetic"`` (the generated default dataset); a YOLO directory
    (with ``data.yaml``) or the ``data.yaml`` itself; a COCO json (``image_root`` defaults to a guess
    next to it); or a COCO directory (``annotations/instances_<split>*.json`` + ``<split>*/``).
    ``on_error="skip"`` drops bad samples and logs a :class:`BadSampleReport` instead of raising;
    ``verify_images=True`` decodes every image once first (what ``--on-error skip`` does in every job,
    so they all drop the same images and agree on the data set's content hash).
    """
    check_on_error(on_error)
    if path_or_spec is None or str(path_or_spec) == "synthetic":
        ds = default_dataset(split)
    else:
        path = Path(os.path.expanduser(str(path_or_spec)))
        if not path.exists():
            raise DatasetError(f"{path}: no such file or directory. Fix: pass a YOLO directory (with data.yaml), "
                               "a COCO json, a COCO directory, or 'synthetic'.")
        if path.suffix in (".yaml", ".yml") or (path / "data.yaml").is_file():
            ds = load_yolo(path, split, on_error=on_error)
        elif path.is_file() and path.suffix.lower() != ".json":
            raise DatasetError(f"{path}: not a data set (a {path.suffix or 'plain'} file). Fix: pass a YOLO "
                               "directory (with data.yaml) or its data.yaml, a COCO json or directory, a "
                               "jobs.make_shards directory, or 'synthetic'; to run a model on images use "
                               "jobs.predict --input.")
        else:
            if path.is_dir():
                path, guessed_root = find_coco_split(path, split)
                image_root = image_root or guessed_root
            ds = load_coco(path, image_root=image_root, on_error=on_error)
    ds = ds.verify_images(on_error) if verify_images else ds
    if len(ds) == 0:
        skipped = " (every one was skipped as bad)" if on_error == "skip" else ""
        raise DatasetError(f"{ds.root}: split {split!r} of {path_or_spec} holds no images{skipped}. "
                           "Fix: point at the folder that holds the images, or choose another split.")
    return ds
