"""RT-CO-DETR training throughput: distillation from a Conditional-DETR-R50 teacher vs no
distillation, the same student, batches and machine state, stepped round-robin in one run.

    python -m benchmarks.rt_co_detr_throughput --data /work/shared/data/taco_val --img-size 320 --steps 4

``--data`` needs a train split (a YOLO data.yaml whose ``train`` may point at the val images, as for
the 225 TACO images we have). ``--teacher DIR`` is a transformers Conditional-DETR directory; without
it a randomly initialised Conditional-DETR-R50 with COCO's 91 id2label slots is written to a temp
dir (same architecture and cost as microsoft/conditional-detr-resnet-50, meaningless predictions).
Timing excludes the first step and data loading.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.train.trainer import TrainConfig, Trainer  # noqa: E402


def coco_id2label() -> dict[int, str]:
    """The 91 COCO category-id slots as DETR-family checkpoints number them (0 and gaps: N/A)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return {i: ("N/A" if n in ("__background__", "N/A") else n) for i, n in enumerate(names)}


def write_random_conditional_detr(path: Path) -> Path:
    from transformers import ConditionalDetrConfig
    cfg = ConditionalDetrConfig(backbone="resnet50", use_timm_backbone=True, use_pretrained_backbone=False,
                                num_labels=91, id2label=coco_id2label())
    cfg.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 800, "longest_edge": 1333}, "do_normalize": True,
         "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return path


def train_yaml(data: str, out: Path) -> str:
    """A data.yaml whose train split is the val images when ``data`` has no train split."""
    src = Path(data) / "data.yaml" if Path(data).is_dir() else Path(data)
    spec = yaml.safe_load(src.read_text())
    if "train" in spec:
        return str(src)
    spec["path"] = str((src.parent / spec.get("path", ".")).resolve())
    spec["train"] = spec["val"]
    (out / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(out / "data.yaml")


def round_robin(trainers: dict, batches: list) -> dict:
    spent = dict.fromkeys(trainers, 0.0)
    order = list(trainers)
    for batch in batches:
        order = order[1:] + order[:1]   # rotate who goes first
        for mode in order:
            t0 = time.perf_counter()
            trainers[mode].train_step(*batch)
            spent[mode] += time.perf_counter() - t0
    n = sum(b[0].shape[0] for b in batches)
    return {mode: n / t for mode, t in spent.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/taco_val")
    p.add_argument("--teacher", help="transformers Conditional-DETR directory (default: random-init R50)")
    p.add_argument("--student", default="rtdetrv2_r50", choices=["rtdetrv2_r50", "rtdetrv4"])
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--teacher-input-size", type=int, default=None, help="default: the student's --img-size")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="batches per mode, the first one untimed")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = args.teacher or str(write_random_conditional_detr(tmp / "teacher"))
        data = train_yaml(args.data, tmp)
        # no --recipe: both modes are one run of the same student (the rt-co-detr recipe would split codetr
        # into its two stages); the optimizer settings do not change the time of a step
        base = dict(student=args.student, data=data, img_size=args.img_size,
                    batch_size=args.batch_size, workers=0, epochs=1, max_steps_per_epoch=args.steps)
        trainers = {"none": Trainer(TrainConfig(distill="none", out=str(tmp / "none"), **base)),
                    "codetr": Trainer(TrainConfig(distill="codetr", teacher_checkpoint=teacher, class_map="slice",
                                                  teacher_input_size=args.teacher_input_size or args.img_size,
                                                  out=str(tmp / "codetr"), **base))}
        for t in trainers.values():
            t.model.train()
        loader = iter(trainers["none"].data.train_loader(0))
        batches = [next(loader) for _ in range(args.steps)]
        round_robin(trainers, batches[:1])                                      # warm-up
        rate = round_robin(trainers, batches[1:])
    print(f"device: {device}; student {args.student}, teacher {Path(teacher).name if args.teacher else 'random-init Conditional-DETR-R50'}, "
          f"{args.img_size}px, batch {args.batch_size}, {args.steps - 1} timed steps round-robin")
    print(f"samples/s  none {rate['none']:.3f} | codetr {rate['codetr']:.3f}; "
          f"cost of distillation {rate['none'] / rate['codetr'] - 1:+.1%}")
    return rate


if __name__ == "__main__":
    main()
