"""Conversion between the COCO and YOLO layouts (through :func:`pipeline.data.load.load_dataset`)."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.data.load import load_dataset


def yolo_to_coco(src, out_json, split: str = "val", on_error: str = "raise") -> dict:
    """Convert a YOLO split to a COCO json (category ids = class id + 1, file names relative to the images dir)."""
    ds = load_dataset(src, split, on_error=on_error)
    ds.label_to_category_id = [i + 1 for i in range(ds.num_classes)]
    return ds.to_coco(out_json)


def coco_to_yolo(coco_json, out_dir, image_root=None, split: str = "val", on_error: str = "raise",
                 copy_images: bool = False) -> Path:
    """Write a COCO dataset as a YOLO directory (images/<split> symlinked or copied, labels/<split>, data.yaml).

    Class ids are the contiguous labels (sorted category ids); crowd and degenerate boxes are dropped.
    """
    ds = load_dataset(coco_json, split, on_error=on_error, image_root=image_root)
    out = Path(out_dir)
    for s in ds.samples:
        rel = Path(s.key)
        image = out / "images" / split / rel.with_suffix(s.path.suffix)
        label = out / "labels" / split / rel.with_suffix(".txt")
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        if not image.exists():
            if copy_images:
                image.write_bytes(s.path.read_bytes())
            else:
                image.symlink_to(s.path.resolve())
        lines = []
        for (x1, y1, x2, y2), c in zip(s.boxes.tolist(), s.labels.tolist()):
            lines.append(f"{c} {(x1 + x2) / 2 / s.width:.8f} {(y1 + y2) / 2 / s.height:.8f} "
                         f"{(x2 - x1) / s.width:.8f} {(y2 - y1) / s.height:.8f}")
        label.write_text("\n".join(lines) + ("\n" if lines else ""))
    meta = out / "data.yaml"   # splits written earlier into the same directory stay listed
    spec = yaml.safe_load(meta.read_text()) if meta.is_file() else {}
    if spec.get("names", ds.class_names) != ds.class_names:
        raise ValueError(f"{meta} lists other class names than {coco_json}: write to another --out directory")
    spec.update({"path": ".", split: f"images/{split}", "nc": ds.num_classes, "names": ds.class_names})
    meta.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out
