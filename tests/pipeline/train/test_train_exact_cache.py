"""Training from an exact teacher store: the recipe's phases compressed into 4 epochs (mosaic,
multi-scale and MixUp all present) train with 100% exact hits on batches bit-identical to the run
without a cache; a store still being written serves its epochs; damage is caught by the trainer
and by --verify; a store from other teacher weights is refused at start; 1 and 2 gloo ranks see
the same samples per step."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from jobs import cache_teacher
from pipeline.data import synthetic
from pipeline.train.data import build_train_data
from pipeline.train.distributed import DistInfo
from pipeline.train.recipe import resolve_recipe
from pipeline.train.trainer import TrainConfig, Trainer
from teacher_cache import exact
from teacher_cache.store import StoreError
from teacher_cache.teachers import build_teacher

EPOCHS, IMG, N = 4, 128, 16
PLAN = ["--size", "s", "--epochs", str(EPOCHS), "--input-size", str(IMG), "--global-batch", "4",
        "--mixup-group", "2", "--steps-per-shard", "2"]   # 4 steps per epoch -> 2 shard files per epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """16 images of the embedded synthetic set as a COCO json."""
    src = synthetic.ensure_generated("train")
    d = json.loads((src / "annotations" / "instances_train.json").read_text())
    images = d["images"][:N]
    ids = {i["id"] for i in images}
    root = tmp_path_factory.mktemp("tiny")
    (root / "train").mkdir()
    (root / "annotations").mkdir()
    for i in images:
        shutil.copy(src / "train" / i["file_name"], root / "train" / i["file_name"])
    ann = root / "annotations" / "instances_train.json"
    ann.write_text(json.dumps({**d, "images": images, "annotations": [a for a in d["annotations"]
                                                                       if a["image_id"] in ids]}))
    return str(ann)


def _cache(data, out, *extra) -> int:
    return cache_teacher.main(["--vfm", "dinov3_vits", "--data", data, "--out", str(out), *PLAN, "--no-ray",
                               "--quiet", *extra])


@pytest.fixture(scope="module")
def store(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exact") / "store"
    assert _cache(data, out) == 0
    return out


def _cfg(tmp_path, data, **kw) -> TrainConfig:
    kw = {"epochs": EPOCHS, "img_size": IMG, "vfm": "dinov3_vits", "batch_size": 4, "mixup_group": 2, **kw}
    return TrainConfig(size="s", data=data, val_data="synthetic", workers=0, out=str(tmp_path / "run"), **kw)


def test_exact_cache_serves_every_target_on_the_batches_of_the_run_without_it(store, data, tmp_path):
    cached, plain = Trainer(_cfg(tmp_path, data, cache=str(store))), Trainer(_cfg(tmp_path, data, distill="none"))
    online = build_teacher("dinov3_vits")                 # fp32, as the store
    seen = {"mosaic": 0, "mixup": 0, "rescaled": 0}
    cos = []
    for epoch in range(EPOCHS):
        for (ia, ta, ra), (ib, tb, rb) in zip(cached.data.train_loader(epoch), plain.data.train_loader(epoch),
                                              strict=True):
            assert torch.equal(ia, ib) and ra == rb          # bit-identical batches and step records
            for x, y in zip(ta, tb):
                assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])
            targets = cached.data.teacher_targets(ia, ta, ra)
            cos.append(F.cosine_similarity(targets, online(ia), dim=1).mean().item())
            seen["mosaic"] += sum(t["record"]["mosaic"] is not None for t in ta)
            seen["mixup"] += ra.mixup
            seen["rescaled"] += ra.size != IMG
    assert all(seen.values()), seen
    stats = cached.data.teacher_stats()
    assert stats["cache_exact_rate"] == 1.0 and stats["online_rate"] == 0.0
    assert min(cos) >= 0.999                               # int8 store vs the online teacher
    losses = cached.train_step(ia, ta, ra)
    assert torch.isfinite(losses["loss"])


def test_a_run_behind_the_cache_job_uses_the_stored_epochs(data, tmp_path, monkeypatch):
    out = tmp_path / "partial"
    assert _cache(data, out, "--max-shards", "2") == 0      # epoch 0 only: the job is "still writing"
    trainer = Trainer(_cfg(tmp_path, data, cache=str(out)))
    for epoch, want in ((0, 1.0), (1, 0.0)):
        for images, targets, batch in trainer.data.train_loader(epoch):
            trainer.data.teacher_targets(images, targets, batch)
        stats = trainer.data.teacher_stats()
        assert stats["cache_exact_rate"] == want and stats["online_rate"] == 1.0 - want
    assert _cache(data, out) == 0                            # the job resumes: only the missing files
    monkeypatch.setattr(exact, "MISS_RETRY_S", 0.0)          # a reader looks again after MISS_RETRY_S
    for images, targets, batch in trainer.data.train_loader(1):
        trainer.data.teacher_targets(images, targets, batch)
    assert trainer.data.teacher_stats()["cache_exact_rate"] == 1.0


def test_damaged_views_are_caught_by_the_trainer_and_by_verify(store, data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    flipped, cut, gone = (bad / "e0000" / "s000000.bin", bad / "e0001" / "s000001.bin", bad / "e0002" / "s000000.bin")
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    flipped.write_bytes(bytes(raw))
    cut.write_bytes(cut.read_bytes()[:-50])
    gone.unlink()
    trainer = Trainer(_cfg(tmp_path, data, cache=str(bad)))
    for epoch in range(3):
        for images, targets, batch in trainer.data.train_loader(epoch):
            trainer.data.teacher_targets(images, targets, batch)
    s = trainer.data.stats
    assert s.damaged == 2 and s.missing == 8 and s.exact == 3 * 16 - 10   # 1 view each; a whole file
    strict = Trainer(_cfg(tmp_path, data, cache=str(bad), strict_cache=True))
    with pytest.raises(StoreError, match=r"strict-cache.*e0000/s000000.bin view"):
        for images, targets, batch in strict.data.train_loader(0):
            pass
    assert _cache(data, bad, "--verify", "1") == 1
    err = capsys.readouterr().err
    assert "e0000/s000000.bin" in err and "checksum" in err and "e0001/s000001.bin" in err and "truncated" in err
    assert _cache(data, store, "--verify", "1") == 0          # the intact store passes, cosine included


def test_a_store_from_other_teacher_weights_is_refused_at_start(data, tmp_path):
    from safetensors.torch import save_file
    teacher = build_teacher("dinov3_vits")
    paths = []
    for k in (1.0, 1.01):
        path = tmp_path / f"w{k}.safetensors"
        save_file({n: (v * k).contiguous() for n, v in teacher.model.state_dict().items()}, str(path))
        paths.append(str(path))
    out = tmp_path / "weighted"
    assert _cache(data, out, "--weights", paths[0], "--max-shards", "1") == 0
    with pytest.raises(StoreError, match="weights"):
        Trainer(_cfg(tmp_path, data, cache=str(out), weights=paths[1]))
    trainer = Trainer(_cfg(tmp_path, data, cache=str(out)))      # no --weights: served from the store ...
    assert "cannot be served" in trainer.data.teacher_unavailable
    with pytest.raises(StoreError, match="cannot be served"):     # ... but a miss stops the run
        for images, targets, batch in trainer.data.train_loader(1):
            trainer.data.teacher_targets(images, targets, batch)


def _rank_samples(rank, world, port, cfg, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    data = build_train_data(cfg, resolve_recipe("s", EPOCHS), dist, cfg.batch_size)
    seen = []
    for epoch in range(2):
        for images, targets, batch in data.train_loader(epoch):
            seen.append((epoch, batch.step, batch.indices, batch.size, batch.mixup, images.sum(dtype=torch.float64).item()))
    queue.put((rank, seen))
    torch.distributed.destroy_process_group()


def test_one_and_two_gloo_ranks_see_the_same_samples(data, tmp_path):
    def run(world, batch):
        cfg = _cfg(tmp_path, data, distill="none", batch_size=batch)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank_samples, args=(r, world, port, cfg, queue)) for r in range(world)]
        for p in procs:
            p.start()
        got = dict(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        return [got[r] for r in range(world)]

    (one,), two = run(1, 4), run(2, 2)
    assert len(one) == 8
    for a, r0, r1 in zip(one, *two, strict=True):
        assert a[:2] == r0[:2] == r1[:2] and a[3:5] == r0[3:5] == r1[3:5]   # same step, size, MixUp
        assert a[2] == r0[2] + r1[2]                                         # the same samples, in order
        assert a[5] == pytest.approx(r0[5] + r1[5], rel=1e-12)               # the same images


def test_render_workers_store_the_same_bytes(store, data, tmp_path):
    """--no-ray --render-workers 2 renders the steps ahead in worker processes: same views, same files."""
    out = tmp_path / "workers"
    assert _cache(data, out, "--render-workers", "2") == 0
    files = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files and files == sorted(p.relative_to(out) for p in out.rglob("*")
                                     if p.is_file() and p.name != "manifest.json")
    for f in files:
        assert (store / f).read_bytes() == (out / f).read_bytes(), f
