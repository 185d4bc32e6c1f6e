"""Our training step against the official RT-DETRv4 code's, at identical math, stepped round-robin.

    python benchmarks/official_step.py --official-src /path/to/RT-DETRv4 --size s --img-size 320 \
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
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.host_sync import count_host_syncs  # noqa: E402
from pipeline.train.trainer import Trainer  # noqa: E402
from teacher_cache.teachers import build_teacher  # noqa: E402


def import_official(src: str):
    """The official ``engine`` package of an RT-DETRv4 checkout (a clear error when it cannot import)."""
    root = Path(src).resolve()
    if not (root / "engine" / "core" / "yaml_config.py").is_file():
        raise SystemExit(f"--official-src {src}: no engine/core/yaml_config.py there; pass the root of an "
                         "RT-DETRv4 checkout (github.com/RT-DETRs/RT-DETRv4)")
    sys.path.insert(0, str(root))
    try:
        import engine  # noqa: F401
        from engine.core import YAMLConfig
        from engine.solver.det_engine import train_one_epoch
    except ModuleNotFoundError as e:
        raise SystemExit(f"the official code needs {e.name!r}: pip install --no-deps {e.name} (into this "
                         "run's environment only; it is no project dependency)") from e
    return root, YAMLConfig, train_one_epoch


class _HubStandIn(nn.Module):
    """What the official DINOv3TeacherModel calls as ``self.model``: our ViT-B/16 giving its
    final-norm patch tokens as ``x_norm_patchtokens`` (DINOv3's hub interface)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x, is_training=True, masks=None):
        tokens = self.vit.forward_features(x)
        return {"x_norm_patchtokens": tokens[:, self.vit.num_prefix_tokens:]}


def official_teacher(vfm: str, device):
    from engine.rtv4.dinov3_teacher import DINOv3TeacherModel
    from torchvision.transforms import v2 as transforms
    ours = build_teacher(vfm)
    t = DINOv3TeacherModel.__new__(DINOv3TeacherModel)
    nn.Module.__init__(t)
    t.patch_size, t.teacher_feature_dim = ours.patch, ours.embed_dim
    t.model = _HubStandIn(ours.model).eval().requires_grad_(False)
    t.normalize_transform = transforms.Normalize(mean=ours.mean.flatten().tolist(), std=ours.std.flatten().tolist())
    t.avgpool_2x2 = nn.AvgPool2d(kernel_size=2, stride=2)
    return t.to(device).eval()


class OfficialStep:
    """One official training step = ``train_one_epoch`` over a one-batch loader."""

    def __init__(self, root: Path, YAMLConfig, train_one_epoch, size: str, img_size: int, num_classes: int,
                 teacher: bool, vfm: str, device):
        cfg = YAMLConfig(str(root / "configs" / "rtv4" / f"rtv4_hgnetv2_{size}_coco.yml"),
                         HGNetv2={"pretrained": False}, eval_spatial_size=[img_size, img_size],
                         num_classes=num_classes)
        self.device, self.train_one_epoch = device, train_one_epoch
        self.model = cfg.model.to(device)
        self.criterion = cfg.criterion.to(device)
        self.optimizer = cfg.optimizer
        self.ema = cfg.ema if cfg.use_ema else None
        self.scaler = cfg.scaler if (cfg.use_amp and device.type == "cuda") else None
        self.max_norm = cfg.clip_max_norm
        self.teacher = official_teacher(vfm, device) if teacher else None
        if not teacher:  # no teacher: no DSI term, as our distill=none
            self.criterion.losses = [x for x in self.criterion.losses if x != "distill"]
        elif device.type != "cuda":
            _portable_distill(self.criterion)
        self.epoch = 0

    def __call__(self, images, targets):
        batch = [(images, [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets])]
        with contextlib.redirect_stdout(io.StringIO()):
            self.train_one_epoch(False, None, self.model, self.criterion, batch, self.optimizer, self.device,
                                 self.epoch, max_norm=self.max_norm, print_freq=10**9, ema=self.ema,
                                 scaler=self.scaler, teacher_model=self.teacher)
        self.epoch += 1


def _portable_distill(criterion) -> None:
    """The official DSI term of a layer without features (aux/pre/dn) returns a zero placed on
    device='cuda' (hard-coded), so it cannot run on the CPU; the same zero on the outputs' device."""
    official = criterion.loss_distillation

    def loss_distillation(outputs, *args, **kwargs):
        if outputs.get("student_distill_output") is None or outputs.get("teacher_encoder_output") is None:
            return {"loss_distill": torch.zeros((), device=outputs["pred_logits"].device, requires_grad=True)}
        return official(outputs, *args, **kwargs)

    criterion.loss_distillation = loss_distillation


class OurStep:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def __call__(self, images, targets, info):
        self.trainer.train_step(images, targets, info)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    root, YAMLConfig, train_one_epoch = import_official(args.official_src)
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
            official = OfficialStep(root, YAMLConfig, train_one_epoch, args.size, args.img_size,
                                    trainer.data.num_classes, teacher == "on", args.vfm, device)
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
