"""TACO as the RT-CO-DETR paper prepared it: perceptual duplicates removed, every image resized
to 640x640 (boxes and polygons scaled with it), a train/val split (1,273 / 225 on the 1,500-image
official release, after dropping its duplicates), written as COCO json and as a YOLO directory.

The split is the authors' when ``val_list`` names their 225 validation images (image ids or file
names, e.g. the folder ``benchmark/benchmark_output/taco_yolo_for_eval/images/val`` of their
repository, whose files are ``<image id>.jpg``): those images are val, whatever the duplicate
search says, and everything else is train. Without it, a seeded 85/15 shuffle, which on TACO
shares only about 30 of its 225 validation images with the authors' list.

    out/images/{train,val}/<file>.jpg         resized images
    out/annotations/instances_{train,val}.json
    out/yolo/{images,labels}/{train,val}, out/yolo/data.yaml   (pipeline.data.convert.coco_to_yolo)
    out/prepare_report.json                   the removed duplicates and the split sizes

Duplicates are found with ``imagehash.phash`` (64-bit DCT hash): an image whose hash lies within
``max_distance`` bits of an earlier image's (by image id; listed val images first) is dropped with
its annotations, so no train image repeats a listed val image.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from detector.checkpoint import atomic_write
from pipeline.data.convert import coco_to_yolo
from pipeline.data.dataset import DatasetError, read_json

log = logging.getLogger(__name__)


def _open(path: Path, width: int, height: int) -> Image.Image:
    """The image in the orientation its annotation's width/height describe (TACO photos carry EXIF
    orientation tags; some annotations were made on the rotated view)."""
    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}. Fix: pass --images pointing at the folder "
                           "the annotation file names are relative to") from e
    if im.size != (width, height):
        rotated = ImageOps.exif_transpose(im)
        if rotated.size == (width, height):
            im = rotated
    return im.convert("RGB")


def perceptual_duplicates(hashes: list[int], max_distance: int = 4) -> dict[int, int]:
    """{duplicate index: index of the earlier image it repeats} for 64-bit hashes within
    ``max_distance`` Hamming bits of an earlier kept one."""
    bits = np.unpackbits(np.array(hashes, dtype=">u8").view(np.uint8).reshape(-1, 8), axis=1).astype(bool)
    dup: dict[int, int] = {}
    kept: list[int] = []
    for i in range(len(hashes)):
        if kept:
            dist = (bits[kept] != bits[i]).sum(1)
            j = int(dist.argmin())
            if dist[j] <= max_distance:
                dup[i] = kept[j]
                continue
        kept.append(i)
    return dup


def _scale_annotation(a: dict, sx: float, sy: float) -> dict:
    a = dict(a)
    x, y, w, h = a["bbox"]
    a["bbox"] = [x * sx, y * sy, w * sx, h * sy]
    a["area"] = float(a.get("area", w * h)) * sx * sy
    seg = a.get("segmentation")
    if isinstance(seg, list):   # polygons: alternate x, y
        a["segmentation"] = [[v * (sx if k % 2 == 0 else sy) for k, v in enumerate(poly)] for poly in seg]
    elif seg is not None:       # RLE masks are not rescaled: dropped rather than left wrong
        a.pop("segmentation")
    return a


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_val_list(path) -> list[str]:
    """The entries of ``--val-list``: a text file (one image id or file name a line, ``#`` comments), or a
    folder whose image files, named ``<image id>.<ext>`` (the authors' evaluation copy), are the list."""
    path = Path(path)
    if path.is_dir():
        entries = sorted(f.name for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        entries = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        entries = [e for e in entries if e]
    else:
        raise DatasetError(f"--val-list {path}: no such file or folder. Fix: pass a text file of image ids or file "
                           "names, or the folder of the authors' validation images (<id>.jpg)")
    if not entries:
        raise DatasetError(f"--val-list {path}: names no image. Fix: one image id or file name a line, or a folder of "
                           "<id>.jpg images")
    return entries


def match_val_list(entries: list[str], images: list[dict], source) -> list[int]:
    """Image ids of ``entries``: each is an image's ``file_name`` (as in the annotations, or as this job
    writes it, ``/`` -> ``_``), or an image id (``1004`` or ``1004.jpg``); anything else is an error."""
    by_file = {im["file_name"]: im["id"] for im in images}
    by_file.update({_out_name(im["file_name"]): im["id"] for im in images})
    basenames = {Path(im["file_name"]).name for im in images}
    ids = {im["id"] for im in images}
    found, missing, ambiguous = set(), [], []
    for e in entries:
        stem = Path(e).stem
        if e in by_file:
            found.add(by_file[e])
        elif "/" in e or not stem.isdigit() or int(stem) not in ids:
            missing.append(e)
        elif e in basenames:   # "000006.jpg": TACO's own name in several batches, or image id 6?
            ambiguous.append(e)
        else:
            found.add(int(stem))
    if missing or ambiguous:
        what = (f"{len(missing)} name no image (by file name or id), e.g. {missing[:5]}" if missing else
                f"{len(ambiguous)} are both an image id and a file name in several folders, e.g. {ambiguous[:5]}")
        raise DatasetError(f"--val-list {source}: of its {len(entries)} entries {what}. Fix: list the image ids "
                           "(1004) or the full file names (batch_1/000006.jpg) of this annotation file")
    return sorted(found)


def _out_name(file_name: str) -> str:
    """The file name an image gets in ``out/images/<split>`` (batch folders flattened)."""
    return Path(file_name.replace("/", "_")).with_suffix(".jpg").name


def split_ids(ids: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle, then the first round(val_fraction * n) ids are val (both lists sorted)."""
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = int(round(val_fraction * len(ids)))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def prepare_taco(annotations, images, out, size: int = 640, val_fraction: float = 0.15, seed: int = 0,
                 max_distance: int = 4, quality: int = 95, val_list=None) -> dict:
    """Run the whole preparation; returns the report written to ``out/prepare_report.json``.
    ``val_list``: the authors' validation images (see :func:`read_val_list`) instead of a seeded split."""
    import imagehash

    data = read_json(Path(annotations))
    for k in ("images", "annotations", "categories"):
        if not isinstance(data.get(k), list):
            raise DatasetError(f"{annotations}: missing or non-list {k!r}. Fix: pass the official TACO "
                               "annotations.json (COCO format)")
    images, out = Path(images), Path(out)
    ims = sorted(data["images"], key=lambda im: im["id"])
    listed = set(match_val_list(read_val_list(val_list), ims, val_list)) if val_list is not None else set()
    ims = [im for im in ims if im["id"] in listed] + [im for im in ims if im["id"] not in listed]
    hashes = []
    for im in tqdm(ims, desc="perceptual hashes", dynamic_ncols=True):
        hashes.append(int(str(imagehash.phash(_open(images / im["file_name"], im["width"], im["height"]))), 16))
    found = perceptual_duplicates(hashes, max_distance)
    dup = {i: j for i, j in found.items() if ims[i]["id"] not in listed}   # a listed image stays in val
    removed = [dict(id=ims[i]["id"], file_name=ims[i]["file_name"], duplicate_of=ims[j]["id"]) for i, j in dup.items()]
    kept = [im for i, im in enumerate(ims) if i not in dup]
    if listed:
        val_ids = sorted(listed)
        train_ids = sorted(im["id"] for im in kept if im["id"] not in listed)
    else:
        train_ids, val_ids = split_ids([im["id"] for im in kept], val_fraction, seed)
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)

    report = dict(source=str(annotations), size=size, split=f"listed: {val_list}" if listed else "seeded",
                  seed=seed, val_fraction=val_fraction, max_distance=max_distance, images_in=len(ims),
                  duplicates_removed=removed,
                  listed_duplicates_kept=[dict(id=ims[i]["id"], duplicate_of=ims[j]["id"])
                                          for i, j in found.items() if i not in dup],
                  splits={})
    for split, ids in (("train", set(train_ids)), ("val", set(val_ids))):
        out_images, out_anns = [], []
        for im in tqdm(sorted((im for im in kept if im["id"] in ids), key=lambda im: im["id"]),
                       desc=f"resize {split}", dynamic_ncols=True):
            name = _out_name(im["file_name"])
            target = out / "images" / split / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _open(images / im["file_name"], im["width"], im["height"]).resize((size, size), Image.BICUBIC) \
                .save(target, quality=quality)
            sx, sy = size / im["width"], size / im["height"]
            out_images.append(dict(im, file_name=name, width=size, height=size))
            out_anns += [_scale_annotation(a, sx, sy) for a in by_image.get(im["id"], [])]
        coco = dict(info=dict(data.get("info", {}), description=f"TACO {split}, {size}x{size}, duplicates removed"),
                    licenses=data.get("licenses", []), images=out_images, annotations=out_anns,
                    categories=data["categories"])
        json_path = out / "annotations" / f"instances_{split}.json"
        with atomic_write(json_path) as f:
            f.write(json.dumps(coco).encode())
        coco_to_yolo(json_path, out / "yolo", image_root=out / "images" / split, split=split)
        report["splits"][split] = dict(images=len(out_images), annotations=len(out_anns))
        log.info("%s: %d images, %d boxes -> %s", split, len(out_images), len(out_anns), json_path)
    with atomic_write(out / "prepare_report.json") as f:
        f.write(json.dumps(report, indent=2).encode())
    return report
