"""--on-error means the same in every job that reads data (train, evaluate, make_shards, cache_teacher):
raise stops naming the file; skip decodes every image once, lists the bad images and labels and goes on
without them, so every job sees the same data set (the same content hash, the same training plan) and a
store cached with --on-error skip is the one a run trained with --on-error skip reads."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.dataset import DatasetError
from pipeline.data.load import load_dataset

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOMLY INITIALISED")


def _short_png() -> bytes:
    """A PNG whose header promises 256 rows and whose pixel data holds 16 (a truncated download)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\x00" + bytes(16 * 3) for _ in range(16))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 256, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def data(tmp_path) -> Path:
    """7 good images, one that cannot be decoded, one whose label line is not a box."""
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames: [a, b]\n")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / "images" / "train" / f"{i}.jpg")
        (root / "labels" / "train" / f"{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n1 0.3 0.3 0.2 0.2\n")
    (root / "labels" / "train" / "7.txt").write_text("0 0.5 0.5\n")
    (root / "images" / "train" / "short.png").write_bytes(_short_png())
    return root


def test_skip_drops_the_same_samples_in_every_job_and_cache_matches_training(data, tmp_path, capsys):
    """Fault: no job but make_shards and cache_teacher took --on-error; cache_teacher's skip kept the bad
    images in its plan, so their shards failed, the job exited 1, and the trainer's dataset hash differed."""
    from detector import build_detector, save_checkpoint
    from jobs import cache_teacher, evaluate, make_shards
    from pipeline.train.config import TrainConfig
    from pipeline.train.data import build_train_data
    from pipeline.train.distributed import DistInfo
    from pipeline.train.recipe import resolve_recipe

    with pytest.raises(DatasetError, match="7.txt:1: expected 5 fields"):   # raise: named
        load_dataset(data)
    kept = load_dataset(data, on_error="skip", verify_images=True)
    assert [kept.key(i) for i in range(len(kept))] == [str(i) for i in range(7)] and kept.skipped == ["short"]
    want = kept.content_hash()

    manifest = make_shards.main(["--data", str(data), "--out", str(tmp_path / "shards"), "--on-error", "skip"])
    assert manifest["num_samples"] == 7 and manifest["dataset_hash"] == want

    checkpoint = tmp_path / "s.pth"
    save_checkpoint(build_detector("s", num_classes=2), checkpoint)
    evaluate.main(["--checkpoint", str(checkpoint), "--data", str(data), "--split", "train", "--on-error", "skip",
                   "--image-size", "128", "--workers", "0", "--out", str(tmp_path / "eval")])
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["images"] == 7 and sorted(Path(s["file"]).name for s in record["skipped"]) == ["7.txt", "short.png"]

    store = tmp_path / "store"
    plan = ["--size", "s", "--epochs", "1", "--input-size", "128", "--global-batch", "2", "--mixup-group", "2"]
    assert cache_teacher.main(["--vfm", "dinov3_vits", "--data", str(data), "--out", str(store), *plan, "--no-ray",
                               "--quiet", "--on-error", "skip"]) == 0   # was 1: the bad image's shard failed
    capsys.readouterr()
    assert json.loads((store / "manifest.json").read_text())["dataset"]["hash"] == want

    cfg = TrainConfig(size="s", epochs=1, img_size=128, batch_size=2, mixup_group=2, workers=0, vfm="dinov3_vits",
                      data=str(data), cache=str(store), on_error="skip", strict_cache=True)
    train = build_train_data(cfg, resolve_recipe("s", 1), DistInfo(0, 1, 0, torch.device("cpu")), 2)
    assert train.plan.dataset_hash == want and train.store is not None   # the store opens: the same plan
    images, targets, batch = next(iter(train.train_loader(0)))
    train.teacher_targets(images, targets, batch)
    assert train.teacher_stats()["cache_exact_rate"] == 1.0   # every view of the step from the store
