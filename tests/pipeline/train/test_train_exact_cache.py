"""Training from an exact teacher store (Zarr): the recipe's phases compressed into 4 epochs (mosaic,
multi-scale and MixUp all present) train with 100% exact hits on batches bit-identical to the run
without a cache; WebDataset shards of the same data stream the same batches and targets (in worker
processes, on 1 and 2 gloo ranks, and after a mid-epoch resume); plain Zarr reads the view the trainer
receives; a store still being written serves its epochs; damage is caught by the trainer and by
--verify and rebuilt by a re-run; a store from other teacher weights is refused at start."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import zarr

from jobs import cache_teacher
from pipeline.data import synthetic
from pipeline.data.load import load_dataset
from pipeline.data.shards import write_shards
from pipeline.train.data import build_train_data
from pipeline.train.distributed import DistInfo
from pipeline.train.recipe import resolve_recipe
from pipeline.train.trainer import TrainConfig, Trainer
from teacher_cache import exact
from teacher_cache.store import StoreError
from teacher_cache.teachers import build_teacher

EPOCHS, IMG, N = 4, 128, 16
PLAN = ["--size", "s", "--epochs", str(EPOCHS), "--input-size", str(IMG), "--global-batch", "4",
        "--mixup-group", "2", "--steps-per-block", "2"]   # 4 steps per epoch -> 2 blocks per epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """16 images of the embedded synthetic set as a COCO json."""
    return synthetic.first_images(N, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory) -> str:
    """The same 16 images as WebDataset shards (5 per tar)."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(load_dataset(data, split="train"), out, shard_size=5, progress=False)
    return str(out)


def _cache(data, out, *extra) -> int:
    return cache_teacher.main(["--vfm", "dinov3_vits", "--data", data, "--out", str(out), *PLAN, "--no-ray",
                               "--quiet", *extra])


@pytest.fixture(scope="module")
def store(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exact") / "store"
    assert _cache(data, out) == 0
    return out


def _cfg(tmp_path, data, **kw) -> TrainConfig:
    kw = {"epochs": EPOCHS, "img_size": IMG, "vfm": "dinov3_vits", "batch_size": 4, "mixup_group": 2, "workers": 0,
          **kw}
    return TrainConfig(size="s", data=data, val_data="synthetic", out=str(tmp_path / "run"), **kw)


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


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16]


def _steps(data, epochs=range(EPOCHS), start=0):
    """Per step: (epoch, step, indices, size, MixUp, per-sample image / box / teacher-target digests)."""
    out = []
    for epoch in epochs:
        for images, targets, batch in data.train_loader(epoch, start if epoch == epochs[0] else 0):
            teacher = data.teacher_targets(images, targets, batch)
            out.append((epoch, batch.step, list(batch.indices), batch.size, batch.mixup,
                        [_digest(x) for x in images], [_digest(t["boxes"].as_subclass(torch.Tensor)) for t in targets],
                        [_digest(x) for x in teacher]))
    return out


def test_streamed_shards_see_the_map_style_batches_and_every_exact_target(store, data, shards, tmp_path):
    """Shards read by byte range in 2 DataLoader worker processes follow the plan: the same samples,
    augmentations, sizes and MixUp partners at every step, joined to the exact store by (epoch, step, slot)."""
    mapped = Trainer(_cfg(tmp_path, data, cache=str(store)))
    streamed = Trainer(_cfg(tmp_path, shards, cache=str(store), workers=2))
    assert len(streamed.data.train_items) == N and streamed.data.plan.hash() == mapped.data.plan.hash()
    want = _steps(mapped.data)
    assert mapped.data.teacher_stats()["cache_exact_rate"] == 1.0
    assert _steps(streamed.data) == want
    stats = streamed.data.teacher_stats()
    assert stats["cache_exact_rate"] == 1.0 and stats["online_rate"] == 0.0


def test_a_streamed_run_resumed_mid_epoch_continues_with_the_same_batches(store, shards, tmp_path):
    first = Trainer(_cfg(tmp_path, shards, cache=str(store), checkpoint_every=1))
    full = _steps(first.data, epochs=[1])
    first.progress.epoch = 1
    for images, targets, batch in first.data.train_loader(1):
        first.train_step(images, targets, batch)
        first.progress.step_in_epoch += 1
        if first.progress.step_in_epoch == 2:
            break
    first.out.mkdir(parents=True, exist_ok=True)
    first.save("last.pth")
    resumed = Trainer(_cfg(tmp_path, shards, cache=str(store), resume=str(first.out / "last.pth"), exist_ok=True))
    assert (resumed.progress.epoch, resumed.progress.step_in_epoch) == (1, 2)
    assert _steps(resumed.data, epochs=[1], start=resumed.progress.step_in_epoch) == full[2:]
    assert resumed.data.teacher_stats()["cache_exact_rate"] == 1.0


def test_plain_zarr_reads_the_view_the_trainer_receives(store, data, tmp_path):
    trainer = Trainer(_cfg(tmp_path, data, cache=str(store)))
    images, targets, batch = next(iter(trainer.data.train_loader(1)))
    received = trainer.data.teacher_targets(images, targets, batch)
    g = zarr.open_group(str(store), mode="r")                       # nothing of ours: plain Zarr v3
    h, w = (int(v) for v in g["grid"][1, batch.step])
    assert (h, w) == (batch.size // 32, batch.size // 32)
    assert g["sample"][1, batch.step].tolist() == batch.indices
    for slot in range(len(targets)):
        tokens, scale = g[f"tokens/{h}x{w}"][1, batch.step, slot], g[f"scale/{h}x{w}"][1, batch.step, slot]
        assert np.array_equal(tokens, targets[slot]["teacher_tokens"].numpy())
        grid = torch.from_numpy(tokens.astype(np.float32) * scale.astype(np.float32)[:, None]).T.reshape(-1, h, w)
        assert torch.equal(grid, received[slot])


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


def _step_objects(root: Path, epoch: int, step: int) -> tuple[Path, Path]:
    """The tokens and scale shard objects of one step (in the array of the step's grid)."""
    h, w = (int(v) for v in zarr.open_group(str(root), mode="r")["grid"][epoch, step])
    return (root / "tokens" / f"{h}x{w}" / "c" / str(epoch) / str(step) / "0" / "0" / "0",
            root / "scale" / f"{h}x{w}" / "c" / str(epoch) / str(step) / "0" / "0")


def test_damaged_views_are_caught_by_the_trainer_and_by_verify_and_rebuilt(store, data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    flipped, cut, (_, gone) = _step_objects(bad, 0, 0)[0], _step_objects(bad, 1, 3)[0], _step_objects(bad, 2, 0)
    raw = bytearray(flipped.read_bytes())
    raw[-50] ^= 0x55                                     # in the last view (slot 3)
    flipped.write_bytes(bytes(raw))
    cut.write_bytes(cut.read_bytes()[:-50])             # truncated: the last view
    gone.unlink()                                        # a deleted shard object: the step's 4 views
    (bad / "done" / "e0002" / "b000001.json").unlink()   # an unmarked block: 2 steps not written
    trainer = Trainer(_cfg(tmp_path, data, cache=str(bad)))
    for epoch in range(3):
        for images, targets, batch in trainer.data.train_loader(epoch):
            trainer.data.teacher_targets(images, targets, batch)
    s = trainer.data.stats
    assert (s.damaged, s.missing, s.exact) == (6, 8, 3 * 16 - 14)
    strict = Trainer(_cfg(tmp_path, data, cache=str(bad), strict_cache=True))
    with pytest.raises(StoreError, match=r"strict-cache.*\(epoch 0, step 0, slot 3\) in .*/c/0/0/0/0/0"):
        for images, targets, batch in strict.data.train_loader(0):
            pass
    assert _cache(data, bad, "--verify", "1") == 1
    err = capsys.readouterr().err
    assert "c/0/0/0/0/0: fails its CRC-32C" in err and "c/1/3/0/0/0: fails its CRC-32C" in err
    assert "c/2/0/0/0: shard object missing" in err and "e0002/b000001" in err and "not written yet" in err
    assert _cache(data, bad) == 0                        # a re-run re-checks every block and rebuilds the damaged
    out = capsys.readouterr().out
    assert out.count("rebuilt block") == 3 and "blocks: 4 written, 4 skipped" in out
    assert _cache(data, bad, "--verify", "1") == 0 and _cache(data, store, "--verify", "1") == 0
    for name in ("c/0/0/0/0/0", "c/1/3/0/0/0"):
        a, b = [next(p for p in root.rglob("*") if str(p).endswith(name) and "tokens" in str(p))
                for root in (store, bad)]
        assert a.read_bytes() == b.read_bytes()          # the rebuilt objects are the originals


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


def _rank_steps(rank, world, port, cfg, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    data = build_train_data(cfg, resolve_recipe("s", EPOCHS), dist, cfg.batch_size)
    queue.put((rank, _steps(data, epochs=range(2)), data.teacher_stats()["cache_exact_rate"]))
    torch.distributed.destroy_process_group()


def _ranks(cfg, world: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_steps, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = {r: (steps, rate) for r, steps, rate in (queue.get(timeout=300) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [got[r] for r in range(world)]


@pytest.mark.slow   # 3 spawned ranks (~40 s on 2 cores)
def test_one_and_two_gloo_ranks_streamed_or_not_see_the_same_batches_and_targets(store, data, shards, tmp_path):
    """Per global step: the same samples, sizes, MixUp, images, boxes and teacher targets, on 1 rank
    (map-style) and on 2 gloo ranks (map-style and streamed from shards), every target from the store."""
    one = build_train_data(_cfg(tmp_path, data, cache=str(store)), resolve_recipe("s", EPOCHS),
                           DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 4)
    want = _steps(one, epochs=range(2))
    assert len(want) == 8
    for source in (data, shards):
        (r0, rate0), (r1, rate1) = _ranks(_cfg(tmp_path, source, cache=str(store), batch_size=2), 2)
        assert rate0 == rate1 == 1.0
        for a, x, y in zip(want, r0, r1, strict=True):
            assert a[:2] == x[:2] == y[:2] and a[3:5] == x[3:5] == y[3:5]         # same step, size, MixUp
            assert a[2] == x[2] + y[2]                                             # the same samples, in order
            assert all(a[k] == x[k] + y[k] for k in (5, 6, 7))                     # images, boxes, targets


def test_render_workers_store_the_same_bytes(store, data, tmp_path):
    """--no-ray --render-workers 2 renders the steps ahead in worker processes: same views, same objects."""
    out = tmp_path / "workers"
    assert _cache(data, out, "--render-workers", "2") == 0
    files = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files and files == sorted(p.relative_to(out) for p in out.rglob("*")
                                     if p.is_file() and p.name != "manifest.json")
    for f in files:
        if f.parts[0] != "done":   # the completion markers carry their write time
            assert (store / f).read_bytes() == (out / f).read_bytes(), f


# -- a 2-rank run resumed on 1 rank: the same samples and teacher targets at every later step --------------
REPO = Path(__file__).resolve().parents[3]
DRIVER = """
import hashlib, json, os, sys
import torch
from pipeline.train import data as D, engine as E
limit, record = int(os.environ["KILL_AFTER_STEP"]), os.environ["RECORD"]
digest = lambda x: hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16]
targets_of = D.TrainData.teacher_targets
def recorded(self, images, targets, batch):
    out = targets_of(self, images, targets, batch)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(f"{record}.{rank}", "a") as f:
        f.write(json.dumps([batch.epoch, batch.step, list(batch.indices), batch.size, batch.mixup,
                            [digest(x) for x in images], [digest(t["boxes"].as_subclass(torch.Tensor)) for t in targets],
                            [digest(x) for x in out]]) + "\\n")
    return out
D.TrainData.teacher_targets = recorded
step = E.Step.__call__
def killed(self, *a):
    if 0 <= limit <= self.progress.global_step:
        torch.distributed.barrier()   # rank 0 has written the checkpoint of step `limit`
        os._exit(9)
    return step(self, *a)
E.Step.__call__ = killed
from jobs.train import main
sys.exit(main(sys.argv[1:]))
"""


def _train(tmp_path, args, procs: int, kill_after: int, record: Path):
    import subprocess
    import sys
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RECORD=str(record),
               KILL_AFTER_STEP=str(kill_after))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(procs)]
    return subprocess.run([*launch, str(driver), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow   # a 2-rank run killed after 5 steps, resumed on 1 rank (~60 s on 2 cores)
def test_a_two_rank_run_resumed_on_one_rank_sees_the_same_samples_and_targets(store, data, tmp_path):
    """The store, built for a global batch of 4, is all the runs are given (--cache): the 2-rank run and
    its resume on 1 rank adopt its plan, serve every target from it, and the resumed steps see the
    samples, augmentations, sizes, MixUp, boxes and teacher targets of the plan."""
    one = build_train_data(_cfg(tmp_path, data, cache=str(store)), resolve_recipe("s", EPOCHS),
                           DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 4)
    want = json.loads(json.dumps(_steps(one)))
    out = tmp_path / "run"
    common = ["--size", "s", "--data", data, "--val-data", "synthetic", "--cache", str(store), "--vfm", "dinov3_vits",
              "--workers", "0", "--log-every", "1", "--eval-max-images", "2", "--checkpoint-every", "1",
              "--out", str(out)]
    run = _train(tmp_path, common, 2, kill_after=5, record=tmp_path / "two")
    assert run.returncode != 0 and (out / "last.pth").is_file(), run.stderr[-3000:]
    state = torch.load(out / "last.pth", map_location="cpu", weights_only=False)
    assert (state["world_size"], state["batch_size"], state["global_step"]) == (2, 2, 5)
    run = _train(tmp_path, [*common, "--resume", str(out)], 1, kill_after=-1, record=tmp_path / "one")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed on 1 process(es) a run written by 2" in run.stderr and "denoising noise" in run.stderr
    two = [json.loads(line) for r in (0, 1) for line in (tmp_path / f"two.{r}").read_text().splitlines()]
    merged = {}
    for rec in two:   # rank 0 (slots 0-1) first, then rank 1 (slots 2-3)
        key = (rec[0], rec[1])
        merged[key] = rec if key not in merged else [*rec[:2], merged[key][2] + rec[2], *rec[3:5],
                                                       *(merged[key][k] + rec[k] for k in (5, 6, 7))]
    assert [merged[(e, s)] for e, s in sorted(merged)] == want[:len(merged)]   # the 2-rank steps: the plan's
    resumed = [json.loads(line) for line in (tmp_path / "one.0").read_text().splitlines()]
    assert [r[:2] for r in resumed] == [w[:2] for w in want[5:]]              # from global step 5 on, to the end
    assert resumed == want[5:]                                                # every sample, view and target
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * EPOCHS and all(r["cache_exact_rate"] == 1.0 for r in rows)
