"""Bad input is refused at start, naming the file or folder: empty splits, undecodable images in
jobs.make_shards' default mode; CLI hints name CLI flags. Images every job decodes the same way: a PNG
shorter than its header is an error naming it (never a crash), 16-bit images are scaled to 8 bits,
BMP/TIFF decode; --data pointing at an image, a YOLO label file without an image."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.dataset import DatasetError
from pipeline.data.load import load_dataset

REPO = Path(__file__).resolve().parents[3]


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
    with pytest.raises(DatasetError, match=r"(?s)2\.jpg: cannot decode image.*--on-error skip"):
        make_shards.main(["--data", str(data), "--out", str(tmp_path / "shards")])
    assert not (tmp_path / "shards").exists()   # refused before anything is written
    manifest = make_shards.main(["--data", str(data), "--out", str(tmp_path / "shards"), "--on-error", "skip"])
    assert manifest["num_samples"] == 2


def test_make_shards_refuses_an_empty_folder(tmp_path):
    from jobs import make_shards

    data = _yolo(tmp_path / "yolo", n_good=0)
    with pytest.raises(DatasetError, match="holds no images"):
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


# -- images every job decodes the same way --------------------------------------------------------------
def _png(width: int, height: int, depth: int, color: int, pixels: bytes, claimed_height: int | None = None) -> bytes:
    """A PNG written chunk by chunk (filter 0 on every row); ``claimed_height`` puts another height in
    its header than its pixel data holds (a truncated download whose zlib stream still ends cleanly)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = len(pixels) // height
    raw = b"".join(b"\x00" + pixels[r * row:(r + 1) * row] for r in range(height))
    header = struct.pack(">IIBBBBB", width, claimed_height or height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _short_png(path: Path) -> Path:
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path.write_bytes(_png(64, 64, 8, 2, rgb.tobytes(), claimed_height=256))
    return path


CHILD = """
import json, sys
from pipeline.data.dataset import DatasetError
from pipeline.data.load import load_dataset
from pipeline.deploy.inputs import read_image
errors = {}
for name, read in (("coco", lambda: load_dataset(sys.argv[1])[0]), ("predict", lambda: read_image(sys.argv[2]))):
    try:
        read()
    except DatasetError as e:
        errors[name] = str(e)
print(json.dumps(errors))
"""


def test_a_png_shorter_than_its_header_is_an_error_naming_it_never_a_crash(tmp_path):
    """Fault: torchvision's libpng decoder killed the process with SIGSEGV (jobs.make_shards, train and
    evaluate through the YOLO and COCO readers, jobs.predict). Each runs in a child process here."""
    data = _yolo(tmp_path / "yolo", n_good=2)
    bad = _short_png(data / "images" / "train" / "short.png")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "jobs.make_shards", "--data", str(data), "--out",
                          str(tmp_path / "shards")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])   # was -11: a segmentation fault
    assert run.stderr.startswith("jobs.make_shards: error: ") and "Traceback" not in run.stderr
    assert f"{bad}: cannot decode image: the PNG holds 12,352 of the 49,408 bytes" in run.stderr
    coco = bad.parent / "coco.json"   # the COCO reader finds the images next to its json
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "short.png", "width": 64, "height": 256}],
                                "annotations": [], "categories": [{"id": 1, "name": "thing"}]}))
    run = subprocess.run([sys.executable, "-c", CHILD, str(coco), str(bad)], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    errors = json.loads(run.stdout)
    assert sorted(errors) == ["coco", "predict"]
    assert all("short.png: cannot decode image: the PNG holds" in e for e in errors.values())
    skipped = load_dataset(data, on_error="skip", verify_images=True)   # --on-error skip: listed, left out
    assert len(skipped) == 2 and skipped.skipped == ["short"] and "short.png" in skipped.bad_samples.summary()


def test_16_bit_images_are_scaled_to_8_bits_once_for_every_job(tmp_path):
    """Fault: a 16-bit PNG reached the photometric augmentation as uint16 (training failed, unnamed),
    evaluation fed the network values up to ~250 instead of [0, 1], jobs.predict failed to draw."""
    from pipeline.data.augment import AugmentedDataset
    from pipeline.data.policy import AugPolicy
    from pipeline.deploy.inputs import read_image

    data = _yolo(tmp_path / "yolo", n_good=0)
    folder = data / "images" / "train"
    Image.fromarray(np.full((24, 32), 60000, np.uint16)).save(folder / "grey16.png")   # PIL: a 16-bit grey PNG
    rgb = np.zeros((24, 32, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 32896, 255
    (folder / "rgb16.png").write_bytes(_png(32, 24, 16, 2, rgb.astype(">u2").tobytes()))
    for name in ("grey16", "rgb16"):
        (data / "labels" / "train" / f"{name}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    ds = load_dataset(data)
    want = {"grey16": [234, 234, 234], "rgb16": [255, 128, 0]}   # the high byte, as to_dtype(scale=True)
    for i in range(len(ds)):
        image = ds[i][0]
        assert image.dtype == torch.uint8 and image[:, 5, 5].tolist() == want[ds.key(i)]
        assert torch.equal(read_image(ds.image_path(i)), image.as_subclass(torch.Tensor))   # jobs.predict
        evaluated = AugmentedDataset(ds, policy=None, size=32)[i][0]                        # jobs.evaluate
        assert evaluated.dtype == torch.float32 and 0.0 <= float(evaluated.min()) <= float(evaluated.max()) <= 1.0
    trained = AugmentedDataset(ds, AugPolicy(epochs=(0, 0, 5), mosaic_prob=0.0, photometric_p=1.0, output_size=32))
    assert all(float(trained[i][0].max()) <= 1.0 for i in range(len(ds)))             # photometric distort ran


def test_bmp_and_tiff_decode_like_the_formats_torchvision_reads(tmp_path):
    """IMAGE_EXTENSIONS lists them; torchvision's decoder does not read them: PIL does, to the same pixels."""
    from pipeline.data.dataset import decode_rgb

    rgb = np.random.default_rng(1).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    want = decode_rgb(png.getvalue())
    assert want.permute(1, 2, 0).numpy().tolist() == rgb.tolist()
    for fmt in ("BMP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt)
        assert torch.equal(decode_rgb(buf.getvalue(), f"x.{fmt.lower()}"), want), fmt
    with pytest.raises(DatasetError, match=r"x\.bmp: cannot decode image"):
        decode_rgb(b"BM" + b"\x00" * 20, "x.bmp")


def test_data_pointing_at_an_image_or_a_binary_json_is_named(tmp_path, capsys):
    """Fault: `--data some.jpg` ended in a raw UnicodeDecodeError."""
    from jobs import evaluate
    from pipeline.cli import run

    data = _yolo(tmp_path / "yolo", n_good=1)
    image = data / "images" / "train" / "0.jpg"
    with pytest.raises(DatasetError, match=f"{image}: not a data set .*YOLO directory"):
        load_dataset(image)
    fake = tmp_path / "annotations.json"
    fake.write_bytes(image.read_bytes())
    with pytest.raises(DatasetError, match=f"{fake}: not a text \\(JSON\\) file"):
        load_dataset(fake)
    assert run("jobs.evaluate", evaluate.main, ["--checkpoint", "none.pth", "--data", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jobs.evaluate: error: {image}: not a data set") and err.count("\n") == 1


def test_a_yolo_label_file_without_its_image_is_a_problem_not_silence(tmp_path):
    """Fault: its boxes were dropped without a word although nothing is dropped silently."""
    data = _yolo(tmp_path / "yolo", n_good=2)
    orphan = data / "labels" / "train" / "gone.txt"
    orphan.write_text("0 0.5 0.5 0.2 0.2\n")
    (data / "labels" / "train" / "classes.txt").write_text("thing\n")   # labelling tools write it: not a label
    with pytest.raises(DatasetError, match=f"{orphan}: label file without an image"):
        load_dataset(data)
    ds = load_dataset(data, on_error="skip")
    assert len(ds) == 2 and [p for p, _, _ in ds.bad_samples.problems] == [str(orphan)]
