import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("imagehash")

from pipeline.data.load import load_dataset  # noqa: E402
from pipeline.data.taco import perceptual_duplicates, prepare_taco, split_ids  # noqa: E402


def _pattern(rng, w, h):
    """A smooth random image (8x8 noise upscaled), whose perceptual hash survives resizing."""
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


@pytest.fixture
def taco(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "taco"
    (root / "batch_1").mkdir(parents=True)
    images, anns, originals = [], [], {}
    for i in range(12):
        w, h = (320, 240) if i % 2 else (200, 300)
        im = _pattern(rng, w, h)
        originals[i] = im
        im.save(root / "batch_1" / f"{i:06d}.jpg", quality=95)
        images.append(dict(id=i, file_name=f"batch_1/{i:06d}.jpg", width=w, height=h))
        anns.append(dict(id=i, image_id=i, category_id=i % 3, bbox=[10.0, 20.0, 40.0, 60.0], area=2400.0,
                         iscrowd=0, segmentation=[[10.0, 20.0, 50.0, 20.0, 50.0, 80.0]]))
    # planted duplicates: a re-encoded smaller copy of 3, a brighter copy of 7
    dups = {12: 3, 13: 7}
    originals[3].resize((160, 120)).save(root / "batch_1" / "000012.jpg", quality=70)
    bright = Image.fromarray(np.clip(np.asarray(originals[7]).astype(int) + 6, 0, 255).astype(np.uint8))
    bright.save(root / "batch_1" / "000013.jpg", quality=90)
    for i, src in dups.items():
        w, h = Image.open(root / "batch_1" / f"{i:06d}.jpg").size
        images.append(dict(id=i, file_name=f"batch_1/{i:06d}.jpg", width=w, height=h))
        anns.append(dict(id=i, image_id=i, category_id=0, bbox=[1.0, 1.0, 5.0, 5.0], area=25.0, iscrowd=0))
    cats = [dict(id=c, name=n, supercategory="litter") for c, n in enumerate(["Bottle", "Can", "Cigarette"])]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return path, root, dups


def test_prepare_taco_removes_exactly_the_planted_duplicates(taco, tmp_path):
    path, root, dups = taco
    out = tmp_path / "out"
    report = prepare_taco(path, root, out, size=64, val_fraction=0.25, seed=1)
    assert {d["id"]: d["duplicate_of"] for d in report["duplicates_removed"]} == dups
    assert report["splits"] == {"train": dict(images=9, annotations=9), "val": dict(images=3, annotations=3)}
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    val = json.loads((out / "annotations" / "instances_val.json").read_text())
    ids = {im["id"] for im in train["images"]} | {im["id"] for im in val["images"]}
    assert ids == set(range(12))
    assert not {im["id"] for im in train["images"]} & {im["id"] for im in val["images"]}
    # image 0 is 200x300: boxes and polygons scale by 64/200, 64/300
    a0 = next(a for a in train["annotations"] + val["annotations"] if a["image_id"] == 0)
    assert a0["bbox"] == pytest.approx([10 * 0.32, 20 * 64 / 300, 40 * 0.32, 60 * 64 / 300])
    assert a0["segmentation"][0][:2] == pytest.approx([10 * 0.32, 20 * 64 / 300])
    assert all((im["width"], im["height"]) == (64, 64) for im in train["images"])
    assert Image.open(out / "images" / "train" / train["images"][0]["file_name"]).size == (64, 64)
    # both layouts load with the project's reader and agree
    coco = load_dataset(out / "annotations" / "instances_val.json", "val", image_root=out / "images" / "val")
    yolo_val = load_dataset(out / "yolo", "val")
    yolo_train = load_dataset(out / "yolo", "train")
    assert len(coco) == len(yolo_val) == 3 and len(yolo_train) == 9
    assert yolo_val.class_names == ["Bottle", "Can", "Cigarette"]
    np.testing.assert_allclose(np.concatenate([s.boxes for s in coco.samples]),
                               np.concatenate([s.boxes for s in yolo_val.samples]), atol=1e-3)


def test_split_is_seeded_and_sized():
    ids = list(range(1498))
    train, val = split_ids(ids, 0.15, seed=0)
    assert (len(train), len(val)) == (1273, 225)
    assert split_ids(ids, 0.15, seed=0) == (train, val) and split_ids(ids, 0.15, seed=1) != (train, val)


def test_duplicate_rule_is_hamming_distance():
    a = 0x0F0F_0F0F_0F0F_0F0F
    assert perceptual_duplicates([a, a ^ 0b111, a ^ 0xFFFF], max_distance=4) == {1: 0}
    assert perceptual_duplicates([a, a ^ 0b111], max_distance=2) == {}


def test_prepare_taco_job(taco, tmp_path, capsys):
    from jobs import prepare_taco as job
    path, root, dups = taco
    assert job.main(["--annotations", str(path), "--images", str(root), "--out", str(tmp_path / "o"),
                     "--size", "32"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["duplicates_removed"] == len(dups)
    assert out["splits"]["train"]["images"] + out["splits"]["val"]["images"] == 12
    assert out["splits"]["val"]["images"] == 2          # round(0.15 * 12)
