"""Shards, teacher stores and training over object storage: a real S3 endpoint (moto's server) on
127.0.0.1, reached through s3fs with the endpoint and credentials from the environment only."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from jobs import cache_teacher, make_shards  # noqa: E402
from teacher_cache.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUCKET = "rtdetr-test"
CACHE = ["--vfm", "dinov3_vits", "--size", "s", "--epochs", "2", "--input-size", "128", "--views", "1",
         "--shard-size", "64", "--quiet"]
TRAIN = ["--size", "s", "--epochs", "2", "--img-size", "128", "--batch-size", "2", "--max-steps-per-epoch", "3",
         "--workers", "0", "--log-every", "1", "--vfm", "dinov3_vits", "--eval-max-images", "2"]
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOMLY INITIALISED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with one bucket; AWS_* variables point every client at it."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "rtdetr-test",
           "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16), "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield {"env": env, "fs": fs, "port": port}
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not _port_open(port), "the S3 endpoint is still listening"


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # a cache job and a training run, each killed and resumed (~2 min on 2 cores)
def test_shards_store_and_training_on_s3_resume_after_kills(s3, tmp_path, capsys):
    fs, secret = s3["fs"], s3["env"]["AWS_SECRET_ACCESS_KEY"]
    shards, store_url = f"s3://{BUCKET}/shards/synthetic", f"s3://{BUCKET}/cache/vits_s128"
    manifest = make_shards.main(["--out", shards, "--shard-size", "64"])
    assert manifest["num_shards"] == 4 and fs.isfile(f"{BUCKET}/shards/synthetic/shard-000003.tar")
    assert make_shards.main(["--out", shards, "--shard-size", "64"]) == manifest  # resume: all kept

    # the cache job, SIGKILLed once its first shard is marked on S3, then re-run: it resumes
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cache_teacher", *CACHE, "--out", store_url, "--no-ray"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            if fs.exists(f"{BUCKET}/cache/vits_s128/done/000000.json"):
                break
            time.sleep(0.2)
    finally:
        _kill_group(proc)
    logs = proc.stdout.read().decode()
    done_at_kill = Store.open(store_url).completed_shards()
    assert 0 in done_at_kill and len(done_at_kill) < 4, logs
    capsys.readouterr()
    assert cache_teacher.main([*CACHE, "--out", store_url, "--no-ray"]) == 0
    out = capsys.readouterr().out
    assert f"{len(done_at_kill)} skipped" in out, out
    assert cache_teacher.main([*CACHE, "--out", store_url, "--verify", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["problems"] == [] and result["complete_shards"] == 4 and result["online_cosine_min"] >= 0.999

    # training streams the shards and reads the store from S3; killed after a checkpoint, resumed
    run = tmp_path / "run"
    args = [*TRAIN, "--data", shards, "--cache", store_url, "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *args, "--checkpoint-every", "1"], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (run / "last.pth").is_file():
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        _kill_group(proc)
    logs += proc.stdout.read().decode()
    assert (run / "last.pth").is_file(), logs[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "jobs.train", *args, "--resume", str(run / "last.pth")],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    logs += resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["cache_hit_rate"] for r in rows) > 0          # grids came from the S3 store
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals][-1] == 1
    assert secret not in logs + out                           # credentials never reach a log
    for path in fs.find(BUCKET):
        if path.endswith(".json"):
            assert secret not in fs.cat_file(path).decode()


def _tiny_coco(root: Path, n: int = 16) -> str:
    """The first ``n`` images of the embedded synthetic set as a COCO json."""
    from pipeline.data import synthetic
    src = synthetic.ensure_generated("train")
    d = json.loads((src / "annotations" / "instances_train.json").read_text())
    images = d["images"][:n]
    ids = {i["id"] for i in images}
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in images:
        (root / "train" / i["file_name"]).write_bytes((src / "train" / i["file_name"]).read_bytes())
    ann = root / "annotations" / "instances_train.json"
    ann.write_text(json.dumps({**d, "images": images,
                               "annotations": [a for a in d["annotations"] if a["image_id"] in ids]}))
    return str(ann)


def _steps(data, epochs=(0, 1)) -> list:
    """Per step: (epoch, step, indices, size, MixUp, per-sample image and teacher-target digests)."""
    out = []
    for epoch in epochs:
        for images, targets, batch in data.train_loader(epoch):
            teacher = data.teacher_targets(images, targets, batch)
            out.append((epoch, batch.step, list(batch.indices), batch.size, batch.mixup,
                        [hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in images],
                        [hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in teacher]))
    return out


def _rank(rank, world, port, cfg, queue):
    import torch

    from pipeline.train.data import build_train_data
    from pipeline.train.distributed import DistInfo
    from pipeline.train.recipe import resolve_recipe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    data = build_train_data(cfg, resolve_recipe("s", 4), dist, cfg.batch_size)
    queue.put((rank, _steps(data), data.teacher_stats()["cache_exact_rate"]))
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # a cache job to S3 and two spawned gloo ranks (~40 s on 2 cores)
def test_streamed_shards_and_an_exact_store_on_s3_follow_the_plan(s3, tmp_path):
    """Shards and the exact store both on S3: 2 gloo ranks streaming the shards (each with a DataLoader
    worker and its own S3 client after the fork) see, step by step, the 1-rank map-style run's images
    and teacher targets bit for bit, every target from the store."""
    import torch.multiprocessing as mp

    from pipeline.data.load import load_dataset
    from pipeline.data.shards import write_shards
    from pipeline.train.trainer import TrainConfig, Trainer

    data = _tiny_coco(tmp_path / "coco")
    shards, store = f"s3://{BUCKET}/shards/tiny", f"s3://{BUCKET}/cache/exact_tiny"
    write_shards(load_dataset(data, split="train"), shards, shard_size=5, progress=False)
    plan = ["--size", "s", "--epochs", "4", "--input-size", "128", "--global-batch", "4", "--mixup-group", "2",
            "--steps-per-block", "2"]
    assert cache_teacher.main(["--vfm", "dinov3_vits", "--data", data, "--out", store, *plan, "--only-epochs", "0",
                               "1", "--no-ray", "--quiet"]) == 0

    def cfg(source, batch, workers):
        return TrainConfig(size="s", data=source, val_data="synthetic", epochs=4, img_size=128, batch_size=batch,
                           mixup_group=2, vfm="dinov3_vits", cache=store, workers=workers, out=str(tmp_path / "run"))

    mapped = Trainer(cfg(data, 4, 0)).data
    want = _steps(mapped)
    assert mapped.teacher_stats()["cache_exact_rate"] == 1.0 and len(want) == 8
    ctx, port = mp.get_context("spawn"), _free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, cfg(shards, 2, 1), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r: (steps, rate) for r, steps, rate in (queue.get(timeout=300) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (r0, rate0), (r1, rate1) = got[0], got[1]
    assert rate0 == rate1 == 1.0
    for a, x, y in zip(want, r0, r1, strict=True):
        assert a[:2] == x[:2] == y[:2] and a[3:5] == x[3:5] == y[3:5] and a[2] == x[2] + y[2]
        assert a[5] == x[5] + y[5] and a[6] == x[6] + y[6]        # images and teacher targets, bit for bit


def test_missing_bucket_is_named_with_the_fix(s3, capsys):
    with pytest.raises(ValueError) as e:   # one line through pipeline.cli.run, as every job's errors
        make_shards.main(["--out", "s3://no-such-bucket/shards", "--shard-size", "64"])
    assert "bucket 'no-such-bucket' does not exist" in str(e.value) and "aws s3 mb" in str(e.value)
    with pytest.raises(SystemExit) as e:
        cache_teacher.main([*CACHE, "--model-kwargs", '{"depth": 1}', "--out", "s3://no-such-bucket/store",
                            "--verify"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "s3://no-such-bucket/store" in err and "does not exist" in err
