import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("imagehash")

from pipeline.data.dataset import DatasetError  # noqa: E402
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


def test_authors_val_list_reproduces_the_225_images_of_the_sample(taco_dir, tmp_path):
    """A release laid out like the official one (batch folders, zero-padded names, image ids 0..N) holding
    the 225 sample images among 20 others: --val-list on the sample's folder (the authors' evaluation copy,
    <id>.jpg) and a text file of the release's file names both give exactly those 225 images as val."""
    sample = sorted((taco_dir / "images" / "val").glob("*.jpg"))
    ids = sorted(int(p.stem) for p in sample)
    extra = [i for i in range(max(ids) + 1) if i not in set(ids)][:20]
    root, rng = tmp_path / "release", np.random.default_rng(0)
    images, anns = [], []

    def add(image_id, src=None):
        name = f"batch_{image_id % 3 + 1}/{image_id:06d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if src is None:
            _pattern(rng, 320, 240).save(root / name)
        else:
            (root / name).symlink_to(src)
        w, h = Image.open(root / name).size
        images.append(dict(id=image_id, file_name=name, width=w, height=h))
        return name, w, h

    names = {}
    for path in sample:
        name, w, h = add(int(path.stem), path)
        names[int(path.stem)] = name
        label = taco_dir / "labels" / "val" / f"{path.stem}.txt"
        for row in np.loadtxt(label, ndmin=2) if label.stat().st_size else []:
            c, cx, cy, bw, bh = row
            anns.append(dict(id=len(anns), image_id=int(path.stem), category_id=int(c), iscrowd=0, area=bw * bh * w * h,
                             bbox=[(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]))
    for i in extra:
        add(i)
        anns.append(dict(id=len(anns), image_id=i, category_id=0, bbox=[5.0, 5.0, 30.0, 30.0], area=900.0, iscrowd=0))
    cats = [dict(id=c, name=f"class {c}") for c in range(60)]
    ann_path = tmp_path / "annotations.json"
    ann_path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))

    report = prepare_taco(ann_path, root, tmp_path / "out", val_list=taco_dir / "images" / "val")
    val = json.loads((tmp_path / "out" / "annotations" / "instances_val.json").read_text())
    train = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    assert sorted(im["id"] for im in val["images"]) == ids and len(ids) == 225
    assert len(val["annotations"]) == 776 == report["splits"]["val"]["annotations"]
    assert sorted(im["id"] for im in train["images"]) == extra
    assert len(load_dataset(tmp_path / "out" / "yolo", "val")) == 225
    first = val["images"][0]
    assert np.abs(np.asarray(Image.open(tmp_path / "out" / "images" / "val" / first["file_name"]), dtype=float)
                  - np.asarray(Image.open(taco_dir / "images" / "val" / f"{first['id']}.jpg"), dtype=float)).mean() < 3

    listed = tmp_path / "val.txt"     # the same split named by the release's file names
    listed.write_text("# the authors' validation images\n" + "\n".join(names.values()) + "\n")
    again = prepare_taco(ann_path, root, tmp_path / "out2", val_list=listed)
    assert again["splits"] == report["splits"]


def test_val_list_errors_name_the_entries(taco, tmp_path):
    path, root, _ = taco
    bad = tmp_path / "val.txt"
    bad.write_text("3\nbatch_1/000005.jpg\n99\nnot_an_image.jpg\n")
    with pytest.raises(DatasetError, match=r"2 name no image.*'99', 'not_an_image.jpg'"):
        prepare_taco(path, root, tmp_path / "out", val_list=bad)
    bad.write_text("000003.jpg\n")    # TACO's own name without its batch folder: ambiguous
    with pytest.raises(DatasetError, match="both an image id and a file name"):
        prepare_taco(path, root, tmp_path / "out", val_list=bad)
    bad.write_text("3\nbatch_1/000005.jpg\n7\n")
    report = prepare_taco(path, root, tmp_path / "out", size=32, val_list=bad)
    assert report["splits"]["val"]["images"] == 3
    # 13 repeats listed image 7: it leaves train (no leakage), 12 repeats 3 likewise
    assert {d["id"] for d in report["duplicates_removed"]} == {12, 13}
