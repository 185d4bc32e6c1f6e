"""One error style for every job (pipeline.cli.run): a user's mistake ends in one line
``jobs.X: error: ...`` naming the file or flag, exit code 2, no traceback; the output location is
checked before any data or model is loaded; Ctrl-C ends in one line (exit code 130)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import run

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["--size", "s", "--epochs", "1", "--img-size", "128", "--batch-size", "2", "--vfm", "dinov3_vits",
         "--eval-max-images", "2"]
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOMLY INITIALISED")


def _yolo(root: Path, n: int) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames: [a, b]\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / "train" / f"{i:02d}.jpg")
        (root / "labels" / "train" / f"{i:02d}.txt").write_text("0 0.5 0.5 0.4 0.4\n1 0.3 0.3 0.2 0.2\n")
    return root


def _one_line(capsys, prog: str, *words: str) -> str:
    """The job's stderr ends with its one error line (progress bars and log lines may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"{prog}: error: ") and "Traceback" not in err, err[-3000:]
    assert sum(": error: " in line for line in lines) == 1 and all(w in lines[-1] for w in words), lines[-1]
    return lines[-1]


def test_an_unusable_out_is_named_before_any_data_or_model_is_loaded(tmp_path, capsys):
    """Fault: an unwritable --out (a read-only mount, a path under /proc) ended in a traceback, and
    predict and export failed only after loading the model."""
    from jobs import cache_teacher, evaluate, export, make_shards, predict, train

    image = tmp_path / "a.jpg"
    Image.new("RGB", (32, 32)).save(image)
    missing = str(tmp_path / "missing.pth")   # reading it would be another error: the --out one comes first
    for out in ("/proc/rtdetrv4-test/out", str(image / "out")):
        for prog, main, args in (
                ("jobs.predict", predict.main, ["--checkpoint", missing, "--input", str(image)]),
                ("jobs.export", export.main, ["--size", "s", "--checkpoint", missing]),
                ("jobs.evaluate", evaluate.main, ["--checkpoint", missing, "--data", str(tmp_path / "none")]),
                ("jobs.make_shards", make_shards.main, ["--data", str(tmp_path / "none")]),
                ("jobs.cache_teacher", cache_teacher.main, ["--data", str(tmp_path / "none")]),
                ("jobs.train", train.main, ["--data", str(tmp_path / "none"), "--distill", "none"])):
            try:
                assert run(prog, main, [*args, "--out", out]) == 2
            except SystemExit as e:   # jobs.cache_teacher ends itself, in the same style
                assert e.code == 2
            _one_line(capsys, prog, f"--out {out}", "cannot")


def test_store_refusals_and_bad_images_met_in_workers_end_in_one_line(tmp_path, capsys):
    """Fault: a teacher mismatch or a --strict-cache stop in jobs.train ended in a traceback (the latter
    re-raised from a DataLoader worker), where the cache job printed one `error:` line."""
    from jobs import cache_teacher, train

    data = _yolo(tmp_path / "data", 4)
    store = tmp_path / "store"   # an exact store of this plan with no step written yet
    assert cache_teacher.main(["--vfm", "dinov3_vits", "--data", str(data), "--out", str(store), "--size", "s",
                               "--epochs", "1", "--input-size", "128", "--global-batch", "2", "--mixup-group", "2",
                               "--max-shards", "0", "--no-ray", "--quiet"]) == 0
    capsys.readouterr()
    common = [*TRAIN, "--data", str(data), "--cache", str(store), "--workers", "2"]
    assert run("jobs.train", train.main, [*common, "--strict-cache", "--out", str(tmp_path / "a")]) == 2
    _one_line(capsys, "jobs.train", "--strict-cache", "not written yet")
    assert run("jobs.train", train.main, [*common, "--vfm", "dinov3_vitb", "--out", str(tmp_path / "b")]) == 2
    _one_line(capsys, "jobs.train", f"teacher-feature store {store} was made for another teacher")
    broken = data / "images" / "train" / "01.jpg"
    broken.write_bytes(broken.read_bytes()[:2000])   # its header reads; a worker meets it (default --on-error raise)
    assert run("jobs.train", train.main, [*TRAIN, "--data", str(data), "--distill", "none", "--workers", "2",
                                          "--out", str(tmp_path / "c")]) == 2
    _one_line(capsys, "jobs.train", f"{broken}: cannot decode image", "--on-error skip")


def test_ctrl_c_ends_in_one_line(tmp_path):
    """Fault: Ctrl-C printed tracebacks (main process and workers) and a misleading DataLoader message."""
    data = _yolo(tmp_path / "data", 40)
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *TRAIN, "--data", str(data), "--distill", "none",
                             "--workers", "2", "--log-every", "1", "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)   # the terminal sends it to the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("jobs.train: interrupted (Ctrl-C); continue the run with --resume")
