"""Bad input is refused at start, naming the file or folder: empty splits, undecodable images in
jobs.make_shards' default mode; CLI hints name CLI flags."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.dataset import DatasetError
from pipeline.data.load import load_dataset


def _yolo(root, n_good: int = 2, truncated: bool = False):
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames: [thing]\n")
    rng = np.random.default_rng(0)
    for i in range(n_good + truncated):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()
        if truncated and i == n_good:
            data = data[: len(data) // 2]
        (root / "images" / "train" / f"{i}.jpg").write_bytes(data)
        (root / "labels" / "train" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    return root


def test_empty_yolo_and_coco_splits_are_refused_naming_the_folder(tmp_path):
    yolo = _yolo(tmp_path / "yolo", n_good=0)
    with pytest.raises(DatasetError, match=f"{yolo / 'images' / 'train'}: split 'train' .* holds no images"):
        load_dataset(yolo)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train").mkdir()
    (coco / "annotations" / "instances_train.json").write_text(
        '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}')
    with pytest.raises(DatasetError, match=f"{coco / 'train'}: split 'train' .* holds no images"):
        load_dataset(coco)


def test_make_shards_refuses_a_truncated_jpeg_by_default_and_skips_it_on_request(tmp_path):
    from jobs import make_shards

    data = _yolo(tmp_path / "yolo", n_good=2, truncated=True)
    with pytest.raises(SystemExit, match=r"(?s)2\.jpg: cannot decode image.*--on-error skip"):
        make_shards.main(["--data", str(data), "--out", str(tmp_path / "shards")])
    assert not (tmp_path / "shards").exists()   # refused before anything is written
    manifest = make_shards.main(["--data", str(data), "--out", str(tmp_path / "shards"), "--on-error", "skip"])
    assert manifest["num_samples"] == 2


def test_make_shards_refuses_an_empty_folder(tmp_path):
    from jobs import make_shards

    data = _yolo(tmp_path / "yolo", n_good=0)
    with pytest.raises(SystemExit, match="holds no images"):
        make_shards.main(["--data", str(data), "--out", str(tmp_path / "shards")])


def test_cache_teacher_stops_at_start_on_a_truncated_jpeg(tmp_path, capsys):
    from jobs import cache_teacher

    data = _yolo(tmp_path / "yolo", n_good=1, truncated=True)
    args = ["--vfm", "dinov3_vits", "--data", str(data), "--out", str(tmp_path / "store"), "--size", "s",
            "--epochs", "1", "--input-size", "64", "--views", "1", "--no-ray", "--quiet"]
    with pytest.raises(SystemExit) as e:
        cache_teacher.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1.jpg: cannot decode image" in err and "--on-error skip" in err
    assert not (tmp_path / "store").exists()


def test_cache_teacher_refuses_an_empty_folder(tmp_path, capsys):
    from jobs import cache_teacher

    data = _yolo(tmp_path / "yolo", n_good=0)
    with pytest.raises(SystemExit):
        cache_teacher.main(["--vfm", "dinov3_vits", "--data", str(data), "--out", str(tmp_path / "s"), "--no-ray"])
    assert "holds no images" in capsys.readouterr().err
