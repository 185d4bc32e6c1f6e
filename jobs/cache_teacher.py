"""Precompute the teacher's targets of a training run into a store.

    python -m jobs.cache_teacher --vfm dinov3_vitb [--data SRC] [--out STORE] [--size l] [--epochs N]
        [--global-batch 32] [--weights PATH] [--address RAY_ADDRESS] [--verify [N]] [--views K]

The plan flags (--size --epochs --img-size --seed --train-split --data --mixup-group --global-batch
--max-steps-per-epoch) are jobs.train's, with its defaults: without --data both jobs run the same demo
plan of the embedded data set. The store records them; `jobs.train --cache STORE` adopts them, and
`jobs.train` without --cache finds a matching store in cache/ by itself.

Exact mode (the default): every step of the run's training plan (pipeline/data/plan.py) is
rendered as the trainer will render it (decode, augment, collate, multi-scale resize, MixUp) and
the teacher's output for each (epoch, sample) is stored at that step's grid (a Zarr v3 store),
epoch by epoch, so a run can train behind the job. The store is keyed by the plan (dataset, recipe, seed, global
batch, MixUp group), so every run with that plan shares it, whatever its student or world size.

Budget mode (--views K): K cached views per augmented phase, replayed across the phase's epochs;
it departs from the recipe (about 2 + 2K distinct views per image instead of a fresh draw each
epoch; grids resized to the multi-scale size; MixUp batches run the online teacher).

Runs on a local Ray cluster by default, on an existing one with --address (every node must see
--data, --weights and --out: use shared paths or an fsspec URL for --out). Re-running the same
command resumes: complete shards (exact mode: blocks) are read back and kept, damaged ones rebuilt,
missing ones written. See docs/cache.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from pipeline import cli
from pipeline.cli import parser
from pipeline.train.config import PLAN_FIELDS, Given, add_config_flags, plan_config

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = parser("jobs.cache_teacher", __doc__)
    p.add_argument("--vfm", default="dinov3_vitb", help="teacher: dinov3_vit{s,b,l,h_plus}, "
                   "dinov3_convnext_*, dinov2_vit*_reg, or any timm model name")
    p.add_argument("--weights", help="local weights: Meta's DINOv3 .pth or a timm/HF .safetensors "
                   "(without it the teacher is randomly initialised: demos and tests only)")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='extra timm create_model kwargs as JSON, e.g. \'{"depth": 2}\' (tests)')
    p.add_argument("--out", help="store path or fsspec URL (None: cache/<vfm>_<size>_<img-size>_<plan hash>, "
                   "budget mode cache/<vfm>_k<K>_<img-size>; jobs.train finds a store in cache/ by itself)")
    p.add_argument("--views", type=int, help="BUDGET MODE: K cached views per augmented phase, replayed "
                   "(departs from the recipe: fewer distinct views, resized grids, MixUp online). "
                   "None: exact mode, every step of the training plan")
    p.add_argument("--steps-per-block", type=int, default=8, help="exact mode: global steps written and marked "
                   "complete together (each step's views are one Zarr shard object per array)")
    p.add_argument("--only-epochs", type=int, nargs="+", metavar="E", help="exact mode: precompute only these "
                   "epochs (e.g. split the run over several jobs); None: every epoch, in order")
    p.add_argument("--policy-epochs", type=int, nargs=3, metavar=("E0", "E1", "E2"),
                   help="budget mode: override the phase boundaries (None: from --size/--epochs)")
    add_config_flags(p, only=PLAN_FIELDS)   # jobs.train's plan flags: same names, defaults and help
    p.add_argument("--input-size", dest="img_size", type=int, action=Given, help=argparse.SUPPRESS)   # old names
    p.add_argument("--split", dest="train_split", action=Given, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="bf16 only if its measured cosine to fp32 is >= 0.999 (auto: bf16 on CUDA, and on a CPU "
                        "with native bf16 where it measures faster)")
    p.add_argument("--dtype", choices=("int8", "int4", "float16"), default="int8",
                   help="stored grid dtype. int8: per-token absmax (cosine ~0.99997); int4 (exact mode only): "
                        "rotated 4-bit Lloyd-Max codes, half the bytes (cosine ~0.995)")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard")
    p.add_argument("--teacher-batch", type=int, help="views per teacher forward (None: 64 GPU, 8 CPU)")
    p.add_argument("--workers", type=int, help="teacher actors (None: one per GPU, else 1)")
    p.add_argument("--render-workers", type=int, default=1, help="CPU actors decoding + augmenting (with --no-ray in exact mode: worker processes rendering ahead)")
    p.add_argument("--address", help="Ray cluster address (None: start a local cluster)")
    p.add_argument("--no-ray", action="store_true", help="run in-process without Ray")
    p.add_argument("--max-shards", type=int, help="stop after this many shards (exact mode: blocks; resume later); "
                   "exact mode writes them in plan order, so training can already use the completed epochs")
    p.add_argument("--verify", nargs="?", const=8, type=int, metavar="N",
                   help="re-read every stored view (checksums) and re-compute N views (budget) or steps "
                        "(exact) online; non-zero exit naming shard and view on a mismatch or cosine < 0.99")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad images or labels: stop at start with the file named (raise; every image is decoded "
                        "once first) or list them and leave them out of the store's data set (skip: the data set, "
                        "content hash and plan of `jobs.train --on-error skip` on the same data)")
    return p.parse_args(argv)


def fail(message: str, code: int = 2):
    cli.fail("jobs.cache_teacher", message)
    sys.exit(code)


def check_ray_address(address: str | None) -> None:
    """Fail at once, naming the address and what to check, when --address cannot be reached
    (ray.init would otherwise retry for a minute and end in a GCS timeout trace)."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        fail(f"cannot reach Ray at --address {address} ({e}): on the head node check `ray status --address "
             f"{address.removeprefix('ray://')}` and that the port is open from this machine (head: "
             "`ray start --head --port PORT`; ray:// needs the client server port, default 10001)")


def check_free_space(out: str, needed: int) -> None:
    if "://" in out and not out.startswith("file://"):
        return
    path = Path(out.removeprefix("file://"))
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < needed:
        fail(f"{out} needs about {cli.size_text(needed)} for the remaining shards but its disk has "
             f"{cli.size_text(free)} free: free space, choose another --out, or lower --views")


def main(argv=None) -> int:
    args = parse_args(argv)   # before the heavy imports: --help answers at once
    cfg = plan_config(args)   # the plan flags as jobs.train resolves them (the demo plan without --data)
    import torch

    from pipeline.data.dataset import DatasetError
    from pipeline.data.load import load_dataset
    from pipeline.data.policy import AugPolicy
    from pipeline.data.views import Renderer
    from pipeline.train.config import demo_note
    from pipeline.train.data import plan_fields
    from pipeline.train.recipe import recipe_from_config
    from teacher_cache.precompute import TeacherSpec, pending_shards, precompute, verify
    from teacher_cache.store import Store, StoreError
    from teacher_cache.teachers import resolve_arch
    from teacher_cache.views import ViewPlan

    if args.verify is None:   # an unusable --out is named before any data or teacher is loaded
        try:
            cli.writable_folder(args.out or "cache", "--out")
        except cli.JobError as e:
            fail(str(e))
    try:
        resolve_arch(args.vfm)
        # every image is decoded once before any teacher work; --on-error skip leaves the bad ones out, as
        # `jobs.train --on-error skip` does: the same data set, content hash and plan
        dataset = load_dataset(cfg.data, split=cfg.train_split, on_error=args.on_error, verify_images=True)
        if dataset.bad_samples:
            print(dataset.bad_samples.summary(), file=sys.stderr)
    except (ValueError, DatasetError) as e:
        fail(str(e))
    recipe = recipe_from_config(cfg)   # the recipe `jobs.train` resolves from the same flags
    if cfg.data is None:
        print(demo_note(cfg), file=sys.stderr)
    if args.views is None:
        return exact_main(args, cfg, dataset, recipe)
    print(f"budget mode (--views {args.views}): each sample replays one of {args.views} cached views per "
          "augmented phase instead of a fresh draw each epoch, grids are resized to the multi-scale size, and "
          "MixUp batches run the online teacher during training", file=sys.stderr)
    epochs = tuple(args.policy_epochs or recipe.policy_epochs)
    plan = ViewPlan(seed=cfg.seed, k=args.views, epochs=epochs, input_size=(cfg.img_size,) * 2)
    policy = replace(AugPolicy.from_recipe(recipe, output_size=cfg.img_size), epochs=epochs)
    renderer = Renderer(cfg.data, cfg.train_split, plan, policy, on_error=args.on_error, skip=dataset.skipped)
    # the precision is measured on real (rendered) views of this dataset
    teacher, fingerprint, device = build_measured_teacher(args, lambda: torch.stack(
        [torch.from_numpy(renderer(i, 0)) for i in range(min(4, len(dataset)))]).float() / 255)
    out = args.out or f"cache/{args.vfm}_k{args.views}_{cfg.img_size}"
    grid = (cfg.img_size // 32, cfg.img_size // 32)
    # what a run adopts from this store (a budget store serves any seed, batch and MixUp group)
    run_plan = {k: v for k, v in plan_fields(cfg, 1).items() if k in ("size", "epochs", "img_size", "train_split",
                                                                      "data")}
    keys = [dataset.key(i) for i in range(len(dataset))]
    try:
        if args.verify is not None:  # never creates anything
            store = Store.open(out)
            store.check_compatible(teacher=fingerprint, input_size=plan.input_size, plan_hash=plan,
                                   dataset_hash=dataset.content_hash())
        else:
            store = Store.create(out, teacher=fingerprint, plan=plan, dataset_hash=dataset.content_hash(),
                                 keys=keys, grid=grid, dtype=args.dtype, shard_size=args.shard_size,
                                 extra={"policy": policy.to_dict(), "data": str(cfg.data),
                                        "split": cfg.train_split, "run_plan": run_plan})
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
        check_ray_address(args.address)
        ray.init(address=args.address, num_cpus=None if args.address else os.cpu_count(),
                 runtime_env=env, log_to_driver=False, include_dashboard=False,
                 ignore_reinit_error=True)
        executor = "ray"
    spec = TeacherSpec(args.vfm, args.weights, teacher.precision, args.model_kwargs)
    print(f"teacher {args.vfm} ({teacher.arch}, {teacher.precision}) -> {out}: {len(dataset)} images x "
          f"{plan.num_views} views, {store.num_shards} shards ({todo} to do)", file=sys.stderr)
    report = precompute(store, spec, renderer, executor=executor,
                        batch_size=args.teacher_batch or (64 if device == "cuda" else 8),
                        num_workers=args.workers, render_workers=args.render_workers,
                        max_shards=args.max_shards, progress=not args.quiet, recheck=True)
    print(report.summary())
    return 1 if report.shards_failed else 0


def build_measured_teacher(args, probe_images):
    """(teacher on the device, its fingerprint, device); with ``--precision bf16|auto`` the precision
    is chosen from its measured fidelity on ``probe_images()`` (float [B,3,H,W] in [0,1])."""
    import torch

    from teacher_cache.teachers import WeightsError, build_teacher, choose_precision

    try:
        teacher = build_teacher(args.vfm, args.weights, **args.model_kwargs)
    except (WeightsError, ValueError) as e:
        fail(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher.to(device)
    fidelity = None
    if args.precision != "fp32":
        teacher.precision, fidelity = choose_precision(teacher, probe_images().to(device), args.precision)
    fingerprint = teacher.fingerprint()
    fingerprint["protocol"]["bf16_fidelity"] = fidelity
    return teacher, fingerprint, device


def exact_main(args, cfg, dataset, recipe) -> int:
    """Exact mode: every (epoch, step, slot) of the plan, written in plan order."""
    import numpy as np
    import torch

    from pipeline.data.plan import PlanRenderer
    from pipeline.train.data import DEFAULT_STORE_DIR, build_plan, plan_fields
    from teacher_cache.exact import ExactStore
    from teacher_cache.precompute import TeacherSpec, pending_blocks, precompute_exact, verify_exact
    from teacher_cache.store import StoreError

    if args.policy_epochs:
        fail("--policy-epochs is budget mode only: exact mode follows the recipe of --size/--epochs, as jobs.train")
    try:
        run_plan = plan_fields(cfg, 1)   # the plan flags' values, recorded: jobs.train --cache adopts them
        plan = build_plan(cfg, recipe, len(dataset), run_plan["global_batch"], dataset.content_hash())
    except ValueError as e:
        fail(str(e))
    steps = min(plan.steps_per_epoch, cfg.max_steps_per_epoch or plan.steps_per_epoch)
    bad = [e for e in args.only_epochs or () if not 0 <= e < plan.epochs]
    if bad:
        fail(f"--only-epochs {bad} outside the plan's epochs 0..{plan.epochs - 1}")
    renderer = PlanRenderer(cfg.data, cfg.train_split, plan, on_error=args.on_error, skip=dataset.skipped)
    teacher, fingerprint, device = build_measured_teacher(   # precision measured on the plan's first step
        args, lambda: torch.from_numpy(renderer(0, 0)[0][:4]))
    out = args.out or f"{DEFAULT_STORE_DIR}/{args.vfm}_{cfg.size}_{cfg.img_size}_{plan.hash()}"
    try:
        if args.verify is not None:  # never creates anything
            store = ExactStore.open(out)
            store.check_teacher(fingerprint)
            store.check_plan(plan)
        else:
            store = ExactStore.create(out, teacher=fingerprint, plan=plan.to_dict(), plan_hash=plan.hash(),
                                      epochs=plan.epochs, steps_per_epoch=steps,
                                      global_batch=plan.global_batch, dataset_hash=plan.dataset_hash,
                                      keys=[dataset.key(i) for i in range(len(dataset))], grids=plan.grids(),
                                      dtype=args.dtype, steps_per_block=args.steps_per_block,
                                      extra={"data": str(cfg.data), "split": cfg.train_split,
                                             "run_plan": run_plan})
    except (StoreError, ValueError) as e:
        fail(str(e))
    if args.verify is not None:
        result = verify_exact(store, teacher, renderer, samples=args.verify)
        print(json.dumps(result, indent=1))
        for problem in result["problems"][:20]:
            cli.fail("jobs.cache_teacher", problem)
        return 1 if result["problems"] else 0
    todo = pending_blocks(store, args.only_epochs)[0]   # (written blocks are re-checked, and rebuilt if damaged, below)
    tokens = np.mean([(s // 32) ** 2 for s in (plan.scales or (plan.base_size,))])
    check_free_space(out, int(len(todo) * store.steps_per_block * plan.global_batch * tokens * store.view_bytes((1, 1))))
    executor = "local" if args.no_ray else _init_ray(args)
    spec = TeacherSpec(args.vfm, args.weights, teacher.precision, args.model_kwargs)
    print(f"teacher {args.vfm} ({teacher.arch}, {teacher.precision}) -> {out}: exact mode, {plan.describe()}; "
          f"{'' if steps == plan.steps_per_epoch else f'its first {steps} steps per epoch (--max-steps-per-epoch); '}"
          f"{store.blocks_per_epoch} blocks of {store.steps_per_block} steps per epoch, {len(todo)} to do; the "
          "written ones are read back first", file=sys.stderr)
    report = precompute_exact(store, spec, renderer, executor=executor,
                              batch_size=args.teacher_batch or (64 if device == "cuda" else 8),
                              num_workers=args.workers, render_workers=args.render_workers,
                              max_blocks=args.max_shards, progress=not args.quiet, epochs=args.only_epochs,
                              on_epoch=lambda e: print(f"epoch {e} complete", file=sys.stderr), recheck=True)
    print(report.summary())
    return 1 if report.shards_failed else 0


def _init_ray(args) -> str:
    import ray
    env = ({"env_vars": {"PYTHONPATH": str(REPO)}} if args.address is None else
           {"working_dir": str(REPO), "excludes": [".venv", ".git", "cache"]})
    check_ray_address(args.address)
    ray.init(address=args.address, num_cpus=None if args.address else os.cpu_count(),
             runtime_env=env, log_to_driver=False, include_dashboard=False, ignore_reinit_error=True)
    return "ray"


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        sys.exit(cli.run("jobs.cache_teacher", main, on_interrupt="re-run the same command to continue: complete "
                         "shards are kept"))
