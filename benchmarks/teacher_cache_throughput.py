"""Precompute throughput vs the teacher's forward-only throughput at the same batch size.

Both are measured in one run on the same TACO images: (a) teacher forward only, on views already
rendered and held in memory; (b) the whole cache job (decode + augment every planned view, teacher,
int8, whole-shard Zarr writes with verification and markers), in-process and on a local Ray
cluster. Target: (b)/(a) >= 0.8. On the 2-core CI machine decoding competes with the teacher for
the same cores; on a GPU node it runs on CPU actors beside the GPU.

    python -m benchmarks.teacher_cache_throughput [--vfm dinov3_vitb] [--images 6] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pipeline.data.views import Renderer
from pipeline.data.load import load_dataset
from pipeline.data.policy import AugPolicy
from teacher_cache.precompute import TeacherSpec, precompute
from teacher_cache.store import Store
from teacher_cache.teachers import build_teacher
from teacher_cache.views import ViewPlan

TACO = Path(__file__).resolve().parents[2] / "shared" / "data" / "taco_val"


def subset(src: Path, n: int, dst: Path) -> Path:
    (dst / "images" / "train").mkdir(parents=True)
    (dst / "labels" / "train").mkdir(parents=True)
    for image in sorted((src / "images" / "val").glob("*.jpg"))[:n]:
        (dst / "images" / "train" / image.name).symlink_to(image)
        (dst / "labels" / "train" / f"{image.stem}.txt").symlink_to(src / "labels" / "val" / f"{image.stem}.txt")
    (dst / "data.yaml").write_text((src / "data.yaml").read_text().replace("val: images/val", "train: images/train"))
    return dst


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vfm", default="dinov3_vitb")
    p.add_argument("--weights")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--views", type=int, default=1, help="K per augmented phase (views = 2 + 2K)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray measurement")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    data = subset(TACO, args.images, tmp / "data")
    plan = ViewPlan(k=args.views, epochs=(4, 29, 50))
    renderer = Renderer(str(data), "train", plan, AugPolicy(epochs=plan.epochs))
    dataset = load_dataset(str(data))
    teacher = build_teacher(args.vfm, args.weights)
    views = torch.stack([torch.from_numpy(renderer(i, v)) for i in range(len(dataset))
                         for v in range(plan.num_views)])
    teacher(views[:2].float() / 255)  # warm-up
    t0 = time.perf_counter()
    for b in range(0, len(views), args.batch_size):
        teacher(views[b:b + args.batch_size].float() / 255)
    forward = len(views) / (time.perf_counter() - t0)
    fp = teacher.fingerprint()
    results = {}
    for executor in ("local",) + (() if args.no_ray else ("ray",)):
        if executor == "ray":
            import ray
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        store = Store.create(str(tmp / f"store_{executor}"), teacher=fp, plan=plan, dataset_hash="bench",
                             keys=[dataset.key(i) for i in range(len(dataset))], grid=(20, 20),
                             shard_size=max(1, args.images // 2))
        report = precompute(store, TeacherSpec(args.vfm, args.weights), renderer, executor=executor,
                            batch_size=args.batch_size, progress=False)
        results[executor] = report
    print(f"teacher {args.vfm}, {len(dataset)} TACO images x {plan.num_views} views = {len(views)} views, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, device cpu")
    print(f"teacher forward only:      {forward:8.3f} views/s")
    for executor, report in results.items():
        print(f"precompute ({executor:5s}):       {report.views_per_s:8.3f} views/s  "
              f"ratio {report.views_per_s / forward:.2f} (target >= 0.8); "
              f"{report.bytes_per_view:,.0f} B/view; shards {report.shards_written} written")


if __name__ == "__main__":
    main()
