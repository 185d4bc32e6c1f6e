"""Per-sample cost of our record-based train transform vs the official-style torchvision v2 Compose on PIL.

Both run phase-3 ops (photometric, zoom-out, IoU crop, sanitize, flip, resize 640, convert) on the same
images, single-threaded as in a DataLoader worker; Mosaic (phase 2) has no torchvision counterpart and is
timed for ours only. Prints ms/sample and the ratio measured side by side.

    python -m benchmarks.augment_pipeline [--data ../shared/data/taco_val] [--n 60]
"""
import argparse
import time

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

from pipeline.data.augment import AugmentedDataset
from pipeline.data.load import load_dataset
from pipeline.data.policy import AugPolicy


def official_phase3():
    """base/rtv4.yml ops without Mosaic, on PIL like the official ``ConvertPILImage`` pipeline."""
    crop = T.RandomApply([T.RandomIoUCrop()], p=0.8)
    return T.Compose([T.RandomPhotometricDistort(p=0.5), T.RandomZoomOut(fill=0), crop,
                      T.SanitizeBoundingBoxes(min_size=1), T.RandomHorizontalFlip(), T.Resize([640, 640]),
                      T.SanitizeBoundingBoxes(min_size=1), T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def time_per_sample(fn, n):
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1000


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/taco_val")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset(args.data, split=args.split)
    n = min(args.n, len(ds))
    ours = AugmentedDataset(ds, AugPolicy(epochs=(4, 29, 50)), seed=0)
    official = official_phase3()

    def official_item(i):
        image, target = ds[i]
        return official(F.to_pil_image(image), {"boxes": target["boxes"], "labels": target["labels"]})

    torch.manual_seed(0)
    decode = time_per_sample(lambda i: ds[i], n)
    t_off = time_per_sample(official_item, n)
    t_ours = time_per_sample(lambda i: ours[(30, i)], n)
    t_mosaic = time_per_sample(lambda i: ours[(10, i)], n)
    print(f"{n} samples of {args.data}, 1 thread")
    print(f"decode only                       {decode:7.1f} ms/sample")
    print(f"official-style Compose (phase 3)  {t_off:7.1f} ms/sample")
    print(f"ours, record + replay (phase 3)   {t_ours:7.1f} ms/sample   ratio ours/official {t_ours / t_off:.2f}")
    print(f"ours, phase 2 (mosaic p .5)       {t_mosaic:7.1f} ms/sample")


if __name__ == "__main__":
    main()
