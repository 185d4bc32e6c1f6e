"""Our training step against the official RT-DETRv4 code's, at identical math, stepped round-robin.

    python -m benchmarks.official_step --official-src /path/to/RT-DETRv4 --size s --img-size 320 \
        --batch-size 2 --steps 4

The official model, criterion (RTv4Criterion with its DSI term and GAM), optimizer and EMA come from
its own YAML configs (configs/rtv4/rtv4_hgnetv2_<size>_coco.yml; backbone pretraining off, the
number of classes of our data) through ``sys.path`` pointing at ``--official-src``; its step is its
own ``train_one_epoch`` run over one batch (so its per-step logging syncs count; its per-epoch
bookkeeping is a few operations). Ours is ``Trainer.train_step``. Both get the same images and
targets (the trainer's collated batches), the same loss terms and, with the teacher on, the same
frozen ViT-B/16 (our timm DINOv3 ViT-B, random init; on the official side behind its
``DINOv3TeacherModel``, whose hub checkout is not needed). Precision as the official default:
fp16 autocast + GradScaler on CUDA, fp32 on the CPU. The first step of each run is untimed.
``benchmarks/official.py`` holds what connects the official code to our data (also used by
``benchmarks/recipe_parity.py``, which trains whole runs of both).

It prints samples/s of each, the ratio ours/official, and host syncs per step of each (counted by
``pipeline.train.host_sync``: CUDA sync debug mode on a GPU; on the CPU, the calls that would
synchronise). The official tree needs ``calflops`` and ``accelerate`` (imported by its profiler
module): ``pip install --no-deps calflops accelerate`` into the run's environment; they are not
project dependencies.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.official import (Official, drop_distill, import_official, official_config,  # noqa: E402
                                 official_teacher, portable_distill)
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.host_sync import count_host_syncs  # noqa: E402
from pipeline.train.trainer import Trainer  # noqa: E402


class OfficialStep:
    """One official training step = ``train_one_epoch`` over a one-batch loader."""

    def __init__(self, off: Official, size: str, img_size: int, num_classes: int, teacher: bool, vfm: str, device,
                 teacher_dim: int = 768):
        cfg = official_config(off, size, img_size, num_classes, teacher_dim=teacher_dim)
        self.device, self.train_one_epoch = device, off.train_one_epoch
        self.model = cfg.model.to(device)
        self.criterion = cfg.criterion.to(device)
        self.optimizer = cfg.optimizer
        self.ema = cfg.ema if cfg.use_ema else None
        self.scaler = cfg.scaler if (cfg.use_amp and device.type == "cuda") else None
        self.max_norm = cfg.clip_max_norm
        self.teacher = official_teacher(vfm, device) if teacher else None
        if not teacher:  # no teacher: no DSI term, as our distill=none
            drop_distill(self.criterion)
        elif device.type != "cuda":
            portable_distill(self.criterion)
        self.epoch = 0

    def __call__(self, images, targets):
        batch = [(images, [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets])]
        with contextlib.redirect_stdout(io.StringIO()):
            self.train_one_epoch(False, None, self.model, self.criterion, batch, self.optimizer, self.device,
                                 self.epoch, max_norm=self.max_norm, print_freq=10**9, ema=self.ema,
                                 scaler=self.scaler, teacher_model=self.teacher)
        self.epoch += 1


class OurStep:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def __call__(self, images, targets, info):
        self.trainer.train_step(images, targets, info)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    off = import_official(args.official_src)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = "fp16" if device.type == "cuda" else "off"   # the official default: fp16 autocast + GradScaler
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(size=args.size, img_size=args.img_size, batch_size=args.batch_size, workers=0, vfm=args.vfm,
                    amp=amp, teacher_precision="fp32", device=str(device))
        runs, batches = {}, None
        for teacher in args.teacher:
            distill = "dsi" if teacher == "on" else "none"
            trainer = Trainer(TrainConfig(distill=distill, out=f"{tmp}/ours_{teacher}", **_known(base)))
            trainer.model.train()
            if batches is None:   # the last phase (no MixUp, no multi-scale): every batch at --img-size
                loader = iter(trainer.data.train_loader(trainer.recipe.policy_epochs[-1], 0))
                batches = [next(loader) for _ in range(args.steps)]
            official = OfficialStep(off, args.size, args.img_size, trainer.data.num_classes, teacher == "on",
                                    args.vfm, device, teacher_dim=trainer.data.teacher_dim or 768)
            runs[f"ours/teacher {teacher}"] = (lambda b, s=OurStep(trainer): s(*b), trainer.model)
            runs[f"official/teacher {teacher}"] = (
                lambda b, s=official: s(b[0].to(device), [{k: v.to(device) for k, v in t.items()
                                                            if k in ("labels", "boxes")} for t in b[1]]),
                official.model)
        syncs = {}
        for mode, (step, model) in runs.items():   # untimed first step, counted for syncs
            with count_host_syncs(model) as n:
                step(batches[0])
                _sync(device)
            syncs[mode] = n
        spent = dict.fromkeys(runs, 0.0)
        order = list(runs)
        for b in batches[1:]:
            order = order[1:] + order[:1]
            for mode in order:
                _sync(device)
                t0 = time.perf_counter()
                runs[mode][0](b)
                _sync(device)
                spent[mode] += time.perf_counter() - t0
        n = (len(batches) - 1) * args.batch_size
        for mode in runs:
            results[mode] = {"samples_per_s": n / spent[mode], "host_syncs_per_step": syncs[mode].total,
                             "sync_sites": dict(syncs[mode].where.most_common(8))}
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else
            f"CPU x{torch.get_num_threads()} threads", "size": args.size, "img_size": args.img_size,
            "batch_size": args.batch_size, "timed_steps": len(batches) - 1, "precision": amp, "modes": results}


def _known(base: dict) -> dict:
    fields = TrainConfig.__dataclass_fields__
    return {k: v for k, v in base.items() if k in fields}


def report(res: dict) -> str:
    lines = [f"device: {res['device']}; RT-DETRv4-{res['size'].upper()}, {res['img_size']}px, batch "
             f"{res['batch_size']}, {res['timed_steps']} timed steps, precision {res['precision']}"]
    modes = res["modes"]
    for teacher in ("off", "on"):
        o, f = modes.get(f"ours/teacher {teacher}"), modes.get(f"official/teacher {teacher}")
        if o is None:
            continue
        lines.append(f"teacher {teacher}: ours {o['samples_per_s']:.3f} samples/s, official "
                     f"{f['samples_per_s']:.3f} -> ratio x{o['samples_per_s'] / f['samples_per_s']:.2f}; host syncs "
                     f"per step ours {o['host_syncs_per_step']}, official {f['host_syncs_per_step']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", required=True, help="root of an RT-DETRv4 checkout (outside this repo)")
    p.add_argument("--size", default="s", choices=["s", "m", "l", "x"])
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="batches per mode, the first one untimed")
    p.add_argument("--teacher", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--vfm", default="dinov3_vitb")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    res = run(args)
    print(report(res))
    for mode, r in res["modes"].items():
        print(f"  {mode}: sync sites {r['sync_sites']}")
    return res


if __name__ == "__main__":
    main()
