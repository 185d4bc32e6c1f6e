"""COCO / YOLO datasets: remapping, conversion round trips, bad-input errors, the synthetic default dataset."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from pipeline.data import synthetic
from pipeline.data.coco import load_coco
from pipeline.data.dataset import DatasetError, decode
from pipeline.data.load import load_dataset
from pipeline.data.convert import coco_to_yolo, yolo_to_coco
from pipeline.data.yolo import load_yolo


def _jpeg(path, w=64, h=48, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


@pytest.fixture
def coco_dir(tmp_path):
    """3 images (one without boxes), sparse category ids, one crowd and one degenerate box."""
    for i in range(3):
        _jpeg(tmp_path / "images" / f"im{i}.jpg", value=50 * i)
    data = {
        "images": [{"id": 10 + i, "file_name": f"im{i}.jpg", "width": 64, "height": 48} for i in range(3)],
        "categories": [{"id": 11, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 2, 10, 20], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 11, "bbox": [50, 40, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 7, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},
            {"id": 5, "image_id": 11, "category_id": 7, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 0},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data, indent=1))
    return tmp_path


def _yolo_dir(root, lines_by_image):
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text("path: .\nval: images/val\nnames: [a, b, c]\n")
    for i, lines in enumerate(lines_by_image):
        _jpeg(root / "images" / "val" / f"{i}.jpg")
        (root / "labels" / "val").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "val" / f"{i}.txt").write_text("".join(line + "\n" for line in lines))
    return root


def test_coco_remap_crowd_degenerate_and_empty_images(coco_dir):
    ds = load_dataset(coco_dir, split="val")
    assert ds.label_to_category_id == [3, 7, 11] and ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert ds.category_id_to_label == {3: 0, 7: 1, 11: 2}
    assert len(ds) == 3 and ds.stats["crowd_dropped"] == 1 and ds.stats["degenerate_dropped"] == 1
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 48, 64)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "XYXY"
    # second box clamped to the 64x48 image, labels contiguous
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[1., 2, 11, 22], [50, 40, 64, 48]]))
    assert target["labels"].tolist() == [0, 2] and target["image_id"].item() == 10
    assert target["orig_size"].tolist() == [64, 48] and target["key"] == "im0"
    assert ds[1][1]["labels"].tolist() == [1]
    assert len(ds[2][1]["boxes"]) == 0  # image without boxes kept
    # back to category ids for evaluation
    assert [ds.label_to_category_id[c] for c in target["labels"].tolist()] == [3, 11]
    coco = ds.to_coco()
    assert {a["category_id"] for a in coco["annotations"]} == {3, 7, 11}
    assert len(ds.coco.getAnnIds()) == 5  # evaluation GT is the original file (crowd included)


def test_raw_decode_equals_getitem_and_content_hash(coco_dir):
    ds = load_dataset(coco_dir / "annotations" / "instances_val.json", image_root=coco_dir / "images")
    for i in range(len(ds)):
        a_img, a_t = ds[i]
        data, annotation = ds.raw(i)
        b_img, b_t = decode(data, json.loads(json.dumps(annotation)))  # annotations travel as json
        assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"]) and a_t["key"] == b_t["key"]
    h = ds.content_hash()
    assert h == load_coco(coco_dir / "annotations" / "instances_val.json").content_hash()
    ds.samples[0].boxes[0, 0] += 1
    assert ds.content_hash() != h


def test_yolo_parse_polygon_and_background(tmp_path):
    root = _yolo_dir(tmp_path, [["0 0.5 0.5 0.5 0.5", "2 0.1 0.1 0.3 0.1 0.3 0.4"], []])
    (root / "labels" / "val" / "1.txt").unlink()  # no label file: background image
    ds = load_dataset(root, split="val")
    assert len(ds) == 2 and ds.label_to_category_id == [0, 1, 2]
    torch.testing.assert_close(ds[0][1]["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[16., 12, 48, 36], [6.4, 4.8, 19.2, 19.2]]))
    assert ds[0][1]["labels"].tolist() == [0, 2] and len(ds[1][1]["boxes"]) == 0


@pytest.mark.parametrize("line, needle", [
    ("7 0.5 0.5 0.2 0.2", "class id 7 out of range 0..2"),
    ("1 0.5 0.5 0.2", "expected 5 fields"),
    ("1 320 240 20 20", "outside [0, 1]"),
    ("x 0.5 0.5 0.2 0.2", "not numbers"),
])
def test_yolo_bad_label_names_file_and_line(tmp_path, line, needle):
    root = _yolo_dir(tmp_path, [["0 0.5 0.5 0.2 0.2", line], ["1 0.5 0.5 0.2 0.2"]])
    with pytest.raises(DatasetError) as e:
        load_dataset(root, split="val")
    msg = str(e.value)
    assert f"{root / 'labels' / 'val' / '0.txt'}:2" in msg and needle in msg and "on_error='skip'" in msg


def test_yolo_skip_and_count(tmp_path, capsys):
    root = _yolo_dir(tmp_path, [["9 0.5 0.5 0.2 0.2"], ["1 0.5 0.5 0.2 0.2"], ["0 0.5 0.5 0.2 0.2"]])
    (root / "images" / "val" / "2.jpg").write_bytes(b"not a jpeg")
    ds = load_dataset(root, split="val", on_error="skip")
    assert [ds.key(i) for i in range(len(ds))] == ["1"]
    assert len(ds.bad_samples) == 2
    out = capsys.readouterr().out
    assert "skipped 2 bad sample(s)" in out and "0.txt:1" in out and "2.jpg" in out


def test_coco_json_syntax_error_names_line(tmp_path):
    bad = tmp_path / "instances_val.json"
    bad.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(DatasetError, match=r"instances_val.json:3:\d+: not valid JSON"):
        load_dataset(bad, image_root=tmp_path)


def test_coco_missing_and_corrupt_images(coco_dir, capsys):
    (coco_dir / "images" / "im1.jpg").unlink()
    with pytest.raises(DatasetError, match=r"im1.jpg: image file missing"):
        load_dataset(coco_dir, split="val")
    ds = load_dataset(coco_dir, split="val", on_error="skip")
    assert len(ds) == 2 and len(ds.bad_samples) == 1
    (coco_dir / "images" / "im2.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DatasetError, match=r"im2.jpg: cannot decode image"):
        ds[1]
    with pytest.raises(DatasetError, match="im2.jpg"):
        ds.verify_images()
    ds = load_dataset(coco_dir, split="val", on_error="skip", verify_images=True)
    assert [ds.key(i) for i in range(len(ds))] == ["im0"] and len(ds.bad_samples) == 2
    assert "im2.jpg" in capsys.readouterr().out


@pytest.mark.parametrize("field, value, needle", [
    ("category_id", 99, "annotation id 1: category_id 99 is not in 'categories'"),
    ("image_id", 12345, "annotation id 1: image_id 12345 is not in 'images'"),
    ("bbox", [1, 2, 3], "annotation id 1: bbox [1, 2, 3] is not 4 finite numbers"),
    ("bbox", [1, 2, 3, None], "annotation id 1: bbox [1, 2, 3, None] is not 4 finite numbers"),
])
def test_coco_bad_annotation_is_an_error_or_skipped(coco_dir, field, value, needle):
    path = coco_dir / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["annotations"][0][field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as e:
        load_dataset(path)
    assert needle in str(e.value)
    ds = load_dataset(path, on_error="skip")
    assert len(ds.bad_samples) == 1
    # the image whose annotation is broken is left out (keeping it would silently lose a box)
    assert ("im0" in [ds.key(i) for i in range(len(ds))]) == (field == "image_id")


def _assert_same_boxes(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a.key(i) == b.key(i)
        np.testing.assert_allclose(a.samples[i].boxes, b.samples[i].boxes, atol=1e-3)
        np.testing.assert_array_equal(a.samples[i].labels, b.samples[i].labels)


def test_yolo_coco_round_trip(tmp_path):
    src = _yolo_dir(tmp_path / "y", [["0 0.5 0.5 0.5 0.5", "2 0.25 0.3 0.1 0.2"], [], ["1 0.9 0.9 0.2 0.2"]])
    yolo_to_coco(src, tmp_path / "c.json", split="val")
    coco = load_coco(tmp_path / "c.json", image_root=src / "images" / "val")
    assert coco.label_to_category_id == [1, 2, 3]
    back = load_yolo(coco_to_yolo(tmp_path / "c.json", tmp_path / "y2", image_root=src / "images" / "val"), "val")
    orig = load_yolo(src, "val")
    _assert_same_boxes(orig, coco)
    _assert_same_boxes(orig, back)
    assert back.class_names == ["a", "b", "c"]


def test_taco_round_trip(taco_dir, tmp_path):
    orig = load_dataset(taco_dir, split="val")
    assert len(orig) == 225 and orig.num_classes == 60 and orig.stats["boxes"] == 776
    yolo_to_coco(taco_dir, tmp_path / "taco.json", split="val")
    back = load_yolo(coco_to_yolo(tmp_path / "taco.json", tmp_path / "y", image_root=orig.root), "val")
    _assert_same_boxes(orig, back)


def test_synthetic_is_deterministic(tmp_path, monkeypatch):
    a = synthetic.generate(tmp_path / "a", splits={"train": 4, "val": 2}, size=96)
    b = synthetic.generate(tmp_path / "b", splits={"train": 4, "val": 2}, size=96)
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    monkeypatch.setenv("RTDETRV4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "SPLITS", {"train": 6, "val": 3})
    ds = load_dataset(None, split="val")
    assert len(ds) == 3 and ds.label_to_category_id == synthetic.CATEGORY_IDS and ds.stats["boxes"] > 0
    assert (tmp_path / "cache" / f"synthetic-v{synthetic.VERSION}" / "DONE").is_file()
    assert load_dataset("synthetic", split="val").content_hash() == ds.content_hash()
    shutil.rmtree(tmp_path / "cache")
    assert load_dataset("synthetic", split="val").content_hash() == ds.content_hash()  # regenerated identically


def test_duplicate_keys_and_image_ids_are_errors(tmp_path, coco_dir):
    root = _yolo_dir(tmp_path / "y", [["0 0.5 0.5 0.2 0.2"]])
    _jpeg(root / "images" / "val" / "0.png")
    with pytest.raises(DatasetError, match="share the sample key '0'"):
        load_dataset(root, split="val")
    path = coco_dir / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["images"][1]["id"] = 10
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="image id 10 appears more than once"):
        load_dataset(path)
