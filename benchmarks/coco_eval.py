"""faster-coco-eval vs pycocotools: same 12 statistics? how much faster?

Generates a COCO ground truth (random boxes of every size range, some crowd boxes) and
detections (jittered ground truth with noisy scores and wrong labels, plus false positives),
scores them with both backends through ``pipeline.data.evaluate.coco_eval`` and prints both rows,
the largest difference and the speed ratio.

    python -m benchmarks.coco_eval [--images 2000] [--dets 100]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.data.evaluate import STAT_NAMES, coco_eval, format_table


def generate(num_images: int, dets_per_image: int, num_classes: int = 80, seed: int = 0):
    """(ground truth dict, detection results) with varied sizes, crowd boxes and false positives."""
    rng = np.random.default_rng(seed)
    W = H = 640
    images, anns, results = [], [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "width": W, "height": H, "file_name": f"{i:06d}.jpg"})
        n = int(rng.integers(1, 15))
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=n))  # small, medium and large
        wh = np.stack([side * rng.uniform(0.6, 1.4, n), side * rng.uniform(0.6, 1.4, n)], 1).clip(2, 600)
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([W, H]) - wh)
        cats = rng.integers(1, num_classes + 1, n)
        for (x, y), (w, h), c in zip(xy, wh, cats):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                         "iscrowd": int(rng.random() < 0.03)})
            jitter = rng.normal(0, 0.08, 4) * np.array([w, h, w, h])
            label = int(c) if rng.random() < 0.85 else int(rng.integers(1, num_classes + 1))
            results.append({"image_id": i, "category_id": label,
                            "bbox": [float(x + jitter[0]), float(y + jitter[1]),
                                     float(max(1.0, w + jitter[2])), float(max(1.0, h + jitter[3]))],
                            "score": float(rng.uniform(0.3, 1.0))})
        for _ in range(max(0, dets_per_image - n)):
            w, h = rng.uniform(4, 300, 2)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            results.append({"image_id": i, "category_id": int(rng.integers(1, num_classes + 1)),
                            "bbox": [float(x), float(y), float(w), float(h)],
                            "score": float(rng.uniform(0.0, 0.5))})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, num_classes + 1)]}
    return gt, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--dets", type=int, default=100, help="detections per image (RT-DETR keeps 300)")
    args = ap.parse_args()
    gt, results = generate(args.images, args.dets)
    print(f"{args.images} images, {len(gt['annotations'])} boxes, {len(results)} detections")
    stats, seconds = {}, {}
    for backend in ("pycocotools", "faster-coco-eval"):
        t = time.perf_counter()
        stats[backend] = coco_eval(gt, results, backend=backend)
        seconds[backend] = time.perf_counter() - t
        print(f"\n{backend}: {seconds[backend]:.2f} s\n{format_table(stats[backend])}")
    diff = max(abs(stats["pycocotools"][k] - stats["faster-coco-eval"][k]) for k in STAT_NAMES)
    print(f"\nmax |difference| over the 12 statistics: {diff:.2e}")
    print(f"speed ratio pycocotools / faster-coco-eval: {seconds['pycocotools'] / seconds['faster-coco-eval']:.1f}x")


if __name__ == "__main__":
    main()
