"""The cache job end to end (tiny random-init teacher, TACO subset and the embedded dataset)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jobs.cache_teacher import main
from pipeline.data.load import load_dataset
from pipeline.data.views import Renderer
from pipeline.data.augment import record_for
from teacher_cache.store import Store
from teacher_cache.teachers import build_teacher
from teacher_cache.views import ViewPlan

REPO = Path(__file__).resolve().parents[2]
TINY = ["--vfm", "dinov3_vits", "--model-kwargs", '{"depth": 2}', "--views", "1", "--input-size", "128",
        "--policy-epochs", "1", "2", "3", "--quiet"]
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOMLY INITIALISED")


@pytest.fixture(scope="module")
def taco6(tmp_path_factory):
    """A 6-image YOLO dataset made of real TACO photographs."""
    src = REPO.parent / "shared" / "data" / "taco_val"
    if not (src / "data.yaml").is_file():
        pytest.skip("TACO sample not found")
    root = tmp_path_factory.mktemp("taco6")
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for image in sorted((src / "images" / "val").glob("*.jpg"))[:6]:
        shutil.copy(image, root / "images" / "train" / image.name)
        shutil.copy(src / "labels" / "val" / f"{image.stem}.txt", root / "labels" / "train")
    text = (src / "data.yaml").read_text().replace("val: images/val", "train: images/train")
    (root / "data.yaml").write_text(text)
    return root


@pytest.fixture(scope="module")
def reference(taco6, tmp_path_factory):
    """An uninterrupted in-process run (shards of 2 images)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    assert main([*TINY, "--data", str(taco6), "--out", str(out), "--shard-size", "2", "--no-ray"]) == 0
    return out


def test_store_holds_exactly_the_planned_views_and_matches_online(reference, taco6):
    store = Store.open(str(reference))
    plan = ViewPlan(k=1, epochs=(1, 2, 3), input_size=(128, 128))
    teacher = build_teacher("dinov3_vits", depth=2)
    store.check_compatible(teacher=teacher, input_size=128, plan_hash=plan.hash())
    assert store.num_views == plan.num_views == 4 and store.num_images == 6
    assert store.completed_shards() == {0, 1, 2}
    assert all(store.shard_index_problems(s) == [] for s in range(3))
    renderer = Renderer(str(taco6), "train", plan, store_policy(store))
    for i in range(6):
        for v in range(4):  # the cached grid of a replayed view == online teacher on the same record
            online = teacher(torch.from_numpy(renderer(i, v))[None].float() / 255)[0]
            cos = F.cosine_similarity(store.read(renderer.dataset.key(i), v), online, dim=0).mean()
            assert cos >= 0.999, (i, v, cos)
    args = plan.record_args(2)  # a phase view is the trainer's own draw at its virtual epoch
    rec = record_for(renderer.dataset, store_policy(store), args["seed"], args["epoch"], 3)
    assert rec.to_dict() == renderer.record(3, 2).to_dict() and rec.phase == 2


def store_policy(store):
    from pipeline.data.policy import AugPolicy
    p = store.manifest["policy"]
    return AugPolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})


@pytest.mark.slow  # starts a local Ray cluster (~1 min on 2 cores)
def test_ray_run_equals_local_run_and_verifies(reference, taco6, tmp_path, capsys):
    import ray
    out = tmp_path / "store"
    try:
        assert main([*TINY, "--data", str(taco6), "--out", str(out), "--shard-size", "2"]) == 0
    finally:
        ray.shutdown()
    a, b = Store.open(str(reference)), Store.open(str(out))
    assert a.manifest["view_plan"] == b.manifest["view_plan"] and (a.tokens[:] == b.tokens[:]).all()
    assert (a.scale[:] == b.scale[:]).all()
    capsys.readouterr()
    assert main([*TINY, "--data", str(taco6), "--out", str(out), "--shard-size", "2", "--verify", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["problems"] == [] and result["online_cosine_min"] >= 0.999


@pytest.mark.slow  # a real subprocess killed with SIGKILL
def test_killed_run_resumes_without_lost_or_duplicated_views(reference, taco6, tmp_path, capsys):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "jobs.cache_teacher", *TINY, "--data", str(taco6), "--out", str(out),
           "--shard-size", "2", "--no-ray"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while not (out / "done" / "000000.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = Store.open(str(out)).completed_shards()
    assert 0 in done_at_kill
    capsys.readouterr()
    assert main([*TINY, "--data", str(taco6), "--out", str(out), "--shard-size", "2", "--no-ray"]) == 0
    assert f"{len(done_at_kill)} skipped" in capsys.readouterr().out
    a, b = Store.open(str(reference)), Store.open(str(out))
    assert b.completed_shards() == {0, 1, 2} and all(b.shard_index_problems(s) == [] for s in range(3))
    assert (a.tokens[:] == b.tokens[:]).all() and (a.scale[:] == b.scale[:]).all()


def test_embedded_dataset_partial_run_verifies_as_incomplete(tmp_path, capsys):
    out = tmp_path / "store"
    args = [*TINY, "--data", "synthetic", "--split", "val", "--out", str(out), "--shard-size", "4"]
    assert main([*args, "--no-ray", "--max-shards", "1"]) == 0
    store = Store.open(str(out))
    assert store.completed_shards() == {0} and store.read(4, 0) is None and store.read(3, 3) is not None
    capsys.readouterr()
    assert main([*args, "--verify", "2"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert "15 shards incomplete" in result["problems"][0] and result["online_cosine_min"] >= 0.999


def test_mismatched_store_is_refused_by_name(reference, taco6, capsys):
    base = [*TINY, "--data", str(taco6), "--out", str(reference), "--shard-size", "2"]
    assert main(base + ["--no-ray"]) == 0 and "3 skipped" in capsys.readouterr().out  # same: no work
    for extra, word in ((["--vfm", "dinov3_vitb"], "teacher"), (["--input-size", "96"], "input size"),
                        (["--views", "2"], "view plan"), (["--seed", "1"], "view plan")):
        with pytest.raises(SystemExit) as e:
            main(base + extra + ["--verify"])  # checked when opening, before any work
        assert e.value.code == 2 and word in capsys.readouterr().err


def test_bad_input_gives_clear_errors_and_no_corrupt_store(taco6, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--vfm", "dinov9_vitz", "--data", str(taco6), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "unknown --vfm 'dinov9_vitz'" in capsys.readouterr().err
    (tmp_path / "w.pth").write_bytes(b"junk")
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--weights", str(tmp_path / "w.pth"), "--data", str(taco6), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "cannot read weights file" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--data", str(taco6), "--out", str(tmp_path / "notes")])
    assert e.value.code == 2 and "already holds something else" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--data", str(taco6), "--out", str(tmp_path / "full"), "--no-ray"])
    err = capsys.readouterr().err   # units that say something (was "needs about 0.00 GB, has 0.00 GB")
    assert e.value.code == 2 and re.search(r"needs about [\d.]+ [kM]B for the remaining shards but its disk has 1 kB "
                                           "free", err), err
    assert Store.open(str(tmp_path / "full")).completed_shards() == set()


def test_unreadable_image_fails_at_start_or_is_left_out_with_skip(taco6, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(taco6, data)
    images = sorted((data / "images" / "train").glob("*.jpg"))
    images[4].write_bytes(images[4].read_bytes()[: images[4].stat().st_size // 2])  # truncated JPEG
    out = tmp_path / "store"
    with pytest.raises(SystemExit) as e:  # default --on-error raise: every image is decoded before any work
        main([*TINY, "--data", str(data), "--out", str(out), "--shard-size", "2", "--no-ray"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and images[4].name in err and "--on-error skip" in err and not out.exists()
    # skip: listed and left out of the store's data set, as `jobs.train --on-error skip` leaves it out
    assert main([*TINY, "--data", str(data), "--out", str(out), "--shard-size", "2", "--no-ray",
                 "--on-error", "skip"]) == 0
    assert images[4].name in capsys.readouterr().err
    store = Store.open(str(out))
    assert store.keys == [p.stem for p in images if p != images[4]] and store.completed_shards() == {0, 1, 2}
    assert store.manifest["dataset"]["hash"] == load_dataset(data, on_error="skip", verify_images=True).content_hash()
    images[0].write_bytes(b"not an image at all")  # caught when the dataset is loaded
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--data", str(data), "--out", str(tmp_path / "other"), "--no-ray"])
    assert e.value.code == 2 and images[0].name in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
