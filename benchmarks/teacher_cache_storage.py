"""Bytes per view and fidelity per store dtype; random read of one view vs computing it online.

On real TACO photographs at 640 (the official 20x20 grid): the teacher's fp32 grids are written to
an int8 and a float16 budget store and an int8 and an int4 exact store; we print bytes per view on disk (target <= 0.31 MB for 20x20x768
int8), the per-token cosine of what a read returns against fp32, the bf16-teacher fidelity
against fp32 (the precision rule: bf16 only if >= 0.999), and the time of a random single-view
read against decoding + teacher forward of the same view.

    python -m benchmarks.teacher_cache_storage [--vfm dinov3_vitb] [--weights PATH] [--images 8]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image

from teacher_cache.exact import ExactStore
from teacher_cache.quantize import decode, encode
from teacher_cache.store import Store
from teacher_cache.teachers import bf16_fidelity, build_teacher
from teacher_cache.views import ViewPlan

TACO = Path(__file__).resolve().parents[2] / "shared" / "data" / "taco_val" / "images" / "val"


def render(path: Path) -> torch.Tensor:
    img = decode_image(str(path), mode=ImageReadMode.RGB)
    return TF.resize(img, [640, 640], antialias=True).float() / 255


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vfm", default="dinov3_vitb")
    p.add_argument("--weights")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--reads", type=int, default=200)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    teacher = build_teacher(args.vfm, args.weights)
    paths = sorted(TACO.glob("*.jpg"))[:args.images]
    images = torch.stack([render(q) for q in paths])
    grids = torch.cat([teacher(images[i:i + 4]) for i in range(0, len(images), 4)])
    n, c, h, w = grids.shape
    plan = ViewPlan(k=0)  # 2 views per image: we store the grid and its flip's grid slot
    tmp = Path(tempfile.mkdtemp(prefix="cache_store_bench_"))
    print(f"teacher {args.vfm} ({teacher.arch}{', RANDOM-INIT' if teacher.weights_source == 'random-init' else ''}), "
          f"{n} TACO images, grid {c}x{h}x{w}")
    stores = {}
    for dtype in ("int8", "float16"):
        store = Store.create(str(tmp / dtype), teacher=teacher.fingerprint(), plan=plan, dataset_hash="bench",
                             keys=[q.stem for q in paths], grid=(h, w), dtype=dtype, shard_size=n)
        views = torch.stack([grids, grids], 1).flatten(0, 1)
        tokens, scale = encode(views, dtype)
        marker = store.write_shard(0, tokens.reshape(n, 2, h * w, c).numpy(),
                                   None if scale is None else scale.reshape(n, 2, h * w).numpy())
        back = torch.stack([store.read(i, 0) for i in range(n)])
        cos = F.cosine_similarity(back, grids, dim=1)
        print(f"{dtype:8s}: {marker['bytes'] / (2 * n):>11,.0f} B/view on disk "
              f"({marker['bytes'] / (2 * n) / 1e6:.3f} MB; payload {store.bytes_per_view():,} B), "
              f"cosine to fp32 mean {cos.mean():.6f} min {cos.min():.6f}")
        stores[dtype] = store
    for dtype in ("int8", "int4"):   # the exact store: one file per shard, CRC-32 per view
        ex = ExactStore.create(str(tmp / f"exact_{dtype}"), teacher=teacher.fingerprint(), plan={}, plan_hash="bench",
                               epochs=1, steps_per_epoch=1, global_batch=n, dataset_hash="bench",
                               keys=[q.stem for q in paths], dtype=dtype, steps_per_shard=1)
        tokens, scale = encode(grids, dtype)
        nbytes = ex.write_shard(0, 0, [(0, i, i, tokens[i].numpy(), scale[i].numpy(), (h, w)) for i in range(n)])
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
    print(f"random read of one view: {read * 1e3:.2f} ms; decode + teacher forward of one view: "
          f"{online * 1e3:.0f} ms; online / read = {online / read:.0f}x")


if __name__ == "__main__":
    main()
