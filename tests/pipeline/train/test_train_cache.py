"""Training from a budget teacher store (--views K): planned views are replayed with their cached
grids, the online teacher fills in what the store lacks, and foreign stores are refused by name."""
from __future__ import annotations

import math

import pytest
import torch.nn.functional as F

from jobs import cache_teacher
from pipeline.data.shards import write_shards
from pipeline.data.load import default_dataset
from pipeline.train.trainer import TrainConfig, Trainer

SIZE, EPOCHS, IMG = "s", 2, 128


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Half a store: shard 0 (images 0..63) done, the rest missing, as after an interrupted job."""
    out = str(tmp_path_factory.mktemp("cache") / "store")
    rc = cache_teacher.main(["--vfm", "dinov3_vits", "--out", out, "--size", SIZE, "--epochs", str(EPOCHS),
                             "--input-size", str(IMG), "--views", "1", "--shard-size", "64", "--max-shards", "1",
                             "--no-ray", "--quiet"])
    assert rc == 0
    return out


def _trainer(tmp_path, **kw) -> Trainer:
    kw = {"epochs": EPOCHS, "img_size": IMG, "vfm": "dinov3_vits", **kw}
    return Trainer(TrainConfig(size=SIZE, batch_size=4, workers=0, out=str(tmp_path / "run"), max_steps_per_epoch=4,
                               **kw))


def test_cached_targets_match_the_online_teacher(store, tmp_path):
    trainer = _trainer(tmp_path, cache=store)
    items, teacher = trainer.data.train_items, trainer.data.online_teacher()
    checked = 0
    for epoch in range(EPOCHS):
        for index in range(64):                      # shard 0: cached
            image, target = items[(epoch, 0, 0, index)]   # (epoch, step, slot, index) of the plan
            cached = target["teacher"]
            assert cached is not None
            online = teacher(image[None])[0]
            assert F.cosine_similarity(cached, online, dim=0).mean() >= 0.999   # int8 store
            checked += 1
            if index == 3:
                break
        image, target = items[(epoch, 0, 0, 200)]   # shard 3: never written
        assert target["teacher"] is None
    assert checked == 2 * 4


def test_training_mixes_cache_hits_and_online_fallback(store, tmp_path):
    trainer = _trainer(tmp_path, cache=store)
    hits = misses = 0
    for epoch in range(EPOCHS):
        for images, targets, batch in trainer.data.train_loader(epoch):
            losses = trainer.train_step(images, targets, batch)
            assert losses is not None and math.isfinite(losses["loss"].item())
            hits, misses = hits + trainer.data.stats.hits, misses + trainer.data.stats.misses
            trainer.data.teacher_stats()
            if trainer.progress.global_step >= 6 * (epoch + 1):
                break
    assert hits > 0 and misses > 0


def test_streamed_shards_join_the_cache_by_key(store, tmp_path):
    shards = tmp_path / "shards"
    write_shards(default_dataset("train"), shards, shard_size=64, progress=False)
    trainer = _trainer(tmp_path, cache=store, data=str(shards))
    images, targets, batch = next(iter(trainer.data.train_loader(0)))
    assert images.shape[-1] in (IMG - 32, IMG, IMG + 32) or batch.resized
    joined = [t for t in targets if t.get("teacher") is not None]
    for t in joined:
        assert t["teacher"].shape == (384, IMG // 32, IMG // 32)
        assert t["index"] < 64
    assert all(t.get("teacher") is None for t in targets if t["index"] >= 64)


def test_a_store_for_another_plan_or_teacher_is_refused(store, tmp_path):
    with pytest.raises(ValueError, match="epochs 2; this run has epochs 6"):
        _trainer(tmp_path, cache=store, epochs=6)
    with pytest.raises(ValueError, match="teacher"):
        _trainer(tmp_path, cache=store, vfm="dinov3_vitb")
    with pytest.raises(ValueError, match="img_size 128; this run has img_size 160"):
        _trainer(tmp_path, cache=store, img_size=160)
