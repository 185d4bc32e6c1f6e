"""Bytes per view, random read time and fidelity of the teacher stores.

1. Exact store, Zarr v3 (today) against the hand-written v1 format it replaced (loaded from git at
   ``--baseline``), side by side on the same plan: the L recipe's multi-scale steps (15x15..25x25),
   a global batch of 32, 8 steps per block / shard file, 768 channels, int8 views (random tokens: the
   formats store bytes, content does not matter). Printed: bytes per view on disk (goal: within 2 %
   of v1), the store write rate, and the time of a random read of one view, with the per-block
   metadata cached (a trainer's steady state) and cold (caches dropped before every read). Both
   stores sit in the page cache, so the reads time the formats' code paths, not the disk.
2. With ``--teacher``: on real TACO photographs at 640 (the official 20x20 grid) the teacher's fp32
   grids are written to an int8 and a float16 budget store and an int8 and an int4 exact store;
   printed: bytes per view, the per-token cosine of a read against fp32, the bf16-teacher fidelity
   (the precision rule: bf16 only if >= 0.999), and a random single-view read against decoding +
   the teacher forward of the same view.

    python -m benchmarks.teacher_cache_storage [--steps 16] [--reads 400] [--teacher [--vfm dinov3_vitb]]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image

from pipeline.data.plan import TrainPlan
from pipeline.train.recipe import resolve_recipe
from teacher_cache.exact import ExactStore
from teacher_cache.quantize import decode, encode
from teacher_cache.store import Store
from teacher_cache.teachers import bf16_fidelity, build_teacher
from teacher_cache.views import ViewPlan

REPO = Path(__file__).resolve().parents[1]
TACO = REPO.parent / "shared" / "data" / "taco_val" / "images" / "val"
V1 = "350a5a8"   # the last commit with the hand-written exact format
FAKE_TEACHER = {"name": "bench", "arch": "bench", "embed_dim": 768, "weights_sha256": "0" * 64,
                "weights_source": "random-init", "protocol": {"precision": "fp32"}}


def exact_v1(ref: str):
    """``teacher_cache/exact.py`` as it was at ``ref`` (the v1 binary format), for the side-by-side."""
    src = subprocess.run(["git", "show", f"{ref}:teacher_cache/exact.py"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    src = src.replace("from .store import StoreError, StoreMismatch, ViewError, _read_json, _write_json, keys_sha256, "
                      "teacher_identity", "from .layout import StoreError, StoreMismatch, ViewError, keys_sha256, "
                      "teacher_identity, read_json as _read_json, write_json as _write_json")
    module = types.ModuleType("teacher_cache.exact_v1")
    module.__package__ = "teacher_cache"
    exec(compile(src, f"{ref}:teacher_cache/exact.py", "exec"), module.__dict__)
    return module.ExactStore


def disk_bytes(root: Path) -> tuple[int, int, int]:
    """(bytes of the views' objects and markers, what the filesystem allocates for them, the fixed
    metadata: manifest, keys and the Zarr metadata documents)."""
    fixed = ("manifest.json", "keys.json", "zarr.json")
    files = [p for p in root.rglob("*") if p.is_file() and p.name not in fixed]
    return (sum(p.stat().st_size for p in files), sum(os.stat(p).st_blocks * 512 for p in files),
            sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name in fixed))


def compare_exact_formats(args, tmp: Path) -> None:
    G, S, C = 32, 8, 768
    plan = TrainPlan.from_recipe(resolve_recipe("l"), G * args.steps, G)
    grids = [plan.grid(1, s) for s in range(args.steps)]   # epoch 1: multi-scale on
    rng = np.random.default_rng(0)
    blocks = []
    for b in range(-(-args.steps // S)):
        views = []
        for s in range(b * S, min((b + 1) * S, args.steps)):
            t = grids[s][0] * grids[s][1]
            tokens = rng.integers(-127, 128, (G, t, C), dtype=np.int8)
            scale = rng.random((G, t), dtype=np.float32).astype(np.float16)
            views += [(s, k, s * G + k, tokens[k], scale[k], grids[s]) for k in range(G)]
        blocks.append(views)
    n = args.steps * G
    payload = sum(G * g[0] * g[1] * (C + 2) for g in grids)
    common = dict(teacher=FAKE_TEACHER, plan=plan.to_dict(), plan_hash=plan.hash(), epochs=1,
                  steps_per_epoch=args.steps, global_batch=G, dataset_hash="bench",
                  keys=[f"k{i}" for i in range(n)], dtype="int8")
    stores = {"v1 (binary)": exact_v1(args.baseline).create(str(tmp / "v1"), steps_per_shard=S, **common),
              "v2 (Zarr)": ExactStore.create(str(tmp / "v2"), steps_per_block=S, grids=plan.grids(), **common)}
    write = {name: 0.0 for name in stores}
    for b, views in enumerate(blocks):   # alternate the formats block by block: the same load on both
        for name, store in stores.items():
            t0 = time.perf_counter()
            (store.write_shard if name.startswith("v1") else store.write_block)(0, b, views)
            write[name] += time.perf_counter() - t0
    print(f"exact store, same plan: L recipe epoch 1, {args.steps} steps x {G} views (grids "
          f"{min(grids)[0]}..{max(grids)[0]}), {S} steps per block, int8, C={C}; payload {payload / n:,.0f} B/view")
    sizes = {name: disk_bytes(tmp / ("v1" if name.startswith("v1") else "v2")) for name in stores}
    base = sizes["v1 (binary)"][0]
    for name, (size, alloc, fixed) in sizes.items():
        print(f"  {name:12s}: {size / n:>11,.1f} B/view on disk ({size / base - 1:+.3%} vs v1; "
              f"{alloc / n:,.0f} B/view allocated by the filesystem; {fixed:,} B of fixed metadata), "
              f"written at {payload / write[name] / 1e6:,.0f} MB/s ({n / write[name]:,.0f} views/s)")
    picks = [(int(rng.integers(args.steps)), int(rng.integers(G))) for _ in range(args.reads)]
    for name in stores:   # fresh instances: nothing cached from the writes
        stores[name] = (exact_v1(args.baseline) if name.startswith("v1") else ExactStore).open(str(
            tmp / ("v1" if name.startswith("v1") else "v2")))
    for cold in (False, True):
        times = {name: 0.0 for name in stores}
        for s, k in picks:
            for name, store in stores.items():
                if cold:
                    store.__setstate__(store.__getstate__())   # drop every cache (a new worker)
                t0 = time.perf_counter()
                tokens, scale, grid = store.read(0, s, k)
                times[name] += time.perf_counter() - t0
                assert grid == grids[s]
        label = "cold (metadata read first)" if cold else "cached metadata"
        print(f"  random read of one view, {label}: " + ", ".join(
            f"{name} {t / len(picks) * 1e3:.3f} ms" for name, t in times.items())
            + f"; v2/v1 = {times['v2 (Zarr)'] / times['v1 (binary)']:.2f}")


def render(path: Path) -> torch.Tensor:
    img = decode_image(str(path), mode=ImageReadMode.RGB)
    return TF.resize(img, [640, 640], antialias=True).float() / 255


def teacher_formats(args, tmp: Path) -> None:
    teacher = build_teacher(args.vfm, args.weights)
    paths = sorted(TACO.glob("*.jpg"))[:args.images]
    images = torch.stack([render(q) for q in paths])
    grids = torch.cat([teacher(images[i:i + 4]) for i in range(0, len(images), 4)])
    n, c, h, w = grids.shape
    plan = ViewPlan(k=0)  # 2 views per image: we store the grid and its flip's grid slot
    print(f"teacher {args.vfm} ({teacher.arch}{', RANDOM-INIT' if teacher.weights_source == 'random-init' else ''}), "
          f"{n} TACO images, grid {c}x{h}x{w}")
    for dtype in ("int8", "float16"):
        store = Store.create(str(tmp / dtype), teacher=teacher.fingerprint(), plan=plan, dataset_hash="bench",
                             keys=[q.stem for q in paths], grid=(h, w), dtype=dtype, shard_size=n)
        views = torch.stack([grids, grids], 1).flatten(0, 1)
        tokens, scale = encode(views, dtype)
        marker = store.write_shard(0, tokens.reshape(n, 2, h * w, c).numpy(),
                                   None if scale is None else scale.reshape(n, 2, h * w).numpy())
        back = torch.stack([store.read(i, 0) for i in range(n)])
        cos = F.cosine_similarity(back, grids, dim=1)
        print(f"budget {dtype:7s}: {marker['bytes'] / (2 * n):>11,.0f} B/view on disk "
              f"({marker['bytes'] / (2 * n) / 1e6:.3f} MB; payload {store.bytes_per_view():,} B), "
              f"cosine to fp32 mean {cos.mean():.6f} min {cos.min():.6f}")
    for dtype in ("int8", "int4"):   # the exact store: one block of one step of n views
        ex = ExactStore.create(str(tmp / f"exact_{dtype}"), teacher=teacher.fingerprint(), plan={}, plan_hash="bench",
                               epochs=1, steps_per_epoch=1, global_batch=n, dataset_hash="bench",
                               keys=[q.stem for q in paths], grids=[(h, w)], dtype=dtype, steps_per_block=1)
        tokens, scale = encode(grids, dtype)
        nbytes = ex.write_block(0, 0, [(0, i, i, tokens[i].numpy(), scale[i].numpy(), (h, w)) for i in range(n)])
        back = torch.stack([decode(*ex.read(0, 0, i)) for i in range(n)])
        cos = F.cosine_similarity(back, grids, dim=1)
        print(f"exact {dtype:4s}: {nbytes / n:>11,.0f} B/view on disk ({nbytes / n / 1e6:.4f} MB; payload "
              f"{ex.view_bytes((h, w)):,} B), cosine to fp32 mean {cos.mean():.6f} min {cos.min():.6f}")
    print(f"bf16 teacher vs fp32: mean per-token cosine {bf16_fidelity(teacher, images[:4]):.6f} "
          "(bf16 allowed when >= 0.999)")
    store = Store.open(str(tmp / "int8"))
    rng = np.random.default_rng(0)
    store.read(0, 0)
    t0 = time.perf_counter()
    for _ in range(args.reads):
        store.read(int(rng.integers(n)), int(rng.integers(2)))
    read = (time.perf_counter() - t0) / args.reads
    t0 = time.perf_counter()
    for q in paths[:4]:
        teacher(render(q)[None])
    online = (time.perf_counter() - t0) / 4
    print(f"random read of one view (budget int8): {read * 1e3:.2f} ms; decode + teacher forward of one view: "
          f"{online * 1e3:.0f} ms; online / read = {online / read:.0f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="global steps of 32 views in the side-by-side plan")
    p.add_argument("--reads", type=int, default=400)
    p.add_argument("--baseline", default=V1, help="git revision holding the v1 exact format")
    p.add_argument("--teacher", action="store_true", help="also measure bytes and fidelity with a real teacher")
    p.add_argument("--vfm", default="dinov3_vitb")
    p.add_argument("--weights")
    p.add_argument("--images", type=int, default=8)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="cache_store_bench_") as tmp:
        compare_exact_formats(args, Path(tmp))
        if args.teacher:
            teacher_formats(args, Path(tmp))


if __name__ == "__main__":
    main()
