"""The trainer end to end on CPU: a short DSI+GAM schedule, an exact resume after a SIGKILL,
two gloo ranks with one lambda, non-finite steps, and refused checkpoints."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.train.state import load_train_state
from pipeline.train.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[3]
# 128 px keeps a step well under a second on 2 cores; ViT-S is the smallest DINOv3 teacher.
TINY = ["--size", "s", "--epochs", "2", "--img-size", "128", "--batch-size", "2", "--max-steps-per-epoch", "3",
        "--workers", "0", "--log-every", "1", "--vfm", "dinov3_vits", "--eval-max-images", "2"]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _train(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900, **kw)


def _losses(out: Path) -> dict[tuple[int, int], float]:
    """Last logged total loss per (epoch, batch): a re-run batch after a resume overwrites."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["epoch"], r["step"]): r["loss"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "a"
    run = _train([*TINY, "--out", str(out)])
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_short_schedule_with_dsi_and_gam(uninterrupted):
    out = uninterrupted
    for name in ("last.pth", "best.pth", "metrics.jsonl", "eval.jsonl", "gam.png", "config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1]
    assert all(0.0 <= e["AP"] <= 1.0 for e in evals)
    gam = [e["gam"] for e in evals]
    assert gam[1]["lambda_old"] == gam[0]["lambda_new"]       # the update carries to the next epoch
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert all("loss_distill" in r and r["cache_hit_rate"] == 0.0 for r in rows)
    state = load_train_state(out / "last.pth", "s")
    assert state["epoch"] == 2 and state["gam"]["weight"] == gam[1]["lambda_new"]


def test_killed_run_resumes_to_the_same_losses(uninterrupted, tmp_path):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *TINY, "--out", str(out), "--checkpoint-every", "1"],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:   # kill it inside the second epoch
            if (out / "metrics.jsonl").is_file() and len(_losses(out)) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert load_train_state(out / "last.pth", "s")["global_step"] >= 3
    run = _train([*TINY, "--out", str(out), "--resume", str(out / "last.pth")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert _losses(out) == _losses(uninterrupted)


def test_two_gloo_ranks_train_from_a_cache_with_one_lambda(tmp_path):
    store = tmp_path / "store"
    cache = subprocess.run([sys.executable, "-m", "jobs.cache_teacher", "--vfm", "dinov3_vits", "--out", str(store),
                            "--size", "s", "--epochs", "2", "--input-size", "128", "--views", "1", "--shard-size",
                            "128", "--max-shards", "1", "--no-ray", "--quiet"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert cache.returncode == 0, cache.stderr[-3000:]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "jobs.train", *TINY, "--out", str(out), "--cache", str(store)]
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["cache_hit_rate"] for r in rows) > 0                  # half the store is there
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    for e in evals:
        ranks = e["gam"]["lambda_per_rank"]
        assert len(ranks) == 2 and ranks[0] == ranks[1] == e["gam"]["lambda_new"]
    assert evals[-1]["gam"]["lambda_new"] != evals[0]["gam"]["lambda_old"]   # GAM moved it


def _trainer(tmp_path, **kw) -> Trainer:
    kw = {"distill": "none", **kw}
    cfg = TrainConfig(size="s", epochs=2, img_size=128, batch_size=2, workers=0, out=str(tmp_path),
                      max_steps_per_epoch=2, **kw)
    return Trainer(cfg)


def test_non_finite_losses_skip_the_step_then_stop(tmp_path):
    trainer = _trainer(tmp_path, max_bad_steps=2)
    images, targets, batch = next(iter(trainer.data.train_loader(0)))
    before = [p.detach().clone() for p in trainer.student.parameters()]
    nan_images = torch.full_like(images, float("nan"))
    assert trainer.train_step(nan_images, targets, batch) is None
    assert trainer.progress.bad_steps == 1 and trainer.progress.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.train_step(nan_images, targets, batch)


def test_a_batch_without_boxes_trains(tmp_path):
    trainer = _trainer(tmp_path)
    images, targets, batch = next(iter(trainer.data.train_loader(0)))
    empty = [{**t, "boxes": t["boxes"][:0], "labels": t["labels"][:0]} for t in targets]
    losses = trainer.train_step(images, empty, batch)
    assert losses is not None and math.isfinite(float(losses["loss"]))


def test_resume_refuses_another_size_or_format(uninterrupted, tmp_path):
    with pytest.raises(ValueError, match="size 's'.*--size is 'l'"):
        load_train_state(uninterrupted / "last.pth", "l")
    weights_only = tmp_path / "weights.pth"
    torch.save({"model": {}}, weights_only)
    with pytest.raises(ValueError, match="--finetune"):
        load_train_state(weights_only, "s")


def test_rt_co_detr_distills_from_a_detector_checkpoint(tmp_path):
    from detector import build_detector
    from detector.checkpoint import save_checkpoint

    teacher_path = tmp_path / "teacher_m.pth"
    save_checkpoint(build_detector("m", num_classes=6), teacher_path)
    trainer = _trainer(tmp_path / "run", distill="codetr", teacher_checkpoint=str(teacher_path))
    images, targets, batch = next(iter(trainer.data.train_loader(0)))
    losses = trainer.train_step(images, targets, batch)
    assert {"loss_kd_logit", "loss_kd_box", "loss_kd_feat"} <= set(losses)
    assert all(math.isfinite(losses[k].item()) for k in ("loss_kd_logit", "loss_kd_box", "loss_kd_feat"))
    grads = [p.grad for p in trainer.student.codetr.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not any(p.requires_grad for p in trainer.distill.teacher.parameters())


def test_finetune_from_an_80_class_checkpoint_with_its_projector(tmp_path):
    from detector import build_detector
    from detector.checkpoint import save_checkpoint
    from detector.dsi import DSI, DSIConfig

    path = tmp_path / "coco_s.pth"
    save_checkpoint(build_detector("s", num_classes=80), path, dsi=DSI(DSIConfig()))   # official layout, 768-d
    trainer = _trainer(tmp_path / "run", finetune=str(path), distill="dsi", vfm="dinov3_vits")
    assert trainer.data.num_classes == 6 and trainer.student.dsi.cfg.teacher_dim == 384   # projector dropped
    images, targets, batch = next(iter(trainer.data.train_loader(0)))
    assert trainer.train_step(images, targets, batch) is not None


@pytest.mark.parametrize("tap,projector,loss", [("hybrid", "mlp", "mse"), ("backbone", "conv1x1", "cosine")])
def test_dsi_ablation_flags_train_the_chosen_tap(tmp_path, tap, projector, loss):
    """--dsi-tap/--dsi-projector/--dsi-loss (the paper's DSI ablations) reach the step: the projector
    has the tapped map's width, the distillation loss is finite, and its gradient reaches the tap."""
    from jobs.train import parse_args
    cfg = parse_args(["--dsi-tap", tap, "--dsi-projector", projector, "--dsi-loss", loss])
    assert (cfg.dsi_tap, cfg.dsi_projector, cfg.dsi_loss) == (tap, projector, loss)
    trainer = _trainer(tmp_path, distill="dsi", vfm="dinov3_vits", dsi_tap=tap, dsi_projector=projector,
                       dsi_loss=loss)
    dsi = trainer.student.dsi
    width = trainer.student.detector.cfg.backbone_channels[-1] if tap == "backbone" else 256
    assert (dsi.cfg.tap, dsi.cfg.projector, dsi.cfg.loss, dsi.cfg.student_dim) == (tap, projector, loss, width)
    images, targets, batch = next(iter(trainer.data.train_loader(0)))
    losses, _ = trainer.train_step.losses(images, targets, batch)
    assert math.isfinite(float(losses["loss_distill"])) and float(losses["loss_distill"]) > 0
    losses["loss_distill"].backward()
    last_stage = list(trainer.student.detector.backbone.stages)[-1]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in last_stage.parameters())
