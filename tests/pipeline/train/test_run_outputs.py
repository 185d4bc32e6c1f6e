"""Run outputs (Ultralytics-style): run-dir naming, --resume RUN_DIR, results.csv / results.png,
PR curve and confusion matrix from the COCO evaluation's arrays, train_batch0.jpg, best.pth
without optimizer, --save-period, --patience, and the train/val split flags."""
from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.evaluate import CocoEvaluator
from pipeline.train import outputs
from pipeline.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[3]


def test_run_dir_increments_like_ultralytics(tmp_path, monkeypatch):
    base = tmp_path / "runs" / "exp"
    assert outputs.increment_run_dir(base) == base and base.is_dir()   # absent: created and held
    assert outputs.increment_run_dir(base) == base                  # empty (held by this process): free
    (base / "last.pth").write_bytes(b"x")
    assert outputs.increment_run_dir(base) == tmp_path / "runs" / "exp2"
    (tmp_path / "runs" / "exp2" / "last.pth").write_bytes(b"x")
    (tmp_path / "runs" / "exp3").write_text("a file")
    assert outputs.increment_run_dir(base) == tmp_path / "runs" / "exp4"
    assert outputs.increment_run_dir(base, exist_ok=True) == base
    monkeypatch.chdir(tmp_path)
    assert outputs.run_dir(None, "demo", False, None) == (outputs.Path("runs/demo"), None)


HOLD = """
import sys, time
from pipeline.train import outputs
print(outputs.run_dir(sys.argv[1], "x", False, sys.argv[2] if len(sys.argv) > 2 else None)[0], flush=True)
time.sleep(60)
"""


def _holder(*args):
    """Another process that claims a run folder (as jobs.train does at start) and keeps running."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return proc, Path(proc.stdout.readline().strip())


def test_two_runs_started_together_with_one_out_get_two_folders(tmp_path):
    """Fault: both runs wrote into --out (two "epoch 0" rows in results.csv, one's checkpoints over the
    other's). The first claims the folder until its process ends; the second gets out2; a resume or
    --exist-ok into a folder a live run holds is refused, naming it; once the holder is gone it is free."""
    out = tmp_path / "run"
    proc, held = _holder(out)
    try:
        assert held == out
        assert outputs.increment_run_dir(out) == tmp_path / "run2"        # empty, but held by the other run
        with pytest.raises(outputs.RunDirError, match=r"--out .*run: a run \(pid \d+ on .*\) is writing into it"):
            outputs.increment_run_dir(out, exist_ok=True)
        (out / "last.pth").write_bytes(b"x")
        with pytest.raises(outputs.RunDirError, match="--resume .*run: a run .* is writing into it"):
            outputs.run_dir(None, "x", False, str(out))
    finally:
        proc.kill()
        proc.wait()
    assert outputs.run_dir(None, "x", False, str(out)) == (out, str(out / "last.pth"))   # the holder was killed


def test_resume_accepts_a_run_dir_or_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no last.pth"):
        outputs.resolve_resume(tmp_path)
    (tmp_path / "last.pth").write_bytes(b"x")
    assert outputs.run_dir(None, "x", False, str(tmp_path)) == (tmp_path, str(tmp_path / "last.pth"))
    assert outputs.run_dir(None, "x", False, str(tmp_path / "last.pth")) == (tmp_path, str(tmp_path / "last.pth"))
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        outputs.resolve_resume(tmp_path / "nope")


def test_results_csv_rows_png_and_patience(tmp_path):
    res = outputs.Results(tmp_path)
    for epoch, ap in enumerate([0.1, 0.3, 0.2, 0.3]):
        res.add({"epoch": epoch, "train/loss": 1.0 / (epoch + 1), "lr": 1e-4, "val/AP": ap})
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train/loss", "lr", "val/AP"] and len(rows) == 4
    assert float(rows[1]["val/AP"]) == pytest.approx(0.3)
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert outputs.epochs_since_best(tmp_path / "results.csv") == 2    # a tie is no improvement
    assert outputs.is_main_loss("loss_giou") and not outputs.is_main_loss("loss_giou_aux_0")
    assert not outputs.is_main_loss("loss_mal_dn_pre") and outputs.is_main_loss("loss_distill")


def _gt():
    cats = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0}]
    return {"images": images, "annotations": anns, "categories": cats}


def test_pr_curve_and_confusion_matrix_from_the_evaluation(tmp_path):
    ev = CocoEvaluator(_gt(), label_to_category=[1, 3])
    xyxy = lambda *b: torch.tensor([b], dtype=torch.float32)  # noqa: E731
    ev.update([{"labels": torch.tensor([0, 0, 1]), "boxes": torch.cat([xyxy(10, 10, 40, 40), xyxy(50, 50, 90, 90),
                                                                      xyxy(0, 60, 20, 80)]),
                "scores": torch.tensor([0.9, 0.8, 0.7])},
               {"labels": torch.tensor([1]), "boxes": xyxy(0, 0, 50, 50), "scores": torch.tensor([0.1])}], [1, 2])
    ev.summarize()
    m = outputs.confusion_matrix(ev.cocoeval)     # rows predicted, columns true; index 2 = background
    # a->a right; b predicted as a; a spurious b; the b of image 2 scored 0.1 < 0.25: missed
    assert m.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    written = outputs.final_plots(ev.cocoeval, ["a", "b"], tmp_path)
    assert [w.name for w in written] == ["PR_curve.png", "confusion_matrix.png"]
    assert all(w.stat().st_size > 1000 for w in written)
    p = np.asarray(ev.cocoeval.eval["precision"])
    assert p.shape[2] == 2 and p[0, 0, 0, 0, -1] == pytest.approx(1.0)   # class a at IoU .5: its one gt found first


def _yolo_val_only(root, n=6):
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / "images" / "val" / f"{i}.jpg")
        (root / "labels" / "val" / f"{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.3 0.4\n")
    (root / "data.yaml").write_text("path: .\nval: images/val\nnames: [cat, dog]\n")
    return root


@pytest.mark.slow
def test_yolo_val_only_trains_with_train_split_val_and_warns_of_overlap(tmp_path, caplog):
    from pipeline.train.trainer import Trainer

    data = _yolo_val_only(tmp_path / "yolo")
    cfg = TrainConfig(size="s", epochs=1, img_size=128, batch_size=2, workers=0, out=str(tmp_path / "run"),
                      distill="none", data=str(data), train_split="val", val_split="val", max_steps_per_epoch=1,
                      log_every=1, save_period=1)
    with caplog.at_level(logging.INFO, logger="rtdetrv4.train"):
        result = Trainer(cfg).fit()
    text = caplog.text
    assert "train[val] 6 images, val[val] 6 images" in text and "classes   2: cat, dog" in text
    assert "share 6 images" in text
    run = tmp_path / "run"
    assert result["out"] == str(run)
    for name in ("results.csv", "results.png", "PR_curve.png", "confusion_matrix.png", "train_batch0.jpg",
                 "last.pth", "best.pth", "epoch1.pth"):
        assert (run / name).is_file(), name
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["epoch", "train/loss"] and "lr" in header and "val/AP" in header and "val/AP50" in header
    best, last = (torch.load(run / n, map_location="cpu", weights_only=False) for n in ("best.pth", "last.pth"))
    assert "optimizer" not in best and "model" not in best and "module" in best["ema"]
    assert "optimizer" in last
    # a second run with the same --out does not write into the first one
    again = Trainer(cfg)
    assert again.out == tmp_path / "run2"
