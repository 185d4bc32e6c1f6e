"""Precompute teacher features for every planned augmented view into a sharded Zarr store.

    python -m jobs.cache_teacher --vfm dinov3_vitb [--data SRC] [--out STORE] [--views K]
        [--weights PATH] [--address RAY_ADDRESS] [--verify]

Runs on a local Ray cluster by default, on an existing one with --address (every node must see
--data, --weights and --out: use shared paths or an fsspec URL for --out). Re-running the same
command resumes: complete shards are skipped. See README_CACHE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.data.dataset import DatasetError
from pipeline.data.load import load_dataset
from pipeline.data.policy import AugPolicy
from pipeline.data.views import Renderer
from pipeline.train.recipe import RECIPES, resolve_recipe
from teacher_cache.precompute import TeacherSpec, pending_shards, precompute, verify
from teacher_cache.store import Store, StoreError
from teacher_cache.teachers import WeightsError, build_teacher, choose_precision, resolve_arch
from teacher_cache.views import ViewPlan

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vfm", default="dinov3_vitb", help="teacher: dinov3_vit{s,b,l,h_plus}, "
                   "dinov3_convnext_*, dinov2_vit*_reg, or any timm model name")
    p.add_argument("--weights", help="local weights: Meta's DINOv3 .pth or a timm/HF .safetensors "
                   "(without it the teacher is randomly initialised: demos and tests only)")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='extra timm create_model kwargs as JSON, e.g. \'{"depth": 2}\' (tests)')
    p.add_argument("--data", default="synthetic", help="YOLO dir, COCO json/dir, or 'synthetic'")
    p.add_argument("--split", default="train")
    p.add_argument("--out", help="store path or fsspec URL (default: cache/<vfm>_k<K>_<size>)")
    p.add_argument("--views", type=int, default=4, help="cached views per augmented phase (K)")
    p.add_argument("--size", choices=sorted(RECIPES), default="l",
                   help="model size whose stop-epoch policy the views follow")
    p.add_argument("--epochs", type=int, help="the trainer's --epochs (a shortened recipe has other phases)")
    p.add_argument("--policy-epochs", type=int, nargs=3, metavar=("E0", "E1", "E2"),
                   help="override the phase boundaries (default: from --size/--epochs)")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed shared with the trainer")
    p.add_argument("--input-size", type=int, default=640, help="detector input size (teacher sees /2)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="bf16 only if its measured cosine to fp32 is >= 0.999 (auto: bf16 on CUDA)")
    p.add_argument("--dtype", choices=("int8", "float16"), default="int8")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard")
    p.add_argument("--batch-size", type=int, help="views per teacher batch (default 64 GPU, 8 CPU)")
    p.add_argument("--workers", type=int, help="teacher actors (default: one per GPU, else 1)")
    p.add_argument("--render-workers", type=int, default=1, help="CPU actors decoding + augmenting")
    p.add_argument("--address", help="Ray cluster address (default: start a local cluster)")
    p.add_argument("--no-ray", action="store_true", help="run in-process without Ray")
    p.add_argument("--max-shards", type=int, help="stop after this many shards (resume later)")
    p.add_argument("--verify", nargs="?", const=8, type=int, metavar="N",
                   help="check the store against its plan and re-compute N views online (default 8)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_free_space(out: str, needed: int) -> None:
    if "://" in out and not out.startswith("file://"):
        return
    path = Path(out.removeprefix("file://"))
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < needed:
        fail(f"{out} needs about {needed / 1e9:.2f} GB for the remaining shards but its disk has "
             f"{free / 1e9:.2f} GB free: free space, choose another --out, or lower --views")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        resolve_arch(args.vfm)
        dataset = load_dataset(args.data, split=args.split)
    except (ValueError, DatasetError) as e:
        fail(str(e))
    recipe = resolve_recipe(args.size, args.epochs)   # the same phases as `jobs.train --epochs N`
    epochs = tuple(args.policy_epochs or recipe.policy_epochs)
    plan = ViewPlan(seed=args.seed, k=args.views, epochs=epochs, input_size=(args.input_size,) * 2)
    policy = replace(AugPolicy.from_recipe(recipe, output_size=args.input_size), epochs=epochs)
    renderer = Renderer(args.data, args.split, plan, policy)
    try:
        teacher = build_teacher(args.vfm, args.weights, **args.model_kwargs)
    except (WeightsError, ValueError) as e:
        fail(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher.to(device)
    fidelity = None
    if args.precision != "fp32":  # measured on real (rendered) views of this dataset
        probe = torch.stack([torch.from_numpy(renderer(i, 0)) for i in range(min(4, len(dataset)))])
        teacher.precision, fidelity = choose_precision(teacher, probe.to(device).float() / 255, args.precision)
    fingerprint = teacher.fingerprint()
    fingerprint["protocol"]["bf16_fidelity"] = fidelity
    out = args.out or f"cache/{args.vfm}_k{args.views}_{args.input_size}"
    grid = (args.input_size // 32, args.input_size // 32)
    keys = [dataset.key(i) for i in range(len(dataset))]
    try:
        if args.verify is not None:  # never creates anything
            store = Store.open(out)
            store.check_compatible(teacher=fingerprint, input_size=plan.input_size, plan_hash=plan,
                                   dataset_hash=dataset.content_hash())
        else:
            store = Store.create(out, teacher=fingerprint, plan=plan, dataset_hash=dataset.content_hash(),
                                 keys=keys, grid=grid, dtype=args.dtype, shard_size=args.shard_size,
                                 extra={"policy": policy.to_dict(), "data": str(args.data),
                                        "split": args.split})
    except StoreError as e:
        fail(str(e))
    if args.verify is not None:
        result = verify(store, teacher, renderer, samples=args.verify)
        print(json.dumps(result, indent=1))
        return 1 if result["problems"] else 0
    todo = len(pending_shards(store))
    check_free_space(out, todo * store.shard_size * store.num_views * store.bytes_per_view())
    if args.no_ray:
        executor = "local"
    else:
        import ray
        env = ({"env_vars": {"PYTHONPATH": str(REPO)}} if args.address is None else
               {"working_dir": str(REPO), "excludes": [".venv", ".git", "cache"]})
        ray.init(address=args.address, num_cpus=None if args.address else os.cpu_count(),
                 runtime_env=env, log_to_driver=False, include_dashboard=False,
                 ignore_reinit_error=True)
        executor = "ray"
    spec = TeacherSpec(args.vfm, args.weights, teacher.precision, args.model_kwargs)
    print(f"teacher {args.vfm} ({teacher.arch}, {teacher.precision}) -> {out}: {len(dataset)} images x "
          f"{plan.num_views} views, {store.num_shards} shards ({todo} to do)", file=sys.stderr)
    report = precompute(store, spec, renderer, executor=executor,
                        batch_size=args.batch_size or (64 if device == "cuda" else 8),
                        num_workers=args.workers, render_workers=args.render_workers,
                        max_shards=args.max_shards, progress=not args.quiet)
    print(report.summary())
    return 1 if report.shards_failed else 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        sys.exit(main())
